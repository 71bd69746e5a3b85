"""``qgssl prepare`` presets: turn a data set's download layout into a manifest.

A preset is a registered scanner ``scan(root: Path) -> ScanResult`` plus the data set's provenance
(:class:`DatasetInfo`). :func:`prepare_manifest` runs the scanner, adds images from optional extra
unlabeled sources (the cross-source setting: CVC-ClinicDB labeled + Kvasir-SEG images unlabeled), makes the
seeded 70:10:20 split (grouped when the scanner reports groups, e.g. CVC-ClinicDB video sequences) and writes
the manifest with :func:`qgssl_monai.data.manifest.write_manifest`.

The registry lives in ``preset_registry.py``; other modules add presets with :func:`register_preset`
(3D presets live in ``presets_3d.py``, imported here so that :data:`PRESETS` is complete once this module is
imported; neither module imports the other's importer, so there is no import cycle).
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import qgssl_monai.data.presets_3d  # noqa: F401  (registers the 3D presets into PRESETS)
from qgssl_monai.data.manifest import (
    SPLIT_RATIOS,
    ManifestError,
    grouped_split,
    hold_out_labels,
    load_manifest,
    natural_key,
    resolve_data_root,
    write_manifest,
)
from qgssl_monai.data.preset_registry import PRESETS, DatasetInfo, Preset, ScanResult, register_preset

__all__ = [
    "CVC_CLINICDB_SEQUENCE_ENDS",
    "GROUP_OF_STEM",
    "IMAGE_SUFFIXES",
    "MASK_SUFFIXES",
    "PRESETS",
    "DatasetInfo",
    "Preset",
    "ScanResult",
    "cvc_clinicdb_group",
    "cvc_clinicdb_sequence",
    "item_groups",
    "list_images",
    "mask_key",
    "pair_by_stem",
    "prepare_manifest",
    "read_groups",
    "register_preset",
    "scan_unlabeled_folder",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
# mask file names are the image stem plus one of these (matched case-insensitively)
MASK_SUFFIXES: tuple[str, ...] = ("_mask", "_segmentation", "_lesion", "_Segmentation")
# folder names that hold annotations, never unlabeled images
_ANNOTATION_DIRS: frozenset[str] = frozenset(
    {"masks", "mask", "labels", "label", "ground truth", "groundtruth", "ground_truth", "gt", "annotations"}
)
# last frame number of each of the 29 CVC-ClinicDB video sequences (README of the data set)
CVC_CLINICDB_SEQUENCE_ENDS: tuple[int, ...] = (
    25, 50, 67, 78, 103, 126, 151, 177, 199, 205, 227, 252, 277, 297, 317,
    342, 363, 383, 408, 428, 447, 466, 478, 503, 528, 546, 571, 591, 612,
)  # fmt: skip
_PH2_CASE = re.compile(r"^IMD\d+$")
_ISIC_IMAGE = re.compile(r"^ISIC_(\d+)\.(jpe?g|png)$", re.IGNORECASE)
_ISIC_MASK = re.compile(r"^ISIC_(\d+)_segmentation\.png$", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------- helpers


def list_images(folder: Path, *, recursive: bool = False) -> list[Path]:
    """Image files (by :data:`IMAGE_SUFFIXES`) in ``folder``, naturally sorted; hidden files skipped."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    files = [
        p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    ]
    return sorted(files, key=lambda p: natural_key(str(p.relative_to(folder))))


def mask_key(stem: str) -> str:
    """The image stem a mask file stem belongs to: ``"a_mask"``/``"a_segmentation"``/``"a_lesion"`` -> ``"a"``."""
    lowered = stem.lower()
    for suffix in MASK_SUFFIXES:
        if lowered.endswith(suffix.lower()):
            return stem[: -len(suffix)]
    return stem


def _find_dir(root: Path, candidates: Sequence[str], what: str) -> Path:
    """First existing ``root/candidate`` folder; ManifestError naming the folder and the layouts tried."""
    if not root.is_dir():
        raise ManifestError(f"data folder not found: {root}")
    for candidate in candidates:
        folder = root / candidate
        if folder.is_dir():
            return folder
    tried = ", ".join(f"'{c}/'" for c in candidates)
    raise ManifestError(f"no {what} folder under {root}: expected one of {tried}")


