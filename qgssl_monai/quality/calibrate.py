"""Fit g's monotone calibration on held-out real predictions and store it in g's checkpoint sidecar.

The pairs ``(g's score, true Dice)`` must come from masks of networks that took no part in g's training and
from images that are not the ones the calibration is later judged on: the out-of-fold pool of the training
split, or (until that exists) e.g. the validation-split predictions of separately trained segmentation
networks. The map itself is :class:`~qgssl_monai.networks.calibration.MonotoneCalibration`
(:func:`~qgssl_monai.networks.calibration.fit_monotone_calibration`, isotonic); it is written as
``{"calibration": MonotoneCalibration.to_dict()}`` into g's sidecar JSON ``models/model.meta.json`` beside
``models/model.pt`` (other keys of the sidecar are kept), where g's loader picks it up.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qgssl_monai.networks.calibration import MonotoneCalibration, fit_monotone_calibration
from qgssl_monai.quality.evaluation import quality_regression_metrics

__all__ = ["CALIBRATION_KEY", "calibrate_quality_predictor", "calibration_sidecar_path", "fit_calibration", "write_calibration"]

#: key of the calibration in g's sidecar JSON
CALIBRATION_KEY = "calibration"


def calibration_sidecar_path(checkpoint: str | os.PathLike) -> Path:
    """g's sidecar beside its weights: ``models/model.pt`` -> ``models/model.meta.json``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.meta.json")


def write_calibration(sidecar_path: str | os.PathLike, calibration: MonotoneCalibration | None) -> Path:
    """Merge ``calibration`` (``None``: remove it) into the sidecar JSON, keeping its other keys; atomic write.

    A missing sidecar is created holding only the calibration.
    """
    path = Path(sidecar_path)
    data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    if calibration is None:
        data.pop(CALIBRATION_KEY, None)
    else:
        data[CALIBRATION_KEY] = calibration.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
    os.replace(tmp, path)
    return path


def fit_calibration(segmentation: Mapping[str, list], n_knots: int = 11) -> tuple[MonotoneCalibration, dict[str, Any]]:
    """Fit the calibration on scored predictions and report g before and after it on those same pairs.

    Args:
        segmentation: ``{"predicted": [...], "true": [...], ...}`` as returned by
            :func:`~qgssl_monai.quality.evaluation.score_prediction_masks` /
            :func:`~qgssl_monai.quality.evaluation.score_segmentation_predictions`.
        n_knots: knots of the piecewise-linear map.

    Returns:
        ``(calibration, {"n_knots", "fit_before", "fit_after", "calibration"})`` with
        :func:`~qgssl_monai.quality.evaluation.quality_regression_metrics` of the raw and calibrated scores.
    """
    predicted = np.asarray(segmentation["predicted"], dtype=np.float64)
    true = np.asarray(segmentation["true"], dtype=np.float64)
    calibration = fit_monotone_calibration(predicted, true, n_knots=n_knots)
    calibrated = calibration(torch.as_tensor(predicted)).numpy()
    report = {
        "n_knots": n_knots,
        "fit_before": quality_regression_metrics(predicted, true),
        "fit_after": quality_regression_metrics(calibrated, true),
        "calibration": calibration.to_dict(),
    }
    return calibration, report


def calibrate_quality_predictor(
    segmentation: Mapping[str, list],
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    n_knots: int = 11,
    sidecar_path: str | os.PathLike | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit on ``segmentation``, write the map into g's sidecar and ``<output_dir>/calibration.json``.

    Args:
        segmentation: held-out scored predictions (see :func:`fit_calibration`).
        checkpoint: g's ``model.pt``; its sidecar is :func:`calibration_sidecar_path` unless ``sidecar_path``.
        extra: settings copied into the report (sources, split, ...).

    Returns:
        the report written to ``calibration.json`` (with ``sidecar``: the path written).
    """
    calibration, report = fit_calibration(segmentation, n_knots=n_knots)
    sidecar = write_calibration(sidecar_path or calibration_sidecar_path(checkpoint), calibration)
    report.update({"checkpoint": str(checkpoint), "sidecar": str(sidecar), **({"settings": dict(extra)} if extra else {})})
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "calibration.json").write_text(json.dumps(report, indent=2, default=str))
    return report
