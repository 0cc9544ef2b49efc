"""The attack interface and registry.

An attack is a small object built from ε and its settings; calling it on
(model, x, y) returns an AttackResult: a representative adversarial input per
example (always inside the ε-ball and [0, 1]) and a per-example robust flag
(still classified correctly).

Each attack implements one hook, `perturb(model, x, y)`, which returns either
x' (the base class then takes the verdict from the model) or an AttackResult
when the attack decides the flags itself ("broken if any copy is
misclassified": feature, exp, the generators, spsa's early stop; W-PGD's best
iterate). The base `__call__` owns everything shared: eval mode, empty batches,
reduced-precision search (`amp_search`) with an fp32 verdict, and the verdict
itself, in which a non-finite logit never counts as correct.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from contextvars import ContextVar
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from ..errors import UserError
from ..nets import eval_mode
from ..perturb.linf import verdict
from ..precision import autocast_context
from ..progress import Reporter, as_reporter
from ..registry import Registry
from ..utils import parse_eps


@dataclass
class AttackResult:
    x_adv: torch.Tensor   # (B, C, H, W) in [0, 1], ‖x_adv − x‖ ≤ ε in the attack's threat model
    robust: torch.Tensor  # (B,) bool


class Attack:
    name: ClassVar[str] = ""
    #: the model's gradients are not used (black-box); for the gradient-masking check
    black_box: ClassVar[bool] = False
    #: `eval --amp` may run the search under autocast: the search takes no decision from
    #: the model's output (no early stop, no pick among copies), so the fp32 verdict on
    #: the returned x' is the whole result. Attacks that decide from reduced-precision
    #: logits (stop once "broken", return the "worst" sample) keep fp32.
    amp_search: ClassVar[bool] = False
    #: the budget is shared by the whole evaluation set (W-PGD): the engine passes every example in one call
    dataset_level: ClassVar[bool] = False
    #: x' stays in the pointwise ε-ball; False for distributional attacks, which the engine's ε-ball check
    #: skips and which do not count towards A_rob
    linf_bounded: ClassVar[bool] = True
    #: the attack learns something on training images before it attacks (the paper's exp-am/imp-am attacks
    #: train a fresh generator against the evaluated model); the engine hands them over with `set_training_data`
    uses_training_data: ClassVar[bool] = False
    #: with `uses_training_data`: the attack still runs (less faithfully, and says so) without training images
    training_data_optional: ClassVar[bool] = False
    #: the threat models the attack implements (RobustBench's names); building it for another is refused
    threat_models: ClassVar[tuple[str, ...]] = ("Linf",)

    def __init__(self, eps: float, *, seed: int = 0, threat_model: str = "Linf", **settings: Any):
        self.eps = parse_eps(eps)
        self.seed = int_setting(self.name, "seed", seed)
        if threat_model not in self.threat_models:
            raise UserError(f"attack {self.name!r} is an {' / '.join(self.threat_models)} attack and does not run "
                            f"in the {threat_model} threat model: drop it from the attack list")
        self.threat_model = threat_model
        if settings:
            raise UserError(f"attack {self.name!r} has no setting {next(iter(settings))!r}")
        self._reporter: Reporter = as_reporter(None)
        self._cache_dir: Path | None = None
        self._within: "Callable[[float, str], None] | None" = None

    def follow(self, callback: "Callable[[float, str], None] | None") -> None:
        """Who hears `within_batch` (the engine, while it attacks a batch; None: nobody)."""
        self._within = callback

    def within_batch(self, fraction: float, status: str = "") -> None:
        """How far the attack is inside the batch it is attacking (0 to 1) and what it is doing
        ("step 40/100"): long attacks call it from their loops, so progress moves within a batch."""
        if getattr(self, "_within", None) is not None:
            self._within(min(max(float(fraction), 0.0), 1.0), status)

    def bind(self, *, reporter: "Reporter | None" = None, cache_dir: "str | os.PathLike | None" = None) -> None:
        """What the engine lends an attack before `prepare`: where to report long preparation
        (e.g. training a generator) and a folder that survives an interrupted evaluation, so
        that `--resume` reuses what `prepare` built instead of redoing it."""
        self._reporter = as_reporter(reporter)
        self._cache_dir = None if cache_dir is None else Path(cache_dir)

    def set_training_data(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Training images (never the evaluated ones) for attacks with `uses_training_data`."""
        self._train_x, self._train_y = x, y

    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        """Called once with the whole evaluation set before any batch (e.g. the
        feature attack computes its target pool's features here, once)."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 precision: str | None = None) -> AttackResult:
        """Attack a batch. `precision="bf16"` lets an `amp_search` attack search under autocast;
        its verdict is then always the fp32 model's on the returned x'."""
        x = x.detach()
        if len(x) == 0:
            return AttackResult(x.clone(), torch.ones(0, dtype=torch.bool, device=x.device))
        reduced = precision not in (None, "fp32") and self.amp_search
        # Eval mode for the attack and the verdict alike: BatchNorm's batch statistics
        # would let one example's perturbation change another's prediction.
        with eval_mode(model):
            with autocast_context(x.device, precision if reduced else None):
                out = self.perturb(model, x, y)
            if isinstance(out, AttackResult) and not reduced:
                return AttackResult(out.x_adv.detach(), out.robust.reshape(-1).bool())
            x_adv = (out.x_adv if isinstance(out, AttackResult) else out).detach()
            with torch.no_grad():
                robust = verdict(model(x_adv.float()), y)
        return AttackResult(x_adv, robust)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> "torch.Tensor | AttackResult":
        """The attack itself, on a non-empty batch, with the model in eval mode."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The settings this attack ran with, recorded in results (the threat model when it is not Linf,
        so that L∞ evaluations record, and fingerprint, exactly what they did before L2 existed)."""
        return {k: v for k, v in vars(self).items()
                if not k.startswith("_") and not (k == "threat_model" and v == "Linf")}


def int_setting(attack: str, name: str, value: Any, minimum: int = 0) -> int:
    """A whole-number setting (recipes and the CLI may give it as text); UserError otherwise."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        number = int(str(value).strip()) if not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise UserError(f"attack {attack!r}: {name} must be a whole number >= {minimum}, got {value!r}")
    return number


