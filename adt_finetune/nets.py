"""Generic helpers over any classifier: eval-mode scopes, the final linear layer,
feature taps (penultimate features, the last feature map before pooling),
forward-pass counting and the check for weights no usable model holds."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

from .errors import UserError


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


# Modules that pass a map on without making a new one (`nn.Identity`: ConvNeXt's `norm_pre`, a
# transformer's `k_norm`): tapping them would name a layer that did not produce the map.
_NOT_A_PRODUCER = (nn.Identity, nn.Dropout)


def _is_feature_map(output) -> bool:
    """A spatial map (B, C, H, W) with more than one position, or a token sequence (B, N, D) with more
    than one token: what a transformer has before its pooling (class token or mean). A pooled
    sequence (B, D, 1) is neither. A spatial pool that keeps a map (SmallCNN's and AlexNet's
    adaptive pools to 4×4 and 6×6) is still a spatial map."""
    if not isinstance(output, torch.Tensor):
        return False
    if output.dim() == 4:
        return output.shape[-1] * output.shape[-2] > 1
    return output.dim() == 3 and output.shape[1] > 1 and output.shape[2] > 1


def _trace(model: nn.Module, example: torch.Tensor, maps: bool = True) -> list[tuple[nn.Module, torch.Tensor | None]]:
    """(module, output) for every submodule call of one forward pass, in the order the calls finish;
    the output only where it is a feature map (see `_is_feature_map`) and `maps` asks for them, else None
    (holding every map of a large model costs memory a head search does not need)."""
    events: list[tuple[nn.Module, torch.Tensor | None]] = []

    def on_output(module, inputs, output):
        keep = maps and not isinstance(module, _NOT_A_PRODUCER) and _is_feature_map(output)
        events.append((module, output if keep else None))

    _watch_one_forward(model, example, [m.register_forward_hook(on_output) for m in model.modules() if m is not model])
    return events


def _last_linear(model: nn.Module, events) -> nn.Linear:
    linears = [m for m, _ in events if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"{type(model).__name__} has no nn.Linear layer in its forward pass (binary or otherwise "
                        "custom final layer): fine-tuning and the feature attack need one, so only the other "
                        "attacks can evaluate it")
    return linears[-1]


def find_last_linear(model: nn.Module, example: torch.Tensor) -> tuple[str, nn.Linear]:
    """The last nn.Linear that the forward pass reaches, found by running it once.

    Module registration order is not forward order in every zoo architecture, so we
    watch a forward pass instead of trusting `named_modules()`.
    """
    names = {m: n for n, m in model.named_modules()}
    head = _last_linear(model, _trace(model, example, maps=False))
    return names[head], head


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


def _map_before(events, head: nn.Module) -> nn.Module | None:
    """Of the feature maps finished before `head` first ran, the module that produced the last one."""
    first_head = next((i for i, (m, _) in enumerate(events) if m is head), len(events))
    seen = [(m, out) for m, out in events[:first_head] if out is not None]
    if not seen:
        return None
    last = seen[-1][1]
    producers = [m for m, out in seen if out is last]
    leaves = [m for m in producers if next(m.children(), None) is None]
    return (leaves or producers)[-1]


def find_feature_map(model: nn.Module, example: torch.Tensor, head: nn.Module) -> tuple[str, nn.Module] | None:
    """The module whose output is the last feature map produced before `head` (the final linear
    layer) runs, or None if there is none: for a CNN the last spatial map (4-D, more than 1×1) before
    global pooling, for a transformer the tokens (3-D, more than one token) before pooling.

    Found by watching one forward pass, so it works when the global pooling is a
    functional call (RobustBench's WideResNet ends `relu(bn(x))`, then `F.avg_pool2d`):
    the map that feeds the pooling is the last module output of that shape. A 1×1 map is
    already pooled and does not count, nor do identity and dropout modules. Containers
    report the same tensor as their last child, and an in-place activation returns its input
    tensor: of the modules that produced the final map, the last leaf module is kept (`relu`, not
    `bn1` or the block that contains them). A transformer's attention tensors (4-D) come before its
    final norm's tokens, so they are never the last map.
    """
    module = _map_before(_trace(model, example), head)
    return None if module is None else ({m: n for n, m in model.named_modules()}[module], module)


def find_head_and_feature_map(model: nn.Module, example: torch.Tensor) -> tuple[str, nn.Linear, str | None]:
    """`find_last_linear` and `find_feature_map` from one forward pass: (head name, head, tap name or None)."""
    names = {m: n for n, m in model.named_modules()}
    events = _trace(model, example)
    head = _last_linear(model, events)
    tap = _map_before(events, head)
    return names[head], head, None if tap is None else names[tap]


def head_refusal(head: nn.Linear, name: str, num_classes: int) -> str | None:
    """Why the last linear layer is not a classifier head (it does not give one logit per class, as in
    an adaptive ensemble whose mixing network runs last), or None when it is one."""
    if head.out_features == num_classes:
        return None
    return (f"its last linear layer {name} gives {head.out_features} outputs, not the {num_classes} class logits "
            "(a mixing network runs after the classifiers): there is no classifier head to fine-tune or tap")


def train_mode_refusal(model: nn.Module, example: torch.Tensor, only: nn.Module | None = None) -> str | None:
    """Why `model` cannot run a forward pass in train mode (its forward asserts eval mode, as
    RobustBench's MixedNUTS ensembles do for their base classifiers), or None when it can. With
    `only`, just that submodule is in train mode (--scope last-layer: the head), the rest in eval.

    One forward of `example` (two images or more: BatchNorm needs them in train mode) with the
    model's buffers (BatchNorm statistics), modes and random streams restored afterwards, so checking
    changes nothing.
    """
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    flags = [(m, m.training) for m in model.modules()]
    devices = [example.device] if example.device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            model.train(only is None)
            if only is not None:
                only.train()
            model(example)
    except AssertionError as e:
        first_line = (str(e).strip().splitlines() or ["an assertion fails"])[0]  # the message stays one line
        return f"its forward pass refuses train mode ({first_line})"
    finally:
        for m, was_training in flags:
            m.training = was_training
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return None


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
