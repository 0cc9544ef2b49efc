"""`adt-ft train` and `adt-ft recipes`: a thin layer over `adt_finetune.training`.

Every TrainConfig field is an option (`--some-field` for `some_field`), generated
from the dataclass so a field added to TrainConfig is reachable at once. Options
default to None, meaning "not given": the value then comes from the recipe, else
from TrainConfig's default (`training.build_config`), which the help text shows.
The progress bars and the per-epoch summary table are drawn here, from what
`train()` reports and returns.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

import typer

from ..config import TrainConfig, field_kind
from ..errors import UserError
from ..progress import Reporter
from ..utils import child_env
from .common import console, method_names

# (help text, panel) per field; a field missing here still gets an option.
_HELP: dict[str, tuple[str, str]] = {
    "model": ("Zoo name, checkpoint path, or 'scratch' (a fresh --arch). Default: the workspace's current model.",
              "Model and data"),
    "arch": ("Architecture of a checkpoint path (zoo name or package.module:Class); imports and runs that "
             "module. Default: none (a zoo model knows its own).", "Model and data"),
    "arch_kwargs": ("JSON constructor arguments for a package.module:Class --arch, e.g. '{\"width\": 16}'. "
                    "Default: none.", "Model and data"),
    "dataset": ("Dataset to train on. Default: the model's.", "Model and data"),
    "data_dir": ("Folder holding the dataset files. Default: $ADT_FT_DATA, then the workspace's data/.",
                 "Model and data"),
    "train_subset": ("Train on the first N training images only. Default: all of them.", "Model and data"),
    "method": (" | ".join(method_names()) + ".", "Method"),  # every registered method, new ones included
    "loss": ("ce | trades. Default: the method's own (ce for ADT and pgd-at, trades for trades and wdat).", "Method"),
    "scope": ("full | last-layer.", "Method"),
    "head_init": ("keep | reinit the final linear layer.", "Method"),
    "eps": ("Budget: L∞, e.g. 8/255 or 0.031, or an L2 model's L2 radius. Default: the dataset's (0.5 for CIFAR-10 L2).", "Method"),
    "beta": ("TRADES β.", "Method"),
    "epochs": ("Epochs.", "Optimisation"),
    "batch_size": ("Batch size per process: under torchrun each step trains on this × the number of processes.",
                   "Optimisation"),
    "optimizer": ("Optimiser (sgd with momentum).", "Optimisation"),
    "lr": ("Learning rate, used as given whatever the number of processes. Default: 0.01 (full), 0.1 "
           "(last-layer).", "Optimisation"),
    "momentum": ("SGD momentum.", "Optimisation"),
    "weight_decay": ("Weight decay.", "Optimisation"),
    "schedule": ("cosine (per step) | step (gamma at --milestones) | constant.", "Optimisation"),
    "milestones": ("With --schedule step: 1-based epochs from which lr is multiplied by gamma, e.g. 75,90.",
                   "Optimisation"),
    "gamma": ("LR factor at each milestone.", "Optimisation"),
    "adt_lambda": ("Entropy weight λ, on the entropy averaged over its elements (the released code's "
                   "convention). Default: 0.01 (exp, exp-am), 10 (imp-am paper), 1.0 (imp-am hinge).", "ADT"),
    "imp_entropy": ("IMP-AM entropy term: paper (the paper's variational bound) | hinge (the released code's; "
                    "inert once q ignores δ).", "ADT"),
    "imp_hinge": ("IMP-AM hinge threshold (with --imp-entropy hinge).", "ADT"),
    "exp_steps": ("ADT-EXP inner steps T.", "ADT"),
    "exp_samples": ("ADT-EXP Monte Carlo samples k per step.", "ADT"),
    "exp_lr": ("ADT-EXP inner Adam lr.", "ADT"),
    "exp_accumulate_grad": ("Keep (μ, v) gradients across inner steps, as the released code.", "ADT"),
    "gen_width": ("Generator width (residual blocks use 2×).", "ADT"),
    "gen_normalize_gradients": ("Feed the generators g1, g2 (and IMP-AM's z map) divided by their per-example "
                                "mean |·| (adt-ft's default); --no-gen-normalize-gradients feeds them as the "
                                "released code: gradients of the batch-mean CE, z map unscaled.", "ADT"),
    "gen_lr": ("Generator Adam lr.", "ADT"),
    "gen_betas": ("Generator Adam betas, e.g. 0.5,0.999.", "ADT"),
    "z_dim": ("IMP-AM noise dimension.", "ADT"),
    "pgd_steps": ("PGD-AT attack steps.", "Baselines"),
    "trades_steps": ("TRADES attack steps.", "Baselines"),
    "step_size": ("Baseline attack step. Default: ε/4.", "Baselines"),
    "wdat_budget": ("wdat: the W_2 budget δ (l∞ ground cost) split over the images. Default: the dataset's ε (our "
                    "guess).",
                    "WDAT"),
    "wdat_steps": ("wdat: PGD steps inside each image's budget (our guess: TRADES' 10).", "WDAT"),
    "wdat_ratio": ("wdat: PGD step = ratio·δ_i/steps (the W-PGD authors' code).", "WDAT"),
    "wdat_split_loss": ("wdat: redlr | ce, the loss whose input gradients split δ into per-image budgets "
                        "(our guess: redlr).", "WDAT"),
    "wdat_upsilon_images": ("wdat: Υ over the first N training images, never augmented (our guess: 10000; "
                            "capped at the training set).", "WDAT"),
    "wdat_upsilon_every": ("wdat: recompute Υ every N optimisation steps (our guess: 100).", "WDAT"),
    "wdat_cap": ("wdat: cap on one image's budget, as a multiple of δ; what a capped image cannot use goes to "
                 "the others (our guess: 2).", "WDAT"),
    "weight_perturb": ("Fine-tuning protocol: before training, add σ·rms(w)·N(0, 1) to every trained weight "
                       "tensor (our guess of the size; default 0: off). See also --head-init reinit.", "WDAT"),
    "max_steps": ("Stop after N optimisation steps (smoke runs; the schedule stays the full run's). "
                  "Default: no limit.", "Run"),
    "seed": ("Seed for initialisation, data order and the methods' randomness.", "Run"),
    "device": ("cpu, cuda, cuda:N or auto.", "Run"),
    "amp": ("bf16 mixed precision (autocast).", "Run"),
    "workers": ("DataLoader worker processes.", "Run"),
    "run_name": ("Run folder name under runs/ (default: <time>-<method>-<loss>-<scope>).", "Run"),
    "recipe": ("Recipe name from 'adt-ft recipes' or a YAML file; flags override it. Default: none.", "Run"),
    "checkpoint_every": ("Also checkpoint every N steps within an epoch (default: every 10 minutes).", "Run"),
    "sync_bn": ("Under torchrun with --scope full: BatchNorm statistics over the whole batch across processes "
                "(SyncBatchNorm) instead of each process's share.", "Processes"),
    "example_seeds": ("Keyed randomness: each image's random start from (seed, epoch, image), the step's other "
                      "draws from (seed, step, process), so a step does not depend on how its batch is split; "
                      "always on with more than one process.", "Processes"),
}

def _cli_type(name: str) -> type:
    kind = field_kind(name)
    # Lists, pairs and mappings are typed as text on the command line and parsed in _from_cli.
    return kind if kind in (bool, int, float) else str


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _from_cli(name: str, value: Any) -> Any:
    """Turn a command-line string into the field's value (lists, pairs, mappings)."""
    kind = field_kind(name)
    if not isinstance(value, str) or kind is str:
        return value
    if kind is dict:
        from ..utils import parse_json_object

        return parse_json_object(value, _flag(name))
    try:
        if kind is list:
            return [int(v) for v in value.split(",") if v.strip()]
        if kind is tuple:
            return tuple(float(v) for v in value.split(","))
    except ValueError:
        example = {list: "75,90", tuple: "0.5,0.999"}[kind]
        raise UserError(f"{_flag(name)} {value!r} does not parse: give e.g. {example}") from None
    return value


def _number_text(value: float) -> str:
    """2e-4 rather than 0.0002, 0.9 rather than 0.90000."""
    if value and abs(value) < 1e-3:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    return f"{value:g}"


def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(_number_text(v) if isinstance(v, float) else str(v) for v in value) or "none"
    return _number_text(value) if isinstance(value, float) else str(value)


def _with_default(name: str, help_text: str) -> str:
    """The help text, ending with TrainConfig's default unless the text already says what it is."""
    if "default" in help_text.lower():
        return help_text
    f = TrainConfig.__dataclass_fields__[name]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return help_text if default is None else f"{help_text} (default {_default_text(default)})"


def _config_parameters() -> list[inspect.Parameter]:
    params = []
    for f in fields(TrainConfig):
        help_text, panel = _HELP.get(f.name, (f"TrainConfig.{f.name}.", "Other"))
        help_text = _with_default(f.name, help_text)
        kind = _cli_type(f.name)
        decls = [f"{_flag(f.name)}/--no-{f.name.replace('_', '-')}"] if kind is bool else [_flag(f.name)]
        option = typer.Option(None, *decls, help=help_text, rich_help_panel=panel, show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=Optional[kind]))
    return params


class _MessagesOnly(Reporter):
    """--no-progress: the run's header and notices, no progress bars."""

    def message(self, text: str) -> None:
        console.print(text, highlight=False, soft_wrap=True, markup=False)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def print_summary(result: Any, *, diagnostics: bool = True) -> None:
    """The per-epoch table of a finished run (from `RunResult.history`), with the method's
    epoch diagnostics as extra columns when it reports any (and `diagnostics`), and where the model is."""
    from rich.table import Table

    history = result.history
    names = list(dict.fromkeys(k for r in history for k in r.get("diagnostics", {}))) if diagnostics else []
    table = Table(title=f"run {result.run_id}", title_justify="left")
    for col in ("epoch", "lr", "loss", "clean acc", "adv acc", "time", *names):
        table.add_column(col, justify="right")
    for r in history:
        extra = [f"{r['diagnostics'][k]:.4g}" if k in r.get("diagnostics", {}) else "-" for k in names]
        table.add_row(str(r["epoch"]) + ("*" if r.get("partial") else ""), f"{r['lr']:.4g}", f"{r['loss']:.4f}",
                      _pct(r.get("clean_acc")), _pct(r.get("adv_acc")), f"{r['time_s']:.1f}s", *extra)
    console.print(table)
    if any(r.get("partial") for r in history):
        console.print("* stopped by --max-steps before the end of the epoch")
    console.print(f"model: {result.path / 'model.pt'}", highlight=False, soft_wrap=True)


def _option_args(kwargs: dict[str, Any]) -> list[str]:
    """The command line that gives these parsed options again (for the processes torchrun starts)."""
    import json

    args: list[str] = []
    for name, value in kwargs.items():
        if value is None or name in ("resume", "run", "workspace", "progress", "nproc"):
            continue
        if isinstance(value, bool):
            args.append(_flag(name) if value else "--no-" + name.replace("_", "-"))
        else:
            args += [_flag(name), json.dumps(value) if isinstance(value, dict) else str(value)]
    args += ["--workspace", str(kwargs["workspace"]), "--progress" if kwargs["progress"] else "--no-progress"]
    if kwargs["resume"]:
        args += ["--resume"] + ([str(kwargs["run"])] if kwargs["run"] is not None else [])
    return args


def _launch(nproc: int, kwargs: dict[str, Any]) -> None:
    """`adt-ft train --nproc N`: the same command under `torchrun --standalone --nproc-per-node N`."""
    import os
    import signal
    import subprocess
    import sys

    if os.environ.get("WORLD_SIZE"):
        raise UserError("--nproc starts torchrun itself: drop it when the command already runs under torchrun")
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    _check_before_launch(nproc, kwargs)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "adt_finetune", "train", *_option_args(kwargs)]
    proc = subprocess.Popen(command, env=child_env())  # never imports from the current folder
    # A Ctrl-C reaches torchrun from the terminal itself, and torchrun passes it on to the
    # processes, which stop after their step with a checkpoint: this process only waits
    # (interrupting it would kill torchrun before it could). A SIGTERM is passed on.
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: None),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code:
        raise typer.Exit(code)


def _check_before_launch(nproc: int, kwargs: dict[str, Any]) -> None:
    """Refuse here what every process would refuse: under torchrun a refusal comes wrapped in its
    ChildFailedError banner (a traceback, exit 1) instead of one line."""
    from ..training import build_config, validate_config
    from ..training.start import resume_target
    from ..workspace import Workspace

    given = {k: _from_cli(k, v) for k, v in kwargs.items() if v is not None and k in TrainConfig.field_names()}
    _check_resume_args(given, kwargs["resume"], kwargs["run"])
    if not kwargs["resume"]:
        recipe = given.pop("recipe", None)
        validate_config(build_config(recipe, given, workspace=kwargs["workspace"]))
        return
    info, _ = resume_target(TrainConfig().updated(given), Workspace(kwargs["workspace"]), kwargs["run"])
    recorded = int(info.meta.get("world_size", 1))
    if recorded != nproc:
        raise UserError(f"run {info.id} was trained by {recorded} process(es), --nproc is {nproc}: the global batch "
                        f"would change; resume it with --nproc {recorded}")


