"""Per-sample Dice + BCE and masked per-sample reductions, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from qgssl_monai.losses import PerSampleDiceBCELoss, masked_mean_per_sample, per_sample_mse


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _hand_dice_bce(logits: list[float], target: list[float], smooth: float = 1e-5) -> tuple[float, float]:
    probs = [_sigmoid(v) for v in logits]
    inter = sum(p * t for p, t in zip(probs, target))
    dice = 1.0 - (2.0 * inter + smooth) / (sum(probs) + sum(target) + smooth)
    bce = sum(-(t * math.log(p) + (1 - t) * math.log(1 - p)) for p, t in zip(probs, target)) / len(probs)
    return dice, bce


def test_per_sample_loss_equals_hand_computed_bce_plus_dice() -> None:
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 1.0]]], [[[3.0, -3.0], [0.5, -0.5]]]])
    target = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]], [[[1.0, 0.0], [0.3, 0.0]]]])  # second sample soft
    loss = PerSampleDiceBCELoss()(logits, target)
    assert loss.shape == (2,)
    for b in range(2):
        dice, bce = _hand_dice_bce(logits[b].flatten().tolist(), target[b].flatten().tolist())
        assert loss[b].item() == pytest.approx(0.5 * dice + 0.5 * bce, abs=1e-6)
    weighted = PerSampleDiceBCELoss(dice_weight=0.2, bce_weight=0.8)(logits, target)
    dice, bce = _hand_dice_bce(logits[0].flatten().tolist(), target[0].flatten().tolist())
    assert weighted[0].item() == pytest.approx(0.2 * dice + 0.8 * bce, abs=1e-6)


def test_masked_loss_uses_only_valid_pixels_and_is_zero_without_any() -> None:
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 1.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    target = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    loss = PerSampleDiceBCELoss()(logits, target, mask)
    dice, bce = _hand_dice_bce([0.0, 2.0], [0.0, 1.0])  # first row only
    assert loss[0].item() == pytest.approx(0.5 * dice + 0.5 * bce, abs=1e-6)
    assert loss[1].item() == 0.0


def test_loss_is_per_sample_in_3d_and_differentiable() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 4, 4, 4, requires_grad=True)
    target = (torch.rand(3, 1, 4, 4, 4) > 0.5).float()
    loss_fn = PerSampleDiceBCELoss()
    batch_loss = loss_fn(logits, target)
    singles = torch.cat([loss_fn(logits[i : i + 1], target[i : i + 1]) for i in range(3)])
    assert torch.allclose(batch_loss, singles, atol=1e-6)
    batch_loss.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        PerSampleDiceBCELoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))


def test_masked_mean_and_mse_per_sample() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert masked_mean_per_sample(values, mask).tolist() == [2.0, 0.0]
    assert masked_mean_per_sample(values).tolist() == [2.5, 6.5]
    pred = torch.tensor([[[[0.5, 1.0]]], [[[0.0, 0.2]]]])
    target = torch.tensor([[[[0.0, 1.0]]], [[[1.0, 0.2]]]])
    assert per_sample_mse(pred, target).tolist() == pytest.approx([0.125, 0.5])
    assert per_sample_mse(pred, target, torch.tensor([[[[1.0, 0.0]]], [[[0.0, 1.0]]]])).tolist() == pytest.approx(
        [0.25, 0.0]
    )
