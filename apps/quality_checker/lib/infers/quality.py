"""``quality`` infer task: image + mask -> JSON ``{"quality": predicted Dice, "model_version", "latency_ms", ...}``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from qgssl_monai.serving.label_logic import LabelRequestError, QualityService

from ..errors import http_errors


class QualityInfer(InferTask):
    """Predicted Dice of a mask for an image, by the quality predictor g.

    The mask is the uploaded ``label`` file (``POST /infer/quality?output=json`` with ``file`` = image and
    ``label`` = mask) or, for a datastore image id without upload, the image's ``final`` label.
    The app validates ``image`` / ``label`` paths before this task runs (see ``main.py``).

    Args:
        service: g (and f) loaded once.
        datastore: callable returning the app's datastore (for stored labels).
    """

    def __init__(self, service: QualityService, datastore: Callable[[], Datastore]) -> None:
        super().__init__(
            type=InferType.OTHERS,
            labels=["foreground"],
            dimension=2,
            description="Predicted Dice of a binary mask for a 2D image (quality predictor g); JSON result",
            config={"quality_model_version": service.version},
        )
        self.service = service
        self.datastore = datastore

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[None, dict[str, Any]]:
        with http_errors():
            mask = request.get("label")
            if not mask:
                image_id = request.get("image_id")
                if not image_id:
                    raise LabelRequestError(422, "no mask: upload one as the 'label' file field")
                mask = self.datastore().get_label_uri(image_id, DefaultLabelTag.FINAL)
                if not mask:
                    raise LabelRequestError(
                        404, f"image {image_id!r} has no final label in the datastore; upload a mask as the 'label' file"
                    )
            result = self.service.score_pair(request["image"], mask)
            if request.get("image_id"):
                result["image_id"] = request["image_id"]
            return None, result
