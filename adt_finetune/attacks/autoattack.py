"""AutoAttack through pyautoattack 0.2.0 (docs/evaluation.md, "AutoAttack").

pyautoattack reseeds torch's global RNG (CPU and CUDA) inside every sub-attack;
the wrapper saves and restores both around it so that running AutoAttack does
not change what any later random draw in the process gives. It is always given
a seed, so its own random restarts are reproducible: under the evaluation engine
one per chunk of the evaluated set (`base.keyed_batch`), so that a sharded
evaluation draws the same restarts as a single process.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from ..errors import UserError
from ..nets import eval_mode
from .base import Attack, batch_seed, bool_setting, register_attack
from ..perturb.l2 import project_l2
from ..perturb.linf import project_linf

VERSIONS = ("standard", "plus", "rand")
SUB_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
LOGGER_NAME = "auto-attack"  # pyautoattack's logger: its warnings and progress go there


@contextlib.contextmanager
def preserved_global_rng() -> Iterator[None]:
    """Restore torch's global CPU and CUDA generators on exit."""
    cpu_state = torch.get_rng_state()
    # Saving CUDA's state initialises CUDA, and must: pyautoattack's cuda.manual_seed
    # on an uninitialised CUDA is queued and would reseed it whenever CUDA starts later.
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def _pyautoattack_output(verbose: bool) -> Iterator[None]:
    """Quiet by default; with verbose, its progress lines go to stderr."""
    logger = logging.getLogger(LOGGER_NAME)
    saved_disabled, saved_level = logger.disabled, logger.level
    handler = None
    if verbose:
        logger.disabled = False
        logger.setLevel(logging.DEBUG)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            logger.addHandler(handler)
    else:
        logger.disabled = True
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore")
            yield
    finally:
        if handler is not None:
            logger.removeHandler(handler)
        logger.disabled = saved_disabled
        logger.setLevel(saved_level)


def _attack_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    names = [s.strip() for s in value.split(",")] if isinstance(value, str) else [str(s).strip() for s in value]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in SUB_ATTACKS]
    if not names or unknown:
        raise UserError(f"attack 'autoattack': unknown sub-attack {(unknown or [''])[0]!r}: "
                        f"choose from {', '.join(SUB_ATTACKS)}")
    return names


