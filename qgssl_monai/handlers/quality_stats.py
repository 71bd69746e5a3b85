"""Diagnostics of quality weighting (``*-QW`` methods, QAR+QW), logged per epoch as scalar metrics.

``QualityWeightStatsHandler``: the distribution of the weights used in training. Collects
``engine.state.quality_weights`` (detached, set by ``SemiSupervisedTrainer`` every iteration) and at epoch end
writes to ``engine.state.metrics``: ``<prefix>_mean``, ``<prefix>_std`` (population std),
``<prefix>_zero_fraction`` (share of weights exactly 0, i.e. pseudo-labels discarded by the threshold),
``<prefix>_count`` and the histogram over ``[0, 1]`` as fractions of the weights per bin,
``<prefix>_hist_00`` ... ``<prefix>_hist_<bins-1>`` (bin ``k`` = ``[k/bins, (k+1)/bins)``, the last bin closed);
the counts also go to ``engine.state.quality_weight_histogram`` (``{"epoch", "counts", "edges"}``).

``PseudoLabelRankingHandler``: how well the weights rank pseudo-labels. At epoch end it passes the labeled
validation images through the method's unsupervised branch and scores every pseudo-label g weighted
against the true label: ``<prefix>_auroc`` = AUROC of the weight for "the pseudo-label's true Dice >=
``dice_threshold``" (:func:`weight_ranking_auroc`), ``<prefix>_dice_mean``, ``<prefix>_good_fraction``,
``<prefix>_count``.

Both write scalar metrics, so MONAI's ``StatsHandler`` and ``MLFlowHandler`` log them (one value per epoch)
when attached *after* these handlers. Nothing is recorded for methods without quality weighting.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import Tensor

__all__ = ["PseudoLabelRankingHandler", "QualityWeightStatsHandler", "pseudo_label_dice", "weight_ranking_auroc"]

logger = logging.getLogger(__name__)


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
        total = max(sum(stats["counts"]), 1.0)
        for k, count in enumerate(stats["counts"]):
            engine.state.metrics[f"{self.prefix}_hist_{k:02d}"] = float(count) / total
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


def weight_ranking_auroc(weights: Iterable[float], dice: Iterable[float], threshold: float = 0.7) -> float:
    """AUROC of ``weights`` as a score for "``dice >= threshold``" (a good pseudo-label).

    The Mann-Whitney form: the probability that a good pseudo-label gets a larger weight than a bad one,
    ties counting one half (``(R_good - n_good (n_good + 1) / 2) / (n_good n_bad)`` with mid-ranks
    ``scipy.stats.rankdata``), equal to ``sklearn.metrics.roc_auc_score(dice >= threshold, weights)``.

    Returns:
        AUROC in ``[0, 1]`` (0.5: weights do not rank at all); nan when every pseudo-label is good or every
        one is bad.
    """
    from scipy.stats import rankdata

    scores = np.asarray(list(weights), dtype=float)
    good = np.asarray(list(dice), dtype=float) >= threshold
    if scores.shape != good.shape:
        raise ValueError(f"got {scores.size} weights for {good.size} Dice values.")
    n_good, n_bad = int(good.sum()), int((~good).sum())
    if n_good == 0 or n_bad == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[good].sum() - n_good * (n_good + 1) / 2.0) / (n_good * n_bad))


def pseudo_label_dice(pseudo_label: Tensor, label: Tensor) -> Tensor:
    """Per-sample Dice of hard masks, ``(B, 1, *S)`` each thresholded at 0.5 -> ``(B,)``; 1 when both are empty."""
    p = (pseudo_label > 0.5).flatten(1).float()
    t = (label > 0.5).flatten(1).float()
    inter, total = (p * t).sum(1), p.sum(1) + t.sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1e-12), torch.ones_like(total))


class _QualityCallRecorder:
    """Records ``(image, mask, weight)`` of every ``QualityWeighting.quality`` call while active."""

    def __init__(self, modules: list[Any]) -> None:
        self.modules = modules
        self.calls: list[tuple[Tensor, Tensor, Tensor]] = []

    @contextmanager
    def active(self) -> Iterator[list[tuple[Tensor, Tensor, Tensor]]]:
        self.calls = []
        for module in self.modules:
            original = type(module).quality.__get__(module)

            def record(image: Tensor, mask: Tensor, _original: Any = original, _module: Any = module) -> Tensor:
                quality = _original(image, mask)
                weight = _module.weights_from_quality(quality)
                self.calls.append((image.detach(), mask.detach(), weight.detach().float()))
                return quality

            module.quality = record  # instance attribute shadows the method while recording
        try:
            yield self.calls
        finally:
            for module in self.modules:
                module.__dict__.pop("quality", None)


class PseudoLabelRankingHandler:
    """Per epoch: does g's weight rank pseudo-labels by their true Dice? Measured on labeled validation images.

    At the end of every ``interval``-th epoch each validation batch ``(x, y)`` is fed to the method's
    ``unsupervised_loss`` as the unlabeled batch (student and method in eval mode, no gradients), and every
    ``(image, pseudo-label, weight)`` the method hands to its :class:`QualityWeighting` is recorded. The true
    label of each recorded image comes from a replay: the same call is run again from the same random
    state with ``y`` (repeated over the image channels) in place of ``x``, so whatever the method did to the
    image on its way to g (FDPL crops, CutMix) is done to the label as well; the replayed image's first
    channel thresholded at 0.5 is the label. The random state (torch, numpy, python and every ``R``
    ``RandomState`` of the method) is restored afterwards, so training is unaffected.

    Args:
        data_loader: labeled validation loader (dict batches with ``image_key``/``label_key``).
        dice_threshold: a pseudo-label is *good* when its true Dice >= this (default 0.7).
        interval: run every ``interval`` epochs.
        prefix: metric name prefix.
        image_key, label_key: batch keys.
        max_batches: stop after this many batches (None: the whole loader).
    """

    def __init__(
        self,
        data_loader: Iterable,
        dice_threshold: float = 0.7,
        interval: int = 1,
        prefix: str = "val_pseudo_label",
        image_key: str = "image",
        label_key: str = "label",
        max_batches: int | None = None,
    ) -> None:
        if not 0.0 < dice_threshold <= 1.0:
            raise ValueError(f"dice_threshold must be in (0, 1], got {dice_threshold}.")
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}.")
        self.data_loader = data_loader
        self.dice_threshold = float(dice_threshold)
        self.interval = int(interval)
        self.prefix = prefix
        self.image_key = image_key
        self.label_key = label_key
        self.max_batches = max_batches
        #: the last scoring's raw values: ``{"weights": (N,), "dice": (N,)}`` numpy arrays, one per pseudo-label
        self.last: dict[str, np.ndarray] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    @staticmethod
    def _random_states(method: torch.nn.Module) -> tuple[Any, ...]:
        generators = [m.R for m in method.modules() if isinstance(getattr(m, "R", None), np.random.RandomState)]
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        return (torch.get_rng_state(), cuda, np.random.get_state(), random.getstate(),
                [(g, g.get_state()) for g in generators])  # fmt: skip

    @staticmethod
    def _restore(states: tuple[Any, ...]) -> None:
        torch_state, cuda, numpy_state, python_state, generators = states
        torch.set_rng_state(torch_state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(numpy_state)
        random.setstate(python_state)
        for generator, state in generators:
            generator.set_state(state)

    def score(self, engine: Any) -> dict[str, float] | None:
        """``(weights, true Dice)`` statistics over the validation set, or None without quality weighting."""
        from qgssl_monai.methods.base import StepContext
        from qgssl_monai.methods.quality_weighting import QualityWeighting

        method, student = engine.method, engine.network
        weighting = [m for m in method.modules() if isinstance(m, QualityWeighting)]
        if not weighting:
            return None
        recorder = _QualityCallRecorder(weighting)
        device = engine.state.device
        modes = (student.training, method.training)
        student.eval()
        method.eval()
        weights: list[Tensor] = []
        dice: list[Tensor] = []
        states = self._random_states(method)
        try:
            with torch.no_grad():
                for index, batch in enumerate(self.data_loader):
                    if self.max_batches is not None and index >= self.max_batches:
                        break
                    image = batch[self.image_key].to(device).float()
                    label = (batch[self.label_key].to(device) > 0.5).float()
                    runs = []
                    for inputs in (image, label.expand(-1, image.shape[1], *label.shape[2:]).contiguous()):
                        self._restore(states)
                        context = StepContext(
                            engine=engine, student=student, image_l=image, label_l=label, logits_l=student(image),
                            image_u=inputs, sup_loss_fn=engine.loss_function,
                        )  # fmt: skip
                        with recorder.active() as calls:
                            method.unsupervised_loss(context)
                        runs.append(list(calls))
                    states = self._random_states(method)  # continue the stream: the next batch draws anew
                    seen, replay = runs
                    if len(seen) != len(replay) or any(a[1].shape != b[1].shape for a, b in zip(seen, replay)):
                        logger.warning("pseudo-label replay diverged from the recorded calls; batch %d skipped", index)
                        continue
                    for (_, mask, weight), (label_image, _, _) in zip(seen, replay):
                        weights.append(weight.reshape(-1).cpu())
                        dice.append(pseudo_label_dice(mask, label_image[:, :1]).cpu())
        finally:
            student.train(modes[0])
            method.train(modes[1])
        if not weights:
            return None
        w, d = torch.cat(weights).numpy(), torch.cat(dice).numpy()
        self.last = {"weights": w, "dice": d}
        return {
            "auroc": weight_ranking_auroc(w, d, self.dice_threshold),
            "dice_mean": float(d.mean()),
            "good_fraction": float((d >= self.dice_threshold).mean()),
            "weight_mean": float(w.mean()),
            "count": float(d.size),
        }

    def __call__(self, engine: Engine) -> None:
        outer = self._random_states(engine.method)  # type: ignore[attr-defined]
        try:
            stats = self.score(engine)
        finally:
            self._restore(outer)  # training continues from exactly the random state it had
        if stats is None:
            return
        for key, value in stats.items():
            if np.isfinite(value):
                engine.state.metrics[f"{self.prefix}_{key}"] = value
