"""Benchmark of the Type 1 mask generator: masks per second and the Dice histogram of the default mix.

Runs on one core (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``, OpenCV single-threaded) on the real
Kvasir-SEG + CVC-ClinicDB masks in ``../shared/data`` resized to ``--size`` (224) px; without that folder it
falls back to the synthetic demo generator's masks and says so. Prints one table (speed per category and
overall, and the fraction of masks in each 0.2-wide Dice bin; ``--per-op`` adds the CPU time of every op inside
the default mix) and writes a PNG histogram to ``--out``.

Speed is CPU time of this process (other load on the machine does not count as ours, but still slows us through
shared caches and memory bandwidth, and only ever adds time): every speed row generates the same masks ``--repeats``
times and reports the median run and the sum over 100-mask blocks of each block's best time (``timeit``'s
best-of-k, per block, so one burst of outside load spoils one block of one run, not the whole number).

    python benchmarks/bench_mask_generation.py --n 3000 --out benchmarks/results/
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from qgssl_monai.transforms import corruption_ops  # noqa: E402
from qgssl_monai.transforms.corruptions import CATEGORIES, DEFAULT_CATEGORY_PROBS, RandMaskCorruption  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO.parent / "shared" / "data"
BIN_EDGES = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])


def load_real_masks(data_root: Path, size: int) -> list[np.ndarray]:
    """All Kvasir-SEG and CVC-ClinicDB masks as boolean ``(size, size)`` arrays (bilinear resize + 0.5 threshold)."""
    paths = sorted((data_root / "kvasir-seg" / "masks").glob("*.png")) + sorted(
        (data_root / "cvc-clinicdb" / "masks").glob("*.png")
    )
    masks = []
    for path in tqdm(paths, desc="loading masks", leave=False):
        image = Image.open(path).convert("L").resize((size, size), Image.BILINEAR)
        masks.append(np.asarray(image) > 127)
    return masks


def demo_masks(size: int, count: int = 200, seed: int = 0) -> list[np.ndarray]:
    """Masks of the synthetic demo generator (used when the real data folder is absent)."""
    from qgssl_monai.data.demo import LABELED_STYLE, render_demo_sample

    return [render_demo_sample(np.random.default_rng([seed, i]), size, LABELED_STYLE)[1] > 127 for i in range(count)]


def run(
    transform: RandMaskCorruption, labels: list[np.ndarray], n: int, seed: int, repeats: int = 1, block: int = 100
) -> tuple[float, float, float, np.ndarray, list[str]]:
    """Corrupt ``n`` labels (cycled) ``repeats`` times with the same seed (the same masks every time).

    Returns masks/s (wall clock, best run), masks/s of CPU time (this process only) of the median run and of the
    best time of every block of ``block`` masks over the runs (like ``timeit``'s best-of-k, per block: on a shared
    machine other processes only ever add time, mostly in bursts), the Dice values and the corruption names.
    """
    block_cpu = np.full((repeats, -(-n // block)), np.inf)
    run_cpu, best_wall = [], np.inf
    for repeat in range(repeats):
        transform.set_random_state(seed)
        qualities, names = np.empty(n), []
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        block_start = start_cpu
        for i in range(n):
            result = transform(labels[i % len(labels)])
            qualities[i] = float(result.quality)
            names.append(result.corruption)
            if (i + 1) % block == 0 or i + 1 == n:
                now = time.process_time()
                block_cpu[repeat, i // block] = now - block_start
                block_start = now
        best_wall = min(best_wall, time.perf_counter() - start_wall)
        run_cpu.append(time.process_time() - start_cpu)
        if repeat == 0:
            first_qualities = qualities
        elif not np.array_equal(qualities, first_qualities):
            raise RuntimeError("the same seed gave different masks in two runs: the generator is not reproducible.")
    median_cpu, best_blocks_cpu = float(np.median(run_cpu)), float(block_cpu.min(axis=0).sum())
    return n / best_wall, n / max(median_cpu, 1e-9), n / max(best_blocks_cpu, 1e-9), qualities, names


def op_profile(
    transform: RandMaskCorruption, labels: list[np.ndarray], n: int, seed: int
) -> list[tuple[str, str, str]]:
    """CPU time of every op inside the default mix (same draws as :func:`run`): where a mask's time goes."""
    transform.set_random_state(seed)
    pool_size = len(transform.mask_pool)
    spent: dict[str, list[float]] = {}
    for i in range(n):
        transform.randomize(None, pool_size=pool_size)
        if transform._category == "swap":
            continue
        rng = np.random.RandomState(transform._op_seed)
        out = labels[i % len(labels)][0] > 0.5
        for name, params in transform._plan:
            start = time.process_time()
            out = corruption_ops.MASK_CORRUPTION_OPS[name].fn(out, rng, **params)
            calls_and_time = spent.setdefault(name, [0, 0.0])
            calls_and_time[0] += 1
            calls_and_time[1] += time.process_time() - start
    rows = [("op time, all ops", f"{sum(v[1] for v in spent.values()) / n * 1e6:,.0f} us/mask", "")]
    for name, (calls, seconds) in sorted(spent.items(), key=lambda item: -item[1][1]):
        per_call = f"{seconds / calls * 1e6:,.0f} us/call, {calls} calls"
        rows.append((f"op {name}", f"{seconds / n * 1e6:,.1f} us/mask", per_call))
    return rows


