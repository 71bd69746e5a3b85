"""``build_cached_dataset``: the disk-backed cache gives the same samples as MONAI's CacheDataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from qgssl_monai.data.cache import build_cached_dataset
from qgssl_monai.data.manifest import load_split
from qgssl_monai.transforms.io import get_seg_transforms


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_tensor() if hasattr(t, "as_tensor") else t


def _batch(dataset, seed: int) -> dict:
    dataset.transform.set_random_state(seed=seed)
    return next(iter(DataLoader(dataset, batch_size=len(dataset))))


def test_disk_cache_matches_memory_cache_and_survives_missing_sources(demo_manifest: Path, tmp_path: Path) -> None:
    # copy the files, so deleting them after the first fill does not touch the session's demo set
    items = load_split(demo_manifest, "training")[:6]
    local = []
    for i, item in enumerate(items):
        entry = {}
        for key in ("image", "label"):
            dst = tmp_path / "src" / f"{i}_{key}{Path(item[key]).suffix}"
            dst.parent.mkdir(exist_ok=True)
            shutil.copy(item[key], dst)
            entry[key] = str(dst)
        local.append(entry)
    cache = tmp_path / "cache"
    for train in (True, False):
        memory = build_cached_dataset(local, get_seg_transforms(image_size=32, train=train, rgb=True))
        build_cached_dataset(local[:2], get_seg_transforms(image_size=32, train=train, rgb=True), cache_dir=cache / str(train))
        # a mix of entries read back from disk (0, 1) and computed now (2..5) must still collate
        disk = build_cached_dataset(local, get_seg_transforms(image_size=32, train=train, rgb=True), cache_dir=cache / str(train))
        a, b = _batch(memory, seed=7), _batch(disk, seed=7)
        assert a["image"].shape == b["image"].shape == (6, 3, 32, 32)
        assert torch.equal(_plain(a["image"]), _plain(b["image"])) and torch.equal(_plain(a["label"]), _plain(b["label"]))
    shutil.rmtree(tmp_path / "src")
    # every entry is on disk now: a new run needs no source file
    again = build_cached_dataset(local, get_seg_transforms(image_size=32, train=False, rgb=True), cache_dir=cache / "False")
    assert torch.equal(_plain(_batch(again, seed=7)["image"]), _plain(a["image"]))


def test_random_tail_stays_random_and_seedable(demo_manifest: Path, tmp_path: Path) -> None:
    items = load_split(demo_manifest, "training")[:4]
    disk = build_cached_dataset(items, get_seg_transforms(image_size=32, train=True, augment=True, rgb=True), cache_dir=tmp_path)
    first, second, replay = _batch(disk, seed=1), _batch(disk, seed=2), _batch(disk, seed=1)
    assert not torch.equal(_plain(first["image"]), _plain(second["image"]))  # augmentation not frozen into the cache
    assert torch.equal(_plain(first["image"]), _plain(replay["image"]))
