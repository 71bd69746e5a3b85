"""Image-mask pairs in, quality scores out (batch inference of g)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import PrepareBatch
from monai.utils import convert_to_tensor

__all__ = ["PairPrepareBatch", "QualityScoreWriter", "read_pairs_csv"]


def read_pairs_csv(
    csv_path: str | os.PathLike, image_column: str = "image", mask_column: str = "mask", *, check_files: bool = True
) -> list[dict[str, str]]:
    """Read a CSV of image-mask pairs (header ``image,mask``; paths relative to the CSV's folder).

    Args:
        csv_path: the CSV.
        image_column, mask_column: column names.
        check_files: raise at the first listed file that is missing; False leaves checking to the caller
            (``qgssl quality-check`` reports every bad row and scores the others).

    Returns:
        ``[{"image": abs, "mask": abs, "image_path": as_written, "mask_path": as_written}, ...]``, row ``i`` from CSV line ``i + 2``.

    Raises:
        FileNotFoundError: the CSV or (``check_files``) a listed file is missing (the message names the CSV row).
        ValueError: a required column is missing or the CSV has no rows.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"pairs CSV not found: {csv_path}")
    root = csv_path.resolve().parent
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {image_column, mask_column} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {sorted(missing)}; expected a header '{image_column},{mask_column}'")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{csv_path} lists no image-mask pairs")
    pairs = []
    for line, row in enumerate(rows, start=2):
        item = {}
        for column in (image_column, mask_column):
            path = Path(row[column].strip()).expanduser()
            path = path if path.is_absolute() else root / path
            if check_files and not path.is_file():
                raise FileNotFoundError(f"{csv_path}, line {line}: {column} file not found: {path}")
            item[column] = str(path)
            item[f"{column}_path"] = row[column].strip()
        pairs.append({"image": item[image_column], "mask": item[mask_column], "image_path": item[f"{image_column}_path"], "mask_path": item[f"{mask_column}_path"]})
    return pairs


class PairPrepareBatch(PrepareBatch):
    """Engine batch ``{"image", "mask"}`` -> ``(cat([image, mask], dim=1), None)`` (inference: no target)."""

    def __init__(self, image_key: str = "image", mask_key: str = "mask") -> None:
        self.image_key = image_key
        self.mask_key = mask_key

    def __call__(
        self, batchdata: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, None]:
        image = convert_to_tensor(batchdata[self.image_key], track_meta=False).float()
        mask = convert_to_tensor(batchdata[self.mask_key], track_meta=False).float()
        return torch.cat([image, mask], dim=1).to(device=device, non_blocking=non_blocking), None


class QualityScoreWriter:
    """Collect g's score for every pair an evaluator sees; write ``<filename>.csv`` and ``.json`` at the end.

    Expects ``decollate=False`` engines whose batch carries ``image_path`` and ``mask_path`` strings and
    whose output ``pred`` is ``(B, 1)``.

    Args:
        output_dir: folder for the files (created).
        filename: stem of the output files.
    """

    def __init__(self, output_dir: str | os.PathLike, filename: str = "quality_scores") -> None:
        self.output_dir = Path(output_dir)
        self.filename = filename
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def _reset(self, engine: Engine) -> None:
        self.rows = []

    def _collect(self, engine: Engine) -> None:
        scores = engine.state.output["pred"].detach().float().reshape(-1).cpu().tolist()
        batch = engine.state.batch
        images: Sequence[str] = batch.get("image_path", [""] * len(scores))
        masks: Sequence[str] = batch.get("mask_path", [""] * len(scores))
        for image, mask, score in zip(images, masks, scores):
            self.rows.append({"image": str(image), "mask": str(mask), "quality": float(score)})

    def write(self, engine: Engine | None = None) -> Path:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        csv_path = self.output_dir / f"{self.filename}.csv"
        with open(csv_path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "mask", "quality"])
            writer.writeheader()
            for row in self.rows:
                writer.writerow({**row, "quality": f"{row['quality']:.6f}"})
        with open(self.output_dir / f"{self.filename}.json", "w", encoding="utf-8") as f:
            json.dump(self.rows, f, indent=1)
        return csv_path
