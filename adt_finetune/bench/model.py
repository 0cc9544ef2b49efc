"""The device and the random-weight classifier a benchmark runs on."""
from __future__ import annotations

import importlib
import inspect

import torch
from torch import nn

from ..data import DatasetInfo
from ..errors import UserError
from ..nets import eval_mode
from ..utils import resolve_device
from ..zoo import build_architecture


def bench_device(device: str | torch.device) -> torch.device:
    """`utils.resolve_device`, limited to what the benchmark can time: cpu or cuda."""
    dev = resolve_device(str(device))
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"`device` {device}: the benchmark runs on cpu or cuda")
    return dev


def _fill_shape_kwargs(arch: str, info: DatasetInfo, arch_kwargs: dict | None) -> dict | None:
    """For `module:Class` architectures whose constructor takes `in_channels` /
    `num_classes`, fill them from the dataset unless given, so that e.g. SmallCNN
    benchmarks on CIFAR shapes without extra flags."""
    if ":" not in arch:
        return arch_kwargs
    module_name, _, attr = arch.partition(":")
    try:
        ctor = getattr(importlib.import_module(module_name), attr)
        params = inspect.signature(ctor).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return arch_kwargs  # build_architecture reports the problem in its own words
    kwargs = dict(arch_kwargs or {})
    for key, value in (("in_channels", info.channels), ("num_classes", info.num_classes)):
        if key in params and key not in kwargs:
            kwargs[key] = value
    return kwargs or None


def build_model(arch: str, info: DatasetInfo, arch_kwargs: dict | None = None) -> nn.Module:
    """The architecture with random weights, checked against the dataset's shapes."""
    model = build_architecture(arch, info.name, "Linf", _fill_shape_kwargs(arch, info, arch_kwargs))
    probe = torch.rand(2, info.channels, info.size, info.size)
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(probe)
    except RuntimeError as e:
        raise UserError(f"`arch` {arch} does not run on {info.name} inputs of shape "
                        f"{(info.channels, info.size, info.size)}: {str(e).splitlines()[0]} "
                        f"(pick another `dataset`, or pass `arch_kwargs`)") from None
    if not isinstance(out, torch.Tensor) or out.shape != (2, info.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"`arch` {arch} outputs {shape} for a batch of 2, not (2, {info.num_classes}) "
                        f"logits for {info.name}")
    return model
