"""Type 2 masks: the weak-snapshot saver, the prediction bank and RandWeakPredictiond."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from torch import nn

from qgssl_monai.handlers.snapshots import WeakSnapshotSaver
from qgssl_monai.transforms.weak import (
    RandWeakPredictiond,
    WeakPredictionBank,
    dice_of_masks,
    list_weak_snapshots,
    weak_snapshot_filename,
)


def test_snapshot_saver_saves_exactly_the_listed_epochs(tmp_path) -> None:
    torch.manual_seed(0)
    network = nn.Conv2d(1, 1, 1)
    data = [{"image": torch.rand(2, 1, 4, 4), "label": torch.rand(2, 1, 4, 4)} for _ in range(2)]
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=6,
        train_data_loader=data,
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1),
        loss_function=nn.MSELoss(),
        decollate=False,
        train_handlers=[WeakSnapshotSaver(tmp_path / "weak", epochs=[5, 1, 3], network=network)],
    )
    weights_after_epoch: dict[int, torch.Tensor] = {}
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: weights_after_epoch.__setitem__(e.state.epoch, network.weight.detach().clone())
    )
    trainer.run()

    assert [p.name for p in sorted((tmp_path / "weak").iterdir())] == [
        "weak_epoch_001.pt",
        "weak_epoch_003.pt",
        "weak_epoch_005.pt",
    ]
    for epoch in (1, 3, 5):
        state = torch.load(tmp_path / "weak" / weak_snapshot_filename(epoch), weights_only=True)
        torch.testing.assert_close(state["weight"], weights_after_epoch[epoch])
    # the network kept changing: the snapshots are different networks
    assert not torch.equal(weights_after_epoch[1], weights_after_epoch[5])
    assert [p.name for p in list_weak_snapshots(tmp_path / "weak")] == [
        "weak_epoch_001.pt",
        "weak_epoch_003.pt",
        "weak_epoch_005.pt",
    ]
    assert list_weak_snapshots(tmp_path / "missing") == []
    with pytest.raises(ValueError, match="1-based"):
        WeakSnapshotSaver(tmp_path, epochs=[0, 2], network=network)


def test_snapshot_listing_sorts_by_epoch(tmp_path) -> None:
    for name in ("weak_epoch_010.pt", "weak_epoch_002.pt", "weak_epoch_1.pt", "other.pt", "weak_epoch_003.pt.tmp"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_weak_snapshots(tmp_path)] == ["weak_epoch_1.pt", "weak_epoch_002.pt", "weak_epoch_010.pt"]


class _Threshold(nn.Module):
    """Logit = channel 0 - t: the hard mask is ``image[0] > t`` (a 'network' with a known prediction)."""

    def __init__(self) -> None:
        super().__init__()
        self.t = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] - self.t


def _load_npy(item: dict) -> dict:
    return {**item, "image": np.load(item["image"])}


def test_prediction_bank_predicts_once_and_caches(tmp_path) -> None:
    rng = np.random.default_rng(0)
    datalist = []
    for i in range(5):
        path = tmp_path / f"img{i}.npy"
        np.save(path, rng.random((1, 6, 5)).astype(np.float32))
        datalist.append({"image": str(path)})
    snap_dir = tmp_path / "weak"
    snap_dir.mkdir()
    for epoch, t in ((1, 0.2), (3, 0.5), (5, 0.9)):
        torch.save({"t": torch.tensor([t])}, snap_dir / weak_snapshot_filename(epoch))

    bank = WeakPredictionBank.from_snapshots(snap_dir, _Threshold(), datalist, _load_npy, 6, batch_size=2, progress=False)
    assert bank.num_snapshots == 3 and len(bank) == 5 and bank.spatial_shape == (6, 5)
    assert bank.snapshot_names == ["weak_epoch_001", "weak_epoch_003", "weak_epoch_005"]
    for item in datalist:
        image = np.load(item["image"])
        for s, t in enumerate((0.2, 0.5, 0.9)):
            np.testing.assert_array_equal(bank.get(item["image"], s), image > t)
    caches = list(snap_dir.glob("weak_predictions_6px_*.npz"))
    assert len(caches) == 1

    class _MustNotRun(nn.Module):
        def forward(self, x):  # pragma: no cover - failing the test is the point
            raise AssertionError("cached predictions should have been reused")

    cached = WeakPredictionBank.from_snapshots(snap_dir, _MustNotRun(), datalist, _load_npy, 6, progress=False)
    np.testing.assert_array_equal(cached.packed, bank.packed)
    # another image size is another cache entry
    assert WeakPredictionBank.cache_name([d["image"] for d in datalist], list_weak_snapshots(snap_dir), 8) != caches[0].name
    with pytest.raises(KeyError, match="no weak predictions cached"):
        bank.get("unknown.png", 0)
    with pytest.raises(FileNotFoundError, match="train_weak.json"):
        WeakPredictionBank.from_snapshots(tmp_path / "empty", _Threshold(), datalist, _load_npy, 6, progress=False)


def _hand_built_bank() -> WeakPredictionBank:
    """Three snapshots for one 4x4 image: empty, the top half, the whole image."""
    masks = np.zeros((3, 16), dtype=bool)
    masks[1, :8] = True
    masks[2, :] = True
    return WeakPredictionBank(["a.png"], np.packbits(masks, axis=1)[None], (4, 4), ["e1", "e3", "e5"])


def test_rand_weak_prediction_picks_snapshots_with_probability_p_weak() -> None:
    bank = _hand_built_bank()
    label = MetaTensor(torch.zeros(1, 4, 4))
    label[0, :2, :2] = 1  # 4 foreground pixels in the top half
    type1_mask = torch.ones(1, 4, 4) * 0.5
    sample = {"label": label, "mask": type1_mask, "quality": torch.tensor(0.123), "corruption": "single:dilate", "image_path": "a.png"}
    transform = RandWeakPredictiond(keys="label", bank=bank, prob=0.3)
    transform.set_random_state(seed=7)

    n = 3000
    picked: Counter[str] = Counter()
    expected_quality = {"weak:e1": 0.0, "weak:e3": 2 * 4 / (8 + 4), "weak:e5": 2 * 4 / (16 + 4)}
    for _ in range(n):
        out = transform(sample)
        picked[out["corruption"]] += 1
        if out["corruption"].startswith("weak:"):
            assert isinstance(out["mask"], MetaTensor) and out["mask"].dtype == torch.float32
            assert float(out["quality"]) == pytest.approx(expected_quality[out["corruption"]])
            assert float(out["quality"]) == pytest.approx(dice_of_masks(out["mask"], label))
        else:
            assert out["mask"] is type1_mask and float(out["quality"]) == pytest.approx(0.123)
    weak = n - picked["single:dilate"]
    # binomial(3000, 0.3): mean 900, sd 25 -> a 4 sd band
    assert 800 < weak < 1000, picked
    # each of the three snapshots gets about a third of the weak draws (sd ~ 14)
    for name in expected_quality:
        assert abs(picked[name] - weak / 3) < 60, picked

    # reproducible: same seed, same draws
    replay = RandWeakPredictiond(keys="label", bank=bank, prob=0.3)
    replay.set_random_state(seed=7)
    transform.set_random_state(seed=7)
    assert [replay(sample)["corruption"] for _ in range(50)] == [transform(sample)["corruption"] for _ in range(50)]


def test_rand_weak_prediction_rejects_wrong_size_and_missing_bank() -> None:
    transform = RandWeakPredictiond(keys="label", bank=_hand_built_bank(), prob=1.0)
    with pytest.raises(ValueError, match="rebuild the WeakPredictionBank"):
        transform({"label": torch.zeros(1, 8, 8), "image_path": "a.png"})
    with pytest.raises(ValueError, match="needs a WeakPredictionBank"):
        RandWeakPredictiond(keys="label", bank=None)


def test_bank_save_load_roundtrip(tmp_path) -> None:
    bank = _hand_built_bank()
    loaded = WeakPredictionBank.load(bank.save(tmp_path / "bank.npz"))
    assert loaded.snapshot_names == bank.snapshot_names and loaded.spatial_shape == (4, 4)
    for s in range(3):
        np.testing.assert_array_equal(loaded.get("a.png", s), bank.get("a.png", s))
    assert not list(tmp_path.glob("*.tmp*"))


def test_dice_of_masks_convention() -> None:
    empty = np.zeros((1, 3, 3))
    assert dice_of_masks(empty, empty) == 1.0
    a = np.zeros((1, 3, 3))
    a[0, 0] = 1
    b = np.zeros((1, 3, 3))
    b[0, 0, :2] = 1
    assert dice_of_masks(a, b) == pytest.approx(2 * 2 / (3 + 2))
    assert dice_of_masks(a, empty) == 0.0
