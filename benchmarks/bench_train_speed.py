"""Training throughput on CPU: the eager plain PyTorch loop against the project's fastest path.

For each network (AttentionUnet, BasicUNet++, SwinUNETR-2D, UNet; medium presets below) at 128 px, batch 8
labeled + 8 unlabeled, and the PL-QW and QAR steps (g: a ResNet-18 ``QualityPredictor``):

* **eager**: a hand-written float32 loop (two student forwards, NCHW, no compile), as in
  ``bench_engine_overhead.py``;
* **fast**: ``SemiSupervisedTrainer`` with what ``configs/speed.json`` selects on this machine
  (``qgssl_monai.engines.speed``): bf16 autocast only if the CPU has AMX, channels_last if it measures faster,
  ``torch.compile`` (inductor) if a C++ compiler exists, one batched labeled+unlabeled forward if the network
  has no BatchNorm.

Both start from the same weights and see the same batches. Repeats are interleaved (eager, fast, eager, ...);
the first run of each is a warm-up (for fast it includes compilation, reported separately as ``compile_cpu_s``).
Throughput is labeled + unlabeled images per *process CPU second* (the machine is shared: wall time is
inflated unevenly by other processes; with 2 threads, CPU seconds count both threads). Numerical check: the
mean loss of the last timed run of each path (same steps, same batches) must agree within ``--rtol``.
Each (network, threads) pair runs in a fresh interpreter (OpenMP pool and inductor kernels are per thread count).

Usage::

    python benchmarks/bench_train_speed.py [--threads 1 2] [--networks ...] [--json FILE] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import finish, machine_line  # noqa: E402
from bench_engine_overhead import EMA_DECAY, LAMBDA, build_engine  # noqa: E402

from qgssl_monai.engines import speed  # noqa: E402
from qgssl_monai.losses import PerSampleDiceBCELoss  # noqa: E402
from qgssl_monai.networks.quality import QualityPredictor  # noqa: E402
from qgssl_monai.networks.segmentation import build_segmentation_network  # noqa: E402

#: the issue's 4-level AttentionUnet (16...128 channels) and comparable presets of the other networks
NETWORKS: dict[str, dict[str, Any]] = {
    "attention_unet": {"name": "attention_unet", "channels": (16, 32, 64, 128), "strides": (2, 2, 2)},
    "unetpp": {"name": "unetpp", "features": (16, 16, 32, 64, 128, 16)},
    "swinunetr2d": {"name": "swinunetr", "feature_size": 12, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24)},
    "unet": {"name": "unet", "channels": (16, 32, 64, 128), "strides": (2, 2, 2), "num_res_units": 2},
}
COLUMNS = ("eager_img_s", "fast_img_s", "speedup", "compile_cpu_s", "eager_loss", "fast_loss", "loss_rel_diff")


def build_student(network: str, quick: bool) -> torch.nn.Module:
    kwargs = dict(NETWORKS[network])
    name = kwargs.pop("name")
    return build_segmentation_network(name, size="small", init_seed=0, **({} if quick else kwargs))


def make_batches(steps: int, batch: int, size: int, seed: int = 0) -> tuple[list[dict], list[torch.Tensor]]:
    """``steps`` labeled dicts (image ``(B, 3, S, S)`` in [0, 1], label ``(B, 1, S, S)`` in {0, 1}) and unlabeled images."""
    generator = torch.Generator().manual_seed(seed)
    labeled = [
        {"image": torch.rand(batch, 3, size, size, generator=generator),
         "label": (torch.rand(batch, 1, size, size, generator=generator) > 0.7).float()}
        for _ in range(steps)
    ]  # fmt: skip
    return labeled, [torch.rand(batch, 3, size, size, generator=generator) for _ in range(steps)]


def quality_net() -> torch.nn.Module:
    torch.manual_seed(1)
    return QualityPredictor(in_channels=4, backbone="resnet18").eval().requires_grad_(False)


def eager_runner(network: str, method: str, labeled: list, unlabeled: list, quick: bool) -> Callable[[], list[float]]:
    """The plain float32 loop; each call trains on all batches and returns the per-step losses."""
    student, quality = build_student(network, quick), quality_net()
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    loss_fn, weight = PerSampleDiceBCELoss(), LAMBDA[method]

    def run() -> list[float]:
        losses = []
        student.train()
        for batch, image_u in zip(labeled, unlabeled):
            optimizer.zero_grad(set_to_none=False)
            sup = loss_fn(student(batch["image"]), batch["label"]).mean()
            if method == "qar":
                probs = torch.sigmoid(student(image_u))
                unsup = 1.0 - quality(torch.cat([image_u, probs], 1)).reshape(-1).float().mean()
            else:
                with torch.no_grad():
                    pseudo = (torch.sigmoid(teacher(image_u)) > 0.5).float()
                    weights = quality(torch.cat([image_u, pseudo], 1)).reshape(-1).float()
                unsup = (loss_fn(student(image_u), pseudo) * weights).mean()
            loss = sup + weight * unsup
            loss.backward()
            optimizer.step()
            if method == "pl-qw":
                with torch.no_grad():
                    torch._foreach_lerp_(list(teacher.parameters()), [p.detach() for p in student.parameters()], 1 - EMA_DECAY)
            losses.append(float(loss.detach()))
        return losses

    return run


def fast_runner(
    network: str, method: str, labeled: list, unlabeled: list, quick: bool
) -> tuple[Callable[[], list[float]], dict[str, Any]]:
    """The engine on the speed path chosen for this machine (as ``configs/speed.json`` does); returns the runner
    and the choices made."""
    amp = speed.select_amp_dtype("auto", "cpu")
    models = (build_student(network, quick), quality_net())
    trainer = build_engine(method, labeled, unlabeled, amp, fast=True, models=models)
    losses: list[float] = []
    # MONAI decollates the output into per-sample dicts (each holding the batch's scalar loss)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: losses.append(engine.state.output[0]["loss"]))

    def run() -> list[float]:
        losses.clear()
        trainer.run()
        return list(losses)

    channels_last = bool(trainer.to_kwargs.get("memory_format") == torch.channels_last)
    choices = {"amp": amp, "channels_last": channels_last, "compile": trainer.compile, "batched": trainer.batched_forward}
    return run, choices


def run_configuration(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Both methods for one (network, threads) pair, in this process; one row per method."""
    torch.set_num_threads(int(spec["threads"]))
    labeled, unlabeled = make_batches(spec["steps"], spec["batch"], spec["image_size"])
    images = 2 * spec["batch"] * spec["steps"]
    rows = []
    for method in spec["methods"]:
        eager = eager_runner(spec["network"], method, labeled, unlabeled, spec["quick"])
        start_cpu = time.process_time()
        fast, choices = fast_runner(spec["network"], method, labeled, unlabeled, spec["quick"])
        setup_cpu = time.process_time() - start_cpu  # includes the channels_last measurement
        cpu: dict[str, list[float]] = {"eager": [], "fast": []}
        wall: dict[str, list[float]] = {"eager": [], "fast": []}
        losses: dict[str, list[float]] = {}
        compile_cpu = compile_wall = 0.0
        for repeat in range(spec["repeats"] + 1):
            for name, run in (("eager", eager), ("fast", fast)):
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                losses[name] = run()
                elapsed_cpu, elapsed_wall = time.process_time() - start_cpu, time.perf_counter() - start_wall
                if repeat == 0:
                    if name == "fast":
                        compile_cpu, compile_wall = elapsed_cpu, elapsed_wall
                else:
                    cpu[name].append(elapsed_cpu)
                    wall[name].append(elapsed_wall)
        eager_ips, fast_ips = images / statistics.median(cpu["eager"]), images / statistics.median(cpu["fast"])
        # the warm-up run of the fast path = compilation + one run; report the compilation part
        # (inductor builds kernels in worker processes too: their CPU is not in compile_cpu_s, it is in the wall time)
        compile_cpu = max(compile_cpu - statistics.median(cpu["fast"]), 0.0)
        compile_wall = max(compile_wall - statistics.median(wall["fast"]), 0.0)
        eager_loss, fast_loss = statistics.fmean(losses["eager"]), statistics.fmean(losses["fast"])
        rows.append({
            "network": spec["network"], "method": method, "threads": spec["threads"],
            "eager_img_s": eager_ips, "fast_img_s": fast_ips, "speedup": fast_ips / eager_ips,
            "eager_wall_img_s": images / statistics.median(wall["eager"]),
            "fast_wall_img_s": images / statistics.median(wall["fast"]),
            "compile_cpu_s": compile_cpu, "compile_wall_s": compile_wall, "setup_cpu_s": setup_cpu,
            "eager_loss": eager_loss, "fast_loss": fast_loss,
            "loss_rel_diff": abs(fast_loss - eager_loss) / abs(eager_loss),
            **choices,
        })  # fmt: skip
        print(f"{spec['network']} {method} {spec['threads']}T: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def run_in_subprocess(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """:func:`run_configuration` in a fresh interpreter with ``OMP_NUM_THREADS=threads`` (started, not forked:
    a fork after OpenMP work can hang)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    command = [sys.executable, str(Path(__file__).resolve()), "--child-spec", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"bench_train_speed {spec} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    sys.stderr.write(done.stderr)
    return json.loads(lines[-1])


def format_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"{args.image_size} px, batch {args.batch}+{args.batch}, {args.steps} steps x {args.repeats} repeats (median) "
        f"after 1 warm-up run; img/s per process CPU second; fast = speed path chosen on this machine "
        f"(amp / channels_last / compile / batched forward); loss = mean over the last run, tolerance rtol {args.rtol}",
        f"{'network':<15}{'method':<7}{'thr':>4}{'eager':>9}{'fast':>9}{'speedup':>9}{'compile s':>11}"
        f"{'loss eager':>12}{'loss fast':>11}{'rel diff':>10}  path",
    ]
    for r in rows:
        path = "/".join([r["amp"] if r["amp"] != "none" else "fp32", "cl" if r["channels_last"] else "nchw",
                         "compiled" if r["compile"] else "eager", "batched" if r["batched"] else "2-fwd"])
        ok = "ok" if r["loss_rel_diff"] <= args.rtol else "OUT"
        lines.append(
            f"{r['network']:<15}{r['method']:<7}{r['threads']:>4}{r['eager_img_s']:>9.2f}{r['fast_img_s']:>9.2f}"
            f"{r['speedup']:>8.2f}x{r['compile_cpu_s']:>11.0f}{r['eager_loss']:>12.4f}{r['fast_loss']:>11.4f}"
            f"{r['loss_rel_diff']:>9.3f} {ok}  {path}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--methods", nargs="+", default=["pl-qw", "qar"], choices=list(LAMBDA))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="labeled and unlabeled batch size")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path (plus one warm-up)")
    parser.add_argument("--rtol", type=float, default=0.05, help="numerical tolerance on the mean loss")
    parser.add_argument("--quick", action="store_true", help="smoke run: small presets, 64 px, 2+2 batch, 1 thread")
    parser.add_argument("--json", type=Path, help="also write the rows and settings to this JSON file")
    parser.add_argument("--merge", type=Path, nargs="+", help="only print/save the rows of these earlier --json files")
    parser.add_argument("--child-spec", help=argparse.SUPPRESS)  # internal: one (network, threads) pair
    args = parser.parse_args(argv)
    if args.merge:  # runs split over several invocations (e.g. one network at a time) into one table
        parts = [json.loads(path.read_text()) for path in args.merge]
        rows = [row for part in parts for row in part["rows"]]
        return finish("; ".join(part["machine"] for part in parts[:1]), args, rows, format_table(rows, args))
    if args.child_spec is not None:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        print(json.dumps(run_configuration(json.loads(args.child_spec)), default=float))
        return {}
    if args.quick:
        args.image_size, args.batch, args.steps, args.repeats, args.threads = 64, 2, 2, 1, [1]
    machine = machine_line(bf16_isa=True)
    rows = []
    for threads in args.threads:
        for network in args.networks:
            spec = {"network": network, "threads": threads, "methods": args.methods, "steps": args.steps,
                    "repeats": args.repeats, "batch": args.batch, "image_size": args.image_size, "quick": args.quick}
            rows += run_in_subprocess(spec)
    return finish(machine, args, rows, format_table(rows, args))


if __name__ == "__main__":
    main(sys.argv[1:])
