"""The worse-round guard end to end, and one validation Dice for a version everywhere: the
round's metrics, its per-epoch curve, the versions table, Compare and the learning curve."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_pvs import training
from napari_pvs.project import Project
from napari_pvs.rounds import RoundConfig, run_round
from test_rounds import BOXES, TINY, assets, phantom, truth  # noqa: F401 (fixtures)


@pytest.fixture
def folder(tmp_path, assets, phantom):  # noqa: F811
    """A closed project with eight accepted patches (two of them validation)."""
    with Project.create(tmp_path / "proj", model=assets["model"], seed=5) as proj:
        proj.add_volume(assets["volume"])
        proj.update_settings(patch=16, n=3, predict_mc=2)
        for start, stop in BOXES:
            proj.accept(1, start, stop, truth(phantom, start, stop))
    return tmp_path / "proj"


def set_output(model, bias: float) -> None:
    """Make ``model`` output the constant logit ``bias`` everywhere (its last convolution)."""
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d | torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(bias)


@pytest.fixture
def forced_fit(monkeypatch):
    """Each round's training ends with a constant model: ``outputs[0]`` is the next round's
    logit (+20: every voxel PVS, -20: none)."""
    real_fit = training.fit
    outputs: list[float] = []

    def fit(model, volumes, config=None, out=None, **kwargs):
        result = real_fit(model, volumes, config, out, **kwargs)
        set_output(model, outputs.pop(0))
        return result

    monkeypatch.setattr(training, "fit", fit)
    return outputs


def test_worse_round_is_kept_but_not_made_current(tmp_path, assets, forced_fit, capsys):  # noqa: F811
    """Every accepted voxel is PVS: round 1 ends calling everything PVS (Dice 1, current),
    round 2 ends calling nothing PVS (Dice 0 on every validation patch: worse beyond noise)."""
    from napari_pvs.cli import main

    folder = tmp_path / "proj"
    with Project.create(folder, model=assets["model"], seed=5) as project:
        project.add_volume(assets["volume"])
        project.update_settings(patch=16, n=3, predict_mc=2)
        for start, stop in BOXES:
            project.accept(1, start, stop, np.ones((16, 16, 8), np.uint8))
        forced_fit[:] = [20.0, -20.0]
        first = run_round(project, RoundConfig(**TINY))
        assert first.current and first.metrics["validation_dice"] == 1.0
    assert main(["round", str(folder), "--steps", "3", "--patch", "16",
                 "--device", "cpu"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    with Project.open(folder) as project:
        new = project.versions()[-1]
        assert new.version == 2 and new.status == "ready" and new.metrics["worse_than_base"]
        assert project.current_version().version == 1
        guard = new.metrics["guard"]
        assert (guard["new_dice"], guard["current_dice"], guard["upper_bound"]) == (0, 1, -1)
        sentence = (
            "v2 scores validation Dice 0.000 on 2 patches, below v1's 1.000 by more than the "
            "set's noise, so it was kept but v1 stays current; make v2 current if you want it "
            "anyway."
        )
        assert f"round 2: done: {sentence}" in out
        assert f"napari-pvs project rollback {folder} v2" in out
        assert project.round(2).status == "done" and project.round(2).message == sentence
        # the queues still come from the current version; the user may choose v2 anyway
        assert {p.model_version for p in project.queue(1)} == {1}
        assert project.validation_score(2) == (0.0, 2)
        project.rollback(2)
        assert project.current_version().version == 2


def test_a_better_or_equal_round_becomes_current(folder):
    with Project.open(folder) as project:
        outcome = run_round(project, RoundConfig(**TINY))
        assert outcome.status == "done" and outcome.current
        assert not outcome.metrics["worse_than_base"]
        assert outcome.message == "v1 is current" and project.current_version().version == 1


def test_one_validation_dice_for_a_version_everywhere(folder, capsys):
    from napari_pvs.cli import main

    with Project.open(folder) as project:
        dice, start = check_one_dice(project)
    assert main(["project", "versions", str(folder)]) == 0
    table = capsys.readouterr().out
    line_v0 = next(line for line in table.splitlines() if line.lstrip(" *").startswith("v0"))
    line_v1 = next(line for line in table.splitlines() if line.lstrip(" *").startswith("v1"))
    assert f"{start:.4f}" in line_v0 and f"{dice:.4f}" in line_v1
    fields = line_v1.split()
    assert fields[fields.index("ready") + 3] == "2"  # the set's size beside the number


def check_one_dice(project) -> tuple[float, float]:
    from napari_pvs._widgets.report import learning_curve

    events = []
    outcome = run_round(project, RoundConfig(**{**TINY, "steps": 6, "validate_every": 3}),
                        on_event=events.append)  # fmt: skip
    assert outcome.status == "done" and outcome.current
    metrics = outcome.metrics
    dice, patches = project.validation_score(1)
    assert (dice, patches) == (metrics["validation_dice"], 2)
    # the per-epoch curve is the same measure on the same crops: the kept epoch's number
    epochs = [e for e in events if e["kind"] == "validation" and e.get("source") == "fit"]
    assert len(epochs) == 2 and all(e["patches"] == 2 for e in epochs)
    assert max(e["dice"] for e in epochs) == pytest.approx(dice, abs=1e-12)
    # v0: its score on the project's set (round 1's start), never its checkpoint's own metric
    start, start_patches = project.validation_score(0)
    assert start == metrics["base_validation_dice"] and start_patches == 2
    rows = {r["version"]: r for r in project.compare()}
    assert rows[0]["validation_dice"] == start and rows[1]["validation_dice"] == dice
    assert rows[0]["validation_patches"] == rows[1]["validation_patches"] == 2
    assert "validation_counts" not in rows[1]
    curve = learning_curve(project)
    assert curve["dice"] == [start, dice]
    counts = np.asarray(metrics["validation_counts"])
    tp, fp, fn = counts.sum(axis=0)
    assert dice == pytest.approx(1.0 if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    return dice, start
