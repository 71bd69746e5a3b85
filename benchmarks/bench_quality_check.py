"""Latency and throughput of the quality check (g with each ``--backbones`` entry) on the CPU, fp32 and bf16 autocast.

Two paths, both through :class:`qgssl_monai.serving.quality_check.QualityChecker` (what ``qgssl quality-check``
and the MONAI Label app use):

* ``model``: ``checker.network.score(image, mask)`` on tensors already at g's input size (the network alone);
* ``files``: ``checker.score_file(image_png, mask_png)`` / ``checker.score_files([...])`` on generated demo
  PNGs of ``--image-px`` px: PNG decode, RGB/mask conversion, resize to g's size, stacking and the network
  (the ``qgssl quality-check --image/--csv`` code path, minus interpreter start-up).

For each backbone (default: ``resnet18`` and ``efficientnet_lite0``) and path: per-call latency at batch 1 (median and 95th percentile over ``--calls`` calls after
``--warmup`` calls) and images/s at batch ``--batch`` (median over ``--repeats`` repeats). fp32 and bf16
calls are interleaved so machine-load drift hits both alike. g has *random* weights (timing does not depend on
the weight values; nothing is trained or downloaded). The one-off start-up (``QualityChecker(...)``: building g
and loading its checkpoint) is reported separately.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_quality_check.py [--size 224] [--calls 50] [--json out.json]
    OMP_NUM_THREADS=1 python benchmarks/bench_quality_check.py --backbones efficientnet_lite0
    python benchmarks/bench_quality_check.py --quick        # < 60 s smoke run (64 px, 10 calls)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import autocast, finish, machine_line  # noqa: E402

from qgssl_monai.data.demo import generate_demo_dataset
from qgssl_monai.data.manifest import load_split
from qgssl_monai.networks.quality import QualityPredictor
from qgssl_monai.serving.quality_check import QualityChecker

PRECISIONS = ("fp32", "bf16")
COLUMNS = ("fp32_wall", "bf16_wall", "bf16_speedup", "fp32_cpu", "bf16_cpu")
DEFAULT_BACKBONES = ("resnet18", "efficientnet_lite0")






def timed_calls(calls: dict[str, Callable[[], object]], count: int, warmup: int, progress: tqdm) -> dict[str, dict]:
    """Call each function ``warmup + count`` times, interleaved; keep the last ``count`` wall/CPU durations (s)."""
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for index in range(warmup + count):
        for name, call in calls.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            call()
            if index >= warmup:
                wall[name].append(time.perf_counter() - start_wall)
                cpu[name].append(time.process_time() - start_cpu)
            progress.update()
    return {name: {"wall": np.asarray(wall[name]), "cpu": np.asarray(cpu[name])} for name in calls}


def with_precision(precision: str, call: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with autocast(precision):
            return call()

    return run


def latency_rows(path: str, times: dict[str, dict]) -> list[dict[str, Any]]:
    """Median and p95 latency (ms) of batch-1 calls."""
    rows = []
    for statistic, q in (("latency b1 median ms", 50), ("latency b1 p95 ms", 95)):
        row: dict[str, Any] = {"path": path, "metric": statistic}
        for p in PRECISIONS:
            row[f"{p}_wall"] = 1000 * float(np.percentile(times[p]["wall"], q))
            row[f"{p}_cpu"] = 1000 * float(np.percentile(times[p]["cpu"], q))
        row["bf16_speedup"] = row["fp32_wall"] / row["bf16_wall"]
        rows.append(row)
    return rows


def throughput_row(path: str, times: dict[str, dict], batch: int) -> dict[str, Any]:
    """Images per second (per wall second and per process-CPU second) at batch ``batch``, median of repeats."""
    row: dict[str, Any] = {"path": path, "metric": f"images/s b{batch}"}
    for p in PRECISIONS:
        row[f"{p}_wall"] = batch / float(np.median(times[p]["wall"]))
        row[f"{p}_cpu"] = batch / float(np.median(times[p]["cpu"]))
    row["bf16_speedup"] = row["bf16_wall"] / row["fp32_wall"]
    return row


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Generate demo PNGs once, then time every backbone in ``args.backbones``; one row per backbone and metric."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_quality_check_") as tmp:
        manifest = generate_demo_dataset(
            Path(tmp) / "demo", n_labeled=args.batch, n_unlabeled=0, image_size=args.image_px, seed=args.seed
        )
        items = [item for split in ("training", "validation", "test") for item in load_split(manifest, split)]
        pairs = [(item["image"], item["label"]) for item in items]
        for backbone in args.backbones:
            rows += [{"backbone": backbone, **row} for row in run_backbone(args, backbone, Path(tmp), pairs)]
    return rows


def run_backbone(args: argparse.Namespace, backbone: str, tmp: Path, pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Build a QualityChecker on a random-weight g with ``backbone``, time both paths; one row per metric."""
    rows: list[dict[str, Any]] = []
    checkpoint = tmp / f"g_{backbone}.pt"
    torch.manual_seed(args.seed)
    torch.save(QualityPredictor(in_channels=4, backbone=backbone).state_dict(), checkpoint)

    startup_wall, startup_cpu = [], []
    for _ in range(3):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        checker = QualityChecker(checkpoint, image_size=args.size, image_channels=3, backbone=backbone, batch_size=args.batch)
        startup_wall.append(time.perf_counter() - start_wall)
        startup_cpu.append(time.process_time() - start_cpu)
    startup = {"wall": 1000 * statistics.median(startup_wall), "cpu": 1000 * statistics.median(startup_cpu)}

    generator = torch.Generator().manual_seed(args.seed)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=generator)
    masks = (torch.rand(args.batch, 1, args.size, args.size, generator=generator) > 0.5).float()
    network = checker.network

    def model_call(batch: int) -> Callable[[], object]:
        return lambda: network.score(images[:batch], masks[:batch])

    total = (len(PRECISIONS) * 2) * ((args.warmup + args.calls) + (1 + args.repeats))
    progress = tqdm(total=total, desc=f"bench_quality_check {backbone}", unit="call", disable=None)
    with torch.no_grad():
        single = {p: with_precision(p, model_call(1)) for p in PRECISIONS}
        rows += latency_rows("model", timed_calls(single, args.calls, args.warmup, progress))
        batched = {p: with_precision(p, model_call(args.batch)) for p in PRECISIONS}
        bn = timed_calls(batched, args.repeats, 1, progress)
        rows.append(throughput_row("model", bn, args.batch))
    # score_file / score_files run under their own no_grad; a new pair per call so no decode is cached
    cycle = {"index": 0}

    def file_call() -> float:
        image, mask = pairs[cycle["index"] % len(pairs)]
        cycle["index"] += 1
        return checker.score_file(image, mask)

    b1 = timed_calls({p: with_precision(p, file_call) for p in PRECISIONS}, args.calls, args.warmup, progress)
    rows += latency_rows("files", b1)
    batched_files = {p: with_precision(p, lambda: checker.score_files(pairs)) for p in PRECISIONS}
    bn = timed_calls(batched_files, args.repeats, 1, progress)
    rows.append(throughput_row("files", bn, len(pairs)))
    progress.close()
    rows.append({
        "path": "startup", "metric": "QualityChecker() ms", "fp32_wall": startup["wall"], "fp32_cpu": startup["cpu"]
    })
    return rows


