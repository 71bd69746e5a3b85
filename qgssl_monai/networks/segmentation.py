"""Segmentation networks f for the SSL experiments, built from MONAI's network zoo.

All networks map an image ``(B, C, H, W)`` (or ``(B, C, D, H, W)`` for ``spatial_dims=3``) in ``[0, 1]``
to ``out_channels`` logit maps of the same spatial size. Binary segmentation uses one logit channel
(probability ``sigmoid(logits)``, hard mask ``probability > 0.5``), see ``docs/ARCHITECTURE.md``.

``build_segmentation_network(name, size=...)`` is the one factory used by the bundle configs:

============== =================================================== ============ ============
name           MONAI class                                         ``"paper"``  ``"small"``
============== =================================================== ============ ============
unet           ``UNet`` (residual units)                           see below    see below
swinunetr      ``SwinUNETR`` (``spatial_dims=2``, no ``img_size``) feature 48   feature 12
unetpp         ``BasicUNetPlusPlus`` wrapped by ``FinalOutput``    (32..256)    (8..64)
attention_unet ``AttentionUnet``                                   (64..1024)   (8..64)
============== =================================================== ============ ============

Parameter counts (2D, ``in_channels=3``, ``out_channels=1``; recomputed by
``tests/test_seg_networks.py::test_documented_parameter_counts``) are listed in
``SEGMENTATION_PARAM_COUNTS``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.networks.nets import AttentionUnet, BasicUNetPlusPlus, SwinUNETR, UNet
from torch import nn

__all__ = [
    "FinalOutput",
    "SEGMENTATION_NETWORKS",
    "SEGMENTATION_PARAM_COUNTS",
    "NETWORK_SIZES",
    "build_segmentation_network",
    "count_parameters",
    "penultimate_feature_layer",
    "required_divisor",
]

SEGMENTATION_NETWORKS: tuple[str, ...] = ("unet", "swinunetr", "unetpp", "attention_unet")

# Constructor arguments per network and size. "paper" follows the published configurations
# (MONAI defaults for SwinUNETR/UNet++ with SwinUNETR at feature_size 48); "small" keeps the
# U-Nets under 0.2 M parameters (SwinUNETR 1.4 M) so CPU tests and smoke runs take seconds.
NETWORK_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "unet": {
        "paper": {"channels": (32, 64, 128, 256, 512), "strides": (2, 2, 2, 2), "num_res_units": 2},
        "small": {"channels": (8, 16, 32), "strides": (2, 2), "num_res_units": 1},
    },
    "swinunetr": {
        "paper": {"feature_size": 48, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24), "use_v2": False},
        "small": {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (3, 3, 3, 3), "use_v2": False},
    },
    "unetpp": {
        "paper": {"features": (32, 32, 64, 128, 256, 32)},
        "small": {"features": (8, 8, 16, 32, 64, 8)},
    },
    "attention_unet": {
        "paper": {"channels": (64, 128, 256, 512, 1024), "strides": (2, 2, 2, 2)},
        "small": {"channels": (8, 16, 32, 64), "strides": (2, 2, 2)},
    },
}

# Trainable parameter counts for spatial_dims=2, in_channels=3, out_channels=1 (default overrides).
SEGMENTATION_PARAM_COUNTS: dict[tuple[str, str], int] = {
    ("unet", "paper"): 6_495_868,
    ("unet", "small"): 12_177,
    ("swinunetr", "paper"): 25_139_275,
    ("swinunetr", "small"): 1_428_049,
    ("unetpp", "paper"): 2_410_756,
    ("unetpp", "small"): 152_068,
    ("attention_unet", "paper"): 31_740_337,
    ("attention_unet", "small"): 124_257,
}


class FinalOutput(nn.Module):
    """Return only the final (deepest-decoder) output of a network whose ``forward`` returns a list.

    ``BasicUNetPlusPlus.forward`` returns ``[output_0_4]``, or ``[output_0_1, ..., output_0_4]`` with deep
    supervision; engines, inferers and losses expect one tensor, so this wrapper returns the last element.

    Args:
        network: the wrapped module; its output must be a tensor or a non-empty list/tuple of tensors.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, C, *spatial)`` -> logits ``(B, out_channels, *spatial)``."""
        out = self.network(x)
        if isinstance(out, (list, tuple)):
            return out[-1]
        return out


def required_divisor(name: str, size: str = "small") -> int:
    """Smallest integer that every spatial size must be divisible by for network ``name``.

    SwinUNETR downsamples by 2 five times (patch embedding + 4 merges): 32. The U-Nets need
    ``prod(strides)``; UNet++ always has 4 poolings: 16.
    """
    name = _canonical_name(name)
    if name == "swinunetr":
        return 32
    if name == "unetpp":
        return 16
    strides = NETWORK_SIZES[name][_check_size(size)]["strides"]
    divisor = 1
    for s in strides:
        divisor *= int(s)
    return divisor


def count_parameters(network: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``network``."""
    return sum(p.numel() for p in network.parameters() if p.requires_grad or not trainable_only)


