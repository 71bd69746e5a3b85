"""Training throughput of the SSL engine vs a hand-written PyTorch loop doing the same math.

For QAR and PL-QW (EMA-teacher pseudo-labels weighted by g), in float32 and CPU bfloat16 autocast, the
script times ``SemiSupervisedTrainer`` (with the method strategy, the EMA handler and MONAI's default output
decollation, as the bundle runs it) and a plain loop on the *same* in-memory batches, networks and
optimizer settings. Repeats are interleaved (engine, plain, engine, plain, ...) so drifting machine load
hits both alike; the first repeat of each is a warm-up and is excluded. Throughput counts labeled +
unlabeled images per second; the engine must keep >= 95 % of the plain loop's median throughput.
Both wall-clock and process-CPU-time throughputs are reported: on a shared machine the CPU-time ratio is
the one to trust (other processes' load inflates wall time unevenly).

With ``--fast`` both sides take the speed path this machine selects (``qgssl_monai.engines.speed``, as
``configs/speed.json``): bf16 autocast only with AMX, channels_last if it measures faster, ``torch.compile``,
one batched labeled+unlabeled student forward (the small UNet has no BatchNorm); the first (warm-up) repeat
then includes compilation.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_engine_overhead.py [--image-size 96] [--iterations 20] [--repeats 5] [--fast]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from qgssl_monai.engines import speed
from qgssl_monai.engines.ssl_trainer import SemiSupervisedTrainer, ssl_optimizer_parameters
from qgssl_monai.handlers.ema import EMATeacherHandler
from qgssl_monai.losses import PerSampleDiceBCELoss
from qgssl_monai.methods import build_method
from qgssl_monai.networks.quality import QualityPredictor
from qgssl_monai.networks.segmentation import build_segmentation_network

LAMBDA = {"qar": 0.01, "pl-qw": 0.25}
EMA_DECAY = 0.99


def make_batches(iterations: int, batch: int, size: int, seed: int = 0) -> tuple[list[dict], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    labeled = [
        {
            "image": torch.rand(batch, 3, size, size, generator=generator),
            "label": (torch.rand(batch, 1, size, size, generator=generator) > 0.7).float(),
        }
        for _ in range(iterations)
    ]
    unlabeled = [torch.rand(batch, 3, size, size, generator=generator) for _ in range(iterations)]
    return labeled, unlabeled


def build_models(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    student = build_segmentation_network("unet", size="small")
    quality = QualityPredictor(in_channels=4, backbone="resnet18").eval().requires_grad_(False)
    return student, quality


def speed_path(student: torch.nn.Module, labeled: list, amp: str | None) -> tuple[bool, bool]:
    """``(channels_last, compile)`` as the speed overlay chooses them; converts ``student`` in place."""
    compile_enabled = speed.select_compile("auto", "cpu", network=student)
    channels_last = speed.select_channels_last(student, tuple(labeled[0]["image"].shape), "cpu", amp)
    speed.to_channels_last(student, enabled=channels_last)
    return channels_last, compile_enabled


def build_engine(
    method_name: str,
    labeled: list,
    unlabeled: list,
    amp: str | None,
    fast: bool = False,
    models: tuple[torch.nn.Module, torch.nn.Module] | None = None,
) -> SemiSupervisedTrainer:
    """The engine as the bundle runs it (EMA handler, default decollation), optionally on the speed path.

    ``models``: ``(student, quality)``; default :func:`build_models`.
    """
    student, quality = build_models() if models is None else models
    channels_last, compile_enabled = speed_path(student, labeled, amp) if fast else (False, False)
    method = build_method(method_name, quality_net=quality)
    optimizer = torch.optim.Adam(ssl_optimizer_parameters(student, method), lr=1e-3)
    handlers = [EMATeacherHandler(decay=EMA_DECAY)] if method_name == "pl-qw" else []
    return SemiSupervisedTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=len(labeled),
        train_data_loader=labeled,
        unlabeled_data_loader=unlabeled,
        network=student,
        optimizer=optimizer,
        method=method,
        unsup_weight=LAMBDA[method_name],
        autocast_dtype=amp,
        train_handlers=handlers,
        compile=compile_enabled,
        to_kwargs={"memory_format": torch.channels_last} if channels_last else {},
        batched_forward="auto" if fast else False,
    )


def engine_runner(
    method_name: str, labeled: list, unlabeled: list, amp: str | None, fast: bool = False
) -> Callable[[], None]:
    return build_engine(method_name, labeled, unlabeled, amp, fast).run


def plain_runner(
    method_name: str, labeled: list, unlabeled: list, amp: str | None, fast: bool = False
) -> Callable[[], None]:
    student, quality = build_models()
    channels_last, compile_enabled = speed_path(student, labeled, amp) if fast else (False, False)
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    forward = torch.compile(student) if compile_enabled else student
    layout = {"memory_format": torch.channels_last} if channels_last else {}
    batched = fast  # the small UNet has no BatchNorm: one forward on [labeled, unlabeled]
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    loss_fn = PerSampleDiceBCELoss()
    weight = LAMBDA[method_name]

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast("cpu", dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()

    def run() -> None:
        student.train()
        for batch, image_u in zip(labeled, unlabeled):
            image_l, label_l, image_u = batch["image"].to(**layout), batch["label"].to(**layout), image_u.to(**layout)
            optimizer.zero_grad(set_to_none=False)
            with autocast():
                if batched:
                    logits_l, logits_u = forward(torch.cat([image_l, image_u])).split([len(image_l), len(image_u)])
                else:
                    logits_l, logits_u = forward(image_l), None
                sup = loss_fn(logits_l, label_l).mean()
                if method_name == "qar":
                    probs = torch.sigmoid(forward(image_u) if logits_u is None else logits_u)
                    unsup = 1.0 - quality(torch.cat([image_u, probs.to(image_u.dtype)], 1)).reshape(-1).float().mean()
                else:
                    with torch.no_grad():
                        pseudo = (torch.sigmoid(teacher(image_u)) > 0.5).float()
                        weights = quality(torch.cat([image_u, pseudo.to(image_u.dtype)], 1)).reshape(-1).float()
                    logits_u = forward(image_u) if logits_u is None else logits_u
                    unsup = (loss_fn(logits_u, pseudo) * weights).mean()
                loss = sup + weight * unsup
            loss.backward()
            optimizer.step()
            if method_name == "pl-qw":
                with torch.no_grad():
                    student_params = [p.detach() for p in student.parameters()]
                    torch._foreach_lerp_(list(teacher.parameters()), student_params, 1 - EMA_DECAY)
            float(loss.detach())  # the engine syncs once per iteration for its logged scalars too

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=4, help="labeled and unlabeled batch size")
    parser.add_argument("--iterations", type=int, default=20, help="optimizer steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per runner (plus one warm-up)")
    parser.add_argument("--fast", action="store_true", help="both sides on the speed path chosen for this machine")
    args = parser.parse_args()
    labeled, unlabeled = make_batches(args.iterations, args.batch, args.image_size)
    images_per_run = 2 * args.batch * args.iterations

    rows = []
    if args.fast:  # one precision: the one the speed path selects here
        cases = [(m, speed.select_amp_dtype("auto", "cpu")) for m in ("qar", "pl-qw")]
    else:
        cases = [(m, a) for a in (None, "bf16") for m in ("qar", "pl-qw")]
    progress = tqdm(total=len(cases) * 2 * (args.repeats + 1), desc="benchmark", unit="run")
    for method_name, amp in cases:
        runners = {
            "engine": engine_runner(method_name, labeled, unlabeled, amp, args.fast),
            "plain": plain_runner(method_name, labeled, unlabeled, amp, args.fast),
        }
        wall: dict[str, list[float]] = {name: [] for name in runners}
        cpu: dict[str, list[float]] = {name: [] for name in runners}
        for repeat in range(args.repeats + 1):
            for name, run in runners.items():
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                run()
                if repeat > 0:  # repeat 0 is the warm-up
                    wall[name].append(time.perf_counter() - start_wall)
                    cpu[name].append(time.process_time() - start_cpu)
                progress.update()
        row = [method_name, "fp32" if amp in (None, "none") else amp]
        for times in (wall, cpu):
            engine_ips = images_per_run / statistics.median(times["engine"])
            plain_ips = images_per_run / statistics.median(times["plain"])
            row += [engine_ips, plain_ips, engine_ips / plain_ips]
        rows.append(row)
    progress.close()

    print(
        f"\nimage {args.image_size}px, batch {args.batch}+{args.batch}, {args.iterations} steps x {args.repeats} "
        f"repeats (median), torch threads {torch.get_num_threads()}; img/s per wall-clock second and per CPU second"
        + ("; speed path (channels_last/compile/batched forward as selected, both sides)" if args.fast else "")
    )
    columns = ("wall engine", "wall plain", "ratio", "cpu engine", "cpu plain", "ratio")
    print(f"{'method':<7}{'prec':<6}" + "".join(f"{c:>12}" for c in columns) + "  >=95% (cpu)")
    for method_name, precision, *values in rows:
        cells = "".join(f"{v:>12.3f}" if i in (2, 5) else f"{v:>12.1f}" for i, v in enumerate(values))
        print(f"{method_name:<7}{precision:<6}{cells}  {'yes' if values[5] >= 0.95 else 'NO'}")


if __name__ == "__main__":
    main()
