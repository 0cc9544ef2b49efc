"""ADT-EXP's explicit distribution: fitting a per-example tanh-Gaussian over δ against a
fixed classifier, and sampling from it (docs/methods.md, "ADT-EXP"; Dong et al. 2020, Eq. 8–10).

The training method (`methods.adt_exp`) and the `exp` attack both use these two
functions, so training and evaluation cannot drift apart.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..nets import eval_mode
from . import tanh_gaussian as tg

#: (logits of the k·B perturbed inputs, labels repeated k times) -> per-row loss to maximise
Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

DEFAULT_LAMBDA = 0.01


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def fit_exp_distribution(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int, samples: int,
                         lr: float, lam: float, accumulate: bool = True, objective: Objective | None = None,
                         generator: tg.Rng = None, on_step: Callable[[int], None] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example (μ, v) of the tanh-Gaussian δ = ε·tanh(μ + softplus(v)·r) maximising
    E[objective(f(clip(x + δ)), y)] + lam·H.

    Both start at 0 (σ ≈ 0.69). Each of `steps` steps draws `samples` (k) samples per
    example and runs them as ONE batch of k·B rows through the model (in eval mode),
    rows sample-major: row s·B + i is sample s of example i (so a TRADES objective can
    use `clean_logits.repeat(k, 1)`). The step is Adam with betas (0, 0), i.e.
    lr·g/(|g| + 1e-8), a sign step.

    accumulate=True (default) reproduces the released code, which never zeroes the
    (μ, v) gradients between steps: every step follows the sign of the running SUM of
    all gradients so far, not of the latest one. accumulate=False uses the latest only.

    `generator`: the noise's source (`tanh_gaussian.Rng`); a list of one generator per
    example makes each example's samples independent of its batch (the `exp` attack).

    The objective is summed over examples and averaged over samples, with H the
    all-element mean (`tanh_gaussian.entropy_estimate`) times the batch size: per
    example that is loss_i + lam·mean_j h_ij, the released weighting, but each
    example's gradient no longer depends on the batch size (which only mattered where
    gradients fall near Adam's 1e-8). No gradient reaches the model's parameters:
    only (μ, v) are differentiated. Returns (μ, v), detached. `on_step(i)` follows step i (1-based).
    """
    if steps < 1 or samples < 1:
        raise UserError(f"ADT-EXP needs at least one step and one sample (got T={steps}, k={samples})")
    objective = objective or _cross_entropy
    x = x.detach()
    batch = x.shape[0]
    mu = torch.zeros_like(x, dtype=torch.float32, requires_grad=True)
    v = torch.zeros_like(x, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([mu, v], lr=lr, betas=(0.0, 0.0), maximize=True)
    x_rep = x.unsqueeze(0).expand(samples, *x.shape)
    y_rep = y.repeat(samples)
    with eval_mode(model), torch.enable_grad():
        for i in range(steps):
            sigma = F.softplus(v)
            delta, u, r = tg.sample(mu.expand_as(x_rep), sigma.expand_as(x_rep), eps, generator, batch_dim=1)
            x_adv = tg.apply_perturbation(x_rep, delta.to(x.dtype)).flatten(0, 1)
            loss = objective(model(x_adv), y_rep).float().mean()
            gain = batch * (loss + lam * tg.entropy_estimate(sigma.expand_as(x_rep), u, r))
            grad_mu, grad_v = torch.autograd.grad(gain, [mu, v])
            if accumulate and mu.grad is not None:
                mu.grad += grad_mu
                v.grad += grad_v
            else:
                mu.grad, v.grad = grad_mu, grad_v
            opt.step()
            if on_step is not None:
                on_step(i + 1)
    return mu.detach(), v.detach()


def sample_exp(mu: torch.Tensor, v: torch.Tensor, eps: float, k: int,
               generator: tg.Rng = None) -> torch.Tensor:
    """k perturbations per example from a fitted (μ, v): shape (k, *μ.shape), |δ| < ε.

    Add to x and clip with `tanh_gaussian.apply_perturbation(x.unsqueeze(0), δ)`.
    """
    shape = (k, *mu.shape)
    with torch.no_grad():
        return tg.sample(mu.expand(shape), F.softplus(v).expand(shape), eps, generator, batch_dim=1)[0]
