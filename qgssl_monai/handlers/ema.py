"""``EMATeacherHandler``: exponential-moving-average update of a method's teacher after every iteration.

After optimizer step ``s`` (``s = engine.state.iteration - 1``, i.e. 0 for the first update) every teacher
``theta_t`` owned by the method (any :class:`~qgssl_monai.methods.base.EMATeacherMixin` module in it) becomes

    ``theta_t <- decay(s) * theta_t + (1 - decay(s)) * theta_student``

with, unless a fixed ``decay`` is given, the linear ramp
``decay(s) = decay_start + (decay_end - decay_start) * min(s, ramp_steps) / ramp_steps``
(defaults 0.5 -> 0.999 over 1,000 steps; ``ramp_steps = 0`` means ``decay_end`` throughout). Buffers
(BatchNorm running statistics, ``num_batches_tracked``) are copied from the student.

ignite's ``EMAHandler`` is not used because it owns its EMA model (it cannot update the method's teacher
submodule, which checkpoints save with the method) and its ``momentum`` is the student's weight,
``1 - decay`` here.
"""

from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

from qgssl_monai.methods.base import EMATeacherMixin, unwrap_parallel

__all__ = ["EMATeacherHandler", "ema_update"]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """In place ``teacher = decay * teacher + (1 - decay) * student`` (parameters); buffers copied.

    Raises:
        ValueError: when the two networks do not have matching parameters/buffers.
    """
    teacher_params = list(teacher.parameters())
    student_params = list(student.parameters())
    teacher_buffers = list(teacher.buffers())
    student_buffers = list(student.buffers())
    if len(teacher_params) != len(student_params) or len(teacher_buffers) != len(student_buffers) or any(
        t.shape != s.shape for t, s in zip(teacher_params + teacher_buffers, student_params + student_buffers)
    ):
        raise ValueError("EMA teacher and student differ in architecture (parameter/buffer lists or shapes).")
    if teacher_params:
        # lerp(t, s, w) = t + w (s - t) = (1 - w) t + w s with w = 1 - decay
        torch._foreach_lerp_(teacher_params, [p.detach() for p in student_params], 1.0 - float(decay))
    for teacher_buffer, student_buffer in zip(teacher_buffers, student_buffers):
        teacher_buffer.copy_(student_buffer)


class EMATeacherHandler:
    """Updates the EMA teacher(s) of ``engine.method`` (or of ``method``) from ``engine.network``.

    Args:
        decay_start: decay at step 0 of the ramp (default 0.5, our choice following Tarvainen & Valpola's
            fast early teacher).
        decay_end: decay after the ramp (default 0.999, Tarvainen & Valpola 2017 / Yu et al. 2019).
        ramp_steps: ramp length in optimizer steps (default 1,000).
        decay: a fixed decay overriding the ramp.
        method: the method owning the teacher; default ``engine.method``.
    """

    def __init__(
        self,
        decay_start: float = 0.5,
        decay_end: float = 0.999,
        ramp_steps: int = 1000,
        decay: float | None = None,
        method: nn.Module | None = None,
    ) -> None:
        for name, value in (("decay_start", decay_start), ("decay_end", decay_end), ("decay", decay)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"EMATeacherHandler {name} must be in [0, 1], got {value}.")
        if ramp_steps < 0:
            raise ValueError(f"EMATeacherHandler ramp_steps must be >= 0, got {ramp_steps}.")
        self.decay_start = float(decay_start)
        self.decay_end = float(decay_end)
        self.ramp_steps = int(ramp_steps)
        self.decay = decay
        self.method = method

    def decay_at(self, step: int) -> float:
        """Decay used for the update after optimizer step ``step`` (0-based)."""
        if self.decay is not None:
            return float(self.decay)
        if self.ramp_steps == 0:
            return self.decay_end
        return self.decay_start + (self.decay_end - self.decay_start) * min(step, self.ramp_steps) / self.ramp_steps

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.ema_teacher_attached = True  # lets the trainer warn when a teacher would never be updated

    def teachers(self, engine: Any) -> list[nn.Module]:
        method = self.method if self.method is not None else getattr(engine, "method", None)
        if method is None:
            raise RuntimeError("EMATeacherHandler needs a method (engine.method or the `method` argument).")
        return [m.teacher for m in method.modules() if isinstance(m, EMATeacherMixin) and m.teacher is not None]

    def __call__(self, engine: Engine) -> None:
        decay = self.decay_at(int(engine.state.iteration) - 1)
        for teacher in self.teachers(engine):
            ema_update(teacher, unwrap_parallel(engine.network), decay)
        engine.state.ema_decay = decay
