"""Rounds learn from yes/no answers: training answers reach the training crops as partial
labels around their clusters, held-out answers never do, and each version's precision on the
held-out answers is measured by the stated rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from napari_pvs import training
from napari_pvs.cli import main
from napari_pvs.models.checkpoint import read_checkpoint
from napari_pvs.phantom import make_phantom
from napari_pvs.project import Project
from napari_pvs.rounds import RoundConfig, run_round
from napari_pvs.rounds.command import format_outcome
from napari_pvs.rounds.snapshot import load_held_out
from napari_pvs.rounds.validation import answer_precision, cluster_predicted, held_out_precision
from napari_pvs.training import UNLABELLED, TrainingVolume
from test_project import SHAPE, build_assets

TINY = dict(steps=3, batch_size=2, patch=16, device="cpu")
#: Four accepted 16 x 16 x 8 patches in one corner, away from the hand-made clusters.
BOXES = [((0, 0, x), (16, 16, x + 8)) for x in range(0, 32, 8)]
#: Ten hand-made predicted clusters (2 x 2 x 3 voxels), at least 4 voxels apart.
CLUSTERS = [(z, y, x) for z in (20, 26) for y in (22, 34) for x in (4, 14, 24, 34)][:10]


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(SHAPE, spacing=(1.0, 1.0, 1.0), modality="T2", seed=3, severity=1.0)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, phantom):
    return build_assets(tmp_path_factory.mktemp("assets"), phantom)


def _box(start, stop):
    return tuple(slice(a, b) for a, b in zip(start, stop, strict=True))


def _answer_hand_made_clusters(project) -> None:
    """Replace the current version's prediction by the hand-made clusters and answer each
    candidate: yes, no, yes, no..."""
    store = zarr.open_group(str(project.predict(1)), mode="r+")
    segmentation = np.zeros(SHAPE, np.uint8)
    for z, y, x in CLUSTERS:
        segmentation[z : z + 2, y : y + 2, x : x + 3] = 1
    store["segmentation"][:] = segmentation
    store["probability"][:] = np.where(segmentation == 1, 0.9, 0.1).astype(np.float32)
    candidates = project.refresh_candidates(1)
    assert len(candidates) == len(CLUSTERS)
    for index, candidate in enumerate(candidates):
        project.answer(candidate.id, "yes" if index % 2 == 0 else "no", annotator="test")


@pytest.fixture
def answered(tmp_path, assets, phantom):
    """A project with four accepted patches and ten answered candidates."""
    with Project.create(tmp_path / "proj", model=assets["model"], seed=5) as proj:
        proj.add_volume(assets["volume"])
        proj.update_settings(patch=16, n=3, predict_mc=0)
        for start, stop in BOXES:
            proj.accept(1, start, stop, phantom.pvs[_box(start, stop)])
        _answer_hand_made_clusters(proj)
        yield proj


def test_a_round_may_train_on_answers_alone(tmp_path, assets):
    with Project.create(tmp_path / "proj", model=assets["model"], seed=5) as project:
        project.add_volume(assets["volume"])
        project.update_settings(patch=16, n=3, predict_mc=0)
        with pytest.raises(ValueError, match="or answer some candidates"):
            run_round(project, RoundConfig(**TINY))
        _answer_hand_made_clusters(project)
        outcome = run_round(project, RoundConfig(**TINY))
        assert outcome.status == "done", outcome.message
        metrics = project.current_version().metrics
        trained = len(project.answers(split="train"))
        assert (metrics["train_patches"], metrics["train_answers"]) == (0, trained)
        assert metrics["validation_patches"] == 0


def test_a_round_trains_on_answers_and_never_on_held_out_ones(answered, monkeypatch, capsys):
    project = answered
    train_answers = project.answers(split="train")
    held_out = project.answers(split="held-out")
    assert len(held_out) >= 1 and len(train_answers) >= 5
    seen = {}
    real_fit = training.fit

    def spy(model, volumes, config=None, out=None, **kwargs):
        seen["train"] = list(volumes)
        return real_fit(model, volumes, config, out, **kwargs)

    monkeypatch.setattr(training, "fit", spy)
    outcome = run_round(project, RoundConfig(**TINY))
    assert outcome.status == "done", outcome.message

    # every training answer is a training crop of its own, and no held-out answer is
    names = {item.name for item in seen["train"]}
    assert {n for n in names if n.startswith("q")} == {f"q{a.id}" for a in train_answers}
    assert not any(n.startswith("h") for n in names)
    snapshot = zarr.open_group(str(project.path / "rounds" / "r1" / "snapshot.zarr"), mode="r")
    for answer in train_answers:
        (item,) = [i for i in seen["train"] if i.name == f"q{answer.id}"]
        crop_start = dict(snapshot[item.name].attrs)["napari_pvs"]["crop_start"]
        local = [(a - c, b - c) for a, b, c in
                 zip(answer.bbox_start, answer.bbox_stop, crop_start, strict=True)]  # fmt: skip
        # the answer on the cluster's voxels, 255 on every other voxel of the crop
        expected = np.full(item.labels.shape, UNLABELLED, np.uint8)
        expected[tuple(slice(a, b) for a, b in local)][project.answer_mask(answer.id)] = (
            1 if answer.answer == "yes" else 0
        )
        np.testing.assert_array_equal(item.labels, expected)
        assert item.focus == tuple(tuple(corner) for corner in zip(*local, strict=True))
    # no voxel of a held-out answer's box is labelled in any training crop
    for item in seen["train"]:
        crop_start = dict(snapshot[item.name].attrs)["napari_pvs"]["crop_start"]
        labelled = np.argwhere(np.asarray(item.labels) != UNLABELLED) + np.asarray(crop_start)
        for answer in held_out:
            inside = np.all((labelled >= answer.bbox_start) & (labelled < answer.bbox_stop), axis=1)
            assert not inside.any(), f"{item.name} trains on held-out answer {answer.id}"
    # the held-out answers are in the snapshot, to be measured against
    measured = load_held_out(project.path / "rounds" / "r1" / "snapshot.zarr")
    assert sorted(item.name for item in measured) == sorted(f"h{a.id}" for a in held_out)

    metrics = project.current_version().metrics
    assert metrics["train_answers"] == len(train_answers)
    assert metrics["held_out_answers"] == len(held_out)
    assert 0 <= metrics["answer_precision_n"] <= len(held_out)
    assert "answer_precision" in metrics and "base_answer_precision" in metrics
    _, meta = read_checkpoint(project.checkpoint_path())
    assert meta["training"]["answers"] == sorted(a.id for a in train_answers)
    assert project.compare()[-1]["answer_precision"] == metrics["answer_precision"]

    printed = format_outcome(outcome)  # what napari-pvs round prints
    assert f"and {len(train_answers)} answers" in printed
    assert f"precision on {len(held_out)} held-out answers" in printed

    project.close()
    assert main(["project", "versions", str(project.path)]) == 0
    table = capsys.readouterr().out
    assert "answer prec" in table and f"(n={metrics['answer_precision_n']:>2})" in table


class _Threshold(torch.nn.Module):
    """A stand-in model: the probability is the (normalised) image itself."""

    def __init__(self) -> None:
        super().__init__()
        self.segmentation_rule = {"threshold": 0.5}

    def forward(self, image, modality):
        probability = image.clamp(1e-6, 1 - 1e-6)
        return torch.log(probability / (1 - probability))


def _held_out(answer: str, above: int, voxels: int = 4) -> TrainingVolume:
    """A held-out crop: a ``voxels``-voxel cluster of which ``above`` are at 0.9, the rest at
    0.2; the answer on the cluster, 255 elsewhere."""
    image = np.full((8, 8, 8), 0.1, np.float32)
    labels = np.full((8, 8, 8), UNLABELLED, np.uint8)
    cluster = (4, 4, slice(2, 2 + voxels))
    image[cluster] = 0.2
    image[4, 4, 2 : 2 + above] = 0.9
    labels[cluster] = 1 if answer == "yes" else 0
    return TrainingVolume(image, labels, "T2", name="h", intensity_range=(0.0, 1.0))


@pytest.mark.filterwarnings("ignore::napari_pvs.io.LabelWarning")  # "no" crops hold no PVS
def test_held_out_precision_against_a_hand_made_case():
    # half of the cluster's voxels at or above the threshold: predicted; fewer: not
    probability = np.array([0.6, 0.5, 0.2, 0.1])
    assert cluster_predicted(probability, np.ones(4, bool), 0.5)
    assert not cluster_predicted(probability, np.ones(4, bool), 0.55)
    assert not cluster_predicted(probability, np.array([True, False, True, True]), 0.5)
    with pytest.raises(ValueError, match="at least one voxel"):
        cluster_predicted(probability, np.zeros(4, bool), 0.5)
    # precision = predicted yes / predicted
    assert answer_precision([True, True, True, False], [True, False, True, True]) == (2 / 3, 3)
    assert answer_precision([False, False], [True, False]) == (None, 0)
    # a model on five held-out answers: two yes and one no predicted, one no and one yes not
    crops = [
        _held_out("yes", above=4),
        _held_out("yes", above=2),  # exactly half: predicted
        _held_out("no", above=3),
        _held_out("no", above=1),
        _held_out("yes", above=1),
    ]
    result = held_out_precision(_Threshold(), crops)
    assert result == {"answer_precision": 2 / 3, "answer_precision_n": 3, "held_out_answers": 5}
