"""Job claims on a shared workspace: several workers (processes, machines, SLURM array tasks) take
jobs from one study without running any twice, and a dead worker's job is taken over.

A claim is a file `<state>/claims/<job>.claim`, created with O_EXCL (atomic on a local file system
and on NFSv3+), holding who claimed it. Its owner rewrites it every `heartbeat_s` seconds; a claim
whose file has not changed for `expiry_s` seconds belongs to a dead worker (killed, machine lost).
Taking a stale claim over happens under a `filelock` lock, re-checking staleness inside it, so two
workers that both see the same stale claim cannot both take it. Clocks: staleness compares the
file's mtime (set by the file server) with this machine's clock, so machines sharing a workspace
need clocks within a fraction of `expiry_s` (NTP gives milliseconds).

Every start, finish and failure is appended to `<state>/events.jsonl` (one JSON line each, written
with O_APPEND): `study status` reads it, and the tests use it to prove that no job ran twice.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from filelock import FileLock

from ..utils import atomic_write_json


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Claims:
    def __init__(self, state_dir: Path, worker: str, heartbeat_s: float = 10.0, expiry_s: float = 60.0):
        if expiry_s <= 2 * heartbeat_s:
            raise ValueError("expiry_s must exceed two heartbeats")
        self.dir = state_dir / "claims"
        self.events = state_dir / "events.jsonl"
        self.worker, self.heartbeat_s, self.expiry_s = worker, heartbeat_s, expiry_s
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, job: str) -> Path:
        return self.dir / f"{job.replace(':', '--')}.claim"

    def failed_path(self, job: str) -> Path:
        return self.dir / f"{job.replace(':', '--')}.failed"

    # ---------------------------------------------------------------- claiming

    def try_claim(self, job: str) -> "Heartbeat | None":
        """A running heartbeat when this worker now owns `job`; None when a live worker does."""
        path = self._path(job)
        if self._create(path, job):
            return Heartbeat(self, path, job)
        if not self.is_stale(path):
            return None
        with FileLock(str(self.dir / ".takeover.lock")):
            if not self.is_stale(path):  # another worker took it over (or its owner beat) meanwhile
                return None
            previous = self.read(path)
            path.unlink(missing_ok=True)
            if not self._create(path, job):
                return None
        self.log("takeover", job, previous=(previous or {}).get("worker"))
        return Heartbeat(self, path, job)

    def _create(self, path: Path, job: str) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(self._record(job), fh)
        return True

    def _record(self, job: str, **extra: Any) -> dict[str, Any]:
        return {"job": job, "worker": self.worker, "host": socket.gethostname(), "pid": os.getpid(),
                "since": time.time(), **extra}

    def is_stale(self, path: Path) -> bool:
        try:
            return time.time() - path.stat().st_mtime > self.expiry_s
        except FileNotFoundError:
            return True

    @staticmethod
    def read(path: Path) -> dict[str, Any] | None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def holder(self, job: str) -> dict[str, Any] | None:
        """Who holds `job` now (None: nobody, or a dead worker whose claim expired)."""
        path = self._path(job)
        if not path.exists() or self.is_stale(path):
            return None
        return self.read(path)

    # ---------------------------------------------------------------- outcomes

    def mark_failed(self, job: str, reason: str) -> None:
        atomic_write_json(self.failed_path(job), {"job": job, "worker": self.worker, "reason": reason,
                                                  "time": time.time()})
        self.log("failed", job, reason=reason)

    def failure(self, job: str) -> str | None:
        data = self.read(self.failed_path(job))
        return None if data is None else str(data.get("reason"))

    def clear_failures(self) -> None:
        for p in self.dir.glob("*.failed"):
            p.unlink(missing_ok=True)

    def log(self, event: str, job: str, **extra: Any) -> None:
        line = json.dumps({"event": event, "job": job, "worker": self.worker, "time": time.time(), **extra})
        fd = os.open(self.events, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def read_events(self) -> list[dict[str, Any]]:
        if not self.events.exists():
            return []
        out = []
        for line in self.events.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill mid-write
        return out


class Heartbeat:
    """Keeps a claim alive from a background thread until `release()`."""

    def __init__(self, claims: Claims, path: Path, job: str):
        self.claims, self.path, self.job = claims, path, job
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {job}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.claims.heartbeat_s):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return  # taken over after this worker stalled: the new owner's claim is not ours to touch

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        record = self.claims.read(self.path)
        if record is not None and record.get("worker") == self.claims.worker:
            self.path.unlink(missing_ok=True)
