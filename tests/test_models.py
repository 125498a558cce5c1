"""Model registry and architectures: shapes, the features/head split, gradients, modality."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from napari_pvs.models import (
    MODALITIES,
    build_model,
    canonical_modality,
    list_models,
    modality_list,
    resolve_device,
)
from napari_pvs.models.graph import image_text_edges, knn_edges
from napari_pvs.models.text import PROMPT_TEMPLATES, encode_texts, prompt_bank, prompt_embeddings

TINY = {
    "cross_modal": {"channels": [4, 8, 16], "graph_layers": 1, "k": 4, "heads": 2},
    "unet": {"channels": [4, 8, 16], "num_res_units": 1, "feature_channels": 4},
    "mednext_s": {"init_filters": 4},
}


def random_prompts(seed: int = 0, dim: int = 384) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(len(MODALITIES), len(PROMPT_TEMPLATES), dim)).astype(np.float32)


def tiny(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = {**TINY[name], **overrides}
    if name == "cross_modal":
        config.setdefault("prompt_embeddings", random_prompts(seed))
    return build_model(name, **config)


@pytest.mark.parametrize("name", sorted(TINY))
def test_odd_sizes_give_input_shaped_logits_and_forward_is_head_of_features(name):
    model = tiny(name).eval()
    image = torch.randn(2, 1, 19, 26, 33)
    with torch.no_grad():
        logits = model(image, ["T1", "T2"])
        feats = model.features(image, ["T1", "T2"])
        assert logits.shape == (2, 1, 19, 26, 33)
        assert feats.shape[0] == 2 and feats.shape[2:] == (19, 26, 33)
        torch.testing.assert_close(model.head(feats), logits)
        # MC sampling reruns only the head; dropout makes the samples differ.
        samples = [model.head(feats, sample=True) for _ in range(2)]
    assert not torch.equal(samples[0], samples[1])
    assert model.name == name
    rebuilt = build_model(
        name,
        **{
            **model.config,
            **({"prompt_embeddings": random_prompts()} if name == "cross_modal" else {}),
        },
    )
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_gradients_reach_every_component_of_the_cross_modal_model():
    model = tiny("cross_modal").train()
    image = torch.randn(2, 1, 16, 16, 16)
    loss = model(image, ["T1", "T2"]).square().mean()
    loss.backward()
    components = [
        "text_proj",
        "films",
        "stem",
        "downs",
        "enc_stages",
        "graph",
        "cross_attention",
        "attn_norm",
        "fusion",
        "ups",
        "dec_stages",
        "mc_head",
    ]
    for component in components:
        grads = [p.grad for p in getattr(model, component).parameters()]
        assert grads and all(g is not None for g in grads), component
        assert sum(float(g.abs().sum()) for g in grads) > 0, component


@pytest.mark.parametrize(
    "switch, absent",
    [
        ({"use_graph": False}, ["graph"]),
        ({"use_cross_attention": False}, ["cross_attention"]),
        ({"use_fusion": False}, ["fusion"]),
        ({"use_text": False}, ["text_proj", "films", "cross_attention", "prompt_embeddings"]),
        ({"graph_layer_type": "gat"}, []),
    ],
)
def test_ablation_switches_remove_components_and_still_train(switch, absent):
    model = tiny("cross_modal", **switch).train()
    for name in absent:
        assert not hasattr(model, name), name
    for key, value in switch.items():
        assert model.config[key] == value
    model(torch.randn(1, 1, 16, 16, 16), "T2").mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_the_modality_prompt_changes_the_output_only_with_text():
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        guided = tiny("cross_modal").eval()
        assert not torch.allclose(guided(image, "T1"), guided(image, "T2"))
        blind = tiny("cross_modal", use_text=False).eval()
        torch.testing.assert_close(blind(image, "T1"), blind(image, "T2"))


def test_registry_builds_mednext_l_k5_with_about_63_million_parameters():
    model = build_model("mednext_l_k5")
    assert model.config["kernel_size"] == 5 and model.config["size"] == "L"
    assert model.size_divisor == 16
    assert 60e6 < model.num_parameters() < 66e6


def test_cross_modal_presets_compact_for_cpu_and_paper_size_for_gpu():
    prompts = random_prompts()
    compact = build_model("cross_modal", prompt_embeddings=prompts)
    paper = build_model("cross_modal", preset="paper", prompt_embeddings=prompts)
    assert compact.config["channels"] == [16, 32, 64, 128] and compact.size_divisor == 8
    assert paper.size_divisor == 16 and paper.config["graph_layers"] == 3
    assert compact.num_parameters() < 3e6 < 20e6 < paper.num_parameters()
    with pytest.raises(ValueError, match="unknown cross_modal preset"):
        build_model("cross_modal", preset="huge")


def test_mednext_deep_supervision_outputs_are_coarser_levels():
    model = tiny("mednext_s").train()
    outputs = model.training_outputs(torch.randn(1, 1, 33, 20, 18), "T1")
    assert [tuple(o.shape[2:]) for o in outputs] == [
        (33, 20, 18),
        (17, 10, 9),
        (9, 5, 5),
        (5, 3, 3),
        (3, 2, 2),
    ]


def test_registry_and_input_errors_are_clear():
    assert {"cross_modal", "unet", "mednext_l_k5"} <= set(list_models())
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet")
    with pytest.raises(ValueError, match="invalid config for model 'unet'"):
        build_model("unet", widths=[1])
    model = tiny("unet").eval()
    with pytest.raises(ValueError, match="exactly 1 channel"):
        model(torch.zeros(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match=r"\(batch, 1, D, H, W\)"):
        model(torch.zeros(8, 8, 8))
    bad = torch.zeros(1, 1, 8, 8, 8)
    bad[0, 0, 1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(bad)
    with pytest.raises(ValueError, match="3 modalities for a batch of 2"):
        modality_list(["T1", "T2", "T1"], 2)


def test_modality_spellings():
    assert [canonical_modality(m) for m in ["t2w", "T1-weighted", None, "FLAIR"]] == [
        "T2",
        "T1",
        "unknown",
        "unknown",
    ]


def test_knn_edges_match_brute_force_neighbours():
    tokens = torch.randn(2, 10, 3)
    edges = knn_edges(tokens, k=3)
    assert edges.shape == (2, 2 * 10 * 3)
    for b in range(2):
        dist = torch.cdist(tokens[b], tokens[b])
        dist.fill_diagonal_(float("inf"))
        expected = dist.topk(3, largest=False).indices
        for n in range(10):
            sources = edges[0][edges[1] == b * 10 + n] - b * 10
            assert set(sources.tolist()) == set(expected[n].tolist())
    links = image_text_edges(batch=2, n_image=10, n_text=4)
    assert links.shape == (2, 2 * 2 * 10 * 4)
    # item 1's image nodes (10..19) link only to item 1's text nodes (2*10 + 4 .. 2*10 + 7)
    item1 = links[1][links[0] == 15]
    assert set(item1.tolist()) == {24, 25, 26, 27}


def test_text_encoder_is_offline_minilm_and_modality_specific():
    bank = prompt_bank("T2")
    assert len(bank) == len(PROMPT_TEMPLATES) and "T2-weighted" in bank[0]
    embeddings = prompt_embeddings()
    assert embeddings.shape == (3, len(PROMPT_TEMPLATES), 384)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, rtol=1e-5)
    assert not np.allclose(embeddings[0], embeddings[1])
    # Mean pooling: the same sentence embeds identically whatever it is batched with.
    alone = encode_texts([bank[0]])
    np.testing.assert_allclose(alone[0], embeddings[1, 0], atol=1e-5)


def test_missing_text_model_path_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        encode_texts(["x"], tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        encode_texts(["x"], tmp_path)
    monkeypatch.setenv("NAPARI_PVS_TEXT_MODEL", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="NAPARI_PVS_TEXT_MODEL"):
        build_model("cross_modal", channels=[4, 8])


def test_resolve_device(capsys):
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("cuda").type == "cpu"
        assert "falling back to CPU" in capsys.readouterr().err


def test_resolve_device_sends_the_fallback_note_to_the_callback(capsys):
    notes: list[str] = []
    device = resolve_device("cuda", notify=notes.append)
    if torch.cuda.is_available():
        assert device.type == "cuda" and notes == []
    else:
        assert device.type == "cpu"
        assert len(notes) == 1 and "falling back to CPU" in notes[0]
        assert capsys.readouterr().err == ""  # told the callback, not stderr


def test_non_finite_voxels_are_refused_and_huge_finite_ones_are_not():
    """The input check: any NaN or infinite voxel is named, however the rest sums; finite
    voxels whose sum overflows float32 are still accepted."""
    import tiny_models

    model = tiny_models.tiny_unet(0, 0.0).eval()
    for bad in (float("nan"), float("inf"), -float("inf")):
        image = torch.zeros(1, 1, 8, 8, 8)
        image[0, 0, 3, 4, 5] = bad
        with pytest.raises(ValueError, match="NaN or infinite values"):
            model.features(image)
    huge = torch.full((1, 1, 8, 8, 8), 3e38)  # finite; their float32 sum is inf
    assert not torch.isfinite(huge.sum())
    with torch.inference_mode():
        model.features(huge)  # accepted (what the network makes of it is its own matter)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_torch_libraries_preload_without_importing_torch():
    """The GUI's workers load torch's libraries with the GIL released before importing it
    (``models.native``): loaded, mapped into the process, torch not imported yet, and the
    import that follows works on them. (The GUI thread's wait it saves is measured in
    ``benchmarks/bench_torch_import.py``.)"""
    code = (
        "import sys\n"
        "from napari_pvs.models.native import preload_torch_libraries, torch_library_path\n"
        "path = torch_library_path()\n"
        "before = str(path) in open('/proc/self/maps').read()\n"
        "loaded = preload_torch_libraries()\n"
        "after = str(path) in open('/proc/self/maps').read()\n"
        "print(before, loaded, after, 'torch' in sys.modules)\n"
        "import torch\n"
        "print(float(torch.ones(3).sum()), preload_torch_libraries())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "True", "False", "3.0", "True"]


def test_torch_library_preload_gives_up_quietly(monkeypatch):
    """Where there is nothing to preload (no library found), nothing fails: the import then
    loads the libraries itself."""
    from napari_pvs.models import native

    assert native._dlopen(None) is False
    monkeypatch.setattr(native.sys, "platform", "win32")
    assert native.torch_library_path() is None
