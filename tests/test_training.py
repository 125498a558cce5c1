"""Training: the loss ignores unlabelled voxels, learning happens, runs resume exactly."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_pvs.models.checkpoint import read_checkpoint
from napari_pvs.phantom import make_phantom
from napari_pvs.progress import Cancelled
from napari_pvs.training import (
    UNLABELLED,
    TrainConfig,
    TrainingVolume,
    augment,
    fit,
    last_checkpoint_path,
    masked_loss,
    split_volumes,
)
from napari_pvs.training.sampling import IndexedVolume, draw_batch
from test_models import tiny

SMALL = dict(
    steps_per_epoch=4,
    batch_size=2,
    patch=(24, 24, 24),
    validation_patches=2,
    augment=False,
    device="cpu",
    learning_rate=1e-2,
)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(
        shape=(40, 48, 40), spacing=1.5, modality="T2", seed=11, severity=0.9, snr=40
    )


def test_masked_loss_ignores_unlabelled_voxels():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, 8, generator=generator, requires_grad=True)
    labels = torch.randint(0, 2, (2, 1, 8, 8, 8), generator=generator).to(torch.uint8)
    labels[:, :, :4] = UNLABELLED
    loss = masked_loss([logits], labels)
    loss.backward()
    assert torch.all(logits.grad[:, :, :4] == 0)
    assert torch.all(logits.grad[:, :, 4:] != 0)
    # Whatever the model says where nothing is labelled does not change the loss.
    changed = logits.detach().clone()
    changed[:, :, :4] = 50.0
    torch.testing.assert_close(masked_loss([changed], labels), loss.detach())
    # Nothing labelled: zero loss, not NaN.
    nothing = torch.full_like(labels, UNLABELLED)
    assert float(masked_loss([logits.detach()], nothing)) == 0.0


def test_deep_supervision_levels_enter_the_loss():
    labels = torch.zeros(1, 1, 8, 8, 8, dtype=torch.uint8)
    full = torch.full((1, 1, 8, 8, 8), -5.0)
    assert float(masked_loss([full, torch.full((1, 1, 4, 4, 4), 5.0)], labels)) > float(
        masked_loss([full, torch.full((1, 1, 4, 4, 4), -5.0)], labels)
    )


def test_a_few_steps_on_a_tiny_phantom_lower_the_loss(phantom):
    volume = TrainingVolume(phantom.image, phantom.pvs, "T2")
    item = IndexedVolume(volume)
    rng = np.random.default_rng(1)
    fixed = [item.patch(item.centre(rng, "foreground"), (24, 24, 24)) for _ in range(4)]
    images = torch.from_numpy(np.stack([f[0] for f in fixed])[:, None])
    labels = torch.from_numpy(np.stack([f[1] for f in fixed])[:, None])

    model = tiny("cross_modal", seed=0)

    def loss_now() -> float:
        model.eval()
        with torch.no_grad():
            return float(masked_loss([model(images, "T2")], labels))

    before = loss_now()
    fit(model, [volume], TrainConfig(epochs=3, **SMALL))
    assert loss_now() < 0.85 * before


def test_partial_labels_sample_only_labelled_regions(phantom):
    labels = np.full(phantom.pvs.shape, UNLABELLED, np.uint8)
    box = (slice(10, 30), slice(10, 34), slice(8, 32))
    labels[box] = phantom.pvs[box]
    item = IndexedVolume(TrainingVolume(phantom.image, labels, "T2"))
    for points in (item.labelled, item.foreground):
        assert len(points) > 0
        for axis, sl in enumerate(box):
            assert points[:, axis].min() >= sl.start and points[:, axis].max() < sl.stop
    # Training on it runs; nothing labelled at all is a clear error.
    model = tiny("unet")
    result = fit(model, [TrainingVolume(phantom.image, labels, "T2")], TrainConfig(1, **SMALL))
    assert 0.0 <= result.best_dice <= 1.0
    with pytest.raises(ValueError, match="no labelled voxels"):
        fit(model, [TrainingVolume(phantom.image, np.full_like(labels, UNLABELLED))])


def test_an_interrupted_run_resumes_exactly(phantom, tmp_path):
    volumes = [TrainingVolume(phantom.image, phantom.pvs, "T2")]
    config = TrainConfig(epochs=3, **SMALL)
    straight = tiny("unet", seed=4)
    fit(straight, volumes, config, tmp_path / "a.safetensors")

    out = tmp_path / "b.safetensors"
    cancel = threading.Event()
    with pytest.raises(Cancelled):  # interrupted during the third epoch
        fit(
            tiny("unet", seed=4),
            volumes,
            config,
            out,
            progress=lambda done, total, message: done == 9 and cancel.set(),
            cancel=cancel,
        )
    assert read_checkpoint(last_checkpoint_path(out))[1]["training"]["resume"]["epoch"] == 1
    again = tiny("unet", seed=99)  # different start: everything must come from the checkpoint
    result = fit(again, volumes, config, out)
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    tensors_a, meta_a = read_checkpoint(tmp_path / "a.last.safetensors")
    tensors_b, _ = read_checkpoint(last_checkpoint_path(out))
    assert tensors_a.keys() == tensors_b.keys()
    for key in tensors_a:
        torch.testing.assert_close(tensors_a[key], tensors_b[key], msg=key)
    assert meta_a["training"]["resume"]["epoch"] == 2


def test_cancel_stops_training_and_keeps_progress_reports(phantom):
    cancel = threading.Event()
    calls = []

    def progress(done, total, message):
        calls.append((done, total))
        if done == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        fit(
            tiny("unet"),
            [TrainingVolume(phantom.image, phantom.pvs, "T2")],
            TrainConfig(epochs=2, **SMALL),
            progress=progress,
            cancel=cancel,
        )
    assert calls == [(1, 8), (2, 8)]


def test_augmentation_keeps_label_values_and_shape():
    rng = np.random.default_rng(0)
    image = rng.random((20, 22, 24), dtype=np.float32)
    labels = rng.choice(np.array([0, 1, UNLABELLED], np.uint8), size=image.shape)
    for seed in range(8):
        aug_image, aug_labels = augment(image, labels, np.random.default_rng(seed))
        assert aug_image.shape == image.shape and aug_image.dtype == np.float32
        assert set(np.unique(aug_labels)) <= {0, 1, UNLABELLED}
        assert np.isfinite(aug_image).all()


def test_validation_split_is_fixed_by_seed_and_disjoint():
    train, val = split_volumes(10, 0.2, seed=3)
    assert split_volumes(10, 0.2, seed=3) == (train, val)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == list(range(10))
    assert split_volumes(1, 0.2, seed=3) == ([0], [0])


def test_bad_training_input_is_explained():
    with pytest.raises(ValueError, match="differ in shape"):
        TrainingVolume(np.zeros((4, 4, 4)), np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="patch must be three sizes"):
        TrainConfig(patch=(4, 4))
    volume = TrainingVolume(np.ones((8, 8, 8)), np.zeros((8, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="at least 32 voxels"):
        fit(tiny("mednext_s"), [volume], TrainConfig(patch=(16, 16, 16)))


def test_cli_train_writes_a_loadable_checkpoint_and_resumes(phantom, tmp_path, capsys):
    from napari_pvs import io
    from napari_pvs.cli import main
    from napari_pvs.models.checkpoint import load_checkpoint

    image = io.save_ome_zarr(
        tmp_path / "t2.zarr",
        phantom.image,
        phantom.spacing,
        labels={"pvs": phantom.pvs},
        modality="T2",
        levels=1,
    )
    out = tmp_path / "model.safetensors"

    def argv(epochs: int) -> list[str]:
        return [
            "train", "--images", str(image), "--model", "unet", "--out", str(out),
            "--config", '{"channels": [4, 8], "num_res_units": 1, "feature_channels": 4}',
            "--epochs", str(epochs), "--steps-per-epoch", "2", "--patch", "16",
            "--device", "cpu",
        ]  # fmt: skip

    assert main(argv(1)) == 0
    model, meta = load_checkpoint(out, expected_model="unet")
    assert model.config["channels"] == [4, 8]
    assert meta["training"]["manifest_hash"] and meta["training"]["config"]["patch"] == [16] * 3
    # The same command with more epochs resumes from OUT.last.safetensors.
    first = read_checkpoint(last_checkpoint_path(out))[1]["training"]["resume"]["history"]
    assert main(argv(2)) == 0
    history = read_checkpoint(last_checkpoint_path(out))[1]["training"]["resume"]["history"]
    assert [h["epoch"] for h in history] == [0, 1]
    assert history[0] == first[0]  # epoch 0 was not rerun (its timing would differ)
    capsys.readouterr()
    assert main(["train", "--images", str(tmp_path / "missing.zarr"), "--out", str(out)]) == 2
    assert "missing.zarr" in capsys.readouterr().err


def test_hard_negatives_are_pvs_look_alikes_not_plain_tissue():
    """Hard-negative centres fall on a bright unlabelled sheet (sulcus-like), never on PVS,
    plain tissue or the air around the head."""
    rng = np.random.default_rng(0)
    image = np.zeros((40, 48, 48), np.float32)
    image[:, 6:42, 6:42] = 100 + rng.normal(0, 2, (40, 36, 36))  # tissue in noisy air (0)
    image[:, 20, 10:38] = 300  # a bright sheet: not PVS
    image[10:30, 30, 30] = 300  # a PVS
    labels = np.zeros(image.shape, np.uint8)
    labels[10:30, 30, 30] = 1
    item = IndexedVolume(TrainingVolume(image, labels, "T2"))
    hard = item.hard_negatives
    assert len(hard) > 50
    near_sheet = np.abs(hard[:, 1] - 20) <= 2
    assert near_sheet.mean() > 0.9
    assert not labels[tuple(hard.T)].any()
    centres = np.array([item.centre(rng, "hard") for _ in range(20)])
    assert (np.abs(centres[:, 1] - 20) <= 2).mean() > 0.9


def test_sampling_shares_must_add_up():
    with pytest.raises(ValueError, match="sum to at most 1"):
        TrainConfig(foreground_fraction=0.7, hard_negative_fraction=0.4)


class _ReadsTheAnswer(torch.nn.Module):
    """A 'model' whose probability is the (normalised) image: 0 -> ~0, 1 -> ~1."""

    name, config, size_divisor = "reads-the-answer", {}, 1

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(40.0)
            self.conv.bias.fill_(-20.0)

    def features(self, image, modality=None):
        return image

    def head(self, features, sample=False):
        return self.conv(features)


def test_calibration_keeps_the_smallest_cut_off_that_removes_specks():
    from napari_pvs.training import calibrate_segmentation

    truth = np.zeros((32, 36, 30), np.uint8)
    truth[4:12, 6, 6] = 1  # PVS of 8, 6 and 9 voxels
    truth[20, 10:16, 20] = 1
    truth[10:19, 25, 12] = 1
    predicted = truth.copy()
    predicted[2, 30, 25] = predicted[28, 3, 3] = predicted[15, 15, 27] = 1  # isolated specks
    image = 1.0 + predicted.astype(np.float32)
    volume = TrainingVolume(image, truth, "T2", name="specks")
    rule, rows = calibrate_segmentation(_ReadsTheAnswer(), [volume], candidates_mm3=(0, 2, 4, 8))
    # Mirroring cannot help a voxel-wise model: the cheaper rule (no mirrorings) is kept.
    assert rule == {"threshold": 0.5, "min_cluster_mm3": 2.0, "tta": 1}
    assert {row["tta"] for row in rows} == {1, 4}
    by_cut = {row["min_cluster_mm3"]: row for row in rows if row["tta"] == 1}
    assert by_cut[0.0]["f1"] < 1.0 and by_cut[2.0]["f1"] == by_cut[4.0]["f1"] == 1.0
    assert by_cut[8.0]["f1"] < 1.0  # the 6-voxel PVS is lost


class _CornerArtefact(_ReadsTheAnswer):
    """Reads the answer, but also marks a 3x3x3 block in the first corner of every window."""

    def head(self, features, sample=False):
        logits = super().head(features).clone()
        logits[..., :3, :3, :3] = 20.0
        return logits


def test_calibration_chooses_mirroring_when_it_removes_orientation_bound_errors():
    from napari_pvs.training import calibrate_segmentation

    truth = np.zeros((64, 64, 64), np.uint8)  # one 64^3 window covers the volume
    truth[20:40, 30, 30] = 1
    truth[45, 10:30, 50] = 1
    volume = TrainingVolume(1.0 + truth.astype(np.float32), truth, "T2", name="corner")
    rule, rows = calibrate_segmentation(
        _CornerArtefact(), [volume], candidates_mm3=(0,), candidates_tta=(1, 4)
    )
    by_tta = {row["tta"]: row for row in rows}
    # Unmirrored, the corner block is a false cluster; averaged over the identity and one
    # mirror per axis each corner holds it in 1 of 4 samples (p = 0.25), so it is gone.
    assert by_tta[1]["f1"] < 1.0 and by_tta[4]["f1"] == 1.0 and by_tta[4]["dice"] == 1.0
    assert rule == {"threshold": 0.5, "min_cluster_mm3": 0.0, "tta": 4}
    # A gain smaller than asked for keeps the cheaper rule.
    rule, _ = calibrate_segmentation(
        _CornerArtefact(), [volume], candidates_mm3=(0,), candidates_tta=(1, 4), min_tta_gain=1.0
    )
    assert rule["tta"] == 1


def test_each_epoch_is_reported_as_soon_as_it_is_validated(phantom):
    seen = []

    def on_epoch(record):
        seen.append((record["epoch"], steps_done[-1]))

    steps_done = [0]
    result = fit(
        tiny("unet"),
        [TrainingVolume(phantom.image, phantom.pvs, "T2")],
        TrainConfig(epochs=2, **SMALL),
        progress=lambda done, total, message: steps_done.append(done),
        on_epoch=on_epoch,
    )
    per_epoch = SMALL["steps_per_epoch"]
    # Epoch 0 arrives after its own steps and before epoch 1's, with the history's values.
    assert seen == [(0, per_epoch), (1, 2 * per_epoch)]
    assert [r["epoch"] for r in result.history] == [0, 1]


def test_foreground_share_holds_when_most_items_hold_no_pvs():
    """Nine empty reviewed patches and one with a PVS: foreground-centred draws still come
    from the one with PVS, so the configured share of PVS patches is kept."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(10):
        image = rng.normal(1.0, 0.05, (24, 24, 24)).astype(np.float32)
        labels = np.zeros((24, 24, 24), np.uint8)
        if i == 3:
            labels[10:14, 10:14, 10:14] = 1
        items.append(IndexedVolume(TrainingVolume(image, labels, "T2")))
    config = TrainConfig(batch_size=50, patch=(8, 8, 8), foreground_fraction=0.6,
                         hard_negative_fraction=0.0, augment=False)  # fmt: skip
    _, labels, _ = draw_batch(items, config, 0, 0, range(config.batch_size), train=False)
    with_pvs = np.mean([(patch == 1).any() for patch in labels])
    assert with_pvs >= 0.45  # about 0.6; drawing the item first gave 0.04


