"""SemiSupervisedTrainer: step counts, unlabeled cycling, outputs, events, loss composition, autocast, handlers."""

from __future__ import annotations

import pickle

import pytest
import torch
from ignite.engine import Events
from monai.engines import IterationEvents
from ignite.handlers import TerminateOnNan
from monai.handlers import CheckpointSaver, LrScheduleHandler, StatsHandler, from_engine
from monai.networks.nets import UNet
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from qgssl_monai.engines import SemiSupervisedTrainer, ssl_optimizer_parameters
from qgssl_monai.methods import MethodOutput, QualityWeighting, SSLMethod, StepContext, build_method
from qgssl_monai.methods.sup import Supervised
from ssl_test_doubles import TinyQuality


def tiny_unet(channels: int = 3, dims: int = 2) -> nn.Module:
    return UNet(dims, channels, 1, channels=(4, 8), strides=(2,), num_res_units=0)


class DictData(Dataset):
    def __init__(self, n: int, labeled: bool, size: int = 32, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=gen)
        self.labels = (torch.rand(n, 1, size, size, generator=gen) > 0.5).float()
        self.labeled = labeled

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        item = {"image": self.images[i]}
        if self.labeled:
            item["label"] = self.labels[i]
        return item


def make_trainer(
    method: SSLMethod | None = None, n_labeled: int = 4, n_unlabeled: int = 4, **kwargs
) -> SemiSupervisedTrainer:
    torch.manual_seed(0)
    network = tiny_unet()
    method = Supervised() if method is None else method
    optimizer = torch.optim.SGD(ssl_optimizer_parameters(network, method), lr=0.01)
    unlabeled = DataLoader(DictData(n_unlabeled, False, seed=1), batch_size=2) if method.uses_unlabeled else None
    return SemiSupervisedTrainer(
        device="cpu",
        max_epochs=kwargs.pop("max_epochs", 2),
        train_data_loader=DataLoader(DictData(n_labeled, True), batch_size=2),
        network=network,
        optimizer=optimizer,
        unlabeled_data_loader=unlabeled,
        method=method,
        **kwargs,
    )


def count_events(engine: SemiSupervisedTrainer) -> dict:
    counts = {e: 0 for e in ("fwd", "loss", "bwd", "model")}
    for name, event in (
        ("fwd", IterationEvents.FORWARD_COMPLETED),
        ("loss", IterationEvents.LOSS_COMPLETED),
        ("bwd", IterationEvents.BACKWARD_COMPLETED),
        ("model", IterationEvents.MODEL_COMPLETED),
    ):
        engine.add_event_handler(event, lambda _e, n=name: counts.__setitem__(n, counts[n] + 1))
    return counts


def test_sup_runs_epoch_length_steps_and_fires_iteration_events() -> None:
    trainer = make_trainer(epoch_length=5, max_epochs=2)  # labeled loader has only 2 batches
    counts = count_events(trainer)
    steps = []
    original_step = trainer.optimizer.step

    def counting_step(*args, **kwargs):
        steps.append(1)
        return original_step(*args, **kwargs)

    trainer.optimizer.step = counting_step
    trainer.run()
    assert trainer.state.iteration == 10 and trainer.state.epoch == 2
    assert len(steps) == 10
    assert counts == {"fwd": 10, "loss": 10, "bwd": 10, "model": 10}
    assert trainer._unlabeled_iterator is None  # SUP never touches unlabeled data
    out = trainer.state.output[0]
    for key in ("loss", "sup_loss", "unsup_loss", "unsup_weight", "quality_weight_mean"):
        assert isinstance(out[key], float)
    assert out["unsup_loss"] == 0.0 and out["quality_weight_mean"] == 1.0
    assert out["loss"] == pytest.approx(out["sup_loss"])


def test_pl_qw_cycles_short_unlabeled_loader_for_epoch_length_steps() -> None:
    method = build_method("pl-qw", quality_net=TinyQuality())
    trainer = make_trainer(method, n_labeled=4, n_unlabeled=2, epoch_length=3, max_epochs=2, unsup_weight=0.5)
    drawn = []
    original = trainer.next_unlabeled_batch
    trainer.next_unlabeled_batch = lambda: (drawn.append(1), original())[1]
    trainer.run()
    assert trainer.state.iteration == 6
    assert len(drawn) == 6
    assert trainer._unlabeled_pass == 5  # one batch per pass: 6 draws = 6 passes (0..5)
    out = trainer.state.output[0]
    assert out["unsup_weight"] == 0.5 and trainer.state.unsup_weight == 0.5
    assert 0.0 <= out["quality_weight_mean"] <= 1.0
    assert trainer.state.quality_weights.shape == (2,) and not trainer.state.quality_weights.requires_grad


class ConstantUnsup(SSLMethod):
    """Unsupervised loss = sum of the student's output on the unlabeled batch (checks composition)."""

    name = "const"

    def unsupervised_loss(self, ctx: StepContext) -> MethodOutput:
        value = ctx.student_logits_u().mean()
        return MethodOutput(
            unsup_loss=value,
            extra_sup_loss=torch.tensor(0.25),
            quality_weights=torch.tensor([0.2, 0.6]),
            logs={"probe": torch.tensor(3.0)},
        )


