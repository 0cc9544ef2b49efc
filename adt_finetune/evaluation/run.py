"""`adt-ft eval` as a function: resolve the model and the images, evaluate, write the entry.

Everything that can be refused is refused before the first attack runs: bad
input, a model with non-finite weights, an entry that would overwrite another
one, a workspace where the result could not be written.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..progress import Reporter
from .engine import evaluate
from .result import EvalResult
from .sanity import check_finite_weights
from .suites import COTRAINED_ATTACKS, MODES, needs_training_data, parse_attack_list, suite_attacks
from .targets import Target, load_attack_training_data, load_examples, resolve_target

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
                       n_examples: int | None = None, mode: str = "independent") -> str:
    """`<model>_<suite>` for a suite; for a custom attack list, a name that differs whenever
    the attacks, ε, the number of images or the mode differ, so that two evaluations of one
    model never default to one entry: `<model>_<attack+attack>_eps<ε>_n<N>[_cascade]`."""
    if attacks is None:
        return _clean_name(f"{model}_{suite}")
    from ..utils import format_eps

    listed = "+".join(a for a in attacks if a != "clean") or "clean"
    if len(listed) > _MAX_LIST_IN_NAME:
        listed = "custom-" + hashlib.sha256(listed.encode()).hexdigest()[:8]
    text = f"{model}_{listed}_eps{format_eps(float(eps))}_n{int(n_examples)}"
    return _clean_name(text + ("_cascade" if mode == "cascade" else ""))


def _resume_dir(workspace: Path, dataset: str, threat_model: str, entry: str) -> Path:
    return workspace / ".adt-ft" / "eval" / dataset / threat_model / entry


def _blocking_file(folder: Path) -> Path | None:
    """The first part of `folder`'s path that exists and is not a folder, if any."""
    for part in [folder, *folder.parents]:
        if part.exists():
            return None if part.is_dir() else part
    return None


def check_writable(folder: Path, what: str) -> None:
    """Make sure `folder` can hold new files, before any work that would be lost otherwise."""
    blocker = _blocking_file(folder)
    if blocker is not None:
        raise UserError(f"cannot write {what} under {folder}: {blocker} is a file, not a folder; move it away")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write {what} in {folder} ({e.strerror or e}): make it writable or give another "
                        "--workspace") from None


def _check_entry_free(json_path: Path, overwrite: bool) -> None:
    csv_path = json_path.with_name(json_path.stem + ".per-example.csv")
    if not overwrite and (json_path.exists() or csv_path.exists()):
        raise UserError(f"leaderboard entry {json_path.stem} already exists at {json_path}: give --overwrite to "
                        "replace it, or --entry NAME to keep both")


def _attack_names(suite: str, attacks: str | None, target: Target,
                  attack_settings: dict[str, dict[str, Any]] | None) -> tuple[list[str], str, dict[str, Any]]:
    """The attack list, the suite label, and the settings with each co-trained generator's path filled in."""
    if attacks is not None:
        names, suite_label = parse_attack_list(attacks), "custom"
    else:
        names, suite_label = suite_attacks(suite, generator_method=target.generator_method), str(suite).lower()
    settings = {k: dict(v) for k, v in (attack_settings or {}).items()}
    for method, name in COTRAINED_ATTACKS.items():
        if name in names and "path" not in settings.get(name, {}):
            if target.generator_path is None:
                raise UserError(f"attack {name} draws from a run's co-trained generator: evaluate an 'adt-ft train "
                                f"--method {method}' run, or give --set {name}.path=RUN/generator.pt")
            settings.setdefault(name, {})["path"] = str(target.generator_path)
    return names, suite_label, settings


