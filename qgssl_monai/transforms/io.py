"""Load / normalise / resize / augment chains for 2D binary segmentation.

Output contract (``docs/ARCHITECTURE.md``): ``image`` float32 ``(C, H, W)`` in ``[0, 1]`` (C = 3 with
``rgb=True``, else 1), ``label`` float32 ``(1, H, W)`` in ``{0, 1}``, ``H = W = image_size``; both are
:class:`monai.data.MetaTensor` keeping the reader's metadata (``filename_or_obj``, ``spatial_shape`` =
original ``(H, W)``), so inference can name outputs after inputs and :func:`restore_original_size` can
bring a prediction back to the input's size (``monai.transforms.Invertd`` works too: the resize is the
only invertible spatial step of the evaluation chain).

Reading: PNG / JPEG / BMP / TIFF through :class:`RasterImageReader` (Pillow, arrays in the natural row-major
``(H, W[, C])`` order, i.e. *not* MONAI's default transposed PIL order), NIfTI and every other format MONAI
knows through its default readers (NIfTI arrays are taken as stored: axis 0 = rows). Intensities are kept in
their stored dtype until :class:`ScaleToUnitRange`: uint8 / 255, wider integers (16-bit sources; MONAI holds
uint16 as int32) / 65535, floats unchanged.

Masks of any encoding become ``{0, 1}`` in :class:`NormalizeBinaryMask`: colour channels are reduced by
their maximum (an alpha channel multiplies them), palette PNGs are read as their palette *indices*, and the
result is thresholded at half its maximum, which maps {0, 255}, {0, 1}, coloured masks and
JPEG-compressed masks alike (a multi-valued map keeps only values above half its maximum).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.image_reader import PILReader
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    RandFlipd,
    RandRotated,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
    Resize,
    Resized,
    ScaleIntensityRanged,
    Transform,
)
from monai.utils import TransformBackends, ensure_tuple
from PIL import Image

__all__ = [
    "EnsureImageChannels",
    "EnsureImageChannelsd",
    "NormalizeBinaryMask",
    "NormalizeBinaryMaskd",
    "RasterImageReader",
    "ScaleToUnitRange",
    "ScaleToUnitRanged",
    "get_seg_transforms",
    "get_unlabeled_transforms",
    "image_converter",
    "mask_converter",
    "original_spatial_shape",
    "restore_original_size",
]

# ITU-R BT.601 luma weights (what Pillow's convert("L") uses)
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def image_converter(image: Image.Image) -> Image.Image:
    """Pillow mode normalisation for images: palette/CMYK/YCbCr/... -> RGB, alpha dropped, 1-bit -> L.

    16-bit (``I;16``), 32-bit integer (``I``) and float (``F``) grey images are kept, so their range survives.
    """
    if image.mode in ("RGB", "L", "F", "I") or image.mode.startswith("I;16"):
        return image
    if image.mode in ("1", "LA", "La"):
        return image.convert("L")
    return image.convert("RGB")


def mask_converter(image: Image.Image) -> Image.Image:
    """Pillow mode normalisation for masks: keep palette *indices* (class ids), L/LA/RGB/RGBA and high bit depths.

    1-bit masks become L (0/255); palette images with alpha (``PA``) keep their index plane; other colour
    spaces become RGB.
    """
    if image.mode in ("P", "L", "LA", "RGB", "RGBA", "F", "I") or image.mode.startswith("I;16"):
        return image
    if image.mode == "1":
        return image.convert("L")
    if image.mode == "PA":
        return image.getchannel(0)
    return image.convert("RGB")


class RasterImageReader(PILReader):
    """:class:`monai.data.PILReader` for PNG/JPEG/BMP/TIFF keeping Pillow's row-major ``(H, W[, C])`` order.

    ``spatial_shape`` in the metadata is the original ``(H, W)`` (the base class records ``(W, H)``).

    Args:
        converter: Pillow mode conversion applied after opening (:func:`image_converter`, :func:`mask_converter`).
        kwargs: forwarded to ``PIL.Image.open``.
    """

    suffixes: tuple[str, ...] = ("png", "jpg", "jpeg", "bmp", "tif", "tiff")

    def __init__(self, converter: Callable[[Image.Image], Image.Image] | None = image_converter, **kwargs: Any) -> None:
        super().__init__(converter=converter, reverse_indexing=False, **kwargs)

    def verify_suffix(self, filename: Sequence[Any] | Any) -> bool:
        """Whether every file name ends with one of :attr:`suffixes` (case-insensitive)."""
        names = ensure_tuple(filename)
        return all(str(name).lower().endswith(tuple(f".{s}" for s in self.suffixes)) for name in names)

    def get_data(self, img: Image.Image | Sequence[Image.Image]) -> tuple[np.ndarray, dict]:
        """Array ``(H, W[, C])`` in the stored dtype (a writable copy: torch warns on read-only arrays) and meta."""
        data, meta = super().get_data(img)
        return np.array(data, copy=True), meta

    def _get_spatial_shape(self, img: Image.Image) -> np.ndarray:
        return np.asarray((img.height, img.width))


def _channel_count(data: torch.Tensor) -> int:
    if data.ndim < 2:
        raise ValueError(f"expected a channel-first (C, *spatial) array, got shape {tuple(data.shape)}")
    return int(data.shape[0])


class ScaleToUnitRange(Transform):
    """Scale stored intensities to float32 ``[0, 1]`` by their dtype.

    uint8 -> / 255; other integer types (16-bit sources; MONAI loads uint16 as int32) -> / ``wide_max``;
    bool -> 0/1; floating point -> unchanged (assumed already in ``[0, 1]``).

    Args:
        wide_max: divisor for integer types wider than 8 bit (65535 for 16-bit images).
        max_value: when given, divides every input by it instead (overrides the dtype rule).
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, wide_max: float = 65535.0, max_value: float | None = None) -> None:
        self.wide_max = float(wide_max)
        self.max_value = None if max_value is None else float(max_value)

    def __call__(self, data: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``data`` any shape and dtype -> float32 tensor (a MetaTensor stays one)."""
        tensor = data if isinstance(data, torch.Tensor) else torch.as_tensor(np.asarray(data))
        if self.max_value is not None:
            divisor = self.max_value
        elif tensor.dtype == torch.uint8:
            divisor = 255.0
        elif tensor.dtype == torch.bool or tensor.is_floating_point():
            divisor = 1.0
        else:
            divisor = self.wide_max
        return tensor.to(torch.float32) / divisor


class ScaleToUnitRanged(MapTransform):
    """Dictionary wrapper of :class:`ScaleToUnitRange`."""

    backend = ScaleToUnitRange.backend

    def __init__(
        self,
        keys: KeysCollection,
        wide_max: float = 65535.0,
        max_value: float | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scaler = ScaleToUnitRange(wide_max=wide_max, max_value=max_value)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.scaler(d[key])
        return d


class EnsureImageChannels(Transform):
    """Make a channel-first image 3-channel RGB (``rgb=True``) or 1-channel grey (``rgb=False``).

    Accepted inputs: C = 1 (grey), 2 (grey + alpha), 3 (RGB), 4 (RGBA); alpha is dropped, grey is
    repeated to 3 channels, RGB is reduced to BT.601 luma for grey output.

    Raises:
        ValueError: any other channel count.
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, rgb: bool = True) -> None:
        self.rgb = bool(rgb)

    def __call__(self, data: torch.Tensor) -> torch.Tensor:
        """``data`` (C, *spatial) -> (3 or 1, *spatial), dtype kept (float luma for grey output of colour input)."""
        channels = _channel_count(data)
        if channels not in (1, 2, 3, 4):
            raise ValueError(f"image with {channels} channels: expected 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA)")
        colour = data[:1] if channels <= 2 else data[:3]
        if self.rgb:
            return colour.repeat(3, *([1] * (data.ndim - 1))) if colour.shape[0] == 1 else colour
        if colour.shape[0] == 1:
            return colour
        weights = torch.tensor(_LUMA_WEIGHTS, dtype=torch.float32, device=data.device).view(3, *([1] * (data.ndim - 1)))
        return (colour.to(torch.float32) * weights).sum(dim=0, keepdim=True)


