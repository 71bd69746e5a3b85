"""Shared ending of the benchmark scripts: print the machine line and the table, optionally save JSON."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def finish(machine: str, args: argparse.Namespace, rows: list[dict[str, Any]], table: str) -> dict[str, Any]:
    """Append the end-of-run load average to ``machine``, print it with ``table``, write ``args.json`` if set.

    Returns:
        ``{"machine", "settings" (the CLI arguments), "rows", "table"}`` (what the JSON file holds).
    """
    machine += "; at end " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"\n{machine}\n{table}")
    result = {"machine": machine, "settings": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows, "table": table}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return result
