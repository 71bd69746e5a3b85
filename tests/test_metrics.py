"""Per-image DSC / IoU / HD95 / ASD against hand-computed values, empty-mask conventions, mean +- s.e."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qgssl_monai.metrics import compute_binary_metrics, image_diagonal, mean_se, summarize_metrics


def _square(top: int, left: int, side: int = 10, size: int = 32) -> torch.Tensor:
    mask = torch.zeros(1, 1, size, size)
    mask[..., top : top + side, left : left + side] = 1.0
    return mask


def test_overlapping_squares_dice_and_iou_exact() -> None:
    # 10x10 squares, the second shifted 5 columns: overlap 50 px -> DSC 2*50/200, IoU 50/150
    result = compute_binary_metrics(_square(4, 4), _square(4, 9))
    assert result["dice"].tolist() == pytest.approx([0.5])
    assert result["iou"].tolist() == pytest.approx([1.0 / 3.0])
    assert all(v.shape == (1,) and v.dtype == torch.float32 for v in result.values())


def test_square_shifted_by_two_pixels_surface_distances() -> None:
    """Boundary rings of 36 px; distances A->B (and B->A by symmetry) are sixteen 0s, four 1s, sixteen 2s.

    HD95 = 95th percentile = 2 (max also 2); ASD = (2 * (4 * 1 + 16 * 2)) / 72 = 1.
    """
    pred, label = _square(4, 4), _square(4, 6)
    result = compute_binary_metrics(pred, label)
    assert result["hd95"].item() == pytest.approx(2.0)
    assert result["asd"].item() == pytest.approx(1.0)
    isotropic = compute_binary_metrics(pred, label, spacing=0.5)
    assert (isotropic["hd95"].item(), isotropic["asd"].item()) == pytest.approx((1.0, 0.5))
    # columns 3 units wide: A->B distances: top/bottom rows 6, 3, 0 x8; left column 6 x8;
    # right column min(6, r, 9 - r) = 1,2,3,4,4,3,2,1 -> sum 86 over 36 points; the 95th percentile is 6
    anisotropic = compute_binary_metrics(pred, label, spacing=(1.0, 3.0))
    assert anisotropic["hd95"].item() == pytest.approx(6.0)
    assert anisotropic["asd"].item() == pytest.approx(86.0 / 36.0, rel=1e-5)
    # DSC/IoU do not depend on spacing: 80 px overlap of 100 + 100
    assert anisotropic["dice"].item() == pytest.approx(0.8) and anisotropic["iou"].item() == pytest.approx(80 / 120)


def test_single_pixels_three_apart() -> None:
    pred, label = torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16)
    pred[0, 0, 5, 5] = 1.0
    label[0, 0, 5, 8] = 1.0
    result = compute_binary_metrics(pred, label)
    assert [result[k].item() for k in ("dice", "iou", "hd95", "asd")] == pytest.approx([0.0, 0.0, 3.0, 3.0])


def test_empty_mask_conventions_per_image_in_a_batch() -> None:
    pred, label = torch.zeros(4, 1, 32, 32), torch.zeros(4, 1, 32, 32)
    pred[1, 0, 2:6, 2:6] = 1.0  # prediction only
    label[2, 0, 2:6, 2:6] = 1.0  # reference only
    pred[3, 0, 2:6, 2:6] = 1.0  # identical
    label[3, 0, 2:6, 2:6] = 1.0
    result = compute_binary_metrics(pred, label)
    diagonal = math.sqrt(2.0) * 31.0
    assert result["dice"].tolist() == pytest.approx([1.0, 0.0, 0.0, 1.0])
    assert result["iou"].tolist() == pytest.approx([1.0, 0.0, 0.0, 1.0])
    assert result["hd95"].tolist() == pytest.approx([0.0, diagonal, diagonal, 0.0])
    assert result["asd"].tolist() == pytest.approx([0.0, diagonal, diagonal, 0.0])
    spaced = compute_binary_metrics(pred, label, spacing=(1.0, 3.0))
    assert spaced["hd95"][1].item() == pytest.approx(math.hypot(31.0, 93.0))
    assert image_diagonal((32, 32), (1.0, 3.0)) == pytest.approx(math.hypot(31.0, 93.0))


def test_3d_cubes_shifted_by_one_voxel() -> None:
    """4^3 cubes, shifted 1 along the last axis: overlap 48 -> DSC 0.75, IoU 0.6.

    Each 56-voxel surface has 20 voxels at distance 1 (16 on the exposed face, 4 of the inner face) and
    36 at 0 -> HD95 1, ASD 40/112.
    """
    pred, label = torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 8)
    pred[..., 2:6, 2:6, 1:5] = 1.0
    label[..., 2:6, 2:6, 2:6] = 1.0
    result = compute_binary_metrics(pred, label)
    assert [result[k].item() for k in ("dice", "iou", "hd95")] == pytest.approx([0.75, 0.6, 1.0])
    assert result["asd"].item() == pytest.approx(40.0 / 112.0, rel=1e-5)


def test_soft_inputs_are_thresholded_and_bad_shapes_rejected() -> None:
    soft = _square(4, 4) * 0.7  # 0.7 > 0.5 -> foreground
    assert compute_binary_metrics(soft, _square(4, 4))["dice"].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differs"):
        compute_binary_metrics(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match="B, 1, H, W"):
        compute_binary_metrics(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="spacing"):
        compute_binary_metrics(_square(4, 4), _square(4, 6), spacing=(1.0, 1.0, 1.0))


def test_mean_se_and_summary() -> None:
    mean, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5) and se == pytest.approx(math.sqrt(5.0 / 3.0) / 2.0)
    assert mean_se(torch.tensor([0.3])) == (pytest.approx(0.3), 0.0)
    assert mean_se(np.array([2.0, 2.0])) == (2.0, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        mean_se([])
    with pytest.raises(ValueError, match="non-finite"):
        mean_se([1.0, float("nan")])
    summary = summarize_metrics({"dice": [0.5, 1.0], "hd95": torch.tensor([2.0])})
    assert list(summary) == ["dice", "hd95"]
    assert summary["dice"] == {"mean": pytest.approx(0.75), "se": pytest.approx(0.25), "n": 2}
    assert summary["hd95"] == {"mean": 2.0, "se": 0.0, "n": 1}
