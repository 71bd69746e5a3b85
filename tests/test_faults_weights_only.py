"""Every checkpoint load in the project is ``torch.load(..., weights_only=True)`` (no pickled code runs)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

from monai.handlers import CheckpointLoader

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("qgssl_monai", "apps", "bundles")
# a `torch.load(` inside a bundle config expression: its argument list up to the matching-looking ")"
CONFIG_LOAD = re.compile(r"torch\.load\((?P<args>[^()]*(?:\([^()]*\)[^()]*)*)\)")


def _torch_load_aliases(tree: ast.AST) -> tuple[set[str], set[str]]:
    """Names bound to the torch module and to ``torch.load`` itself by the module's imports."""
    modules, functions = {"torch"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name == "torch"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            functions |= {a.asname or a.name for a in node.names if a.name == "load"}
    return modules, functions


def unsafe_torch_loads(source: str, filename: str = "<source>") -> list[str]:
    """``file:line`` of every ``torch.load`` call without a literal ``weights_only=True`` keyword."""
    tree = ast.parse(source, filename)
    modules, functions = _torch_load_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        is_load = (isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(func.value, ast.Name)
                   and func.value.id in modules) or (isinstance(func, ast.Name) and func.id in functions)  # fmt: skip
        if not is_load:
            continue
        safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in node.keywords)
        if not safe:
            found.append(f"{filename}:{node.lineno}")
    return found


def unsafe_config_loads(text: str, filename: str = "<config>") -> list[str]:
    """``file:line`` of every ``torch.load(`` in a bundle config expression without ``weights_only=True``."""
    found = []
    for match in CONFIG_LOAD.finditer(text):
        if not re.search(r"weights_only\s*=\s*True", match.group("args")):
            found.append(f"{filename}:{text.count(chr(10), 0, match.start()) + 1}")
    return found


def test_scanner_catches_unsafe_loads() -> None:
    bad = "import torch as T\nfrom torch import load as L\nT.load('a')\nL('b', weights_only=False)\ntorch.load(p, **kw)\n"
    assert unsafe_torch_loads(bad) == ["<source>:3", "<source>:4", "<source>:5"]
    good = "import torch\nimport json\ntorch.load(p, map_location='cpu', weights_only=True)\njson.load(f)\nnp.load(x)\n"
    assert unsafe_torch_loads(good) == []
    config = '{"a": "$torch.load(@p, map_location=torch.device(\'cpu\'))",\n "b": "$torch.load(@p, weights_only=True)"}'
    assert unsafe_config_loads(config) == ["<config>:1"]


def test_no_torch_load_without_weights_only_in_the_project() -> None:
    problems: list[str] = []
    scanned = 0
    for folder in SCANNED:
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix == ".py":
                problems += unsafe_torch_loads(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
            elif path.suffix in (".json", ".yaml", ".yml"):
                problems += unsafe_config_loads(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
            else:
                continue
            scanned += 1
    assert scanned > 50  # the scan really walked the source tree
    assert problems == [], f"torch.load without weights_only=True: {problems}"


def test_monai_checkpoint_loader_is_weights_only() -> None:
    """The bundles' resume/inference ``CheckpointLoader`` (MONAI 1.6.1) loads with ``weights_only=True``."""
    assert unsafe_torch_loads(inspect.getsource(inspect.getmodule(CheckpointLoader))) == []
    assert "weights_only=True" in inspect.getsource(CheckpointLoader.__call__)
