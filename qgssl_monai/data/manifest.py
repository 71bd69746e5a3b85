"""Data manifests: MONAI datalist JSON files with a small provenance header and seeded, grouped splits.

A manifest looks like (paths relative to the data root)::

    {
      "name": "kvasir-seg", "modality": "endoscopy", "source": "...", "citation": "...", "licence": "...",
      "data_root": "../shared/data/kvasir-seg", "data_root_base": "repo",   # or an absolute data_root
      "split_seed": 0, "split_rule": "...",
      "num_training": 700, "num_validation": 100, "num_test": 200, "num_unlabeled": 0,
      "training": [{"image": "images/a.jpg", "label": "masks/a.png"}, ...],
      "validation": [...], "test": [...],
      "unlabeled": [{"image": "images/u.jpg"}, ...]
    }

It is readable by :func:`monai.data.load_decathlon_datalist` with ``base_dir`` set to the data root
(:func:`resolve_data_root`); :func:`load_split` does exactly that and returns absolute paths.

``data_root`` is absolute, or relative to the base named by ``data_root_base`` (:data:`DATA_ROOT_BASES`):
``"manifest"`` (the manifest's folder; the default when the field is absent) or ``"repo"`` (the root of the
checkout holding this package, so a manifest keeps working when it is moved or copied to another clone).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qgssl_monai.errors import ActionableError

__all__ = [
    "DATA_ROOT_BASES",
    "LABELED_SPLITS",
    "SPLITS",
    "SPLIT_RATIOS",
    "ManifestError",
    "grouped_kfold",
    "grouped_split",
    "hold_out_labels",
    "load_manifest",
    "load_split",
    "natural_key",
    "describe_data_root",
    "record_data_root",
    "repo_root",
    "resolve_data_root",
    "write_manifest",
]

LABELED_SPLITS: tuple[str, ...] = ("training", "validation", "test")
SPLITS: tuple[str, ...] = (*LABELED_SPLITS, "unlabeled")
# train : validation : test, by image count
SPLIT_RATIOS: tuple[float, float, float] = (0.7, 0.1, 0.2)
# what a relative "data_root" is relative to (header "data_root_base"; absent = "manifest")
DATA_ROOT_BASES: tuple[str, ...] = ("manifest", "repo")


class ManifestError(ActionableError, ValueError):
    """A manifest (or the data it points to) is missing, malformed or inconsistent; the message names the file."""


def natural_key(text: str) -> tuple:
    """Sort key ordering embedded integers numerically (``"2.png"`` before ``"10.png"``)."""
    return tuple(int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", str(text)))


def load_manifest(manifest: str | os.PathLike) -> dict[str, Any]:
    """Read and sanity-check a manifest JSON file.

    Raises:
        ManifestError: the file is missing, is not JSON, is not an object, or a split is not a list of
            ``{"image": str, ...}`` entries.
    """
    path = Path(manifest)
    if path.is_dir():
        raise ManifestError(f"manifest {path} is a directory, not a JSON file")
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"manifest {path} is not valid JSON: {err}") from err
    if not isinstance(content, dict):
        raise ManifestError(f"manifest {path} must hold a JSON object, found {type(content).__name__}")
    for split in SPLITS:
        entries = content.get(split, [])
        if not isinstance(entries, list):
            raise ManifestError(f"manifest {path}: '{split}' must be a list, found {type(entries).__name__}")
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                raise ManifestError(f"manifest {path}: {split}[{index}] must be an object with an 'image' path")
    return content


def repo_root() -> Path:
    """The checkout this package is imported from (the base of ``"data_root_base": "repo"``)."""
    return Path(__file__).resolve().parents[2]


def _data_root_base(path: Path, content: Mapping[str, Any]) -> tuple[str, Path]:
    """``(base name, base folder)`` a relative ``data_root`` of the manifest at ``path`` starts from."""
    base = content.get("data_root_base") or "manifest"
    if base not in DATA_ROOT_BASES:
        raise ManifestError(
            f"manifest {path}: unknown data_root_base {base!r}; expected one of {', '.join(DATA_ROOT_BASES)}"
        )
    return base, (repo_root() if base == "repo" else path.resolve().parent)


def resolve_data_root(manifest: str | os.PathLike, data_root: str | os.PathLike | None = None) -> Path:
    """The folder the manifest's relative paths start from.

    Args:
        manifest: manifest JSON path.
        data_root: explicit override (e.g. ``--root``); wins over the manifest's ``"data_root"`` entry
            (None or ``""``: no override).

    Returns:
        ``data_root`` if given; else the manifest's ``"data_root"`` entry (absolute, or relative to its
        ``"data_root_base"``: the manifest's folder by default, the repository root for ``"repo"``); else the
        manifest's folder. The result is absolute and normalised; it is not checked to exist.

    Raises:
        ManifestError: unreadable manifest or unknown ``data_root_base``.
    """
    path = Path(manifest).resolve()
    if data_root is not None and str(data_root) != "":
        return Path(os.path.normpath(Path(data_root).expanduser().resolve()))
    content = load_manifest(path)
    recorded = content.get("data_root")
    if recorded in (None, ""):
        return path.parent
    _, base = _data_root_base(path, content)
    return Path(os.path.normpath(base / Path(str(recorded)).expanduser()))


def describe_data_root(manifest: str | os.PathLike, data_root: str | os.PathLike | None = None) -> str:
    """How :func:`resolve_data_root` found the data root, for error messages.

    E.g. ``'data_root "../shared/data/kvasir-seg" relative to the repository root /x/qgssl-monai'``,
    ``"--root / data_root= override"`` or ``'data_root "/data/set" (absolute)'``.
    """
    if data_root is not None and str(data_root) != "":
        return "the --root / data_root= override"
    path = Path(manifest)
    content = load_manifest(path)
    recorded = content.get("data_root")
    if recorded in (None, ""):
        return "no data_root in the manifest: its folder"
    if Path(str(recorded)).expanduser().is_absolute():
        return f'data_root "{recorded}" (absolute)'
    base, folder = _data_root_base(path, content)
    where = "the repository root" if base == "repo" else "the manifest's folder"
    return f'data_root "{recorded}" relative to {where} {folder}'


def load_split(
    manifest: str | os.PathLike, split: str, data_root: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """Entries of one split with absolute paths.

    Args:
        manifest: manifest JSON path.
        split: one of ``"training"``, ``"validation"``, ``"test"``, ``"unlabeled"``.
        data_root: overrides the manifest's ``"data_root"`` (see :func:`resolve_data_root`).

    Returns:
        ``[{"image": abs_path, "label": abs_path}, ...]`` (``"label"`` absent for ``unlabeled``); an empty
        list when the split is absent or empty.

    Raises:
        ManifestError: unknown split name, unreadable manifest, or the data root folder does not exist.
    """
    if split not in SPLITS:
        raise ManifestError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    path = Path(manifest)
    content = load_manifest(path)
    root = resolve_data_root(path, data_root)
    if not content.get(split):
        return []
    if not root.is_dir():
        raise ManifestError(
            f"data root {root} of manifest {path} does not exist ({describe_data_root(path, data_root)}); "
            "pass data_root=/--root pointing at the data set"
        )
    from monai.data import load_decathlon_datalist  # imported here: validation and `qgssl --help` skip torch

    return load_decathlon_datalist(path, is_segmentation=True, data_list_key=split, base_dir=root)


def _group_members(keys: Sequence[str], groups: Sequence[Hashable] | None) -> tuple[list[str], dict[Hashable, list[str]]]:
    """``(keys as str, {group: its keys in input order})``; each key is its own group when ``groups`` is None.

    Raises:
        ManifestError: duplicate keys or a ``groups`` list of another length.
    """
    keys = [str(k) for k in keys]
    if len(set(keys)) != len(keys):
        duplicates = sorted({k for k in keys if keys.count(k) > 1}, key=natural_key)
        raise ManifestError(f"duplicate items cannot be split: {duplicates[:5]}")
    if groups is None:
        groups = keys
    if len(groups) != len(keys):
        raise ManifestError(f"got {len(groups)} group labels for {len(keys)} items")
    members: dict[Hashable, list[str]] = {}
    for key, group in zip(keys, groups):
        members.setdefault(group, []).append(key)
    return keys, members


def grouped_split(
    keys: Sequence[str],
    *,
    seed: int = 0,
    ratios: Sequence[float] = SPLIT_RATIOS,
    groups: Sequence[Hashable] | None = None,
) -> dict[str, list[str]]:
    """Seeded train/validation/test split aiming at ``ratios`` by item count, keeping groups whole.

    The distinct groups (each item its own group when ``groups`` is None) are sorted, permuted by
    ``numpy.random.default_rng(seed)`` and laid end to end; each group goes to the split in whose
    cumulative-count interval ``[0, r0*n)``, ``[r0*n, (r0+r1)*n)``, ``[.., n)`` its midpoint falls. Without
    groups this gives ``round``-style exact counts (1000 items -> 700/100/200); with groups all items of a
    group land in one split, so counts only approximate the ratios.

    Args:
        keys: unique item identifiers (e.g. image paths).
        seed: split seed; the same seed and items give the same split regardless of input order.
        ratios: three non-negative fractions summing to 1 (training, validation, test).
        groups: optional group label per key (e.g. video sequence); same length as ``keys``.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}`` of keys, each naturally sorted.

    Raises:
        ManifestError: duplicate keys, mismatched ``groups`` length, or invalid ``ratios``.
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or not np.isclose(sum(ratios), 1.0):
        raise ManifestError(f"split ratios must be three non-negative fractions summing to 1, got {tuple(ratios)}")
    keys, members = _group_members(keys, groups)
    ordered = sorted(members, key=lambda g: natural_key(str(g)))
    permutation = np.random.default_rng(seed).permutation(len(ordered))
    total = len(keys)
    bounds = np.cumsum(ratios)[:2] * total
    result: dict[str, list[str]] = {name: [] for name in LABELED_SPLITS}
    filled = 0
    for index in permutation:
        group_keys = members[ordered[index]]
        midpoint = filled + len(group_keys) / 2.0
        split = LABELED_SPLITS[int(np.searchsorted(bounds, midpoint, side="right"))]
        result[split].extend(group_keys)
        filled += len(group_keys)
    return {name: sorted(items, key=natural_key) for name, items in result.items()}


