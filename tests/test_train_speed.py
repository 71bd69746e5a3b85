"""The training speed path: forwarded trainer options, AMX detection, batched forward, channels_last, speed overlay."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from monai.networks.nets import AttentionUnet, UNet
from torch import nn
from torch.utils.data import DataLoader

from qgssl_monai.engines import SemiSupervisedTrainer, speed, ssl_optimizer_parameters
from qgssl_monai.methods import build_method
from qgssl_monai.methods.base import unwrap_parallel
from ssl_bundle_utils import config_files, make_workflow, write_quality_checkpoint
from ssl_test_doubles import TinyQuality
from test_ssl_engine import DictData, tiny_unet

#: tolerance of the speed path against the eager float32 path on the mean training loss of a short run
#: (bf16 autocast where the CPU has AMX; fp32 elsewhere, where only summation order differs)
SPEED_RTOL = 0.05


class Recorder(nn.Module):
    """Wraps a network and records, per forward, the autocast state and the input's memory layout."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.calls: list[dict] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append({
            "batch": x.shape[0],
            "autocast": torch.is_autocast_enabled("cpu"),
            "dtype": torch.get_autocast_dtype("cpu"),
            "cache": torch.is_autocast_cache_enabled(),
            "channels_last": x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
        })  # fmt: skip
        return self.network(x)


def trainer_for(network: nn.Module, method_name: str = "qar", steps: int = 2, **kwargs) -> SemiSupervisedTrainer:
    method = build_method(method_name, quality_net=TinyQuality()) if method_name != "sup" else build_method("sup")
    optimizer = torch.optim.SGD(ssl_optimizer_parameters(network, method), lr=0.01)
    return SemiSupervisedTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=steps,
        train_data_loader=DataLoader(DictData(4, True), batch_size=2),
        unlabeled_data_loader=DataLoader(DictData(4, False, seed=1), batch_size=2) if method.uses_unlabeled else None,
        network=network,
        optimizer=optimizer,
        method=method,
        **kwargs,
    )


# ---------------------------------------------------------------- forwarded SupervisedTrainer options
def test_amp_kwargs_and_to_kwargs_reach_the_forward() -> None:
    torch.manual_seed(0)
    network = Recorder(tiny_unet())
    trainer = trainer_for(
        network, "sup", autocast_dtype="bf16", amp_kwargs={"cache_enabled": False},
        to_kwargs={"memory_format": torch.channels_last},
    )  # fmt: skip
    trainer.run()
    assert len(network.calls) == 2
    for call in network.calls:
        assert call["autocast"] and call["dtype"] is torch.bfloat16
        assert call["cache"] is False  # the default is True: amp_kwargs reached torch.autocast
        assert call["channels_last"]  # to_kwargs reached prepare_batch


def test_compile_option_wraps_the_network_and_the_peers_stay_unwrapped() -> None:
    torch.manual_seed(0)
    student = tiny_unet()
    trainer = trainer_for(student, "sup", compile=True, compile_kwargs={"backend": "eager"}, optim_set_to_none=True)
    assert isinstance(trainer.network, torch._dynamo.eval_frame.OptimizedModule)
    assert unwrap_parallel(trainer.network) is student
    assert trainer.compile is True and trainer.optim_set_to_none is True
    trainer.run()  # MetaTensor-free inputs through the compiled student
    assert math.isfinite(trainer.state.output[0]["loss"])


def test_unsupported_options_are_refused() -> None:
    with pytest.raises(ValueError, match="accumulation"):
        trainer_for(tiny_unet(), "sup", accumulation_steps=2)
    with pytest.raises(ValueError, match="CUDA"):
        trainer_for(tiny_unet(), "sup", amp=True)
    with pytest.raises(TypeError):
        trainer_for(tiny_unet(), "sup", not_an_option=1)


# ---------------------------------------------------------------- AMX detection
def test_no_amx_falls_back_to_fp32_with_a_logged_reason(monkeypatch, caplog) -> None:
    monkeypatch.setattr(speed, "_cpu_flags", lambda: {"avx512_bf16": True, "avx512_f": True})
    with caplog.at_level(logging.INFO, logger="qgssl_monai.engines.speed"):
        assert speed.select_amp_dtype("auto", "cpu") == "none"
    assert "lacks amx_tile and amx_bf16" in caplog.text and "float32" in caplog.text
    assert speed.select_amp_dtype("bf16", "cpu") == "bf16"  # an explicit choice is kept


def test_amx_selects_bf16(monkeypatch, caplog) -> None:
    monkeypatch.setattr(speed, "amx_bf16_support", lambda: (True, "fake AMX"))
    with caplog.at_level(logging.INFO, logger="qgssl_monai.engines.speed"):
        assert speed.select_amp_dtype("auto", "cpu") == "bf16"
    assert "fake AMX" in caplog.text


