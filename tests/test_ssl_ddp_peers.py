"""CPS / FDPL peers under DistributedDataParallel: 2 gloo processes keep identical peer weights after training.

Each rank trains on different data from the same initialisation; only all-reduced gradients keep the two copies
equal. The control run (peer wrapping disabled) shows the peers drift apart without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from monai.networks.nets import UNet
from torch.utils.data import DataLoader

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


def _student() -> torch.nn.Module:
    torch.manual_seed(0)  # the same student on both ranks
    return UNet(2, 3, 1, channels=(4, 8), strides=(2,), num_res_units=0)


def _train(method_name: str, rank: int, wrap_peers: bool) -> dict:
    import qgssl_monai.engines.ssl_trainer as ssl_trainer
    from qgssl_monai.engines import SemiSupervisedTrainer, ssl_optimizer_parameters
    from qgssl_monai.methods import build_method
    from test_ssl_engine import DictData

    student = _student()
    extra = {"crop_size": 32} if method_name == "fdpl" else {}
    method = build_method(method_name, **extra)
    optimizer = torch.optim.SGD(ssl_optimizer_parameters(student, method), lr=0.1)
    initial_peer = [p.detach().clone() for p in method.peer.parameters()]
    original = ssl_trainer.distribute_peers
    if not wrap_peers:
        ssl_trainer.distribute_peers = lambda method, network: None
    try:
        trainer = SemiSupervisedTrainer(
            device="cpu",
            max_epochs=1,
            epoch_length=2,
            train_data_loader=DataLoader(DictData(4, True, size=64, seed=10 + rank), batch_size=2),
            unlabeled_data_loader=DataLoader(DictData(4, False, size=64, seed=20 + rank), batch_size=2),
            network=torch.nn.parallel.DistributedDataParallel(student),
            optimizer=optimizer,
            method=method,
        )
    finally:
        ssl_trainer.distribute_peers = original
    trainer.run()
    return {
        "student": [float(p.detach().double().sum()) for p in student.parameters()],
        "peer": [float(p.detach().double().sum()) for p in method.peer.parameters()],
        "peer_moved": any(not torch.equal(a, p.detach()) for a, p in zip(initial_peer, method.peer.parameters())),
        "peer_keys": sorted(method.state_dict())[:3],
    }


def _worker(rank: int, world_size: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        record = {
            f"{name}_{'wrapped' if wrap else 'control'}": _train(name, rank, wrap)
            for name in ("cps", "fdpl")
            for wrap in (True, False)
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def test_cps_and_fdpl_peers_stay_identical_across_two_gloo_ranks(tmp_path: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)  # spawn, never fork
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for name in ("cps", "fdpl"):
        wrapped = [r[f"{name}_wrapped"] for r in ranks]
        assert wrapped[0]["peer_moved"] and wrapped[1]["peer_moved"]
        assert wrapped[0]["peer"] == wrapped[1]["peer"], name  # gradients all-reduced: identical peers
        assert wrapped[0]["student"] == wrapped[1]["student"], name
        assert not any(key.startswith("peer.module.") for key in wrapped[0]["peer_keys"])  # checkpoints unchanged
        control = [r[f"{name}_control"] for r in ranks]
        assert control[0]["peer"] != control[1]["peer"], name  # without the wrapping the ranks drift apart
