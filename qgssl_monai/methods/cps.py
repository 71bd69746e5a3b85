"""CPS: cross pseudo supervision (Chen et al. 2021), with an optional per-network quality weighting.

Two segmenters: the engine's student ``f_a`` and a peer ``f_b`` owned by this method: the architecture of
``network_factory()`` when given, else the student's, always initialised independently from ``peer_seed``. Each is supervised by the other's hard pseudo-label
``y = 1[sigmoid(logits) > 0.5]`` (equivalently ``logits > 0``, detached):

    ``unsup_loss = reduce(L(f_a(x), y_b)) + reduce(L(f_b(x), y_a))``,  ``extra_sup_loss = mean_j L(f_b(x_l), y_l)``

CPS-QW: each pseudo-label is weighted by its own quality, i.e. the loss against ``y_b`` by ``g(x, y_b)`` and the
loss against ``y_a`` by ``g(x, y_a)``; ``quality_weights`` is ``cat([w(y_b), w(y_a)])`` (``2 B_u``).
``lambda`` 1.5 (Chen et al. 2021).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from qgssl_monai.methods.base import MethodOutput, SSLMethod, StepContext, independent_peer
from qgssl_monai.methods.quality_weighting import QualityWeighting

__all__ = ["CrossPseudoSupervision"]


class CrossPseudoSupervision(SSLMethod):
    """CPS / CPS-QW.

    Args:
        network_factory: builds the peer's architecture (same as the student's); default: the student's.
        peer_seed: seed of the peer's initialisation (independent of the student's and of the global RNG).
        quality_weighting: makes this CPS-QW.
        loss_function: per-sample loss; default the engine's supervised loss.
    """

    name = "cps"
    default_unsup_weight = 1.5
    peer_submodules = ("peer",)
    shares_student_forward_u = True

    def __init__(
        self,
        network_factory: Callable[[], nn.Module] | None = None,
        quality_weighting: QualityWeighting | None = None,
        loss_function: Callable[..., Tensor] | None = None,
        peer_seed: int = 1,
    ) -> None:
        super().__init__()
        self.network_factory = network_factory
        self.peer_seed = int(peer_seed)
        self.quality_weighting = quality_weighting
        self.loss_function = loss_function
        self.peer: nn.Module | None = None

    def setup(self, student: nn.Module) -> None:
        if self.peer is None:
            template = self.network_factory() if self.network_factory is not None else student
            peer = independent_peer(template, self.peer_seed)
            device = next(student.parameters()).device
            self.peer = peer.to(device)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        if self.peer is None:
            raise RuntimeError("CrossPseudoSupervision.setup(student) must be called before trainable_parameters().")
        return self.peer.parameters()

    def unsupervised_loss(self, ctx: StepContext) -> MethodOutput:
        loss_fn = ctx.sup_loss_fn if self.loss_function is None else self.loss_function
        image_u = ctx.image_u
        peer = self.peer_module("peer")  # the DDP wrapper in multi-process training
        logits_a = ctx.student_logits_u()
        logits_b = peer(image_u)
        pseudo_a = (logits_a.detach() > 0).to(torch.float32)
        pseudo_b = (logits_b.detach() > 0).to(torch.float32)
        per_a = loss_fn(logits_a, pseudo_b)  # student learns from the peer
        per_b = loss_fn(logits_b, pseudo_a)  # peer learns from the student
        weights = None
        if self.quality_weighting is None:
            unsup = per_a.mean() + per_b.mean()
        else:
            weight_b = self.quality_weighting.weights(image_u, pseudo_b)
            weight_a = self.quality_weighting.weights(image_u, pseudo_a)
            unsup = self.quality_weighting.reduce(per_a, weight_b) + self.quality_weighting.reduce(per_b, weight_a)
            weights = torch.cat([weight_b, weight_a])
        peer_sup = loss_fn(peer(ctx.image_l), ctx.label_l).mean()
        return MethodOutput(unsup_loss=unsup, extra_sup_loss=peer_sup, quality_weights=weights,
                            logs={"peer_sup_loss": peer_sup.detach()})
