"""Composition of SSL methods (e.g. QAR+QW = QAR + PL-QW), so combined variants are never copies.

``unsup_loss = sum_i w_i * unsup_loss_i`` (``w_i`` default: each component's ``default_unsup_weight``; the
composite's own ``lambda_max`` default is 1.0 so the engine ramp scales everything together),
``extra_sup_loss = sum_i extra_sup_loss_i``, quality weights concatenated, logs prefixed by component name.
Components share the student's forward on the unlabeled batch through ``StepContext.student_logits_u``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from qgssl_monai.methods.base import MethodOutput, SSLMethod, StepContext

__all__ = ["CompositeMethod"]


class CompositeMethod(SSLMethod):
    """Weighted sum of component methods.

    Args:
        components: ``{name: method}`` (or a sequence, named by each method's ``name``).
        weights: per-component weights (same order); default each component's ``default_unsup_weight``.
        name: registry name of the composition.
    """

    default_unsup_weight = 1.0

    def __init__(
        self,
        components: Mapping[str, SSLMethod] | Sequence[SSLMethod],
        weights: Sequence[float] | None = None,
        name: str = "composite",
    ) -> None:
        super().__init__()
        if not isinstance(components, Mapping):
            components = {method.name: method for method in components}
        if not components:
            raise ValueError("CompositeMethod needs at least one component.")
        self.components = nn.ModuleDict(dict(components))
        methods = list(self.components.values())
        weights = [m.default_unsup_weight for m in methods] if weights is None else list(weights)
        if len(weights) != len(methods):
            raise ValueError(f"{len(weights)} weights for {len(methods)} components.")
        self.component_weights = [float(w) for w in weights]
        self.name = name
        self.uses_unlabeled = any(m.uses_unlabeled for m in methods)
        self.shares_student_forward_u = any(m.shares_student_forward_u for m in methods)

    def setup(self, student: nn.Module) -> None:
        for method in self.components.values():
            method.setup(student)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        seen: set[int] = set()
        for method in self.components.values():
            for param in method.trainable_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield param

    def unsupervised_loss(self, ctx: StepContext) -> MethodOutput:
        unsup = 0.0
        extra = 0.0
        weights = []
        logs: dict = {}
        for (key, method), weight in zip(self.components.items(), self.component_weights):
            out = method.unsupervised_loss(ctx)
            unsup = unsup + weight * out.unsup_loss
            extra = extra + out.extra_sup_loss
            if out.quality_weights is not None:
                weights.append(out.quality_weights)
            logs[f"{key}_unsup_loss"] = torch.as_tensor(out.unsup_loss).detach()
            logs.update({f"{key}_{name}": value for name, value in out.logs.items()})
        return MethodOutput(
            unsup_loss=torch.as_tensor(unsup),
            extra_sup_loss=extra,
            quality_weights=torch.cat(weights) if weights else None,
            logs=logs,
        )
