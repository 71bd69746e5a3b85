"""FDPL and FDPL-QW: co-training with fixed and dynamic pseudo-labels (Kumari & Singh).

Two independently initialised subnets learn from each other: subnet A is the engine's student,
subnet B (``peer``) belongs to this method (its supervised loss is returned as ``extra_sup_loss``,
its parameters through :meth:`FDPL.trainable_parameters`). Per iteration, for the unlabeled batch
``x_u`` ``(B, C, *S)`` (2D or 3D):

1. a *fixed* crop ``x^{u_f}`` is taken at a random position per sample; a subnet's prediction on it
   is its fixed pseudo-label ``ŷ^{u_f}``;
2. four *shifted* crops move the fixed crop by ``+-offset`` along the two in-plane axes (``shift_axes``);
   their predictions, mapped back onto the fixed crop and averaged where several overlap, form the
   temporary pseudo-label ``ŷ^{u_t}``; ``COM`` takes ``ŷ^{u_t}`` where the shifted crops overlap the
   fixed crop and ``ŷ^{u_f}`` elsewhere: the dynamic pseudo-label ``ŷ^{u_d}``;
3. A learns from B on the original fixed crop: ``L_fix(A(x^{u_f}), ŷ^{u_f}_B) + beta * L_dyn(A(x^{u_f}), ŷ^{u_d}_B)``;
4. B learns from A on a CutMix image: a random box of another crop of the batch is pasted into each
   fixed crop (MONAI :class:`~monai.transforms.CutMix`), the *same* box mixing is applied to A's fixed
   and dynamic pseudo-labels, and ``L_fix + beta * L_dyn`` is applied between B's prediction on the
   mixed crop and the mixed pseudo-labels.

The engine adds ``lambda(t) * unsup_loss`` (sigmoid ramp-up, ``lambda_max = default_unsup_weight``
unless the bundle sets it) to ``L_sup(A) + L_sup(B)``, where both supervised losses are the engine's
per-sample ``alpha * Dice + (1 - alpha) * BCE``.

FDPL-QW (:class:`FDPLQW`) weights each of the four pseudo-label losses per sample by the frozen quality
predictor's score of that pseudo-label against the image it is supervising (the fixed crop for A's
targets, the CutMix crop for B's), through the shared
:class:`~qgssl_monai.methods.quality_weighting.QualityWeighting`; weights are detached.

Choices where the paper is silent (defaults):

* pseudo-labels are hard (``sigmoid > 0.5``, ``hard_pseudo_labels=True``); ``ŷ^{u_t}`` averages the
  shifted crops' *probabilities*, and COM is applied before thresholding;
* ``L_fix``/``L_dyn`` are the per-sample ``alpha * Dice + (1 - alpha) * BCE`` of the supervised loss
  (same ``alpha``, default 0.5), averaged over the batch; ``beta = 1``; ``lambda_max = 0.1`` with the
  sigmoid ramp (the usual 3D LA/Pancreas protocol of UA-MT/MC-Net that FDPL follows);
* crop size: ``crop_fraction`` (3/4) of each image side rounded down to ``crop_multiple`` (32: every 2D
  network of the bundle, SwinUNETR included; 16 for VNet / the 3D U-Net) unless ``crop_size`` is given
  (256 px images -> 192 px crops; a 112x112x80 patch -> 80x80x48). SwinUNETR's last stage also needs
  crops of at least 64 px (images of at least 86 px); the offset is a quarter of the crop side
  unless ``offset`` is given;
* border policy: a shifted crop is clamped into the image (shift reduced); a crop whose shift is
  reduced to zero would repeat the fixed crop and is ignored (see :mod:`.fdpl_ops`); voxels no valid
  shifted crop overlaps keep the fixed pseudo-label;
* CutMix operates on the fixed crops (the pseudo-labels' frame); box ratio ~ Beta(``cutmix_alpha``,
  ``cutmix_alpha``), partner = a random permutation of the batch (MONAI's CutMix);
* B is evaluated only through its losses; validation/inference use subnet A (the engine's network);
* only the two subnets' predictions used as targets run under ``no_grad``; B's predictions on the
  original crops are targets only (B is trained on the CutMix crops and the labeled batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable
from torch import Tensor, nn

from qgssl_monai.methods.base import MethodOutput, SSLMethod, StepContext, independent_peer
from qgssl_monai.methods.fdpl_ops import (
    SegmentationCutMix,
    combine_pseudo_labels,
    crop_batch,
    default_crop_size,
    sample_crop_starts,
    shifted_crop_starts,
    temporary_pseudo_label,
)
from qgssl_monai.methods.quality_weighting import QualityWeighting

__all__ = ["FDPL", "FDPLQW"]


class FDPL(SSLMethod, Randomizable):
    """Fixed + dynamic pseudo-label co-training (see module docstring).

    Args:
        peer: subnet B's architecture; ``None`` (default): the student's. Pass ``"%network_def"`` in a bundle
            config to build it from the network config. Either way B's weights are drawn from ``peer_seed`` in
            :meth:`setup`, so B is initialised independently of A even when both come from one seeded config.
        beta: weight of ``L_dyn`` relative to ``L_fix``.
        crop_size: crop side per spatial axis (int for all axes); ``None``: derived from the image size.
        crop_fraction: fraction of the image side used when ``crop_size`` is ``None``.
        crop_multiple: the derived crop side is rounded down to a multiple of this (network constraint).
        offset: shift of the dynamic crops in voxels (int or one per shift axis); ``None``: crop side // 4.
        shift_axes: spatial axes the crops shift along (``(0, 1)``: the in-plane axes of ``(H, W[, D])``).
        cutmix_alpha: Beta parameter of MONAI's CutMix box ratio.
        hard_pseudo_labels: threshold pseudo-labels at 0.5 (True) or keep probabilities.
        pseudo_label_loss: per-sample loss ``(logits, target) -> (B,)`` for ``L_fix``/``L_dyn``; ``None``: the
            engine's supervised loss (``ctx.sup_loss_fn``).
        quality_weighting: shared QW component; only :class:`FDPLQW` uses it.
        peer_seed: seed of the peer's re-initialisation.
        seed: seed of the crop positions and CutMix boxes (``self.R``).
    """

    name = "fdpl"
    default_unsup_weight = 0.1
    peer_submodules = ("peer",)

    def __init__(
        self,
        peer: nn.Module | None = None,
        *,
        beta: float = 1.0,
        crop_size: int | Sequence[int] | None = None,
        crop_fraction: float = 0.75,
        crop_multiple: int = 32,
        offset: int | Sequence[int] | None = None,
        shift_axes: Sequence[int] = (0, 1),
        cutmix_alpha: float = 1.0,
        hard_pseudo_labels: bool = True,
        pseudo_label_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
        quality_weighting: QualityWeighting | None = None,
        peer_seed: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if cutmix_alpha <= 0:
            raise ValueError(f"FDPL cutmix_alpha must be > 0, got {cutmix_alpha}.")
        if len(set(shift_axes)) != len(tuple(shift_axes)) or not shift_axes:
            raise ValueError(f"FDPL shift_axes must be distinct spatial axes, got {tuple(shift_axes)}.")
        self.peer = peer
        self.beta = float(beta)
        self.crop_size = crop_size
        self.crop_fraction = float(crop_fraction)
        self.crop_multiple = int(crop_multiple)
        self.offset = offset
        self.shift_axes = tuple(int(a) for a in shift_axes)
        self.cutmix_alpha = float(cutmix_alpha)
        self.hard_pseudo_labels = bool(hard_pseudo_labels)
        self.pseudo_label_loss = pseudo_label_loss
        self.quality_weighting = quality_weighting
        self.peer_seed = int(peer_seed)
        self._peer_initialised = False
        self.set_random_state(seed)

    # ------------------------------------------------------------------ checkpoint state
    def get_extra_state(self) -> dict[str, Any]:
        """The crop/CutMix random stream (``self.R``), saved with the method so a resumed run continues it.

        Stored as tensors and plain numbers: loadable by ``torch.load(weights_only=True)``.
        """
        name, keys, position, has_gauss, cached_gaussian = self.R.get_state()
        return {
            "rng_name": str(name),
            "rng_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "rng_position": int(position),
            "rng_has_gauss": int(has_gauss),
            "rng_cached_gaussian": float(cached_gaussian),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore ``self.R`` from :meth:`get_extra_state`."""
        keys = np.asarray(torch.as_tensor(state["rng_keys"]).numpy(), dtype=np.uint32)
        self.R.set_state(
            (
                str(state["rng_name"]),
                keys,
                int(state["rng_position"]),
                int(state["rng_has_gauss"]),
                float(state["rng_cached_gaussian"]),
            )
        )

    # ------------------------------------------------------------------ networks
    def setup(self, student: nn.Module) -> None:
        """Create subnet B (once): the peer architecture (or the student's) initialised from ``peer_seed``."""
        if not self._peer_initialised:
            self.peer = independent_peer(student if self.peer is None else self.peer, self.peer_seed)
            self._peer_initialised = True
        first_parameter = next(student.parameters(), None)
        if first_parameter is not None:  # the peer lives where the student does
            self.peer.to(first_parameter.device)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Subnet B's parameters (the engine's optimizer holds the student's)."""
        if self.peer is None:
            raise RuntimeError("FDPL.setup(student) must be called before trainable_parameters().")
        return iter(self.peer.parameters())

    # ------------------------------------------------------------------ geometry
    def resolve_crop_size(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Crop side per spatial axis for images of ``spatial_shape``."""
        if self.crop_size is None:
            return default_crop_size(spatial_shape, self.crop_fraction, self.crop_multiple)
        sizes = (
            (int(self.crop_size),) * len(spatial_shape)
            if np.isscalar(self.crop_size)
            else tuple(int(c) for c in self.crop_size)  # type: ignore[union-attr]
        )
        if len(sizes) != len(spatial_shape) or any(c > s or c < 1 for c, s in zip(sizes, spatial_shape)):
            raise ValueError(
                f"FDPL crop_size {self.crop_size} does not fit images of spatial shape {tuple(spatial_shape)}."
            )
        return sizes

    def resolve_offset(self, crop_size: Sequence[int]) -> tuple[int, ...]:
        """Shift per shift axis: ``offset`` or a quarter of the crop side."""
        if self.offset is None:
            return tuple(max(1, int(crop_size[a]) // 4) for a in self.shift_axes)
        if np.isscalar(self.offset):
            return (int(self.offset),) * len(self.shift_axes)  # type: ignore[arg-type]
        return tuple(int(o) for o in self.offset)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ pseudo-labels
    def _to_target(self, probability: Tensor) -> Tensor:
        return (probability > 0.5).to(probability.dtype) if self.hard_pseudo_labels else probability

    @torch.no_grad()
    def pseudo_labels(
        self,
        network: nn.Module,
        fixed_probability: Tensor,
        shifted_crops: Tensor,
        fixed_starts: np.ndarray,
        shifted_starts: np.ndarray,
        valid: np.ndarray,
        crop_size: Sequence[int],
    ) -> tuple[Tensor, Tensor]:
        """Fixed and dynamic pseudo-labels of ``network``.

        Args:
            fixed_probability: ``(B, 1, *crop)`` the network's probabilities on the fixed crops.
            shifted_crops: ``(K * B, C, *crop)`` shifted crops, crop-major (all samples of crop 0 first).

        Returns:
            ``(fixed, dynamic)`` targets ``(B, 1, *crop)`` (hard ``{0, 1}`` unless ``hard_pseudo_labels=False``).
        """
        batch = fixed_probability.shape[0]
        shifted_probability = torch.sigmoid(network(shifted_crops).float())
        shifted_probability = shifted_probability.reshape(-1, batch, *shifted_probability.shape[1:]).transpose(0, 1)
        temporary, coverage = temporary_pseudo_label(
            shifted_probability, fixed_starts, shifted_starts, valid, crop_size
        )
        dynamic = combine_pseudo_labels(fixed_probability, temporary, coverage)
        return self._to_target(fixed_probability), self._to_target(dynamic)

    def cutmix(self, batch_size: int) -> SegmentationCutMix:
        """A MONAI-randomised CutMix drawing its boxes and partners from ``self.R``."""
        mixer = SegmentationCutMix(batch_size=batch_size, alpha=self.cutmix_alpha)
        mixer.set_random_state(state=self.R)
        return mixer

    # ------------------------------------------------------------------ losses
    def _weighted(self, loss: Tensor, image: Tensor, target: Tensor) -> tuple[Tensor, Tensor | None]:
        """Batch reduction of a ``(B,)`` pseudo-label loss: plain mean, or quality-weighted in FDPL-QW."""
        if self.quality_weighting is None:
            return loss.mean(), None
        reduced, weights = self.quality_weighting(loss, image, target)
        return reduced, weights.detach()

    def unsupervised_loss(self, ctx: StepContext) -> MethodOutput:
        """``L_fix + beta * L_dyn`` in both directions; B's supervised loss as ``extra_sup_loss``."""
        if ctx.image_u is None:
            raise ValueError("FDPL needs an unlabeled batch (ctx.image_u is None).")
        if self.peer is None:
            self.setup(ctx.student)
        peer = self.peer_module("peer")  # the DDP wrapper in multi-process training
        loss_fn = self.pseudo_label_loss or ctx.sup_loss_fn
        image_u = ctx.image_u
        batch, spatial = image_u.shape[0], tuple(image_u.shape[2:])
        if max(self.shift_axes) >= len(spatial):
            raise ValueError(f"FDPL shift_axes {self.shift_axes} exceed the {len(spatial)} spatial axes of the images.")
        crop_size = self.resolve_crop_size(spatial)
        fixed_starts = sample_crop_starts(spatial, crop_size, batch, self.R)
        shifted_starts, valid = shifted_crop_starts(
            fixed_starts, crop_size, spatial, self.resolve_offset(crop_size), self.shift_axes
        )
        fixed_crops = crop_batch(image_u, fixed_starts, crop_size)
        shifted_crops = torch.cat(
            [crop_batch(image_u, shifted_starts[:, k], crop_size) for k in range(shifted_starts.shape[1])], dim=0
        )

        # subnet A on the original fixed crop: its prediction learns from B and gives B's targets
        logits_a = ctx.student(fixed_crops)
        probability_a = torch.sigmoid(logits_a.detach().float())
        fixed_a, dynamic_a = self.pseudo_labels(
            ctx.student, probability_a, shifted_crops, fixed_starts, shifted_starts, valid, crop_size
        )
        with torch.no_grad():
            probability_b = torch.sigmoid(peer(fixed_crops).float())
        fixed_b, dynamic_b = self.pseudo_labels(
            peer, probability_b, shifted_crops, fixed_starts, shifted_starts, valid, crop_size
        )

        # A learns from B: both saw the original crop
        loss_fix_a, weights_fix_a = self._weighted(loss_fn(logits_a, fixed_b), fixed_crops, fixed_b)
        loss_dyn_a, weights_dyn_a = self._weighted(loss_fn(logits_a, dynamic_b), fixed_crops, dynamic_b)

        # B learns from A on CutMix crops; the same boxes mix A's pseudo-labels
        mixer = self.cutmix(batch)
        mixer.randomize(fixed_crops)
        mixed_crops = mixer.apply(fixed_crops)
        mixed_fixed_a, mixed_dynamic_a = mixer.apply(fixed_a), mixer.apply(dynamic_a)
        logits_b = peer(mixed_crops)
        loss_fix_b, weights_fix_b = self._weighted(loss_fn(logits_b, mixed_fixed_a), mixed_crops, mixed_fixed_a)
        loss_dyn_b, weights_dyn_b = self._weighted(loss_fn(logits_b, mixed_dynamic_a), mixed_crops, mixed_dynamic_a)

        unsup = (loss_fix_a + loss_fix_b) + self.beta * (loss_dyn_a + loss_dyn_b)
        peer_sup = ctx.sup_loss_fn(peer(ctx.image_l), ctx.label_l).mean()

        weights = None
        if self.quality_weighting is not None:
            # order: A<-B fixed, A<-B dynamic, B<-A fixed, B<-A dynamic, each (B_u,)
            parts = [weights_fix_a, weights_dyn_a, weights_fix_b, weights_dyn_b]
            weights = torch.cat(parts).detach()  # type: ignore[arg-type]
        coverage = float(valid.any(axis=1).mean())
        logs = {
            "fdpl_loss_fix": (loss_fix_a + loss_fix_b).detach(),
            "fdpl_loss_dyn": (loss_dyn_a + loss_dyn_b).detach(),
            "fdpl_peer_sup_loss": peer_sup.detach(),
            "fdpl_dynamic_changed": (fixed_a != dynamic_a).float().mean().detach(),
            "fdpl_samples_with_dynamic_crops": coverage,
        }
        return MethodOutput(unsup_loss=unsup, extra_sup_loss=peer_sup, quality_weights=weights, logs=logs)


class FDPLQW(FDPL):
    """FDPL-QW: FDPL whose four pseudo-label losses are weighted per sample by the quality predictor.

    Args:
        quality_weighting: the shared :class:`QualityWeighting` (frozen quality predictor); required.
        **kwargs: as :class:`FDPL`.
    """

    name = "fdpl-qw"

    def __init__(self, peer: nn.Module | None = None, *, quality_weighting: QualityWeighting, **kwargs) -> None:
        if not isinstance(quality_weighting, QualityWeighting):
            raise TypeError(
                f"FDPL-QW needs a QualityWeighting component, got {type(quality_weighting).__name__}; "
                "set `quality_weighting` in configs/method/fdpl_qw.json."
            )
        super().__init__(peer, quality_weighting=quality_weighting, **kwargs)
