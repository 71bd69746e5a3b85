"""g's checkpoint: the sidecar (size, channels, backbone, calibration), the one loader, and every consumer using it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from PIL import Image

import qgssl_monai.networks.quality as quality_module
from qgssl_monai.methods import build_method
from qgssl_monai.methods.quality_weighting import QualityNetChangedError, quality_reference
from qgssl_monai.networks.calibration import MonotoneCalibration
from qgssl_monai.networks.quality import (
    QualityPredictor,
    file_sha256,
    load_quality_predictor,
    quality_metadata_path,
    read_quality_metadata,
    save_quality_calibration,
    write_quality_metadata,
)
from qgssl_monai.segmentation.inference import MaskAndQualityWriter
from qgssl_monai.serving.label_logic import QualityService
from qgssl_monai.serving.label_server import stage_app
from qgssl_monai.serving.quality_check import QualityChecker
from ssl_test_doubles import TinyQuality

REPO = Path(__file__).resolve().parents[1]
# a clearly non-identity monotone map: pessimistic below 0.5, steep above
CALIBRATION = MonotoneCalibration([0.0, 0.5, 0.6, 1.0], [0.0, 0.1, 0.7, 0.95])


def _trained_g(folder: Path, image_size: int = 32, calibration: MonotoneCalibration | None = None, seed: int = 0) -> Path:
    """A g whose head bias makes its output vary (0.3..0.9) and its sidecar; returns the weights path."""
    torch.manual_seed(seed)
    net = QualityPredictor(in_channels=4, head_init_std=0.05)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.pt"
    torch.save(net.state_dict(), path)
    write_quality_metadata(path, image_size=image_size, image_channels=3, backbone="resnet18", calibration=calibration)
    return path


def _pair(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.random((3, size, size), dtype=np.float32))
    mask = torch.zeros(1, size, size)
    mask[:, size // 4 : 3 * size // 4, size // 5 : size // 2] = 1.0
    return image, mask


def test_sidecar_round_trip(tmp_path: Path) -> None:
    path = _trained_g(tmp_path, image_size=48, calibration=CALIBRATION)
    sidecar = quality_metadata_path(path)
    assert sidecar == tmp_path / "model.meta.json"
    metadata = json.loads(sidecar.read_text())
    assert metadata == read_quality_metadata(path)
    assert {k: metadata[k] for k in ("image_size", "image_channels", "in_channels", "backbone", "spatial_dims", "dropout")} == {
        "image_size": 48, "image_channels": 3, "in_channels": 4, "backbone": "resnet18", "spatial_dims": 2, "dropout": 0.15
    }  # fmt: skip
    assert metadata["sha256"] == file_sha256(path) and metadata["weights"] == "model.pt"
    assert metadata["calibration"] == CALIBRATION.to_dict()
    assert isinstance(torch.load(path, weights_only=True), dict)  # model.pt stays a plain state_dict

    rng_before = torch.random.get_rng_state()
    g = load_quality_predictor(path)
    assert torch.equal(rng_before, torch.random.get_rng_state())  # loading g leaves the global RNG alone
    assert (g.image_size, g.image_channels, g.backbone_name, g.spatial_dims) == ((48, 48), 3, "resnet18", 2)
    assert not g.training and not any(p.requires_grad for p in g.parameters())
    assert g.checkpoint_sha256 == metadata["sha256"] and g.checkpoint_path == str(path.resolve())
    assert g.calibration.to_dict() == CALIBRATION.to_dict()

    # the calibration can be replaced or removed later (what a calibration fit writes); the rest is kept
    save_quality_calibration(path, None)
    assert read_quality_metadata(path)["calibration"] is None and load_quality_predictor(path).calibration is None
    assert read_quality_metadata(path)["image_size"] == 48


def test_missing_sidecar_and_stale_sidecar_are_explained(tmp_path: Path) -> None:
    path = _trained_g(tmp_path)
    quality_metadata_path(path).unlink()
    with pytest.raises(ValueError) as err:
        load_quality_predictor(path, backbone="resnet18")
    message = str(err.value)
    assert str(path) in message and "model.meta.json" in message
    assert "and image_size, image_channels were not given" in message  # only what is missing is named
    # old checkpoints load when the settings are given
    g = load_quality_predictor(path, image_size=32, image_channels=3, backbone="resnet18")
    assert g.image_size == (32, 32)

    write_quality_metadata(path, image_size=32, image_channels=3, backbone="resnet18")
    torch.save(QualityPredictor(in_channels=4).state_dict(), path)  # weights replaced, sidecar left behind
    with pytest.raises(ValueError, match="describes other weights"):
        load_quality_predictor(path)


def test_checker_scores_at_the_trained_size(tmp_path: Path) -> None:
    """A g trained at 32 px gets 32 px inputs, whatever the size of the images it is given."""
    path = _trained_g(tmp_path / "models", image_size=32)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "inference.json").write_text("{}")
    checker = QualityChecker.from_bundle(tmp_path)
    assert checker.image_size == 32 and checker.image_channels == 3

    image, mask = _pair(64)
    seen: list[tuple[int, ...]] = []
    hook = checker.network.encoder.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    score = checker.score_tensors(image, mask)
    files = [tmp_path / "i.png", tmp_path / "m.png"]
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(files[0])
    Image.fromarray(mask[0].numpy().astype(np.uint8) * 255).save(files[1])
    file_score = checker.score_file(*files)
    hook.remove()
    assert seen == [(1, 4, 32, 32), (1, 4, 32, 32)]

    small_image = torch.nn.functional.interpolate(image[None], size=(32, 32), mode="area")
    small_mask = (torch.nn.functional.interpolate(mask[None], size=(32, 32), mode="area") >= 0.5).float()
    g = load_quality_predictor(path)
    with torch.no_grad():
        expected = float(g.score(small_image, small_mask)[0])
        assert float(g.score(image[None], mask[None])[0]) == pytest.approx(expected, abs=1e-6)  # g resizes itself
    assert score == pytest.approx(expected, abs=1e-6)
    assert file_score == pytest.approx(expected, abs=2e-3)  # 8-bit PNG round trip
    # at 64 px (what a consumer ignoring the sidecar would feed) g answers something else
    untrained_size = load_quality_predictor(path, image_size=64)
    with torch.no_grad():
        assert abs(float(untrained_size.score(image[None], mask[None])[0]) - expected) > 1e-4


def test_soft_masks_keep_their_gradient_through_resize_and_calibration(tmp_path: Path) -> None:
    g = load_quality_predictor(_trained_g(tmp_path, image_size=32, calibration=CALIBRATION))
    image = torch.rand(2, 3, 64, 64)
    logits = torch.randn(2, 1, 64, 64, requires_grad=True)
    quality = g.score(image, torch.sigmoid(logits))
    (1.0 - quality.mean()).backward()  # the QAR loss
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_calibration_is_applied_by_every_consumer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One loader for g: every consumer goes through ``load_quality_predictor`` and scores the calibrated g."""
    calls: list[str] = []
    real_loader = quality_module.load_quality_predictor

    def spy(checkpoint, device="cpu", **settings):
        calls.append(str(checkpoint))
        return real_loader(checkpoint, device, **settings)

    monkeypatch.setattr(quality_module, "load_quality_predictor", spy)
    monkeypatch.setattr("qgssl_monai.serving.quality_check.load_quality_predictor", spy)

    torch.manual_seed(0)
    sidecar = {"image_size": 32, "image_channels": 3, "backbone": "resnet18", "calibration": CALIBRATION}
    weights = QualityPredictor(in_channels=4, head_init_std=0.05).state_dict()
    app = stage_app(
        REPO / "apps" / "quality_checker",
        tmp_path / "app",
        {"quality_predictor": (REPO / "bundles" / "quality_predictor", weights, sidecar)},
    )
    bundle = app / "model" / "quality_predictor"
    path = bundle / "models" / "model.pt"

    image, mask = _pair(32, seed=3)
    uncalibrated = load_quality_predictor(path)
    uncalibrated.calibration = None
    with torch.no_grad():
        raw = uncalibrated.score(image[None], mask[None])
    expected = float(CALIBRATION(raw)[0])
    assert abs(expected - float(raw[0])) > 0.01  # the calibration changes the score
    calls.clear()

    scores: dict[str, float] = {}
    scores["quality-check"] = QualityChecker.from_bundle(bundle).score_tensors(image, mask)
    scores["label app"] = QualityService.from_bundles(bundle).score_tensors(image, mask)

    def parsed(config: Path | list[Path], key: str, **overrides) -> torch.nn.Module:
        parser = ConfigParser()
        parser.read_config([str(c) for c in ([config] if isinstance(config, Path) else config)])
        for k, v in overrides.items():
            parser[k] = v
        return parser.get_parsed_content(key)

    quality_configs = REPO / "bundles" / "quality_predictor" / "configs"
    for name in ("inference.json", "evaluate.json"):
        network = parsed(quality_configs / name, "network", ckpt_path=str(path), device="cpu")
        with torch.no_grad():
            scores[f"quality bundle {name}"] = float(network.score(image[None], mask[None])[0])

    ssl_configs = REPO / "bundles" / "ssl_segmentation" / "configs"
    for method_file in ("qar", "pl_qw", "qar_qw"):
        method = parsed(
            [ssl_configs / "train.json", ssl_configs / "method" / f"{method_file}.json"],
            "method",
            quality_ckpt=str(path),
            device="cpu",
            bundle_root=str(REPO / "bundles" / "ssl_segmentation"),
        )
        holders = [m for m in method.modules() if hasattr(m, "quality_net")]
        assert holders, method_file
        for holder in holders:
            with torch.no_grad():
                scores[f"{method_file} {type(holder).__name__}"] = float(
                    holder.quality_net(torch.cat([image, mask])[None]).reshape(-1)[0]
                )
    ssl_g = parsed(
        [ssl_configs / "train.json", ssl_configs / "inference.json"],
        "inference#quality_net",
        quality_ckpt=str(path),
        device="cpu",
        bundle_root=str(REPO / "bundles" / "ssl_segmentation"),
    )
    writer = MaskAndQualityWriter(tmp_path / "pred", quality_net=ssl_g)
    writer.reset()
    meta_image = MetaTensor(image, meta={"filename_or_obj": "x.png", "spatial_shape": (32, 32)})
    writer.collect(SimpleNamespace(state=SimpleNamespace(output=[{"image": meta_image, "pred": mask}])))
    scores["ssl inference writer"] = float(writer.records[0]["predicted_quality"])

    for consumer, score in scores.items():
        assert score == pytest.approx(expected, abs=1e-5), consumer
    assert len(calls) == 2 + 2 + 3 + 1  # checker, app, 2 quality-bundle configs, 3 SSL methods, SSL inference


