"""The run folder as training writes it: creation, run.json, metrics.jsonl, the final files.

The layout and what readers may rely on is `adt_finetune.run_folder`; this module is the
only writer. Every write is atomic, so a kill leaves at most a stale `.<name>.*.tmp`
file, which the next start or resume of the run removes.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import run_folder
from ..config import TrainConfig
from ..errors import UserError
from ..utils import atomic_torch_save, atomic_write_json, atomic_write_text, versions
from ..workspace import ModelRef, Workspace, claim

_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete `.<name>.*.tmp` files that an interrupted atomic write left behind."""
    for tmp in run_dir.glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def check_run_name(name: str) -> None:
    if not _RUN_NAME.fullmatch(name):
        raise UserError(f"`run_name` {name!r}: use letters, digits and . _ + - only")


def run_lock(run_dir: Path) -> Path:
    """The lock file a command holds while it writes the run folder `run_dir` (beside it, hidden)."""
    return run_dir.parent / f".{run_dir.name}.lock"


def claim_run(run_dir: Path) -> Any:
    """Own the run folder for this command's life (see `workspace.claim`); one line when another
    command (a train with the same --run-name, or a --resume of the run) holds it."""
    return claim(run_lock(run_dir), f"run {run_dir.name} is being trained by another adt-ft command right now: "
                                    "wait for it to end, or choose another --run-name")


def make_run_dir(ws: Workspace, cfg: TrainConfig) -> tuple[Path, Any]:
    """A new folder under runs/ (--run-name, else <time>-<method>-<loss>-<scope> made unique),
    claimed for this command: returns the folder and the lock to release when the command ends.

    A named folder that exists without a run.json (a start killed before it wrote one)
    is taken over, so the same command works again.
    """
    run_folder.check_runs_dir(ws)
    ws.inside(ws.runs_dir, "the run folder")
    ws.runs_dir.mkdir(parents=True, exist_ok=True)
    remove_abandoned_starts(ws)
    if cfg.run_name:
        check_run_name(cfg.run_name)
        folder = ws.runs_dir / cfg.run_name
        ws.inside(folder, "the run folder")
        lock = claim_run(folder)  # before looking: a live start holds it, a killed one does not
        try:
            folder.mkdir()
        except FileExistsError:
            if not folder.is_dir() or (folder / run_folder.RUN_JSON).exists():
                lock.release()
                raise UserError(f"run {cfg.run_name} already exists: continue it with `resume` {cfg.run_name} "
                                "or choose another `run_name`") from None
            remove_stale_temporaries(folder)
        return folder, lock
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method}-{cfg.loss}-{cfg.scope}"
    for n in range(1, 1000):
        folder = ws.runs_dir / (stem if n == 1 else f"{stem}-{n}")
        try:
            folder.mkdir()  # atomic: two runs started in the same second get different folders
        except FileExistsError:
            continue
        # No run.json before the lock is held, so a --resume of this run cannot start in between.
        return folder, claim_run(folder)
    raise RuntimeError(f"could not create a unique run folder for {stem}")


# A start makes its folder, then claims it: a folder younger than this may be a live start in between.
ABANDONED_AFTER_S = 60


def remove_abandoned_starts(ws: Workspace) -> None:
    """Remove the run folders of starts killed before they wrote run.json: nothing in them can be
    resumed (the settings were never recorded), and no command holds them."""
    for folder in ws.runs_dir.iterdir():
        if folder.is_symlink() or not folder.is_dir() or (folder / run_folder.RUN_JSON).exists():
            continue
        try:
            if time.time() - folder.stat().st_mtime < ABANDONED_AFTER_S:
                continue
            lock = claim_run(folder)
        except (UserError, OSError):  # held by a live command, or gone meanwhile
            continue
        try:
            if not (folder / run_folder.RUN_JSON).exists():
                shutil.rmtree(folder, ignore_errors=True)
        finally:
            lock.release()


def save_init(run_dir: Path, model: nn.Module, cfg: TrainConfig, dataset: str) -> ModelRef:
    """Record a scratch run's random initial weights (init.pt) as its base model."""
    init_path = run_dir / run_folder.INIT
    atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, init_path)
    arch = cfg.arch or ""
    short = re.sub(r"[^A-Za-z0-9_.-]+", "-", arch.split(":")[-1].split(".")[-1])
    return ModelRef(name=f"scratch-{short}", arch=arch, dataset=dataset, path=str(init_path.resolve()),
                    source="scratch", arch_kwargs=dict(cfg.arch_kwargs or {}))


def initial_meta(run_dir: Path, ws: Workspace, cfg: TrainConfig, base_ref: ModelRef, *, eps: float, eps_str: str,
                 device: torch.device, head: str, n_examples: int, steps_per_epoch: int) -> dict[str, Any]:
    """run.json of a run that has just started."""
    return {
        "id": run_dir.name, "status": "running", "created": now(), "finished": None,
        "base_model": run_folder.stored_ref(base_ref, ws.root), "model": None,
        "dataset": cfg.dataset, "threat_model": base_ref.threat_model, "eps": eps, "eps_str": eps_str,
        "method": cfg.method, "loss": cfg.loss, "scope": cfg.scope, "head_init": cfg.head_init,
        "epochs": cfg.epochs, "epochs_done": 0, "seed": cfg.seed, "config": cfg.to_dict(), "recipe": cfg.recipe,
        "versions": versions(), "device": device_name(device), "generator": None,
        "head": head, "train_examples": n_examples, "steps_per_epoch": steps_per_epoch,
        "time_per_epoch_s": [], "diagnostics": [], "final_metrics": {}, "resumed": [],
    }


def write_meta(run_dir: Path, meta: dict[str, Any]) -> None:
    atomic_write_json(run_dir / run_folder.RUN_JSON, meta)


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    # Rewritten whole from the checkpointed history, so a resumed run never duplicates an epoch's line.
    atomic_write_text(run_dir / run_folder.METRICS_JSONL, "".join(json.dumps(r) + "\n" for r in history))


def save_model(run_dir: Path, model: nn.Module) -> Path:
    """model.pt: the plain state dict (`model.load_state_dict(torch.load(p))`)."""
    path = run_dir / run_folder.MODEL
    atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    return path


def save_method_networks(run_dir: Path, method: Any) -> str | None:
    """The method's own networks, written as the method decides (`TrainMethod.save_networks`); the
    name of a generator file for run.json, or None."""
    return method.save_networks(run_dir)


def final_ref(run_dir: Path, meta: dict[str, Any], model_path: Path) -> ModelRef:
    """How `adt-ft eval` and the zoo loader rebuild the fine-tuned model."""
    base = ModelRef.from_dict(meta["base_model"])
    return ModelRef(name=run_dir.name, arch=base.arch, dataset=base.dataset, threat_model=base.threat_model,
                    path=str(model_path.resolve()), source="run", arch_kwargs=dict(base.arch_kwargs))
