"""The quality_predictor bundle end to end on the demo data (CPU, 32 px), plus metadata, properties, DDP, CLI."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from PIL import Image
from monai.bundle import ConfigWorkflow, run, verify_metadata, verify_net_in_out
from monai.utils import path_to_sqlite_uri

from qgssl_monai.cli import main as qgssl_main
from qgssl_monai.data.manifest import ManifestError, load_manifest
from qgssl_monai.networks.quality import QualityPredictor, file_sha256, load_quality_predictor, write_quality_metadata
from qgssl_monai.serving.quality_check import QualityChecker

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "quality_predictor"
CONFIGS = BUNDLE / "configs"
SCHEMA = REPO / "bundles" / "_schema" / "meta_schema_20240725.json"
SIZE = 32
# tiny settings shared by every run here (demo fixture: 28 training / 4 validation / 8 test images)
TINY = {"image_size": SIZE, "num_workers": 0, "batch_size": 16}


def _bundle_run(config: str, bundle_root: Path, dataset_dir: Path, tracking: str | None = None, **override) -> None:
    run(
        config_file=str(CONFIGS / config),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        bundle_root=str(bundle_root),
        dataset_dir=str(dataset_dir),
        tracking=tracking,
        **TINY,
        **override,
    )


def test_metadata_and_network_io_verify() -> None:
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=str(CONFIGS / "inference.json"),
        bundle_root=str(BUNDLE),
        n=2,
        device="cpu",
    )
    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    assert metadata["schema"].endswith(SCHEMA.name)


def test_workflow_properties_complete(demo_manifest, tmp_path) -> None:
    """``check_properties`` resolves every property, so it runs on the demo data with tiny settings."""
    item = load_manifest(demo_manifest)["test"][0]
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"image,mask\n{demo_manifest.parent / item['image']},{demo_manifest.parent / item['label']}\n")
    for config, workflow_type, override in (
        ("train.json", "train", {"dataset_dir": str(demo_manifest.parent), "p_type2": 0.0, "samples_per_image": 1, "val_samples_per_image": 1}),
        ("inference.json", "infer", {"pairs_csv": str(pairs)}),
    ):
        if config == "inference.json":  # inference builds g from a trained checkpoint and its sidecar
            (tmp_path / "models").mkdir(exist_ok=True)
            torch.save(QualityPredictor(in_channels=4).state_dict(), tmp_path / "models" / "model.pt")
            write_quality_metadata(tmp_path / "models" / "model.pt", image_size=SIZE, image_channels=3, backbone="resnet18")
        workflow = ConfigWorkflow(
            config_file=str(CONFIGS / config),
            meta_file=str(CONFIGS / "metadata.json"),
            workflow_type=workflow_type,
            bundle_root=str(tmp_path),
            **TINY,
            **override,
        )
        workflow.initialize()
        assert workflow.check_properties() == [], config


def test_training_refuses_bad_manifest(demo_manifest, tmp_path) -> None:
    manifest = load_manifest(demo_manifest)
    manifest["training"][0]["image"] = "images/does_not_exist.png"
    manifest["data_root"] = str(demo_manifest.parent)
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps(manifest))
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        workflow_type="train",
        bundle_root=str(tmp_path),
        manifest=str(bad),
        p_type2=0.0,
        **TINY,
    )
    with pytest.raises(RuntimeError) as info:
        workflow.initialize()
    cause = info.value.__cause__
    assert isinstance(cause, ManifestError) and "does_not_exist.png" in str(cause)
    assert not (tmp_path / "models").exists()  # refused before any training


@pytest.fixture(scope="module")
def trained_bundle(demo_manifest, tmp_path_factory) -> Path:
    """weak U-Net snapshots -> g (2 epochs, K=2, p_type2 0.5, MLflow tracking) in a fresh bundle root."""
    root = tmp_path_factory.mktemp("quality_bundle")
    dataset_dir = demo_manifest.parent
    _bundle_run("train_weak.json", root, dataset_dir, weak_epochs=[1, 2])
    _bundle_run(
        "train.json", root, dataset_dir, tracking="mlflow", max_epochs=2, samples_per_image=2, val_samples_per_image=2, p_type2=0.5
    )
    return root


@pytest.mark.slow
def test_weak_then_train_with_mlflow(trained_bundle: Path) -> None:
    models = trained_bundle / "models"
    assert sorted(p.name for p in (models / "weak").glob("weak_epoch_*.pt")) == ["weak_epoch_001.pt", "weak_epoch_002.pt"]
    assert len(list((models / "weak").glob(f"weak_predictions_{SIZE}px_*.npz"))) == 1
    assert (models / "checkpoint_epoch=2.pt").is_file()
    state = torch.load(models / "model.pt", weights_only=True)
    assert "head.1.weight" in state  # a plain state_dict
    metadata = json.loads((models / "model.meta.json").read_text())  # the sidecar training wrote beside model.pt
    assert metadata["sha256"] == file_sha256(models / "model.pt") and metadata["calibration"] is None
    assert {k: metadata[k] for k in ("image_size", "image_channels", "in_channels", "backbone", "spatial_dims")} == {
        "image_size": SIZE, "image_channels": 3, "in_channels": 4, "backbone": "resnet18", "spatial_dims": 2
    }
    g = load_quality_predictor(models / "model.pt")
    assert g.image_size == (SIZE, SIZE) and g.image_channels == 3
    out = g(torch.rand(2, 4, SIZE, SIZE))
    assert out.shape == (2, 1) and torch.all((out >= 0) & (out <= 1))

    db = trained_bundle / "eval" / "mlruns.db"
    assert db.is_file()
    client = mlflow.tracking.MlflowClient(tracking_uri=path_to_sqlite_uri(str(db)))
    experiment = client.get_experiment_by_name("monai_experiment")
    runs = client.search_runs([experiment.experiment_id])
    metrics = {key for r in runs for key in r.data.metrics}
    assert {"train_loss", "val_loss", "val_mae"} <= metrics
    val_loss = [m.value for r in runs for m in client.get_metric_history(r.info.run_id, "val_loss")]
    assert len(val_loss) == 2 and all(0 <= v < 1 for v in val_loss)


@pytest.mark.slow
def test_evaluate_writes_metrics_and_scores_weak_snapshots(trained_bundle: Path, demo_manifest) -> None:
    _bundle_run("evaluate.json", trained_bundle, demo_manifest.parent, samples_per_image=2)
    out = trained_bundle / "eval"
    metrics = json.loads((out / "quality_metrics.json").read_text())
    n_test = len(load_manifest(demo_manifest)["test"])
    assert metrics["heldout_corruptions"]["n"] == 2 * n_test
    assert set(metrics["image_zeroing"]) == {"mae", "mae_image_zeroed", "mae_increase"}
    by_source = metrics["segmentation_predictions"]["by_source"]
    assert set(by_source) == {"weak_epoch_001", "weak_epoch_002"}
    assert all(v["n"] == n_test for v in by_source.values())
    assert metrics["settings"]["seed"] == 2024
    for png in ("quality_scatter.png", "segmentation_scatter.png"):
        assert (out / png).stat().st_size > 1000


@pytest.mark.slow
def test_inference_bundle_and_quality_check_cli_agree(trained_bundle: Path, demo_manifest, tmp_path, capsys) -> None:
    test_items = load_manifest(demo_manifest)["test"][:3]
    (tmp_path / "pairs").mkdir()
    for item in test_items:
        for key in ("image", "label"):
            shutil.copy(demo_manifest.parent / item[key], tmp_path / "pairs" / f"{key}_{Path(item[key]).name}")
    rows = [(f"pairs/image_{Path(i['image']).name}", f"pairs/label_{Path(i['label']).name}") for i in test_items]
    pairs_csv = tmp_path / "pairs.csv"
    pairs_csv.write_text("image,mask\n" + "".join(f"{a},{b}\n" for a, b in rows))

    _bundle_run("inference.json", trained_bundle, tmp_path, output_dir=str(tmp_path / "scores"))
    with open(tmp_path / "scores" / "quality_scores.csv", newline="") as f:
        bundle_rows = list(csv.DictReader(f))
    assert [(r["image"], r["mask"]) for r in bundle_rows] == rows
    assert len(json.loads((tmp_path / "scores" / "quality_scores.json").read_text())) == 3

    checkpoint = trained_bundle / "models" / "model.pt"
    checker = QualityChecker.from_bundle(BUNDLE, checkpoint)  # size, channels, backbone from the sidecar
    assert checker.image_size == SIZE
    direct = checker.score_files([(tmp_path / a, tmp_path / b) for a, b in rows])
    for row, score in zip(bundle_rows, direct):
        assert float(row["quality"]) == pytest.approx(score, abs=1e-5)

    # in-memory pairs already at the training size (the MONAI Label path) score the same
    loaded = checker.transform({"image": str(tmp_path / rows[0][0]), "mask": str(tmp_path / rows[0][1])})
    assert checker.score_tensors(loaded["image"], loaded["mask"][0]) == pytest.approx(direct[0], abs=1e-5)

    common = ["--bundle", str(BUNDLE), "--checkpoint", str(checkpoint), "--image-size", str(SIZE)]
    assert qgssl_main(["quality-check", "--image", str(tmp_path / rows[0][0]), "--mask", str(tmp_path / rows[0][1]), *common]) == 0
    assert float(capsys.readouterr().out.strip().splitlines()[-1]) == pytest.approx(direct[0], abs=1e-4)
    out_csv = tmp_path / "cli_scores.csv"
    assert qgssl_main(["quality-check", "--csv", str(pairs_csv), "--out", str(out_csv), *common]) == 0
    with open(out_csv, newline="") as f:
        cli_rows = list(csv.DictReader(f))
    assert [float(r["quality"]) for r in cli_rows] == pytest.approx(direct, abs=1e-5)

    # an image of another size is resized to the training size
    Image.open(tmp_path / rows[0][0]).resize((50, 41)).save(tmp_path / "odd.png")
    Image.open(tmp_path / rows[0][1]).resize((50, 41)).save(tmp_path / "odd_mask.png")
    assert 0.0 <= checker.score_file(tmp_path / "odd.png", tmp_path / "odd_mask.png") <= 1.0

    missing = ["--bundle", str(BUNDLE), "--checkpoint", str(tmp_path / "nope.pt")]
    assert qgssl_main(["quality-check", "--image", str(tmp_path / rows[0][0]), "--mask", str(tmp_path / rows[0][1]), *missing]) == 1
    assert capsys.readouterr().err.startswith(f"quality-check: checkpoint not found: {tmp_path / 'nope.pt'}; train g with:")


@pytest.mark.slow
@pytest.mark.ddp
def test_multi_gpu_overlay_runs_two_gloo_processes(demo_manifest, tmp_path) -> None:
    configs = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
        "-m", "monai.bundle", "run",
        "--config_file", configs,
        "--meta_file", str(CONFIGS / "metadata.json"),
        "--logging_file", str(CONFIGS / "logging.conf"),
        "--bundle_root", str(tmp_path),
        "--dataset_dir", str(demo_manifest.parent),
        "--image_size", str(SIZE), "--num_workers", "0", "--batch_size", "8",
        "--max_epochs", "1", "--samples_per_image", "2", "--val_samples_per_image", "1", "--p_type2", "0",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    if done.returncode != 0 and "terminate called without an active exception" in done.stdout + done.stderr:
        # Seen once in ~10 runs: a gloo rank aborts (SIGABRT) at an epoch boundary. Rerun once so a rare
        # teardown race does not fail CI; a broken overlay still fails twice. Open item: find the race.
        shutil.rmtree(tmp_path / "models", ignore_errors=True)
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    log = done.stdout + done.stderr
    # 28 images x K=2 = 56 samples split over 2 ranks -> 28 per rank -> 4 iterations of batch 8 on each
    assert "[4/4]" in log and "[7/7]" not in log
    assert log.count("Epoch[1] Metrics") == 1  # validation stats only on rank 0
    # checkpoints hold the unwrapped network: plain keys, loadable without DDP
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert "head.1.weight" in state and not any(k.startswith("module.") for k in state)
    checkpoint = torch.load(tmp_path / "models" / "checkpoint_epoch=1.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in checkpoint["network"])


@pytest.mark.slow
def test_evaluate_prediction_dirs_and_calibrate_into_sidecar(trained_bundle: Path, demo_manifest, tmp_path) -> None:
    """evaluate.json on mask files predicted beforehand; calibrate.json fits on validation and writes the sidecar."""
    manifest = load_manifest(demo_manifest)
    preds = tmp_path / "preds"
    preds.mkdir()
    for i, item in enumerate(manifest["test"]):  # true masks for even images, empty masks for odd ones
        label = Image.open(demo_manifest.parent / item["label"])
        mask = label if i % 2 == 0 else Image.new("L", label.size, 0)
        mask.convert("L").save(preds / f"{Path(item['image']).stem}_mask.png")
    _bundle_run("evaluate.json", trained_bundle, demo_manifest.parent, samples_per_image=1, prediction_dirs=[str(preds)],
                output_dir=str(tmp_path / "eval"))  # fmt: skip
    metrics = json.loads((tmp_path / "eval" / "quality_metrics.json").read_text())
    pooled = metrics["segmentation_predictions"]["pooled"]
    n_test = len(manifest["test"])
    assert pooled["n"] == n_test and pooled["mean_true"] == pytest.approx(0.5)  # Dice 1 and 0 alternate
    assert {"bias", "fraction_overestimated", "auroc_dice_0_7"} <= set(pooled)
    assert metrics["settings"]["segmentation_checkpoints"] is None

    models = trained_bundle / "models"
    weak = sorted(str(p) for p in (models / "weak").glob("weak_epoch_*.pt"))
    _bundle_run("calibrate.json", trained_bundle, demo_manifest.parent, seg_checkpoints=weak,
                seg_network_def={"_target_": "qgssl_monai.quality.workflow.weak_segmentation_network", "image_channels": 3},
                output_dir=str(tmp_path / "cal"))  # fmt: skip
    report = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert report["fit_before"]["n"] == len(weak) * len(manifest["validation"])
    assert abs(report["fit_after"]["bias"]) <= abs(report["fit_before"]["bias"]) + 1e-9
    sidecar = json.loads((models / "model.meta.json").read_text())
    assert sidecar["calibration"] == report["calibration"] and report["sidecar"] == str(models / "model.meta.json")
    (models / "model.meta.json").unlink()  # other tests of this module use the uncalibrated bundle
