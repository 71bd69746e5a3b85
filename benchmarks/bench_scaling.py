"""How SSL training cost scales with image size and unlabeled-set size: time per epoch, cache fill, peak RSS.

Every configuration runs in a fresh child process (a new interpreter, so peak memory does
not accumulate across configurations) that builds what the ``ssl_segmentation`` bundle builds, without its
validation/checkpoint handlers:

* labeled and unlabeled ``CacheDataset``s (``qgssl_monai.data.cache.build_cached_dataset``, the bundle's
  ``get_seg_transforms`` / ``get_unlabeled_transforms`` chains with augmentation) over generated demo PNGs
  (``qgssl_monai.data.demo``, one data set per image size, so nothing needs ``../shared``);
  the deterministic part (decode + resize) is cached, the random augmentation runs per batch;
* ``DataLoader``s (seeded random sampling, ``--workers`` workers, drop_last), the small attention U-Net
  (``--network``), Adam, and ``SemiSupervisedTrainer`` with SUP or PL-QW (EMA teacher pseudo-labels weighted
  by a random-weight ResNet-18 quality predictor g; timing does not depend on g's weights).

The labeled set is fixed (``--labeled`` images); the unlabeled pool is ``--multiples`` x that. One epoch is
``--epoch-length`` optimizer steps on batch ``--batch`` labeled + ``--batch`` unlabeled, so an epoch does the
same work for every pool size. Epoch 1 is a warm-up; "epoch" columns are the median of the following
``--epochs`` epochs, measured from ignite's EPOCH_STARTED to EPOCH_COMPLETED (batch loading + augmentation +
steps; cache filling is *not* included and is reported separately as "cache fill", labeled + unlabeled).
Peak RSS is the child's ``VmHWM`` (/proc/self/status) at the end of the run ("RSS start": its RSS when it
starts, i.e. the imported libraries). SUP does not read the
unlabeled pool (the bundle does not build its loader either), so SUP rows are only in the image-size sweep.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_scaling.py [--sizes 128 224 320] [--multiples 1 4 16] [--json out.json]
    python benchmarks/bench_scaling.py --quick          # < 60 s smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from torch.utils.data import DataLoader, RandomSampler
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import finish, machine_line  # noqa: E402

from qgssl_monai.data.cache import build_cached_dataset
from qgssl_monai.data.demo import generate_demo_dataset
from qgssl_monai.data.manifest import load_split
from qgssl_monai.engines.ssl_trainer import SemiSupervisedTrainer, ssl_optimizer_parameters
from qgssl_monai.handlers.ema import EMATeacherHandler
from qgssl_monai.methods import build_method
from qgssl_monai.networks.quality import QualityPredictor
from qgssl_monai.networks.segmentation import build_segmentation_network
from qgssl_monai.transforms.io import get_seg_transforms, get_unlabeled_transforms

COLUMNS = (
    "epoch_wall_s", "epoch_cpu_s", "step_cpu_ms", "cache_fill_s", "cache_images", "rss_start_mb", "peak_rss_mb",
)  # fmt: skip




def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (``VmHWM``; ``ru_maxrss`` where /proc is missing)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------------------------ one configuration


def run_configuration(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration (in this process) and measure it.

    ``spec``: ``manifest``, ``method`` ("sup" | "pl-qw"), ``image_size``, ``labeled``, ``multiple``, ``batch``,
    ``epoch_length``, ``epochs`` (timed, after one warm-up epoch), ``network``, ``workers``, ``seed``.
    Returns the spec plus the measured columns (seconds, milliseconds, MiB).
    """
    rss_start = current_rss_mb()
    seed, size, batch = int(spec["seed"]), int(spec["image_size"]), int(spec["batch"])
    torch.manual_seed(seed)
    # the demo manifest splits its labeled pairs 70:10:20; here they are all one fixed labeled set
    splits = ("training", "validation", "test")
    labeled_items = [item for split in splits for item in load_split(spec["manifest"], split)][: spec["labeled"]]
    uses_unlabeled = spec["method"] != "sup"
    pool_size = spec["labeled"] * spec["multiple"] if uses_unlabeled else 0
    unlabeled_items = load_split(spec["manifest"], "unlabeled")[:pool_size]
    if len(labeled_items) < spec["labeled"] or len(unlabeled_items) < pool_size:
        raise ValueError(f"{spec['manifest']} holds too few samples for {spec}")

    start_wall, start_cpu = time.perf_counter(), time.process_time()
    labeled_transform = get_seg_transforms(size, train=True, augment=True)
    labeled_transform.set_random_state(seed)
    labeled_dataset = build_cached_dataset(
        labeled_items, labeled_transform, cache_rate=1.0, num_workers=0, progress=False
    )
    unlabeled_dataset = None
    if uses_unlabeled:
        unlabeled_transform = get_unlabeled_transforms(size, train=True, augment=True)
        unlabeled_transform.set_random_state(seed + 1)
        unlabeled_dataset = build_cached_dataset(
            unlabeled_items, unlabeled_transform, cache_rate=1.0, num_workers=0, progress=False
        )
    cache_wall, cache_cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu

    def loader(dataset: Any, offset: int) -> DataLoader:
        generator = torch.Generator().manual_seed(seed + offset)
        return DataLoader(
            dataset, batch_size=batch, sampler=RandomSampler(dataset, generator=generator), drop_last=True,
            num_workers=int(spec["workers"]),
        )  # fmt: skip

    network = build_segmentation_network(spec["network"], size="small")
    handlers = []
    if uses_unlabeled:
        quality = QualityPredictor(in_channels=4, backbone="resnet18").eval().requires_grad_(False)
        method = build_method(spec["method"], quality_net=quality)
        handlers.append(EMATeacherHandler())
    else:
        method = build_method("sup")
    optimizer = torch.optim.Adam(ssl_optimizer_parameters(network, method), lr=1e-3)
    trainer = SemiSupervisedTrainer(
        device="cpu",
        max_epochs=1 + int(spec["epochs"]),
        epoch_length=int(spec["epoch_length"]),
        train_data_loader=loader(labeled_dataset, 0),
        unlabeled_data_loader=loader(unlabeled_dataset, 1) if uses_unlabeled else None,
        network=network,
        optimizer=optimizer,
        method=method,
        train_handlers=handlers,
    )
    epoch_wall: list[float] = []
    epoch_cpu: list[float] = []
    marks: dict[str, float] = {}

    @trainer.on(Events.EPOCH_STARTED)
    def _start(_: Any) -> None:
        marks["wall"], marks["cpu"] = time.perf_counter(), time.process_time()

    @trainer.on(Events.EPOCH_COMPLETED)
    def _stop(engine: Any) -> None:
        if engine.state.epoch > 1:  # epoch 1 is the warm-up
            epoch_wall.append(time.perf_counter() - marks["wall"])
            epoch_cpu.append(time.process_time() - marks["cpu"])

    trainer.run()
    wall = statistics.median(epoch_wall)
    return {
        **{k: v for k, v in spec.items() if k != "manifest"},
        "epoch_wall_s": wall,
        "epoch_cpu_s": statistics.median(epoch_cpu),
        "step_cpu_ms": 1000 * statistics.median(epoch_cpu) / int(spec["epoch_length"]),
        "cache_fill_s": cache_wall,
        "cache_fill_cpu_s": cache_cpu,
        "cache_images": len(labeled_items) + len(unlabeled_items),
        "rss_start_mb": rss_start,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_in_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`run_configuration` in a fresh interpreter (``--child-spec``); raises with its output if it fails.

    A fresh process per configuration keeps every peak RSS (``VmHWM``) its own. It is started, not forked:
    a fork of a process whose OpenMP pool has run (any earlier torch work, e.g. under pytest) can deadlock.
    """
    command = [sys.executable, str(Path(__file__).resolve()), "--child-spec", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"bench_scaling configuration {spec} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1])


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Image-size sweep (SUP and PL-QW at the first multiple) + pool-size sweep (PL-QW at ``--pool-size-px``)."""
    base = {
        "labeled": args.labeled, "batch": args.batch, "epoch_length": args.epoch_length, "epochs": args.epochs,
        "network": args.network, "workers": args.workers, "seed": args.seed,
    }  # fmt: skip
    specs = []
    for method in args.methods:
        for size in args.sizes:
            specs.append({**base, "method": method, "image_size": size, "multiple": args.multiples[0], "sweep": "size"})
    for multiple in args.multiples[1:]:
        for method in (m for m in args.methods if m != "sup"):
            specs.append({**base, "method": method, "image_size": args.pool_size_px, "multiple": multiple, "sweep": "pool"})
    return specs


def format_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"{args.network} (small), batch {args.batch}+{args.batch}, epoch = {args.epoch_length} steps, median of "
        f"{args.epochs} epochs after 1 warm-up epoch, labeled set {args.labeled} images, {args.workers} loader workers;"
        "\nepoch times exclude cache filling (cache fill = labeled + unlabeled CacheDataset fill, wall s); "
        "RSS in MiB (start = child process after imports; peak = VmHWM of that child)",
        f"{'method':<7}{'px':>5}{'pool':>6}{'unlab':>7}" + "".join(f"{c.replace('_', ' '):>14}" for c in COLUMNS),
    ]
    for row in rows:
        pool = "-" if row["method"] == "sup" else f"{row['multiple']}x"
        unlabeled = 0 if row["method"] == "sup" else row["labeled"] * row["multiple"]
        cells = "".join(f"{row[c]:>14d}" if c == "cache_images" else f"{row[c]:>14.2f}" for c in COLUMNS)
        lines.append(f"{row['method']:<7}{row['image_size']:>5}{pool:>6}{unlabeled:>7}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224, 320], help="image sides (divisible by 8)")
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 4, 16], help="unlabeled pool = k x labeled set")
    parser.add_argument("--pool-size-px", type=int, default=224, help="image side of the pool-size sweep")
    parser.add_argument("--methods", nargs="+", default=["sup", "pl-qw"], help="SSL methods (build_method names)")
    parser.add_argument("--network", default="attention_unet", help="segmentation network (small preset)")
    parser.add_argument("--labeled", type=int, default=32, help="labeled images (fixed)")
    parser.add_argument("--batch", type=int, default=8, help="labeled and unlabeled batch size")
    parser.add_argument("--epoch-length", type=int, default=10, help="optimizer steps per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, help="keep the generated demo data here (default: a temp folder)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 px, pools 1x/2x of 8 images, 2+2 batch, 2 steps")
    parser.add_argument("--json", type=Path, help="also write the rows and settings to this JSON file")
    parser.add_argument("--child-spec", help=argparse.SUPPRESS)  # internal: run one configuration, print its row as JSON
    args = parser.parse_args(argv)
    if args.child_spec is not None:
        print(json.dumps(run_configuration(json.loads(args.child_spec)), default=float))
        return {}
    if args.quick:
        args.sizes, args.multiples, args.pool_size_px, args.labeled = [32], [1, 2], 32, 8
        args.batch, args.epoch_length, args.epochs = 2, 2, 1
    if args.pool_size_px not in args.sizes:
        parser.error(f"--pool-size-px {args.pool_size_px} must be one of --sizes {args.sizes}")

    machine = machine_line()
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        data_dir = args.data_dir or Path(tmp)
        specs = plan(args)
        manifests: dict[int, Path] = {}
        for size in args.sizes:
            pool = args.labeled * (max(args.multiples) if size == args.pool_size_px else args.multiples[0])
            manifests[size] = generate_demo_dataset(
                data_dir / f"demo_{size}px", n_labeled=args.labeled, n_unlabeled=pool, image_size=size, seed=args.seed
            )
        rows = []
        for index, spec in enumerate(tqdm(specs, desc="bench_scaling", unit="config", disable=None), 1):
            rows.append(run_in_subprocess({**spec, "manifest": str(manifests[spec["image_size"]])}))
            # one line per configuration: these runs take minutes on a loaded machine and tqdm is off without a TTY
            print(
                f"[{index}/{len(specs)}] {spec['method']} {spec['image_size']}px pool {spec['multiple']}x: epoch "
                f"{rows[-1]['epoch_cpu_s']:.1f} CPU s, peak RSS {rows[-1]['peak_rss_mb']:.0f} MiB",
                file=sys.stderr, flush=True,
            )  # fmt: skip
    table = format_table(rows, args)
    return finish(machine, args, rows, table)


if __name__ == "__main__":
    main(sys.argv[1:])
