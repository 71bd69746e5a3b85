"""``qgssl validate-manifest``: find every missing, unreadable or mismatched file of a manifest up front.

Checks per entry: the file exists, is not empty, opens, is not truncated; for labeled entries the mask has
the image's size, one channel (an RGB mask with equal channels counts as one) and binary values
(``{0, 1}`` or ``{0, 255}``); no image is listed twice (within or across splits: leakage).

Images are only opened for their header (PIL reads the size without decoding); truncation is detected from
the file trailer (JPEG end-of-image marker, PNG ``IEND`` chunk) and other formats are decoded. Masks are
always decoded, to check their values (``{0, 1}``/``{0, 255}``, or any values when the manifest header says
``"label_rule": "nonzero"``, i.e. multi-label maps binarised as ``label > 0``). NIfTI files are read with
nibabel and NRRD/MetaImage/DICOM with ITK (header size; masks decoded).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from qgssl_monai.data.manifest import (
    LABELED_SPLITS,
    SPLITS,
    ManifestError,
    describe_data_root,
    load_manifest,
    record_data_root,
    resolve_data_root,
)

__all__ = [
    "LABEL_RULES",
    "FileCheck",
    "Problem",
    "ValidationReport",
    "assert_valid_manifest",
    "check_file",
    "check_mask",
    "mask_value_problem",
    "validate_manifest",
    "write_clean_manifest",
]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
# read through ITK (header-only unless decoded)
_ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
# manifest "label_rule" values: how masks become binary targets
LABEL_RULES: tuple[str, ...] = ("binary", "nonzero")
_TRAILER_BYTES = 1024
# show a progress bar from this many entries on
_PROGRESS_MIN_ENTRIES = 200


@dataclass(frozen=True)
class Problem:
    """One bad file (or manifest-level issue): where it is listed, its path and what is wrong."""

    split: str
    index: int
    key: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.split}[{self.index}].{self.key}" if self.index >= 0 else self.key
        return f"{self.path}: {self.message} ({where})"


@dataclass
class ValidationReport:
    """Result of :func:`validate_manifest`.

    Attributes:
        manifest: the manifest file.
        data_root: the resolved data root.
        counts: entries checked per split.
        problems: every problem found, in manifest order.
    """

    manifest: Path
    data_root: Path
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_entries(self) -> set[tuple[str, int]]:
        """``(split, index)`` of every entry with at least one problem."""
        return {(p.split, p.index) for p in self.problems if p.index >= 0}

    def summary(self) -> str:
        checked = ", ".join(f"{n} {split}" for split, n in self.counts.items())
        if self.ok:
            return f"{self.manifest}: OK ({checked or 'no entries'}; data root {self.data_root})"
        return (
            f"{self.manifest}: {len(self.problems)} problem(s) in {len(self.bad_entries)} entr"
            f"{'y' if len(self.bad_entries) == 1 else 'ies'} ({checked}; data root {self.data_root})"
        )


@dataclass
class FileCheck:
    """Outcome of :func:`check_file`: the spatial size (``(W, H)`` for 2D, the shape for 3D) or problems."""

    size: tuple[int, ...] | None
    problems: list[str]


def mask_value_problem(
    mask: np.ndarray, grey_tolerance: float = 0.0, *, channels_last: bool | None = None, label_rule: str = "binary"
) -> str | None:
    """Why a decoded mask array is not a binary single-channel mask, or None when it is.

    Args:
        mask: ``(H, W)``, ``(H, W, C)`` (PIL layout) or a 3D volume.
        grey_tolerance: fraction of pixels in ``[0, 1)`` allowed to hold values other than ``{0, hi}``
            (``hi`` = 1 or 255), e.g. for JPEG-compressed masks that are thresholded at load time.
        channels_last: whether a trailing axis of size 2-4 is colour channels; None guesses so for 3D
            arrays (2D PIL images); pass False for volumes.
        label_rule: the manifest's ``label_rule``: ``"binary"`` (values ``{0, 1}`` or ``{0, 255}``) or
            ``"nonzero"`` (multi-label maps binarised as ``label > 0`` at load time: any values accepted).

    Returns:
        ``"multi-channel mask ..."`` / ``"non-binary mask ..."`` or None.
    """
    if label_rule not in LABEL_RULES:
        raise ManifestError(f"unknown label_rule {label_rule!r}; expected one of {', '.join(LABEL_RULES)}")
    if channels_last is None:
        channels_last = mask.ndim == 3 and mask.shape[-1] in (2, 3, 4)
    if channels_last and mask.dtype != bool:
        channels = mask.shape[-1]
        colour = mask[..., : 3 if channels >= 3 else 1]  # alpha (LA / RGBA) is not a label channel
        if any(not np.array_equal(colour[..., 0], colour[..., c]) for c in range(1, colour.shape[-1])):
            return f"multi-channel mask ({channels} channels that differ)"
        mask = colour[..., 0]
    if mask.dtype == bool or label_rule == "nonzero":
        return None
    if mask.dtype.kind in "ui" and mask.size and 0 <= mask.min() and mask.max() <= np.iinfo(np.uint16).max:
        # counting is linear; np.unique sorts (slow on large volumes)
        histogram = np.bincount(mask.ravel().astype(np.intp, copy=False))
        counts = {int(v): int(histogram[v]) for v in np.flatnonzero(histogram)}
    else:
        values, occurrences = np.unique(mask, return_counts=True)
        counts = dict(zip(values.tolist(), occurrences.tolist()))
    return _value_problem(counts, grey_tolerance)


def _value_problem(counts: dict[float, int], grey_tolerance: float) -> str | None:
    """:func:`mask_value_problem` on a ``{value: pixel count}`` table of the values present."""
    present = {v for v, n in counts.items() if n}
    if present <= {0, 1} or present <= {0, 255}:
        return None
    total = sum(counts.values())
    high = 255 if max(present) > 1 else 1
    grey = sum(counts[v] for v in present if v not in (0, high))
    if grey_tolerance > 0 and grey <= grey_tolerance * total:
        return None
    shown = ", ".join(f"{v:g}" for v in sorted(present)[:6]) + (", ..." if len(present) > 6 else "")
    return f"non-binary mask: {len(present)} distinct values ({shown}), {grey / total:.2%} of pixels not 0/{high}"


def _trailer_ok(path: Path, image_format: str | None) -> bool | None:
    """True/False when the file trailer shows a complete JPEG/PNG, None for formats without a cheap check."""
    if image_format not in ("JPEG", "PNG"):
        return None
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - _TRAILER_BYTES))
        tail = handle.read()
    return (b"\xff\xd9" in tail) if image_format == "JPEG" else (b"IEND" in tail)


def _volume_mask_problems(
    shape: tuple[int, ...], read: Callable[[], np.ndarray], grey_tolerance: float, label_rule: str
) -> list[str]:
    if len(shape) > 3 and int(np.prod(shape[3:])) > 1:
        return [f"multi-channel mask (shape {shape})"]
    issue = mask_value_problem(
        np.asarray(read()).reshape(-1), grey_tolerance, channels_last=False, label_rule=label_rule
    )
    return [issue] if issue else []


def _check_nifti(path: Path, *, decode: bool, is_mask: bool, grey_tolerance: float, label_rule: str) -> FileCheck:
    import nibabel as nib

    try:
        volume = nib.load(str(path))
        shape = tuple(int(s) for s in volume.shape)
        data = np.asanyarray(volume.dataobj) if (decode or is_mask) else None
    except Exception as err:  # nibabel raises many types for corrupt files
        return FileCheck(None, [f"unreadable NIfTI ({type(err).__name__}: {err})"])
    problems = _volume_mask_problems(shape, lambda: data, grey_tolerance, label_rule) if is_mask else []
    return FileCheck(shape[:3], problems)


def _check_itk(path: Path, *, decode: bool, is_mask: bool, grey_tolerance: float, label_rule: str) -> FileCheck:
    """NRRD/MetaImage/DICOM: size (x, y, z) from the ITK header; decoded for masks (and with ``decode``)."""
    import itk

    io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        return FileCheck(None, ["unreadable image (no ITK reader for this format)"])
    try:
        io.SetFileName(str(path))
        io.ReadImageInformation()
        shape = tuple(int(io.GetDimensions(i)) for i in range(io.GetNumberOfDimensions()))
        components = int(io.GetNumberOfComponents())
        data = itk.array_from_image(itk.imread(str(path))) if (decode or (is_mask and components == 1)) else None
    except RuntimeError as err:
        return FileCheck(None, [f"unreadable image ({str(err).strip().splitlines()[-1]})"])
    if is_mask and components > 1:
        return FileCheck(shape, [f"multi-channel mask ({components} components)"])
    problems = _volume_mask_problems(shape, lambda: data, grey_tolerance, label_rule) if is_mask else []
    return FileCheck(shape, problems)


def check_file(
    path: str | os.PathLike,
    *,
    is_mask: bool,
    decode: bool = False,
    grey_tolerance: float = 0.0,
    label_rule: str = "binary",
) -> FileCheck:
    """Check one image or mask file.

    Args:
        path: file path.
        is_mask: decode and check channels/values.
        decode: decode images fully too (slower; catches corruption inside a complete-looking file).
        grey_tolerance, label_rule: see :func:`mask_value_problem`.

    Returns:
        :class:`FileCheck` with the spatial size (``(W, H)`` for 2D images, ``(x, y, z)`` for volumes) or the problems
        (``"missing file"``, ``"empty file"``, ``"unreadable image ..."``, ``"truncated image"``, mask issues).
    """
    path = Path(path)
    if not path.is_file():
        return FileCheck(None, ["missing file" if not path.exists() else "is a directory" if path.is_dir() else "not a file"])
    if path.stat().st_size == 0:
        return FileCheck(None, ["empty file"])
    lowered = path.name.lower()
    for suffixes, checker in ((_NIFTI_SUFFIXES, _check_nifti), (_ITK_SUFFIXES, _check_itk)):
        if lowered.endswith(suffixes):
            return checker(path, decode=decode, is_mask=is_mask, grey_tolerance=grey_tolerance, label_rule=label_rule)
    try:
        with Image.open(path) as image:
            size = tuple(int(s) for s in image.size)
            trailer = _trailer_ok(path, image.format)
            if trailer is True and not (is_mask or decode):
                return FileCheck(size, [])
            try:
                image.load()
            except OSError:
                if trailer is False:
                    return FileCheck(size, ["truncated image (file ends before the end-of-image marker)"])
                raise
            # a missing trailer that still decodes (e.g. bytes appended after the JPEG end marker) is fine
            if is_mask and image.mode in ("L", "1") and label_rule == "binary":
                # PIL's C histogram is ~2x faster than copying to numpy; "1" bins are 0 and 255
                histogram = image.histogram()
                value_issue = _value_problem({v: n for v, n in enumerate(histogram) if n}, grey_tolerance)
                return FileCheck(size, [value_issue] if value_issue else [])
            array = np.asarray(image) if is_mask else None
    except UnidentifiedImageError:
        return FileCheck(None, ["unreadable image (not a recognised image format)"])
    except OSError as err:
        message = str(err)
        kind = "truncated" if "truncated" in message.lower() else "unreadable"
        return FileCheck(None, [f"{kind} image ({message})"])
    except Exception as err:  # PIL raises SyntaxError/ValueError/DecompressionBombError for corrupt or huge files
        return FileCheck(None, [f"unreadable image ({type(err).__name__}: {err})"])
    if array is not None:
        issue = mask_value_problem(array, grey_tolerance, label_rule=label_rule)
        if issue:
            return FileCheck(size, [issue])
    return FileCheck(size, [])


def _format_size(size: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in size)


def check_mask(
    path: str | os.PathLike, image: FileCheck, *, grey_tolerance: float = 0.0, label_rule: str = "binary"
) -> FileCheck:
    """:func:`check_file` of a mask plus its size against its image's :class:`FileCheck` (``"size mismatch: ..."``)."""
    mask = check_file(path, is_mask=True, grey_tolerance=grey_tolerance, label_rule=label_rule)
    if image.size is not None and mask.size is not None and image.size != mask.size:
        mask.problems.append(f"size mismatch: image {_format_size(image.size)}, mask {_format_size(mask.size)}")
    return mask


