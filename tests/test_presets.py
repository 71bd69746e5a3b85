"""`qgssl prepare` presets on tiny synthetic download layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qgssl_monai.cli import main as qgssl_main
from qgssl_monai.data.manifest import ManifestError, load_split
from qgssl_monai.data.presets import (
    CVC_CLINICDB_SEQUENCE_ENDS,
    PRESETS,
    DatasetInfo,
    ScanResult,
    cvc_clinicdb_sequence,
    mask_key,
    prepare_manifest,
    register_preset,
)


def _image(path: Path, size: tuple[int, int] = (6, 4), mode: str = "RGB") -> Path:
    """A tiny image (``size`` = (W, H)); masks get a {0, 255} square, images a gradient."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if mode == "L":
        array = np.zeros((h, w), np.uint8)
        array[1:3, 1:3] = 255
    else:
        array = np.tile(np.arange(w, dtype=np.uint8)[None, :, None] * 20, (h, 1, 3))
    Image.fromarray(array).convert(mode).save(path)
    return path


def _counts(manifest: Path) -> tuple[int, int, int, int]:
    content = json.loads(manifest.read_text())
    return tuple(content[f"num_{s}"] for s in ("training", "validation", "test", "unlabeled"))


def _all_pairs(manifest: Path) -> list[dict]:
    return [e for s in ("training", "validation", "test") for e in load_split(manifest, s)]


def test_mask_suffixes_and_registry() -> None:
    assert [mask_key(s) for s in ("a_mask", "b_segmentation", "c_Segmentation", "IMD1_lesion", "d")] == [
        "a", "b", "c", "IMD1", "d",
    ]  # fmt: skip
    assert {"folders", "kvasir-seg", "cvc-clinicdb", "cvc-colondb", "ph2", "isic", "isic2020", "polyp-box-seg"} <= set(
        PRESETS
    )
    with pytest.raises(ValueError, match="already registered"):
        register_preset("folders", description="dup", info=DatasetInfo(modality=""))(lambda root: ScanResult())


def test_register_preset_extends_prepare(tmp_path: Path) -> None:
    _image(tmp_path / "one" / "x.png")

    @register_preset("test-single", description="one image", info=DatasetInfo(modality="test"))
    def scan(root: Path) -> ScanResult:
        return ScanResult(unlabeled=[{"image": str(root / "x.png")}])

    try:
        out = prepare_manifest("test-single", tmp_path / "one", tmp_path / "m.json")
        assert load_split(out, "unlabeled") == [{"image": str(tmp_path / "one" / "x.png")}]
        assert json.loads(out.read_text())["modality"] == "test"
    finally:
        del PRESETS["test-single"]


def test_folders_preset_pairs_by_stem_with_mask_suffixes(tmp_path: Path) -> None:
    root = tmp_path / "set"
    stems = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
    suffixes = ["", "_mask", "_segmentation", "_lesion", "_Segmentation"]
    for k, stem in enumerate(stems):
        _image(root / "images" / f"{stem}.jpg")
        _image(root / "masks" / f"{stem}{suffixes[k % 5]}.png", mode="L")
    out = prepare_manifest("folders", root, tmp_path / "out" / "f.json", seed=1)
    assert _counts(out) == (7, 1, 2, 0)
    pairs = _all_pairs(out)
    assert sorted(Path(p["image"]).stem for p in pairs) == stems
    for pair in pairs:
        assert Path(pair["label"]).parent == root / "masks"
        assert mask_key(Path(pair["label"]).stem) == Path(pair["image"]).stem
    content = json.loads(out.read_text())
    assert content["data_root"] == root.resolve().as_posix() and content["split_seed"] == 1  # absolute by default
    assert content["split_rule"] == "seeded 70:10:20 train:validation:test by image count; per image"
    assert content["training"][0]["image"].startswith("images/")
    # same seed reproduces the file byte for byte; another seed changes the split
    again = prepare_manifest("folders", root, tmp_path / "again.json", seed=1)
    assert json.loads(again.read_text())["training"] == content["training"]
    other = prepare_manifest("folders", root, tmp_path / "other.json", seed=2)
    assert json.loads(other.read_text())["training"] != content["training"]


def test_folders_preset_errors_name_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "set"
    _image(root / "images" / "a.png")
    with pytest.raises(ManifestError, match=rf"no mask folder under {root}"):
        prepare_manifest("folders", root, tmp_path / "m.json")
    _image(root / "masks" / "zz.png", mode="L")
    with pytest.raises(ManifestError, match=r"1 image\(s\) without a mask: a\n.*1 mask\(s\) without an image: zz"):
        prepare_manifest("folders", root, tmp_path / "m.json")
    with pytest.raises(ManifestError, match=rf"data folder not found: {tmp_path / 'absent'}"):
        prepare_manifest("folders", tmp_path / "absent", tmp_path / "m.json")
    with pytest.raises(ManifestError, match="unknown preset 'nope'"):
        prepare_manifest("nope", root)


