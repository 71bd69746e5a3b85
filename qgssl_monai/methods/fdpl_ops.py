"""Tensor operations of FDPL (fixed + dynamic pseudo-labels): crops, shifted crops, COM.

All functions work for any number of spatial dimensions (2D ``(B, C, H, W)`` and 3D
``(B, C, H, W, D)``); crop positions are integer voxel *starts*, one row per sample, so every sample
of a batch may be cropped at a different place while all crops share one size and stack into a batch.

Border policy of the shifted ("dynamic") crops: a shifted crop is clamped so that it stays inside
the image, i.e. its shift along an axis is reduced to what the border allows; the overlap with the
fixed crop is computed from that *effective* shift. A crop whose effective shift is zero (the fixed
crop already touches the border in that direction, or the crop spans the whole axis) would merely
repeat the fixed crop, so it is marked invalid and contributes nothing to the temporary pseudo-label.
"""

from __future__ import annotations

from collections.abc import Sequence

from math import ceil, sqrt

import numpy as np
import torch
from monai.transforms import CutMix

__all__ = [
    "default_crop_size",
    "sample_crop_starts",
    "shifted_crop_starts",
    "crop_batch",
    "overlap_slices",
    "temporary_pseudo_label",
    "combine_pseudo_labels",
    "SegmentationCutMix",
]


def default_crop_size(
    spatial_shape: Sequence[int], fraction: float = 0.75, multiple: int = 32
) -> tuple[int, ...]:
    """Crop side per axis: ``fraction`` of the image side, rounded down to a multiple of ``multiple``.

    ``multiple`` encodes the network's size constraint (32 for SwinUNETR / 5-level U-Nets in 2D,
    16 for VNet). Raises ``ValueError`` when an axis is too short to hold one ``multiple``.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"FDPL crop fraction must be in (0, 1], got {fraction}.")
    sizes = []
    for axis, side in enumerate(spatial_shape):
        size = int(side * fraction) // multiple * multiple
        if size < multiple:
            raise ValueError(
                f"FDPL: {fraction} x image side {side} (axis {axis}) is smaller than the network size "
                f"multiple {multiple}; set `crop_size` (or a smaller `crop_multiple`) in the method config."
            )
        sizes.append(size)
    return tuple(sizes)


def sample_crop_starts(
    spatial_shape: Sequence[int], crop_size: Sequence[int], batch_size: int, rng: np.random.RandomState
) -> np.ndarray:
    """Uniformly random crop starts, ``(batch_size, ndim)`` int64, each crop fully inside the image."""
    if len(spatial_shape) != len(crop_size):
        raise ValueError(f"crop_size {tuple(crop_size)} does not match image spatial shape {tuple(spatial_shape)}.")
    for side, size in zip(spatial_shape, crop_size):
        if size > side:
            raise ValueError(f"FDPL crop_size {tuple(crop_size)} exceeds image spatial shape {tuple(spatial_shape)}.")
    return np.stack(
        [rng.randint(0, side - size + 1, size=batch_size) for side, size in zip(spatial_shape, crop_size)], axis=1
    ).astype(np.int64)


def shifted_crop_starts(
    fixed_starts: np.ndarray,
    crop_size: Sequence[int],
    spatial_shape: Sequence[int],
    offset: Sequence[int] | int,
    shift_axes: Sequence[int] = (0, 1),
) -> tuple[np.ndarray, np.ndarray]:
    """Starts of the dynamic crops: the fixed crop moved by ``+offset`` and ``-offset`` along each shift axis.

    Args:
        fixed_starts: ``(B, ndim)`` starts of the fixed crops.
        crop_size: crop side per spatial axis.
        spatial_shape: image side per spatial axis.
        offset: shift length (one int, or one per shift axis).
        shift_axes: spatial axes to shift along (in-plane axes; ``(0, 1)`` = first two spatial axes).

    Returns:
        ``starts`` ``(B, 2 * len(shift_axes), ndim)`` in the order ``+axis0, -axis0, +axis1, -axis1, ...``,
        clamped into the image, and ``valid`` ``(B, 2 * len(shift_axes))`` bool, False where the clamped
        shift is zero (the crop would repeat the fixed crop).
    """
    fixed_starts = np.asarray(fixed_starts, dtype=np.int64)
    if np.isscalar(offset):
        offsets = [int(offset)] * len(shift_axes)  # type: ignore[arg-type]
    else:
        offsets = [int(o) for o in offset]  # type: ignore[union-attr]
    if len(offsets) != len(shift_axes):
        raise ValueError(f"FDPL offset {offset} must be one int or one per shift axis {tuple(shift_axes)}.")
    starts, valid = [], []
    for axis, step in zip(shift_axes, offsets):
        limit = int(spatial_shape[axis]) - int(crop_size[axis])
        for sign in (1, -1):
            moved = fixed_starts.copy()
            moved[:, axis] = np.clip(fixed_starts[:, axis] + sign * step, 0, limit)
            starts.append(moved)
            valid.append(moved[:, axis] != fixed_starts[:, axis])
    return np.stack(starts, axis=1), np.stack(valid, axis=1)


def crop_batch(images: torch.Tensor, starts: np.ndarray, crop_size: Sequence[int]) -> torch.Tensor:
    """Crop sample ``b`` of ``images`` ``(B, C, *spatial)`` at ``starts[b]``; returns ``(B, C, *crop_size)``.

    Differentiable (plain slicing), keeps dtype and device.
    """
    if images.shape[0] != len(starts):
        raise ValueError(f"{len(starts)} crop starts for a batch of {images.shape[0]} images.")
    crops = [
        images[(b, slice(None), *(slice(int(s), int(s) + int(n)) for s, n in zip(starts[b], crop_size)))]
        for b in range(images.shape[0])
    ]
    return torch.stack(crops, dim=0)


def overlap_slices(
    fixed_start: Sequence[int], shifted_start: Sequence[int], crop_size: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Where a shifted crop overlaps the fixed crop, in each crop's own coordinates.

    Returns ``(slices_in_fixed, slices_in_shifted)`` (equal-sized regions), or ``None`` when the crops
    do not overlap.
    """
    in_fixed, in_shifted = [], []
    for f, s, n in zip(fixed_start, shifted_start, crop_size):
        delta = int(s) - int(f)
        if abs(delta) >= n:
            return None
        in_fixed.append(slice(max(0, delta), int(n) + min(0, delta)))
        in_shifted.append(slice(max(0, -delta), int(n) - max(0, delta)))
    return tuple(in_fixed), tuple(in_shifted)


