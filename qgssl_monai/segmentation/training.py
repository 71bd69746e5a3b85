"""Training helpers referenced by ``bundles/ssl_segmentation/configs/train.json``.

* :func:`latest_checkpoint` finds the newest resumable checkpoint written by MONAI's ``CheckpointSaver``
  (``checkpoint_epoch=<N>.pt``) for ``--resume true``.
* :class:`RandomStateCheckpoint` puts the torch / numpy / python RNG states and the ``self.R`` states of the
  random transforms into that checkpoint, so a resumed run draws the same shuffles and augmentations as an
  uninterrupted one.
* :class:`RunOnCompleted` runs the test evaluator (with the best weights) when training completes; it is
  listed before the MLflow handler, so the test metrics land in the training run before it is closed.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import Compose, Randomizable

__all__ = ["CHECKPOINT_PATTERN", "RandomStateCheckpoint", "RunOnCompleted", "latest_checkpoint", "load_weights_if_exists"]

#: file names of the per-epoch resumable checkpoints (``CheckpointSaver(file_prefix="", save_interval=1)``)
CHECKPOINT_PATTERN = re.compile(r"^checkpoint_epoch=(\d+)\.pt$")


def latest_checkpoint(ckpt_dir: str | os.PathLike, required: bool = True) -> str | None:
    """Path of the highest-epoch ``checkpoint_epoch=<N>.pt`` in ``ckpt_dir``.

    Args:
        ckpt_dir: the bundle's ``models`` folder.
        required: raise when none exists (``--resume true`` on a fresh folder is a mistake), else return None.

    Raises:
        FileNotFoundError: ``required`` and no checkpoint found.
    """
    folder = Path(ckpt_dir)
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            match = CHECKPOINT_PATTERN.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
    if not found:
        if required:
            raise FileNotFoundError(f"--resume: no checkpoint_epoch=<N>.pt in {folder}; train without --resume first")
        return None
    return str(max(found)[1])


def _to_tensor_tree(value: Any) -> Any:
    # torch.load(weights_only=True) (used by MONAI's CheckpointLoader) accepts tensors but no numpy arrays
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, (list, tuple)):
        return type(value)(_to_tensor_tree(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_tensor_tree(v) for k, v in value.items()}
    return value


def _numpy_state(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (str(name), np.asarray(torch.as_tensor(keys).numpy(), dtype=np.uint32), int(pos), int(has_gauss), float(cached))


def _randomizables(transforms: Iterable[Any]) -> list[Randomizable]:
    found: list[Randomizable] = []
    for transform in transforms:
        if transform is None:
            continue
        if isinstance(transform, Randomizable):
            found.append(transform)
        if isinstance(transform, Compose):
            found += _randomizables(transform.transforms)
    return found


class RandomStateCheckpoint:
    """Checkpointable random state: torch (CPU and CUDA), numpy and python RNGs and transforms' ``self.R``.

    Add it to the resumable checkpoint's ``save_dict``/``load_dict`` under one key (``"random_state"``).

    Args:
        transforms: transform chains (e.g. the training and unlabeled ``Compose``) whose random transforms'
            ``R`` states are saved; nested ``Compose`` chains are walked.
    """

    def __init__(self, transforms: Iterable[Any] = ()) -> None:
        self.randomizables = _randomizables(list(transforms))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": _to_tensor_tree(np.random.get_state()),
            "python": random.getstate(),
            "transforms": [_to_tensor_tree(t.R.get_state()) for t in self.randomizables],
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
        np.random.set_state(_numpy_state(state["numpy"]))
        python_state = state["python"]
        random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
        saved = list(state["transforms"])
        if len(saved) != len(self.randomizables):
            raise ValueError(
                f"checkpoint holds {len(saved)} transform random states, the current chains have "
                f"{len(self.randomizables)}: resume with the same transform settings"
            )
        for transform, transform_state in zip(self.randomizables, saved):
            transform.R.set_state(_numpy_state(transform_state))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def load_weights_if_exists(network: torch.nn.Module, path: str | os.PathLike) -> bool:
    """Load a plain ``state_dict`` file (bundle ``models/model.pt``) into ``network`` if it exists; True if loaded."""
    if not Path(path).is_file():
        return False
    network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return True


class RunOnCompleted:
    """Call ``function()`` when the engine completes (e.g. final test evaluation after training).

    Args:
        function: called without arguments, e.g. ``"$lambda: @evaluator.run()"``.
        enabled: attach nothing when False (e.g. an empty test split).
    """

    def __init__(self, function: Callable[[], Any], enabled: bool = True) -> None:
        self.function = function
        self.enabled = bool(enabled)

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.function()
