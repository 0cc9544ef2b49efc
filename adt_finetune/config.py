"""Typed configuration for training. YAML recipes set fields, CLI flags override them.

Every default here is the one docs/methods.md documents; `None` means "derived at run
time" (ε from the dataset, lr from the scope, λ from the method).
"""
from __future__ import annotations

import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


@dataclass
class TrainConfig:
    # what to train
    model: str | None = None          # zoo name, checkpoint path, or None for the workspace's current model
    arch: str | None = None           # with a checkpoint path: zoo name or package.module:Class
    arch_kwargs: dict[str, Any] | None = None  # constructor arguments for a package.module:Class arch (model: scratch)
    dataset: str | None = None        # default: the model's dataset
    data_dir: str | None = None
    method: str = "exp-am"            # exp | exp-am | imp-am | pgd-at | trades | wdat
    loss: str = "ce"                  # ce | trades
    scope: str = "full"               # full | last-layer
    head_init: str = "keep"           # keep | reinit
    # optimisation (fine-tuning defaults, docs/methods.md "Fine-tuning protocol")
    epochs: int = 20
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None           # None: 0.01 full, 0.1 last-layer
    momentum: float = 0.9
    weight_decay: float = 2e-4
    schedule: str = "cosine"          # cosine | step | constant
    milestones: list[int] = field(default_factory=list)   # epochs where lr *= gamma (schedule: step)
    gamma: float = 0.1
    # threat model
    eps: str | None = None            # None: the dataset's budget; "8/255" or "0.031"
    # ADT (docs/methods.md "ADT-EXP" … "ADT-IMP-AM")
    # λ weights the entropy AVERAGED over its elements (pixels for exp/exp-am, z's dimensions for
    # imp-am), as the released code; the paper sums them (docs/methods.md "Losses")
    adt_lambda: float | None = None   # None: 0.01 (exp, exp-am), 10 (imp-am paper bound), 1.0 (imp-am hinge)
    imp_entropy: str = "paper"        # paper (the variational bound, acts) | hinge (released code, inert)
    imp_hinge: float = 0.9            # τ of --imp-entropy hinge
    exp_steps: int = 7                # T
    exp_samples: int = 5              # k
    exp_lr: float = 0.3
    exp_accumulate_grad: bool = True  # the released code never zeroes (μ, v) grads between steps
    gen_width: int = 256              # generator width; residual blocks use 2× this
    # g1, g2 per example over their mean |·| (ours); False: the released code's raw gradients of the
    # batch-MEAN CE (per-example gradient / batch_size, that divisor saved with the generator)
    gen_normalize_gradients: bool = True
    gen_lr: float = 2e-4
    gen_betas: tuple[float, float] = (0.5, 0.999)
    z_dim: int = 64
    beta: float = 6.0                 # TRADES β
    # baselines (docs/methods.md "Baselines")
    pgd_steps: int = 7
    trades_steps: int = 10
    step_size: float | None = None    # None: ε/4
    # wdat (docs/methods.md "wdat"; every default marked "guess" there is ours, not the paper's)
    wdat_budget: str | None = None    # δ, the W_2 budget; None: the dataset's ε
    wdat_steps: int = 10              # PGD steps inside each image's budget (guess: TRADES' 10)
    wdat_ratio: float = 1.875         # step = ratio·δ_i/steps (the W-PGD authors' code)
    wdat_split_loss: str = "redlr"    # redlr | ce: the loss whose input gradients split δ (guess)
    wdat_upsilon_images: int = 10000  # Υ over the first N training images (guess; capped at the set)
    wdat_upsilon_every: int = 100     # optimisation steps between refreshes of Υ (guess)
    wdat_cap: float = 2.0             # per-image budget cap, a multiple of δ (guess)
    weight_perturb: float = 0.0       # before training: w += σ·rms(w)·N(0, 1) per trained tensor (guess: off)
    # run control
    train_subset: int | None = None
    max_steps: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    workers: int = 0
    run_name: str | None = None
    recipe: str | None = None
    checkpoint_every: int | None = None  # optimiser steps between mid-epoch checkpoints; None: every 10 minutes
    # several processes (torchrun; docs: README "Scaling out")
    sync_bn: bool = False             # BatchNorm statistics over the whole batch across processes (scope full)
    example_seeds: bool = False       # keyed randomness in one process too (always on with several processes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gen_betas"] = list(self.gen_betas)
        return d

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def updated(self, overrides: dict[str, Any]) -> "TrainConfig":
        """A copy with `overrides` applied; unknown keys are a UserError naming the key."""
        unknown = sorted(set(overrides) - self.field_names())
        if unknown:
            raise UserError(f"unknown setting {unknown[0]!r}: valid settings are the options of 'adt-ft train `help`'")
        d = self.to_dict()
        d.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(d.get("gen_betas"), list):
            d["gen_betas"] = tuple(d["gen_betas"])
        return TrainConfig(**d)


