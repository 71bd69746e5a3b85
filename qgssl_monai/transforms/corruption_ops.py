"""Pure numpy mask-corruption operations (Type 1 variable-quality masks) and their registry.

Every operation has the signature ``op(mask, rng, **params) -> np.ndarray`` where ``mask`` is a
boolean ``(H, W)`` array, ``rng`` a ``np.random.RandomState`` (the only source of randomness inside
the op) and the result is a new boolean ``(H, W)`` array; the input is never modified.

Sizes are fractions, never pixels, so the same parameters give comparable damage at any resolution:

* ``side = sqrt(H * W)`` (the image side for square images) scales radii, band widths, warp
  amplitudes and grid spacings;
* the object's bounding-box height/width scales translations and dropout rectangles.

Each op is registered in :data:`MASK_CORRUPTION_OPS` together with a parameter sampler
``sample_params(rng, strength) -> dict`` (``strength`` is ``"mild"`` or ``"heavy"``), so configs can
pick or disable ops by name and :class:`~qgssl_monai.transforms.corruptions.RandMaskCorruption` can
draw op parameters from its own ``self.R``.

Speed: local ops run on the mask's bounding box plus the margin they can reach (opening needs no margin:
it lies inside the mask); distance transforms (exact Euclidean) replace large structuring elements, so
erosion/dilation cost does not grow with the radius; disks are painted as runs of pixels in one vectorised
step (straight into the copy of the mask for holes/islands); random foreground pixels are drawn by rejection
sampling in the bounding box; 2D ``nonzero`` is a flat scan + divmod; warp fields are float32. Most ops cost a few
dozen tiny numpy calls, so call counts matter: scalar draws skip numpy's argument handling (:func:`_uniform`,
:func:`_choice`: the same draws and values as ``rng.uniform``/``rng.choice``), 2 x 2 affine algebra runs on Python
floats, ``linspace`` is spelled out, and polygon vertices are chosen among each sector's closest pixels only.
``benchmarks/bench_mask_generation.py --per-op`` shows where the time goes. OpenCV (``opencv-python-headless``),
when installed, accelerates the distance transform, connected components, Gaussian smoothing, polygon filling,
convex hulls, bounding boxes, row/column sums and boundary extraction; every op has a ``scipy``/``scikit-image``
fallback giving the same result (set :data:`USE_OPENCV` to ``False`` to force it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage

try:  # optional accelerator; every op has a scipy / scikit-image fallback
    import cv2
except ImportError:  # pragma: no cover - depends on the environment
    cv2 = None

__all__ = [
    "USE_OPENCV",
    "MaskOp",
    "MASK_CORRUPTION_OPS",
    "DEFAULT_OPS",
    "DEFAULT_OP_WEIGHTS",
    "CATASTROPHIC_OPS",
    "BLOB_OPS",
    "STRENGTHS",
    "register_mask_op",
    "apply_mask_op",
    "dice_score",
    "erode",
    "dilate",
    "opening",
    "closing",
    "ellipse_fit",
    "polygon_fit",
    "convex_hull",
    "jagged",
    "smooth",
    "elastic",
    "grid_distortion",
    "holes",
    "islands",
    "holes_and_islands",
    "keep_largest",
    "drop_component",
    "dropout",
    "translate",
    "scale",
    "rotate",
    "random_affine",
    "boundary_noise",
    "invert",
    "empty",
    "full",
    "noise",
    "gaussian_blob",
    "disk_blob",
    "bounding_box",
]

#: use OpenCV kernels when importable (results match the scipy fallback; tests check both paths)
USE_OPENCV: bool = cv2 is not None

STRENGTHS = ("mild", "heavy")

# distances are sqrt(integer); compare with a tolerance so float32 (OpenCV) and float64 (scipy) agree
_EPS = 1e-3


# ----------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------
def dice_score(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Dice similarity ``2|A∩B| / (|A| + |B|)`` of two boolean masks of equal shape, in ``[0, 1]``.

    Both empty -> ``1.0`` (a perfect "nothing there" answer).
    """
    reference = np.asarray(reference, dtype=bool)
    candidate = np.asarray(candidate, dtype=bool)
    if reference.shape != candidate.shape:
        raise ValueError(f"dice_score needs equal shapes, got {reference.shape} and {candidate.shape}.")
    contiguous = reference.flags.c_contiguous and candidate.flags.c_contiguous
    if USE_OPENCV and reference.ndim == 2 and reference.size and contiguous:
        # SIMD byte counts on uint8 views: about half the time of numpy's boolean counts + temporary
        reference_bytes, candidate_bytes = reference.view(np.uint8), candidate.view(np.uint8)
        total = cv2.countNonZero(reference_bytes) + cv2.countNonZero(candidate_bytes)
        if total == 0:
            return 1.0
        return 2.0 * cv2.countNonZero(cv2.bitwise_and(reference_bytes, candidate_bytes)) / total
    total = np.count_nonzero(reference) + np.count_nonzero(candidate)
    if total == 0:
        return 1.0
    return 2.0 * np.count_nonzero(reference & candidate) / total


# ----------------------------------------------------------------------------------------------
# geometry helpers
# ----------------------------------------------------------------------------------------------
def _side(mask: np.ndarray) -> float:
    return math.sqrt(mask.shape[0] * mask.shape[1])  # correctly rounded like np.sqrt, without the ufunc call


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(row0, row1, col0, col1)`` half-open bounding box of the foreground, ``None`` when empty."""
    if USE_OPENCV and mask.dtype == bool:
        # one C pass over the bytes: ~2x cheaper than the numpy word reduction below
        col0, row0, box_width, box_height = cv2.boundingRect(np.ascontiguousarray(mask).view(np.uint8))
        if box_width == 0:
            return None
        return row0, row0 + box_height, col0, col0 + box_width
    if mask.dtype.itemsize == 1 and mask.flags.c_contiguous and mask.shape[1] % 8 == 0:
        # reduce 8 pixels at a time: rows/columns of 64-bit words are ~8x fewer elements than pixels
        words = mask.view(np.uint64)
        rows = np.flatnonzero(words.any(axis=1))
        if rows.size == 0:
            return None
        column_bytes = np.bitwise_or.reduce(words[rows[0] : rows[-1] + 1], axis=0).view(np.uint8)
        cols = np.flatnonzero(column_bytes)
    else:
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            return None
        cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _crop_apply(mask: np.ndarray, margin: int, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply ``fn`` to the bounding box grown by ``margin`` pixels (clipped to the image) and paste back.

    Valid for ops whose result cannot reach further than ``margin`` pixels from the object.
    Empty masks are returned unchanged (copied).
    """
    box = _bbox(mask)
    if box is None:
        return mask.copy()
    height, width = mask.shape
    r0, r1 = max(box[0] - margin, 0), min(box[1] + margin, height)
    c0, c1 = max(box[2] - margin, 0), min(box[3] + margin, width)
    out = np.zeros(mask.shape, mask.dtype)  # np.zeros: a third of zeros_like's call overhead
    out[r0:r1, c0:c1] = fn(np.ascontiguousarray(mask[r0:r1, c0:c1]))
    return out


