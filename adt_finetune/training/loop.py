"""The training loop shared by every method: start or resume a run, train it epoch by epoch, finish it.

    from adt_finetune import TrainConfig, train
    result = train(TrainConfig(method="exp-am", epochs=1, train_subset=512))
    result.model, result.path, result.final_metrics

Learning-rate schedules are evaluated per optimisation step (`settings.lr_at`); a
--max-steps smoke run follows the full run's schedule and simply stops early.

Resume is exact (see `session` and `batches`). A checkpoint is written at the end of
each epoch, every `checkpoint_every` steps (default: every 10 minutes), and at the
first Ctrl-C, which finishes the current step before stopping. A checkpoint never
holds nan or inf: weights, buffers and optimiser state are checked every
`FINITE_CHECK_STEPS` steps and before every write, and a diverged run stops with
one line, keeping its last finite checkpoint. A run stopped before its first
checkpoint restarts from the beginning on --resume.
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import runs
from ..config import TrainConfig
from ..data import DatasetInfo, dataset_info, is_image_folder
from ..errors import UserError
from ..progress import Reporter, as_reporter
from ..utils import atomic_torch_save, format_eps, parse_eps, resolve_device, set_seed
from ..workspace import ModelRef, Workspace
from . import rundir
from .batches import probe_batch, train_set
from .session import Position, Session, first_non_finite
from .settings import (RESUME_OVERRIDABLE, config_from_record, lr_at, resolve_loss, resolved, validate_config,
                       with_method_settings)

CHECKPOINT_SECONDS = 600          # default mid-epoch checkpoint interval when checkpoint_every is None
FINITE_CHECK_STEPS = 50           # steps between checks of the weights for nan/inf


@dataclass
class RunResult:
    path: Path                        # the run directory
    run_id: str
    final_metrics: dict[str, Any]
    model: nn.Module                  # the fine-tuned classifier, in eval mode
    model_ref: ModelRef               # how `adt-ft eval` and the zoo loader rebuild it
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch (metrics.jsonl)


class _InterruptGuard:
    """The first Ctrl-C asks the loop to stop after the current step (with a checkpoint);
    a second one stops at once, falling back to the last checkpoint written."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.reporter.message("stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)")

    def __enter__(self) -> "_InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


# ---------------------------------------------------------------- the public entry point

def train(cfg: TrainConfig | None = None, *, workspace: str | Path = ".", reporter: Reporter | None = None,
          resume: str | Path | bool | None = None, on_step: Callable[[int], None] | None = None) -> RunResult:
    """Fine-tune a classifier with cfg.method and return the finished run.

    cfg.model: None (the workspace's current model), a zoo name (pulled), a
    checkpoint path (with cfg.arch), or "scratch" (a freshly initialised cfg.arch,
    e.g. the paper's from-scratch recipes). A named model becomes the workspace's
    current model, as `adt-ft pull` makes it.

    resume: True (the workspace's latest run) or a run id/folder continues that
    run from its checkpoint with its recorded settings (from the beginning when it
    stopped before its first checkpoint); from `cfg` only device, workers,
    checkpoint_every and data_dir are taken, where they differ from the defaults.

    reporter: progress and messages (None: silent). on_step(global_step) is called
    after every optimisation step; raising KeyboardInterrupt from it behaves like
    Ctrl-C (checkpoint, then stop).
    """
    ws = Workspace(workspace)
    runs.check_runs_dir(ws)
    if resume not in (None, False):
        return _resume(cfg, ws, None if resume is True else resume, reporter, on_step)

    cfg = cfg or TrainConfig()
    validate_config(cfg)
    if cfg.run_name:
        rundir.check_run_name(cfg.run_name)
    loss = resolve_loss(cfg)
    device = resolve_device(cfg.device)
    base_ref = _base_model(cfg, ws)
    dataset = cfg.dataset or (base_ref.dataset if base_ref else None)
    if dataset is None:
        raise UserError("--model scratch needs --dataset")
    info = dataset_info(dataset)
    eps = parse_eps(cfg.eps) if cfg.eps is not None else info.eps
    cfg = resolved(cfg, dataset=str(dataset) if is_image_folder(dataset) else info.name, eps=eps, loss=loss)
    session = _start_session(cfg, base_ref, info, device, ws)

    run_dir = rundir.make_run_dir(ws, session.cfg)
    if base_ref is None:
        base_ref = rundir.save_init(run_dir, session.model, session.cfg, info.name)
    meta = rundir.initial_meta(run_dir, ws, session.cfg, base_ref, eps=eps, eps_str=format_eps(eps), device=device,
                               head=session.head_name, n_examples=session.n_examples,
                               steps_per_epoch=session.steps_per_epoch)
    rundir.write_meta(run_dir, meta)
    ws.set_latest_run(run_dir.name)  # so that a bare --resume finds it even if it never finishes
    return _Loop(session, run_dir, meta, Position(), ws, reporter, on_step).run()


