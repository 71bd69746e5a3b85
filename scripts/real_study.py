#!/usr/bin/env python
"""The CPU-budget real-data study of docs/RESULTS.md, end to end (needs ../shared/data; resumable).

1. ``experiments/real_cpu/cvc_to_kvasir.yaml``: every method on AttentionUnet (CVC-ClinicDB labeled,
   Kvasir-SEG unlabeled), 3 seeds.
2. The best baseline of step 1 (highest mean test DSC among the methods without quality guidance, SUP
   excluded) is filled into ``cvc_to_kvasir_networks.yaml``: SUP, that baseline, PL-QW and QAR on
   SwinUNETR-2D and UNet++. Same MLflow experiment and output folder, so g and the data are reused.
3. One report over both (every method x every network; combinations not run are left empty).
4. ``experiments/real_cpu/kvasir_to_cvc.yaml``: the reverse direction, in its own folder.
5. g against real predictions: the experiment runner's ``quality:real:<network>`` step (run by steps 1, 2
   and 4) scores the test-split predictions of every trained SSL model with g (true Dice vs g) into
   ``<direction>/quality/eval/real_predictions/<network>/`` (``quality_metrics.json``,
   ``segmentation_scores.csv``, ``segmentation_scatter.png``); this step prints the pooled numbers.
6. Wall time of every finished step (median per kind, method and network, from MLflow start/end times),
   written to ``<out>/timings.md``.

Rerunning the same command skips finished runs and resumes interrupted ones (the experiment runner's
rules), so a killed study loses at most the run in progress.

Usage::

    python scripts/real_study.py --out runs/real_study            # everything
    python scripts/real_study.py --out runs/real_study --only 1 2 3
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import yaml

from qgssl_monai.experiments.config import is_quality_guided, load_experiment
from qgssl_monai.experiments.pipeline import report_experiment, run_experiment

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments" / "real_cpu"
PLACEHOLDER_METHOD = "BEST_BASELINE"


def best_baseline(table_csv: Path, network: str) -> str:
    """Highest mean test DSC on ``network`` among methods without quality guidance, SUP excluded."""
    with open(table_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    column = f"{network}_dsc_mean"
    scored = [
        (float(row[column]), row["method"])
        for row in rows
        if row.get(column) not in (None, "", "nan") and row["method"] != "sup" and not is_quality_guided(row["method"])
    ]
    if not scored:
        raise SystemExit(f"{table_csv}: no baseline results for {network}; run step 1 first")
    return max(scored)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/real_study", help="output folder (default: %(default)s)")
    parser.add_argument("--only", nargs="+", type=int, choices=[1, 2, 3, 4, 5, 6], default=[1, 2, 3, 4, 5, 6], help="steps to run")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    forward_out, reverse_out = out / "cvc2kvasir", out / "kvasir2cvc"
    forward = load_experiment(EXPERIMENTS / "cvc_to_kvasir.yaml")
    status = 0
    if 1 in args.only:
        status |= run_experiment(forward, output=forward_out)
    if 2 in args.only or 3 in args.only:
        baseline = best_baseline(forward_out / "report" / "table1.csv", forward.networks[0])
        print(f"best baseline on {forward.networks[0]}: {baseline}")
        template = yaml.safe_load((EXPERIMENTS / "cvc_to_kvasir_networks.yaml").read_text())
        methods = [baseline if m == PLACEHOLDER_METHOD else m for m in template["methods"]]
        networks_cfg = load_experiment(EXPERIMENTS / "cvc_to_kvasir_networks.yaml", updates={"methods": methods})
        if 2 in args.only:
            status |= run_experiment(networks_cfg, output=forward_out, report=False)
        if 3 in args.only:
            combined = load_experiment(
                EXPERIMENTS / "cvc_to_kvasir.yaml", updates={"networks": forward.networks + networks_cfg.networks}
            )
            print(f"report: {report_experiment(combined, forward_out)}")
    if 4 in args.only:
        status |= run_experiment(load_experiment(EXPERIMENTS / "kvasir_to_cvc.yaml"), output=reverse_out)
    if 5 in args.only:
        for name, folder in (("cvc_to_kvasir", forward_out), ("kvasir_to_cvc", reverse_out)):
            for metrics in sorted(folder.glob("quality/eval/real_predictions/*/quality_metrics.json")):
                pooled = json.loads(metrics.read_text())["segmentation_predictions"]["pooled"]
                print(f"g on real predictions ({name}, {metrics.parent.name}): {pooled}")
    if 6 in args.only:
        sections = []
        for name, folder in (("cvc_to_kvasir", forward_out), ("kvasir_to_cvc", reverse_out)):
            cfg = load_experiment(EXPERIMENTS / f"{name}.yaml")
            sections.append(f"## {name}\n\n{timing_table(folder / 'mlflow.db', cfg.name)}")
        (out / "timings.md").write_text("# Wall time per step (median over seeds, minutes)\n\n" + "\n\n".join(sections) + "\n")
        print((out / "timings.md").read_text())
    return status


def timing_table(db: Path, experiment_name: str) -> str:
    """Markdown table: median and max wall minutes of the FINISHED runs per step kind, method and network."""
    import mlflow
    import pandas as pd

    from qgssl_monai.experiments.tracking import TAG_EXPERIMENT, TAG_KIND, TAG_STEP

    if not db.is_file():
        return "(no runs)"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return "(no runs)"
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.{TAG_EXPERIMENT} = '{experiment_name}' and attributes.status = 'FINISHED'", max_results=5000
    )
    rows = []
    for run in runs:
        key = run.data.tags.get(TAG_STEP, "")
        parts = key.split(":")  # ssl:<method>:<network>:<seed> or quality:<stage> / data:prepare
        if run.info.end_time is None:
            continue
        rows.append({
            "kind": run.data.tags.get(TAG_KIND, parts[0]),
            "step": ":".join(parts[:3]) if parts[0] == "ssl" else key,
            "minutes": (run.info.end_time - run.info.start_time) / 60000,
        })  # fmt: skip
    if not rows:
        return "(no runs)"
    table = pd.DataFrame(rows).groupby(["kind", "step"])["minutes"].agg(["count", "median", "max"]).reset_index()
    lines = ["| step | runs | median | max |", "|---|---|---|---|"]
    lines += [f"| {r.step} | {r.count} | {r.median:.2f} | {r.max:.2f} |" for r in table.itertuples()]
    total = pd.DataFrame(rows)["minutes"].sum()
    lines.append(f"| **all steps (sum)** | {len(rows)} | | {total:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
