"""The training-method interface and registry.

A method turns a batch into a loss: `step(model, x, y)` finds the adversarial
input(s) it needs and returns a StepOutput whose `loss` the shared trainer
back-propagates exactly once. Methods with parameters of their own (the ADT
generators, wdat's Υ and budget split) expose them through `modules()`,
`optimizers()` and `state_dict()` so the trainer saves and resumes them; the
trainer calls `after_backward()` right after the classifier's optimiser step so
a method can step its own optimisers on the gradients that same backward left.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from .. import run_folder
from ..config import TrainConfig
from ..errors import UserError
from ..registry import Registry
from ..utils import atomic_torch_save


@dataclass
class MethodContext:
    """What a method needs to know about the problem, resolved by the trainer."""

    eps: float
    in_channels: int
    num_classes: int
    image_size: int
    device: torch.device
    head: nn.Module | None = None      # the final linear layer (for feature taps)
    amp_dtype: torch.dtype | None = None
    #: sums a tensor over the processes of a torchrun world, in place, and returns it; None in a
    #: single process. For statistics a method keeps across the whole batch (wdat's Υ).
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    #: the first n training images, never augmented, as (x, y) tensors; None outside a training run.
    #: For statistics a method computes over the training set (wdat's Υ).
    train_images: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None
    #: the base model's threat model (RobustBench's name): "L2" makes ε an L2 radius
    threat_model: str = "Linf"


@dataclass
class StepOutput:
    loss: torch.Tensor                       # scalar; back-propagated once by the trainer
    metrics: dict[str, float] = field(default_factory=dict)  # clean_acc, adv_acc, loss terms
    x_adv: torch.Tensor | None = None        # the training-time adversarial input (for checks)


class TrainMethod:
    name: ClassVar[str] = ""
    #: whether --loss trades is meaningful for this method
    accepts_loss: ClassVar[tuple[str, ...]] = ("ce", "trades")
    #: the threat models whose inner maximisation the method implements (docs/methods.md)
    threat_models: ClassVar[tuple[str, ...]] = ("Linf",)

    def __init__(self, cfg: TrainConfig, ctx: MethodContext):
        self.cfg = cfg
        self.ctx = ctx
        #: one key per example of the coming batch, set by the trainer before each step when the run
        #: draws per-example randomness (--example-seeds, always under torchrun); None otherwise
        self.example_keys: list[int] | None = None

    def example_noise(self, x: torch.Tensor, kind: str) -> torch.Tensor | None:
        """Noise shaped like x, each example's from its own generator seeded by (seed, method,
        example key): uniform in [−1, 1] ("uniform") or standard normal ("normal"). None when the
        trainer gave no keys: the method then draws as it always did. Per-example draws make a
        step independent of how its batch is split across processes. Drawn on the CPU, so the
        numbers do not depend on the device either."""
        keys = self.example_keys
        if keys is None:
            return None
        if len(keys) != len(x):
            raise ValueError(f"{len(keys)} example keys for a batch of {len(x)}")
        noise = torch.empty(x.shape, dtype=torch.float32)
        for row, key in zip(noise, keys):
            digest = hashlib.blake2b(f"{self.cfg.seed}:{self.name}:{key}".encode(), digest_size=8).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
            if kind == "uniform":
                row.uniform_(-1.0, 1.0, generator=g)
            elif kind == "normal":
                row.normal_(generator=g)
            else:
                raise ValueError(f"unknown noise kind {kind!r}")
        return noise.to(device=x.device, dtype=x.dtype)

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        raise NotImplementedError

    def modules(self) -> dict[str, nn.Module]:
        return {}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    def zero_grad(self) -> None:
        for opt in self.optimizers().values():
            opt.zero_grad(set_to_none=True)

    def after_backward(self) -> None:
        for opt in self.optimizers().values():
            opt.step()

    def train(self, mode: bool = True) -> None:
        for m in self.modules().values():
            m.train(mode)

    def state_dict(self) -> dict[str, Any]:
        return {
            "modules": {k: m.state_dict() for k, m in self.modules().items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, m in self.modules().items():
            m.load_state_dict(state["modules"][k])
        for k, o in self.optimizers().items():
            o.load_state_dict(state["optimizers"][k])

    def save_networks(self, run_dir: Path) -> str | None:
        """Write the method's own networks into the folder of a finished run (rank 0 only). The
        default writes `networks.pt`, {name: state dict} of `modules()`, when there are any, and
        returns None; a method whose networks are an attack for `adt-ft eval` (the amortised
        generators) writes its generator file instead and returns its name for run.json."""
        modules = self.modules()
        if modules:
            atomic_torch_save({k: {n: t.detach().cpu() for n, t in m.state_dict().items()} for k, m in modules.items()},
                              run_dir / run_folder.NETWORKS)
        return None

    def resolved_settings(self) -> dict[str, Any]:
        """TrainConfig fields this method filled in itself where the config left them None
        (e.g. its default λ or step size); the trainer records them in run.json."""
        return {}

    def diagnostics_line(self, diagnostics: dict[str, float]) -> str | None:
        """One line the trainer prints after each epoch's diagnostics (None: nothing to say)."""
        return None

    def epoch_diagnostics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Numbers worth watching once per epoch, measured on a fixed probe batch of training images.

        The trainer calls this at the end of every epoch with the classifier and the method's own
        networks in eval mode, inside `torch.random.fork_rng`, so whatever it draws or computes
        never changes training. It must not step optimisers or change any state. The default
        measures nothing (and the trainer then loads no probe batch).
        """
        return {}


METHODS: Registry[Callable[[TrainConfig, MethodContext], TrainMethod]] = Registry("method")
#: class decorator: make a method available by name (--method, recipes); a name registered twice is an error
register_method = METHODS.register


def list_methods(pattern: str | None = None) -> list[str]:
    """Registered method names, optionally filtered by a shell-style pattern ('*-am')."""
    return METHODS.names(pattern)


#: every outer training loss (methods/losses.py); each method accepts some of them
LOSSES = ("ce", "trades")


def check_method(method: str) -> type[TrainMethod]:
    """The registered class of `method`; UserError listing the methods when there is none."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: choose from {', '.join(sorted(METHODS))}")
    return METHODS[method]  # type: ignore[return-value]


