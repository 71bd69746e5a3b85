"""Actionable errors: found through MONAI's wrapping, printed as one line by the entry points' hook."""

from __future__ import annotations

import ast
import shlex
import sys
from pathlib import Path

import pytest

from qgssl_monai import errors
from qgssl_monai.data.manifest import ManifestError


def _wrapped(error: Exception) -> RuntimeError:
    """What MONAI's ConfigExpression does to an exception raised inside a config expression."""
    try:
        try:
            raise error
        except Exception as cause:
            raise RuntimeError("Failed to evaluate ConfigExpression: $...") from cause
    except RuntimeError as wrapper:
        return wrapper


def test_require_checkpoint_and_the_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    real = tmp_path / "g.pt"
    real.write_bytes(b"x")
    assert errors.require_checkpoint(real, "make g") == str(real)
    with pytest.raises(errors.CheckpointNotFoundError, match=f"^checkpoint not found: {tmp_path / 'no.pt'}; make it with: a && b$"):
        errors.require_checkpoint(tmp_path / "no.pt", ["a", "b"])
    with pytest.raises(FileNotFoundError, match="is a directory"):  # still a FileNotFoundError for callers
        errors.require_checkpoint(tmp_path, "a")

    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *args: seen.append(args[1]))
    errors.install_excepthook()
    errors.install_excepthook()  # idempotent: one wrapper
    missing = _wrapped(errors.CheckpointNotFoundError("checkpoint not found: x"))
    sys.excepthook(type(missing), missing, None)
    bad_manifest = _wrapped(ManifestError("manifest m.json is a directory, not a JSON file"))
    sys.excepthook(type(bad_manifest), bad_manifest, None)
    assert capsys.readouterr().err.splitlines() == [
        "error: checkpoint not found: x",
        "error: manifest m.json is a directory, not a JSON file",
    ]
    bug = _wrapped(KeyError("a bug"))
    sys.excepthook(type(bug), bug, None)
    assert seen == [bug]  # anything else keeps the full traceback


def test_bundle_commands_are_absolute() -> None:
    command = errors.bundle_command("quality_predictor", ["train.json", "multi_gpu_train.json"], bundle_root=".", seed=3)
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "monai.bundle", "run"]
    configs = argv[argv.index("--config_file") + 1]
    expected = [str(errors.BUNDLES_DIR / "quality_predictor" / "configs" / f) for f in ("train.json", "multi_gpu_train.json")]
    assert ast.literal_eval(configs) == expected and all(Path(f).is_file() for f in expected)
    assert argv[argv.index("--bundle_root") + 1] == str(Path.cwd()) and argv[-2:] == ["--seed", "3"]
    weak, train = errors.train_g_commands("/x/models/model.pt", "m.json")
    assert "--bundle_root /x " in weak and weak.endswith(f"--manifest {Path.cwd() / 'm.json'}") and "train.json" in train
    assert "--ckpt_dir /y " in errors.train_g_commands("/y/g.pt")[1]
