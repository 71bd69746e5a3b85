"""A NaN/Inf loss (or overflowing weights) fails the run with a clear message and keeps the last good checkpoint."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer

from qgssl_monai.handlers.nonfinite import NonFiniteLossError, NonFiniteLossGuard, last_good_checkpoint
from ssl_bundle_utils import BUNDLE, CONFIGS, TINY, make_workflow

REPO = Path(__file__).resolve().parents[1]


def _engine(outputs: dict[int, dict], epoch_length: int = 3) -> Engine:
    """An engine whose iteration ``i`` outputs ``outputs.get(i)`` (default: all terms finite)."""

    def step(engine: Engine, batch: int) -> dict:
        return outputs.get(engine.state.iteration, {"loss": 0.5, "sup_loss": 0.4, "unsup_loss": 0.1, "unsup_weight": 1.0})

    engine = Engine(step)
    engine.state.epoch_length = epoch_length
    return engine


def test_guard_names_iteration_terms_and_checkpoint(tmp_path: Path) -> None:
    torch.save({"network": {}}, tmp_path / "checkpoint_epoch=1.pt")
    engine = _engine({5: {"loss": float("inf"), "sup_loss": 0.3, "unsup_loss": float("inf"), "unsup_weight": 1.0}})
    NonFiniteLossGuard(checkpoint_dir=tmp_path).attach(engine)
    after = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: after.append(e.state.iteration))
    with pytest.raises(NonFiniteLossError) as raised:
        engine.run(range(3), max_epochs=3)
    message = str(raised.value)
    assert message.startswith("non-finite loss (loss=inf, unsup_loss=inf) at iteration 5 (epoch 2): training stopped")
    assert f"last good checkpoint: {tmp_path / 'checkpoint_epoch=1.pt'} (epoch 1; resume with --resume true)" in message
    assert after == [1, 2, 3, 4]  # handlers listed after the guard never saw the poisoned iteration
    assert engine.state.iteration == 5


def test_guard_ignores_finite_and_non_loss_values() -> None:
    guard = NonFiniteLossGuard()
    # unsup_weight / pred are not loss terms; finite losses pass
    assert guard.non_finite_terms({"loss": 1.0, "unsup_weight": float("nan"), "pred": torch.full((2,), float("nan"))}) == {}
    (term,) = guard.non_finite_terms({"loss": torch.tensor(float("nan")), "sup_loss": 2.0}).items()
    assert term[0] == "loss" and math.isnan(term[1])
    assert guard.non_finite_terms([{"loss": float("-inf")}, {"loss": float("-inf")}]) == {"loss": float("-inf")}
    assert guard.non_finite_terms(torch.tensor(float("inf"))) == {"loss": float("inf")}
    assert guard.non_finite_terms(None) == {}
    assert last_good_checkpoint(None) == "no checkpoint folder configured"


def test_weights_checked_after_the_epochs_last_iteration(tmp_path: Path) -> None:
    network = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    engine = _engine({})
    NonFiniteLossGuard(network=network, checkpoint_dir=tmp_path).attach(engine)
    saved_epochs = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: saved_epochs.append(e.state.epoch))  # a "saver"
    # the loss stays finite; the weights overflow during iteration 2 (not an epoch end) -> caught at iteration 3
    engine.add_event_handler(Events.ITERATION_STARTED(once=2), lambda e: network[1].bias.data.fill_(float("inf")))
    with pytest.raises(NonFiniteLossError) as raised:
        engine.run(range(3), max_epochs=2)
    assert str(raised.value).startswith("non-finite weights in 1 parameter tensor(s) (1.bias) at iteration 3 (epoch 1)")
    assert f"none yet in {tmp_path}" in str(raised.value)
    assert saved_epochs == []  # EPOCH_COMPLETED (checkpoint saving) never ran on the poisoned weights


def test_monai_supervised_trainer_decollated_output(tmp_path: Path) -> None:
    """MONAI's ``SupervisedTrainer`` (quality bundle engine) decollates its output into a list of dicts."""
    torch.manual_seed(0)
    network = torch.nn.Conv2d(1, 1, 1)
    calls = {"n": 0}

    def loss_function(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = torch.nn.functional.mse_loss(pred, label)
        return loss * float("nan") if calls["n"] == 4 else loss

    data = [{"image": torch.rand(2, 1, 4, 4), "label": torch.rand(2, 1, 4, 4)} for _ in range(2)]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=3, train_data_loader=data, network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1), loss_function=loss_function,
        train_handlers=[NonFiniteLossGuard(network=network, checkpoint_dir=tmp_path)],
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"^non-finite loss \(loss=nan\) at iteration 4 \(epoch 2\)"):
        trainer.run()


def _initialize_with(extra: list[str]) -> list[str]:
    """The bundle's own ``initialize`` list plus ``extra`` (an overlay replaces lists wholesale)."""
    return json.loads((CONFIGS / "train.json").read_text())["initialize"] + extra


@pytest.mark.slow
def test_bundle_run_fails_and_keeps_last_good_checkpoint(demo_manifest: Path, tmp_path: Path) -> None:
    """``python -m monai.bundle run``: weights blown up at iteration 5 (epoch 2 of 3-step epochs)."""
    poison = ("$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_STARTED(once=5), "
              "lambda engine: [p.data.fill_(float('nan')) for p in @student.parameters()])")  # fmt: skip
    overlay = tmp_path / "poison.json"
    overlay.write_text(json.dumps({"initialize": _initialize_with([poison])}))
    settings = {**TINY, "image_size": 32, "num_epochs": 3, "epoch_length": 3}
    argv = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps([str(CONFIGS / "train.json"), str(overlay)]),
            "--meta_file", str(CONFIGS / "metadata.json"), "--bundle_root", str(BUNDLE),
            "--dataset_dir", str(demo_manifest.parent), "--ckpt_dir", str(tmp_path / "models"),
            "--output_dir", str(tmp_path / "eval")]  # fmt: skip
    for key, value in settings.items():
        argv += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode != 0, result.stdout[-2000:]
    models = tmp_path / "models"
    expected = (f"NonFiniteLossError: non-finite loss (loss=nan, sup_loss=nan) at iteration 5 (epoch 2): training stopped "
                f"and no checkpoint was written from this state; last good checkpoint: {models / 'checkpoint_epoch=1.pt'} (epoch 1")  # fmt: skip
    assert expected in result.stderr, result.stderr[-3000:]
    saved = sorted(p.name for p in models.iterdir())
    assert saved == ["checkpoint_epoch=1.pt", "model.pt"]  # nothing from epoch 2, nothing left half-written
    checkpoint = torch.load(models / "checkpoint_epoch=1.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in checkpoint["network"].values() if v.is_floating_point())


@pytest.mark.slow
def test_overflow_on_the_epochs_last_step_writes_no_checkpoint(demo_manifest: Path, tmp_path: Path) -> None:
    """lr = inf: the first loss is finite, the first Adam step makes the weights non-finite (epoch_length 1)."""
    workflow = make_workflow([str(CONFIGS / "train.json")], demo_manifest, tmp_path, image_size=32, epoch_length=1,
                             num_epochs=2, learning_rate="$float('inf')")  # fmt: skip
    workflow.initialize()
    with pytest.raises(RuntimeError) as raised:  # ConfigExpression wraps what the run expression raised
        workflow.run()
    cause = raised.value.__cause__
    assert isinstance(cause, NonFiniteLossError)
    assert re.match(r"non-finite weights in \d+ parameter tensor\(s\) \(model\.0\..* at iteration 1 \(epoch 1\)", str(cause))
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []
