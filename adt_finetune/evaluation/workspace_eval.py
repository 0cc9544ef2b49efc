"""`adt-ft eval` as a function: resolve the model and the images, evaluate, write the entry.

Everything that can be refused is refused before the first attack runs: bad
input, a model with non-finite weights, an entry that would overwrite another
one, a workspace where the result could not be written.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..data import default_eps
from ..distributed import World, env_world, first_error, gather_to_main, setup as setup_world, teardown
from ..errors import UserError
from ..leaderboard import check_entry_name, entry_dir, write_entry
from ..perturb.distributional import parse_budgets
from ..progress import Reporter
from ..utils import format_eps, resolve_device
from ..workspace import Workspace
from .corruption_run import SUITE as CORRUPTIONS_SUITE, CorruptionRecord, evaluate_corruptions
from .engine import evaluate_with
from .entry_claims import _check_entry_free, _resume_dir, check_writable, claim_entry, entry_lock
from .eval_request import EvalRequest, EvalSettings
from .result import EvalResult
from .sanity import check_finite_weights
from .shard_files import shard_file_name, write_shard_file
from .shards import CHUNK_SIZE, ShardPart, combine, parse_shard
from .suites import COTRAINED_ATTACKS, needs_training_data, split_attack_list, suite_attacks
from .targets import DEFAULT_N_EXAMPLES, Target, load_attack_training_data, load_examples, resolve_target

_NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-"
#: a custom attack list longer than this is named by a hash in the default entry name
_MAX_LIST_IN_NAME = 40


@dataclass
class EvalRecord:
    target: Target
    result: EvalResult
    baseline: EvalResult | None
    json_path: Path
    csv_path: Path
    suite: str
    data_source: str


def _clean_name(text: str) -> str:
    out = "".join(c if c in _NAME_CHARS else "-" for c in text).strip("-.")
    return out or "entry"


def default_entry_name(model: str, suite: str, *, attacks: list[str] | None = None, eps: float | None = None,
                       n_examples: int | None = None, mode: str = "independent",
                       variant: list[str] | None = None) -> str:
    """`<model>_<suite>[_<variant>]` for a suite, where `variant` names what differs from the suite's
    defaults (see `evaluation_variant`); for a custom attack list `<model>_<attack+attack>_eps<ε>_n<N>
    [_cascade][_<variant>]`. Two different evaluations of one model never default to one entry, and the
    same evaluation run again gets the same name (so it is recognised as already there)."""
    extra = [v for v in (variant or []) if v]
    if attacks is None:
        return _clean_name("_".join([f"{model}_{suite}", *extra]))
    listed = "+".join(a for a in attacks if a != "clean") or "clean"
    if len(listed) > _MAX_LIST_IN_NAME:
        listed = "custom-" + hashlib.sha256(listed.encode()).hexdigest()[:8]
    text = f"{model}_{listed}_eps{format_eps(float(eps))}_n{int(n_examples)}"
    return _clean_name("_".join([text + ("_cascade" if mode == "cascade" else ""), *extra]))


def _short_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:8]


def evaluation_variant(*, custom: bool, eps: float, default_eps: float | None, n_examples: int | None,
                       mode: str = "independent", seed: int = 0, budgets: str | None = None,
                       settings: dict[str, Any] | None = None, amp: bool = False, chunk_size: int = CHUNK_SIZE,
                       data: str | None = None) -> list[str]:
    """The parts of a default entry name that say how an evaluation differs from the defaults: ε, the
    number of images (`n_examples` None means the default) and the mode (for a suite; a custom list
    always names ε and n), the seed, W-PGD budgets, `--set` settings (hashed), bf16 attacks, the chunk
    size and an image folder (hashed)."""
    parts: list[str] = []
    if not custom:
        if default_eps is None or abs(eps - default_eps) > 1e-12:
            parts.append(f"eps{format_eps(eps)}")
        if n_examples is not None and n_examples != DEFAULT_N_EXAMPLES:
            parts.append(f"n{n_examples}")
        if mode == "cascade":
            parts.append("cascade")
    if seed:
        parts.append(f"seed{seed}")
    if budgets:
        parts.append("budgets" + "+".join(format_eps(b) for b in parse_budgets(budgets)))
    if settings:
        parts.append(f"set-{_short_hash(settings)}")
    if amp:
        parts.append("amp")
    if chunk_size != CHUNK_SIZE:
        parts.append(f"chunk{chunk_size}")
    if data:
        parts.append(f"data-{_short_hash(data)}")
    return parts


def _attack_names(suite: str, attacks: str | None, target: Target,
                  attack_settings: dict[str, dict[str, Any]] | None) -> tuple[list[str], str, dict[str, Any]]:
    """The attack list, the suite label, and the settings with each co-trained generator's path filled in."""
    if attacks is not None:
        names, suite_label = split_attack_list(attacks), "custom"
    else:
        names, suite_label = suite_attacks(suite, generator_method=target.generator_method), str(suite).lower()
    settings = {k: dict(v) for k, v in (attack_settings or {}).items()}
    for method, name in COTRAINED_ATTACKS.items():
        if name in names and "path" not in settings.get(name, {}):
            if target.generator_path is None:
                raise UserError(f"attack {name} draws from a run's co-trained generator: evaluate an 'adt-ft train "
                                f"`method` {method}' run, or give `set` {name}.path=RUN/generator.pt")
            settings.setdefault(name, {})["path"] = str(target.generator_path)
    return names, suite_label, settings


@dataclass
class ShardRecord:
    """What one `--shard K/N` job (or `evaluate_workspace(shard=...)`) produced: a shard file."""

    target: Target
    part: ShardPart          # this shard's rows of the evaluated model
    path: Path               # the shard file
    suite: str
    data_source: str


@dataclass
class _Job:
    """One evaluation to run and write, with where this process stands in a split of it."""

    ws: Any
    target: Target
    x: Any
    y: Any
    settings: EvalSettings
    reporter: Reporter | None
    entry: str
    context: dict[str, Any]
    suite: str
    data_source: str
    resume: bool
    shard: tuple[int, int]
    world: World
    shard_dir: Path | None      # --shard jobs: where the shard file goes
    lock: Any = None            # rank 0 of a whole evaluation: its claim on the entry name (claim_entry)

    def partial_dir(self, baseline: bool = False) -> Path:
        t = self.target
        k, n = self.shard
        name = self.entry + (".baseline" if baseline else "") + (f".shard-{k}-of-{n}" if n > 1 else "")
        return _resume_dir(self.ws.root, t.dataset, t.threat_model, name)


def evaluate_workspace(request: EvalRequest, *,
                       reporter: Reporter | None = None) -> EvalRecord | ShardRecord | CorruptionRecord | None:
    """`adt-ft eval` as a function: resolve the model and examples, evaluate (and
    the run's base model with `baseline`), write the leaderboard entry. `suite` (default
    paper) and `attacks` (a comma-separated list) are two ways to say what to run: give one.
    `suite="corruptions"` runs no attack: `corruption_run.evaluate_corruptions`, which returns a
    CorruptionRecord.

        evaluate_workspace(EvalRequest(run="latest-run-id", suite="quick", n_examples=500))

    Partial results go to `<workspace>/.adt-ft/eval/...` after every batch;
    `resume=True` continues from there, otherwise a new evaluation starts. An
    existing entry is replaced only with `overwrite=True`.

    Under torchrun every rank evaluates its chunks (`shards`) and rank 0 writes the
    entry and gets the record; the other ranks get None. With `shard="K/N"` this
    process evaluates shard K of N and writes a shard file (into `shard_dir`, default
    the workspace's partial-results folder) for `merge_shards`; it gets a ShardRecord.
    """
    if str(request.suite).lower() == CORRUPTIONS_SUITE:  # no attacks: its own path (corruption_run)
        return evaluate_corruptions(request, reporter=reporter)
    ws = Workspace(request.workspace)
    spec = parse_shard(request.shard) if request.shard is not None else None
    if spec is not None and env_world()[1] > 1:
        raise UserError("`shard` splits the work into independent jobs; under torchrun the ranks already split it: "
                        "drop `shard` or run without torchrun")
    owns_group = not _group_initialized()
    world = setup_world(resolve_device(request.device))
    job = None
    try:
        job = _prepare_job(ws, world, spec, request, reporter)
        if spec is not None:
            return _shard_job(job, request.overwrite)
        return _evaluate_and_write(job)
    finally:
        if job is not None and job.lock is not None:
            job.lock.release()
        if owns_group:
            teardown(world)


def _group_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _prepare_job(ws, world: World, spec: tuple[int, int] | None, a: EvalRequest, reporter: Reporter | None) -> _Job:
    """Resolve the model, the attacks, ε and the images of the request; check what will be written
    where, before any compute."""
    if a.entry is not None:
        check_entry_name(a.entry)
    target = resolve_target(model=a.model, arch=a.arch, arch_kwargs=a.arch_kwargs, run=a.run, dataset=a.dataset,
                            threat_model=a.threat_model,
                            workspace=ws.root, device=world.device, baseline=a.baseline)
    for t in (target, target.base):
        if t is not None:
            check_finite_weights(t.model, f"model {t.label}")
    names, suite_label, settings = _attack_names(a.suite, a.attacks, target, a.attack_settings)
    eps = a.eps if a.eps is not None else default_eps(target.dataset, target.threat_model)
    if eps is None:
        raise UserError(f"no default ε for dataset {target.dataset} in threat model {target.threat_model}: give `eps`")
    # Built (and so checked) before anything is read or written; the training images join it below.
    engine = EvalSettings(attacks=names, eps=eps, mode=a.mode, batch_size=a.batch_size, seed=a.seed,
                          device=world.device, attack_settings=settings, budgets=a.budgets, amp=a.amp,
                          chunk_size=a.chunk_size, threat_model=target.threat_model)
    x, y, data_source = load_examples(target.dataset, a.dataset, a.n_examples, data_dir=a.data_dir, workspace=ws.root,
                                      preprocessing=target.preprocessing)
    entry_name = a.entry or _default_name(a, target, suite_label, names, eps, len(x))
    if spec is None:  # the entry is written now (by rank 0), not by a later merge
        folder = entry_dir(ws.leaderboard_dir, target.dataset, target.threat_model)
        first_error(world, lambda: (ws.inside(folder, "the leaderboard entry"),
                                    _check_entry_free(folder / f"{entry_name}.json", a.overwrite),
                                    check_writable(folder, "the leaderboard entry")))
    partial = _resume_dir(ws.root, target.dataset, target.threat_model, entry_name).parent
    ws.inside(partial, "partial results")
    check_writable(partial, "partial results")

    context = dict(target.context)
    context.update(suite=suite_label, data=data_source)
    if target.preprocessing is not None:
        context["preprocessing"] = target.preprocessing.record()
    engine = replace(engine, train_data=_training_data(names, target.dataset, a.seed, a.data_dir, ws.root, context))
    shard = spec if spec is not None else (world.rank, world.size)
    shard_dir = Path(a.shard_dir) if a.shard_dir is not None else None
    # Last, so that nothing after it can fail and leave the name claimed: from here to the end of
    # the command no other eval or merge can write this entry.
    lock = None if spec is not None else first_error(
        world, lambda: claim_entry(ws, target.dataset, target.threat_model, entry_name, a.overwrite))
    return _Job(ws, target, x, y, engine, reporter, entry_name, context, suite_label, data_source, a.resume, shard,
                world, shard_dir, lock)


def _default_name(a: EvalRequest, target: Target, suite_label: str, names: list[str], eps: float, n: int) -> str:
    folder = a.dataset is not None and Path(str(a.dataset)).expanduser().is_dir()
    custom = a.attacks is not None
    variant = evaluation_variant(
        custom=custom, eps=eps, default_eps=default_eps(target.dataset, target.threat_model),
        n_examples=a.n_examples, mode=a.mode, seed=a.seed, budgets=a.budgets, settings=a.attack_settings, amp=a.amp,
        chunk_size=a.chunk_size, data=str(Path(str(a.dataset)).expanduser().resolve()) if folder else None)
    return default_entry_name(target.default_entry, suite_label, eps=eps, n_examples=n,
                              attacks=names if custom else None, mode=a.mode, variant=variant)


def _training_data(names: list[str], dataset: str, seed: int, data_dir, root: Path,
                   context: dict[str, Any]) -> tuple[Any, Any] | None:
    """Training images for the attacks that learn first, recorded under the entry's
    `attack_training_data`; None when no attack wants them, or when only attacks that can
    do without them (feature) want them and the training split is not on this machine."""
    learners = needs_training_data(names)
    if not learners:
        return None
    try:
        x_train, y_train, record = load_attack_training_data(dataset, seed=seed, data_dir=data_dir, workspace=root)
    except UserError:
        if needs_training_data(names, required_only=True):
            raise
        return None
    context["attack_training_data"] = dict(record, attacks=learners)
    return x_train, y_train


