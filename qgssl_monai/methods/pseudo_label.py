"""Pseudo-label methods: PL-T (pixel-confidence threshold), PL-C (FixMatch-style sample confidence), PL-QW.

All produce hard pseudo-labels ``y = 1[p > 0.5]`` from ``p = sigmoid(logits)`` of the *source* network
(``"student"``: the student's own prediction on the same forward, detached, i.e. the model itself under
no-grad; ``"teacher"``: an EMA teacher updated by ``EMATeacherHandler``) and train the student on them
with the per-sample Dice+BCE loss. A ``QualityWeighting`` turns any of them into its ``-QW`` variant:
the per-sample loss is weighted by ``g(x_u, y)``.

Defaults and sources:

* PL-T: threshold 0.9 on ``max(p, 1 - p)`` per pixel (issue spec), source student, ``lambda`` 1.0 (our choice).
* PL-C: FixMatch (Sohn et al. 2020): weak view = the loader's (already weakly augmented) image, strong
  view = brightness +-0.2, contrast x[0.8, 1.2], Gaussian noise sigma 0.1, one cutout box of a quarter of
  each side (our choice of magnitudes); per-sample weight = mean pixel confidence ``mean(max(p, 1 - p))``;
  ``lambda_u`` 1.0 (FixMatch).
* PL-QW: EMA-teacher hard pseudo-labels (threshold 0.5, no confidence mask), ``lambda`` 0.25 (paper).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from qgssl_monai.methods.base import EMATeacherMixin, MethodOutput, SSLMethod, StepContext
from qgssl_monai.methods.quality_weighting import QualityWeighting

__all__ = [
    "PseudoLabel",
    "PseudoLabelThreshold",
    "PseudoLabelConfidence",
    "QualityWeightedPseudoLabel",
    "hard_label",
    "pixel_confidence",
    "strong_augment",
    "random_box_mask",
]

SOURCES = ("student", "teacher")


def hard_label(probs: Tensor) -> Tensor:
    """``(B, 1, *S)`` probabilities -> float ``{0, 1}`` mask ``1[p > 0.5]`` (project convention)."""
    return (probs > 0.5).to(probs.dtype)


def pixel_confidence(probs: Tensor) -> Tensor:
    """Per-pixel confidence ``max(p, 1 - p)`` in ``[0.5, 1]``."""
    return torch.maximum(probs, 1.0 - probs)


def random_box_mask(shape: torch.Size | tuple[int, ...], fraction: float, device: torch.device) -> Tensor:
    """``(B, 1, *S)`` float mask, 1 inside one random box per sample of side ``round(fraction * size)`` per axis.

    Positions are drawn from torch's global generator (seeded by ``monai.utils.set_determinism``).
    """
    batch, spatial = shape[0], shape[2:]
    box = torch.ones((batch, 1) + tuple(spatial), device=device)
    for axis, size in enumerate(spatial):
        side = min(max(int(round(fraction * size)), 1), size)
        start = torch.randint(0, size - side + 1, (batch, 1), device=device)
        coords = torch.arange(size, device=device).unsqueeze(0)
        inside = ((coords >= start) & (coords < start + side)).float()  # (B, size)
        view = [batch, 1] + [1] * len(spatial)
        view[2 + axis] = size
        box = box * inside.reshape(view)
    return box


def strong_augment(
    image: Tensor, brightness: float = 0.2, contrast: float = 0.2, noise_std: float = 0.1, cutout_fraction: float = 0.25
) -> Tensor:
    """Strong view of a ``(B, C, *S)`` batch in ``[0, 1]``: per-sample contrast/brightness jitter, Gaussian
    noise, one zeroed cutout box; result clamped to ``[0, 1]``. Draws from torch's global generator."""
    batch = image.shape[0]
    view = (batch,) + (1,) * (image.ndim - 1)
    mean = image.mean(dim=tuple(range(1, image.ndim)), keepdim=True)
    contrast_factor = 1.0 + (torch.rand(view, device=image.device) * 2 - 1) * contrast
    brightness_shift = (torch.rand(view, device=image.device) * 2 - 1) * brightness
    out = (image - mean) * contrast_factor + mean + brightness_shift
    if noise_std > 0:
        out = out + torch.randn_like(out) * noise_std
    if cutout_fraction > 0:
        out = out * (1.0 - random_box_mask(image.shape, cutout_fraction, image.device))
    return out.clamp(0.0, 1.0)


