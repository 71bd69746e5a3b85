"""MONAI Label app serving the segmentation-quality predictor g and quality-driven active learning.

Start (see README.md)::

    monailabel start_server --app apps/quality_checker --studies DIR \
        --conf models quality_predictor,ssl_segmentation --host 127.0.0.1 --port 8000

Bundles are read offline: ``<app>/model/<name>`` first, then the repository's ``bundles/<name>`` (or
``--conf bundles_dir DIR``); each needs ``configs/`` and a trained ``models/model.pt``. Nothing is downloaded.

Without ``--host 127.0.0.1`` the stock CLI binds to 0.0.0.0; the app then refuses to start unless
``MONAI_LABEL_AUTH_ENABLE=true`` or ``--conf allow_remote true``.

``--conf`` keys: ``models`` (``quality_predictor`` and optionally ``ssl_segmentation``), ``bundles_dir``,
``device`` (``cpu``), ``seg_net`` (net overlay, e.g. ``unet``), ``seg_network_size`` / ``seg_image_size`` /
``seg_in_channels`` (the values the SSL bundle was trained with). g needs no setting: its size, channels,
backbone and calibration come from the sidecar ``models/model.meta.json`` written by its training.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from lib.activelearning import LowestQuality
from lib.datastore import SafeLocalDatastore
from lib.errors import http_errors
from lib.infers import QualityInfer, SegmentationInfer
from lib.scoring import QualityRanking
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from qgssl_monai.serving.label_logic import (
    LabelRequestError,
    QualityService,
    check_image_id,
    exposed_bind_host,
    find_bundle,
    resolve_inside,
)

logger = logging.getLogger(__name__)

QUALITY_BUNDLE = "quality_predictor"
SEGMENTATION_BUNDLE = "ssl_segmentation"
_INT_SETTINGS = {"seg_image_size": "image_size", "seg_in_channels": "in_channels"}


class QualityCheckerApp(MONAILabelApp):
    """Quality checker: ``quality`` and ``segmentation`` infer tasks, ``lowest_quality`` strategy,
    ``quality_ranking`` scoring; validated requests (4xx with a clear ``detail``, never a 500)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        exposed = exposed_bind_host(sys.argv)
        if exposed and not settings.MONAI_LABEL_AUTH_ENABLE and conf.get("allow_remote", "false").lower() != "true":
            raise RuntimeError(
                f"refusing to serve on {exposed} without authentication: start with --host 127.0.0.1, or enable "
                "MONAI_LABEL_AUTH_ENABLE (see README.md), or pass --conf allow_remote true behind your own proxy auth"
            )
        # uploads go to a private folder, so an absolute path in a request can be told apart from an upload
        self.upload_dir = tempfile.mkdtemp(prefix="qgssl_label_uploads_")
        tempfile.tempdir = self.upload_dir
        atexit.register(shutil.rmtree, self.upload_dir, ignore_errors=True)

        models = [m.strip() for m in conf.get("models", QUALITY_BUNDLE).split(",") if m.strip()]
        unknown = sorted(set(models) - {QUALITY_BUNDLE, SEGMENTATION_BUNDLE})
        if QUALITY_BUNDLE not in models or unknown:
            raise ValueError(
                f"--conf models {conf.get('models')!r}: must list {QUALITY_BUNDLE!r} and optionally "
                f"{SEGMENTATION_BUNDLE!r} (unknown: {unknown})"
            )
        search = [Path(app_dir) / "model"]
        if conf.get("bundles_dir"):
            search.insert(0, Path(conf["bundles_dir"]))
        search.append(Path(app_dir).resolve().parents[1] / "bundles")
        seg_overrides: dict[str, Any] = {}
        if conf.get("seg_network_size"):
            seg_overrides["network_size"] = conf["seg_network_size"]
        for key, target in _INT_SETTINGS.items():
            if conf.get(key):
                seg_overrides[target] = int(conf[key])
        self.service = QualityService.from_bundles(
            find_bundle(QUALITY_BUNDLE, search),
            find_bundle(SEGMENTATION_BUNDLE, search) if SEGMENTATION_BUNDLE in models else None,
            seg_net=conf.get("seg_net"),
            seg_overrides=seg_overrides,
            device=conf.get("device", "cpu"),
        )
        logger.info("quality model %s; segmentation model %s", self.service.version,
                    self.service.segmenter.version if self.service.segmenter else None)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="qgssl quality checker",
            description="Predicted Dice of segmentation masks (quality predictor g) and quality-driven active learning",
            version="0.1.0",
            labels=["foreground"],
        )

    def init_datastore(self) -> Datastore:
        return SafeLocalDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {"quality": QualityInfer(self.service, self.datastore)}
        if self.service.segmenter is not None:
            infers["segmentation"] = SegmentationInfer(self.service)
        return infers

    def init_strategies(self) -> dict[str, Strategy]:
        strategies = super().init_strategies()
        if self.service.segmenter is not None:
            strategies["lowest_quality"] = LowestQuality(self.service)
        return strategies

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        return {"quality_ranking": QualityRanking(self.service)} if self.service.segmenter is not None else {}

    def init_trainers(self) -> dict:
        return {}  # training runs through the bundles, not through the label server

    def _check_upload(self, path: Any, field: str) -> str:
        if not isinstance(path, str) or not os.path.isabs(path):
            raise LabelRequestError(400, f"{field} must be an uploaded file or a datastore image id")
        try:
            return str(resolve_inside(self.upload_dir, path))
        except LabelRequestError:
            raise LabelRequestError(
                400, f"{field} {path!r} is not accepted: server paths cannot be read, upload the file instead"
            ) from None

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """Validate model, image and mask references, then run the task (4xx ``HTTPException`` on bad input).

        ``image`` is either an upload (a file in this server's private upload folder) or a datastore image id;
        a server path, an id with ``/``/``..`` or an unknown id is refused. ``label`` must be an upload.
        """
        with http_errors():
            model = request.get("model")
            if model not in self._infers:
                raise LabelRequestError(404, f"unknown model {model!r}; available: {sorted(self._infers)}")
            image = request.get("image")
            if not image or not isinstance(image, str):
                raise LabelRequestError(400, "give an image: upload it as the 'file' field or pass ?image=<datastore id>")
            request = dict(request)
            if os.path.isabs(image):
                request["image"] = self._check_upload(image, "image")
                request["image_id"] = None
            else:
                check_image_id(image)
                store = datastore if datastore else self.datastore()
                if image not in store.list_images():
                    raise LabelRequestError(404, f"image id {image!r} is not in the datastore")
                request["image"] = store.get_image_uri(image)
                request["image_id"] = image
            if request.get("label") is not None:
                request["label"] = self._check_upload(request["label"], "label")
        return super().infer(request, datastore)

    def next_sample(self, request: dict[str, Any]) -> dict[str, Any]:
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            raise HTTPException(404, f"unknown strategy {strategy!r}; available: {sorted(self._strategies)}")
        return super().next_sample(request)

    def scoring(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        method = request.get("method")
        if method not in self._scoring_methods:
            raise HTTPException(404, f"unknown scoring method {method!r}; available: {sorted(self._scoring_methods)}")
        return super().scoring(request, datastore)
