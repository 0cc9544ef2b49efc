"""Architectures: a RobustBench zoo entry's, or a `package.module:Class` one, built with random weights.

Importing a `module:Class` architecture runs that module's code, so one read from a file is only
built when `zoo.trust` allows it (see `loader.model_from_ref`).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any

from torch import nn

from ..errors import UserError
from . import robustbench_compat as rb
from .catalog import ZooEntry, resolve_name
from .trust import trust

_DATASET_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}


def _import_class(spec: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"--arch {spec!r} is neither a zoo name nor package.module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"--arch {spec}: cannot import module {module_name!r} ({e}); "
                        "check the spelling and that its package is installed") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UserError(f"--arch {spec}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    # Refused before anything is called: a builtin (os:system) or a class that is not a model
    # (subprocess:Popen) named as an architecture would otherwise run. A plain Python function is a
    # model factory (pyautoattack's ResNet18); what it returns is checked after the call.
    is_model_class = isinstance(target, type) and issubclass(target, nn.Module)
    if not (is_model_class or inspect.isfunction(target)):
        raise UserError(f"--arch {spec}: {attr!r} is not a torch.nn.Module class or a function that builds one")
    return target


def check_arch(arch: str, dataset: str, threat_model: str = "Linf") -> str:
    """Validate an architecture spec without building it; returns its canonical form
    (a zoo alias or prefix becomes the full zoo name)."""
    if ":" in arch:
        _import_class(arch)
        trust(arch)
        return arch
    return resolve_name(arch, dataset, threat_model).name


def _timm_name(entry: ZooEntry) -> str:
    # RobustBench's rule for the timm registry name of a zoo entry.
    return f"{entry.name.lower().replace('-', '_')}_{entry.dataset}_{entry.threat_model.lower()}"


def _build_zoo(entry: ZooEntry) -> nn.Module:
    if not entry.loadable:
        raise UserError(f"{entry.name} is on RobustBench's {entry.dataset}/{entry.threat_model} leaderboard but "
                        "RobustBench ships no checkpoint or architecture for it: choose a model that "
                        "'adt-ft models' marks as loadable")
    if entry.checkpoint == "timm":
        # RobustBench's own constructor for these asks timm for pretrained weights
        # (a download); the same architecture without weights is this.
        import timm

        return timm.create_model(_timm_name(entry), pretrained=False, num_classes=_DATASET_CLASSES[entry.dataset])
    if entry.checkpoint == "torchvision":
        return rb.imagenet_standard_resnet50()
    return rb.zoo_record(entry.name, entry.dataset, entry.threat_model)["model"]()


def build_architecture(arch: str, dataset: str, threat_model: str = "Linf",
                       arch_kwargs: dict | None = None) -> nn.Module:
    """A freshly initialised model of an architecture the caller names (see `_build`); the name is
    remembered as one this user trusts (`zoo.trust`)."""
    model = _build(arch, dataset, threat_model, arch_kwargs)
    if ":" in arch:
        trust(arch)
    return model


def _build(arch: str, dataset: str, threat_model: str = "Linf", arch_kwargs: dict | None = None) -> nn.Module:
    """A freshly initialised model (random weights, nothing downloaded).

    `arch` is a RobustBench zoo name (aliases and unique prefixes work; the entry's
    architecture for `dataset`/`threat_model` is built) or `package.module:Class`
    (called with `arch_kwargs`, or with no arguments).
    """
    if ":" in arch:
        ctor = _import_class(arch)
        kwargs = dict(arch_kwargs or {})
        try:
            model = ctor(**kwargs)
        except TypeError as e:
            raise UserError(f"--arch {arch}: cannot construct it with arguments {kwargs} ({e})") from None
        if not isinstance(model, nn.Module):
            raise UserError(f"--arch {arch} returned a {type(model).__name__}, not a torch.nn.Module")
        return model
    if arch_kwargs:
        raise UserError(f"architecture arguments {arch_kwargs} only apply to package.module:Class architectures, "
                        f"not to the zoo name {arch!r}")
    return _build_zoo(resolve_name(arch, dataset, threat_model))
