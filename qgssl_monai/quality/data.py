"""Data for training and evaluating g: K degraded masks per labeled image, with their true Dice.

A sample is ``{"image": (C, H, W) in [0, 1], "mask": (1, H, W) in {0, 1}, "quality": Dice(mask, label)}``.
The mask comes from the Type 1 corruption transform or, with probability ``p_type2``, from a Type 2
bank (in-sample weak snapshots or the out-of-fold pool). Training draws fresh degradations every epoch (the random transforms run on the fly
over a :class:`monai.data.CacheDataset` of the loaded images, repeated K times); validation and test
sets are drawn once with a fixed seed (:func:`fixed_quality_samples`) so their losses are comparable
across epochs and runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.data import CacheDataset
from monai.engines.utils import PrepareBatch
from monai.transforms import Compose, RandFlipd, Randomizable
from monai.utils import convert_to_tensor
from tqdm.auto import tqdm

from qgssl_monai.transforms.corruptions import RandMaskCorruptiond
from qgssl_monai.transforms.weak import RandWeakPredictiond, WeakPredictionBank

__all__ = [
    "QualityPrepareBatch",
    "degradation_transform",
    "fixed_quality_samples",
    "QualityTrainingDataset",
    "chain",
    "with_image_ids",
]

ID_KEY = "image_path"


def with_image_ids(datalist: Sequence[Mapping[str, Any]], image_key: str = "image", id_key: str = ID_KEY) -> list[dict]:
    """Copy each item and record its image path under ``id_key`` (the key of the weak-prediction cache)."""
    return [{**item, id_key: str(item[image_key])} for item in datalist]


def degradation_transform(
    *,
    weak_bank: WeakPredictionBank | None = None,
    p_type2: float = 0.05,
    flip: bool = False,
    category_probs: Mapping[str, float] | None = None,
    mask_pool: Sequence[Any] | None = None,
    image_key: str = "image",
    label_key: str = "label",
    mask_key: str = "mask",
    quality_key: str = "quality",
) -> Compose:
    """The random part of a g sample: Type 1 corruption, then Type 2 with probability ``p_type2``.

    Args:
        weak_bank: cached Type 2 predictions (in-sample weak snapshots or the out-of-fold pool); required
            when ``p_type2 > 0``.
        p_type2: probability that the mask is a Type 2 prediction instead of a corruption.
        flip: add a joint random horizontal flip of image, label and mask (Dice is flip invariant).
        category_probs, mask_pool: passed to :class:`RandMaskCorruptiond`.

    Raises:
        ValueError: ``p_type2 > 0`` without a bank.
    """
    if p_type2 > 0 and weak_bank is None:
        raise ValueError(
            "p_type2 > 0 needs Type 2 predictions: run configs/train_weak.json (type2 in_sample) or "
            "configs/train_oof.json (type2 out_of_fold) first, or set p_type2 to 0"
        )
    transforms: list[Any] = [
        RandMaskCorruptiond(
            keys=label_key, mask_key=mask_key, quality_key=quality_key, category_probs=category_probs, mask_pool=mask_pool
        )
    ]
    if p_type2 > 0:
        transforms.append(RandWeakPredictiond(keys=label_key, bank=weak_bank, prob=p_type2, mask_key=mask_key, quality_key=quality_key))
    if flip:
        transforms.append(RandFlipd(keys=[image_key, label_key, mask_key], prob=0.5, spatial_axis=1))
    return Compose(transforms)


def chain(*transforms: Callable) -> Compose:
    """One flat :class:`Compose` of the given transforms/Composes.

    :class:`CacheDataset` caches up to the first *randomizable* top-level transform, and a nested Compose
    counts as randomizable, so chains must be flattened for the deterministic loading part to be cached.
    """
    flat: list[Callable] = []
    for t in transforms:
        flat.extend(t.flatten().transforms if isinstance(t, Compose) else [t])
    return Compose(flat)


class QualityTrainingDataset(CacheDataset):
    """Training set of g: every labeled item appears ``samples_per_image`` (K) times per epoch.

    The deterministic prefix of ``transform`` (loading, resizing) is cached once per item; the random
    degradation runs on every access, so each of the K repeats (and each epoch) sees a different mask.
    Items get their image path under ``"image_path"`` (the key of the weak-prediction cache).

    Args:
        data: labeled datalist ``[{"image": path, "label": path}, ...]``.
        transform: load chain followed by the degradation (see :func:`chain`, :func:`degradation_transform`).
        samples_per_image: K (50 in the paper).
        kwargs: passed to :class:`monai.data.CacheDataset` (``cache_rate``, ``num_workers``, ``progress``...).
    """

    def __init__(
        self, data: Sequence[Mapping[str, Any]], transform: Callable, samples_per_image: int = 50, **kwargs: Any
    ) -> None:
        if samples_per_image < 1:
            raise ValueError(f"samples_per_image must be >= 1, got {samples_per_image}")
        self.samples_per_image = int(samples_per_image)
        transform = chain(transform) if isinstance(transform, Compose) else Compose([transform])
        super().__init__(data=with_image_ids(data), transform=transform, **kwargs)

    def __len__(self) -> int:
        return len(self.data) * self.samples_per_image

    def _transform(self, index: int) -> Any:
        return super()._transform(index % len(self.data))


def fixed_quality_samples(
    datalist: Sequence[Mapping[str, Any]],
    load_transform: Callable,
    degrade_transform: Callable,
    samples_per_image: int = 10,
    seed: int = 0,
    keep_keys: Sequence[str] = ("image", "mask", "quality", "corruption", ID_KEY),
    progress: bool = True,
) -> list[dict]:
    """A fixed, reproducible set of K degraded masks per image (validation / held-out evaluation).

    Each image is loaded once and its K samples share that image tensor (memory: one image + K masks).

    Args:
        seed: seeds every random transform in ``degrade_transform`` (same seed -> same samples).
        keep_keys: keys kept in each sample (the label is dropped: its Dice is already in ``quality``).
    """
    if isinstance(degrade_transform, Randomizable):
        degrade_transform.set_random_state(seed=seed)
    samples: list[dict] = []
    for item in tqdm(with_image_ids(datalist), desc="fixed quality samples", disable=not progress):
        loaded = load_transform(dict(item))
        for _ in range(samples_per_image):
            sample = degrade_transform(dict(loaded))
            samples.append({k: sample[k] for k in keep_keys if k in sample})
    return samples


class QualityPrepareBatch(PrepareBatch):
    """Engine batch -> ``(cat([image, mask], dim=1), quality (B, 1))`` for g's trainer and evaluators."""

    def __init__(self, image_key: str = "image", mask_key: str = "mask", quality_key: str = "quality") -> None:
        self.image_key = image_key
        self.mask_key = mask_key
        self.quality_key = quality_key

    def __call__(
        self, batchdata: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image = convert_to_tensor(batchdata[self.image_key], track_meta=False).float()
        mask = convert_to_tensor(batchdata[self.mask_key], track_meta=False).float()
        inputs = torch.cat([image, mask], dim=1).to(device=device, non_blocking=non_blocking)
        quality = convert_to_tensor(batchdata[self.quality_key], track_meta=False).float().reshape(-1, 1)
        return inputs, quality.to(device=device, non_blocking=non_blocking)
