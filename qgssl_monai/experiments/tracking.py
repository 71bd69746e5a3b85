"""MLflow bookkeeping shared by the runner and the report.

Every step of an experiment is one MLflow run in the MLflow experiment named after the experiment,
tagged so runs can be found again without any private file:

======================== ====================================================================
tag                      value
======================== ====================================================================
``qgssl_experiment``     experiment name
``qgssl_config_hash``    hash of the experiment YAML content (updated when a run is reused)
``qgssl_step``           step key, e.g. ``quality:train`` or ``ssl:mt_qw:unet:0``
``qgssl_step_hash``      hash of the step's bundle configs + overrides + upstream step hashes
``qgssl_kind``           ``weak``, ``quality_train``, ``quality_eval`` or ``ssl`` (stand-ins: free)
======================== ====================================================================

The default tracking store is SQLite (``sqlite:///<out>/mlflow.db``, artifacts in ``<out>/mlartifacts``):
MLflow >= 3.13 refuses the plain file store and MONAI rejects ``file://`` URIs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run

__all__ = [
    "TAG_EXPERIMENT",
    "TAG_CONFIG_HASH",
    "TAG_STEP",
    "TAG_STEP_HASH",
    "TAG_KIND",
    "UNFINISHED",
    "default_tracking_uri",
    "StepTracker",
]

TAG_EXPERIMENT = "qgssl_experiment"
TAG_CONFIG_HASH = "qgssl_config_hash"
TAG_STEP = "qgssl_step"
TAG_STEP_HASH = "qgssl_step_hash"
TAG_KIND = "qgssl_kind"
UNFINISHED = ("RUNNING", "SCHEDULED", "FAILED", "KILLED")


def default_tracking_uri(output_dir: str | Path) -> str:
    """``sqlite:///<absolute output_dir>/mlflow.db``."""
    return "sqlite:///" + (Path(output_dir).resolve() / "mlflow.db").as_posix()


class StepTracker:
    """Finds, creates and finishes the MLflow run of each experiment step.

    Args:
        tracking_uri: any MLflow tracking URI (SQLite file, ``http://host:port`` server, ...).
        experiment_name: the MLflow experiment (created on first use).
        artifact_location: artifact root for a newly created experiment; for a local SQLite store it
            defaults to ``<db folder>/mlartifacts`` (MLflow would otherwise use ``./mlruns`` of the cwd).
    """

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_location: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        if artifact_location is None and tracking_uri.startswith("sqlite:///"):
            db = Path(tracking_uri[len("sqlite:///") :])
            artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
        self.artifact_location = artifact_location
        self._experiment_id: str | None = None

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment_name)
            if found is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment_name, artifact_location=self.artifact_location
                    )
                except mlflow.exceptions.MlflowException:  # created concurrently by another worker
                    found = self.client.get_experiment_by_name(self.experiment_name)
                    if found is None:
                        raise
                    self._experiment_id = found.experiment_id
            else:
                if found.lifecycle_stage == "deleted":
                    self.client.restore_experiment(found.experiment_id)
                self._experiment_id = found.experiment_id
        return self._experiment_id

    def step_runs(self, step_key: str, step_hash: str | None = None) -> list[Run]:
        """Runs of one step (optionally only those with ``step_hash``), newest first."""
        filters = [f"tags.{TAG_EXPERIMENT} = '{self.experiment_name}'", f"tags.{TAG_STEP} = '{step_key}'"]
        if step_hash is not None:
            filters.append(f"tags.{TAG_STEP_HASH} = '{step_hash}'")
        return list(
            self.client.search_runs(
                [self.experiment_id], filter_string=" and ".join(filters), order_by=["attributes.start_time DESC"]
            )
        )

    def find(self, step_key: str, step_hash: str) -> tuple[Run | None, Run | None]:
        """``(latest FINISHED run, latest unfinished run)`` of this step with this hash."""
        finished = unfinished = None
        for run in self.step_runs(step_key, step_hash):
            if run.info.status == "FINISHED" and finished is None:
                finished = run
            elif run.info.status in UNFINISHED and unfinished is None:
                unfinished = run
        return finished, unfinished

    def create(self, run_name: str, tags: Mapping[str, str]) -> str:
        """A new RUNNING run; returns its id."""
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags))
        return run.info.run_id

    def reopen(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Mark an interrupted run RUNNING again (resume) and refresh its tags."""
        self.client.update_run(run_id, status="RUNNING")
        self.set_tags(run_id, tags)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log params not yet on the run (MLflow refuses to change a logged param)."""
        existing = self.client.get_run(run_id).data.params
        for key, value in params.items():
            text = "None" if value is None else str(value)
            if key not in existing:
                self.client.log_param(run_id, key, text[:6000])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            if value is not None and math.isfinite(float(value)):
                self.client.log_metric(run_id, key, float(value), step=step)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """``[(step, value), ...]`` sorted by step; the last value wins for a repeated step (resumed runs)."""
        values: dict[int, float] = {}
        for m in sorted(self.client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
            values[int(m.step)] = float(m.value)
        return sorted(values.items())

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def artifact_names(self, run_id: str, path: str | None = None) -> list[str]:
        return [f.path for f in self.client.list_artifacts(run_id, path)]
