"""The ``qgssl`` command line.

Each sub-command lives next to the code it drives; a module listed in ``COMMAND_MODULES`` exposes
``register(subparsers)``, which adds its parser(s) and sets ``func`` on them. Modules are imported
lazily, so ``qgssl --help`` stays fast and an optional dependency only matters for its command.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from qgssl_monai.errors import find_actionable

# module path -> the sub-commands it registers (names shown before the module is imported)
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "qgssl_monai.data.cli": ("prepare", "subset-labels", "validate-manifest", "demo-data"),
    "qgssl_monai.serving.cli": ("quality-check",),
    "qgssl_monai.experiments.cli": ("experiment", "demo-job"),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qgssl", description="qgssl-monai: quality-guided semi-supervised segmentation")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None
    if argv:
        first = next((a for a in argv if not a.startswith("-")), None)
        wanted = first
    for module_name, commands in COMMAND_MODULES.items():
        # import only the module that owns the requested command (or all, for --help)
        if wanted is not None and wanted not in commands:
            for name in commands:
                sub.add_parser(name, help=f"(see qgssl {name} --help)")
            continue
        # every command module ships with the package: an import error is a bug to show, not a command to hide
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from qgssl_monai.experiments.bundle_main import known_notices_filtered  # stdlib only: --help stays fast

    try:
        with known_notices_filtered():  # MONAI's known bundle notices, here at the entry point only
            result = args.func(args)
    except Exception as err:
        # a missing checkpoint, a bad manifest or input file: its message says what to do, no traceback
        actionable = find_actionable(err)
        if actionable is None:
            raise
        print(f"qgssl {args.command}: {actionable}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