def grouped_kfold(
    keys: Sequence[str], k: int = 4, *, seed: int = 0, groups: Sequence[Hashable] | None = None
) -> list[list[str]]:
    """Seeded K-fold partition of ``keys`` that keeps every group in exactly one fold.

    The distinct groups (each item its own group when ``groups`` is None) are sorted, permuted by
    ``numpy.random.default_rng(seed)`` and dealt largest first (a stable sort of the permutation by size)
    to the fold holding the fewest items so far, which balances fold sizes when groups differ in size
    (CVC-ClinicDB sequences hold 8 to 36 frames).

    Args:
        keys: unique item identifiers (e.g. image paths).
        k: number of folds, 2 <= k <= number of groups.
        seed: the same seed and items give the same folds regardless of input order.
        groups: optional group label per key (video sequence, patient); same length as ``keys``.

    Returns:
        ``k`` lists of keys, each naturally sorted; together they hold every key once.

    Raises:
        ManifestError: duplicate keys, mismatched ``groups`` length, or ``k`` outside ``2..n_groups``.
    """
    keys, members = _group_members(keys, groups)
    if not 2 <= int(k) <= len(members):
        raise ManifestError(f"cannot make {k} folds from {len(members)} group(s); need 2 <= k <= number of groups")
    ordered = sorted(members, key=lambda g: natural_key(str(g)))
    permuted = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    permuted.sort(key=lambda g: -len(members[g]))  # stable: equal sizes keep the seeded order
    folds: list[list[str]] = [[] for _ in range(int(k))]
    for group in permuted:
        smallest = min(range(len(folds)), key=lambda f: (len(folds[f]), f))
        folds[smallest].extend(members[group])
    return [sorted(fold, key=natural_key) for fold in folds]


