"""The training speed path: per-machine choices for channels_last, ``torch.compile`` and bf16 autocast.

Every choice is made at run time from what the machine offers, never assumed, and the reason is logged
(logger ``qgssl_monai.engines.speed``):

* **bf16 autocast** only where it is fast: on CPU when the processor has AMX tiles with bf16 support
  (``amx_tile`` + ``amx_bf16``, and the kernel grants the AMX state); without AMX, CPU bf16 autocast is
  1.7-5x *slower* than float32 (docs/RESULTS.md), so float32 is kept. On CUDA when
  ``torch.cuda.is_bf16_supported()``.
* **torch.compile** (inductor) when the backend can build kernels: a C++ compiler on CPU, Triton on CUDA.
  Compiled kernels are cached on disk (``TORCHINDUCTOR_CACHE_DIR``, see :func:`configure_compile_cache`), so a
  network/shape pair is compiled once per machine, not once per run.
* **channels_last** memory format for 2D networks (``channels_last_3d`` for 3D) and their inputs.

The bundle switches all of it on with ``configs/speed.json`` (stacked after the method/net overlays).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from contextlib import suppress
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "amx_bf16_support",
    "bf16_autocast_support",
    "channels_last_format",
    "compile_blocker",
    "compile_support",
    "configure_compile_cache",
    "default_compile_cache_dir",
    "select_amp_dtype",
    "select_channels_last",
    "select_compile",
    "to_channels_last",
]

logger = logging.getLogger(__name__)


def _cpu_flags() -> dict[str, bool]:
    """CPU feature flags: torch's own detection (cpuinfo) when available, else ``/proc/cpuinfo``."""
    get_capability = getattr(getattr(torch._C, "_cpu", None), "_get_cpu_capability", None)
    if callable(get_capability):
        with suppress(Exception):
            return {str(k): bool(v) for k, v in get_capability().items() if isinstance(v, bool)}
    flags: set[str] = set()
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return {flag: True for flag in flags}


def amx_bf16_support() -> tuple[bool, str]:
    """Whether this CPU can run bf16 matrix kernels on AMX tiles, and why (a sentence for the log).

    Needs the ``amx_tile`` and ``amx_bf16`` features and the OS permission to use the AMX state
    (``torch._C._cpu._init_amx()``; Linux grants it per process). Tests monkeypatch this function.
    """
    flags = _cpu_flags()
    missing = [name for name in ("amx_tile", "amx_bf16") if not flags.get(name, False)]
    if missing:
        has_avx512_bf16 = flags.get("avx512_bf16", False)
        return False, (
            f"CPU lacks {' and '.join(missing)}"
            + (" (it has avx512_bf16, which is not enough for fast bf16 convolutions)" if has_avx512_bf16 else "")
        )
    init_amx = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    if callable(init_amx):
        try:
            granted = bool(init_amx())
        except Exception as error:  # an old kernel / seccomp can refuse the arch_prctl request
            return False, f"CPU has AMX but enabling it failed ({error})"
        if not granted:
            return False, "CPU has AMX but the operating system did not grant the AMX state to this process"
    return True, "CPU has AMX tiles with bf16 (amx_tile, amx_bf16)"


