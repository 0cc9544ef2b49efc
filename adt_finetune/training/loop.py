"""The training loop shared by every method, with run directories and exact resume.

    from adt_finetune import TrainConfig, train
    result = train(TrainConfig(method="exp-am", epochs=1, train_subset=512))
    result.model, result.path, result.final_metrics

Per optimisation step, for every method:

    method.zero_grad(); opt.zero_grad()
    out = method.step(model, x, y)       # the method finds x' (classifier in eval mode) and returns the loss
    out.loss.backward()                  # the only backward through the training loss
    opt.step(); method.after_backward()  # the method steps its own optimisers on that same backward

Learning-rate schedules are evaluated per optimisation step (not per epoch):
cosine anneals from lr to 0 over epochs × steps-per-epoch steps; step multiplies
lr by gamma from each (1-based) epoch listed in milestones on; constant keeps lr. A --max-steps
smoke run follows the full run's schedule and simply stops early.

Resume is exact: the data order of epoch e is a permutation drawn from a generator
seeded by (seed, e), random augmentation is seeded per (seed, epoch, image), and a
checkpoint stores the model, the optimiser, the method's state, every RNG state and
the position inside the epoch. A checkpoint is written at the end of each epoch,
every `checkpoint_every` steps (default: every 10 minutes), and at the first Ctrl-C,
which finishes the current step before stopping.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import random
import re
import signal
import sys
import threading
import time
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .. import runs
from ..config import TrainConfig, find_recipe, read_recipe
from ..data import DatasetInfo, dataset_info, is_image_folder, load_dataset
from ..errors import UserError
from ..nets import find_last_linear
from ..utils import (atomic_torch_save, atomic_write_json, atomic_write_text, format_eps, parse_eps, resolve_device,
                    set_seed, versions)
from ..workspace import ModelRef, Workspace

DEFAULT_LR = {"full": 0.01, "last-layer": 0.1}
SCOPES = ("full", "last-layer")
HEAD_INITS = ("keep", "reinit")
SCHEDULES = ("cosine", "step", "constant")
CHECKPOINT_SECONDS = 600          # default mid-epoch checkpoint interval when checkpoint_every is None
# Settings that may differ when a run is resumed: they change where and how fast it runs, not what it computes.
RESUME_OVERRIDABLE = ("device", "workers", "checkpoint_every", "data_dir")


@dataclass
class RunResult:
    path: Path                        # the run directory
    run_id: str
    final_metrics: dict[str, Any]
    model: nn.Module                  # the fine-tuned classifier, in eval mode
    model_ref: ModelRef               # how `adt-ft eval` and the zoo loader rebuild it
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch (metrics.jsonl)


# ---------------------------------------------------------------- configuration

_HINTS = typing.get_type_hints(TrainConfig)


def _base_kind(hint: Any) -> Any:
    """list for `list[int] | None`, int for `int | None`, str for `str`, ..."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def _coerce(name: str, value: Any, where: str) -> Any:
    """A recipe/flag value checked against the TrainConfig field's type (YAML gives loose types)."""
    if value is None:
        return None
    hint = _HINTS[name]
    kind = _base_kind(hint)

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
        cfg = cfg.updated(values)
        cfg = replace(cfg, recipe=str(recipe))
    if overrides:
        unknown = sorted(set(overrides) - TrainConfig.field_names())
        if unknown:
            raise UserError(f"unknown setting {unknown[0]!r}: valid settings are the options of 'adt-ft train --help'")
        cfg = cfg.updated({k: _coerce(k, v, "option") for k, v in overrides.items()})
    loss_given = "loss" in given_keys
    from ..methods import METHODS

    if cfg.method in METHODS:  # an unknown method is reported by train() with the list of methods
        if not loss_given:
            cfg = replace(cfg, loss=default_loss(cfg.method))
        elif cfg.loss in ("ce", "trades") and cfg.loss not in METHODS[cfg.method].accepts_loss:
            accepts = METHODS[cfg.method].accepts_loss
            raise UserError(f"--loss {cfg.loss} does not apply to --method {cfg.method}: "
                            f"it takes {' or '.join(accepts)}")
    return cfg


