"""Server-independent logic of the MONAI Label quality-checker app (``apps/quality_checker``).

Everything here runs without ``monailabel`` (so core CI tests it quickly); the app's infer tasks, active
learning strategy and scoring method are thin wrappers around:

* request validation: :func:`check_image_id`, :func:`resolve_inside` (path safety), :func:`read_image`,
  :func:`read_binary_mask` (non-images, truncated files, non-binary / empty / wrongly sized masks);
  every refusal is a :class:`LabelRequestError` carrying the HTTP status the server answers with;
* :class:`QualityService`: the quality predictor g (loaded once from its bundle) scoring image-mask pairs,
  and optionally an SSL segmentation network producing a mask and its predicted quality;
* :func:`rank_by_quality`: the active-learning order (lowest predicted quality first).

Policies (documented in ``apps/quality_checker/README.md``):

* a mask whose size differs from the image's is **refused** (422), not resampled: a mask of another size
  most likely belongs to another image;
* a mask must be binary: after reducing colour channels by their maximum (alpha dropped) it may hold
  at most two values, 0 and one positive value ({0, 1}, {0, 255}, {0, 65535}, palette indices {0, 1});
  JPEG-compressed masks are therefore refused, send PNG;
* an uploaded (or stored) mask without foreground is refused (422): g estimates the Dice of an object
  mask, and an empty reference mask makes Dice undefined. A *predicted* empty mask (segmentation task)
  is still scored, as the quality of that prediction.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import Resize
from PIL import Image, UnidentifiedImageError

from qgssl_monai.networks.quality import file_sha256, load_state_dict_file
from qgssl_monai.serving.quality_check import QualityChecker
from qgssl_monai.transforms.io import (
    EnsureImageChannels,
    ScaleToUnitRange,
    image_converter,
    mask_converter,
    restore_original_size,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "LabelRequestError",
    "QualityService",
    "SegmentationModel",
    "bundle_version",
    "check_image_id",
    "exposed_bind_host",
    "find_bundle",
    "rank_by_quality",
    "read_binary_mask",
    "read_image",
    "resolve_inside",
]

# refuse images larger than 4096 x 4096 (decompression bombs, accidental whole-slide uploads)
DEFAULT_MAX_PIXELS = 4096 * 4096
# datastore ids: a file stem without any path component
_IMAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$")


class LabelRequestError(ValueError):
    """A request the server refuses; ``status_code`` is the HTTP status (4xx), ``detail`` the message."""

    def __init__(self, status_code: int, detail: str) -> None:
        if not 400 <= int(status_code) < 500:
            raise ValueError(f"LabelRequestError is for client errors (4xx), got {status_code}")
        super().__init__(detail)
        self.status_code = int(status_code)
        self.detail = detail


def check_image_id(image_id: str) -> str:
    """Validate a datastore image id: a bare file stem (letters, digits, ``._+-``), no ``..``, no separator.

    Raises:
        LabelRequestError: 400 for ids that could name a path outside the studies folder.
    """
    if not isinstance(image_id, str) or not _IMAGE_ID.fullmatch(image_id) or ".." in image_id:
        raise LabelRequestError(
            400, f"invalid image id {image_id!r}: use a datastore image id (file stem, no '/', '\\' or '..')"
        )
    return image_id


def resolve_inside(root: str | os.PathLike, candidate: str | os.PathLike) -> Path:
    """Resolve ``candidate`` (relative to ``root`` or absolute) and make sure it stays inside ``root``.

    Symlinks are resolved first, so a link pointing out of ``root`` is refused too.

    Raises:
        LabelRequestError: 400 when the resolved path leaves ``root``.
    """
    base = Path(root).resolve()
    path = (base / candidate).resolve()
    if path != base and base not in path.parents:
        raise LabelRequestError(400, f"path {str(candidate)!r} leaves the allowed folder")
    return path


def _open_decoded(path: str | os.PathLike, what: str, max_pixels: int) -> Image.Image:
    """Open and fully decode a raster file (a truncated file fails here, not later in a transform)."""
    path = Path(path)
    if not path.is_file():
        raise LabelRequestError(404, f"{what} file not found: {path.name}")
    try:
        with Image.open(path) as handle:
            if handle.width * handle.height > max_pixels:
                raise LabelRequestError(
                    413, f"{what} has {handle.width}x{handle.height} pixels; the limit is {max_pixels} pixels"
                )
            handle.load()
            return handle.copy()
    except LabelRequestError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise LabelRequestError(415, f"{what} is not a readable image (PNG, JPEG, BMP or TIFF): {err}") from err
    except (OSError, SyntaxError, ValueError) as err:  # truncated / corrupt data
        raise LabelRequestError(422, f"{what} could not be decoded (truncated or corrupt file): {err}") from err


def _channel_first(array: np.ndarray) -> np.ndarray:
    return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)


def read_image(path: str | os.PathLike, rgb: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Read a 2D raster image as float32 ``(3 or 1, H, W)`` in ``[0, 1]`` (the project's loading rules).

    Raises:
        LabelRequestError: 404 missing, 415 not an image, 422 truncated/corrupt or unsupported channels,
            413 more than ``max_pixels`` pixels.
    """
    image = image_converter(_open_decoded(path, "image", max_pixels))
    tensor = ScaleToUnitRange()(_channel_first(np.array(image)))
    try:
        return EnsureImageChannels(rgb=rgb)(tensor).float()
    except ValueError as err:
        raise LabelRequestError(422, f"image: {err}") from err


