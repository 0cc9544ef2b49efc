"""The FLOP cost model: every call of the classifier and of a method's own modules is
logged with its input shapes and the backward it received, and each distinct pass is
replayed once under the FLOP counter (docs/bench.md, "Cost model")."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..nets import eval_mode


@dataclass
class Pass:
    module: str
    images: int
    sig: tuple
    grad_phases: set = field(default_factory=set)


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


# True while a pass is replayed under the FLOP counter: those calls are not the step's.
_replaying = [False]


class PassLog:
    """Logs every call of one module: images, input shapes, and in which phase
    ("step" = inside method.step or an attack, "backward" = the trainer's
    loss.backward()) a gradient reached its output. Keeps one copy of the inputs
    per distinct signature so the pass can be replayed under the FLOP counter."""

    def __init__(self, name: str, module: nn.Module, phase: list[str]):
        self.name = name
        self.module = module
        self.passes: list[Pass] = []
        self.samples: dict[tuple, tuple[tuple, dict]] = {}
        self._phase = phase  # shared, mutable: the bench flips it around loss.backward()
        self._handle = module.register_forward_hook(self._on_forward, with_kwargs=True)

    def _on_forward(self, module, args, kwargs, output):
        if _replaying[0]:
            return
        ins = _tensors((args, kwargs))
        sig = tuple((tuple(t.shape), t.requires_grad, t.is_floating_point()) for t in ins)
        rec = Pass(self.name, int(ins[0].shape[0]) if ins and ins[0].dim() else 0, sig)
        self.passes.append(rec)
        if sig not in self.samples:
            self.samples[sig] = _map_tensors((args, kwargs), lambda t: t.detach().clone())
        for out in _tensors(output):
            if out.requires_grad:
                out.register_hook(lambda grad, rec=rec: self._on_grad(rec, grad))

    def _on_grad(self, rec: Pass, grad):
        rec.grad_phases.add(self._phase[0])
        return grad

    def reset(self) -> None:
        self.passes.clear()

    def remove(self) -> None:
        self._handle.remove()


class _NoModuleTracker:
    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


class GlobalFlopCounter(FlopCounterMode):
    """FlopCounterMode counting totals only.

    Its per-module attribution installs multi-grad hooks that make
    `torch.autograd.grad` with a leaf input fail ("A leaf node was passed to
    _will_engine_execute_node ..."), and every attack step is exactly such a
    call; without the tracker every FLOP lands under "Global".
    """

    def __init__(self):
        super().__init__(display=False)
        self.mod_tracker = _NoModuleTracker()


def _backward_kind(p: Pass) -> str | None:
    if not p.grad_phases:
        return None
    return "full" if "backward" in p.grad_phases else "input"


def replay_flops(module: nn.Module, sample: tuple[tuple, dict], sig: tuple, kind: str | None) -> int:
    """FLOPs of one call of `module` on `sample`'s shapes, with the given backward kind
    (None: forward only; "input": gradients w.r.t. the inputs; "full": weights too)."""
    rg_flags = iter([rg for _, rg, _ in sig])

    def prep(t: torch.Tensor) -> torch.Tensor:
        rg = next(rg_flags)
        t = t.detach().clone()
        return t.requires_grad_(rg and kind is not None and t.is_floating_point())

    args, kwargs = _map_tensors(sample, prep)
    inputs = [t for t in _tensors((args, kwargs)) if t.requires_grad]
    params = [p for p in module.parameters() if p.requires_grad]
    if kind == "input" and not inputs:
        kind = "full"  # a gradient reached the output without an input to flow to: it went to the weights
    targets = inputs + (params if kind == "full" else [])
    # Eval mode: the FLOPs are the same, and BatchNorm's running statistics stay untouched.
    _replaying[0] = True
    try:
        with eval_mode(module), GlobalFlopCounter() as counter:
            _call_for_flops(module, args, kwargs, kind, targets)
    finally:
        _replaying[0] = False
    return int(counter.get_total_flops())


def _call_for_flops(module, args, kwargs, kind, targets) -> None:
    if kind is None or not targets:
        with torch.no_grad():
            module(*args, **kwargs)
        return
    out = module(*args, **kwargs)
    outs = [o for o in _tensors(out) if o.requires_grad]
    if outs:
        torch.autograd.grad(sum(o.float().sum() for o in outs), targets, allow_unused=True)


class CostModel:
    """Caches replayed FLOPs per (module, signature, backward kind)."""

    def __init__(self):
        self._cache: dict[tuple, int] = {}

    def pass_flops(self, log: PassLog, p: Pass) -> int:
        kind = _backward_kind(p)
        key = (id(log.module), p.sig, kind)
        if key not in self._cache:
            self._cache[key] = replay_flops(log.module, log.samples[p.sig], p.sig, kind)
        return self._cache[key]

    def step_flops(self, logged: Sequence[tuple[PassLog, list[Pass]]]) -> dict[str, float]:
        return {log.name: float(sum(self.pass_flops(log, p) for p in passes)) for log, passes in logged}


def top_level_modules(mods: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Drop modules nested inside another listed one, so no pass is counted twice."""
    out = {}
    for name, m in mods.items():
        if not isinstance(m, nn.Module):
            continue
        nested = any(other is not m and any(sub is m for sub in other.modules()) for other in mods.values()
                     if isinstance(other, nn.Module))
        if not nested:
            out[name] = m
    return out