def validate_config(cfg: TrainConfig) -> None:
    """UserError for settings that cannot run, before anything is loaded."""
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
    if cfg.head_init not in HEAD_INITS:
        raise UserError(f"unknown head init {cfg.head_init!r}: choose {' or '.join(HEAD_INITS)}")
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {cfg.schedule!r}: choose {', '.join(SCHEDULES)}")
    if cfg.optimizer != "sgd":
        raise UserError(f"unknown optimizer {cfg.optimizer!r}: only sgd (with momentum) is implemented")
    if cfg.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {cfg.workers}")
    if cfg.eps is not None:
        parse_eps(cfg.eps)
    if cfg.model == "scratch" and not cfg.arch:
        raise UserError("--model scratch needs --arch (a zoo name or package.module:Class) to build")


def default_loss(method: str) -> str:
    """The loss a method trains with when none is asked for: its `default_loss` if it
    declares one (wdat: trades), else ce when it accepts ce, else its only loss (trades)."""
    from ..methods import METHODS

    cls = METHODS[method]
    declared = getattr(cls, "default_loss", None)
    if declared:
        return declared
    return "ce" if "ce" in cls.accepts_loss else cls.accepts_loss[0]


def resolve_loss(cfg: TrainConfig) -> str:
    """The training loss: cfg.loss, checked against what the method accepts.

    TrainConfig's default loss is "ce", which the TRADES baseline does not take;
    left at that default with such a method it becomes the method's own, so
    `TrainConfig(method="trades")` works. `build_config` (what the CLI uses) is
    stricter: an explicitly given loss must be accepted, and an absent one is the
    method's `default_loss`.
    """
    from ..methods import METHODS

    if cfg.method not in METHODS:
        raise UserError(f"unknown method {cfg.method!r}: choose from {', '.join(sorted(METHODS))}")
    if cfg.loss not in ("ce", "trades"):
        raise UserError(f"unknown loss {cfg.loss!r}: choose ce or trades")
    accepts = METHODS[cfg.method].accepts_loss
    if cfg.loss == TrainConfig.loss and cfg.loss not in accepts:
        return default_loss(cfg.method)
    if cfg.loss not in accepts:
        raise UserError(f"--loss {cfg.loss} does not apply to --method {cfg.method}: it takes {' or '.join(accepts)}")
    return cfg.loss


