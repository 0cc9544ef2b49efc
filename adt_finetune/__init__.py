"""adt-ft: Adversarial Distributional Training fine-tuning for RobustBench models.

The library API (the CLI is a thin layer over it):

    from adt_finetune import load_model, load_dataset, train, evaluate
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("adt_finetune.zoo", "load_model"),
    "pull": ("adt_finetune.zoo", "pull"),
    "load_dataset": ("adt_finetune.data", "load_dataset"),
    "TrainConfig": ("adt_finetune.config", "TrainConfig"),
    "train": ("adt_finetune.training", "train"),
    "evaluate": ("adt_finetune.evaluation", "evaluate"),
    "Workspace": ("adt_finetune.workspace", "Workspace"),
}


def __getattr__(name: str):
    # Lazy so that `import adt_finetune` does not pay for torch/robustbench up front.
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'adt_finetune' has no attribute {name!r}")


__all__ = list(_LAZY)
