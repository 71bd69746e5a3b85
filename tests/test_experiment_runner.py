"""Skip / resume / dry-run logic of the experiment runner, with stand-in steps (plain python callables)
tracked in a real SQLite MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qgssl_monai.experiments.runner import ExperimentRunner, Step, StepContext, run_subprocess_pool, select_steps
from qgssl_monai.experiments.tracking import StepTracker, default_tracking_uri


class Recorder:
    """Stand-in step action: writes its output file, counts calls, can fail on chosen attempts."""

    def __init__(self, out: Path, fail_on: tuple[int, ...] = ()) -> None:
        self.out = out
        self.fail_on = fail_on
        self.calls: list[bool] = []  # ctx.resume of every call

    def __call__(self, ctx: StepContext) -> None:
        self.calls.append(ctx.resume)
        if len(self.calls) in self.fail_on:
            raise RuntimeError("simulated crash")
        ctx.tracker.log_metrics(ctx.run_id, {"value": len(self.calls)})
        self.out.write_text(str(len(self.calls)))


def make_plan(tmp_path: Path, recorders: dict[str, Recorder], config_a: int = 1) -> list[Step]:
    def step(key: str, deps: list[str], config: dict) -> Step:
        return Step(key, "standin", config, recorders[key], outputs=[str(recorders[key].out)], deps=deps)

    return [
        step("a", [], {"x": config_a}),
        step("b", ["a"], {"y": 2}),
        step("c", [], {"z": 3}),
        step("d", ["c"], {"w": 4}),
    ]


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (creating its schema is the slow part); each test its own experiment."""
    return default_tracking_uri(tmp_path_factory.mktemp("mlflow"))


@pytest.fixture()
def tracker(tracking_uri: str, request: pytest.FixtureRequest) -> StepTracker:
    return StepTracker(tracking_uri, request.node.name)


def test_failed_step_resumes_and_finished_steps_are_skipped(tmp_path: Path, tracker: StepTracker) -> None:
    recorders = {k: Recorder(tmp_path / f"{k}.txt", fail_on=(1,) if k == "c" else ()) for k in "abcd"}
    first = ExperimentRunner(make_plan(tmp_path, recorders), tracker, "h1").run()
    assert [(d.step.key, d.action) for d in first] == [("a", "done"), ("b", "done"), ("c", "failed"), ("d", "blocked")]
    runs_c = tracker.step_runs("c")
    assert [r.info.status for r in runs_c] == ["FAILED"]
    assert tracker.step_runs("d") == []

    second = ExperimentRunner(make_plan(tmp_path, recorders), tracker, "h1").run()
    assert [(d.step.key, d.action) for d in second] == [("a", "skip"), ("b", "skip"), ("c", "done"), ("d", "done")]
    # nothing finished was redone; the failed run was reopened (same MLflow run, resume=True)
    assert recorders["a"].calls == [False] and recorders["b"].calls == [False]
    assert recorders["c"].calls == [False, True]
    assert [(r.info.run_id, r.info.status) for r in tracker.step_runs("c")] == [(runs_c[0].info.run_id, "FINISHED")]
    assert tracker.metric_history(runs_c[0].info.run_id, "value") == [(0, 2.0)]

    third = ExperimentRunner(make_plan(tmp_path, recorders), tracker, "h1").run()
    assert {d.action for d in third} == {"skip"}
    assert sum(len(r.calls) for r in recorders.values()) == 5


def test_config_change_and_missing_output_rerun_only_what_is_affected(tmp_path: Path, tracker: StepTracker) -> None:
    recorders = {k: Recorder(tmp_path / f"{k}.txt") for k in "abcd"}
    ExperimentRunner(make_plan(tmp_path, recorders), tracker, "h1").run()
    (tmp_path / "d.txt").unlink()
    runner = ExperimentRunner(make_plan(tmp_path, recorders, config_a=99), tracker, "h2")
    decisions = {d.step.key: d for d in runner.run(dry_run=True)}
    assert {k: d.action for k, d in decisions.items()} == {"a": "run", "b": "run", "c": "skip", "d": "run"}
    assert decisions["a"].reason.startswith("config changed")
    assert "outputs missing" in decisions["d"].reason
    assert sum(len(r.calls) for r in recorders.values()) == 4  # dry run executed nothing
    runner.run()
    assert [len(recorders[k].calls) for k in "abcd"] == [2, 2, 1, 2]
    # a reused (skipped) run is regrouped under the new experiment hash only when it runs; new runs carry h2
    assert tracker.step_runs("a", runner.by_key["a"].hash)[0].data.tags["qgssl_config_hash"] == "h2"
    assert len(tracker.step_runs("a")) == 2  # the old-config run is kept, not overwritten


def test_only_selects_by_glob_and_blocks_on_unfinished_dependency(tmp_path: Path, tracker: StepTracker) -> None:
    recorders = {k: Recorder(tmp_path / f"{k}.txt") for k in "abcd"}
    steps = make_plan(tmp_path, recorders)
    assert [s.key for s in select_steps(steps, ["[bd]"])] == ["b", "d"]
    with pytest.raises(ValueError, match="matches no step"):
        select_steps(steps, ["ssl:*"])
    decisions = ExperimentRunner(steps, tracker, "h").run(only=["b"])
    assert [(d.action, d.reason) for d in decisions] == [("blocked", "needs a")]
    ExperimentRunner(make_plan(tmp_path, recorders), tracker, "h").run(only=["a"])
    decisions = ExperimentRunner(make_plan(tmp_path, recorders), tracker, "h").run(only=["b"])
    assert [d.action for d in decisions] == ["done"] and recorders["c"].calls == []


