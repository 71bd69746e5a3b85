"""``lowest_quality`` strategy: the unlabeled image whose current segmentation has the lowest predicted quality."""

from __future__ import annotations

import os
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from qgssl_monai.serving.label_logic import QualityService, rank_by_quality

from ..scoring.quality_ranking import QUALITY_INFO_KEY, score_image


class LowestQuality(Strategy):
    """Quality-driven active learning: label next the image the models handle worst.

    Scores stored by the ``quality_ranking`` scoring method are reused when they were computed by the
    current models for the current image file (same model versions and file mtime); other unlabeled images
    are scored now and their scores stored. Unreadable images are skipped.
    """

    def __init__(self, service: QualityService) -> None:
        super().__init__("Unlabeled image whose predicted segmentation quality g(x, f(x)) is lowest")
        self.service = service

    def _is_current(self, record: dict[str, Any] | None, path: str) -> bool:
        return bool(
            record
            and "segmentation_quality" in record
            and record.get("model_version") == self.service.version
            and record.get("segmentation_model_version") == self.service.segmenter.version
            and record.get("image_mtime") == os.path.getmtime(path)
        )

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        scores: dict[str, float | None] = {}
        for image_id in datastore.get_unlabeled_images():
            record = datastore.get_image_info(image_id).get(QUALITY_INFO_KEY)
            if not self._is_current(record, datastore.get_image_uri(image_id)):
                record = score_image(self.service, datastore, image_id)
                datastore.update_image_info(image_id, {QUALITY_INFO_KEY: record})
            scores[image_id] = record.get("segmentation_quality")
        ranking = rank_by_quality(scores)
        if not ranking:
            return {}
        # "predicted_quality", not "quality": the endpoint merges the image info (whose "quality" is the record)
        return {"id": ranking[0], "predicted_quality": scores[ranking[0]], "candidates": len(ranking)}
