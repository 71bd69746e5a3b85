"""3D ``qgssl prepare`` presets on tiny fake layouts of LA 2018, Pancreas-CT and BraTS 2019."""

from __future__ import annotations

import json
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
from monai.transforms import AsDiscreted, Compose, EnsureChannelFirstd, LoadImaged

from qgssl_monai.data.cli import register  # noqa: F401  (imports presets -> presets_3d)
from qgssl_monai.data.manifest import ManifestError, load_split
from qgssl_monai.data.presets import PRESETS, prepare_manifest
from qgssl_monai.data.presets_3d import PAPER_LABEL_RATIOS, case_number, volume_stem

SHAPE = (6, 7, 8)


def _nifti(path: Path, value: int, dtype: type = np.uint8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros(SHAPE, dtype=dtype)
    data[2:4, 2:5, 3:6] = value
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def _nrrd(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros(SHAPE, dtype=np.uint8)
    data[2:4, 2:5, 3:6] = value
    itk.imwrite(itk.image_from_array(data), str(path))


def _load(entry: dict) -> dict:
    chain = Compose(
        [
            LoadImaged(keys=("image", "label")),
            EnsureChannelFirstd(keys=("image", "label")),
            AsDiscreted(keys="label", threshold=0.5),
        ]
    )
    return chain(entry)


def test_presets_registered_with_paper_ratios() -> None:
    for name in ("la2018", "pancreas-ct", "brats2019"):
        assert name in PRESETS and name in PAPER_LABEL_RATIOS
    assert PAPER_LABEL_RATIOS["la2018"] == (0.05, 0.1, 0.2)
    assert PAPER_LABEL_RATIOS["pancreas-ct"] == (0.1, 0.2) == PAPER_LABEL_RATIOS["brats2019"]


def test_file_name_helpers() -> None:
    assert volume_stem(Path("a/PANCREAS_0007.nii.gz")) == "PANCREAS_0007"
    assert volume_stem(Path("lgemri.nrrd")) == "lgemri"
    assert case_number(Path("label0007.nii.gz")) == 7 == case_number(Path("PANCREAS_0007.nii.gz"))
    with pytest.raises(ManifestError, match="case number"):
        case_number(Path("image.nii.gz"))


def test_la2018_nrrd_layout_with_label_ratio(tmp_path: Path) -> None:
    root = tmp_path / "LA"
    for index in range(10):
        case = root / "Training Set" / f"CASE{index:02d}"
        _nrrd(case / "lgemri.nrrd", 90)
        _nrrd(case / "laendo.nrrd", 255)
    _nrrd(root / "Training Set" / "NOLABEL" / "lgemri.nrrd", 80)  # image without laendo: unlabeled
    out = prepare_manifest("la2018", root, tmp_path / "la.json", seed=0, labeled_fraction=0.2)
    header = json.loads(out.read_text())
    # 10 labeled cases -> 7/1/2; 0.2 of 7 training cases keep labels (round(1.4) = 1)
    assert [header[f"num_{s}"] for s in ("training", "validation", "test", "unlabeled")] == [1, 1, 2, 7]
    assert header["preset"] == "la2018" and header["labeled_fraction"] == 0.2
    assert header["training"][0]["image"].startswith("Training Set/CASE")
    assert header["training"][0]["label"].endswith("/laendo.nrrd")
    assert {"image": "Training Set/NOLABEL/lgemri.nrrd"} in header["unlabeled"]
    item = _load(load_split(out, "training")[0])
    assert item["image"].shape[0] == 1 and sorted(item["image"].shape[1:]) == sorted(SHAPE)
    assert item["image"].shape == item["label"].shape
    assert set(np.unique(np.asarray(item["label"])).tolist()) == {0.0, 1.0}  # {0, 255} binarised
    assert int(np.asarray(item["label"]).sum()) == 2 * 3 * 3


def test_pancreas_tcia_layout_pairs_by_case_number(tmp_path: Path) -> None:
    root = tmp_path / "Pancreas"
    for number in range(1, 11):
        _nifti(root / "data" / f"PANCREAS_{number:04d}.nii.gz", 100, np.int16)
        if number != 10:  # case 10 has no label: unlabeled
            _nifti(root / "TCIA_pancreas_labels" / f"label{number:04d}.nii.gz", 1)
    out = prepare_manifest("pancreas-ct", root, tmp_path / "p.json", labeled_fraction=0.2)
    header = json.loads(out.read_text())
    labeled = header["training"] + header["validation"] + header["test"]
    # 9 labeled cases -> 6/1/2 (0.7 * 9 = 6.3); 0.2 of 6 keep labels (1), 5 + the label-less case 10 unlabeled
    assert [header[f"num_{s}"] for s in ("training", "validation", "test", "unlabeled")] == [1, 1, 2, 6]
    for entry in labeled:
        assert case_number(Path(entry["image"])) == case_number(Path(entry["label"]))
        assert entry["image"].startswith("data/") and entry["label"].startswith("TCIA_pancreas_labels/")
    assert {"image": "data/PANCREAS_0010.nii.gz"} in header["unlabeled"]


def test_pancreas_image_label_layout_and_errors(tmp_path: Path) -> None:
    root = tmp_path / "P2"
    for number in (1, 2, 3):
        _nifti(root / "image" / f"case{number}.nii.gz", 50)
        _nifti(root / "label" / f"case{number}.nii.gz", 1)
    scanned = PRESETS["pancreas-ct"].scan(root)
    assert [Path(e["image"]).name for e in scanned.labeled] == ["case1.nii.gz", "case2.nii.gz", "case3.nii.gz"]
    _nifti(root / "label" / "case9.nii.gz", 1)
    with pytest.raises(ManifestError, match=r"labels without an image .*\[9\]"):
        PRESETS["pancreas-ct"].scan(root)
    with pytest.raises(ManifestError, match="no Pancreas-CT layout"):
        PRESETS["pancreas-ct"].scan(tmp_path)


def test_brats2019_whole_tumour_and_unlabeled_validation_cases(tmp_path: Path) -> None:
    root = tmp_path / "MICCAI_BraTS_2019_Data_Training"
    for grade, count in (("HGG", 3), ("LGG", 2)):
        for index in range(count):
            case = f"BraTS19_{grade}_{index}"
            _nifti(root / grade / case / f"{case}_flair.nii.gz", 70, np.int16)
            _nifti(root / grade / case / f"{case}_t1.nii.gz", 30, np.int16)
            _nifti(root / grade / case / f"{case}_seg.nii.gz", 4 if index % 2 else 2)
    _nifti(root / "Validation" / "BraTS19_VAL_0" / "BraTS19_VAL_0_flair.nii.gz", 70, np.int16)
    scanned = PRESETS["brats2019"].scan(root)
    assert len(scanned.labeled) == 5 and len(scanned.unlabeled) == 1
    assert all(e["image"].endswith("_flair.nii.gz") and e["label"].endswith("_seg.nii.gz") for e in scanned.labeled)
    item = _load(scanned.labeled[1])
    assert int(np.asarray(item["label"]).sum()) == 2 * 3 * 3  # labels 2/4 -> whole tumour 1
    assert set(np.unique(np.asarray(item["label"])).tolist()) == {0.0, 1.0}
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no BraTS case folders"):
        PRESETS["brats2019"].scan(tmp_path / "empty")


def test_la2018_missing_layout_names_folder(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no LA case folders"):
        PRESETS["la2018"].scan(tmp_path)
    with pytest.raises(ManifestError, match="data folder not found"):
        PRESETS["la2018"].scan(tmp_path / "absent")
