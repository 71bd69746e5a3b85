"""Quality-weight diagnostics: the weight-ranking AUROC on hand-made values, the histogram metrics, and the
validation-set pseudo-label ranking handler (replayed labels, untouched random state)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from qgssl_monai.engines import SemiSupervisedTrainer
from qgssl_monai.handlers.quality_stats import (
    PseudoLabelRankingHandler,
    QualityWeightStatsHandler,
    pseudo_label_dice,
    weight_ranking_auroc,
)
from qgssl_monai.methods import MeanTeacher
from qgssl_monai.methods.fdpl import FDPLQW
from qgssl_monai.methods.quality_weighting import QualityWeighting


def test_auroc_on_hand_made_weights_and_dice() -> None:
    weights = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    dice = [0.95, 0.50, 0.80, 0.65, 0.90, 0.10]  # good (>= 0.7): 0.95, 0.80, 0.90
    # pairs (good, bad) ranked right: 0.9 beats all 3 bad; 0.7 beats 0.6 and 0.4; 0.5 beats 0.4 -> 6 of 9
    assert weight_ranking_auroc(weights, dice, 0.7) == pytest.approx(6 / 9)
    assert weight_ranking_auroc(weights, dice, 0.7) == pytest.approx(roc_auc_score(np.array(dice) >= 0.7, weights))
    # ties count one half: one good and one bad share the weight 0.5
    assert weight_ranking_auroc([0.5, 0.5, 0.2], [0.9, 0.1, 0.2], 0.7) == pytest.approx((0.5 + 1.0) / 2)
    assert weight_ranking_auroc([0.1, 0.9], [0.9, 0.1]) == 0.0
    assert np.isnan(weight_ranking_auroc([0.1, 0.9], [0.9, 0.8]))  # no bad pseudo-label: undefined
    rng = np.random.default_rng(0)
    w, d = rng.random(200), rng.random(200)
    w[:50] = 0.0  # thresholded weights: many exact zeros
    assert weight_ranking_auroc(w, d, 0.6) == pytest.approx(roc_auc_score(d >= 0.6, w))


def test_pseudo_label_dice_per_sample() -> None:
    label = torch.zeros(3, 1, 4, 4)
    label[0, 0, :2] = 1  # 8 pixels
    label[1, 0, 0, 0] = 1
    pseudo = torch.zeros(3, 1, 4, 4)
    pseudo[0, 0, 0] = 1  # 4 pixels inside the label: 2*4 / (4+8)
    assert pseudo_label_dice(pseudo, label).tolist() == pytest.approx([8 / 12, 0.0, 1.0])  # both empty -> 1


def test_histogram_fractions_are_logged_per_bin() -> None:
    handler = QualityWeightStatsHandler(bins=4, log=False)
    handler._weights = [torch.tensor([0.0, 0.1, 0.3, 0.99, 1.0])]
    engine = type("E", (), {})()
    engine.state = type("S", (), {"metrics": {}, "epoch": 1})()
    handler.summarise(engine)
    hist = [engine.state.metrics[f"quality_weight_hist_{k:02d}"] for k in range(4)]
    assert hist == pytest.approx([0.4, 0.2, 0.0, 0.4])


class DiceOracle(nn.Module):
    """g whose 'estimate' is the exact Dice of the mask against the image channel thresholded at 0.5
    (the test images *are* their labels), optionally inverted to rank pseudo-labels backwards."""

    def __init__(self, invert: bool = False) -> None:
        super().__init__()
        self.invert = invert
        self.anchor = nn.Parameter(torch.zeros(()))  # QualityWeighting freezes parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dice = pseudo_label_dice(x[:, 1:2], x[:, :1]).reshape(-1, 1)
        return 1 - dice if self.invert else dice


def _validation(n: int = 6, size: int = 16) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    labels = (torch.rand(n, 1, size, size, generator=generator) > 0.6).float()
    labels[:, :, 4:10, 4:10] = 1.0
    return [{"image": labels[i : i + 3].clone(), "label": labels[i : i + 3].clone()} for i in range(0, n, 3)]


def _trainer(method: nn.Module, network: nn.Module, data: list) -> SemiSupervisedTrainer:
    return SemiSupervisedTrainer("cpu", 1, data, network, torch.optim.SGD(network.parameters(), 0.0),
                                 unlabeled_data_loader=data, method=method, epoch_length=1)  # fmt: skip


@pytest.mark.parametrize("kind", ["mt_qw", "fdpl_qw"])
def test_ranking_handler_scores_true_dice_of_each_pseudo_label(kind: str) -> None:
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1))
    weighting = QualityWeighting(DiceOracle())
    if kind == "mt_qw":
        method = MeanTeacher(quality_weighting=weighting)
    else:
        method = FDPLQW(quality_weighting=weighting, crop_size=8, seed=0)
    data = _validation()
    trainer = _trainer(method, network, data)
    method.setup(network)
    trainer.state.device = torch.device("cpu")
    handler = PseudoLabelRankingHandler(data, dice_threshold=0.52)
    stats = handler.score(trainer)
    # with g = true Dice, the recorded weight of every pseudo-label equals the Dice the replay measures;
    # for FDPL that needs the replay to cut the very crops (and CutMix boxes) the first pass cut
    assert np.allclose(handler.last["weights"], handler.last["dice"], atol=1e-6)
    per_batch = {"mt_qw": 3, "fdpl_qw": 4 * 3}[kind]  # MT: one weight per image; FDPL: 4 pseudo-label sets
    assert stats["count"] == 2 * per_batch
    assert stats["dice_mean"] == pytest.approx(float(np.mean(handler.last["dice"])))
    good = handler.last["dice"] >= 0.52
    assert good.any() and (~good).any()
    assert stats["auroc"] == 1.0 and stats["good_fraction"] == pytest.approx(good.mean())
    assert network.training and method.training  # modes restored


class HalfRight(nn.Module):
    """Segments images with less than 30% foreground correctly and inverts the others (Dice < 0.7 there)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sign = torch.where(x.mean(dim=(1, 2, 3), keepdim=True) < 0.3, 1.0, -1.0)
        return sign * 10 * (x - 0.5) + 0 * self.scale

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(()))