def format_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"g = quality predictor (random weights) at {args.size}px; files = demo PNGs of {args.image_px}px "
        f"(decode + resize + g); latency over {args.calls} calls after {args.warmup} warm-up; images/s median of "
        f"{args.repeats} repeats; wall and process-CPU columns (latency ms, throughput images/s);\n"
        "bf16 speedup = fp32 wall time / bf16 wall time (< 1: bf16 slower)",
        f"{'backbone':<20}{'path':<9}{'metric':<22}" + "".join(f"{c.replace('_', ' '):>14}" for c in COLUMNS),
    ]
    for row in rows:
        cells = "".join(
            f"{'-':>14}" if c not in row else f"{row[c]:>14.3f}" if c == "bf16_speedup" else f"{row[c]:>14.1f}" for c in COLUMNS
        )
        lines.append(f"{row['backbone']:<20}{row['path']:<9}{row['metric']:<22}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224, help="g's input side in px (default 224)")
    parser.add_argument("--image-px", type=int, default=320, help="side of the demo PNGs scored by the files path")
    parser.add_argument("--calls", type=int, default=50, help="timed batch-1 calls per precision and path (>= 50)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32, help="batch size of the throughput rows")
    parser.add_argument("--repeats", type=int, default=5, help="timed batch calls per precision and path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbones", nargs="+", default=list(DEFAULT_BACKBONES), help="quality backbones to time (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 px, 10 calls, batch 8, 2 repeats")
    parser.add_argument("--json", type=Path, help="also write the rows and settings to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.image_px, args.calls, args.warmup, args.batch, args.repeats = 64, 96, 10, 2, 8, 2
    if args.batch < 3:
        parser.error("--batch must be >= 3 (the demo generator needs one image per split)")

    machine = machine_line()
    rows = run(args)
    table = format_table(rows, args)
    return finish(machine, args, rows, table)


if __name__ == "__main__":
    main(sys.argv[1:])
