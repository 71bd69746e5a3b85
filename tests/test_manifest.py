"""Manifest read/write, seeded grouped splits, labeled subsets."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from monai.data import load_decathlon_datalist

from qgssl_monai.data.manifest import (
    SPLITS,
    ManifestError,
    describe_data_root,
    grouped_split,
    hold_out_labels,
    load_manifest,
    load_split,
    natural_key,
    repo_root,
    resolve_data_root,
    write_manifest,
)


def _flatten(split: dict[str, list[str]]) -> list[str]:
    return [k for name in ("training", "validation", "test") for k in split[name]]


@pytest.mark.parametrize("count, expected", [(1000, (700, 100, 200)), (10, (7, 1, 2)), (612, (428, 62, 122))])
def test_ungrouped_split_hits_ratios_exactly(count: int, expected: tuple[int, int, int]) -> None:
    keys = [f"img{i}.png" for i in range(count)]
    split = grouped_split(keys, seed=3)
    assert tuple(len(split[s]) for s in ("training", "validation", "test")) == expected
    assert sorted(_flatten(split)) == sorted(keys)  # a partition: every key once


def test_split_is_reproducible_and_seed_dependent() -> None:
    keys = [f"case_{i:03d}" for i in range(50)]
    first = grouped_split(keys, seed=7)
    assert grouped_split(list(reversed(keys)), seed=7) == first  # input order does not matter
    assert grouped_split(keys, seed=8) != first
    assert first["training"] == sorted(first["training"], key=natural_key)


def test_grouped_split_never_splits_a_group_and_aims_at_ratios() -> None:
    # 20 groups of sizes 1..20 (210 items)
    keys, groups = [], []
    for g in range(1, 21):
        for i in range(g):
            keys.append(f"g{g}_{i}")
            groups.append(f"g{g}")
    for seed in range(5):
        split = grouped_split(keys, seed=seed, groups=groups)
        owner = {}
        for name, members in split.items():
            for key in members:
                group = key.split("_")[0]
                assert owner.setdefault(group, name) == name, f"group {group} crosses splits (seed {seed})"
        assert sorted(_flatten(split)) == sorted(keys)
        assert 0.6 <= len(split["training"]) / len(keys) <= 0.8


def test_single_group_goes_to_training_and_custom_ratios() -> None:
    split = grouped_split(["a", "b", "c"], groups=["x", "x", "x"], seed=0)
    assert split == {"training": ["a", "b", "c"], "validation": [], "test": []}
    half = grouped_split([str(i) for i in range(8)], ratios=(0.5, 0.0, 0.5), seed=1)
    assert (len(half["training"]), len(half["validation"]), len(half["test"])) == (4, 0, 4)


def test_split_rejects_bad_input() -> None:
    with pytest.raises(ManifestError, match="duplicate"):
        grouped_split(["a", "a", "b"])
    with pytest.raises(ManifestError, match="ratios"):
        grouped_split(["a", "b"], ratios=(0.5, 0.5, 0.5))
    with pytest.raises(ManifestError, match="2 group labels for 3 items"):
        grouped_split(["a", "b", "c"], groups=["x", "y"])


def test_hold_out_labels_keeps_a_seeded_fraction() -> None:
    training = [{"image": f"i{k}.png", "label": f"m{k}.png"} for k in range(10)]
    labeled, unlabeled = hold_out_labels(training, 0.3, seed=2)
    assert len(labeled) == 3 and len(unlabeled) == 7
    assert all(set(e) == {"image"} for e in unlabeled)
    assert sorted([e["image"] for e in labeled] + [e["image"] for e in unlabeled], key=natural_key) == [
        f"i{k}.png" for k in range(10)
    ]
    assert hold_out_labels(training, 0.3, seed=2) == (labeled, unlabeled)
    assert hold_out_labels(training, 1.0) == (training, [])
    assert len(hold_out_labels(training, 0.01)[0]) == 1  # at least one labeled image
    with pytest.raises(ManifestError, match="labeled fraction"):
        hold_out_labels(training, 0.0)


def _write_example(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data" / "set"
    (data / "images").mkdir(parents=True)
    manifest = tmp_path / "manifests" / "example.json"
    splits = {
        "training": [{"image": str(data / "images" / "a.png"), "label": str(data / "masks" / "a.png")}],
        "validation": [{"image": "images/b.png", "label": "masks/b.png"}],  # relative: kept as is
        "test": [],
        "unlabeled": [{"image": str(data / "images" / "u.png"), "label": "ignored.png"}],
    }
    write_manifest(
        manifest, splits, data_root=data, name="example", modality="endoscopy", source="src", citation="cite",
        licence="CC", split_seed=4, split_rule="rule", extra={"preset": "folders"},
    )  # fmt: skip
    return manifest, data


def test_write_manifest_header_and_relative_paths(tmp_path: Path) -> None:
    manifest, _ = _write_example(tmp_path)
    content = json.loads(manifest.read_text())
    assert list(content)[:8] == ["name", "modality", "source", "citation", "licence", "data_root", "split_seed", "split_rule"]
    # outside the data folder the data root is recorded absolute: the manifest can be moved
    assert content["data_root"] == (tmp_path / "data" / "set").as_posix() and "data_root_base" not in content
    assert (content["num_training"], content["num_validation"], content["num_test"], content["num_unlabeled"]) == (1, 1, 0, 1)
    assert content["training"] == [{"image": "images/a.png", "label": "masks/a.png"}]
    assert content["unlabeled"] == [{"image": "images/u.png"}]  # labels never kept in unlabeled
    assert content["preset"] == "folders" and content["split_seed"] == 4
    assert list(content)[-4:] == list(SPLITS)


def test_load_split_returns_absolute_paths_and_honours_overrides(tmp_path: Path) -> None:
    manifest, data = _write_example(tmp_path)
    assert resolve_data_root(manifest) == data.resolve()
    assert load_split(manifest, "training") == [
        {"image": str(data / "images" / "a.png"), "label": str(data / "masks" / "a.png")}
    ]
    assert load_split(manifest, "unlabeled") == [{"image": str(data / "images" / "u.png")}]
    assert load_split(manifest, "test") == []
    # MONAI reads it too, given the data root
    assert load_decathlon_datalist(manifest, data_list_key="validation", base_dir=resolve_data_root(manifest)) == [
        {"image": str(data / "images" / "b.png"), "label": str(data / "masks" / "b.png")}
    ]
    assert load_split(manifest, "training", data_root="") == load_split(manifest, "training")  # "" = no override
    moved = tmp_path / "moved"
    moved.mkdir()
    assert load_split(manifest, "training", data_root=moved)[0]["image"] == str(moved / "images" / "a.png")


def test_load_split_errors_name_the_problem(tmp_path: Path) -> None:
    manifest, _ = _write_example(tmp_path)
    with pytest.raises(ManifestError, match="unknown split 'train'"):
        load_split(manifest, "train")
    with pytest.raises(ManifestError, match="data root .*nowhere.* does not exist .the --root / data_root= override"):
        load_split(manifest, "training", data_root=tmp_path / "nowhere")
    with pytest.raises(ManifestError, match="manifest not found"):
        load_split(tmp_path / "missing.json", "training")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ManifestError, match="broken.json is not valid JSON"):
        load_manifest(broken)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"training": {"image": "a"}}))
    with pytest.raises(ManifestError, match="'training' must be a list"):
        load_manifest(wrong)
    no_image = tmp_path / "no_image.json"
    no_image.write_text(json.dumps({"training": [{"label": "a"}]}))
    with pytest.raises(ManifestError, match=r"training\[0\] must be an object with an 'image'"):
        load_manifest(no_image)


def test_data_root_bases_survive_moving_the_manifest(tmp_path: Path) -> None:
    manifest, data = _write_example(tmp_path)
    entries = load_split(manifest, "training")
    # absolute (default outside the data folder): moving the manifest changes nothing
    moved = tmp_path / "elsewhere" / "deep" / "m.json"
    moved.parent.mkdir(parents=True)
    shutil.copy(manifest, moved)
    assert load_split(moved, "training") == entries
    # "repo": relative to the checkout holding the package, wherever the manifest is
    splits = {"training": [{"image": "images/a.png", "label": "masks/a.png"}]}
    repo_relative = write_manifest(tmp_path / "r.json", splits, data_root=data, name="r", data_root_base="repo")
    content = json.loads(repo_relative.read_text())
    assert content["data_root_base"] == "repo"
    assert content["data_root"] == Path(os.path.relpath(data, repo_root())).as_posix()
    shutil.copy(repo_relative, moved)
    assert load_split(moved, "training") == entries
    assert "relative to the repository root" in describe_data_root(moved)
    # "manifest": relative to its folder (what the demo set's manifest inside its data folder gets by default)
    inside = write_manifest(data / "manifest.json", splits, data_root=data, name="in")
    assert (json.loads(inside.read_text())["data_root"], resolve_data_root(inside)) == (".", data.resolve())
    assert describe_data_root(inside).startswith('data_root "." relative to the manifest\'s folder')
    content["data_root_base"] = "home"
    moved.write_text(json.dumps(content))
    with pytest.raises(ManifestError, match="unknown data_root_base 'home'"):
        resolve_data_root(moved)
    with pytest.raises(ManifestError, match="is a directory"):
        load_manifest(tmp_path)


def test_manifest_without_data_root_uses_its_folder(tmp_path: Path) -> None:
    manifest = tmp_path / "plain.json"
    manifest.write_text(json.dumps({"training": [{"image": "x.png", "label": "y.png"}]}))
    assert load_split(manifest, "training") == [{"image": str(tmp_path / "x.png"), "label": str(tmp_path / "y.png")}]


def test_natural_key_orders_numbers() -> None:
    assert sorted(["10.png", "2.png", "1.png"], key=natural_key) == ["1.png", "2.png", "10.png"]
