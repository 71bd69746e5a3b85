"""Type 1 variable-quality masks: MONAI transforms that degrade a ground-truth mask and attach its Dice.

Public interface::

    from qgssl_monai.transforms.corruptions import RandMaskCorruptiond, RandMaskCorruption

    RandMaskCorruptiond(
        keys: KeysCollection = "label",          # exactly one key: the ground-truth mask (1, H, W) in {0, 1}
        mask_key: str = "mask",                  # output: degraded mask, float32 (1, H, W) in {0, 1}
        quality_key: str = "quality",            # output: DSC(label, mask), 0-d float32 torch.Tensor in [0, 1]
        corruption_key: str | None = "corruption",  # output: short str "category:op1+op2" (None: not written)
        category_probs: Mapping[str, float] | None = None,  # over CATEGORIES; None -> DEFAULT_CATEGORY_PROBS
        ops: Sequence[str] | Mapping[str, float] | None = None,  # ops (or name -> weight) for single/chain/heavy;
                                                  # None -> corruption_ops.DEFAULT_OP_WEIGHTS
        mask_pool: Sequence[np.ndarray | torch.Tensor | str | os.PathLike] | None = None,  # for "swap"
        swap_pool_key: str | None = None,        # or: data[swap_pool_key] = sequence of masks for this sample
        swap_candidates: int = 8,                # random subset size; the closest-area candidate is used
        heavy_share: Mapping[str, float] | None = None,           # P(heavy strength) for single/chain/heavy
        chain_length: Mapping[str, Sequence[int]] | None = None,  # (min, max) ops for chain/heavy
        allow_missing_keys: bool = False,
    )
    RandMaskCorruption(category_probs=None, ops=None, mask_pool=None, swap_candidates=8, external_swap_pool=False,
                       heavy_share=None, chain_length=None)
        __call__(label, randomize=True, swap_pool=None) -> MaskCorruptionResult(mask, quality, corruption)
        prepare_pool((H, W))  # optional: load/resize mask_pool once before forking DataLoader workers

* ``CATEGORIES = ("identity", "single", "chain", "swap", "heavy", "catastrophic", "blob")``.
* The mask has the same type family as the label (numpy in -> numpy out; tensor/MetaTensor in ->
  MetaTensor/tensor out, meta copied). ``quality`` collates to a ``(B,)`` float32 tensor.
* ``quality`` is the exact Dice of the returned mask against the label (both empty -> 1.0).
* All randomness comes from ``self.R``; ``set_random_state`` on the dictionary transform propagates
  to its inner array transform, so MONAI ``DataLoader`` worker seeding and ``set_determinism`` give
  reproducible corruptions.
* The pure numpy operations live in :mod:`qgssl_monai.transforms.corruption_ops` (registry
  ``MASK_CORRUPTION_OPS``).
"""

from __future__ import annotations

import bisect
import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Union

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends, convert_to_dst_type
from PIL import Image

from qgssl_monai.transforms.corruption_ops import (
    BLOB_OPS,
    CATASTROPHIC_OPS,
    DEFAULT_OP_WEIGHTS,
    MASK_CORRUPTION_OPS,
    dice_score,
)

__all__ = [
    "CATEGORIES",
    "DEFAULT_CATEGORY_PROBS",
    "DEFAULT_HEAVY_SHARE",
    "DEFAULT_CHAIN_LENGTH",
    "MaskCorruptionResult",
    "RandMaskCorruption",
    "RandMaskCorruptiond",
    "RandMaskCorruptionD",
    "RandMaskCorruptionDict",
    "load_pool_mask",
]

CATEGORIES: tuple[str, ...] = ("identity", "single", "chain", "swap", "heavy", "catastrophic", "blob")

#: default mix, tuned so that on Kvasir-SEG + CVC-ClinicDB masks at 224 px every 0.2-wide Dice bin
#: holds at least 10% of the generated masks (see ``benchmarks/bench_mask_generation.py``)
DEFAULT_CATEGORY_PROBS: dict[str, float] = {
    "identity": 0.03,
    "single": 0.22,
    "chain": 0.24,
    "swap": 0.07,
    "heavy": 0.26,
    "catastrophic": 0.05,
    "blob": 0.13,
}

