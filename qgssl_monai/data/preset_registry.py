"""The preset registry: :class:`DatasetInfo`, :class:`ScanResult`, :class:`Preset`, :data:`PRESETS` and
:func:`register_preset`, shared by the 2D presets (``presets.py``) and the 3D presets (``presets_3d.py``)
without either importing the other's module cycle."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PRESETS", "DatasetInfo", "Preset", "ScanResult", "register_preset"]


@dataclass(frozen=True)
class DatasetInfo:
    """Provenance written into the manifest header."""

    modality: str
    source: str = ""
    citation: str = ""
    licence: str = ""
    labels: Mapping[str, str] = field(default_factory=lambda: {"0": "background", "1": "foreground"})
    # how masks become binary targets: "binary" (stored {0,1}/{0,255}) or "nonzero" (multi-label, label > 0);
    # written to the manifest header and honoured by `qgssl validate-manifest`
    label_rule: str = "binary"


@dataclass
class ScanResult:
    """What a preset found under its root.

    Attributes:
        labeled: ``{"image": abs_path, "label": abs_path}`` pairs.
        unlabeled: ``{"image": abs_path}`` entries that have no mask.
        groups: a group label per labeled entry (whole groups stay in one split), or None.
        group_rule: what the groups are, for the manifest's ``split_rule``.
    """

    labeled: list[dict[str, str]] = field(default_factory=list)
    unlabeled: list[dict[str, str]] = field(default_factory=list)
    groups: list[str] | None = None
    group_rule: str = ""


@dataclass(frozen=True)
class Preset:
    """A registered layout: ``scan(root)`` plus provenance and a one-line description."""

    name: str
    scan: Callable[[Path], ScanResult]
    info: DatasetInfo
    description: str


PRESETS: dict[str, Preset] = {}


def register_preset(
    name: str, *, description: str, info: DatasetInfo
) -> Callable[[Callable[[Path], ScanResult]], Callable[[Path], ScanResult]]:
    """Decorator registering ``scan(root: Path) -> ScanResult`` under ``name`` in :data:`PRESETS`.

    Raises:
        ValueError: ``name`` is already registered.
    """

    def decorator(scan: Callable[[Path], ScanResult]) -> Callable[[Path], ScanResult]:
        if name in PRESETS:
            raise ValueError(f"preset {name!r} is already registered")
        PRESETS[name] = Preset(name=name, scan=scan, info=info, description=description)
        return scan

    return decorator
