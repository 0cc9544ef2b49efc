"""Training: the one loop every method shares, run folders with exact resume, and settings.

    train_config recipe and flag values → a validated TrainConfig; lr schedule
    batches    training set, per-epoch batch order, seeded augmentation, the diagnostics probe
    run_state  model, optimiser, method, checkpoint/restore, RNG state, non-finite checks
    parallel   under torchrun: DDP, SyncBatchNorm, per-step seeds, the per-step collectives
    run_writer the run folder as training writes it (run.json, metrics.jsonl, model.pt, ...)
    start      a fresh run or a resume, made ready on every process (rank 0 first)
    loop       train(): start or resume a run, the epoch loop, finish
"""
from .batches import _SeededAugmentation  # noqa: F401  (its tests import it from here)
from .loop import RunResult, train
from .train_config import (DEFAULT_LR, RESUME_OVERRIDABLE, build_config, default_loss, lr_at, resolve_loss,
                           validate_config)

__all__ = ["DEFAULT_LR", "RESUME_OVERRIDABLE", "RunResult", "build_config", "default_loss", "lr_at", "resolve_loss",
           "train", "validate_config"]
