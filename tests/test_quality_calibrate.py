"""Fitting g's calibration on held-out pairs and storing it in the checkpoint sidecar."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qgssl_monai.networks.calibration import MonotoneCalibration
from qgssl_monai.networks.quality import QualityPredictor, load_quality_predictor, quality_metadata_path, write_quality_metadata
from qgssl_monai.quality.calibrate import calibrate_quality_predictor, uncalibrated


def _g_checkpoint(path):
    """A small random g with its sidecar (the calibration is stored in that sidecar)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(QualityPredictor(in_channels=4, backbone="resnet18").state_dict(), path)
    write_quality_metadata(path, image_size=32, image_channels=3, backbone="resnet18")
    return path


def test_fit_uses_raw_scores_of_a_calibrated_g(tmp_path) -> None:
    checkpoint = _g_checkpoint(tmp_path / "models" / "model.pt")
    x = torch.rand(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    raw = load_quality_predictor(checkpoint)(x)
    segmentation = {"true": [0.1, 0.2, 0.3, 0.4], "predicted": [0.5, 0.6, 0.7, 0.8]}
    calibrate_quality_predictor(segmentation, checkpoint, tmp_path / "cal", n_knots=3)
    calibrated = load_quality_predictor(checkpoint)
    assert not torch.allclose(calibrated(x), raw)  # the loader applies the stored map
    assert torch.allclose(uncalibrated(calibrated)(x), raw)  # and the fit can see g's raw scores again
    assert json.loads(quality_metadata_path(checkpoint).read_text())["calibration"]["knots_y"][-1] == pytest.approx(0.4)


def test_calibration_removes_an_optimistic_bias(tmp_path) -> None:
    rng = np.random.default_rng(0)
    true = rng.uniform(0.1, 0.95, 400)
    # an optimistic, compressed g: predicted = 0.5 + 0.5 * true (+ noise), bias about +0.24
    predicted = np.clip(0.5 + 0.5 * true + rng.normal(0, 0.02, true.size), 0, 1)
    segmentation = {"source": ["a"] * true.size, "image": [f"i{i}" for i in range(true.size)],
                    "true": true.tolist(), "predicted": predicted.tolist()}  # fmt: skip
    checkpoint = _g_checkpoint(tmp_path / "model.pt")
    report = calibrate_quality_predictor(segmentation, checkpoint, tmp_path / "cal", n_knots=11, extra={"split": "validation"})
    assert report["fit_before"]["bias"] == pytest.approx(float(np.mean(predicted - true)))
    assert report["fit_before"]["bias"] > 0.2
    assert abs(report["fit_after"]["bias"]) < 0.01 and report["fit_after"]["mae"] < report["fit_before"]["mae"] / 3
    # a monotone map keeps the ranking: Spearman unchanged up to ties created by flat segments
    assert report["fit_after"]["spearman"] == pytest.approx(report["fit_before"]["spearman"], abs=0.02)
    stored = json.loads((tmp_path / "model.meta.json").read_text())["calibration"]
    assert json.loads((tmp_path / "cal" / "calibration.json").read_text())["calibration"] == stored
    cal = MonotoneCalibration.from_dict(stored)
    grid = torch.linspace(0, 1, 101)
    assert bool((cal(grid)[1:] >= cal(grid)[:-1]).all())
    assert float(cal(torch.tensor(0.75))) == pytest.approx(0.5, abs=0.05)  # inverts predicted = 0.5 + 0.5 * true
