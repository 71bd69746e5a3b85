"""``NonFiniteLossGuard``: a NaN/Inf loss (or weights) makes the training run *fail*, not end quietly.

ignite's ``TerminateOnNan`` only logs a warning and calls ``engine.terminate()``, so the run ends as if it
had completed (exit code 0, COMPLETED handlers and final checkpoints run on a poisoned model). This guard
instead raises :class:`NonFiniteLossError` naming the iteration, the epoch, every non-finite loss term and the
last good checkpoint on disk, so ``monai.bundle run`` exits non-zero and the experiment runner marks the step
FAILED.

Checks, both at ``ITERATION_COMPLETED``:

* every iteration: the scalar loss terms of ``engine.state.output`` (``loss``, ``sup_loss``, ``unsup_loss``,
  ... whichever are present; a decollated output list is read from its first item);
* the last iteration of each epoch: the parameters of ``network`` (when given). A finite loss can still be
  followed by an optimizer step that overflows the weights; ignite fires ``EPOCH_COMPLETED`` (validation,
  ``CheckpointSaver``) only after every ``ITERATION_COMPLETED`` handler, so no poisoned epoch checkpoint is
  written wherever the guard sits in the handler list. Listing it before the iteration-level handlers (EMA
  teacher, MLflow iteration logging) also keeps those from seeing the poisoned step.

Raising from a handler aborts the epoch: the handlers that follow (checkpoint saver, MLflow, ...) do not run
for it, and ``CheckpointSaver(n_saved=1)`` only deletes its previous file after writing a new one, so the
checkpoint of the last good epoch stays.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from qgssl_monai.segmentation.training import CHECKPOINT_PATTERN, latest_checkpoint

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard", "DEFAULT_LOSS_KEYS"]

#: loss terms checked when present in ``engine.state.output`` (SSL trainer keys, then MONAI's ``loss``)
DEFAULT_LOSS_KEYS = ("loss", "sup_loss", "unsup_loss", "extra_sup_loss")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss term or weights; the message names where and the last good checkpoint."""


def _as_float(value: Any) -> float | None:
    """A python float for a number or a one-element tensor, else None (arrays, strings, ...)."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().reshape(-1)[0]) if value.numel() == 1 else None
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        return float(value)  # type: ignore[arg-type]
    return None


def last_good_checkpoint(checkpoint_dir: str | os.PathLike | None) -> str:
    """Human-readable description of the newest ``checkpoint_epoch=<N>.pt`` (and ``model.pt``) in ``checkpoint_dir``."""
    if checkpoint_dir is None:
        return "no checkpoint folder configured"
    folder = Path(checkpoint_dir)
    parts = []
    latest = latest_checkpoint(folder, required=False)
    if latest is not None:
        epoch = int(CHECKPOINT_PATTERN.match(Path(latest).name).group(1))
        parts.append(f"{latest} (epoch {epoch}; resume with --resume true)")
    if (folder / "model.pt").is_file():
        parts.append(f"best weights {folder / 'model.pt'}")
    return "; ".join(parts) if parts else f"none yet in {folder}"


class NonFiniteLossGuard:
    """Fail the run on a non-finite loss term (every iteration) or non-finite weights (each epoch's last iteration).

    Args:
        loss_keys: keys of ``engine.state.output`` holding scalar loss terms; missing keys are ignored, and when
            none is present the output itself is checked if it is a scalar (MONAI ``SupervisedTrainer`` without
            decollation).
        network: module whose parameters are checked after the last iteration of every epoch (None: loss only).
        checkpoint_dir: the folder of the resumable checkpoints, named in the error message.

    Raises:
        NonFiniteLossError: from the event handler; ignite re-raises it out of ``engine.run()``.
    """

    def __init__(
        self,
        loss_keys: Sequence[str] = DEFAULT_LOSS_KEYS,
        network: torch.nn.Module | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
    ) -> None:
        self.loss_keys = tuple(loss_keys)
        self.network = network
        self.checkpoint_dir = checkpoint_dir

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.check_loss(engine)
        epoch_length = engine.state.epoch_length
        if self.network is not None and epoch_length and engine.state.iteration % epoch_length == 0:
            self.check_weights(engine)

    def non_finite_terms(self, output: Any) -> dict[str, float]:
        """``{term: value}`` of the non-finite scalar loss terms in an engine output (empty when all finite)."""
        if isinstance(output, (list, tuple)) and output and isinstance(output[0], Mapping):
            output = output[0]  # decollated batch: MONAI replicates the loss into every item
        values: dict[str, float] = {}
        if isinstance(output, Mapping):
            for key in self.loss_keys:
                value = _as_float(output.get(key))
                if value is not None:
                    values[key] = value
        else:
            value = _as_float(output)
            if value is not None:
                values["loss"] = value
        return {key: value for key, value in values.items() if not math.isfinite(value)}

    def _fail(self, engine: Engine, what: str) -> None:
        state = engine.state
        raise NonFiniteLossError(
            f"{what} at iteration {state.iteration} (epoch {state.epoch}): training stopped and no checkpoint was "
            f"written from this state; last good checkpoint: {last_good_checkpoint(self.checkpoint_dir)}. "
            "Lower the learning rate, check the inputs or use amp_dtype 'none' before resuming."
        )

    def check_loss(self, engine: Engine) -> None:
        bad = self.non_finite_terms(engine.state.output)
        if bad:
            terms = ", ".join(f"{key}={value}" for key, value in bad.items())
            self._fail(engine, f"non-finite loss ({terms})")

    def check_weights(self, engine: Engine) -> None:
        names = self.non_finite_parameters(self.network.named_parameters() if self.network is not None else ())
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            self._fail(engine, f"non-finite weights in {len(names)} parameter tensor(s) ({shown})")

    @staticmethod
    def non_finite_parameters(named_parameters: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Names of the parameter tensors holding any NaN/Inf."""
        named = list(named_parameters)
        if not named:
            return []
        with torch.no_grad():
            finite = torch.stack([torch.isfinite(p).all() for _, p in named]).tolist()  # one device sync
        return [name for (name, _), ok in zip(named, finite) if not ok]
