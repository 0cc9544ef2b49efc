"""`adt-ft study run` and `status` as functions: a worker takes the study's jobs one by one, in the
plan's order, whenever their inputs are done and no live worker holds them (claims.py); any number
of workers on any number of machines may share one workspace. When every job is done the entries
are copied into the report folder and the report is written.
"""
from __future__ import annotations

import json
import shutil
import statistics
import time
import traceback
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from ..utils import atomic_write_json
from .claims import Claims
from .execute import JobRunner
from .jobs import Job, Progress, entry_name, plan
from .spec import StudySpec


def check_budget(spec: StudySpec, progress: Progress) -> None:
    """Refuse a workspace that holds this study with another budget: done jobs would keep the old one."""
    path = progress.state / "budget.json"
    budget = json.loads(json.dumps(spec.budget(), default=str))
    if path.exists():
        if json.loads(path.read_text()) != budget:
            raise UserError(f"the workspace holds study {spec.name!r} with another budget ({path}): use a new "
                            "workspace, or delete that folder to start the study over")
    else:
        atomic_write_json(path, budget)


@dataclass
class WorkerResult:
    ran: list[str]
    failed: list[str]
    complete: bool           # every job done (the report could be written)


def run_worker(runner: JobRunner, claims: Claims, *, poll_s: float = 10.0, retry_failed: bool = False) -> WorkerResult:
    """Run jobs until none is left that this worker could take; waits while other workers hold the
    jobs that the rest needs. A failed job is recorded (its reason in `status`) and not retried unless
    `retry_failed`; jobs that need it are left undone."""
    spec, progress = runner.spec, runner.progress
    check_budget(spec, progress)
    if retry_failed:
        claims.clear_failures()
    jobs = plan(spec)
    by_key = {j.key: j for j in jobs}
    ran: list[str] = []
    failed: list[str] = []
    while True:
        job, waiting = _next_job(jobs, by_key, progress, claims)
        if job is None:
            if not waiting:
                break
            time.sleep(poll_s)
            continue
        heartbeat, job = job
        try:
            if progress.done(job):  # finished by another worker between the check and the claim
                continue
            claims.log("start", job.key)
            runner.log(f"[{spec.name}] {job.key} ...")
            t = time.perf_counter()
            runner.run(job)
            claims.log("done", job.key, seconds=round(time.perf_counter() - t, 3))
            runner.log(f"[{spec.name}] {job.key}: done in {time.perf_counter() - t:.0f}s")
            ran.append(job.key)
        except UserError as e:
            claims.mark_failed(job.key, str(e))
            failed.append(job.key)
            runner.log(f"[{spec.name}] {job.key}: failed: {e}")
        except Exception as e:  # noqa: BLE001  (any failure of one job must not stop the others)
            (progress.state / "failures").mkdir(parents=True, exist_ok=True)
            (progress.state / "failures" / f"{job.key.replace(':', '--')}.txt").write_text(traceback.format_exc())
            claims.mark_failed(job.key, f"{type(e).__name__}: {e}")
            failed.append(job.key)
            runner.log(f"[{spec.name}] {job.key}: failed: {type(e).__name__}: {e}")
        finally:
            heartbeat.release()
    complete = all(progress.done(j) for j in jobs)
    if complete:
        publish(runner, claims)
    return WorkerResult(ran, failed, complete)


def _next_job(jobs: list[Job], by_key: dict[str, Job], progress: Progress, claims: Claims):
    """((heartbeat, job) or None, whether some job may still become runnable)."""
    waiting = False
    blocked: set[str] = set()
    for job in jobs:
        if progress.done(job):
            continue
        if claims.failure(job.key) or any(d in blocked for d in job.deps):
            blocked.add(job.key)
            continue
        if not all(progress.done(by_key[d]) for d in job.deps):
            waiting = True
            continue
        heartbeat = claims.try_claim(job.key)
        if heartbeat is None:
            waiting = True  # a live worker holds it; it may fail and free what depends on it
            continue
        return (heartbeat, job), True
    return None, waiting


