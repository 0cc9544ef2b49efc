"""Resuming an interrupted evaluation: partial flags on disk, tied to one fingerprint.

The fingerprint covers the weights, the examples and every setting that changes a
flag, so `--resume` never mixes flags of different evaluations.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..utils import atomic_write_json
from .result import jsonable

RESUME_FORMAT = 1


def fingerprint(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **settings: Any) -> str:
    """sha256 over the weights, the examples (x, y) and `settings` (anything JSON-able)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for t in (x, y):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(jsonable(settings), sort_keys=True).encode())
    return h.hexdigest()


class _ResumeState:
    """Partial flags on disk: one JSON file rewritten atomically after each batch."""

    def __init__(self, path: Path | None, fp: str):
        self.path = path
        self.data: dict[str, Any] = {"format": RESUME_FORMAT, "fingerprint": fp, "attacks": {}}
        if path is not None and path.exists():
            try:
                saved = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise UserError(f"partial evaluation state {path} is unreadable ({e}): delete it and start again")
            if not isinstance(saved, dict) or not isinstance(saved.get("attacks"), dict):
                raise UserError(f"partial evaluation state {path} is not one this version wrote: delete it and "
                                "start again")
            if saved.get("fingerprint") != fp or saved.get("format") != RESUME_FORMAT:
                raise UserError(f"the partial evaluation in {path.parent} is for a different model, examples or "
                                "settings: rerun without `resume` to start over")
            self.data = saved

    def attack(self, name: str) -> dict[str, Any]:
        return self.data["attacks"].setdefault(
            name, {"done": False, "robust": [], "time_s": 0.0, "max_linf": 0.0, "min": 1.0, "max": 0.0})

    def save(self) -> None:
        if self.path is not None:
            atomic_write_json(self.path, self.data)
