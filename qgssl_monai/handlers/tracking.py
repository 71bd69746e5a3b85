"""``ResilientMLFlowHandler``: MLflow tracking that survives the tracking server going away mid-run.

MONAI's ``MLFlowHandler`` raises out of the training loop when a request fails, and MLflow's HTTP client first
retries with exponential backoff (defaults: 7 retries, factor 2, 120 s timeout: minutes per call). This
subclass

* bounds the HTTP retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_TIMEOUT`` /
  ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``, set only when the user has not set them), so a dead server costs
  seconds;
* on an *unreachable-server* error (connection refused/reset, timeout, HTTP 502/503/504) logs one warning per
  outage and tracking URI ("tracking server unreachable; training continues; N metric values buffered"),
  keeps every metric, param, artifact and the final run status in memory and retries after ``retry_interval``
  seconds, doubling the wait after every failed retry up to ``max_retry_interval``; when a retry succeeds the
  buffer is sent in order with its original steps and timestamps and an INFO line says so. Any other MLflow
  error (bad param change, deleted experiment, ...) still raises: it is a configuration problem, not an outage;
* when its engine completes with the server still down, writes what is not sent yet to
  ``<spill_dir>/mlflow_unsent_<run>_<pid>_<n>.json`` (one warning per outage), keeps it current while the
  buffer lives and deletes it once everything was sent; a file left behind after the process ended is what
  never reached the server, and :func:`replay_unsent` sends it later;
* never logs a ``(metric, step)`` twice in a reopened run: a run resumed from a checkpoint repeats the
  iterations after that checkpoint (and possibly its validation), which a SIGKILLed process had already
  logged; the resumed values are the same computation (model, data order and RNG states come from the
  checkpoint), so a step the run already holds when it is (re)opened is not sent again and the first value
  stays. (MONAI reuses the latest unfinished run of the same ``run_name`` even without ``--resume``; give a
  fresh training a new ``run_name``.)

:func:`resilient_mlflow_settings` builds MONAI's ``DEFAULT_MLFLOW_SETTINGS`` with these handlers; it logs the
per-iteration loss as ``train_iteration_loss`` (MONAI's default ``train_loss`` collides with the epoch-level key
metric of the same name, giving two values per step).

Nothing here touches training state: a tracking outage never stops training, and slows it by at most one
failed request per retry (milliseconds when the server's port is closed, at most ``(1 + request_max_retries)
* request_timeout`` seconds when its host stops answering).
"""

from __future__ import annotations

import json
import logging
import os
import time
import itertools
from pathlib import Path
from typing import Any

import mlflow
import requests
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from monai.handlers import MLFlowHandler
from monai.utils import flatten_dict

__all__ = [
    "ResilientMLFlowHandler",
    "bound_http_retries",
    "is_unreachable_error",
    "replay_unsent",
    "resilient_mlflow_settings",
]

logger = logging.getLogger(__name__)

#: tracking URIs currently known to be unreachable -> time the outage was first seen (one warning per outage)
_OUTAGES: dict[str, float] = {}

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100
_UNREACHABLE_STATUS = (502, 503, 504)
_INSTANCES = itertools.count()


def bound_http_retries(timeout: int = 5, max_retries: int = 1, backoff_factor: int = 1) -> dict[str, str]:
    """Set MLflow's HTTP retry environment variables unless already set; returns the values in effect.

    ``MLFLOW_HTTP_REQUEST_*`` are read by MLflow at every request, so this applies to clients created before.
    """
    wanted = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout)),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(int(max_retries)),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(int(backoff_factor)),
    }
    return {key: os.environ.setdefault(key, value) for key, value in wanted.items()}


def is_unreachable_error(error: BaseException) -> bool:
    """True for errors meaning "the tracking server cannot be reached now" (worth buffering and retrying)."""
    if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)):
        return True
    if isinstance(error, MlflowException):
        message = str(error)
        if message.startswith("API request to") and ("failed with exception" in message or "failed with timeout" in message):
            return True
        try:
            return error.get_http_status_code() in _UNREACHABLE_STATUS
        except Exception:  # noqa: BLE001 - older/odd error codes: treat as not an outage
            return False
    return False