def bf16_autocast_support(device: str | torch.device) -> tuple[bool, str]:
    """Whether bf16 autocast is *faster* than float32 on ``device`` (not merely supported), and why."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return True, f"CUDA device {torch.cuda.get_device_name(device)} supports bf16"
        return False, "CUDA device without native bf16"
    if device.type == "cpu":
        return amx_bf16_support()
    return False, f"no bf16 speed rule for device type {device.type!r}"


def select_amp_dtype(requested: str | None = "auto", device: str | torch.device = "cpu") -> str:
    """Autocast dtype name for the trainer's ``autocast_dtype``: ``"bf16"`` or ``"none"``; the reason is logged.

    Args:
        requested: ``"auto"`` (bf16 where :func:`bf16_autocast_support` says it is faster, float32 otherwise),
            or an explicit ``"bf16"`` / ``"fp16"`` / ``"none"`` that is returned unchanged.
        device: the training device.
    """
    if requested is None or str(requested).lower() != "auto":
        chosen = "none" if requested is None else str(requested)
        logger.info("autocast dtype %r: set explicitly", chosen)
        return chosen
    fast, reason = bf16_autocast_support(device)
    chosen = "bf16" if fast else "none"
    logger.info("autocast dtype %s on %s: %s", "bf16" if fast else "float32 (no autocast)", device, reason)
    return chosen


def compile_support(device: str | torch.device) -> tuple[bool, str]:
    """Whether ``torch.compile``'s inductor backend can build kernels for ``device``, and why."""
    device = torch.device(device)
    if not hasattr(torch, "compile"):
        return False, "this torch has no torch.compile"
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:  # comes with CUDA builds of torch; a probe, not a requirement
            return False, "inductor on CUDA needs Triton, which is not installed"
        return True, "Triton is installed"
    if device.type == "cpu":
        compiler = os.environ.get("CXX") or "g++"
        with suppress(Exception):
            from torch._inductor.cpp_builder import get_cpp_compiler

            compiler = get_cpp_compiler()
        if shutil.which(compiler) is None:
            return False, f"inductor on CPU needs a C++ compiler and {compiler!r} was not found"
        return True, f"C++ compiler {compiler!r} found"
    return False, f"no compile rule for device type {device.type!r}"


def default_compile_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/qgssl_monai/inductor`` (``~/.cache/...`` by default): shared by every run of this user."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "qgssl_monai" / "inductor"


