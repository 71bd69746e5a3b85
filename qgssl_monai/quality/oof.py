"""Out-of-fold Type 2 pool for g (cross-fitting): predictions of networks that never saw the image.

A pseudo-label is an *out-of-sample* prediction of a trained network; the paper's Type 2 masks are
*in-sample* predictions of weak early-epoch networks, which makes g optimistic on real pseudo-labels.
Cross-fitting produces the missing kind of mask:

1. the labeled training split is cut into K grouped folds (:func:`make_folds`; a video sequence or
   patient never spans two folds);
2. for every fold and every architecture, ``train_weak.json`` (the same training the in-sample snapshots
   use) trains a network on the *other* folds and keeps snapshots across its whole schedule, by default at
   5/15/35/65/100 % of its epochs (:func:`train_fold_networks`);
3. each snapshot predicts the held-out fold, as is and under a seeded test-time perturbation
   (:class:`~qgssl_monai.transforms.weak.TestTimePerturbation`); the masks go into a bit-packed
   :class:`~qgssl_monai.transforms.weak.WeakPredictionBank` cached under a name that hashes the folds,
   image ids, snapshot files, architectures, perturbation and image size (:func:`build_oof_pool`), so any
   change rebuilds it and an unchanged pool loads in a second.

The validation and test splits (never seen by any fold network) can be predicted by every fold network
(``eval_splits``): real out-of-sample predictions to evaluate or calibrate g on. An index file
``oof_pool_<size>px.json`` names the current bank of each split; ``train.json`` loads the training bank with
:func:`load_oof_bank`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from qgssl_monai.data.manifest import grouped_kfold, load_split
from qgssl_monai.data.presets import item_groups
from qgssl_monai.networks.segmentation import build_segmentation_network
from qgssl_monai.transforms.weak import (
    PredictionGroup,
    TestTimePerturbation,
    WeakPredictionBank,
    weak_snapshot_filename,
)

__all__ = [
    "DEFAULT_SNAPSHOT_FRACTIONS",
    "build_oof_pool",
    "load_oof_bank",
    "make_folds",
    "oof_index_path",
    "prediction_groups",
    "snapshot_epochs",
    "train_fold_networks",
]

logger = logging.getLogger(__name__)

#: fractions of a fold network's schedule after which a snapshot is kept (weak to converged)
DEFAULT_SNAPSHOT_FRACTIONS: tuple[float, ...] = (0.05, 0.15, 0.35, 0.65, 1.0)
_FOLD_RECORD = "fold_run.json"


def snapshot_epochs(max_epochs: int, fractions: Sequence[float] = DEFAULT_SNAPSHOT_FRACTIONS) -> list[int]:
    """1-based epochs at ``fractions`` of a ``max_epochs`` schedule (rounded up, at least 1, duplicates merged).

    ``snapshot_epochs(20) == [1, 3, 7, 13, 20]``. Snapshots are taken at epoch ends, so with short schedules
    neighbouring fractions can fall on the same epoch.

    Raises:
        ValueError: ``max_epochs < 1`` or a fraction outside ``(0, 1]``.
    """
    if int(max_epochs) < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
    if not fractions or any(not 0 < float(f) <= 1 for f in fractions):
        raise ValueError(f"snapshot fractions must lie in (0, 1], got {fractions}")
    # the small epsilon keeps 0.15 * 20 = 3.0000000000000004 at epoch 3
    return sorted({max(1, math.ceil(float(f) * int(max_epochs) - 1e-9)) for f in fractions})


def make_folds(
    datalist: Sequence[Mapping[str, Any]],
    k: int = 4,
    *,
    seed: int = 0,
    manifest: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
) -> list[list[str]]:
    """K grouped folds of the ``image`` paths of ``datalist`` (groups from :func:`item_groups`).

    Returns:
        ``k`` disjoint lists of image paths covering the datalist; no group spans two folds.
    """
    groups = item_groups(datalist, manifest, data_root)
    return grouped_kfold([str(item["image"]) for item in datalist], k, seed=seed, groups=groups)


def _fold_network_def(architecture: str, image_channels: int, network_size: str, init_seed: int) -> dict[str, Any]:
    return {
        "_target_": "qgssl_monai.networks.segmentation.build_segmentation_network",
        "name": architecture,
        "in_channels": int(image_channels),
        "size": network_size,
        "init_seed": int(init_seed),
    }


def train_fold_networks(
    weak_config: str | os.PathLike,
    datalist: Sequence[Mapping[str, Any]],
    folds: Sequence[Sequence[str]],
    architectures: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    max_epochs: int = 20,
    fractions: Sequence[float] = DEFAULT_SNAPSHOT_FRACTIONS,
    image_channels: int = 3,
    network_size: str = "small",
    seed: int = 0,
    overrides: Mapping[str, Any] | None = None,
    only_folds: Sequence[int] | None = None,
) -> dict[tuple[int, str], list[Path]]:
    """Train one network per (fold, architecture) on the other folds with ``weak_config`` (``train_weak.json``).

    The run of fold ``k`` and architecture ``a`` writes its snapshots to ``out_dir/fold<k>/<a>/`` and a
    record of what it trained on (``fold_run.json``); a later call with the same training images, epochs,
    seed and overrides reuses the snapshots instead of training again.

    Args:
        weak_config: the ``train_weak.json`` of the quality bundle (its ``metadata.json`` sits beside it).
        datalist: the labeled training split (absolute paths).
        folds: image paths per fold (:func:`make_folds`).
        architectures: names for :func:`build_segmentation_network` (e.g. ``["unet", "attention_unet"]``).
        out_dir: pool folder.
        max_epochs: schedule of each fold network.
        fractions: where along the schedule snapshots are kept (:func:`snapshot_epochs`).
        image_channels: image channels (3 for RGB).
        network_size: ``"small"`` or ``"paper"``.
        seed: base seed; fold ``k`` trains with ``seed + k`` (initialisation, shuffling, augmentation).
        overrides: further ``train_weak.json`` overrides (``image_size``, ``manifest``, ``device``, ``lr``...).
        only_folds: train just these fold indices (to spread the folds over several processes or machines;
            a later call for all folds with the same arguments reuses them).

    Returns:
        ``{(k, architecture): [snapshot files in epoch order]}`` for the folds trained or reused.
    """
    # imported here: building folds and banks needs no bundle machinery
    from monai.bundle import ConfigWorkflow

    weak_config = Path(weak_config)
    epochs = snapshot_epochs(max_epochs, fractions)
    overrides = dict(overrides or {})
    result: dict[tuple[int, str], list[Path]] = {}
    for k, held_out in enumerate(folds):
        if only_folds is not None and k not in only_folds:
            continue
        held = set(held_out)
        train_items = [dict(item) for item in datalist if str(item["image"]) not in held]
        for architecture in architectures:
            run_dir = Path(out_dir) / f"fold{k}" / architecture
            expected = [run_dir / weak_snapshot_filename(e) for e in epochs]
            record = {
                "fold": k,
                "architecture": architecture,
                "network_size": network_size,
                "train_images": sorted(str(i["image"]) for i in train_items),
                "epochs": epochs,
                "max_epochs": int(max_epochs),
                "seed": int(seed) + k,
                "overrides": {key: str(value) for key, value in sorted(overrides.items())},
            }
            record_path = run_dir / _FOLD_RECORD
            if all(p.is_file() for p in expected) and record_path.is_file() and json.loads(record_path.read_text()) == record:
                logger.info("fold %d %s: reusing %d snapshots in %s", k, architecture, len(expected), run_dir)
                result[(k, architecture)] = expected
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            for stale in run_dir.glob("weak_epoch_*.pt"):
                stale.unlink()
            record_path.unlink(missing_ok=True)
            logger.info("fold %d %s: training on %d images for %d epochs", k, architecture, len(train_items), max_epochs)
            workflow = ConfigWorkflow(
                config_file=str(weak_config),
                meta_file=str(weak_config.parent / "metadata.json"),
                logging_file=False,
                workflow_type="train",
                **{
                    **overrides,
                    "image_channels": image_channels,
                    "weak_dir": str(run_dir),
                    "weak_epochs": epochs,
                    "max_epochs": int(max_epochs),
                    "seed": int(seed) + k,
                    "train#datalist": train_items,
                    "network_def": _fold_network_def(architecture, image_channels, network_size, int(seed) + k),
                },
            )
            workflow.initialize()
            workflow.run()
            workflow.finalize()
            missing = [p for p in expected if not p.is_file()]
            if missing:
                raise RuntimeError(f"fold {k} {architecture}: training finished without snapshots {missing}")
            record_path.write_text(json.dumps(record, indent=1))
            result[(k, architecture)] = expected
    return result


def prediction_groups(
    datalist: Sequence[Mapping[str, Any]],
    folds: Sequence[Sequence[str]],
    snapshots: Mapping[tuple[int, str], Sequence[Path]],
    architectures: Sequence[str],
    *,
    out_of_fold: bool = True,
    image_channels: int = 3,
    network_size: str = "small",
    network_factory: Callable[[str], torch.nn.Module] | None = None,
) -> list[PredictionGroup]:
    """Which networks predict which images.

    Args:
        snapshots: ``{(fold, architecture): snapshot files}`` (:func:`train_fold_networks`).
        network_factory: architecture name -> untrained module the snapshots load into (default:
            :func:`build_segmentation_network` at ``network_size`` with ``image_channels`` inputs).
        out_of_fold: True for the training pool: one group per fold, its images predicted only by the
            networks of that fold (trained on the other folds). False for images outside every fold
            (validation, test): one group, predicted by the networks of every fold (slots ``fold<k>/<arch>/...``).

    Raises:
        ValueError: ``out_of_fold`` and an image of ``datalist`` is in no fold.
    """

    def network(architecture: str) -> torch.nn.Module:
        if network_factory is not None:
            return network_factory(architecture)
        return build_segmentation_network(architecture, in_channels=image_channels, size=network_size)

    if not out_of_fold:
        nets = [(f"fold{k}/{a}", network(a), snapshots[(k, a)]) for k in range(len(folds)) for a in architectures]
        return [PredictionGroup(list(datalist), nets)]
    fold_of = {image: k for k, fold in enumerate(folds) for image in fold}
    unassigned = [str(i["image"]) for i in datalist if str(i["image"]) not in fold_of]
    if unassigned:
        raise ValueError(f"{len(unassigned)} image(s) are in no fold, e.g. {unassigned[:3]}")
    groups = []
    for k in range(len(folds)):
        items = [item for item in datalist if fold_of[str(item["image"])] == k]
        if items:
            groups.append(PredictionGroup(items, [(a, network(a), snapshots[(k, a)]) for a in architectures]))
    return groups


def oof_index_path(out_dir: str | os.PathLike, image_size: int) -> Path:
    """The index file naming the current bank of each split at ``image_size``."""
    return Path(out_dir) / f"oof_pool_{int(image_size)}px.json"


def build_oof_pool(
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    weak_config: str | os.PathLike,
    load_transform: Any,
    image_size: int,
    *,
    data_root: str | os.PathLike | None = None,
    num_folds: int = 4,
    fold_seed: int = 0,
    architectures: Sequence[str] = ("unet", "attention_unet"),
    max_epochs: int = 20,
    fractions: Sequence[float] = DEFAULT_SNAPSHOT_FRACTIONS,
    image_channels: int = 3,
    network_size: str = "small",
    perturbation: TestTimePerturbation | None = None,
    eval_splits: Sequence[str] = ("validation", "test"),
    seed: int = 0,
    device: str | torch.device = "cpu",
    train_overrides: Mapping[str, Any] | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> WeakPredictionBank:
    """Folds -> fold networks -> out-of-fold predictions of the training split (plus ``eval_splits``).

    Args:
        manifest: the data manifest; its ``training`` split is cross-fitted.
        out_dir: pool folder (fold networks, banks, index).
        weak_config: ``train_weak.json`` (trains the fold networks).
        load_transform: deterministic load chain at ``image_size`` (the banks' masks align with its output).
        num_folds, fold_seed: K and the seed of :func:`make_folds`.
        architectures, max_epochs, fractions, image_channels, network_size, seed: see :func:`train_fold_networks`.
        perturbation: test-time perturbation for the second view of every snapshot (None: plain only).
        eval_splits: splits outside the folds predicted by every fold network (empty: none).
        device: forward passes and fold training.
        train_overrides: extra ``train_weak.json`` overrides (``lr``, ``batch_size``, ``num_workers``...).
        batch_size: images per forward pass when predicting.

    Returns:
        the training split's out-of-fold bank; all banks are cached and listed in :func:`oof_index_path`.
    """
    datalist = load_split(manifest, "training", data_root)
    folds = make_folds(datalist, num_folds, seed=fold_seed, manifest=manifest, data_root=data_root)
    overrides = {
        "manifest": str(manifest),
        "data_root": None if data_root is None else str(data_root),
        "image_size": int(image_size),
        "device": f"$torch.device('{torch.device(device)}')",
        **dict(train_overrides or {}),
    }
    snapshots = train_fold_networks(
        weak_config, datalist, folds, architectures, out_dir, max_epochs=max_epochs, fractions=fractions,
        image_channels=image_channels, network_size=network_size, seed=seed, overrides=overrides,
    )  # fmt: skip
    all_snapshots = [p for key in sorted(snapshots) for p in snapshots[key]]
    key_parts = [json.dumps(folds), ",".join(architectures), network_size, perturbation.describe() if perturbation else "plain"]
    index: dict[str, Any] = {"folds": folds, "architectures": list(architectures), "banks": {}}
    banks: dict[str, WeakPredictionBank] = {}
    for split in ("training", *eval_splits):
        items = datalist if split == "training" else load_split(manifest, split, data_root)
        if not items:
            continue
        ids = [str(i["image"]) for i in items]
        name = WeakPredictionBank.cache_name(ids, all_snapshots, image_size, extra=[split, *key_parts], prefix=f"oof_{split}")
        groups = prediction_groups(
            items, folds, snapshots, architectures, out_of_fold=split == "training",
            image_channels=image_channels, network_size=network_size,
        )  # fmt: skip
        banks[split] = WeakPredictionBank.from_groups(
            groups, load_transform, perturbation=perturbation, cache_path=Path(out_dir) / name, device=device,
            batch_size=batch_size, progress=progress,
        )  # fmt: skip
        index["banks"][split] = name
    index_path = oof_index_path(out_dir, image_size)
    tmp = index_path.with_name(index_path.name + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, index_path)
    logger.info("out-of-fold pool: %s", ", ".join(f"{s} {len(b)} images x {b.num_snapshots} masks" for s, b in banks.items()))
    return banks["training"]


def load_oof_bank(out_dir: str | os.PathLike, image_size: int, split: str = "training") -> WeakPredictionBank:
    """The out-of-fold bank of ``split`` at ``image_size`` written by :func:`build_oof_pool`.

    Raises:
        FileNotFoundError: no pool at this size (run ``configs/train_oof.json``) or no bank for ``split``.
    """
    index_path = oof_index_path(out_dir, image_size)
    if not index_path.is_file():
        raise FileNotFoundError(
            f"no out-of-fold Type 2 pool at {image_size} px in {out_dir} ({index_path.name} missing): "
            "run the quality bundle's configs/train_oof.json first, or set type2 to in_sample"
        )
    name = json.loads(index_path.read_text())["banks"].get(split)
    if name is None or not (Path(out_dir) / name).is_file():
        raise FileNotFoundError(f"the out-of-fold pool in {out_dir} has no {split} bank; rerun configs/train_oof.json")
    return WeakPredictionBank.load(Path(out_dir) / name)
