"""Shared pieces of the benchmark scripts: the machine line, a bf16 autocast switch, and the common ending
(print the machine line and the table, optionally save JSON)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import monai
import torch


def machine_line(bf16_isa: bool = False) -> str:
    """CPU model, cores (and with ``bf16_isa`` the bf16-relevant ISA flags), library versions, torch threads, load."""
    cpuinfo_model, flags = None, set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpuinfo_model is None:
                cpuinfo_model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    model = cpuinfo_model or platform.processor() or "unknown CPU"
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    if not bf16_isa:
        return (
            f"machine: {model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"MONAI {monai.__version__}, load average {load}"
        )
    isa = sorted(f for f in flags if f.startswith("amx") or f == "avx512_bf16") or ["none (no amx*, no avx512_bf16)"]
    return (
        f"machine: {model}, {os.cpu_count()} cores, bf16 ISA: {' '.join(isa)}, "
        f"torch {torch.__version__} (cpu capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads), MONAI {monai.__version__}, load average {load}"
    )


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on CPU for ``"bf16"``, a no-op for ``"fp32"``."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


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