def float_setting(attack: str, name: str, value: Any, minimum: float = 0.0) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        number = float("nan")
    if not (number >= minimum and number != float("inf")):
        raise UserError(f"attack {attack!r}: {name} must be a number >= {minimum}, got {value!r}")
    return number


def bool_setting(attack: str, name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise UserError(f"attack {attack!r}: {name} must be true or false, got {value!r}")


def example_seeds(x: torch.Tensor, key: str) -> list[int]:
    """One seed per example from `key` (attack name and seed) and the example's pixels.

    Attacks draw each example's randomness from its own seed, so an example's result
    does not depend on which batch it sits in: batch size does not change a number,
    and `cascade` (only still-robust examples) agrees with `independent`.
    """
    salt = hashlib.blake2b(key.encode(), digest_size=16).digest()
    rows = x.detach().to("cpu", torch.float32).reshape(len(x), -1).contiguous().numpy()
    return [int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8, key=salt).digest(), "little") >> 1
            for row in rows]


def example_generators(x: torch.Tensor, key: str) -> list[torch.Generator]:
    """A torch.Generator on x's device per example, seeded by `example_seeds`."""
    return [torch.Generator(device=x.device).manual_seed(s) for s in example_seeds(x, key)]


#: the batch key `keyed_batch` sets: which chunk of the evaluated set a batch is, and its place in it
_BATCH_KEY: ContextVar[str | None] = ContextVar("adt_ft_batch_key", default=None)


@contextlib.contextmanager
def keyed_batch(key: str) -> Iterator[None]:
    """Attacks called inside the block draw their batch-level randomness (AutoAttack's restarts)
    from `key`, which the evaluation engine builds from the batch's fixed chunk of
    the evaluated set (docs/evaluation.md, "Sharded evaluation"): the same numbers whichever
    process, shard or resumed run attacks that chunk."""
    token = _BATCH_KEY.set(str(key))
    try:
        yield
    finally:
        _BATCH_KEY.reset(token)


def batch_seed(key: str, bits: int = 63) -> int | None:
    """A `bits`-bit seed from `key` (attack name and seed) and the current `keyed_batch` key;
    None outside `keyed_batch` (a direct call: the attack falls back to its own seeding)."""
    chunk = _BATCH_KEY.get()
    if chunk is None:
        return None
    digest = hashlib.blake2b(f"{key}|{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - bits)


ATTACKS: Registry[Callable[..., Attack]] = Registry("attack")
#: class decorator: make an attack available by name (recipes, --attacks); a name registered twice is an error
register_attack = ATTACKS.register


def list_attacks(pattern: str | None = None) -> list[str]:
    """Registered attack names, optionally filtered by a shell-style pattern ('pgd*')."""
    return ATTACKS.names(pattern)


def make_attack(name: str, eps: float, **settings: Any) -> Attack:
    if name not in ATTACKS:
        raise UserError(f"unknown attack {name!r}: choose from {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name](eps, **settings)
