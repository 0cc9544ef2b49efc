"""Pointwise baselines (docs/methods.md, "Baselines"): PGD-AT (Madry et al.) and TRADES (Zhang et al.).

Both carry their own training loss, so each accepts exactly one `--loss`: PGD-AT
is defined by CE on x', TRADES by CE(f(x), y) + β·KL(f(x) ‖ f(x')). Asking for the
other loss is a UserError (raised by `make_method`); leaving `loss` at its default
lets the trainer pick the method's own (see `methods.base.default_loss`).

Both train L2 models too (an L2 base model): the same steps and step size (ε/4, an L2 length) with
normalised-gradient ascent in the L2 ball (`perturb.l2`) instead of the sign step, PGD-AT from a random
start in the L2 ball, TRADES from x + 0.001·N(0, I) projected into it.

Forward passes of the classifier per training step (tests/test_baselines.py counts them):
    pgd-at   steps + 1                       (7 attack passes, 1 training pass on x')
    trades   steps + 2, or steps + 3         (10 attack passes, clean and adversarial training
                                              passes, plus one eval-mode clean pass for the
                                              attack's target when the model has BatchNorm or
                                              dropout in train mode; see `losses.needs_separate_target`)
"""
from __future__ import annotations

import torch
from torch import nn

from ..perturb.l2 import l2_start_from_noise, normalized_gradient_ascent
from ..perturb.linf import accuracy, sign_gradient_ascent
from ..config import TrainConfig
from ..nets import eval_mode
from .base import MethodContext, StepOutput, TrainMethod, register_method
from .losses import trades_kl, trades_target, training_loss


class _PointwiseBaseline(TrainMethod):
    threat_models = ("Linf", "L2")

    def __init__(self, cfg: TrainConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        self.eps = ctx.eps
        self.step_size = cfg.step_size if cfg.step_size is not None else ctx.eps / 4

    def resolved_settings(self) -> dict:
        return {"step_size": self.step_size}


@register_method("pgd-at")
class PGDAT(_PointwiseBaseline):
    """PGD-7 from a uniform random start in the ε-ball, step ε/4; the classifier minimises CE(f(x'), y)."""

    accepts_loss = ("ce",)

    def __init__(self, cfg: TrainConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        self.steps = cfg.pgd_steps

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        if self.ctx.threat_model == "L2":
            noise = self.example_noise(x, "normal")
            init = l2_start_from_noise(x, self.eps, torch.randn_like(x) if noise is None else noise)
            with eval_mode(model):
                x_adv = normalized_gradient_ascent(model, x, y, eps=self.eps, step_size=self.step_size,
                                                   steps=self.steps, init=init)
            return self._train_on(model, x_adv, y)
        noise = self.example_noise(x, "uniform")  # per-example starts when the trainer keys the batch
        with eval_mode(model):
            x_adv = sign_gradient_ascent(model, x, y, eps=self.eps, step_size=self.step_size, steps=self.steps,
                                         start="uniform", init=None if noise is None else x + self.eps * noise)
        return self._train_on(model, x_adv, y)

    @staticmethod
    def _train_on(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> StepOutput:
        logits_adv = model(x_adv)
        loss = training_loss("ce", logits_adv, y)
        # No clean_acc: it would cost one more forward pass per step that training does not need.
        return StepOutput(loss, {"adv_acc": accuracy(logits_adv, y)}, x_adv)


@register_method("trades")
class TRADES(_PointwiseBaseline):
    """Pointwise TRADES: x' maximises KL(f(x) ‖ f(x')) from x + 0.001·N(0, I) (10 steps of ε/4);
    the classifier minimises CE(f(x), y) + β·KL(f(x) ‖ f(x'))."""

    accepts_loss = ("trades",)

    def __init__(self, cfg: TrainConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        self.steps = cfg.trades_steps
        self.beta = cfg.beta

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        logits_clean, target = trades_target(model, x)

        def kl_to_clean(logits: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
            return trades_kl(target, logits)

        noise = self.example_noise(x, "normal")
        with eval_mode(model):
            if self.ctx.threat_model == "L2":
                x_adv = normalized_gradient_ascent(model, x, y, eps=self.eps, step_size=self.step_size,
                                                   steps=self.steps, loss_fn=kl_to_clean,
                                                   init=x + 0.001 * (torch.randn_like(x) if noise is None else noise))
            else:
                x_adv = sign_gradient_ascent(model, x, y, eps=self.eps, step_size=self.step_size, steps=self.steps,
                                             loss_fn=kl_to_clean, start="normal",
                                             init=None if noise is None else x + 0.001 * noise)
        if logits_clean is None:
            logits_clean = model(x)
        logits_adv = model(x_adv)
        loss = training_loss("trades", logits_adv, y, logits_clean=logits_clean, beta=self.beta)
        with torch.no_grad():
            kl = trades_kl(logits_clean, logits_adv).mean().item()
        return StepOutput(loss, {"clean_acc": accuracy(logits_clean, y), "adv_acc": accuracy(logits_adv, y),
                                 "kl": kl}, x_adv)
