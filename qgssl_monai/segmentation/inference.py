"""Inference writer: predicted masks as PNG at the input's original size, plus the predicted quality g(x, mask).

:class:`MaskAndQualityWriter` is an ignite handler attached to a MONAI ``SupervisedEvaluator`` whose
postprocessing turns logits into probabilities (``Activationsd(sigmoid=True)``). Per image it writes
``<output_dir>/<stem>_mask.png`` ({0, 255} uint8, original ``(H, W)``) and, when a quality predictor is given,
the estimated Dice of the hard mask at the network's resolution (g, built by
:func:`~qgssl_monai.networks.quality.load_quality_predictor`, resizes it to the size g was trained at).
At the end of the run it writes ``predictions.csv`` and ``predictions.json`` with one row per image.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys
from PIL import Image
from torch import nn

from qgssl_monai.transforms.io import restore_original_size

__all__ = ["IMAGE_SUFFIXES", "MaskAndQualityWriter", "list_images"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
PREDICTION_FIELDS: tuple[str, ...] = ("image", "mask", "height", "width", "foreground_fraction", "predicted_quality")


def list_images(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Image files to segment: a folder (its image files, sorted), one file, or a list of files.

    Raises:
        FileNotFoundError: a path does not exist, or a folder holds no image file.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    files: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no image ({', '.join(IMAGE_SUFFIXES)}) in input folder {path}")
            files += found
        elif path.is_file():
            files.append(str(path))
        else:
            raise FileNotFoundError(f"inference input {path} does not exist")
    return files


class MaskAndQualityWriter:
    """Write each predicted mask at the original image size and record its predicted quality.

    Args:
        output_dir: folder of the mask PNGs and of ``predictions.csv`` / ``predictions.json``.
        quality_net: frozen quality predictor ``g`` (``(B, C+1, H, W) -> (B, 1)``; from
            :func:`~qgssl_monai.networks.quality.load_quality_predictor`), or ``None`` (no quality column).
        threshold: probability threshold of the hard mask (0.5, see docs/ARCHITECTURE.md).
        image_key, pred_key: keys of the decollated evaluator output; ``pred`` holds probabilities
            ``(1, H, W)`` in ``[0, 1]``, ``image`` the network input ``(C, H, W)`` (a MetaTensor carrying
            ``filename_or_obj`` and ``spatial_shape``).
        postfix: appended to the image stem for the mask file name.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        quality_net: nn.Module | None = None,
        threshold: float = 0.5,
        image_key: str = CommonKeys.IMAGE,
        pred_key: str = CommonKeys.PRED,
        postfix: str = "_mask",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.quality_net = quality_net
        self.threshold = float(threshold)
        self.image_key = image_key
        self.pred_key = pred_key
        self.postfix = postfix
        self.records: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write_tables)

    def reset(self, engine: Engine | None = None) -> None:
        self.records = []
        self.output_dir.mkdir(parents=True, exist_ok=True)

    @torch.no_grad()
    def collect(self, engine: Engine) -> None:
        items = engine.state.output
        if isinstance(items, dict):
            raise TypeError("MaskAndQualityWriter needs a decollated output (evaluator decollate=True)")
        images = [item[self.image_key] for item in items]
        probabilities = [item[self.pred_key].float() for item in items]
        qualities: list[float | None] = [None] * len(items)
        if self.quality_net is not None:
            device = next(self.quality_net.parameters()).device
            image_batch = torch.stack([torch.as_tensor(im) for im in images]).to(device).float()
            masks = (torch.stack([torch.as_tensor(p) for p in probabilities]).to(device) > self.threshold).float()
            qualities = [float(q) for q in self.quality_net(torch.cat([image_batch, masks], dim=1)).reshape(-1).cpu()]
        for image, probability, quality in zip(images, probabilities, qualities):
            self.records.append(self._write_mask(image, probability, quality))

    def _write_mask(self, image: torch.Tensor, probability: torch.Tensor, quality: float | None) -> dict[str, Any]:
        meta = getattr(image, "meta", {})
        source = str(meta.get("filename_or_obj", f"image_{len(self.records):05d}"))
        restored = restore_original_size(torch.as_tensor(probability).cpu(), meta, threshold=self.threshold)
        mask = restored[0].numpy().astype(bool)
        target = self.output_dir / f"{Path(source).stem}{self.postfix}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(target)
        return {
            "image": source,
            "mask": str(target),
            "height": int(mask.shape[0]),
            "width": int(mask.shape[1]),
            "foreground_fraction": float(mask.mean()),
            "predicted_quality": quality,
        }

    def write_tables(self, engine: Engine | None = None) -> None:
        """Write ``predictions.json`` and ``predictions.csv`` (empty quality cells without a predictor)."""
        with open(self.output_dir / "predictions.json", "w", encoding="utf-8") as handle:
            json.dump(self.records, handle, indent=2)
        with open(self.output_dir / "predictions.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=PREDICTION_FIELDS)
            writer.writeheader()
            for record in self.records:
                writer.writerow({k: ("" if record[k] is None else record[k]) for k in PREDICTION_FIELDS})
        logger.info("wrote %d masks and predictions.csv to %s", len(self.records), self.output_dir)
