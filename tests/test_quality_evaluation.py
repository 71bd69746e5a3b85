"""g's data pipeline (K masks per image, fixed held-out samples) and evaluation (metrics, zeroing, plots, CSV io)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from qgssl_monai.data.manifest import load_split
from qgssl_monai.quality.data import (
    QualityPrepareBatch,
    QualityTrainingDataset,
    chain,
    degradation_transform,
    fixed_quality_samples,
)
from qgssl_monai.quality.evaluation import (
    evaluate_quality_predictor,
    image_zeroing_test,
    quality_regression_metrics,
    score_prediction_masks,
    score_segmentation_predictions,
)
from qgssl_monai.quality.io import read_pairs_csv
from qgssl_monai.transforms.io import get_seg_transforms
from qgssl_monai.transforms.weak import dice_of_masks


def test_regression_metrics_exact_values() -> None:
    true = np.array([0.2, 0.4, 0.6, 0.9])
    shifted = quality_regression_metrics(true + 0.1, true)
    assert shifted["n"] == 4
    assert shifted["mae"] == pytest.approx(0.1)
    assert shifted["rmse"] == pytest.approx(0.1)
    assert shifted["pearson"] == pytest.approx(1.0)
    assert shifted["spearman"] == pytest.approx(1.0)
    flipped = quality_regression_metrics(1 - true, true)
    assert flipped["pearson"] == pytest.approx(-1.0)
    assert flipped["mae"] == pytest.approx(np.mean(np.abs(1 - 2 * true)))
    # errors 0, 0, 0, 0.4: MAE 0.1, RMSE sqrt(0.16 / 4) = 0.2
    one_off = quality_regression_metrics([0.2, 0.4, 0.6, 0.5], true)
    assert one_off["mae"] == pytest.approx(0.1)
    assert one_off["rmse"] == pytest.approx(0.2)
    assert quality_regression_metrics([0.5, 0.5], [0.1, 0.9])["pearson"] is None
    with pytest.raises(ValueError, match="equally long"):
        quality_regression_metrics([0.1], [0.1, 0.2])


class _MaskFractionTimesImage(nn.Module):
    """A hand-built 'g': mean of mask * mean of image channel 0. Zeroing the image gives 0 exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, -1].mean(dim=(1, 2)) * x[:, 0].mean(dim=(1, 2)))[:, None]


def _hand_samples() -> list[dict]:
    samples = []
    for fraction, brightness, quality in ((0.25, 1.0, 0.5), (0.5, 0.5, 0.0), (1.0, 0.8, 0.8)):
        mask = torch.zeros(1, 4, 4)
        mask.view(-1)[: int(16 * fraction)] = 1
        samples.append({"image": torch.full((3, 4, 4), brightness), "mask": mask, "quality": torch.tensor(quality), "corruption": "single:x"})
    return samples


def test_image_zeroing_test_exact() -> None:
    # predictions: 0.25, 0.25, 0.8 vs true 0.5, 0.0, 0.8 -> MAE (0.25 + 0.25 + 0) / 3; zeroed: (0.5 + 0 + 0.8) / 3
    result = image_zeroing_test(_MaskFractionTimesImage(), _hand_samples(), batch_size=2)
    assert result["mae"] == pytest.approx(0.5 / 3)
    assert result["mae_image_zeroed"] == pytest.approx(1.3 / 3)
    assert result["mae_increase"] == pytest.approx(0.8 / 3)


def test_evaluate_writes_metrics_json_and_plots(tmp_path) -> None:
    segmentation = {"source": ["a", "a", "b"], "image": ["x", "y", "z"], "true": [0.1, 0.5, 0.9], "predicted": [0.2, 0.4, 0.7]}
    metrics = evaluate_quality_predictor(
        _MaskFractionTimesImage(), _hand_samples(), tmp_path / "eval", segmentation=segmentation, batch_size=2, extra={"seed": 3}
    )
    written = json.loads((tmp_path / "eval" / "quality_metrics.json").read_text())
    assert written["heldout_corruptions"]["mae"] == pytest.approx(0.5 / 3)
    assert written["image_zeroing"]["mae_increase"] == pytest.approx(0.8 / 3)
    assert written["heldout_by_category"]["single"]["n"] == 3
    assert written["segmentation_predictions"]["pooled"]["mae"] == pytest.approx((0.1 + 0.1 + 0.2) / 3)
    assert written["segmentation_predictions"]["by_source"]["a"]["n"] == 2
    assert written["settings"] == {"seed": 3}
    assert metrics["heldout_corruptions"]["n"] == 3
    for name in ("quality_scatter.png", "segmentation_scatter.png"):
        with Image.open(tmp_path / "eval" / name) as png:
            assert png.size[0] > 100 and png.size[1] > 100
    rows = (tmp_path / "eval" / "segmentation_scores.csv").read_text().splitlines()
    assert rows[0] == "source,image,true_dice,predicted_dice" and len(rows) == 4


