#!/usr/bin/env python
"""g on real predictions: backbone x input-size variants of the quality predictor, scored on the test-split
predictions of segmentation networks that took no part in g's training (docs/RESULTS.md, "g on real predictions").

Input: the output folder of an experiment run (``qgssl experiment run``) holding ``data/manifest.json`` and
trained ``ssl/<method>/<network>/seed<k>/models/model.pt`` models (the held-out networks). Steps, all resumable
(a finished output is reused):

1. every held-out model writes its test- and validation-split masks with the SSL bundle's ``inference.json``
   (``<out>/predictions/<split>/<method>_seed<k>/predictions/<stem>_mask.png``, original size);
2. the weak snapshots of ``train_weak.json`` at ``--weak-image-size`` (shared by every variant; at another
   g size their Type 2 predictions are computed at g's size, which the bundle caches per size);
3. per variant ``<backbone>:<size>`` and g-training seed, ``train.json`` (wall time recorded), then
   ``evaluate.json`` with ``prediction_dirs`` = the test folders of step 1 (``<out>/eval/<variant>_seed<k>/``),
   then ``calibrate.json`` on the validation folders (the calibration lands in g's sidecar
   ``model.meta.json``) and the same test scores through that calibration;
4. ``<out>/g_real_predictions.json``: two rows per variant (raw and ``_calibrated``; mean over the g seeds),
   the ``docs/results/g_real_predictions.json`` schema plus held-out corruption metrics and train time.

Usage::

    OMP_NUM_THREADS=1 nice -n 10 python scripts/g_study.py --runs runs/heldout_c2k --direction cvc2kvasir \\
        --out runs/g_study_c2k --variants resnet18:64 efficientnet_lite0:64 efficientnet_lite0:128 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
QUALITY = ROOT / "bundles" / "quality_predictor"
SSL = ROOT / "bundles" / "ssl_segmentation"
METRIC_KEYS = ("pearson", "spearman", "mae", "bias", "fraction_overestimated", "auroc_dice_0_7")


def bundle(bundle_dir: Path, configs: list[str], **overrides: Any) -> None:
    from monai.bundle import run as bundle_run

    bundle_run(
        config_file=[str(bundle_dir / "configs" / c) for c in configs],
        logging_file=str(bundle_dir / "configs" / "logging.conf"),
        meta_file=str(bundle_dir / "configs" / "metadata.json"),
        bundle_root=str(bundle_dir),
        device="$torch.device('cpu')",
        num_workers=0,
        **overrides,
    )


def write_predictions(args: argparse.Namespace, split: str) -> dict[str, str]:
    """Step 1: ``split`` masks of every held-out model; returns ``{source: folder}``."""
    from qgssl_monai.data.manifest import load_split

    manifest = args.runs / "data" / "manifest.json"
    models = sorted(args.runs.glob(f"ssl/*/{args.network}/seed*/models/model.pt"))
    if not models:
        raise SystemExit(f"{args.runs}: no trained {args.network} models (run the experiment first)")
    images = [item["image"] for item in load_split(manifest, split)]
    sources = {}
    for model in models:
        name = f"{model.parents[3].name}_{model.parents[1].name}"  # <method>_seed<k>
        target = args.out / "predictions" / split / name
        if len(list((target / "predictions").glob("*_mask.png"))) < len(images):
            bundle(SSL, ["train.json", f"net/{args.network}.json", "inference.json"], input_dir=images,
                   ckpt_dir=str(model.parent), output_dir=str(target), image_size=args.network_image_size,
                   network_size=args.network_size, manifest=str(manifest), quality_ckpt="")  # fmt: skip
        sources[name] = str(target / "predictions")
    return sources


def run_variant(
    args: argparse.Namespace, backbone: str, size: int, seed: int, sources: dict[str, str], calibration_sources: dict[str, str]
) -> dict[str, Any]:
    """Steps 2-3 for one variant and seed; returns the evaluation metrics, the calibrated ones and the train time."""
    manifest = str(args.runs / "data" / "manifest.json")
    weak_dir = args.out / "weak" / f"{args.weak_image_size}px"
    if not list(weak_dir.glob("weak_epoch_*.pt")):
        bundle(QUALITY, ["train_weak.json"], manifest=manifest, image_size=args.weak_image_size, seed=0, weak_dir=str(weak_dir),
               ckpt_dir=str(weak_dir), output_dir=str(args.out / "weak_eval"), weak_epochs=args.weak_epochs)  # fmt: skip
    name = f"{backbone}_{size}px_seed{seed}"
    ckpt_dir = args.out / "g" / name
    timing = ckpt_dir / "train_seconds.json"
    if not (ckpt_dir / "model.pt").is_file() or not timing.is_file():
        start = time.perf_counter()
        bundle(QUALITY, ["train.json"], manifest=manifest, image_size=size, seed=seed, backbone=backbone,
               weak_dir=str(weak_dir), ckpt_dir=str(ckpt_dir), output_dir=str(args.out / "g_eval" / name),
               max_epochs=args.epochs, samples_per_image=args.samples_per_image, val_samples_per_image=2,
               batch_size=32, lr=args.lr, patience=50)  # fmt: skip
        timing.write_text(json.dumps({"train_seconds": time.perf_counter() - start}))
    eval_dir = args.out / "eval" / name
    if not (eval_dir / "quality_metrics.json").is_file():
        bundle(QUALITY, ["evaluate.json"], manifest=manifest, image_size=size, backbone=backbone,
               ckpt_path=str(ckpt_dir / "model.pt"), output_dir=str(eval_dir), prediction_dirs=sources,
               samples_per_image=2)  # fmt: skip
    metrics = json.loads((eval_dir / "quality_metrics.json").read_text())
    calibration_dir = args.out / "calibration" / name
    if not (calibration_dir / "calibration.json").is_file():
        bundle(QUALITY, ["calibrate.json"], manifest=manifest, image_size=size, backbone=backbone, split="validation",
               ckpt_path=str(ckpt_dir / "model.pt"), output_dir=str(calibration_dir), prediction_dirs=calibration_sources)  # fmt: skip
    from qgssl_monai.networks.calibration import MonotoneCalibration
    from qgssl_monai.quality.calibrate import CALIBRATION_KEY, calibration_sidecar_path
    from qgssl_monai.quality.evaluation import quality_regression_metrics

    calibration = MonotoneCalibration.from_dict(json.loads(calibration_sidecar_path(ckpt_dir / "model.pt").read_text())[CALIBRATION_KEY])
    scores = pd.read_csv(eval_dir / "segmentation_scores.csv")
    calibrated = calibration(torch.as_tensor(scores["predicted_dice"].to_numpy(float))).numpy()
    pooled = quality_regression_metrics(calibrated, scores["true_dice"].to_numpy(float))
    return {**metrics, **json.loads(timing.read_text()), "calibrated": {"pooled": pooled}}


def summarize(direction: str, variant: str, runs: list[dict[str, Any]], seeds: list[int], key: str) -> dict[str, Any]:
    """Mean over g seeds of the pooled real-prediction metrics (and held-out corruption Pearson / MAE)."""

    def mean(values: list[float | None]) -> float | None:
        kept = [v for v in values if v is not None]
        return float(np.mean(kept)) if kept else None

    pooled = [r[key]["pooled"] for r in runs]
    row: dict[str, Any] = {"direction": direction, "variant": variant, "default": False}
    row.update({k: mean([p[k] for p in pooled]) for k in METRIC_KEYS})
    row["n"] = pooled[0]["n"]
    row["seeds"] = seeds
    row["corruptions_pearson"] = mean([r["heldout_corruptions"]["pearson"] for r in runs])
    row["corruptions_mae"] = mean([r["heldout_corruptions"]["mae"] for r in runs])
    row["train_seconds"] = mean([r["train_seconds"] for r in runs])
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True, help="experiment output folder with data/ and ssl/")
    parser.add_argument("--direction", required=True, help="label of the rows, e.g. cvc2kvasir")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--network", default="attention_unet", help="held-out segmentation network (default: %(default)s)")
    parser.add_argument("--network-size", default="small")
    parser.add_argument("--network-image-size", type=int, default=64, help="input size the held-out networks were trained at")
    parser.add_argument("--variants", nargs="+", default=["resnet18:64", "efficientnet_lite0:64"], help="<backbone>:<image size>")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="g training seeds")
    parser.add_argument("--weak-epochs", nargs="+", type=int, default=[1, 3, 5])
    parser.add_argument("--weak-image-size", type=int, default=64, help="input size of the weak snapshots")
    parser.add_argument("--epochs", type=int, default=4, help="g training epochs")
    parser.add_argument("--samples-per-image", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    args.runs, args.out = args.runs.resolve(), args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    sources, calibration_sources = write_predictions(args, "test"), write_predictions(args, "validation")
    rows = []
    for variant in args.variants:
        backbone, size = variant.split(":")
        runs = [run_variant(args, backbone, int(size), seed, sources, calibration_sources) for seed in args.seeds]
        name = f"in_sample_{backbone}_{size}px"
        rows.append(summarize(args.direction, name, runs, args.seeds, "segmentation_predictions"))
        rows.append(summarize(args.direction, f"{name}_calibrated", runs, args.seeds, "calibrated"))
        (args.out / "g_real_predictions.json").write_text(json.dumps(rows, indent=2))
        print(json.dumps(rows[-2:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
