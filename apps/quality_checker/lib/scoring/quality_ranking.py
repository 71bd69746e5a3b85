"""``quality_ranking`` scoring method: segment every datastore image, predict the quality of each mask and store it.

Per image, ``image info["quality"]`` (visible in ``GET /datastore/?output=all`` and
``GET /datastore/image/info?image=<id>``) becomes::

    {"segmentation_quality": g(x, f(x)), "label_quality": g(x, final label) or null, "rank": 1.. or null,
     "labeled": bool, "foreground_fraction", "model_version", "segmentation_model_version", "image_mtime", "ts"}

``rank`` orders the *unlabeled* images for annotation: 1 = lowest predicted quality (label first).
``label_quality`` flags doubtful stored labels. Images that cannot be read get ``{"error": message}``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.scoring import ScoringMethod
from tqdm import tqdm

from qgssl_monai.serving.label_logic import LabelRequestError, QualityService, rank_by_quality

logger = logging.getLogger(__name__)

QUALITY_INFO_KEY = "quality"


def score_image(service: QualityService, datastore: Datastore, image_id: str) -> dict[str, Any]:
    """Segment one datastore image and score the mask (and its final label, when it has one)."""
    path = datastore.get_image_uri(image_id)
    info: dict[str, Any] = {"image_mtime": os.path.getmtime(path), "ts": int(time.time())}
    try:
        _, result = service.segment(path)
    except LabelRequestError as err:
        return {**info, "error": err.detail}
    label = datastore.get_label_uri(image_id, DefaultLabelTag.FINAL)
    label_quality = None
    if label:
        try:
            label_quality = service.score_pair(path, label)["quality"]
        except LabelRequestError as err:
            info["label_error"] = err.detail
    return {
        **info,
        "segmentation_quality": result["quality"],
        "label_quality": label_quality,
        "labeled": bool(label),
        "rank": None,
        "foreground_fraction": result["foreground_fraction"],
        "model_version": result["model_version"],
        "segmentation_model_version": result["segmentation_model_version"],
    }


class QualityRanking(ScoringMethod):
    """Score every datastore image with g(x, f(x)) and store the scores and the annotation ranking."""

    def __init__(self, service: QualityService) -> None:
        super().__init__("Predicted quality of the current segmentation of every image; rank 1 = label first")
        self.service = service

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        records: dict[str, dict[str, Any]] = {}
        for image_id in tqdm(sorted(datastore.list_images()), desc="quality ranking", disable=None):
            records[image_id] = score_image(self.service, datastore, image_id)
        unlabeled = {
            k: v.get("segmentation_quality") for k, v in records.items() if not v.get("labeled") and "error" not in v
        }
        ranking = rank_by_quality(unlabeled)
        for rank, image_id in enumerate(ranking, start=1):
            records[image_id]["rank"] = rank
        for image_id, record in records.items():
            datastore.update_image_info(image_id, {QUALITY_INFO_KEY: record})
        failed = {k: v["error"] for k, v in records.items() if "error" in v}
        logger.info("quality ranking: scored %d images, %d failed", len(records) - len(failed), len(failed))
        return {"scored": len(records) - len(failed), "failed": failed, "ranking": ranking}
