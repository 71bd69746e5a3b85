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
    """The default demo set (80 labeled + 120 unlabeled, 96 px, seed 0)."""
    return generate_demo_dataset(tmp_path_factory.mktemp("demo_default"))


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


def test_shipped_manifest_is_the_default_generation(default_demo: Path) -> None:
    shipped = json.loads(SHIPPED_MANIFEST.read_text())
    generated = json.loads(default_demo.read_text())
    assert shipped.pop("data_root") == "../runs/demo/data"
    generated.pop("data_root")
    assert shipped == generated  # includes content_sha256: the PNG bytes are reproduced too
    assert (generated["num_training"], generated["num_validation"], generated["num_test"]) == (56, 8, 16)
    assert generated["num_unlabeled"] == 120


def test_objects_vary_in_size_and_touch_borders(default_arrays: dict[str, np.ndarray]) -> None:
    masks = default_arrays["masks"] > 0
    fractions = masks.mean(axis=(1, 2))
    assert fractions.min() >= 0.01 and fractions.max() <= 0.45
    assert fractions.min() < 0.04 and fractions.max() > 0.3  # small and large objects both occur
    border = masks[:, 0].any(1) | masks[:, -1].any(1) | masks[:, :, 0].any(1) | masks[:, :, -1].any(1)
    assert 0.1 <= border.mean() <= 0.5


def test_no_single_channel_threshold_segments_the_objects(default_arrays: dict[str, np.ndarray]) -> None:
    """Best dataset-global threshold (any channel, either polarity) is far below Dice 0.8; so is a per-image oracle."""
    images, masks = default_arrays["images"], default_arrays["masks"] > 0
    count, levels = len(images), 256
    foreground = masks.reshape(count, -1).sum(axis=1)
    scores = []  # per (channel, threshold, polarity): (N,) Dice, all 255 thresholds at once from histograms
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
    scores = np.concatenate(scores)  # (3 * 2 * 255, N)
    # cross-check the histogram arithmetic on one threshold against a direct computation
    direct = _dice_per_image(images[..., 1] > 100 / 255, masks)
    np.testing.assert_allclose(scores[2 * 255 + 100], direct, rtol=1e-12)
    best_global = scores.mean(axis=1).max()
    per_image_oracle = scores.max(axis=0).mean()
    assert best_global < 0.4  # measured 0.18
    assert per_image_oracle < 0.7  # measured 0.42


def test_objects_are_learnable_from_texture(default_arrays: dict[str, np.ndarray]) -> None:
    """One global threshold on a local high-frequency energy map (the objects' granular texture) beats colour by far."""
    grey = default_arrays["images"].mean(axis=-1)
    masks = default_arrays["masks"] > 0
    high_pass = grey - gaussian_filter(grey, sigma=(0, 2, 2))
    energy = np.sqrt(gaussian_filter(high_pass**2, sigma=(0, 2, 2)))
    energy /= np.median(energy, axis=(1, 2), keepdims=True)
    best = max(_dice_per_image(energy > t, masks).mean() for t in np.quantile(energy, np.linspace(0.5, 0.99, 50)))
    assert best > 0.5  # measured 0.60 (best colour threshold: 0.18)


def test_unlabeled_pool_is_shifted(default_arrays: dict[str, np.ndarray]) -> None:
    labeled_mean = default_arrays["images"].mean(axis=(0, 1, 2))
    unlabeled_mean = default_arrays["unlabeled"].mean(axis=(0, 1, 2))
    # yellower palette: green rises by ~0.2, red by ~0.07 (measured 0.350 -> 0.563, 0.655 -> 0.726)
    assert unlabeled_mean[1] - labeled_mean[1] > 0.12
    assert unlabeled_mean[0] - labeled_mean[0] > 0.02
    # harsher illumination: larger within-image brightness spread
    spread = lambda x: x.mean(axis=-1).std(axis=(1, 2)).mean()  # noqa: E731
    assert spread(default_arrays["unlabeled"]) > spread(default_arrays["images"])
