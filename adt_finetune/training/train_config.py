"""Training settings: recipe and flag values checked into a TrainConfig, validated before
anything is loaded, and resolved into the config a run records in run.json.

Precedence: TrainConfig's defaults, then the recipe, then explicit values (flags).
Which method trains with which loss is decided by `methods.base.check_method_loss`
and `methods.base.default_loss`, never here.
"""
from __future__ import annotations

import math
import typing
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from ..config import TrainConfig, coerce_setting, field_kind, find_recipe, read_recipe
from ..errors import UserError
from ..methods import METHODS, default_loss as method_default, loss_for
from ..methods.wdat import check_wdat_settings
from ..utils import check_seed, format_eps

DEFAULT_LR = {"full": 0.01, "last-layer": 0.1}
SCOPES = ("full", "last-layer")
HEAD_INITS = ("keep", "reinit")
SCHEDULES = ("cosine", "step", "constant")
# Settings that may differ when a run is resumed: they change where and how fast it runs, not what it computes.
RESUME_OVERRIDABLE = ("device", "workers", "checkpoint_every", "data_dir")
# Parameters are float32: a larger setting (e.g. --lr 1e39) overflows to inf on the first step.
FLOAT32_MAX = 3.4028234663852886e38

_HINTS = typing.get_type_hints(TrainConfig)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Recipe values and flags are type-checked by the one rule in config.py (the benchmark's --set uses it too).
_coerce = coerce_setting


def config_from_record(values: Any, where: str) -> TrainConfig:
    """A TrainConfig from a recorded mapping (run.json's "config"), every value type-checked."""
    if not isinstance(values, dict):
        raise UserError(f"{where}: the recorded config is not a mapping; start a new run")
    return TrainConfig().updated({k: _coerce(k, v, where) if k in _HINTS else v for k, v in values.items()})


def build_config(recipe: str | Path | None = None, overrides: dict[str, Any] | None = None,
                 workspace: str | Path = ".") -> TrainConfig:
    """TrainConfig defaults, then the recipe's values, then `overrides` (None values are ignored).

    `recipe` is a shipped or workspace recipe name (see `adt-ft recipes`) or a YAML path.
    A loss that neither gives is the method's own (`default_loss`); one that is given
    must be one the method accepts.
    """
    cfg = TrainConfig()
    given_keys = {k for k, v in (overrides or {}).items() if v is not None}
    if recipe is not None:
        path = find_recipe(recipe, workspace)
        values = {k: _coerce(k, v, f"recipe {path}") for k, v in read_recipe(path).items()}
        given_keys |= {k for k, v in values.items() if v is not None}
        cfg = replace(cfg.updated(values), recipe=str(recipe))
    if overrides:
        unknown = sorted(set(overrides) - TrainConfig.field_names())
        if unknown:
            raise UserError(f"unknown setting {unknown[0]!r}: valid settings are the options of 'adt-ft train `help`'")
        cfg = cfg.updated({k: _coerce(k, v, "option") for k, v in overrides.items()})
    if cfg.method in METHODS:  # an unknown method is reported by train() with the list of methods
        if "loss" not in given_keys:
            cfg = replace(cfg, loss=resolve_loss(cfg, given=False))
        elif cfg.loss in ("ce", "trades"):  # an unknown loss too
            resolve_loss(cfg, given=True)
    return cfg


def _check_numbers(cfg: TrainConfig) -> None:
    """Every real-valued setting finite and within float32 range (nan, inf and 1e39 never train)."""
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        kind = field_kind(f.name)
        if kind not in (float, tuple) or value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if _is_number(v) and not (math.isfinite(v) and abs(v) <= FLOAT32_MAX):
                raise UserError(f"--{f.name.replace('_', '-')} {value!r} is not a usable number: give a finite "
                                f"value (at most {FLOAT32_MAX:.3g} in size)")


def validate_config(cfg: TrainConfig) -> None:
    """UserError for settings that cannot run, before anything is loaded."""
    _check_numbers(cfg)

    def positive(name: str, allow_none: bool = False) -> None:
        value = getattr(cfg, name)
        if value is None and allow_none:
            return
        if value is None or value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")

    for name in ("epochs", "batch_size"):
        positive(name)
    for name in ("train_subset", "max_steps", "checkpoint_every", "lr"):
        positive(name, allow_none=True)
    if cfg.scope not in SCOPES:
        raise UserError(f"unknown scope {cfg.scope!r}: choose {' or '.join(SCOPES)}")
    if cfg.sync_bn and cfg.scope != "full":
        raise UserError("`sync_bn` applies to `scope` full: under last-layer the body's BatchNorm keeps its "
                        "loaded statistics; drop `sync_bn`")
    if cfg.head_init not in HEAD_INITS:
        raise UserError(f"unknown head init {cfg.head_init!r}: choose {' or '.join(HEAD_INITS)}")
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {cfg.schedule!r}: choose {', '.join(SCHEDULES)}")
    if cfg.optimizer != "sgd":
        raise UserError(f"unknown optimizer {cfg.optimizer!r}: only sgd (with momentum) is implemented")
    if cfg.workers < 0:
        raise UserError(f"`workers` must be 0 or more, got {cfg.workers}")
    if cfg.model == "scratch" and not cfg.arch:
        raise UserError("`model` scratch needs `arch` (a zoo name or package.module:Class) to build")
    _check_ranges(cfg)
    if (cfg.arch or cfg.arch_kwargs) and cfg.model is None:
        # Without a model the workspace's current model trains, and it knows its own architecture.
        raise UserError(f"{'arch' if cfg.arch else 'arch_kwargs'} applies to model 'scratch' or a checkpoint file: "
                        "give model too, or drop it to train the workspace's current model")
    if cfg.arch_kwargs and not cfg.arch:
        raise UserError("arch_kwargs are constructor arguments for arch (package.module:Class): give arch too, "
                        "or drop arch_kwargs")
    if not cfg.weight_perturb >= 0:
        raise UserError(f"weight_perturb must be 0 (off) or positive, got {cfg.weight_perturb}")
    if cfg.method == "wdat":
        check_wdat_settings(cfg)


def _check_ranges(cfg: TrainConfig) -> None:
    """Settings whose type is right but whose value the optimiser or method cannot use: refused here,
    before anything loads, rather than by torch mid-start (a traceback) or never (a silently wrong run)."""
    if not 0 <= cfg.momentum < 1:
        raise UserError(f"momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.weight_decay < 0:
        raise UserError(f"weight_decay must be 0 or more, got {cfg.weight_decay}")
    if not all(0 <= b < 1 for b in cfg.gen_betas):
        raise UserError(f"gen_betas must both be in [0, 1), got {','.join(f'{b:g}' for b in cfg.gen_betas)}")
    if cfg.gamma <= 0:
        raise UserError(f"gamma must be positive (it multiplies the learning rate), got {cfg.gamma}")
    if cfg.beta < 0:
        raise UserError(f"beta must be 0 or more (TRADES weight), got {cfg.beta}")
    if any(m < 1 for m in cfg.milestones):
        raise UserError(f"milestones are 1-based epoch numbers, so each must be at least 1, got "
                        f"{','.join(map(str, cfg.milestones))}")
    check_seed(cfg.seed)


def default_loss(method: str) -> str:
    """The loss `method` trains with when none is asked for (see `methods.base.default_loss`)."""
    return method_default(method)


def resolve_loss(cfg: TrainConfig, *, given: bool | None = None) -> str:
    """The training loss of `cfg` (`methods.loss_for`, the one method × loss rule): cfg.loss if the
    method takes it; the method's own when the loss was not `given`.

    `given=None` (what `train` does): TrainConfig's default loss "ce", which the TRADES baseline does
    not take, counts as not given, so `TrainConfig(method="trades")` works; any other loss must be
    one the method takes. `build_config` (what the CLI uses) knows whether the flag or recipe gave it.
    """
    if given is False:
        return loss_for(cfg.method)
    return loss_for(cfg.method, cfg.loss, strict=given is True or cfg.loss != TrainConfig.loss)


def resolved(cfg: TrainConfig, *, dataset: str, eps: float, loss: str) -> TrainConfig:
    """The config with run-time defaults filled in, as recorded in run.json (settings the
    method owns, such as λ or the attack step, are filled by `with_method_settings`)."""
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.scope]
    # The budget as the user wrote it (or the dataset's '8/255'): formatting a float could round it.
    eps_text = str(cfg.eps) if cfg.eps is not None else format_eps(eps)
    return replace(cfg, dataset=dataset, eps=eps_text, loss=loss, lr=lr)


def with_method_settings(cfg: TrainConfig, method: Any) -> TrainConfig:
    """`cfg` with the settings the method resolved itself, where the config left them None."""
    own = {k: v for k, v in method.resolved_settings().items() if getattr(cfg, k) is None}
    return replace(cfg, **own) if own else cfg


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate for optimisation step `step` (0-based over the whole run).

    Cosine anneals from lr to 0 over epochs × steps-per-epoch steps; step multiplies lr by
    gamma from each (1-based) epoch listed in milestones on; constant keeps lr.
    """
    assert cfg.lr is not None, "lr is filled in by resolved()"
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        # Milestones are 1-based epoch numbers from which the factor applies, as in the ADT/TRADES
        # code's `if epoch >= 75: lr *= 0.1` over epochs 1..76.
        epoch_number = step // steps_per_epoch + 1
        return cfg.lr * cfg.gamma ** sum(1 for m in cfg.milestones if epoch_number >= m)
    total = cfg.epochs * steps_per_epoch
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
