"""Datasets that keep the deterministic part of a transform chain in memory, optionally backed by a disk cache.

Decoding and resizing a 1,000-image colonoscopy set costs ~14 s per run on one core (Kvasir-SEG JPEGs,
~600x500 px, to 64 px); an experiment with a hundred runs pays that a hundred times. With ``cache_dir``
the deterministic prefix of the chain (everything before the first random transform, exactly what
``CacheDataset`` would cache) is computed once through MONAI's ``PersistentDataset`` and later runs only
read the small cached tensors back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from monai.data import CacheDataset, PersistentDataset
from monai.transforms import Compose, Randomizable, Transform
from monai.utils import convert_to_tensor

__all__ = ["build_cached_dataset"]


def _split_deterministic(transform: Callable | Sequence[Callable]) -> tuple[Compose, Compose]:
    """``(deterministic prefix, remainder)`` with MONAI's own rule for where caching must stop."""
    chain = transform if isinstance(transform, Compose) else Compose(transform)
    first_random = chain.get_index_of_first(lambda t: isinstance(t, Randomizable) or not isinstance(t, Transform))
    if first_random is None:
        first_random = len(chain.transforms)
    return Compose(chain.transforms[:first_random]), Compose(chain.transforms[first_random:])


def build_cached_dataset(
    data: Sequence[dict],
    transform: Callable | Sequence[Callable],
    cache_rate: float = 1.0,
    cache_dir: str | os.PathLike | None = None,
    num_workers: int | None = 0,
    progress: bool = False,
) -> CacheDataset:
    """A ``CacheDataset`` over ``data``; with ``cache_dir``, its cache is filled from a ``PersistentDataset``.

    Args:
        data: datalist (``[{"image": path, "label": path}, ...]``).
        transform: the full chain (a ``Compose`` or a sequence); its random tail runs on every access,
            on the same transform objects, so RNG-state checkpoints of ``transform`` keep working.
        cache_rate: as in ``CacheDataset`` (memory cache); with ``cache_dir`` every item is cached.
        cache_dir: folder of the disk cache, ``None`` for memory only. Its name must change whenever
            the deterministic preprocessing does (image size, channels, code version): entries are keyed
            by the data item only, as in ``PersistentDataset``. Concurrent runs may share it (MONAI
            writes each entry to a temporary file and moves it in place).
        num_workers, progress: as in ``CacheDataset`` (memory-only path).

    Returns:
        A ``CacheDataset`` whose items are ``transform(data[i])``.
    """
    if cache_dir is None:
        return CacheDataset(data, transform, cache_rate=cache_rate, num_workers=num_workers, progress=progress)
    deterministic, remainder = _split_deterministic(transform)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    persistent = PersistentDataset(data, deterministic, cache_dir=cache_dir)
    # freshly computed entries keep the chain's tensor types, entries read back from disk are plain tensors:
    # make them all plain so a batch never mixes MetaTensor and Tensor (collate fails on the mix)
    cached_items = [convert_to_tensor(persistent[i], track_meta=False) for i in range(len(persistent))]
    # the items are already preprocessed: CacheDataset only holds them and applies the random tail
    dataset = CacheDataset(cached_items, remainder, cache_rate=1.0, num_workers=0, progress=False)
    # from here on CacheDataset applies the full chain from its first random transform: the same tail
    dataset.transform = transform if isinstance(transform, Compose) else Compose(transform)
    return dataset
