"""A broken module that ships with the package fails loudly instead of hiding a method or a sub-command."""

from __future__ import annotations

import importlib
import sys
import types

import pytest

from qgssl_monai import cli
from qgssl_monai.methods import registry


def test_broken_method_module_raises_its_own_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.LAZY_METHODS, "broken-method", ("qgssl_monai.methods._missing_module", "X", False))
    with pytest.raises(ModuleNotFoundError, match="_missing_module"):
        registry.build_method("broken-method")


def test_broken_command_module_is_not_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = types.ModuleType("qgssl_monai._broken_cli")

    def register(subparsers):  # a command module whose own import of a dependency failed
        raise ImportError("cannot import name 'x' from 'somewhere'")

    broken.register = register
    monkeypatch.setitem(sys.modules, "qgssl_monai._broken_cli", broken)
    monkeypatch.setitem(cli.COMMAND_MODULES, "qgssl_monai._broken_cli", ("broken",))
    with pytest.raises(ImportError, match="cannot import name"):
        cli.build_parser(["broken"])
    monkeypatch.setitem(cli.COMMAND_MODULES, "qgssl_monai._no_such_cli", ("ghost",))
    with pytest.raises(ModuleNotFoundError):
        cli.build_parser(["ghost"])
    assert importlib.util.find_spec("qgssl_monai._no_such_cli") is None