def job_times(claims: Claims) -> dict[str, float]:
    """Seconds per job from the event log (a job resumed after a kill adds its parts)."""
    times: dict[str, float] = {}
    for e in claims.read_events():
        if e.get("event") == "done" and "seconds" in e:
            times[e["job"]] = times.get(e["job"], 0.0) + float(e["seconds"])
    return times


def publish(runner: JobRunner, claims: Claims) -> None:
    """Copy every entry and bench file into the report folder, record the base's rounds and the job
    times (study.json), and write the report."""
    from .tables import write_report

    spec, progress = runner.spec, runner.progress
    out = spec.out
    out.mkdir(parents=True, exist_ok=True)
    src = progress.entry_path("x").parent
    for model in spec.models():
        for kind in ("pointwise", "w", "parts", "audit"):
            for suffix in (".json", ".per-example.csv"):
                f = src / f"{entry_name(spec, model, kind)}{suffix}"
                if f.exists():
                    shutil.copy2(f, out / f.name)
    for scope in spec.seeds:
        if progress.bench_path(scope).exists():
            shutil.copy2(progress.bench_path(scope), out / f"bench-{scope}.json")
    marker = progress.state / "base.json"
    base = json.loads(marker.read_text()) if marker.exists() else {}
    base.pop("ready", None)
    atomic_write_json(out / "study.json", {"base": base, "times": job_times(claims)})
    write_report(spec, out)
    runner.log(f"[{spec.name}] report: {out / 'README.md'}")


def status_rows(spec: StudySpec, progress: Progress, claims: Claims) -> list[dict[str, Any]]:
    """One row per job: state (done, skipped, running on <worker>, failed, waiting, queued), seconds
    spent, and an estimate of the seconds a job still to run will take."""
    times = job_times(claims)
    jobs = plan(spec)
    by_key = {j.key: j for j in jobs}
    rows = []
    for job in jobs:
        holder = claims.holder(job.key)
        if progress.skip_path(job).exists():
            state = "skipped"
        elif progress.done(job):
            state = "done"
        elif holder is not None:
            state = f"running on {holder.get('host')} (pid {holder.get('pid')})"
        elif claims.failure(job.key):
            state = f"failed: {claims.failure(job.key)}"
        elif all(progress.done(by_key[d]) for d in job.deps):
            state = "queued"
        else:
            state = "waiting"
        rows.append({"job": job.key, "state": state, "seconds": times.get(job.key),
                     "estimate": None if state in ("done", "skipped") else _estimate(job, jobs, times, progress)})
    return rows


def _bench_ratio(progress: Progress, scope: str, arm) -> float | None:
    path = progress.bench_path(scope)
    if not path.exists():
        return None
    rows = json.loads(path.read_text()).get("rows", [])
    return next((r.get("ratio") for r in rows if r.get("kind") == "method" and r.get("name") == arm.method
                 and r.get("loss") in (arm.loss, None)), None)


def _estimate(job: Job, jobs: list[Job], times: dict[str, float], progress: Progress) -> float | None:
    """The median time of finished jobs of the same kind (a training run: its arm's runs in its scope);
    for an arm with no finished run yet, the control's runs scaled by the arms' step-time ratio from the
    study's bench; None while nothing comparable has finished."""
    def same(j: Job) -> bool:
        if j.kind != job.kind:
            return False
        if job.kind == "train":
            return j.detail["arm"] == job.detail["arm"] and j.detail["scope"] == job.detail["scope"]
        return j.detail.get("kind") == job.detail.get("kind")

    similar = [times[j.key] for j in jobs if same(j) and j.key in times]
    if similar:
        return statistics.median(similar)
    if job.kind != "train":
        return None
    scope = job.detail["scope"]
    control = progress.spec.control
    done = [times[j.key] for j in jobs if j.kind == "train" and j.detail["arm"] == control
            and j.detail["scope"] == scope and j.key in times]
    ratio, base = _bench_ratio(progress, scope, job.detail["arm"]), _bench_ratio(progress, scope, control)
    if not done or not ratio or not base:
        return None
    return statistics.median(done) * ratio / base
