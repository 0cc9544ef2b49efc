"""ADT-EXP (`--method exp`): a tanh-Gaussian over δ fitted per example, then one
sample per example for the classifier's update (docs/methods.md, "ADT-EXP"; Dong et al. 2020, §3.2).

The distribution fitting lives in `perturb.exp_distribution`, shared with the `exp` attack.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..perturb import tanh_gaussian as tg
from ..perturb.linf import accuracy
from ..perturb.exp_distribution import DEFAULT_LAMBDA, Objective, fit_exp_distribution
from .base import MethodContext, StepOutput, TrainMethod, register_method
from .losses import trades_kl, trades_target, training_loss

def default_lambda(cfg) -> float:
    return DEFAULT_LAMBDA if cfg.adt_lambda is None else float(cfg.adt_lambda)


@register_method("exp")
class ADTExp(TrainMethod):
    """ADT-EXP. Per batch: fit (μ, v) per example (T = exp_steps sign steps, k = exp_samples
    samples per step in one k·B batch, classifier in eval mode), draw one fresh sample per
    example, and return the training loss on it.

    With --loss trades the inner problem maximises KL(f(x) ‖ f(x')) + λH with f(x) from an
    eval-mode pass (detached, the TRADES reference's choice), and the loss is
    CE(f(x)) + β·KL(f(x) ‖ f(x')) with both passes in train mode.
    Forward passes per step: T + 1 with CE; T + 3 with TRADES (eval-mode target, then
    train-mode clean and adversarial passes), T + 2 when train and eval mode agree
    (--scope last-layer: one clean pass is both target and loss term). clean_acc is reported only with TRADES,
    where a clean pass exists anyway.
    """

    def __init__(self, cfg, ctx: MethodContext):
        super().__init__(cfg, ctx)
        if cfg.exp_steps < 1 or cfg.exp_samples < 1:
            raise UserError(f"`exp_steps` and `exp_samples` must be at least 1 (got {cfg.exp_steps}, {cfg.exp_samples})")
        if cfg.exp_lr <= 0:
            raise UserError(f"`exp_lr` must be positive (got {cfg.exp_lr})")
        self.lam = default_lambda(cfg)
        if self.lam < 0:
            raise UserError(f"`adt_lambda` must be non-negative (got {self.lam})")

    def resolved_settings(self) -> dict:
        return {"adt_lambda": float(self.lam)}

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        cfg, eps, k = self.cfg, self.ctx.eps, self.cfg.exp_samples
        trades = cfg.loss == "trades"
        metrics: dict[str, float] = {}
        objective: Objective | None = None
        logits_clean = None
        if trades:
            logits_clean, target_logits = trades_target(model, x)
            metrics["clean_acc"] = accuracy(target_logits, y)
            target_rep = target_logits.repeat(k, 1)

            def objective(logits: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
                return trades_kl(target_rep, logits)

        mu, v = fit_exp_distribution(model, x, y, eps=eps, steps=cfg.exp_steps, samples=k, lr=cfg.exp_lr,
                                     lam=self.lam, accumulate=cfg.exp_accumulate_grad, objective=objective)
        with torch.no_grad():
            sigma = F.softplus(v)
            delta, u, r = tg.sample(mu, sigma, eps)
            x_adv = tg.apply_perturbation(x, delta.to(x.dtype))
            metrics["entropy"] = tg.entropy_estimate(sigma, u, r).item()
        if trades and logits_clean is None:
            logits_clean = model(x)  # clean before adversarial, as TRADES does
        logits_adv = model(x_adv)
        loss = training_loss(cfg.loss, logits_adv, y, logits_clean=logits_clean, beta=cfg.beta)
        metrics["loss"] = loss.item()
        metrics["adv_acc"] = accuracy(logits_adv, y)
        if trades:
            metrics["kl"] = trades_kl(logits_clean.detach(), logits_adv.detach()).mean().item()
        return StepOutput(loss, metrics, x_adv)
