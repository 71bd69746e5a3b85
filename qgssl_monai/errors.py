"""Errors whose message alone tells the user what is wrong and what to run, and how entry points show them.

A missing checkpoint, a bad manifest or a bad input file is the user's to fix, not a bug: the ``qgssl`` command
line and the bundles (``python -m monai.bundle run``) print such an error as its message, without the traceback
MONAI wraps around it (``RuntimeError: Failed to evaluate ConfigExpression ...``). Every other exception keeps
its full traceback.

Imports only the standard library, so every layer (and ``qgssl --help``) can use it.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

__all__ = [
    "ActionableError",
    "CheckpointNotFoundError",
    "UnreadableCheckpointError",
    "bundle_command",
    "find_actionable",
    "install_excepthook",
    "require_checkpoint",
    "train_g_commands",
]

# the repository's bundles (hint commands name their configs by absolute path, so they work from any folder)
BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"


class ActionableError(Exception):
    """An error the user fixes from its message (it names the file and the command or option that fixes it).

    Mixed into concrete error types (e.g. ``class X(ActionableError, FileNotFoundError)``) so that callers can
    still catch the standard type.
    """


class CheckpointNotFoundError(ActionableError, FileNotFoundError):
    """A checkpoint a command needs does not exist; the message names it and the command that makes it."""


class UnreadableCheckpointError(ActionableError, ValueError):
    """A checkpoint file exists but cannot be loaded (truncated, not a torch file); the message names it."""


def find_actionable(error: BaseException | None) -> ActionableError | None:
    """The first :class:`ActionableError` in ``error``'s chain (``__cause__``/``__context__``), or None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ActionableError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def require_checkpoint(path: str | os.PathLike, make: str | Sequence[str]) -> str:
    """Return ``path`` as a string if it is a file; else raise one clear line.

    Args:
        path: the checkpoint a step needs.
        make: the command(s) that write it, run in order (joined with ``&&``).

    Raises:
        CheckpointNotFoundError: ``"checkpoint not found: <path>; make it with: <command>"`` (``"... is a
            directory"`` when it is one).
    """
    commands = [make] if isinstance(make, str) else list(make)
    fix = f"make it with: {' && '.join(commands)}" if commands else "pass the path of an existing checkpoint"
    shown = os.path.abspath(path)
    if Path(path).is_dir():
        raise CheckpointNotFoundError(f"checkpoint {shown} is a directory, not a file; {fix}")
    if not Path(path).is_file():
        raise CheckpointNotFoundError(f"checkpoint not found: {shown}; {fix}")
    return str(path)


def bundle_command(bundle: str, config_files: str | Sequence[str], **overrides: object) -> str:
    """A ``python -m monai.bundle run`` command line for a repository bundle that works from any folder.

    Args:
        bundle: folder name under ``bundles/`` (``"quality_predictor"``, ``"ssl_segmentation"``).
        config_files: file name(s) under the bundle's ``configs/``; several are stacked (later ones override).
        overrides: ``--key value`` arguments (paths are made absolute; None values are left out).

    Example: ``bundle_command("quality_predictor", "train.json", bundle_root=".", manifest="m.json")``.
    """
    files = [config_files] if isinstance(config_files, str) else list(config_files)
    configs = [str(BUNDLES_DIR / bundle / "configs" / name) for name in files]
    config_arg = configs[0] if len(configs) == 1 else "[" + ",".join(f"'{c}'" for c in configs) + "]"
    parts = ["python", "-m", "monai.bundle", "run", "--config_file", config_arg]
    for key, value in overrides.items():
        if value is None:
            continue
        text = str(value)
        if key in ("bundle_root", "manifest", "ckpt_dir", "dataset_dir", "quality_ckpt", "output_dir") and text:
            text = os.path.abspath(text)
        parts += [f"--{key}", text]
    return shlex.join(parts)


def train_g_commands(checkpoint: str | os.PathLike, manifest: str | os.PathLike | None = None) -> list[str]:
    """The two quality-bundle runs (weak snapshots, then g) that write g's weights to ``checkpoint``.

    ``checkpoint`` in a ``models/`` folder gets that folder's parent as ``bundle_root``; elsewhere ``ckpt_dir`` is
    set to its folder (the weights are then ``<ckpt_dir>/model.pt``). ``manifest`` defaults to the shipped
    ``data_manifests/kvasir-seg.json``.
    """
    path = Path(checkpoint)
    data = manifest if manifest not in (None, "") else BUNDLES_DIR.parent / "data_manifests" / "kvasir-seg.json"
    if path.parent.name == "models":
        where: dict[str, object] = {"bundle_root": path.parent.parent}
    else:
        where = {"bundle_root": BUNDLES_DIR / "quality_predictor", "ckpt_dir": path.parent}
    return [bundle_command("quality_predictor", config, **where, manifest=data) for config in ("train_weak.json", "train.json")]


def install_excepthook() -> None:
    """Make an uncaught error with an :class:`ActionableError` in its chain print as ``error: <message>`` only.

    Called by entry points (the bundles' configs); idempotent. Other errors keep the previous hook (Python's
    traceback).
    """
    if getattr(sys.excepthook, "__name__", "") == "_qgssl_excepthook":
        return
    previous = sys.excepthook

    def _qgssl_excepthook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        actionable = find_actionable(error)
        if actionable is None:
            previous(kind, error, traceback)
        else:
            print(f"error: {actionable}", file=sys.stderr)

    sys.excepthook = _qgssl_excepthook
