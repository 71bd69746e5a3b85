"""Grouped, seeded, nested labeled fractions (``qgssl subset-labels`` / ``qgssl prepare --label-fraction``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qgssl_monai.cli import main
from qgssl_monai.data.label_subset import subset_labels
from qgssl_monai.data.manifest import ManifestError, hold_out_labels, load_manifest, write_manifest
from qgssl_monai.data.presets import cvc_clinicdb_group, prepare_manifest

REPO = Path(__file__).resolve().parents[1]


def _grouped_manifest(tmp_path: Path, groups_per_split: dict[str, list[int]], per_group: int = 3) -> Path:
    """Entries ``g<k>_<i>.png`` carrying their group ``g<k>`` (the 'group' key route of entry_groups)."""
    splits = {
        split: [{"image": f"images/g{g}_{i}.png", "label": f"masks/g{g}_{i}.png", "group": f"g{g}"}
                for g in groups for i in range(per_group)]
        for split, groups in groups_per_split.items()
    }  # fmt: skip
    (tmp_path / "data").mkdir(exist_ok=True)
    return write_manifest(tmp_path / "m.json", splits, data_root=tmp_path / "data", name="toy", split_seed=4)


def _groups(entries: list[dict]) -> set[str]:
    return {e["group"] for e in entries}


def test_fractions_are_nested_whole_groups_and_leave_validation_test_alone(tmp_path: Path) -> None:
    source = _grouped_manifest(tmp_path, {"training": list(range(20)), "validation": [20, 21], "test": [22, 23, 24]})
    full = load_manifest(source)
    previous: set[str] = set()
    for fraction, n_groups in ((0.1, 2), (0.25, 5), (0.5, 10), (0.75, 15), (1.0, 20)):
        out = subset_labels(source, fraction, tmp_path / f"m{fraction}.json")
        reduced = load_manifest(out)
        kept = _groups(reduced["training"])
        assert len(kept) == n_groups and len(reduced["training"]) == 3 * n_groups  # whole groups only
        assert previous <= kept  # nested: a smaller fraction's labeled set is inside this one
        previous = kept
        assert reduced["validation"] == full["validation"] and reduced["test"] == full["test"]
        assert not kept & (_groups(full["validation"]) | _groups(full["test"]))
        moved = {e["image"] for e in reduced["unlabeled"]}
        assert moved == {e["image"] for e in full["training"]} - {e["image"] for e in reduced["training"]}
        assert all(set(e) == {"image"} for e in reduced["unlabeled"])  # labels of moved entries are dropped
        assert reduced["labeled_fraction"] == fraction and reduced["split_seed"] == 4
        if fraction < 1:
            assert reduced["labeled_groups"] == sorted(kept, key=lambda g: int(g[1:]))
    # the seed is the manifest's split_seed unless given; another seed picks other groups
    other = load_manifest(subset_labels(source, 0.25, tmp_path / "s9.json", seed=9))
    assert _groups(other["training"]) != _groups(load_manifest(tmp_path / "m0.25.json")["training"])


def test_hold_out_labels_with_groups_is_a_prefix_of_one_order() -> None:
    training = [{"image": f"{g}_{i}", "label": "m"} for g in "abcdefgh" for i in range(2)]
    groups = [e["image"][0] for e in training]
    sets = [{e["image"][0] for e in hold_out_labels(training, f, seed=1, groups=groups)[0]} for f in (0.125, 0.25, 0.5, 0.875)]
    assert [len(s) for s in sets] == [1, 2, 4, 7]
    assert sets[0] < sets[1] < sets[2] < sets[3]
    with pytest.raises(ManifestError, match="group labels"):
        hold_out_labels(training, 0.5, groups=groups[:-1])


def test_leaks_and_unrecoverable_groups_are_refused(tmp_path: Path) -> None:
    leaky = _grouped_manifest(tmp_path, {"training": [0, 1, 2], "validation": [3], "test": [2]})
    with pytest.raises(ManifestError, match=r"group\(s\) \['g2'\] also occur in validation/test"):
        subset_labels(leaky, 0.5, tmp_path / "x.json")
    content = json.loads(leaky.read_text())
    for split in ("training", "validation", "test"):
        for entry in content[split]:
            del entry["group"]
    content["group_splits"] = {"g0": "training"}
    leaky.write_text(json.dumps(content))
    with pytest.raises(ManifestError, match="split by groups but its entries carry none"):
        subset_labels(leaky, 0.5, tmp_path / "x.json")
    reduced = load_manifest(tmp_path / "m.json")
    reduced["labeled_fraction"] = 0.5
    (tmp_path / "half.json").write_text(json.dumps(reduced))
    with pytest.raises(ManifestError, match="already keeps a labeled fraction"):
        subset_labels(tmp_path / "half.json", 0.25, tmp_path / "y.json")


def test_shipped_manifests_reduce_to_five_cvc_sequences_and_a_quarter_of_kvasir(tmp_path: Path) -> None:
    cvc = load_manifest(subset_labels(REPO / "data_manifests" / "cvc-clinicdb.json", 0.25, tmp_path / "cvc.json"))
    groups = {cvc_clinicdb_group(Path(e["image"]).stem) for e in cvc["training"]}
    assert len(groups) == 5 and groups == set(cvc["labeled_groups"])
    source = load_manifest(REPO / "data_manifests" / "cvc-clinicdb.json")
    assert all(source["group_splits"][g] == "training" for g in groups)
    # the committed study manifests are exactly what the tool writes
    for name in ("cvc-clinicdb", "kvasir-seg"):
        committed = load_manifest(REPO / "data_manifests" / f"{name}_labeled25.json")
        fresh = load_manifest(subset_labels(REPO / "data_manifests" / f"{name}.json", 0.25, tmp_path / f"{name}.json"))
        for split in ("training", "validation", "test", "unlabeled"):
            assert committed[split] == fresh[split], (name, split)
    assert len(load_manifest(tmp_path / "kvasir-seg.json")["training"]) == 175  # round(0.25 * 700) images


def test_cli_subset_labels(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = _grouped_manifest(tmp_path, {"training": list(range(8)), "validation": [8], "test": [9]})
    assert main(["subset-labels", str(source), "--fraction", "0.25", "--out", str(tmp_path / "q.json")]) == 0
    assert "labeled groups: " in capsys.readouterr().out
    assert load_manifest(tmp_path / "q.json")["num_training"] == 6
    assert main(["subset-labels", str(source), "--fraction", "0.25", "--out", str(tmp_path / "q.json"), "--seed", "1"]) == 0
    with pytest.raises(SystemExit):
        main(["subset-labels", str(source), "--fraction", "1.5", "--out", str(tmp_path / "q.json")])


def test_prepare_and_subset_labels_agree_on_real_cvc(real_data_root: Path, tmp_path: Path) -> None:
    prepared = prepare_manifest("cvc-clinicdb", real_data_root / "cvc-clinicdb", tmp_path / "p.json", labeled_fraction=0.25)
    reduced = subset_labels(REPO / "data_manifests" / "cvc-clinicdb.json", 0.25, tmp_path / "s.json")
    a, b = load_manifest(prepared), load_manifest(reduced)
    assert [e["image"] for e in a["training"]] == [e["image"] for e in b["training"]]
    assert a["validation"] == b["validation"] and a["test"] == b["test"]