class ResilientMLFlowHandler(MLFlowHandler):
    """MONAI ``MLFlowHandler`` that buffers through tracking-server outages (see the module docstring).

    Takes every ``MLFlowHandler`` argument, plus:

    Args:
        retry_interval: seconds before the first reconnection attempt after a failure (0: at every call).
        max_retry_interval: the wait doubles after each failed attempt up to this many seconds.
        spill_dir: folder for ``mlflow_unsent_*.json`` when the run ends with the server still down
            (None: the current directory).
        request_timeout: ``MLFLOW_HTTP_REQUEST_TIMEOUT`` default (seconds per HTTP attempt).
        request_max_retries: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` default.
    """

    def __init__(
        self,
        *args: Any,
        retry_interval: float = 30.0,
        max_retry_interval: float = 300.0,
        spill_dir: str | os.PathLike | None = None,
        request_timeout: int = 5,
        request_max_retries: int = 1,
        **kwargs: Any,
    ) -> None:
        bound_http_retries(request_timeout, request_max_retries)
        super().__init__(*args, **kwargs)
        self.tracking_uri = str(getattr(self.client, "tracking_uri", "") or kwargs.get("tracking_uri") or "")
        self.retry_interval = float(retry_interval)
        self.max_retry_interval = max(float(max_retry_interval), self.retry_interval)
        self._wait = self.retry_interval
        self.spill_dir = spill_dir
        self.pending_metrics: list[Metric] = []
        self.pending_params: dict[str, str] = {}
        self.pending_artifacts: list[str] = []
        self.pending_status: str | None = None
        self.in_run: dict[str, set[int]] = {}  # steps per key found in a reopened run
        self.sent_params: set[str] = set()
        self.offline = False
        self._last_attempt = float("-inf")
        self._dataset_pending = False
        self._spill_path: Path | None = None
        self._instance = next(_INSTANCES)

    # -- connection -------------------------------------------------------------------------------------
    def _open_run(self) -> None:
        """MONAI's run lookup (latest unfinished run of ``run_name``, else a new run) + what it already holds."""
        self._set_experiment()
        if not self.experiment:
            raise ValueError(f"Failed to set experiment '{self.experiment_name}' as the active experiment")
        run_name = f"run_{time.strftime('%Y%m%d_%H%M%S')}" if self.run_name is None else self.run_name
        runs = self.client.search_runs(self.experiment.experiment_id)
        runs = [
            r for r in runs
            if (r.info.run_name == run_name or not self.run_name) and r.info.status != self.run_finish_status
        ]  # fmt: skip
        if runs:
            self.cur_run = self.client.get_run(runs[-1].info.run_id)
            self.sent_params |= set(self.cur_run.data.params)
            for key in self.cur_run.data.metrics:
                history = self.client.get_metric_history(self.cur_run.info.run_id, key)
                self.in_run[key] = {int(m.step) for m in history}
            # values buffered before the run could be opened may repeat what the interrupted process sent
            self.pending_metrics = [m for m in self.pending_metrics if m.step not in self.in_run.get(m.key, ())]
        else:
            self.cur_run = self.client.create_run(experiment_id=self.experiment.experiment_id, run_name=run_name)

    def _send(self) -> None:
        """Send everything pending (may raise); items leave the buffer only once sent."""
        if self.cur_run is None:
            self._open_run()
        run_id = self.cur_run.info.run_id
        params = {k: v for k, v in self.pending_params.items() if k not in self.sent_params}
        items = list(params.items())
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            chunk = items[start : start + MAX_PARAMS_PER_BATCH]
            self.client.log_batch(run_id=run_id, metrics=[], params=[Param(k, v) for k, v in chunk], tags=[])
            self.sent_params.update(k for k, _ in chunk)
        self.pending_params.clear()
        while self.pending_metrics:
            chunk = self.pending_metrics[:MAX_METRICS_PER_BATCH]
            self.client.log_batch(run_id=run_id, metrics=chunk, params=[], tags=[])
            del self.pending_metrics[: len(chunk)]
        if self._dataset_pending:
            self._dataset_pending = False
            if self.dataset_logger:
                self.dataset_logger(self.dataset_dict)
            else:
                self._default_dataset_log(self.dataset_dict)
        while self.pending_artifacts:
            self.client.log_artifact(run_id, self.pending_artifacts[0])
            self.pending_artifacts.pop(0)
        if self.pending_status is not None:
            self.client.set_terminated(run_id, self.pending_status)
            self.pending_status = None
            self.cur_run = None

    def _pending_count(self) -> str:
        parts = [f"{len(self.pending_metrics)} metric values"]
        if self.pending_params:
            parts.append(f"{len(self.pending_params)} params")
        if self.pending_artifacts:
            parts.append(f"{len(self.pending_artifacts)} artifacts")
        return ", ".join(parts)

    def flush(self, force: bool = False) -> bool:
        """Try to send the buffer (while offline at most every ``retry_interval`` s unless ``force``); True if empty.

        Raises:
            MlflowException: errors other than an unreachable server.
        """
        if self.offline and not force and time.monotonic() - self._last_attempt < self._wait:
            return False
        if self.offline:
            self._wait = min(2 * self._wait, self.max_retry_interval)
        self._last_attempt = time.monotonic()
        try:
            self._send()
        except Exception as error:  # noqa: BLE001 - classified below, re-raised unless an outage
            if not is_unreachable_error(error):
                raise
            self.offline = True
            if self.tracking_uri not in _OUTAGES:
                _OUTAGES[self.tracking_uri] = time.time()
                logger.warning(
                    "MLflow tracking server %s unreachable (%s); training continues; %s buffered; retrying in %g s "
                    "(backing off up to %g s)",
                    self.tracking_uri, _short(error), self._pending_count(), self.retry_interval, self.max_retry_interval,
                )  # fmt: skip
            return False
        if self._spill_path is not None:  # everything it held has now been sent
            self._spill_path.unlink(missing_ok=True)
            self._spill_path = None
        if self.offline:
            since = _OUTAGES.pop(self.tracking_uri, None)
            outage = "" if since is None else f" after {time.time() - since:.0f} s"
            logger.info("MLflow tracking server %s reachable again%s; buffered values sent", self.tracking_uri, outage)
            self.offline = False
            self._wait = self.retry_interval
        return True

    # -- MLFlowHandler hooks ----------------------------------------------------------------------------
    def start(self, engine: Any) -> None:
        params = dict(self.experiment_param or {})
        params.update({attr: getattr(engine.state, attr, None) for attr in self.default_tracking_params})
        self._log_params(params)
        if self.dataset_dict is not None or self.dataset_logger is not None:
            self._dataset_pending = True
            self.flush(force=not self.offline)

    def _log_params(self, params: dict[str, Any]) -> None:
        for key, value in params.items():
            if key not in self.sent_params:
                self.pending_params[key] = str(value)
        self.flush()

    def _log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        timestamp = int(time.time() * 1000)
        step = int(step or 0)
        for key, value in flatten_dict(metrics).items():
            if value is None:
                continue
            if step not in self.in_run.get(key, ()):
                self.pending_metrics.append(Metric(key, float(value), timestamp, step))
        self.flush()

    def complete(self) -> None:
        # not forced: a validator completes every epoch, and an outage must not cost a request per validation
        self.pending_artifacts.extend(self._parse_artifacts() if self.artifacts else [])
        if not self.flush():
            self._spill("when its engine completed")

    def close(self) -> None:
        self.pending_status = self.run_finish_status
        try:
            if not self.flush(force=True):
                self._spill("when closing the run (it stays RUNNING in MLflow)")
        finally:
            self._dispose_sqlite_store()

    # -- leftovers --------------------------------------------------------------------------------------
    def _spill(self, when: str) -> None:
        """(Re)write this handler's leftovers file: it always holds exactly what is still unsent."""
        folder = Path(self.spill_dir) if self.spill_dir is not None else Path.cwd()
        folder.mkdir(parents=True, exist_ok=True)
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(self.run_name or "run"))
        path = folder / f"mlflow_unsent_{name}_{os.getpid()}_{self._instance}.json"
        first = self._spill_path is None
        self._spill_path = path
        content = {
            "tracking_uri": self.tracking_uri,
            "experiment_name": self.experiment_name,
            "run_name": self.run_name,
            "run_id": None if self.cur_run is None else self.cur_run.info.run_id,
            "metrics": [[m.key, m.value, m.timestamp, m.step] for m in self.pending_metrics],
            "params": self.pending_params,
            "artifacts": self.pending_artifacts,
            "status": self.pending_status,
        }
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(content, indent=1))
        os.replace(tmp, path)
        if not first:  # e.g. the validator completes every epoch: one warning per outage is enough
            return
        logger.warning(
            "MLflow tracking server %s still unreachable %s: %s not logged yet, saved to %s; the file is deleted "
            "once they are sent, if it remains send it with qgssl_monai.handlers.tracking.replay_unsent",
            self.tracking_uri, when, self._pending_count(), path,
        )  # fmt: skip


