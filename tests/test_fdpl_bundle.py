"""FDPL / FDPL-QW bundle overlays stack with every network overlay: config parse + one training iteration.

2D: ``train.json`` + ``net/<net>.json`` + ``method/fdpl[_qw].json`` on the demo set (64 px, small nets).
3D: ``train.json`` + ``train_3d.json`` + ``net/{unet3d,vnet3d}.json`` + ``method/fdpl[_qw].json`` on synthetic
32^3 volumes (patch 32^3, sliding-window validation inferer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer

from qgssl_monai.losses import PerSampleDiceBCELoss
from qgssl_monai.methods.fdpl import FDPL, FDPLQW
from qgssl_monai.networks.quality import QualityPredictor, write_quality_metadata

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "ssl_segmentation" / "configs"
NETS_2D = ("unet", "swinunetr2d", "unetpp", "attention_unet")


def _quality_checkpoint(folder: Path, in_channels: int, spatial_dims: int) -> Path:
    torch.manual_seed(0)
    path = folder / f"quality_{spatial_dims}d.pt"
    torch.save(QualityPredictor(in_channels=in_channels, spatial_dims=spatial_dims).state_dict(), path)
    write_quality_metadata(path, image_size=32, image_channels=in_channels - 1, backbone="resnet18", spatial_dims=spatial_dims)
    return path


def _configs(*names: str) -> list[Path]:
    """Config files of the SSL bundle, in stacking order (later files override earlier keys)."""
    return [CONFIGS / name for name in names]


def _parse(files: list[Path], overrides: dict[str, Any]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    for key, value in overrides.items():
        parser[key] = value
    return parser


def _run_one_iteration(parser: ConfigParser) -> tuple[Any, list[torch.Tensor], list[torch.Tensor]]:
    method = parser.get_parsed_content("method")
    student = parser.get_parsed_content("student")
    trainer = parser.get_parsed_content("train#trainer")
    before_a = [p.detach().clone() for p in student.parameters()]
    before_b = [p.detach().clone() for p in method.peer.parameters()]
    trainer.run()
    assert trainer.state.iteration == 1
    changed_a = sum(not torch.equal(b, p) for b, p in zip(before_a, student.parameters()))
    changed_b = sum(not torch.equal(b, p) for b, p in zip(before_b, method.peer.parameters()))
    # Adam moves every parameter that received a gradient: most of both subnets' tensors change
    assert changed_a > 0.5 * len(before_a) and changed_b > 0.5 * len(before_b)
    return trainer, before_a, before_b


def _common_overrides(tmp_path: Path, manifest: Path) -> dict[str, Any]:
    return {
        "bundle_root": str(tmp_path),
        "manifest": str(manifest),
        "network_size": "small",
        "num_epochs": 1,
        "epoch_length": 1,
        "batch_size": 2,
        "unlabeled_batch_size": 2,
        "num_workers": 0,
        "cache_rate": 0.0,
        "train#trainer#train_handlers": [],  # one bare iteration: no validation/checkpoint handlers
    }


@pytest.mark.slow
@pytest.mark.parametrize("net", NETS_2D)
@pytest.mark.parametrize("method_file", ("fdpl", "fdpl_qw"))
def test_2d_overlays_parse_and_train_one_iteration(
    tmp_path: Path, demo_manifest: Path, net: str, method_file: str
) -> None:
    overrides = _common_overrides(tmp_path, demo_manifest)
    # SwinUNETR's last stage needs >= 2x2 pixels at 1/32 scale: crops of 64 (images of 96); 64 px otherwise
    image_size = 96 if net == "swinunetr2d" else 64
    overrides.update(image_size=image_size, quality_ckpt=str(_quality_checkpoint(tmp_path, 4, 2)), fdpl_alpha=0.7)
    parser = _parse(_configs("train.json", f"net/{net}.json", f"method/{method_file}.json"), overrides)
    method = parser.get_parsed_content("method")
    assert isinstance(method, FDPLQW if method_file == "fdpl_qw" else FDPL)
    assert method.crop_multiple == 32 and method.beta == 1.0 and method.offset is None
    # 3/4 of the side rounded down to a multiple of 32
    assert method.resolve_crop_size((image_size, image_size)) == ((64, 64) if image_size == 96 else (32, 32))
    trainer, _, _ = _run_one_iteration(parser)
    assert trainer.unsup_weight_max == pytest.approx(0.1)
    loss = trainer.loss_function  # alpha = 0.7: 0.7 Dice + 0.3 BCE for both subnets and the pseudo-labels
    assert isinstance(loss, PerSampleDiceBCELoss)
    logits, target = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    dice = 1 - (2 * 0.5 * 16 + 1e-5) / (0.5 * 16 + 16 + 1e-5)
    bce = float(torch.log(torch.tensor(2.0)))
    assert float(loss(logits, target)) == pytest.approx(0.7 * dice + 0.3 * bce, rel=1e-5)
    output = trainer.state.output[0]  # decollated: one dict per labeled sample
    assert output["extra_sup_loss"] > 0 and torch.isfinite(torch.tensor(output["loss"]))
    if method_file == "fdpl_qw":
        assert trainer.state.quality_weights.shape == (8,)  # 4 pseudo-label sets x 2 unlabeled samples


@pytest.fixture(scope="module")
def synthetic_3d_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qgssl_monai.data.synthetic3d import generate_synthetic_3d

    return generate_synthetic_3d(tmp_path_factory.mktemp("syn3d"), n_labeled=2, n_unlabeled=2, n_validation=1, n_test=1)


@pytest.mark.slow
@pytest.mark.parametrize(("net", "method_file"), (("unet3d", "fdpl"), ("unet3d", "fdpl_qw"), ("vnet3d", "fdpl")))
def test_3d_overlays_parse_and_train_one_iteration(
    tmp_path: Path, synthetic_3d_manifest: Path, net: str, method_file: str
) -> None:
    overrides = _common_overrides(tmp_path, synthetic_3d_manifest)
    # VNet (45 M parameters, 4 poolings) is costly on CPU: thinner 32x32x16 patches with 16^3 crops
    patch = [32, 32, 16] if net == "vnet3d" else [32, 32, 32]
    if net == "vnet3d":
        overrides["method#crop_size"] = 16
        overrides["batch_size"] = 1  # unlabeled batch stays 2: BatchNorm sees 2 values at the 1^3 bottleneck
    overrides.update(
        {
            "patch_size": patch,
            "quality_ckpt": str(_quality_checkpoint(tmp_path, 2, 3)),
        }
    )
    files = _configs("train.json", "train_3d.json", f"net/{net}.json", f"method/{method_file}.json")
    parser = _parse(files, overrides)
    assert isinstance(parser.get_parsed_content("validate#inferer"), SlidingWindowInferer)
    method = parser.get_parsed_content("method")
    assert method.crop_multiple == 16 and method.resolve_crop_size(tuple(patch)) == (16, 16, 16)
    trainer, _, _ = _run_one_iteration(parser)
    assert trainer.state.output[0]["fdpl_samples_with_dynamic_crops"] == 1.0  # in-plane shifts fit in the patch
    outputs = trainer.state.output  # decollated: one dict per labeled sample
    assert len(outputs) == (1 if net == "vnet3d" else 2)
    assert outputs[0]["image"].shape == outputs[0]["label"].shape == (1, *patch)
    labels = torch.stack([o["label"] for o in outputs])
    images = torch.stack([o["image"] for o in outputs])
    assert set(torch.unique(labels).tolist()) <= {0.0, 1.0}  # binarised labels
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    if method_file == "fdpl_qw":
        assert trainer.state.quality_weights.shape == (8,)


@pytest.mark.slow
def test_3d_bundle_run_trains_validates_and_writes_voxel_metrics(tmp_path: Path, synthetic_3d_manifest: Path) -> None:
    """The full 3D workflow of ``monai.bundle run``: manifest check, training, sliding-window validation,
    checkpoints and per-volume test metrics (Dice, IoU, HD95, ASD in voxels)."""
    import json

    from monai.bundle import run

    files = _configs("train.json", "train_3d.json", "net/unet3d.json", "method/fdpl.json")
    run(
        config_file=[str(f) for f in files],
        bundle_root=str(tmp_path),
        manifest=str(synthetic_3d_manifest),
        network_size="small",
        num_epochs=1,
        epoch_length=1,
        patch_size=[32, 32, 32],
        num_workers=0,
    )
    assert (tmp_path / "models" / "model.pt").is_file() and (tmp_path / "models" / "checkpoint_epoch=1.pt").is_file()
    checkpoint = torch.load(tmp_path / "models" / "checkpoint_epoch=1.pt", weights_only=False)
    assert any(key.startswith("peer.") for key in checkpoint["method"])  # subnet B is saved with the method
    assert "_extra_state" in checkpoint["method"]  # and so is the crop/CutMix random stream
    summary = json.loads((tmp_path / "eval" / "test_metrics_summary.json").read_text())
    assert set(summary) >= {"dice", "iou", "hd95", "asd"} and summary["dice"]["n"] == 1
    diagonal = (3 * 31**2) ** 0.5  # worst-case distance in a 32^3 volume, in voxels
    assert 0.0 <= summary["dice"]["mean"] <= 1.0 and 0.0 <= summary["hd95"]["mean"] <= diagonal


def test_peer_from_network_config_is_a_fresh_instance(tmp_path: Path, demo_manifest: Path) -> None:
    overrides = _common_overrides(tmp_path, demo_manifest)
    overrides.update({"image_size": 64, "method#peer": "%network_def"})
    parser = _parse(_configs("train.json", "net/unet.json", "method/fdpl.json"), overrides)
    optimizer = parser.get_parsed_content("optimizer")  # builds the method and calls its setup(student)
    method, student = parser.get_parsed_content("method"), parser.get_parsed_content("student")
    assert type(method.peer) is type(student) and method.peer is not student
    pairs = list(zip(method.peer.parameters(), student.parameters()))
    # the config builds both from one seeded network_def: setup must still give B its own initialisation
    assert all(a.shape == b.shape for a, b in pairs) and any(not torch.equal(a, b) for a, b in pairs)
    optimizer_ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in method.peer.parameters()} <= optimizer_ids  # B is trained by the bundle's optimizer


@pytest.mark.parametrize(
    ("files", "spatial_dims", "multiple"),
    (
        (("train.json", "method/fdpl_qw.json", "net/swinunetr2d.json"), 2, 32),
        (("train.json", "method/fdpl.json", "net/vnet3d.json", "train_3d.json"), 3, 16),
        (("train.json", "train_3d.json", "method/fdpl.json", "net/unet3d.json"), 3, 16),
    ),
)
def test_overlay_order_does_not_matter(files: tuple[str, ...], spatial_dims: int, multiple: int) -> None:
    """The experiment runner stacks ``train, method, net``; the crop multiple follows the network either way."""
    parser = _parse(_configs(*files), {})
    assert parser.get_parsed_content("network_def#spatial_dims") == spatial_dims
    assert parser.get_parsed_content("method#crop_multiple") == multiple
    assert parser.get_parsed_content("unsup_weight") == 0.1
    assert parser["method"]["name"] == ("fdpl-qw" if "method/fdpl_qw.json" in files else "fdpl")


def test_3d_preprocessing_binarises_labels_and_scales_images(tmp_path: Path) -> None:
    """``train_3d.json`` chains turn BraTS-style {0, 2, 4} labels into whole-tumour {0, 1} and images into [0, 1]."""
    import nibabel as nib
    import numpy as np

    image = np.arange(20 * 20 * 20, dtype=np.int16).reshape(20, 20, 20)
    label = np.zeros((20, 20, 20), dtype=np.uint8)
    label[5:9, 5:9, 5:9] = 2
    label[9:11, 5:9, 5:9] = 4
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / "flair.nii.gz"))
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(tmp_path / "seg.nii.gz"))
    parser = _parse(_configs("train.json", "train_3d.json", "net/unet3d.json"), {"patch_size": [16, 16, 16]})
    entry = {"image": str(tmp_path / "flair.nii.gz"), "label": str(tmp_path / "seg.nii.gz")}
    item = parser.get_parsed_content("validate#preprocessing")(entry)
    assert item["label"].shape == (1, 20, 20, 20) and int(item["label"].sum()) == 6 * 4 * 4
    assert set(torch.unique(item["label"]).tolist()) == {0.0, 1.0}
    assert float(item["image"].min()) == 0.0 and float(item["image"].max()) == 1.0
    patches = parser.get_parsed_content("train#preprocessing")(entry)
    patch = patches[0] if isinstance(patches, list) else patches
    assert patch["image"].shape == patch["label"].shape == (1, 16, 16, 16)
