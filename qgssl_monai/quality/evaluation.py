"""Evaluate g: agreement of predicted and true Dice, the image-zeroing test, real network predictions.

* Held-out corruptions: MAE, RMSE, Pearson and Spearman correlation between g's output and the true Dice
  of degraded masks of the test split (drawn once with a fixed seed), also per corruption category.
* Image zeroing: MAE again with the image channels set to 0. A predictor that really compares mask and
  image gets clearly worse; one that only judges mask shape barely changes.
* Segmentation predictions: g's score vs the true Dice of hard masks predicted by real segmentation
  networks (e.g. the weak snapshots, or an SSL model).
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.utils import convert_to_tensor
from scipy import stats
from torch import nn
from tqdm.auto import tqdm

from qgssl_monai.engines.autocast import AutocastInferer
from qgssl_monai.networks.quality import load_state_dict_file
from qgssl_monai.quality.data import QualityPrepareBatch
from qgssl_monai.quality.plots import plot_quality_scatter
from qgssl_monai.transforms.weak import dice_of_masks

__all__ = [
    "evaluate_quality_predictor",
    "image_zeroing_test",
    "predict_quality",
    "quality_regression_metrics",
    "score_segmentation_predictions",
]

logger = logging.getLogger(__name__)


def quality_regression_metrics(predicted: Sequence[float] | np.ndarray, true: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """MAE, RMSE, Pearson and Spearman correlation of predicted vs true Dice.

    Correlations are ``None`` when undefined (fewer than 2 samples or a constant input).
    """
    p = np.asarray(predicted, dtype=np.float64).ravel()
    t = np.asarray(true, dtype=np.float64).ravel()
    if p.shape != t.shape or p.size == 0:
        raise ValueError(f"need two equally long non-empty arrays, got {p.shape} and {t.shape}")
    err = p - t
    defined = p.size >= 2 and np.ptp(p) > 0 and np.ptp(t) > 0
    return {
        "n": int(p.size),
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "pearson": float(stats.pearsonr(p, t).statistic) if defined else None,
        "spearman": float(stats.spearmanr(p, t).statistic) if defined else None,
        "mean_true": float(t.mean()),
        "mean_predicted": float(p.mean()),
    }


@torch.no_grad()
def predict_quality(
    predictor: nn.Module,
    dataset: Dataset | Sequence[Mapping[str, Any]],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    zero_image: bool = False,
    amp_dtype: str = "none",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Run g over samples ``{"image", "mask", "quality"}``; returns ``(predicted (N,), true (N,))``.

    ``zero_image=True`` sets the image channels to 0 (the image-zeroing test).
    """
    if not isinstance(dataset, Dataset):
        dataset = Dataset(list(dataset))
    predictor = predictor.to(device).eval()
    prepare = QualityPrepareBatch()
    inferer = AutocastInferer(amp_dtype, device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    predicted, true = [], []
    for batch in tqdm(loader, desc="scoring", disable=not progress):
        inputs, quality = prepare(batch, device)
        if zero_image:
            inputs[:, :-1] = 0
        predicted.append(inferer(inputs, predictor).reshape(-1).float().cpu())
        true.append(quality.reshape(-1).cpu())
    return torch.cat(predicted).numpy(), torch.cat(true).numpy()


def image_zeroing_test(
    predictor: nn.Module, dataset: Dataset | Sequence[Mapping[str, Any]], **kwargs: Any
) -> dict[str, float]:
    """MAE with the real image and with the image channels zeroed; ``mae_increase`` = zeroed - normal."""
    pred, true = predict_quality(predictor, dataset, **kwargs)
    pred_zero, _ = predict_quality(predictor, dataset, zero_image=True, **kwargs)
    mae = float(np.mean(np.abs(pred - true)))
    mae_zeroed = float(np.mean(np.abs(pred_zero - true)))
    return {"mae": mae, "mae_image_zeroed": mae_zeroed, "mae_increase": mae_zeroed - mae}


@torch.no_grad()
def score_segmentation_predictions(
    predictor: nn.Module,
    segmentation_network: nn.Module,
    datalist: Sequence[Mapping[str, Any]],
    load_transform: Callable[[Mapping[str, Any]], Mapping[str, Any]],
    *,
    checkpoints: Sequence[str | os.PathLike] | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, list]:
    """Score real segmentation predictions with g.

    For each checkpoint (state_dict loaded into ``segmentation_network``; ``None``: the network as given),
    predict hard masks (one logit channel, ``logit > 0``) for every item of ``datalist`` and record the
    true Dice against the label and g's score.

    Returns:
        ``{"source": [...], "image": [...], "true": [...], "predicted": [...]}`` (one entry per image and checkpoint).
    """
    predictor = predictor.to(device).eval()
    segmentation_network = segmentation_network.to(device).eval()
    loaded = [load_transform(dict(item)) for item in datalist]
    sources: list[tuple[str, Path | None]] = (
        [(Path(c).stem, Path(c)) for c in checkpoints] if checkpoints else [("network", None)]
    )
    out: dict[str, list] = {"source": [], "image": [], "true": [], "predicted": []}
    for name, path in tqdm(sources, desc="segmentation checkpoints", disable=not progress):
        if path is not None:
            segmentation_network.load_state_dict(load_state_dict_file(path, map_location=device))
        for start in range(0, len(loaded), batch_size):
            chunk = loaded[start : start + batch_size]
            images = torch.stack([convert_to_tensor(d["image"], track_meta=False).float() for d in chunk]).to(device)
            logits = segmentation_network(images)
            if isinstance(logits, (list, tuple)):
                logits = logits[0]
            masks = (logits[:, :1] > 0).float()
            scores = predictor(torch.cat([images, masks], dim=1)).reshape(-1).cpu().tolist()
            for d, mask, score, item in zip(chunk, masks.cpu(), scores, datalist[start : start + batch_size]):
                out["source"].append(name)
                out["image"].append(str(item.get("image")))
                out["true"].append(dice_of_masks(mask, d["label"]))
                out["predicted"].append(float(score))
    return out


def _by_group(groups: Sequence[str], predicted: np.ndarray, true: np.ndarray) -> dict[str, dict[str, Any]]:
    index: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        index[g].append(i)
    return {g: quality_regression_metrics(predicted[ix], true[ix]) for g, ix in sorted(index.items())}


def evaluate_quality_predictor(
    predictor: nn.Module,
    test_samples: Dataset | Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    *,
    segmentation: Mapping[str, list] | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    amp_dtype: str = "none",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Full evaluation; writes ``quality_metrics.json``, ``quality_scatter.png`` (and
    ``segmentation_scatter.png`` + ``segmentation_scores.csv`` when ``segmentation`` is given) to ``output_dir``.

    Args:
        predictor: trained g.
        test_samples: fixed held-out samples (see :func:`~qgssl_monai.quality.data.fixed_quality_samples`).
        segmentation: output of :func:`score_segmentation_predictions`, optional.
        extra: values copied into the JSON (e.g. seed, checkpoint path, image size).

    Returns:
        the metrics dictionary written to JSON.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    samples = test_samples if isinstance(test_samples, Dataset) else Dataset(list(test_samples))
    kwargs = {"device": device, "batch_size": batch_size, "amp_dtype": amp_dtype}
    predicted, true = predict_quality(predictor, samples, progress=True, **kwargs)
    predicted_zero, _ = predict_quality(predictor, samples, zero_image=True, **kwargs)
    heldout = quality_regression_metrics(predicted, true)
    metrics: dict[str, Any] = {"heldout_corruptions": heldout}
    categories = [str(samples[i].get("corruption", "unknown")).split(":")[0] for i in range(len(samples))]
    metrics["heldout_by_category"] = _by_group(categories, predicted, true)
    mae_zero = float(np.mean(np.abs(predicted_zero - true)))
    metrics["image_zeroing"] = {
        "mae": heldout["mae"],
        "mae_image_zeroed": mae_zero,
        "mae_increase": mae_zero - heldout["mae"],
    }
    plot_quality_scatter(
        true, predicted, output_dir / "quality_scatter.png", pearson=heldout["pearson"], mae=heldout["mae"],
        title="held-out corruptions",
    )
    if segmentation is not None and segmentation.get("true"):
        seg_pred = np.asarray(segmentation["predicted"], dtype=float)
        seg_true = np.asarray(segmentation["true"], dtype=float)
        metrics["segmentation_predictions"] = {
            "pooled": quality_regression_metrics(seg_pred, seg_true),
            "by_source": _by_group(segmentation["source"], seg_pred, seg_true),
        }
        pooled = metrics["segmentation_predictions"]["pooled"]
        plot_quality_scatter(
            seg_true, seg_pred, output_dir / "segmentation_scatter.png", pearson=pooled["pearson"], mae=pooled["mae"],
            title="network predictions",
        )
        with open(output_dir / "segmentation_scores.csv", "w", encoding="utf-8") as f:
            f.write("source,image,true_dice,predicted_dice\n")
            for row in zip(segmentation["source"], segmentation["image"], seg_true, seg_pred):
                f.write(f"{row[0]},{row[1]},{row[2]:.6f},{row[3]:.6f}\n")
    if extra:
        metrics["settings"] = dict(extra)
    with open(output_dir / "quality_metrics.json", "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2, default=str)
    logger.info(
        "held-out: MAE %.4f RMSE %.4f pearson %s; image zeroing raises MAE by %.4f",
        heldout["mae"], heldout["rmse"], heldout["pearson"], metrics["image_zeroing"]["mae_increase"],
    )
    return metrics
