"""Save a network's weights at a fixed set of epochs (the Type 2 weak segmentation snapshots)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from torch import nn

from qgssl_monai.transforms.weak import weak_snapshot_filename

__all__ = ["WeakSnapshotSaver"]


class WeakSnapshotSaver:
    """Write ``save_dir/weak_epoch_<NNN>.pt`` (plain state_dict) after each epoch listed in ``epochs``.

    Unlike MONAI's ``CheckpointSaver`` (interval based, keeps the last n), this saves exactly the
    listed epochs, which is what the Type 2 masks need (networks of increasing but poor quality).
    Files are written to a temporary name and moved with ``os.replace``, so a killed run never leaves a
    truncated snapshot. DDP/DataParallel wrappers are unwrapped. Attach on rank 0 only.

    Args:
        save_dir: output folder (created).
        epochs: 1-based epochs after which to save (default 1, 3, 5, 10, 15, 20).
        network: the segmentation network being trained.
    """

    def __init__(self, save_dir: str | os.PathLike, epochs: Sequence[int] = (1, 3, 5, 10, 15, 20), network: nn.Module | None = None) -> None:
        if network is None:
            raise ValueError("WeakSnapshotSaver needs the network to save")
        if not epochs or any(int(e) < 1 for e in epochs):
            raise ValueError(f"epochs must be a non-empty list of 1-based epoch numbers, got {epochs}")
        self.save_dir = Path(save_dir)
        self.epochs = sorted({int(e) for e in epochs})
        self.network = network
        self.saved: list[Path] = []
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=self._wanted), self)

    def _wanted(self, engine: Engine, epoch: int) -> bool:
        return epoch in self.epochs

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        network = self.network.module if isinstance(self.network, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else self.network
        self.save_dir.mkdir(parents=True, exist_ok=True)
        path = self.save_dir / weak_snapshot_filename(epoch)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, tmp)
        os.replace(tmp, path)
        self.saved.append(path)
        self.logger.info("saved weak snapshot %s", path)