def _evaluate_parts(job: _Job) -> tuple[ShardPart, ShardPart | None]:
    """This process's shard of the evaluation (and of the base model's, with --baseline)."""
    dirs = [job.ws.inside(d, "partial results") for d in (job.partial_dir(), job.partial_dir(baseline=True))]
    if not job.resume:
        for d in dirs:
            if d.exists():
                shutil.rmtree(d)
    main = evaluate_with(job.target.model, job.x, job.y, job.settings, shard=job.shard, resume_dir=dirs[0],
                         reporter=job.reporter)
    base = None
    if job.target.base is not None:
        base = evaluate_with(job.target.base.model, job.x, job.y, job.settings, shard=job.shard, resume_dir=dirs[1],
                             reporter=job.reporter)
    return main, base


def _evaluate_and_write(job: _Job) -> EvalRecord | None:
    """Evaluate this rank's chunks, gather every rank's flags on rank 0, which writes the entry."""
    parts = _evaluate_parts(job)
    gathered = gather_to_main(job.world, parts)
    # Rank 0 writes; the others wait for its word, so the partial flags outlive a failed write.
    record = first_error(job.world, lambda: _write(job, gathered))
    for d in (job.partial_dir(), job.partial_dir(baseline=True)):
        if d.exists():
            shutil.rmtree(d)
    return record


def _write(job: _Job, gathered: list[tuple[ShardPart, ShardPart | None]]) -> EvalRecord:
    names = [f"rank {r}" for r in range(len(gathered))]
    result = combine([g[0] for g in gathered], names)
    base_result = combine([g[1] for g in gathered], names) if job.target.base is not None else None
    return write_record(job.ws, job.target, job.entry, job.context, job.suite, job.data_source, result,
                        base_result)


def write_record(ws, target: Target, entry_name: str, context: dict[str, Any], suite: str, data_source: str,
                 result: EvalResult, base_result: EvalResult | None) -> EvalRecord:
    """Write the leaderboard entry of a finished evaluation (and drop a stale baseline file)."""
    json_path = write_entry(result, root=ws.leaderboard_dir, dataset=target.dataset,
                            threat_model=target.threat_model, entry=entry_name, info=dict(target.info),
                            context=dict(context), baseline=base_result,
                            baseline_label=target.base.label if target.base is not None else None)
    stale = json_path.with_name(f"{entry_name}.baseline.per-example.csv")
    if base_result is None and stale.exists():  # left by an overwritten entry that had a baseline
        stale.unlink()
    return EvalRecord(target, result, base_result, json_path, json_path.with_name(f"{entry_name}.per-example.csv"),
                      suite, data_source)


def default_shard_dir(ws, dataset: str, threat_model: str, entry: str) -> Path:
    """Where `--shard` jobs put their shard files unless told (--shard-dir)."""
    return _resume_dir(ws.root, dataset, threat_model, entry + ".shards")


def _shard_job(job: _Job, overwrite: bool) -> ShardRecord:
    """One independent job of a split evaluation: evaluate its chunks, write its shard file.
    Its partial flags stay until a merge in this workspace, so a rerun with --resume is instant."""
    t = job.target
    folder = job.shard_dir or job.ws.inside(default_shard_dir(job.ws, t.dataset, t.threat_model, job.entry),
                                            "shard files")
    path = folder / shard_file_name(job.entry, job.shard)
    if path.exists() and not (job.resume or overwrite):
        raise UserError(f"shard {job.shard[0]}/{job.shard[1]} of {job.entry} is already done ({path}): give `resume` "
                        "to keep its flags, `overwrite` to evaluate it again")
    check_writable(folder, "shard files")
    main, base = _evaluate_parts(job)
    meta = {"dataset": t.dataset, "threat_model": t.threat_model, "label": t.label, "info": t.info,
            "context": job.context, "suite": job.suite, "data_source": job.data_source,
            "base": None if t.base is None else {"label": t.base.label, "dataset": t.base.dataset,
                                                 "threat_model": t.base.threat_model, "info": t.base.info}}
    write_shard_file(path, entry=job.entry, main=main, baseline=base, meta=meta)
    return ShardRecord(t, main, path, job.suite, job.data_source)
