"""Per-image test metrics for a MONAI evaluator: DSC, IoU, HD95, ASD, written as CSV/JSON with mean ± s.e.

:class:`PerImageMetricsWriter` is an ignite handler for a ``SupervisedEvaluator`` whose postprocessing gives
hard masks (``Activationsd(sigmoid=True)`` + ``AsDiscreted(threshold=0.5)``). Each image is scored with
:func:`qgssl_monai.metrics.compute_binary_metrics` at the network's resolution (the label went through the
same resize as the image). At the end of the run it writes

* ``<prefix>_metrics_per_image.csv`` / ``.json``: one row per image (``image`` path + one column per metric),
* ``<prefix>_metrics_summary.json``: ``{"dice": {"mean", "se", "n"}, ...}`` from :func:`summarize_metrics`,

and puts ``<prefix>_<metric>`` (mean) and ``<prefix>_<metric>_se`` into ``engine.state.metrics`` so the
MLflow / stats handlers listed after it log the same numbers.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys

from qgssl_monai.metrics import compute_binary_metrics, summarize_metrics

__all__ = ["METRIC_NAMES", "PerImageMetricsWriter"]

logger = logging.getLogger(__name__)

METRIC_NAMES: tuple[str, ...] = ("dice", "iou", "hd95", "asd")


class PerImageMetricsWriter:
    """Collect per-image binary-segmentation metrics and write them with their mean ± s.e.

    Args:
        output_dir: folder of the CSV/JSON files (created).
        prefix: file and metric-name prefix (``"test"``).
        spacing: pixel size for HD95/ASD (``None``: pixels).
        pred_key, label_key, image_key: keys of the decollated evaluator output; ``pred`` and ``label`` are
            ``(1, H, W)`` masks in ``{0, 1}``; ``image`` carries ``filename_or_obj`` in its metadata.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        prefix: str = "test",
        spacing: float | Sequence[float] | None = None,
        pred_key: str = CommonKeys.PRED,
        label_key: str = CommonKeys.LABEL,
        image_key: str = CommonKeys.IMAGE,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.prefix = prefix
        self.spacing = spacing
        self.pred_key = pred_key
        self.label_key = label_key
        self.image_key = image_key
        self.rows: list[dict[str, Any]] = []
        self.summary: dict[str, dict[str, float]] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def reset(self, engine: Engine | None = None) -> None:
        self.rows = []
        self.summary = {}

    def collect(self, engine: Engine) -> None:
        items = engine.state.output
        if isinstance(items, dict):
            raise TypeError("PerImageMetricsWriter needs a decollated output (evaluator decollate=True)")
        preds = torch.stack([torch.as_tensor(item[self.pred_key]).detach().cpu() for item in items])
        labels = torch.stack([torch.as_tensor(item[self.label_key]).detach().cpu() for item in items])
        values = compute_binary_metrics(preds, labels, spacing=self.spacing)
        for index, item in enumerate(items):
            meta = getattr(item.get(self.image_key), "meta", {}) or {}
            row: dict[str, Any] = {"image": str(meta.get("filename_or_obj", f"image_{len(self.rows):05d}"))}
            row.update({name: float(values[name][index]) for name in METRIC_NAMES})
            self.rows.append(row)

    def write(self, engine: Engine) -> None:
        """Write the tables and publish the means in ``engine.state.metrics``."""
        if not self.rows:
            logger.warning("PerImageMetricsWriter: no image was evaluated; nothing written")
            return
        self.summary = summarize_metrics({name: [row[name] for row in self.rows] for name in METRIC_NAMES})
        self.output_dir.mkdir(parents=True, exist_ok=True)
        stem = self.output_dir / f"{self.prefix}_metrics"
        with open(f"{stem}_per_image.json", "w", encoding="utf-8") as handle:
            json.dump(self.rows, handle, indent=2)
        with open(f"{stem}_per_image.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["image", *METRIC_NAMES])
            writer.writeheader()
            writer.writerows(self.rows)
        with open(f"{stem}_summary.json", "w", encoding="utf-8") as handle:
            json.dump(self.summary, handle, indent=2)
        for name, stats in self.summary.items():
            engine.state.metrics[f"{self.prefix}_{name}"] = stats["mean"]
            engine.state.metrics[f"{self.prefix}_{name}_se"] = stats["se"]
        text = ", ".join(f"{n} {s['mean']:.4f} ± {s['se']:.4f}" for n, s in self.summary.items())
        logger.info("%s (n=%d): %s -> %s_*.csv/json", self.prefix, len(self.rows), text, stem)