def _base_model(cfg: TrainConfig, ws: Workspace) -> ModelRef | None:
    """The model to fine-tune (None: a scratch model, built by the session)."""
    if cfg.model == "scratch":
        return None
    if cfg.model is None:
        return ws.require_current_model()
    from ..zoo import resolve_model

    ref = resolve_model(cfg.model, arch=cfg.arch, arch_kwargs=cfg.arch_kwargs, dataset=cfg.dataset, workspace=ws)
    ws.set_current_model(ref)
    return ref


def _start_session(cfg: TrainConfig, base_ref: ModelRef | None, info: DatasetInfo, device: torch.device,
                   ws: Workspace) -> Session:
    """The session of a run at its very beginning; the same calls in the same order for a
    fresh start and a restart, so both draw the same initial weights and head."""
    data = train_set(cfg, ws)
    set_seed(cfg.seed)
    if base_ref is None:
        from ..zoo import build_architecture

        model = build_architecture(cfg.arch or "", info.name, "Linf", cfg.arch_kwargs)
    else:
        from ..zoo import model_from_ref

        model = model_from_ref(base_ref, device=str(device))
    session = Session(cfg, model, data, info, device, reinit_head=cfg.head_init == "reinit")
    session.cfg = with_method_settings(cfg, session.method)  # record the method's own defaults (λ, step size)
    return session


# ---------------------------------------------------------------- resume

def _resume(cfg: TrainConfig | None, ws: Workspace, run: str | Path | None, reporter: Reporter | None,
            on_step: Callable[[int], None] | None) -> RunResult:
    try:
        info = runs.load_run(run, ws.root, require_finished=False)
    except UserError as e:
        raise UserError(f"nothing to resume: {e}") from None
    if info.finished:
        raise UserError(f"run {info.id} already finished: nothing to resume (start a new run without --resume)")
    recorded = _recorded_config(info, cfg)
    device = resolve_device(recorded.device)
    dinfo = dataset_info(recorded.dataset or info.base_model.dataset)
    rundir.remove_stale_temporaries(info.path)
    ckpt_path = info.path / runs.CHECKPOINT
    meta = dict(info.meta)
    if not ckpt_path.exists():
        # Stopped before its first checkpoint: nothing was learnt yet, so start again from the beginning.
        base_ref = None if recorded.model == "scratch" else info.base_model
        session = _start_session(recorded, base_ref, dinfo, device, ws)
        if base_ref is None:
            rundir.save_init(info.path, session.model, session.cfg, dinfo.name)
        pos = Position()
        note = f"run {info.id} stopped before its first checkpoint: training it from the beginning"
    else:
        ckpt = _read_checkpoint(ckpt_path, info.id)
        set_seed(recorded.seed)
        from ..zoo import model_from_ref

        model = model_from_ref(info.base_model, device=str(device))
        session = Session(recorded, model, train_set(recorded, ws), dinfo, device, reinit_head=False)
        pos = _restore(session, ckpt, ckpt_path, info.id)
        note = f"resuming at epoch {pos.epoch + 1}, step {pos.step_in_epoch} of {session.steps_per_epoch}"
    meta["resumed"] = list(meta.get("resumed", [])) + [{"at": rundir.now(), "global_step": pos.global_step,
                                                        "device": rundir.device_name(device)}]
    meta["config"] = session.cfg.to_dict()
    rundir.write_meta(info.path, meta)
    ws.set_latest_run(info.path.name)
    return _Loop(session, info.path, meta, pos, ws, reporter, on_step, note=note).run()


def _recorded_config(info: runs.RunInfo, cfg: TrainConfig | None) -> TrainConfig:
    """The run's own settings, with those of RESUME_OVERRIDABLE the caller moved away from their defaults."""
    recorded = config_from_record(info.meta.get("config"), f"run.json of run {info.id}")
    if cfg is not None:
        defaults = TrainConfig()
        recorded = replace(recorded, **{k: getattr(cfg, k) for k in RESUME_OVERRIDABLE
                                        if getattr(cfg, k) != getattr(defaults, k)})
    validate_config(recorded)
    return recorded


