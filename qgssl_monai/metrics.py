"""Per-image segmentation metrics (DSC, IoU, HD95, ASD) on binary masks, and mean +- standard error.

Built on MONAI: :func:`monai.metrics.compute_dice`, :func:`monai.metrics.compute_iou`,
:func:`monai.metrics.compute_hausdorff_distance` (``percentile=95``, symmetric: the larger of the two
directed 95th percentiles) and :func:`monai.metrics.compute_average_surface_distance` (``symmetric=True``:
mean over the boundary points of both masks), computed on boundary pixels (a mask minus its erosion),
in physical units when ``spacing`` is given (else pixels). 2D and 3D alike.

Empty-mask conventions (so every image gets a finite value and means stay defined):

=====================  =====  =====  ===========  ===========
case                   DSC    IoU    HD95         ASD
=====================  =====  =====  ===========  ===========
both empty             1      1      0            0
exactly one empty      0      0      diagonal     diagonal
=====================  =====  =====  ===========  ===========

where *diagonal* is the largest possible distance between two pixel centres of the image,
``sqrt(sum(((n_i - 1) * spacing_i) ** 2))`` — the worst value a non-empty pair could reach.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance, compute_iou

__all__ = ["METRIC_NAMES", "compute_binary_metrics", "image_diagonal", "mean_se", "summarize_metrics"]

METRIC_NAMES: tuple[str, ...] = ("dice", "iou", "hd95", "asd")


def _spacing_tuple(spacing: float | Sequence[float] | None, spatial_dims: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * spatial_dims
    values = tuple(float(s) for s in np.atleast_1d(np.asarray(spacing, dtype=float)))
    if len(values) == 1:
        return values * spatial_dims
    if len(values) != spatial_dims:
        raise ValueError(f"spacing {values} must be a number or have one entry per spatial dim ({spatial_dims})")
    return values


def image_diagonal(spatial_shape: Sequence[int], spacing: float | Sequence[float] | None = None) -> float:
    """Largest distance between two pixel (voxel) centres: ``sqrt(sum(((n_i - 1) * spacing_i) ** 2))``."""
    steps = _spacing_tuple(spacing, len(spatial_shape))
    return math.sqrt(sum(((int(n) - 1) * s) ** 2 for n, s in zip(spatial_shape, steps)))


def compute_binary_metrics(
    pred: torch.Tensor, label: torch.Tensor, spacing: float | Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """Per-image DSC, IoU, HD95 and ASD of binary masks.

    Args:
        pred: (B, 1, *spatial) predicted mask in {0, 1} (any dtype; values > 0.5 count as foreground).
        label: (B, 1, *spatial) reference mask in {0, 1}.
        spacing: pixel/voxel size (a number or one per spatial dim) for HD95/ASD; ``None`` = 1.

    Returns:
        ``{"dice", "iou", "hd95", "asd"}`` -> float32 (B,) tensors on CPU; DSC and IoU in [0, 1], HD95 and
        ASD in [0, diagonal] (see the module docstring for the empty-mask conventions).

    Raises:
        ValueError: shapes differ or are not (B, 1, *spatial) with 2 or 3 spatial dims.
    """
    if pred.shape != label.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}")
    if pred.ndim not in (4, 5) or pred.shape[1] != 1:
        raise ValueError(f"expected (B, 1, H, W) or (B, 1, D, H, W) masks, got shape {tuple(pred.shape)}")
    pred_mask = torch.as_tensor(pred).detach().cpu().float() > 0.5
    label_mask = torch.as_tensor(label).detach().cpu().float() > 0.5
    spatial_shape = tuple(pred_mask.shape[2:])
    steps = _spacing_tuple(spacing, len(spatial_shape))
    diagonal = image_diagonal(spatial_shape, steps)

    # ignore_empty=False gives exactly the table above for DSC and IoU
    dice = compute_dice(pred_mask.float(), label_mask.float(), include_background=True, ignore_empty=False)[:, 0]
    iou = compute_iou(pred_mask.float(), label_mask.float(), include_background=True, ignore_empty=False)[:, 0]

    pred_empty = ~pred_mask.flatten(1).any(dim=1)
    label_empty = ~label_mask.flatten(1).any(dim=1)
    hd95 = torch.where(pred_empty & label_empty, 0.0, diagonal).to(torch.float32)
    asd = hd95.clone()
    both = torch.nonzero(~pred_empty & ~label_empty).flatten()
    if both.numel():
        with warnings.catch_warnings():
            # MONAI 1.6 warns about its own deprecated always_return_as_numpy argument on every call
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
            selected_pred, selected_label = pred_mask[both].float(), label_mask[both].float()
            hd95[both] = compute_hausdorff_distance(
                selected_pred, selected_label, include_background=True, percentile=95, spacing=list(steps)
            )[:, 0].float()
            asd[both] = compute_average_surface_distance(
                selected_pred, selected_label, include_background=True, symmetric=True, spacing=list(steps)
            )[:, 0].float()
    return {"dice": dice.float().cpu(), "iou": iou.float().cpu(), "hd95": hd95.cpu(), "asd": asd.cpu()}


def mean_se(values: Sequence[float] | np.ndarray | torch.Tensor) -> tuple[float, float]:
    """Mean and standard error ``sd / sqrt(n)`` (sd with ``ddof=1``; s.e. 0 for a single value).

    Raises:
        ValueError: no values, or a value is not finite.
    """
    array = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=float).reshape(-1)
    if array.size == 0:
        raise ValueError("mean_se needs at least one value")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"mean_se got non-finite values: {array[~np.isfinite(array)][:5].tolist()}")
    if array.size == 1:
        return float(array[0]), 0.0
    return float(array.mean()), float(array.std(ddof=1) / math.sqrt(array.size))


def summarize_metrics(
    per_image: Mapping[str, Sequence[float] | np.ndarray | torch.Tensor],
) -> dict[str, dict[str, float]]:
    """``{"dice": [..], ...}`` per-image values -> ``{"dice": {"mean": m, "se": s, "n": n}, ...}`` (key order kept)."""
    summary: dict[str, dict[str, float]] = {}
    for name, values in per_image.items():
        count = int(np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values).size)
        mean, se = mean_se(values)
        summary[name] = {"mean": mean, "se": se, "n": count}
    return summary
