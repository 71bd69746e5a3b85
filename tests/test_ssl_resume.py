"""Resume after interruption: 2 epochs straight == 1 epoch, stop, ``--resume true``, 1 more epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from ignite.engine import Events

from qgssl_monai.segmentation.training import latest_checkpoint
from ssl_bundle_utils import config_files, make_workflow

pytestmark = pytest.mark.slow

# MT: EMA teacher + gaussian input noise (torch RNG); augmentation on (transform RNG); shuffled loaders
RESUME_SETTINGS = {"num_epochs": 2, "epoch_length": 3, "seed": 5, "augment": True}


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{index}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _train(manifest: Path, out: Path, stop_after_epoch: int | None = None, resume: bool = False) -> dict:
    workflow = make_workflow(config_files("method/mt"), manifest, out, resume=resume, **RESUME_SETTINGS)
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    if stop_after_epoch is not None:
        # registered after the CheckpointSaver: the epoch's checkpoint is on disk when the run "dies"
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after_epoch), lambda engine: engine.terminate())
    workflow.run()
    workflow.finalize()
    return {"epoch": trainer.state.epoch, "iteration": trainer.state.iteration}


def test_resume_restores_identical_state(demo_manifest: Path, tmp_path: Path) -> None:
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert _train(demo_manifest, straight) == {"epoch": 2, "iteration": 6}
    assert _train(demo_manifest, interrupted, stop_after_epoch=1) == {"epoch": 1, "iteration": 3}
    assert latest_checkpoint(interrupted / "models").endswith("checkpoint_epoch=1.pt")
    assert _train(demo_manifest, interrupted, resume=True) == {"epoch": 2, "iteration": 6}

    expected = torch.load(latest_checkpoint(straight / "models"), weights_only=True)
    resumed = torch.load(latest_checkpoint(interrupted / "models"), weights_only=True)
    assert latest_checkpoint(interrupted / "models").endswith("checkpoint_epoch=2.pt")
    assert resumed["trainer"]["iteration"] == 6 and resumed["trainer"]["epoch_length"] == 3
    assert any(key.startswith("teacher.") for key in resumed["method"])  # the EMA teacher is checkpointed
    assert resumed["optimizer"]["state"], "optimizer moments missing"
    validation = resumed["validation_state"]  # early stopping + best-model bookkeeping survive the restart
    assert set(validation) == {"early_stop", "best_saver", "best_metric", "best_metric_epoch"}
    assert validation["best_metric_epoch"] in (1, 2) and len(validation["best_saver"]) == 1
    # weights, optimizer moments, LR scheduler, EMA teacher, trainer counters and RNG states all identical
    _assert_same(expected, resumed)


def test_resume_without_checkpoint_fails_clearly(demo_manifest: Path, tmp_path: Path) -> None:
    workflow = make_workflow(config_files("method/sup"), demo_manifest, tmp_path, resume=True)
    with pytest.raises(RuntimeError) as info:
        workflow.initialize()
    cause = info.value.__cause__
    assert isinstance(cause, FileNotFoundError) and "no checkpoint_epoch=<N>.pt in" in str(cause)


def test_validation_progress_state_round_trip(tmp_path: Path) -> None:
    from ignite.engine import Engine
    from monai.handlers import CheckpointSaver, EarlyStopHandler

    from qgssl_monai.segmentation.training import ValidationProgressState

    def build() -> ValidationProgressState:
        trainer, evaluator = Engine(lambda e, b: None), Engine(lambda e, b: None)
        evaluator.state.best_metric, evaluator.state.best_metric_epoch = -1.0, -1
        early_stop = EarlyStopHandler(patience=30, score_function=lambda e: 0.0, trainer=trainer)
        saver = CheckpointSaver(str(tmp_path), {"model": torch.nn.Linear(1, 1)}, save_key_metric=True,
                                key_metric_filename="model.pt")  # fmt: skip
        return ValidationProgressState(early_stop, saver, evaluator)

    source = build()
    source.early_stop._handler.counter, source.early_stop._handler.best_score = 4, 0.625
    source.best_saver._key_metric_checkpoint.load_state_dict({"_saved": [(0.625, "model.pt")]})
    source.evaluator.state.best_metric, source.evaluator.state.best_metric_epoch = 0.625, 3
    state = source.state_dict()
    assert state == {
        "early_stop": {"counter": 4, "best_score": 0.625},
        "best_saver": [(0.625, "model.pt")],
        "best_metric": 0.625,
        "best_metric_epoch": 3,
    }
    target = build()
    target.load_state_dict(state)
    assert (target.early_stop._handler.counter, target.early_stop._handler.best_score) == (4, 0.625)
    assert [(i.priority, i.filename) for i in target.best_saver._key_metric_checkpoint._saved] == [(0.625, "model.pt")]
    assert (target.evaluator.state.best_metric, target.evaluator.state.best_metric_epoch) == (0.625, 3)



def _train_until_sigkill(manifest: Path, out: Path, settings: dict, overrides: dict) -> None:
    """Child process body: train, SIGKILL itself right after iteration 5 was logged (mid-epoch 2)."""
    import os
    import signal

    workflow = make_workflow(config_files("method/mt"), manifest, out, tracking=settings, **overrides)
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    # registered after the MLflow handler: iteration 5 is logged, then the process dies without any cleanup
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=5), lambda engine: os.kill(os.getpid(), signal.SIGKILL))
    workflow.run()


def test_sigkill_mid_epoch_then_resume_logs_once_and_leaves_clean_checkpoints(demo_manifest: Path, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """SIGKILL at iteration 5 (epoch 2 of 3-step epochs), then ``--resume true`` in the same MLflow run."""
    import multiprocessing
    import signal

    import mlflow

    from qgssl_monai.handlers.tracking import resilient_mlflow_settings

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    names = {"tracking_uri": uri, "experiment_name": "sigkill", "run_name": "mt_seed5"}
    settings = resilient_mlflow_settings(**names)
    overrides = {**RESUME_SETTINGS, **names, "image_size": 32}
    out = tmp_path / "run"
    # a real separate process to SIGKILL; spawned, not forked: a fork after this process ran torch (OpenMP) can hang
    child = multiprocessing.get_context("spawn").Process(target=_train_until_sigkill, args=(demo_manifest, out, settings, overrides))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sigkill").experiment_id])
    assert run.info.status == "RUNNING"  # nobody could close it
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_iteration_loss")) == [1, 2, 3, 4, 5]
    assert latest_checkpoint(out / "models").endswith("checkpoint_epoch=1.pt")

    resumed = make_workflow(config_files("method/mt"), demo_manifest, out, tracking=settings, resume=True, **overrides)
    resumed.initialize()
    resumed.run()
    resumed.finalize()

    (again,) = client.search_runs([client.get_experiment_by_name("sigkill").experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    expected = {"train_iteration_loss": list(range(1, 7)), "lr_group_0": list(range(1, 7)), "train_loss": [1, 2],
                "train_sup_loss": [1, 2], "val_mean_dice": [1, 2]}  # fmt: skip
    for key in again.data.metrics:  # iterations 4-5 ran twice but are logged once; every key once per step
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), f"{key} logged twice: {sorted(steps)}"
        if key in expected:
            assert sorted(steps) == expected[key], key
    assert set(expected) <= set(again.data.metrics)
    models = out / "models"
    # only finished checkpoints, no temp file of an interrupted write (the resumed saver does not prune epoch 1)
    assert {p.name for p in models.iterdir()} <= {"checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt", "model.pt"}
    assert latest_checkpoint(models).endswith("checkpoint_epoch=2.pt") and (models / "model.pt").is_file()
    for path in models.glob("*.pt"):
        torch.load(path, weights_only=True)  # complete and loadable without unpickling code
    assert torch.load(models / "checkpoint_epoch=2.pt", weights_only=True)["trainer"]["iteration"] == 6
    assert list((out / "eval").glob("mlflow_unsent_*")) == []