def _resolved(cfg: TrainConfig, *, dataset: str, eps: float, loss: str) -> TrainConfig:
    """The config with run-time defaults filled in, as recorded in run.json (λ is filled
    from the method once it is built: the method owns its default)."""
    step_size = cfg.step_size
    if step_size is None and cfg.method in ("pgd-at", "trades"):
        step_size = eps / 4
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.scope]
    # The budget as the user wrote it (or the dataset's '8/255'): formatting a float could round it.
    eps_text = str(cfg.eps) if cfg.eps is not None else format_eps(eps)
    return replace(cfg, dataset=dataset, eps=eps_text, loss=loss, lr=lr, step_size=step_size)


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate for optimisation step `step` (0-based over the whole run)."""
    assert cfg.lr is not None, "lr is filled in by _resolved"
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        # Milestones are 1-based epoch numbers from which the factor applies, as in the ADT/TRADES
        # code's `if epoch >= 75: lr *= 0.1` over epochs 1..76.
        epoch_number = step // steps_per_epoch + 1
        return cfg.lr * cfg.gamma ** sum(1 for m in cfg.milestones if epoch_number >= m)
    total = cfg.epochs * steps_per_epoch
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))


# ---------------------------------------------------------------- model and data

def _resolve_model(cfg: TrainConfig, ws: Workspace) -> ModelRef:
    from .. import zoo

    if cfg.model is None:
        return ws.require_current_model()
    path = Path(cfg.model).expanduser()
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin") or path.exists():
        if not path.exists():
            raise UserError(f"checkpoint {path} does not exist: give an existing file or a zoo name")
        if not cfg.arch:
            raise UserError(f"--model {path} is a checkpoint file: also give --arch (zoo name or package.module:Class)")
        if not cfg.dataset:
            raise UserError(f"--model {path} is a checkpoint file: also give --dataset")
        return zoo.pull_from_file(path, cfg.arch, dataset=cfg.dataset, workspace=ws.root,
                                   arch_kwargs=cfg.arch_kwargs)
    pull_kwargs: dict[str, Any] = {"workspace": ws.root}
    if cfg.dataset:
        pull_kwargs["dataset"] = cfg.dataset
    return zoo.pull(cfg.model, **pull_kwargs)


def _short_arch(arch: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", arch.split(":")[-1].split(".")[-1])


class _SeededAugmentation(Dataset):
    """Seeds torch's RNG per (seed, epoch, index) around each item.

    Random crops and flips then do not depend on which process loads an image or
    when, so a run resumed mid-epoch (with any number of workers) sees the same
    augmented images as an uninterrupted one, and training's own RNG stream is
    untouched by data loading.
    """

    def __init__(self, inner: Dataset, seed: int):
        self.inner = inner
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % (2**63))
            return self.inner[index]


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    # Its own generator per epoch: the data order never depends on how much of the
    # global RNG the method consumed, and epoch e's order is known without replaying e-1.
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    batches = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()  # BatchNorm cannot train on a batch of one image
    return batches


# ---------------------------------------------------------------- RNG state (weights_only-safe)

def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# ---------------------------------------------------------------- the session

@dataclass
class _Position:
    """Where training stands; everything here goes into the checkpoint."""

    epoch: int = 0                    # 0-based epoch in progress
    step_in_epoch: int = 0
    global_step: int = 0
    sums: dict[str, float] = field(default_factory=dict)     # Σ metric·batch size over this epoch so far
    counts: dict[str, int] = field(default_factory=dict)
    epoch_time_s: float = 0.0         # time spent in this epoch before the current process took over
    history: list[dict[str, Any]] = field(default_factory=list)

    def add(self, metrics: dict[str, float], batch: int) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * batch
            self.counts[k] = self.counts.get(k, 0) + batch

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k]}

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "sums": dict(self.sums), "counts": dict(self.counts), "epoch_time_s": self.epoch_time_s,
                "history": list(self.history)}


class _Session:
    """The model, data, optimiser and method of one run, set up identically for a fresh start and a resume."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, train_set: Dataset, info: DatasetInfo,
                 device: torch.device, *, reinit_head: bool):
        from ..methods import MethodContext, make_method

        self.cfg = cfg
        self.device = device
        self.model = model.to(device)
        self.train_set = train_set
        self.augmented = _SeededAugmentation(train_set, cfg.seed) if info.augment != "none" else None
        # Through the seeded wrapper when there is one, so finding the head draws nothing from the global RNG.
        first_image = (self.augmented if self.augmented is not None else train_set)[0][0]
        self.head_name, self.head = find_last_linear(self.model, first_image.unsqueeze(0).to(device))

        if cfg.scope == "last-layer":
            for p in self.model.parameters():
                p.requires_grad_(False)
            for p in self.head.parameters():
                p.requires_grad_(True)
        else:
            for p in self.model.parameters():
                p.requires_grad_(True)
        if reinit_head:
            self.head.reset_parameters()  # seeded: set_seed(cfg.seed) ran before the session was built

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        ctx = MethodContext(eps=parse_eps(cfg.eps), in_channels=info.channels, num_classes=info.num_classes,
                            image_size=info.size, device=device, head=self.head,
                            amp_dtype=torch.bfloat16 if cfg.amp else None)
        self.method = make_method(cfg, ctx)
        self.method.train(True)
        self.n_examples = len(train_set)  # type: ignore[arg-type]
        self.steps_per_epoch = len(_epoch_batches(self.n_examples, cfg.batch_size, cfg.seed, 0))

    def set_train_modes(self) -> None:
        # Methods switch the classifier to eval mode while they search perturbations and
        # restore it; setting the modes every step keeps that contract local.
        if self.cfg.scope == "last-layer":
            self.model.eval()  # frozen body: BatchNorm running statistics stay as loaded
            self.head.train()
        else:
            self.model.train()

    def loader(self, epoch: int, start_step: int) -> DataLoader:
        batches = _epoch_batches(self.n_examples, self.cfg.batch_size, self.cfg.seed, epoch)[start_step:]
        dataset = self.train_set
        if self.augmented is not None:
            self.augmented.epoch = epoch
            dataset = self.augmented
        # A private generator: without one, creating the iterator draws from the global RNG.
        return DataLoader(dataset, batch_sampler=batches, num_workers=self.cfg.workers,
                          pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(0))

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> dict[str, float]:
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.set_train_modes()
        self.method.zero_grad()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp):
            out = self.method.step(self.model, x, y)
        loss = out.loss.item()
        if not math.isfinite(loss):
            raise UserError(f"training diverged (loss {loss}): lower --lr, or drop --amp")
        out.loss.backward()
        self.optimizer.step()
        self.method.after_backward()
        return {"loss": loss, **out.metrics}

    def checkpoint(self, pos: _Position) -> dict[str, Any]:
        return {"format": 1, "position": pos.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "method": self.method.state_dict(), "rng": _rng_state()}

    def restore(self, ckpt: dict[str, Any]) -> _Position:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.method.load_state_dict(ckpt["method"])
        _set_rng_state(ckpt["rng"])
        p = ckpt["position"]
        return _Position(epoch=p["epoch"], step_in_epoch=p["step_in_epoch"], global_step=p["global_step"],
                         sums=dict(p["sums"]), counts=dict(p["counts"]), epoch_time_s=p["epoch_time_s"],
                         history=list(p["history"]))