class EnsureImageChannelsd(MapTransform):
    """Dictionary wrapper of :class:`EnsureImageChannels`."""

    backend = EnsureImageChannels.backend

    def __init__(self, keys: KeysCollection, rgb: bool = True, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = EnsureImageChannels(rgb=rgb)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


class NormalizeBinaryMask(Transform):
    """Turn a channel-first mask of any encoding into float32 ``(1, *spatial)`` in ``{0, 1}``.

    Channels: 1 = the mask; 2 = grey + alpha; 3 = RGB (reduced by max); 4 = RGBA. An alpha channel
    multiplies the colour (transparent = background) unless the colour is constant, in which case alpha
    alone is the mask. The reduced map is thresholded at half its maximum (``> max / 2``); an all-zero map
    stays empty. So {0, 255}, {0, 1}, {0, 65535}, coloured, palette-index and JPEG-noisy masks all map to
    the intended {0, 1}.

    Raises:
        ValueError: more than 4 channels.
    """

    backend = [TransformBackends.TORCH]

    def __call__(self, data: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``data`` (C, *spatial), any dtype -> float32 (1, *spatial) in {0, 1}."""
        tensor = data if isinstance(data, torch.Tensor) else torch.as_tensor(np.asarray(data))
        tensor = tensor.to(torch.float32)
        channels = _channel_count(tensor)
        if channels > 4:
            raise ValueError(f"mask with {channels} channels: expected 1 (grey/index), 2 (LA), 3 (RGB) or 4 (RGBA)")
        if channels in (2, 4):
            colour = tensor[: channels - 1].amax(dim=0, keepdim=True)
            alpha = tensor[channels - 1 :]
            if torch.equal(colour.amax(), colour.amin()):  # colour carries no information: alpha is the mask
                values = alpha
            else:
                values = colour * alpha / alpha.amax().clamp_min(1e-12)
        else:
            values = tensor.amax(dim=0, keepdim=True)
        peak = values.amax()
        if peak <= 0:
            return torch.zeros_like(values)
        return (values > peak / 2).to(torch.float32)


class NormalizeBinaryMaskd(MapTransform):
    """Dictionary wrapper of :class:`NormalizeBinaryMask`."""

    backend = NormalizeBinaryMask.backend

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalizer = NormalizeBinaryMask()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalizer(d[key])
        return d


def _load(key: str, converter: Callable) -> LoadImaged:
    """``LoadImaged`` of ``key`` through :class:`RasterImageReader` with ``converter``: channel-first, dtype kept."""
    return LoadImaged(
        keys=key, reader=RasterImageReader(converter=converter), dtype=None, image_only=True, ensure_channel_first=True
    )


def _image_chain(image_key: str, image_size: int, rgb: bool) -> list[Transform]:
    """Load -> [0, 1] float -> 3/1 channels -> area resize to (image_size, image_size)."""
    return [
        _load(image_key, image_converter),
        ScaleToUnitRanged(keys=image_key),
        EnsureImageChannelsd(keys=image_key, rgb=rgb),
        # area = exact box average when shrinking (MONAI's anti_aliasing Gaussian zero-pads and darkens borders)
        Resized(keys=image_key, spatial_size=(image_size, image_size), mode="area"),
    ]


def _mask_chain(label_key: str, image_size: int) -> list[Transform]:
    """Load -> {0, 1} -> area resize + ``>= 0.5`` (a 2-px line survives 4x down-sampling; nearest may drop it)."""
    return [
        _load(label_key, mask_converter),
        NormalizeBinaryMaskd(keys=label_key),
        Resized(keys=label_key, spatial_size=(image_size, image_size), mode="area"),
        AsDiscreted(keys=label_key, threshold=0.5),
    ]


def _augmentation(
    image_key: str,
    keys: Sequence[str],
    *,
    rotate_degrees: float,
    brightness: float,
    contrast: float,
    prob: float,
) -> list[Transform]:
    """The paper's augmentation: flips on both axes, rotation within +-``rotate_degrees``, brightness/contrast jitter.

    Masks are rotated with nearest interpolation (stay {0, 1}); out-of-image corners are zero in both.
    """
    keys = tuple(keys)
    modes = tuple("bilinear" if key == image_key else "nearest" for key in keys)
    return [
        RandFlipd(keys=keys, prob=prob, spatial_axis=0),
        RandFlipd(keys=keys, prob=prob, spatial_axis=1),
        RandRotated(
            keys=keys, range_x=math.radians(rotate_degrees), prob=prob, mode=modes, padding_mode="zeros", keep_size=True
        ),
        # brightness: additive offset in [-brightness, brightness]; contrast: scale about the mean by 1 +- contrast
        RandShiftIntensityd(keys=image_key, offsets=brightness, prob=prob),
        RandScaleIntensityFixedMeand(keys=image_key, factors=contrast, prob=prob, fixed_mean=True),
        ScaleIntensityRanged(keys=image_key, a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
    ]


def get_seg_transforms(
    image_size: int,
    *,
    train: bool,
    keys: Sequence[str] = ("image", "label"),
    augment: bool = True,
    rgb: bool = True,
    rotate_degrees: float = 20.0,
    brightness: float = 0.1,
    contrast: float = 0.2,
    aug_prob: float = 0.5,
) -> Compose:
    """Chain for labeled ``{"image": path, "label": path}`` items.

    Args:
        image_size: output side S (square).
        train: add the augmentation (when ``augment`` too).
        keys: ``(image_key, label_key)``; a single key builds the image-only chain.
        augment: with ``train``, add flips / rotation / brightness-contrast jitter.
        rgb: 3-channel output (grey repeated) if True, else 1-channel luma.
        rotate_degrees, brightness, contrast, aug_prob: augmentation ranges and per-transform probability.

    Returns:
        Compose giving ``image`` float32 (3|1, S, S) in [0, 1] and ``label`` float32 (1, S, S) in {0, 1};
        ``set_random_state(seed)`` makes the augmentation reproducible.
    """
    keys = tuple(ensure_tuple(keys))
    if not 1 <= len(keys) <= 2:
        raise ValueError(f"keys must be (image_key,) or (image_key, label_key), got {keys}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    image_key = keys[0]
    chain: list[Transform] = _image_chain(image_key, int(image_size), rgb)
    if len(keys) == 2:
        chain += _mask_chain(keys[1], int(image_size))
    if train and augment:
        chain += _augmentation(
            image_key, keys, rotate_degrees=rotate_degrees, brightness=brightness, contrast=contrast, prob=aug_prob
        )
    chain.append(EnsureTyped(keys=keys, dtype=torch.float32, track_meta=True))
    return Compose(chain)


def get_unlabeled_transforms(
    image_size: int,
    *,
    train: bool,
    augment: bool = True,
    rgb: bool = True,
    rotate_degrees: float = 20.0,
    brightness: float = 0.1,
    contrast: float = 0.2,
    aug_prob: float = 0.5,
) -> Compose:
    """Chain for unlabeled ``{"image": path}`` items: the image half of :func:`get_seg_transforms`."""
    return get_seg_transforms(
        image_size,
        train=train,
        keys=("image",),
        augment=augment,
        rgb=rgb,
        rotate_degrees=rotate_degrees,
        brightness=brightness,
        contrast=contrast,
        aug_prob=aug_prob,
    )


def original_spatial_shape(meta: MetaTensor | Mapping[str, Any] | Sequence[int]) -> tuple[int, ...]:
    """Original spatial size recorded by the reader.

    Args:
        meta: a (non-batched) MetaTensor loaded by these chains, its ``meta`` dict, or the size itself.

    Returns:
        The ``spatial_shape`` entry as a tuple of ints (``(H, W)`` for 2D).

    Raises:
        ValueError: no ``spatial_shape`` in the metadata.
    """
    if isinstance(meta, MetaTensor):
        meta = meta.meta
    if isinstance(meta, Mapping):
        if "spatial_shape" not in meta:
            raise ValueError("metadata has no 'spatial_shape' entry; pass the original size explicitly")
        meta = meta["spatial_shape"]
    shape = np.asarray(meta.cpu() if isinstance(meta, torch.Tensor) else meta).reshape(-1)
    return tuple(int(v) for v in shape)


def restore_original_size(
    mask: torch.Tensor,
    meta: MetaTensor | Mapping[str, Any] | Sequence[int],
    *,
    threshold: float | None = 0.5,
) -> torch.Tensor:
    """Resample a per-image prediction back to the input's original size.

    Args:
        mask: (C, *spatial) hard mask or probability map of one image (decollate a batch first).
        meta: the image's MetaTensor / meta dict (``spatial_shape``) or the original size.
        threshold: the bilinearly resampled map is binarised with ``>= threshold`` (a smooth, aligned
            boundary for hard masks); ``None`` returns the resampled probabilities.

    Returns:
        (C, *original_spatial) float32 tensor ({0, 1} unless ``threshold`` is None).
    """
    size = original_spatial_shape(meta)
    if mask.ndim != len(size) + 1:
        raise ValueError(f"mask must be (C, *spatial) with {len(size)} spatial dims, got shape {tuple(mask.shape)}")
    mode = "bilinear" if len(size) == 2 else "trilinear"
    restored = Resize(spatial_size=size, mode=mode)(mask.to(torch.float32))
    restored = torch.as_tensor(restored)
    if threshold is not None:
        restored = (restored >= threshold).to(torch.float32)
    return restored
