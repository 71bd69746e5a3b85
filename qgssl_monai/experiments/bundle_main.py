"""MONAI's known notices, filtered at the project's entry points only (never at import of the library).

Two notices repeat on every bundle call the project makes and say nothing actionable there:

* ``Not all config files are in .../configs`` (``monai.bundle.workflows`` logger): logged once per stacked
  overlay in a sub-folder (``configs/method/*.json``, ``configs/net/*.json``); the runner always passes
  ``meta_file`` and ``logging_file`` explicitly, which is what the notice is about;
* ``parsing config_file ...: Only proceed if this config is from a source you trust`` (a ``UserWarning``
  of ``monai.bundle.scripts``): the project runs its own bundles (README, "Security").

:func:`known_notices_filtered` hides exactly these two inside a ``with`` block; every other warning and log
record stays visible. Used by ``qgssl`` (``qgssl_monai.cli.main``) and the experiment runner's bundle calls;
``python -m qgssl_monai.experiments.bundle_main --args_file FILE`` is ``python -m monai.bundle run --args_file
FILE`` with the filter on (the runner's ``subprocess`` and ``torchrun`` launchers). Library users calling
``monai.bundle.run`` themselves still see MONAI's notices.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence

#: logger -> message prefix of the known MONAI log notice
KNOWN_LOG_NOTICES: dict[str, str] = {"monai.bundle.workflows": "Not all config files are in "}
#: regex (matched at the start of the message) of the known MONAI warning, and its category
KNOWN_WARNING = (r"parsing config_file .*Only proceed if this config is from a source you trust", UserWarning)


class _PrefixFilter(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def known_notices_filtered() -> Iterator[None]:
    """Hide MONAI's two known bundle notices (module docstring) inside the block; everything else passes."""
    installed = []
    for name, prefix in KNOWN_LOG_NOTICES.items():
        log_filter = _PrefixFilter(prefix)
        logging.getLogger(name).addFilter(log_filter)
        installed.append((name, log_filter))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=KNOWN_WARNING[0], category=KNOWN_WARNING[1])
            yield
    finally:
        for name, log_filter in installed:
            logging.getLogger(name).removeFilter(log_filter)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m monai.bundle run --args_file FILE`` with :func:`known_notices_filtered` on."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--args_file", required=True, help="JSON args file of monai.bundle.run")
    args = parser.parse_args(argv)
    from monai.bundle import run

    with known_notices_filtered():
        run(args_file=args.args_file)


if __name__ == "__main__":
    main()
