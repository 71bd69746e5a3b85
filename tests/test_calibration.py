"""Monotone calibration of g: shape, monotonicity, gradients, round trip, and bias removal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qgssl_monai.networks.calibration import MonotoneCalibration, fit_monotone_calibration


def test_identity_by_default_and_exact_interpolation():
    identity = MonotoneCalibration()
    q = torch.tensor([[0.0, 0.25], [0.5, 1.0]])
    assert identity.is_identity
    assert torch.allclose(identity(q), q)
    shift = MonotoneCalibration([0.0, 0.5, 1.0], [0.0, 0.2, 1.0])
    # halfway in the first segment: 0.1; in the second: 0.2 + 0.5 * 0.8 = 0.6
    assert torch.allclose(shift(torch.tensor([0.25, 0.75, 1.0, 1.7, -0.3])), torch.tensor([0.1, 0.6, 1.0, 1.0, 0.0]))


def test_gradient_flows_through_the_map():
    calib = MonotoneCalibration([0.0, 0.5, 1.0], [0.0, 0.2, 1.0])
    q = torch.tensor([0.25, 0.75], requires_grad=True)
    calib(q).sum().backward()
    assert torch.allclose(q.grad, torch.tensor([0.4, 1.6]))


@pytest.mark.parametrize(
    "knots_x, knots_y",
    [([0.0, 0.5], [0.0, 1.0]), ([0.0, 0.5, 0.5, 1.0], [0, 0.1, 0.2, 1]), ([0.0, 1.0], [0.6, 0.4]), ([0.0, 1.0], [0.0, 1.5])],
)
def test_invalid_knots_are_refused(knots_x, knots_y):
    with pytest.raises(ValueError):
        MonotoneCalibration(knots_x, knots_y)


def test_fit_removes_optimistic_bias_and_keeps_ranking():
    rng = np.random.default_rng(0)
    true = rng.uniform(0.0, 1.0, 2000)
    predicted = np.clip(0.35 + 0.6 * true + rng.normal(0, 0.05, true.size), 0, 1)  # optimistic by ~+0.15
    calib = fit_monotone_calibration(predicted, true, n_knots=11)
    knots_y = calib.knots_y.numpy()
    assert np.all(np.diff(knots_y) >= 0)
    calibrated = calib(torch.as_tensor(predicted, dtype=torch.float32)).numpy()
    assert abs(np.mean(predicted - true)) > 0.1
    assert abs(np.mean(calibrated - true)) < 0.01
    assert np.mean(np.abs(calibrated - true)) < np.mean(np.abs(predicted - true)) / 2
    # monotone: the order of the estimates never flips
    order = np.argsort(predicted)
    assert np.all(np.diff(calibrated[order]) >= -1e-6)


def test_dict_round_trip_and_state_dict():
    calib = MonotoneCalibration([0.0, 0.3, 1.0], [0.05, 0.1, 0.9])
    again = MonotoneCalibration.from_dict(calib.to_dict())
    q = torch.linspace(0, 1, 17)
    assert torch.allclose(calib(q), again(q))
    assert set(calib.state_dict()) == {"knots_x", "knots_y"}
    assert MonotoneCalibration.from_dict(None).is_identity