def _by_key(files: Iterable[Path], key: Callable[[Path], str], folder: Path, what: str) -> dict[str, Path]:
    table: dict[str, Path] = {}
    for path in files:
        name = key(path)
        if name in table:
            raise ManifestError(
                f"two {what} files share the name {name!r} in {folder}: {table[name].name}, {path.name}"
            )
        table[name] = path
    return table


def pair_by_stem(
    images: Sequence[Path], masks: Sequence[Path], *, image_dir: Path, mask_dir: Path
) -> list[dict[str, str]]:
    """Pair image and mask files by stem (mask suffixes from :data:`MASK_SUFFIXES` tolerated).

    Returns:
        ``[{"image": abs, "label": abs}, ...]`` in natural image order.

    Raises:
        ManifestError: no images, duplicate stems, or images/masks without a partner (all listed).
    """
    if not images:
        raise ManifestError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {image_dir}")
    by_image = _by_key(images, lambda p: p.stem, image_dir, "image")
    by_mask = _by_key(masks, lambda p: mask_key(p.stem), mask_dir, "mask")
    lonely_images = sorted(set(by_image) - set(by_mask), key=natural_key)
    lonely_masks = sorted(set(by_mask) - set(by_image), key=natural_key)
    if lonely_images or lonely_masks:
        lines = [f"images in {image_dir} and masks in {mask_dir} do not pair up by file stem:"]
        if lonely_images:
            lines.append(f"  {len(lonely_images)} image(s) without a mask: {', '.join(lonely_images[:10])}")
        if lonely_masks:
            lines.append(f"  {len(lonely_masks)} mask(s) without an image: {', '.join(lonely_masks[:10])}")
        raise ManifestError("\n".join(lines))
    return [{"image": str(by_image[k]), "label": str(by_mask[k])} for k in sorted(by_image, key=natural_key)]


def _is_annotation(path: Path, root: Path) -> bool:
    parts = [p.lower() for p in path.relative_to(root).parts[:-1]]
    stem = path.stem.lower()
    return (
        any(p in _ANNOTATION_DIRS for p in parts)
        or mask_key(path.stem) != path.stem
        or stem.endswith("_superpixels")
    )


