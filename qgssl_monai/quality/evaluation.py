"""Evaluate g: agreement of predicted and true Dice, the image-zeroing test, real network predictions.

* Held-out corruptions: MAE, RMSE, Pearson and Spearman correlation between g's output and the true Dice
  of degraded masks of the test split (drawn once with a fixed seed), also per corruption category.
* Image zeroing: MAE again with the image channels set to 0. A predictor that really compares mask and
  image gets clearly worse; one that only judges mask shape barely changes.
* Segmentation predictions: g's score vs the true Dice of hard masks predicted by real segmentation
  networks, either run here from checkpoints (:func:`score_segmentation_predictions`; the bundle's default
  is the weak snapshots, which are *in* g's training mix) or read as mask files written beforehand
  (:func:`score_prediction_masks`, e.g. the SSL bundle's ``inference.json`` output). Only networks that took
  no part in g's training measure what pseudo-label weighting needs: besides MAE and correlations, the mean
  bias (predicted - true), the fraction of over-estimates and the AUROC of g for "true Dice >= 0.7".
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
from monai.transforms import Compose, LoadImaged
from monai.utils import convert_to_tensor
from scipy import stats
from torch import nn
from tqdm.auto import tqdm

from qgssl_monai.engines.autocast import AutocastInferer
from qgssl_monai.networks.quality import load_state_dict_file
from qgssl_monai.quality.data import QualityPrepareBatch
from qgssl_monai.quality.plots import plot_quality_scatter
from qgssl_monai.transforms.io import NormalizeBinaryMaskd, RasterImageReader, mask_converter
from qgssl_monai.transforms.weak import dice_of_masks

__all__ = [
    "evaluate_quality_predictor",
    "image_zeroing_test",
    "AUROC_KEY",
    "GOOD_DICE",
    "predict_quality",
    "prediction_mask_path",
    "quality_regression_metrics",
    "score_prediction_masks",
    "score_segmentation_predictions",
]

#: "good enough" pseudo-label threshold of the AUROC metric (key ``auroc_dice_0_7``)
GOOD_DICE = 0.7
AUROC_KEY = "auroc_dice_0_7"

logger = logging.getLogger(__name__)


def quality_regression_metrics(
    predicted: Sequence[float] | np.ndarray, true: Sequence[float] | np.ndarray, good_dice: float = GOOD_DICE
) -> dict[str, Any]:
    """Agreement of predicted and true Dice.

    Returns ``n``, ``mae``, ``rmse``, ``pearson``, ``spearman``, ``bias`` (mean of predicted - true; > 0:
    optimistic), ``fraction_overestimated`` (share of predicted > true), ``auroc_dice_<good_dice>`` (e.g.
    ``auroc_dice_0_7``: how well g's score ranks masks with true Dice >= ``good_dice`` above the others, the
    Mann-Whitney estimate with ties counted 1/2), ``mean_true``, ``mean_predicted``. Correlations are
    ``None`` when undefined (fewer than 2 samples or a constant input), the AUROC when one class is empty.
    """
    p = np.asarray(predicted, dtype=np.float64).ravel()
    t = np.asarray(true, dtype=np.float64).ravel()
    if p.shape != t.shape or p.size == 0:
        raise ValueError(f"need two equally long non-empty arrays, got {p.shape} and {t.shape}")
    err = p - t
    defined = p.size >= 2 and np.ptp(p) > 0 and np.ptp(t) > 0
    good = t >= good_dice
    auroc = None
    if good.any() and not good.all():
        u = stats.mannwhitneyu(p[good], p[~good], alternative="two-sided").statistic
        auroc = float(u) / (int(good.sum()) * int((~good).sum()))
    return {
        "n": int(p.size),
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "pearson": float(stats.pearsonr(p, t).statistic) if defined else None,
        "spearman": float(stats.spearmanr(p, t).statistic) if defined else None,
        "bias": float(np.mean(err)),
        "fraction_overestimated": float(np.mean(err > 0)),
        f"auroc_dice_{str(good_dice).replace('.', '_')}": auroc,
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


def prediction_mask_path(folder: str | os.PathLike, image: str | os.PathLike) -> Path | None:
    """The predicted mask of ``image`` in ``folder``: ``<stem>_mask.png`` (what the SSL bundle's ``inference.json``
    writes), else ``<stem>.png``; ``None`` when neither exists."""
    stem = Path(image).stem
    for name in (f"{stem}_mask.png", f"{stem}.png"):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


@torch.no_grad()
def score_prediction_masks(
    predictor: nn.Module,
    datalist: Sequence[Mapping[str, Any]],
    load_transform: Callable[[Mapping[str, Any]], Mapping[str, Any]],
    prediction_dirs: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, list]:
    """Score mask files predicted beforehand (by networks run anywhere, at any resolution) with g.

    The true Dice is computed at the label's original resolution (a prediction of another size is resized to
    it, nearest neighbour), so it does not depend on g's input size; g sees image and mask through
    ``load_transform`` (the ``image``/``label`` chain at g's size, applied to ``{"image", "label": mask file}``).

    Args:
        datalist: labeled items ``{"image", "label"}`` (absolute paths), e.g. the test split.
        load_transform: g's loading chain, e.g. ``get_seg_transforms(image_size, train=False, augment=False)``.
        prediction_dirs: ``{source name: folder}``, or folders (named by their folder name); a folder holds
            :func:`prediction_mask_path` files. Images without a mask in a folder are skipped (logged).

    Returns:
        ``{"source": [...], "image": [...], "true": [...], "predicted": [...]}`` as :func:`score_segmentation_predictions`.

    Raises:
        FileNotFoundError: a folder is missing or holds no mask of any ``datalist`` image.
    """
    if not isinstance(prediction_dirs, Mapping):
        prediction_dirs = {Path(folder).name: folder for folder in prediction_dirs}
    predictor = predictor.to(device).eval()
    native = Compose([
        LoadImaged(keys=("label", "mask"), reader=RasterImageReader(converter=mask_converter), dtype=None,
                   image_only=True, ensure_channel_first=True),
        NormalizeBinaryMaskd(keys=("label", "mask")),
    ])  # fmt: skip
    out: dict[str, list] = {"source": [], "image": [], "true": [], "predicted": []}
    for name, folder in tqdm(prediction_dirs.items(), desc="prediction folders", disable=not progress):
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"prediction folder {folder} ({name}) does not exist")
        pairs = [(item, prediction_mask_path(folder, item["image"])) for item in datalist]
        found = [(item, mask) for item, mask in pairs if mask is not None]
        if not found:
            raise FileNotFoundError(f"{folder}: no <stem>_mask.png / <stem>.png for any of the {len(datalist)} images")
        if len(found) < len(pairs):
            logger.warning("%s: %d of %d images have no predicted mask (skipped)", folder, len(pairs) - len(found), len(pairs))
        for start in range(0, len(found), batch_size):
            chunk = found[start : start + batch_size]
            images, masks = [], []
            for item, mask_path in chunk:
                masks_native = native({"label": item["label"], "mask": str(mask_path)})
                label, mask = masks_native["label"], masks_native["mask"]
                if mask.shape[1:] != label.shape[1:]:
                    mask = torch.nn.functional.interpolate(
                        torch.as_tensor(mask)[None].float(), size=tuple(label.shape[1:]), mode="nearest"
                    )[0]
                out["true"].append(dice_of_masks(mask, label))
                loaded = load_transform({"image": item["image"], "label": str(mask_path)})
                images.append(convert_to_tensor(loaded["image"], track_meta=False).float())
                masks.append(convert_to_tensor(loaded["label"], track_meta=False).float())
                out["source"].append(name)
                out["image"].append(str(item["image"]))
            inputs = torch.cat([torch.stack(images), torch.stack(masks)], dim=1).to(device)
            out["predicted"] += [float(v) for v in predictor(inputs).reshape(-1).cpu()]
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
            bias=pooled["bias"], auroc=pooled[AUROC_KEY], good_dice=GOOD_DICE, groups=segmentation["source"],
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