# ---------------------------------------------------------------- display

def _fmt_pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


class _Display:
    """A rich progress bar per epoch (loss, clean and adversarial training accuracy) and a summary table."""

    def __init__(self, enabled: bool, epochs: int):
        self.enabled = enabled
        self.epochs = epochs
        self.task = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.out = Console()
        self.progress = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True))

    def __enter__(self) -> "_Display":
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.progress.stop()

    def print(self, text: str) -> None:
        if self.enabled:
            self.out.print(text, highlight=False, soft_wrap=True)

    def note(self, text: str) -> None:
        """A message on stderr, above the live progress bars."""
        if self.enabled:
            self.progress.console.print(text, highlight=False, soft_wrap=True)

    @staticmethod
    def _stats(means: dict[str, float]) -> str:
        return (f"loss {means.get('loss', float('nan')):.3f}  clean {_fmt_pct(means.get('clean_acc'))}  "
                f"adv {_fmt_pct(means.get('adv_acc'))}")

    def start_epoch(self, epoch: int, total: int, done: int, means: dict[str, float]) -> None:
        if self.enabled:
            self.task = self.progress.add_task("", total=total, completed=done, epoch=f"{epoch + 1}/{self.epochs}",
                                               stats=self._stats(means))

    def update(self, means: dict[str, float]) -> None:
        if self.enabled and self.task is not None:
            self.progress.update(self.task, advance=1, stats=self._stats(means))

    def summary(self, run_id: str, history: list[dict[str, Any]], model_path: Path) -> None:
        if not self.enabled:
            return
        from rich.table import Table

        table = Table(title=f"run {run_id}", title_justify="left")
        for col in ("epoch", "lr", "loss", "clean acc", "adv acc", "time"):
            table.add_column(col, justify="right")
        for r in history:
            table.add_row(str(r["epoch"]) + ("*" if r.get("partial") else ""), f"{r['lr']:.4g}", f"{r['loss']:.4f}",
                          _fmt_pct(r.get("clean_acc")), _fmt_pct(r.get("adv_acc")), f"{r['time_s']:.1f}s")
        self.out.print(table)
        if any(r.get("partial") for r in history):
            self.out.print("* stopped by --max-steps before the end of the epoch")
        self.out.print(f"model: {model_path}", highlight=False, soft_wrap=True)


