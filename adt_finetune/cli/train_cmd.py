"""`adt-ft train` and `adt-ft recipes`: a thin layer over `adt_finetune.training`.

Every TrainConfig field is an option (`--some-field` for `some_field`), generated
from the dataclass so a field added to TrainConfig is reachable at once. Options
default to None, meaning "not given": the value then comes from the recipe, else
from TrainConfig's default (`training.build_config`).
"""
from __future__ import annotations

import inspect
import json
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

import typer

from ..config import TrainConfig
from ..errors import UserError
from .common import console

# (help text, panel) per field; a field missing here still gets an option.
_HELP: dict[str, tuple[str, str]] = {
    "model": ("Zoo name, checkpoint path, or 'scratch' (a fresh --arch). Default: the workspace's current model.",
              "Model and data"),
    "arch": ("Architecture of a checkpoint path (zoo name or package.module:Class).", "Model and data"),
    "arch_kwargs": ("JSON constructor arguments for a package.module:Class --arch, e.g. '{\"width\": 16}'.",
                    "Model and data"),
    "dataset": ("Dataset to train on. Default: the model's.", "Model and data"),
    "data_dir": ("Folder holding the dataset files.", "Model and data"),
    "train_subset": ("Train on the first N training images only.", "Model and data"),
    "method": ("exp | exp-am | imp-am | pgd-at | trades | wdat. (default exp-am)", "Method"),
    "loss": ("ce | trades. Default: the method's own (ce for ADT and pgd-at, trades for trades and wdat).", "Method"),
    "scope": ("full | last-layer. (default full)", "Method"),
    "head_init": ("keep | reinit the final linear layer. (default keep)", "Method"),
    "eps": ("L∞ budget, e.g. 8/255 or 0.031. Default: the dataset's.", "Method"),
    "beta": ("TRADES β. (default 6)", "Method"),
    "epochs": ("Epochs. (default 20)", "Optimisation"),
    "batch_size": ("Batch size. (default 128)", "Optimisation"),
    "optimizer": ("Optimiser (sgd with momentum).", "Optimisation"),
    "lr": ("Learning rate. Default: 0.01 (full), 0.1 (last-layer).", "Optimisation"),
    "momentum": ("SGD momentum. (default 0.9)", "Optimisation"),
    "weight_decay": ("Weight decay. (default 2e-4)", "Optimisation"),
    "schedule": ("cosine (per step) | step (gamma at --milestones) | constant. (default cosine)", "Optimisation"),
    "milestones": ("With --schedule step: 1-based epochs from which lr is multiplied by gamma, e.g. 75,90.",
                   "Optimisation"),
    "gamma": ("LR factor at each milestone. (default 0.1)", "Optimisation"),
    "adt_lambda": ("Entropy weight λ. Default: 0.01 (exp, exp-am), 1.0 (imp-am hinge form).", "ADT"),
    "imp_entropy": ("IMP-AM entropy term: hinge (released code) | paper.", "ADT"),
    "imp_hinge": ("IMP-AM hinge threshold. (default 0.9)", "ADT"),
    "exp_steps": ("ADT-EXP inner steps T. (default 7)", "ADT"),
    "exp_samples": ("ADT-EXP Monte Carlo samples k per step. (default 5)", "ADT"),
    "exp_lr": ("ADT-EXP inner Adam lr. (default 0.3)", "ADT"),
    "exp_accumulate_grad": ("Keep (μ, v) gradients across inner steps, as the released code.", "ADT"),
    "gen_width": ("Generator width (residual blocks use 2×). (default 256)", "ADT"),
    "gen_normalize_gradients": ("Feed the generators g1, g2 divided by their per-example mean |g| (adt-ft's "
                                "default); --no-gen-normalize-gradients feeds raw gradients as the released code.",
                                "ADT"),
    "gen_lr": ("Generator Adam lr. (default 2e-4)", "ADT"),
    "gen_betas": ("Generator Adam betas, e.g. 0.5,0.999.", "ADT"),
    "z_dim": ("IMP-AM noise dimension. (default 64)", "ADT"),
    "pgd_steps": ("PGD-AT attack steps. (default 7)", "Baselines"),
    "trades_steps": ("TRADES attack steps. (default 10)", "Baselines"),
    "step_size": ("Baseline attack step. Default: ε/4.", "Baselines"),
    "wdat_budget": ("wdat Wasserstein budget δ. Default: the dataset's ε.", "WDAT"),
    "wdat_steps": ("wdat W-PGD steps.", "WDAT"),
    "wdat_ratio": ("wdat step ratio.", "WDAT"),
    "upsilon": ("wdat Υ: batch | ema.", "WDAT"),
    "upsilon_momentum": ("wdat Υ moving-average momentum.", "WDAT"),
    "max_steps": ("Stop after N optimisation steps (smoke runs; the schedule stays the full run's).", "Run"),
    "seed": ("Seed for initialisation, data order and the methods' randomness. (default 0)", "Run"),
    "device": ("cpu, cuda, cuda:N or auto. (default auto)", "Run"),
    "amp": ("bf16 mixed precision (autocast).", "Run"),
    "workers": ("DataLoader worker processes. (default 0)", "Run"),
    "run_name": ("Run folder name under runs/ (default: <time>-<method>-<loss>-<scope>).", "Run"),
    "recipe": ("Recipe name from 'adt-ft recipes' or a YAML file; flags override it.", "Run"),
    "checkpoint_every": ("Also checkpoint every N steps within an epoch (default: every 10 minutes).", "Run"),
}