def temporary_pseudo_label(
    shifted_maps: torch.Tensor,
    fixed_starts: np.ndarray,
    shifted_starts: np.ndarray,
    valid: np.ndarray,
    crop_size: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map the shifted crops' predictions back onto the fixed crop: the temporary pseudo-label ŷ^{u_t}.

    Args:
        shifted_maps: ``(B, K, C, *crop_size)`` predictions (e.g. probabilities in [0, 1]) of the K shifted crops.
        fixed_starts: ``(B, ndim)``; shifted_starts: ``(B, K, ndim)``; valid: ``(B, K)`` bool.

    Returns:
        ``temporary`` ``(B, C, *crop_size)``: mean of the valid shifted predictions covering each voxel
        (0 where none does), and ``coverage`` ``(B, 1, *crop_size)``: how many valid crops cover it.
    """
    batch, num_crops, channels = shifted_maps.shape[:3]
    total = shifted_maps.new_zeros((batch, channels, *crop_size))
    coverage = shifted_maps.new_zeros((batch, 1, *crop_size))
    for b in range(batch):
        for k in range(num_crops):
            if not valid[b, k]:
                continue
            region = overlap_slices(fixed_starts[b], shifted_starts[b, k], crop_size)
            if region is None:
                continue
            in_fixed, in_shifted = region
            total[(b, slice(None), *in_fixed)] += shifted_maps[(b, k, slice(None), *in_shifted)]
            coverage[(b, slice(None), *in_fixed)] += 1
    return total / coverage.clamp_min(1), coverage


def combine_pseudo_labels(fixed: torch.Tensor, temporary: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """COM: the dynamic pseudo-label ŷ^{u_d}, ``temporary`` where ``coverage > 0``, else ``fixed``.

    ``fixed``/``temporary``: ``(B, C, *spatial)``; ``coverage``: ``(B, 1, *spatial)`` (broadcast over C).
    """
    return torch.where(coverage > 0, temporary, fixed)


class SegmentationCutMix(CutMix):
    """MONAI :class:`~monai.transforms.CutMix` box mixing for dense targets (images *and* pseudo-labels).

    Randomisation is MONAI's (``randomize(data)``: per-sample mixing weight ``w ~ Beta(alpha, alpha)``,
    a batch permutation choosing each sample's partner, one box corner per spatial axis drawn from
    ``self.R``); the box of sample ``s`` starts at the corner with side ``ceil(side * sqrt(1 - w_s))``
    clipped at the border, and its content is taken from sample ``perm[s]``. After one ``randomize`` every
    :meth:`apply` call uses the same boxes and partners, so images and their pseudo-labels stay aligned.
    Unlike MONAI 1.6.1's ``CutMix.apply`` (list indexing, deprecated in torch), indexing uses tuples.
    """

    def box_mask(self, shape: torch.Size | tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
        """``(B, 1, *spatial)`` float mask for a batch of ``shape``: 1 inside each sample's pasted box."""
        weights, _, corners = self._params
        batch, _, *dims = shape
        if len(weights) != batch:
            raise ValueError(f"CutMix was randomised for a batch of {len(weights)}, got {batch}.")
        mask = torch.zeros((batch, 1, *dims), device=device)
        for sample, weight in enumerate(weights.tolist()):
            box = tuple(
                slice(int(c), min(ceil(int(c) + d * sqrt(1.0 - weight)), d)) for c, d in zip(corners, dims)
            )
            mask[(sample, slice(None), *box)] = 1.0
        return mask

    def apply(self, data: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` -> same shape: box content of sample ``s`` replaced by sample ``perm[s]``'s."""
        _, permutation, _ = self._params
        pasted = self.box_mask(data.shape, data.device).to(data.dtype)
        return (1 - pasted) * data + pasted * data[torch.as_tensor(permutation, device=data.device)]
