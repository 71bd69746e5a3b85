"""Helpers shared by the ssl_segmentation bundle tests (tiny CPU settings, in-process ConfigWorkflow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigWorkflow

from qgssl_monai.networks.quality import QualityPredictor, write_quality_metadata

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "ssl_segmentation"
CONFIGS = BUNDLE / "configs"
METHOD_OVERLAYS = sorted(p.stem for p in (CONFIGS / "method").glob("*.json") if not p.stem.startswith("fdpl"))
NET_OVERLAYS = sorted(p.stem for p in (CONFIGS / "net").glob("*.json") if "3d" not in p.stem)

#: overrides making every run tiny: 64 px demo data, small networks, batch 2, 1 epoch of 2 steps
TINY = {
    "image_size": 64,
    "batch_size": 2,
    "unlabeled_batch_size": 2,
    "num_workers": 0,
    "num_epochs": 1,
    "epoch_length": 2,
    "network_size": "small",
    "device": "cpu",
}


def config_files(*names: str) -> list[str]:
    """``train.json`` followed by the named overlays, e.g. ``("method/qar", "net/unet")``."""
    return [str(CONFIGS / "train.json")] + [str(CONFIGS / f"{name}.json") for name in names]


def make_workflow(
    files: list[str], manifest: Path, out: Path, workflow_type: str = "train", tracking: Any = None, **overrides: Any
) -> ConfigWorkflow:
    """A ConfigWorkflow of the bundle writing everything under ``out`` (never into the repository)."""
    settings = {**TINY, **overrides}
    return ConfigWorkflow(
        config_file=files,
        workflow_type=workflow_type,
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        tracking=tracking,
        bundle_root=str(BUNDLE),
        dataset_dir=str(manifest.parent),
        output_dir=str(out / "eval"),
        ckpt_dir=str(out / "models"),
        **settings,
    )


def write_quality_checkpoint(path: Path, seed: int = 0, image_size: int = 64) -> Path:
    """A randomly initialised (untrained) quality predictor state_dict + its sidecar: enough to exercise the wiring."""
    torch.manual_seed(seed)
    torch.save(QualityPredictor(in_channels=4, backbone="resnet18").state_dict(), path)
    write_quality_metadata(path, image_size=image_size, image_channels=3, backbone="resnet18")
    return path


def latest_checkpoint_name(ckpt_dir: Path) -> str | None:
    """File name of the newest resumable checkpoint in ``ckpt_dir`` (None when there is none)."""
    from qgssl_monai.segmentation.training import latest_checkpoint

    found = latest_checkpoint(ckpt_dir, required=False)
    return None if found is None else Path(found).name