def base_kind(hint: Any) -> Any:
    """list for `list[int] | None`, int for `int | None`, str for `str`, ..."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def field_kind(name: str) -> Any:
    """The plain type of a TrainConfig field: bool, int, float, str, list, tuple or dict."""
    return base_kind(typing.get_type_hints(TrainConfig)[name])


def coerce_setting(name: str, value: Any, where: str) -> Any:
    """A recipe/flag value checked against the TrainConfig field's type (YAML gives loose types).

    `where` says where the value came from ("recipe r.yaml", "--set gen_width=abc") in the error.
    """
    if value is None:
        return None
    kind = field_kind(name)

    def bad(expected: str) -> UserError:
        return UserError(f"{where}: {name} must be {expected}, got {value!r}")

    if kind is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("a whole number")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if kind is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise bad("a string")
        return str(value)  # YAML reads `eps: 0.031` as a float
    if kind is list:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value):
            raise bad("a list of whole numbers")
        return list(value)
    if kind is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise bad("two numbers")
        return tuple(float(v) for v in value)
    if kind is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return dict(value)
    return value


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A YAML recipe as a flat dict of TrainConfig fields (validated)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"recipe {p} does not exist: 'adt-ft recipes' lists the shipped ones")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"recipe {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise UserError(f"recipe {p} is not UTF-8 text: save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"recipe {p} cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {p} must be a mapping of setting: value")
    data.pop("description", None)
    unknown = sorted(set(data) - TrainConfig.field_names())
    if unknown:
        raise UserError(f"recipe {p} has an unknown key {unknown[0]!r}: fix or remove it")
    return data


#: the recipes that ship inside the package (the checkout's top-level recipes/ is a link to this folder)
SHIPPED_RECIPES = Path(__file__).resolve().parent / "recipes"


def recipe_dirs(workspace: str | Path = ".") -> list[Path]:
    """Where recipe names are looked up: the shipped recipes, then the workspace's recipes/."""
    return [SHIPPED_RECIPES, Path(workspace).expanduser().resolve() / "recipes"]


def find_recipe(name_or_path: str | Path, workspace: str | Path = ".") -> Path:
    """A recipe file from a shipped/workspace recipe name (with or without .yaml) or a path."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    if len(p.parts) > 1:
        raise UserError(f"recipe file {p} does not exist: give an existing YAML file or a name from 'adt-ft recipes'")
    stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
    for folder in reversed(recipe_dirs(workspace)):  # a workspace recipe shadows a shipped one of the same name
        candidate = folder / f"{stem}.yaml"
        if candidate.is_file():
            return candidate
    raise UserError(f"no recipe {str(name_or_path)!r}: give a YAML file or a name from 'adt-ft recipes'")


def list_recipes(workspace: str | Path = ".") -> list[tuple[str, str, Path]]:
    """(name, one-line description, path) of every recipe, workspace ones shadowing shipped ones."""
    found: dict[str, tuple[str, str, Path]] = {}
    for folder in recipe_dirs(workspace):
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError:
                data = {"description": "(not valid YAML)"}
            except UnicodeDecodeError:
                data = {"description": "(not UTF-8 text)"}
            except OSError as e:
                data = {"description": f"(cannot be read: {e.strerror or e})"}
            text = str(data.get("description", "")) if isinstance(data, dict) else ""
            found[path.stem] = (path.stem, " ".join(text.split()), path)
    return sorted(found.values())
