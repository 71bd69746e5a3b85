"""QAR: quality-aware regularisation (paper) and QAR+QW, its composition with PL-QW.

``unsup_loss = 1 - mean_j g(cat([x_j, sigmoid(f(x_j))]))``: the *soft* student prediction is scored by the
frozen quality predictor and the gradient flows through ``g`` into ``f``; ``g`` never changes (its parameters
have ``requires_grad=False``, are not returned by :meth:`trainable_parameters`, and it is always in eval mode).
``lambda`` 0.01 (paper).
"""

from __future__ import annotations

import torch
from torch import nn

from qgssl_monai.methods.base import MethodOutput, SSLMethod, StepContext
from qgssl_monai.methods.quality_weighting import attach_quality_net

__all__ = ["QualityAwareRegularization"]


class QualityAwareRegularization(SSLMethod):
    """QAR.

    Args:
        quality_net: quality predictor ``g``: ``(B, C+1, *S) -> (B, 1)`` in ``[0, 1]``; frozen here and saved in
            checkpoints as a reference (path + SHA-256), not as weights.
    """

    name = "qar"
    default_unsup_weight = 0.01
    shares_student_forward_u = True
    eval_only_submodules = ("quality_net",)

    def __init__(self, quality_net: nn.Module) -> None:
        super().__init__()
        attach_quality_net(self, quality_net)

    def unsupervised_loss(self, ctx: StepContext) -> MethodOutput:
        image_u = ctx.image_u
        probs = torch.sigmoid(ctx.student_logits_u())
        quality = self.quality_net(torch.cat([image_u, probs.to(image_u.dtype)], dim=1)).reshape(-1).float()
        return MethodOutput(unsup_loss=1.0 - quality.mean(), logs={"qar_quality_mean": quality.mean().detach()})