def _short(error: BaseException, limit: int = 160) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= limit else text[:limit] + "..."


def replay_unsent(path: str | os.PathLike, tracking_uri: str | None = None) -> str:
    """Send a ``mlflow_unsent_*.json`` file to its run (found by id, else by experiment + run name); returns the run id.

    Metrics keep their steps and timestamps; ``(key, step)`` pairs already in the run are skipped.
    """
    content = json.loads(Path(path).read_text())
    client = mlflow.MlflowClient(tracking_uri=tracking_uri or content["tracking_uri"])
    run_id = content.get("run_id")
    if run_id is None:
        experiment = client.get_experiment_by_name(content["experiment_name"])
        if experiment is None:  # the server was down before the run could even be created
            experiment = client.get_experiment(client.create_experiment(content["experiment_name"]))
        runs = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == content["run_name"]]
        if runs:
            run_id = runs[0].info.run_id
        else:
            run_id = client.create_run(experiment.experiment_id, run_name=content["run_name"]).info.run_id
    run = client.get_run(run_id)
    seen = {key: {int(m.step) for m in client.get_metric_history(run_id, key)} for key in run.data.metrics}
    metrics = [Metric(k, float(v), int(t), int(s)) for k, v, t, s in content["metrics"] if int(s) not in seen.get(k, ())]
    for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])
    params = [Param(k, str(v)) for k, v in content["params"].items() if k not in run.data.params]
    for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[start : start + MAX_PARAMS_PER_BATCH])
    for artifact in content["artifacts"]:
        if Path(artifact).is_file():
            client.log_artifact(run_id, artifact)
    if content.get("status"):
        client.set_terminated(run_id, content["status"])
    return run_id