def _check_resume_args(given: dict[str, Any], resume: bool, run: str | None) -> None:
    from ..training import RESUME_OVERRIDABLE

    if run is not None and not resume:
        raise UserError(f"unexpected argument {run!r}: a run id is only taken after --resume")
    ignored = sorted(set(given) - set(RESUME_OVERRIDABLE)) if resume else []
    if ignored:
        raise UserError(f"--resume continues a run with its recorded settings: drop {_flag(ignored[0])} "
                        f"(only {', '.join(_flag(k) for k in RESUME_OVERRIDABLE)} may change)")


def _train(kwargs: dict[str, Any]) -> None:
    """The parsed flags (one per TrainConfig field, None: not given) become a TrainConfig here, once."""
    from ..distributed import is_main_process
    from ..training import RESUME_OVERRIDABLE, build_config, train
    from .report import RichReporter

    nproc: int | None = kwargs.pop("nproc")
    if nproc is not None:
        return _launch(nproc, {**kwargs, "nproc": nproc})
    resume: bool = kwargs.pop("resume")
    run: str | None = kwargs.pop("run")
    workspace: Path = kwargs.pop("workspace")
    progress: bool = kwargs.pop("progress")
    given = {k: _from_cli(k, v) for k, v in kwargs.items() if v is not None}
    main_rank = is_main_process()
    reporter = RichReporter() if progress else _MessagesOnly()
    try:
        result = _run(train, build_config, RESUME_OVERRIDABLE, given, resume, run, workspace, reporter)
    except UserError:
        if not main_rank:  # rank 0 says it, once
            raise typer.Exit(2) from None
        raise
    if not main_rank:
        return
    print_summary(result)
    console.print(f"run {result.run_id} finished: {result.path}\nevaluate it with: adt-ft eval", highlight=False,
                  soft_wrap=True)


def _run(train: Any, build_config: Any, overridable: tuple[str, ...], given: dict[str, Any], resume: bool,
         run: str | None, workspace: Path, reporter: Reporter) -> Any:

    _check_resume_args(given, resume, run)
    if resume:
        cfg = TrainConfig().updated(given)
        return train(cfg, workspace=workspace, reporter=reporter, resume=run if run is not None else True)
    recipe = given.pop("recipe", None)
    cfg = build_config(recipe, given, workspace=workspace)
    return train(cfg, workspace=workspace, reporter=reporter)


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
            False, "--resume", help="Continue a stopped run from its checkpoint (RUN, default: the latest unfinished "
            "run).",
            rich_help_panel="Run")),
        inspect.Parameter("run", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=typer.Argument(
            None, metavar="[RUN]", help="With --resume: the run id or folder to continue.", show_default=False)),
        inspect.Parameter("workspace", inspect.Parameter.KEYWORD_ONLY, annotation=Path, default=typer.Option(
            Path("."), "--workspace", "-w", file_okay=False, help="Workspace folder (models/, runs/, leaderboard/).",
            rich_help_panel="Run")),
        inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            True, "--progress/--no-progress", help="Progress bars on stderr (the summary table is printed either "
            "way).", rich_help_panel="Run")),
        inspect.Parameter("nproc", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[int], default=typer.Option(
            None, "--nproc", help="Train on N processes on this machine: runs this command under 'torchrun "
            "--standalone --nproc-per-node N' (one per GPU; --batch-size is per process). Default: this process "
            "alone; for several machines call torchrun yourself (README, \"Scaling out\").",
            rich_help_panel="Processes", show_default=False)),
    ]

    def train_command(**kwargs: Any) -> None:
        """Fine-tune the current model (or --model) with an ADT method or a baseline, into runs/<id>/."""
        _train(kwargs)

    train_command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    train_command.__annotations__ = {p.name: p.annotation for p in params}
    app.command("train")(train_command)
    app.command("recipes")(_recipes)
