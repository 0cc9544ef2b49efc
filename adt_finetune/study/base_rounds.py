"""A robust base model trained for the study, when no RobustBench checkpoint stands in: rounds of
PGD-AT (each round one run continuing the last round's weights) until PGD-20 accuracy on held-out
test images stops improving; the best round is the base. The held-out images are the LAST
`heldout` test images, disjoint from the evaluated first n.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import TrainConfig
from ..utils import atomic_write_json

if TYPE_CHECKING:
    from .execute import JobRunner


def round_config(runner: "JobRunner", round_no: int, previous: str | None) -> TrainConfig:
    """Round `round_no` (1-based): from scratch, or continuing `previous` (a model.pt)."""
    s = runner.spec
    b = s.base["train"]
    return TrainConfig(model=previous or "scratch", arch=str(b["arch"]), arch_kwargs=dict(b.get("arch_kwargs") or {}),
                       dataset=s.dataset, method=str(b.get("method", "pgd-at")), epochs=int(b.get("round_epochs", 1)),
                       batch_size=int(b.get("batch_size", 128)), lr=float(b["lr"]), schedule="constant",
                       train_subset=b.get("train_subset"), seed=s.seed + round_no, device=s.device,
                       run_name=f"base-r{round_no:02d}", data_dir=runner.data_dir, eps=s.eps)


def heldout_pgd20(runner: "JobRunner", model_file: Path) -> float:
    """PGD-20 accuracy on the last `heldout` test images (never among the evaluated first n)."""
    import torch
    from torch.utils.data import Subset

    from ..attacks import make_attack
    from ..data import as_tensors, dataset_info, load_dataset
    from ..utils import parse_eps
    from ..zoo import build_architecture

    s = runner.spec
    b = s.base["train"]
    ds = load_dataset(s.dataset, "test", data_dir=runner.data_dir, workspace=runner.ws.root, augment=False)
    n = int(b["heldout"])
    if n + s.pointwise["n_examples"] > len(ds):
        raise ValueError(f"heldout {n} + n_examples {s.pointwise['n_examples']} exceed the test set ({len(ds)})")
    x, y = as_tensors(Subset(ds, range(len(ds) - n, len(ds))))
    model = build_architecture(str(b["arch"]), s.dataset, s.threat_model, dict(b.get("arch_kwargs") or {}))
    model.load_state_dict(torch.load(model_file, map_location="cpu", weights_only=True))
    eps = parse_eps(s.eps) if s.eps is not None else dataset_info(s.dataset).eps
    attack = make_attack("pgd20", eps, seed=s.seed)
    robust = torch.cat([attack(model, x[i:i + 500], y[i:i + 500]).robust for i in range(0, n, 500)])
    return float(robust.float().mean())


def train_rounds(runner: "JobRunner", history: dict[str, Any], marker: Path):
    """Train rounds until the held-out accuracy stops improving (resumable: `history` is `marker`'s
    content, rewritten after every round); the best round's model."""
    from ..zoo import build_architecture
    import torch

    s = runner.spec
    b = s.base["train"]
    rounds = history["rounds"]
    while not history.get("stopped"):
        k = len(rounds) + 1
        name = f"base-r{k:02d}"
        previous = str(runner.ws.runs_dir / rounds[-1]["run"] / "model.pt") if rounds else None
        runner.log(f"[base] PGD-AT round {k} ({name})")
        runner.run_training(name, lambda: round_config(runner, k, previous))
        acc = heldout_pgd20(runner, runner.ws.runs_dir / name / "model.pt")
        rounds.append({"run": name, "heldout_pgd20": acc})
        best = max(range(len(rounds)), key=lambda i: rounds[i]["heldout_pgd20"])
        runner.log(f"[base] round {k}: held-out PGD-20 {100 * acc:.2f}% (best: round {best + 1})")
        if len(rounds) - 1 - best >= int(b.get("patience", 2)) or len(rounds) >= int(b.get("max_rounds", 10)):
            history.update(stopped=True, best=rounds[best]["run"])
        atomic_write_json(marker, history)
    model = build_architecture(str(b["arch"]), s.dataset, s.threat_model, dict(b.get("arch_kwargs") or {}))
    model.load_state_dict(torch.load(runner.ws.runs_dir / history["best"] / "model.pt", map_location="cpu",
                                     weights_only=True))
    return model
