"""``qgssl prepare`` presets for the public 3D layouts used by FDPL and the 3D SSL literature.

Registered into :data:`qgssl_monai.data.presets.PRESETS` on import (``presets.py`` imports this module):

============== ============================================================================ ==============
preset         layout found under ``--root``                                                paper ratios
============== ============================================================================ ==============
``la2018``     2018 Left Atrium challenge: ``[Training Set/]<case>/lgemri.nrrd`` + ``laendo.nrrd`` 5/10/20 %
``pancreas-ct`` ``image/*.nii.gz`` + ``label/*.nii.gz``, or TCIA-converted ``data/PANCREAS_xxxx.nii.gz``  10/20 %
               + ``TCIA_pancreas_labels/label00xx.nii.gz`` (paired by case number)
``brats2019``  ``[.../HGG|LGG/]<case>/<case>_flair.nii.gz`` + ``<case>_seg.nii.gz``         10/20 %
============== ============================================================================ ==============

The manifests point at the original files (nothing is copied or converted); volumes are read by MONAI's
``LoadImaged`` (ITK for NRRD, nibabel for NIfTI). Labels are used as binary targets ``label > 0`` (the 3D
transform chain of ``bundles/ssl_segmentation/configs/train_3d.json`` binarises them): LA ``laendo`` is
{0, 255}, Pancreas {0, 1}, and BraTS ``seg > 0`` is the whole tumour (labels 1, 2, 4). Cases with an image
but no label (BraTS validation cases, LA cases without ``laendo.nrrd``) go to ``unlabeled``.

The label ratios the papers use are listed in :data:`PAPER_LABEL_RATIOS`; select one with
``qgssl prepare <preset> --labeled-fraction 0.1`` (that fraction of the training split keeps its labels,
the rest move to ``unlabeled``). The splits themselves follow the shared seeded split of ``qgssl prepare``.
The UA-MT h5-converted LA layout (``mri_norm2.h5``) is not supported: MONAI has no h5 reader.
"""

from __future__ import annotations

import re
from pathlib import Path

from qgssl_monai.data.manifest import ManifestError, natural_key
from qgssl_monai.data.preset_registry import DatasetInfo, ScanResult, register_preset

__all__ = [
    "PAPER_LABEL_RATIOS",
    "VOLUME_SUFFIXES",
    "case_number",
    "scan_brats2019",
    "scan_la2018",
    "scan_pancreas_ct",
    "volume_stem",
]

#: labeled fractions of the training split used by the semi-supervised 3D papers, per preset
PAPER_LABEL_RATIOS: dict[str, tuple[float, ...]] = {
    "la2018": (0.05, 0.1, 0.2),
    "pancreas-ct": (0.1, 0.2),
    "brats2019": (0.1, 0.2),
}
VOLUME_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
_NUMBER = re.compile(r"(\d+)")


def volume_stem(path: Path) -> str:
    """File name without its volume suffix (``"a.nii.gz"`` -> ``"a"``)."""
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _volumes(folder: Path) -> list[Path]:
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(VOLUME_SUFFIXES)
    ]
    return sorted(files, key=lambda p: natural_key(p.name))


def case_number(path: Path) -> int:
    """The last integer in a file name (``PANCREAS_0007.nii.gz`` and ``label0007.nii.gz`` -> 7)."""
    numbers = _NUMBER.findall(volume_stem(path))
    if not numbers:
        raise ManifestError(f"cannot read a case number from {path}")
    return int(numbers[-1])


def _by_case_number(folder: Path, what: str) -> dict[int, Path]:
    """Volumes of ``folder`` keyed by :func:`case_number`; duplicates raise ``ManifestError``."""
    table: dict[int, Path] = {}
    for path in _volumes(folder):
        number = case_number(path)
        if number in table:
            raise ManifestError(
                f"two Pancreas-CT {what} share case number {number} in {folder}: {table[number].name}, {path.name}"
            )
        table[number] = path
    return table


def _require_dir(root: Path) -> None:
    if not root.is_dir():
        raise ManifestError(f"data folder not found: {root}")


@register_preset(
    "la2018",
    description="2018 Left Atrium challenge: [Training Set/]<case>/lgemri.nrrd + laendo.nrrd (3D LGE-MRI)",
    info=DatasetInfo(
        modality="3D LGE-MRI",
        source="http://atriaseg2018.cardiacatlas.org/",
        citation=(
            'Xiong et al., "A global benchmark of algorithms for segmenting the left atrium from late '
            'gadolinium-enhanced cardiac magnetic resonance imaging", Medical Image Analysis 67:101832, 2021.'
        ),
        licence="Research use under the 2018 Atrial Segmentation Challenge data terms.",
        labels={"0": "background", "1": "left atrium (laendo > 0)"},
    ),
)
def scan_la2018(root: Path) -> ScanResult:
    """Case folders holding ``lgemri.nrrd`` (+ ``laendo.nrrd``), in ``root/Training Set/`` or ``root/``."""
    _require_dir(root)
    base = root / "Training Set" if (root / "Training Set").is_dir() else root
    cases = sorted((p for p in base.iterdir() if (p / "lgemri.nrrd").is_file()), key=lambda p: natural_key(p.name))
    if not cases:
        raise ManifestError(f"no LA case folders (<case>/lgemri.nrrd) under {base}")
    labeled, unlabeled = [], []
    for case in cases:
        image, label = case / "lgemri.nrrd", case / "laendo.nrrd"
        if label.is_file():
            labeled.append({"image": str(image), "label": str(label)})
        else:
            unlabeled.append({"image": str(image)})
    return ScanResult(labeled=labeled, unlabeled=unlabeled)