def configure_compile_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """Point inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``) at ``cache_dir`` and return the directory used.

    Call it before the first compilation. An already set ``TORCHINDUCTOR_CACHE_DIR`` wins when ``cache_dir`` is
    ``None``; otherwise :func:`default_compile_cache_dir`. Inductor's FX-graph and AOT-autograd caches keep the
    generated kernels there, keyed by graph, shapes, dtypes and compiler, so later runs skip compilation.
    """
    if cache_dir is None:
        cache_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_compile_cache_dir()
    path = Path(cache_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def compile_blocker(network: nn.Module | None) -> str | None:
    """Why ``torch.compile`` cannot train ``network`` with this torch, or ``None``.

    torch 2.13's inductor fails in the backward of replicate padding (``replication_pad2d_backward``
    ``assert_size_stride``, with its own channels-last layout choice), which MONAI's ``BasicUNetPlusPlus``
    uses to align up-sampled features (``UpCat``): measured here at 128 px, with and without channels_last inputs.
    """
    from monai.networks.nets import BasicUNetPlusPlus

    if network is not None and any(isinstance(m, BasicUNetPlusPlus) for m in network.modules()):
        return "torch.compile fails in the backward of BasicUNetPlusPlus's replicate padding (torch 2.13 inductor)"
    return None


def select_compile(requested: bool | str = "auto", device: str | torch.device = "cpu",
                   cache_dir: str | os.PathLike | None = None, network: nn.Module | None = None) -> bool:
    """Value for the trainer's ``compile``: ``"auto"`` compiles where :func:`compile_support` allows and
    ``network`` has no :func:`compile_blocker`; logged.

    When compiling, the inductor cache directory is configured first (:func:`configure_compile_cache`).
    """
    blocker = compile_blocker(network)
    if isinstance(requested, str) and requested.lower() == "auto" and blocker is not None:
        enabled, reason = False, blocker
    elif isinstance(requested, str) and requested.lower() == "auto":
        enabled, reason = compile_support(device)
    else:
        enabled, reason = bool(requested), "set explicitly"
    if enabled:
        reason += f"; kernel cache {configure_compile_cache(cache_dir)}"
    logger.info("torch.compile %s on %s: %s", "on" if enabled else "off", device, reason)
    return enabled


def channels_last_format(spatial_dims: int) -> torch.memory_format:
    """``torch.channels_last`` for 2D (4-D tensors), ``torch.channels_last_3d`` for 3D (5-D tensors)."""
    if spatial_dims == 2:
        return torch.channels_last
    if spatial_dims == 3:
        return torch.channels_last_3d
    raise ValueError(f"channels_last needs 2 or 3 spatial dims, got {spatial_dims}")


def to_channels_last(network: nn.Module, spatial_dims: int = 2, enabled: bool = True) -> nn.Module:
    """``network`` with its 4-D (5-D) parameters/buffers in channels-last layout (in place); values unchanged.

    Teachers and peers deep-copied from it inherit the layout. Inputs should be converted too (the trainer's
    ``to_kwargs={"memory_format": channels_last_format(spatial_dims)}``), otherwise every convolution
    converts them.
    """
    if enabled:
        network.to(memory_format=channels_last_format(spatial_dims))
    return network


def _train_step_seconds(network: nn.Module, example: torch.Tensor, amp_dtype: str | None, steps: int) -> float:
    """Median process CPU seconds of ``steps`` forward+backward passes (after one warm-up pass)."""
    import statistics
    import time

    dtype = _resolve_dtype(amp_dtype)
    times = []
    for step in range(steps + 1):
        start = time.process_time() if example.device.type == "cpu" else time.perf_counter()
        with torch.autocast(example.device.type, dtype=dtype, enabled=dtype is not None):
            output = network(example)
        output.float().mean().backward()
        if example.device.type == "cuda":
            torch.cuda.synchronize(example.device)
        elapsed = (time.process_time() if example.device.type == "cpu" else time.perf_counter()) - start
        if step > 0:
            times.append(elapsed)
    network.zero_grad(set_to_none=True)
    return statistics.median(times)


def _resolve_dtype(amp_dtype: str | torch.dtype | None) -> torch.dtype | None:
    from qgssl_monai.engines.autocast import resolve_amp_dtype

    return resolve_amp_dtype(amp_dtype)


def select_channels_last(
    network: nn.Module,
    input_shape: tuple[int, ...] | list[int],
    device: str | torch.device = "cpu",
    amp_dtype: str | None = None,
    requested: bool | str = "auto",
    steps: int = 2,
    min_gain: float = 0.05,
) -> bool:
    """Whether to train ``network`` in channels-last layout: ``"auto"`` *measures* it; the choice is logged.

    channels_last is not always faster on CPU (measured at 128 px, 1 thread, eager: AttentionUnet 1.4x faster,
    UNet++ 0.8x), so ``"auto"`` times ``steps`` forward+backward passes of a copy of ``network`` (``network``
    itself is untouched) on a random batch of ``input_shape`` ``(B, C, *S)`` in both layouts, under
    ``amp_dtype`` autocast, and picks channels_last only when it is at least ``min_gain`` (5 %) faster, so
    measurement noise on a busy machine does not flip the choice. ``True``/``False`` are returned unchanged.
    """
    import copy

    if not (isinstance(requested, str) and requested.lower() == "auto"):
        logger.info("channels_last %s: set explicitly", "on" if requested else "off")
        return bool(requested)
    device = torch.device(device)
    shape = tuple(int(s) for s in input_shape)
    memory_format = channels_last_format(len(shape) - 2)
    probe = copy.deepcopy(network).to(device).train()
    example = torch.rand(shape, device=device)
    with torch.random.fork_rng(devices=[]):  # dropout in the probe must not move the run's RNG
        contiguous = _train_step_seconds(probe, example, amp_dtype, steps)
        probe.to(memory_format=memory_format)
        channels_last = _train_step_seconds(probe, example.contiguous(memory_format=memory_format), amp_dtype, steps)
    enabled = channels_last < (1.0 - min_gain) * contiguous
    logger.info(
        "channels_last %s: measured %.3f s (channels_last) vs %.3f s (contiguous) per training pass of %s on %s",
        "on" if enabled else "off", channels_last, contiguous, shape, device,
    )
    return enabled
