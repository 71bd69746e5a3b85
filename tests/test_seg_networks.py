"""Segmentation network factory: shapes, documented sizes, wrappers and clear errors."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import AttentionUnet, BasicUNetPlusPlus, SwinUNETR, UNet

from qgssl_monai.networks.segmentation import (
    SEGMENTATION_NETWORKS,
    SEGMENTATION_PARAM_COUNTS,
    FinalOutput,
    build_segmentation_network,
    count_parameters,
    penultimate_feature_layer,
    required_divisor,
)


@pytest.mark.parametrize("name", SEGMENTATION_NETWORKS)
def test_small_network_maps_image_to_one_logit_map(name: str) -> None:
    torch.manual_seed(0)
    net = build_segmentation_network(name, size="small").eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 1, 64, 64)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("key", sorted(SEGMENTATION_PARAM_COUNTS))
def test_documented_parameter_counts(key: tuple[str, str]) -> None:
    name, size = key
    assert count_parameters(build_segmentation_network(name, size=size)) == SEGMENTATION_PARAM_COUNTS[key]


def test_factory_returns_expected_monai_classes_and_aliases() -> None:
    assert isinstance(build_segmentation_network("unet"), UNet)
    assert isinstance(build_segmentation_network("attention_unet"), AttentionUnet)
    assert isinstance(build_segmentation_network("swinunetr2d"), SwinUNETR)
    wrapped = build_segmentation_network("unet++")
    assert isinstance(wrapped, FinalOutput) and isinstance(wrapped.network, BasicUNetPlusPlus)


def test_overrides_replace_preset_arguments() -> None:
    net = build_segmentation_network("unet", channels=(4, 8), strides=(2,), num_res_units=0)
    # two conv blocks 3->4->... exact count of a UNet with channels (4, 8) and no residual units
    assert count_parameters(net) == count_parameters(
        UNet(2, 3, 1, channels=(4, 8), strides=(2,), num_res_units=0)
    )
    grey = build_segmentation_network("unet", in_channels=1, out_channels=2)
    assert grey(torch.rand(1, 1, 32, 32)).shape == (1, 2, 32, 32)


def test_final_output_returns_final_map_of_list_outputs() -> None:
    class TwoHeads(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [x * 2.0, x * 3.0]

    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    assert torch.equal(FinalOutput(TwoHeads())(x), x * 3.0)
    assert torch.equal(FinalOutput(torch.nn.Identity())(x), x)
    # gradients flow through the wrapper into the wrapped UNet++
    net = build_segmentation_network("unetpp")
    net(torch.rand(1, 3, 32, 32)).sum().backward()
    assert net.network.final_conv_0_4.weight.grad is not None
    deep = FinalOutput(BasicUNetPlusPlus(2, 3, 1, features=(4, 4, 4, 4, 4, 4), deep_supervision=True)).eval()
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(deep(x), deep.network(x)[3])
    assert net.network.conv_0_0.conv_0.conv.weight.grad.abs().sum() > 0


def test_required_divisor() -> None:
    assert required_divisor("swinunetr") == 32
    assert required_divisor("unetpp") == 16
    assert required_divisor("unet", "small") == 4
    assert required_divisor("unet", "paper") == 16
    assert required_divisor("attention_unet", "small") == 8


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown segmentation network 'vnet'"):
        build_segmentation_network("vnet")
    with pytest.raises(ValueError, match="'small' or 'paper'"):
        build_segmentation_network("unet", size="huge")
    with pytest.raises(ValueError, match="multiple of 12"):
        build_segmentation_network("swinunetr", feature_size=16)
    with pytest.raises(ValueError, match="img_size"):
        build_segmentation_network("swinunetr", img_size=(64, 64))


@pytest.mark.parametrize("name", SEGMENTATION_NETWORKS)
def test_penultimate_feature_layer_captures_last_decoder_features(name: str) -> None:
    net = build_segmentation_network(name, size="small").eval()
    layer, channels = penultimate_feature_layer(net)
    captured: list[torch.Tensor] = []
    handle = dict(net.named_modules())[layer].register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    with torch.no_grad():
        net(torch.rand(2, 3, 64, 64))
    handle.remove()
    side = 32 if name == "unet" else 64  # MONAI's UNet downsamples in its first block
    assert len(captured) == 1 and captured[0].shape == (2, channels, side, side)
    assert penultimate_feature_layer(torch.nn.Conv2d(3, 1, 1)) is None