def test_ranking_handler_leaves_training_random_state_and_logs_metrics() -> None:
    network = HalfRight()
    method = MeanTeacher(quality_weighting=QualityWeighting(DiceOracle(invert=True)))
    generator = torch.Generator().manual_seed(1)
    images = torch.stack([(torch.rand(1, 16, 16, generator=generator) < p).float() for p in (0.1, 0.2, 0.6, 0.7, 0.15, 0.8)])
    data = [{"image": images[i : i + 3], "label": images[i : i + 3].clone()} for i in (0, 3)]
    trainer = _trainer(method, network, data)
    method.setup(network)
    trainer.state.device = torch.device("cpu")
    trainer.state.metrics = {}
    handler = PseudoLabelRankingHandler(data, dice_threshold=0.7)
    torch.manual_seed(7)
    np.random.seed(7)
    reference = (torch.rand(4), np.random.rand(2))
    torch.manual_seed(7)
    np.random.seed(7)
    handler(trainer)
    assert torch.equal(torch.rand(4), reference[0]) and np.array_equal(np.random.rand(2), reference[1])
    metrics = trainer.state.metrics
    assert metrics["val_pseudo_label_count"] == 6.0
    good = handler.last["dice"] >= 0.7
    assert good.tolist() == [True, True, False, False, True, False]
    assert metrics["val_pseudo_label_auroc"] == 0.0  # inverted g ranks every good pseudo-label last
    assert metrics["val_pseudo_label_good_fraction"] == pytest.approx(good.mean())


def test_ranking_handler_is_silent_without_quality_weighting() -> None:
    network = nn.Conv2d(1, 1, 1)
    method = MeanTeacher()
    data = _validation()
    trainer = _trainer(method, network, data)
    method.setup(network)
    trainer.state.device = torch.device("cpu")
    trainer.state.metrics = {}
    PseudoLabelRankingHandler(data)(trainer)
    assert trainer.state.metrics == {}