def test_unreviewed_voxels_of_an_answer_crop_give_exactly_zero_gradient():
    """An answered candidate's crop: 1 on a confirmed cluster, 0 on a rejected one, 255 on
    every other voxel. Whatever the logits are at 255 voxels (here changed to extremes), the
    loss and its gradient are bit for bit the same, and the gradient there is exactly 0."""
    generator = torch.Generator().manual_seed(3)
    labels = torch.full((2, 1, 12, 12, 12), UNLABELLED, dtype=torch.uint8)
    labels[0, 0, 4:6, 5:7, 3:9] = 1  # "yes": the cluster's voxels are PVS
    labels[1, 0, 6:9, 2:4, 2:4] = 0  # "no": they are background
    unreviewed = labels == UNLABELLED
    logits = torch.randn(labels.shape, generator=generator)

    def loss_and_gradient(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = values.clone().requires_grad_(True)
        loss = masked_loss([values], labels)
        loss.backward()
        return loss.detach(), values.grad

    loss, gradient = loss_and_gradient(logits)
    changed = logits.clone()
    extremes = torch.randn(labels.shape, generator=generator) * 40.0
    changed[unreviewed] = extremes[unreviewed]
    changed_loss, changed_gradient = loss_and_gradient(changed)
    assert torch.equal(changed_loss, loss)
    assert torch.equal(changed_gradient, gradient)
    assert torch.count_nonzero(gradient[unreviewed]) == 0
    assert torch.count_nonzero(gradient[~unreviewed]) == int((~unreviewed).sum())


def test_patches_of_an_answer_crop_hold_its_cluster():
    """A crop labelled only on an answered cluster (its focus box): every training patch drawn
    from it holds the whole cluster, also with augmentation's flips and the jitter."""
    rng = np.random.default_rng(0)
    image = rng.normal(1.0, 0.05, (40, 44, 38)).astype(np.float32)
    labels = np.full(image.shape, UNLABELLED, np.uint8)
    start, stop = (17, 15, 20), (21, 19, 31)
    labels[17:21, 15:19, 20:31] = 1
    item = IndexedVolume(TrainingVolume(image, labels, "T2", focus=(start, stop)))
    config = TrainConfig(batch_size=40, patch=(16, 16, 16), augment=False)
    _, patches, _ = draw_batch([item], config, 0, 0, range(config.batch_size))
    assert all((patch == 1).sum() == (labels == 1).sum() == 176 for patch in patches)
    centres = {tuple(item.focus_centre(np.random.default_rng(i), (16, 16, 16))) for i in range(50)}
    assert len(centres) > 1  # jittered, not one fixed patch
    # a cluster longer than the patch: the patch is centred on it
    long_item = IndexedVolume(
        TrainingVolume(image, labels, "T2", focus=((2, 15, 20), (38, 19, 31)))
    )
    assert long_item.focus_centre(rng, (16, 16, 16))[0] == 20
    with pytest.raises(ValueError, match="focus box"):
        TrainingVolume(image, labels, "T2", focus=((0, 0, 0), (41, 4, 4)))


@pytest.mark.filterwarnings("ignore::napari_pvs.io.LabelWarning")  # "no" answers hold no PVS
def test_answers_and_reviewed_patches_share_the_draws_whatever_their_numbers():
    """Two reviewed patches and twenty answered clusters: about half of the training patches
    come from each kind (drawing items uniformly would give the patches 1 in 11)."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(22):
        image = rng.normal(1.0, 0.05, (24, 24, 24)).astype(np.float32)
        if i < 2:  # a reviewed patch: every voxel labelled
            labels = np.zeros((24, 24, 24), np.uint8)
            labels[10:12, 10:12, 8:14] = 1
            items.append(IndexedVolume(TrainingVolume(image, labels, "T2")))
        else:  # an answer: only its cluster labelled
            labels = np.full((24, 24, 24), UNLABELLED, np.uint8)
            labels[11:13, 11:13, 9:13] = i % 2
            focus = ((11, 11, 9), (13, 13, 13))
            items.append(IndexedVolume(TrainingVolume(image, labels, "T2", focus=focus)))
    config = TrainConfig(batch_size=400, patch=(8, 8, 8), augment=False)
    _, labels, _ = draw_batch(items, config, 0, 0, range(config.batch_size))
    from_patches = np.mean([(patch != UNLABELLED).mean() > 0.5 for patch in labels])
    assert 0.4 <= from_patches <= 0.6
