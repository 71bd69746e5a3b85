"""Start and stop a MONAI Label server on the loopback interface (used by the server test and the load benchmark).

:class:`LabelServer` runs the stock CLI (``python -m monailabel.main start_server``, what the ``monailabel``
console script executes) with ``--host 127.0.0.1`` on a free port, waits a bounded time for ``/info/`` and
always kills the whole process group on exit, so no server outlives a test or a benchmark.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from qgssl_monai.networks.quality import write_quality_metadata

__all__ = ["LabelServer", "free_port", "request", "stage_app"]

LOOPBACK = "127.0.0.1"


def request(
    url: str,
    files: Mapping[str, tuple[str, bytes]] | None = None,
    data: Mapping[str, str] | None = None,
    method: str = "POST",
    timeout: float = 60.0,
) -> tuple[int, Any]:
    """Send a multipart request (standard library only); returns ``(status, JSON or bytes)``, also for 4xx/5xx.

    Args:
        url: full URL.
        files: ``{field: (file name, content)}`` uploads.
        data: ``{field: value}`` form fields (e.g. ``{"params": json.dumps({...})}``).
        method: HTTP method; without files and data the body is empty.
    """
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, value in (data or {}).items():
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, content) in (files or {}).items():
        body.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        body.write(content + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    if files or data:
        req = urllib.request.Request(url, data=body.getvalue(), method=method)
        req.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
    else:  # empty body (JSON-body endpoints such as /activelearning take an optional dict)
        req = urllib.request.Request(url, data=b"", method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            status, payload, kind = response.status, response.read(), response.headers.get("content-type", "")
    except urllib.error.HTTPError as err:
        status, payload, kind = err.code, err.read(), err.headers.get("content-type", "")
    return status, json.loads(payload) if "json" in kind else payload


def stage_app(
    app: str | os.PathLike,
    dest: str | os.PathLike,
    bundles: Mapping[str, tuple[str | os.PathLike, Mapping[str, torch.Tensor]] | tuple[str | os.PathLike, Mapping[str, torch.Tensor], Mapping[str, Any]]],
) -> Path:
    """Copy a MONAI Label app to ``dest`` with offline bundles under ``<dest>/model/<name>``.

    Args:
        app: the app folder (``apps/quality_checker``).
        dest: new app folder (must not exist).
        bundles: ``{name: (bundle folder whose configs/ are copied, state_dict saved as models/model.pt[, g's
            sidecar settings for :func:`~qgssl_monai.networks.quality.write_quality_metadata`])}``.

    Returns:
        ``dest`` (weights never touch the repository).
    """
    dest = Path(dest)
    shutil.copytree(app, dest, ignore=shutil.ignore_patterns("__pycache__", "logs", "model", "bin"))
    for name, (bundle, state, *sidecar) in bundles.items():
        target = dest / "model" / name
        shutil.copytree(Path(bundle) / "configs", target / "configs")
        (target / "models").mkdir(parents=True)
        torch.save(dict(state), target / "models" / "model.pt")
        if sidecar:
            write_quality_metadata(target / "models" / "model.pt", **sidecar[0])
    return dest


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LabelServer:
    """Context manager running ``monailabel start_server`` for ``app`` on ``127.0.0.1:<free port>``.

    Args:
        app: MONAI Label app folder.
        studies: datastore folder.
        conf: ``--conf key value`` pairs (e.g. ``{"models": "quality_predictor"}``).
        python: interpreter with ``monailabel`` installed (default: the current one).
        startup_timeout: seconds to wait for ``GET /info/`` to answer 200.
        env: extra environment variables (MONAI Label settings such as ``MONAI_LABEL_AUTO_UPDATE_SCORING``).
        log_file: where the server's stdout/stderr go (default ``<app>/logs/server_stdout.log``).

    Attributes:
        url: ``http://127.0.0.1:<port>`` once started.
    """

    def __init__(
        self,
        app: str | os.PathLike,
        studies: str | os.PathLike,
        conf: Mapping[str, str] | None = None,
        *,
        python: str = sys.executable,
        startup_timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
        log_file: str | os.PathLike | None = None,
    ) -> None:
        self.app = Path(app)
        self.studies = Path(studies)
        self.conf = dict(conf or {})
        self.python = python
        self.startup_timeout = float(startup_timeout)
        self.env = dict(env or {})
        self.log_file = Path(log_file) if log_file else self.app / "logs" / "server_stdout.log"
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        """The server command line."""
        cmd = [self.python, "-m", "monailabel.main", "start_server", "--app", str(self.app), "--studies", str(self.studies)]
        for key, value in self.conf.items():
            cmd += ["--conf", str(key), str(value)]
        return cmd + ["--host", LOOPBACK, "--port", str(self.port)]

    def start(self) -> LabelServer:
        """Start the server and wait until ``/info/`` answers.

        Raises:
            RuntimeError: the server exited or did not answer within ``startup_timeout`` (the log tail is included).
        """
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        # the venv's bin first: MONAI Label spawns `python` for background tasks
        env["PATH"] = str(Path(self.python).parent) + os.pathsep + env.get("PATH", "")
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"MONAI Label server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get_json("/info/", timeout=2.0)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"MONAI Label server did not answer within {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Terminate the server's process group (SIGTERM, then SIGKILL after 10 s)."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 40) -> str:
        """Last ``lines`` lines of the server log."""
        if not self.log_file.is_file():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        """``GET`` ``path`` and decode the JSON answer."""
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def __enter__(self) -> LabelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
