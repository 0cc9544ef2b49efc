"""Run directories: the contract between `adt-ft train` and everything that reads its results.

    runs/<run-id>/
        run.json        resolved config, provenance, status ("running" | "finished"), final metrics
        metrics.jsonl   one JSON object per epoch
        checkpoint.pt   latest resumable state (model, optimiser, method, RNG, data position)
        model.pt        final classifier state dict (plain; `model.load_state_dict(torch.load(p))`)
        generator.pt    the amortised ADT generator (exp-am, imp-am): an attack for `adt-ft eval`
        networks.pt     any other method's own networks ({name: state dict}), when it has any
        init.pt         the random initial weights, for `model: scratch` runs only

Model paths in run.json (base model, model, init) are relative to the workspace
(`runs/<run-id>/model.pt`, `models/...`), so a moved or copied workspace uses its
own files; the run's own files are found in the run's folder wherever it is. A
path outside the workspace stays absolute, and old absolute paths still read.

Readers (evaluation, leaderboard) go through `load_run`/`list_runs` only, never
through the file layout directly.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import UserError
from .workspace import ModelRef, Workspace

RUN_JSON = "run.json"
METRICS_JSONL = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
GENERATOR = "generator.pt"
NETWORKS = "networks.pt"
INIT = "init.pt"


@dataclass
class RunInfo:
    path: Path
    meta: dict[str, Any]              # run.json as written
    base_model: ModelRef              # the model the run started from
    model: ModelRef | None            # the fine-tuned weights; None until the run finishes
    generator_path: Path | None       # the method's saved networks (an attack for `adt-ft eval`), if any
    finished: bool
    given_as_path: bool = False       # named by its folder's path (not by id, not the latest run)

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
        meta = json.loads((folder / RUN_JSON).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("base_model"), dict) else None


def check_runs_dir(ws: Workspace) -> None:
    """UserError when the workspace's runs/ exists but is not a folder."""
    if ws.runs_dir.exists() and not ws.runs_dir.is_dir():
        raise UserError(f"{ws.runs_dir} is a file, not a folder: move it away so that runs can be kept there")


def stored_ref(ref: ModelRef, workspace: str | os.PathLike) -> dict[str, Any]:
    """A ModelRef as run.json records it: its path relative to the workspace when inside it."""
    return Workspace(workspace).ref_to_record(ref)


def _read_ref(d: Any, folder: Path, run_id: str, key: str) -> ModelRef:
    """A ModelRef from run.json with its path made absolute again."""
    ref = ModelRef.from_dict(d, f"{key} in {folder / RUN_JSON}")
    path = Path(ref.path)
    if not ref.path or path.is_absolute():
        return ref
    parts = path.parts
    if len(parts) == 3 and parts[:2] == ("runs", run_id):
        return replace(ref, path=str(folder / parts[2]))  # the run's own file, in the run's folder
    return replace(ref, path=str(folder.parent.parent / path))  # <workspace>/runs/<id>/


def _info(folder: Path, meta: dict[str, Any]) -> RunInfo:
    """The RunInfo of a run folder; UserError when its run.json does not have the expected shape."""
    try:
        return _unchecked_info(folder, meta)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UserError(f"{folder / RUN_JSON} is damaged: delete the run folder or restore the file") from None


def _unchecked_info(folder: Path, meta: dict[str, Any]) -> RunInfo:
    run_id = str(meta.get("id", folder.name))
    model = _read_ref(meta["model"], folder, run_id, "model") if meta.get("model") else None
    finished = meta.get("status") == "finished" and model is not None and Path(model.path).exists()
    gen = meta.get("generator")
    gen_path = folder / gen if gen and (folder / gen).exists() else None
    return RunInfo(path=folder, meta=meta, base_model=_read_ref(meta["base_model"], folder, run_id, "base_model"),
                   model=model, generator_path=gen_path, finished=finished)


def _find_folder(run: str | Path | None, ws: Workspace) -> tuple[Path, bool]:
    """The run's folder, and whether `run` named it by its path."""
    if run is None:
        latest = ws.latest_run()
        if latest is None:
            raise UserError(f"no runs in workspace {ws.root}: train one with 'adt-ft train' or name a run folder")
        return latest, False
    check_runs_dir(ws)
    as_path = Path(run).expanduser()
    if (as_path / RUN_JSON).exists():
        return as_path.resolve(), True
    by_id = ws.runs_dir / str(run)
    if by_id.exists():
        return by_id, False
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
    folder, given_as_path = _find_folder(run, ws)
    meta = _read_meta(folder)
    if meta is None:
        raise UserError(f"{folder} is not a complete run folder (no readable {RUN_JSON}): "
                        "it was interrupted before it started; delete it")
    info = replace(_info(folder, meta), given_as_path=given_as_path)
    if require_finished and not info.finished:
        raise UserError(f"run {info.id} has no final model yet (status {info.meta.get('status')!r}): "
                        "finish it with 'adt-ft train `resume`' first")
    return info


def list_runs(workspace: str | Path = ".") -> list[RunInfo]:
    """Every readable run folder of the workspace, oldest first."""
    runs_dir = Workspace(workspace).runs_dir
    if not runs_dir.is_dir():
        return []
    out = []
    for folder in runs_dir.iterdir():
        meta = _read_meta(folder) if folder.is_dir() else None
        if meta is None:
            continue
        try:
            out.append(_info(folder, meta))
        except UserError:
            continue  # a damaged run.json hides that run from listings; load_run names the problem
    return sorted(out, key=lambda r: (str(r.meta.get("created", "")), str(r.id)))