def test_amx_detection_agrees_with_cpuinfo() -> None:
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    if not flags:
        pytest.skip("no /proc/cpuinfo")
    supported, reason = speed.amx_bf16_support()
    if not {"amx_tile", "amx_bf16"} <= set(flags):
        assert not supported and "lacks" in reason
    else:
        assert supported or "operating system" in reason or "failed" in reason


def test_compile_needs_a_compiler(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(speed.shutil, "which", lambda name: None)
    assert speed.select_compile("auto", "cpu") is False
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert speed.select_compile(True, "cpu", tmp_path / "kernels") is True
    assert Path(speed.os.environ["TORCHINDUCTOR_CACHE_DIR"]) == (tmp_path / "kernels").resolve()


# ---------------------------------------------------------------- batched forward and channels_last
def test_batched_forward_gives_the_two_forward_numbers_without_batchnorm() -> None:
    losses = {}
    for batched in (False, True):
        torch.manual_seed(0)
        network = Recorder(tiny_unet())  # instance norm: per-sample statistics
        trainer = trainer_for(network, "qar", steps=3, batched_forward=batched)
        trainer.run()
        losses[batched] = [p.detach().clone() for p in network.parameters()]
        assert [c["batch"] for c in network.calls] == ([4] * 3 if batched else [2, 2] * 3)
    for before, after in zip(losses[False], losses[True]):
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-6)


def test_batched_forward_auto_skips_batchnorm_and_methods_without_a_shared_forward(caplog) -> None:
    bn_net = AttentionUnet(2, 3, 1, channels=(4, 8), strides=(2,))
    with caplog.at_level(logging.INFO, logger="qgssl_monai.engines.ssl_trainer"):
        assert trainer_for(bn_net, "qar", batched_forward="auto").batched_forward is False
    assert "BatchNorm" in caplog.text
    assert trainer_for(tiny_unet(), "qar", batched_forward="auto").batched_forward is True
    assert trainer_for(tiny_unet(), "sup", batched_forward="auto").batched_forward is False
    with pytest.raises(ValueError, match="does not use"):
        trainer_for(tiny_unet(), "sup", batched_forward=True)


def test_select_channels_last_measures_a_copy(caplog) -> None:
    torch.manual_seed(0)
    network = UNet(2, 3, 1, channels=(4, 8), strides=(2,))
    before = {k: v.clone() for k, v in network.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="qgssl_monai.engines.speed"):
        choice = speed.select_channels_last(network, (2, 3, 32, 32), "cpu", None, "auto", steps=1)
    assert isinstance(choice, bool) and "measured" in caplog.text
    for key, value in network.state_dict().items():  # the probe trained a copy
        assert torch.equal(value, before[key]) and value.is_contiguous()
    assert speed.select_channels_last(network, (2, 3, 32, 32), requested=False) is False
    speed.to_channels_last(network)
    assert network.model[0].conv.weight.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- the speed overlay
@pytest.mark.slow
def test_speed_overlay_keeps_the_loss_within_tolerance(demo_manifest: Path, tmp_path: Path) -> None:
    """QAR + UNet, 1 epoch of 3 steps: the overlay (compile off to keep the test short) against the plain bundle."""
    quality_ckpt = write_quality_checkpoint(tmp_path / "g.pt")
    results = {}
    for name, overlays, extra in (
        ("plain", ("method/qar", "net/unet"), {}),
        ("speed", ("method/qar", "net/unet", "speed"), {"speed_compile": False}),
    ):
        workflow = make_workflow(config_files(*overlays), demo_manifest, tmp_path / name,
                                 quality_ckpt=str(quality_ckpt), epoch_length=3, augment=False, **extra)
        workflow.initialize()
        workflow.run()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        results[name] = (trainer.state.metrics["train_loss"], trainer)
        workflow.finalize()
    plain_loss, plain = results["plain"]
    speed_loss, fast = results["speed"]
    assert plain.batched_forward is False and fast.batched_forward is True  # UNet: instance norm
    expected_amp = torch.bfloat16 if speed.amx_bf16_support()[0] else None
    assert fast.autocast_dtype is expected_amp and plain.autocast_dtype is None
    assert speed_loss == pytest.approx(plain_loss, rel=SPEED_RTOL)


def test_unetpp_is_not_compiled_and_small_gains_do_not_flip_channels_last(monkeypatch) -> None:
    from qgssl_monai.networks.segmentation import build_segmentation_network

    unetpp = build_segmentation_network("unetpp", size="small")
    assert "replicate" in speed.compile_blocker(unetpp)
    assert speed.select_compile("auto", "cpu", network=unetpp) is False
    assert speed.select_compile(True, "cpu", network=unetpp) is True  # an explicit request is obeyed
    assert speed.compile_blocker(tiny_unet()) is None
    # 3 % faster in channels_last is inside the 5 % noise margin: stay contiguous; 10 % faster: switch
    for channels_last_time, expected in ((0.97, False), (0.90, True)):
        times = iter([1.0, channels_last_time])
        monkeypatch.setattr(speed, "_train_step_seconds", lambda *args: next(times))
        assert speed.select_channels_last(tiny_unet(), (2, 3, 32, 32)) is expected
