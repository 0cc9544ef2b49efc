"""RobustBench's model zoo for adt-ft: the metadata catalogue, name resolution, safe
checkpoint loading, and pulling models into a workspace.

    from adt_finetune.zoo import pull, load_model, resolve_name
    ref = pull("Zhang2019", workspace="ws")      # resolve, fetch if missing, make current
    model = load_model("Zhang2019", workspace="ws")

The catalogue and name resolution import no torch, so `adt-ft models` answers at
once; the loader's names (torch, RobustBench) load on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from .catalog import ALIASES, ZooEntry, catalog, resolve_name, search
from .resolve import is_checkpoint, resolve_and_load, resolve_model

_LOADER = ("build_architecture", "check_arch", "eval_preprocessing", "check_file_model", "load_model",
           "load_weights", "model_from_ref", "pull", "pull_file_model", "pull_from_file", "pull_model", "read_state_dict", "register_model")

__all__ = ["ALIASES", "ZooEntry", "catalog", "resolve_name", "search", "build_architecture", "check_arch",
           "eval_preprocessing",
           "load_model", "load_weights", "model_from_ref", "pull", "pull_file_model", "pull_from_file",
           "pull_model", "read_state_dict", "register_model", "check_file_model", "is_checkpoint", "resolve_and_load", "resolve_model"]


def __getattr__(name: str) -> Any:
    if name in _LOADER:
        value = getattr(importlib.import_module(f"{__name__}.loader"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