def test_training_dataset_repeats_with_fresh_degradations(demo_manifest) -> None:
    datalist = load_split(demo_manifest, "training")[:3]
    load = get_seg_transforms(32, train=False, augment=False)
    degrade = degradation_transform(p_type2=0.0, flip=True, mask_pool=[d["label"] for d in datalist])
    dataset = QualityTrainingDataset(datalist, chain(load, degrade), samples_per_image=4, progress=False)
    dataset.transform.set_random_state(seed=0)
    assert len(dataset) == 12
    samples = [dataset[i] for i in range(12)]
    # items i, i+3, i+6, i+9 are the same image with (almost surely) different masks
    same_image = [samples[j] for j in (0, 3, 6, 9)]
    assert len({s["image_path"] for s in same_image}) == 1
    assert len({float(s["quality"]) for s in same_image}) > 1
    for s in samples:
        assert s["image"].shape == (3, 32, 32) and s["mask"].shape == (1, 32, 32)
        assert float(s["quality"]) == pytest.approx(dice_of_masks(s["mask"], s["label"]), abs=1e-6)
    batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples[:4]]) for k in ("image", "mask", "quality")}
    inputs, target = QualityPrepareBatch()(batch, "cpu")
    assert inputs.shape == (4, 4, 32, 32) and target.shape == (4, 1)
    torch.testing.assert_close(inputs[:, 3:], torch.stack([s["mask"].as_tensor() for s in samples[:4]]))
    with pytest.raises(ValueError, match="p_type2 > 0 needs Type 2 predictions"):
        degradation_transform(p_type2=0.05, weak_bank=None)


def test_fixed_samples_are_reproducible(demo_manifest) -> None:
    datalist = load_split(demo_manifest, "test")[:3]
    load = get_seg_transforms(32, train=False, augment=False)
    pool = [d["label"] for d in load_split(demo_manifest, "training")]
    first = fixed_quality_samples(datalist, load, degradation_transform(p_type2=0.0, mask_pool=pool), 3, seed=5, progress=False)
    second = fixed_quality_samples(datalist, load, degradation_transform(p_type2=0.0, mask_pool=pool), 3, seed=5, progress=False)
    other = fixed_quality_samples(datalist, load, degradation_transform(p_type2=0.0, mask_pool=pool), 3, seed=6, progress=False)
    assert len(first) == 9 and "label" not in first[0]
    assert [float(s["quality"]) for s in first] == [float(s["quality"]) for s in second]
    assert all(torch.equal(a["mask"], b["mask"]) for a, b in zip(first, second))
    assert [float(s["quality"]) for s in first] != [float(s["quality"]) for s in other]
    # the K samples of an image share one image tensor (memory: one image + K masks)
    assert first[0]["image"] is first[1]["image"]


