"""Out-of-fold Type 2 pool: grouped folds, provenance of every mask, cache keys, test-time views, p_type2 mix."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import run
from monai.data import MetaTensor
from test_weak_snapshots import (  # the threshold 'network': mask = image[0] > t
    _load_npy,
    _Threshold,
)

from qgssl_monai.data.manifest import ManifestError, grouped_kfold, load_split
from qgssl_monai.data.presets import item_groups
from qgssl_monai.quality.data import degradation_transform
from qgssl_monai.quality.oof import (
    load_oof_bank,
    make_folds,
    oof_index_path,
    prediction_groups,
    snapshot_epochs,
)
from qgssl_monai.quality.workflow import load_type2_bank
from qgssl_monai.transforms.io import get_seg_transforms
from qgssl_monai.transforms.weak import (
    PredictionGroup,
    TestTimePerturbation,
    WeakPredictionBank,
    dice_of_masks,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "quality_predictor" / "configs"


# ------------------------------------------------------------------------------------------- fold split
def _fold_of(folds: list[list[str]]) -> dict[str, int]:
    return {key: k for k, fold in enumerate(folds) for key in fold}


def test_grouped_kfold_keeps_groups_whole_and_is_seeded() -> None:
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 12, size=17)  # 17 groups of 1..11 items, like video sequences
    keys = [f"img{g:02d}_{i}.png" for g, n in enumerate(sizes) for i in range(n)]
    groups = [k.split("_")[0] for k in keys]

    folds = grouped_kfold(keys, 4, seed=0, groups=groups)
    assert len(folds) == 4 and sorted(k for f in folds for k in f) == sorted(keys)
    fold_of = _fold_of(folds)
    for group in set(groups):
        assert len({fold_of[k] for k, g in zip(keys, groups) if g == group}) == 1, group
    # greedy by size: no fold is more than one (largest) group away from the mean
    mean = len(keys) / 4
    assert max(abs(len(f) - mean) for f in folds) <= max(sizes)

    # same seed, shuffled input order: the same folds; another seed: other folds
    order = rng.permutation(len(keys))
    assert grouped_kfold([keys[i] for i in order], 4, seed=0, groups=[groups[i] for i in order]) == folds
    assert grouped_kfold(keys, 4, seed=1, groups=groups) != folds
    # ungrouped: items are their own groups, folds differ in size by at most one
    plain = grouped_kfold([f"{i}.png" for i in range(10)], 3, seed=0)
    assert sorted(len(f) for f in plain) == [3, 3, 4]
    with pytest.raises(ManifestError, match="cannot make 5 folds from 2 group"):
        grouped_kfold(["a", "b", "c"], 5, groups=["x", "x", "y"])


def test_item_groups_prefers_the_items_own_group() -> None:
    items = [{"image": "/d/1.png", "group": "patient-7"}, {"image": "/d/2.png"}]
    assert item_groups(items) == ["patient-7", "item:/d/2.png"]


def test_cvc_clinicdb_folds_never_split_a_video_sequence(real_data_root) -> None:
    from qgssl_monai.data.presets import cvc_clinicdb_sequence

    manifest = REPO / "data_manifests" / "cvc-clinicdb.json"
    datalist = load_split(manifest, "training", real_data_root / "cvc-clinicdb")
    groups = item_groups(datalist, manifest, real_data_root / "cvc-clinicdb")
    assert groups == [f"sequence-{cvc_clinicdb_sequence(int(Path(i['image']).stem)):02d}" for i in datalist]
    folds = make_folds(datalist, 4, seed=0, manifest=manifest, data_root=real_data_root / "cvc-clinicdb")
    fold_of = _fold_of(folds)
    sequences: dict[str, set[int]] = {}
    for item, group in zip(datalist, groups):
        sequences.setdefault(group, set()).add(fold_of[item["image"]])
    assert len(sequences) == 20 and all(len(f) == 1 for f in sequences.values())
    assert min(len(f) for f in folds) >= 80  # 431 images over 4 folds of whole sequences


def test_snapshot_epochs_span_the_schedule() -> None:
    assert snapshot_epochs(20) == [1, 3, 7, 13, 20]
    assert snapshot_epochs(100) == [5, 15, 35, 65, 100]
    assert snapshot_epochs(4) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="fractions"):
        snapshot_epochs(10, [0.0, 1.0])


# ------------------------------------------------------------------------------------------ provenance
def _npy_datalist(folder: Path, n: int, shape=(1, 8, 8)) -> list[dict]:
    rng = np.random.default_rng(0)
    datalist = []
    for i in range(n):
        path = folder / f"img{i}.npy"
        np.save(path, rng.random(shape).astype(np.float32))
        datalist.append({"image": str(path)})
    return datalist


def _hand_made_snapshots(folder: Path, n_folds: int, architectures: list[str]) -> dict[tuple[int, str], list[Path]]:
    """Fold k, architecture a, snapshot s holds t = 0.1 * (k + 1) + 0.01 * s (+ 0.005 for the 2nd architecture)."""
    snapshots = {}
    for k in range(n_folds):
        for a, arch in enumerate(architectures):
            run_dir = folder / f"fold{k}" / arch
            run_dir.mkdir(parents=True)
            paths = []
            for s in range(2):
                path = run_dir / f"weak_epoch_{s + 1:03d}.pt"
                torch.save({"t": torch.tensor([0.1 * (k + 1) + 0.01 * s + 0.005 * a])}, path)
                paths.append(path)
            snapshots[(k, arch)] = paths
    return snapshots


def test_no_out_of_fold_mask_comes_from_a_network_that_saw_the_image(tmp_path) -> None:
    datalist = _npy_datalist(tmp_path, 7)
    ids = [d["image"] for d in datalist]
    folds = [[ids[0], ids[3], ids[5]], [ids[1], ids[6]], [ids[2], ids[4]]]  # hand-made folds
    architectures = ["unet", "attention_unet"]
    snapshots = _hand_made_snapshots(tmp_path / "pool", 3, architectures)

    groups = prediction_groups(datalist, folds, snapshots, architectures, network_factory=lambda _: _Threshold())
    bank = WeakPredictionBank.from_groups(groups, _load_npy, batch_size=2, progress=False)
    assert bank.num_snapshots == 4 and sorted(bank.ids) == sorted(ids)
    assert bank.snapshot_names == [
        "unet/weak_epoch_001", "unet/weak_epoch_002", "attention_unet/weak_epoch_001", "attention_unet/weak_epoch_002",
    ]  # fmt: skip
    fold_of = _fold_of(folds)
    for image_id in ids:
        k = fold_of[image_id]
        # exactly the snapshot files of the networks of the image's own fold, i.e. trained without it
        expected = [str(p) for arch in architectures for p in snapshots[(k, arch)]]
        assert [bank.source(image_id, s) for s in range(4)] == expected
        image = np.load(image_id)
        for s, (a, snap) in enumerate((a, snap) for a in range(2) for snap in range(2)):
            np.testing.assert_array_equal(bank.get(image_id, s), image[:1] > 0.1 * (k + 1) + 0.01 * snap + 0.005 * a)

    # validation/test images (in no fold) are predicted by every fold's networks
    (tmp_path / "extra").mkdir()
    extra = _npy_datalist(tmp_path / "extra", 2)
    held = WeakPredictionBank.from_groups(
        prediction_groups(extra, folds, snapshots, architectures, out_of_fold=False, network_factory=lambda _: _Threshold()),
        _load_npy, progress=False,
    )  # fmt: skip
    assert held.num_snapshots == 12 and held.snapshot_names[0] == "fold0/unet/weak_epoch_001"
    assert {held.source(extra[0]["image"], s) for s in range(12)} == {str(p) for paths in snapshots.values() for p in paths}
    with pytest.raises(ValueError, match="in no fold"):
        prediction_groups(extra, folds, snapshots, architectures, network_factory=lambda _: _Threshold())
    with pytest.raises(ValueError, match="two prediction groups"):
        WeakPredictionBank.from_groups([groups[0], groups[0]], _load_npy, progress=False)


def test_bank_sources_survive_save_and_load(tmp_path) -> None:
    datalist = _npy_datalist(tmp_path, 3)
    snapshots = _hand_made_snapshots(tmp_path / "pool", 1, ["unet"])
    group = PredictionGroup(datalist, [("unet", _Threshold(), snapshots[(0, "unet")])])
    bank = WeakPredictionBank.from_groups([group], _load_npy, perturbation=TestTimePerturbation(seed=1), progress=False)
    loaded = WeakPredictionBank.load(bank.save(tmp_path / "bank.npz"))
    np.testing.assert_array_equal(loaded.sources, bank.sources)
    assert loaded.source(datalist[1]["image"], 1) == f"{snapshots[(0, 'unet')][0]}|tta"
    assert loaded.snapshot_names == ["unet/weak_epoch_001", "unet/weak_epoch_001/tta", "unet/weak_epoch_002", "unet/weak_epoch_002/tta"]


# ---------------------------------------------------------------------------------- test-time views
def test_test_time_perturbation_is_aligned_seeded_and_different() -> None:
    torch.manual_seed(0)
    # a smooth image: a pixel-wise network's prediction moves with the image under the warp
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    images = torch.stack([torch.sin(6 * xx) * torch.cos(4 * yy) * 0.5 + 0.5] * 3)[None].repeat(4, 1, 1, 1)
    images[1] = images[1].flip(-1)
    ids = [f"im{i}" for i in range(4)]
    net = _Threshold()
    with torch.no_grad():
        net.t.fill_(0.5)
        plain = net(images) > 0
        # flip only: the inverse warp restores the plain prediction exactly
        flip_only = TestTimePerturbation(flip_prob=1.0, brightness=0.0, contrast=0.0, scale=(1.0, 1.0))
        assert torch.equal(flip_only(net, images, ids, 0) > 0, plain)
        tta = TestTimePerturbation(seed=3)
        masks = tta(net, images, ids, 0) > 0
    agreement = (masks == plain).float().mean().item()
    assert 0.8 < agreement < 1.0  # aligned (mostly the same pixels) yet a different prediction
    assert tta.draw("im0", 0) == TestTimePerturbation(seed=3).draw("im0", 0)
    assert tta.draw("im0", 0) != tta.draw("im1", 0) and tta.draw("im0", 0) != tta.draw("im0", 1)
    flips = [tta.draw(f"x{i}", 0)[0] for i in range(400)]
    assert 160 < sum(flips) < 240  # flip_prob 0.5
    assert all(0.9 <= tta.draw(f"x{i}", 2)[1] <= 1.1 for i in range(50))


# ------------------------------------------------------------------------------------------ p_type2 mix
def _slot_bank(image_id: str, size: int = 16) -> WeakPredictionBank:
    """Four Type 2 masks of one image: empty, left quarter, left half, everything."""
    masks = np.zeros((4, size, size), dtype=bool)
    masks[1, :, : size // 4] = True
    masks[2, :, : size // 2] = True
    masks[3] = True
    return WeakPredictionBank([image_id], np.packbits(masks.reshape(4, -1), axis=1)[None], (size, size), ["o0", "o1", "o2", "o3"])


@pytest.mark.parametrize("p_type2", [0.05, 0.2, 0.4, 0.6])
def test_p_type2_sets_the_share_of_type2_masks(p_type2: float) -> None:
    label = MetaTensor(torch.zeros(1, 16, 16))
    label[0, 4:12, 2:10] = 1
    sample = {"image": MetaTensor(torch.rand(3, 16, 16)), "label": label, "image_path": "a.png"}
    transform = degradation_transform(weak_bank=_slot_bank("a.png"), p_type2=p_type2, mask_pool=[label])
    transform.set_random_state(seed=11)
    n = 2000
    kinds: Counter[str] = Counter()
    for _ in range(n):
        out = transform(dict(sample))
        kinds[out["corruption"]] += 1
        assert float(out["quality"]) == pytest.approx(dice_of_masks(out["mask"], label), abs=1e-6)
    type2 = sum(v for k, v in kinds.items() if k.startswith("weak:"))
    sd = (n * p_type2 * (1 - p_type2)) ** 0.5
    assert abs(type2 - n * p_type2) < 4 * sd, kinds
    # the Type 2 draws are spread evenly over the bank's slots (binomial(type2, 1/4), 4 sd)
    slot_sd = (type2 * 0.25 * 0.75) ** 0.5
    for slot in ("o0", "o1", "o2", "o3"):
        assert abs(kinds[f"weak:{slot}"] - type2 / 4) < 4 * slot_sd, kinds


def test_load_type2_bank_validates_its_choice(tmp_path) -> None:
    common = {"weak_dir": tmp_path / "weak", "oof_dir": tmp_path / "oof", "network": _Threshold(), "datalist": [{"image": "a"}],
              "load_transform": _load_npy, "image_size": 8}  # fmt: skip
    with pytest.raises(ValueError, match="type2 must be one of"):
        load_type2_bank("both", p_type2=0.2, **common)
    assert load_type2_bank("out_of_fold", p_type2=0.0, **common) is None
    with pytest.raises(FileNotFoundError, match="train_oof.json"):
        load_type2_bank("out_of_fold", p_type2=0.2, **common)
    with pytest.raises(FileNotFoundError, match="train_weak.json"):
        load_type2_bank("in_sample", p_type2=0.2, **common)


# ----------------------------------------------------------------------- the bundle workflow end to end
def _fold_records(oof_dir: Path) -> dict[str, set[str]]:
    """Snapshot folder -> the images its network trained on (from each fold run's record)."""
    return {str(p.parent): set(json.loads(p.read_text())["train_images"]) for p in oof_dir.glob("fold*/*/fold_run.json")}


def test_train_oof_builds_reuses_and_rebuilds_the_pool(demo_manifest, tmp_path) -> None:
    size = 32
    oof_dir = tmp_path / "models" / "oof"
    settings = {"num_folds": 2, "oof_architectures": ["unet"], "oof_epochs": 2, "snapshot_fractions": [0.5, 1.0],
                "eval_splits": ["validation"], "num_workers": 0, "batch_size": 16}  # fmt: skip

    def build(**extra) -> None:
        run(
            config_file=str(CONFIGS / "train_oof.json"),
            meta_file=str(CONFIGS / "metadata.json"),
            logging_file=str(CONFIGS / "logging.conf"),
            bundle_root=str(tmp_path),
            weak_config=str(CONFIGS / "train_weak.json"),
            dataset_dir=str(demo_manifest.parent),
            image_size=size,
            device="$torch.device('cpu')",
            **{**settings, **extra},
        )

    build()
    index = json.loads(oof_index_path(oof_dir, size).read_text())
    bank = load_oof_bank(oof_dir, size)
    training = load_split(demo_manifest, "training")
    assert sorted(bank.ids) == sorted(i["image"] for i in training)
    assert bank.num_snapshots == 4  # 1 architecture x 2 snapshots x (plain, tta)
    assert bank.spatial_shape == (size, size)
    trained_on = _fold_records(oof_dir)
    assert len(trained_on) == 2
    for image_id in bank.ids:
        for s in range(bank.num_snapshots):
            folder = str(Path(bank.source(image_id, s).split("|")[0]).parent)
            assert image_id not in trained_on[folder], (image_id, folder)
    # the two views of a snapshot are different masks for some images
    assert any(not np.array_equal(bank.get(i, 2), bank.get(i, 3)) for i in bank.ids)
    validation = load_oof_bank(oof_dir, size, "validation")
    assert validation.num_snapshots == 2 * 4 and len(validation) == len(load_split(demo_manifest, "validation"))

    # same settings: fold networks and banks are reused, not rebuilt
    stamps = {p: p.stat().st_mtime_ns for p in oof_dir.rglob("*") if p.suffix in (".pt", ".npz")}
    build()
    assert {p: p.stat().st_mtime_ns for p in oof_dir.rglob("*") if p.suffix in (".pt", ".npz")} == stamps
    assert json.loads(oof_index_path(oof_dir, size).read_text()) == index

    # other folds: new fold networks and a new training bank
    build(fold_seed=1)
    changed = json.loads(oof_index_path(oof_dir, size).read_text())
    assert changed["folds"] != index["folds"]
    assert changed["banks"]["training"] != index["banks"]["training"]
    assert (oof_dir / index["banks"]["training"]).is_file() and (oof_dir / changed["banks"]["training"]).is_file()
    rebuilt = load_oof_bank(oof_dir, size)
    trained_on = _fold_records(oof_dir)
    for image_id in rebuilt.ids:
        folder = str(Path(rebuilt.source(image_id, 0)).parent)
        assert image_id not in trained_on[folder]

    # g trains on the out-of-fold pool through train.json
    load = get_seg_transforms(size, train=False, augment=False)
    used = load_type2_bank(
        "out_of_fold", weak_dir=tmp_path / "none", oof_dir=oof_dir, network=_Threshold(), datalist=training,
        load_transform=load, image_size=size, p_type2=0.5,
    )  # fmt: skip
    np.testing.assert_array_equal(used.packed, rebuilt.packed)
    run(
        config_file=str(CONFIGS / "train.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        bundle_root=str(tmp_path),
        dataset_dir=str(demo_manifest.parent),
        image_size=size, num_workers=0, batch_size=16, max_epochs=1, samples_per_image=1, val_samples_per_image=1,
        type2="out_of_fold", p_type2=0.5, device="$torch.device('cpu')",
    )  # fmt: skip
    assert (tmp_path / "models" / "model.pt").is_file()


# -------------------------------------------------------------------------------- the experiment step
def test_experiment_runs_the_oof_step_only_when_asked(tmp_path) -> None:
    from qgssl_monai.experiments.config import ExperimentConfigError, load_experiment
    from qgssl_monai.experiments.pipeline import ExperimentPipeline

    ci = REPO / "experiments" / "ci.yaml"
    paper = load_experiment(ci)
    keys = [s.key for s in ExperimentPipeline(paper, tmp_path / "a", "sqlite:///unused.db").steps()]
    assert "quality:weak" in keys and "quality:oof" not in keys

    quality = {"weak_epochs": [1], "epochs": 1, "type2": "out_of_fold", "oof": {"num_folds": 3, "oof_epochs": 2},
               "overrides": {"p_type2": 0.4}}  # fmt: skip
    cfg = load_experiment(ci, updates={"quality": quality})
    steps = {s.key: s for s in ExperimentPipeline(cfg, tmp_path / "b", "sqlite:///unused.db").steps()}
    assert "quality:weak" not in steps
    oof, train = steps["quality:oof"], steps["quality:train"]
    assert oof.deps == ["data:prepare"] and train.deps == ["data:prepare", "quality:oof"]
    assert oof.outputs == [str((tmp_path / "b" / "quality" / "models" / "oof" / "oof_pool_32px.json").resolve())]
    assert oof.config["num_folds"] == 3 and oof.config["oof_epochs"] == 2 and set(oof.config["configs"]) == {"train_oof.json", "train_weak.json"}
    assert train.config["type2"] == "out_of_fold" and train.config["p_type2"] == 0.4
    with pytest.raises(ExperimentConfigError, match="quality.type2"):
        load_experiment(ci, updates={"quality": {**quality, "type2": "both"}})