#: default probability that an op of a category is drawn at "heavy" rather than "mild" strength
DEFAULT_HEAVY_SHARE: dict[str, float] = {"single": 0.5, "chain": 0.3, "heavy": 1.0}
#: default inclusive range of the number of distinct ops drawn by "chain" and "heavy"
DEFAULT_CHAIN_LENGTH: dict[str, tuple[int, int]] = {"chain": (2, 3), "heavy": (2, 3)}

_OP_SEED_LIMIT = int(np.iinfo(np.int32).max)  # np.iinfo per call costs more than the draw itself
_NO_SWAP = np.zeros(0, dtype=np.intp)
_NO_SWAP.flags.writeable = False  # shared by every transform

PoolItem = Union[np.ndarray, torch.Tensor, str, os.PathLike]


class MaskCorruptionResult(NamedTuple):
    """Output of :class:`RandMaskCorruption`: degraded mask (type of the input, float32 ``(1, H, W)`` in
    ``{0, 1}``), its exact Dice against the input (0-d float32 tensor) and ``"category:op1+op2"``."""

    mask: NdarrayOrTensor
    quality: torch.Tensor
    corruption: str


def load_pool_mask(item: PoolItem) -> np.ndarray:
    """Boolean ``(H, W)`` mask from an array/tensor (``(H, W)`` or ``(1, H, W)``; foreground > 0.5, or > 127
    for uint8 0/255) or a file (``.npy`` or any 2D image PIL reads)."""
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"swap mask pool file not found: {path}")
        array = np.load(path) if path.suffix == ".npy" else np.asarray(Image.open(path).convert("L"))
    elif isinstance(item, torch.Tensor):
        array = item.detach().cpu().numpy()
    else:
        array = np.asarray(item)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"swap pool masks must be (H, W) or (1, H, W), got shape {array.shape}.")
    if array.dtype == np.uint8 and array.max(initial=0) > 1:
        return array > 127
    return array > 0.5


