"""Mixed precision for any MONAI engine, CPU included.

MONAI's ``SupervisedTrainer(amp=True)`` only autocasts on CUDA (with a GradScaler). To get CPU bfloat16
as well without subclassing every engine, the autocast goes into the *inferer*: :class:`AutocastInferer`
wraps any MONAI inferer, runs the forward pass under ``torch.autocast`` and returns float32 so losses and
metrics stay in full precision. For CUDA float16, also pass ``amp=engine_amp_flag("fp16", device)`` to the
trainer so it creates the GradScaler that float16 gradients need (bfloat16 needs none).

Config usage (bundle)::

    "amp_dtype": "bf16",
    "train#inferer": {"_target_": "qgssl_monai.engines.autocast.AutocastInferer",
                      "amp_dtype": "@amp_dtype", "device": "@device"},
    "train#trainer": {..., "amp": "$qgssl_monai.engines.autocast.engine_amp_flag(@amp_dtype, @device)"}
"""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import Inferer, SimpleInferer

__all__ = ["AMP_DTYPES", "AutocastInferer", "engine_amp_flag", "resolve_amp_dtype"]

AMP_DTYPES: dict[str, torch.dtype | None] = {
    "none": None,
    "fp32": None,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_amp_dtype(amp_dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Map ``"bf16" | "fp16" | "none"`` (or a torch dtype, or None) to the autocast dtype (None: full precision)."""
    if amp_dtype is None or isinstance(amp_dtype, torch.dtype):
        return amp_dtype
    key = str(amp_dtype).lower()
    if key not in AMP_DTYPES:
        raise ValueError(f"amp_dtype must be one of {sorted(AMP_DTYPES)}, got {amp_dtype!r}")
    return AMP_DTYPES[key]


def engine_amp_flag(amp_dtype: str | torch.dtype | None, device: str | torch.device) -> bool:
    """Value for a MONAI engine's ``amp`` argument: True only for float16 on CUDA (GradScaler needed)."""
    return resolve_amp_dtype(amp_dtype) is torch.float16 and torch.device(device).type == "cuda"


class AutocastInferer(Inferer):
    """Run another inferer under ``torch.autocast`` and cast floating outputs back to float32.

    Args:
        amp_dtype: ``"bf16"`` (CPU or CUDA), ``"fp16"`` (CUDA only) or ``"none"`` (plain pass-through).
        device: device the network runs on; its type selects the autocast backend.
        inferer: the wrapped inferer (default :class:`monai.inferers.SimpleInferer`).

    Raises:
        ValueError: for ``fp16`` on a CPU device (not supported by CPU autocast in a useful way).
    """

    def __init__(
        self, amp_dtype: str | torch.dtype | None = "none", device: str | torch.device = "cpu", inferer: Inferer | None = None
    ) -> None:
        super().__init__()
        self.dtype = resolve_amp_dtype(amp_dtype)
        self.device_type = torch.device(device).type
        if self.dtype is torch.float16 and self.device_type != "cuda":
            raise ValueError("amp_dtype='fp16' needs a CUDA device; use 'bf16' on the CPU")
        self.inferer = inferer if inferer is not None else SimpleInferer()

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        if self.dtype is None:
            return self.inferer(inputs, network, *args, **kwargs)
        with torch.autocast(self.device_type, dtype=self.dtype):
            outputs = self.inferer(inputs, network, *args, **kwargs)
        return _to_float32(outputs)


def _to_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_float32(v) for k, v in value.items()}
    return value
