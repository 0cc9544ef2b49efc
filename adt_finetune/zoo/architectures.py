"""Architectures: a RobustBench zoo entry's, or a `package.module:Class` one, built with random weights.

Importing a `module:Class` architecture runs that module's code, so one read from a file is only
imported when `zoo.trust` allows it (`source` names the file; see `loader.model_from_ref`).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..imagenet_folder import Preprocessing, preprocessing, timm_preprocessing
from . import robustbench_compat as rb
from .catalog import ZooEntry, resolve_name
from .trust import check_trusted, is_builtin, split_arch, trust

DATASET_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}


def _import_class(spec: str, source: str | None = None):
    """The class (or, for an architecture the user named, the function) `spec` names.

    `source` is None when the user names `spec` (a flag, an argument); otherwise the file it
    was read from, and then nothing is imported unless `trust` allows it. The name after ':'
    is a direct attribute of the module, and what it names is checked before anything is called.
    """
    module_name, attr = split_arch(spec)
    if source is not None:
        check_trusted(spec, source)
    what = f"--arch {spec}" if source is None else f"{source}: architecture {spec}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{what}: cannot import module {module_name!r} ({e}); "
                        "check the spelling and that its package is installed") from None
    target: Any = getattr(module, attr, None)
    if target is None:
        raise UserError(f"{what}: module {module_name!r} has no attribute {attr!r}")
    # Refused before anything is called: a builtin (os:system) or a class that is not a model
    # (subprocess:Popen) named as an architecture would otherwise run. A plain Python function
    # is a model factory (pyautoattack's ResNet18) only in a module the user trusts; what it
    # returns is checked after the call. Built-in modules offer their own model classes only.
    is_model_class = isinstance(target, type) and issubclass(target, nn.Module)
    if is_builtin(spec):
        if not (is_model_class and is_builtin(f"{target.__module__}:")):
            raise UserError(f"{what}: {attr!r} is not a torch.nn.Module class of {module_name}")
    elif not (is_model_class or inspect.isfunction(target)):
        raise UserError(f"{what}: {attr!r} is not a torch.nn.Module class or a function that builds one")
    return target


def check_arch(arch: str, dataset: str, threat_model: str = "Linf") -> str:
    """Validate an architecture the user names, without building it; returns its canonical form
    (a zoo alias or prefix becomes the full zoo name). A `module:Class` one becomes trusted."""
    if ":" in arch:
        _import_class(arch)
        trust(arch)
        return arch
    return resolve_name(arch, dataset, threat_model).name


def _timm_name(entry: ZooEntry) -> str:
    # RobustBench's rule for the timm registry name of a zoo entry.
    return f"{entry.name.lower().replace('-', '_')}_{entry.dataset}_{entry.threat_model.lower()}"


class _CudaStaysOnCpu(torch.overrides.TorchFunctionMode):
    """`Tensor.cuda()` returns the tensor itself: RobustBench's BiT constructor (Bai2023Improving) moves
    its normalisation constants to the GPU with `.cuda()`, which on a machine without one would make
    the architecture unbuildable; on the CPU they simply stay where the rest of the model is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cuda:
            return args[0]
        return func(*args, **(kwargs or {}))


def _build_zoo(entry: ZooEntry) -> nn.Module:
    if not entry.loadable:
        raise UserError(f"{entry.name} is on RobustBench's {entry.dataset}/{entry.threat_model} leaderboard but "
                        "RobustBench ships no checkpoint or architecture for it: choose a model that "
                        "'adt-ft models' marks as loadable")
    if entry.checkpoint == "timm":
        # RobustBench's own constructor for these asks timm for pretrained weights
        # (a download); the same architecture without weights is this.
        import timm

        return timm.create_model(_timm_name(entry), pretrained=False, num_classes=DATASET_CLASSES[entry.dataset])
    if entry.checkpoint == "torchvision":
        return rb.imagenet_standard_resnet50()
    ctor = rb.zoo_record(entry.name, entry.dataset, entry.threat_model)["model"]
    if torch.cuda.is_available():
        return ctor()
    with _CudaStaysOnCpu():
        return ctor()


def build_architecture(arch: str, dataset: str, threat_model: str = "Linf", arch_kwargs: dict | None = None, *,
                       source: str | None = None) -> nn.Module:
    """A freshly initialised model of an architecture (see `_build`).

    With `source` None the caller names `arch` (a flag, a notebook argument), and a
    `module:Class` one is remembered as one this user trusts (`zoo.trust`); otherwise
    `source` is the file it was read from, and only a trusted architecture is built.
    """
    model = _build(arch, dataset, threat_model, arch_kwargs, source=source)
    if ":" in arch and source is None:
        trust(arch)
    return model


def _build(arch: str, dataset: str, threat_model: str = "Linf", arch_kwargs: dict | None = None, *,
           source: str | None = None) -> nn.Module:
    """A freshly initialised model (random weights, nothing downloaded).

    `arch` is a RobustBench zoo name (aliases and unique prefixes work; the entry's
    architecture for `dataset`/`threat_model` is built) or `package.module:Class`
    (called with `arch_kwargs`, or with no arguments); `source` as for `build_architecture`.
    """
    if ":" in arch:
        ctor = _import_class(arch, source)
        kwargs = dict(arch_kwargs or {})
        try:
            model = ctor(**kwargs)
        except (TypeError, ValueError, RuntimeError) as e:  # a wrong argument name, or a value torch refuses
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"`arch` {arch}: cannot construct it with arguments {kwargs} ({first})") from None
        if not isinstance(model, nn.Module):
            raise UserError(f"`arch` {arch} returned a {type(model).__name__}, not a torch.nn.Module")
        return model
    if arch_kwargs:
        raise UserError(f"architecture arguments {arch_kwargs} only apply to package.module:Class architectures, "
                        f"not to the zoo name {arch!r}")
    return _build_zoo(resolve_name(arch, dataset, threat_model))


def eval_preprocessing(arch: str, dataset: str, threat_model: str = "Linf") -> Preprocessing | None:
    """The test-time preprocessing RobustBench evaluates an ImageNet architecture with: the zoo entry's own
    (`preprocessing` in its model table; for a timm model, timm's resize and crop, as RobustBench's
    `get_preprocessing` does), else Res256Crop224; None for other datasets (their images are given as stored)."""
    if dataset != "imagenet":
        return None
    if ":" in arch:
        return preprocessing(None)
    entry = resolve_name(arch, dataset, threat_model)
    if entry.checkpoint == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(_timm_name(entry))
        if cfg is not None:
            return timm_preprocessing(int(cfg.input_size[-1]), float(cfg.crop_pct), str(cfg.interpolation))
    try:
        named = rb.zoo_record(entry.name, dataset, entry.threat_model).get("preprocessing")
    except KeyError:  # a leaderboard-only entry: RobustBench has no record of it
        named = None
    return preprocessing(named)
