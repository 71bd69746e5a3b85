"""The MONAI Label venv sees the core environment's packages after its own, whether the core is a venv or the
system Python (``scripts/label_core_pth.py``, used by ``scripts/install_label.sh``).

Small venvs (``--without-pip``, under a second each) stand in for the real ones: a package ``marker`` placed in
the core environment must import in the label venv, and a package of the same name in the label venv must win.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "label_core_pth.py"
BASE_PYTHON = Path(getattr(sys, "_base_executable", sys.executable))
PROBE = (
    "import json, sys, sysconfig\n"
    "out = {'purelib': sysconfig.get_paths()['purelib'], 'path': sys.path}\n"
    "try:\n    import qgssl_marker; out['marker'] = qgssl_marker.WHERE\nexcept ImportError:\n    out['marker'] = None\n"
    "print(json.dumps(out))"
)


def _make_venv(path: Path, python: Path = BASE_PYTHON) -> Path:
    """A venv without pip, made by ``python`` (so a venv made from a venv has the same base interpreter)."""
    subprocess.run([str(python), "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    return path / "bin" / "python"


def _probe(python: Path) -> dict:
    env = {"PATH": "/usr/bin:/bin"}  # no PYTHONPATH: only what the interpreter's own site setup adds
    out = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, timeout=60, env=env, check=True)
    return json.loads(out.stdout)


def _add_marker(site_packages: str, where: str) -> None:
    package = Path(site_packages) / "qgssl_marker"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(f"WHERE = {where!r}\n")


def _write_pth(core_python: Path, label_venv: Path) -> list[str]:
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [str(core_python), str(SCRIPT), str(label_venv)], capture_output=True, text=True, timeout=60, env=env, check=True
    )
    return out.stdout.split()


def test_core_is_a_venv(tmp_path: Path) -> None:
    core_python = _make_venv(tmp_path / "core")
    core_site = _probe(core_python)["purelib"]
    # the label venv is made by the core venv's python, as install_label.sh does
    label_python = _make_venv(tmp_path / "label", core_python)
    added = _write_pth(core_python, tmp_path / "label")
    assert str(Path(core_site).resolve()) in added

    _add_marker(core_site, "core")
    seen = _probe(label_python)
    assert seen["marker"] == "core"  # the core venv's package, not the base interpreter's
    path = [str(Path(p).resolve()) for p in seen["path"] if p]
    label_site = str(Path(seen["purelib"]).resolve())
    assert path.index(label_site) < path.index(str(Path(core_site).resolve()))

    _add_marker(seen["purelib"], "label")  # the label venv's own copy (its numpy<2 pin) wins
    assert _probe(label_python)["marker"] == "label"


def test_core_is_the_system_python(tmp_path: Path) -> None:
    """The base interpreter as core: its site-packages is appended (checked on the .pth, the base stays untouched)."""
    base_site = str(Path(_probe(BASE_PYTHON)["purelib"]).resolve())
    if not Path(base_site).is_dir():
        pytest.skip(f"the base interpreter has no site-packages folder ({base_site})")
    label_python = _make_venv(tmp_path / "label")
    assert base_site not in [str(Path(p).resolve()) for p in _probe(label_python)["path"] if p]
    added = _write_pth(BASE_PYTHON, tmp_path / "label")
    assert added[0] == base_site
    seen = [str(Path(p).resolve()) for p in _probe(label_python)["path"] if p]
    assert base_site in seen
    assert seen.index(str(Path(_probe(label_python)["purelib"]).resolve())) < seen.index(base_site)


def test_rewriting_replaces_the_folders(tmp_path: Path) -> None:
    """install_label.sh rewrites the .pth on every run: a moved core environment leaves no stale folder."""
    first = _make_venv(tmp_path / "core1")
    second = _make_venv(tmp_path / "core2")
    _make_venv(tmp_path / "label", first)
    _write_pth(first, tmp_path / "label")
    _write_pth(second, tmp_path / "label")
    pth = next((tmp_path / "label").rglob("zz-qgssl-core-environment.pth")).read_text()
    assert str((tmp_path / "core2").resolve()) in pth and str((tmp_path / "core1").resolve()) not in pth
