"""Infer logic of the MONAI Label quality-checker app, without the server (qgssl_monai.serving.label_logic)."""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qgssl_monai.networks.quality import QualityPredictor, file_sha256
from qgssl_monai.networks.segmentation import build_segmentation_network
from qgssl_monai.serving.label_logic import (
    LabelRequestError,
    QualityService,
    bundle_version,
    check_image_id,
    exposed_bind_host,
    find_bundle,
    rank_by_quality,
    read_binary_mask,
    read_image,
    resolve_inside,
)
from qgssl_monai.serving.label_server import LabelServer, stage_app

REPO = Path(__file__).resolve().parents[1]


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode=mode).save(path)
    return path


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> QualityService:
    """g (random init, trained-size 32 px in its sidecar) and a small U-Net (32 px) staged as offline bundles."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("label_logic")
    app = stage_app(
        REPO / "apps" / "quality_checker",
        root / "app",
        {
            "quality_predictor": (
                REPO / "bundles" / "quality_predictor",
                QualityPredictor(in_channels=4).state_dict(),
                {"image_size": 32, "image_channels": 3, "backbone": "resnet18"},
            ),
            "ssl_segmentation": (
                REPO / "bundles" / "ssl_segmentation",
                build_segmentation_network("unet", size="small").state_dict(),
            ),
        },
    )
    return QualityService.from_bundles(
        app / "model" / "quality_predictor",
        app / "model" / "ssl_segmentation",
        seg_overrides={"network_size": "small", "image_size": 32},
    )


@pytest.mark.parametrize("image_id", ["cju0qkwl35piu0993l0dewei2", "1", "frame_01.a", "img-3+b"])
def test_check_image_id_accepts_file_stems(image_id: str) -> None:
    assert check_image_id(image_id) == image_id


@pytest.mark.parametrize("image_id", ["../x", "..", "a/b", "a\\b", "/etc/passwd", "", ".hidden", "a..b", "x\x00", "abc\n"])
def test_check_image_id_refuses_paths(image_id: str) -> None:
    with pytest.raises(LabelRequestError) as err:
        check_image_id(image_id)
    assert err.value.status_code == 400 and "invalid image id" in err.value.detail


def test_resolve_inside_refuses_escapes(tmp_path: Path) -> None:
    (tmp_path / "root" / "sub").mkdir(parents=True)
    (tmp_path / "outside.png").write_bytes(b"x")
    (tmp_path / "root" / "link.png").symlink_to(tmp_path / "outside.png")
    assert resolve_inside(tmp_path / "root", "sub/a.png") == (tmp_path / "root" / "sub" / "a.png").resolve()
    for bad in ("../outside.png", "sub/../../outside.png", str(tmp_path / "outside.png"), "link.png"):
        with pytest.raises(LabelRequestError, match="leaves the allowed folder"):
            resolve_inside(tmp_path / "root", bad)


@pytest.mark.parametrize(
    ("argv", "exposed"),
    [
        (["monailabel.main", "start_server", "--app", "a", "--studies", "s"], "0.0.0.0"),
        (["monailabel.main", "start_server", "--host", "127.0.0.1", "--port", "8000"], None),
        (["monailabel.main", "start_server", "-i", "localhost"], None),
        (["monailabel.main", "start_server", "--host=192.168.1.5"], "192.168.1.5"),
        (["monailabel.main", "start_server", "--host", "0.0.0.0"], "0.0.0.0"),
        (["monailabel/interfaces/utils/app.py", "-m", "scoring", "-r", "{}"], None),
    ],
)
def test_exposed_bind_host(argv: list[str], exposed: str | None) -> None:
    assert exposed_bind_host(argv) == exposed


def test_label_request_error_is_for_client_errors_only() -> None:
    with pytest.raises(ValueError, match="4xx"):
        LabelRequestError(500, "boom")


def test_read_image_scales_and_repeats_grey(tmp_path: Path) -> None:
    rgb = np.zeros((3, 5, 3), dtype=np.uint8)
    rgb[1, 2] = (255, 51, 0)
    image = read_image(_png(tmp_path / "rgb.png", rgb))
    assert image.shape == (3, 3, 5) and image.dtype == torch.float32
    assert image[:, 1, 2].tolist() == pytest.approx([1.0, 0.2, 0.0])
    assert float(image.sum()) == pytest.approx(1.2)
    grey = read_image(_png(tmp_path / "grey.png", np.full((4, 6), 102, dtype=np.uint8)))
    assert grey.shape == (3, 4, 6) and torch.allclose(grey, torch.full((3, 4, 6), 0.4))
    assert read_image(tmp_path / "grey.png", rgb=False).shape == (1, 4, 6)


def test_read_image_bad_files(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("this is not an image")
    with pytest.raises(LabelRequestError) as err:
        read_image(tmp_path / "notes.png")
    assert err.value.status_code == 415 and "not a readable image" in err.value.detail
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(LabelRequestError) as err:
        read_image(tmp_path / "cut.png")
    assert err.value.status_code == 422 and "truncated" in err.value.detail
    with pytest.raises(LabelRequestError) as err:
        read_image(tmp_path / "missing.png")
    assert err.value.status_code == 404
    with pytest.raises(LabelRequestError) as err:
        read_image(_png(tmp_path / "big.png", np.zeros((10, 11), dtype=np.uint8)), max_pixels=100)
    assert err.value.status_code == 413 and "11x10" in err.value.detail


@pytest.mark.parametrize(
    ("array", "mode"),
    [
        (np.array([[0, 255, 255], [0, 0, 255]], dtype=np.uint8), None),
        (np.array([[0, 1, 1], [0, 0, 1]], dtype=np.uint8), None),
        (np.stack([np.array([[0, 200, 200], [0, 0, 200]], dtype=np.uint8)] * 3, axis=-1), None),
    ],
)
def test_read_binary_mask_encodings(tmp_path: Path, array: np.ndarray, mode: str | None) -> None:
    mask = read_binary_mask(_png(tmp_path / "m.png", array, mode), (2, 3))
    assert mask.dtype == torch.float32
    assert mask.tolist() == [[[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]]


def test_read_binary_mask_refusals(tmp_path: Path) -> None:
    grey = _png(tmp_path / "grey.png", np.array([[0, 128, 255], [0, 0, 255]], dtype=np.uint8))
    with pytest.raises(LabelRequestError) as err:
        read_binary_mask(grey, (2, 3))
    assert err.value.status_code == 422 and "not binary: values {0, 128, 255}" in err.value.detail
    offset = _png(tmp_path / "offset.png", np.array([[10, 255]], dtype=np.uint8))
    with pytest.raises(LabelRequestError, match="not binary"):
        read_binary_mask(offset)
    empty = _png(tmp_path / "empty.png", np.zeros((2, 3), dtype=np.uint8))
    with pytest.raises(LabelRequestError) as err:
        read_binary_mask(empty, (2, 3))
    assert err.value.status_code == 422 and "empty" in err.value.detail
    assert float(read_binary_mask(empty, (2, 3), allow_empty=True).sum()) == 0.0
    with pytest.raises(LabelRequestError) as err:
        read_binary_mask(empty, (3, 2), allow_empty=True)
    assert err.value.status_code == 422 and "mask size 3x2 (WxH) differs from image size 2x3" in err.value.detail
    full = _png(tmp_path / "full.png", np.full((2, 2), 255, dtype=np.uint8))
    assert float(read_binary_mask(full, (2, 2)).sum()) == 4.0


def test_rank_by_quality_lowest_first() -> None:
    scores = {"b": 0.4, "a": 0.4, "c": 0.1, "d": None, "e": 0.9}
    assert rank_by_quality(scores) == ["c", "a", "b", "e"]
    assert rank_by_quality({}) == []


def test_find_bundle_and_versions(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found in: .*first/quality_predictor"):
        find_bundle("quality_predictor", [tmp_path / "first"])
    bundle = tmp_path / "second" / "quality_predictor"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "models" / "model.pt").write_bytes(b"weights")
    assert find_bundle("quality_predictor", [tmp_path / "first", tmp_path / "second"]) == bundle
    assert file_sha256(bundle / "models" / "model.pt") == hashlib.sha256(b"weights").hexdigest()
    assert bundle_version(bundle) == "unknown"
    assert bundle_version(REPO / "bundles" / "quality_predictor") == "0.1.0"


def test_quality_service_scores_like_training_preprocessing(service: QualityService, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    mask = np.zeros((48, 40), dtype=np.uint8)
    mask[10:30, 8:24] = 255
    result = service.score_pair(_png(tmp_path / "i.png", image), _png(tmp_path / "m.png", mask))
    # reference: area resize to 32 px (get_seg_transforms' evaluation chain) then g.score
    image_t = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255.0
    mask_t = torch.from_numpy(mask > 0).float()[None, None]
    image_s = torch.nn.functional.interpolate(image_t, size=(32, 32), mode="area")
    mask_s = (torch.nn.functional.interpolate(mask_t, size=(32, 32), mode="area") >= 0.5).float()
    expected = float(service.checker.network.score(image_s, mask_s)[0])
    assert result["quality"] == pytest.approx(expected, abs=1e-6)
    assert 0.0 <= result["quality"] <= 1.0
    sha = file_sha256(service.checker.checkpoint)
    assert result["model_version"] == f"quality_predictor@0.1.0+sha256:{sha[:12]}"
    assert (result["height"], result["width"]) == (48, 40)
    assert result["foreground_fraction"] == pytest.approx(20 * 16 / (48 * 40))
    assert result["latency_ms"] > 0
    with pytest.raises(LabelRequestError, match="differs from image size"):
        service.score_pair(tmp_path / "i.png", _png(tmp_path / "small.png", mask[:20]))


def test_segment_returns_mask_at_input_size_and_its_quality(service: QualityService, tmp_path: Path) -> None:
    image = np.random.default_rng(2).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    path = _png(tmp_path / "i.png", image)
    mask, result = service.segment(path)
    assert mask.shape == (40, 56) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert result["foreground_fraction"] == pytest.approx(float((mask > 0).mean()))
    # the reported quality is what the quality task answers for this image and this mask
    mask_t = torch.from_numpy(mask > 0).float()[None]
    assert result["quality"] == pytest.approx(service.score_tensors(read_image(path), mask_t), abs=1e-6)
    assert result["segmentation_model_version"].startswith("ssl_segmentation@0.1.0+sha256:")
    # the mask is f's prediction at 32 px, restored to the input size
    resized = torch.nn.functional.interpolate(read_image(path)[None], size=(32, 32), mode="area")
    probability = torch.sigmoid(service.segmenter.network(resized))
    restored = torch.nn.functional.interpolate(probability, size=(40, 56), mode="bilinear") >= 0.5
    assert np.array_equal(restored[0, 0].numpy(), mask > 0)
    no_seg = QualityService(service.checker, service.version)
    with pytest.raises(LabelRequestError) as err:
        no_seg.segment(path)
    assert err.value.status_code == 404


def test_segmentation_bundle_mismatch_is_explained(tmp_path: Path) -> None:
    bundle = tmp_path / "ssl_segmentation"
    shutil.copytree(REPO / "bundles" / "ssl_segmentation" / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    torch.save(build_segmentation_network("unet", size="small").state_dict(), bundle / "models" / "model.pt")
    from qgssl_monai.serving.label_logic import SegmentationModel

    with pytest.raises(ValueError, match="seg_network_size small"):
        SegmentationModel(bundle)  # train.json says network_size "paper"
    assert SegmentationModel(bundle, net="unet", overrides={"network_size": "small"}).image_size == 256


def test_stage_app_and_server_command(tmp_path: Path) -> None:
    app = stage_app(REPO / "apps" / "quality_checker", tmp_path / "app", {})
    assert (app / "main.py").is_file() and (app / "lib" / "infers" / "quality.py").is_file()
    server = LabelServer(app, tmp_path / "studies", {"models": "quality_predictor"}, python="/venv/bin/python")
    cmd = server.command()
    assert cmd[:4] == ["/venv/bin/python", "-m", "monailabel.main", "start_server"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and int(cmd[cmd.index("--port") + 1]) == server.port
    assert cmd[cmd.index("--conf") + 1 : cmd.index("--conf") + 3] == ["models", "quality_predictor"]
    assert server.url == f"http://127.0.0.1:{server.port}"


@pytest.mark.realdata
def test_real_masks_pass_the_request_checks(real_data_root: Path) -> None:
    """Kvasir-SEG and CVC-ClinicDB masks are accepted as binary, non-empty and of their image's size."""
    for dataset in ("kvasir-seg", "cvc-clinicdb"):
        masks = sorted((real_data_root / dataset / "masks").glob("*.png"))[:10]
        assert len(masks) == 10
        for mask_path in masks:
            image_path = next((real_data_root / dataset / "images").glob(mask_path.stem + ".*"))
            image = read_image(image_path)
            mask = read_binary_mask(mask_path, image.shape[1:])
            assert mask.shape == (1, *image.shape[1:]) and 0.0 < float(mask.mean()) < 1.0
