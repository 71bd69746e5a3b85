"""CPU seconds per training step of each SSL method (process CPU time, one thread), to size a study's schedule.

Every method trains ``--steps`` steps of batch ``--batch`` labeled + ``--batch`` unlabeled random images of
``--image-size`` px through ``SemiSupervisedTrainer`` (EMA handler attached; an untrained ResNet-18 g for the
quality-guided methods, which costs the same as a trained one). The first step's warm-up is included, so the
numbers are slightly pessimistic. Process CPU time is reported because on a shared machine wall time depends on
everybody else's load; with two one-thread runs side by side on two idle cores, wall time ~ CPU time.
Data loading, validation and test evaluation are not included (measure those from a real run).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_method_step_cost.py --network attention_unet
    OMP_NUM_THREADS=1 python benchmarks/bench_method_step_cost.py --network swinunetr --methods sup mt pl-qw qar
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from qgssl_monai.engines.ssl_trainer import SemiSupervisedTrainer, ssl_optimizer_parameters
from qgssl_monai.handlers.ema import EMATeacherHandler
from qgssl_monai.methods import build_method
from qgssl_monai.networks.quality import QualityPredictor
from qgssl_monai.networks.segmentation import build_segmentation_network

STUDY_METHODS = ["sup", "pl-t", "pl-qw", "mt", "mt-qw", "ict", "ict-qw", "cps", "cps-qw", "qar", "qar+qw", "fdpl", "fdpl-qw"]


def step_cost(method_name: str, network: str, size: int, batch: int, steps: int) -> tuple[float, float]:
    """``(CPU seconds, wall seconds)`` per step of ``method_name`` on ``network``."""
    generator = torch.Generator().manual_seed(0)
    labeled = [
        {"image": torch.rand(batch, 3, size, size, generator=generator),
         "label": (torch.rand(batch, 1, size, size, generator=generator) > 0.7).float()}
        for _ in range(steps)
    ]  # fmt: skip
    unlabeled = [torch.rand(batch, 3, size, size, generator=generator) for _ in range(steps)]
    torch.manual_seed(0)
    student = build_segmentation_network(network, size="small")
    uses_g = method_name.endswith("-qw") or method_name.startswith("qar")
    quality = QualityPredictor(in_channels=4, backbone="resnet18").eval().requires_grad_(False)
    method = build_method(method_name, **({"quality_net": quality} if uses_g else {}))
    optimizer = torch.optim.Adam(ssl_optimizer_parameters(student, method), lr=1e-3)
    trainer = SemiSupervisedTrainer(
        device="cpu", max_epochs=1, epoch_length=steps, train_data_loader=labeled,
        unlabeled_data_loader=unlabeled if method.uses_unlabeled else None, network=student, optimizer=optimizer,
        method=method, train_handlers=[EMATeacherHandler()],
    )  # fmt: skip
    cpu, wall = time.process_time(), time.time()
    trainer.run()
    return (time.process_time() - cpu) / steps, (time.time() - wall) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", default="attention_unet", help="attention_unet | swinunetr | unetpp | unet")
    parser.add_argument("--methods", nargs="+", default=STUDY_METHODS, help="registry names (default: the converged study's)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    costs = {}
    for name in args.methods:
        cpu, wall = step_cost(name, args.network, args.image_size, args.batch, args.steps)
        costs[name] = round(cpu, 3)
        print(f"{name:8s} {cpu:.3f} CPU s/step ({wall:.2f} wall s/step)", flush=True)
    print(json.dumps({args.network: costs, "sum": round(sum(costs.values()), 3)}))


if __name__ == "__main__":
    main()