def loss_for(method: str, loss: str | None = None, *, strict: bool = True) -> str:
    """The one rule for which method trains with which loss: the loss `method` trains with when
    `loss` is asked for (None: the method's own, `default_loss`). UserError for an unknown method or
    loss, and for a loss the method does not take; with `strict=False` such a loss (a default left
    in place, not a choice) gives way to the method's own."""
    cls = check_method(method)
    if loss is None:
        return default_loss(method)
    check_loss(loss)
    if loss not in cls.accepts_loss:
        if not strict:
            return default_loss(method)
        raise UserError(f"`loss` {loss} does not apply to `method` {method}: it takes {' or '.join(cls.accepts_loss)}")
    return loss


def check_loss(loss: str) -> str:
    """UserError unless `loss` is one of the outer training losses."""
    if loss not in LOSSES:
        raise UserError(f"unknown loss {loss!r}: choose {' or '.join(LOSSES)}")
    return loss


def check_method_loss(method: str, loss: str) -> None:
    """UserError when `method` cannot train with `loss` (`loss_for`)."""
    loss_for(method, loss)


def default_loss(method: str) -> str:
    """The loss a method trains with when none is asked for: its `default_loss` if it declares
    one (wdat: trades), else ce when it accepts ce, else its only loss (trades)."""
    cls = check_method(method)
    declared = getattr(cls, "default_loss", None)
    if declared:
        return declared
    return "ce" if "ce" in cls.accepts_loss else cls.accepts_loss[0]


def make_method(cfg: TrainConfig, ctx: MethodContext) -> TrainMethod:
    """The method of `cfg`, built for `ctx`; a loss it does not take is refused (`loss_for`)."""
    loss_for(cfg.method, cfg.loss)
    cls = METHODS[cfg.method]
    if ctx.threat_model not in cls.threat_models:
        raise UserError(f"method {cfg.method!r} is defined in the {' / '.join(cls.threat_models)} threat model and "
                        f"does not train an {ctx.threat_model} model: use pgd-at or trades for {ctx.threat_model}")
    return cls(cfg, ctx)
