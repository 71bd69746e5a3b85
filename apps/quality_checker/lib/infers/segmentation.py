"""``segmentation`` infer task: image -> mask (SSL bundle network f) plus g's predicted Dice of that mask."""

from __future__ import annotations

import tempfile
from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from PIL import Image

from qgssl_monai.serving.label_logic import QualityService

from ..errors import http_errors


class SegmentationInfer(InferTask):
    """Segment a 2D image and report how far to trust the mask.

    Returns the mask as a ``{0, 255}`` PNG at the image's size (``output=image``, or the ``image`` part of the
    default multipart answer) and the JSON ``{"quality", "model_version", "segmentation_model_version",
    "latency_ms", "foreground_fraction", ...}`` (``output=json``).
    """

    def __init__(self, service: QualityService) -> None:
        if service.segmenter is None:
            raise ValueError("SegmentationInfer needs a QualityService with a segmentation model")
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=["foreground"],
            dimension=2,
            description="Binary segmentation (SSL bundle) with the predicted Dice of the mask",
            config={"segmentation_model_version": service.segmenter.version, "quality_model_version": service.version},
        )
        self.service = service

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        with http_errors():
            mask, result = self.service.segment(request["image"])
        if request.get("image_id"):
            result["image_id"] = request["image_id"]
        # MONAI Label deletes the result file after sending it
        output = tempfile.NamedTemporaryFile(suffix=".png", delete=False).name
        Image.fromarray(mask).save(output)
        return output, result
