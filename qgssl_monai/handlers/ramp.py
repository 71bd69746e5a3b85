"""``RampUpHandler``: schedules the unsupervised weight ``lambda(t)`` of ``SemiSupervisedTrainer``.

``lambda(t) = max_value * f(t)`` with ``t`` the training time in epochs (``epoch - 1`` for per-epoch
granularity, ``(iteration - 1) / epoch_length`` for per-iteration granularity), warm-up ``W`` and ramp
length ``R`` in epochs (or fractions of ``max_epochs`` with ``as_fraction=True``), ``p = clip((t - W) / R, 0, 1)``
(``p = 1`` when ``R = 0``):

* ``"linear"`` (authors' code: constant during warm-up, then linear):
  ``f = start_factor`` for ``t < W``, else ``start_factor + (1 - start_factor) * p``;
* ``"sigmoid"`` (Laine & Aila 2017; Yu et al. 2019): ``f = start_factor`` for ``t < W``, else
  ``exp(-5 (1 - p)^2)``.

The value is written to ``engine.state.unsup_weight`` when the run starts and at every iteration start.
"""

from __future__ import annotations

import math
from typing import Any

from ignite.engine import Engine, Events

__all__ = ["RampUpHandler", "ramp_factor"]

SCHEDULES = ("linear", "sigmoid")


def ramp_factor(schedule: str, t: float, warmup: float, rampup: float, start_factor: float = 0.0) -> float:
    """``f(t)`` in ``[0, 1]`` for the schedules above (``t``, ``warmup``, ``rampup`` in the same unit)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"ramp schedule must be one of {SCHEDULES}, got {schedule!r}.")
    if t < warmup:
        return float(start_factor)
    progress = 1.0 if rampup <= 0 else min(max((t - warmup) / rampup, 0.0), 1.0)
    if schedule == "linear":
        return float(start_factor + (1.0 - start_factor) * progress)
    return float(math.exp(-5.0 * (1.0 - progress) ** 2))


class RampUpHandler:
    """Sets ``engine.state.unsup_weight`` from a ramp-up schedule.

    Args:
        schedule: ``"linear"`` or ``"sigmoid"`` (see module docstring).
        warmup_epochs: ``W``, epochs at ``start_factor`` before the ramp.
        rampup_epochs: ``R``, length of the ramp in epochs.
        start_factor: ``f`` during warm-up (0: no unsupervised loss) and start of the linear ramp.
        as_fraction: interpret ``warmup_epochs``/``rampup_epochs`` as fractions of ``max_epochs``.
        per_iteration: update with fractional epochs every iteration instead of once per epoch.
        max_value: ``lambda_max``; default ``engine.unsup_weight_max`` (the trainer's ``unsup_weight``).
    """

    def __init__(
        self,
        schedule: str = "linear",
        warmup_epochs: float = 0.0,
        rampup_epochs: float = 0.0,
        start_factor: float = 0.0,
        as_fraction: bool = False,
        per_iteration: bool = False,
        max_value: float | None = None,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"RampUpHandler schedule must be one of {SCHEDULES}, got {schedule!r}.")
        if warmup_epochs < 0 or rampup_epochs < 0:
            raise ValueError(f"warmup_epochs ({warmup_epochs}) and rampup_epochs ({rampup_epochs}) must be >= 0.")
        if not 0.0 <= start_factor <= 1.0:
            raise ValueError(f"start_factor must be in [0, 1], got {start_factor}.")
        self.schedule = schedule
        self.warmup_epochs = float(warmup_epochs)
        self.rampup_epochs = float(rampup_epochs)
        self.start_factor = float(start_factor)
        self.as_fraction = as_fraction
        self.per_iteration = per_iteration
        self.max_value = max_value

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def epochs_elapsed(self, engine: Any) -> float:
        """Training time ``t`` in epochs at the current iteration."""
        state = engine.state
        if self.per_iteration:
            return max(int(state.iteration) - 1, 0) / max(int(state.epoch_length or 1), 1)
        return float(max(int(state.epoch) - 1, 0))

    def value(self, engine: Any) -> float:
        """``lambda(t)`` for the engine's current state."""
        scale = float(engine.state.max_epochs) if self.as_fraction else 1.0
        max_value = getattr(engine, "unsup_weight_max", 1.0) if self.max_value is None else self.max_value
        factor = ramp_factor(
            self.schedule,
            self.epochs_elapsed(engine),
            self.warmup_epochs * scale,
            self.rampup_epochs * scale,
            self.start_factor,
        )
        return float(max_value) * factor

    def __call__(self, engine: Engine) -> None:
        engine.state.unsup_weight = self.value(engine)
