"""Run directories: the contract between `adt-ft train` and everything that reads its results.

    runs/<run-id>/
        run.json        resolved config, provenance, status ("running" | "finished"), final metrics
        metrics.jsonl   one JSON object per epoch
        checkpoint.pt   latest resumable state (model, optimiser, method, RNG, data position)
        model.pt        final classifier state dict (plain; `model.load_state_dict(torch.load(p))`)
        generator.pt    the method's own networks (ADT-EXP-AM / IMP-AM generators), when it has any
        init.pt         the random initial weights, for `model: scratch` runs only

Readers (evaluation, leaderboard) go through `load_run`/`list_runs` only, never
through the file layout directly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .workspace import ModelRef, Workspace

RUN_JSON = "run.json"
METRICS_JSONL = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
GENERATOR = "generator.pt"
INIT = "init.pt"


@dataclass
class RunInfo:
    path: Path
    meta: dict[str, Any]              # run.json as written
    base_model: ModelRef              # the model the run started from
    model: ModelRef | None            # the fine-tuned weights; None until the run finishes
    generator_path: Path | None       # the method's saved networks (an attack for `adt-ft eval`), if any
    finished: bool

    @property
    def id(self) -> str:
        return self.meta.get("id", self.path.name)

    def metrics(self) -> list[dict[str, Any]]:
        """The per-epoch records of metrics.jsonl, in order."""
        p = self.path / METRICS_JSONL
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / RUN_JSON).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _info(folder: Path, meta: dict[str, Any]) -> RunInfo:
    model = ModelRef.from_dict(meta["model"]) if meta.get("model") else None
    finished = meta.get("status") == "finished" and model is not None and Path(model.path).exists()
    gen = meta.get("generator")
    gen_path = folder / gen if gen and (folder / gen).exists() else None
    return RunInfo(path=folder, meta=meta, base_model=ModelRef.from_dict(meta["base_model"]), model=model,
                   generator_path=gen_path, finished=finished)


def _find_folder(run: str | Path | None, ws: Workspace) -> Path:
    if run is None:
        latest = ws.latest_run()
        if latest is None:
            raise UserError(f"no runs in workspace {ws.root}: train one with 'adt-ft train' or name a run folder")
        return latest
    as_path = Path(run).expanduser()
    if (as_path / RUN_JSON).exists():
        return as_path.resolve()
    by_id = ws.runs_dir / str(run)
    if by_id.exists():
        return by_id
    known = [r.id for r in list_runs(ws.root)][-5:]
    hint = f" (recent: {', '.join(known)})" if known else ""
    raise UserError(f"no run {str(run)!r} in {ws.runs_dir}{hint}: give a run id or a run folder")


def load_run(run: str | Path | None = None, workspace: str | Path = ".", *,
             require_finished: bool = True) -> RunInfo:
    """A run by id, by folder, or (None) the workspace's latest run.

    With `require_finished` (what evaluation wants) a run without final weights is
    a UserError; `--resume` passes False to pick up an unfinished run.
    """
    ws = Workspace(workspace)
    folder = _find_folder(run, ws)
    meta = _read_meta(folder)
    if meta is None or "base_model" not in meta:
        raise UserError(f"{folder} is not a complete run folder (no readable {RUN_JSON}): "
                        "it was interrupted before it started; delete it")
    info = _info(folder, meta)
    if require_finished and not info.finished:
        raise UserError(f"run {info.id} has no final model yet (status {meta.get('status')!r}): "
                        "finish it with 'adt-ft train --resume' first")
    return info


def list_runs(workspace: str | Path = ".") -> list[RunInfo]:
    """Every readable run folder of the workspace, oldest first."""
    runs_dir = Workspace(workspace).runs_dir
    if not runs_dir.is_dir():
        return []
    out = []
    for folder in runs_dir.iterdir():
        meta = _read_meta(folder) if folder.is_dir() else None
        if meta is not None and "base_model" in meta:
            out.append(_info(folder, meta))
    return sorted(out, key=lambda r: (r.meta.get("created", ""), r.id))
