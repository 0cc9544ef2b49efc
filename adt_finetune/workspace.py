"""The workspace: the folder that remembers state between commands.

    models/<dataset>/<threat_model>/<Name>.pt   RobustBench's own cache layout
    runs/<run-id>/                              one folder per training run
    leaderboard/<dataset>/<threat_model>/*.json results, one file per entry
    .adt-ft/state.json                          current model, latest run
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .utils import atomic_write_json

_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def is_plain_name(value: Any) -> bool:
    """Whether `value` can be one folder or file name inside the workspace: letters, digits and
    . _ + -, starting with a letter or digit (so never '..', a hidden name or a path)."""
    return isinstance(value, str) and _PLAIN_NAME.fullmatch(value) is not None


def check_plain_name(value: Any, what: str) -> str:
    """`value` when it is a plain name (see `is_plain_name`), else a UserError naming `what`."""
    if not is_plain_name(value):
        raise UserError(f"{what} must be a plain name (letters, digits, '.', '_', '+', '-'; no path), "
                        f"got {value!r}")
    return value


def _refuse_link(lock_path: Path) -> None:
    # Older filelock versions open the lock file with O_TRUNC, following a link: a lock file linked to
    # ~/.bashrc would empty it.
    if lock_path.is_symlink():
        raise UserError(f"{lock_path} is a link ({lock_path.resolve()}), not a lock file adt-ft made: delete it")


def claim(lock_path: Path, busy: str) -> Any:
    """Take the lock file `lock_path` for as long as the returned lock is held (`.release()`; the
    operating system drops it when the process ends, kill -9 included); UserError `busy` at once
    when another process holds it. How a command owns a run or an entry name for its whole life."""
    from filelock import FileLock, Timeout

    _refuse_link(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(busy) from None
    return lock


@dataclass
class ModelRef:
    """Everything needed to rebuild a model: architecture spec plus weights file.

    `arch` is a RobustBench zoo name (the architecture of that entry) or
    `package.module:Class`; `source` is "zoo", "file", "quickstart" or "run".
    """

    name: str
    arch: str
    dataset: str
    threat_model: str = "Linf"
    path: str = ""
    source: str = "zoo"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, source: str = "the model record") -> "ModelRef":
        """A ModelRef from a record read from a file; UserError (naming `source`) when it is not one."""
        if not isinstance(d, dict):
            raise UserError(f"{source} is not a model record (a JSON object): pull or train the model again")
        for key in ("name", "arch", "dataset"):
            if not isinstance(d.get(key), str) or not d.get(key):
                raise UserError(f"{source} has no valid {key!r} (got {d.get(key)!r}): pull or train the model again")
        for key in ("threat_model", "path", "source"):
            if key in d and not isinstance(d[key], str):
                raise UserError(f"{source}: {key!r} must be a string, got {d[key]!r}")
        # Used as folder names (models/, leaderboard/): a path here would write elsewhere.
        for key in ("dataset", "threat_model"):
            if key in d and not is_plain_name(d[key]):
                raise UserError(f"{source}: {key!r} must be a plain name such as cifar10 or Linf, got {d[key]!r}: "
                                "pull or train the model again")
        if any(c in d["name"] for c in "/\\\0"):
            raise UserError(f"{source}: 'name' must not hold a path, got {d['name']!r}: pull or train the model again")
        if "arch_kwargs" in d and not isinstance(d["arch_kwargs"], (dict, type(None))):
            raise UserError(f"{source}: 'arch_kwargs' must be a JSON object, got {d['arch_kwargs']!r}")
        values = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if values.get("arch_kwargs") is None:
            values.pop("arch_kwargs", None)
        return cls(**values)


class Workspace:
    def __init__(self, root: str | os.PathLike = "."):
        self.root = Path(root).expanduser().resolve()

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def leaderboard_dir(self) -> Path:
        return self.root / "leaderboard"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def state_path(self) -> Path:
        return self.root / ".adt-ft" / "state.json"

    def model_path(self, dataset: str, threat_model: str, name: str) -> Path:
        return self.models_dir / dataset / threat_model / f"{name}.pt"

    # -- paths ------------------------------------------------------------
    def inside(self, path: str | os.PathLike, what: str) -> Path:
        """`path`, a place adt-ft is about to write, resolved (links followed); UserError when it
        leaves the workspace, e.g. through a link such as runs/ -> /elsewhere."""
        path = Path(path)
        resolved = path.resolve()
        if resolved == self.root or self.root in resolved.parents:
            return resolved
        link = next((p for p in [*reversed(path.parents), path] if p.is_symlink()), None)
        how = f"{link} is a link to {link.resolve()}" if link is not None else f"{path} is not in it"
        raise UserError(f"{what} would be written to {resolved}, outside workspace {self.root} ({how}): adt-ft "
                        "writes only inside its workspace; make it a real folder, or use another `workspace`")

    def relative(self, path: str | os.PathLike) -> str:
        """`path` as recorded in workspace files: relative to the root when inside it, so that a copied or
        moved workspace uses its own files; absolute otherwise (a checkpoint elsewhere on disk)."""
        p = Path(path).expanduser()
        p = p if p.is_absolute() else Path.cwd() / p
        try:
            return p.resolve().relative_to(self.root).as_posix()
        except ValueError:
            return str(p.resolve())

    def absolute(self, recorded: str) -> str:
        """A path read from a workspace file: relative ones are relative to the root."""
        if not recorded:
            return recorded
        p = Path(recorded)
        return str(p if p.is_absolute() else self.root / p)

    def ref_to_record(self, ref: ModelRef) -> dict[str, Any]:
        d = ref.to_dict()
        if d.get("path"):
            d["path"] = self.relative(d["path"])
        return d

    def ref_from_record(self, d: Any, source: str) -> ModelRef:
        ref = ModelRef.from_dict(d, source)
        ref.path = self.absolute(ref.path)
        return ref

    # -- state ------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        if self.state_path.parent.exists() and not self.state_path.parent.is_dir():
            raise UserError(f"{self.state_path.parent} is a file, not adt-ft's state folder: move it away")
        if not self.state_path.exists():
            return {}
        try:
            st = json.loads(self.state_path.read_text())
        except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
            raise UserError(f"{self.state_path} is unreadable ({e}): delete it and pull the model again") from None
        if not isinstance(st, dict):
            raise UserError(f"{self.state_path} is not a JSON object: delete it and pull the model again")
        return st

    def _update(self, **kv: Any) -> None:
        self.update_state(lambda st: st.update(kv))

    def update_state(self, change: "Callable[[dict[str, Any]], None]") -> None:
        """Apply `change` to state.json in place, atomically, under a file lock: two commands sharing a
        workspace (or two shells) never lose each other's update."""
        from filelock import FileLock

        self.inside(self.state_path, "adt-ft's state")
        try:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UserError(f"{self.state_path.parent} is a file, not adt-ft's state folder: move it away") from None
        except PermissionError:
            raise UserError(f"workspace {self.root} is not writable: choose another `workspace`") from None
        _refuse_link(Path(str(self.state_path) + ".lock"))
        try:
            with FileLock(str(self.state_path) + ".lock"):
                # Every write happens under this lock, so a temporary here now is a killed command's.
                for stale in self.state_path.parent.glob(f".{self.state_path.name}.*.tmp"):
                    stale.unlink(missing_ok=True)
                st = self.state()
                change(st)
                atomic_write_json(self.state_path, st)
        except PermissionError as e:
            raise UserError(f"cannot write adt-ft's state in {self.state_path.parent} ({e.strerror}): make it "
                            "writable or choose another `workspace`") from None

    def check_state_writable(self) -> None:
        """UserError now, before work that would be left unrecorded, if state.json cannot be updated."""
        self.update_state(lambda st: None)

    def current_model(self) -> ModelRef | None:
        d = self.state().get("current_model")
        return self.ref_from_record(d, f"current_model in {self.state_path}") if d else None

    def require_current_model(self) -> ModelRef:
        ref = self.current_model()
        if ref is None:
            raise UserError(f"no current model in workspace {self.root}: run 'adt-ft pull NAME' first or pass `model`")
        return ref

    def set_current_model(self, ref: ModelRef) -> None:
        self._update(current_model=self.ref_to_record(ref))

    def latest_run(self) -> Path | None:
        run = self.state().get("latest_run")
        if run is None:
            return None
        if not is_plain_name(run):
            raise UserError(f"latest_run in {self.state_path} is not a run id (got {run!r}): "
                            "give `run`, or delete the file")
        return self.runs_dir / run

    def set_latest_run(self, run_id: str) -> None:
        self._update(latest_run=run_id)
