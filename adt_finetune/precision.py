"""Mixed precision, channels-last and torch.compile, in one place for train, eval and bench.

Typical use (what `--amp` means everywhere)::

    from adt_finetune.precision import amp_dtype_name, autocast_context, make_grad_scaler

    dtype = amp_dtype_name(device, amp)              # "bf16" on CPU / bf16-capable GPUs, else "fp16", or "fp32"
    scaler = make_grad_scaler(device, dtype)         # a no-op unless dtype is fp16
    with autocast_context(device, dtype):
        out = method.step(model, x, y)               # forward passes (and attack inner loops) in low precision
    scaler.scale(out.loss).backward()                # backward outside autocast, as PyTorch recommends
    scaler.step(opt); scaler.update()

bf16 keeps fp32's exponent range, so it needs no loss scaling; fp16 does (its
gradients underflow), hence the GradScaler, and fp16 autocast exists on CUDA only
here. Autocast keeps softmax/cross-entropy/log-softmax in fp32, so losses and
attack objectives are computed at full precision from low-precision logits.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch import nn

from .errors import UserError

DTYPES = ("fp32", "bf16", "fp16")
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str | None) -> str:
    """'fp32' | 'bf16' | 'fp16' (None means fp32); anything else is a UserError."""
    if name is None:
        return "fp32"
    key = str(name).strip().lower()
    key = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}.get(key, key)
    if key not in DTYPES:
        raise UserError(f"unknown dtype {name!r}: choose fp32, bf16 or fp16")
    return key


def torch_dtype(name: str | None) -> torch.dtype | None:
    """The autocast dtype for a precision name; None for fp32 (no autocast).

    This is what goes into `MethodContext.amp_dtype`.
    """
    key = parse_dtype(name)
    return None if key == "fp32" else _TORCH_DTYPES[key]


def supports_bf16(device: torch.device | str) -> bool:
    """Whether bf16 autocast runs on this device.

    On CPU it always runs (it is fast only on CPUs with AVX512-BF16/AMX, but it is
    correct everywhere, which is what the CPU tests rely on).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return False


def amp_dtype_name(device: torch.device | str, amp: bool) -> str:
    """What `--amp` means on this device: bf16 where supported, else fp16 (CUDA), else an error."""
    if not amp:
        return "fp32"
    device = torch.device(device)
    if supports_bf16(device):
        return "bf16"
    if device.type == "cuda":
        return "fp16"
    raise UserError(f"`amp`: no mixed precision is available on device {device}; drop `amp`")


def check_dtype(device: torch.device | str, dtype: str | None) -> str:
    """Validate a precision for a device; returns the canonical name."""
    device = torch.device(device)
    key = parse_dtype(dtype)
    if key == "fp16" and device.type != "cuda":
        raise UserError(f"`dtype` fp16 needs a CUDA device (and a GradScaler); on {device.type} use bf16 or fp32")
    if key == "bf16" and not supports_bf16(device):
        raise UserError(f"`dtype` bf16 is not supported on {device}; use fp16 (CUDA) or fp32")
    return key


def needs_grad_scaler(dtype: str | None) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
    return parse_dtype(dtype) == "fp16"


def make_grad_scaler(device: torch.device | str, dtype: str | None) -> torch.amp.GradScaler:
    """A GradScaler that is active for fp16 and a transparent no-op otherwise.

    A disabled scaler's `scale(loss)` returns the loss unchanged and `step(opt)`
    just calls `opt.step()`, so callers can use one code path for every dtype.
    """
    device = torch.device(device)
    enabled = needs_grad_scaler(dtype)
    return torch.amp.GradScaler(device.type if enabled else "cpu", enabled=enabled)


def autocast_context(device: torch.device | str, dtype: str | None) -> ContextManager:
    """The autocast scope for a precision: a no-op for fp32/None, bf16 autocast on CPU or
    CUDA, fp16 autocast on CUDA only (pair it with `make_grad_scaler`)."""
    device = torch.device(device)
    key = check_dtype(device, dtype)
    if key == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_TORCH_DTYPES[key])


def to_channels_last(model: nn.Module | None = None, x: torch.Tensor | None = None):
    """Convert a model (in place, same Parameter objects, so optimisers stay valid)
    and/or a 4-D batch to channels-last memory format.

    Returns whatever was given: the model, the tensor, or (model, tensor).
    """
    if model is not None:
        model.to(memory_format=torch.channels_last)
    if x is not None and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    if model is not None and x is not None:
        return model, x
    return model if model is not None else x


def maybe_compile(model: nn.Module, enabled: bool, **compile_kwargs) -> nn.Module:
    """`torch.compile(model)` when enabled, else the model itself.

    Compilation is lazy (the first call compiles) and needs a C++ compiler on CPU.
    The returned wrapper shares parameters with `model`; hooks registered on the
    wrapper (e.g. `nets.PassCounter`) run eagerly around the compiled forward.
    """
    if not enabled:
        return model
    if not hasattr(torch, "compile"):
        raise UserError("`compile` needs torch >= 2.0")
    return torch.compile(model, **compile_kwargs)
