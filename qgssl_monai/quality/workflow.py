"""Small pieces the quality-predictor bundle configs wire together (configs stay declarative)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.networks.nets import UNet
from torch import nn

from qgssl_monai.networks.quality import file_sha256, read_quality_metadata, write_quality_metadata
from qgssl_monai.quality.oof import load_oof_bank
from qgssl_monai.transforms.weak import WeakPredictionBank

__all__ = [
    "QualityMetadataWriter",
    "lower_is_better",
    "negative_validation_loss",
    "TYPE2_SOURCES",
    "load_type2_bank",
    "weak_segmentation_network",
]

logger = logging.getLogger(__name__)


def weak_segmentation_network(
    image_channels: int = 3, channels: Sequence[int] = (16, 32, 64, 128), spatial_dims: int = 2
) -> nn.Module:
    """The U-Net whose early-epoch snapshots produce Type 2 masks (one logit channel, random init).

    One definition shared by ``train_weak.json`` (which saves the snapshots) and ``train.json`` /
    ``evaluate.json`` (which load them), so the architectures always match.
    """
    return UNet(
        spatial_dims=spatial_dims,
        in_channels=image_channels,
        out_channels=1,
        channels=tuple(channels),
        strides=(2,) * (len(channels) - 1),
        num_res_units=2,
    )


TYPE2_SOURCES: tuple[str, ...] = ("in_sample", "out_of_fold")


def load_type2_bank(
    type2: str,
    *,
    weak_dir: str | os.PathLike,
    oof_dir: str | os.PathLike,
    network: nn.Module,
    datalist: Sequence[Mapping[str, Any]],
    load_transform: Callable,
    image_size: int,
    p_type2: float,
    device: str | torch.device = "cpu",
) -> WeakPredictionBank | None:
    """The Type 2 masks g trains on, or None when ``p_type2 == 0`` (Type 1 corruptions only).

    Args:
        type2: ``"in_sample"`` (the paper: weak early-epoch snapshots of ``train_weak.json`` predicting the
            images they trained on; predicted here once and cached in ``weak_dir``) or ``"out_of_fold"``
            (networks across their whole schedule predicting images they never saw; the pool
            ``train_oof.json`` built in ``oof_dir``).
        network: architecture of the in-sample snapshots (unused for ``out_of_fold``).
        datalist: g's training images; every one must be in the bank.

    Raises:
        ValueError: unknown ``type2``.
        FileNotFoundError: no snapshots / no pool (run ``train_weak.json`` / ``train_oof.json``).
        KeyError: a training image is missing from the out-of-fold pool (built for another split).
    """
    if type2 not in TYPE2_SOURCES:
        raise ValueError(f"type2 must be one of {TYPE2_SOURCES}, got {type2!r}")
    if p_type2 <= 0:
        logger.info("p_type2 = 0: training g on Type 1 corruptions only")
        return None
    if type2 == "in_sample":
        return WeakPredictionBank.from_snapshots(weak_dir, network, datalist, load_transform, image_size, device=device)
    bank = load_oof_bank(oof_dir, image_size, "training")
    missing = [str(item["image"]) for item in datalist if str(item["image"]) not in bank.index]
    if missing:
        raise KeyError(f"{len(missing)} training image(s) have no out-of-fold predictions (e.g. {missing[0]}); rerun train_oof.json")
    logger.info("out-of-fold Type 2 pool: %d images x %d masks", len(bank), bank.num_snapshots)
    return bank


def negative_validation_loss(engine: Engine, metric_name: str = "val_loss") -> float:
    """Score for ``EarlyStopHandler`` (higher is better): minus the validation loss."""
    return -float(engine.state.metrics[metric_name])


def lower_is_better(current: float, previous: float) -> bool:
    """``metric_cmp_fn`` for engines whose key metric is a loss."""
    return current < previous


class QualityMetadataWriter:
    """Keep the sidecar ``<stem>.meta.json`` of g's best weights (``models/model.pt``) in step with the file.

    Attached to the validation evaluator *after* the ``CheckpointSaver`` that writes ``model.pt``: after each
    validation, when ``model.pt`` exists and its SHA-256 differs from the sidecar's, the sidecar is rewritten
    (:func:`~qgssl_monai.networks.quality.write_quality_metadata`) with the training settings, so every consumer
    of g builds it, resizes its inputs and calibrates it from the checkpoint alone. New weights get no
    calibration (one fitted for older weights would not apply).

    Args:
        checkpoint: the best-weights file, e.g. ``<ckpt_dir>/model.pt``.
        settings: g's training settings, the keyword arguments of
            :func:`~qgssl_monai.networks.quality.write_quality_metadata` (``image_size``, ``image_channels``,
            ``backbone``, ``spatial_dims``, ``dropout``).
    """

    def __init__(self, checkpoint: str | os.PathLike, **settings: Any) -> None:
        self.checkpoint = checkpoint
        self.settings = settings

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        if not os.path.isfile(self.checkpoint):
            return
        metadata = read_quality_metadata(self.checkpoint)
        if metadata is None or metadata.get("sha256") != file_sha256(self.checkpoint):
            path = write_quality_metadata(self.checkpoint, **self.settings)
            logger.info("wrote %s", path)