class _InterruptGuard:
    """The first Ctrl-C asks the loop to stop after the current step (with a checkpoint);
    a second one stops at once, falling back to the last checkpoint written."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        sys.stderr.write("\nstopping after this step and saving a checkpoint (Ctrl-C again to stop at once)\n")

    def __enter__(self) -> "_InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


# ---------------------------------------------------------------- run directory

def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _make_run_dir(ws: Workspace, cfg: TrainConfig) -> Path:
    ws.runs_dir.mkdir(parents=True, exist_ok=True)
    if cfg.run_name:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", cfg.run_name):
            raise UserError(f"--run-name {cfg.run_name!r}: use letters, digits and . _ + - only")
        folder = ws.runs_dir / cfg.run_name
        try:
            folder.mkdir()
        except FileExistsError:
            raise UserError(f"run {cfg.run_name} already exists: continue it with --resume {cfg.run_name} "
                            "or choose another --run-name") from None
        return folder
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method}-{cfg.loss}-{cfg.scope}"
    for n in range(1, 1000):
        folder = ws.runs_dir / (stem if n == 1 else f"{stem}-{n}")
        try:
            folder.mkdir()  # atomic: two runs started in the same second get different folders
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a unique run folder for {stem}")


def _write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    # Rewritten whole from the checkpointed history, so a resumed run never duplicates an epoch's line.
    atomic_write_text(run_dir / runs.METRICS_JSONL, "".join(json.dumps(r) + "\n" for r in history))


def _save_generator(path: Path, method: Any) -> None:
    try:
        from ..perturb.generators import save_generator  # the ADT methods' own format, when present
    except ImportError:
        atomic_torch_save({"method": method.name,
                           "state_dict": {k: m.state_dict() for k, m in method.modules().items()}}, path)
        return
    save_generator(path, method)


# ---------------------------------------------------------------- the public entry point

def train(cfg: TrainConfig | None = None, *, workspace: str | Path = ".", progress: bool = True,
          resume: str | Path | bool | None = None, on_step: Callable[[int], None] | None = None) -> RunResult:
    """Fine-tune a classifier with cfg.method and return the finished run.

    cfg.model: None (the workspace's current model), a zoo name (pulled), a
    checkpoint path (with cfg.arch and cfg.dataset), or "scratch" (a freshly
    initialised cfg.arch, e.g. the paper's from-scratch recipes).

    resume: True (the workspace's latest run) or a run id/folder continues that
    run from its checkpoint with its recorded settings; from `cfg` only device,
    workers, checkpoint_every and data_dir are taken, where they differ from the defaults.

    on_step(global_step) is called after every optimisation step; raising
    KeyboardInterrupt from it behaves like Ctrl-C (checkpoint, then stop).
    """
    ws = Workspace(workspace)
    if resume not in (None, False):
        return _resume(cfg, ws, None if resume is True else resume, progress, on_step)

    cfg = cfg or TrainConfig()
    validate_config(cfg)
    loss = resolve_loss(cfg)
    device = resolve_device(cfg.device)
    scratch = cfg.model == "scratch"
    base_ref = None if scratch else _resolve_model(cfg, ws)
    dataset = cfg.dataset or (base_ref.dataset if base_ref else None)
    if dataset is None:
        raise UserError("--model scratch needs --dataset")
    info = dataset_info(dataset)
    eps = parse_eps(cfg.eps) if cfg.eps is not None else info.eps
    cfg = _resolved(cfg, dataset=str(dataset) if is_image_folder(dataset) else info.name, eps=eps, loss=loss)
    train_set = _train_set(cfg, ws)

    set_seed(cfg.seed)
    if scratch:
        from ..zoo import build_architecture

        model = build_architecture(cfg.arch, info.name, "Linf", cfg.arch_kwargs)
    else:
        from ..zoo import model_from_ref

        model = model_from_ref(base_ref, device=str(device))
    session = _Session(cfg, model, train_set, info, device, reinit_head=cfg.head_init == "reinit")
    method_lambda = getattr(session.method, "lam", None)
    if cfg.adt_lambda is None and isinstance(method_lambda, (int, float)):
        cfg = session.cfg = replace(cfg, adt_lambda=float(method_lambda))  # record the method's own default

    run_dir = _make_run_dir(ws, cfg)
    if scratch:
        init_path = run_dir / runs.INIT
        atomic_torch_save({k: v.detach().cpu() for k, v in session.model.state_dict().items()}, init_path)
        base_ref = ModelRef(name=f"scratch-{_short_arch(cfg.arch or '')}", arch=cfg.arch or "", dataset=info.name,
                            path=str(init_path.resolve()), source="scratch", arch_kwargs=dict(cfg.arch_kwargs or {}))
    assert base_ref is not None
    meta = {
        "id": run_dir.name, "status": "running", "created": _now(), "finished": None,
        "base_model": base_ref.to_dict(), "model": None,
        "dataset": cfg.dataset, "threat_model": base_ref.threat_model, "eps": eps, "eps_str": format_eps(eps),
        "method": cfg.method, "loss": cfg.loss, "scope": cfg.scope, "head_init": cfg.head_init,
        "epochs": cfg.epochs, "epochs_done": 0, "seed": cfg.seed, "config": cfg.to_dict(), "recipe": cfg.recipe,
        "versions": versions(), "device": _device_name(device), "generator": None,
        "head": session.head_name, "train_examples": session.n_examples, "steps_per_epoch": session.steps_per_epoch,
        "time_per_epoch_s": [], "final_metrics": {}, "resumed": [],
    }
    atomic_write_json(run_dir / runs.RUN_JSON, meta)
    ws.set_latest_run(run_dir.name)  # so that a bare --resume finds it even if it never finishes
    return _run(session, run_dir, meta, _Position(), ws, progress, on_step)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _train_set(cfg: TrainConfig, ws: Workspace) -> Dataset:
    ds = load_dataset(cfg.dataset or "", "train", data_dir=cfg.data_dir, workspace=ws.root, augment=True)
    if cfg.train_subset is not None:
        if cfg.train_subset > len(ds):  # type: ignore[arg-type]
            raise UserError(f"--train-subset {cfg.train_subset} is larger than the training set ({len(ds)} images)")
        ds = Subset(ds, range(cfg.train_subset))
    return ds


def _resume(cfg: TrainConfig | None, ws: Workspace, run: str | Path | None, progress: bool,
            on_step: Callable[[int], None] | None) -> RunResult:
    try:
        info = runs.load_run(run, ws.root, require_finished=False)
    except UserError as e:
        raise UserError(f"nothing to resume: {e}") from None
    if info.finished:
        raise UserError(f"run {info.id} already finished: nothing to resume (start a new run without --resume)")
    ckpt_path = info.path / runs.CHECKPOINT
    if not ckpt_path.exists():
        raise UserError(f"run {info.id} stopped before its first checkpoint: start it again without --resume")
    recorded = TrainConfig().updated(info.meta["config"])
    if cfg is not None:  # only settings the caller moved away from their defaults
        defaults = TrainConfig()
        recorded = replace(recorded, **{k: getattr(cfg, k) for k in RESUME_OVERRIDABLE
                                        if getattr(cfg, k) != getattr(defaults, k)})
    validate_config(recorded)
    device = resolve_device(recorded.device)
    dinfo = dataset_info(recorded.dataset or info.base_model.dataset)
    train_set = _train_set(recorded, ws)

    from ..zoo import model_from_ref

    set_seed(recorded.seed)
    model = model_from_ref(info.base_model, device=str(device))
    session = _Session(recorded, model, train_set, dinfo, device, reinit_head=False)
    # On the CPU: RNG states must be CPU tensors; load_state_dict moves the rest to the parameters' device.
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    pos = session.restore(ckpt)
    meta = dict(info.meta)
    meta["resumed"] = list(meta.get("resumed", [])) + [{"at": _now(), "global_step": pos.global_step,
                                                        "device": _device_name(device)}]
    meta["config"] = recorded.to_dict()
    atomic_write_json(info.path / runs.RUN_JSON, meta)
    ws.set_latest_run(info.path.name)
    return _run(session, info.path, meta, pos, ws, progress, on_step)


def _run(s: _Session, run_dir: Path, meta: dict[str, Any], pos: _Position, ws: Workspace, progress: bool,
         on_step: Callable[[int], None] | None) -> RunResult:
    cfg = s.cfg
    display = _Display(progress, cfg.epochs)
    display.print(f"run {run_dir.name}: {cfg.method} ({cfg.loss} loss, {cfg.scope}, head {cfg.head_init}) on "
                  f"{meta['base_model']['name']} · {cfg.dataset} ε={meta['eps_str']} · {s.n_examples} images, "
                  f"{s.steps_per_epoch} steps/epoch · {meta['device']}")
    if pos.global_step:
        display.print(f"resuming at epoch {pos.epoch + 1}, step {pos.step_in_epoch} of {s.steps_per_epoch}")

    def save_checkpoint() -> None:
        atomic_torch_save(s.checkpoint(pos), run_dir / runs.CHECKPOINT)

    stopped_early = False
    last_checkpoint = time.monotonic()
    with display, _InterruptGuard() as guard:
        while pos.epoch < cfg.epochs and not stopped_early:
            display.start_epoch(pos.epoch, s.steps_per_epoch, pos.step_in_epoch, pos.means())
            started = time.monotonic() - pos.epoch_time_s
            lr = lr_at(cfg, pos.global_step, s.steps_per_epoch)
            for x, y in s.loader(pos.epoch, pos.step_in_epoch):
                lr = lr_at(cfg, pos.global_step, s.steps_per_epoch)
                pos.add(s.step(x, y, lr), len(y))
                pos.step_in_epoch += 1
                pos.global_step += 1
                pos.epoch_time_s = time.monotonic() - started
                display.update(pos.means())
                if on_step is not None:
                    try:
                        on_step(pos.global_step)
                    except KeyboardInterrupt:
                        guard.requested = True
                if guard.requested:
                    save_checkpoint()
                    atomic_write_json(run_dir / runs.RUN_JSON, meta)
                    display.note(f"stopped at epoch {pos.epoch + 1}, step {pos.step_in_epoch} of "
                                 f"{s.steps_per_epoch}; checkpoint saved. Continue with: "
                                 f"adt-ft train --resume {run_dir.name}")
                    raise KeyboardInterrupt
                if cfg.max_steps is not None and pos.global_step >= cfg.max_steps:
                    stopped_early = pos.step_in_epoch < s.steps_per_epoch
                    if stopped_early:
                        break
                if pos.step_in_epoch < s.steps_per_epoch and (
                        (cfg.checkpoint_every and pos.global_step % cfg.checkpoint_every == 0)
                        or (cfg.checkpoint_every is None and time.monotonic() - last_checkpoint >= CHECKPOINT_SECONDS)):
                    save_checkpoint()
                    last_checkpoint = time.monotonic()

            record = {"epoch": pos.epoch + 1, "lr": lr, **pos.means(), "time_s": pos.epoch_time_s,
                      "steps": pos.step_in_epoch}
            if stopped_early:
                record["partial"] = True
            pos.history.append(record)
            if not stopped_early:
                pos.epoch += 1
                pos.step_in_epoch = 0
                pos.sums, pos.counts, pos.epoch_time_s = {}, {}, 0.0
            _write_metrics(run_dir, pos.history)
            meta["epochs_done"] = pos.epoch
            meta["time_per_epoch_s"] = [r["time_s"] for r in pos.history]
            if not stopped_early:
                save_checkpoint()
                last_checkpoint = time.monotonic()
            atomic_write_json(run_dir / runs.RUN_JSON, meta)
            if cfg.max_steps is not None and pos.global_step >= cfg.max_steps:
                stopped_early = True

    return _finish(s, run_dir, meta, pos, ws, display)


def _finish(s: _Session, run_dir: Path, meta: dict[str, Any], pos: _Position, ws: Workspace,
            display: _Display) -> RunResult:
    model_path = run_dir / runs.MODEL
    atomic_torch_save({k: v.detach().cpu() for k, v in s.model.state_dict().items()}, model_path)
    if s.method.modules():
        _save_generator(run_dir / runs.GENERATOR, s.method)
        meta["generator"] = runs.GENERATOR
    base = ModelRef.from_dict(meta["base_model"])
    ref = ModelRef(name=run_dir.name, arch=base.arch, dataset=base.dataset, threat_model=base.threat_model,
                   path=str(model_path.resolve()), source="run", arch_kwargs=dict(base.arch_kwargs))
    last = pos.history[-1] if pos.history else {}
    final = {k: v for k, v in last.items() if k not in ("epoch", "time_s", "steps", "partial")}
    final.update({"epochs_done": pos.epoch, "steps": pos.global_step,
                  "train_time_s": sum(r["time_s"] for r in pos.history)})
    meta.update({"status": "finished", "finished": _now(), "model": ref.to_dict(), "final_metrics": final,
                 "stopped_early": bool(last.get("partial"))})
    atomic_write_json(run_dir / runs.RUN_JSON, meta)
    ws.set_latest_run(run_dir.name)
    display.summary(run_dir.name, pos.history, model_path)

    for p in s.model.parameters():
        p.requires_grad_(True)  # hand back an ordinary model, whatever the scope froze
    s.model.eval()
    return RunResult(path=run_dir, run_id=run_dir.name, final_metrics=final, model=s.model, model_ref=ref,
                     history=list(pos.history))
