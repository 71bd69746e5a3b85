"""Fitting g's calibration on held-out pairs and storing it in the checkpoint sidecar."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qgssl_monai.networks.calibration import MonotoneCalibration
from qgssl_monai.quality.calibrate import (
    CALIBRATION_KEY,
    calibrate_quality_predictor,
    calibration_sidecar_path,
    write_calibration,
)


def test_write_calibration_merges_into_the_sidecar(tmp_path) -> None:
    checkpoint = tmp_path / "models" / "model.pt"
    sidecar = calibration_sidecar_path(checkpoint)
    assert sidecar == tmp_path / "models" / "model.meta.json"
    sidecar.parent.mkdir()
    sidecar.write_text(json.dumps({"image_size": 64, "backbone": "efficientnet_lite0"}))
    cal = MonotoneCalibration([0.0, 0.5, 1.0], [0.0, 0.3, 0.9])
    write_calibration(sidecar, cal)
    data = json.loads(sidecar.read_text())
    assert data["image_size"] == 64 and data["backbone"] == "efficientnet_lite0"
    assert MonotoneCalibration.from_dict(data[CALIBRATION_KEY]).to_dict() == cal.to_dict()
    write_calibration(sidecar, None)
    assert json.loads(sidecar.read_text()) == {"image_size": 64, "backbone": "efficientnet_lite0"}
    fresh = write_calibration(tmp_path / "new" / "g.meta.json", cal)
    assert set(json.loads(fresh.read_text())) == {CALIBRATION_KEY}
    assert not list(sidecar.parent.glob("*.tmp"))


def test_calibration_removes_an_optimistic_bias(tmp_path) -> None:
    rng = np.random.default_rng(0)
    true = rng.uniform(0.1, 0.95, 400)
    # an optimistic, compressed g: predicted = 0.5 + 0.5 * true (+ noise), bias about +0.24
    predicted = np.clip(0.5 + 0.5 * true + rng.normal(0, 0.02, true.size), 0, 1)
    segmentation = {"source": ["a"] * true.size, "image": [f"i{i}" for i in range(true.size)],
                    "true": true.tolist(), "predicted": predicted.tolist()}  # fmt: skip
    report = calibrate_quality_predictor(segmentation, tmp_path / "model.pt", tmp_path / "cal", n_knots=11, extra={"split": "validation"})
    assert report["fit_before"]["bias"] == pytest.approx(float(np.mean(predicted - true)))
    assert report["fit_before"]["bias"] > 0.2
    assert abs(report["fit_after"]["bias"]) < 0.01 and report["fit_after"]["mae"] < report["fit_before"]["mae"] / 3
    # a monotone map keeps the ranking: Spearman unchanged up to ties created by flat segments
    assert report["fit_after"]["spearman"] == pytest.approx(report["fit_before"]["spearman"], abs=0.02)
    stored = json.loads((tmp_path / "model.meta.json").read_text())[CALIBRATION_KEY]
    assert json.loads((tmp_path / "cal" / "calibration.json").read_text())["calibration"] == stored
    cal = MonotoneCalibration.from_dict(stored)
    grid = torch.linspace(0, 1, 101)
    assert bool((cal(grid)[1:] >= cal(grid)[:-1]).all())
    assert float(cal(torch.tensor(0.75))) == pytest.approx(0.5, abs=0.05)  # inverts predicted = 0.5 + 0.5 * true
