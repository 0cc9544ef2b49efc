"""Owning a leaderboard entry's name while a command writes it, and the folders it writes: the claim
(`workspace.claim`), the partial-results folder, and the checks made before any work that would be lost.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..leaderboard import entry_dir
from ..workspace import claim


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
    # Folders made only to test are removed again: an evaluation refused later leaves no empty folders
    # (the writers make their own).
    made = [p for p in [folder, *folder.parents] if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write {what} in {folder} ({e.strerror or e}): make it writable or give another "
                        "`workspace`") from None
    finally:
        for p in made:
            try:
                p.rmdir()
            except OSError:  # not made after all, or another command wrote into it meanwhile
                pass


def entry_lock(root: Path, dataset: str, threat_model: str, entry: str) -> Path:
    """The lock file a command holds while it evaluates or merges into `entry` (beside its partial results)."""
    return _resume_dir(root, dataset, threat_model, entry).with_name(f"{entry}.lock")


def claim_entry(ws, dataset: str, threat_model: str, entry: str, overwrite: bool) -> Any:
    """Own the leaderboard entry name for this command's life (see `workspace.claim`), once sure that
    its folder is inside the workspace and that the entry is free (or `overwrite`); returns the lock."""
    folder = entry_dir(ws.leaderboard_dir, dataset, threat_model)
    ws.inside(folder, "the leaderboard entry")
    lock_path = entry_lock(ws.root, dataset, threat_model, entry)
    ws.inside(lock_path, "partial results")
    lock = claim(lock_path, f"leaderboard entry {entry} is being written by another adt-ft command right now: wait "
                            "for it to end, or give --entry NAME to keep both")
    try:
        _check_entry_free(folder / f"{entry}.json", overwrite)
        check_writable(folder, "the leaderboard entry")
    except BaseException:
        lock.release()
        raise
    return lock


def _check_entry_free(json_path: Path, overwrite: bool) -> None:
    csv_path = json_path.with_name(json_path.stem + ".per-example.csv")
    if not overwrite and (json_path.exists() or csv_path.exists()):
        raise UserError(f"leaderboard entry {json_path.stem} already exists at {json_path}: give `overwrite` to "
                        "replace it, or `entry` NAME to keep both")
