"""Generic helpers over any classifier: eval-mode scopes, the final linear layer,
penultimate features and forward-pass counting."""
from __future__ import annotations

import contextlib
from typing import Iterator

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


def find_last_linear(model: nn.Module, example: torch.Tensor) -> tuple[str, nn.Linear]:
    """The last nn.Linear that the forward pass reaches, found by running it once.

    Module registration order is not forward order in every zoo architecture, so we
    watch a forward pass instead of trusting `named_modules()`.
    """
    names = {m: n for n, m in model.named_modules()}
    seen: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda mod, i, o: seen.append(mod))
               for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad(), eval_mode(model):
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
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