def validate_manifest(
    manifest: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    splits: Sequence[str] = SPLITS,
    *,
    decode_images: bool = False,
    grey_tolerance: float = 0.0,
    progress: bool | None = None,
) -> ValidationReport:
    """Check every file a manifest lists.

    Args:
        manifest: manifest JSON path.
        data_root: overrides the manifest's data root (see :func:`~qgssl_monai.data.manifest.resolve_data_root`).
        splits: which splits to check.
        decode_images: decode images fully, not just their headers and trailers.
        grey_tolerance: see :func:`mask_value_problem`.
        progress: show a tqdm bar (default: when there are at least 200 entries).

    Returns:
        A :class:`ValidationReport` (no exception for bad files; see :func:`assert_valid_manifest`).

    Raises:
        ManifestError: the manifest itself is missing or malformed, or a split name is unknown.
    """
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ManifestError(f"unknown split(s) {unknown}; expected among {', '.join(SPLITS)}")
    path = Path(manifest)
    content = load_manifest(path)
    root = resolve_data_root(path, data_root)
    label_rule = content.get("label_rule", "binary")
    if label_rule not in LABEL_RULES:
        raise ManifestError(
            f"manifest {path}: unknown label_rule {label_rule!r}; expected one of {', '.join(LABEL_RULES)}"
        )
    report = ValidationReport(manifest=path, data_root=root, counts={s: len(content.get(s, [])) for s in splits})
    total = sum(report.counts.values())
    if total and not root.is_dir():
        report.problems.append(
            Problem(
                "", -1, "data_root", str(root),
                f"data root folder not found ({describe_data_root(path, data_root)}; pass --root / data_root=)",
            )
        )
        return report
    first_seen: dict[str, tuple[str, int]] = {}
    show = total >= _PROGRESS_MIN_ENTRIES if progress is None else progress
    with tqdm(total=total, desc=f"validating {path.name}", unit="entry", disable=not show, file=sys.stderr) as bar:
        for split in splits:
            labeled = split in LABELED_SPLITS
            for index, entry in enumerate(content.get(split, [])):
                bar.update(1)
                image_path = os.path.normpath(root / entry["image"])
                image = check_file(image_path, is_mask=False, decode=decode_images)
                report.problems += [Problem(split, index, "image", image_path, m) for m in image.problems]
                if image_path in first_seen:
                    other_split, other_index = first_seen[image_path]
                    kind = "duplicate" if other_split == split else "leakage: also listed"
                    report.problems.append(
                        Problem(split, index, "image", image_path, f"{kind} as {other_split}[{other_index}]")
                    )
                else:
                    first_seen[image_path] = (split, index)
                if not labeled:
                    continue
                if not isinstance(entry.get("label"), str):
                    report.problems.append(Problem(split, index, "label", image_path, "labeled entry has no 'label'"))
                    continue
                label_path = os.path.normpath(root / entry["label"])
                mask = check_mask(label_path, image, grey_tolerance=grey_tolerance, label_rule=label_rule)
                report.problems += [Problem(split, index, "label", label_path, m) for m in mask.problems]
    return report


