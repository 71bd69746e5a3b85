"""Synthetic 3D volume generator: determinism, manifest layout, volume contents, readable by MONAI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from qgssl_monai.data.manifest import load_split
from qgssl_monai.data.synthetic3d import generate_synthetic_3d, synthetic_blob_volume


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(np.asarray(nib.load(p).dataobj).tobytes()).hexdigest()
        for p in sorted(folder.rglob("*.nii.gz"))
    }


def test_manifest_splits_counts_and_files(tmp_path: Path) -> None:
    manifest = generate_synthetic_3d(tmp_path / "syn", n_labeled=2, n_unlabeled=3, shape=(16, 20, 24), seed=1)
    content = json.loads(manifest.read_text())
    assert manifest == (tmp_path / "syn" / "manifest.json").resolve()
    assert [content[f"num_{s}"] for s in ("training", "unlabeled", "validation", "test")] == [2, 3, 2, 2]
    assert content["data_root"] == "." and content["split_seed"] == 1
    assert content["training"][0] == {"image": "images/case_000.nii.gz", "label": "labels/case_000.nii.gz"}
    assert content["unlabeled"] == [{"image": f"images/case_{i:03d}.nii.gz"} for i in (2, 3, 4)]
    # no label files are written for unlabeled cases
    assert sorted(p.name for p in (tmp_path / "syn" / "labels").iterdir()) == [
        f"case_{i:03d}.nii.gz" for i in (0, 1, 5, 6, 7, 8)
    ]
    entries = load_split(manifest, "training")
    assert Path(entries[1]["label"]).is_file() and Path(entries[1]["image"]).is_absolute()


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        generate_synthetic_3d(tmp_path / name, n_labeled=1, n_unlabeled=1, n_validation=0, n_test=0, seed=seed)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a")["images/case_000.nii.gz"] != _digest(tmp_path / "c")["images/case_000.nii.gz"]


def test_blob_is_one_bright_interior_object() -> None:
    from scipy.ndimage import label as connected_components

    for seed in range(4):
        image, label = synthetic_blob_volume(np.random.RandomState(seed), (32, 32, 32))
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert set(np.unique(label).tolist()) == {0, 1}
        assert 0.01 < label.mean() < 0.12
        _, count = connected_components(label)
        assert count == 1
        # object never touches the volume border
        assert label[[0, -1]].sum() == 0 and label[:, [0, -1]].sum() == 0 and label[..., [0, -1]].sum() == 0
        # clearly brighter than the background: a threshold separates them with Dice > 0.9
        predicted = image > 0.5
        dice = 2 * np.logical_and(predicted, label > 0).sum() / (predicted.sum() + label.sum())
        assert dice > 0.9


def test_volumes_load_through_monai(tmp_path: Path) -> None:
    manifest = generate_synthetic_3d(tmp_path, n_labeled=1, n_unlabeled=0, n_validation=0, n_test=0, shape=(16, 18, 20))
    loader = Compose([LoadImaged(keys=("image", "label")), EnsureChannelFirstd(keys=("image", "label"))])
    item = loader(load_split(manifest, "training")[0])
    assert tuple(item["image"].shape) == (1, 16, 18, 20) and tuple(item["label"].shape) == (1, 16, 18, 20)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="number of unlabeled cases"):
        generate_synthetic_3d("/nonexistent-never-written", n_labeled=1, n_unlabeled=-1)
    with pytest.raises(ValueError, match="three sides >= 8"):
        synthetic_blob_volume(np.random.RandomState(0), (4, 32, 32))
