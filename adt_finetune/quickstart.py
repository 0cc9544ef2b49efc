"""The embedded default: the whole pull → train → eval → leaderboard pipeline on
real Fashion-MNIST, offline, on a CPU, in a few minutes.

Stands in for a RobustBench download: a small CNN is trained normally for a short
time and saved into the workspace exactly like a pulled model, so every later
step is the real command's code path.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import zoo
from .config import TrainConfig
from .data import as_tensors, load_dataset
from .errors import UserError
from .evaluation import EvalRequest, evaluate_workspace
from .models import SmallCNN
from .progress import Reporter, as_reporter
from .training import train
from .utils import set_seed
from .workspace import Workspace

QUICKSTART_MODEL = "quickstart-SmallCNN"
SMALL_CNN = "adt_finetune.models.small:SmallCNN"


@dataclass
class QuickstartSettings:
    """Budgets chosen so the whole pipeline fits in ~5 minutes on 2 CPU cores."""

    width: int = 32                 # SmallCNN width of the stand-in "pretrained" model
    pretrain_images: int = 20000    # standard training: first N training images ...
    pretrain_epochs: int = 2        # ... for this many epochs (Adam, lr 1e-3)
    method: str = "exp-am"
    finetune_images: int = 10000    # ADT fine-tuning on the first N training images
    finetune_epochs: int = 2
    finetune_lr: float = 0.05
    gen_width: int = 16             # a narrow generator: the paper's 256 is for GPUs
    n_examples: int = 1000          # evaluation: first N test images
    suite: str = "quick"
    seed: int = 0


@dataclass
class QuickstartResult:
    workspace: Path
    model_ref: Any
    run_id: str
    record: Any                     # evaluation.EvalRecord
    seconds: dict[str, float] = field(default_factory=dict)


PRETRAIN_BATCH = 128


def _pretrain(settings: QuickstartSettings, data_dir, workspace: Path, log: Callable[[str], None],
              reporter: Reporter | None = None):
    """Standard training of the stand-in model; `reporter` gets one task, "pretrain", advanced per step."""
    set_seed(settings.seed)
    x, y = as_tensors(load_dataset("fashion-mnist", "train", data_dir=data_dir, workspace=workspace,
                                   augment=False), settings.pretrain_images)
    model = SmallCNN(width=settings.width)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(settings.seed)
    model.train()
    rep = as_reporter(reporter)
    steps = -(-len(x) // PRETRAIN_BATCH)
    with rep:
        rep.start("pretrain", "pretrain", total=settings.pretrain_epochs * steps)
        for epoch in range(settings.pretrain_epochs):
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), PRETRAIN_BATCH):
                idx = perm[i:i + PRETRAIN_BATCH]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                rep.advance("pretrain", 1, status=f"epoch {epoch + 1}/{settings.pretrain_epochs}  "
                                                  f"loss {loss.item():.3f}")
            log(f"  epoch {epoch + 1}/{settings.pretrain_epochs}: last batch loss {loss.item():.3f}")
        rep.finish("pretrain")
    return model.eval()


def quickstart(workspace: str | Path = ".", *, settings: QuickstartSettings | None = None, data_dir=None,
               progress: bool = True, log: Callable[[str], None] = print, reporter: Reporter | None = None,
               train_reporter: Reporter | None = None, pretrain_reporter: Reporter | None = None,
               on_trained: Callable[[Any], None] | None = None) -> QuickstartResult:
    """Run the embedded default pipeline in `workspace` and return what it produced.
    `reporter` (a progress.Reporter) receives the evaluation's progress, `train_reporter` the
    fine-tuning's, `pretrain_reporter` the pretraining's; None: silent. `on_trained` gets the
    training RunResult before the stage's closing line (the CLI prints its per-epoch table there)."""
    s = settings or QuickstartSettings()
    ws = Workspace(workspace)
    seconds: dict[str, float] = {}

    data_dir = None if data_dir is None else str(data_dir)  # recorded in run.json, which is JSON
    # Fail early and clearly when the data is missing or damaged, before anything is written.
    for split in ("test", "train"):
        load_dataset("fashion-mnist", split, data_dir=data_dir, workspace=ws.root)

    t = time.perf_counter()
    log(f"[1/4] pretrain: a standard (not robust) SmallCNN on {s.pretrain_images} Fashion-MNIST images, "
        "standing in for a RobustBench download")
    model = _pretrain(s, data_dir, ws.root, log, pretrain_reporter)
    ref = zoo.register_model(model, name=QUICKSTART_MODEL, arch=SMALL_CNN, arch_kwargs={"width": s.width},
                             dataset="fashion-mnist", workspace=ws.root, source="quickstart")
    seconds["pretrain"] = time.perf_counter() - t
    log(f"  saved {ref.path}; it is now the workspace's current model ({seconds['pretrain']:.0f}s)")

    t = time.perf_counter()
    log(f"[2/4] train: ADT fine-tuning (--method {s.method}, generator width {s.gen_width}) on "
        f"{s.finetune_images} images for {s.finetune_epochs} epoch(s)")
    cfg = TrainConfig(method=s.method, epochs=s.finetune_epochs, train_subset=s.finetune_images,
                      gen_width=s.gen_width, lr=s.finetune_lr, seed=s.seed, data_dir=data_dir,
                      run_name=None)
    run = train(cfg, workspace=ws.root, reporter=train_reporter)
    seconds["train"] = time.perf_counter() - t
    if on_trained is not None:
        on_trained(run)
    log(f"  run {run.run_id} finished ({seconds['train']:.0f}s)")

    t = time.perf_counter()
    log(f"[3/4] eval: --suite {s.suite} on the first {s.n_examples} test images, with --baseline (before → after)")
    record = evaluate_workspace(EvalRequest(run=run.run_id, suite=s.suite, n_examples=s.n_examples, baseline=True,
                                            seed=s.seed, data_dir=data_dir, workspace=ws.root, device="cpu"),
                                reporter=reporter)
    seconds["eval"] = time.perf_counter() - t
    log(f"  wrote {record.json_path} ({seconds['eval']:.0f}s)")
    return QuickstartResult(ws.root, ref, run.run_id, record, seconds)


NEXT_STEPS = """\
Next, on CIFAR-10 with a real RobustBench model (a GPU helps; see README):
  adt-ft pull Zhang2019
  adt-ft train --recipe zhang2019-finetune-last-layer --method exp-am
  adt-ft eval --suite paper --baseline"""


def check_settings(s: QuickstartSettings) -> None:
    for name in ("pretrain_images", "pretrain_epochs", "finetune_images", "finetune_epochs", "n_examples"):
        if getattr(s, name) <= 0:
            raise UserError(f"quickstart: {name.replace('_', '-')} must be positive")
