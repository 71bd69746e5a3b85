"""Score image-mask pairs with a trained quality predictor g (what ``qgssl quality-check`` runs, see
:mod:`qgssl_monai.serving.cli`, and what the MONAI Label app uses).

Images and masks of any size are resized to the size g was trained at (read from the sidecar
``models/model.meta.json`` written by the bundle's training, overridable). :class:`QualityChecker` loads g once
(:func:`~qgssl_monai.networks.quality.load_quality_predictor`, calibration included) and scores many pairs;
the MONAI Label app reuses it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Resize

from qgssl_monai.errors import CheckpointNotFoundError, train_g_commands
from qgssl_monai.networks.quality import QualityPredictor, load_quality_predictor
from qgssl_monai.transforms.io import get_seg_transforms

__all__ = ["DEFAULT_BUNDLE", "QualityChecker"]

logger = logging.getLogger(__name__)

# the bundle shipped with the repository (used when --bundle is not given)
DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "quality_predictor"


class QualityChecker:
    """Load g once, score many image-mask pairs.

    Args:
        checkpoint: g's weights (bundle ``models/model.pt``); its sidecar ``model.meta.json`` gives the size g was
            trained at (inputs of any size are resized to it), its channels, backbone and calibration.
        image_size, image_channels, backbone, dropout: ``None`` (default) = the sidecar's values; given, they
            override it (required for a checkpoint without sidecar).
        device: where g runs.
        batch_size: pairs per forward pass in :meth:`score_files`.

    Raises:
        CheckpointNotFoundError: the checkpoint is missing (the message gives the bundle commands that train g).
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        *,
        image_size: int | None = None,
        image_channels: int | None = None,
        backbone: str | None = None,
        dropout: float | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
    ) -> None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise CheckpointNotFoundError(
                f"quality predictor checkpoint not found: {checkpoint}; train g with: "
                + " && ".join(train_g_commands(checkpoint))
            )
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.network: QualityPredictor = load_quality_predictor(
            checkpoint, self.device, image_size=image_size, image_channels=image_channels, backbone=backbone, dropout=dropout
        )
        trained_size = self.network.image_size
        if self.network.spatial_dims != 2 or trained_size is None:
            raise ValueError(f"{checkpoint}: the quality check scores 2D images at g's training size; this g is "
                             f"{self.network.spatial_dims}D with image_size {trained_size}")
        self.image_size = int(trained_size[0])
        self.image_channels = self.network.image_channels
        self.transform = get_seg_transforms(
            self.image_size, train=False, keys=("image", "mask"), augment=False, rgb=self.image_channels == 3
        )
        self._resize_image = Resize((self.image_size, self.image_size), mode="area")
        self._resize_mask = Resize((self.image_size, self.image_size), mode="area")

    @classmethod
    def from_bundle(
        cls, bundle: str | os.PathLike = DEFAULT_BUNDLE, checkpoint: str | os.PathLike | None = None, **overrides: Any
    ) -> QualityChecker:
        """Build from a bundle folder: weights ``models/model.pt`` (or ``checkpoint``), settings from its sidecar.

        ``overrides`` (``image_size``, ``backbone``, ``device``...) win over the sidecar's values.
        """
        bundle = Path(bundle)
        config_file = bundle / "configs" / "inference.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{bundle} is not a quality-predictor bundle: {config_file} is missing")
        settings = {k: v for k, v in overrides.items() if v is not None}
        return cls(checkpoint if checkpoint is not None else bundle / "models" / "model.pt", **settings)

    @torch.no_grad()
    def score_tensors(self, image: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray) -> float:
        """Score one pair already in memory.

        Args:
            image: ``(C, H, W)`` float in ``[0, 1]`` with C = ``image_channels``.
            mask: ``(H, W)`` or ``(1, H, W)`` mask in ``[0, 1]`` (same H, W as the image).

        Resizing follows the training chain (:func:`~qgssl_monai.transforms.io.get_seg_transforms`): area for the
        image, area + ``>= 0.5`` for the mask, so a soft mask is scored as its hard version
        (g was trained on hard masks).
        """
        image_t = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image).float()
        mask_t = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).float()
        if mask_t.ndim == 2:
            mask_t = mask_t[None]
        if image_t.ndim != 3 or image_t.shape[0] != self.image_channels:
            raise ValueError(f"image must be ({self.image_channels}, H, W), got {tuple(image_t.shape)}")
        if image_t.shape[1:] != mask_t.shape[1:]:
            raise ValueError(f"image {tuple(image_t.shape[1:])} and mask {tuple(mask_t.shape[1:])} sizes differ")
        image_t = torch.as_tensor(self._resize_image(image_t)).float()
        mask_t = (torch.as_tensor(self._resize_mask(mask_t)) >= 0.5).float()
        return float(self.network.score(image_t[None].to(self.device), mask_t[None].to(self.device))[0])

    @torch.no_grad()
    def score_files(self, pairs: Sequence[tuple[str | os.PathLike, str | os.PathLike]]) -> list[float]:
        """Score ``[(image_path, mask_path), ...]`` in batches; one score per pair, in order."""
        scores: list[float] = []
        for start in range(0, len(pairs), self.batch_size):
            loaded = [self.transform({"image": str(i), "mask": str(m)}) for i, m in pairs[start : start + self.batch_size]]
            images = torch.stack([torch.as_tensor(d["image"]).float() for d in loaded]).to(self.device)
            masks = torch.stack([torch.as_tensor(d["mask"]).float() for d in loaded]).to(self.device)
            scores.extend(self.network.score(images, masks).cpu().tolist())
        return scores

    def score_file(self, image_path: str | os.PathLike, mask_path: str | os.PathLike) -> float:
        """Score one image-mask pair given as files."""
        return self.score_files([(image_path, mask_path)])[0]
