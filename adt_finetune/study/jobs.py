"""The jobs of a study and when each is done: the base model, one fine-tuning run per arm × scope ×
seed, the evaluations of every model (pointwise, Wasserstein, AutoAttack's parts, the audit), and
the cost benchmark per scope. A job is done when what it makes exists in the workspace (a
registered model, a finished run, an entry, a bench file), so a killed job simply runs again and
resumes from what it left (a run's checkpoint, an evaluation's saved batches).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..run_folder import load_run
from ..workspace import Workspace
from .spec import StudySpec

#: evaluation kinds and their entry suffixes; the pointwise suffix comes from the study file
KINDS = ("pointwise", "w", "parts", "audit")


@dataclass(frozen=True)
class Job:
    key: str                     # "base", "train:<run>", "eval:<entry>", "bench:<scope>"
    kind: str                    # base | train | eval | bench
    deps: tuple[str, ...] = ()
    model: str | None = None     # the model a train / eval job is about
    detail: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def entry_name(spec: StudySpec, model: str, kind: str) -> str:
    suffix = {"pointwise": spec.pointwise["entry"], "w": "w", "parts": "parts", "audit": "audit"}[kind]
    return f"{model}_{suffix}"


def plan(spec: StudySpec) -> list[Job]:
    """Every job, each after the jobs it needs (the order a single worker runs them in)."""
    jobs = [Job("base", "base", model=spec.base_name)]
    if spec.bench and spec.only is None:  # a partial re-run keeps the study's cost ratios
        jobs += [Job(f"bench:{scope}", "bench", detail={"scope": scope}) for scope in spec.seeds]
    model_job = {spec.base_name: "base"}
    for name, arm, scope, seed in spec.runs():
        if not spec.selected(arm):
            continue
        jobs.append(Job(f"train:{name}", "train", ("base",), model=name,
                        detail={"arm": arm, "scope": scope, "seed": seed}))
        model_job[name] = f"train:{name}"
    models = [m for m in spec.models() if m in model_job]
    kinds = ["w"] if spec.wasserstein else []  # the cheap suite first: its answers come in early
    kinds.append("pointwise")
    for kind in kinds:
        for model in models:
            jobs.append(Job(f"eval:{entry_name(spec, model, kind)}", "eval", (model_job[model],), model=model,
                            detail={"kind": kind}))
    if spec.masking:
        screened = not spec.masking.get("check_all", False)
        for model in models:
            # a screened check needs every model's pointwise and Wasserstein entries to decide
            deps = tuple(f"eval:{entry_name(spec, m, k)}" for m in models for k in kinds) if screened \
                else (model_job[model],)
            jobs.append(Job(f"eval:{entry_name(spec, model, 'parts')}", "eval", deps, model=model,
                            detail={"kind": "parts"}))
    if spec.audit is not None:  # recorded in the model's pointwise entry (adt_ft.audit)
        for model in models:
            jobs.append(Job(f"audit:{model}", "eval", (f"eval:{entry_name(spec, model, 'pointwise')}",),
                            model=model, detail={"kind": "audit"}))
    return jobs


class Progress:
    """What is done, read from the workspace (never from a worker's memory)."""

    def __init__(self, spec: StudySpec, ws: Workspace):
        self.spec, self.ws = spec, ws
        self.state = ws.root / ".adt-ft" / "study" / spec.name

    def entry_path(self, entry: str) -> Path:
        return self.ws.leaderboard_dir / self.spec.dataset / self.spec.threat_model / f"{entry}.json"

    def base_model_path(self) -> Path:
        return self.ws.model_path(self.spec.dataset, self.spec.threat_model, self.spec.base_name)

    def bench_path(self, scope: str) -> Path:
        return self.state / f"bench-{scope}.json"

    def skip_path(self, job: Job) -> Path:
        return self.state / "skipped" / f"{job.key.replace(':', '--')}.json"

    def run_finished(self, run: str) -> bool:
        try:
            return load_run(self.ws.runs_dir / run, self.ws.root, require_finished=False).finished
        except (UserError, OSError):
            return False

    def done(self, job: Job) -> bool:
        if self.skip_path(job).exists():
            return True
        if job.kind == "base":
            marker = self.state / "base.json"
            return marker.exists() and json.loads(marker.read_text()).get("ready", False)
        if job.kind == "train":
            return self.run_finished(job.model)
        if job.kind == "bench":
            return self.bench_path(job.detail["scope"]).exists()
        if job.detail.get("kind") == "audit":
            path = self.entry_path(entry_name(self.spec, job.model, "pointwise"))
            return path.exists() and bool(json.loads(path.read_text()).get("adt_ft", {}).get("audit"))
        return self.entry_path(job.key.split(":", 1)[1]).exists()
