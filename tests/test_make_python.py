"""Which interpreter the README's two commands install into (``make -n``: nothing is run or installed).

Inside an active venv: that venv's python. Outside any venv: a project ``.venv`` that make creates first.
``make PYTHON=...``: exactly that interpreter.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BASE_BIN = Path(getattr(sys, "_base_executable", sys.executable)).parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _dry_run(path_dirs: list[Path], *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHON", "MAKEFLAGS", "MAKELEVEL"}}
    env["PATH"] = os.pathsep.join([*map(str, path_dirs), "/usr/bin", "/bin"])
    out = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(REPO), *args], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_inside_an_active_venv_make_uses_it(tmp_path: Path) -> None:
    subprocess.run([str(BASE_BIN / "python3"), "-m", "venv", "--without-pip", str(tmp_path / "v")], check=True, timeout=120)
    plan = _dry_run([tmp_path / "v" / "bin", BASE_BIN], "test")
    venv_python = str(tmp_path / "v" / "bin" / "python3")
    assert f"PYTHON={venv_python} bash scripts/install.sh" in plan
    assert f"{venv_python} -m pytest -q tests" in plan
    assert "-m venv" not in plan


def test_outside_a_venv_make_creates_dot_venv() -> None:
    if not (BASE_BIN / "python3").exists():
        pytest.skip(f"no python3 beside the base interpreter in {BASE_BIN}")
    plan = _dry_run([BASE_BIN], "demo")
    if not (REPO / ".venv" / "bin" / "python").exists():  # created on first use only
        assert plan.splitlines()[0] == "python3 -m venv .venv"
    assert f"PYTHON={REPO / '.venv' / 'bin' / 'python'} bash scripts/install.sh" in plan
    assert f"{REPO / '.venv' / 'bin' / 'python'} -m qgssl_monai.cli demo-job --out runs/demo" in plan


def test_a_named_python_is_used_as_given() -> None:
    plan = _dry_run([BASE_BIN], "test", "PYTHON=python3.11", "LABEL_VENV=/tmp/lv")
    assert "PYTHON=python3.11 bash scripts/install.sh" in plan
    assert "PYTHON=python3.11 LABEL_VENV=/tmp/lv bash scripts/install_label.sh" in plan
    assert "/tmp/lv/bin/python -m pytest -q tests/test_label_server.py" in plan and "-m venv" not in plan
