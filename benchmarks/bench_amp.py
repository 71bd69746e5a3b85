"""CPU bfloat16 autocast vs float32: speed of every 2D segmentation network, and the accuracy cost of one short run.

Speed mode (default): for each network of ``build_segmentation_network`` (unet, swinunetr, unetpp,
attention_unet) at each size preset (``small``, ``paper``), on ``--image-size`` px random RGB batches, time

* a training step: forward + per-sample Dice/BCE loss (float32) + backward + Adam step, and
* inference: forward under ``torch.no_grad`` in eval mode,

in float32 and under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (what ``amp_dtype="bf16"`` does in the
bundles, see ``qgssl_monai/engines/autocast.py``). Repeats interleave fp32 and bf16 (fp32, bf16, fp32, ...)
so drifting machine load hits both alike; repeat 0 is a warm-up and is dropped; the table gives medians of
process CPU time and of wall time per image, and ``speedup = time fp32 / time bf16`` (> 1: bf16 faster).
Two micro-kernels (1024x1024 matmul, 64-channel 3x3 conv) are timed the same way, and the CPU's ISA flags
are printed: CPU bf16 only pays off with AMX or AVX512_BF16; without them PyTorch emulates bf16 arithmetic.

Accuracy mode (``--accuracy``): one short ``ssl_segmentation`` bundle run (SUP, small U-Net, 64 px generated
demo data or ``--manifest``, fixed seeds) trained with ``amp_dtype="none"`` and with ``"bf16"``; reports the
best validation mean Dice and the test Dice (evaluation runs in float32 in both) and their differences.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_amp.py [--image-size 224] [--json out.json]
    OMP_NUM_THREADS=1 python benchmarks/bench_amp.py --accuracy [--seeds 0 1] [--epochs 5 --epoch-length 20]
    python benchmarks/bench_amp.py --quick            # < 60 s smoke run (64 px, small presets)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import autocast, finish, machine_line  # noqa: E402

from qgssl_monai.losses import PerSampleDiceBCELoss
from qgssl_monai.networks.segmentation import build_segmentation_network, count_parameters

REPO = Path(__file__).resolve().parents[1]
NETWORKS = ("unet", "swinunetr", "unetpp", "attention_unet")
PRECISIONS = ("fp32", "bf16")






def time_interleaved(
    runners: dict[str, Callable[[], None]], repeats: int, progress: tqdm | None = None
) -> dict[str, dict[str, float]]:
    """Run every runner ``repeats + 1`` times, interleaved; drop repeat 0 (warm-up).

    Returns:
        ``{name: {"cpu": median process-CPU seconds, "wall": median wall seconds}}`` per call of the runner.
    """
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    wall: dict[str, list[float]] = {name: [] for name in runners}
    for repeat in range(repeats + 1):
        for name, run in runners.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            run()
            if repeat > 0:
                wall[name].append(time.perf_counter() - start_wall)
                cpu[name].append(time.process_time() - start_cpu)
            if progress is not None:
                progress.update()
    return {name: {"cpu": statistics.median(cpu[name]), "wall": statistics.median(wall[name])} for name in runners}


def network_runners(
    name: str, size: str, image_size: int, batch: int, steps: int, seed: int = 0
) -> tuple[dict[str, Callable[[], None]], int]:
    """Closures ``{"train fp32", "train bf16", "infer fp32", "infer bf16"}`` each doing ``steps`` calls on ``batch``
    random images ``(batch, 3, image_size, image_size)`` in ``[0, 1]``; also returns the parameter count."""
    torch.manual_seed(seed)
    network = build_segmentation_network(name, size=size)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    loss_fn = PerSampleDiceBCELoss()
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, image_size, image_size, generator=generator)
    label = (torch.rand(batch, 1, image_size, image_size, generator=generator) > 0.7).float()

    def train(precision: str) -> Callable[[], None]:
        def run() -> None:
            network.train()
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                with autocast(precision):
                    logits = network(image)
                loss = loss_fn(logits.float(), label).mean()  # loss in float32, as AutocastInferer does
                loss.backward()
                optimizer.step()

        return run

    def infer(precision: str) -> Callable[[], None]:
        def run() -> None:
            network.eval()
            with torch.no_grad(), autocast(precision):
                for _ in range(steps):
                    network(image)

        return run

    runners = {f"{kind} {p}": make(p) for kind, make in (("train", train), ("infer", infer)) for p in PRECISIONS}
    return runners, count_parameters(network)


def kernel_runners(
    steps: int, matmul_n: int = 1024, conv_px: int = 224, seed: int = 0
) -> dict[str, dict[str, Callable[[], None]]]:
    """Micro-kernels: an ``n x n`` matmul (explicit bf16 tensors) and a 64-channel 3x3 conv on ``(1, 64, px, px)``
    (under autocast); keys are the row labels."""
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.rand(matmul_n, matmul_n, generator=generator), torch.rand(matmul_n, matmul_n, generator=generator)
    a16, b16 = a.bfloat16(), b.bfloat16()
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).eval()
    x = torch.rand(1, 64, conv_px, conv_px, generator=generator)

    def matmul(precision: str) -> Callable[[], None]:
        left, right = (a16, b16) if precision == "bf16" else (a, b)

        def run() -> None:
            for _ in range(steps):
                torch.mm(left, right)

        return run

    def conv_run(precision: str) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), autocast(precision):
                for _ in range(steps):
                    conv(x)

        return run

    return {
        f"matmul {matmul_n}^2": {f"infer {p}": matmul(p) for p in PRECISIONS},
        f"conv3x3 64ch {conv_px}px": {f"infer {p}": conv_run(p) for p in PRECISIONS},
    }


def run_speed(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time every network/size (and the micro-kernels); one row per (network, size, mode)."""
    cases = [(n, s) for s in args.sizes for n in args.networks]
    progress = tqdm(total=(len(cases) * 4 + 4) * (args.repeats + 1), desc="bench_amp", unit="run", disable=None)
    rows: list[dict[str, Any]] = []
    for kernel, runners in kernel_runners(args.steps, args.matmul_n, args.conv_px).items():
        times = time_interleaved(runners, args.repeats, progress)
        rows.append(_row(kernel, "-", 0, "infer", times, args.steps))
    for name, size in cases:
        runners, parameters = network_runners(name, size, args.image_size, args.batch, args.steps)
        times = time_interleaved(runners, args.repeats, progress)
        for mode in ("train", "infer"):
            rows.append(_row(name, size, parameters, mode, times, args.steps * args.batch))
    progress.close()
    return rows