class PseudoLabel(EMATeacherMixin, SSLMethod):
    """Hard pseudo-labels with an optional pixel-confidence mask, optionally quality weighted.

    ``unsup_loss = reduce_j( L(f(x_j), y_j; mask_j) )`` with ``y = 1[p_src > 0.5]``,
    ``mask = 1[max(p_src, 1 - p_src) >= confidence_threshold]`` (no mask when the threshold is ``None``)
    and ``reduce`` the batch mean, or ``QualityWeighting`` with ``w_j = g(x_j, y_j)``.

    Args:
        source: ``"student"`` (own detached prediction) or ``"teacher"`` (EMA teacher, needs ``EMATeacherHandler``).
        confidence_threshold: pixel confidence threshold in ``[0.5, 1]`` or ``None``.
        quality_weighting: makes this the ``-QW`` variant.
        loss_function: per-sample ``(logits, target, mask=None) -> (B,)``; default the engine's supervised loss.
    """

    name = "pl"
    shares_student_forward_u = True

    def __init__(
        self,
        source: str = "student",
        confidence_threshold: float | None = None,
        quality_weighting: QualityWeighting | None = None,
        loss_function: Callable[..., Tensor] | None = None,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"{type(self).__name__} source must be one of {SOURCES}, got {source!r}.")
        if confidence_threshold is not None and not 0.5 <= confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0.5, 1] or None, got {confidence_threshold}.")
        self.source = source
        self.confidence_threshold = confidence_threshold
        self.quality_weighting = quality_weighting
        self.loss_function = loss_function
        self.teacher = None

    def setup(self, student: torch.nn.Module) -> None:
        if self.source == "teacher":
            self.setup_teacher(student)

    def loss_fn(self, ctx: StepContext) -> Callable[..., Tensor]:
        return ctx.sup_loss_fn if self.loss_function is None else self.loss_function

    def source_probabilities(self, ctx: StepContext, student_logits: Tensor) -> Tensor:
        """Detached float32 ``(B_u, 1, *S)`` probabilities the pseudo-labels are made from."""
        if self.source == "teacher":
            return torch.sigmoid(self.teacher_logits(ctx.image_u).float())
        return torch.sigmoid(student_logits.detach().float())

    def confidence_mask(self, probs: Tensor) -> Tensor | None:
        if self.confidence_threshold is None:
            return None
        return (pixel_confidence(probs) >= self.confidence_threshold).to(probs.dtype)

    def reduce(
        self, per_sample: Tensor, image: Tensor, pseudo: Tensor, logs: dict
    ) -> tuple[Tensor, Tensor | None]:
        """Batch mean, or the quality-weighted reduction with ``w = g(image, pseudo)``."""
        if self.quality_weighting is None:
            return per_sample.mean(), None
        loss, weights = self.quality_weighting(per_sample, image, pseudo)
        return loss, weights

    def unsupervised_loss(self, ctx: StepContext) -> MethodOutput:
        logits_u = ctx.student_logits_u()
        probs = self.source_probabilities(ctx, logits_u)
        pseudo = hard_label(probs)
        mask = self.confidence_mask(probs)
        loss_fn = self.loss_fn(ctx)
        per_sample = loss_fn(logits_u, pseudo, mask) if mask is not None else loss_fn(logits_u, pseudo)
        logs: dict = {}
        if mask is not None:
            logs["confident_pixel_fraction"] = mask.mean()
        loss, weights = self.reduce(per_sample, ctx.image_u, pseudo, logs)
        return MethodOutput(unsup_loss=loss, quality_weights=weights, logs=logs)


class PseudoLabelThreshold(PseudoLabel):
    """PL-T: pixel-confidence-thresholded hard pseudo-labels (threshold 0.9, student source)."""

    name = "pl-t"

    def __init__(
        self,
        source: str = "student",
        confidence_threshold: float | None = 0.9,
        quality_weighting: QualityWeighting | None = None,
        loss_function: Callable[..., Tensor] | None = None,
    ) -> None:
        super().__init__(source, confidence_threshold, quality_weighting, loss_function)


class QualityWeightedPseudoLabel(PseudoLabel):
    """PL-QW (paper): EMA-teacher hard pseudo-labels weighted per sample by ``g``; ``lambda`` 0.25."""

    name = "pl-qw"
    default_unsup_weight = 0.25

    def __init__(
        self,
        quality_weighting: QualityWeighting,
        source: str = "teacher",
        confidence_threshold: float | None = None,
        loss_function: Callable[..., Tensor] | None = None,
    ) -> None:
        if quality_weighting is None:
            raise ValueError("PL-QW needs a QualityWeighting (quality_weighting=...).")
        super().__init__(source, confidence_threshold, quality_weighting, loss_function)


class PseudoLabelConfidence(PseudoLabel):
    """PL-C: FixMatch-style sample-confidence-weighted pseudo-labels.

    One forward of the student on ``cat([x_weak, x_strong])`` (FixMatch's joint batch);
    ``y = 1[p_weak > 0.5]`` (detached; from the teacher when ``source="teacher"``),
    ``c_j = mean_pixels(max(p_weak, 1 - p_weak))`` and
    ``unsup_loss = reduce_j(c_j * L(f(x_strong_j), y_j))`` (``reduce`` as in :class:`PseudoLabel`; with
    quality weighting both weights multiply).
    """

    name = "pl-c"
    shares_student_forward_u = False  # its student forward is on [weak, strong] views

    def __init__(
        self,
        source: str = "student",
        brightness: float = 0.2,
        contrast: float = 0.2,
        noise_std: float = 0.1,
        cutout_fraction: float = 0.25,
        quality_weighting: QualityWeighting | None = None,
        loss_function: Callable[..., Tensor] | None = None,
    ) -> None:
        super().__init__(source, None, quality_weighting, loss_function)
        self.brightness = brightness
        self.contrast = contrast
        self.noise_std = noise_std
        self.cutout_fraction = cutout_fraction

    def augment(self, image: Tensor) -> Tensor:
        return strong_augment(image, self.brightness, self.contrast, self.noise_std, self.cutout_fraction)

    def unsupervised_loss(self, ctx: StepContext) -> MethodOutput:
        image_u = ctx.image_u
        strong = self.augment(image_u)
        logits_weak, logits_strong = ctx.student(torch.cat([image_u, strong], dim=0)).chunk(2, dim=0)
        probs = self.source_probabilities(ctx, logits_weak)
        pseudo = hard_label(probs)
        sample_confidence = pixel_confidence(probs).flatten(1).mean(dim=1)
        per_sample = sample_confidence * self.loss_fn(ctx)(logits_strong, pseudo)
        logs = {"sample_confidence_mean": sample_confidence.mean()}
        loss, weights = self.reduce(per_sample, image_u, pseudo, logs)
        return MethodOutput(unsup_loss=loss, quality_weights=weights, logs=logs)
