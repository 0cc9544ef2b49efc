"""Generic helpers over any classifier: eval-mode scopes, the final linear layer,
feature taps (penultimate features, the last feature map before pooling),
forward-pass counting and the check for weights no usable model holds."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own flag afterwards.

    Restoring per module matters: with --scope last-layer the frozen body stays in
    eval mode while only the head is in train mode.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was_training in flags:
            m.training = was_training


def _watch_one_forward(model: nn.Module, example: torch.Tensor, handles: list) -> None:
    """Run one eval-mode, no-grad forward of the first example with `handles`' hooks in place, then
    remove them (even when the forward raises)."""
    try:
        with torch.no_grad(), eval_mode(model):
            model(example[:1])
    finally:
        for h in handles:
            h.remove()


def find_last_linear(model: nn.Module, example: torch.Tensor) -> tuple[str, nn.Linear]:
    """The last nn.Linear that the forward pass reaches, found by running it once.

    Module registration order is not forward order in every zoo architecture, so we
    watch a forward pass instead of trusting `named_modules()`.
    """
    names = {m: n for n, m in model.named_modules()}
    seen: list[nn.Module] = []
    _watch_one_forward(model, example, [m.register_forward_hook(lambda mod, i, o: seen.append(mod))
                                        for m in model.modules() if isinstance(m, nn.Linear)])
    if not seen:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer in its forward pass")
    return names[seen[-1]], seen[-1]


class FeatureTap:
    """Captures the input of a layer (the penultimate features when it is the head)
    on every forward pass, so features and logits come from the same pass."""

    def __init__(self, layer: nn.Module):
        self.features: torch.Tensor | None = None
        self._handle = layer.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.features = inputs[0]

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> "FeatureTap":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


FEATURE_LAYERS = ("pre-pool", "penultimate")


def find_feature_map(model: nn.Module, example: torch.Tensor, head: nn.Module) -> tuple[str, nn.Module] | None:
    """The module whose output is the last spatial feature map (4-D, more than 1×1) produced
    before `head` (the final linear layer) runs, or None if there is none.

    Found by watching one forward pass, so it works when the global pooling is a
    functional call (RobustBench's WideResNet ends `relu(bn(x))`, then `F.avg_pool2d`):
    the map that feeds the pooling is the last 4-D module output. A 1×1 map is
    already pooled and does not count. Containers report the same tensor as their
    last child, and an in-place activation returns its input tensor: of the modules
    that produced the final map, the last leaf module is kept (`relu`, not `bn1` or the
    block that contains them).
    """
    names = {m: n for n, m in model.named_modules()}
    seen: list[tuple[nn.Module, torch.Tensor]] = []
    state = {"head_ran": False}

    def on_output(module, inputs, output):
        if (not state["head_ran"] and isinstance(output, torch.Tensor) and output.dim() == 4
                and output.shape[-1] * output.shape[-2] > 1):
            seen.append((module, output))

    def on_head(module, inputs):
        state["head_ran"] = True

    handles = [m.register_forward_hook(on_output) for m in model.modules() if m is not model]
    handles.append(head.register_forward_pre_hook(on_head))
    _watch_one_forward(model, example, handles)
    if not seen:
        return None
    last = seen[-1][1]
    producers = [m for m, out in seen if out is last]
    leaves = [m for m in producers if next(m.children(), None) is None]
    module = (leaves or producers)[-1]
    return names[module], module


class OutputTap:
    """Captures a module's output as it stood when `head` started its forward pass, so
    features and logits come from the same pass (and a module called again after the
    head, or earlier in the pass, does not overwrite the tapped map)."""

    def __init__(self, module: nn.Module, head: nn.Module):
        self.features: torch.Tensor | None = None
        self._latest: torch.Tensor | None = None
        self._handles = [module.register_forward_hook(self._on_output), head.register_forward_pre_hook(self._on_head)]

    def _on_output(self, module, inputs, output):
        self._latest = output

    def _on_head(self, module, inputs):
        self.features = self._latest

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def __enter__(self) -> "OutputTap":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class PassCounter:
    """Counts forward passes of a model and backward passes through it.

    A forward is one call of the top-level module; a backward is counted when a
    gradient flows back into the model's output (so a pass whose output is used
    in no backward is a forward-only pass). Used by tests and by `adt-ft bench`.
    """

    def __init__(self, model: nn.Module):
        self.forward = 0
        self.backward = 0
        self.images_forward = 0
        self._handle = model.register_forward_hook(self._on_forward)

    def _on_forward(self, module, inputs, output):
        self.forward += 1
        self.images_forward += int(inputs[0].shape[0])
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._on_backward)

    def _on_backward(self, grad):
        self.backward += 1
        return grad

    def reset(self) -> None:
        self.forward = self.backward = self.images_forward = 0

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> "PassCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def unusable_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """What makes a set of weights unusable, one "<name> holds ..." phrase per bad tensor: a
    floating-point tensor with a NaN or an infinity, or a BatchNorm running variance
    (`*.running_var`) with an entry below zero. A negative variance is finite, but eval-mode
    BatchNorm divides by the square root of it (+ a tiny ε), so every prediction is NaN or
    meaningless. One device synchronisation per device."""
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, t in named:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            by_device.setdefault(t.device, []).append((name, t))
    bad: list[str] = []
    for items in by_device.values():
        finite = torch.stack([torch.isfinite(t).all() for _, t in items])
        negative = torch.stack([(t < 0).any() if name.rsplit(".", 1)[-1] == "running_var"
                                else torch.zeros((), dtype=torch.bool, device=t.device) for name, t in items])
        for (name, _), ok, neg in zip(items, finite.tolist(), negative.tolist()):
            if not ok:
                bad.append(f"{name} holds nan/inf values")
            elif neg:
                bad.append(f"{name} holds a negative variance")
    return bad


def unusable_weights(model: nn.Module) -> list[str]:
    """`unusable_tensors` over a model's parameters and buffers."""
    return unusable_tensors([*model.named_parameters(), *model.named_buffers()])
