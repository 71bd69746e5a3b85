"""Type 2 variable-quality masks: predictions of weak (early-epoch) segmentation networks.

A U-Net trained from scratch on the labeled split is snapshotted at a few early epochs
(:class:`qgssl_monai.handlers.snapshots.WeakSnapshotSaver`, default epochs 1, 3, 5, 10, 15, 20). When g is
trained, a sample's mask is, with probability ``p_weak``, the prediction of a randomly chosen snapshot
instead of a synthetic (Type 1) corruption.

Efficiency choice: running six networks inside data-loader workers for every sample would dominate the
cost of training g and would need the networks in every worker. Instead :class:`WeakPredictionBank`
runs each snapshot once over every training image at the training resolution, stores the hard masks
bit-packed in memory (``N x S x H*W / 8`` bytes: 800 images x 6 snapshots at 256 px is ~39 MB) and
caches them on disk next to the snapshots, keyed by image size, image list and snapshot files, so
later runs load them in a second. :class:`RandWeakPredictiond` then only looks a mask up.

The cached masks are aligned with the *deterministic* (load + resize) image, so place the transform
before any spatial augmentation and apply that augmentation jointly to image, label and mask.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
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
    "RandWeakPredictiond",
    "WeakPredictionBank",
    "list_weak_snapshots",
    "weak_snapshot_filename",
    "dice_of_masks",
]

logger = logging.getLogger(__name__)

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


class WeakPredictionBank:
    """Hard masks of every weak snapshot for every training image, bit-packed.

    Args:
        ids: one id per image (the image path string of the datalist item).
        packed: ``(N, S, ceil(prod(spatial_shape) / 8))`` uint8 from ``np.packbits`` of the flattened masks.
        spatial_shape: mask spatial shape, e.g. ``(H, W)``.
        snapshot_names: S names (snapshot file stems), used in the ``corruption`` description.
    """

    def __init__(
        self, ids: Sequence[str], packed: np.ndarray, spatial_shape: Sequence[int], snapshot_names: Sequence[str]
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

    @property
    def num_snapshots(self) -> int:
        return len(self.snapshot_names)

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, image_id: str, snapshot: int) -> np.ndarray:
        """The ``(1, *spatial_shape)`` bool mask of ``snapshot`` for the image ``image_id``."""
        row = self.index.get(str(image_id))
        if row is None:
            raise KeyError(f"no weak predictions cached for {image_id}; rebuild the WeakPredictionBank for this datalist")
        count = int(np.prod(self.spatial_shape))
        flat = np.unpackbits(self.packed[row, snapshot], count=count)
        return flat.reshape((1, *self.spatial_shape)).astype(bool)

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
            )

    @staticmethod
    def cache_name(ids: Iterable[str], snapshots: Sequence[Path], image_size: int | Sequence[int]) -> str:
        """Cache file name: the image size plus a digest of the image list and the snapshot files."""
        size = image_size if isinstance(image_size, int) else "x".join(str(s) for s in image_size)
        digest = hashlib.sha1()
        for image_id in ids:
            digest.update(str(image_id).encode() + b"\0")
        for snap in snapshots:
            stat = snap.stat()
            digest.update(f"{snap.name}:{stat.st_size}:{stat.st_mtime_ns}".encode() + b"\0")
        return f"weak_predictions_{size}px_{digest.hexdigest()[:12]}.npz"

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
        if cache_path is not None and cache_path.is_file():
            logger.info("loading cached weak predictions %s", cache_path)
            return cls.load(cache_path)

        # images are loaded one batch at a time (800 RGB images at 256 px would be ~630 MB as float32);
        # the snapshots' weights are small, so each batch runs through every snapshot in turn
        states = [
            {k.removeprefix("module."): v for k, v in torch.load(p, map_location=device, weights_only=True).items()}
            for p in snapshot_paths
        ]
        network = network.to(device).eval()
        packed: np.ndarray | None = None
        spatial_shape: tuple[int, ...] = ()
        with torch.no_grad(), tqdm(total=len(ids), desc="weak predictions", disable=not progress) as bar:
            for start in range(0, len(datalist), batch_size):
                chunk = datalist[start : start + batch_size]
                batch = torch.stack(
                    [torch.as_tensor(convert_to_numpy(load_transform(dict(item))[image_key])) for item in chunk]
                ).float().to(device)
                if packed is None:
                    spatial_shape = tuple(batch.shape[2:])
                    packed = np.zeros((len(ids), len(states), (int(np.prod(spatial_shape)) + 7) // 8), dtype=np.uint8)
                for s, state in enumerate(states):
                    network.load_state_dict(state)
                    logits = network(batch)
                    if isinstance(logits, (list, tuple)):
                        logits = logits[0]
                    hard = (logits[:, :1] > 0).cpu().numpy().reshape(batch.shape[0], -1)
                    packed[start : start + batch.shape[0], s] = np.packbits(hard, axis=1)
                bar.update(len(chunk))
        bank = cls(ids, packed, spatial_shape, [p.stem for p in snapshot_paths])
        if cache_path is not None:
            bank.save(cache_path)
            logger.info("cached weak predictions of %d snapshots x %d images in %s", bank.num_snapshots, len(ids), cache_path)
        return bank


class RandWeakPredictiond(RandomizableTransform, MapTransform):
    """With probability ``prob``, replace ``mask_key`` by a random weak snapshot's prediction of this image.

    Place it after the Type 1 :class:`~qgssl_monai.transforms.corruptions.RandMaskCorruptiond`: it overrides
    the synthetic mask with probability ``prob`` (p_weak, 0.05 in the paper) and recomputes its Dice.

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
