"""Label-scarce manifests: keep a grouped, seeded, nested fraction of an existing manifest's labeled training set.

``qgssl subset-labels data_manifests/cvc-clinicdb.json --fraction 0.25 --out cvc-clinicdb_25.json`` gives the
same labeled set as ``qgssl prepare cvc-clinicdb --root ... --label-fraction 0.25`` without re-scanning the
data: whole groups (CVC-ClinicDB video sequences; each image its own group for data sets without groups) are
kept, chosen as a prefix of one seeded order of the groups (:func:`qgssl_monai.data.manifest.hold_out_labels`),
so a smaller fraction's labeled set is a subset of any larger one's. Validation and test are copied unchanged;
the training entries that lose their labels move to the manifest's ``unlabeled`` list, as with ``qgssl prepare``.
(An experiment whose ``data.unlabeled`` names a different manifest, e.g. the cross-source polyp study, does not
read the labeled manifest's ``unlabeled`` list at all: its unlabeled pool stays the other data set's full pool.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qgssl_monai.data.manifest import (
    LABELED_SPLITS,
    ManifestError,
    hold_out_labels,
    load_manifest,
    natural_key,
    resolve_data_root,
    write_manifest,
)

__all__ = ["entry_groups", "subset_labels"]

# header fields write_manifest sets itself (everything else in the source header is carried over)
_OWN_HEADER = ("name", "modality", "source", "citation", "licence", "data_root", "data_root_base", "split_seed", "split_rule")


def entry_groups(
    content: dict[str, Any], split: str, groups_file: str | os.PathLike | None = None
) -> list[str] | None:
    """Group label of every entry of ``split`` in a loaded manifest, or None when the data set has no groups.

    Sources, first match wins: ``groups_file`` (``stem,group`` CSV or ``{stem: group}`` JSON, as for
    ``qgssl prepare --groups``); a ``"group"`` key on every entry; the preset's file-name rule
    (:data:`qgssl_monai.data.presets.GROUP_OF_STEM`, e.g. CVC-ClinicDB frame number -> sequence).

    Raises:
        ManifestError: the manifest records grouped splits (``group_splits``) but the groups cannot be
            recovered, so a per-image selection would silently ignore them.
    """
    from qgssl_monai.data.presets import GROUP_OF_STEM, read_groups

    entries = content.get(split, [])
    if groups_file is not None:
        return read_groups(groups_file, [e["image"] for e in entries])
    if entries and all("group" in e for e in entries):
        return [str(e["group"]) for e in entries]
    rule = GROUP_OF_STEM.get(str(content.get("preset", "")))
    if rule is not None:
        return [rule(Path(e["image"]).stem) for e in entries]
    if content.get("group_splits"):
        raise ManifestError(
            f"manifest {content.get('name')!r} was split by groups but its entries carry none; pass a groups file"
        )
    return None


def subset_labels(
    manifest: str | os.PathLike,
    fraction: float,
    out: str | os.PathLike,
    *,
    seed: int | None = None,
    groups_file: str | os.PathLike | None = None,
    name: str | None = None,
) -> Path:
    """Write a copy of ``manifest`` keeping ``fraction`` of its labeled training groups.

    Args:
        manifest: a manifest with its full labeled training set (``labeled_fraction`` 1 or absent).
        fraction: in ``(0, 1]``; ``max(1, round(fraction * n_groups))`` groups stay labeled.
        out: output manifest path (its ``data_root`` is rewritten relative to it).
        seed: selection seed; default the manifest's ``split_seed`` (what ``qgssl prepare`` uses).
        groups_file: groups of the images (see :func:`entry_groups`).
        name: output ``name``; default ``<name>-labeled<percent>`` (e.g. ``cvc-clinicdb-labeled25``).

    Returns:
        The written path. Header additions: ``labeled_fraction``, ``labeled_groups`` (kept groups, naturally
        sorted; absent without groups), ``subset_of`` (the source manifest's file name).

    Raises:
        ManifestError: fraction outside ``(0, 1]``, an already reduced source manifest, groups that cannot be
            recovered, or a kept training group that also occurs in validation or test.
    """
    source = Path(manifest)
    content = load_manifest(source)
    if float(content.get("labeled_fraction", 1.0) or 1.0) != 1.0:
        raise ManifestError(
            f"manifest {source} already keeps a labeled fraction ({content['labeled_fraction']}); subset its full source"
        )
    split_seed = content.get("split_seed")
    seed = int(split_seed if split_seed is not None else 0) if seed is None else int(seed)
    groups = entry_groups(content, "training", groups_file)
    if groups is not None:
        held = {g for split in LABELED_SPLITS[1:] for g in entry_groups(content, split, groups_file) or []}
        leaked = sorted(set(groups) & held, key=natural_key)
        if leaked:
            raise ManifestError(f"manifest {source}: training group(s) {leaked[:5]} also occur in validation/test")
    labeled, moved = hold_out_labels(content["training"], fraction, seed=seed, groups=groups)
    kept = {e["image"] for e in labeled}
    percent = f"{fraction * 100:g}"
    unit = "groups" if groups is not None else "images"
    extra = {k: v for k, v in content.items() if k not in _OWN_HEADER and not k.startswith("num_") and k not in (*LABELED_SPLITS, "unlabeled")}
    extra.update(labeled_fraction=fraction, subset_of=source.name)
    if groups is not None:
        extra["labeled_groups"] = sorted({g for g, e in zip(groups, content["training"]) if e["image"] in kept}, key=natural_key)
    root = resolve_data_root(source)
    return write_manifest(
        out,
        {
            "training": labeled,
            "validation": content.get("validation", []),
            "test": content.get("test", []),
            "unlabeled": [*moved, *content.get("unlabeled", [])],
        },
        data_root=root,
        # a repository-relative source stays repository-relative (portable); otherwise absolute, so the copy can move
        data_root_base="repo" if content.get("data_root_base") == "repo" else None,
        name=name or f"{content.get('name', source.stem)}-labeled{percent}",
        modality=str(content.get("modality", "")),
        source=str(content.get("source", "")),
        citation=str(content.get("citation", "")),
        licence=str(content.get("licence", "")),
        split_seed=split_seed,
        split_rule=f"{content.get('split_rule', '')}; {fraction:g} of training {unit} kept labeled "
        f"(seed {seed}, nested), the rest moved to unlabeled",
        extra=extra,
    )
