"""The ssl_segmentation bundle: every method / network overlay trains, evaluation, inference, tracking, metadata."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.bundle import verify_metadata, verify_net_in_out
from monai.data import MetaTensor
from monai.networks.nets import AttentionUnet, SwinUNETR, UNet
from monai.utils import path_to_sqlite_uri
from PIL import Image

from qgssl_monai.data.manifest import load_split
from qgssl_monai.metrics import compute_binary_metrics
from qgssl_monai.networks.quality import load_quality_predictor
from qgssl_monai.networks.segmentation import FinalOutput, build_segmentation_network, penultimate_feature_layer
from qgssl_monai.segmentation.evaluation import PerImageMetricsWriter
from qgssl_monai.segmentation.training import latest_checkpoint
from qgssl_monai.transforms.io import get_seg_transforms
from ssl_bundle_utils import (
    CONFIGS,
    METHOD_OVERLAYS,
    NET_OVERLAYS,
    config_files,
    make_workflow,
    write_quality_checkpoint,
)

pytestmark = pytest.mark.slow

EXPECTED_METHODS = {
    "sup", "pl_t", "pl_c", "mt", "ua_mt", "ict", "cl", "cps", "qar",
    "pl_qw", "mt_qw", "ua_mt_qw", "ict_qw", "cps_qw", "cl_qw", "qar_qw",
}  # fmt: skip
QUALITY_WEIGHTED = {"pl_qw", "mt_qw", "ua_mt_qw", "ict_qw", "cps_qw", "cl_qw", "qar_qw"}


@pytest.fixture(scope="module")
def quality_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_quality_checkpoint(tmp_path_factory.mktemp("quality") / "model.pt")


def test_every_method_and_network_has_an_overlay() -> None:
    assert EXPECTED_METHODS <= set(METHOD_OVERLAYS)
    assert {"unet", "swinunetr2d", "unetpp", "attention_unet"} <= set(NET_OVERLAYS)
    for name in METHOD_OVERLAYS:  # overlays stay tiny: only the method and its hyper-parameters
        keys = set(json.loads((CONFIGS / "method" / f"{name}.json").read_text()))
        assert keys and all(k.startswith("method") for k in keys), (name, keys)


@pytest.mark.parametrize("method", sorted(EXPECTED_METHODS))
def test_method_overlay_trains_one_epoch(method: str, demo_manifest: Path, quality_ckpt: Path, tmp_path: Path) -> None:
    workflow = make_workflow(config_files(f"method/{method}"), demo_manifest, tmp_path, quality_ckpt=str(quality_ckpt))
    workflow.initialize()
    student = workflow.parser.get_parsed_content("student")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    workflow.run()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    workflow.finalize()

    assert trainer.method.name == method.replace("qar_qw", "qar+qw").replace("_", "-")
    assert trainer.state.iteration == 2 and trainer.state.epoch == 1
    changed = [k for k, v in student.state_dict().items() if v.is_floating_point() and not torch.equal(before[k], v)]
    assert changed, f"{method}: no student weight changed"
    metrics = trainer.state.metrics
    for name in ("train_loss", "train_sup_loss", "train_unsup_loss", "train_unsup_weight", "train_quality_weight_mean"):
        assert math.isfinite(metrics[name]), (method, name)
    if method in QUALITY_WEIGHTED:
        # an untrained g scores ~0.5: the weights are the predictor's output, not the neutral 1.0
        assert 0.0 < metrics["train_quality_weight_mean"] < 1.0
        # diagnostics: the weight histogram (fractions per bin) and the validation pseudo-label ranking
        assert sum(metrics[f"quality_weight_hist_{k:02d}"] for k in range(10)) == pytest.approx(1.0)
        assert metrics["val_pseudo_label_count"] >= len(load_split(demo_manifest, "validation"))
        assert 0.0 <= metrics["val_pseudo_label_dice_mean"] <= 1.0
    else:
        assert metrics["train_quality_weight_mean"] == 1.0
    if method == "sup":
        assert metrics["train_unsup_loss"] == 0.0
    if method.startswith("cl"):  # contrastive features: the UNet's last decoder block input (2 * 8 channels)
        assert (trainer.method.feature_layer, trainer.method.projection_head[0].in_channels) == ("model.2", 16 + 3)
    # best model = plain state_dict of the student; resumable checkpoint holds every piece of state
    best = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert set(best) == set(student.state_dict())
    checkpoint = torch.load(latest_checkpoint(tmp_path / "models"), weights_only=True)
    assert set(checkpoint) == {
        "network", "optimizer", "lr_scheduler", "method", "trainer", "random_state", "validation_state",
    }  # fmt: skip
    assert checkpoint["trainer"]["iteration"] == 2 and checkpoint["trainer"]["epoch_length"] == 2
    summary = json.loads((tmp_path / "eval" / "test_metrics_summary.json").read_text())
    assert summary["dice"]["n"] == len(load_split(demo_manifest, "test"))


def test_same_seed_gives_every_method_the_same_student(demo_manifest: Path, quality_ckpt: Path, tmp_path: Path) -> None:
    """Loading g (QAR, *-QW) or building peers must not change the student's initialisation or the global RNG:
    for one seed every method starts from the same weights, so method comparisons are paired."""
    students, next_draws = {}, {}
    for method in ("sup", "qar", "pl_qw", "cps"):
        workflow = make_workflow(
            config_files(f"method/{method}"), demo_manifest, tmp_path / method, quality_ckpt=str(quality_ckpt), seed=3
        )
        workflow.initialize()
        workflow.parser.get_parsed_content("train#trainer")  # method, g and peers are built with the trainer
        student = workflow.parser.get_parsed_content("student")
        students[method] = torch.cat([p.detach().flatten() for p in student.parameters()])
        next_draws[method] = torch.rand(4)
    for method in ("qar", "pl_qw", "cps"):
        assert torch.equal(students[method], students["sup"]), method
        assert torch.equal(next_draws[method], next_draws["sup"]), method
    other_seed = make_workflow(config_files("method/sup"), demo_manifest, tmp_path / "seed4", seed=4)
    other_seed.initialize()
    other = torch.cat([p.detach().flatten() for p in other_seed.parser.get_parsed_content("student").parameters()])
    assert not torch.equal(other, students["sup"])


@pytest.mark.parametrize(
    "net, expected",
    [("unet", UNet), ("swinunetr2d", SwinUNETR), ("unetpp", FinalOutput), ("attention_unet", AttentionUnet)],
)
def test_network_overlay_stacks_and_runs_one_iteration(
    net: str, expected: type, demo_manifest: Path, tmp_path: Path
) -> None:
    # CL needs the network's decoder features: the overlay stack must wire them for every network
    workflow = make_workflow(config_files("method/cl", f"net/{net}"), demo_manifest, tmp_path, epoch_length=1)
    workflow.initialize()
    student = workflow.parser.get_parsed_content("student")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    workflow.run()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    workflow.finalize()
    assert isinstance(student, expected)
    assert trainer.method.feature_layer == penultimate_feature_layer(student)[0]
    assert trainer.state.iteration == 1
    assert trainer.state.output[0]["pred"].shape == (1, 64, 64)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items() if v.is_floating_point())


def test_bf16_autocast_flag_reaches_the_engine(demo_manifest: Path, tmp_path: Path) -> None:
    workflow = make_workflow(config_files("method/sup"), demo_manifest, tmp_path, amp_dtype="bf16", epoch_length=1)
    workflow.initialize()
    workflow.run()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    workflow.finalize()
    assert trainer.autocast_dtype is torch.bfloat16
    assert math.isfinite(trainer.state.metrics["train_loss"])


def _fake_evaluator_output(pred: torch.Tensor, label: torch.Tensor, names: list[str]) -> list[dict]:
    return [
        {"pred": p, "label": l, "image": MetaTensor(torch.zeros(3, *p.shape[1:]), meta={"filename_or_obj": n})}
        for p, l, n in zip(pred, label, names)
    ]


def test_per_image_metrics_writer_exact_numbers(tmp_path: Path) -> None:
    pred = torch.zeros(2, 1, 16, 16)
    label = torch.zeros(2, 1, 16, 16)
    pred[0, 0, 2:6, 2:6] = 1  # 16 px
    label[0, 0, 2:6, 4:8] = 1  # 16 px, overlap 8 -> DSC 0.5, IoU 1/3
    pred[1, 0, 8:12, 8:12] = 1
    label[1, 0, 8:12, 8:12] = 1  # identical -> DSC 1, IoU 1, HD95 0, ASD 0
    writer = PerImageMetricsWriter(tmp_path, prefix="test")
    engine = Engine(lambda e, b: None)
    engine.state.metrics = {}
    writer.reset()
    engine.state.output = _fake_evaluator_output(pred, label, ["a.png", "b.png"])
    writer.collect(engine)
    writer.write(engine)

    rows = list(csv.DictReader(open(tmp_path / "test_metrics_per_image.csv")))
    assert [r["image"] for r in rows] == ["a.png", "b.png"]
    assert float(rows[0]["dice"]) == pytest.approx(0.5)
    assert float(rows[0]["iou"]) == pytest.approx(1 / 3)
    assert float(rows[1]["dice"]) == 1.0 and float(rows[1]["hd95"]) == 0.0 and float(rows[1]["asd"]) == 0.0
    summary = json.loads((tmp_path / "test_metrics_summary.json").read_text())
    assert summary["dice"]["mean"] == pytest.approx(0.75)
    assert summary["dice"]["se"] == pytest.approx(np.std([0.5, 1.0], ddof=1) / math.sqrt(2))
    assert summary["iou"]["n"] == 2
    assert engine.state.metrics["test_dice"] == pytest.approx(0.75)
    assert engine.state.metrics["test_iou_se"] == pytest.approx(summary["iou"]["se"])
    assert json.loads((tmp_path / "test_metrics_per_image.json").read_text())[0]["image"] == "a.png"


def _save_small_unet(path: Path, seed: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    network = build_segmentation_network("unet", size="small").eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), path)
    return network


def test_evaluate_json_matches_compute_binary_metrics(demo_manifest: Path, tmp_path: Path) -> None:
    network = _save_small_unet(tmp_path / "models" / "model.pt")
    workflow = make_workflow(config_files("evaluate"), demo_manifest, tmp_path, workflow_type="infer")
    workflow.initialize()
    workflow.run()
    workflow.finalize()

    # independent computation on the same inputs
    items = load_split(demo_manifest, "test")
    chain = get_seg_transforms(64, train=False)
    data = [chain(item) for item in items]
    with torch.no_grad():
        logits = network(torch.stack([d["image"].as_tensor() for d in data]))
    labels = torch.stack([d["label"].as_tensor() for d in data])
    expected = compute_binary_metrics((torch.sigmoid(logits) > 0.5).float(), labels)
    rows = list(csv.DictReader(open(tmp_path / "eval" / "test_metrics_per_image.csv")))
    assert [r["image"] for r in rows] == [item["image"] for item in items]
    for name in ("dice", "iou", "hd95", "asd"):
        got = np.array([float(r[name]) for r in rows])
        np.testing.assert_allclose(got, expected[name].numpy(), rtol=1e-5, atol=1e-5)
    summary = json.loads((tmp_path / "eval" / "test_metrics_summary.json").read_text())
    dice = expected["dice"].numpy().astype(float)
    assert summary["dice"]["mean"] == pytest.approx(dice.mean(), abs=1e-6)
    assert summary["dice"]["se"] == pytest.approx(dice.std(ddof=1) / math.sqrt(len(dice)), abs=1e-6)


def test_inference_json_writes_masks_at_original_size_and_quality(
    demo_manifest: Path, quality_ckpt: Path, tmp_path: Path
) -> None:
    network = _save_small_unet(tmp_path / "models" / "model.pt")
    inputs = tmp_path / "input"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"tall.png": (70, 50), "wide.jpg": (40, 90)}  # (H, W)
    for name, (height, width) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(inputs / name)
    workflow = make_workflow(
        config_files("inference"), demo_manifest, tmp_path, workflow_type="infer",
        input_dir=str(inputs), quality_ckpt=str(quality_ckpt),
    )  # fmt: skip
    workflow.initialize()
    workflow.run()
    workflow.finalize()

    out = tmp_path / "eval" / "predictions"
    records = json.loads((out / "predictions.json").read_text())
    assert [Path(r["image"]).name for r in records] == sorted(sizes)
    g = load_quality_predictor(quality_ckpt, "cpu")
    chain = get_seg_transforms(64, train=False, keys=("image",))
    for record in records:
        name = Path(record["image"]).name
        mask = np.asarray(Image.open(record["mask"]))
        assert mask.shape == sizes[name] and set(np.unique(mask)) <= {0, 255}
        assert (record["height"], record["width"]) == sizes[name]
        assert record["foreground_fraction"] == pytest.approx((mask > 0).mean())
        image = chain({"image": str(inputs / name)})["image"].as_tensor()[None]
        with torch.no_grad():
            hard = (torch.sigmoid(network(image)) > 0.5).float()
            expected_quality = float(g(torch.cat([image, hard], dim=1)))
        assert record["predicted_quality"] == pytest.approx(expected_quality, abs=1e-5)
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 2 and float(rows[0]["predicted_quality"]) == pytest.approx(records[0]["predicted_quality"])


def test_inference_without_quality_checkpoint_leaves_quality_empty(demo_manifest: Path, tmp_path: Path) -> None:
    _save_small_unet(tmp_path / "models" / "model.pt")
    inputs = tmp_path / "input"
    inputs.mkdir()
    Image.fromarray(np.full((33, 47, 3), 128, dtype=np.uint8)).save(inputs / "grey.png")
    workflow = make_workflow(
        config_files("inference"), demo_manifest, tmp_path, workflow_type="infer", input_dir=str(inputs)
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    rows = list(csv.DictReader(open(tmp_path / "eval" / "predictions" / "predictions.csv")))
    assert rows[0]["predicted_quality"] == "" and (int(rows[0]["height"]), int(rows[0]["width"])) == (33, 47)


def test_mlflow_tracking_records_params_and_metrics(demo_manifest: Path, quality_ckpt: Path, tmp_path: Path) -> None:
    workflow = make_workflow(
        config_files("method/pl_qw", "net/unet"), demo_manifest, tmp_path, tracking="mlflow",
        quality_ckpt=str(quality_ckpt), num_epochs=2, seed=7,
    )  # fmt: skip
    workflow.initialize()
    workflow.run()
    workflow.finalize()

    uri = path_to_sqlite_uri(str(tmp_path / "eval" / "mlruns.db"))
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("qgssl_ssl_segmentation")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "pl-qw_unet_seed7"
    params = run.data.params
    assert params["method"] == "pl-qw" and params["network"] == "unet" and params["seed"] == "7"
    assert params["dataset"] == "demo" and params["image_size"] == "64" and params["unsup_weight"] == "0.25"
    per_epoch = ("train_sup_loss", "train_unsup_loss", "train_unsup_weight", "train_quality_weight_mean", "val_mean_dice",
                 "quality_weight_hist_00", "val_pseudo_label_dice_mean", "val_pseudo_label_count")  # fmt: skip
    for name in per_epoch:
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == [1, 2], name
    assert 0.0 <= run.data.metrics["test_dice"] <= 1.0 and "test_hd95_se" in run.data.metrics
    summary = json.loads((tmp_path / "eval" / "test_metrics_summary.json").read_text())
    assert run.data.metrics["test_dice"] == pytest.approx(summary["dice"]["mean"])


def test_metadata_verifies_against_vendored_schema(tmp_path: Path) -> None:
    schema = CONFIGS.parents[1] / "_schema" / "meta_schema_20240725.json"
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(schema))


@pytest.mark.parametrize("net", ["unet", "swinunetr2d", "unetpp", "attention_unet"])
def test_verify_net_in_out(net: str) -> None:
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=config_files(f"net/{net}"),
        n=2,
        device="cpu",
        network_size="small",
    )


@pytest.mark.realdata
def test_inference_on_real_frames_keeps_their_original_size(
    real_data_root: Path, demo_manifest: Path, tmp_path: Path
) -> None:
    kvasir = sorted((real_data_root / "kvasir-seg" / "images").glob("*.jpg"))[:1]
    frames = [real_data_root / "cvc-clinicdb" / "images" / "1.png", *kvasir]
    frames = [f for f in frames if f.is_file()]
    if len(frames) < 2:
        pytest.skip(f"expected CVC-ClinicDB frame 1 and a Kvasir-SEG image under {real_data_root}")
    _save_small_unet(tmp_path / "models" / "model.pt")
    workflow = make_workflow(
        config_files("inference"), demo_manifest, tmp_path, workflow_type="infer", input_dir=[str(f) for f in frames]
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    records = json.loads((tmp_path / "eval" / "predictions" / "predictions.json").read_text())
    assert [r["image"] for r in records] == [str(f) for f in frames]
    for frame, record in zip(frames, records):
        with Image.open(frame) as original:
            width, height = original.size
        mask = np.asarray(Image.open(record["mask"]))
        assert mask.shape == (height, width) and set(np.unique(mask)) <= {0, 255}
    assert (records[0]["height"], records[0]["width"]) == (288, 384)  # CVC-ClinicDB frames are 384 x 288
