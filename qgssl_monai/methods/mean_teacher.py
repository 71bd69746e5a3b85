"""Mean teacher (MT, Tarvainen & Valpola 2017) and uncertainty-aware mean teacher (UA-MT, Yu et al. 2019).

Both need ``EMATeacherHandler`` (decay 0.5 -> 0.999) to update ``self.teacher``.

* MT: ``unsup_loss = reduce_j mean_pixels (sigmoid(f(x_j + n)) - sigmoid(f_ema(x_j + n')))^2`` with input noise
  ``n = clamp(N(0, 0.1^2), -0.2, 0.2)`` (Yu et al.'s code), ``lambda`` 0.1 (Yu et al. 2019).
* UA-MT: ``T = 8`` stochastic teacher passes (input noise; dropout active because the teacher runs in train mode
  for them), predictive entropy of the mean probability ``H = -p ln p - (1-p) ln(1-p)`` (``<= ln 2``), pixels
  with ``H < (0.75 + 0.25 * exp(-5 (1 - t)^2)) * ln 2`` count (``t`` = fraction of training done), the consistency
  target is a separate noisy teacher pass (as in Yu et al.'s code); per-sample masked MSE (0 when no pixel is
  kept). ``lambda`` 0.1 (Yu et al.).
* ``-QW``: per-sample weights ``g(x_j, 1[p_teacher > 0.5])`` on the consistency loss (our choice: the quality of
  the teacher's hard prediction, the target of the consistency).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qgssl_monai.losses import per_sample_mse
from qgssl_monai.methods.base import EMATeacherMixin, MethodOutput, SSLMethod, StepContext, training_progress
from qgssl_monai.methods.pseudo_label import hard_label
from qgssl_monai.methods.quality_weighting import QualityWeighting

__all__ = ["MeanTeacher", "UncertaintyAwareMeanTeacher", "clipped_gaussian_noise", "binary_entropy"]


def clipped_gaussian_noise(image: Tensor, std: float, clip: float) -> Tensor:
    """``clamp(N(0, std^2), -clip, clip)`` noise shaped like ``image`` (global torch generator)."""
    if std <= 0:
        return torch.zeros_like(image)
    return (torch.randn_like(image) * std).clamp(-clip, clip)


def binary_entropy(probs: Tensor, eps: float = 1e-6) -> Tensor:
    """Element-wise ``-p ln p - (1 - p) ln(1 - p)`` in ``[0, ln 2]``."""
    p = probs.clamp(eps, 1.0 - eps)
    return -(p * torch.log(p) + (1.0 - p) * torch.log(1.0 - p))


class MeanTeacher(EMATeacherMixin, SSLMethod):
    """MT / MT-QW: MSE consistency between student and EMA-teacher probabilities under input noise.

    Args:
        noise_std: std of the Gaussian input noise (0.1).
        noise_clip: noise clipping bound (0.2).
        quality_weighting: makes this MT-QW.
    """

    name = "mt"
    default_unsup_weight = 0.1

    def __init__(
        self, noise_std: float = 0.1, noise_clip: float = 0.2, quality_weighting: QualityWeighting | None = None
    ) -> None:
        super().__init__()
        self.noise_std = float(noise_std)
        self.noise_clip = float(noise_clip)
        self.quality_weighting = quality_weighting
        self.teacher = None

    def setup(self, student: torch.nn.Module) -> None:
        self.setup_teacher(student)

    def noisy(self, image: Tensor) -> Tensor:
        return image + clipped_gaussian_noise(image, self.noise_std, self.noise_clip)

    def reduce(self, per_sample: Tensor, image: Tensor, teacher_probs: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.quality_weighting is None:
            return per_sample.mean(), None
        return self.quality_weighting(per_sample, image, hard_label(teacher_probs))

    def unsupervised_loss(self, ctx: StepContext) -> MethodOutput:
        image_u = ctx.image_u
        student_probs = torch.sigmoid(ctx.student(self.noisy(image_u)).float())
        teacher_probs = torch.sigmoid(self.teacher_logits(self.noisy(image_u)).float())
        per_sample = per_sample_mse(student_probs, teacher_probs)
        loss, weights = self.reduce(per_sample, image_u, teacher_probs)
        return MethodOutput(unsup_loss=loss, quality_weights=weights)


class UncertaintyAwareMeanTeacher(MeanTeacher):
    """UA-MT / UA-MT-QW (see module docstring).

    Args:
        num_passes: ``T`` stochastic teacher passes (8).
        threshold_start: entropy threshold at the start, as a fraction of ``ln 2`` (0.75).
        threshold_end: fraction of ``ln 2`` at the end of training (1.0).
        mc_dropout: run the teacher in train mode for the ``T`` passes (dropout active; BatchNorm uses batch
            statistics; its running statistics are overwritten by the next EMA update anyway).
    """

    name = "ua-mt"
    default_unsup_weight = 0.1

    def __init__(
        self,
        noise_std: float = 0.1,
        noise_clip: float = 0.2,
        num_passes: int = 8,
        threshold_start: float = 0.75,
        threshold_end: float = 1.0,
        mc_dropout: bool = True,
        quality_weighting: QualityWeighting | None = None,
    ) -> None:
        super().__init__(noise_std, noise_clip, quality_weighting)
        if num_passes < 1:
            raise ValueError(f"num_passes must be >= 1, got {num_passes}.")
        self.num_passes = int(num_passes)
        self.threshold_start = float(threshold_start)
        self.threshold_end = float(threshold_end)
        self.mc_dropout = mc_dropout

    def entropy_threshold(self, progress: float) -> float:
        """``(start + (end - start) * exp(-5 (1 - progress)^2)) * ln 2`` for ``progress`` in ``[0, 1]``."""
        ramp = math.exp(-5.0 * (1.0 - min(max(progress, 0.0), 1.0)) ** 2)
        return (self.threshold_start + (self.threshold_end - self.threshold_start) * ramp) * math.log(2.0)

    @torch.no_grad()
    def teacher_uncertainty(self, image: Tensor) -> Tensor:
        """``(B, 1, *S)`` entropy of the mean of ``T`` noisy (and dropout) teacher probabilities."""
        repeated = image.repeat((self.num_passes,) + (1,) * (image.ndim - 1))  # one batched forward of T*B
        if self.mc_dropout:
            self.teacher.train()
        try:
            probs = torch.sigmoid(self.teacher(self.noisy(repeated)).float())
        finally:
            self.teacher.eval()
        mean_probs = probs.reshape((self.num_passes,) + tuple(image.shape[:1]) + tuple(probs.shape[1:])).mean(dim=0)
        return binary_entropy(mean_probs)

    def unsupervised_loss(self, ctx: StepContext) -> MethodOutput:
        image_u = ctx.image_u
        student_probs = torch.sigmoid(ctx.student(self.noisy(image_u)).float())
        teacher_probs = torch.sigmoid(self.teacher_logits(self.noisy(image_u)).float())
        uncertainty = self.teacher_uncertainty(image_u)
        threshold = self.entropy_threshold(training_progress(ctx.engine))
        mask = (uncertainty < threshold).float()
        per_sample = per_sample_mse(student_probs, teacher_probs, mask)
        loss, weights = self.reduce(per_sample, image_u, teacher_probs)
        logs = {"certain_pixel_fraction": mask.mean(), "entropy_threshold": threshold}
        return MethodOutput(unsup_loss=loss, quality_weights=weights, logs=logs)
