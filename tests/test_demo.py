"""The synthetic demo data set: layout, manifest, determinism, difficulty, learnability, shifted pool."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from qgssl_monai.data.demo import generate_demo_dataset
from qgssl_monai.data.manifest import load_split
from qgssl_monai.experiments.cli import DEMO_DATA_DIR, default_demo_experiment, demo_data_settings
from qgssl_monai.experiments.config import load_experiment

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MANIFEST = REPO / "data_manifests" / "demo.json"


def _load_rgb(paths: list[Path]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in paths]).astype(np.float64) / 255.0


def _dice_per_image(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N,) Dice (1 when both empty)."""
    inter = (pred & label).sum(axis=(1, 2))
    total = pred.sum(axis=(1, 2)) + label.sum(axis=(1, 2))
    return np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)


@pytest.fixture(scope="module")
def default_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The set ``make demo`` generates (experiments/demo.yaml's ``demo_data``: 100 labeled + 100 unlabeled, 64 px)."""
    settings = demo_data_settings(load_experiment(default_demo_experiment()))
    return generate_demo_dataset(tmp_path_factory.mktemp("demo_default") / DEMO_DATA_DIR, **settings)


@pytest.fixture(scope="module")
def default_arrays(default_demo: Path) -> dict[str, np.ndarray]:
    labeled = [e for split in ("training", "validation", "test") for e in load_split(default_demo, split)]
    return {
        "images": _load_rgb([Path(e["image"]) for e in labeled]),
        "masks": np.stack([np.asarray(Image.open(e["label"])) for e in labeled]),
        "unlabeled": _load_rgb([Path(e["image"]) for e in load_split(default_demo, "unlabeled")]),
    }


def test_fixture_layout_and_manifest(demo_manifest: Path, demo_root: Path) -> None:
    content = json.loads(demo_manifest.read_text())
    assert demo_manifest == demo_root / "manifest.json"
    assert content["name"] == "demo" and content["split_seed"] == 0 and content["split_rule"]
    counts = [content[f"num_{split}"] for split in ("training", "validation", "test", "unlabeled")]
    assert counts == [28, 4, 8, 40]
    assert content["generator"] == {"n_labeled": 40, "n_unlabeled": 40, "image_size": 64, "seed": 0}
    labeled = [e for split in ("training", "validation", "test") for e in content[split]]
    assert len({e["image"] for e in labeled}) == 40  # splits are disjoint and cover every pair
    for entry in labeled:
        assert not Path(entry["image"]).is_absolute() and entry["image"].startswith("images/")
        assert entry["label"] == entry["image"].replace("images/", "masks/")
    training = load_split(demo_manifest, "training")
    image = Image.open(training[0]["image"])
    mask = np.asarray(Image.open(training[0]["label"]))
    assert image.mode == "RGB" and image.size == (64, 64)
    assert mask.shape == (64, 64) and set(np.unique(mask).tolist()) <= {0, 255}
    unlabeled = load_split(demo_manifest, "unlabeled")
    assert len(unlabeled) == 40 and all("label" not in e and Path(e["image"]).is_file() for e in unlabeled)


def test_byte_identical_for_a_seed_and_different_for_another(tmp_path: Path) -> None:
    settings = {"n_labeled": 4, "n_unlabeled": 2, "image_size": 32}
    first = generate_demo_dataset(tmp_path / "a", seed=3, **settings)
    second = generate_demo_dataset(tmp_path / "b", seed=3, **settings)
    other = generate_demo_dataset(tmp_path / "c", seed=4, **settings)
    files = sorted(p.relative_to(first.parent) for p in first.parent.rglob("*.png"))
    assert len(files) == 4 + 4 + 2
    for rel in files:
        assert (first.parent / rel).read_bytes() == (second.parent / rel).read_bytes(), rel
    assert first.read_text() == second.read_text()
    assert json.loads(other.read_text())["content_sha256"] != json.loads(first.read_text())["content_sha256"]
    assert (first.parent / files[0]).read_bytes() != (other.parent / files[0]).read_bytes()


def test_sample_does_not_depend_on_count(tmp_path: Path) -> None:
    small = generate_demo_dataset(tmp_path / "small", n_labeled=3, n_unlabeled=1, image_size=32)
    large = generate_demo_dataset(tmp_path / "large", n_labeled=5, n_unlabeled=2, image_size=32)
    for rel in ("images/demo_002.png", "masks/demo_002.png", "unlabeled/unlabeled_000.png"):
        assert (small.parent / rel).read_bytes() == (large.parent / rel).read_bytes()
    # regenerating a smaller set in place removes the surplus samples of the larger one
    (large.parent / "images" / "notes_1.png").write_bytes(b"kept")  # not a demo file name
    generate_demo_dataset(large.parent, n_labeled=3, n_unlabeled=1, image_size=32)
    expected = ["demo_000.png", "demo_001.png", "demo_002.png", "notes_1.png"]
    assert sorted(p.name for p in (large.parent / "images").iterdir()) == expected
    assert sorted(p.name for p in (large.parent / "unlabeled").iterdir()) == ["unlabeled_000.png"]


@pytest.mark.parametrize(
    "kwargs", [{"n_labeled": 2}, {"n_unlabeled": -1}, {"image_size": 8}], ids=["too-few", "negative", "too-small"]
)
def test_rejects_bad_settings(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        generate_demo_dataset(tmp_path, **kwargs)


def test_shipped_manifest_is_what_make_demo_writes(default_demo: Path) -> None:
    """data_manifests/demo.json = the manifest of ``make demo`` (``demo-job --out runs/demo``), bytes of the PNGs included."""
    assert "demo-job --out runs/demo" in (REPO / "Makefile").read_text()
    shipped = json.loads(SHIPPED_MANIFEST.read_text())
    generated = json.loads(default_demo.read_text())
    shipped_root = (SHIPPED_MANIFEST.parent / shipped.pop("data_root")).resolve()
    assert shipped_root == REPO / "runs" / "demo" / DEMO_DATA_DIR
    generated.pop("data_root")
    # includes content_sha256: the PNG bytes are reproduced too
    assert shipped == generated, (
        "data_manifests/demo.json is stale; after `qgssl demo-data --out runs/demo/demo_data`, copy "
        "runs/demo/demo_data/manifest.json there with data_root set to ../runs/demo/demo_data"
    )
    assert (generated["num_training"], generated["num_validation"], generated["num_test"]) == (70, 10, 20)
    assert generated["num_unlabeled"] == 100
    assert generated["generator"] == {"n_labeled": 100, "n_unlabeled": 100, "image_size": 64, "seed": 0}


def test_objects_vary_in_size_and_touch_borders(default_arrays: dict[str, np.ndarray]) -> None:
    masks = default_arrays["masks"] > 0
    fractions = masks.mean(axis=(1, 2))
    assert fractions.min() >= 0.01 and fractions.max() <= 0.4
    assert fractions.min() < 0.05 and fractions.max() > 0.25  # small and large polyps both occur
    border = masks[:, 0].any(1) | masks[:, -1].any(1) | masks[:, :, 0].any(1) | masks[:, :, -1].any(1)
    assert 0.1 <= border.mean() <= 0.5


def _threshold_dice(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(3 channels * 2 polarities * 255 thresholds, N) Dice of ``channel > t`` / ``channel <= t``, t = 0..254, from histograms."""
    count, levels = len(images), 256
    foreground = masks.reshape(count, -1).sum(axis=1)
    scores = []
    for channel in range(3):
        values = np.round(images[..., channel] * 255).astype(np.int64).reshape(count, -1)
        offsets = np.arange(count)[:, None] * levels
        fg_hist = np.bincount((values + offsets)[masks.reshape(count, -1)], minlength=count * levels)
        all_hist = np.bincount((values + offsets).ravel(), minlength=count * levels)
        # pixels with value > t for t = 0..254: reverse cumulative sums
        fg_above = np.cumsum(fg_hist.reshape(count, levels)[:, ::-1], axis=1)[:, ::-1][:, 1:]
        all_above = np.cumsum(all_hist.reshape(count, levels)[:, ::-1], axis=1)[:, ::-1][:, 1:]
        pixels = values.shape[1]
        for true_pos, predicted in ((fg_above, all_above), (foreground[:, None] - fg_above, pixels - all_above)):
            denominator = predicted + foreground[:, None]
            scores.append(np.where(denominator > 0, 2.0 * true_pos / np.maximum(denominator, 1), 1.0).T)
    return np.concatenate(scores)


def test_no_single_channel_threshold_segments_the_polyps(default_arrays: dict[str, np.ndarray]) -> None:
    """Exposure, illumination, folds and reddish patches: the best dataset-global threshold of any channel stays low."""
    images, masks = default_arrays["images"], default_arrays["masks"] > 0
    scores = _threshold_dice(images, masks)
    # cross-check the histogram arithmetic on one threshold against a direct computation
    direct = _dice_per_image(images[..., 1] > 100 / 255, masks)
    np.testing.assert_allclose(scores[2 * 255 + 100], direct, rtol=1e-12)
    all_foreground = _dice_per_image(np.ones_like(masks), masks).mean()
    best_global = scores.mean(axis=1).max()
    per_image_oracle = scores.max(axis=0).mean()
    assert all_foreground < 0.3  # measured 0.238
    assert best_global < 0.5  # measured 0.467
    assert per_image_oracle < 0.85  # measured 0.784 (the threshold chosen with the label of each image)


def _local_features(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) RGB -> (N, H, W, 5): log-chromaticity R/G and G/B relative to the image median (raw and smoothed,
    illumination cancels in the ratios) and log local high-frequency energy relative to the image median (texture)."""
    log = np.log(images + 0.02)
    ratios = [log[..., 0] - log[..., 1], log[..., 1] - log[..., 2]]
    ratios = [r - np.median(r, axis=(1, 2), keepdims=True) for r in ratios]
    luma = log.mean(axis=-1)
    high_pass = luma - gaussian_filter(luma, sigma=(0, 1.5, 1.5))
    energy = np.sqrt(gaussian_filter(high_pass**2, sigma=(0, 2, 2)))
    energy = np.log(energy / np.median(energy, axis=(1, 2), keepdims=True))
    smoothed = [gaussian_filter(r, sigma=(0, 2, 2)) for r in ratios]
    return np.stack([*ratios, *smoothed, energy], axis=-1)


def test_polyps_are_learnable_from_local_colour_and_texture(default_demo: Path) -> None:
    """A per-pixel logistic regression on five local features, fit on the training split, segments the test split."""

    def arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
        entries = load_split(default_demo, split)
        masks = np.stack([np.asarray(Image.open(e["label"])) > 0 for e in entries])
        return _local_features(_load_rgb([Path(e["image"]) for e in entries])), masks

    (train_x, train_y), (test_x, test_y) = arrays("training"), arrays("test")
    design = np.concatenate([train_x.reshape(-1, 5), np.ones((train_y.size, 1))], axis=1)
    target = train_y.reshape(-1).astype(np.float64)
    weights = np.zeros(design.shape[1])
    for _ in range(25):  # Newton steps (iteratively reweighted least squares)
        prob = 1.0 / (1.0 + np.exp(-design @ weights))
        hessian = design.T @ (design * (prob * (1.0 - prob) + 1e-6)[:, None]) + 1e-3 * np.eye(design.shape[1])
        weights += np.linalg.solve(hessian, design.T @ (target - prob))
    test_design = np.concatenate([test_x, np.ones((*test_x.shape[:-1], 1))], axis=-1)
    dice = _dice_per_image(test_design @ weights > 0, test_y).mean()
    assert dice > 0.8, dice  # measured 0.909 (best global single-channel threshold: 0.467)


def test_unlabeled_pool_is_shifted(default_arrays: dict[str, np.ndarray]) -> None:
    labeled_mean = default_arrays["images"].mean(axis=(0, 1, 2))
    unlabeled_mean = default_arrays["unlabeled"].mean(axis=(0, 1, 2))
    # yellower palette: green rises by ~0.16, red by ~0.04 (measured 0.359 -> 0.521, 0.662 -> 0.702)
    assert unlabeled_mean[1] - labeled_mean[1] > 0.1
    assert unlabeled_mean[0] - labeled_mean[0] > 0.02
    # harsher illumination: larger within-image brightness spread
    spread = lambda x: x.mean(axis=-1).std(axis=(1, 2)).mean()  # noqa: E731
    assert spread(default_arrays["unlabeled"]) > spread(default_arrays["images"])