@register_preset(
    "pancreas-ct",
    description="Pancreas-CT (NIH/TCIA): image/ + label/ NIfTI, or data/PANCREAS_xxxx + TCIA_pancreas_labels/labelxxxx",
    info=DatasetInfo(
        modality="3D contrast-enhanced abdominal CT",
        source="https://www.cancerimagingarchive.net/collection/pancreas-ct/",
        citation=(
            'Roth et al., "DeepOrgan: Multi-level deep convolutional networks for automated pancreas '
            'segmentation", MICCAI 2015, LNCS 9349, pp. 556-564 '
            "(data: TCIA Pancreas-CT, doi:10.7937/K9/TCIA.2016.tNB1kqBU)."
        ),
        licence="CC BY 3.0 (TCIA Pancreas-CT).",
        labels={"0": "background", "1": "pancreas"},
    ),
)
def scan_pancreas_ct(root: Path) -> ScanResult:
    """Image and label volumes paired by case number (the last integer of each file name)."""
    _require_dir(root)
    layouts = (("image", "label"), ("images", "labels"), ("data", "TCIA_pancreas_labels"))
    for image_name, label_name in layouts:
        if (root / image_name).is_dir() and (root / label_name).is_dir():
            image_dir, label_dir = root / image_name, root / label_name
            break
    else:
        tried = "; ".join(f"'{i}/' + '{lbl}/'" for i, lbl in layouts)
        raise ManifestError(f"no Pancreas-CT layout under {root}: expected {tried}")
    images = _by_case_number(image_dir, "images")
    labels = _by_case_number(label_dir, "labels")
    if not images:
        raise ManifestError(f"no volumes ({', '.join(VOLUME_SUFFIXES)}) in {image_dir}")
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise ManifestError(f"Pancreas-CT labels without an image in {image_dir}: case(s) {orphans[:10]}")
    labeled = [{"image": str(images[n]), "label": str(labels[n])} for n in sorted(images) if n in labels]
    unlabeled = [{"image": str(images[n])} for n in sorted(images) if n not in labels]
    return ScanResult(labeled=labeled, unlabeled=unlabeled)


@register_preset(
    "brats2019",
    description="BraTS 2019: [HGG|LGG/]<case>/<case>_flair.nii.gz + <case>_seg.nii.gz; target whole tumour (seg > 0)",
    info=DatasetInfo(
        modality="3D brain MRI (FLAIR)",
        source="https://www.med.upenn.edu/cbica/brats2019/data.html",
        citation=(
            'Menze et al., "The Multimodal Brain Tumor Image Segmentation Benchmark (BRATS)", IEEE TMI '
            '34(10):1993-2024, 2015; Bakas et al., "Advancing The Cancer Genome Atlas glioma MRI collections '
            'with expert segmentation labels and radiomic features", Scientific Data 4:170117, 2017.'
        ),
        licence="BraTS 2019 data use agreement (research use; cite the BraTS papers).",
        labels={"0": "background", "1": "whole tumour (seg > 0)"},
    ),
)
def scan_brats2019(root: Path) -> ScanResult:
    """Every ``<case>/<case>_flair.nii.gz`` below ``root``; labeled when ``<case>_seg.nii.gz`` is beside it."""
    _require_dir(root)
    flairs = sorted(root.rglob("*_flair.nii*"), key=lambda p: natural_key(str(p.relative_to(root))))
    flairs = [p for p in flairs if p.is_file() and volume_stem(p).removesuffix("_flair") == p.parent.name]
    if not flairs:
        raise ManifestError(f"no BraTS case folders (<case>/<case>_flair.nii.gz) under {root}")
    labeled, unlabeled = [], []
    seen: dict[str, Path] = {}
    for flair in flairs:
        case = flair.parent.name
        if case in seen:
            raise ManifestError(f"BraTS case {case} appears twice under {root}: {seen[case]} and {flair.parent}")
        seen[case] = flair.parent
        segs = [flair.parent / f"{case}_seg{suffix}" for suffix in (".nii.gz", ".nii")]
        seg = next((s for s in segs if s.is_file()), None)
        if seg is None:
            unlabeled.append({"image": str(flair)})
        else:
            labeled.append({"image": str(flair), "label": str(seg)})
    return ScanResult(labeled=labeled, unlabeled=unlabeled)
