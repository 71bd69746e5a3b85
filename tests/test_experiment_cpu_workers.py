"""CPU fan-out of SSL runs (``execution.cpu_workers``)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from qgssl_monai.experiments.runner import run_subprocess_pool


def test_subprocess_pool_cpu_slots_hide_gpus_set_threads_and_mark_workers(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import json, os, sys
        from pathlib import Path
        keys = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "QGSSL_EXPERIMENT_WORKER")
        (Path(sys.argv[1]) / f"{sys.argv[2]}.json").write_text(json.dumps({k: os.environ.get(k) for k in keys}))
        """
    )
    commands = {n: [sys.executable, "-c", code, str(tmp_path), n] for n in ("a", "b", "c")}
    results = run_subprocess_pool(commands, devices=["cpu", "cpu"], threads_per_worker=1)
    assert results == {"a": True, "b": True, "c": True}
    expected = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "QGSSL_EXPERIMENT_WORKER": "1"}
    for name in ("a", "b", "c"):
        assert json.loads((tmp_path / f"{name}.json").read_text()) == expected


def test_cpu_workers_must_be_a_positive_integer(tmp_path: Path) -> None:
    from qgssl_monai.experiments.config import ExperimentConfigError, load_experiment

    path = tmp_path / "exp.yaml"
    base = (Path(__file__).resolve().parents[1] / "experiments" / "ci.yaml").read_text()
    path.write_text(base.replace("execution: {launcher: inprocess, devices: cpu}", "execution: {launcher: inprocess, devices: cpu, cpu_workers: 0}"))
    with pytest.raises(ExperimentConfigError, match="cpu_workers"):
        load_experiment(path)


def test_resolved_experiment_file_is_written_atomically_and_left_alone_when_unchanged(tmp_path, monkeypatch) -> None:
    """Workers re-run ``write_resolved`` on the file they were started with while others start: the file is
    never truncated in place (a reader saw an empty YAML), and an unchanged file is not rewritten at all."""
    from pathlib import Path

    from qgssl_monai.experiments import pipeline

    class Cfg:
        def to_dict(self):
            return {"name": "x", "seeds": [0, 1], "source": "dropped"}

    path = pipeline.write_resolved(Cfg(), tmp_path)
    assert path.read_text() == "name: x\nseeds:\n- 0\n- 1\n"
    writes = []
    original = Path.write_text
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: writes.append(self) or original(self, *a, **k))
    before = path.stat().st_mtime_ns
    pipeline.write_resolved(Cfg(), tmp_path)
    assert writes == [] and path.stat().st_mtime_ns == before  # unchanged: untouched
    Cfg.to_dict = lambda self: {"name": "y"}
    pipeline.write_resolved(Cfg(), tmp_path)
    assert path.read_text() == "name: y\n" and path not in writes  # changed: written through a temp file
    assert not list(tmp_path.glob(".*.tmp"))
