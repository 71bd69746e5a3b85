"""``qgssl quality-check``: score image-mask pairs with a trained quality predictor g.

Single pair::

    qgssl quality-check --image frame.png --mask frame_mask.png [--checkpoint g.pt]

Batch (CSV with a header ``image,mask``; paths relative to the CSV)::

    qgssl quality-check --csv pairs.csv --out scores.csv

Without ``--checkpoint``, g is the first file of :func:`default_checkpoints` that exists. Every input is checked
before g runs, with the checks of ``qgssl validate-manifest`` (:mod:`qgssl_monai.data.validation`): a missing,
truncated or unreadable image, a mask that is not one binary channel or not the image's size is refused with one
line naming the file. A CSV batch reports every bad row, scores the others and exits 1 when a row failed.

This module imports neither torch nor MONAI until the command runs (``qgssl --help`` stays fast);
:class:`~qgssl_monai.serving.quality_check.QualityChecker` does the scoring.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from qgssl_monai.errors import BUNDLES_DIR, CheckpointNotFoundError, UnreadableCheckpointError

__all__ = ["default_checkpoints", "find_checkpoint", "register", "run_quality_check"]

# where `make demo` (`qgssl demo-job --out runs/demo`) writes g, relative to the repository root
DEMO_CHECKPOINT = Path("runs") / "demo" / "quality" / "models" / "model.pt"
QUALITY_BUNDLE = BUNDLES_DIR / "quality_predictor"


def default_checkpoints(bundle: str | Path = QUALITY_BUNDLE) -> list[Path]:
    """Where ``qgssl quality-check`` looks for g without ``--checkpoint``, in order.

    1. ``<bundle>/models/model.pt``: the quality bundle's own training (README, "Bundles");
    2. ``runs/demo/quality/models/model.pt`` in the current folder: ``make demo``;
    3. the same under the repository root (when run from elsewhere).
    """
    candidates = [Path(bundle) / "models" / "model.pt", DEMO_CHECKPOINT, BUNDLES_DIR.parent / DEMO_CHECKPOINT]
    unique: list[Path] = []
    for path in candidates:
        if path.resolve() not in {p.resolve() for p in unique}:
            unique.append(path)
    return unique


def find_checkpoint(checkpoint: str | None, bundle: str | Path = QUALITY_BUNDLE) -> Path:
    """``checkpoint`` if given, else the first existing :func:`default_checkpoints` entry.

    Raises:
        CheckpointNotFoundError: one line naming the path(s) looked at and the command that trains g.
    """
    train = f"cd {BUNDLES_DIR.parent} && make demo (writes {DEMO_CHECKPOINT})"
    if checkpoint is not None:
        path = Path(checkpoint)
        if path.is_dir():
            raise CheckpointNotFoundError(f"checkpoint {path} is a directory, not a file")
        if not path.is_file():
            raise CheckpointNotFoundError(f"checkpoint not found: {path}; train g with: {train}")
        return path
    candidates = default_checkpoints(bundle)
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise CheckpointNotFoundError(
        f"no quality predictor checkpoint found (looked for {looked}); train g with: {train}, or pass --checkpoint PATH"
    )


def _pair_problems(image: str, mask: str, grey_tolerance: float) -> list[str]:
    """``"<path>: <problem>"`` lines for one image-mask pair (empty when it can be scored)."""
    from qgssl_monai.data.validation import check_file, check_mask

    image_check = check_file(image, is_mask=False, decode=True)
    mask_check = check_mask(mask, image_check, grey_tolerance=grey_tolerance)
    return [f"{image}: {m}" for m in image_check.problems] + [f"{mask}: {m}" for m in mask_check.problems]


def _load_checker(args: argparse.Namespace):
    """:class:`QualityChecker` on the found checkpoint; a file torch cannot read is one line naming it."""
    from qgssl_monai.serving.quality_check import QualityChecker

    checkpoint = find_checkpoint(args.checkpoint, args.bundle)
    try:
        return QualityChecker.from_bundle(
            args.bundle, checkpoint, image_size=args.image_size, backbone=args.backbone, device=args.device
        )
    except (FileNotFoundError, ValueError):
        raise  # already one line naming the file
    except Exception as err:  # torch.load raises UnpicklingError/RuntimeError/EOFError... for a damaged file
        first_line = next((line for line in str(err).splitlines() if line.strip()), "")
        raise UnreadableCheckpointError(
            f"cannot read quality predictor checkpoint {checkpoint} ({type(err).__name__}: {first_line}); "
            "is it a complete model.pt written by the quality bundle?"
        ) from err


def _score_csv(args: argparse.Namespace) -> int:
    from qgssl_monai.quality.io import read_pairs_csv

    pairs = read_pairs_csv(args.csv, check_files=False)
    failed: dict[int, str] = {}
    for row, pair in enumerate(pairs):
        problems = _pair_problems(pair["image"], pair["mask"], args.grey_tolerance)
        if problems:
            failed[row] = "; ".join(problems)
            for problem in problems:
                print(f"{args.csv}, line {row + 2}: {problem}", file=sys.stderr)
    good = [row for row in range(len(pairs)) if row not in failed]
    scores: dict[int, float] = {}
    if good:
        checker = _load_checker(args)
        values = checker.score_files([(pairs[r]["image"], pairs[r]["mask"]) for r in good])
        scores = dict(zip(good, values))
    out = Path(args.out) if args.out else Path(args.csv).with_name(Path(args.csv).stem + "_scores.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "mask", "quality", "error"])
        for row, pair in enumerate(pairs):
            quality = f"{scores[row]:.6f}" if row in scores else ""
            writer.writerow([pair["image_path"], pair["mask_path"], quality, failed.get(row, "")])
    print(f"scored {len(scores)} of {len(pairs)} pairs -> {out}")
    if failed:
        print(f"quality-check: {len(failed)} row(s) of {args.csv} not scored (listed above)", file=sys.stderr)
        return 1
    return 0


def run_quality_check(args: argparse.Namespace) -> int:
    """Entry point of ``qgssl quality-check``: 0 scored, 1 bad input/checkpoint (one line each), 2 bad usage."""
    if bool(args.csv) == bool(args.image or args.mask):
        print("quality-check: give either --image and --mask, or --csv (with --out)", file=sys.stderr)
        return 2
    if bool(args.image) != bool(args.mask):
        print("quality-check: --image and --mask go together", file=sys.stderr)
        return 2
    if args.csv:
        if Path(args.csv).is_dir():
            print(f"quality-check: {args.csv} is a directory, not a CSV file", file=sys.stderr)
            return 1
        try:
            return _score_csv(args)
        except (FileNotFoundError, ValueError) as err:  # the CSV itself: missing, no header, no rows
            print(f"quality-check: {err}", file=sys.stderr)
            return 1
    problems = _pair_problems(args.image, args.mask, args.grey_tolerance)
    if problems:
        for problem in problems:
            print(f"quality-check: {problem}", file=sys.stderr)
        return 1
    try:
        checker = _load_checker(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"quality-check: {err}", file=sys.stderr)
        return 1
    print(f"{checker.score_file(args.image, args.mask):.4f}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``quality-check`` to the ``qgssl`` command line (no torch import)."""
    from qgssl_monai.data.cli import add_grey_tolerance_argument

    looked = ", ".join(str(p) for p in default_checkpoints())
    parser = subparsers.add_parser(
        "quality-check",
        help="estimate the Dice of segmentation masks with the trained quality predictor",
        description="Score image-mask pairs with the trained quality predictor g (estimated Dice).",
    )
    parser.add_argument("--image", help="image file (any size)")
    parser.add_argument("--mask", help="binary single-channel mask file of the image's size")
    parser.add_argument("--csv", help="CSV with columns image,mask (paths relative to the CSV)")
    parser.add_argument("--out", help="output CSV for --csv (default: <csv stem>_scores.csv)")
    parser.add_argument("--bundle", default=str(QUALITY_BUNDLE), help="quality-predictor bundle folder (default: %(default)s)")
    parser.add_argument("--checkpoint", help=f"g's weights (default: the first that exists of {looked})")
    parser.add_argument("--image-size", type=int, help="override the training image size")
    parser.add_argument("--backbone", help="override the training backbone")
    add_grey_tolerance_argument(parser)
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.set_defaults(func=run_quality_check)
