"""`qgssl quality-check` input handling: bad files refused with one line naming them, every bad CSV row reported,
the default checkpoint search, a corrupt checkpoint; `qgssl --help` without torch."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qgssl_monai.cli import main as qgssl_main
from qgssl_monai.networks.quality import QualityPredictor, write_quality_metadata
from qgssl_monai.serving import cli as serving_cli

SIZE = 32


@pytest.fixture(scope="module")
def g_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised g (the scores do not matter here, only what is accepted and refused)."""
    path = tmp_path_factory.mktemp("g") / "model.pt"
    torch.manual_seed(0)
    torch.save(QualityPredictor(in_channels=4, backbone="resnet18").state_dict(), path)
    write_quality_metadata(path, image_size=64, image_channels=3, backbone="resnet18")
    return path


def _image(path: Path, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> Path:
    """``size`` = (W, H); masks ("L") hold a {0, 255} rectangle, "RGB" a noisy photo-like image."""
    rng = np.random.default_rng(len(path.name))
    w, h = size
    if mode == "L":
        array = np.zeros((h, w), np.uint8)
        array[h // 4 : h // 2, w // 4 : w // 2] = 255
    else:
        array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _run(args: list[str], checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = qgssl_main(["quality-check", *args, "--checkpoint", str(checkpoint), "--image-size", str(SIZE)])
    out, err = capsys.readouterr()
    return code, out, err


def test_good_pair_scores_and_bad_inputs_are_one_line_naming_the_file(g_checkpoint, tmp_path, capsys) -> None:
    image, mask = _image(tmp_path / "a.png"), _image(tmp_path / "a_mask.png", mode="L")
    code, out, err = _run(["--image", str(image), "--mask", str(mask)], g_checkpoint, capsys)
    assert code == 0 and err == "" and 0.0 <= float(out.strip()) <= 1.0

    other_size = _image(tmp_path / "small_mask.png", (20, 30), mode="L")
    photo = _image(tmp_path / "photo.png")  # an RGB photo passed as a mask
    data = image.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    cases = {
        ("a.png", "small_mask.png"): f"{other_size}: size mismatch: image 40x30, mask 20x30",
        ("a.png", "photo.png"): f"{photo}: multi-channel mask (3 channels that differ)",
        ("cut.png", "a_mask.png"): f"{tmp_path / 'cut.png'}: truncated image",
        ("missing.png", "a_mask.png"): f"{tmp_path / 'missing.png'}: missing file",
        (".", "a_mask.png"): f"{tmp_path}/.: is a directory",
    }
    for (image_name, mask_name), expected in cases.items():
        code, out, err = _run(["--image", f"{tmp_path}/{image_name}", "--mask", str(tmp_path / mask_name)], g_checkpoint, capsys)
        lines = err.strip().splitlines()
        assert code == 1 and out == "", (image_name, mask_name)
        assert len(lines) == 1 and lines[0].startswith(f"quality-check: {expected}"), lines


def test_csv_batch_reports_every_bad_row_and_scores_the_rest(g_checkpoint, tmp_path, capsys) -> None:
    _image(tmp_path / "a.png"), _image(tmp_path / "a_mask.png", mode="L")
    _image(tmp_path / "b.png"), _image(tmp_path / "b_mask.png", mode="L")
    _image(tmp_path / "wide_mask.png", (50, 30), mode="L")
    rows = [("a.png", "a_mask.png"), ("gone.png", "a_mask.png"), ("b.png", "b_mask.png"), ("a.png", "wide_mask.png")]
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("image,mask\n" + "".join(f"{i},{m}\n" for i, m in rows))
    out_csv = tmp_path / "scores.csv"
    code, out, err = _run(["--csv", str(pairs), "--out", str(out_csv)], g_checkpoint, capsys)
    assert code == 1
    assert f"scored 2 of 4 pairs -> {out_csv}" in out
    bad = [line for line in err.splitlines() if line.startswith(f"{pairs}, line ")]
    assert [line.split(":")[0] for line in bad] == [f"{pairs}, line 3", f"{pairs}, line 5"]
    assert "gone.png: missing file" in bad[0] and "wide_mask.png: size mismatch" in bad[1]
    with open(out_csv, newline="") as f:
        written = list(csv.DictReader(f))
    assert [(r["image"], r["mask"]) for r in written] == rows
    assert [bool(r["quality"]) for r in written] == [True, False, True, False]
    assert [bool(r["error"]) for r in written] == [False, True, False, True]
    # the good rows get the same scores as when scored alone
    code, out, _ = _run(["--image", str(tmp_path / "b.png"), "--mask", str(tmp_path / "b_mask.png")], g_checkpoint, capsys)
    assert float(written[2]["quality"]) == pytest.approx(float(out), abs=1e-4)
    # a directory given as the CSV
    code, _, err = _run(["--csv", str(tmp_path)], g_checkpoint, capsys)
    assert code == 1 and err.strip() == f"quality-check: {tmp_path} is a directory, not a CSV file"


def test_corrupt_and_missing_checkpoints_are_one_line(g_checkpoint, tmp_path, capsys) -> None:
    image, mask = _image(tmp_path / "a.png"), _image(tmp_path / "a_mask.png", mode="L")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(g_checkpoint.read_bytes()[:5000])
    write_quality_metadata(corrupt, image_size=64, image_channels=3, backbone="resnet18")  # a sidecar of the truncated file
    code, _, err = _run(["--image", str(image), "--mask", str(mask)], corrupt, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"quality-check: cannot read quality predictor checkpoint {corrupt} (")
    code, _, err = _run(["--image", str(image), "--mask", str(mask)], tmp_path / "none.pt", capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert f"checkpoint not found: {tmp_path / 'none.pt'}; train g with: cd " in err and "make demo" in err
    code, _, err = _run(["--image", str(image), "--mask", str(mask)], tmp_path, capsys)
    assert code == 1 and f"checkpoint {tmp_path} is a directory" in err


def test_default_checkpoint_search(g_checkpoint, tmp_path, monkeypatch, capsys) -> None:
    """Without --checkpoint: <bundle>/models/model.pt, then the demo's runs/demo/quality/models/model.pt."""
    monkeypatch.chdir(tmp_path)
    bundle = tmp_path / "bundle"
    looked = serving_cli.default_checkpoints(bundle)
    assert looked[:2] == [bundle / "models" / "model.pt", Path("runs/demo/quality/models/model.pt")]
    if not looked[-1].is_file():  # the checkout has no trained g: the message lists where it looked
        with pytest.raises(serving_cli.CheckpointNotFoundError) as raised:
            serving_cli.find_checkpoint(None, bundle)
        message = str(raised.value)
        assert all(str(p) in message for p in looked) and "make demo" in message
    demo = tmp_path / "runs" / "demo" / "quality" / "models" / "model.pt"
    demo.parent.mkdir(parents=True)
    demo.write_bytes(g_checkpoint.read_bytes())
    assert serving_cli.find_checkpoint(None, bundle) == Path("runs/demo/quality/models/model.pt")
    (bundle / "models").mkdir(parents=True)
    (bundle / "models" / "model.pt").write_bytes(g_checkpoint.read_bytes())
    assert serving_cli.find_checkpoint(None, bundle) == bundle / "models" / "model.pt"


def test_help_does_not_import_torch() -> None:
    """`qgssl --help` builds every sub-parser without torch, MONAI or MLflow (it stays well under a second)."""
    code = (
        "import sys, qgssl_monai.cli as cli\n"
        "cli.build_parser(['--help'])\n"
        "cli.build_parser(['quality-check', '--help'])\n"
        "heavy = sorted(m for m in ('torch', 'monai', 'mlflow', 'ignite', 'pandas') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