def _damaged(path: Path, run_id: str, why: str) -> UserError:
    return UserError(f"checkpoint {path} of run {run_id} {why}: delete it and --resume again to restart the run "
                     "from the beginning")


def _read_checkpoint(path: Path, run_id: str) -> dict[str, Any]:
    try:
        # On the CPU: RNG states must be CPU tensors; load_state_dict moves the rest to the parameters' device.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — truncated, not a torch file, or foreign objects: all unusable
        raise _damaged(path, run_id, f"cannot be read ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"position", "model", "optimizer", "method", "rng"} <= set(ckpt):
        raise _damaged(path, run_id, "is not an adt-ft training checkpoint")
    bad = first_non_finite({k: ckpt[k] for k in ("model", "optimizer", "method")})
    if bad is not None:
        raise _damaged(path, run_id, f"holds nan/inf values ({bad})")
    return ckpt


def _restore(session: Session, ckpt: dict[str, Any], path: Path, run_id: str) -> Position:
    try:
        return session.restore(ckpt)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _damaged(path, run_id, f"does not fit this run ({first[:120]})") from None


# ---------------------------------------------------------------- the epoch loop

class _Loop:
    """Trains a session from `pos` to the end of the run, writing checkpoints, metrics and run.json."""

    def __init__(self, s: Session, run_dir: Path, meta: dict[str, Any], pos: Position, ws: Workspace,
                 reporter: Reporter | None, on_step: Callable[[int], None] | None, note: str | None = None):
        self.note = note  # said after the run's header: where a resumed run continues
        self.s, self.cfg, self.run_dir, self.meta, self.pos, self.ws = s, s.cfg, run_dir, meta, pos, ws
        self.reporter = as_reporter(reporter)
        self.on_step = on_step
        self.probe = probe_batch(s.cfg, ws) if s.measures_diagnostics else None
        self.last_checkpoint = time.monotonic()
        self.has_checkpoint = (run_dir / runs.CHECKPOINT).exists()

    def run(self) -> RunResult:
        s, cfg, pos = self.s, self.cfg, self.pos
        self.reporter.message(
            f"run {self.run_dir.name}: {cfg.method} ({cfg.loss} loss, {cfg.scope}, head {cfg.head_init}) on "
            f"{self.meta['base_model']['name']} · {cfg.dataset} ε={self.meta['eps_str']} · {s.n_examples} images, "
            f"{s.steps_per_epoch} steps/epoch · {self.meta['device']}")
        if self.note:
            self.reporter.message(self.note)
        with self.reporter, _InterruptGuard(self.reporter) as guard:
            stopped_early = False
            while pos.epoch < cfg.epochs and not stopped_early:
                stopped_early = self._epoch(guard)
        return self._finish()

    def _reached_max_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.pos.global_step >= self.cfg.max_steps

    def _epoch(self, guard: _InterruptGuard) -> bool:
        """One epoch from the current position; True when --max-steps stopped the run."""
        s, cfg, pos = self.s, self.cfg, self.pos
        key = f"epoch {pos.epoch + 1}/{cfg.epochs}"
        self.reporter.start(key, key, total=s.steps_per_epoch, completed=pos.step_in_epoch,
                            status=_stats(pos.means()))
        started = time.monotonic() - pos.epoch_time_s
        lr = lr_at(cfg, pos.global_step, s.steps_per_epoch)
        stopped_early = False
        for x, y in s.loader(pos.epoch, pos.step_in_epoch):
            lr = lr_at(cfg, pos.global_step, s.steps_per_epoch)
            pos.add(s.step(x, y, lr), len(y))
            pos.step_in_epoch += 1
            pos.global_step += 1
            pos.epoch_time_s = time.monotonic() - started
            self.reporter.advance(key, 1, status=_stats(pos.means()))
            self._after_step(guard)
            if self._reached_max_steps() and pos.step_in_epoch < s.steps_per_epoch:
                stopped_early = True
                break
            if pos.global_step % FINITE_CHECK_STEPS == 0:
                self._check_finite()
            if pos.step_in_epoch < s.steps_per_epoch and self._checkpoint_due():
                self._save_checkpoint()
        self._end_epoch(key, lr, stopped_early)
        return stopped_early or self._reached_max_steps()

    def _after_step(self, guard: _InterruptGuard) -> None:
        if self.on_step is not None:
            try:
                self.on_step(self.pos.global_step)
            except KeyboardInterrupt:
                guard.requested = True
        if guard.requested:
            self._save_checkpoint()
            rundir.write_meta(self.run_dir, self.meta)
            self.reporter.message(f"stopped at epoch {self.pos.epoch + 1}, step {self.pos.step_in_epoch} of "
                                  f"{self.s.steps_per_epoch}; checkpoint saved. Continue with: "
                                  f"adt-ft train --resume {self.run_dir.name}")
            raise KeyboardInterrupt

    def _checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint_every
        if every:
            return self.pos.global_step % every == 0
        return time.monotonic() - self.last_checkpoint >= CHECKPOINT_SECONDS

    def _end_epoch(self, key: str, lr: float, stopped_early: bool) -> None:
        pos = self.pos
        record: dict[str, Any] = {"epoch": pos.epoch + 1, "lr": lr, **pos.means(), "time_s": pos.epoch_time_s,
                                  "steps": pos.step_in_epoch}
        if stopped_early:
            record["partial"] = True
        self._check_finite()  # before the diagnostics: they must not run on a diverged model
        diagnostics = self.s.diagnostics(self.probe)
        if diagnostics:
            record["diagnostics"] = diagnostics
            self.reporter.advance(key, 0, status=f"{_stats(pos.means())}  {_diagnostics_text(diagnostics)}")
        self.reporter.finish(key)
        pos.history.append(record)
        if not stopped_early:
            pos.next_epoch()
        rundir.write_metrics(self.run_dir, pos.history)
        self.meta["epochs_done"] = pos.epoch
        self.meta["time_per_epoch_s"] = [r["time_s"] for r in pos.history]
        self.meta["diagnostics"] = [r.get("diagnostics", {}) for r in pos.history]
        if not stopped_early:
            self._save_checkpoint()
        rundir.write_meta(self.run_dir, self.meta)

    def _check_finite(self) -> None:
        bad = self.s.non_finite()
        if bad is None:
            return
        kept = (f"its last finite checkpoint is kept in {self.run_dir}" if self.has_checkpoint
                else f"no checkpoint had been written yet ({self.run_dir})")
        raise UserError(f"training diverged at epoch {self.pos.epoch + 1}, step {self.pos.step_in_epoch}: {bad} "
                        f"holds nan/inf values; {kept}. Start a new run with a lower --lr (or without --amp)")

    def _save_checkpoint(self) -> None:
        self._check_finite()  # a checkpoint never holds nan/inf: resuming it would only diverge again
        atomic_torch_save(self.s.checkpoint(self.pos), self.run_dir / runs.CHECKPOINT)
        self.has_checkpoint = True
        self.last_checkpoint = time.monotonic()

    def _finish(self) -> RunResult:
        s, pos, meta = self.s, self.pos, self.meta
        self._check_finite()
        model_path = rundir.save_model(self.run_dir, s.model)
        generator = rundir.save_method_networks(self.run_dir, s.method)
        if generator:
            meta["generator"] = generator
        ref = rundir.final_ref(self.run_dir, meta, model_path)
        last = pos.history[-1] if pos.history else {}
        final = {k: v for k, v in last.items() if k not in ("epoch", "time_s", "steps", "partial", "diagnostics")}
        final.update({"epochs_done": pos.epoch, "steps": pos.global_step,
                      "train_time_s": sum(r["time_s"] for r in pos.history)})
        meta.update({"status": "finished", "finished": rundir.now(), "model": runs.stored_ref(ref, self.ws.root),
                     "final_metrics": final, "stopped_early": bool(last.get("partial"))})
        rundir.write_meta(self.run_dir, meta)
        self.ws.set_latest_run(self.run_dir.name)

        for p in s.model.parameters():
            p.requires_grad_(True)  # hand back an ordinary model, whatever the scope froze
        s.model.eval()
        return RunResult(path=self.run_dir, run_id=self.run_dir.name, final_metrics=final, model=s.model,
                         model_ref=ref, history=list(pos.history))


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _stats(means: dict[str, float]) -> str:
    """The running epoch means as a progress bar's status text."""
    return (f"loss {means.get('loss', float('nan')):.3f}  clean {_pct(means.get('clean_acc'))}  "
            f"adv {_pct(means.get('adv_acc'))}")


def _diagnostics_text(diagnostics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in diagnostics.items())