def speed_cell(wall: float, median_cpu: float, best_cpu: float) -> str:
    return f"{wall:,.0f} masks/s wall | CPU time: {median_cpu:,.0f} masks/s median run, {best_cpu:,.0f} best blocks"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000, help="masks generated for the default mix (default 3000)")
    parser.add_argument("--n-per-category", type=int, default=500, help="masks per category for the speed rows")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="PNG histogram folder")
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT, help="holds kvasir-seg/ and cvc-clinicdb/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of the same masks per speed row (default 3): CPU time of the median run and of the best time of "
        "every 100-mask block (other processes sharing the cores only ever add time)",
    )
    parser.add_argument("--scipy", action="store_true", help="disable the OpenCV accelerator (scipy fallback)")
    parser.add_argument("--per-op", action="store_true", help="add a per-op CPU-time profile of the default mix")
    args = parser.parse_args()

    torch.set_num_threads(1)
    if corruption_ops.cv2 is not None:
        corruption_ops.cv2.setNumThreads(1)
    if args.scipy:
        corruption_ops.USE_OPENCV = False

    if (args.data_root / "kvasir-seg").is_dir() and (args.data_root / "cvc-clinicdb").is_dir():
        masks, source = load_real_masks(args.data_root, args.size), "Kvasir-SEG + CVC-ClinicDB"
    else:
        print(f"NOTE: real data not found under {args.data_root}; using the synthetic demo generator's masks.")
        masks, source = demo_masks(args.size), "demo generator"
    labels = [m[None].astype(np.float32) for m in masks]
    order = np.random.RandomState(args.seed).permutation(len(labels))
    labels = [labels[i] for i in order]

    rows: list[tuple[str, str, str]] = []
    for category in tqdm(CATEGORIES, desc="categories", leave=False):
        transform = RandMaskCorruption(category_probs={category: 1.0}, mask_pool=masks)
        transform.prepare_pool((args.size, args.size))
        timings = run(transform, labels, args.n_per_category, args.seed, args.repeats)
        qualities = timings[3]
        rows.append((f"speed {category}", speed_cell(*timings[:3]), f"mean Dice {qualities.mean():.3f}"))

    transform = RandMaskCorruption(mask_pool=masks)
    transform.prepare_pool((args.size, args.size))
    *timings, qualities, names = run(transform, labels, args.n, args.seed, args.repeats)
    rows.append(("speed default mix", speed_cell(*timings), f"mean Dice {qualities.mean():.3f}"))
    counts, _ = np.histogram(qualities, bins=BIN_EDGES)  # last bin includes 1.0
    for low, high, count in zip(BIN_EDGES[:-1], BIN_EDGES[1:], counts):
        bracket = "]" if high == 1.0 else ")"
        rows.append((f"Dice [{low:.1f}, {high:.1f}{bracket}", f"{count / args.n:.1%}", f"{count} masks"))
    category_counts = Counter(name.split(":")[0] for name in names)
    for category in CATEGORIES:
        share = category_counts.get(category, 0) / args.n
        rows.append((f"drawn {category}", f"{share:.1%}", f"p={DEFAULT_CATEGORY_PROBS[category]:.2f}"))

    if args.per_op:
        rows.extend(op_profile(transform, labels, args.n, args.seed))

    backend = "opencv" if corruption_ops.USE_OPENCV else "scipy"
    title = (
        f"Type 1 mask generation: {source}, {len(masks)} masks, {args.size} px, n={args.n}, one core, {backend}, "
        f"{args.repeats} runs per speed row, load average {os.getloadavg()[0]:.2f}"
    )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print(title)
    print("-" * (sum(widths) + 6))
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.hist(qualities, bins=np.linspace(0, 1, 41), color="tab:blue", alpha=0.8)
    for edge in BIN_EDGES[1:-1]:
        axis.axvline(edge, color="grey", lw=0.8, ls="--")
    axis.set_xlabel("Dice of generated mask")
    axis.set_ylabel("masks")
    axis.set_title(f"default mix, {source}, {args.size} px, n={args.n}", fontsize=9)
    figure.tight_layout()
    png = args.out / f"mask_generation_dice_hist_{args.size}px.png"
    figure.savefig(png, dpi=120)
    print(f"histogram: {png}")


if __name__ == "__main__":
    main()