def test_training_checkpoints_hold_a_reference_to_g_not_its_weights(tmp_path: Path) -> None:
    g = load_quality_predictor(_trained_g(tmp_path / "a"))
    method = build_method("cps-qw", quality_net=g)
    method.setup(torch.nn.Conv2d(3, 1, 1))
    state = method.state_dict()
    assert not any(".quality_net." in f".{k}" for k in state)
    assert any(k.startswith("peer") for k in state)  # the trainable peer is still saved
    reference = state["quality_weighting.quality_net_reference"]
    assert reference == {"path": g.checkpoint_path, "sha256": file_sha256(tmp_path / "a" / "model.pt")}
    restored = build_method("cps-qw", quality_net=load_quality_predictor(tmp_path / "a" / "model.pt"))
    restored.setup(torch.nn.Conv2d(3, 1, 1))
    restored.load_state_dict(state)  # same g: loads

    other = build_method("cps-qw", quality_net=load_quality_predictor(_trained_g(tmp_path / "b", seed=1)))
    other.setup(torch.nn.Conv2d(3, 1, 1))
    with pytest.raises(QualityNetChangedError, match="quality predictor g changed") as err:
        other.load_state_dict(state)
    assert "\n" not in str(err.value) and str(tmp_path / "a") in str(err.value)

    # checkpoints written before g was left out (they embed its weights) still load
    tiny = TinyQuality()
    qar = build_method("qar", quality_net=tiny)
    embedded = {f"quality_net.{k}": torch.zeros_like(v) for k, v in tiny.state_dict().items()}
    before = quality_reference(tiny)
    qar.load_state_dict(embedded)
    assert quality_reference(tiny) == before  # the live g is kept
