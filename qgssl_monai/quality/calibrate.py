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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qgssl_monai.networks.calibration import MonotoneCalibration, fit_monotone_calibration
from qgssl_monai.networks.quality import save_quality_calibration
from qgssl_monai.quality.evaluation import quality_regression_metrics

__all__ = ["calibrate_quality_predictor", "fit_calibration", "uncalibrated"]


def uncalibrated(network: torch.nn.Module) -> torch.nn.Module:
    """``network`` (a loaded g) with its calibration removed, so the fit sees g's raw scores; returns it."""
    if getattr(network, "calibration", None) is not None:
        network.calibration = None
    return network


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
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit on ``segmentation``, write the map into g's sidecar and ``<output_dir>/calibration.json``.

    Args:
        segmentation: held-out scored predictions (see :func:`fit_calibration`).
        checkpoint: g's ``model.pt``; the map is stored in its sidecar
            (:func:`~qgssl_monai.networks.quality.save_quality_calibration`, which checks the weights' hash).
        extra: settings copied into the report (sources, split, ...).

    Returns:
        the report written to ``calibration.json`` (with ``sidecar``: the path written).
    """
    calibration, report = fit_calibration(segmentation, n_knots=n_knots)
    sidecar = save_quality_calibration(checkpoint, calibration)
    report.update({"checkpoint": str(checkpoint), "sidecar": str(sidecar), **({"settings": dict(extra)} if extra else {})})
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "calibration.json").write_text(json.dumps(report, indent=2, default=str))
    return report