def test_parallel_hook_receives_runnable_batch(tmp_path: Path, tracker: StepTracker) -> None:
    recorders = {k: Recorder(tmp_path / f"{k}.txt") for k in "abcd"}
    steps = make_plan(tmp_path, recorders)
    for s in steps[1:]:
        s.kind = "ssl"
    seen: list[list[str]] = []

    def fan_out(batch: list[Step]) -> dict[str, bool]:
        seen.append([s.key for s in batch])
        runner = ExperimentRunner(make_plan(tmp_path, recorders), tracker, "h")  # a worker: its own runner
        return {d.step.key: d.action == "done" for d in runner.run(only=[s.key for s in batch])}

    decisions = ExperimentRunner(steps, tracker, "h").run(parallel=fan_out)
    assert seen == [["b", "c"]]  # d depends on c, which is not finished when the batch is formed
    assert [d.action for d in decisions] == ["done", "done", "done", "blocked"]


SIGKILL_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    from qgssl_monai.experiments.runner import ExperimentRunner, Step
    from qgssl_monai.experiments.tracking import StepTracker

    out = Path(sys.argv[1])

    def prepare(ctx):
        with open(out / "prepare.calls", "a") as f:
            f.write("x")
        (out / "prepare.done").write_text("ok")

    def train(ctx):
        # a 4-epoch "training" with a resume checkpoint; SIGKILLed after epoch 2 when asked
        ckpt = out / "checkpoint.json"
        start = json.loads(ckpt.read_text())["epoch"] if ctx.resume and ckpt.exists() else 0
        for epoch in range(start + 1, 5):
            with open(out / "epochs.log", "a") as f:
                f.write(f"{epoch}\\n")
            ckpt.write_text(json.dumps({"epoch": epoch}))
            ctx.tracker.log_metrics(ctx.run_id, {"val": epoch / 10}, step=epoch)
            if epoch == 2 and os.environ.get("KILL_AT_EPOCH_2"):
                os.kill(os.getpid(), signal.SIGKILL)
        (out / "model.pt").write_text("trained")

    steps = [
        Step("prepare", "standin", {"p": 1}, prepare, outputs=[str(out / "prepare.done")]),
        Step("train", "standin", {"t": 1}, train, outputs=[str(out / "model.pt")], deps=["prepare"]),
    ]
    tracker = StepTracker(sys.argv[2], "sigkill-test")
    decisions = ExperimentRunner(steps, tracker, "h").run()
    print(json.dumps([[d.step.key, d.action] for d in decisions]))
    """
)


def test_sigkilled_run_resumes_from_its_checkpoint(tmp_path: Path, tracking_uri: str) -> None:
    script = tmp_path / "standin_experiment.py"
    script.write_text(SIGKILL_SCRIPT)
    uri = tracking_uri
    env = {**os.environ, "KILL_AT_EPOCH_2": "1"}
    killed = subprocess.run([sys.executable, str(script), str(tmp_path), uri], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    tracker = StepTracker(uri, "sigkill-test")
    (train_run,) = tracker.step_runs("train")
    assert train_run.info.status == "RUNNING"  # nobody could mark it: the process died
    assert tracker.step_runs("prepare")[0].info.status == "FINISHED"

    env.pop("KILL_AT_EPOCH_2")
    resumed = subprocess.run([sys.executable, str(script), str(tmp_path), uri], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1]) == [["prepare", "skip"], ["train", "done"]]
    assert (tmp_path / "prepare.calls").read_text() == "x"  # finished step not redone
    assert (tmp_path / "epochs.log").read_text().split() == ["1", "2", "3", "4"]  # epochs 1-2 not redone
    (again,) = tracker.step_runs("train")
    assert again.info.run_id == train_run.info.run_id and again.info.status == "FINISHED"
    assert tracker.metric_history(again.info.run_id, "val") == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]
    # metric_history keeps the last value of a repeated step; the raw history shows none was logged twice
    assert sorted(m.step for m in tracker.client.get_metric_history(again.info.run_id, "val")) == [1, 2, 3, 4]


def test_subprocess_pool_pins_one_run_per_device(tmp_path: Path) -> None:
    # each "run" records its CUDA_VISIBLE_DEVICES and holds a per-device lock file while it works
    code = textwrap.dedent(
        """
        import os, sys, time
        from pathlib import Path
        device = os.environ["CUDA_VISIBLE_DEVICES"]
        lock = Path(sys.argv[1]) / f"busy_{device}"
        assert not lock.exists(), "two runs on one device"
        lock.write_text(sys.argv[2])
        time.sleep(0.3)
        lock.unlink()
        (Path(sys.argv[1]) / f"{sys.argv[2]}.device").write_text(device)
        sys.exit(3 if sys.argv[2] == "bad" else 0)
        """
    )
    names = ["r0", "r1", "r2", "r3", "bad"]
    commands = {n: [sys.executable, "-c", code, str(tmp_path), n] for n in names}
    results = run_subprocess_pool(commands, devices=[0, 1], log_dir=tmp_path / "logs")
    assert results == {"r0": True, "r1": True, "r2": True, "r3": True, "bad": False}
    assert {(tmp_path / f"{n}.device").read_text() for n in names} == {"0", "1"}
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == sorted(f"{n}.log" for n in names)
