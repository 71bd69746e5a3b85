"""RampUpHandler, EMATeacherHandler and QualityWeightStatsHandler: exact values at given steps/epochs."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn

from qgssl_monai.engines import SemiSupervisedTrainer
from qgssl_monai.handlers.ema import EMATeacherHandler, ema_update
from qgssl_monai.handlers.quality_stats import QualityWeightStatsHandler
from qgssl_monai.handlers.ramp import RampUpHandler, ramp_factor
from qgssl_monai.methods import MeanTeacher, MethodOutput, SSLMethod, StepContext


def fake_engine(epoch: int = 1, iteration: int = 1, max_epochs: int = 10, epoch_length: int = 4, lam: float = 2.0):
    state = SimpleNamespace(epoch=epoch, iteration=iteration, max_epochs=max_epochs, epoch_length=epoch_length)
    return SimpleNamespace(state=state, unsup_weight_max=lam)


def test_linear_ramp_constant_then_linear_per_epoch() -> None:
    handler = RampUpHandler("linear", warmup_epochs=2, rampup_epochs=4)
    values = [handler.value(fake_engine(epoch=e)) for e in range(1, 10)]  # t = epoch - 1 = 0..8
    assert values == pytest.approx([0.0, 0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    with_start = RampUpHandler("linear", warmup_epochs=1, rampup_epochs=2, start_factor=0.5, max_value=1.0)
    assert [with_start.value(fake_engine(epoch=e)) for e in (1, 2, 3, 4)] == pytest.approx([0.5, 0.5, 0.75, 1.0])
    no_ramp = RampUpHandler("linear", warmup_epochs=3)
    assert [no_ramp.value(fake_engine(epoch=e)) for e in (3, 4)] == [0.0, 2.0]


def test_sigmoid_ramp_values_fractions_and_per_iteration() -> None:
    handler = RampUpHandler("sigmoid", rampup_epochs=0.5, as_fraction=True, max_value=1.0)  # R = 5 of 10 epochs
    assert handler.value(fake_engine(epoch=1)) == pytest.approx(math.exp(-5))
    assert handler.value(fake_engine(epoch=3)) == pytest.approx(math.exp(-5 * (1 - 2 / 5) ** 2))
    assert handler.value(fake_engine(epoch=6)) == pytest.approx(1.0)
    per_iter = RampUpHandler("sigmoid", rampup_epochs=2, per_iteration=True, max_value=1.0)
    # iteration 7 with 4 iterations/epoch: t = 6/4 = 1.5 epochs
    assert per_iter.value(fake_engine(iteration=7)) == pytest.approx(math.exp(-5 * 0.25**2))
    assert ramp_factor("sigmoid", 1.0, 2.0, 3.0, 0.1) == 0.1
    with pytest.raises(ValueError, match="schedule"):
        RampUpHandler("cosine")


class Recorder(SSLMethod):
    name = "recorder"
    uses_unlabeled = False

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[float] = []

    def unsupervised_loss(self, ctx: StepContext) -> MethodOutput:
        self.seen.append(ctx.engine.state.unsup_weight)
        return MethodOutput(unsup_loss=ctx.logits_l.new_zeros(()), quality_weights=torch.tensor([0.0, 0.5, 1.0]))


def test_ramp_handler_drives_engine_unsup_weight() -> None:
    network = nn.Conv2d(1, 1, 1)
    data = [{"image": torch.rand(1, 1, 4, 4), "label": torch.ones(1, 1, 4, 4)}]
    method = Recorder()
    trainer = SemiSupervisedTrainer(
        "cpu", 4, data, network, torch.optim.SGD(network.parameters(), 0.1), method=method, unsup_weight=0.8,
        epoch_length=2, train_handlers=[RampUpHandler("linear", warmup_epochs=1, rampup_epochs=2)],
    )
    trainer.run()
    assert method.seen == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.4, 0.4, 0.8, 0.8])
    assert trainer.state.output[0]["unsup_weight"] == pytest.approx(0.8)


def test_ema_decay_schedule_exact_and_fixed() -> None:
    handler = EMATeacherHandler()
    assert handler.decay_at(0) == 0.5
    assert handler.decay_at(500) == pytest.approx(0.7495)
    assert handler.decay_at(1000) == pytest.approx(0.999)
    assert handler.decay_at(5000) == pytest.approx(0.999)
    assert EMATeacherHandler(decay=0.99).decay_at(0) == 0.99
    assert EMATeacherHandler(ramp_steps=0).decay_at(0) == 0.999
    with pytest.raises(ValueError, match="decay_end"):
        EMATeacherHandler(decay_end=1.5)


def test_ema_teacher_update_exact_with_buffers_copied() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    method = MeanTeacher()
    method.setup(student)
    with torch.no_grad():
        for p in method.teacher.parameters():
            p.add_(1.0)
    student.train()
    student(torch.rand(4, 1, 3, 3))  # changes the student's BN running stats
    teacher_before = [p.clone() for p in method.teacher.parameters()]
    engine = SimpleNamespace(state=SimpleNamespace(iteration=251), network=student, method=method)
    handler = EMATeacherHandler()
    handler(engine)
    decay = 0.5 + 0.499 * 250 / 1000
    assert engine.state.ema_decay == pytest.approx(decay)
    for before, s, t in zip(teacher_before, student.parameters(), method.teacher.parameters()):
        assert torch.allclose(t, decay * before + (1 - decay) * s, atol=1e-7)
    bn_t, bn_s = method.teacher[1], student[1]
    assert torch.equal(bn_t.running_mean, bn_s.running_mean) and int(bn_t.num_batches_tracked) == 1
    with pytest.raises(ValueError, match="differ in architecture"):
        ema_update(nn.Linear(2, 2), nn.Conv2d(1, 1, 1), 0.5)


def test_ema_handler_updates_teacher_during_training() -> None:
    torch.manual_seed(0)
    network = nn.Conv2d(1, 1, 1)
    method = MeanTeacher()
    data = [{"image": torch.rand(2, 1, 4, 4), "label": torch.ones(2, 1, 4, 4)}]
    trainer = SemiSupervisedTrainer("cpu", 1, data, network, torch.optim.SGD(network.parameters(), 0.5),
                                    unlabeled_data_loader=data, method=method, epoch_length=1,
                                    train_handlers=[EMATeacherHandler(decay=0.25)])
    start = copy.deepcopy(network)
    trainer.run()
    assert torch.allclose(method.teacher.weight, 0.25 * start.weight + 0.75 * network.weight, atol=1e-7)


def test_quality_weight_stats_per_epoch() -> None:
    network = nn.Conv2d(1, 1, 1)
    data = [{"image": torch.rand(1, 1, 4, 4), "label": torch.ones(1, 1, 4, 4)}]
    handler = QualityWeightStatsHandler(bins=4)
    trainer = SemiSupervisedTrainer("cpu", 2, data, network, torch.optim.SGD(network.parameters(), 0.1),
                                    method=Recorder(), epoch_length=2, train_handlers=[handler])
    epochs = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: epochs.append(dict(e.state.metrics)))
    trainer.run()
    weights = torch.tensor([0.0, 0.5, 1.0, 0.0, 0.5, 1.0])  # two iterations per epoch
    assert len(epochs) == 2
    assert epochs[1]["quality_weight_mean"] == pytest.approx(0.5)
    assert epochs[1]["quality_weight_std"] == pytest.approx(weights.std(unbiased=False).item())
    assert epochs[1]["quality_weight_zero_fraction"] == pytest.approx(1 / 3)
    assert epochs[1]["quality_weight_count"] == 6.0  # reset each epoch
    assert trainer.state.quality_weight_histogram == {
        "epoch": 2, "counts": [2.0, 0.0, 2.0, 2.0], "edges": [0.0, 0.25, 0.5, 0.75, 1.0]
    }
    plain = Engine(lambda e, b: None)
    QualityWeightStatsHandler().attach(plain)
    plain.run([0], max_epochs=1)
    assert "quality_weight_mean" not in plain.state.metrics  # nothing recorded without quality weights
