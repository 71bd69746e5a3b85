"""Every import a shipped feature needs resolves in the installed environment.

CI runs the suite in a fresh venv built only by the README's install command (``.ci/run``), so this file is
the fresh-venv import sweep: every module of ``qgssl_monai``, every ``$import``/``$from`` and ``_target_`` of
every bundle config, ``jsonschema`` for ``monai.bundle verify_metadata``, and (where the MONAI Label stack is
installed, i.e. in ``.venv-label``) every module of ``apps/quality_checker``.
"""

from __future__ import annotations

import ast
import configparser
import importlib
import importlib.metadata
import importlib.util
import json
import pkgutil
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import qgssl_monai

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "bundles").glob("*/configs/**/*.json"))
# "$import a.b", "$import a.b as c", "$from a.b import c"
IMPORT_EXPR = re.compile(r"^\$\s*(?:import\s+([\w.]+)|from\s+([\w.]+)\s+import\s+(\w+))")


def _library_modules() -> list[str]:
    names = [qgssl_monai.__name__]
    for info in pkgutil.walk_packages(qgssl_monai.__path__, prefix=qgssl_monai.__name__ + "."):
        names.append(info.name)
    return sorted(names)


def _walk(node: Any) -> Iterator[tuple[str, str]]:
    """(kind, value) for every ``$import``-like expression and every static ``_target_`` in a config tree."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if isinstance(target, str) and not target.startswith(("$", "@", "%")):
            yield "target", target
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)
    elif isinstance(node, str) and IMPORT_EXPR.match(node):
        yield "import", node


def _config_references() -> list[tuple[str, str, str]]:
    refs = set()
    for path in CONFIG_FILES:
        if path.name == "metadata.json":
            continue
        for kind, value in _walk(json.loads(path.read_text())):
            refs.add((str(path.relative_to(REPO)), kind, value))
    return sorted(refs)


def _resolve_target(name: str) -> Any:
    """The callable a bundle's ``_target_`` names, resolved the way ``monai.bundle.ConfigComponent`` does."""
    from monai.bundle.config_item import ComponentLocator

    if "." not in name:  # a short name: MONAI's locator searches the monai package
        module_name = ComponentLocator().get_component_module_name(name)
        assert module_name, f"_target_ {name!r}: no monai module defines it"
        if isinstance(module_name, list):
            module_name = module_name[0]
        return getattr(importlib.import_module(module_name), name)
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # longest importable module prefix, then attributes
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as err:
            if err.name and ".".join(parts[:cut]).startswith(err.name) and err.name != parts[0]:
                continue  # the prefix is a class path, not a module
            raise
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise AssertionError(f"_target_ {name!r} does not resolve")


@pytest.mark.parametrize("module", _library_modules())
def test_every_library_module_imports(module: str) -> None:
    assert importlib.import_module(module).__name__ == module


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared_requirements() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    names = set()
    # install_requires and the extras installed beside it (an optional feature's import names its extra when it
    # is missing); [label] belongs to the separate MONAI Label venv
    extras = cfg["options.extras_require"]
    sections = [cfg["options"]["install_requires"], *(extras[name] for name in extras if name != "label")]
    for line in (line for section in sections for line in section.splitlines()):
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(_canonical(re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0]))
    return names


def test_library_imports_are_declared_requirements() -> None:
    """Each third-party module ``qgssl_monai`` imports comes from a distribution named in ``install_requires``
    (not only pulled in by another package, which may stop doing so)."""
    declared = _declared_requirements()
    providers = importlib.metadata.packages_distributions()
    providing = {_canonical(dist) for dists in providers.values() for dist in dists}
    for name in sorted(declared - providing):  # a meta-package (itk): its own requirements provide the modules
        for requirement in importlib.metadata.requires(name) or []:
            if "extra ==" not in requirement:
                declared.add(_canonical(re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0]))
    undeclared = {}
    for path in Path(qgssl_monai.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top in sys.stdlib_module_names or top == "qgssl_monai":
                    continue
                if not any(_canonical(dist) in declared for dist in providers.get(top, [])):
                    undeclared[top] = str(path.relative_to(REPO))
    assert not undeclared, f"imported but neither in setup.cfg install_requires nor in an extra: {undeclared}"


def test_sweep_covers_the_bundles() -> None:
    refs = _config_references()
    kinds = {kind for _, kind, _ in refs}
    assert len(CONFIG_FILES) >= 30 and kinds == {"import", "target"}, (len(CONFIG_FILES), kinds)
    assert any(value == "qgssl_monai.engines.ssl_trainer.SemiSupervisedTrainer" for _, _, value in refs)


@pytest.mark.parametrize(("config", "kind", "value"), _config_references())
def test_bundle_config_reference_resolves(config: str, kind: str, value: str) -> None:
    if kind == "target":
        assert callable(_resolve_target(value)), f"{config}: _target_ {value} is not callable"
        return
    match = IMPORT_EXPR.match(value)
    assert match is not None
    module = match.group(1) or match.group(2)
    imported = importlib.import_module(module)
    if match.group(3):  # "$from a import b": b is an attribute or a submodule
        assert hasattr(imported, match.group(3)) or importlib.util.find_spec(f"{module}.{match.group(3)}"), value


def test_verify_metadata_dependency_installed() -> None:
    """``python -m monai.bundle verify_metadata`` validates with jsonschema; MONAI only imports it lazily."""
    from monai.utils import optional_import

    _, available = optional_import("jsonschema", name="validate")
    assert available, 'jsonschema is missing: it is a requirement of qgssl-monai (pip install -e ".")'


def test_quality_checker_app_imports() -> None:
    """Every module of the MONAI Label app, in a fresh interpreter with the app folder on sys.path."""
    if importlib.util.find_spec("monailabel") is None:
        pytest.skip("monailabel is not installed here (it lives in .venv-label: scripts/install_label.sh)")
    app = REPO / "apps" / "quality_checker"
    modules = ["main"] + sorted(
        ".".join(p.relative_to(app).with_suffix("").parts).removesuffix(".__init__") for p in (app / "lib").rglob("*.py")
    )
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\nprint('ok', len(sys.argv) - 1)"
    out = subprocess.run(
        [sys.executable, "-c", code, *modules], cwd=app, capture_output=True, text=True, timeout=300, env=None
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok", str(len(modules))]
