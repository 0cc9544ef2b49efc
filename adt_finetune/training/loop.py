"""The training loop shared by every method: start or resume a run, train it epoch by epoch, finish it.

    from adt_finetune import TrainConfig, train
    result = train(TrainConfig(method="exp-am", epochs=1, train_subset=512))
    result.model, result.path, result.final_metrics

Learning-rate schedules are evaluated per optimisation step (`settings.lr_at`); a
--max-steps smoke run follows the full run's schedule and simply stops early.

Resume is exact (see `session` and `batches`). A checkpoint is written at the end of
each epoch, every `checkpoint_every` steps (default: every 10 minutes), and at the
first Ctrl-C, which finishes the current step before stopping. A checkpoint never
holds nan or inf (nor a negative BatchNorm variance), and neither does a finished
run's model: weights, buffers and optimiser state are checked every
`FINITE_CHECK_STEPS` steps, before every write and before the run finishes, and a
diverged run stops with one line, keeping its last finite checkpoint. A run stopped before its first
checkpoint restarts from the beginning on --resume.

Under torchrun (`start` prepares the run on rank 0 first, `parallel` holds what DDP
changes) every process runs this loop in step; resume is exact for the same number of
processes, and refused for another (the global batch would change).
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import run_folder
from ..config import TrainConfig
from ..distributed import World, any_rank, barrier, main_first, setup as setup_world, teardown
from ..errors import UserError
from ..progress import Reporter, as_reporter
from ..utils import atomic_torch_save, parse_eps, resolve_device
from ..workspace import ModelRef, Workspace
from . import parallel, run_writer, start
from .batches import probe_batch
from .train_config import lr_at, resolve_loss, validate_config

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
    networks: dict[str, nn.Module] = field(default_factory=dict)  # the method's own (ADT generators), eval mode


class _InterruptGuard:
    """The first Ctrl-C asks the loop to stop after the current step (with a checkpoint);
    a second one stops at once, falling back to the last checkpoint written.

    With `terminate` (under torchrun) SIGTERM asks for the same stop and never escalates:
    torchrun passes the signal it gets on to its processes (SIGINT for a Ctrl-C, SIGTERM from
    SLURM's scancel or a preemption) and kills them only after a grace period (30 s), time for
    the step to finish and rank 0 to write the checkpoint. The ranks agree on the stop
    (`_after_step`), so it does not matter which of them got the signal."""

    def __init__(self, reporter: Reporter, terminate: bool = False) -> None:
        self.reporter = reporter
        self.requested = False
        self._signals = [signal.SIGINT, signal.SIGTERM] if terminate else [signal.SIGINT]
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested = True
        self.reporter.message("stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)")

    def __enter__(self) -> "_InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in self._signals}
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)


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

    Under torchrun every process calls this with the same arguments: each trains on its
    share of every batch (cfg.batch_size images; the global batch is that times the world
    size), and only rank 0 writes the run folder and reports (README, "Scaling out").
    """
    ws = Workspace(workspace)
    run_folder.check_runs_dir(ws)
    if resume not in (None, False):
        info, recorded = start.resume_target(cfg, ws, None if resume is True else resume)
        device = resolve_device(recorded.device)

        def prepare(world: World, shared: Any) -> tuple[start.Prepared, Any]:
            return start.resume(info, recorded, ws, world, shared)
    else:
        cfg = cfg or TrainConfig()
        validate_config(cfg)
        eps = parse_eps(cfg.eps) if cfg.eps is not None else None  # the one parse of the budget's text
        if cfg.run_name:
            run_writer.check_run_name(cfg.run_name)
        loss = resolve_loss(cfg)
        device = resolve_device(cfg.device)
        fresh_cfg = cfg

        def prepare(world: World, shared: Any) -> tuple[start.Prepared, Any]:
            return start.fresh(fresh_cfg, loss, eps, ws, world, shared)

    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    world = setup_world(device)
    ready: start.Prepared | None = None
    try:
        ready = main_first(world, lambda shared: prepare(world, shared))
        ready.session.parallelise()
        return _Loop(ready, ws, world, reporter if world.is_main else None, on_step).run()
    finally:
        if ready is not None:
            ready.release()  # the run folder is free for a --resume (or another command) again
        if owns_group:
            teardown(world)


# ---------------------------------------------------------------- the epoch loop

class _Loop:
    """Trains a session from `pos` to the end of the run, writing checkpoints, metrics and run.json.

    Under torchrun every rank runs this loop in step: the decisions that end a step (stop, write a
    checkpoint, diverged) are shared, and only rank 0 writes files, measures diagnostics and reports.
    """

    def __init__(self, ready: start.Prepared, ws: Workspace, world: World, reporter: Reporter | None,
                 on_step: Callable[[int], None] | None):
        s = ready.session
        self.note = ready.note  # said after the run's header: where a resumed run continues
        self.s, self.cfg, self.run_dir, self.meta, self.pos, self.ws = s, s.cfg, ready.run_dir, ready.meta, \
            ready.pos, ws
        self.world = world
        self.main = world.is_main
        self.reporter = as_reporter(reporter)
        self.on_step = on_step
        self.probe = probe_batch(s.cfg, ws) if s.measures_diagnostics and self.main else None
        self.last_checkpoint = time.monotonic()
        self.has_checkpoint = (self.run_dir / run_folder.CHECKPOINT).exists()

    def run(self) -> RunResult:
        s, cfg, pos = self.s, self.cfg, self.pos
        where = self.meta["device"]
        if self.world.distributed:
            size = self.world.size
            where += (f" · {size} process{'es' if size > 1 else ''} × {cfg.batch_size} images = "
                      f"{cfg.batch_size * size} per step ({self.world.backend})")
        self.reporter.message(
            f"run {self.run_dir.name}: {cfg.method} ({cfg.loss} loss, {cfg.scope}, head {cfg.head_init}) on "
            f"{self.meta['base_model']['name']} · {cfg.dataset} ε={self.meta['eps_str']} · {s.n_examples} images, "
            f"{s.steps_per_epoch} steps/epoch · {where}")
        if self.note:
            self.reporter.message(self.note)
        with self.reporter, _InterruptGuard(self.reporter, terminate=self.world.distributed) as guard:
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
        for keys, x, y in s.epoch_data(pos.epoch, pos.step_in_epoch):
            lr = lr_at(cfg, pos.global_step, s.steps_per_epoch)
            pos.add(s.step(x, y, lr, keys, pos.global_step), len(y) * self.world.size)
            pos.step_in_epoch += 1
            pos.global_step += 1
            pos.epoch_time_s = time.monotonic() - started
            self.reporter.advance(key, 1, status=_stats(pos.means()))
            mid_epoch = pos.step_in_epoch < s.steps_per_epoch
            checkpoint_due = self._after_step(guard, mid_epoch)
            if self._reached_max_steps() and mid_epoch:
                stopped_early = True
                break
            if pos.global_step % FINITE_CHECK_STEPS == 0:
                self._check_finite()
            if checkpoint_due:
                self._save_checkpoint()
        self._end_epoch(key, lr, stopped_early)
        return stopped_early or self._reached_max_steps()

    def _after_step(self, guard: _InterruptGuard, mid_epoch: bool) -> bool:
        """Call on_step; stop (with a checkpoint) when asked on any rank; whether a mid-epoch
        checkpoint is due (rank 0's clock decides for every rank)."""
        if self.on_step is not None:
            try:
                self.on_step(self.pos.global_step)
            except KeyboardInterrupt:
                guard.requested = True
        due = self.main and mid_epoch and self._checkpoint_due()
        stop, due = any_rank(self.world, [guard.requested, due])
        if stop:
            self._save_checkpoint()
            self._write(run_writer.write_meta, self.meta)
            launch = f"--nproc {self.world.size} " if self.world.distributed else ""
            self.reporter.message(f"stopped at epoch {self.pos.epoch + 1}, step {self.pos.step_in_epoch} of "
                                  f"{self.s.steps_per_epoch}; checkpoint saved. Continue with: "
                                  f"adt-ft train {launch}--resume {self.run_dir.name}")
            raise KeyboardInterrupt
        return due

    def _write(self, writer: Callable[..., Any], *args: Any) -> Any:
        """writer(run_dir, *args) on rank 0 only: the other ranks write nothing."""
        return writer(self.run_dir, *args) if self.main else None

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
        line = self.s.method.diagnostics_line(diagnostics) if diagnostics else None
        if line:
            self.reporter.message(f"epoch {pos.epoch + 1}: {line}")
        pos.history.append(record)
        if not stopped_early:
            pos.next_epoch()
        self._write(run_writer.write_metrics, pos.history)
        self.meta["epochs_done"] = pos.epoch
        self.meta["time_per_epoch_s"] = [r["time_s"] for r in pos.history]
        self.meta["diagnostics"] = [r.get("diagnostics", {}) for r in pos.history]
        if not stopped_early:
            self._save_checkpoint()
        self._write(run_writer.write_meta, self.meta)

    def _check_finite(self) -> None:
        bad = self.s.non_finite()
        if bad is None:
            return
        kept = (f"its last finite checkpoint is kept in {self.run_dir}" if self.has_checkpoint
                else f"no checkpoint had been written yet ({self.run_dir})")
        raise UserError(f"training diverged at epoch {self.pos.epoch + 1}, step {self.pos.step_in_epoch}: {bad}; "
                        f"{kept}. Start a new run with a lower `lr` (or without `amp`)")

    def _save_checkpoint(self) -> None:
        self._check_finite()  # a checkpoint never holds nan/inf: resuming it would only diverge again
        if self.main:  # every rank holds the same state: rank 0's is the run's
            atomic_torch_save(self.s.checkpoint(self.pos), self.run_dir / run_folder.CHECKPOINT)
        self.has_checkpoint = True
        self.last_checkpoint = time.monotonic()

    def _finish(self) -> RunResult:
        s, pos, meta = self.s, self.pos, self.meta
        self._check_finite()
        if s.sync_bn:
            parallel.revert_sync_bn(s.model)  # hand back the architecture as it was built
        model_path = self.run_dir / run_folder.MODEL
        self._write(run_writer.save_model, s.model)
        generator = self._write(run_writer.save_method_networks, s.method)
        if generator:
            meta["generator"] = generator
        ref = run_writer.final_ref(self.run_dir, meta, model_path)
        last = pos.history[-1] if pos.history else {}
        final = {k: v for k, v in last.items() if k not in ("epoch", "time_s", "steps", "partial", "diagnostics")}
        final.update({"epochs_done": pos.epoch, "steps": pos.global_step,
                      "train_time_s": sum(r["time_s"] for r in pos.history)})
        meta.update({"status": "finished", "finished": run_writer.now(), "model": run_folder.stored_ref(ref, self.ws.root),
                     "final_metrics": final, "stopped_early": bool(last.get("partial"))})
        if self.main:
            run_writer.write_meta(self.run_dir, meta)
            self.ws.set_latest_run(self.run_dir.name)
        barrier(self.world)  # every rank returns once the run is written

        for p in s.model.parameters():
            p.requires_grad_(True)  # hand back an ordinary model, whatever the scope froze
        s.model.eval()
        networks = s.method.modules()
        for m in networks.values():
            m.eval()
        return RunResult(path=self.run_dir, run_id=self.run_dir.name, final_metrics=final, model=s.model,
                         model_ref=ref, history=list(pos.history), networks=dict(networks))


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _stats(means: dict[str, float]) -> str:
    """The running epoch means as a progress bar's status text."""
    return (f"loss {means.get('loss', float('nan')):.3f}  clean {_pct(means.get('clean_acc'))}  "
            f"adv {_pct(means.get('adv_acc'))}")


def _diagnostics_text(diagnostics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in diagnostics.items())
