"""The workspace: the folder that remembers state between commands.

    models/<dataset>/<threat_model>/<Name>.pt   RobustBench's own cache layout
    runs/<run-id>/                              one folder per training run
    leaderboard/<dataset>/<threat_model>/*.json results, one file per entry
    .adt-ft/state.json                          current model, latest run
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .utils import atomic_write_json


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
    def from_dict(cls, d: dict[str, Any]) -> "ModelRef":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


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

    # -- state ------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        if not self.state_path.exists():
            return {}
        try:
            return json.loads(self.state_path.read_text())
        except (json.JSONDecodeError, OSError) as e:
            raise UserError(f"{self.state_path} is unreadable ({e}): delete it and pull the model again") from None

    def _update(self, **kv: Any) -> None:
        st = self.state()
        st.update(kv)
        atomic_write_json(self.state_path, st)

    def current_model(self) -> ModelRef | None:
        d = self.state().get("current_model")
        return ModelRef.from_dict(d) if d else None

    def require_current_model(self) -> ModelRef:
        ref = self.current_model()
        if ref is None:
            raise UserError(f"no current model in workspace {self.root}: run 'adt-ft pull NAME' first or pass --model")
        return ref

    def set_current_model(self, ref: ModelRef) -> None:
        self._update(current_model=ref.to_dict())

    def latest_run(self) -> Path | None:
        run = self.state().get("latest_run")
        return self.runs_dir / run if run else None

    def set_latest_run(self, run_id: str) -> None:
        self._update(latest_run=run_id)
