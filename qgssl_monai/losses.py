"""Per-sample segmentation losses for binary (one-logit-channel) segmentation, 2D and 3D.

Every loss here returns a ``(B,)`` tensor, one value per sample, so that semi-supervised methods can
weight samples (quality weighting, confidence weighting) before reducing. Inputs follow the project
convention: ``logits`` of shape ``(B, 1, *S)`` (``S`` = ``(H, W)`` or ``(D, H, W)``), targets of the
same shape in ``[0, 1]`` (hard ``{0, 1}`` labels or soft probabilities), and an optional pixel mask of
the same shape in ``{0, 1}`` selecting the pixels that count.

MONAI's ``DiceCELoss`` has no ``reduction="none"``, hence the composition of
``monai.losses.DiceLoss(reduction="none")`` and element-wise BCE-with-logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import Tensor, nn

__all__ = ["PerSampleDiceBCELoss", "masked_mean_per_sample", "per_sample_mse"]


def masked_mean_per_sample(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of ``values`` over all non-batch dimensions, restricted to ``mask``.

    Args:
        values: ``(B, *)`` per-pixel values.
        mask: ``None`` (all pixels count) or a tensor broadcastable to ``values`` in ``{0, 1}``
            (soft values act as pixel weights).

    Returns:
        ``(B,)``: per-sample (masked) mean; ``0`` for samples whose mask is empty.
    """
    if mask is None:
        return values.flatten(1).mean(dim=1)
    mask = mask.to(values.dtype).expand_as(values)
    total = (values * mask).flatten(1).sum(dim=1)
    count = mask.flatten(1).sum(dim=1)
    # samples with no valid pixels contribute 0 instead of 0/0
    return torch.where(count > 0, total / count.clamp_min(1e-12), torch.zeros_like(total))


def per_sample_mse(prediction: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sample mean squared error (consistency losses on probabilities).

    Args:
        prediction: ``(B, C, *S)`` e.g. student probabilities in ``[0, 1]``.
        target: same shape, e.g. teacher probabilities (should be detached by the caller).
        mask: optional ``(B, 1 or C, *S)`` pixel mask in ``{0, 1}``.

    Returns:
        ``(B,)``: masked mean of ``(prediction - target) ** 2``; ``0`` where the mask is empty.
    """
    return masked_mean_per_sample((prediction.float() - target.float()) ** 2, mask)


class PerSampleDiceBCELoss(nn.Module):
    """Soft Dice + binary cross-entropy on one sigmoid channel, reduced per sample.

    ``loss_b = dice_weight * Dice_b + bce_weight * BCE_b`` where, over the valid pixels ``i`` of
    sample ``b`` (all pixels without a mask), with ``p = sigmoid(logits)`` and target ``t``:

    * ``Dice_b = 1 - (2 * sum(p t) + smooth_nr) / (sum(p) + sum(t) + smooth_dr)``
      (MONAI ``DiceLoss(reduction="none")`` on ``p * mask`` and ``t * mask``),
    * ``BCE_b = mean_i BCEWithLogits(logits_i, t_i)``.

    Samples whose mask has no valid pixel get loss ``0``. Computation is done in float32 so that
    the loss is stable under bf16/fp16 autocast.

    Args:
        dice_weight: weight of the Dice term (default 0.5).
        bce_weight: weight of the BCE term (default 0.5).
        smooth_nr: Dice numerator smoothing.
        smooth_dr: Dice denominator smoothing.
    """

    def __init__(
        self, dice_weight: float = 0.5, bce_weight: float = 0.5, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5
    ) -> None:
        super().__init__()
        if dice_weight < 0 or bce_weight < 0 or dice_weight + bce_weight == 0:
            raise ValueError(f"dice_weight ({dice_weight}) and bce_weight ({bce_weight}) must be >= 0, not both 0.")
        self.dice_weight = float(dice_weight)
        self.bce_weight = float(bce_weight)
        self.dice = DiceLoss(sigmoid=False, reduction="none", smooth_nr=smooth_nr, smooth_dr=smooth_dr)

    def forward(self, logits: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """
        Args:
            logits: ``(B, 1, *S)`` raw network outputs.
            target: ``(B, 1, *S)`` in ``[0, 1]`` (hard or soft).
            mask: optional ``(B, 1, *S)`` in ``{0, 1}``; only pixels with mask 1 count.

        Returns:
            ``(B,)`` per-sample loss, ``>= 0``.
        """
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the same shape.")
        logits = logits.float()
        target = target.float()
        loss = logits.new_zeros(logits.shape[0])
        if self.dice_weight > 0:
            probs = torch.sigmoid(logits)
            if mask is not None:
                mask_f = mask.to(probs.dtype)
                dice = self.dice(probs * mask_f, target * mask_f).flatten(1).mean(dim=1)
                dice = torch.where(mask_f.flatten(1).sum(dim=1) > 0, dice, torch.zeros_like(dice))
            else:
                dice = self.dice(probs, target).flatten(1).mean(dim=1)
            loss = loss + self.dice_weight * dice
        if self.bce_weight > 0:
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            loss = loss + self.bce_weight * masked_mean_per_sample(bce, mask)
        return loss
