"""The quality-checker MONAI Label app on a real server (127.0.0.1, free port), good and bad requests.

Skipped only when ``monailabel`` is not importable (install it into a separate venv with
``scripts/install_label.sh`` and run this file with that venv's python). g and the segmentation network are
trained in-test for a few steps on the demo data and staged into a temporary copy of the app.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("monailabel")

from qgssl_monai.data.manifest import load_split  # noqa: E402
from qgssl_monai.networks.quality import QualityPredictor  # noqa: E402
from qgssl_monai.networks.segmentation import build_segmentation_network  # noqa: E402
from qgssl_monai.serving.label_logic import QualityService, rank_by_quality  # noqa: E402
from qgssl_monai.serving.label_server import LabelServer, request, stage_app  # noqa: E402
from qgssl_monai.transforms.io import get_seg_transforms  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
CONF = {
    "models": "quality_predictor,ssl_segmentation",
    "seg_network_size": "small",
    "seg_image_size": str(SIZE),
}
LABELED, UNLABELED = 3, 5


def _dice(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter = (a * b).flatten(1).sum(1)
    return (2 * inter + 1e-6) / (a.flatten(1).sum(1) + b.flatten(1).sum(1) + 1e-6)


def _train_tiny_models(items: list[dict[str, str]]) -> tuple[dict, dict]:
    """A few optimiser steps of f (BCE) and g (MSE to the true Dice of dilated/eroded/shifted masks)."""
    torch.manual_seed(0)
    chain = get_seg_transforms(SIZE, train=False)
    batch = [chain(item) for item in items]
    images = torch.stack([torch.as_tensor(d["image"]) for d in batch]).float()
    labels = torch.stack([torch.as_tensor(d["label"]) for d in batch]).float()
    seg = build_segmentation_network("unet", size="small")
    optimiser = torch.optim.Adam(seg.parameters(), lr=1e-2)
    for _ in range(15):
        optimiser.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(seg(images), labels).backward()
        optimiser.step()
    quality = QualityPredictor(in_channels=4)
    optimiser = torch.optim.Adam(quality.parameters(), lr=1e-3)
    pool = torch.nn.functional.max_pool2d
    for step in range(6):
        k = 2 * (step % 3) + 3
        masks = [labels, pool(labels, k, 1, k // 2), 1 - pool(1 - labels, k, 1, k // 2), torch.roll(labels, 6 * k, dims=3)]
        candidates = torch.cat(masks)
        target = _dice(candidates, labels.repeat(4, 1, 1, 1))
        optimiser.zero_grad()
        loss = torch.nn.functional.mse_loss(quality.score(images.repeat(4, 1, 1, 1), candidates), target)
        loss.backward()
        optimiser.step()
    return quality.state_dict(), seg.eval().state_dict()


@pytest.fixture(scope="module")
def setup(demo_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("label_server")
    training = load_split(demo_manifest, "training")
    quality_state, seg_state = _train_tiny_models(training[:8])
    app = stage_app(
        REPO / "apps" / "quality_checker",
        root / "app",
        {
            "quality_predictor": (
                REPO / "bundles" / "quality_predictor",
                quality_state,
                {"image_size": SIZE, "image_channels": 3, "backbone": "resnet18"},
            ),
            "ssl_segmentation": (REPO / "bundles" / "ssl_segmentation", seg_state),
        },
    )
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i, item in enumerate(load_split(demo_manifest, "test")[:LABELED]):
        shutil.copy(item["image"], studies / f"lab{i}.png")
        shutil.copy(item["label"], studies / "labels" / "final" / f"lab{i}.png")
    for i, item in enumerate(load_split(demo_manifest, "unlabeled")[:UNLABELED]):
        shutil.copy(item["image"], studies / f"unl{i}.png")
    local = QualityService.from_bundles(
        app / "model" / "quality_predictor",
        app / "model" / "ssl_segmentation",
        seg_overrides={"network_size": "small", "image_size": SIZE},
    )
    env = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with LabelServer(app, studies, CONF, env=env, startup_timeout=150) as server:
        yield {"server": server, "url": server.url, "studies": studies, "local": local, "root": root}


def _post(url: str, files: dict | None = None, data: dict | None = None, method: str = "POST") -> tuple[int, Any]:
    return request(url, files, data, method)


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def test_info_lists_tasks_and_versions(setup: dict[str, Any]) -> None:
    info = setup["server"].get_json("/info/")
    assert set(info["models"]) == {"quality", "segmentation"}
    assert info["models"]["quality"]["config"]["quality_model_version"] == setup["local"].version
    assert "lowest_quality" in info["strategies"] and "quality_ranking" in info["scoring"]
    assert info["datastore"]["total"] == LABELED + UNLABELED


def test_infer_quality_datastore_label_and_upload(setup: dict[str, Any]) -> None:
    studies, local, url = setup["studies"], setup["local"], setup["url"]
    status, result = _post(f"{url}/infer/quality?image=lab1&output=json")
    assert status == 200, result
    expected = local.score_pair(studies / "lab1.png", studies / "labels" / "final" / "lab1.png")["quality"]
    assert result["quality"] == pytest.approx(expected, abs=1e-5)
    assert result["image_id"] == "lab1" and result["model_version"] == local.version and result["latency_ms"] > 0
    # an uploaded image + mask pair: the unlabeled image with lab0's mask (same 64 x 64 size)
    mask = (studies / "labels" / "final" / "lab0.png").read_bytes()
    status, result = _post(
        f"{url}/infer/quality?output=json",
        {"file": ("frame.png", (studies / "unl2.png").read_bytes()), "label": ("frame_mask.png", mask)},
    )
    assert status == 200, result
    expected = local.score_pair(studies / "unl2.png", studies / "labels" / "final" / "lab0.png")["quality"]
    assert result["quality"] == pytest.approx(expected, abs=1e-5) and "image_id" not in result


def test_infer_segmentation_mask_and_quality(setup: dict[str, Any]) -> None:
    studies, local, url = setup["studies"], setup["local"], setup["url"]
    mask, expected = local.segment(studies / "unl0.png")
    status, result = _post(f"{url}/infer/segmentation?image=unl0&output=json")
    assert status == 200, result
    assert result["quality"] == pytest.approx(expected["quality"], abs=1e-5)
    assert result["segmentation_model_version"] == local.segmenter.version
    assert result["foreground_fraction"] == pytest.approx(expected["foreground_fraction"])
    status, png = _post(f"{url}/infer/segmentation?image=unl0&output=image")
    assert status == 200
    assert np.array_equal(np.array(Image.open(io.BytesIO(png))), mask)


def test_lowest_quality_strategy_and_scoring(setup: dict[str, Any]) -> None:
    studies, local, url, server = setup["studies"], setup["local"], setup["url"], setup["server"]
    scores = {f"unl{i}": local.segment(studies / f"unl{i}.png")[1]["quality"] for i in range(UNLABELED)}
    ranking = rank_by_quality(scores)
    status, result = _post(f"{url}/activelearning/lowest_quality")
    assert status == 200, result
    assert result["id"] == ranking[0] and result["predicted_quality"] == pytest.approx(scores[ranking[0]], abs=1e-5)
    status, result = _post(f"{url}/scoring/quality_ranking?run_sync=true")
    assert status == 200, result
    assert result["ranking"] == ranking and result["scored"] == LABELED + UNLABELED and result["failed"] == {}
    objects = server.get_json("/datastore/?output=all")["objects"]
    for rank, image_id in enumerate(ranking, start=1):
        record = objects[image_id]["image"]["info"]["quality"]
        assert record["rank"] == rank and record["labeled"] is False
        assert record["segmentation_quality"] == pytest.approx(scores[image_id], abs=1e-5)
    labeled = objects["lab2"]["image"]["info"]["quality"]
    expected = local.score_pair(studies / "lab2.png", studies / "labels" / "final" / "lab2.png")["quality"]
    assert labeled["rank"] is None and labeled["label_quality"] == pytest.approx(expected, abs=1e-5)


def _bad_requests(studies: Path) -> dict[str, tuple[str, dict, dict, int, str]]:
    image = (studies / "unl1.png").read_bytes()
    grey = np.zeros((64, 64), dtype=np.uint8)
    grey[10:30, 10:30] = 255
    non_binary = grey.copy()
    non_binary[40:50, 40:50] = 128
    return {
        "non_image_upload": ("/infer/quality?output=json", {"file": ("x.png", b"%PDF-1.4 not an image"), "label": ("m.png", _png_bytes(grey))}, {}, 415, "not a readable image"),
        "truncated_png": ("/infer/quality?output=json", {"file": ("x.png", image[: len(image) // 2]), "label": ("m.png", _png_bytes(grey))}, {}, 422, "truncated"),
        "mask_size_differs": ("/infer/quality?output=json", {"file": ("x.png", image), "label": ("m.png", _png_bytes(grey[:32]))}, {}, 422, "differs from image size"),
        "mask_not_binary": ("/infer/quality?output=json", {"file": ("x.png", image), "label": ("m.png", _png_bytes(non_binary))}, {}, 422, "not binary"),
        "mask_empty": ("/infer/quality?output=json", {"file": ("x.png", image), "label": ("m.png", _png_bytes(np.zeros((64, 64), np.uint8)))}, {}, 422, "empty"),
        "no_mask_for_unlabeled_id": ("/infer/quality?image=unl1&output=json", {}, {}, 404, "no final label"),
        "unknown_model": ("/infer/nosuchmodel?image=lab0&output=json", {}, {}, 404, "unknown model"),
        "unknown_image_id": ("/infer/quality?image=nosuchimage&output=json", {}, {}, 404, "not in the datastore"),
        "image_id_dotdot": ("/infer/segmentation?image=../studies/unl1&output=json", {}, {}, 400, "invalid image id"),
        "image_server_path": ("/infer/segmentation?image=/etc/hostname&output=json", {}, {}, 400, "server paths cannot be read"),
        "label_server_path": ("/infer/quality?output=json", {"file": ("x.png", image)}, {"params": json.dumps({"label": "/etc/hostname"})}, 400, "server paths cannot be read"),
        "unknown_strategy": ("/activelearning/nosuchstrategy", {}, {}, 404, "unknown strategy"),
        "unknown_scoring": ("/scoring/nosuchmethod?run_sync=true", {}, {}, 404, "unknown scoring method"),
    }


BAD_REQUESTS = [
    "non_image_upload", "truncated_png", "mask_size_differs", "mask_not_binary", "mask_empty",
    "no_mask_for_unlabeled_id", "unknown_model", "unknown_image_id", "image_id_dotdot", "image_server_path",
    "label_server_path", "unknown_strategy", "unknown_scoring",
]


def test_bad_request_table_is_complete(tmp_path: Path) -> None:
    (tmp_path / "unl1.png").write_bytes(_png_bytes(np.zeros((4, 4, 3), np.uint8)))
    assert sorted(_bad_requests(tmp_path)) == sorted(BAD_REQUESTS)


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_4xx_with_message(setup: dict[str, Any], case: str) -> None:
    path, files, data, code, message = _bad_requests(setup["studies"])[case]
    status, result = _post(setup["url"] + path, files, data)
    assert status == code, result
    assert message in result["detail"]
    assert setup["server"].get_json("/info/")["models"]  # still alive


def test_datastore_refuses_ids_leaving_studies(setup: dict[str, Any]) -> None:
    studies, url = setup["studies"], setup["url"]
    status, result = _post(f"{url}/datastore/?image=../escaped", {"file": ("x.png", (studies / "unl1.png").read_bytes())}, method="PUT")
    assert status == 400 and "invalid image id" in result["detail"]
    assert not (studies.parent / "escaped.png").exists()
    status, result = _post(f"{url}/datastore/label?image=unl1&tag=../../escaped", {"label": ("m.png", b"x")}, method="PUT")
    assert status == 400 and not (studies.parent / "escaped.png").exists()
    # an upload whose file name tries to leave the folder is stored under a server-chosen temp name
    mask = (studies / "labels" / "final" / "lab0.png").read_bytes()
    status, result = _post(
        f"{url}/infer/quality?output=json",
        {"file": ("../../escaped.png", (studies / "unl1.png").read_bytes()), "label": ("../../escaped_mask.png", mask)},
    )
    assert status == 200, result
    assert not any(setup["root"].rglob("escaped*"))
    assert setup["server"].get_json("/datastore/")["total"] == LABELED + UNLABELED


def test_segmentation_mask_sent_back_gets_the_same_quality(setup: dict[str, Any]) -> None:
    """The mask returned by /infer/segmentation, uploaded to /infer/quality, gets the predicted Dice reported with it."""
    studies, local, url = setup["studies"], setup["local"], setup["url"]
    image_id = next(f"unl{i}" for i in range(UNLABELED) if local.segment(studies / f"unl{i}.png")[0].any())
    status, png = _post(f"{url}/infer/segmentation?image={image_id}&output=image")
    assert status == 200
    _, seg_result = _post(f"{url}/infer/segmentation?image={image_id}&output=json")
    status, result = _post(
        f"{url}/infer/quality?output=json",
        {"file": ("i.png", (studies / f"{image_id}.png").read_bytes()), "label": ("m.png", png)},
    )
    assert status == 200, result
    assert result["quality"] == pytest.approx(seg_result["quality"], abs=1e-5)
