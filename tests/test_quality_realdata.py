"""g learns real quality: a few epochs on 200 Kvasir-SEG images at 64 px beat chance clearly on held-out corruptions."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from monai.bundle import ConfigWorkflow

from qgssl_monai.data.manifest import load_split, write_manifest
from qgssl_monai.networks.quality import load_quality_predictor
from qgssl_monai.quality.data import degradation_transform, fixed_quality_samples
from qgssl_monai.quality.evaluation import image_zeroing_test, predict_quality, quality_regression_metrics
from qgssl_monai.transforms.io import get_seg_transforms

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "quality_predictor" / "configs"
N_TRAIN, N_VAL, N_TEST, SIZE = 160, 20, 40, 64


@pytest.mark.slow
@pytest.mark.realdata
def test_quality_predictor_learns_on_kvasir(tmp_path) -> None:
    if not DATA.is_dir():
        pytest.skip(f"real data folder {DATA} is absent")
    root = DATA / "kvasir-seg"
    images = {p.stem: p for p in (root / "images").iterdir()}
    stems = sorted(p.stem for p in (root / "masks").glob("*.png"))
    random.Random(0).shuffle(stems)
    items = [{"image": str(images[s]), "label": str(root / "masks" / f"{s}.png")} for s in stems[: N_TRAIN + N_VAL + N_TEST]]
    manifest = write_manifest(
        tmp_path / "manifest.json",
        {"training": items[:N_TRAIN], "validation": items[N_TRAIN : N_TRAIN + N_VAL], "test": items[N_TRAIN + N_VAL :]},
        data_root=root,
        name="kvasir-seg subset",
    )
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        workflow_type="train",
        bundle_root=str(tmp_path),
        manifest=str(manifest),
        image_size=SIZE,
        samples_per_image=4,
        val_samples_per_image=2,
        max_epochs=3,
        p_type2=0.0,
        num_workers=0,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()

    g = load_quality_predictor(tmp_path / "models" / "model.pt")  # settings from the sidecar training wrote
    assert (g.image_size, g.image_channels, g.backbone_name) == ((SIZE, SIZE), 3, "resnet18")
    load = get_seg_transforms(SIZE, train=False, augment=False)
    pool = [item["label"] for item in load_split(manifest, "training")]
    held_out = fixed_quality_samples(
        load_split(manifest, "test"), load, degradation_transform(p_type2=0.0, mask_pool=pool), 5, seed=2024, progress=False
    )
    predicted, true = predict_quality(g, held_out)
    metrics = quality_regression_metrics(predicted, true)
    print(f"Kvasir 64 px, 160 images x K=4 x 3 epochs: {metrics}")
    assert metrics["n"] == 200
    assert metrics["pearson"] > 0.5, metrics
    assert metrics["spearman"] > 0.4, metrics
    # g reads the image, not only the mask's shape
    assert image_zeroing_test(g, held_out)["mae_increase"] > 0.02