def read_binary_mask(
    path: str | os.PathLike,
    image_shape: Sequence[int] | None = None,
    *,
    allow_empty: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """Read a binary mask as float32 ``(1, H, W)`` in ``{0, 1}``.

    Args:
        path: mask file (PNG recommended; palette PNGs are read as their indices).
        image_shape: ``(H, W)`` of the image the mask belongs to; a different size is refused.
        allow_empty: accept a mask without foreground.

    Raises:
        LabelRequestError: 404/413/415/422 as :func:`read_image`; 422 when the mask is not binary, is empty
            (unless ``allow_empty``) or its size differs from ``image_shape``.
    """
    mask = mask_converter(_open_decoded(path, "mask", max_pixels))
    values = _channel_first(np.array(mask))
    if values.shape[0] in (2, 4):  # drop alpha: a mask's meaning is in its colour / grey values
        values = values[:-1]
    reduced = values.max(axis=0)
    if image_shape is not None and tuple(reduced.shape) != tuple(int(s) for s in image_shape):
        raise LabelRequestError(
            422,
            f"mask size {reduced.shape[1]}x{reduced.shape[0]} (WxH) differs from image size "
            f"{int(image_shape[1])}x{int(image_shape[0])}; masks are not resampled, send the mask of this image",
        )
    levels = np.unique(reduced)
    if levels.size > 2 or (levels.size == 2 and levels[0] != 0):
        shown = ", ".join(str(v) for v in levels[:6]) + (", ..." if levels.size > 6 else "")
        raise LabelRequestError(
            422, f"mask is not binary: values {{{shown}}}; expected 0 and one foreground value (e.g. 0/1 or 0/255)"
        )
    foreground = reduced > 0
    if not foreground.any() and not allow_empty:
        raise LabelRequestError(422, "mask is empty (no foreground pixel); the predicted Dice of an empty mask is undefined")
    return torch.from_numpy(foreground[None].astype(np.float32))


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def exposed_bind_host(argv: Sequence[str]) -> str | None:
    """The non-loopback address a ``monailabel start_server`` command line binds to, else ``None``.

    MONAI Label's CLI binds to ``0.0.0.0`` when ``--host``/``-i`` is not given; the app refuses such a start
    unless authentication is enabled (see ``apps/quality_checker/main.py``). Command lines other than
    ``start_server`` (e.g. MONAI Label's background scoring processes) return ``None``.
    """
    argv = list(argv)
    if "start_server" not in argv:
        return None
    host = "0.0.0.0"  # the CLI default
    for i, arg in enumerate(argv):
        if arg in ("--host", "-i") and i + 1 < len(argv):
            host = argv[i + 1]
        elif arg.startswith("--host="):
            host = arg.split("=", 1)[1]
    return None if host in LOOPBACK_HOSTS else host


def bundle_version(bundle: str | os.PathLike) -> str:
    """``version`` of ``<bundle>/configs/metadata.json`` (``"unknown"`` when absent)."""
    metadata = Path(bundle) / "configs" / "metadata.json"
    if not metadata.is_file():
        return "unknown"
    with open(metadata, encoding="utf-8") as handle:
        return str(json.load(handle).get("version", "unknown"))


def find_bundle(name: str, search_dirs: Iterable[str | os.PathLike]) -> Path:
    """First ``<dir>/<name>`` holding ``configs/`` and ``models/model.pt``.

    Raises:
        FileNotFoundError: naming every folder tried and how to train the bundle.
    """
    tried = []
    for folder in search_dirs:
        candidate = Path(folder) / name
        tried.append(str(candidate))
        if (candidate / "configs").is_dir() and (candidate / "models" / "model.pt").is_file():
            return candidate
    raise FileNotFoundError(
        f"bundle {name!r} with a trained models/model.pt not found in: {', '.join(tried)}. "
        f"Train it (python -m monai.bundle run --config_file configs/train.json --bundle_root bundles/{name} ...) "
        "or copy the trained bundle to <app>/model/" + name
    )


def _model_version(bundle: Path, checkpoint: Path) -> str:
    return f"{bundle.name}@{bundle_version(bundle)}+sha256:{file_sha256(checkpoint)[:12]}"


class SegmentationModel:
    """An SSL-bundle segmentation network f, run on one image at a time.

    Args:
        bundle: ``ssl_segmentation`` bundle folder (``configs/train.json`` [+ ``configs/net/<net>.json``],
            ``models/model.pt``).
        net: net overlay name (``unet``, ``swinunetr2d``, ``unetpp``, ``attention_unet``); ``None`` keeps
            ``train.json``'s network.
        overrides: config values replacing the bundle's (e.g. ``{"network_size": "small", "image_size": 64}``),
            i.e. the overrides used at training time.
        device: where f runs.
    """

    def __init__(
        self,
        bundle: str | os.PathLike,
        net: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.bundle = Path(bundle)
        configs = self.bundle / "configs"
        files = [str(configs / "train.json")]
        if net:
            overlay = configs / "net" / f"{net}.json"
            if not overlay.is_file():
                raise FileNotFoundError(f"net overlay {overlay} not found (seg_net={net!r})")
            files.append(str(overlay))
        parser = ConfigParser()
        parser.read_config(files)
        for key, value in (overrides or {}).items():
            parser[key] = value
        parser["device"] = "cpu"
        self.image_size = int(parser.get_parsed_content("image_size"))
        self.rgb = int(parser.get_parsed_content("in_channels")) == 3
        self.device = torch.device(device)
        self.checkpoint = self.bundle / "models" / "model.pt"
        network = parser.get_parsed_content("network_def")
        try:
            network.load_state_dict(load_state_dict_file(self.checkpoint))
        except RuntimeError as err:
            raise ValueError(
                f"{self.checkpoint} does not fit the bundle's network_def (pass the net/network_size/in_channels used "
                f"at training, e.g. --conf seg_network_size small): {err}"
            ) from err
        self.network = network.to(self.device).eval().requires_grad_(False)
        self.version = _model_version(self.bundle, self.checkpoint)
        self._resize = Resize((self.image_size, self.image_size), mode="area")

    @torch.no_grad()
    def predict(self, image: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        """``image (C, H, W)`` in ``[0, 1]`` -> hard mask ``(1, H, W)`` in ``{0, 1}`` at the input size."""
        resized = torch.as_tensor(self._resize(image)).float()[None].to(self.device)
        probability = torch.sigmoid(self.network(resized))[0].cpu()
        return restore_original_size(probability, tuple(image.shape[1:]), threshold=threshold)


@dataclass
class QualityService:
    """The quality predictor g (and optionally a segmentation network f) behind the app's tasks.

    Args:
        checker: g loaded once (:class:`~qgssl_monai.serving.quality_check.QualityChecker`).
        version: g's model version string (``<bundle>@<version>+sha256:<12 hex>``).
        segmenter: f, or ``None`` when only quality scoring is served.
        max_pixels: size limit of any image or mask read.
    """

    checker: QualityChecker
    version: str
    segmenter: SegmentationModel | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def from_bundles(
        cls,
        quality_bundle: str | os.PathLike,
        segmentation_bundle: str | os.PathLike | None = None,
        *,
        quality_overrides: Mapping[str, Any] | None = None,
        seg_net: str | None = None,
        seg_overrides: Mapping[str, Any] | None = None,
        device: str = "cpu",
    ) -> QualityService:
        """Load g from its bundle (settings from the sidecar of ``models/model.pt``; ``quality_overrides`` only
        for a checkpoint without sidecar) and f (settings from ``configs/train.json`` + ``seg_overrides``)."""
        quality_bundle = Path(quality_bundle)
        checker = QualityChecker.from_bundle(quality_bundle, device=device, **dict(quality_overrides or {}))
        segmenter = None
        if segmentation_bundle is not None:
            segmenter = SegmentationModel(segmentation_bundle, seg_net, seg_overrides, device=device)
        return cls(checker, _model_version(quality_bundle, checker.checkpoint), segmenter)

    @property
    def rgb(self) -> bool:
        return self.checker.image_channels == 3

    def score_tensors(self, image: torch.Tensor, mask: torch.Tensor) -> float:
        """Predicted Dice of ``mask (1, H, W)`` for ``image (C, H, W)``, preprocessed as in training
        (delegates to :meth:`QualityChecker.score_tensors`)."""
        return self.checker.score_tensors(image, mask)

    def score_pair(self, image_path: str | os.PathLike, mask_path: str | os.PathLike) -> dict[str, Any]:
        """JSON result of the ``quality`` task: ``quality``, ``model_version``, ``latency_ms``, sizes."""
        start = time.perf_counter()
        image = read_image(image_path, rgb=self.rgb, max_pixels=self.max_pixels)
        mask = read_binary_mask(mask_path, image.shape[1:], max_pixels=self.max_pixels)
        quality = self.score_tensors(image, mask)
        return {
            "quality": quality,
            "model_version": self.version,
            "latency_ms": (time.perf_counter() - start) * 1000.0,
            "height": int(image.shape[1]),
            "width": int(image.shape[2]),
            "foreground_fraction": float(mask.mean()),
        }

    def segment(self, image_path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
        """Segment an image and score the mask: ``(mask uint8 (H, W) in {0, 255}, JSON result)``.

        The quality is g's estimate for the returned mask at the image's original size, i.e. the value
        the ``quality`` task gives for this image and this mask.

        Raises:
            LabelRequestError: 404 when no segmentation model is loaded; image errors as :func:`read_image`.
        """
        if self.segmenter is None:
            raise LabelRequestError(404, "no segmentation model loaded (start the app with --conf models quality_predictor,ssl_segmentation)")
        start = time.perf_counter()
        image = read_image(image_path, rgb=self.rgb, max_pixels=self.max_pixels)
        if self.segmenter.rgb != self.rgb:
            raise ValueError("segmentation and quality bundles disagree on RGB vs grey input")
        mask = self.segmenter.predict(image)
        quality = self.score_tensors(image, mask)
        result = {
            "quality": quality,
            "model_version": self.version,
            "segmentation_model_version": self.segmenter.version,
            "latency_ms": (time.perf_counter() - start) * 1000.0,
            "height": int(image.shape[1]),
            "width": int(image.shape[2]),
            "foreground_fraction": float(mask.mean()),
        }
        return (mask[0].numpy() > 0).astype(np.uint8) * 255, result


def rank_by_quality(scores: Mapping[str, float | None]) -> list[str]:
    """Image ids ordered for labelling: lowest predicted quality first, ties by id; ``None`` scores dropped."""
    return sorted((k for k, v in scores.items() if v is not None), key=lambda k: (float(scores[k]), k))