class _PerfectSegmenter(nn.Module):
    """Predicts channel 0 > 0.5 of the image (logit = c0 - 0.5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] - 0.5


def test_score_segmentation_predictions_true_dice(tmp_path) -> None:
    items = []
    rng = np.random.default_rng(0)
    for i in range(3):
        image = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        label = (image[..., 0] > 100).astype(np.uint8) * 255
        Image.fromarray(image).save(tmp_path / f"i{i}.png")
        Image.fromarray(label).save(tmp_path / f"m{i}.png")
        items.append({"image": str(tmp_path / f"i{i}.png"), "label": str(tmp_path / f"m{i}.png")})
    load = get_seg_transforms(8, train=False, augment=False)
    out = score_segmentation_predictions(_MaskFractionTimesImage(), _PerfectSegmenter(), items, load, batch_size=2, progress=False)
    assert out["source"] == ["network"] * 3
    for item, true in zip(items, out["true"]):
        loaded = load(dict(item))
        expected = dice_of_masks(loaded["image"][:1] > 0.5, loaded["label"])
        assert true == pytest.approx(expected)
        assert not math.isnan(true)


def test_read_pairs_csv(tmp_path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("a.png", "sub/a_mask.png"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / name)
    (tmp_path / "pairs.csv").write_text("image,mask\na.png,sub/a_mask.png\n")
    pairs = read_pairs_csv(tmp_path / "pairs.csv")
    assert pairs == [
        {"image": str(tmp_path / "a.png"), "mask": str(tmp_path / "sub" / "a_mask.png"), "image_path": "a.png", "mask_path": "sub/a_mask.png"}
    ]
    (tmp_path / "bad.csv").write_text("image,mask\na.png,missing.png\n")
    with pytest.raises(FileNotFoundError, match="line 2: mask file not found"):
        read_pairs_csv(tmp_path / "bad.csv")
    (tmp_path / "nohead.csv").write_text("img,seg\na.png,a.png\n")
    with pytest.raises(ValueError, match="missing column"):
        read_pairs_csv(tmp_path / "nohead.csv")


def test_regression_metrics_bias_overestimation_and_auroc() -> None:
    true = np.array([0.2, 0.5, 0.75, 0.9])
    # optimistic by 0.1 everywhere except the last (exact): bias 0.075, 3 of 4 over-estimated
    predicted = np.array([0.3, 0.6, 0.85, 0.9])
    m = quality_regression_metrics(predicted, true)
    assert m["bias"] == pytest.approx(0.075)
    assert m["fraction_overestimated"] == pytest.approx(0.75)
    # good (>= 0.7): {0.85, 0.9} both above every bad score {0.3, 0.6}: AUROC 1
    assert m["auroc_dice_0_7"] == pytest.approx(1.0)
    # good scores {0.85, 0.5} vs bad {0.1, 0.6}: 3 of the 4 good/bad pairs ordered right; a tie counts 1/2
    assert quality_regression_metrics([0.1, 0.6, 0.85, 0.5], true)["auroc_dice_0_7"] == pytest.approx(0.75)
    assert quality_regression_metrics([0.6, 0.5, 0.6, 0.9], true)["auroc_dice_0_7"] == pytest.approx(3.5 / 4)
    assert quality_regression_metrics([0.5, 0.5], [0.8, 0.9])["auroc_dice_0_7"] is None  # one class only
    assert quality_regression_metrics([0.5, 0.5], [0.2, 0.9], good_dice=0.5)["auroc_dice_0_5"] == pytest.approx(0.5)


def _save_mask(path, mask: np.ndarray) -> str:
    Image.fromarray((mask > 0).astype(np.uint8) * 255).save(path)
    return str(path)


def test_score_prediction_masks_true_dice_at_native_size(tmp_path) -> None:
    rng = np.random.default_rng(0)
    items = []
    for i in range(3):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(tmp_path / f"img{i}.png")
        label = np.zeros((16, 16), bool)
        label[2:10, 2:10] = True
        items.append({"image": str(tmp_path / f"img{i}.png"), "label": _save_mask(tmp_path / f"lab{i}.png", label)})
    run_a, run_b = tmp_path / "run_a", tmp_path / "run_b"
    run_a.mkdir(), run_b.mkdir()
    # run_a: a perfect mask, a half-overlapping one (Dice 2*32/(64+64) = 0.5) and one missing (skipped)
    _save_mask(run_a / "img0_mask.png", np.asarray(Image.open(items[0]["label"])))
    half = np.zeros((16, 16), bool)
    half[2:10, 6:14] = True
    _save_mask(run_a / "img1_mask.png", half)
    # run_b: plain <stem>.png naming, an empty mask (Dice 0) saved at another size than the label
    _save_mask(run_b / "img2.png", np.zeros((8, 8), bool))
    load = get_seg_transforms(8, train=False, augment=False)
    out = score_prediction_masks(_MaskFractionTimesImage(), items, load, [run_a, run_b], progress=False)
    assert out["source"] == ["run_a", "run_a", "run_b"]
    assert out["image"] == [items[0]["image"], items[1]["image"], items[2]["image"]]
    assert out["true"] == pytest.approx([1.0, 0.5, 0.0])
    # g sees the mask at its own size: the hand-made g returns mask fraction x mean of image channel 0
    for item, name, score in zip(items, ("run_a/img0_mask.png", "run_a/img1_mask.png", "run_b/img2.png"), out["predicted"]):
        loaded = load({"image": item["image"], "label": str(tmp_path / name)})
        assert score == pytest.approx(float(loaded["label"].mean() * loaded["image"][0].mean()), abs=1e-6)
    named = score_prediction_masks(_MaskFractionTimesImage(), items, load, {"x": run_b}, progress=False)
    assert named["source"] == ["x"]
    with pytest.raises(FileNotFoundError, match="no <stem>_mask.png"):
        score_prediction_masks(_MaskFractionTimesImage(), items[:2], load, [run_b], progress=False)
