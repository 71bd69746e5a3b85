"""Monotone calibration of the quality predictor's output (estimated Dice -> calibrated Dice).

g is trained on corruptions and weak-network predictions; on the pseudo-labels of trained networks it can be
biased (typically optimistic). A monotone map fitted on held-out ``(predicted, true)`` Dice pairs removes that
bias without changing g's ranking. The map is piecewise linear between knots, so it stays differentiable
almost everywhere and gradients still flow through it for QAR.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["MonotoneCalibration", "fit_monotone_calibration"]


class MonotoneCalibration(nn.Module):
    """Piecewise-linear, non-decreasing map ``[0, 1] -> [0, 1]`` defined by knots.

    Args:
        knots_x: strictly increasing inputs, first ``0.0`` and last ``1.0``.
        knots_y: non-decreasing outputs in ``[0, 1]``, same length as ``knots_x``.

    ``forward(q)`` accepts any shape and returns the same shape; values outside ``[0, 1]`` are clamped first.
    The knots are buffers, so the map moves with ``.to(device)`` and is saved in a ``state_dict``.
    """

    def __init__(self, knots_x: Sequence[float] = (0.0, 1.0), knots_y: Sequence[float] = (0.0, 1.0)) -> None:
        super().__init__()
        x = torch.as_tensor(list(knots_x), dtype=torch.float64)
        y = torch.as_tensor(list(knots_y), dtype=torch.float64)
        if x.ndim != 1 or x.shape != y.shape or x.numel() < 2:
            raise ValueError(f"knots_x and knots_y must be 1-D of the same length >= 2, got {x.shape} and {y.shape}")
        if abs(float(x[0])) > 1e-9 or abs(float(x[-1]) - 1.0) > 1e-9:
            raise ValueError(f"knots_x must start at 0 and end at 1, got {float(x[0])} .. {float(x[-1])}")
        if bool((x[1:] <= x[:-1]).any()):
            raise ValueError("knots_x must be strictly increasing")
        if bool((y[1:] < y[:-1] - 1e-12).any()):
            raise ValueError("knots_y must be non-decreasing (the calibration is monotone)")
        if bool((y < -1e-9).any() or (y > 1 + 1e-9).any()):
            raise ValueError("knots_y must lie in [0, 1]")
        self.register_buffer("knots_x", x.float())
        self.register_buffer("knots_y", y.clamp(0.0, 1.0).float())

    @property
    def is_identity(self) -> bool:
        """True when the map is ``q -> q`` (no calibration fitted)."""
        return bool(torch.allclose(self.knots_x, self.knots_y, atol=1e-6))

    def forward(self, q: Tensor) -> Tensor:
        """Calibrated values, same shape and dtype as ``q``."""
        knots_x = self.knots_x.to(q.dtype)
        knots_y = self.knots_y.to(q.dtype)
        flat = q.reshape(-1).clamp(0.0, 1.0)
        # segment index: knots_x[i] <= q < knots_x[i + 1] (q = 1 falls in the last segment)
        index = torch.searchsorted(knots_x.detach().contiguous(), flat.detach().contiguous(), right=True) - 1
        index = index.clamp(0, knots_x.numel() - 2)
        x0, x1 = knots_x[index], knots_x[index + 1]
        y0, y1 = knots_y[index], knots_y[index + 1]
        out = y0 + (flat - x0) * (y1 - y0) / (x1 - x0)
        return out.reshape(q.shape)

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-ready ``{"knots_x": [...], "knots_y": [...]}`` (the inverse of :meth:`from_dict`)."""
        return {"knots_x": [float(v) for v in self.knots_x], "knots_y": [float(v) for v in self.knots_y]}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> MonotoneCalibration:
        """Build from :meth:`to_dict` output; ``None`` gives the identity map."""
        if not data:
            return cls()
        return cls(data["knots_x"], data["knots_y"])


def fit_monotone_calibration(
    predicted: Sequence[float] | np.ndarray, true: Sequence[float] | np.ndarray, n_knots: int = 11
) -> MonotoneCalibration:
    """Fit a monotone map from g's estimates to the true Dice (isotonic regression, then knots).

    Args:
        predicted: g's estimates in ``[0, 1]``, shape ``(N,)``.
        true: the true Dice of the same masks, shape ``(N,)``.
        n_knots: knots at equally spaced quantiles of ``predicted`` (plus 0 and 1); >= 2.

    Returns:
        A :class:`MonotoneCalibration` whose knots are the isotonic fit evaluated at the knot positions
        (linear between them, flat beyond the observed range).
    """
    from scipy.optimize import isotonic_regression

    pred = np.clip(np.asarray(predicted, dtype=np.float64).reshape(-1), 0.0, 1.0)
    target = np.clip(np.asarray(true, dtype=np.float64).reshape(-1), 0.0, 1.0)
    if pred.shape != target.shape or pred.size < 2:
        raise ValueError(f"predicted and true must hold the same number (>= 2) of values, got {pred.size} and {target.size}")
    if n_knots < 2:
        raise ValueError(f"n_knots must be >= 2, got {n_knots}")
    order = np.argsort(pred, kind="stable")
    pred_sorted = pred[order]
    fitted = isotonic_regression(target[order], increasing=True).x
    inner = np.quantile(pred_sorted, np.linspace(0.0, 1.0, n_knots))
    knots_x = np.unique(np.concatenate([[0.0], inner, [1.0]]))
    # the isotonic fit is a step function on the sorted predictions; interpolate it at the knots
    # (np.interp is flat outside the observed range, which keeps the map inside [0, 1])
    unique_pred, first = np.unique(pred_sorted, return_index=True)
    last = np.r_[first[1:], pred_sorted.size] - 1
    level = 0.5 * (fitted[first] + fitted[last])
    knots_y = np.maximum.accumulate(np.interp(knots_x, unique_pred, level))
    return MonotoneCalibration(knots_x.tolist(), np.clip(knots_y, 0.0, 1.0).tolist())
