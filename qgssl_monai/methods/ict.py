"""ICT: interpolation consistency training (Verma et al. 2019), with an optional quality weighting.

With ``x2 = x[perm]`` (a random permutation of the unlabeled batch) and one ``lam ~ Beta(alpha, alpha)`` per
iteration (``alpha`` 0.2, Verma et al.; ``lambda`` 0.1, SSL4MIS defaults), the student must predict on the
mixed image what the EMA teacher predicts on each part, mixed:

    ``unsup_loss = reduce_j mean_pixels (sigmoid(f(lam x_j + (1-lam) x2_j)) - (lam p_t(x_j) + (1-lam) p_t(x2_j)))^2``

``-QW`` (our choice): the mixed target's weight comes from the mixed qualities
``q_mix = lam q_j + (1 - lam) q_perm(j)`` with ``q = g(x, 1[p_t > 0.5])``, then ``QualityWeighting``'s weight form.
Needs ``EMATeacherHandler``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qgssl_monai.losses import per_sample_mse
from qgssl_monai.methods.base import EMATeacherMixin, MethodOutput, SSLMethod, StepContext
from qgssl_monai.methods.pseudo_label import hard_label
from qgssl_monai.methods.quality_weighting import QualityWeighting

__all__ = ["InterpolationConsistency"]


class InterpolationConsistency(EMATeacherMixin, SSLMethod):
    """ICT / ICT-QW.

    Args:
        alpha: Beta distribution parameter of the mixing coefficient (0.2).
        quality_weighting: makes this ICT-QW.
    """

    name = "ict"
    default_unsup_weight = 0.1

    def __init__(self, alpha: float = 0.2, quality_weighting: QualityWeighting | None = None) -> None:
        super().__init__()
        if alpha <= 0:
            raise ValueError(f"ICT alpha must be > 0, got {alpha}.")
        self.alpha = float(alpha)
        self.quality_weighting = quality_weighting
        self.teacher = None

    def setup(self, student: torch.nn.Module) -> None:
        self.setup_teacher(student)

    def draw_mix_coefficient(self) -> float:
        """``lam ~ Beta(alpha, alpha)`` from torch's global generator (one per iteration)."""
        concentration = torch.tensor(self.alpha)
        return float(torch.distributions.Beta(concentration, concentration).sample())

    def draw_permutation(self, batch_size: int, device: torch.device) -> Tensor:
        return torch.randperm(batch_size, device=device)

    def unsupervised_loss(self, ctx: StepContext) -> MethodOutput:
        image_u = ctx.image_u
        lam = self.draw_mix_coefficient()
        perm = self.draw_permutation(image_u.shape[0], image_u.device)
        teacher_probs = torch.sigmoid(self.teacher_logits(image_u).float())
        mixed_target = lam * teacher_probs + (1.0 - lam) * teacher_probs[perm]
        mixed_image = lam * image_u + (1.0 - lam) * image_u[perm]
        student_probs = torch.sigmoid(ctx.student(mixed_image).float())
        per_sample = per_sample_mse(student_probs, mixed_target)
        weights = None
        if self.quality_weighting is None:
            loss = per_sample.mean()
        else:
            quality = self.quality_weighting.quality(image_u, hard_label(teacher_probs))
            weights = self.quality_weighting.weights_from_quality(lam * quality + (1.0 - lam) * quality[perm])
            loss = self.quality_weighting.reduce(per_sample, weights)
        return MethodOutput(unsup_loss=loss, quality_weights=weights, logs={"mix_coefficient": lam})
