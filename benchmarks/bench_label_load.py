"""Load test of the quality-checker MONAI Label app: concurrent ``POST /infer/quality`` uploads on 127.0.0.1.

Run with the interpreter that has MONAI Label (``scripts/install_label.sh`` -> ``.venv-label``)::

    OMP_NUM_THREADS=1 .venv-label/bin/python benchmarks/bench_label_load.py               # self-hosted server
    .venv-label/bin/python benchmarks/bench_label_load.py --url http://127.0.0.1:8000     # a running server

Without ``--url`` the benchmark stages a temporary copy of ``apps/quality_checker`` with a quality predictor of
the bundle's architecture (ResNet-18, ``--model-size`` px input) and *random* weights (latency does not depend on
the weight values; nothing is trained or downloaded), starts the server on a free loopback port and stops it at
the end. Every request uploads one image + mask pair (``--image-px`` square demo image). Bounded: at most
``--requests`` requests and ``--time-limit`` seconds. Prints a table; exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from tqdm import tqdm

from qgssl_monai.data.demo import generate_demo_dataset
from qgssl_monai.data.manifest import load_split
from qgssl_monai.networks.quality import QualityPredictor
from qgssl_monai.serving.label_logic import LOOPBACK_HOSTS
from qgssl_monai.serving.label_server import LabelServer, request, stage_app

REPO = Path(__file__).resolve().parents[1]



def _pair(folder: Path, image_px: int) -> tuple[bytes, bytes]:
    """One generated demo image + mask (PNG bytes) of ``image_px`` px."""
    manifest = generate_demo_dataset(folder / "demo", n_labeled=8, n_unlabeled=0, image_size=image_px, seed=0)
    item = load_split(manifest, "training")[0]
    return Path(item["image"]).read_bytes(), Path(item["label"]).read_bytes()


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_load(url: str, image: bytes, mask: bytes, n_requests: int, clients: int, time_limit: float) -> dict:
    """Send ``n_requests`` quality requests from ``clients`` threads; returns latencies and failures."""
    deadline = time.monotonic() + time_limit
    files = {"file": ("frame.png", image), "label": ("frame_mask.png", mask)}

    def one(_: int) -> tuple[float, int, float | None, str]:
        if time.monotonic() > deadline:
            return 0.0, -1, None, "skipped: time limit"
        start = time.perf_counter()
        try:
            status, payload = request(f"{url}/infer/quality?output=json", files, timeout=60)
        except OSError as err:
            return time.perf_counter() - start, 0, None, repr(err)
        elapsed = time.perf_counter() - start
        ok = status == 200 and isinstance(payload, dict) and 0.0 <= payload.get("quality", -1) <= 1.0
        return elapsed, status, payload.get("latency_ms") if ok else None, "" if ok else str(payload)[:200]

    results = []
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        for result in tqdm(pool.map(one, range(n_requests)), total=n_requests, desc="requests", disable=None):
            results.append(result)
    wall = time.perf_counter() - start
    done = [r for r in results if r[1] != -1]
    ok = [r for r in done if r[1] == 200 and not r[3]]
    return {
        "sent": len(done),
        "ok": len(ok),
        "failed": [r for r in done if r not in ok],
        "skipped": len(results) - len(done),
        "latencies_ms": [r[0] * 1000 for r in ok],
        "server_ms": [r[2] for r in ok if r[2] is not None],
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="running server (loopback only); default: start one")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=600.0, help="stop sending after this many seconds")
    parser.add_argument("--model-size", type=int, default=256, help="g's input size for the self-hosted server")
    parser.add_argument("--image-px", type=int, default=320, help="side of the uploaded demo image")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 10000 or not 1 <= args.clients <= 64:
        parser.error("--requests must be 1..10000 and --clients 1..64")

    with tempfile.TemporaryDirectory(prefix="bench_label_") as tmp:
        tmp_path = Path(tmp)
        image, mask = _pair(tmp_path, args.image_px)
        server = None
        if args.url:
            if urlparse(args.url).hostname not in LOOPBACK_HOSTS:
                parser.error(f"--url must point to the loopback interface (127.0.0.1), got {args.url}")
            url = args.url.rstrip("/")
        else:
            torch.manual_seed(0)
            app = stage_app(
                REPO / "apps" / "quality_checker",
                tmp_path / "app",
                {
                    "quality_predictor": (
                        REPO / "bundles" / "quality_predictor",
                        QualityPredictor(in_channels=4).state_dict(),
                        {"image_size": args.model_size, "image_channels": 3, "backbone": "resnet18"},
                    )
                },
            )
            (tmp_path / "studies").mkdir()
            server = LabelServer(
                app,
                tmp_path / "studies",
                {"models": "quality_predictor"},
                env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"},
                startup_timeout=180,
            ).start()
            url = server.url
        try:
            for _ in range(args.warmup):
                request(f"{url}/infer/quality?output=json", {"file": ("w.png", image), "label": ("m.png", mask)})
            stats = run_load(url, image, mask, args.requests, args.clients, args.time_limit)
        finally:
            if server is not None:
                server.stop()

    lat = stats["latencies_ms"]
    rows = [
        ("requests sent / ok / failed", f"{stats['sent']} / {stats['ok']} / {len(stats['failed'])}"),
        ("skipped (time limit)", str(stats["skipped"])),
        ("concurrent clients", str(args.clients)),
        ("g input size (self-hosted)", "-" if args.url else f"{args.model_size} px"),
        ("uploaded image", f"{args.image_px}x{args.image_px} PNG + mask"),
        ("latency p50 (ms)", f"{_percentile(lat, 50):.1f}"),
        ("latency p95 (ms)", f"{_percentile(lat, 95):.1f}"),
        ("latency max (ms)", f"{max(lat) if lat else float('nan'):.1f}"),
        ("server-side infer p50 (ms)", f"{statistics.median(stats['server_ms']) if stats['server_ms'] else float('nan'):.1f}"),
        ("throughput (req/s)", f"{stats['ok'] / stats['wall_s']:.2f}"),
        ("wall time (s)", f"{stats['wall_s']:.1f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'metric'.ljust(width)} | value\n{'-' * width}-|------")
    for name, value in rows:
        print(f"{name.ljust(width)} | {value}")
    for failure in stats["failed"][:5]:
        print("FAILED:", failure, file=sys.stderr)
    return 0 if not stats["failed"] and stats["skipped"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
