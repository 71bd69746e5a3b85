#!/usr/bin/env python
"""The converged, label-scarce CPU study (experiments/converged/, docs/EXPERIMENTS.md), one direction and
label fraction per call; resumable like every experiment run.

Stages (``--only`` picks some; each reuses what earlier calls finished):

1. ``sweep`` — the YAML's validation-only sweep: its ``sweep.methods`` variants and, for comparison, the
   swept methods at their grid settings, on the sweep's network and seeds (plus data and g).
2. ``grid`` — the YAML's grid (13 methods x AttentionUnet x 3 seeds); every swept method runs with the
   settings of its sweep winner (highest best-validation DSC over the sweep seeds; the test split is never
   read), written into ``overrides.method``.
3. ``networks`` — SUP, the best baseline, the best quality-guided method and QAR on SwinUNETR-2D and UNet++
   (``experiments/converged/networks.yaml``); "best" = highest mean best-validation DSC over the seeds of the
   AttentionUnet grid, again never the test split.
4. ``report`` — one report over every method and network (``<out>/report/``: Table 1, comparisons, seeds,
   schedule check with SUP's validation curve, quality-weight diagnostics, the sweep table).

Usage::

    python scripts/converged_study.py experiments/converged/cvc2kvasir_25.yaml --out runs/converged/cvc2kvasir_25
    python scripts/converged_study.py experiments/converged/cvc2kvasir_25.yaml --out ... --only sweep grid
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from qgssl_monai.experiments.config import ExperimentConfig, is_quality_guided, load_experiment, overlay_of
from qgssl_monai.experiments.pipeline import report_experiment, resolve_output, run_experiment, step_hashes
from qgssl_monai.experiments.report import RunResult, load_results, sweep_table
from qgssl_monai.experiments.tracking import default_tracking_uri

NETWORKS_TEMPLATE = Path(__file__).resolve().parents[1] / "experiments" / "converged" / "networks.yaml"
STAGES = ("sweep", "grid", "networks", "report")


def swept_config(cfg: ExperimentConfig, results: list[RunResult]) -> tuple[ExperimentConfig, Any]:
    """``cfg`` with every swept method set to its sweep winner's settings, and the sweep table."""
    table = sweep_table(results, cfg.sweep.methods, cfg.sweep_networks, cfg.sweep_seeds, cfg.overrides.get("method") or {})
    overrides = copy.deepcopy(cfg.overrides)
    per_method = overrides.setdefault("method", {})
    for row in table[table.selected].itertuples():
        if row.candidate != row.overlay:
            per_method[row.overlay] = {**(per_method.get(row.overlay) or {}), **(per_method.get(row.candidate) or {})}
            print(f"sweep: {row.overlay} takes the settings of {row.candidate} ({row.settings})")
    return load_experiment(cfg.source, updates={"overrides": overrides, "epochs": cfg.epochs}), table


def best_by_validation(results: list[RunResult], methods: list[str], network: str, guided: bool) -> str:
    """Method with the highest mean best-validation DSC on ``network`` among the (non-)quality-guided ones (SUP excluded)."""
    scores = {}
    for method in methods:
        if method == "sup" or is_quality_guided(method) != guided or method != overlay_of(method):
            continue
        best = [max(v for _, v in r.val_curve) for r in results if r.method == method and r.network == network and r.val_curve]
        if best:
            scores[method] = float(np.mean(best))
    if not scores:
        raise SystemExit(f"no {'quality-guided' if guided else 'baseline'} results on {network}; run the grid first")
    return max(scores, key=lambda m: (scores[m], m))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="experiments/converged/<direction>_<fraction>.yaml")
    parser.add_argument("--out", default=None, help="output folder (default: the YAML's output, else runs/<name>)")
    parser.add_argument("--only", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run")
    parser.add_argument(
        "--epochs", type=int, default=None,
        help="shorter/longer schedule than the YAML's (e.g. 20 = 500 steps, the 3-hour budget; see docs/RESULTS.md); "
        "early stopping stays off and the ramps scale with it",
    )  # fmt: skip
    args = parser.parse_args(argv)
    base = load_experiment(args.experiment)
    if args.epochs is not None:
        overrides = copy.deepcopy(base.overrides)
        overrides.setdefault("ssl", {})["early_stop_patience"] = args.epochs
        base = load_experiment(args.experiment, updates={"epochs": args.epochs, "overrides": overrides})
    out = resolve_output(base, args.out)
    uri = default_tracking_uri(out)
    status = 0
    if "sweep" in args.only:
        keys = ["data:prepare", "quality:*"] if any(is_quality_guided(m) for m in base.sweep.methods) else ["data:prepare"]
        for method in [*base.sweep.methods, *dict.fromkeys(overlay_of(m) for m in base.sweep.methods)]:
            keys += [f"ssl:{method}:{n}:{s}" for n in base.sweep_networks for s in base.sweep_seeds]
        status |= run_experiment(base, output=out, only=keys, report=False)
    # the sweep is judged on the runs of the YAML's own settings (step hashes of `base`), also after the grid
    # reran a swept method with its winner's settings
    cfg, table = swept_config(base, load_results(uri, base.name, step_hashes(base, out, uri)))
    print(table.to_string(index=False) if len(table) else "sweep: no finished sweep runs yet")
    if "grid" in args.only:
        status |= run_experiment(cfg, output=out, report=False)
    template = yaml.safe_load(NETWORKS_TEMPLATE.read_text())
    networks = list(template["networks"])
    if "networks" in args.only or "report" in args.only:
        results = load_results(uri, cfg.name)
        grid_network = cfg.networks[0]
        chosen = {
            "BEST_BASELINE": best_by_validation(results, cfg.methods, grid_network, guided=False),
            "BEST_QW": best_by_validation(results, cfg.methods, grid_network, guided=True),
        }
        print(f"on {grid_network} by validation DSC: best baseline {chosen['BEST_BASELINE']}, best quality-guided {chosen['BEST_QW']}")
        methods = list(dict.fromkeys(chosen.get(m, m) for m in template["methods"]))
        overrides = {**cfg.overrides, "method": {k: v for k, v in (cfg.overrides.get("method") or {}).items() if k in methods}}
        second = load_experiment(
            cfg.source, updates={"overrides": overrides, "epochs": cfg.epochs, "methods": methods, "networks": networks, "sweep": {}}
        )
        if "networks" in args.only:
            status |= run_experiment(second, output=out, report=False)
        if "report" in args.only:
            combined = load_experiment(
                cfg.source, updates={"overrides": cfg.overrides, "epochs": cfg.epochs, "networks": cfg.networks + networks}
            )
            print(f"report: {report_experiment(combined, out, uri, sweep=table)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
