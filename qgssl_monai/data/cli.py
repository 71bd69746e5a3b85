"""Data sub-commands of ``qgssl``: ``prepare``, ``subset-labels``, ``validate-manifest``, ``demo-data``.

``qgssl_monai.cli`` calls :func:`register` with its sub-parsers; every parser sets ``func=handler(args) -> int``
(the process exit code).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qgssl_monai.data.manifest import DATA_ROOT_BASES, SPLITS, ManifestError

__all__ = [
    "add_grey_tolerance_argument", "register", "run_demo_data", "run_prepare", "run_subset_labels", "run_validate_manifest",
]


def run_prepare(args: argparse.Namespace) -> int:
    """``qgssl prepare``: 0 on success, 1 (message on stderr) when the layout is not found or inconsistent, or when
    the written manifest lists bad files (validated unless ``--no-validate``)."""
    from qgssl_monai.data.presets import prepare_manifest

    try:
        out = prepare_manifest(
            args.preset,
            args.root,
            args.out,
            seed=args.seed,
            unlabeled_roots=args.unlabeled_root or (),
            labeled_fraction=args.labeled_fraction,
            name=args.name,
            groups_file=args.groups,
            data_root_base=args.data_root_base,
        )
    except ManifestError as err:
        print(f"qgssl prepare: {err}", file=sys.stderr)
        return 1
    header, counts = _written(out)
    base = header.get("data_root_base")
    print(f"wrote {out} ({counts}; data_root {header['data_root']}{f' relative to {base}' if base else ''})")
    if not args.validate:
        return 0
    code = run_validate_manifest(
        argparse.Namespace(
            manifest=str(out), root=None, splits=list(SPLITS), skip_bad=False, out=None,
            decode_images=False, grey_tolerance=0.0, quiet=False,
        )
    )  # fmt: skip
    if code:
        print(
            f"qgssl prepare: {out} lists bad files (above); fix them, or write a manifest without them with "
            f"`qgssl validate-manifest {out} --skip-bad`",
            file=sys.stderr,
        )
    return code


def _written(manifest: str | Path) -> tuple[dict, str]:
    """The header of a manifest just written and its split counts as text ("70 training, 10 validation, ...")."""
    from qgssl_monai.data.manifest import load_manifest

    header = load_manifest(manifest)
    return header, ", ".join(f"{header[f'num_{s}']} {s}" for s in SPLITS)


def run_subset_labels(args: argparse.Namespace) -> int:
    """``qgssl subset-labels``: 0 on success, 1 (message on stderr) when the manifest cannot be reduced."""
    from qgssl_monai.data.label_subset import subset_labels

    try:
        out = subset_labels(args.manifest, args.fraction, args.out, seed=args.seed, groups_file=args.groups, name=args.name)
    except ManifestError as err:
        print(f"qgssl subset-labels: {err}", file=sys.stderr)
        return 1
    header, counts = _written(out)
    groups = header.get("labeled_groups")
    print(f"wrote {out} ({counts})" + (f"; labeled groups: {', '.join(groups)}" if groups else ""))
    return 0


def run_validate_manifest(args: argparse.Namespace) -> int:
    """``qgssl validate-manifest``: 0 when clean (or cleaned with ``--skip-bad``), 1 with problems, 2 when the
    manifest itself cannot be read."""
    from qgssl_monai.data.validation import validate_manifest, write_clean_manifest

    try:
        report = validate_manifest(
            args.manifest,
            args.root,
            args.splits,
            decode_images=args.decode_images,
            grey_tolerance=args.grey_tolerance,
            progress=None if not args.quiet else False,
        )
    except ManifestError as err:
        print(f"qgssl validate-manifest: {err}", file=sys.stderr)
        return 2
    for problem in report.problems:
        print(problem)
    print(report.summary())
    if report.ok or not args.skip_bad:
        return 0 if report.ok else 1
    manifest = Path(args.manifest)
    out = Path(args.out) if args.out else manifest.with_name(manifest.name.removesuffix(".json") + ".clean.json")
    try:
        clean, skipped = write_clean_manifest(report, out)
    except ManifestError as err:
        print(f"qgssl validate-manifest: {err}", file=sys.stderr)
        return 1
    print(f"wrote cleaned manifest {clean} without {len(report.bad_entries)} bad entries (listed in {skipped})")
    return 0


def run_demo_data(args: argparse.Namespace) -> int:
    """``qgssl demo-data``: generate the synthetic 2D demo set and print its manifest path."""
    from qgssl_monai.data.demo import generate_demo_dataset

    options = {
        "n_labeled": args.n_labeled,
        "n_unlabeled": args.n_unlabeled,
        "image_size": args.size,
    }
    manifest = generate_demo_dataset(args.out, seed=args.seed, **{k: v for k, v in options.items() if v is not None})
    print(f"wrote demo data set; manifest {manifest}")
    return 0


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _tolerance(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def add_grey_tolerance_argument(parser: argparse.ArgumentParser) -> None:
    """``--grey-tolerance`` (:func:`~qgssl_monai.data.validation.mask_value_problem`), shared by the mask checks."""
    parser.add_argument(
        "--grey-tolerance", type=_tolerance, default=0.0,
        help="fraction of mask pixels allowed outside {0, max}, e.g. 0.05 for JPEG masks thresholded at load time",
    )  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``prepare``, ``subset-labels``, ``validate-manifest`` and ``demo-data`` to the ``qgssl`` sub-parsers."""
    from qgssl_monai.data.presets import PRESETS

    listing = "\n".join(f"  {name:<18} {PRESETS[name].description}" for name in sorted(PRESETS))
    prepare = subparsers.add_parser(
        "prepare",
        help="build a data manifest from a data set folder",
        description="Build a manifest (seeded 70:10:20 split, grouped where the data set has groups).\n\npresets:\n"
        + listing,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prepare.add_argument("preset", choices=sorted(PRESETS), metavar="PRESET", help="layout preset (see list above)")
    prepare.add_argument("--root", required=True, help="data set folder in the preset's layout")
    prepare.add_argument("--out", default=None, help="manifest path (default data_manifests/<name>.json)")
    prepare.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    prepare.add_argument(
        "--unlabeled-root", action="extend", nargs="+", default=None, metavar="DIR",
        help="extra folder(s) of unlabeled images, e.g. another data set (cross-source setting)",
    )  # fmt: skip
    prepare.add_argument(
        "--labeled-fraction", "--label-fraction", "--label-ratio", dest="labeled_fraction", type=_fraction, default=1.0,
        help="keep this seeded fraction of the training groups (images without groups) labeled; move the rest "
        "to unlabeled (default 1; nested: a smaller fraction's labeled set is inside a larger one's); "
        "e.g. 0.25, or 0.05/0.1/0.2 for the 3D papers' label ratios",
    )  # fmt: skip
    prepare.add_argument(
        "--groups", default=None, metavar="FILE",
        help="CSV 'stem,group' (or JSON {stem: group}) keeping each group (patient, video) in one split",
    )  # fmt: skip
    prepare.add_argument("--name", default=None, help="manifest name (default: the preset name)")
    prepare.add_argument(
        "--data-root-base", choices=("absolute", *DATA_ROOT_BASES), default=None,
        help="record data_root absolute, relative to the manifest's folder, or relative to the repository root "
        "(portable across clones, as the shipped manifests); default: absolute unless the manifest is written "
        "inside the data folder",
    )  # fmt: skip
    prepare.add_argument(
        "--validate", action=argparse.BooleanOptionalAction, default=True,
        help="check every listed file after writing, exit 1 listing the bad ones (default: on)",
    )  # fmt: skip
    prepare.set_defaults(func=run_prepare)

    subset = subparsers.add_parser(
        "subset-labels",
        help="keep a grouped, seeded fraction of a manifest's labeled training set",
        description="Write a copy of MANIFEST keeping FRACTION of its labeled training groups (whole video "
        "sequences for CVC-ClinicDB, images for data sets without groups), the same selection as "
        "'qgssl prepare --label-fraction'; validation and test unchanged, the rest of training moved to unlabeled.",
    )
    subset.add_argument("manifest", help="manifest JSON with the full labeled training set")
    subset.add_argument("--fraction", type=_fraction, required=True, help="labeled fraction in (0, 1], e.g. 0.25")
    subset.add_argument("--out", required=True, help="output manifest path")
    subset.add_argument("--seed", type=int, default=None, help="selection seed (default: the manifest's split_seed)")
    subset.add_argument("--groups", default=None, metavar="FILE", help="CSV 'stem,group' (or JSON) when the manifest's groups cannot be derived")
    subset.add_argument("--name", default=None, help="manifest name (default <name>-labeled<percent>)")
    subset.set_defaults(func=run_subset_labels)

    validate = subparsers.add_parser(
        "validate-manifest",
        help="check every file of a manifest; exit 1 listing the problems",
        description="Report every missing, empty, unreadable, truncated or mismatched file (one line each) and "
        "exit 1; exit 0 with a summary when all is fine. --skip-bad writes a cleaned manifest instead.",
    )
    validate.add_argument("manifest", help="manifest JSON")
    validate.add_argument("--root", default=None, help="data root (default: the manifest's data_root entry)")
    validate.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS), help="splits to check")
    validate.add_argument("--skip-bad", action="store_true", help="write a cleaned manifest + list of skipped entries")
    validate.add_argument("--out", default=None, help="cleaned manifest path (default <manifest>.clean.json)")
    validate.add_argument("--decode-images", action="store_true", help="fully decode images, not just headers")
    add_grey_tolerance_argument(validate)
    validate.add_argument("--quiet", action="store_true", help="no progress bar")
    validate.set_defaults(func=run_validate_manifest)

    demo = subparsers.add_parser("demo-data", help="generate the synthetic 2D demo data set and its manifest")
    demo.add_argument("--out", required=True, help="output folder")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--size", type=int, default=None, help="image size in pixels (default: generator's)")
    demo.add_argument("--n-labeled", type=int, default=None, help="labeled images (default: generator's)")
    demo.add_argument("--n-unlabeled", type=int, default=None, help="unlabeled images (default: generator's)")
    demo.set_defaults(func=run_demo_data)
