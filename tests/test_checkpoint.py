"""Checkpoints: exact round trips, no text encoder at load, and refusal of bad files."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from napari_pvs.models import text as text_module
from napari_pvs.models.checkpoint import (
    FORMAT_VERSION,
    METADATA_KEY,
    default_checkpoint_path,
    import_state_dict,
    load_checkpoint,
    load_default_model,
    load_model,
    load_weights_into,
    read_checkpoint,
    save_checkpoint,
)
from test_models import tiny


@pytest.fixture
def image():
    return torch.randn(1, 1, 18, 20, 22, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", ["cross_modal", "unet"])
def test_round_trip_gives_identical_outputs_and_metadata(tmp_path, image, name, monkeypatch):
    model = tiny(name, seed=5).eval()
    path = save_checkpoint(
        model, tmp_path / "m.safetensors", metrics={"val_dice": 0.5}, training={"round": 2}
    )

    # Loading must not need the text encoder: the embeddings come from the file.
    def no_encoder(*args, **kwargs):
        raise AssertionError("the text encoder was loaded at inference time")

    monkeypatch.setattr(text_module, "prompt_embeddings", no_encoder)
    loaded, meta = load_checkpoint(path)
    with torch.no_grad():
        assert torch.equal(model(image, "T2"), loaded(image, "T2"))
    assert meta["model"] == {"name": name, "config": json.loads(json.dumps(model.config))}
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["metrics"] == {"val_dice": 0.5} and meta["training"] == {"round": 2}
    assert meta["intensity"]["percentiles"] == [0.5, 99.5]
    assert not loaded.training
    if name == "cross_modal":
        assert set(meta["prompts"]) == {"T1", "T2", "unknown"}
        assert torch.equal(loaded.prompt_embeddings, model.prompt_embeddings)
    assert not list(tmp_path.glob("*.tmp"))


def test_tampered_truncated_and_foreign_files_are_refused(tmp_path):
    path = save_checkpoint(tiny("unet"), tmp_path / "m.safetensors")
    raw = path.read_bytes()

    tampered = tmp_path / "tampered.safetensors"
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 1.0
    with open(path, "rb") as handle:  # keep the original metadata (and digest)
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    save_file(tensors, str(tampered), metadata=header["__metadata__"])
    with pytest.raises(ValueError, match="integrity check"):
        load_checkpoint(tampered)

    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(raw[:-10] + bytes(b ^ 0xFF for b in raw[-10:]))
    with pytest.raises(ValueError, match="integrity check"):
        load_checkpoint(flipped)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(truncated)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a napari-pvs checkpoint"):
        load_checkpoint(foreign)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_newer_format_version_is_refused(tmp_path):
    path = save_checkpoint(tiny("unet"), tmp_path / "m.safetensors")
    tensors, meta = read_checkpoint(path)
    meta["format_version"] = FORMAT_VERSION + 1
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), metadata={METADATA_KEY: json.dumps(meta)})
    with pytest.raises(ValueError, match="newer than this napari-pvs"):
        load_checkpoint(newer)


def test_other_architecture_or_shape_gives_a_clear_error(tmp_path):
    unet_path = save_checkpoint(tiny("unet"), tmp_path / "unet.safetensors")
    with pytest.raises(ValueError, match="holds a 'unet' model, not 'cross_modal'"):
        load_checkpoint(unet_path, expected_model="cross_modal")
    with pytest.raises(ValueError, match="cannot be loaded into a 'cross_modal'"):
        load_weights_into(tiny("cross_modal"), unet_path)
    wider = tiny("unet", channels=[4, 8, 32])
    with pytest.raises(ValueError, match="other shapes"):
        load_weights_into(wider, unet_path)
    with pytest.raises(ValueError, match="names an architecture, not trained weights"):
        load_model("unet")


def test_import_state_dict_only_through_weights_only(tmp_path, image):
    model = tiny("unet", seed=2).eval()
    pt = tmp_path / "weights.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, pt)
    imported = import_state_dict(pt, "unet", **model.config)
    with torch.no_grad():
        assert torch.equal(imported(image), model(image))

    class Payload:
        def __reduce__(self):
            return (print, ("this code must never run",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(ValueError, match=r"weights_only=True"):
        import_state_dict(evil, "unet", **model.config)


def test_bundled_default_is_a_compact_cross_modal_model(image):
    model, meta = load_default_model()
    assert model.name == "cross_modal" and meta["model"]["name"] == "cross_modal"
    assert default_checkpoint_path().stat().st_size < 10e6
    assert meta["training"]["manifest_hash"] and meta["training"]["modalities"] == ["T1", "T2"]
    assert meta["metrics"]["val_dice"] > 0.5
    with torch.no_grad():
        prob = torch.sigmoid(model(image.abs().clamp(max=1), "T2"))
    assert prob.shape == image.shape and torch.all((prob >= 0) & (prob <= 1))
    assert load_model("default")[0].config == model.config


def test_the_calibrated_segmentation_rule_travels_with_the_weights(tmp_path):
    model = tiny("unet", seed=1)
    plain = load_checkpoint(save_checkpoint(model, tmp_path / "plain.safetensors"))[0]
    assert plain.segmentation_rule == {"threshold": 0.5, "min_cluster_mm3": 0.0, "tta": 1}
    rule = {"threshold": 0.4, "min_cluster_mm3": 3.0, "tta": 4}
    path = save_checkpoint(model, tmp_path / "rule.safetensors", segmentation=rule)
    loaded, meta = load_checkpoint(path)
    assert loaded.segmentation_rule == rule == meta["segmentation"]
    assert isinstance(loaded.segmentation_rule["tta"], int)
    # a rule saved before mirrorings were calibrated means none
    old = save_checkpoint(model, tmp_path / "old.safetensors", segmentation={"threshold": 0.4})
    assert load_checkpoint(old)[0].segmentation_rule["tta"] == 1
    # fine-tuning and saving again keeps the calibration
    again, _ = load_checkpoint(save_checkpoint(loaded, tmp_path / "again.safetensors"))
    assert again.segmentation_rule == rule
    with pytest.raises(ValueError, match="unknown segmentation rule"):
        save_checkpoint(model, tmp_path / "bad.safetensors", segmentation={"thresh": 0.5})
    with pytest.raises(ValueError, match="threshold"):
        save_checkpoint(model, tmp_path / "bad.safetensors", segmentation={"threshold": 1.5})
    with pytest.raises(ValueError, match="tta one of"):
        save_checkpoint(model, tmp_path / "bad.safetensors", segmentation={"tta": 3})


def test_the_bundled_checkpoint_is_checked_by_its_recorded_digest_without_torch(tmp_path):
    """A new project with the bundled model checks it by the SHA-256 recorded beside it (no
    torch, no torch-geometric: their imports held napari's GUI thread); the record is the file
    as shipped, its metadata the same as a full read's; a file whose bytes changed is read
    in full, and refused when tampered."""
    import shutil
    import subprocess
    import sys

    from napari_pvs.models.checkpoint_checks import (
        BUNDLED_DIGEST_SUFFIX,
        bundled_metadata,
        write_bundled_digest,
    )

    bundled = default_checkpoint_path()
    assert bundled_metadata(bundled) == read_checkpoint(bundled)[1]  # the record is current
    code = (
        "import sys; from napari_pvs.project import Project\n"
        f"Project.create({str(tmp_path / 'p')!r}, model='default').close()\n"
        "print('torch' in sys.modules, 'torch_geometric' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
    # the same file with one tensor byte changed: not the file shipped, so read in full
    copy = tmp_path / "default.safetensors"
    shutil.copyfile(bundled, copy)
    assert bundled_metadata(copy) is None  # no digest recorded beside it yet
    record = write_bundled_digest(copy)  # as train_default.py does for the bundled file
    assert record.read_text() == bundled.with_name(bundled.name + BUNDLED_DIGEST_SUFFIX).read_text()
    assert bundled_metadata(copy) == read_checkpoint(bundled)[1]
    data = bytearray(copy.read_bytes())
    data[-10] ^= 0xFF
    copy.write_bytes(bytes(data))
    assert bundled_metadata(copy) is None
    with pytest.raises(ValueError, match="integrity check"):
        read_checkpoint(copy)
