"""The shipped manifests against the real data in ../shared/data (skipped only when that folder is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from monai.data import load_decathlon_datalist

from qgssl_monai.data.manifest import resolve_data_root
from qgssl_monai.data.presets import cvc_clinicdb_sequence, prepare_manifest
from qgssl_monai.data.validation import assert_valid_manifest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MANIFESTS = REPO / "data_manifests"

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not DATA.is_dir(), reason=f"real data folder {DATA} absent"),
]


@pytest.mark.parametrize(
    "name, counts",
    [("kvasir-seg", (700, 100, 200)), ("cvc-clinicdb", None)],
)
def test_shipped_manifest_loads_with_monai_and_validates_clean(name: str, counts: tuple[int, int, int] | None) -> None:
    manifest = MANIFESTS / f"{name}.json"
    header = json.loads(manifest.read_text())
    # relative to the repository root: works in any clone beside shared/, and after moving the manifest
    assert (header["data_root"], header["data_root_base"]) == (f"../shared/data/{name}", "repo")
    assert header["licence"] and header["citation"] and header["source_notes"]
    root = resolve_data_root(manifest)
    assert root.resolve() == (DATA / name).resolve()
    loaded = {
        split: load_decathlon_datalist(manifest, is_segmentation=True, data_list_key=split, base_dir=root)
        for split in ("training", "validation", "test")
    }
    sizes = tuple(len(loaded[s]) for s in ("training", "validation", "test"))
    assert sizes == tuple(header[f"num_{s}"] for s in ("training", "validation", "test"))
    if counts is not None:
        assert sizes == counts
    assert sum(sizes) == len(list((DATA / name / "images").iterdir()))
    assert all(Path(e["image"]).is_file() and Path(e["label"]).is_file() for s in loaded.values() for e in s)
    report = assert_valid_manifest(manifest, progress=False)  # header sizes + decoded masks, all 1612 pairs
    assert report.ok and sum(report.counts.values()) == sum(sizes)


def test_cvc_clinicdb_manifest_has_no_sequence_leakage() -> None:
    header = json.loads((MANIFESTS / "cvc-clinicdb.json").read_text())
    owner: dict[int, str] = {}
    for split in ("training", "validation", "test"):
        for entry in header[split]:
            sequence = cvc_clinicdb_sequence(int(Path(entry["image"]).stem))
            assert owner.setdefault(sequence, split) == split
    assert len(owner) == 29
    assert (header["num_training"], header["num_validation"], header["num_test"]) == (431, 63, 118)


@pytest.mark.parametrize("name", ["kvasir-seg", "cvc-clinicdb"])
def test_shipped_manifest_is_reproduced_by_prepare(name: str, tmp_path: Path) -> None:
    shipped = json.loads((MANIFESTS / f"{name}.json").read_text())
    rebuilt = json.loads(prepare_manifest(name, DATA / name, tmp_path / f"{name}.json", seed=0).read_text())
    for key in ("training", "validation", "test", "unlabeled", "split_rule", "split_seed", "citation", "licence"):
        assert rebuilt[key] == shipped[key], key
