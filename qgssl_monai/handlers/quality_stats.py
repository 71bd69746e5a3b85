"""``QualityWeightStatsHandler``: per-epoch distribution of the quality weights used by ``*-QW`` methods.

Collects ``engine.state.quality_weights`` (detached, set by ``SemiSupervisedTrainer`` every iteration) and at
epoch end writes to ``engine.state.metrics``: ``<prefix>_mean``, ``<prefix>_std`` (population std),
``<prefix>_zero_fraction`` (share of weights exactly 0, i.e. pseudo-labels discarded by the threshold) and
``<prefix>_count``; the histogram over ``[0, 1]`` goes to ``engine.state.quality_weight_histogram``
(``{"epoch", "counts", "edges"}``) and the engine's logger. Being scalar metrics, MONAI's ``StatsHandler``
and ``MLFlowHandler`` log them when attached *after* this handler. Nothing is recorded for methods without
quality weighting.
"""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events

__all__ = ["QualityWeightStatsHandler"]


class QualityWeightStatsHandler:
    """Summarises quality weights per epoch.

    Args:
        bins: number of histogram bins over ``[0, 1]``.
        prefix: metric name prefix.
        log: also write a one-line summary to ``engine.logger``.
    """

    def __init__(self, bins: int = 10, prefix: str = "quality_weight", log: bool = True) -> None:
        if bins < 1:
            raise ValueError(f"QualityWeightStatsHandler bins must be >= 1, got {bins}.")
        self.bins = int(bins)
        self.prefix = prefix
        self.log = log
        self._weights: list[torch.Tensor] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.summarise)

    def reset(self, engine: Engine | None = None) -> None:
        self._weights = []

    def collect(self, engine: Engine) -> None:
        weights = getattr(engine.state, "quality_weights", None)
        if weights is not None and weights.numel():
            self._weights.append(weights.detach().reshape(-1))  # stays on device: no sync per iteration

    def compute(self) -> dict[str, float | list[float]] | None:
        """Statistics of the weights collected so far, or ``None`` when there are none."""
        if not self._weights:
            return None
        weights = torch.cat(self._weights).float().cpu()
        counts = torch.histc(weights.clamp(0.0, 1.0), bins=self.bins, min=0.0, max=1.0)
        return {
            "mean": float(weights.mean()),
            "std": float(weights.std(unbiased=False)),
            "zero_fraction": float((weights == 0).float().mean()),
            "count": float(weights.numel()),
            "counts": counts.tolist(),
            "edges": torch.linspace(0.0, 1.0, self.bins + 1).tolist(),
        }

    def summarise(self, engine: Engine) -> None:
        stats = self.compute()
        if stats is None:
            return
        for key in ("mean", "std", "zero_fraction", "count"):
            engine.state.metrics[f"{self.prefix}_{key}"] = stats[key]
        engine.state.quality_weight_histogram = {
            "epoch": int(engine.state.epoch),
            "counts": stats["counts"],
            "edges": stats["edges"],
        }
        if self.log:
            engine.logger.info(
                f"epoch {engine.state.epoch} quality weights: mean {stats['mean']:.4f} std {stats['std']:.4f} "
                f"zeroed {stats['zero_fraction']:.3f} n {int(stats['count'])} histogram {stats['counts']}"
            )