def _row(network: str, size: str, parameters: int, mode: str, times: dict, items: int) -> dict[str, Any]:
    fp32, bf16 = times[f"{mode} fp32"], times[f"{mode} bf16"]
    return {
        "network": network,
        "size": size,
        "params": parameters,
        "mode": mode,
        "fp32_cpu_ms": 1000 * fp32["cpu"] / items,
        "bf16_cpu_ms": 1000 * bf16["cpu"] / items,
        "speedup_cpu": fp32["cpu"] / bf16["cpu"],
        "fp32_wall_ms": 1000 * fp32["wall"] / items,
        "bf16_wall_ms": 1000 * bf16["wall"] / items,
        "speedup_wall": fp32["wall"] / bf16["wall"],
    }


SPEED_COLUMNS = ("fp32_cpu_ms", "bf16_cpu_ms", "speedup_cpu", "fp32_wall_ms", "bf16_wall_ms", "speedup_wall")


def format_speed_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"image {args.image_size}px, batch {args.batch}, {args.steps} calls x {args.repeats} interleaved repeats (median, "
        "warm-up dropped); ms per image (micro-kernels: ms per call); speedup = fp32 time / bf16 time",
        f"{'network':<20}{'size':<7}{'params':>11}  {'mode':<6}"
        + "".join(f"{c.replace('_ms', ' ms').replace('_', ' '):>14}" for c in SPEED_COLUMNS),
    ]
    for row in rows:
        cells = "".join(f"{row[c]:>14.3f}" if c.startswith("speedup") else f"{row[c]:>14.2f}" for c in SPEED_COLUMNS)
        lines.append(f"{row['network']:<20}{row['size']:<7}{row['params']:>11,}  {row['mode']:<6}{cells}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ accuracy mode


def run_bundle_once(manifest: Path, out: Path, amp_dtype: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """Train the ssl_segmentation bundle (SUP, small U-Net) once; returns best val Dice, test Dice and CPU seconds."""
    from monai.bundle import ConfigWorkflow

    configs = REPO / "bundles" / "ssl_segmentation" / "configs"
    workflow = ConfigWorkflow(
        config_file=[str(configs / name) for name in ("train.json", "method/sup.json", "net/unet.json")],
        workflow_type="train",
        meta_file=str(configs / "metadata.json"),
        logging_file=False,
        bundle_root=str(REPO / "bundles" / "ssl_segmentation"),
        dataset_dir=str(manifest.parent),
        manifest=str(manifest),
        output_dir=str(out / "eval"),
        ckpt_dir=str(out / "models"),
        image_size=args.accuracy_image_size,
        batch_size=8,
        unlabeled_batch_size=8,
        num_workers=0,
        num_epochs=args.epochs,
        epoch_length=args.epoch_length,
        network_size="small",
        device="cpu",
        seed=seed,
        amp_dtype=amp_dtype,
    )
    workflow.initialize()
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    workflow.run()
    elapsed_cpu, elapsed_wall = time.process_time() - start_cpu, time.perf_counter() - start_wall
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    workflow.finalize()
    summary = json.loads((out / "eval" / "test_metrics_summary.json").read_text())
    return {
        "val_dice": float(evaluator.state.best_metric),
        "test_dice": float(summary["dice"]["mean"]),
        "test_dice_se": float(summary["dice"]["se"]),
        "cpu_s": elapsed_cpu,
        "wall_s": elapsed_wall,
    }


def run_accuracy(args: argparse.Namespace) -> list[dict[str, Any]]:
    """fp32 and bf16 bundle runs per seed (interleaved); one row per seed with both results and the differences."""
    with tempfile.TemporaryDirectory(prefix="bench_amp_") as tmp:
        if args.manifest is not None:
            manifest = Path(args.manifest).resolve()
        else:
            from qgssl_monai.data.demo import generate_demo_dataset

            manifest = generate_demo_dataset(
                Path(tmp) / "demo", n_labeled=80, n_unlabeled=8, image_size=args.accuracy_image_size, seed=0
            )
        rows = []
        for seed in args.seeds:
            result = {p: run_bundle_once(manifest, Path(tmp) / f"{p}_{seed}", p, seed, args) for p in ("none", "bf16")}
            fp32, bf16 = result["none"], result["bf16"]
            rows.append(
                {
                    "seed": seed,
                    **{f"fp32_{k}": v for k, v in fp32.items()},
                    **{f"bf16_{k}": v for k, v in bf16.items()},
                    "diff_val_dice": bf16["val_dice"] - fp32["val_dice"],
                    "diff_test_dice": bf16["test_dice"] - fp32["test_dice"],
                }
            )
    return rows


ACCURACY_COLUMNS = (
    "fp32_val_dice", "bf16_val_dice", "diff_val_dice", "fp32_test_dice", "bf16_test_dice", "diff_test_dice",
    "fp32_cpu_s", "bf16_cpu_s",
)  # fmt: skip


def format_accuracy_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    source = args.manifest or f"generated demo data (80 labeled, {args.accuracy_image_size} px, 56/8/16 split)"
    lines = [
        f"ssl_segmentation bundle, SUP + small unet, {source}, batch 8, {args.epochs} epochs x {args.epoch_length} "
        "steps; trained with amp_dtype none vs bf16, evaluated in fp32; val = best validation mean Dice, "
        "test = mean test Dice; diff = bf16 - fp32",
        f"{'seed':<6}" + "".join(f"{c.replace('_', ' '):>16}" for c in ACCURACY_COLUMNS),
    ]
    for row in rows:
        cells = "".join(f"{row[c]:>16.1f}" if c.endswith("_s") else f"{row[c]:>16.4f}" for c in ACCURACY_COLUMNS)
        lines.append(f"{row['seed']:<6}{cells}")
    if len(rows) > 1:
        means = "".join(
            f"{statistics.mean(r[c] for r in rows):>16.{1 if c.endswith('_s') else 4}f}" for c in ACCURACY_COLUMNS
        )
        lines.append(f"{'mean':<6}{means}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
    parser.add_argument("--sizes", nargs="+", default=["small", "paper"], choices=("small", "paper"))
    parser.add_argument("--image-size", type=int, default=224, help="square input side (divisible by 32)")
    parser.add_argument("--batch", type=int, default=2, help="images per call")
    parser.add_argument("--steps", type=int, default=1, help="calls per timed repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per precision (plus one warm-up)")
    parser.add_argument("--matmul-n", type=int, default=1024, help="side of the matmul micro-kernel")
    parser.add_argument("--conv-px", type=int, default=224, help="image side of the conv micro-kernel")
    parser.add_argument("--accuracy", action="store_true", help="run the fp32 vs bf16 bundle accuracy comparison instead")
    parser.add_argument("--manifest", help="accuracy mode: data manifest (default: generated demo data)")
    parser.add_argument("--accuracy-image-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="accuracy mode: training seeds")
    parser.add_argument("--epochs", type=int, default=5, help="accuracy mode: epochs")
    parser.add_argument("--epoch-length", type=int, default=20, help="accuracy mode: optimizer steps per epoch")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 64 px, small presets, 1 repeat, small kernels (1 seed, 2x2 steps)"
    )
    parser.add_argument("--json", type=Path, help="also write the rows and settings to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.sizes, args.steps, args.repeats = 64, ["small"], 1, 1
        args.matmul_n, args.conv_px = 512, 64
        args.seeds, args.epochs, args.epoch_length, args.accuracy_image_size = args.seeds[:1], 2, 2, 32
    if args.image_size % 32:
        parser.error(f"--image-size must be divisible by 32 (SwinUNETR), got {args.image_size}")

    machine = machine_line(bf16_isa=True)
    if args.accuracy:
        rows = run_accuracy(args)
        table = format_accuracy_table(rows, args)
    else:
        rows = run_speed(args)
        table = format_speed_table(rows, args)
    return finish(machine, args, rows, table)


if __name__ == "__main__":
    main(sys.argv[1:])
