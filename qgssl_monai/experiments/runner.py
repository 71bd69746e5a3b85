"""Idempotent, resumable execution of an experiment's steps, each tracked as one MLflow run.

A :class:`Step` is a key (``quality:train``, ``ssl:mt_qw:unet:0``), the configuration that determines
its result (hashed together with the hashes of the steps it depends on), the files it must leave
behind and an action. For every selected step :class:`ExperimentRunner` decides:

* **skip** — a FINISHED MLflow run with the same step hash exists and every output file exists;
* **resume** — an unfinished run (RUNNING after a SIGKILL, FAILED, KILLED) with the same hash exists:
  it is reopened and the action runs with ``ctx.resume=True`` (bundle steps then load their
  resume checkpoints), so finished epochs are not lost;
* **run** — otherwise, in a new run;
* **blocked** — a dependency failed, or (with ``--only``) is not finished yet.

A failing action marks its run FAILED and the runner carries on with the steps that do not depend on
it; ``KeyboardInterrupt`` marks it KILLED and stops. ``dry_run`` only reports the decisions.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue
from typing import Any

from qgssl_monai.experiments.config import stable_hash
from qgssl_monai.experiments.tracking import (
    TAG_CONFIG_HASH,
    TAG_EXPERIMENT,
    TAG_KIND,
    TAG_STEP,
    TAG_STEP_HASH,
    StepTracker,
)

__all__ = ["Step", "StepContext", "Decision", "ExperimentRunner", "select_steps", "run_subprocess_pool"]

logger = logging.getLogger(__name__)


@dataclass
class StepContext:
    """What a step action gets: its MLflow run, whether it resumes an interrupted run, and the tracker."""

    step: Step
    run_id: str
    resume: bool
    tracker: StepTracker


@dataclass
class Step:
    """One unit of an experiment.

    Args:
        key: unique name, ``kind:...`` (used by ``--only`` and as the MLflow ``qgssl_step`` tag).
        kind: step family (``weak``, ``quality_train``, ``quality_eval``, ``ssl``, ...).
        config: everything that determines the result (JSON-able); hashed.
        action: ``action(ctx)`` does the work; raising marks the run FAILED.
        outputs: files that must exist for the step to count as done.
        deps: keys of steps that must be finished first.
        params: MLflow params logged when the run starts.
        tags: extra MLflow tags (e.g. ``qgssl_method``), set on every (re)start.
    """

    key: str
    kind: str
    config: dict[str, Any]
    action: Callable[[StepContext], None]
    outputs: list[str] = field(default_factory=list)
    deps: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    hash: str = ""


@dataclass
class Decision:
    """What the runner does with a step and why."""

    step: Step
    action: str  # skip | resume | run | blocked
    reason: str
    run_id: str | None = None


def _finalise_hashes(steps: Sequence[Step]) -> None:
    """Hash each step's config together with its dependencies' hashes (steps in dependency order)."""
    by_key: dict[str, Step] = {}
    for step in steps:
        if step.key in by_key:
            raise ValueError(f"duplicate step key {step.key!r}")
        missing = [d for d in step.deps if d not in by_key]
        if missing:
            raise ValueError(f"step {step.key!r} depends on {missing}, which are not earlier steps of the plan")
        step.hash = stable_hash({"config": step.config, "deps": {d: by_key[d].hash for d in step.deps}})
        by_key[step.key] = step


def select_steps(steps: Sequence[Step], only: Sequence[str] | None) -> list[Step]:
    """Steps whose key matches one of the ``only`` patterns (exact keys or shell globs); all when empty.

    Raises:
        ValueError: a pattern matches no step (the message lists the available keys).
    """
    if not only:
        return list(steps)
    chosen = []
    for pattern in only:
        hits = [s for s in steps if fnmatch.fnmatchcase(s.key, pattern)]
        if not hits:
            raise ValueError(f"--only {pattern!r} matches no step; steps: {[s.key for s in steps]}")
        chosen.extend(h for h in hits if h not in chosen)
    return [s for s in steps if s in chosen]


class ExperimentRunner:
    """Runs steps in order, skipping finished ones and resuming interrupted ones.

    Args:
        steps: the plan, dependencies before dependants.
        tracker: MLflow access for this experiment.
        config_hash: hash of the experiment definition (``qgssl_config_hash`` tag).
    """

    def __init__(self, steps: Sequence[Step], tracker: StepTracker, config_hash: str) -> None:
        self.steps = list(steps)
        _finalise_hashes(self.steps)
        self.by_key = {s.key: s for s in self.steps}
        self.tracker = tracker
        self.config_hash = config_hash

    def tags(self, step: Step) -> dict[str, str]:
        return {
            TAG_EXPERIMENT: self.tracker.experiment_name,
            TAG_CONFIG_HASH: self.config_hash,
            TAG_STEP: step.key,
            TAG_STEP_HASH: step.hash,
            TAG_KIND: step.kind,
            **step.tags,
        }

    def run_name(self, step: Step) -> str:
        """Unique per (step, hash): MONAI's ``MLFlowHandler`` attaches to the unfinished run of this name."""
        return f"{step.key}@{step.hash[:8]}"

    def decide(self, step: Step, finished: Mapping[str, bool]) -> Decision:
        """Decision for one step; ``finished[key]`` tells whether a dependency is done (this session or before)."""
        done_run, open_run = self.tracker.find(step.key, step.hash)
        if done_run is not None:
            missing = [o for o in step.outputs if not Path(o).exists()]
            if not missing:
                return Decision(step, "skip", f"finished run {done_run.info.run_id[:8]}, outputs present", done_run.info.run_id)
        blocking = [d for d in step.deps if not finished.get(d, False)]
        if blocking:
            return Decision(step, "blocked", f"needs {', '.join(blocking)}")
        if done_run is not None:
            return Decision(step, "run", f"finished run {done_run.info.run_id[:8]} but outputs missing: {missing[:2]}")
        if open_run is not None:
            return Decision(
                step, "resume", f"run {open_run.info.run_id[:8]} is {open_run.info.status}", open_run.info.run_id
            )
        previous = self.tracker.step_runs(step.key)
        if previous:
            return Decision(step, "run", f"config changed (hash {step.hash[:8]}, previous {previous[0].data.tags.get(TAG_STEP_HASH, '?')[:8]})")
        return Decision(step, "run", "no run yet")

    def _is_finished(self, step: Step) -> bool:
        done_run, _ = self.tracker.find(step.key, step.hash)
        return done_run is not None and all(Path(o).exists() for o in step.outputs)

    def plan(self, only: Sequence[str] | None = None) -> list[Decision]:
        """Decisions without executing anything (``--dry-run``): a step to be run counts as finished for its
        dependants when it is itself selected."""
        selected = select_steps(self.steps, only)
        finished: dict[str, bool] = {s.key: self._is_finished(s) for s in self.steps if s not in selected}
        decisions = []
        for step in selected:
            decision = self.decide(step, finished)
            finished[step.key] = decision.action != "blocked"
            decisions.append(decision)
        return decisions

    def execute_step(self, step: Step, decision: Decision) -> bool:
        """Run one step's action inside its MLflow run; True on success."""
        tags = self.tags(step)
        if decision.action == "resume" and decision.run_id:
            run_id = decision.run_id
            self.tracker.reopen(run_id, tags)
        else:
            run_id = self.tracker.create(self.run_name(step), tags)
        self.tracker.log_params(run_id, step.params)
        ctx = StepContext(step=step, run_id=run_id, resume=decision.action == "resume", tracker=self.tracker)
        logger.info("%s %s (%s)", decision.action, step.key, decision.reason)
        try:
            step.action(ctx)
            missing = [o for o in step.outputs if not Path(o).exists()]
            if missing:
                raise FileNotFoundError(f"step {step.key} finished without writing {missing}")
        except KeyboardInterrupt:
            self.tracker.finish(run_id, "KILLED")
            raise
        except Exception:
            logger.exception("step %s failed (MLflow run %s marked FAILED)", step.key, run_id)
            self.tracker.finish(run_id, "FAILED")
            return False
        self.tracker.finish(run_id, "FINISHED")
        return True

    def run(
        self,
        only: Sequence[str] | None = None,
        dry_run: bool = False,
        parallel: Callable[[list[Step]], dict[str, bool]] | None = None,
        parallel_kind: str = "ssl",
    ) -> list[Decision]:
        """Execute the selected steps.

        Args:
            only: key patterns (see :func:`select_steps`).
            dry_run: decide and log, execute nothing.
            parallel: when given, receives the consecutive runnable steps of kind ``parallel_kind`` (their
                dependencies done) and returns ``{key: success}``; used to fan SSL runs out over GPUs.

        Returns:
            The decisions, with ``action`` updated to ``done``/``failed`` for executed steps.
        """
        if dry_run:
            return self.plan(only)
        selected = select_steps(self.steps, only)
        finished: dict[str, bool] = {s.key: self._is_finished(s) for s in self.steps if s not in selected}
        decisions: list[Decision] = []
        batch: list[tuple[Step, Decision]] = []

        def flush() -> None:
            if not batch:
                return
            results = parallel([s for s, _ in batch]) if parallel else {}
            for s, d in batch:
                ok = results.get(s.key, False) and self._is_finished(s)
                finished[s.key] = ok
                d.action, d.reason = ("done" if ok else "failed"), d.reason
            batch.clear()

        for step in selected:
            if parallel and step.kind == parallel_kind:
                decision = self.decide(step, finished)
                decisions.append(decision)
                if decision.action in ("run", "resume"):
                    batch.append((step, decision))
                else:
                    finished[step.key] = decision.action == "skip"
                continue
            flush()
            decision = self.decide(step, finished)
            decisions.append(decision)
            if decision.action == "skip":
                finished[step.key] = True
            elif decision.action == "blocked":
                finished[step.key] = False
                logger.warning("blocked %s: %s", step.key, decision.reason)
            else:
                ok = self.execute_step(step, decision)
                finished[step.key] = ok
                decision.action = "done" if ok else "failed"
        flush()
        return decisions


