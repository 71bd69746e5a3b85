"""Type 2 variable-quality masks: predictions of weak (early-epoch) segmentation networks.

A U-Net trained from scratch on the labeled split is snapshotted at a few early epochs
(:class:`qgssl_monai.handlers.snapshots.WeakSnapshotSaver`, default epochs 1, 3, 5, 10, 15, 20). When g is
trained, a sample's mask is, with probability ``p_type2``, the prediction of a randomly chosen snapshot
instead of a synthetic (Type 1) corruption.

Efficiency choice: running six networks inside data-loader workers for every sample would dominate the
cost of training g and would need the networks in every worker. Instead :class:`WeakPredictionBank`
runs each snapshot once over every training image at the training resolution, stores the hard masks
bit-packed in memory (``N x S x H*W / 8`` bytes: 800 images x 6 snapshots at 256 px is ~39 MB) and
caches them on disk next to the snapshots, keyed by image size, image list and snapshot files, so
later runs load them in a second. :class:`RandWeakPredictiond` then only looks a mask up.

The same bank holds the out-of-fold Type 2 pool (``qgssl_monai.quality.oof``): :meth:`WeakPredictionBank.from_groups`
predicts each group of images (a fold) only with that group's networks (trained on the other folds), as is
and under a seeded :class:`TestTimePerturbation`, and records which snapshot file produced every mask.

The cached masks are aligned with the *deterministic* (load + resize) image, so place the transform
before any spatial augmentation and apply that augmentation jointly to image, label and mask.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import zlib
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_numpy
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "PLAIN_VIEW",
    "TTA_VIEW",
    "PredictionGroup",
    "RandWeakPredictiond",
    "TestTimePerturbation",
    "WeakPredictionBank",
    "list_weak_snapshots",
    "weak_snapshot_filename",
    "dice_of_masks",
]

logger = logging.getLogger(__name__)

#: view names of a bank slot: the network's plain prediction, or under a test-time perturbation
PLAIN_VIEW = "plain"
TTA_VIEW = "tta"

_SNAPSHOT_PATTERN = re.compile(r"^weak_epoch_(\d+)\.pt$")


def weak_snapshot_filename(epoch: int) -> str:
    """File name of the weak snapshot saved after ``epoch`` (1-based), e.g. ``weak_epoch_003.pt``."""
    return f"weak_epoch_{int(epoch):03d}.pt"


def list_weak_snapshots(snapshot_dir: str | os.PathLike) -> list[Path]:
    """Weak snapshot files in ``snapshot_dir``, sorted by epoch (empty list when the folder is missing)."""
    folder = Path(snapshot_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _SNAPSHOT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def dice_of_masks(mask: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor) -> float:
    """Dice of two binary masks (values > 0.5 are foreground); 1.0 when both are empty."""
    a = convert_to_numpy(mask) > 0.5
    b = convert_to_numpy(label) > 0.5
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * float(np.logical_and(a, b).sum()) / denom


@dataclass(frozen=True)
class PredictionGroup:
    """Images predicted by a set of networks: one block of rows of a :class:`WeakPredictionBank`.

    In-sample weak snapshots are one group (every training image, every snapshot). Cross-fitting has one
    group per fold: the fold's held-out images, predicted only by the networks trained on the other folds.

    Args:
        items: datalist entries whose ``image`` path is the bank id.
        networks: ``(label, architecture, snapshot files)`` triples; every snapshot's state_dict is loaded into
            ``architecture`` in turn. ``label`` prefixes the slot names (``""``: the snapshot stem alone).
    """

    items: Sequence[Mapping[str, Any]]
    networks: Sequence[tuple[str, nn.Module, Sequence[Path]]]

    def slot_names(self, views: Sequence[str]) -> list[str]:
        """``<label>/<snapshot stem>[/<view>]`` per slot (the view is omitted for ``"plain"``)."""
        names = []
        for label, _, snapshots in self.networks:
            for snap in snapshots:
                for view in views:
                    name = f"{label}/{Path(snap).stem}" if label else Path(snap).stem
                    names.append(name if view == PLAIN_VIEW else f"{name}/{view}")
        return names


class TestTimePerturbation:
    """Seeded test-time perturbation of a prediction: flip, colour jitter and a small scale change.

    The image is warped by a random affine map (horizontal flip with probability ``flip_prob``, isotropic
    zoom by ``s ~ U(scale)``), its contrast and brightness are jittered (``(x - mean) * c + mean + b``,
    clipped to ``[0, 1]``), the network predicts it, and the logits are warped back with the inverse map, so
    the hard mask stays aligned with the unperturbed image (the bank's contract).

    Args:
        flip_prob: probability of a horizontal flip.
        brightness: ``b ~ U(-brightness, brightness)``.
        contrast: ``c ~ U(1 - contrast, 1 + contrast)``.
        scale: zoom range (``s > 1`` zooms in).
        seed: base seed; each (image id, slot) pair gets its own draw, independent of batch order.
    """

    __test__ = False  # not a pytest class despite the name

    def __init__(
        self,
        flip_prob: float = 0.5,
        brightness: float = 0.1,
        contrast: float = 0.15,
        scale: Sequence[float] = (0.9, 1.1),
        seed: int = 0,
    ) -> None:
        self.flip_prob = float(flip_prob)
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.scale = (float(scale[0]), float(scale[1]))
        self.seed = int(seed)

    def describe(self) -> str:
        """Parameters as a string (part of the bank's cache key)."""
        return f"tta:{self.flip_prob}:{self.brightness}:{self.contrast}:{self.scale}:{self.seed}"

    def draw(self, image_id: str, slot: int) -> tuple[bool, float, float, float]:
        """``(flip, zoom, contrast, brightness)`` for ``image_id`` at ``slot`` (reproducible)."""
        rng = np.random.default_rng([self.seed, zlib.crc32(str(image_id).encode()), int(slot)])
        flip = bool(rng.random() < self.flip_prob)
        zoom = float(rng.uniform(*self.scale))
        contrast = float(rng.uniform(1 - self.contrast, 1 + self.contrast))
        brightness = float(rng.uniform(-self.brightness, self.brightness))
        return flip, zoom, contrast, brightness

    def __call__(self, network: nn.Module, images: torch.Tensor, image_ids: Sequence[str], slot: int) -> torch.Tensor:
        """Logits ``(B, 1, H, W)`` of ``network`` on the perturbed ``images`` ``(B, C, H, W)``, aligned back."""
        params = [self.draw(i, slot) for i in image_ids]
        sx = torch.tensor([(-1.0 if f else 1.0) / z for f, z, _, _ in params], dtype=images.dtype, device=images.device)
        sy = torch.tensor([1.0 / z for _, z, _, _ in params], dtype=images.dtype, device=images.device)
        c = torch.tensor([p[2] for p in params], dtype=images.dtype, device=images.device).view(-1, 1, 1, 1)
        b = torch.tensor([p[3] for p in params], dtype=images.dtype, device=images.device).view(-1, 1, 1, 1)
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        jittered = ((images - mean) * c + mean + b).clamp(0.0, 1.0)
        warped = _affine_scale(jittered, sx, sy)
        logits = _first_output(network(warped))[:, :1]
        return _affine_scale(logits, 1.0 / sx, 1.0 / sy)


def _affine_scale(x: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    """Sample ``x`` (B, C, H, W) at normalised coordinates ``(sx * u, sy * v)`` (per-sample diagonal affine)."""
    theta = torch.zeros(x.shape[0], 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = sx
    theta[:, 1, 1] = sy
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _first_output(logits: Any) -> torch.Tensor:
    return logits[0] if isinstance(logits, (list, tuple)) else logits


class WeakPredictionBank:
    """Hard masks of a set of segmentation networks for every image, bit-packed.

    Every image has the same number S of slots (e.g. 6 in-sample weak snapshots; or 2 architectures x 5
    snapshots x 2 views of the networks that did *not* train on it, for the out-of-fold pool).

    Args:
        ids: one id per image (the image path string of the datalist item).
        packed: ``(N, S, ceil(prod(spatial_shape) / 8))`` uint8 from ``np.packbits`` of the flattened masks.
        spatial_shape: mask spatial shape, e.g. ``(H, W)``.
        snapshot_names: S slot names (snapshot file stems, prefixed by the network label and suffixed by the
            view when given), used in the ``corruption`` description.
        sources: optional ``(N, S)`` strings naming the snapshot file (and view) that produced each mask, so
            provenance can be checked (no out-of-fold mask comes from a network that saw its image);
            default: the slot names.
    """

    def __init__(
        self,
        ids: Sequence[str],
        packed: np.ndarray,
        spatial_shape: Sequence[int],
        snapshot_names: Sequence[str],
        sources: np.ndarray | Sequence[Sequence[str]] | None = None,
    ) -> None:
        packed = np.asarray(packed, dtype=np.uint8)
        if packed.ndim != 3 or packed.shape[0] != len(ids) or packed.shape[1] != len(snapshot_names):
            raise ValueError(
                f"packed masks of shape {packed.shape} do not match {len(ids)} ids x {len(snapshot_names)} snapshots"
            )
        self.ids = [str(i) for i in ids]
        self.index = {image_id: row for row, image_id in enumerate(self.ids)}
        self.packed = packed
        self.spatial_shape = tuple(int(s) for s in spatial_shape)
        self.snapshot_names = [str(n) for n in snapshot_names]
        if sources is None:
            sources = np.broadcast_to(np.asarray(self.snapshot_names, dtype=str), (len(self.ids), len(self.snapshot_names)))
        self.sources = np.asarray(sources, dtype=str)
        if self.sources.shape != packed.shape[:2]:
            raise ValueError(f"sources of shape {self.sources.shape} do not match {packed.shape[:2]}")

    @property
    def num_snapshots(self) -> int:
        return len(self.snapshot_names)

    def __len__(self) -> int:
        return len(self.ids)

    def _row(self, image_id: str) -> int:
        row = self.index.get(str(image_id))
        if row is None:
            raise KeyError(f"no weak predictions cached for {image_id}; rebuild the WeakPredictionBank for this datalist")
        return row

    def get(self, image_id: str, snapshot: int) -> np.ndarray:
        """The ``(1, *spatial_shape)`` bool mask of slot ``snapshot`` for the image ``image_id``."""
        count = int(np.prod(self.spatial_shape))
        flat = np.unpackbits(self.packed[self._row(image_id), snapshot], count=count)
        return flat.reshape((1, *self.spatial_shape)).astype(bool)

    def source(self, image_id: str, snapshot: int) -> str:
        """The snapshot file (``|<view>`` appended unless plain) that produced slot ``snapshot`` of ``image_id``."""
        return str(self.sources[self._row(image_id), snapshot])

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bank to ``path`` (``.npz``) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")  # unique per process (DDP ranks)
        np.savez_compressed(
            tmp,
            ids=np.asarray(self.ids),
            packed=self.packed,
            spatial_shape=np.asarray(self.spatial_shape),
            snapshot_names=np.asarray(self.snapshot_names),
            sources=np.asarray(self.sources),
        )
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> WeakPredictionBank:
        with np.load(path, allow_pickle=False) as data:
            return cls(
                ids=data["ids"].tolist(),
                packed=data["packed"],
                spatial_shape=data["spatial_shape"].tolist(),
                snapshot_names=data["snapshot_names"].tolist(),
                sources=data["sources"] if "sources" in data.files else None,
            )

    @staticmethod
    def cache_name(
        ids: Iterable[str],
        snapshots: Sequence[Path],
        image_size: int | Sequence[int],
        *,
        extra: Iterable[str] = (),
        prefix: str = "weak_predictions",
    ) -> str:
        """Cache file name: the image size plus a digest of the image list, the snapshot files and ``extra``.

        Snapshot files enter by name, size and modification time, so a retrained snapshot is a new entry.
        ``extra`` holds anything else the masks depend on (fold assignment, test-time perturbation).
        """
        size = image_size if isinstance(image_size, int) else "x".join(str(s) for s in image_size)
        digest = hashlib.sha1()
        for image_id in ids:
            digest.update(str(image_id).encode() + b"\0")
        for snap in snapshots:
            stat = snap.stat()
            # the parent folder tells apart same-named snapshots of different fold networks
            digest.update(f"{snap.parent.name}/{snap.name}:{stat.st_size}:{stat.st_mtime_ns}".encode() + b"\0")
        for part in extra:
            digest.update(str(part).encode() + b"\0")
        return f"{prefix}_{size}px_{digest.hexdigest()[:12]}.npz"

    @classmethod
    def from_snapshots(
        cls,
        snapshots: str | os.PathLike | Sequence[str | os.PathLike],
        network: nn.Module,
        datalist: Sequence[Mapping[str, Any]],
        load_transform: Callable[[Mapping[str, Any]], Mapping[str, Any]],
        image_size: int | Sequence[int],
        *,
        image_key: str = "image",
        cache_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        progress: bool = True,
    ) -> WeakPredictionBank:
        """Predict every image of ``datalist`` with every snapshot once (or load the cached result).

        Args:
            snapshots: a folder of ``weak_epoch_*.pt`` files or an explicit list of state_dict files.
            network: the architecture the snapshots were trained with (one logit channel); weights are
                replaced by each snapshot in turn.
            datalist: items with ``image_key`` holding the image path (the id used by :meth:`get`).
            load_transform: deterministic chain (load, normalise, resize) giving ``image`` ``(C, H, W)``.
            image_size: training resolution, part of the cache key.
            cache_dir: where the ``.npz`` cache lives (default: the snapshot folder; None and an explicit
                list: no cache).
            device: device for the forward passes.
            batch_size: images per forward pass.
            progress: show a tqdm bar.

        Raises:
            FileNotFoundError: no snapshot found.
        """
        if isinstance(snapshots, (str, os.PathLike)):
            folder = Path(snapshots)
            snapshot_paths = list_weak_snapshots(folder)
            if cache_dir is None:
                cache_dir = folder
        else:
            snapshot_paths = [Path(p) for p in snapshots]
        if not snapshot_paths:
            raise FileNotFoundError(
                f"no weak snapshots (weak_epoch_*.pt) in {snapshots}: run the bundle's configs/train_weak.json first"
            )
        if not datalist:
            raise ValueError("WeakPredictionBank.from_snapshots needs at least one image in the datalist")
        ids = [str(item[image_key]) for item in datalist]
        cache_path = Path(cache_dir) / cls.cache_name(ids, snapshot_paths, image_size) if cache_dir else None
        return cls.from_groups(
            [PredictionGroup(datalist, [("", network, snapshot_paths)])],
            load_transform,
            cache_path=cache_path,
            image_key=image_key,
            device=device,
            batch_size=batch_size,
            progress=progress,
        )

    @classmethod
    def from_groups(
        cls,
        groups: Sequence[PredictionGroup],
        load_transform: Callable[[Mapping[str, Any]], Mapping[str, Any]],
        *,
        perturbation: TestTimePerturbation | None = None,
        cache_path: str | os.PathLike | None = None,
        image_key: str = "image",
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        progress: bool = True,
    ) -> WeakPredictionBank:
        """Predict each group's images with that group's snapshots (or load ``cache_path`` when it exists).

        Args:
            groups: disjoint image sets with their networks; every group must give the same slot names
                (same network labels, snapshot stems and views), so slot ``s`` means the same for every image.
            load_transform: deterministic chain (load, normalise, resize) giving ``image`` ``(C, H, W)``.
            perturbation: when given, every snapshot predicts each image twice: as is (``plain``) and under
                this seeded test-time perturbation (view ``tta``).
            cache_path: ``.npz`` file to load if present, else to write (None: no cache). The caller keys
                its name on everything the masks depend on (see :meth:`cache_name`).
            image_key, device, batch_size, progress: as in :meth:`from_snapshots`.

        Raises:
            ValueError: no group, an empty group, an image in two groups, or groups with different slots.
        """
        if cache_path is not None and Path(cache_path).is_file():
            logger.info("loading cached weak predictions %s", cache_path)
            return cls.load(cache_path)
        views = [PLAIN_VIEW] + ([TTA_VIEW] if perturbation is not None else [])
        if not groups or any(not g.items for g in groups):
            raise ValueError("WeakPredictionBank.from_groups needs at least one group and one image per group")
        slot_names = groups[0].slot_names(views)
        for group in groups[1:]:
            if group.slot_names(views) != slot_names:
                raise ValueError(
                    f"every group must have the same slots; got {group.slot_names(views)} and {slot_names}"
                )
        ids = [str(item[image_key]) for group in groups for item in group.items]
        if len(set(ids)) != len(ids):
            raise ValueError("an image appears in two prediction groups (folds must be disjoint)")

        packed: np.ndarray | None = None
        sources = np.empty((len(ids), len(slot_names)), dtype=object)
        spatial_shape: tuple[int, ...] = ()
        row = 0
        with torch.no_grad(), tqdm(total=len(ids), desc="weak predictions", disable=not progress) as bar:
            for group in groups:
                # images are loaded one batch at a time (800 RGB images at 256 px would be ~630 MB as float32);
                # the snapshots' weights are small, so each batch runs through every snapshot in turn
                states = [
                    (
                        network,
                        str(snap),
                        {k.removeprefix("module."): v for k, v in torch.load(snap, map_location=device, weights_only=True).items()},
                    )
                    for _, network, snapshots in group.networks
                    for snap in snapshots
                ]
                for start in range(0, len(group.items), batch_size):
                    chunk = group.items[start : start + batch_size]
                    chunk_ids = [str(item[image_key]) for item in chunk]
                    batch = torch.stack(
                        [torch.as_tensor(convert_to_numpy(load_transform(dict(item))[image_key])) for item in chunk]
                    ).float().to(device)
                    if packed is None:
                        spatial_shape = tuple(batch.shape[2:])
                        packed = np.zeros((len(ids), len(slot_names), (int(np.prod(spatial_shape)) + 7) // 8), dtype=np.uint8)
                    rows = slice(row + start, row + start + batch.shape[0])
                    slot = 0
                    for network, snap, state in states:
                        network = network.to(device).eval()
                        network.load_state_dict(state)
                        for view in views:
                            if view == PLAIN_VIEW:
                                logits = _first_output(network(batch))[:, :1]
                            else:
                                logits = perturbation(network, batch, chunk_ids, slot)  # type: ignore[misc]
                            hard = (logits > 0).cpu().numpy().reshape(batch.shape[0], -1)
                            packed[rows, slot] = np.packbits(hard, axis=1)
                            sources[rows, slot] = snap if view == PLAIN_VIEW else f"{snap}|{view}"
                            slot += 1
                    bar.update(len(chunk))
                row += len(group.items)
        bank = cls(ids, packed, spatial_shape, slot_names, sources.astype(str))
        if cache_path is not None:
            bank.save(cache_path)
            logger.info("cached %d weak predictions per image for %d images in %s", bank.num_snapshots, len(ids), cache_path)
        return bank


class RandWeakPredictiond(RandomizableTransform, MapTransform):
    """With probability ``prob``, replace ``mask_key`` by a random weak snapshot's prediction of this image.

    Place it after the Type 1 :class:`~qgssl_monai.transforms.corruptions.RandMaskCorruptiond`: it overrides
    the synthetic mask with probability ``prob`` (p_type2, 0.05 in the paper) and recomputes its Dice.

    Args:
        keys: the ground-truth mask key (exactly one), ``(1, H, W)`` in ``{0, 1}``.
        bank: the precomputed :class:`WeakPredictionBank` (its spatial shape must equal the label's).
        prob: probability of using a weak prediction.
        mask_key: output mask, float32 ``(1, H, W)`` in ``{0, 1}``, same type family as the label.
        quality_key: output Dice of the mask against the label, 0-d float32 tensor.
        id_key: item key holding the image id the bank was built with (the original image path).
        corruption_key: if set, ``"weak:<snapshot name>"`` is written there when a weak mask is used.

    All randomness comes from ``self.R`` (reproducible under MONAI worker seeding and ``set_determinism``).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        keys: KeysCollection = "label",
        bank: WeakPredictionBank | None = None,
        prob: float = 0.05,
        mask_key: str = "mask",
        quality_key: str = "quality",
        id_key: str = "image_path",
        corruption_key: str | None = "corruption",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if len(self.keys) != 1:
            raise ValueError(f"RandWeakPredictiond takes exactly one label key, got {self.keys}")
        if bank is None or bank.num_snapshots == 0:
            raise ValueError("RandWeakPredictiond needs a WeakPredictionBank with at least one snapshot")
        self.bank = bank
        self.mask_key = mask_key
        self.quality_key = quality_key
        self.id_key = id_key
        self.corruption_key = corruption_key
        self._snapshot = 0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self._snapshot = int(self.R.randint(self.bank.num_snapshots))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        label_key = self.keys[0]
        if label_key not in d:
            if self.allow_missing_keys:
                return d
            raise KeyError(f"RandWeakPredictiond: key {label_key!r} missing")
        label = d[label_key]
        if self.id_key not in d:
            raise KeyError(f"RandWeakPredictiond: id key {self.id_key!r} missing (add the image path to each item)")
        weak = self.bank.get(str(d[self.id_key]), self._snapshot)
        if tuple(weak.shape[1:]) != tuple(label.shape[1:]):
            raise ValueError(
                f"weak predictions were cached at {weak.shape[1:]} but the label is {tuple(label.shape[1:])}; "
                "rebuild the WeakPredictionBank with the training image_size"
            )
        d[self.mask_key] = convert_to_dst_type(weak.astype(np.float32), label, dtype=torch.float32)[0]
        d[self.quality_key] = torch.tensor(dice_of_masks(weak, label), dtype=torch.float32)
        if self.corruption_key:
            d[self.corruption_key] = f"weak:{self.bank.snapshot_names[self._snapshot]}"
        return d