def evaluate_workspace(
    *, model: str | None = None, arch: str | None = None, arch_kwargs: dict[str, Any] | None = None,
    run: str | None = None, suite: str = "paper",
    attacks: str | None = None, n_examples: int | None = None, eps: str | float | None = None,
    mode: str = "independent", batch_size: int = 256, seed: int = 0, device: str = "auto",
    baseline: bool = False, dataset: str | None = None, data_dir: str | Path | None = None,
    budgets: str | None = None, entry: str | None = None, resume: bool = False, workspace: str | Path = ".",
    attack_settings: dict[str, dict[str, Any]] | None = None, reporter: Reporter | None = None, amp: bool = False,
    overwrite: bool = False,
) -> EvalRecord:
    """`adt-ft eval` as a function: resolve the model and examples, evaluate (and
    the run's base model with `baseline`), write the leaderboard entry.

    Partial results go to `<workspace>/.adt-ft/eval/...` after every batch;
    `resume=True` continues from there, otherwise a new evaluation starts. An
    existing entry is replaced only with `overwrite=True`.
    """
    from ..data import DATASETS
    from ..leaderboard import check_entry_name, entry_dir
    from ..utils import parse_eps, resolve_device
    from ..workspace import Workspace

    ws = Workspace(workspace)
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}: choose independent or cascade")
    eps_value = parse_eps(eps) if eps is not None else None
    if entry is not None:
        check_entry_name(entry)
    dev = resolve_device(device)
    target = resolve_target(model=model, arch=arch, arch_kwargs=arch_kwargs, run=run, dataset=dataset,
                            workspace=ws.root, device=dev, baseline=baseline)
    for t in (target, target.base):
        if t is not None:
            check_finite_weights(t.model, f"model {t.label}")
    names, suite_label, settings = _attack_names(suite, attacks, target, attack_settings)
    if eps_value is None:
        eps_value = DATASETS[target.dataset].eps if target.dataset in DATASETS else None
        if eps_value is None:
            raise UserError(f"no default ε for dataset {target.dataset}: give --eps")
    x, y, data_source = load_examples(target.dataset, dataset, n_examples, data_dir=data_dir, workspace=ws.root)
    entry_name = entry or default_entry_name(target.default_entry, suite_label, eps=eps_value, n_examples=len(x),
                                             attacks=names if attacks is not None else None, mode=mode)
    folder = entry_dir(ws.leaderboard_dir, target.dataset, target.threat_model)
    _check_entry_free(folder / f"{entry_name}.json", overwrite)
    main_dir = _resume_dir(ws.root, target.dataset, target.threat_model, entry_name)
    check_writable(folder, "the leaderboard entry")
    check_writable(main_dir.parent, "partial results")

    context = dict(target.context)
    context.update(suite=suite_label, data=data_source)
    train_data = _training_data(names, target.dataset, seed, data_dir, ws.root, context)
    common = dict(amp=amp, attacks=names, eps=eps_value, mode=mode, batch_size=batch_size, seed=seed, device=dev,
                  attack_settings=settings, reporter=reporter, budgets=budgets, train_data=train_data)
    return _evaluate_and_write(ws, target, x, y, common, entry_name, context, suite_label, data_source, resume)


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


def _evaluate_and_write(ws, target: Target, x, y, common: dict[str, Any], entry_name: str, context: dict[str, Any],
                        suite_label: str, data_source: str, resume: bool) -> EvalRecord:
    from ..leaderboard import write_entry

    main_dir = _resume_dir(ws.root, target.dataset, target.threat_model, entry_name)
    base_dir = _resume_dir(ws.root, target.dataset, target.threat_model, entry_name + ".baseline")
    if not resume:
        for d in (main_dir, base_dir):
            if d.exists():
                shutil.rmtree(d)
    result = evaluate(target.model, x, y, resume_dir=main_dir, **common)
    base_result = None
    if target.base is not None:
        base_result = evaluate(target.base.model, x, y, resume_dir=base_dir, **common)

    json_path = write_entry(result, root=ws.leaderboard_dir, dataset=target.dataset,
                            threat_model=target.threat_model, entry=entry_name, info=dict(target.info),
                            context=context, baseline=base_result,
                            baseline_label=target.base.label if target.base is not None else None)
    stale = json_path.with_name(f"{entry_name}.baseline.per-example.csv")
    if base_result is None and stale.exists():  # left by an overwritten entry that had a baseline
        stale.unlink()
    for d in (main_dir, base_dir):
        if d.exists():
            shutil.rmtree(d)
    return EvalRecord(target, result, base_result, json_path, json_path.with_name(f"{entry_name}.per-example.csv"),
                      suite_label, data_source)