_ALIASES: Mapping[str, str] = {
    "swinunetr2d": "swinunetr",
    "swin_unetr": "swinunetr",
    "unet++": "unetpp",
    "unet_plus_plus": "unetpp",
    "basicunetplusplus": "unetpp",
    "attentionunet": "attention_unet",
    "attention-unet": "attention_unet",
}


def _canonical_name(name: str) -> str:
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in SEGMENTATION_NETWORKS:
        raise ValueError(f"unknown segmentation network {name!r}; choose one of {SEGMENTATION_NETWORKS}")
    return key


def _check_size(size: str) -> str:
    if size not in ("small", "paper"):
        raise ValueError(f"network size must be 'small' or 'paper', got {size!r}")
    return size


def build_segmentation_network(
    name: str,
    *,
    in_channels: int = 3,
    out_channels: int = 1,
    spatial_dims: int = 2,
    size: str = "small",
    init_seed: int | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build segmentation network ``name`` at ``size`` (``"small"`` for CPU runs, ``"paper"``).

    Args:
        name: ``"unet"``, ``"swinunetr"`` (alias ``"swinunetr2d"``), ``"unetpp"`` or ``"attention_unet"``.
        in_channels: image channels (3 for RGB endoscopy/dermoscopy).
        out_channels: logit channels (1 for binary segmentation).
        spatial_dims: 2 or 3.
        size: preset of constructor arguments from ``NETWORK_SIZES``.
        init_seed: when given, the weights are initialised from this seed on a forked RNG, so the
            initialisation is the same whatever else was built before (every method of a seed starts from
            the same student) and the global RNG is left untouched.
        overrides: constructor arguments replacing the preset's (e.g. ``feature_size=24``).

    Returns:
        a module mapping ``(B, in_channels, *S)`` to logits ``(B, out_channels, *S)``; every spatial
        size must be divisible by ``required_divisor(name, size)``.

    Raises:
        ValueError: unknown name/size, or SwinUNETR ``feature_size`` not a multiple of 12.
    """
    if init_seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(init_seed))
            return build_segmentation_network(
                name, in_channels=in_channels, out_channels=out_channels, spatial_dims=spatial_dims, size=size, **overrides
            )
    key = _canonical_name(name)
    kwargs: dict[str, Any] = {**NETWORK_SIZES[key][_check_size(size)], **overrides}
    common = {"spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels}
    if key == "unet":
        return UNet(**common, **kwargs)
    if key == "attention_unet":
        return AttentionUnet(**common, **kwargs)
    if key == "unetpp":
        return FinalOutput(BasicUNetPlusPlus(**common, **kwargs))
    if "img_size" in kwargs:
        raise ValueError("SwinUNETR in MONAI 1.6 takes no 'img_size'; remove it (inputs only need H, W % 32 == 0)")
    if int(kwargs["feature_size"]) % 12 != 0:
        raise ValueError(f"SwinUNETR feature_size must be a multiple of 12, got {kwargs['feature_size']}")
    return SwinUNETR(**common, **kwargs)


def penultimate_feature_layer(network: nn.Module) -> tuple[str, int] | None:
    """Where the decoder's last feature map of a factory-built 2D/3D network can be captured.

    Returns ``(dotted submodule name, channels)``: the *input* of that submodule is the last decoder
    feature map ``(B, channels, *S')`` before the logit projection (``S' = S``, or ``S / 2`` for UNet) (what
    :class:`qgssl_monai.methods.ContrastivePseudoLabel` takes as ``feature_layer``/``feature_channels``);
    ``None`` for networks this function does not know.

    * UNet: input of the top-level up block ``model.2`` = skip + upsampled features (``2 * channels[0]``, half
      resolution: MONAI's UNet downsamples in its first block);
    * AttentionUnet: input of the final 1x1 convolution ``model.2`` (``channels[0]``);
    * UNet++ (``FinalOutput``): input of ``network.final_conv_0_4`` (``features[5]``);
    * SwinUNETR: input of the output block ``out`` (``feature_size``).
    """
    if isinstance(network, FinalOutput) and isinstance(network.network, BasicUNetPlusPlus):
        return "network.final_conv_0_4", int(network.network.final_conv_0_4.in_channels)
    if isinstance(network, SwinUNETR):
        return "out", int(network.out.conv.conv.in_channels)
    if isinstance(network, AttentionUnet):
        return "model.2", int(network.model[2].conv.in_channels)
    if isinstance(network, UNet):
        return "model.2", 2 * int(network.channels[0])
    return None