def test_total_loss_composition_outputs_and_state_are_grad_free() -> None:
    trainer = make_trainer(ConstantUnsup(), epoch_length=1, max_epochs=1, unsup_weight=2.0, decollate=False)
    trainer.run()
    out = trainer.state.output
    assert out["loss"] == pytest.approx(out["sup_loss"] + 0.25 + 2.0 * out["unsup_loss"], abs=1e-5)
    assert out["extra_sup_loss"] == 0.25 and out["probe"] == 3.0
    assert out["quality_weight_mean"] == pytest.approx(0.4)
    assert not out["pred"].requires_grad
    tensors = [v for v in vars(trainer.state).values() if isinstance(v, torch.Tensor)]
    assert all(not t.requires_grad for t in tensors)
    pickle.dumps({k: v for k, v in out.items()})


class RecordingSampler(DistributedSampler):
    def __init__(self, dataset: Dataset) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)
        super().set_epoch(epoch)


def test_unlabeled_distributed_sampler_gets_pass_index() -> None:
    trainer = make_trainer(build_method("pl-t"), epoch_length=3, max_epochs=1)
    data = DictData(2, False, seed=2)
    sampler = RecordingSampler(data)
    trainer.unlabeled_data_loader = DataLoader(data, batch_size=2, sampler=sampler)
    trainer.run()
    assert sampler.epochs == [0, 1, 2]


def test_resumed_run_continues_unlabeled_pass_index() -> None:
    trainer = make_trainer(build_method("pl-t"), epoch_length=3, max_epochs=2)
    data = DictData(4, False, seed=2)
    sampler = RecordingSampler(data)
    trainer.unlabeled_data_loader = DataLoader(data, batch_size=2, sampler=sampler)  # 2 batches per pass
    trainer.state.iteration, trainer.state.epoch = 3, 1  # as restored by CheckpointLoader after epoch 1
    trainer.run()
    assert trainer.state.iteration == 6
    assert sampler.epochs == [1, 2]  # 3 draws done before: pass 1 continues, then pass 2


def test_bf16_autocast_runs_on_cpu_and_fp16_needs_cuda() -> None:
    trainer = make_trainer(build_method("mt"), epoch_length=2, max_epochs=1, autocast_dtype="bf16")
    before = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.run()
    out = trainer.state.output[0]
    assert torch.isfinite(torch.tensor(out["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))
    with pytest.raises(ValueError, match="CUDA"):
        make_trainer(autocast_dtype="fp16")
    with pytest.raises(ValueError, match="amp_dtype must be one of"):
        make_trainer(autocast_dtype="int8")
    assert make_trainer(autocast_dtype="none").autocast_dtype is None


def test_stock_handlers_and_checkpoint_of_method(tmp_path) -> None:
    method = build_method("cps")
    handlers = [
        StatsHandler(name="ssl_test", output_transform=from_engine(["loss"], first=True), tag_name="train_loss"),
    ]
    trainer = make_trainer(method, epoch_length=2, max_epochs=1, train_handlers=handlers)
    nan_guard = TerminateOnNan(output_transform=from_engine(["loss"], first=True))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, nan_guard)
    scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=1, gamma=0.5)
    LrScheduleHandler(scheduler, print_lr=False).attach(trainer)
    CheckpointSaver(str(tmp_path), {"network": trainer.network, "method": method}, save_final=True,
                    final_filename="final.pt").attach(trainer)
    trainer.run()
    saved = torch.load(tmp_path / "final.pt", weights_only=True)
    assert any(k.startswith("peer.") for k in saved["method"])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.005)  # LrScheduleHandler stepped once
    assert not trainer.should_terminate
    assert torch.equal(saved["method"]["peer." + next(iter(method.peer.state_dict()))],
                       next(iter(method.peer.state_dict().values())))


def test_missing_method_parameters_are_added_to_optimizer_and_errors_are_clear() -> None:
    torch.manual_seed(0)
    network = tiny_unet()
    method = build_method("cps")
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01)
    loader = DataLoader(DictData(2, True), batch_size=2)
    with pytest.warns(UserWarning, match="not in the optimizer"):
        SemiSupervisedTrainer("cpu", 1, loader, network, optimizer, unlabeled_data_loader=loader, method=method)
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == {id(p) for p in method.peer.parameters()}
    with pytest.raises(ValueError, match="unlabeled_data_loader"):
        SemiSupervisedTrainer("cpu", 1, loader, network, optimizer, method=build_method("pl-t"))


def test_engine_warns_when_teacher_has_no_ema_handler() -> None:
    trainer = make_trainer(build_method("mt"), epoch_length=1, max_epochs=1)
    with pytest.warns(UserWarning, match="EMATeacherHandler"):
        trainer.run()


def test_engine_trains_3d_inputs() -> None:
    torch.manual_seed(0)
    network = UNet(3, 1, 1, channels=(2, 4), strides=(2,), num_res_units=0)
    images = torch.rand(2, 1, 8, 8, 8)
    labeled = [{"image": images, "label": (images > 0.5).float()}]
    unlabeled = [{"image": torch.rand(2, 1, 8, 8, 8)}]
    method = build_method("pl-t")
    trainer = SemiSupervisedTrainer("cpu", 1, labeled, network, torch.optim.SGD(network.parameters(), 0.1),
                                    unlabeled_data_loader=unlabeled, method=method, epoch_length=2)
    trainer.run()
    assert trainer.state.iteration == 2 and trainer.state.output[0]["unsup_loss"] >= 0