def scan_unlabeled_folder(root: Path) -> list[dict[str, str]]:
    """Unlabeled images of a folder: ``root/images/`` if present, else every image below ``root``.

    Annotation files are skipped: anything under a ``masks``/``labels``/``ground truth``-like folder, names
    with a mask suffix, and ISIC ``*_superpixels`` files.

    Raises:
        ManifestError: ``root`` is missing or holds no images.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise ManifestError(f"unlabeled image folder not found: {root}")
    base = root / "images" if (root / "images").is_dir() else root
    files = [p for p in list_images(base, recursive=True) if not _is_annotation(p, base)]
    if not files:
        raise ManifestError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {base}")
    return [{"image": str(p)} for p in files]


def cvc_clinicdb_sequence(frame: int) -> int:
    """Video sequence (1..29) of a CVC-ClinicDB frame number (1..612)."""
    if not 1 <= frame <= CVC_CLINICDB_SEQUENCE_ENDS[-1]:
        raise ManifestError(f"CVC-ClinicDB frame number {frame} outside 1..{CVC_CLINICDB_SEQUENCE_ENDS[-1]}")
    return bisect.bisect_left(CVC_CLINICDB_SEQUENCE_ENDS, frame) + 1


# ----------------------------------------------------------------------------------------------- presets

_POLYP = {"0": "background", "1": "polyp"}
_LESION = {"0": "background", "1": "lesion"}


def cvc_clinicdb_group(stem: str) -> str:
    """Group label of a CVC-ClinicDB frame file stem (``"105"`` -> ``"sequence-06"``)."""
    return f"sequence-{cvc_clinicdb_sequence(int(stem)):02d}"


#: preset -> group label of an image file stem, for presets whose groups follow from file names (lets
#: ``qgssl subset-labels`` recover the groups of an existing manifest without re-scanning the data)
GROUP_OF_STEM: dict[str, Callable[[str], str]] = {"cvc-clinicdb": cvc_clinicdb_group}


def _scan_image_mask_dirs(image_dir: Path, mask_dir: Path) -> ScanResult:
    """Labeled pairs of two folders, matched by file stem (mask suffixes tolerated)."""
    return ScanResult(
        labeled=pair_by_stem(list_images(image_dir), list_images(mask_dir), image_dir=image_dir, mask_dir=mask_dir)
    )


@register_preset(
    "folders",
    description="generic: images/ paired with masks/ by file stem (mask suffixes _mask, _segmentation, _lesion ok)",
    info=DatasetInfo(modality="", labels={"0": "background", "1": "foreground"}),
)
def scan_folders(root: Path) -> ScanResult:
    """``root/images/*`` + ``root/masks/*`` paired by stem."""
    image_dir = _find_dir(root, ("images", "image", "imgs"), "image")
    mask_dir = _find_dir(root, ("masks", "mask", "labels", "ground_truth", "GroundTruth"), "mask")
    return _scan_image_mask_dirs(image_dir, mask_dir)


@register_preset(
    "kvasir-seg",
    description="Kvasir-SEG: images/*.jpg + masks/* (root or root/Kvasir-SEG/)",
    info=DatasetInfo(
        modality="endoscopy (colonoscopy RGB)",
        source="https://datasets.simula.no/kvasir-seg/",
        citation='Jha et al., "Kvasir-SEG: A Segmented Polyp Dataset", MMM 2020, LNCS 11962, pp. 451-462.',
        licence="Free for academic/research use; commercial use needs prior permission (Kvasir-SEG README).",
        labels=_POLYP,
    ),
)
def scan_kvasir_seg(root: Path) -> ScanResult:
    """Kvasir-SEG download: ``images/*.jpg`` and ``masks/<stem>.{jpg,png}``, optionally inside ``Kvasir-SEG/``."""
    base = root / "Kvasir-SEG" if (root / "Kvasir-SEG" / "images").is_dir() else root
    image_dir = _find_dir(base, ("images",), "Kvasir-SEG image")
    mask_dir = _find_dir(base, ("masks",), "Kvasir-SEG mask")
    return _scan_image_mask_dirs(image_dir, mask_dir)


@register_preset(
    "cvc-clinicdb",
    description="CVC-ClinicDB: Original/ + 'Ground Truth/' (tif) or images/ + masks/ (png); split by video sequence",
    info=DatasetInfo(
        modality="endoscopy (colonoscopy RGB)",
        source="https://polyp.grand-challenge.org/CVCClinicDB/",
        citation=(
            'Bernal et al., "WM-DOVA maps for accurate polyp highlighting in colonoscopy: Validation vs. saliency '
            'maps from physicians", Computerized Medical Imaging and Graphics 43:99-111, 2015.'
        ),
        licence="Research and educational use only; commercial use forbidden (CVC-ClinicDB README).",
        labels=_POLYP,
    ),
)
def scan_cvc_clinicdb(root: Path) -> ScanResult:
    """CVC-ClinicDB frames ``<n>.{tif,png}`` grouped into their 29 video sequences."""
    layouts = (("Original", "Ground Truth"), ("images", "masks"), ("PNG/Original", "PNG/Ground Truth"),
               ("TIF/Original", "TIF/Ground Truth"))  # fmt: skip
    for image_name, mask_name in layouts:
        if (root / image_name).is_dir() and (root / mask_name).is_dir():
            image_dir, mask_dir = root / image_name, root / mask_name
            break
    else:
        tried = "; ".join(f"'{i}/' + '{m}/'" for i, m in layouts)
        raise ManifestError(f"no CVC-ClinicDB layout under {root}: expected {tried}")
    pairs = pair_by_stem(list_images(image_dir), list_images(mask_dir), image_dir=image_dir, mask_dir=mask_dir)
    groups = []
    for pair in pairs:
        stem = Path(pair["image"]).stem
        if not stem.isdigit():
            raise ManifestError(f"CVC-ClinicDB frame file {pair['image']} is not named <frame number>")
        groups.append(cvc_clinicdb_group(stem))
    return ScanResult(labeled=pairs, groups=groups, group_rule="whole video sequences (29) per split")


@register_preset(
    "cvc-colondb",
    description="CVC-ColonDB: images/ + masks/ (380-frame release) or original <n>.bmp + p<n>.bmp in one folder",
    info=DatasetInfo(
        modality="endoscopy (colonoscopy RGB)",
        source="http://mv.cvc.uab.es/projects/colon-qa/cvccolondb",
        citation=(
            'Bernal, Sanchez, Vilarino, "Towards automatic polyp detection with a polyp appearance model", '
            "Pattern Recognition 45(9):3166-3182, 2012."
        ),
        licence="Research use; see the CVC-ColonDB terms of the distributing site.",
        labels=_POLYP,
    ),
)
def scan_cvc_colondb(root: Path) -> ScanResult:
    """Either the ``images/`` + ``masks/`` release or the original folder of ``<n>.bmp`` with ``p<n>.bmp`` masks
    (``s<n>``/``c<n>`` non-informative-region and contour files are ignored)."""
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return scan_folders(root)
    base = root / "CVC-ColonDB" if (root / "CVC-ColonDB").is_dir() else root
    if not base.is_dir():
        raise ManifestError(f"data folder not found: {root}")
    files = list_images(base)
    frames = {p.stem: p for p in files if p.stem.isdigit()}
    masks = {p.stem[1:]: p for p in files if p.stem[:1].lower() == "p" and p.stem[1:].isdigit()}
    if not frames or not masks:
        raise ManifestError(
            f"no CVC-ColonDB layout under {root}: expected 'images/' + 'masks/', or <n>.bmp frames with p<n>.bmp masks"
        )
    lonely = sorted(set(frames) ^ set(masks), key=natural_key)
    if lonely:
        raise ManifestError(f"CVC-ColonDB frames and p<n> masks in {base} do not pair up: {', '.join(lonely[:10])}")
    return ScanResult(
        labeled=[{"image": str(frames[k]), "label": str(masks[k])} for k in sorted(frames, key=natural_key)]
    )


@register_preset(
    "ph2",
    description="PH2: IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp + IMDxxx/IMDxxx_lesion/IMDxxx_lesion.bmp",
    info=DatasetInfo(
        modality="dermoscopy (RGB)",
        source="https://www.fc.up.pt/addi/ph2%20database.html",
        citation=(
            'Mendonca et al., "PH2 - A dermoscopic image database for research and benchmarking", '
            "IEEE EMBC 2013, pp. 5437-5440."
        ),
        licence="Free for research use; cite the paper (PH2 terms).",
        labels=_LESION,
    ),
)
def scan_ph2(root: Path) -> ScanResult:
    """PH2 case folders, found at ``root``, ``root/PH2 Dataset images`` or ``root/PH2Dataset/PH2 Dataset images``."""
    candidates = (root, root / "PH2 Dataset images", root / "PH2Dataset" / "PH2 Dataset images")
    if not root.is_dir():
        raise ManifestError(f"data folder not found: {root}")
    for base in candidates:
        found = base.iterdir() if base.is_dir() else ()
        cases = sorted((p for p in found if p.is_dir() and _PH2_CASE.match(p.name)), key=lambda p: natural_key(p.name))
        if cases:
            break
    else:
        raise ManifestError(f"no PH2 case folders (IMDxxx/) under {root} or {root / 'PH2 Dataset images'}")
    pairs, missing = [], []
    for case in cases:
        image = case / f"{case.name}_Dermoscopic_Image" / f"{case.name}.bmp"
        mask = case / f"{case.name}_lesion" / f"{case.name}_lesion.bmp"
        if image.is_file() and mask.is_file():
            pairs.append({"image": str(image), "label": str(mask)})
        else:
            missing.append(str(image if not image.is_file() else mask))
    if missing:
        raise ManifestError(
            f"{len(missing)} PH2 case(s) under {base} lack an image or lesion mask: {', '.join(missing[:10])}"
        )
    return ScanResult(labeled=pairs)


@register_preset(
    "isic",
    description="ISIC challenge (2016-2018): ISIC_<id>.jpg + ISIC_<id>_segmentation.png, one folder or separate ones",
    info=DatasetInfo(
        modality="dermoscopy (RGB)",
        source="https://challenge.isic-archive.com/data/",
        citation=(
            'Codella et al., "Skin Lesion Analysis Toward Melanoma Detection 2018: A Challenge Hosted by the '
            'International Skin Imaging Collaboration (ISIC)", arXiv:1902.03368, 2019.'
        ),
        licence="CC BY-NC 4.0 (ISIC Archive); check the terms of the specific challenge year.",
        labels=_LESION,
    ),
)
def scan_isic(root: Path) -> ScanResult:
    """Every ``ISIC_<id>.{jpg,png}`` below ``root`` paired with ``ISIC_<id>_segmentation.png`` (or
    ``_Segmentation``) anywhere below ``root``; ``*_superpixels`` files are ignored."""
    if not root.is_dir():
        raise ManifestError(f"data folder not found: {root}")
    files = list_images(root, recursive=True)
    images = [p for p in files if _ISIC_IMAGE.match(p.name)]
    masks = [p for p in files if _ISIC_MASK.match(p.name)]
    if not images:
        raise ManifestError(f"no ISIC_<id>.jpg images found under {root}")
    return ScanResult(labeled=pair_by_stem(images, masks, image_dir=root, mask_dir=root))


@register_preset(
    "isic2020",
    description="ISIC 2020 (unlabeled only): ISIC_<id>.jpg anywhere below the root",
    info=DatasetInfo(
        modality="dermoscopy (RGB)",
        source="https://challenge2020.isic-archive.com/",
        citation=(
            'Rotemberg et al., "A patient-centric dataset of images and metadata for identifying melanomas using '
            'clinical context", Scientific Data 8:34, 2021.'
        ),
        licence="CC BY-NC 4.0 (ISIC 2020 challenge data).",
        labels=_LESION,
    ),
)
def scan_isic2020(root: Path) -> ScanResult:
    """Unlabeled ``ISIC_<id>.{jpg,png}`` images below ``root`` (DICOM copies are not used)."""
    if not root.is_dir():
        raise ManifestError(f"data folder not found: {root}")
    images = [p for p in list_images(root, recursive=True) if _ISIC_IMAGE.match(p.name)]
    if not images:
        raise ManifestError(f"no ISIC_<id>.jpg images found under {root}")
    return ScanResult(unlabeled=[{"image": str(p)} for p in images])


@register_preset(
    "polyp-box-seg",
    description="Polyp-Box-Seg (unlabeled only): every image below the root (images/ if present), boxes ignored",
    info=DatasetInfo(
        modality="endoscopy (colonoscopy RGB)",
        source="Polyp-Box-Seg (box-annotated polyp frames); record the download URL used",
        citation="Cite the Polyp-Box-Seg release used (see its README).",
        licence="See the Polyp-Box-Seg release terms.",
        labels=_POLYP,
    ),
)
def scan_polyp_box_seg(root: Path) -> ScanResult:
    """Unlabeled polyp frames (box annotations are not masks and are not used)."""
    return ScanResult(unlabeled=scan_unlabeled_folder(root))


@register_preset(
    "unlabeled-folder",
    description="generic unlabeled-only: every image below the root (images/ if present), annotation folders skipped",
    info=DatasetInfo(modality=""),
)
def scan_unlabeled(root: Path) -> ScanResult:
    """Generic unlabeled image folder."""
    return ScanResult(unlabeled=scan_unlabeled_folder(root))


# ----------------------------------------------------------------------------------------------- prepare


def read_groups(groups_file: str | os.PathLike, images: Sequence[str]) -> list[str]:
    """Group label of each image path, from a ``stem,group`` CSV or a ``{stem: group}`` JSON file.

    Raises:
        ManifestError: unreadable file, missing columns, or images without a group (listed).
    """
    path = Path(groups_file)
    if not path.is_file():
        raise ManifestError(f"groups file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json":
        try:
            table = json.loads(text)
        except json.JSONDecodeError as err:
            raise ManifestError(f"groups file {path} is not valid JSON: {err}") from err
        if not isinstance(table, dict):
            raise ManifestError(f"groups file {path} must hold a JSON object {{stem: group}}")
    else:
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or not {"stem", "group"} <= set(reader.fieldnames):
            raise ManifestError(f"groups file {path} needs a header with columns 'stem' and 'group'")
        table = {row["stem"].strip(): row["group"].strip() for row in reader}
    stems = [Path(image).stem for image in images]
    missing = sorted({stem for stem in stems if stem not in table}, key=natural_key)
    if missing:
        raise ManifestError(f"{len(missing)} image(s) have no group in {path}: {', '.join(missing[:10])}")
    return [str(table[stem]) for stem in stems]


def item_groups(
    items: Sequence[Mapping[str, Any]],
    manifest: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
) -> list[str]:
    """Group label (video sequence, patient) of each datalist item, for grouped cross-validation folds.

    An item's own ``"group"`` entry wins. Otherwise, when ``manifest`` names a preset whose scanner reports
    groups (CVC-ClinicDB: video sequences), the preset's scan of the manifest's data root supplies them (the
    manifest records which groups went to which split under ``"group_splits"``, not per item). Items left
    without a group are their own group.

    Args:
        items: datalist entries with absolute ``"image"`` paths (as :func:`load_split` returns them).
        manifest: the manifest the items come from (for its ``"preset"`` and data root), or None.
        data_root: overrides the manifest's data root (as in :func:`load_split`).

    Returns:
        one label per item, in order.
    """
    scanned: dict[str, str] = {}
    if manifest is not None and any("group" not in item for item in items):
        preset = PRESETS.get(str(load_manifest(manifest).get("preset", "")))
        root = resolve_data_root(manifest, data_root)
        if preset is not None and root.is_dir():
            result = preset.scan(root)
            if result.groups is not None:
                scanned = {os.path.realpath(e["image"]): g for e, g in zip(result.labeled, result.groups)}
    groups = []
    for item in items:
        image = str(item["image"])
        groups.append(str(item.get("group") or scanned.get(os.path.realpath(image), f"item:{image}")))
    return groups


def _read_source_notes(root: Path) -> list[str]:
    notes = root / "SOURCE.txt"
    if not notes.is_file():
        return []
    return [line.rstrip() for line in notes.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]


def prepare_manifest(
    preset: str,
    root: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    unlabeled_roots: Sequence[str | os.PathLike] = (),
    labeled_fraction: float = 1.0,
    ratios: Sequence[float] = SPLIT_RATIOS,
    name: str | None = None,
    groups_file: str | os.PathLike | None = None,
    data_root_base: str | None = None,
) -> Path:
    """Build and write a manifest from a data set folder.

    Args:
        preset: a key of :data:`PRESETS`.
        root: the data set folder in the preset's layout.
        out: manifest path; default ``data_manifests/<name>.json`` under the current directory.
        seed: split seed (and labeled-subset seed).
        unlabeled_roots: extra folders whose images (see :func:`scan_unlabeled_folder`) are appended to
            ``unlabeled``, e.g. another data set in the cross-source setting.
        labeled_fraction: keep this seeded fraction of the ``training`` groups (images when the preset has no
            groups) labeled; the rest go to ``unlabeled`` (:func:`~qgssl_monai.data.manifest.hold_out_labels`).
        ratios: training/validation/test fractions by image count.
        name: manifest ``name``; default the preset name (``+unlabeled-<folder>`` per extra source).
        groups_file: CSV with columns ``stem,group`` (or a JSON object ``{stem: group}``) assigning every
            labeled image (by file stem) to a group, e.g. patient or video; overrides the preset's groups so
            that whole groups stay in one split.
        data_root_base: how ``data_root`` is recorded: ``"absolute"``, ``"manifest"`` or ``"repo"``; None =
            absolute unless the manifest is written inside the data folder
            (:func:`~qgssl_monai.data.manifest.record_data_root`).

    Returns:
        The manifest path. Entries are relative to the common folder of ``root`` and ``unlabeled_roots``
        (the recorded ``data_root``).

    Raises:
        ManifestError: unknown preset, layout not found (the message names the folder), or overlapping files.
    """
    if preset not in PRESETS:
        raise ManifestError(f"unknown preset {preset!r}; available: {', '.join(sorted(PRESETS))}")
    spec = PRESETS[preset]
    root_path = Path(root).expanduser().resolve()
    scanned = spec.scan(root_path)
    extra_roots = [Path(r).expanduser().resolve() for r in unlabeled_roots]
    extra_unlabeled = [entry for extra in extra_roots for entry in scan_unlabeled_folder(extra)]

    keys = [entry["image"] for entry in scanned.labeled]
    if groups_file is not None:
        scanned.groups = read_groups(groups_file, keys)
        scanned.group_rule = f"whole groups from {Path(groups_file).name} per split"
    assignment = grouped_split(keys, seed=seed, ratios=ratios, groups=scanned.groups)
    by_image = {entry["image"]: entry for entry in scanned.labeled}
    splits: dict[str, list[dict[str, str]]] = {s: [by_image[k] for k in assignment[s]] for s in assignment}
    held_out: list[dict[str, str]] = []
    if labeled_fraction < 1.0:
        group_of = dict(zip(keys, scanned.groups)) if scanned.groups is not None else None
        training_groups = None if group_of is None else [group_of[e["image"]] for e in splits["training"]]
        splits["training"], held_out = hold_out_labels(
            splits["training"], labeled_fraction, seed=seed, groups=training_groups
        )
    unlabeled = [*held_out, *scanned.unlabeled, *extra_unlabeled]
    labeled_images = {entry["image"] for entry in scanned.labeled} | {e.get("label", "") for e in scanned.labeled}
    overlap = sorted(e["image"] for e in [*scanned.unlabeled, *extra_unlabeled] if e["image"] in labeled_images)
    if overlap:
        raise ManifestError(f"{len(overlap)} unlabeled file(s) are also labeled data (leakage): {overlap[:5]}")
    splits["unlabeled"] = unlabeled

    data_root = Path(os.path.commonpath([root_path, *extra_roots])) if extra_roots else root_path
    if scanned.labeled:
        rule = f"seeded {':'.join(f'{round(r * 100):g}' for r in ratios)} train:validation:test by image count"
        rule += f"; {scanned.group_rule}" if scanned.groups is not None else "; per image"
    else:
        rule = "unlabeled only"
    if labeled_fraction < 1.0:
        unit = "training groups" if scanned.groups is not None else "training images"
        rule += f"; {labeled_fraction:g} of {unit} kept labeled (seeded, nested), the rest moved to unlabeled"
    extra_header: dict[str, Any] = {
        "preset": preset,
        "labels": dict(spec.info.labels),
        "label_rule": spec.info.label_rule,
        "labeled_fraction": labeled_fraction,
    }
    if extra_roots:
        extra_header["unlabeled_sources"] = [
            {"path": Path(os.path.relpath(r, data_root)).as_posix(), "source_notes": _read_source_notes(r)}
            for r in extra_roots
        ]
    if scanned.groups is not None:
        group_of = dict(zip(keys, scanned.groups))
        extra_header["group_splits"] = {
            group: split
            for split in ("training", "validation", "test")
            for group in sorted({group_of[k] for k in assignment[split]}, key=natural_key)
        }
    notes = _read_source_notes(root_path)
    if notes:
        extra_header["source_notes"] = notes
    manifest_name = name or preset + "".join(f"+unlabeled-{r.name}" for r in extra_roots)
    out_path = Path(out) if out is not None else Path("data_manifests") / f"{manifest_name}.json"
    written = write_manifest(
        out_path,
        splits,
        data_root=data_root,
        name=manifest_name,
        modality=spec.info.modality,
        source=spec.info.source,
        citation=spec.info.citation,
        licence=spec.info.licence,
        split_seed=seed,
        split_rule=rule,
        extra=extra_header,
        data_root_base=data_root_base,
    )
    logger.info(
        "wrote %s: %d training, %d validation, %d test, %d unlabeled",
        written, *(len(splits.get(s, [])) for s in ("training", "validation", "test", "unlabeled")),
    )  # fmt: skip
    return written

