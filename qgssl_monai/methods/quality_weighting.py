"""The one reusable quality-weighting component for pseudo-label losses (every ``*-QW`` method).

Given a frozen quality predictor ``g(cat([image, mask], 1)) -> (B, 1)`` in ``[0, 1]`` (estimated Dice,
see docs/ARCHITECTURE.md), a per-sample pseudo-label loss ``l`` of shape ``(B,)`` is reduced to a scalar
with per-sample weights computed from ``q = g(x_u, pseudo_label)`` (no gradient, ``g`` in eval mode):

* ``mode="plain"`` (paper): ``w = q``, loss ``= mean_j(w_j * l_j)``.
* ``mode="thresholded"`` (authors' released code): ``w = q ** power * 1[q >= threshold]``;
  with ``normalize=True`` loss ``= sum_j(w_j * l_j) / sum_j(w_j)`` (``0`` when every weight is 0),
  otherwise ``mean_j(w_j * l_j)``. ``normalize`` only affects this mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["QualityWeighting", "freeze"]


def freeze(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter and switch to eval mode; returns ``module``."""
    for param in module.parameters():
        param.requires_grad_(False)
    return module.eval()


class QualityWeighting(nn.Module):
    """Quality-weighted reduction of per-sample pseudo-label losses.

    Args:
        quality_net: quality predictor ``g``: ``(B, C+1, *S) -> (B, 1)`` in ``[0, 1]``. It is frozen here
            (``requires_grad=False``, always eval mode) and never handed to the optimizer.
        mode: ``"plain"`` (``w = q``, paper) or ``"thresholded"`` (``w = q^power * 1[q >= threshold]``,
            authors' code).
        power: exponent ``T`` of the thresholded form (authors' code: 2).
        threshold: ``tau`` of the thresholded form (authors' code: 0.5).
        normalize: thresholded mode only: divide by ``sum(w)`` (authors' code) instead of the batch size.
    """

    modes = ("plain", "thresholded")

    def __init__(
        self,
        quality_net: nn.Module,
        mode: str = "plain",
        power: float = 2.0,
        threshold: float = 0.5,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if mode not in self.modes:
            raise ValueError(f"QualityWeighting mode must be one of {self.modes}, got {mode!r}.")
        if not isinstance(quality_net, nn.Module):
            raise TypeError(f"quality_net must be an nn.Module, got {type(quality_net).__name__}.")
        self.quality_net = freeze(quality_net)
        self.mode = mode
        self.power = float(power)
        self.threshold = float(threshold)
        self.normalize = bool(normalize)

    def train(self, mode: bool = True) -> QualityWeighting:
        super().train(mode)
        self.quality_net.eval()  # g is frozen: no dropout, running BatchNorm statistics
        return self

    @torch.no_grad()
    def quality(self, image: Tensor, mask: Tensor) -> Tensor:
        """Estimated Dice of ``mask`` for ``image``.

        Args:
            image: ``(B, C, *S)``.
            mask: ``(B, 1, *S)`` hard ``{0, 1}`` or soft ``[0, 1]`` pseudo-label.

        Returns:
            ``(B,)`` detached, in ``[0, 1]`` (float32).
        """
        net_input = torch.cat([image, mask.to(image.dtype)], dim=1)
        return self.quality_net(net_input).reshape(image.shape[0]).float()

    def weights_from_quality(self, quality: Tensor) -> Tensor:
        """``(B,)`` quality -> ``(B,)`` detached weights (``q`` or ``q^T * 1[q >= tau]``)."""
        quality = quality.detach()
        if self.mode == "plain":
            return quality
        return quality.pow(self.power) * (quality >= self.threshold).to(quality.dtype)

    def weights(self, image: Tensor, pseudo_label: Tensor) -> Tensor:
        """``(B,)`` detached weights of ``pseudo_label`` for ``image``."""
        return self.weights_from_quality(self.quality(image, pseudo_label))

    def reduce(self, per_sample_loss: Tensor, weights: Tensor) -> Tensor:
        """Weighted scalar from a ``(B,)`` loss and ``(B,)`` detached weights (see module docstring)."""
        if per_sample_loss.shape != weights.shape:
            raise ValueError(
                f"per-sample loss {tuple(per_sample_loss.shape)} and weights {tuple(weights.shape)} must match."
            )
        weighted = per_sample_loss * weights.to(per_sample_loss.dtype)
        if self.mode == "thresholded" and self.normalize:
            total = weights.sum()
            # all samples below tau: no pseudo-label signal this step (loss 0, still in the graph)
            return torch.where(total > 0, weighted.sum() / total.clamp_min(1e-12), weighted.sum() * 0.0)
        return weighted.mean()

    def forward(self, per_sample_loss: Tensor, image: Tensor, pseudo_label: Tensor) -> tuple[Tensor, Tensor]:
        """
        Args:
            per_sample_loss: ``(B,)`` pseudo-label loss.
            image: ``(B, C, *S)`` unlabeled images (the quality predictor's image input).
            pseudo_label: ``(B, 1, *S)`` the pseudo-label the loss was computed against.

        Returns:
            ``(weighted scalar loss, (B,) detached weights)``.
        """
        weights = self.weights(image, pseudo_label)
        return self.reduce(per_sample_loss, weights), weights
