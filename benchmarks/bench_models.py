"""Accuracy of the default model vs Frangi on fresh phantoms, and an ablation on one budget.

    python benchmarks/bench_models.py                      # accuracy table (~10 min, 2 CPUs)
    python benchmarks/bench_models.py --ablation-steps 150 # + ablation (~6 short trainings)

Test data: 6 phantoms never used in training (seeds from 50_000; training uses 1000+), MNI152
anatomy, 3 T2w + 3 T1w, severities 0.3/0.6/0.9. The model sees the whole brain through the
product's own engine at its defaults (``napari_pvs.inference.Predictor``: 64^3 windows, 25%
overlap, Gaussian blending, bfloat16 on CPUs with native bf16) and is scored over the whole
brain; ``--float32`` runs the engine in float32 instead. Frangi is given its best shot:
threshold tuned per contrast on a training-seed phantom and the output restricted to white
matter + basal ganglia. ``confounder FP`` counts predicted voxels on lacunes, white-matter
hyperintensities and vessels.

The ablation trains every variant from scratch on the same phantoms with the same steps, patch,
batch and seed, and scores it on central 96^3 crops of the same test phantoms.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_default.py

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_default import training_phantoms, tuning_phantoms

from napari_pvs.inference import Predictor
from napari_pvs.intensity import normalize, robust_range
from napari_pvs.metrics import evaluate
from napari_pvs.models import build_model
from napari_pvs.models.checkpoint import load_model
from napari_pvs.models.frangi import frangi_segment, tune_threshold, white_matter_mask
from napari_pvs.phantom import make_phantom
from napari_pvs.training import TrainConfig, fit

TEST_SEED_BASE = 50_000
TARGETS = {"T2": (0.80, 0.85), "T1": (0.70, 0.80)}
ABLATIONS = {
    "cross_modal (full)": ("cross_modal", {}),
    "no text": ("cross_modal", {"use_text": False}),
    "no graph": ("cross_modal", {"use_graph": False}),
    "no cross-attention": ("cross_modal", {"use_cross_attention": False}),
    "no fusion": ("cross_modal", {"use_fusion": False}),
    "unet": ("unet", {}),
    "mednext_s": ("mednext_s", {"deep_supervision": True}),
}


def test_phantoms(shape, spacing):
    out = []
    for i, (modality, severity) in enumerate(
        [("T2", 0.3), ("T2", 0.6), ("T2", 0.9), ("T1", 0.3), ("T1", 0.6), ("T1", 0.9)]
    ):
        phantom = make_phantom(
            shape=shape,
            spacing=spacing,
            modality=modality,
            seed=TEST_SEED_BASE + i,
            severity=severity,
            anatomy="mni",
        )
        out.append(phantom)
    return out


def predict(model, image: np.ndarray, modality: str, amp: bool = True):
    """(probability, segmentation) through the product's inference engine at its defaults,
    so the segmentation follows the checkpoint's calibrated rule (threshold, min cluster)."""
    import tempfile

    import zarr

    with tempfile.TemporaryDirectory() as tmp:
        Predictor(model, modality=modality, amp=amp).predict(image, Path(tmp) / "p.zarr")
        group = zarr.open_group(str(Path(tmp) / "p.zarr"), mode="r")
        return np.asarray(group["probability"][:]), np.asarray(group["segmentation"][:]) > 0


def scores(pred: np.ndarray, phantom) -> dict:
    """Metrics of a mask (a float map is thresholded at 0.5)."""
    pred = pred >= 0.5 if pred.dtype.kind == "f" else pred.astype(bool)
    result = evaluate(pred, phantom.pvs, phantom.regions, phantom.spacing)
    return {
        "dice": result["dice"],
        "f1": result["cluster"]["f1"],
        "precision": result["cluster"]["precision"],
        "recall": result["cluster"]["recall"],
        "confounder_fp": int((pred & (phantom.confounders > 0)).sum()),
    }