_HINTS = typing.get_type_hints(TrainConfig)


def _base_kind(hint: Any) -> Any:
    """list for `list[int] | None`, int for `int | None`, str for `str`, ..."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def _cli_type(name: str) -> type:
    hint = _HINTS[name]
    kind = _base_kind(hint)
    # Lists, pairs and mappings are typed as text on the command line and parsed in _from_cli.
    return kind if kind in (bool, int, float) else str


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _from_cli(name: str, value: Any) -> Any:
    """Turn a command-line string into the field's value (lists, pairs, mappings)."""
    hint = _HINTS[name]
    kind = _base_kind(hint)
    if not isinstance(value, str) or kind is str:
        return value
    try:
        if kind is list:
            return [int(v) for v in value.split(",") if v.strip()]
        if kind is tuple:
            return tuple(float(v) for v in value.split(","))
        if kind is dict:
            parsed = json.loads(value)
            if not isinstance(parsed, dict):
                raise ValueError
            return parsed
    except ValueError:
        example = {list: "75,90", tuple: "0.5,0.999", dict: "'{\"width\": 16}'"}[kind]
        raise UserError(f"{_flag(name)} {value!r} does not parse: give e.g. {example}") from None
    return value


def _config_parameters() -> list[inspect.Parameter]:
    params = []
    for f in fields(TrainConfig):
        help_text, panel = _HELP.get(f.name, (f"TrainConfig.{f.name}.", "Other"))
        kind = _cli_type(f.name)
        decls = [f"{_flag(f.name)}/--no-{f.name.replace('_', '-')}"] if kind is bool else [_flag(f.name)]
        option = typer.Option(None, *decls, help=help_text, rich_help_panel=panel, show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=Optional[kind]))
    return params


def _train(**kwargs: Any) -> None:
    from ..training import RESUME_OVERRIDABLE, build_config, train

    resume: bool = kwargs.pop("resume")
    run: str | None = kwargs.pop("run")
    workspace: Path = kwargs.pop("workspace")
    given = {k: _from_cli(k, v) for k, v in kwargs.items() if v is not None}

    if run is not None and not resume:
        raise UserError(f"unexpected argument {run!r}: a run id is only taken after --resume")
    if resume:
        ignored = sorted(set(given) - set(RESUME_OVERRIDABLE))
        if ignored:
            raise UserError(f"--resume continues a run with its recorded settings: drop {_flag(ignored[0])} "
                            f"(only {', '.join(_flag(k) for k in RESUME_OVERRIDABLE)} may change)")
        cfg = TrainConfig().updated(given)
        result = train(cfg, workspace=workspace, resume=run if run is not None else True)
    else:
        recipe = given.pop("recipe", None)
        cfg = build_config(recipe, given, workspace=workspace)
        result = train(cfg, workspace=workspace)
    console.print(f"run {result.run_id} finished: {result.path}\nevaluate it with: adt-ft eval", highlight=False,
                  soft_wrap=True)


_RECIPES_WORKSPACE = typer.Option(Path("."), "--workspace", "-w", file_okay=False,
                                  help="Workspace whose recipes/ is listed beside the shipped ones.")


def _recipes(workspace: Path = _RECIPES_WORKSPACE) -> None:
    """List the training recipes (shipped and in the workspace's recipes/), one line each."""
    from ..config import list_recipes

    found = list_recipes(workspace)
    if not found:
        console.print("no recipes found")
        return
    width = max(len(name) for name, _, _ in found)
    for name, description, _ in found:
        console.print(f"{name:<{width}}  {description}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    params = _config_parameters() + [
        inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--resume", help="Continue a stopped run from its checkpoint (RUN, default: the latest run).",
            rich_help_panel="Run")),
        inspect.Parameter("run", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=typer.Argument(
            None, metavar="[RUN]", help="With --resume: the run id or folder to continue.", show_default=False)),
        inspect.Parameter("workspace", inspect.Parameter.KEYWORD_ONLY, annotation=Path, default=typer.Option(
            Path("."), "--workspace", "-w", file_okay=False, help="Workspace folder (models/, runs/, leaderboard/).",
            rich_help_panel="Run")),
    ]

    def train_command(**kwargs: Any) -> None:
        """Fine-tune the current model (or --model) with an ADT method or a baseline, into runs/<id>/."""
        _train(**kwargs)

    train_command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    train_command.__annotations__ = {p.name: p.annotation for p in params}
    app.command("train")(train_command)
    app.command("recipes")(_recipes)
