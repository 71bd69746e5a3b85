"""A tiny experiment tracked by a real ``mlflow server`` over HTTP (artifacts proxied by the server)."""

from __future__ import annotations

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
import yaml

from qgssl_monai.cli import main as qgssl_main
from qgssl_monai.experiments.report import load_results

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def mlflow_server(tmp_path: Path):
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                log.flush()
                pytest.fail(f"mlflow server did not come up: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server's own process group (uvicorn workers included)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_tiny_experiment_over_http(mlflow_server: str, demo_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    content = yaml.safe_load((REPO / "experiments" / "ci.yaml").read_text())
    content["data"] = {"labeled": str(demo_manifest), "unlabeled": str(demo_manifest)}
    content["name"] = "qgssl-http"
    experiment = tmp_path / "http.yaml"
    experiment.write_text(yaml.safe_dump(content))
    out = tmp_path / "out"
    argv = ["experiment", "run", str(experiment), "--output", str(out), "--tracking-uri", mlflow_server]
    assert qgssl_main([*argv, "--only", "data:prepare", "ssl:sup:*", "--no-report"]) == 0
    assert not (out / "mlflow.db").exists()  # nothing went to the embedded store

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("qgssl-http").experiment_id], "tags.qgssl_step = 'ssl:sup:unet:0'")
    assert run.info.status == "FINISHED" and run.data.params["method"] == "sup"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "metrics")] == ["metrics/test_per_image.csv"]

    capsys.readouterr()
    assert qgssl_main(["experiment", "report", str(experiment), "--output", str(out), "--tracking-uri", mlflow_server]) == 0
    table = (out / "report" / "table1.md").read_text()
    assert f"| sup | **{100 * run.data.metrics['test_dsc_mean']:.2f}** |" in table
    assert "| qar | – | – |" in table  # not run: --only selected SUP
    (result,) = load_results(mlflow_server, "qgssl-http")  # per-image CSV downloaded through the server
    assert len(result.per_image) == 8 and result.val_curve == [(1, pytest.approx(run.data.metrics["val_dsc"]))]