def accuracy(args) -> dict:
    model, meta = load_model(args.checkpoint)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    phantoms = test_phantoms(tuple(args.shape), args.spacing)
    thresholds = {}
    for tune in tuning_phantoms(tuple(args.shape), args.spacing):
        mask = white_matter_mask(tune.regions)
        thresholds[tune.modality], _ = tune_threshold(
            tune.image, tune.pvs, tune.spacing, tune.modality, mask=mask
        )
    rows = []
    for phantom in phantoms:
        started = time.perf_counter()
        prob, segmentation = predict(model, phantom.image, phantom.modality, not args.float32)
        seconds = time.perf_counter() - started
        frangi = frangi_segment(
            phantom.image,
            phantom.spacing,
            phantom.modality,
            threshold=thresholds[phantom.modality],
            mask=white_matter_mask(phantom.regions),
        )
        rows.append(
            {
                "modality": phantom.modality,
                "severity": phantom.meta.get("severity"),
                "gt_pvs": int(phantom.pvs.sum()),
                "model": scores(segmentation, phantom),
                "model_raw": scores(prob, phantom),  # threshold only, every cluster kept
                "frangi": scores(np.asarray(frangi).astype(np.float32), phantom),
                "seconds": seconds,
            }
        )
    print(
        f"\nAccuracy: {args.checkpoint} ({meta['model']['name']}), shape {args.shape}, "
        f"spacing {args.spacing} mm; Frangi thresholds {thresholds}"
    )
    rule = getattr(model, "segmentation_rule", {})
    print(f"model segmentation rule (calibrated on held-out phantoms): {rule}")
    header = (
        f"{'contrast':8} {'model Dice':>10} {'model F1':>9} {'F1 raw':>7} {'Frangi Dice':>11} "
        f"{'Frangi F1':>9} {'Dice gain':>9} {'conf. FP':>8} {'infer s':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        m, f, raw = row["model"], row["frangi"], row["model_raw"]
        print(
            f"{row['modality']:8} {m['dice']:10.3f} {m['f1']:9.3f} {raw['f1']:7.3f} "
            f"{f['dice']:11.3f} {f['f1']:9.3f} {m['dice'] - f['dice']:9.3f} "
            f"{m['confounder_fp']:8d} {row['seconds']:7.1f}"
        )
    summary = {}
    for modality in ("T2", "T1"):
        sub = [r for r in rows if r["modality"] == modality]
        mean = {
            k: float(np.mean([r[src][k2] for r in sub]))
            for k, (src, k2) in {
                "model_dice": ("model", "dice"),
                "model_f1": ("model", "f1"),
                "model_raw_f1": ("model_raw", "f1"),
                "frangi_dice": ("frangi", "dice"),
                "frangi_f1": ("frangi", "f1"),
            }.items()
        }
        dice_target, f1_target = TARGETS[modality]
        mean["meets_targets"] = bool(
            mean["model_dice"] >= dice_target
            and mean["model_f1"] >= f1_target
            and mean["model_dice"] - mean["frangi_dice"] >= 0.10
        )
        summary[modality] = mean
        print(
            f"{modality + ' mean':8} {mean['model_dice']:10.3f} {mean['model_f1']:9.3f} "
            f"{mean['model_raw_f1']:7.3f} {mean['frangi_dice']:11.3f} {mean['frangi_f1']:9.3f} "
            f"{mean['model_dice'] - mean['frangi_dice']:9.3f}   targets Dice>={dice_target} "
            f"F1>={f1_target} gain>=0.10: {'met' if mean['meets_targets'] else 'NOT met'}"
        )
    return {"rows": rows, "summary": summary, "frangi_thresholds": thresholds}


def centre_crop(array: np.ndarray, size: int = 96) -> np.ndarray:
    starts = [max(0, (s - size) // 2) for s in array.shape]
    return array[tuple(slice(st, st + size) for st in starts)]


def ablation(args) -> dict:
    volumes, _ = training_phantoms(args.ablation_phantoms)
    phantoms = test_phantoms(tuple(args.shape), args.spacing)
    config = TrainConfig(
        epochs=max(1, args.ablation_steps // 20),
        steps_per_epoch=min(20, args.ablation_steps),
        batch_size=2,
        patch=(args.ablation_patch,) * 3,
        learning_rate=args.ablation_lr,
        validation_patches=8,
        patience=1000,
        seed=0,
        device="cpu",
    )
    rows = {}
    chosen = {label: ABLATIONS[label] for label in args.variants}
    for label, (name, overrides) in chosen.items():
        torch.manual_seed(0)
        model = build_model(name, **overrides)
        started = time.perf_counter()
        fit(model, volumes, config)
        train_s = time.perf_counter() - started
        per = {"T2": [], "T1": []}
        for phantom in phantoms:
            image = centre_crop(phantom.image)
            lo, hi = robust_range(phantom.image)
            x = torch.from_numpy(normalize(image, lo, hi))[None, None]
            with torch.inference_mode():
                prob = torch.sigmoid(model(x, phantom.modality))[0, 0].numpy()
            result = evaluate(prob >= 0.5, centre_crop(phantom.pvs), spacing=phantom.spacing)
            per[phantom.modality].append((result["dice"], result["cluster"]["f1"]))
        rows[label] = {
            "params": model.num_parameters(),
            "train_s": train_s,
            **{f"{m}_dice": float(np.mean([d for d, _ in v])) for m, v in per.items()},
            **{f"{m}_f1": float(np.mean([f for _, f in v])) for m, v in per.items()},
        }
    steps = config.epochs * config.steps_per_epoch
    print(
        f"\nAblation: {steps} steps x batch 2 x {args.ablation_patch}^3, "
        f"{len(volumes)} training phantoms, "
        f"scored on central 96^3 crops of the 6 test phantoms"
    )
    header = (
        f"{'variant':20} {'params':>9} {'T2 Dice':>8} {'T2 F1':>6} {'T1 Dice':>8} "
        f"{'T1 F1':>6} {'train s':>8} {'vs full':>8}"
    )
    print(header)
    print("-" * len(header))
    full = rows.get("cross_modal (full)") or next(iter(rows.values()))
    for label, row in rows.items():
        mean_dice = (row["T2_dice"] + row["T1_dice"]) / 2
        full_dice = (full["T2_dice"] + full["T1_dice"]) / 2
        print(
            f"{label:20} {row['params']:9,d} {row['T2_dice']:8.3f} {row['T2_f1']:6.3f} "
            f"{row['T1_dice']:8.3f} {row['T1_f1']:6.3f} {row['train_s']:8.0f} "
            f"{mean_dice - full_dice:+8.3f}"
        )
    return rows


def prompt_check(args) -> dict:
    """Does the trained model use its modality prompts? Same crops, right vs wrong prompt."""
    model, _ = load_model(args.checkpoint)
    phantoms = test_phantoms(tuple(args.shape), args.spacing)
    swap = {"T1": "T2", "T2": "T1"}
    rows: dict[str, list[float]] = {"right": [], "unknown": [], "swapped": []}
    for phantom in phantoms:
        lo, hi = robust_range(phantom.image)
        x = torch.from_numpy(normalize(centre_crop(phantom.image), lo, hi))[None, None]
        gt = centre_crop(phantom.pvs)
        prompts = {"right": phantom.modality, "unknown": "unknown",
                   "swapped": swap[phantom.modality]}  # fmt: skip
        for label, modality in prompts.items():
            with torch.inference_mode():
                prob = torch.sigmoid(model(x, modality))[0, 0].numpy()
            rows[label].append(evaluate(prob >= 0.5, gt, spacing=phantom.spacing)["dice"])
    print("\nPrompt check (central 96^3 crops of the 6 test phantoms): mean voxel Dice")
    for label, values in rows.items():
        print(f"{label + ' prompt':16} T2 {np.mean(values[:3]):.3f}  T1 {np.mean(values[3:]):.3f}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 192, 160])
    parser.add_argument("--spacing", type=float, default=1.0)
    parser.add_argument("--ablation-steps", type=int, default=0, help="0: skip the ablation")
    parser.add_argument("--ablation-phantoms", type=int, default=12)
    parser.add_argument("--ablation-patch", type=int, default=48, help="training patch edge")
    parser.add_argument("--ablation-lr", type=float, default=3e-3)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--prompt-check", action="store_true", help="right vs wrong prompts")
    parser.add_argument("--float32", action="store_true", help="inference in float32 throughout")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(ABLATIONS),
        choices=list(ABLATIONS),
        help="ablation variants to train (default: all)",
    )
    parser.add_argument("--json", type=Path, help="also write all numbers here")
    args = parser.parse_args(argv)
    results = {}
    if not args.skip_accuracy:
        results["accuracy"] = accuracy(args)
    if args.prompt_check:
        results["prompt_check"] = prompt_check(args)
    if args.ablation_steps > 0:
        results["ablation"] = ablation(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
