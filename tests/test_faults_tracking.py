"""The MLflow tracking server going away mid-run: training goes on, metrics are buffered, sent or spilled."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from ignite.engine import Engine, Events
from mlflow.exceptions import MlflowException

from qgssl_monai.experiments.pipeline import _tracking_settings
from qgssl_monai.handlers.tracking import (
    ResilientMLFlowHandler,
    bound_http_retries,
    is_unreachable_error,
    replay_unsent,
    resilient_mlflow_settings,
)
from ssl_bundle_utils import config_files, make_workflow

REPO = Path(__file__).resolve().parents[1]
HANDLER = "qgssl_monai.handlers.tracking.ResilientMLFlowHandler"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def _bounded_http(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # MONAI's handler would prefer it over the argument
    for key in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (creating its schema is the slow part); each test its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _toy_engine() -> Engine:
    engine = Engine(lambda e, batch: 0.25 * e.state.iteration)

    @engine.on(Events.EPOCH_COMPLETED)
    def _metrics(e: Engine) -> None:  # registered before the handler: what it logs at the epoch end
        e.state.metrics = {"score": e.state.epoch / 10}

    return engine


def test_error_classification_and_bounded_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_unreachable_error(MlflowException("API request to http://h/api failed with exception HTTPConnectionPool"))
    assert is_unreachable_error(MlflowException("API request to http://h/api failed with timeout exception x."))
    assert is_unreachable_error(ConnectionRefusedError(111, "refused"))
    assert not is_unreachable_error(MlflowException("Changing param values is not allowed.", error_code="INVALID_PARAMETER_VALUE"))
    assert not is_unreachable_error(ValueError("bad"))
    assert bound_http_retries() == {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                                    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}  # fmt: skip
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")  # the user's own setting wins
    assert bound_http_retries()["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60"


def test_settings_point_bundles_and_runner_at_the_resilient_handler() -> None:
    settings = _tracking_settings("sqlite:///x.db", "exp", "step@1234")
    configs = settings["configs"]
    assert {configs[role]["_target_"] for role in ("trainer", "validator", "evaluator")} == {HANDLER}
    assert (configs["tracking_uri"], configs["experiment_name"], configs["run_name"]) == ("sqlite:///x.db", "exp", "step@1234")
    assert configs["trainer"]["close_on_complete"] is False and configs["evaluator"]["close_on_complete"] is False
    assert configs["trainer"]["iteration_log"] is False and configs["trainer"]["spill_dir"] == "@output_dir"
    for bundle in ("ssl_segmentation", "quality_predictor"):  # the JSON shipped for `--tracking <file>`
        shipped = json.loads((REPO / "bundles" / bundle / "configs" / "mlflow_resilient.json").read_text())
        assert shipped == json.loads(json.dumps(resilient_mlflow_settings()))


def test_dead_server_spills_and_replay_delivers(tmp_path: Path, store: str, caplog: pytest.LogCaptureFixture) -> None:
    """Nothing listens on the port for the whole run: it completes, warns, spills; the spill is replayed later."""
    uri = f"http://127.0.0.1:{free_port()}"
    engine = _toy_engine()
    handler = ResilientMLFlowHandler(tracking_uri=uri, experiment_name="outage", run_name="toy", output_transform=lambda x: x,
                                     retry_interval=0, close_on_complete=True, spill_dir=tmp_path)  # fmt: skip
    handler.attach(engine)
    with caplog.at_level(logging.INFO, logger="qgssl_monai.handlers.tracking"):
        engine.run(range(2), max_epochs=3)
    assert engine.state.epoch == 3  # training was never interrupted
    messages = [r.getMessage() for r in caplog.records if r.name == "qgssl_monai.handlers.tracking"]
    assert len(messages) == 2, messages  # one outage warning + one final "NOT logged" warning
    assert messages[0].startswith(f"MLflow tracking server {uri} unreachable (MlflowException: API request to")
    assert "training continues; 0 metric values, 2 params buffered; retrying in 0 s" in messages[0]
    (spill,) = tmp_path.glob("mlflow_unsent_toy_*.json")
    assert f"still unreachable when its engine completed: 9 metric values, 2 params not logged yet, saved to {spill}" in messages[1]
    content = json.loads(spill.read_text())
    assert [(k, v, s) for k, v, _, s in content["metrics"] if k == "score"] == [("score", 0.1, 1), ("score", 0.2, 2), ("score", 0.3, 3)]
    assert [s for k, _, _, s in content["metrics"] if k == "Loss"] == [1, 2, 3, 4, 5, 6]
    assert content["params"] == {"max_epochs": "3", "epoch_length": "2"} and content["status"] == "FINISHED"

    # "the server is back": any store can receive the spill
    run_id = replay_unsent(spill, tracking_uri=store)
    client = mlflow.MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "toy" and run.data.params["max_epochs"] == "3"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "score")] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    replay_unsent(spill, tracking_uri=store)  # replaying twice stores nothing twice
    assert len(client.get_metric_history(run_id, "Loss")) == 6


def test_reopened_run_skips_records_it_already_holds(store: str) -> None:
    client = mlflow.MlflowClient(store)
    run_id = client.create_run(client.create_experiment("resume"), run_name="r").info.run_id
    client.log_metric(run_id, "score", 0.1, step=1)  # what a killed process had logged
    client.log_metric(run_id, "score", 0.2, step=2)
    engine = _toy_engine()
    ResilientMLFlowHandler(tracking_uri=store, experiment_name="resume", run_name="r", iteration_log=False).attach(engine)
    engine.run(range(2), max_epochs=3)
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "score")]
    assert sorted(history) == [(1, 0.1), (2, 0.2), (3, 0.3)]  # same run, epochs 1-2 not logged again


class MlflowServer:
    """A real ``mlflow server`` subprocess on a fixed port and SQLite store, which can be killed and restarted."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 240) -> float:
        """Start and wait for ``/health``; returns the seconds it took."""
        started = time.time()
        log = open(self.folder / "server.log", "a")
        argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
                "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", "1"]  # fmt: skip
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no huey job workers: faster start
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        log.close()
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return time.time() - started
            except OSError:
                pass
            if self.process.poll() is not None or time.time() - started > timeout:
                self.kill()
                pytest.fail(f"mlflow server did not come up: {(self.folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the server's process group (the server "goes away" without any goodbye)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait()
        self.process = None


@pytest.fixture()
def mlflow_server(tmp_path: Path):
    """A server object, not started yet; killed at the end whatever happened."""
    server = MlflowServer(tmp_path)
    try:
        yield server
    finally:
        server.kill()


@pytest.mark.slow
def test_server_outages_mid_training(mlflow_server: MlflowServer, demo_manifest: Path, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """ssl bundle, 3 epochs against a real ``mlflow server``: down at the start, up after epoch 1 (the buffer
    arrives), SIGKILLed after epoch 2 and never back (the rest is spilled, then replayed into its store)."""
    settings = resilient_mlflow_settings(experiment_name="outage", run_name="mt_run", retry_interval=0)
    settings["configs"].update(tracking_uri=mlflow_server.uri, save_execute_config=False)
    out = tmp_path / "run"
    workflow = make_workflow(config_files("method/mt"), demo_manifest, out, tracking=settings, image_size=32,
                             num_epochs=3, epoch_length=2, tracking_uri=mlflow_server.uri,
                             experiment_name="outage", run_name="mt_run")  # fmt: skip
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    seen: dict[str, list] = {}

    def server_up(_: Engine) -> None:
        mlflow_server.start()

    def server_killed(_: Engine) -> None:  # first look at what arrived while it was up, then kill it
        client = mlflow.MlflowClient(mlflow_server.uri)
        (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
        seen["val_mean_dice"] = [m.step for m in client.get_metric_history(run.info.run_id, "val_mean_dice")]
        seen["params"] = sorted(run.data.params)
        mlflow_server.kill()

    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), server_up)  # after this epoch's checkpoint and metrics
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=2), server_killed)
    with caplog.at_level(logging.INFO, logger="qgssl_monai.handlers.tracking"):
        workflow.run()
    workflow.finalize()
    assert trainer.state.epoch == 3  # neither outage stopped training
    assert sorted(p.name for p in (out / "models").iterdir()) == ["checkpoint_epoch=3.pt", "model.pt"]
    assert torch.load(out / "models" / "checkpoint_epoch=3.pt", weights_only=True)["trainer"]["iteration"] == 6
    # epoch 1 (buffered while the server was down) arrived; epoch 2 was logged live before the kill
    assert seen["val_mean_dice"] == [1, 2] and "method" in seen["params"]
    messages = [r.getMessage() for r in caplog.records if r.name == "qgssl_monai.handlers.tracking"]
    outages = [m for m in messages if "unreachable (" in m]
    assert len(outages) == 2 and all("training continues" in m for m in outages), messages  # once per outage
    assert sum("reachable again" in m for m in messages) >= 1, messages
    spills = sorted((out / "eval").glob("mlflow_unsent_mt_run_*.json"))
    assert spills and any("not logged yet, saved to" in m for m in messages)

    store = f"sqlite:///{mlflow_server.folder / 'server.db'}"  # the dead server's own backend store
    run_ids = {replay_unsent(path, tracking_uri=store) for path in spills}
    client = mlflow.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
    assert run_ids == {run.info.run_id} and run.info.status == "FINISHED" and run.data.params["method"] == "mt"
    for key in ("train_loss", "val_mean_dice", "train_sup_loss"):  # every epoch once, whatever the server's state
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2, 3], key
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_iteration_loss")) == [1, 2, 3, 4, 5, 6]
