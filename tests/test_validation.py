"""`qgssl validate-manifest`: every bad-input kind is reported with its path, one line each."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qgssl_monai.cli import main as qgssl_main
from qgssl_monai.data.manifest import ManifestError, load_split, repo_root, write_manifest
from qgssl_monai.data.validation import (
    assert_valid_manifest,
    check_file,
    mask_value_problem,
    validate_manifest,
    write_clean_manifest,
)


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path)
    return str(path)


def _rgb(h: int = 6, w: int = 8) -> np.ndarray:
    return (np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3) * 5).astype(np.uint8)


def _mask(h: int = 6, w: int = 8, high: int = 255) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[2:4, 2:5] = high
    return mask


def _manifest(tmp_path: Path, training: list[dict], unlabeled: list[dict] | None = None, test: list[dict] | None = None) -> Path:
    return write_manifest(
        tmp_path / "manifest.json",
        {"training": training, "validation": [], "test": test or [], "unlabeled": unlabeled or []},
        data_root=tmp_path / "data",
        name="t",
    )


def _pair(root: Path, name: str, image: np.ndarray | None = None, mask: np.ndarray | None = None,
          image_suffix: str = ".jpg") -> dict:  # fmt: skip
    return {
        "image": _save(root / "images" / f"{name}{image_suffix}", _rgb() if image is None else image),
        "label": _save(root / "masks" / f"{name}.png", _mask() if mask is None else mask),
    }


def test_clean_manifest_passes(tmp_path: Path) -> None:
    root = tmp_path / "data"
    rgb_equal = np.repeat(_mask()[..., None], 3, axis=2)  # RGB mask with equal channels = single channel
    training = [
        _pair(root, "a"),
        _pair(root, "b", mask=_mask(high=1)),  # {0, 1}
        _pair(root, "c", mask=rgb_equal),
        _pair(root, "d", image=_rgb()[..., 0], image_suffix=".bmp"),  # grey BMP (decoded: no cheap trailer)
        _pair(root, "e", image_suffix=".tif"),
    ]
    _save(root / "masks" / "f.png", _mask(), mode="1")  # 1-bit mask
    training.append({"image": _save(root / "images" / "f.png", _rgb()), "label": str(root / "masks" / "f.png")})
    unlabeled = [{"image": _save(root / "images" / "u.png", _rgb(10, 10))}]
    padded = Path(_save(root / "images" / "padded.jpg", _rgb()))
    padded.write_bytes(padded.read_bytes() + b"\0" * 2000)  # data after the end marker: decodes, so not truncated
    unlabeled.append({"image": str(padded)})
    report = validate_manifest(_manifest(tmp_path, training, unlabeled))
    assert report.ok, [str(p) for p in report.problems]
    assert report.counts == {"training": 6, "validation": 0, "test": 0, "unlabeled": 2}
    assert report.summary().endswith(f"OK (6 training, 0 validation, 0 test, 2 unlabeled; data root {root})")
    assert assert_valid_manifest(tmp_path / "manifest.json").ok


def _broken_manifest(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """One entry per bad-input kind; returns the manifest and the expected message per file name."""
    root = tmp_path / "data"
    good = _pair(root, "good")
    missing_image = {"image": str(root / "images" / "missing.jpg"), "label": _save(root / "masks" / "m1.png", _mask())}
    missing_mask = {"image": _save(root / "images" / "m2.jpg", _rgb()), "label": str(root / "masks" / "missing.png")}
    empty = _pair(root, "empty")
    Path(empty["image"]).write_bytes(b"")
    unreadable = _pair(root, "text")
    Path(unreadable["label"]).write_text("this is not a PNG")
    noisy = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)  # header << payload
    truncated_jpeg = _pair(root, "trunc", image=noisy, mask=_mask(32, 40))
    data = Path(truncated_jpeg["image"]).read_bytes()
    Path(truncated_jpeg["image"]).write_bytes(data[: len(data) // 2])
    speckle = np.random.default_rng(1).integers(0, 2, (32, 40), dtype=np.uint8) * 255
    truncated_mask = _pair(root, "truncmask", image=_rgb(32, 40), mask=speckle)
    data = Path(truncated_mask["label"]).read_bytes()
    Path(truncated_mask["label"]).write_bytes(data[: len(data) // 2])
    mismatch = _pair(root, "size", mask=_mask(8, 6))
    grey = _mask()
    grey[0, 0] = 128
    non_binary = _pair(root, "grey", mask=grey)
    colour = np.zeros((6, 8, 3), np.uint8)
    colour[1, 1] = (255, 0, 0)
    multi = _pair(root, "rgb", mask=colour)
    no_label = {"image": _save(root / "images" / "nolabel.jpg", _rgb())}
    training = [good, missing_image, missing_mask, empty, unreadable, truncated_jpeg, truncated_mask, mismatch,
                non_binary, multi, no_label]  # fmt: skip
    leak = [{"image": good["image"]}]  # a training image listed again as unlabeled
    expected = {
        "missing.jpg": "missing file",
        "missing.png": "missing file",
        "empty.jpg": "empty file",
        "text.png": "unreadable image (not a recognised image format)",
        "trunc.jpg": "truncated image (file ends before the end-of-image marker)",
        "truncmask.png": "truncated image (file ends before the end-of-image marker)",
        "size.png": "size mismatch: image 8x6, mask 6x8",
        "grey.png": "non-binary mask: 3 distinct values (0, 128, 255), 2.08% of pixels not 0/255",
        "rgb.png": "multi-channel mask (3 channels that differ)",
        "nolabel.jpg": "labeled entry has no 'label'",
    }
    return _manifest(tmp_path, training, leak), expected


def test_every_bad_kind_is_reported_with_its_path(tmp_path: Path) -> None:
    manifest, expected = _broken_manifest(tmp_path)
    report = validate_manifest(manifest)
    found = {Path(p.path).name: p.message for p in report.problems if p.split == "training"}
    assert found == expected
    leak = [p for p in report.problems if p.split == "unlabeled"]
    assert [(p.index, p.message) for p in leak] == [(0, "leakage: also listed as training[0]")]
    assert report.bad_entries == {("training", i) for i in range(1, 11)} | {("unlabeled", 0)}
    line = str(next(p for p in report.problems if p.message == "empty file"))
    assert line == f"{tmp_path / 'data' / 'images' / 'empty.jpg'}: empty file (training[3].image)"
    with pytest.raises(ManifestError) as raised:
        assert_valid_manifest(manifest)
    message = str(raised.value)
    assert "11 problem(s) in 11 entries" in message and "--skip-bad" in message
    assert all(text in message for text in expected.values())


def test_only_requested_splits_are_checked_and_duplicates_found(tmp_path: Path) -> None:
    root = tmp_path / "data"
    entry = _pair(root, "a")
    manifest = _manifest(tmp_path, [entry, dict(entry)], test=[{"image": str(root / "images" / "gone.jpg"), "label": entry["label"]}])
    report = validate_manifest(manifest, splits=["training"])
    assert [str(p.message) for p in report.problems] == ["duplicate as training[0]"]
    assert report.counts == {"training": 2}
    assert [p.message for p in validate_manifest(manifest, splits=["test"]).problems] == ["missing file"]
    with pytest.raises(ManifestError, match="unknown split"):
        validate_manifest(manifest, splits=["train"])


def test_missing_data_root_is_one_problem(tmp_path: Path) -> None:
    manifest, _ = _broken_manifest(tmp_path)
    report = validate_manifest(manifest, data_root=tmp_path / "elsewhere")
    assert [str(p) for p in report.problems] == [
        f"{tmp_path / 'elsewhere'}: data root folder not found (the --root / data_root= override; "
        "pass --root / data_root=) (data_root)"
    ]
    with pytest.raises(ManifestError, match="cannot clean"):
        write_clean_manifest(report, tmp_path / "clean.json")


def test_mask_value_rules_and_grey_tolerance() -> None:
    assert mask_value_problem(np.array([[0, 255]], np.uint8)) is None
    assert mask_value_problem(np.array([[0, 1]], np.int16)) is None
    assert mask_value_problem(np.array([[True, False]])) is None
    assert mask_value_problem(np.zeros((2, 2), np.uint8)) is None  # empty mask is still binary
    assert mask_value_problem(np.array([[0, 1, 255]], np.uint8)) == (
        "non-binary mask: 3 distinct values (0, 1, 255), 33.33% of pixels not 0/255"
    )
    assert mask_value_problem(np.array([[0, 2]], np.uint8)).startswith("non-binary mask: 2 distinct values (0, 2)")
    jpeg_like = np.full((10, 10), 255, np.uint8)
    jpeg_like[0, :3] = (3, 250, 0)  # 2 of 100 pixels are neither 0 nor 255
    assert mask_value_problem(jpeg_like, grey_tolerance=0.02) is None
    assert mask_value_problem(jpeg_like, grey_tolerance=0.01) is not None
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 3] = 255  # constant alpha is not a label channel
    assert mask_value_problem(rgba) is None


def test_nifti_files_are_checked(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    image = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), image)
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.array([0, 1, 2] * 40, np.uint8).reshape(4, 5, 6), np.eye(4)), mask)
    assert check_file(image, is_mask=False).size == (4, 5, 6)
    check = check_file(mask, is_mask=True)
    assert check.size == (4, 5, 6) and check.problems[0].startswith("non-binary mask: 3 distinct values (0, 1, 2)")
    assert check_file(mask, is_mask=True, label_rule="nonzero").problems == []  # e.g. BraTS {0,1,2,4}: label > 0
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(mask.read_bytes()[:-30])
    assert check_file(truncated, is_mask=True).problems[0].startswith("unreadable NIfTI")


def test_nrrd_files_are_checked_through_itk(tmp_path: Path) -> None:
    itk = pytest.importorskip("itk")
    volume = np.zeros((3, 4, 5), np.uint8)  # (z, y, x)
    volume[1, 1:3, 1:3] = 255
    image, mask, cut = tmp_path / "lgemri.nrrd", tmp_path / "laendo.nrrd", tmp_path / "cut.nrrd"
    itk.imwrite(itk.image_from_array(volume.astype(np.float32)), str(image))
    itk.imwrite(itk.image_from_array(volume), str(mask))
    assert check_file(image, is_mask=False) == check_file(mask, is_mask=True)
    assert check_file(mask, is_mask=True).size == (5, 4, 3)  # ITK order (x, y, z)
    volume[0, 0, 0] = 7
    itk.imwrite(itk.image_from_array(volume), str(mask))
    assert check_file(mask, is_mask=True).problems[0].startswith("non-binary mask: 3 distinct values (0, 7, 255)")
    cut.write_bytes(mask.read_bytes()[:-20])
    assert check_file(cut, is_mask=True).problems[0].startswith("unreadable image (")


def test_label_rule_from_the_manifest_header(tmp_path: Path) -> None:
    root = tmp_path / "data"
    multi_label = _mask()
    multi_label[0, :2] = (2, 4)
    manifest = _manifest(tmp_path, [_pair(root, "a", mask=multi_label)])
    assert validate_manifest(manifest).problems[0].message.startswith("non-binary mask: 4 distinct values")
    content = json.loads(manifest.read_text())
    content["label_rule"] = "nonzero"
    manifest.write_text(json.dumps(content))
    assert validate_manifest(manifest).ok
    content["label_rule"] = "whatever"
    manifest.write_text(json.dumps(content))
    with pytest.raises(ManifestError, match="unknown label_rule 'whatever'"):
        validate_manifest(manifest)


def test_write_clean_manifest_drops_bad_entries(tmp_path: Path) -> None:
    manifest, _ = _broken_manifest(tmp_path)
    report = validate_manifest(manifest)
    clean, skipped = write_clean_manifest(report, tmp_path / "cleaned" / "clean.json")
    content = json.loads(clean.read_text())
    assert (content["num_training"], content["num_unlabeled"], content["num_skipped"]) == (1, 0, 11)
    # the original records an absolute data root, so does its cleaned copy
    assert content["data_root"] == (tmp_path / "data").as_posix() and content["cleaned_from"] == "../manifest.json"
    assert validate_manifest(clean).ok
    assert load_split(clean, "training")[0]["image"] == str(tmp_path / "data" / "images" / "good.jpg")
    listed = json.loads(skipped.read_text())
    assert skipped.name == "clean.skipped.json" and len(listed) == 11
    assert listed[0]["split"] == "training" and listed[0]["index"] == 1
    assert listed[0]["problems"] == ["image: missing file"]


def test_validate_manifest_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest, expected = _broken_manifest(tmp_path)
    assert qgssl_main(["validate-manifest", str(manifest), "--quiet"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 12  # 11 problems + summary
    assert lines[-1].startswith(f"{manifest}: 11 problem(s)")
    assert qgssl_main(["validate-manifest", str(manifest), "--skip-bad", "--quiet"]) == 0
    assert "wrote cleaned manifest" in capsys.readouterr().out
    clean = tmp_path / "manifest.clean.json"
    assert qgssl_main(["validate-manifest", str(clean)]) == 0
    assert ": OK (1 training" in capsys.readouterr().out
    assert qgssl_main(["validate-manifest", str(tmp_path / "none.json")]) == 2
    assert "manifest not found" in capsys.readouterr().err
    # --root overrides the recorded data root
    assert qgssl_main(["validate-manifest", str(clean), "--root", str(tmp_path)]) == 1


def test_validate_manifest_says_which_data_root_it_used(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "moved.json"
    manifest.write_text(json.dumps({"data_root": "../no/such/set", "data_root_base": "repo", "training": [{"image": "a.png", "label": "b.png"}]}))
    assert qgssl_main(["validate-manifest", str(manifest), "--quiet"]) == 1
    (line, summary) = capsys.readouterr().out.strip().splitlines()
    missing = repo_root().parent / "no" / "such" / "set"
    assert line == (
        f'{missing}: data root folder not found (data_root "../no/such/set" relative to the repository root '
        f"{repo_root()}; pass --root / data_root=) (data_root)"
    )
    assert qgssl_main(["validate-manifest", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"qgssl validate-manifest: manifest {tmp_path} is a directory, not a JSON file"


def test_prepare_validates_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "set"
    for k in range(10):
        _save(root / "images" / f"c{k}.png", _rgb())
        _save(root / "masks" / f"c{k}.png", _mask())
    good = tmp_path / "good.json"
    assert qgssl_main(["prepare", "folders", "--root", str(root), "--out", str(good)]) == 0
    assert ": OK (7 training, 1 validation, 2 test, 0 unlabeled" in capsys.readouterr().out
    data = (root / "images" / "c3.png").read_bytes()
    (root / "images" / "c3.png").write_bytes(data[: len(data) // 2])  # truncated
    _save(root / "masks" / "c5.png", np.zeros((9, 9), np.uint8))  # size mismatch
    bad = tmp_path / "bad.json"
    assert qgssl_main(["prepare", "folders", "--root", str(root), "--out", str(bad)]) == 1
    captured = capsys.readouterr()
    problems = [line for line in captured.out.splitlines() if line.startswith(str(root))]
    assert len(problems) == 2
    assert any("c3.png: truncated image" in line for line in problems)
    assert any("c5.png: size mismatch" in line for line in problems)
    assert f"qgssl validate-manifest {bad} --skip-bad" in captured.err
    assert qgssl_main(["prepare", "folders", "--root", str(root), "--out", str(bad), "--no-validate"]) == 0


def test_demo_data_cli_forwards_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    calls = []

    def fake_generate(out_dir, *, seed=0, **kwargs):  # test double for the demo engineer's generator
        calls.append((str(out_dir), seed, kwargs))
        return Path(out_dir) / "manifest.json"

    monkeypatch.setitem(sys.modules, "qgssl_monai.data.demo", types.SimpleNamespace(generate_demo_dataset=fake_generate))
    out = str(tmp_path / "demo")
    assert qgssl_main(["demo-data", "--out", out, "--seed", "3", "--size", "32", "--n-labeled", "4"]) == 0
    assert calls == [(out, 3, {"n_labeled": 4, "image_size": 32})]
    assert f"manifest {out}/manifest.json" in capsys.readouterr().out


def _bundle_manifest_check(bundle: str, manifest: Path):
    """Both bundles validate the manifest in ``initialize``; a ConfigWorkflow of ``train.json`` on ``manifest``."""
    from monai.bundle import ConfigWorkflow

    configs = Path(__file__).resolve().parents[1] / "bundles" / bundle / "configs"
    workflow = ConfigWorkflow(config_file=str(configs / "train.json"), meta_file=str(configs / "metadata.json"),
                              workflow_type="train", logging_file=False, bundle_root=str(manifest.parent / bundle),
                              manifest=str(manifest), dataset_dir=str(manifest.parent), device="cpu")  # fmt: skip
    entries = workflow.parser.get("initialize")
    (index,) = [i for i, entry in enumerate(entries) if "assert_valid_manifest" in str(entry)]
    return workflow, f"initialize#{index}"


@pytest.mark.parametrize("bundle", ["ssl_segmentation", "quality_predictor"])
def test_both_bundles_refuse_bad_manifest_up_front_and_accept_skip_bad_output(
    bundle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, expected = _broken_manifest(tmp_path)
    workflow, _ = _bundle_manifest_check(bundle, manifest)
    with pytest.raises(RuntimeError) as raised:  # what `monai.bundle run` does first
        workflow.initialize()
    cause = raised.value.__cause__
    assert isinstance(cause, ManifestError)
    message = str(cause)
    assert "11 problem(s) in 11 entries" in message and "--skip-bad" in message
    for name, problem in expected.items():  # every bad entry listed, with its file and what is wrong
        assert f"{name}: {problem}" in message, name
    assert not (tmp_path / bundle / "models").exists()  # refused before anything was trained or written

    assert qgssl_main(["validate-manifest", str(manifest), "--skip-bad", "--quiet"]) == 0
    clean, skipped = tmp_path / "manifest.clean.json", tmp_path / "manifest.clean.skipped.json"
    assert f"wrote cleaned manifest {clean} without 11 bad entries (listed in {skipped})" in capsys.readouterr().out
    workflow, check = _bundle_manifest_check(bundle, clean)
    assert workflow.parser.get_parsed_content(check).ok  # the bundle's own up-front check passes the cleaned manifest
