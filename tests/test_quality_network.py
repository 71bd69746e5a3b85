"""QualityPredictor g: shapes, value range, head initialisation, ImageNet adaptation, frozen loading, autocast."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import resnet18

from qgssl_monai.engines.autocast import AutocastInferer, engine_amp_flag
from qgssl_monai.networks.quality import (
    QualityPredictor,
    adapt_input_channels,
    load_quality_predictor,
    load_state_dict_file,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet-b0"])
def test_forward_shape_range_and_score(backbone: str) -> None:
    net = QualityPredictor(in_channels=4, backbone=backbone).eval()
    image, mask = torch.rand(3, 3, 64, 64), (torch.rand(3, 1, 64, 64) > 0.5).float()
    with torch.no_grad():
        out = net(torch.cat([image, mask], dim=1))
        score = net.score(image, mask)
    assert out.shape == (3, 1)
    assert score.shape == (3,)
    assert torch.all((out >= 0) & (out <= 1))
    torch.testing.assert_close(score, out[:, 0])
    with pytest.raises(ValueError, match="expects 4 input channels"):
        net(torch.rand(1, 3, 64, 64))


def test_unknown_backbone_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown quality backbone 'vgg'"):
        QualityPredictor(backbone="vgg")


def test_head_starts_unsaturated_and_learns() -> None:
    """Zero bias + tiny weights: outputs ~0.5 with a gradient near the sigmoid's maximum slope 0.25."""
    net = QualityPredictor(in_channels=4).eval()
    assert float(net.head[1].bias.detach()) == 0.0
    assert float(net.head[1].weight.detach().std()) < 5e-3
    x = torch.rand(8, 4, 64, 64)
    out = net(x)
    assert torch.all((out - 0.5).abs() < 0.05), out
    # d sigmoid / d logit at the start: p (1 - p) ~ 0.25, far from a saturated 0
    slope = out * (1 - out)
    assert torch.all(slope > 0.24)
    out.sum().backward()
    assert net.head[1].weight.grad.abs().sum() > 0
    assert net.encoder.conv1.weight.grad.abs().sum() > 0


def test_adapt_input_channels_rgb_and_grey() -> None:
    weight = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    rgb = adapt_input_channels(weight, image_channels=3)
    assert rgb.shape == (2, 4, 2, 2)
    torch.testing.assert_close(rgb[:, :3], weight)
    torch.testing.assert_close(rgb[:, 3], weight.mean(dim=1))
    grey = adapt_input_channels(weight, image_channels=1)
    assert grey.shape == (2, 2, 2, 2)
    torch.testing.assert_close(grey[:, 0], weight.mean(dim=1))
    torch.testing.assert_close(grey[:, 1], weight.mean(dim=1))
    with pytest.raises(ValueError, match="RGB first-layer kernel"):
        adapt_input_channels(torch.zeros(2, 4, 3, 3), 3)


def test_pretrained_path_adapts_first_conv(tmp_path) -> None:
    # an "ImageNet" ResNet-18 in torchvision layout (3 input channels, 1000 classes), saved as a plain state_dict
    imagenet = resnet18(spatial_dims=2, n_input_channels=3, num_classes=1000, conv1_t_size=7, conv1_t_stride=2, bias_downsample=False)
    source = imagenet.state_dict()
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(source, path)

    net = QualityPredictor(in_channels=4, pretrained_path=path)
    conv = net.encoder.conv1.weight.detach()
    torch.testing.assert_close(conv[:, :3], source["conv1.weight"])
    torch.testing.assert_close(conv[:, 3], source["conv1.weight"].mean(dim=1))
    torch.testing.assert_close(net.encoder.layer4[1].conv2.weight.detach(), source["layer4.1.conv2.weight"])
    torch.testing.assert_close(net.encoder.bn1.running_mean, source["bn1.running_mean"])
    # the 1000-class classifier is not part of g; the regression head keeps its small initialisation
    assert float(net.head[1].weight.detach().std()) < 5e-3

    grey = QualityPredictor(in_channels=2, pretrained_path=path)
    torch.testing.assert_close(grey.encoder.conv1.weight.detach()[:, 0], source["conv1.weight"].mean(dim=1))

    wrong = tmp_path / "unrelated.pth"
    torch.save({"something.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match="no weight in"):
        QualityPredictor(in_channels=4, pretrained_path=wrong)


def test_load_quality_predictor_without_sidecar(tmp_path) -> None:
    trained = QualityPredictor(in_channels=4)
    with torch.no_grad():
        trained.head[1].bias.fill_(1.5)  # distinguishable from a fresh init
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)
    ddp_path = tmp_path / "ddp.pt"
    torch.save({"network": {"module." + k: v for k, v in trained.state_dict().items()}}, ddp_path)

    for checkpoint in (path, ddp_path):
        # a checkpoint without sidecar loads when the caller gives the training settings
        g = load_quality_predictor(checkpoint, "cpu", in_channels=4, backbone="resnet18", image_size=32)
        assert not g.training
        assert all(not p.requires_grad for p in g.parameters())
        x = torch.rand(2, 4, 32, 32, requires_grad=True)
        expected = trained.eval()(x)
        out = g(x)
        torch.testing.assert_close(out, expected)
        # frozen, but gradients still reach the input (QAR back-propagates into the segmenter through g)
        out.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0

    with pytest.raises(ValueError, match="does not fit QualityPredictor"):
        load_quality_predictor(path, in_channels=4, backbone="resnet34", image_size=32)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_state_dict_file(tmp_path / "missing.pt")


def test_autocast_inferer_bf16_on_cpu() -> None:
    net = QualityPredictor(in_channels=4).eval()
    x = torch.rand(2, 4, 64, 64)
    with torch.no_grad():
        full = AutocastInferer("none", "cpu")(x, net)
        half = AutocastInferer("bf16", "cpu")(x, net)
    assert full.dtype == torch.float32 and half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        AutocastInferer("fp16", "cpu")
    with pytest.raises(ValueError, match="amp_dtype must be one of"):
        AutocastInferer("int8", "cpu")
    assert engine_amp_flag("fp16", "cuda:0") is True
    assert engine_amp_flag("bf16", "cuda:0") is False
    assert engine_amp_flag("fp16", "cpu") is False