def hold_out_labels(
    training: Sequence[Mapping[str, Any]],
    labeled_fraction: float,
    *,
    seed: int = 0,
    groups: Sequence[Hashable] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Keep a seeded ``labeled_fraction`` of training entries (or of their groups) labeled; the rest become unlabeled.

    Without ``groups`` the kept count is ``max(1, round(fraction * n))`` entries, the first of one seeded
    permutation of the entries. With ``groups`` (e.g. the video sequence of each frame) whole groups are kept:
    the distinct groups are naturally sorted, permuted by ``numpy.random.default_rng(seed)`` and the first
    ``max(1, round(fraction * n_groups))`` are kept (5 of CVC-ClinicDB's 20 training sequences at 0.25).
    Either way the selection is a prefix of one seeded order, so for the same seed and entries a smaller
    fraction's labeled set is a subset of any larger fraction's (nested label fractions).

    Args:
        training: ``{"image", "label"}`` entries.
        labeled_fraction: in ``(0, 1]``.
        seed: selection seed.
        groups: optional group label per entry (same length as ``training``).

    Returns:
        ``(labeled, unlabeled)``: labeled entries unchanged, unlabeled entries reduced to ``{"image"}``,
        both in input order.

    Raises:
        ManifestError: fraction outside ``(0, 1]`` or mismatched ``groups`` length.
    """
    if not 0.0 < labeled_fraction <= 1.0:
        raise ManifestError(f"labeled fraction must be in (0, 1], got {labeled_fraction}")
    count = len(training)
    if groups is not None and len(groups) != count:
        raise ManifestError(f"got {len(groups)} group labels for {count} training entries")
    if count == 0 or labeled_fraction == 1.0:
        return [dict(e) for e in training], []
    if groups is None:
        keep = max(1, int(round(labeled_fraction * count)))
        chosen = set(np.random.default_rng(seed).permutation(count)[:keep].tolist())
    else:
        ordered = sorted(set(groups), key=lambda g: natural_key(str(g)))
        keep = max(1, int(round(labeled_fraction * len(ordered))))
        kept_groups = {ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))[:keep]}
        chosen = {i for i, group in enumerate(groups) if group in kept_groups}
    labeled = [dict(e) for i, e in enumerate(training) if i in chosen]
    unlabeled = [{"image": e["image"]} for i, e in enumerate(training) if i not in chosen]
    return labeled, unlabeled


def _relative(path: str | os.PathLike, root: Path) -> str:
    """``path`` relative to ``root`` as a POSIX string (relative inputs are taken as already relative)."""
    candidate = Path(path)
    if not candidate.is_absolute():
        return candidate.as_posix()
    return Path(os.path.relpath(os.path.normpath(candidate), root)).as_posix()


def record_data_root(
    data_root: str | os.PathLike, manifest: str | os.PathLike, base: str | None = None
) -> dict[str, str]:
    """The header entries recording ``data_root`` for a manifest written to ``manifest``.

    Args:
        data_root: the data folder.
        manifest: where the manifest is (going to be) written.
        base: ``"absolute"``; ``"manifest"`` or ``"repo"`` (relative to that base, see :data:`DATA_ROOT_BASES`);
            None picks ``"manifest"`` when the manifest lies inside the data folder (the two move together, e.g.
            the demo set's ``manifest.json``) and ``"absolute"`` otherwise.

    Returns:
        ``{"data_root": posix path}``, plus ``{"data_root_base": "repo"}`` for a repository-relative path.
    """
    root = Path(os.path.normpath(Path(data_root).expanduser().resolve()))
    out_dir = Path(manifest).resolve().parent
    if base is None:
        base = "manifest" if out_dir == root or root in out_dir.parents else "absolute"
    if base == "absolute":
        return {"data_root": root.as_posix()}
    if base not in DATA_ROOT_BASES:
        raise ManifestError(f"unknown data_root_base {base!r}; expected absolute or one of {', '.join(DATA_ROOT_BASES)}")
    try:
        relative = os.path.relpath(root, repo_root() if base == "repo" else out_dir)
    except ValueError:  # another drive (Windows): only an absolute path exists
        return {"data_root": root.as_posix()}
    recorded = {"data_root": Path(relative).as_posix()}
    # "manifest" is what an absent field means: leave it out (older readers and files stay as they were)
    return recorded if base == "manifest" else {**recorded, "data_root_base": base}


def write_manifest(
    path: str | os.PathLike,
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    data_root: str | os.PathLike,
    name: str,
    modality: str = "",
    source: str = "",
    citation: str = "",
    licence: str = "",
    split_seed: int | None = None,
    split_rule: str = "",
    extra: Mapping[str, Any] | None = None,
    data_root_base: str | None = None,
) -> Path:
    """Write a manifest JSON (header first, then the four split lists).

    Args:
        path: output file; parent folders are created.
        splits: entries per split (keys among :data:`SPLITS`; missing splits are written empty). Absolute
            paths are made relative to ``data_root``; relative paths are kept as they are.
        data_root: the folder entries are relative to; recorded as ``"data_root"`` as :func:`record_data_root`
            decides with ``data_root_base``.
        name, modality, source, citation, licence, split_seed, split_rule: header fields.
        extra: additional header entries (e.g. ``"preset"``, ``"labels"``, ``"group_splits"``).
        data_root_base: ``"absolute"``, ``"manifest"``, ``"repo"`` or None (absolute unless the manifest lies
            inside ``data_root``); see :func:`record_data_root`.

    Returns:
        The written path.
    """
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ManifestError(f"unknown split name(s) {sorted(unknown)}; expected {', '.join(SPLITS)}")
    out = Path(path).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    root = Path(os.path.normpath(Path(data_root).resolve()))
    recorded_root = record_data_root(root, out, data_root_base)
    lists: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        entries = []
        for entry in splits.get(split, []):
            item = dict(entry)
            for key in ("image", "label"):
                if key in item:
                    item[key] = _relative(item[key], root)
            if split == "unlabeled":
                item.pop("label", None)
            entries.append(item)
        lists[split] = entries
    header: dict[str, Any] = {
        "name": name,
        "modality": modality,
        "source": source,
        "citation": citation,
        "licence": licence,
        **recorded_root,
        "split_seed": split_seed,
        "split_rule": split_rule,
    }
    header.update({f"num_{split}": len(lists[split]) for split in SPLITS})
    if extra:
        header.update({k: v for k, v in extra.items() if k not in header and k not in SPLITS})
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump({**header, **lists}, handle, indent=1, ensure_ascii=False)
        handle.write("\n")
    os.replace(tmp, out)
    return out
