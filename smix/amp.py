"""Mixed precision, once for every stage: a setting (`amp=off|bf16|fp16|auto`) -> autocast dtype.

bf16 needs no loss scaling; fp16 does (a `GradScaler`, enabled only then). A CUDA device without
bf16 support falls back to fp16. On a CPU a stage chooses: pretraining may autocast to bf16 there
(`allow_cpu=True`); detection transfer refuses, because detectron2's AMPTrainer is CUDA-only and
its recipe is fp32 on CPU — one clear line instead of a run that silently differs.
"""

from __future__ import annotations

import contextlib

import torch

from smix.errors import UserError

AMP_MODES = ("off", "bf16", "fp16", "auto")


def amp_dtype(mode: str, device: torch.device, *, allow_cpu: bool = True) -> torch.dtype | None:
    """The autocast dtype of `mode` on `device` (None: full fp32). `auto` is bf16/fp16 on CUDA
    and off elsewhere."""
    if mode not in AMP_MODES:
        raise UserError(f"amp must be one of {', '.join(AMP_MODES)}; got {mode!r}")
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda" and not allow_cpu:
        raise UserError(f"amp={mode} needs a CUDA device; on {device.type} this command trains "
                        "in fp32: use amp=off")
    if mode == "fp16":
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """`torch.autocast` for `dtype`, or nothing when running in fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A loss scaler that is active for fp16 only (bf16 and fp32 keep fp32's exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