def assert_valid_manifest(
    manifest: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    splits: Sequence[str] = SPLITS,
    **kwargs: Any,
) -> ValidationReport:
    """:func:`validate_manifest`, raising when anything is wrong (what training calls before it starts).

    Raises:
        ManifestError: listing every problem, one line each, so a bad file is found before epoch 1.
    """
    report = validate_manifest(manifest, data_root, splits, **kwargs)
    if not report.ok:
        lines = "\n".join(f"  {problem}" for problem in report.problems)
        raise ManifestError(
            f"{report.summary()}\n{lines}\n"
            f"fix the files or run `qgssl validate-manifest {manifest} --skip-bad` for a cleaned manifest"
        )
    return report


def _kept_base(content: dict[str, Any]) -> str:
    """The ``data_root_base`` a rewritten manifest keeps: the original's kind (absolute, manifest, repo)."""
    recorded = content.get("data_root")
    if recorded not in (None, "") and Path(str(recorded)).expanduser().is_absolute():
        return "absolute"
    return content.get("data_root_base") or "manifest"


def write_clean_manifest(report: ValidationReport, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write the manifest without the entries ``report`` flagged, plus the list of skipped entries.

    Args:
        report: from :func:`validate_manifest` on ``report.manifest``.
        out: cleaned manifest path; the skipped list goes beside it as ``<stem>.skipped.json``.

    Returns:
        ``(clean_manifest_path, skipped_list_path)``. The clean manifest keeps the header (counts updated,
        ``data_root`` re-expressed for its own location, of the original's kind: absolute, relative to the
        manifest's folder or to the repository (``data_root_base``); ``cleaned_from`` and ``num_skipped`` added).

    Raises:
        ManifestError: the data root itself was missing (nothing to clean entry by entry).
    """
    if any(p.index < 0 for p in report.problems):
        reasons = "; ".join(str(p) for p in report.problems if p.index < 0)
        raise ManifestError(f"cannot clean {report.manifest}: {reasons}")
    content = load_manifest(report.manifest)
    out_path = Path(out).resolve()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    by_entry: dict[tuple[str, int], list[str]] = {}
    for problem in report.problems:
        by_entry.setdefault((problem.split, problem.index), []).append(f"{problem.key}: {problem.message}")
    skipped = []
    for split in SPLITS:
        kept = []
        for index, entry in enumerate(content.get(split, [])):
            if (split, index) in by_entry:
                skipped.append({"split": split, "index": index, **entry, "problems": by_entry[(split, index)]})
            else:
                kept.append(entry)
        if split in content:
            content[split] = kept
            content[f"num_{split}"] = len(kept)
    base = _kept_base(content)
    content.pop("data_root_base", None)
    content.update(record_data_root(report.data_root, out_path, base))
    content["cleaned_from"] = Path(os.path.relpath(report.manifest.resolve(), out_path.parent)).as_posix()
    content["num_skipped"] = len(skipped)
    header = {k: v for k, v in content.items() if k not in SPLITS}
    ordered = {**header, **{s: content[s] for s in SPLITS if s in content}}
    out_path.write_text(json.dumps(ordered, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    skipped_path = out_path.with_name(out_path.name.removesuffix(".json") + ".skipped.json")
    skipped_path.write_text(json.dumps(skipped, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_path, skipped_path