def _distance_to_zero(binary: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance of every ``True`` pixel to the nearest ``False`` pixel (0 on ``False``).

    Pixels outside the array do not count as ``False`` (same convention in both backends).
    """
    if binary.all():
        return np.full(binary.shape, np.inf, dtype=np.float32)
    if USE_OPENCV:
        return cv2.distanceTransform(np.ascontiguousarray(binary).view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return ndimage.distance_transform_edt(binary)


# below this radius (pixels) an OpenCV min/max filter with the Euclidean disk beats the distance transform
_DISK_FILTER_MAX_RADIUS = 11.5


@lru_cache(maxsize=64)
def _disk_kernel(squared_reach: int) -> np.ndarray:
    """uint8 disk of all offsets ``(dy, dx)`` with ``dy^2 + dx^2 <= squared_reach``."""
    r = int(np.floor(np.sqrt(squared_reach)))
    offsets = np.arange(-r, r + 1) ** 2
    return (np.add.outer(offsets, offsets) <= squared_reach).astype(np.uint8)


def _erode_px(mask: np.ndarray, radius: float) -> np.ndarray:
    """Pixels farther than ``radius`` from every background pixel (outside the array is not background)."""
    if radius <= 0:
        return mask.copy()
    if USE_OPENCV and radius < _DISK_FILTER_MAX_RADIUS:
        # min filter over the Euclidean disk == distance-transform threshold (border counts as foreground)
        kernel = _disk_kernel(int(np.floor((radius + _EPS) ** 2)))
        return cv2.erode(np.ascontiguousarray(mask).view(np.uint8), kernel).view(bool)
    return _distance_to_zero(mask) > radius + _EPS


def _dilate_px(mask: np.ndarray, radius: float) -> np.ndarray:
    """Pixels within ``radius`` of a foreground pixel."""
    if radius <= 0 or not mask.any():
        return mask.copy()
    if USE_OPENCV and radius < _DISK_FILTER_MAX_RADIUS:
        kernel = _disk_kernel(int(np.floor((radius + _EPS) ** 2)))
        return cv2.dilate(np.ascontiguousarray(mask).view(np.uint8), kernel).view(bool)
    return mask | (_distance_to_zero(~mask) <= radius + _EPS)


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected component labels (0 = background) and the number of components."""
    if USE_OPENCV:
        binary = np.ascontiguousarray(mask).view(np.uint8)
        count, labels = cv2.connectedComponents(binary, connectivity=8, ltype=cv2.CV_32S)
        return labels, count - 1
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    return labels, int(count)


def _fill_polygon(shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Boolean mask of the polygon with vertices ``(rows, cols)`` (pixel centres), boundary included."""
    if USE_OPENCV:
        canvas = np.zeros(shape, dtype=np.uint8)
        points = np.stack([np.rint(cols), np.rint(rows)], axis=1).astype(np.int32)
        cv2.fillPoly(canvas, [points], 1)
        return canvas.view(bool)
    from skimage.draw import polygon, polygon_perimeter

    canvas = np.zeros(shape, dtype=bool)
    canvas[polygon(rows, cols, shape)] = True
    canvas[polygon_perimeter(np.rint(rows), np.rint(cols), shape)] = True
    return canvas


def _fill_ellipse(
    shape: tuple[int, int], centre: tuple[float, float], semi_axes: tuple[float, float], angle: float
) -> np.ndarray:
    """Boolean ellipse: centre ``(row, col)``, semi-axes ``(a, b)`` in pixels, ``a`` at ``angle`` (radians) from
    the row axis."""
    out = np.zeros(shape, dtype=bool)
    a, b = max(semi_axes[0], 0.5), max(semi_axes[1], 0.5)
    if a == b:  # disk: half-width sqrt(r^2 - dr^2) per row, no rotation needed
        r0, r1 = max(int(np.ceil(centre[0] - a)), 0), min(int(np.floor(centre[0] + a)) + 1, shape[0])
        c0, c1 = max(int(np.ceil(centre[1] - a)), 0), min(int(np.floor(centre[1] + a)) + 1, shape[1])
        if r0 >= r1 or c0 >= c1:
            return out
        dr2 = (np.arange(r0, r1) - centre[0])[:, None] ** 2
        dc2 = (np.arange(c0, c1) - centre[1])[None, :] ** 2
        out[r0:r1, c0:c1] = dr2 + dc2 <= a * a
        return out
    cos, sin = np.cos(angle), np.sin(angle)
    reach_r = np.sqrt((a * cos) ** 2 + (b * sin) ** 2) + 1
    reach_c = np.sqrt((a * sin) ** 2 + (b * cos) ** 2) + 1
    r0, r1 = max(int(centre[0] - reach_r), 0), min(int(np.ceil(centre[0] + reach_r)) + 1, shape[0])
    c0, c1 = max(int(centre[1] - reach_c), 0), min(int(np.ceil(centre[1] + reach_c)) + 1, shape[1])
    if r0 >= r1 or c0 >= c1:
        return out
    # each row meets the ellipse in one interval of columns: solve A dc^2 + B dc + C <= 0 per row
    dr = np.arange(r0, r1, dtype=np.float64) - centre[0]
    quad_a = (sin / a) ** 2 + (cos / b) ** 2
    quad_b = 2.0 * dr * sin * cos * (1.0 / a**2 - 1.0 / b**2)
    quad_c = dr**2 * ((cos / a) ** 2 + (sin / b) ** 2) - 1.0
    root = np.sqrt(np.maximum(quad_b**2 - 4.0 * quad_a * quad_c, 0.0))
    inside = quad_b**2 - 4.0 * quad_a * quad_c >= 0
    low = np.where(inside, (-quad_b - root) / (2.0 * quad_a), np.inf)[:, None] + centre[1]
    high = np.where(inside, (-quad_b + root) / (2.0 * quad_a), -np.inf)[:, None] + centre[1]
    cols = np.arange(c0, c1, dtype=np.float64)[None, :]
    out[r0:r1, c0:c1] = (cols >= low) & (cols <= high)
    return out


def _random_foreground_pixels(
    mask: np.ndarray, rng: np.random.RandomState, count: int, box: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` foreground pixels ``(rows, cols)`` drawn uniformly (with replacement) from a non-empty mask with
    bounding box ``box``.

    Rejection sampling inside the bounding box (a few uniform draws for compact objects) instead of listing every
    foreground pixel; objects filling under 1/16 of their box, or bad luck, fall back to an exact draw from the list.
    """
    box_height, box_width = box[1] - box[0], box[3] - box[2]
    crop = mask[box[0] : box[1], box[2] : box[3]]
    if 16 * np.count_nonzero(crop) >= crop.size:
        flat_crop = crop.ravel()
        for _ in range(4):
            flat = rng.randint(0, box_height * box_width, size=8 * count + 8)
            hits = flat[flat_crop[flat]]
            if hits.size >= count:
                return hits[:count] // box_width + box[0], hits[:count] % box_width + box[2]
    rows, cols = _nonzero(crop)
    pick = rng.randint(0, rows.size, size=count)
    return rows[pick] + box[0], cols[pick] + box[2]


def _nonzero(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero`` of a 2D array (same row-major order): one flat scan + divmod, ~5x cheaper than numpy's 2D
    ``nonzero`` on bounding-box crops."""
    return np.divmod(np.flatnonzero(mask), mask.shape[1])


def _inner_boundary(crop: np.ndarray) -> np.ndarray:
    """Foreground pixels with a 4-neighbour in the background (pixels outside the array count as background)."""
    if USE_OPENCV:
        interior = cv2.erode(
            np.ascontiguousarray(crop).view(np.uint8), _CROSS, borderType=cv2.BORDER_CONSTANT, borderValue=0
        )
        return crop & ~interior.view(bool)
    padded = np.pad(crop, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return crop & ~interior


_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=np.uint8)


def _profiles(crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Foreground pixel counts per row ``(H,)`` and per column ``(W,)`` of a boolean array, as float64 (exact)."""
    if USE_OPENCV:  # SIMD row/column sums: several times cheaper than numpy's boolean sums
        binary = np.ascontiguousarray(crop).view(np.uint8)
        rows = cv2.reduce(binary, 1, cv2.REDUCE_SUM, dtype=cv2.CV_32S)
        cols = cv2.reduce(binary, 0, cv2.REDUCE_SUM, dtype=cv2.CV_32S)
        return rows.ravel().astype(np.float64), cols.ravel().astype(np.float64)
    return crop.sum(axis=1).astype(np.float64), crop.sum(axis=0).astype(np.float64)


def _centroid(mask: np.ndarray, box: tuple[int, int, int, int] | None = None) -> tuple[float, float]:
    """Foreground centroid ``(row, col)`` of a non-empty mask from the row/column profiles of its bounding box
    (``box``: the known :func:`_bbox`, saves a pass over the image)."""
    box = _bbox(mask) if box is None else box
    row_profile, col_profile = _profiles(mask[box[0] : box[1], box[2] : box[3]])
    area = float(row_profile.sum())
    return (
        box[0] + float(row_profile @ np.arange(row_profile.size)) / area,
        box[2] + float(col_profile @ np.arange(col_profile.size)) / area,
    )


def _resample(mask: np.ndarray, src_rows: np.ndarray, src_cols: np.ndarray) -> np.ndarray:
    """Nearest-neighbour backward sampling: ``out[i, j] = mask[src_rows[i, j], src_cols[i, j]]``, outside -> False."""
    if USE_OPENCV:
        out = cv2.remap(
            np.ascontiguousarray(mask).view(np.uint8),
            src_cols.astype(np.float32, copy=False),
            src_rows.astype(np.float32, copy=False),
            cv2.INTER_NEAREST,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
        return out.view(bool)
    ri = np.rint(src_rows).astype(np.intp)
    ci = np.rint(src_cols).astype(np.intp)
    inside = (ri >= 0) & (ri < mask.shape[0]) & (ci >= 0) & (ci < mask.shape[1])
    out = mask[np.clip(ri, 0, mask.shape[0] - 1), np.clip(ci, 0, mask.shape[1] - 1)]
    return out & inside


def _linspace_from_zero(stop: float, num: int) -> np.ndarray:
    """``np.linspace(0.0, stop, num)``, the same float64 values (``arange * (stop / (num - 1))``, last point set to
    ``stop``, as numpy computes it) at a fraction of the call overhead."""
    points = np.arange(num, dtype=np.float64)
    if num > 1:
        points *= stop / (num - 1)
        points[-1] = stop
    return points


@lru_cache(maxsize=1024)
def _interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``(n_out, n_in)`` float32 smooth (cosine) interpolation weights from ``n_in`` control points over ``n_out``
    pixels (crop sizes vary, so misses are frequent: built without ``np.linspace``'s Python-level overhead)."""
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    if n_in == 1:
        weights[:, 0] = 1.0
    else:
        pos = _linspace_from_zero(n_in - 1.0, n_out)
        lo = np.minimum(pos.astype(np.intp), n_in - 2)  # floor (pos >= 0)
        frac = 0.5 - 0.5 * np.cos(np.pi * (pos - lo))  # C1-smooth at control points
        rows = np.arange(n_out)
        weights[rows, lo] = 1.0 - frac
        weights[rows, lo + 1] += frac
    weights.flags.writeable = False  # cached and shared
    return weights


def _smooth_field(rng: np.random.RandomState, shape: tuple[int, int], spacing: float, amplitude: float) -> np.ndarray:
    """Random float32 field, uniform in ``[-amplitude, amplitude]`` at control points ``spacing`` px apart,
    interpolated (single precision: the field only feeds nearest-neighbour resampling and thresholds)."""
    grid_rows = max(int(np.ceil(shape[0] / max(spacing, 1.0))) + 1, 2)
    grid_cols = max(int(np.ceil(shape[1] / max(spacing, 1.0))) + 1, 2)
    coarse = rng.uniform(-amplitude, amplitude, size=(grid_rows, grid_cols)).astype(np.float32)
    return _interpolation_matrix(shape[0], grid_rows) @ coarse @ _interpolation_matrix(shape[1], grid_cols).T


def _random_warp(mask: np.ndarray, rng: np.random.RandomState, spacing: float, amplitude: float) -> np.ndarray:
    """Warp by a smooth random displacement field (``spacing``/``amplitude`` in pixels), on the bbox crop."""
    margin = int(np.ceil(amplitude)) + 2

    def warp(crop: np.ndarray) -> np.ndarray:
        d_rows = _smooth_field(rng, crop.shape, spacing, amplitude)
        d_cols = _smooth_field(rng, crop.shape, spacing, amplitude)
        grid_r = np.arange(crop.shape[0], dtype=np.float32)[:, None]
        grid_c = np.arange(crop.shape[1], dtype=np.float32)[None, :]
        return _resample(crop, grid_r + d_rows, grid_c + d_cols)

    return _crop_apply(mask, margin, warp)


def _affine_about_centroid(
    mask: np.ndarray,
    matrix: tuple[float, float, float, float],
    shift: tuple[float, float] = (0.0, 0.0),
    box: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """``dst = c + matrix @ (src - c) + shift`` in (row, col) coordinates, nearest neighbour, outside -> False.

    ``matrix``: row-major ``(m00, m01, m10, m11)``; ``box``: the known :func:`_bbox` of ``mask`` (saves a pass).
    The 2 x 2 algebra runs on Python floats: a dozen tiny numpy calls would cost more than the warp itself.
    """
    box = _bbox(mask) if box is None else box
    if box is None:
        return mask.copy()
    centre_r, centre_c = _centroid(mask, box)
    shift_r, shift_c = float(shift[0]), float(shift[1])
    m00, m01, m10, m11 = (float(v) for v in matrix)
    moved_r, moved_c = [], []
    for row, col in ((box[0], box[2]), (box[0], box[3]), (box[1], box[2]), (box[1], box[3])):
        d_r, d_c = row - centre_r, col - centre_c
        moved_r.append(d_r * m00 + d_c * m01 + centre_r + shift_r)
        moved_c.append(d_r * m10 + d_c * m11 + centre_c + shift_c)
    height, width = mask.shape
    # the +-2 px margin absorbs rounding: the moved object always lies strictly inside the region
    r0, r1 = max(math.floor(min(moved_r)) - 2, 0), min(math.ceil(max(moved_r)) + 2, height)
    c0, c1 = max(math.floor(min(moved_c)) - 2, 0), min(math.ceil(max(moved_c)) + 2, width)
    out = np.zeros(mask.shape, mask.dtype)
    if r0 >= r1 or c0 >= c1:
        return out
    det = m00 * m11 - m01 * m10  # 2 x 2: closed form
    i00, i01, i10, i11 = m11 / det, -m01 / det, -m10 / det, m00 / det
    if USE_OPENCV:
        # backward map of output pixel (col x, row y) of the region, in OpenCV's (x, y) order
        offset_r, offset_c = r0 - centre_r - shift_r, c0 - centre_c - shift_c
        warp = np.array(
            [
                [i11, i10, i10 * offset_r + i11 * offset_c + centre_c],
                [i01, i00, i00 * offset_r + i01 * offset_c + centre_r],
            ]
        )
        region = cv2.warpAffine(
            np.ascontiguousarray(mask).view(np.uint8),
            warp,
            (c1 - c0, r1 - r0),
            flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
        out[r0:r1, c0:c1] = region.view(bool)
        return out
    dr = np.arange(r0, r1, dtype=np.float64)[:, None] - centre_r - shift_r
    dc = np.arange(c0, c1, dtype=np.float64)[None, :] - centre_c - shift_c
    src_r = i00 * dr + i01 * dc + centre_r
    src_c = i10 * dr + i11 * dc + centre_c
    out[r0:r1, c0:c1] = _resample(mask, src_r, src_c)
    return out


def _random_disks(
    shape: tuple[int, int], rng: np.random.RandomState, centres: np.ndarray, radius: float
) -> np.ndarray:
    """Union of disks at ``centres`` (``(n, 2)`` rows/cols) with radii ``radius * U(0.5, 1.5)`` pixels."""
    out = np.zeros(shape, dtype=bool)
    out.ravel()[_random_disk_pixels(shape, rng, centres, radius)] = True
    return out


def _paint_random_disks(
    mask: np.ndarray, rng: np.random.RandomState, centres: np.ndarray, radius: float, value: bool
) -> np.ndarray:
    """Copy of ``mask`` with the disks of :func:`_random_disks` set to ``value`` (no full-size disk image)."""
    out = mask.copy()
    out.ravel()[_random_disk_pixels(mask.shape, rng, centres, radius)] = value
    return out


_NO_PIXELS = np.zeros(0, dtype=np.intp)


def _random_disk_pixels(
    shape: tuple[int, int], rng: np.random.RandomState, centres: np.ndarray, radius: float
) -> np.ndarray:
    """Flat indices (may repeat) of the pixels of :func:`_random_disks`.

    Every disk is a run of columns per row (``|col - c| <= sqrt(rad^2 - (row - r)^2)``); the runs of all disks
    are expanded to flat pixel indices at once (no Python loop over disks).
    """
    if len(centres) == 0:
        return _NO_PIXELS
    centres = np.asarray(centres, dtype=np.float64)
    radii = np.maximum(radius * rng.uniform(0.5, 1.5, size=len(centres)), 0.5)
    reach = int(np.ceil(radii.max())) + 1  # rows rint(centre) +- reach cover every row a disk touches
    offsets = np.arange(-reach, reach + 1, dtype=np.float64)
    rows = np.rint(centres[:, :1]) + offsets  # (n, 2 reach + 1) candidate rows per disk
    squared = radii[:, None] ** 2 - (rows - centres[:, :1]) ** 2
    valid = (squared >= 0) & (rows >= 0) & (rows < shape[0])
    half = np.sqrt(np.maximum(squared, 0.0))
    low = np.maximum(np.ceil(centres[:, 1:] - half), 0)
    high = np.minimum(np.floor(centres[:, 1:] + half), shape[1] - 1)
    valid &= low <= high
    rows, low, high = rows[valid].astype(np.intp), low[valid].astype(np.intp), high[valid].astype(np.intp)
    if rows.size == 0:
        return _NO_PIXELS
    # expand the runs to flat pixel indices: run k covers start_k .. start_k + length_k - 1
    lengths = high - low + 1
    run_of_pixel = np.repeat(np.arange(lengths.size), lengths)
    first_pixel = np.cumsum(lengths) - lengths
    flat = rows * shape[1] + low
    return flat[run_of_pixel] + np.arange(run_of_pixel.size) - first_pixel[run_of_pixel]


# ----------------------------------------------------------------------------------------------
# morphology
# ----------------------------------------------------------------------------------------------
def erode(mask: np.ndarray, rng: np.random.RandomState, radius: float = 0.03) -> np.ndarray:
    """Erosion by a disk: removes every pixel within ``radius * side`` (Euclidean) of the background."""
    r = radius * _side(mask)
    return _crop_apply(mask, 1, lambda crop: _erode_px(crop, r))


def dilate(mask: np.ndarray, rng: np.random.RandomState, radius: float = 0.03) -> np.ndarray:
    """Dilation by a disk: adds every pixel within ``radius * side`` of the foreground."""
    r = radius * _side(mask)
    return _crop_apply(mask, int(np.ceil(r)) + 1, lambda crop: _dilate_px(crop, r))


def opening(mask: np.ndarray, rng: np.random.RandomState, radius: float = 0.05) -> np.ndarray:
    """Morphological opening (erode then dilate) by a disk of ``radius * side``: removes thin parts."""
    r = radius * _side(mask)
    # the opening lies inside the mask, so the bounding box + a 1 px background ring is enough (and keeps the
    # distance transforms of large radii small)
    return _crop_apply(mask, 1, lambda crop: _dilate_px(_erode_px(crop, r), r))


def closing(mask: np.ndarray, rng: np.random.RandomState, radius: float = 0.05) -> np.ndarray:
    """Morphological closing (dilate then erode) by a disk of ``radius * side``: fills gaps and concavities."""
    r = radius * _side(mask)
    return _crop_apply(mask, int(np.ceil(r)) + 2, lambda crop: _erode_px(_dilate_px(crop, r), r))


# ----------------------------------------------------------------------------------------------
# shape approximations
# ----------------------------------------------------------------------------------------------
def ellipse_fit(mask: np.ndarray, rng: np.random.RandomState, scale: float = 1.0) -> np.ndarray:
    """Ellipse with the mask's centroid and second moments (semi-axes ``2 sqrt(eigenvalue)``), times ``scale``."""
    box = _bbox(mask)
    if box is None:
        return mask.copy()
    crop = mask[box[0] : box[1], box[2] : box[3]]
    r, c = np.arange(crop.shape[0], dtype=np.float64), np.arange(crop.shape[1], dtype=np.float64)
    row_profile, col_profile = _profiles(crop)
    area = row_profile.sum()
    mean_r, mean_c = row_profile @ r / area, col_profile @ c / area
    var_r = row_profile @ (r * r) / area - mean_r**2
    var_c = col_profile @ (c * c) / area - mean_c**2
    # sum of row * col over the foreground: exact in float32 up to 2^24 per row (crop widths are far below)
    cov_rc = float(r @ (crop.astype(np.float32) @ c.astype(np.float32)).astype(np.float64)) / area - mean_r * mean_c
    centre = (box[0] + mean_r, box[2] + mean_c)
    # + 1/12: variance of a unit pixel, keeps one-pixel masks non-degenerate
    cov = np.array([[var_r, cov_rc], [cov_rc, var_c]]) + np.eye(2) / 12.0
    eigvals, eigvecs = np.linalg.eigh(cov)
    major = eigvecs[:, 1]
    angle = float(np.arctan2(major[1], major[0]))
    semi = (2.0 * np.sqrt(eigvals[1]) * scale, 2.0 * np.sqrt(eigvals[0]) * scale)
    return _fill_ellipse(mask.shape, centre, semi, angle)


def polygon_fit(mask: np.ndarray, rng: np.random.RandomState, vertices: int = 5) -> np.ndarray:
    """Polygon of up to ``vertices`` corners: for each of ``vertices`` equally spaced directions from the centroid
    (random start angle), the boundary pixel closest in angle to that direction (the farthest one on ties) becomes a
    corner; a round object gives a roughly regular inscribed polygon."""
    box = _bbox(mask)
    if box is None:
        return mask.copy()
    vertices = max(int(vertices), 3)
    offset = _uniform(rng, 0.0, 2.0 * np.pi)
    crop = mask[box[0] : box[1], box[2] : box[3]]
    rows, cols = _nonzero(_inner_boundary(crop))
    rows, cols = rows + box[0], cols + box[2]
    centre_r, centre_c = _centroid(mask, box)
    dr, dc = rows - centre_r, cols - centre_c
    step = 2.0 * np.pi / vertices
    # sector k is centred on the direction offset + k * step
    relative = np.mod(np.arctan2(dr, dc) - offset + step / 2.0, 2.0 * np.pi)
    sector = np.minimum((relative / step).astype(np.intp), vertices - 1)
    off_direction = np.abs(relative - (sector + 0.5) * step)
    # only pixels at their sector's smallest angular offset can win: keep those (usually one or two per sector) and
    # break ties as before (farthest first, then scan order) with a lexsort of the few survivors
    closest = np.full(vertices, np.inf)
    np.minimum.at(closest, sector, off_direction)
    candidates = np.flatnonzero(off_direction == closest[sector])
    dr, dc, sector = dr[candidates], dc[candidates], sector[candidates]
    survivor_order = np.lexsort((-(dr * dr + dc * dc), sector))
    sorted_sector = sector[survivor_order]
    first_of_sector = candidates[survivor_order[np.concatenate(([True], sorted_sector[1:] != sorted_sector[:-1]))]]
    if first_of_sector.size < 3:  # tiny or degenerate object: keep it
        return mask.copy()
    return _fill_polygon(mask.shape, rows[first_of_sector].astype(np.float64), cols[first_of_sector].astype(np.float64))


def convex_hull(mask: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Convex hull of the foreground (contains the mask)."""

    def hull(crop: np.ndarray) -> np.ndarray:
        if USE_OPENCV:
            contours, _ = cv2.findContours(crop.view(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            points = cv2.convexHull(np.concatenate(contours))
            canvas = np.zeros(crop.shape, dtype=np.uint8)
            cv2.fillPoly(canvas, [points], 1)
            return canvas.view(bool) | crop
        from skimage.morphology import convex_hull_image

        return convex_hull_image(crop) | crop

    return _crop_apply(mask, 1, hull)


# ----------------------------------------------------------------------------------------------
# boundary texture and warps
# ----------------------------------------------------------------------------------------------
def jagged(
    mask: np.ndarray, rng: np.random.RandomState, amplitude: float = 0.015, wavelength: float = 0.03
) -> np.ndarray:
    """Jagged boundary: warp by a fine random displacement field (control points ``wavelength * side`` apart,
    displacements up to ``amplitude * side``)."""
    side = _side(mask)
    return _random_warp(mask, rng, wavelength * side, amplitude * side)


def smooth(mask: np.ndarray, rng: np.random.RandomState, sigma: float = 0.03) -> np.ndarray:
    """Smoothed boundary: Gaussian blur with ``sigma * side``, threshold at 0.5 (rounds corners, drops thin parts)."""
    s = sigma * _side(mask)
    if s <= 0:
        return mask.copy()

    def blur(crop: np.ndarray) -> np.ndarray:
        as_float = crop.astype(np.float32)
        if USE_OPENCV:
            size = 2 * int(np.ceil(3.0 * s)) + 1
            blurred = cv2.GaussianBlur(as_float, (size, size), s, borderType=cv2.BORDER_REFLECT)
        else:
            blurred = ndimage.gaussian_filter(as_float, s, mode="reflect", truncate=3.0)  # == BORDER_REFLECT
        return blurred > 0.5

    return _crop_apply(mask, int(np.ceil(3.0 * s)) + 1, blur)


def elastic(mask: np.ndarray, rng: np.random.RandomState, amplitude: float = 0.05, spacing: float = 0.25) -> np.ndarray:
    """Elastic deformation: smooth random displacements up to ``amplitude * side`` on a coarse grid
    ``spacing * side`` apart."""
    side = _side(mask)
    return _random_warp(mask, rng, spacing * side, amplitude * side)


def grid_distortion(mask: np.ndarray, rng: np.random.RandomState, steps: int = 5, limit: float = 0.3) -> np.ndarray:
    """Grid distortion: each axis is cut into ``steps`` cells whose widths are scaled by ``1 + U(-limit, limit)``
    (piecewise-linear, separable remapping of the whole image)."""

    def axis_map(n: int) -> np.ndarray:
        widths = 1.0 + rng.uniform(-limit, limit, size=steps)
        edges_dst = np.concatenate([[0.0], np.cumsum(widths)]) / widths.sum() * (n - 1)
        edges_src = _linspace_from_zero(n - 1.0, steps + 1)
        return np.clip(np.rint(np.interp(np.arange(n), edges_dst, edges_src)), 0, n - 1).astype(np.intp)

    rows, cols = axis_map(mask.shape[0]), axis_map(mask.shape[1])
    return mask[rows][:, cols]  # whole-row gather then column gather: cheaper than np.ix_


def boundary_noise(
    mask: np.ndarray, rng: np.random.RandomState, band: float = 0.02, flip_prob: float = 0.3
) -> np.ndarray:
    """Additive noise on the boundary: each pixel within ``max(band * side, 1 px)`` of the boundary (either side)
    flips with probability ``flip_prob``."""
    b = max(band * _side(mask), 1.0)  # at least the one-pixel boundary ring

    def flip(crop: np.ndarray) -> np.ndarray:
        # pixels within b of the object's inner (4-connected) boundary
        ring = _dilate_px(_inner_boundary(crop), b)
        flips = np.zeros_like(crop)
        flips[ring] = rng.random_sample(int(np.count_nonzero(ring))) < flip_prob
        return crop ^ flips

    return _crop_apply(mask, int(np.ceil(b)) + 1, flip)


# ----------------------------------------------------------------------------------------------
# topology
# ----------------------------------------------------------------------------------------------
def holes(mask: np.ndarray, rng: np.random.RandomState, count: int = 2, radius: float = 0.03) -> np.ndarray:
    """Punch ``count`` disks (radius ``radius * side * U(0.5, 1.5)``) centred on random foreground pixels."""
    box = _bbox(mask)
    if box is None or count <= 0:
        return mask.copy()
    rows, cols = _random_foreground_pixels(mask, rng, int(count), box)
    return _paint_random_disks(mask, rng, np.stack([rows, cols], 1), radius * _side(mask), False)


def islands(mask: np.ndarray, rng: np.random.RandomState, count: int = 2, radius: float = 0.03) -> np.ndarray:
    """Add ``count`` disks (radius ``radius * side * U(0.5, 1.5)``) centred on random pixels of the object's
    bounding box grown by its own size on each side (anywhere in the image when the mask is empty)."""
    if count <= 0:
        return mask.copy()
    height, width = mask.shape
    box = _bbox(mask)
    if box is None:
        box = (0, height, 0, width)
    grow_r, grow_c = box[1] - box[0], box[3] - box[2]
    r0, r1 = max(box[0] - grow_r, 0), min(box[1] + grow_r, height)
    c0, c1 = max(box[2] - grow_c, 0), min(box[3] + grow_c, width)
    centres = np.stack([rng.randint(r0, r1, size=int(count)), rng.randint(c0, c1, size=int(count))], 1)
    return _paint_random_disks(mask, rng, centres, radius * _side(mask), True)


def holes_and_islands(mask: np.ndarray, rng: np.random.RandomState, count: int = 2, radius: float = 0.03) -> np.ndarray:
    """:func:`holes` then :func:`islands`, each with ``count`` disks."""
    return islands(holes(mask, rng, count, radius), rng, count, radius)


def keep_largest(mask: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Keep only the largest 8-connected component (the lowest label on ties)."""
    labels, count = _label(mask)
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return labels == int(np.argmax(sizes)) + 1


def drop_component(mask: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Remove one random 8-connected component when there are at least two; otherwise unchanged."""
    labels, count = _label(mask)
    if count <= 1:
        return mask.copy()
    return mask & (labels != rng.randint(1, count + 1))


def dropout(mask: np.ndarray, rng: np.random.RandomState, height: float = 0.3, width: float = 0.3) -> np.ndarray:
    """Remove a rectangle of ``height x width`` (fractions of the object's bounding box) centred on a random
    foreground pixel."""
    box = _bbox(mask)
    if box is None:
        return mask.copy()
    (row,), (col,) = _random_foreground_pixels(mask, rng, 1, box)
    half_h = max(height * (box[1] - box[0]), 1.0) / 2.0
    half_w = max(width * (box[3] - box[2]), 1.0) / 2.0
    out = mask.copy()
    r0, r1 = max(int(np.rint(row - half_h)), 0), int(np.rint(row + half_h))
    c0, c1 = max(int(np.rint(col - half_w)), 0), int(np.rint(col + half_w))
    out[r0 : max(r1, r0 + 1), c0 : max(c1, c0 + 1)] = False
    return out


# ----------------------------------------------------------------------------------------------
# geometric transforms
# ----------------------------------------------------------------------------------------------
def translation_pixels(
    mask: np.ndarray, shift_y: float, shift_x: float, box: tuple[int, int, int, int] | None = None
) -> tuple[int, int]:
    """Integer ``(rows, cols)`` offset used by :func:`translate` (fractions of the bbox height/width; ``box``: the
    known :func:`_bbox` of ``mask``)."""
    box = _bbox(mask) if box is None else box
    if box is None:
        return 0, 0
    return int(np.rint(shift_y * (box[1] - box[0]))), int(np.rint(shift_x * (box[3] - box[2])))


def translate(mask: np.ndarray, rng: np.random.RandomState, shift_y: float = 0.2, shift_x: float = 0.0) -> np.ndarray:
    """Shift by ``(shift_y, shift_x)`` fractions of the object's bounding-box height/width (rounded to pixels);
    pixels leaving the image are lost."""
    dy, dx = translation_pixels(mask, shift_y, shift_x)
    height, width = mask.shape
    out = np.zeros(mask.shape, mask.dtype)
    if abs(dy) >= height or abs(dx) >= width:
        return out
    out[max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = mask[
        max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    return out


def scale(mask: np.ndarray, rng: np.random.RandomState, factor: float = 1.2) -> np.ndarray:
    """Isotropic scaling by ``factor`` about the centroid."""
    return _affine_about_centroid(mask, (factor, 0.0, 0.0, factor))


def rotate(mask: np.ndarray, rng: np.random.RandomState, angle: float = 30.0) -> np.ndarray:
    """Rotation by ``angle`` degrees about the centroid."""
    t = np.deg2rad(angle)
    cos, sin = float(np.cos(t)), float(np.sin(t))  # numpy's cos/sin: the same values as before (not math's)
    return _affine_about_centroid(mask, (cos, -sin, sin, cos))


def random_affine(
    mask: np.ndarray,
    rng: np.random.RandomState,
    angle: float = 15.0,
    scale_y: float = 1.1,
    scale_x: float = 0.9,
    shear: float = 0.1,
    shift_y: float = 0.05,
    shift_x: float = -0.05,
) -> np.ndarray:
    """Affine about the centroid: rotation (degrees) @ shear @ anisotropic scale, then a shift in fractions of
    the object's bounding box."""
    t = np.deg2rad(angle)
    rotation = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    matrix = rotation @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([scale_y, scale_x])
    box = _bbox(mask)
    return _affine_about_centroid(mask, matrix.ravel().tolist(), translation_pixels(mask, shift_y, shift_x, box), box)


# ----------------------------------------------------------------------------------------------
# catastrophic failures
# ----------------------------------------------------------------------------------------------
def invert(mask: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Complement of the mask."""
    return ~mask


def empty(mask: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """All background."""
    return np.zeros_like(mask)


def full(mask: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """All foreground."""
    return np.ones_like(mask)


def noise(mask: np.ndarray, rng: np.random.RandomState, fill: float = 0.3, grain: float = 0.1) -> np.ndarray:
    """Random blotches unrelated to the object: a smooth random field (control points ``grain * side`` apart)
    thresholded so that about ``fill`` of the image is foreground."""
    field = _smooth_field(rng, mask.shape, grain * _side(mask), 1.0)
    # quantile of a subsample: exact enough for "about fill", far cheaper than a full-image quantile
    threshold = np.quantile(field[::4, ::4], 1.0 - fill)
    return field > threshold


# ----------------------------------------------------------------------------------------------
# blob-like replacements
# ----------------------------------------------------------------------------------------------
def _blob_centre(mask: np.ndarray, rng: np.random.RandomState, at_centroid: bool, reach: float) -> tuple[float, float]:
    if at_centroid:
        return _centroid(mask)
    height, width = mask.shape
    reach = min(reach, (height - 1) / 2.0, (width - 1) / 2.0)
    return float(_uniform(rng, reach, height - 1 - reach)), float(_uniform(rng, reach, width - 1 - reach))


def gaussian_blob(
    mask: np.ndarray, rng: np.random.RandomState, aspect: float = 1.5, at_centroid: bool = True
) -> np.ndarray:
    """Level set of a random anisotropic Gaussian: an ellipse of the mask's area, axis ratio ``aspect`` and random
    orientation, at the centroid or (``at_centroid=False``) at a random place inside the image."""
    area = np.count_nonzero(mask)
    if area == 0:
        return mask.copy()
    minor = np.sqrt(area / (np.pi * aspect))
    centre = _blob_centre(mask, rng, at_centroid, minor * aspect)
    return _fill_ellipse(mask.shape, centre, (minor * aspect, minor), _uniform(rng, 0.0, np.pi))


def disk_blob(mask: np.ndarray, rng: np.random.RandomState, at_centroid: bool = True) -> np.ndarray:
    """Disk of the mask's area at the centroid or (``at_centroid=False``) at a random place inside the image."""
    area = np.count_nonzero(mask)
    if area == 0:
        return mask.copy()
    radius = np.sqrt(area / np.pi)
    return _fill_ellipse(mask.shape, _blob_centre(mask, rng, at_centroid, radius), (radius, radius), 0.0)


def bounding_box(mask: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Filled axis-aligned bounding box of the foreground."""
    box = _bbox(mask)
    out = np.zeros_like(mask)
    if box is not None:
        out[box[0] : box[1], box[2] : box[3]] = True
    return out


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskOp:
    """A registered corruption: the pure op and its parameter sampler ``sample_params(rng, strength) -> dict``."""

    fn: Callable[..., np.ndarray]
    sample_params: Callable[[np.random.RandomState, str], dict[str, Any]]


def _uniform(rng: np.random.RandomState, low: float, high: float) -> float:
    """``rng.uniform(low, high)`` for scalar bounds: the same single draw and the same value (``low + (high - low) * u``,
    as numpy computes it), without numpy's argument handling, which costs several times the draw itself."""
    return low + (high - low) * rng.random_sample()


def _choice(rng: np.random.RandomState, options: tuple[Any, ...]) -> Any:
    """``rng.choice(options)`` (uniform, one draw): numpy's legacy ``choice`` draws exactly ``randint(len(options))``."""
    return options[rng.randint(len(options))]


def _pick(strength: str, mild: tuple[float, float], heavy: tuple[float, float]) -> tuple[float, float]:
    if strength not in STRENGTHS:
        raise ValueError(f"strength must be one of {STRENGTHS}, got {strength!r}.")
    return mild if strength == "mild" else heavy


def _no_params(rng: np.random.RandomState, strength: str) -> dict[str, Any]:
    _pick(strength, (0, 0), (0, 0))
    return {}


def _uniform_param(name: str, mild: tuple[float, float], heavy: tuple[float, float]):
    def sample(rng: np.random.RandomState, strength: str) -> dict[str, Any]:
        return {name: _uniform(rng, *_pick(strength, mild, heavy))}

    return sample


def _sample_polygon(rng: np.random.RandomState, strength: str) -> dict[str, Any]:
    _pick(strength, (0, 0), (0, 0))
    return {"vertices": _choice(rng, (3, 5, 8) if strength == "mild" else (3, 3, 5))}


def _sample_ellipse(rng: np.random.RandomState, strength: str) -> dict[str, Any]:
    low, high = _pick(strength, (0.85, 1.15), (0.6, 1.5))
    return {"scale": _uniform(rng, low, high)}


def _sample_jagged(rng: np.random.RandomState, strength: str) -> dict[str, Any]:
    low, high = _pick(strength, (0.008, 0.02), (0.02, 0.04))
    return {"amplitude": _uniform(rng, low, high), "wavelength": _uniform(rng, 0.02, 0.05)}


def _sample_elastic(rng: np.random.RandomState, strength: str) -> dict[str, Any]:
    low, high = _pick(strength, (0.02, 0.06), (0.06, 0.14))
    return {"amplitude": _uniform(rng, low, high), "spacing": _uniform(rng, 0.15, 0.35)}


def _sample_grid(rng: np.random.RandomState, strength: str) -> dict[str, Any]:
    low, high = _pick(strength, (0.1, 0.3), (0.3, 0.6))
    return {"steps": int(rng.randint(3, 8)), "limit": _uniform(rng, low, high)}


def _sample_boundary_noise(rng: np.random.RandomState, strength: str) -> dict[str, Any]:
    low, high = _pick(strength, (0.005, 0.02), (0.02, 0.05))
    return {"band": _uniform(rng, low, high), "flip_prob": _uniform(rng, 0.2, 0.5)}


def _sample_disks(rng: np.random.RandomState, strength: str) -> dict[str, Any]:
    low, high = _pick(strength, (0.01, 0.04), (0.04, 0.08))
    counts = (1, 4) if strength == "mild" else (3, 8)
    return {"count": int(rng.randint(counts[0], counts[1] + 1)), "radius": _uniform(rng, low, high)}


def _sample_dropout(rng: np.random.RandomState, strength: str) -> dict[str, Any]:
    low, high = _pick(strength, (0.15, 0.4), (0.4, 0.8))
    return {"height": _uniform(rng, low, high), "width": _uniform(rng, low, high)}


def _sample_translate(rng: np.random.RandomState, strength: str) -> dict[str, Any]:
    low, high = _pick(strength, (0.1, 0.4), (0.3, 0.8))
    magnitude, direction = _uniform(rng, low, high), _uniform(rng, 0.0, 2.0 * np.pi)
    return {"shift_y": float(magnitude * np.sin(direction)), "shift_x": float(magnitude * np.cos(direction))}


def _sample_scale(rng: np.random.RandomState, strength: str) -> dict[str, Any]:
    low, high = _pick(strength, (0.1, 0.35), (0.5, 1.4))
    change = _uniform(rng, low, high)
    return {"factor": float(1.0 + change if rng.random_sample() < 0.5 else 1.0 / (1.0 + change))}


def _sample_rotate(rng: np.random.RandomState, strength: str) -> dict[str, Any]:
    low, high = _pick(strength, (10.0, 45.0), (45.0, 180.0))
    return {"angle": float(_uniform(rng, low, high) * _choice(rng, (-1.0, 1.0)))}


def _sample_affine(rng: np.random.RandomState, strength: str) -> dict[str, Any]:
    k = 1.0 if strength == "mild" else 2.5
    _pick(strength, (0, 0), (0, 0))
    return {
        "angle": float(_uniform(rng, -20.0, 20.0) * k),
        "scale_y": float(np.exp(_uniform(rng, -0.15, 0.15) * k)),
        "scale_x": float(np.exp(_uniform(rng, -0.15, 0.15) * k)),
        "shear": float(_uniform(rng, -0.15, 0.15) * k),
        "shift_y": float(_uniform(rng, -0.1, 0.1) * k),
        "shift_x": float(_uniform(rng, -0.1, 0.1) * k),
    }


def _sample_noise(rng: np.random.RandomState, strength: str) -> dict[str, Any]:
    _pick(strength, (0, 0), (0, 0))
    return {"fill": _uniform(rng, 0.05, 0.5), "grain": _uniform(rng, 0.03, 0.3)}


def _sample_gaussian_blob(rng: np.random.RandomState, strength: str) -> dict[str, Any]:
    _pick(strength, (0, 0), (0, 0))
    return {"aspect": _uniform(rng, 1.0, 3.0), "at_centroid": bool(rng.random_sample() < 0.75)}


def _sample_disk_blob(rng: np.random.RandomState, strength: str) -> dict[str, Any]:
    _pick(strength, (0, 0), (0, 0))
    return {"at_centroid": bool(rng.random_sample() < 0.75)}


#: name -> :class:`MaskOp`; extend with :func:`register_mask_op`
MASK_CORRUPTION_OPS: dict[str, MaskOp] = {}


def register_mask_op(
    name: str, fn: Callable[..., np.ndarray], sample_params: Callable[[np.random.RandomState, str], dict[str, Any]]
) -> None:
    """Add (or replace) an op in :data:`MASK_CORRUPTION_OPS` so configs can refer to it by ``name``."""
    MASK_CORRUPTION_OPS[name] = MaskOp(fn=fn, sample_params=sample_params)


def apply_mask_op(name: str, mask: np.ndarray, rng: np.random.RandomState, **params: Any) -> np.ndarray:
    """Run the registered op ``name`` on a boolean ``(H, W)`` mask."""
    if name not in MASK_CORRUPTION_OPS:
        raise KeyError(f"unknown mask corruption op {name!r}; registered: {sorted(MASK_CORRUPTION_OPS)}.")
    return MASK_CORRUPTION_OPS[name].fn(mask, rng, **params)


for _name, _fn, _sampler in (
    ("erode", erode, _uniform_param("radius", (0.01, 0.04), (0.04, 0.08))),
    ("dilate", dilate, _uniform_param("radius", (0.01, 0.04), (0.04, 0.1))),
    ("opening", opening, _uniform_param("radius", (0.02, 0.06), (0.06, 0.15))),
    ("closing", closing, _uniform_param("radius", (0.02, 0.08), (0.08, 0.2))),
    ("ellipse_fit", ellipse_fit, _sample_ellipse),
    ("polygon_fit", polygon_fit, _sample_polygon),
    ("convex_hull", convex_hull, _no_params),
    ("jagged", jagged, _sample_jagged),
    ("smooth", smooth, _uniform_param("sigma", (0.01, 0.04), (0.04, 0.08))),
    ("elastic", elastic, _sample_elastic),
    ("grid_distortion", grid_distortion, _sample_grid),
    ("boundary_noise", boundary_noise, _sample_boundary_noise),
    ("holes", holes, _sample_disks),
    ("islands", islands, _sample_disks),
    ("holes_and_islands", holes_and_islands, _sample_disks),
    ("keep_largest", keep_largest, _no_params),
    ("drop_component", drop_component, _no_params),
    ("dropout", dropout, _sample_dropout),
    ("translate", translate, _sample_translate),
    ("scale", scale, _sample_scale),
    ("rotate", rotate, _sample_rotate),
    ("random_affine", random_affine, _sample_affine),
    ("invert", invert, _no_params),
    ("empty", empty, _no_params),
    ("full", full, _no_params),
    ("noise", noise, _sample_noise),
    ("gaussian_blob", gaussian_blob, _sample_gaussian_blob),
    ("disk_blob", disk_blob, _sample_disk_blob),
    ("bounding_box", bounding_box, _no_params),
):
    register_mask_op(_name, _fn, _sampler)

#: ops drawn by the "single", "chain" and "heavy" categories
DEFAULT_OPS: tuple[str, ...] = (
    "erode",
    "dilate",
    "opening",
    "closing",
    "ellipse_fit",
    "polygon_fit",
    "convex_hull",
    "jagged",
    "smooth",
    "elastic",
    "grid_distortion",
    "boundary_noise",
    "holes",
    "islands",
    "holes_and_islands",
    "keep_largest",
    "drop_component",
    "dropout",
    "translate",
    "scale",
    "rotate",
    "random_affine",
)
#: default relative weights of :data:`DEFAULT_OPS`: ops that barely change a convex single-component polyp
#: (closing, convex hull, keep-largest, drop-component) are drawn less, strong shape/position errors more,
#: so that the default mix spans the whole Dice range (see ``benchmarks/bench_mask_generation.py``)
DEFAULT_OP_WEIGHTS: dict[str, float] = {
    **dict.fromkeys(DEFAULT_OPS, 1.0),
    "closing": 0.5,
    "convex_hull": 0.5,
    "keep_largest": 0.5,
    "drop_component": 0.5,
    "translate": 2.5,
    "scale": 2.5,
    "polygon_fit": 1.5,
    "erode": 1.5,
    "dilate": 1.5,
    "holes_and_islands": 1.5,
}
#: ops drawn by the "catastrophic" category
CATASTROPHIC_OPS: tuple[str, ...] = ("invert", "empty", "full", "noise")
#: ops drawn by the "blob" category
BLOB_OPS: tuple[str, ...] = ("gaussian_blob", "disk_blob", "convex_hull", "bounding_box")