def test_kvasir_seg_preset_plain_and_nested(tmp_path: Path) -> None:
    for base in (tmp_path / "plain", tmp_path / "nested" / "Kvasir-SEG"):
        for k in range(5):
            _image(base / "images" / f"cju{k}.jpg")
            _image(base / "masks" / f"cju{k}.jpg", mode="L")
    plain = prepare_manifest("kvasir-seg", tmp_path / "plain", tmp_path / "k1.json")
    nested = prepare_manifest("kvasir-seg", tmp_path / "nested", tmp_path / "k2.json")
    assert _counts(plain) == _counts(nested) == (3, 1, 1, 0)  # 5 items: midpoints 0.5, 1.5, 2.5 | 3.5 | 4.5 vs bounds 3.5, 4.0
    header = json.loads(plain.read_text())
    assert "Kvasir-SEG" in header["citation"] and header["labels"] == {"0": "background", "1": "polyp"}
    assert json.loads(nested.read_text())["training"][0]["image"].startswith("Kvasir-SEG/images/")
    with pytest.raises(ManifestError, match="no Kvasir-SEG image folder under"):
        prepare_manifest("kvasir-seg", tmp_path, tmp_path / "k3.json")


def test_cvc_clinicdb_sequence_table() -> None:
    assert len(CVC_CLINICDB_SEQUENCE_ENDS) == 29
    assert [cvc_clinicdb_sequence(f) for f in (1, 25, 26, 50, 51, 205, 206, 591, 592, 612)] == [
        1, 1, 2, 2, 3, 10, 11, 28, 29, 29,
    ]  # fmt: skip
    sizes = np.bincount([cvc_clinicdb_sequence(f) for f in range(1, 613)])[1:]
    assert sizes[:5].tolist() == [25, 25, 17, 11, 25] and sizes.sum() == 612
    for bad in (0, 613):
        with pytest.raises(ManifestError, match="outside 1..612"):
            cvc_clinicdb_sequence(bad)


