"""Figures for the quality predictor (matplotlib, headless)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_quality_scatter"]


def plot_quality_scatter(
    true_dice: np.ndarray,
    predicted: np.ndarray,
    path: str | os.PathLike,
    *,
    pearson: float | None = None,
    mae: float | None = None,
    bias: float | None = None,
    auroc: float | None = None,
    good_dice: float | None = None,
    groups: Sequence[str] | None = None,
    title: str = "Quality predictor",
) -> Path:
    """Scatter of predicted vs true Dice with the identity line; Pearson rho, MAE, bias and AUROC in the title.

    Args:
        true_dice, predicted: ``(N,)`` values in ``[0, 1]``.
        path: output PNG (parent folders are created).
        good_dice: draws the "good pseudo-label" threshold (true and predicted Dice) as dotted lines.
        groups: ``(N,)`` labels (e.g. the source network): one colour per group, with a legend (up to 12
            groups; more are drawn in one colour).
    """
    true_dice = np.asarray(true_dice, dtype=float).ravel()
    predicted = np.asarray(predicted, dtype=float).ravel()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    if groups is None or len(set(groups)) > 12:
        ax.scatter(true_dice, predicted, s=6, alpha=0.5, edgecolors="none")
    else:
        labels = np.asarray([str(g) for g in groups])
        for name in sorted(set(labels)):
            keep = labels == name
            ax.scatter(true_dice[keep], predicted[keep], s=6, alpha=0.5, edgecolors="none", label=name)
    if good_dice is not None:
        ax.axvline(good_dice, color="grey", linewidth=0.8, linestyle=":")
        ax.axhline(good_dice, color="grey", linewidth=0.8, linestyle=":")
    ax.plot([0, 1], [0, 1], color="black", linewidth=1, linestyle="--", label="identity")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("true Dice")
    ax.set_ylabel("predicted Dice")
    stats = []
    if pearson is not None:
        stats.append(f"ρ = {pearson:.3f}")
    if mae is not None:
        stats.append(f"MAE = {mae:.3f}")
    if bias is not None:
        stats.append(f"bias = {bias:+.3f}")
    if auroc is not None:
        stats.append(f"AUROC = {auroc:.3f}")
    ax.set_title(title + ("\n" + ", ".join(stats) if stats else ""), fontsize=9)
    ax.legend(loc="upper left", fontsize=6 if groups is not None else 8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