@register_attack("autoattack")
class AutoAttackLinf(Attack):
    """Settings: version (standard | plus | rand; standard = APGD-CE, APGD-T, FAB-T, Square),
    attacks (an explicit list of pyautoattack sub-attacks instead: version 'custom'), verbose."""

    #: one sub-attack of the standard version run alone (the `AutoAttackPart` subclasses)
    part: ClassVar[str | None] = None
    threat_models = ("Linf", "L2")  # pyautoattack's norm='Linf' or norm='L2'

    def __init__(self, eps: float, *, seed: int = 0, version: Any = "standard", attacks: Any = None,
                 verbose: Any = False, **settings: Any):
        super().__init__(eps, seed=seed, **settings)
        self.attacks = _attack_list(attacks)
        if self.attacks is not None:
            self.version = "custom"
        else:
            self.version = str(version).strip().lower()
            if self.version not in VERSIONS:
                raise UserError(f"attack 'autoattack': unknown version {version!r}: choose from {', '.join(VERSIONS)}"
                                " (or give attacks=...)")
        self.verbose = bool_setting(self.name, "verbose", verbose)

    def batch_seed(self) -> int:
        """The seed pyautoattack reseeds with: under the engine, one per chunk of the evaluated set
        (`keyed_batch`: restarts differ between chunks and do not depend on how the set was split);
        called directly, the `seed` setting itself."""
        seed = batch_seed(f"{self.name}:{self.seed}", bits=31)  # 31 bits: numpy seeds too
        return self.seed if seed is None else seed

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from pyautoattack import AutoAttack

        x = x.detach()
        if len(x) == 0:
            return x.clone()
        device = next(iter(model.parameters()), x).device
        with eval_mode(model), preserved_global_rng(), _pyautoattack_output(self.verbose):
            adversary = AutoAttack(model, attacks=self.attacks, device=device, eps=self.eps, norm=self.threat_model,
                                   seed=self.batch_seed(), version=self.version)
            if self.part is not None:
                # After the standard version has set every sub-attack's parameters: the part runs
                # exactly as it does inside standard AutoAttack, only alone and on every point.
                adversary.attacks_to_run = [self.part]
            adversary.verbose = self.verbose
            # The whole batch at once: the evaluation layer has already batched.
            with self._following_parts(model, adversary):
                x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(x))
        # pyautoattack leaves robust points at x and projects its own points; projecting
        # again only guards the ε-ball guarantee against float round-off. The robust flag
        # is then computed from the model on exactly what is returned.
        project = project_l2 if self.threat_model == "L2" else project_linf
        return project(x_adv.to(x.device, x.dtype), x, self.eps)


    @contextlib.contextmanager
    def _following_parts(self, model: nn.Module, adversary) -> Iterator[None]:
        """Progress inside pyautoattack's run, which runs its parts internally: each sub-attack's
        `perturb` is wrapped (on this adversary only) to learn which part runs, and a forward hook
        on the model counts its passes against the part's budget of passes (iterations × restarts
        × target classes, Square's queries). Parts that stop early jump ahead."""
        parts = list(adversary.attacks_to_run)
        state = {"part": -1, "passes": 0, "budget": 1, "name": ""}

        def budget(obj, name: str) -> int:
            restarts = getattr(obj, "n_restarts", 1) or 1
            if name == "square":
                return max(1, int(getattr(obj, "n_queries", 5000)))
            iters = int(getattr(obj, "n_iter", 100)) * int(getattr(obj, "eot_iter", 1) or 1)
            targets = int(getattr(obj, "n_target_classes", 1)) if name.endswith("-t") else 1
            return max(1, restarts * iters * targets * (2 if name.startswith("fab") else 1))  # FAB: 2 passes/iter

        def report() -> None:
            done = state["part"] + min(state["passes"] / state["budget"], 0.99)
            self.within_batch(done / max(1, len(parts)), f"{state['name']} ({state['part'] + 1}/{len(parts)}), "
                                                         f"{state['passes']} passes")

        def wrap(obj, name_of):
            original = obj.perturb

            def perturb(*args, **kwargs):
                name = name_of()
                state.update(part=min(state["part"] + 1, len(parts) - 1), passes=0, budget=budget(obj, name),
                             name=name)
                report()
                return original(*args, **kwargs)

            obj.perturb = perturb  # an instance attribute: the class stays untouched

        wrap(adversary.apgd, lambda: f"apgd-{adversary.apgd.loss}")
        wrap(adversary.apgd_targeted, lambda: "apgd-t")
        wrap(adversary.fab, lambda: "fab-t" if adversary.fab.targeted else "fab")
        wrap(adversary.square, lambda: "square")

        def counted(*_):
            state["passes"] += 1
            report()

        hook = model.register_forward_hook(counted)
        try:
            yield
        finally:
            hook.remove()


class AutoAttackPart(AutoAttackLinf):
    """One of standard AutoAttack's four sub-attacks alone, with exactly the parameters it has inside
    the standard version (pyautoattack's version 'custom' would use other restart counts). Run
    independently beside `pgd20`, the parts show which one breaks what; `square` is gradient-free, so
    the engine's black-box vs white-box check sees gradient masking that `autoattack` as one cascade
    hides (docs/evaluation.md, "AutoAttack's parts"). Settings: verbose."""

    def __init__(self, eps: float, *, seed: int = 0, verbose: Any = False, **settings: Any):
        for key in ("version", "attacks"):  # fixed by what the part is
            if key in settings:
                raise UserError(f"attack {self.name!r} has no setting {key!r}: it is standard AutoAttack's "
                                f"{self.part} alone; use 'autoattack' for other versions")
        super().__init__(eps, seed=seed, version="standard", verbose=verbose, **settings)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "version": "standard", "part": self.part}


# One registered class per part, `square` the gradient-free one.
@register_attack("apgd-ce")
class APGDCE(AutoAttackPart):
    """APGD with the cross-entropy loss, 1 restart, 100 iterations (the first part)."""

    part = "apgd-ce"


@register_attack("apgd-t")
class APGDT(AutoAttackPart):
    """Targeted APGD with the DLR loss, 9 target classes, 100 iterations each."""

    part = "apgd-t"


@register_attack("fab-t")
class FABT(AutoAttackPart):
    """Targeted FAB (minimum-norm), 9 target classes."""

    part = "fab-t"


@register_attack("square")
class Square(AutoAttackPart):
    """Square Attack: random search with 5,000 queries, no gradients."""

    part = "square"
    black_box = True