@pytest.fixture(scope="module")
def cvc_png_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All 612 CVC-ClinicDB frames as 2x2 PNGs in the images/ + masks/ layout."""
    root = tmp_path_factory.mktemp("cvc") / "cvc-clinicdb"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    frame, mask = Image.new("RGB", (2, 2), (9, 9, 9)), Image.new("L", (2, 2), 255)
    for n in range(1, 613):
        frame.save(root / "images" / f"{n}.png")
        mask.save(root / "masks" / f"{n}.png")
    return root


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cvc_clinicdb_sequences_never_cross_splits(cvc_png_root: Path, tmp_path: Path, seed: int) -> None:
    out = prepare_manifest("cvc-clinicdb", cvc_png_root, tmp_path / "cvc.json", seed=seed)
    header = json.loads(out.read_text())
    owner: dict[int, str] = {}
    for split in ("training", "validation", "test"):
        for entry in load_split(out, split):
            sequence = cvc_clinicdb_sequence(int(Path(entry["image"]).stem))
            assert owner.setdefault(sequence, split) == split, f"sequence {sequence} in {owner[sequence]} and {split}"
            assert header["group_splits"][f"sequence-{sequence:02d}"] == split
    assert len(owner) == 29 and set(owner.values()) == {"training", "validation", "test"}
    assert 0.6 <= header["num_training"] / 612 <= 0.8 and header["num_validation"] > 0 and header["num_test"] > 0
    assert "whole video sequences (29) per split" in header["split_rule"]


def test_cvc_clinicdb_original_tif_layout(tmp_path: Path) -> None:
    root = tmp_path / "CVC-ClinicDB"
    for n in range(1, 80):  # sequences 1..5
        _image(root / "Original" / f"{n}.tif")
        _image(root / "Ground Truth" / f"{n}.tif", mode="L")
    out = prepare_manifest("cvc-clinicdb", root, tmp_path / "cvc.json", seed=0)
    assert sum(_counts(out)) == 79
    assert {Path(e["label"]).parent.name for e in _all_pairs(out)} == {"Ground Truth"}
    sequence_of = {split: {cvc_clinicdb_sequence(int(Path(e["image"]).stem)) for e in load_split(out, split)}
                   for split in ("training", "validation", "test")}  # fmt: skip
    assert not (sequence_of["training"] & sequence_of["test"]) and not (sequence_of["training"] & sequence_of["validation"])
    with pytest.raises(ManifestError, match=r"no CVC-ClinicDB layout under .*'Original/' \+ 'Ground Truth/'"):
        prepare_manifest("cvc-clinicdb", tmp_path, tmp_path / "x.json")


def test_cvc_colondb_release_and_original_layouts(tmp_path: Path) -> None:
    release = tmp_path / "release"
    original = tmp_path / "original"
    for n in range(1, 11):
        _image(release / "images" / f"{n}.png")
        _image(release / "masks" / f"{n}.png", mode="L")
        _image(original / f"{n}.bmp")
        _image(original / f"p{n}.bmp", mode="L")
        _image(original / f"s{n}.bmp", mode="L")  # non-informative region: ignored
        _image(original / f"c{n}.bmp", mode="L")  # contour: ignored
    assert _counts(prepare_manifest("cvc-colondb", release, tmp_path / "a.json")) == (7, 1, 2, 0)
    out = prepare_manifest("cvc-colondb", original, tmp_path / "b.json")
    assert _counts(out) == (7, 1, 2, 0)
    for pair in _all_pairs(out):
        assert Path(pair["label"]).name == "p" + Path(pair["image"]).name
    with pytest.raises(ManifestError, match="no CVC-ColonDB layout under"):
        prepare_manifest("cvc-colondb", release / "images", tmp_path / "c.json")


def test_ph2_preset(tmp_path: Path) -> None:
    base = tmp_path / "PH2Dataset" / "PH2 Dataset images"
    for case in ("IMD002", "IMD003", "IMD010"):
        _image(base / case / f"{case}_Dermoscopic_Image" / f"{case}.bmp")
        _image(base / case / f"{case}_lesion" / f"{case}_lesion.bmp", mode="L")
        (base / case / f"{case}_roi").mkdir()  # other PH2 folders are ignored
    out = prepare_manifest("ph2", tmp_path, tmp_path / "ph2.json")
    assert sorted(Path(p["image"]).name for p in _all_pairs(out)) == ["IMD002.bmp", "IMD003.bmp", "IMD010.bmp"]
    assert json.loads(out.read_text())["modality"].startswith("dermoscopy")
    (base / "IMD010" / "IMD010_lesion" / "IMD010_lesion.bmp").unlink()
    with pytest.raises(ManifestError, match="1 PH2 case.*IMD010_lesion.bmp"):
        prepare_manifest("ph2", tmp_path, tmp_path / "ph2.json")
    with pytest.raises(ManifestError, match="no PH2 case folders"):
        prepare_manifest("ph2", base / "IMD002", tmp_path / "ph2.json")


def test_isic_one_folder_and_separate_folders(tmp_path: Path) -> None:
    one = tmp_path / "one"
    for k in range(4):
        _image(one / f"ISIC_000000{k}.jpg")
        _image(one / f"ISIC_000000{k}_segmentation.png", mode="L")
        _image(one / f"ISIC_000000{k}_superpixels.png")  # ISIC 2017 extra: not an image, not a mask
    out = prepare_manifest("isic", one, tmp_path / "isic1.json")
    assert sorted(Path(p["image"]).name for p in _all_pairs(out)) == [f"ISIC_000000{k}.jpg" for k in range(4)]
    assert all(p["label"].endswith("_segmentation.png") for p in _all_pairs(out))
    separate = tmp_path / "isic2016"
    for k in range(3):
        _image(separate / "ISBI2016_ISIC_Part1_Training_Data" / f"ISIC_001000{k}.jpg")
        _image(separate / "ISBI2016_ISIC_Part1_Training_GroundTruth" / f"ISIC_001000{k}_Segmentation.png", mode="L")
    out = prepare_manifest("isic", separate, tmp_path / "isic2.json")
    assert len(_all_pairs(out)) == 3
    assert {Path(p["label"]).parent.name for p in _all_pairs(out)} == {"ISBI2016_ISIC_Part1_Training_GroundTruth"}


def test_unlabeled_only_presets(tmp_path: Path) -> None:
    isic2020 = tmp_path / "isic2020"
    for k in range(3):
        _image(isic2020 / "train" / f"ISIC_00{k}.jpg")
    (isic2020 / "train" / "ISIC_009.dcm").write_bytes(b"DICM")  # DICOM copies are not used
    out = prepare_manifest("isic2020", isic2020, tmp_path / "u.json")
    assert _counts(out) == (0, 0, 0, 3)
    assert json.loads(out.read_text())["split_rule"] == "unlabeled only"
    boxes = tmp_path / "polyp-box-seg"
    for k in range(2):
        _image(boxes / "images" / f"{k}.jpg")
        _image(boxes / "masks" / f"{k}.png", mode="L")  # annotation folder: skipped
    (boxes / "annotations.json").write_text("{}")
    out = prepare_manifest("polyp-box-seg", boxes, tmp_path / "b.json")
    assert [Path(e["image"]).name for e in load_split(out, "unlabeled")] == ["0.jpg", "1.jpg"]
    with pytest.raises(ManifestError, match="no ISIC_<id>.jpg images found under"):
        prepare_manifest("isic2020", boxes, tmp_path / "x.json")


def test_cross_source_unlabeled_root_and_labeled_fraction(tmp_path: Path) -> None:
    labeled_root = tmp_path / "data" / "cvc"
    unlabeled_root = tmp_path / "data" / "kvasir"
    for n in range(1, 11):
        _image(labeled_root / "images" / f"{n}.png")
        _image(labeled_root / "masks" / f"{n}.png", mode="L")
    for k in range(4):
        _image(unlabeled_root / "images" / f"k{k}.jpg")
        _image(unlabeled_root / "masks" / f"k{k}.png", mode="L")
    (unlabeled_root / "SOURCE.txt").write_text("Kvasir snapshot\n\nCC BY 4.0\n")
    out = prepare_manifest("folders", labeled_root, tmp_path / "m" / "x.json", unlabeled_roots=[unlabeled_root])
    content = json.loads(out.read_text())
    assert content["data_root"] == (tmp_path / "data").resolve().as_posix()
    assert content["name"] == "folders+unlabeled-kvasir"
    assert content["unlabeled_sources"] == [{"path": "kvasir", "source_notes": ["Kvasir snapshot", "CC BY 4.0"]}]
    assert content["training"][0]["image"].startswith("cvc/images/")
    assert [Path(e["image"]).name for e in load_split(out, "unlabeled")] == [f"k{k}.jpg" for k in range(4)]
    assert all(Path(e["image"]).is_file() for e in load_split(out, "unlabeled"))
    partial = prepare_manifest("folders", labeled_root, tmp_path / "p.json", labeled_fraction=0.5, seed=3)
    assert _counts(partial) == (4, 1, 2, 3)  # 7 training: 4 keep labels (round(3.5) = 4), 3 become unlabeled
    moved = {e["image"] for e in load_split(partial, "unlabeled")}
    assert not moved & {e["image"] for e in load_split(partial, "training")}


def test_prepare_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "set"
    for k in range(3):
        _image(root / "images" / f"{k}.png")
        _image(root / "masks" / f"{k}_mask.png", mode="L")
    out = tmp_path / "cli.json"
    assert qgssl_main(["prepare", "folders", "--root", str(root), "--out", str(out), "--seed", "5", "--validate"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out.resolve()} (2 training, 0 validation, 1 test, 0 unlabeled" in printed and ": OK (" in printed
    assert json.loads(out.read_text())["split_seed"] == 5
    assert qgssl_main(["prepare", "kvasir-seg", "--root", str(root / "missing"), "--out", str(out)]) == 1
    assert f"data folder not found: {root / 'missing'}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        qgssl_main(["prepare", "no-such-preset", "--root", str(root)])


def test_groups_file_keeps_groups_whole(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "colondb"
    for n in range(1, 31):
        _image(root / "images" / f"{n}.png")
        _image(root / "masks" / f"{n}.png", mode="L")
    groups = tmp_path / "videos.csv"
    groups.write_text("stem,group\n" + "".join(f"{n},video{(n - 1) // 5}\n" for n in range(1, 31)))  # 6 videos
    out = prepare_manifest("cvc-colondb", root, tmp_path / "g.json", seed=4, groups_file=groups)
    owner: dict[str, str] = {}
    for split in ("training", "validation", "test"):
        for entry in load_split(out, split):
            video = f"video{(int(Path(entry['image']).stem) - 1) // 5}"
            assert owner.setdefault(video, split) == split
    header = json.loads(out.read_text())
    assert header["split_rule"].endswith("whole groups from videos.csv per split")
    assert sorted(header["group_splits"]) == [f"video{v}" for v in range(6)]
    assert sum(_counts(out)) == 30 and all(n % 5 == 0 for n in _counts(out))
    as_json = tmp_path / "videos.json"
    as_json.write_text(json.dumps({str(n): f"video{(n - 1) // 5}" for n in range(1, 31)}))
    again = prepare_manifest("cvc-colondb", root, tmp_path / "j.json", seed=4, groups_file=as_json)
    assert json.loads(again.read_text())["training"] == header["training"]
    groups.write_text("stem,group\n1,a\n")
    with pytest.raises(ManifestError, match=r"29 image\(s\) have no group in .*videos.csv: 2, 3, 4"):
        prepare_manifest("cvc-colondb", root, tmp_path / "g.json", groups_file=groups)
    groups.write_text("name,video\n1,a\n")
    assert qgssl_main(["prepare", "cvc-colondb", "--root", str(root), "--groups", str(groups)]) == 1
    assert "needs a header with columns 'stem' and 'group'" in capsys.readouterr().err
