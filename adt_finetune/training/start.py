"""Getting a run ready to train, on every process: a fresh start or a resume.

Each function here runs on rank 0 first and then on the other ranks (`distributed.main_first`):
rank 0 pulls the model, creates the run folder and writes run.json; the others find what it
fetched, take the folder and run.json it shares, and write nothing. No collective runs in here
(the session's DDP wrapper is built afterwards, by `Session.parallelise`), so a rank that fails
cannot leave the others waiting.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .. import run_folder
from ..config import TrainConfig
from ..data import DatasetInfo, dataset_info, default_eps, is_image_folder
from ..distributed import World
from ..errors import UserError
from ..nets import unusable_tensors, unusable_weights
from ..utils import format_eps, parse_eps, set_seed
from ..workspace import ModelRef, Workspace
from ..zoo import build_architecture, model_from_ref, resolve_model
from . import run_writer
from .batches import first_images, train_set
from .run_state import Position, Session, first_non_finite
from .train_config import RESUME_OVERRIDABLE, config_from_record, resolved, validate_config, with_method_settings


@dataclass
class Prepared:
    """A run ready for the epoch loop."""

    session: Session
    run_dir: Path
    meta: dict[str, Any]
    pos: Position
    note: str | None = None           # said after the run's header: where a resumed run continues
    lock: Any = None                  # rank 0: this command's claim on the run folder; released when it ends

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def world_meta(world: World, cfg: TrainConfig) -> dict[str, Any]:
    """What run.json records about the processes: the global batch is per-process batch × world size."""
    return {"world_size": world.size, "global_batch_size": cfg.batch_size * world.size,
            "backend": world.backend or "none"}


# ---------------------------------------------------------------- a fresh run

def fresh(cfg: TrainConfig, loss: str, eps_given: float | None, ws: Workspace, world: World,
          shared: Any) -> tuple[Prepared, Any]:
    """A new run from a validated config and its ε (parsed once by `train`; None: the dataset's);
    rank 0 shares (run folder, run.json) with the others."""
    base_ref = _base_model(cfg, ws, world.is_main)
    if base_ref is not None and base_ref.threat_model not in ("Linf", "L2"):
        # Adversarial training needs a norm ball, which a corruptions model has none of: refused before hours of
        # training (the model itself still evaluates with the corruptions suite).
        raise UserError(f"{base_ref.name} is a RobustBench {base_ref.threat_model} model: adt-ft's training methods "
                        "train in an L∞ or L2 ball, which it has none of; fine-tune a Linf or L2 model")
    dataset = cfg.dataset or (base_ref.dataset if base_ref else None)
    if dataset is None:
        raise UserError("`model` scratch needs `dataset`")
    info = dataset_info(dataset)
    threat_model = base_ref.threat_model if base_ref is not None else "Linf"
    eps = eps_given if eps_given is not None else default_eps(info.name, threat_model)
    if eps is None:
        raise UserError(f"no default ε for {info.name} in threat model {threat_model}: give `eps`")
    cfg = resolved(cfg, dataset=str(dataset) if is_image_folder(dataset) else info.name, eps=eps, loss=loss)
    # Keyed randomness whenever the batch is split: a step then does not depend on the split.
    cfg = replace(cfg, example_seeds=cfg.example_seeds or world.size > 1)
    session = start_session(cfg, base_ref, info, ws, world, eps)
    if not world.is_main:
        run_dir, meta = Path(shared[0]), shared[1]
        return Prepared(session, run_dir, meta, Position()), None

    ws.check_state_writable()  # the run is recorded there at once: refuse before its folder exists
    run_dir, lock = run_writer.make_run_dir(ws, session.cfg)
    try:
        if base_ref is None:
            base_ref = run_writer.save_init(run_dir, session.model, session.cfg, info.name)
        meta = run_writer.initial_meta(run_dir, ws, session.cfg, base_ref, eps=eps, eps_str=format_eps(eps),
                                       device=world.device, head=session.head_name, n_examples=session.n_examples,
                                       steps_per_epoch=session.steps_per_epoch)
        if world.distributed:  # a single process's run.json stays as it always was
            meta.update(world_meta(world, session.cfg))
        run_writer.write_meta(run_dir, meta)
        ws.set_latest_run(run_dir.name)  # so that a bare --resume finds it even if it never finishes
    except BaseException:
        lock.release()
        raise
    return Prepared(session, run_dir, meta, Position(), lock=lock), (str(run_dir), meta)


def _base_model(cfg: TrainConfig, ws: Workspace, main: bool) -> ModelRef | None:
    """The model to fine-tune (None: a scratch model, built by the session). Only rank 0 makes a
    named model the workspace's current one."""
    if cfg.model == "scratch":
        return None
    if cfg.model is None:
        return ws.require_current_model()
    ref = resolve_model(cfg.model, arch=cfg.arch, arch_kwargs=cfg.arch_kwargs, dataset=cfg.dataset, workspace=ws)
    if main:
        ws.set_current_model(ref)
    return ref


def start_session(cfg: TrainConfig, base_ref: ModelRef | None, info: DatasetInfo, ws: Workspace,
                  world: World, eps: float, source: str | None = None) -> Session:
    """The session of a run at its very beginning; the same calls in the same order for a
    fresh start and a restart, so both draw the same initial weights and head. `source`: the
    file `cfg` was read from (a restart's run.json), None when the user gave it."""
    data = train_set(cfg, ws, download=_may_download(cfg, source))
    set_seed(cfg.seed)
    if base_ref is None:
        model = build_architecture(cfg.arch or "", info.name, "Linf", cfg.arch_kwargs, source=source)
    else:
        model = model_from_ref(base_ref, device=str(world.device), source=source)
        bad = unusable_weights(model)
        if bad:  # training it would only report "diverged" at the first step
            raise UserError(f"the base model {base_ref.name} is unusable ({bad[0]}): pull or train a model whose "
                            "weights are finite")
    session = Session(cfg, model, data, info, world.device, eps=eps, reinit_head=cfg.head_init == "reinit",
                      world=world, train_images=partial(first_images, cfg, ws),
                      threat_model=base_ref.threat_model if base_ref is not None else "Linf")
    session.perturb_weights(cfg.weight_perturb, cfg.seed)
    session.cfg = with_method_settings(cfg, session.method)  # record the method's own defaults (λ, step size)
    return session


def _may_download(cfg: TrainConfig, source: str | None) -> bool:
    """Whether a missing dataset may be downloaded: not into a data_dir read from a file (`source`)."""
    return source is None or cfg.data_dir is None


# ---------------------------------------------------------------- resume

def resume_target(cfg: TrainConfig | None, ws: Workspace, run: str | Path | None) -> tuple[run_folder.RunInfo, TrainConfig]:
    """The unfinished run to continue and its recorded settings (read-only: every rank may call it)."""
    try:
        info = run_folder.load_run(run, ws.root, require_finished=False) if run is not None else _latest_unfinished(ws)
    except UserError as e:
        raise UserError(f"nothing to resume: {e}") from None
    if info.finished:
        raise UserError(f"run {info.id} already finished: nothing to resume (start a new run without `resume`)")
    return info, _recorded_config(info, cfg)


def _latest_unfinished(ws: Workspace) -> run_folder.RunInfo:
    """What a bare --resume continues: the latest run if it is unfinished, else the newest unfinished one
    (the latest may have finished since, or a start killed before it was recorded left no latest run)."""
    try:
        latest = run_folder.load_run(None, ws.root, require_finished=False)
    except UserError:
        latest = None
    if latest is not None and not latest.finished:
        return latest
    unfinished = [r for r in run_folder.list_runs(ws.root) if not r.finished]
    if unfinished:
        return unfinished[-1]
    return run_folder.load_run(None, ws.root, require_finished=False)  # its own error, or the finished latest


def resume(info: run_folder.RunInfo, recorded: TrainConfig, ws: Workspace, world: World,
           shared: Any) -> tuple[Prepared, Any]:
    """The session of an unfinished run, restored from its checkpoint (every rank reads the same file)."""
    recorded_world = int(info.meta.get("world_size", 1))
    if recorded_world != world.size:
        launch = (f"in one process: adt-ft train --resume {info.id}" if recorded_world == 1 else
                  f"with {recorded_world} processes: adt-ft train --nproc {recorded_world} --resume {info.id} "
                  f"(or torchrun with {recorded_world} processes in all)")
        raise UserError(f"run {info.id} was trained by {recorded_world} process(es), this is {world.size}: the "
                        f"global batch would change; resume it {launch}")
    lock = _claim_for_resume(info, ws) if world.is_main else None
    try:
        return _resume_claimed(info, recorded, ws, world, shared, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _claim_for_resume(info: run_folder.RunInfo, ws: Workspace) -> Any:
    """Own the run folder for this command (one line when another train or resume does), having
    checked that the folder is in the workspace unless the user named it by its path."""
    if not info.given_as_path:
        ws.inside(info.path, f"run {info.id}")
    lock = run_writer.claim_run(info.path)
    again = run_folder.load_run(info.path, ws.root, require_finished=False)  # it may have ended meanwhile
    if again.finished:
        lock.release()
        raise UserError(f"run {info.id} already finished: nothing to resume (start a new run without `resume`)")
    return lock


def _resume_claimed(info: run_folder.RunInfo, recorded: TrainConfig, ws: Workspace, world: World, shared: Any,
                    lock: Any) -> tuple[Prepared, Any]:
    dinfo = dataset_info(recorded.dataset or info.base_model.dataset)
    eps = _recorded_eps(info, recorded)
    if world.is_main:
        run_writer.remove_stale_temporaries(info.path)
    ckpt_path = info.path / run_folder.CHECKPOINT
    recorded_in = str(info.path / run_folder.RUN_JSON)  # the settings are data from that file, never code
    if not ckpt_path.exists():
        # Stopped before its first checkpoint: nothing was learnt yet, so start again from the beginning.
        base_ref = None if recorded.model == "scratch" else info.base_model
        session = start_session(recorded, base_ref, dinfo, ws, world, eps, source=recorded_in)
        if base_ref is None and world.is_main:
            run_writer.save_init(info.path, session.model, session.cfg, dinfo.name)
        pos = Position()
        note = f"run {info.id} stopped before its first checkpoint: training it from the beginning"
    else:
        ckpt = _read_checkpoint(ckpt_path, info.id)
        set_seed(recorded.seed)
        model = model_from_ref(info.base_model, device=str(world.device), source=recorded_in)
        download = _may_download(recorded, recorded_in)
        data = train_set(recorded, ws, download=download)
        session = Session(recorded, model, data, dinfo, world.device, eps=eps, reinit_head=False, world=world,
                          train_images=partial(first_images, recorded, ws, download=download))
        pos = _restore(session, ckpt, ckpt_path, info.id)
        note = f"resuming at epoch {pos.epoch + 1}, step {pos.step_in_epoch} of {session.steps_per_epoch}"
    if not world.is_main:
        return Prepared(session, info.path, shared, pos, note), None
    meta = dict(info.meta)
    meta["resumed"] = list(meta.get("resumed", [])) + [{"at": run_writer.now(), "global_step": pos.global_step,
                                                        "device": run_writer.device_name(world.device)}]
    meta["config"] = session.cfg.to_dict()
    run_writer.write_meta(info.path, meta)
    ws.set_latest_run(info.path.name)
    return Prepared(session, info.path, meta, pos, note, lock=lock), meta


def _recorded_eps(info: run_folder.RunInfo, recorded: TrainConfig) -> float:
    """The run's ε as its run.json records the number (the text of its config in older files)."""
    value = info.meta.get("eps")
    return parse_eps(value if value is not None else recorded.eps)


def _recorded_config(info: run_folder.RunInfo, cfg: TrainConfig | None) -> TrainConfig:
    """The run's own settings, with those of RESUME_OVERRIDABLE the caller moved away from their defaults."""
    recorded = config_from_record(info.meta.get("config"), f"run.json of run {info.id}")
    if cfg is not None:
        defaults = TrainConfig()
        recorded = replace(recorded, **{k: getattr(cfg, k) for k in RESUME_OVERRIDABLE
                                        if getattr(cfg, k) != getattr(defaults, k)})
    validate_config(recorded)
    return recorded


def _damaged(path: Path, run_id: str, why: str) -> UserError:
    return UserError(f"checkpoint {path} of run {run_id} {why}: delete it and `resume` again to restart the run "
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
    invalid = unusable_tensors(ckpt["model"].items()) if isinstance(ckpt["model"], dict) else []
    if invalid:
        raise _damaged(path, run_id, f"is unusable ({invalid[0]})")
    return ckpt


def _restore(session: Session, ckpt: dict[str, Any], path: Path, run_id: str) -> Position:
    try:
        return session.restore(ckpt)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _damaged(path, run_id, f"does not fit this run ({first[:120]})") from None
