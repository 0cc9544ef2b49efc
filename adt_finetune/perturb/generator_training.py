"""Training a fresh amortised generator against a FIXED classifier: the paper's EXP-AM /
IMP-AM attacks ("we retrain the generator networks for each pretrained defense", Dong et
al. 2020, extended version §5.4, Table 4; docs/evaluation.md "Attacks").

The generator (and q_ψ for IMP-AM) ascends CE(f(x'), y) + λ·H on training images,
drawing x' exactly as the training methods do (`perturb.amortised`); the classifier
stays in eval mode and no gradient reaches its parameters. The randomness (batch
order, z, r) comes from `seed` inside a forked RNG, so a fit is reproducible and leaves
the global RNG alone.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nets import eval_mode
from ..progress import Reporter, as_reporter
from .amortised import build_adversary
from .adt_networks import gradient_features


@dataclass(frozen=True)
class GeneratorBudget:
    """What a retrained generator costs, recorded with the attack's settings.

    The defaults are sized for a CPU: against a standard-trained SmallCNN on Fashion-MNIST
    (first 200 test images, clean 72.5%, PGD-20 12.5%) exp-am reaches 18.5% (17 s on one CPU
    thread) and imp-am 19.5%; 200 steps gain one point (17.5%), width 16 with 300 steps 2.5
    points (16.0%). Raise them for large models on a GPU (`--set exp-am.steps=...`)."""

    steps: int = 100          # Adam steps on the generator (and q_ψ)
    width: int = 8            # generator width (the released generator: 256)
    batch: int = 64           # training images per step
    lr: float = 2e-3          # Adam lr, betas (0.5, 0.999) (the released training: 2e-4 over many epochs)
    lam: float | None = None  # entropy weight; None: the training method's default
    z_dim: int = 64           # imp-am noise dimension

    def to_dict(self) -> dict:
        return asdict(self)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def fit_generator(model: nn.Module, kind: str, x_train: torch.Tensor, y_train: torch.Tensor, *, eps: float,
                  budget: GeneratorBudget, seed: int = 0, reporter: Reporter | None = None,
                  task: str = "generator"):
    """A generator of `kind` ("exp-am" | "imp-am") trained against `model` on (x_train, y_train);
    returns the adversary (`perturb.amortised`) with its networks in eval mode.

    `reporter` sees one task `task` with `budget.steps` units (status: the latest CE)."""
    device = _model_device(model)
    rep = as_reporter(reporter)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), eval_mode(model):
        torch.manual_seed(seed)
        adversary = build_adversary(kind, in_channels=x_train.shape[1], width=budget.width, eps=eps, lam=budget.lam,
                                    z_dim=budget.z_dim, device=device)
        params = [p for net in adversary.networks().values() for p in net.parameters()]
        opt = torch.optim.Adam(params, lr=budget.lr, betas=(0.5, 0.999))
        order = torch.Generator().manual_seed(seed)
        rep.start(task, task, total=budget.steps)
        for _ in range(budget.steps):
            idx = torch.randint(0, len(x_train), (min(budget.batch, len(x_train)),), generator=order)
            ce = _step(model, adversary, params, opt, x_train[idx].to(device), y_train[idx].to(device), eps)
            rep.advance(task, 1, f"CE {ce:.3f}")
        rep.finish(task)
    for net in adversary.networks().values():
        net.eval()
    return adversary


def _step(model, adversary, params, opt, x, y, eps: float) -> float:
    """One Adam step of the adversary on CE(f(x'), y) − regulariser (which it ascends)."""
    g1, g2, _ = gradient_features(model, x, y, eps)
    for net in adversary.networks().values():
        net.train()  # generator BatchNorm on batch statistics while it learns, as in training
    with torch.enable_grad():
        x_adv, regulariser, _ = adversary.draw(x, g1, g2)
        ce = F.cross_entropy(model(x_adv), y)
        grads = torch.autograd.grad(regulariser - ce, params, allow_unused=True)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    return ce.item()