def resilient_mlflow_settings(
    tracking_uri: str | None = None,
    experiment_name: str | None = None,
    run_name: str | None = None,
    close_on_complete: bool = True,
    iteration_log: bool = True,
    retry_interval: float = 30.0,
) -> dict[str, Any]:
    """MONAI's ``DEFAULT_MLFLOW_SETTINGS`` with every handler a :class:`ResilientMLFlowHandler`.

    Arguments left None keep MONAI's defaults (``experiment_name``, ``run_name`` and ``tracking_uri`` of the
    bundle config win over these top-level settings when the bundle defines them). ``close_on_complete=False``
    leaves finishing the run to the caller (the experiment runner); unsent leftovers go to ``@output_dir``.
    """
    import copy

    from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

    settings = copy.deepcopy(DEFAULT_MLFLOW_SETTINGS)
    configs = settings["configs"]
    for key, value in (("tracking_uri", tracking_uri), ("experiment_name", experiment_name), ("run_name", run_name)):
        if value is not None:
            configs[key] = value
    for role in settings["handlers_id"]:
        handler = configs[role]
        handler["_target_"] = f"{ResilientMLFlowHandler.__module__}.{ResilientMLFlowHandler.__name__}"
        handler["retry_interval"] = retry_interval
        handler["spill_dir"] = "@output_dir"
        if "close_on_complete" in handler:
            handler["close_on_complete"] = close_on_complete
    configs["trainer"]["iteration_log"] = iteration_log
    configs["trainer"]["tag_name"] = "train_iteration_loss"
    return settings

