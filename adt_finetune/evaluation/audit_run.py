"""`adt-ft audit` (and `eval --audit`) as a function: resolve what to audit, audit it, record it
in the leaderboard entry (docs/evaluation.md, "Audit")."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import DATASETS
from ..errors import UserError
from ..leaderboard import find_entry, set_audit
from ..progress import Reporter
from ..utils import parse_eps, resolve_device
from ..workspace import Workspace
from .audit import DEFAULT_AUDIT_EXAMPLES, AuditReport, audit_entry, audit_model
from .engine import images_on
from .targets import load_examples, resolve_target


@dataclass
class AuditRecord:
    report: AuditReport
    label: str                  # what was audited: a model, a run, or an entry
    entry_path: Path | None     # where the audit was recorded (None: an audit of a model alone)


def audit_workspace(*, model: str | None = None, arch: str | None = None, arch_kwargs: dict[str, Any] | None = None,
                    run: str | None = None, entry: str | None = None, surrogate: str | None = None,
                    n_examples: int | None = DEFAULT_AUDIT_EXAMPLES, eps: str | float | None = None,
                    dataset: str | None = None, data_dir: str | Path | None = None, device: str = "auto",
                    batch_size: int = 256, seed: int = 0, checks: list[str] | None = None,
                    workspace: str | Path = ".", write: bool = True, reporter: Reporter | None = None,
                    default_model: bool = False) -> AuditRecord:
    """Audit a model (`model`, `run`, or the workspace's latest run or current model) on the first
    `n_examples` test images, or, with `entry` alone, judge the entry's per-example flags. With an
    entry the audit is recorded under its `adt_ft.audit` (unless `write` is False); `default_model`
    audits the default model (latest run, else current model) even when only `entry` is named. A run's base
    model is the transfer check's surrogate unless `surrogate` names another model."""
    ws = Workspace(workspace)
    found = find_entry(entry, ws.leaderboard_dir) if entry is not None else None
    if found is not None and model is None and run is None and not default_model:
        if checks is not None:
            raise UserError("an entry alone supports only the checks its flags allow: drop the check list, or give "
                            "`model` or `run` with the entry")
        report = audit_entry(found)
        if write:
            set_audit(found.path, report.to_json())
        return AuditRecord(report, f"entry {found.entry}", found.path if write else None)
    if n_examples is not None and n_examples < 1:
        raise UserError(f"`n_examples` must be >= 1, got {n_examples}")
    device = resolve_device(device)
    own_run = model is None and (run is not None or ws.latest_run() is not None)
    target = resolve_target(model=model, arch=arch, arch_kwargs=arch_kwargs, run=run, dataset=dataset,
                            workspace=ws.root, device=device, baseline=own_run and surrogate is None)
    sur, sur_label = (target.base.model, target.base.label) if target.base is not None else (None, None)
    if surrogate is not None:
        other = resolve_target(model=surrogate, dataset=target.dataset, workspace=ws.root, device=device)
        sur, sur_label = other.model, other.label
    if found is not None and found.dataset != target.dataset:
        raise UserError(f"entry {found.entry} is a {found.dataset} entry; the model is a {target.dataset} model")
    eps_value = _eps(eps, found, target.dataset)
    x, y, _ = load_examples(target.dataset, dataset, n_examples, data_dir=data_dir, workspace=ws.root,
                            preprocessing=target.preprocessing)
    x = images_on(x, "cpu")  # the audit's probes take float images
    report = audit_model(target.model, x, y, eps=eps_value, device=device, batch_size=batch_size, seed=seed,
                         surrogate=sur, surrogate_label=sur_label, entry=found.data if found is not None else None,
                         checks=checks, reporter=reporter)
    report.extra["model"] = target.label
    if found is not None and write:
        set_audit(found.path, report.to_json())
        return AuditRecord(report, target.label, found.path)
    return AuditRecord(report, target.label, None)


def _eps(eps, found, dataset: str) -> float:
    """ε as given, else the entry's, else the dataset's default."""
    if eps is not None:
        return parse_eps(eps)
    if found is not None and found.eps is not None:
        return float(found.eps)
    if dataset in DATASETS:
        return float(DATASETS[dataset].eps)
    raise UserError(f"no default ε for dataset {dataset}: give `eps`")
