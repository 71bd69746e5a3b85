"""Training helpers referenced by ``bundles/ssl_segmentation/configs/train.json``.

* :func:`latest_checkpoint` finds the newest resumable checkpoint written by MONAI's ``CheckpointSaver``
  (``checkpoint_epoch=<N>.pt``) for ``--resume true``.
* :class:`RandomStateCheckpoint` puts the torch / numpy / python RNG states and the ``self.R`` states of the
  random transforms into that checkpoint, so a resumed run draws the same shuffles and augmentations as an
  uninterrupted one.
* :class:`ResumableRandomSampler` + :class:`RestoreDataPosition` make the shuffled loaders resumable: pass
  ``p`` of a loader is the permutation seeded by ``seed + p``, and a resumed trainer restarts the loaders at
  the batch the interrupted run would have drawn next (ignite does not restart loaders at epoch boundaries
  when ``epoch_length`` differs from the loader length, so a fresh loader would otherwise change the data order).
* :class:`ValidationProgressState` checkpoints what validation has learnt so far (early-stopping counter,
  best validation score of the best-model saver and of the evaluator), so a resumed run stops and keeps
  ``model.pt`` exactly as an uninterrupted one would.
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
from torch.utils.data import Sampler

__all__ = [
    "CHECKPOINT_PATTERN",
    "RandomStateCheckpoint",
    "RestoreDataPosition",
    "ResumableRandomSampler",
    "RunOnCompleted",
    "ValidationProgressState",
    "latest_checkpoint",
    "load_weights_if_exists",
]

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
    keys_array = np.asarray(torch.as_tensor(keys).numpy(), dtype=np.uint32)
    return (str(name), keys_array, int(pos), int(has_gauss), float(cached))


def _randomizables(transforms: Iterable[Any]) -> list[Randomizable]:
    """Every distinct ``Randomizable`` reachable from ``transforms``, in a fixed order.

    Walks ``Compose`` chains and the attributes of each transform, because MONAI dictionary transforms hold
    array transforms with their own ``R`` (e.g. ``RandRotated.rand_rotate``).
    """
    found: list[Randomizable] = []
    seen: set[int] = set()

    def visit(obj: Any, depth: int) -> None:
        if depth > 6 or id(obj) in seen:
            return
        if isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item, depth + 1)
            return
        if not isinstance(obj, (Randomizable, Compose)):
            return
        seen.add(id(obj))
        if isinstance(obj, Randomizable):
            found.append(obj)
        for value in vars(obj).values():
            visit(value, depth + 1)

    for transform in transforms:
        visit(transform, 0)
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


class ResumableRandomSampler(Sampler[int]):
    """Random order whose pass ``p`` is ``randperm(n)`` seeded by ``seed + p``; can start mid-pass.

    Each ``iter()`` yields the next pass (from the start offset set by :meth:`set_batch_position` for the
    first one), so the data order depends only on ``seed`` and the number of batches drawn so far.

    Args:
        data_source: the dataset (only its length is used).
        seed: base seed of the permutations.
    """

    def __init__(self, data_source: Any, seed: int = 0) -> None:
        self.num_items = len(data_source)
        if self.num_items == 0:
            raise ValueError("ResumableRandomSampler got an empty dataset")
        self.seed = int(seed)
        self.next_pass = 0
        self.start_offset = 0

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.next_pass)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        start, self.next_pass, self.start_offset = self.start_offset, self.next_pass + 1, 0
        yield from order[start:]

    def set_batch_position(self, batches_drawn: int, batch_size: int, drop_last: bool = True) -> None:
        """Continue after ``batches_drawn`` batches of ``batch_size`` have been consumed from pass 0 on."""
        full, rest = divmod(self.num_items, batch_size)
        per_pass = full if drop_last or rest == 0 else full + 1
        if per_pass == 0:
            raise ValueError(f"batch_size {batch_size} exceeds the {self.num_items} items with drop_last")
        self.next_pass, in_pass = divmod(int(batches_drawn), per_pass)
        self.start_offset = in_pass * batch_size


class RestoreDataPosition:
    """At ``STARTED`` (after ``CheckpointLoader``), put the resumable samplers where the restored trainer left off.

    The labeled loader gave one batch per completed iteration; the unlabeled loader one per iteration when
    the method draws unlabeled data (``method.uses_unlabeled``), none otherwise.

    Args:
        data_loader: the labeled loader; its sampler must be a :class:`ResumableRandomSampler` (else ignored).
        unlabeled_data_loader: the unlabeled loader or ``None``.
    """

    def __init__(self, data_loader: Any, unlabeled_data_loader: Any | None = None) -> None:
        self.loaders = [(data_loader, False), (unlabeled_data_loader, True)]

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        iteration = int(engine.state.iteration)
        uses_unlabeled = bool(getattr(getattr(engine, "method", None), "uses_unlabeled", True))
        for loader, unlabeled in self.loaders:
            sampler = getattr(loader, "sampler", None)
            if not isinstance(sampler, ResumableRandomSampler):
                continue
            batches = iteration if (uses_unlabeled or not unlabeled) else 0
            sampler.set_batch_position(batches, loader.batch_size, loader.drop_last)


class ValidationProgressState:
    """Checkpointable validation progress: early stopping, best-model saver and evaluator best metric.

    Args:
        early_stop: MONAI ``EarlyStopHandler`` (its ignite ``EarlyStopping`` exists once the trainer is set).
        best_saver: MONAI ``CheckpointSaver`` with ``save_key_metric=True`` (the ``model.pt`` writer).
        evaluator: the validation evaluator (``state.best_metric`` / ``best_metric_epoch``).
    """

    def __init__(self, early_stop: Any = None, best_saver: Any = None, evaluator: Any = None) -> None:
        self.early_stop = early_stop
        self.best_saver = best_saver
        self.evaluator = evaluator

    def _early_stopping(self) -> Any:
        return getattr(self.early_stop, "_handler", None)

    def _key_metric_checkpoint(self) -> Any:
        return getattr(self.best_saver, "_key_metric_checkpoint", None)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        early_stopping = self._early_stopping()
        if early_stopping is not None:
            best = early_stopping.best_score
            best_score = None if best is None else float(best)
            state["early_stop"] = {"counter": int(early_stopping.counter), "best_score": best_score}
        key_checkpoint = self._key_metric_checkpoint()
        if key_checkpoint is not None:
            saved = key_checkpoint.state_dict()["_saved"]
            state["best_saver"] = [(float(priority), str(name)) for priority, name in saved]
        if self.evaluator is not None:
            state["best_metric"] = float(self.evaluator.state.best_metric)
            state["best_metric_epoch"] = int(self.evaluator.state.best_metric_epoch)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        early_stopping = self._early_stopping()
        if early_stopping is not None and "early_stop" in state:
            early_stopping.counter = int(state["early_stop"]["counter"])
            early_stopping.best_score = state["early_stop"]["best_score"]
        key_checkpoint = self._key_metric_checkpoint()
        if key_checkpoint is not None and "best_saver" in state:
            key_checkpoint.load_state_dict({"_saved": [(p, n) for p, n in state["best_saver"]]})
        if self.evaluator is not None and "best_metric" in state:
            self.evaluator.state.best_metric = float(state["best_metric"])
            self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])
