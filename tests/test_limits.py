"""Issue 20: user-given sizes and names are checked before any work, volumes are named without
ambiguity, and zero-size or degenerate volumes are refused, each with one sentence.

Each test failed on the code before the fix (see the handoff of issue 20 for the list).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_pvs import io, limits, ranking
from napari_pvs.cli import main
from napari_pvs.project import Project
from tiny_models import tiny_checkpoint

SHAPE = (20, 24, 18)
COMMON = ["--device", "cpu", "--batch", "2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def scan(path, shape=SHAPE, seed=0):
    data = np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)
    return io.save_nifti(path, data, np.diag([1.0, 1.0, 1.0, 1.0]))


def empty_nifti(path):
    nib.save(nib.Nifti1Image(np.zeros((0, 10, 10), np.float32), np.eye(4)), str(path))
    return path


def errors(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ------------------------------------------------------------------------------- the checks


def test_each_check_names_the_allowed_range(checkpoint, monkeypatch):
    with pytest.raises(
        ValueError, match="'bogus' is not a strategy; choose one of default, entropy"
    ):
        limits.check_strategy("bogus")
    monkeypatch.setattr(ranking, "STRATEGIES", (*ranking.STRATEGIES, "clasp"))
    assert limits.check_strategy("clasp") == "clasp"  # the list is ranking's, read now
    for n in (0, -3, 1.5):
        with pytest.raises(ValueError, match="--n must be a whole number of at least 1"):
            limits.check_count(n)
    assert limits.model_size_divisor(checkpoint) == 2  # tiny UNet: two levels
    assert limits.model_size_divisor("default") == 8
    assert limits.model_size_divisor([checkpoint, "default"]) == 8
    for patch in (0, 3, 19, 100000):
        with pytest.raises(ValueError, match=r"--patch must be between 8 and 18 voxels"):
            limits.check_patch(patch, SHAPE, 2)
    assert limits.check_patch(16, SHAPE, 16) == 16
    with pytest.raises(ValueError, match="between 16 and 18"):
        limits.check_patch(8, SHAPE, 16)
    gib = 2**30
    low, high = limits.window_range(8, None, batch=1, memory=8 * gib)
    assert (low, high) == (8, 203)  # 203^3 windows of 1 kB a voxel fit in 8 GiB
    assert limits.window_range(8, (300, 40, 40), batch=1, memory=8 * gib)[1] == 203
    assert limits.window_range(8, (90, 40, 40), batch=1, memory=8 * gib)[1] == 96
    assert limits.window_range(8, SHAPE, batch=1, memory=8 * gib)[1] == 64  # the default fits
    with pytest.raises(ValueError, match="--window must be between 8 and 203 voxels"):
        limits.check_window(100000, 8, memory=8 * gib)
    with pytest.raises(ValueError, match="--window must be between 8 and"):
        limits.check_window(4, 8)


def test_zero_size_and_degenerate_volumes_are_refused():
    with pytest.raises(ValueError, match=r"is empty \(shape 0x10x10, an edge of 0 voxels\)"):
        limits.check_volume_shape((0, 10, 10), "scan.nii")
    with pytest.raises(ValueError, match="holds only 8 voxels"):
        limits.check_volume_shape((2, 2, 2), "scan.nii")
    with pytest.raises(ValueError, match="2 dimensions"):
        limits.check_volume_shape((10, 10), "scan.nii")
    with pytest.raises(ValueError, match="thinner than the smallest patch"):
        limits.check_patch(8, (4, 200, 200), source="slab.nii")


# ------------------------------------------------------------------------------- commands


def test_zero_size_volume_is_one_sentence_in_convert_predict_and_add(
    tmp_path, checkpoint, capsys
):
    empty = empty_nifti(tmp_path / "empty_T2w.nii")
    assert main(["convert", str(empty), str(tmp_path / "e.zarr")]) == 2
    assert "is empty" in errors(capsys)
    assert main(["predict", str(empty), "--out", str(tmp_path / "e_pred.zarr"), "--model",
                 str(checkpoint), *COMMON]) == 2  # fmt: skip
    assert "is empty" in errors(capsys)
    assert not (tmp_path / "e.zarr").exists() and not (tmp_path / "e_pred.zarr").exists()
    folder = tmp_path / "proj"
    Project.create(folder, model=checkpoint).close()
    good = scan(tmp_path / "good_T2w.nii.gz")
    assert main(["project", "add", str(folder), str(good), str(empty)]) == 2
    assert "is empty" in errors(capsys)
    with Project.open(folder, readonly=True) as project:
        assert project.volumes() == []  # checked before any was added


def test_window_and_batch_out_of_range_are_refused_before_predicting(tmp_path, checkpoint, capsys):
    image = scan(tmp_path / "scan_T2w.nii.gz")
    out = tmp_path / "pred.zarr"
    for flag, value, said in (
        ("--window", "100000", "--window must be between 2 and 64 voxels"),
        ("--window", "1", "--window must be between 2 and"),
        ("--batch", "0", "--batch must be a whole number of at least 1"),
    ):
        args = ["predict", str(image), "--out", str(out), "--model", str(checkpoint), *COMMON]
        assert main([*args, flag, value]) == 2
        assert said in errors(capsys)
        assert not out.exists()


def test_rank_refuses_bad_sizes_naming_the_range(tmp_path, checkpoint, capsys):
    image = scan(tmp_path / "scan_T2w.nii.gz")
    pred = tmp_path / "pred.zarr"
    assert main(["predict", str(image), "--out", str(pred), "--model", str(checkpoint),
                 *COMMON, "--window", "16"]) == 0  # fmt: skip
    capsys.readouterr()
    for args, said in (
        (["--patch", "3"], "--patch must be between 8 and 18 voxels"),
        (["--patch", "100000"], "--patch must be between 8 and 18 voxels"),
        (["--n", "0"], "--n must be a whole number of at least 1"),
        (["--stride", "0"], "--stride must be a whole number of at least 1"),
    ):
        assert main(["rank", str(pred), "--strategy", "random", *args]) == 2
        assert said in errors(capsys)
    assert sorted(p.name for p in tmp_path.iterdir() if "ranking" in p.name) == []


@pytest.fixture()
def project(tmp_path, checkpoint):
    """A project with volumes 'a' (#1), 'b' (#2) and '2' (#3): a name made of digits."""
    folder = tmp_path / "proj"
    with Project.create(folder, model=checkpoint) as created:
        for index, name in enumerate(("a", "b", "2")):
            created.add_volume(scan(tmp_path / f"{name}.nii.gz", seed=index))
        assert [(v.id, v.name) for v in created.volumes()] == [(1, "a"), (2, "b"), (3, "2")]
    return folder


ACCEPTS = iter(range(10**6))


def accept(folder, tmp_path, *ref: str) -> int:
    """Accept an empty 8^3 patch, each call at another place (so none replaces another)."""
    labels = tmp_path / "patch.npy"
    np.save(labels, np.zeros((8, 8, 8), np.uint8))
    x = next(ACCEPTS) % 10
    box = ["0", "0", str(x), "8", "8", str(x + 8)]
    return main(["project", "accept", str(folder), *ref, "--box", *box, "--labels", str(labels)])


def annotated(folder) -> list[int]:
    """The volume of each annotation, in the order they were accepted."""
    with Project.open(folder, readonly=True) as project:
        return [a.volume_id for a in sorted(project.annotations(), key=lambda a: a.id)]


def test_a_digit_name_is_a_name_and_ids_are_written_with_a_hash(project, tmp_path, capsys):
    assert accept(project, tmp_path, "2") == 0
    assert annotated(project) == [3]  # the volume named '2', not the id 2
    assert accept(project, tmp_path, "#2") == 0
    assert accept(project, tmp_path, "--id", "1") == 0
    assert annotated(project) == [3, 2, 1]
    assert accept(project, tmp_path, str(tmp_path / "b.nii.gz")) == 0  # the added path
    assert annotated(project)[-1] == 2
    errors(capsys)
    assert accept(project, tmp_path, "1") == 2  # no volume is named '1': refused, never an id
    assert "write #1 or --id 1" in errors(capsys) and len(annotated(project)) == 4
    with Project.open(project) as opened:  # the API follows the same rules
        assert opened.volume("2").id == 3 and opened.volume("#2").id == 2
        assert opened.volume(str(tmp_path / "a.nii.gz")).id == 1
        assert opened.labels("2")["labels"].shape == SHAPE
        with pytest.raises(ValueError, match="write #1 or --id 1"):
            opened.accept("1", (0, 0, 0), (8, 8, 8), np.zeros((8, 8, 8), np.uint8))
    assert accept(project, tmp_path, "nope") == 2
    assert "no volume 'nope' in the project (an id is written #N" in errors(capsys)
    assert accept(project, tmp_path, "a", "--id", "1") == 2
    assert "not both" in errors(capsys)


def test_project_remove_takes_a_volume_out_and_keeps_its_labels(project, tmp_path, capsys):
    assert accept(project, tmp_path, "b") == 0
    capsys.readouterr()
    assert main(["project", "remove", str(project), "#2"]) == 0
    assert "removed volume #2 'b'" in capsys.readouterr().out
    with Project.open(project, readonly=True) as opened:
        assert [v.name for v in opened.volumes()] == ["a", "2"]
        assert [a.volume_id for a in opened.annotations()] == [2]  # kept in the history
    assert accept(project, tmp_path, "b") == 2
    assert "was removed from the project" in errors(capsys)


def test_queue_checks_sizes_first_and_ranks_every_volume_it_can(project, tmp_path, capsys):
    for args, said in (
        (["--n", "0"], "--n must be a whole number of at least 1"),
        (["--patch", "0"], "--patch must be between 8 and 18 voxels for a"),
        (["--patch", "3"], "--patch must be between 8 and 18 voxels for a"),
        (["--patch", "100000"], "--patch must be between 8 and 18 voxels for a"),
    ):
        assert main(["project", "queue", str(project), *args]) == 2
        assert said in errors(capsys)
    assert not any((project / "predictions").iterdir())  # refused before predicting
    (tmp_path / "a.nii.gz").unlink()  # volume #1's file is gone
    with Project.open(project) as opened:
        opened.update_settings(predict_tta=1)  # one pass: fast
    assert main(["project", "queue", str(project), "--n", "2", "--patch", "8",
                 "--strategy", "random", "--volume", "a", "#2"]) == 2  # fmt: skip
    out, err = capsys.readouterr()
    assert "b: 2 patches to review" in out  # ranked after #1 failed
    assert "1 of 2 volume(s) could not be ranked" in err and "#1 a:" in err
    assert "Traceback" not in err


def test_the_size_divisor_is_read_without_torch_and_is_the_models_own():
    """Ranking checks the patch edge against the model's divisor: read from the checkpoint's
    header by one torch-free rule, so a GUI's first ranking does not import torch (whose
    import held the GIL, and so the viewer, for 0.2-0.4 s)."""
    import subprocess
    import sys

    import torch

    from napari_pvs.models import build_model, list_models, size_divisor

    code = (
        "import sys; from napari_pvs import limits; "
        "print(limits.model_size_divisor('default'), 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["8", "False"]
    for name in list_models():
        options = {"use_text": False} if name == "cross_modal" else {}
        with torch.device("meta"):
            model = build_model(name, **options)
        assert size_divisor(name, model.config) == model.size_divisor, name
    with pytest.raises(ValueError, match="unet needs at least two levels"):
        size_divisor("unet", {"channels": [8]})
    with pytest.raises(ValueError, match="unknown model 'bogus'"):
        size_divisor("bogus", {})
