"""``qgssl experiment run|report`` and ``qgssl demo-job`` (registered by :mod:`qgssl_monai.cli`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the config module is imported lazily, inside the sub-commands
    from qgssl_monai.experiments.config import ExperimentConfig

__all__ = ["DEMO_DATA_DIR", "register", "default_demo_experiment", "demo_data_settings"]

logger = logging.getLogger(__name__)

#: ``qgssl demo-job`` writes the generated data set to ``<out>/demo_data`` (data_manifests/demo.json points there)
DEMO_DATA_DIR = "demo_data"


def default_demo_experiment() -> Path:
    """``experiments/demo.yaml`` of the checkout."""
    return Path(__file__).resolve().parents[2] / "experiments" / "demo.yaml"


def demo_data_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """Arguments of ``generate_demo_dataset`` for an experiment: its ``demo_data``, the image size by default."""
    return {"image_size": cfg.image_size, **cfg.demo_data}


def _load(path: str, updates: dict | None = None):
    from qgssl_monai.experiments.config import ExperimentConfigError, load_experiment

    try:
        return load_experiment(path, updates=updates)
    except ExperimentConfigError as err:
        raise SystemExit(f"error: {err}") from None


def _run(args: argparse.Namespace) -> int:
    from qgssl_monai.experiments.pipeline import run_experiment

    cfg = _load(args.experiment)
    try:
        return run_experiment(cfg, args.output, args.tracking_uri, args.only, args.dry_run, report=not args.no_report)
    except ValueError as err:  # e.g. an --only pattern matching no step (the message lists the steps)
        raise SystemExit(f"error: {args.experiment}: {err}") from None


def _report(args: argparse.Namespace) -> int:
    from qgssl_monai.experiments.pipeline import report_experiment

    page = report_experiment(_load(args.experiment), args.output, args.tracking_uri)
    print(f"report: {page}")
    return 0


def _demo_job(args: argparse.Namespace) -> int:
    from qgssl_monai.data.demo import generate_demo_dataset
    from qgssl_monai.experiments.config import load_experiment
    from qgssl_monai.experiments.pipeline import run_experiment

    out = Path(args.out).resolve()
    probe = load_experiment(args.experiment)  # validated once before generating anything
    # regenerated every time (a few seconds): the same seed rewrites the same bytes, so finished steps are still
    # skipped, while data left by an older generator cannot silently stand in for the current one
    manifest = generate_demo_dataset(out / DEMO_DATA_DIR, **demo_data_settings(probe))
    cfg = _load(args.experiment, updates={"data": {"labeled": str(manifest), "unlabeled": str(manifest)}})
    code = run_experiment(cfg, out, args.tracking_uri, args.only, dry_run=False)
    print(f"open {out / 'report' / 'index.html'} in a browser; MLflow UI: mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}")
    return code


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``experiment`` (``run``, ``report``) and ``demo-job``."""
    experiment = subparsers.add_parser("experiment", help="run or report an experiment YAML (bundles + MLflow)")
    actions = experiment.add_subparsers(dest="experiment_command", metavar="ACTION", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("experiment", help="experiment YAML (see experiments/*.yaml)")
        parser.add_argument("--output", default=None, help="output folder (default: the YAML's 'output', else runs/<name>)")
        parser.add_argument(
            "--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///<output>/mlflow.db); e.g. http://host:5000"
        )

    run = actions.add_parser("run", help="run every missing step (finished ones are skipped), then write the report")
    common(run)
    run.add_argument("--dry-run", action="store_true", help="list what would run, be skipped or blocked, and why")
    run.add_argument("--only", nargs="+", default=None, metavar="STEP",
                     help="step keys or globs, e.g. ssl:mt_qw:unet:0 'quality:*' 'ssl:*:unet:*'")  # fmt: skip
    run.add_argument("--no-report", action="store_true", help="skip the report at the end (used by GPU workers)")
    run.set_defaults(func=_run)

    report = actions.add_parser("report", help="write <output>/report/ from the experiment's MLflow runs")
    common(report)
    report.set_defaults(func=_report)

    demo = subparsers.add_parser("demo-job", help="generate the demo data and run experiments/demo.yaml on it")
    demo.add_argument("--out", default="runs/demo", help="output folder (demo data, runs, MLflow store, report)")
    demo.add_argument("--experiment", default=str(default_demo_experiment()), help="experiment YAML (default: experiments/demo.yaml)")
    demo.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///<out>/mlflow.db)")
    demo.add_argument("--only", nargs="+", default=None, metavar="STEP", help="restrict to these steps")
    demo.set_defaults(func=_demo_job)