#: set in every pool worker's environment; ``run_experiment`` never fans out from inside a worker
WORKER_ENV = "QGSSL_EXPERIMENT_WORKER"


def run_subprocess_pool(
    commands: Mapping[str, Sequence[str]],
    devices: Sequence[int | str],
    env: Mapping[str, str] | None = None,
    log_dir: str | Path | None = None,
    threads_per_worker: int | None = None,
) -> dict[str, bool]:
    """Run each command in a subprocess, at most one per device at a time, pinned with ``CUDA_VISIBLE_DEVICES``.

    Args:
        commands: ``{name: argv}``.
        devices: GPU indices (one worker per entry); an entry ``"cpu"`` is a CPU slot (GPUs hidden).
        env: base environment (default: this process's).
        log_dir: when given, each command's output goes to ``<log_dir>/<name>.log``.
        threads_per_worker: when given, ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` of every subprocess.

    Returns:
        ``{name: exit code == 0}``.
    """
    free: Queue = Queue()
    for device in devices:
        free.put(device)
    lock = threading.Lock()
    results: dict[str, bool] = {}

    def work(name: str, argv: Sequence[str]) -> None:
        device = free.get()
        try:
            child_env = dict(env if env is not None else os.environ)
            child_env["CUDA_VISIBLE_DEVICES"] = "" if device == "cpu" else str(device)
            child_env[WORKER_ENV] = "1"  # a worker runs its step itself, never fans out again
            if threads_per_worker is not None:
                child_env["OMP_NUM_THREADS"] = child_env["MKL_NUM_THREADS"] = str(threads_per_worker)
            started = time.time()
            if log_dir is not None:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                safe = name.replace(":", "_").replace("/", "_")
                with open(Path(log_dir) / f"{safe}.log", "w") as log:
                    code = subprocess.call(list(argv), env=child_env, stdout=log, stderr=subprocess.STDOUT)
            else:
                code = subprocess.call(list(argv), env=child_env)
            logger.info("%s on device %s: exit %d after %.0f s", name, device, code, time.time() - started)
            with lock:
                results[name] = code == 0
        finally:
            free.put(device)

    with ThreadPoolExecutor(max_workers=max(1, len(devices))) as pool:
        list(pool.map(lambda item: work(*item), commands.items()))
    return results