def _resize_bool(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a boolean mask with bilinear interpolation + 0.5 threshold (smooth edges, no stair steps)."""
    if mask.shape == shape:
        return mask.copy()
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize((shape[1], shape[0]), Image.BILINEAR)) > 127


def _normalise_probs(category_probs: Mapping[str, float] | None) -> dict[str, float]:
    probs = dict(DEFAULT_CATEGORY_PROBS if category_probs is None else category_probs)
    unknown = set(probs) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown corruption categories {sorted(unknown)}; choose from {CATEGORIES}.")
    if any(p < 0 for p in probs.values()) or sum(probs.values()) <= 0:
        raise ValueError(f"category_probs must be non-negative with a positive sum, got {probs}.")
    return {c: float(probs.get(c, 0.0)) for c in CATEGORIES}


class RandMaskCorruption(RandomizableTransform):
    """Degrade a ground-truth binary mask into a mask of random quality and measure that quality.

    A category is drawn from ``category_probs`` (see :data:`CATEGORIES`):

    * ``identity``: unchanged (Dice 1);
    * ``single``: one op from ``ops`` (heavy strength with probability ``heavy_share["single"]``, else mild);
    * ``chain``: ``chain_length["chain"]`` (2-3) distinct ops, each heavy with probability ``heavy_share["chain"]``;
    * ``swap``: another training mask of similar area (closest area among ``swap_candidates`` random pool
      masks, resized to the label's size; masks identical to the label are skipped);
    * ``heavy``: ``chain_length["heavy"]`` (2-3) distinct ops at heavy strength;
    * ``catastrophic``: inverted, empty, full or random-noise mask;
    * ``blob``: Gaussian (ellipse) or disk blob of equal area at the centroid or a random place, convex hull,
      or bounding box.

    Ops and their parameter samplers live in :data:`~qgssl_monai.transforms.corruption_ops.MASK_CORRUPTION_OPS`.
    :meth:`randomize` draws the category, the ops, their parameters, the swap candidates and a seed for the ops'
    internal randomness, all from ``self.R``; so ``randomize=False`` replays the last corruption exactly.

    Args:
        category_probs: category -> probability (normalised; missing categories get 0).
            ``None``: :data:`DEFAULT_CATEGORY_PROBS`. Without any swap pool (no ``mask_pool`` and
            ``external_swap_pool=False``) the ``swap`` share is dropped, with a warning.
        ops: op names (uniform) or name -> weight for ``single``/``chain``/``heavy``.
            ``None``: :data:`~qgssl_monai.transforms.corruption_ops.DEFAULT_OP_WEIGHTS`.
        mask_pool: training masks for ``swap``: arrays/tensors ``(H, W)``/``(1, H, W)`` or file paths.
            Resized copies are cached per image size (call :meth:`prepare_pool` before forking DataLoader
            workers to share the cache).
        swap_candidates: size of the random subset among which the closest-area mask is swapped in.
        external_swap_pool: a pool will be passed to ``__call__`` (keeps ``swap`` without ``mask_pool``).
        heavy_share: per category (``single``, ``chain``, ``heavy``), the probability that an op is drawn at heavy
            strength; given entries override :data:`DEFAULT_HEAVY_SHARE`.
        chain_length: inclusive ``(min, max)`` number of ops for ``chain`` and ``heavy``; given entries override
            :data:`DEFAULT_CHAIN_LENGTH`.

    Input ``label``: ``(1, H, W)`` numpy array or tensor/MetaTensor, foreground where > 0.5.
    Output: :class:`MaskCorruptionResult`.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        category_probs: Mapping[str, float] | None = None,
        ops: Sequence[str] | Mapping[str, float] | None = None,
        mask_pool: Sequence[PoolItem] | None = None,
        swap_candidates: int = 8,
        external_swap_pool: bool = False,
        heavy_share: Mapping[str, float] | None = None,
        chain_length: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        self.heavy_share = {**DEFAULT_HEAVY_SHARE, **(heavy_share or {})}
        lengths = {**DEFAULT_CHAIN_LENGTH, **(chain_length or {})}
        self.chain_length = {k: (int(v[0]), int(v[1])) for k, v in lengths.items()}
        if set(self.heavy_share) != set(DEFAULT_HEAVY_SHARE) or not all(0 <= p <= 1 for p in self.heavy_share.values()):
            raise ValueError(f"heavy_share takes probabilities for {sorted(DEFAULT_HEAVY_SHARE)}, got {heavy_share}.")
        if set(self.chain_length) != set(DEFAULT_CHAIN_LENGTH) or not all(
            1 <= low <= high for low, high in self.chain_length.values()
        ):
            raise ValueError(f"chain_length takes (min, max) with 1 <= min <= max for chain/heavy, got {chain_length}.")
        probs = _normalise_probs(category_probs)
        self.mask_pool = list(mask_pool) if mask_pool is not None else []
        if probs["swap"] > 0 and not self.mask_pool and not external_swap_pool:
            warnings.warn(
                "RandMaskCorruption: no mask_pool given, the 'swap' category is disabled "
                f"(its probability {probs['swap']:.3f} is spread over the other categories).",
                stacklevel=2,
            )
            probs["swap"] = 0.0
        total = sum(probs.values())
        self.category_probs = {c: p / total for c, p in probs.items()}
        # plain floats: bisect on a list is ~10x cheaper per draw than np.searchsorted on an array
        self._cum_category = [float(v) for v in np.cumsum([self.category_probs[c] for c in CATEGORIES])]

        weights = dict(DEFAULT_OP_WEIGHTS) if ops is None else (
            dict(ops) if isinstance(ops, Mapping) else dict.fromkeys(ops, 1.0)
        )
        unknown = [name for name in weights if name not in MASK_CORRUPTION_OPS]
        if unknown:
            raise ValueError(f"unknown mask corruption ops {unknown}; registered: {sorted(MASK_CORRUPTION_OPS)}.")
        longest = max(high for _, high in self.chain_length.values())
        if sum(w > 0 for w in weights.values()) < longest or any(w < 0 for w in weights.values()):
            raise ValueError(
                f"ops needs at least {longest} ops of positive weight (chains draw distinct ops), got {weights}."
            )
        self.op_names = list(weights)
        self._op_weights = np.array([weights[n] for n in self.op_names], dtype=np.float64)
        self._op_weights /= self._op_weights.sum()
        with np.errstate(divide="ignore"):  # weight 0 -> never drawn
            self._log_op_weights = np.log(self._op_weights)
        if swap_candidates < 1:
            raise ValueError(f"swap_candidates must be >= 1, got {swap_candidates}.")
        self.swap_candidates = int(swap_candidates)

        self._pool_cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._op_rng = np.random.RandomState()
        self._category = "identity"
        self._plan: list[tuple[str, dict[str, Any]]] = []
        self._swap_indices = _NO_SWAP
        self._op_seed = 0

    # -- randomisation -------------------------------------------------------------------------
    def _draw_ops(self, count: int, heavy_share: float) -> list[tuple[str, dict[str, Any]]]:
        # weighted sampling without replacement (Gumbel top-k): one uniform per op, much cheaper than R.choice;
        # U(1e-12, 1) written out as numpy computes it (same draws, same values, no argument handling), and the
        # negated keys log(-log U) - log w sorted ascending (the same order as sorting -(log w - log(-log U)))
        uniforms = 1e-12 + (1.0 - 1e-12) * self.R.random_sample(len(self.op_names))
        negated_keys = np.log(-np.log(uniforms)) - self._log_op_weights
        names = [self.op_names[i] for i in negated_keys.argsort(kind="stable")[:count].tolist()]
        heavy = (self.R.random_sample(count) < heavy_share).tolist()
        return [
            (name, MASK_CORRUPTION_OPS[name].sample_params(self.R, "heavy" if is_heavy else "mild"))
            for name, is_heavy in zip(names, heavy)
        ]

    def _draw_one(self, names: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
        name = names[self.R.randint(len(names))]
        return [(name, MASK_CORRUPTION_OPS[name].sample_params(self.R, "mild"))]

    def randomize(self, data: Any = None, pool_size: int = 0) -> None:
        """Draw the category, ops and parameters (``pool_size``: number of masks available for ``swap``)."""
        super().randomize(None)
        index = bisect.bisect_right(self._cum_category, self.R.rand())
        category = CATEGORIES[min(index, len(CATEGORIES) - 1)]
        self._category = category
        self._swap_indices = _NO_SWAP
        if category == "single":
            self._plan = self._draw_ops(1, self.heavy_share["single"])
        elif category in ("chain", "heavy"):
            low, high = self.chain_length[category]
            self._plan = self._draw_ops(int(self.R.randint(low, high + 1)), self.heavy_share[category])
        elif category == "catastrophic":
            self._plan = self._draw_one(CATASTROPHIC_OPS)
        elif category == "blob":
            self._plan = self._draw_one(BLOB_OPS)
        else:
            self._plan = []
            if category == "swap":
                if pool_size < 1:
                    raise ValueError("RandMaskCorruption drew 'swap' but the swap mask pool is empty.")
                self._swap_indices = self.R.choice(pool_size, size=min(self.swap_candidates, pool_size), replace=False)
        self._op_seed = int(self.R.randint(_OP_SEED_LIMIT))

    # -- swap pool -------------------------------------------------------------------------------
    def prepare_pool(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Load and resize ``mask_pool`` to ``shape`` (cached): ``(N, H, W)`` bool masks and their ``(N,)`` areas."""
        shape = (int(shape[0]), int(shape[1]))
        if shape not in self._pool_cache:
            masks = np.stack([_resize_bool(load_pool_mask(item), shape) for item in self.mask_pool])
            self._pool_cache[shape] = (masks, masks.reshape(len(masks), -1).sum(axis=1))
        return self._pool_cache[shape]

    def _swap(self, label: np.ndarray, swap_pool: Sequence[PoolItem] | None) -> np.ndarray:
        area = np.count_nonzero(label)
        if swap_pool is not None:
            candidates = [_resize_bool(load_pool_mask(swap_pool[i]), label.shape) for i in self._swap_indices]
            areas = np.array([np.count_nonzero(c) for c in candidates])
        else:
            masks, all_areas = self.prepare_pool(label.shape)
            candidates, areas = [masks[i] for i in self._swap_indices], all_areas[self._swap_indices]
        order = np.argsort(np.abs(areas - area), kind="stable")
        for k in order:
            if not np.array_equal(candidates[k], label):
                return candidates[k].copy()
        return candidates[order[0]].copy()

    # -- application -----------------------------------------------------------------------------
    def __call__(
        self, label: NdarrayOrTensor, randomize: bool = True, swap_pool: Sequence[PoolItem] | None = None
    ) -> MaskCorruptionResult:
        """Corrupt ``label`` ``(1, H, W)``; ``swap_pool`` overrides ``mask_pool`` for this call."""
        if label.ndim != 3 or label.shape[0] != 1:
            raise ValueError(f"RandMaskCorruption expects a (1, H, W) label, got shape {tuple(label.shape)}.")
        pool_size = len(swap_pool) if swap_pool is not None else len(self.mask_pool)
        if randomize:
            self.randomize(None, pool_size=pool_size)
        reference = (label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label))[0] > 0.5
        if self._category == "swap":
            out = self._swap(reference, swap_pool)
        else:
            self._op_rng.seed(self._op_seed)
            out = reference
            for name, params in self._plan:
                out = MASK_CORRUPTION_OPS[name].fn(out, self._op_rng, **params)
        # an empty plan returns the label itself: Dice 1 without counting pixels
        dice = 1.0 if out is reference else dice_score(reference, out)
        quality = torch.from_numpy(np.array(dice, dtype=np.float32))
        as_float = out[None].astype(np.float32)  # always a fresh array (never aliases the label)
        if isinstance(label, np.ndarray):
            return MaskCorruptionResult(as_float, quality, self.describe())
        mask, *_ = convert_to_dst_type(as_float, dst=label, dtype=torch.float32)
        return MaskCorruptionResult(mask, quality, self.describe())

    def describe(self) -> str:
        """The last drawn corruption as ``"category:op1+op2"`` (``"identity"``/``"swap"`` alone)."""
        if not self._plan:
            return self._category
        return f"{self._category}:" + "+".join(name for name, _ in self._plan)


class RandMaskCorruptiond(RandomizableTransform, MapTransform):
    """Dictionary wrapper of :class:`RandMaskCorruption`: reads the ground-truth mask at ``keys`` and writes the
    degraded mask to ``mask_key``, its exact Dice to ``quality_key`` (0-d float32 tensor, collates to ``(B,)``)
    and the corruption name to ``corruption_key``.

    Args:
        keys: exactly one key, the ``(1, H, W)`` ground-truth mask in ``{0, 1}``.
        mask_key, quality_key: output keys. corruption_key: output key of the description string (``None``: skip).
        category_probs, ops, mask_pool, swap_candidates, heavy_share, chain_length: see :class:`RandMaskCorruption`.
        swap_pool_key: if set, ``data[swap_pool_key]`` (a sequence of masks or file paths) is this sample's swap
            pool instead of ``mask_pool``.
        allow_missing_keys: don't raise if the label key is missing (nothing is written then).
    """

    backend = RandMaskCorruption.backend

    def __init__(
        self,
        keys: KeysCollection = "label",
        mask_key: str = "mask",
        quality_key: str = "quality",
        corruption_key: str | None = "corruption",
        category_probs: Mapping[str, float] | None = None,
        ops: Sequence[str] | Mapping[str, float] | None = None,
        mask_pool: Sequence[PoolItem] | None = None,
        swap_pool_key: str | None = None,
        swap_candidates: int = 8,
        heavy_share: Mapping[str, float] | None = None,
        chain_length: Mapping[str, Sequence[int]] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        if len(self.keys) != 1:
            raise ValueError(f"RandMaskCorruptiond takes exactly one label key, got {self.keys}.")
        self.mask_key, self.quality_key, self.corruption_key = mask_key, quality_key, corruption_key
        self.swap_pool_key = swap_pool_key
        self.corrupter = RandMaskCorruption(
            category_probs=category_probs,
            ops=ops,
            mask_pool=mask_pool,
            swap_candidates=swap_candidates,
            external_swap_pool=swap_pool_key is not None,
            heavy_share=heavy_share,
            chain_length=chain_length,
        )

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandMaskCorruptiond:
        super().set_random_state(seed, state)
        self.corrupter.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        """Randomness is drawn by the inner :class:`RandMaskCorruption` (seeded together with this transform)."""
        super().randomize(None)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            swap_pool = None
            if self.swap_pool_key is not None:
                if self.swap_pool_key not in d:
                    raise KeyError(f"RandMaskCorruptiond: swap_pool_key {self.swap_pool_key!r} missing from the data.")
                swap_pool = d[self.swap_pool_key]
            result = self.corrupter(d[key], randomize=True, swap_pool=swap_pool)
            d[self.mask_key] = result.mask
            d[self.quality_key] = result.quality
            if self.corruption_key is not None:
                d[self.corruption_key] = result.corruption
        return d


RandMaskCorruptionD = RandMaskCorruptionDict = RandMaskCorruptiond
