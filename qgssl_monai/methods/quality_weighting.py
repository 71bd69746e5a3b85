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

import hashlib
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "QUALITY_REFERENCE_KEY",
    "QualityNetChangedError",
    "QualityWeighting",
    "attach_quality_net",
    "freeze",
    "quality_reference",
]

#: state_dict key (under the holder's prefix) of the reference to g that replaces g's weights in checkpoints
QUALITY_REFERENCE_KEY = "quality_net_reference"


class QualityNetChangedError(ValueError):
    """A training checkpoint refers to another quality predictor g than the one the resumed run loaded."""


def freeze(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter and switch to eval mode; returns ``module``."""
    for param in module.parameters():
        param.requires_grad_(False)
    return module.eval()


def quality_reference(quality_net: nn.Module) -> dict[str, str | None]:
    """``{"path", "sha256"}`` identifying g: its weights file and that file's SHA-256 when g was built by
    :func:`~qgssl_monai.networks.quality.load_quality_predictor`; else ``path`` None and the SHA-256 of its
    tensors (names, dtypes, shapes, bytes), so an in-memory g is identified too."""
    sha = getattr(quality_net, "checkpoint_sha256", None)
    if sha:
        return {"path": getattr(quality_net, "checkpoint_path", None), "sha256": str(sha)}
    digest = hashlib.sha256()
    for key, value in sorted(quality_net.state_dict().items()):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}:{tensor.dtype}:{tuple(value.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return {"path": None, "sha256": digest.hexdigest()}


def _save_reference_not_weights(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    # g is frozen and lives in its own file: a checkpoint stores which g (path + SHA-256), not its weights
    for key in [k for k in state_dict if k.startswith(prefix + "quality_net.")]:
        del state_dict[key]
    state_dict[prefix + QUALITY_REFERENCE_KEY] = quality_reference(module.quality_net)


def _check_reference_restore_weights(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    saved = state_dict.pop(prefix + QUALITY_REFERENCE_KEY, None)
    current = quality_reference(module.quality_net)
    if saved is not None and saved.get("sha256") != current["sha256"]:
        raise QualityNetChangedError(
            f"the quality predictor g changed since this checkpoint was saved: it was trained with "
            f"{saved.get('path') or 'an in-memory g'} (sha256 {str(saved.get('sha256'))[:12]}...), this run loads "
            f"{current['path'] or 'an in-memory g'} (sha256 {str(current['sha256'])[:12]}...); resume with the same g "
            "(quality_ckpt) or start a new run"
        )
    # the live g fills its own keys (checkpoints written before g was left out carry a copy: it is replaced)
    state_dict.update(module.quality_net.state_dict(prefix=prefix + "quality_net."))


def attach_quality_net(owner: nn.Module, quality_net: nn.Module) -> nn.Module:
    """Register the frozen g as ``owner.quality_net``, kept out of ``owner``'s checkpoints.

    ``owner.state_dict()`` holds ``quality_net_reference`` (:func:`quality_reference`) instead of g's weights;
    ``owner.load_state_dict()`` checks it against the g in use and raises :class:`QualityNetChangedError`
    when they differ. Used by every method component that holds g (quality weighting, QAR).

    Returns:
        ``quality_net``, frozen (``requires_grad=False``, eval mode).
    """
    if not isinstance(quality_net, nn.Module):
        raise TypeError(f"quality_net must be an nn.Module, got {type(quality_net).__name__}.")
    owner.quality_net = freeze(quality_net)
    owner.register_state_dict_post_hook(_save_reference_not_weights)
    owner.register_load_state_dict_pre_hook(_check_reference_restore_weights)
    return owner.quality_net


class QualityWeighting(nn.Module):
    """Quality-weighted reduction of per-sample pseudo-label losses.

    Args:
        quality_net: quality predictor ``g``: ``(B, C+1, *S) -> (B, 1)`` in ``[0, 1]``. It is frozen here
            (``requires_grad=False``, always eval mode), never handed to the optimizer and saved in checkpoints
            as a reference (path + SHA-256), not as weights (:func:`attach_quality_net`).
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
        attach_quality_net(self, quality_net)
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
