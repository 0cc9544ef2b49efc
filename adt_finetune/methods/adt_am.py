"""ADT-EXP-AM (`--method exp-am`) and ADT-IMP-AM (`--method imp-am`): a generator
amortises the adversarial distribution over examples (docs/methods.md, "ADT-EXP-AM", "ADT-IMP-AM", "Losses").

One backward pass per step trains both players. The step returns

    total = training_loss(f(R(x')), y) + regulariser

where R is a gradient-reversal layer at x' (identity forward, −grad backward) and
the regulariser depends on the generator (and q_ψ) only. Gradient *descent* on
`total` by each optimiser then does what its player wants:
- the classifier (no path through R to it) descends the training loss;
- the generator, reached through R, ascends the training loss (for TRADES the
  reversed gradient is divided by β, so it ascends exactly the KL term, the
  adversary's objective of docs/methods.md "Losses" — the clean CE has no gradient at x' anyway);
- the regulariser is written so that descending it raises the entropy:
  exp-am: −λ·H (H the tanh-Gaussian estimate, element mean, λ = 0.01);
  imp-am: λ·max(neg_ent − τ, 0), the released hinge (λ = 1, τ = 0.9), or with
  --imp-entropy paper the paper's −λ·H with H = −neg_ent (λ = 0.01). Descending
  it trains q_ψ to a tighter bound as well (the same max over ψ as in the paper).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..perturb import tanh_gaussian as tg
from ..perturb.exp import DEFAULT_LAMBDA
from .base import MethodContext, StepOutput, TrainMethod, register_method
from ..perturb.generators import EntropyNet, ExplicitGenerator, ImplicitGenerator, gradient_features
from .losses import trades_kl, training_loss

IMP_HINGE_LAMBDA = 1.0


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by −scale."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return GradientReversal.apply(x, scale)


class _AmortisedADT(TrainMethod):
    """The shared step of both amortised methods; subclasses build the generator and draw x'."""

    def __init__(self, cfg, ctx: MethodContext):
        super().__init__(cfg, ctx)
        if cfg.gen_width < 1:
            raise UserError(f"--gen-width must be a positive integer (got {cfg.gen_width})")
        if cfg.gen_lr <= 0:
            raise UserError(f"--gen-lr must be positive (got {cfg.gen_lr})")
        if cfg.loss == "trades" and cfg.beta <= 0:
            raise UserError(f"--beta must be positive with --loss trades (got {cfg.beta})")
        self.lam = self._default_lambda() if cfg.adt_lambda is None else float(cfg.adt_lambda)
        if self.lam < 0:
            raise UserError(f"--adt-lambda must be non-negative (got {self.lam})")
        self.generator = self._build_generator().to(ctx.device)
        self.generator_opt = torch.optim.Adam(self.generator.parameters(), lr=cfg.gen_lr, betas=tuple(cfg.gen_betas))

    def _default_lambda(self) -> float:
        return DEFAULT_LAMBDA

    def _build_generator(self) -> nn.Module:
        raise NotImplementedError

    def _draw(self, x, g1, g2) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(x' differentiable in the generator, regulariser as it enters the total loss, metrics)."""
        raise NotImplementedError

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": self.generator_opt}

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        cfg = self.cfg
        trades = cfg.loss == "trades"
        g1, g2, logits_eval = gradient_features(model, x, y, self.ctx.eps)
        self.train(True)  # generator BatchNorm on batch statistics while it learns
        x_adv, regulariser, metrics = self._draw(x, g1, g2)
        # The g1 pass cannot double as TRADES' clean pass: it ran in eval mode (BN running
        # statistics) while both TRADES terms must see the train-mode network; with
        # --scope full the two differ. So TRADES costs one more forward (4 instead of 3).
        logits_clean = model(x) if trades else None
        logits_adv = model(reverse_gradient(x_adv, 1.0 / cfg.beta if trades else 1.0))
        loss = training_loss(cfg.loss, logits_adv, y, logits_clean=logits_clean, beta=cfg.beta)
        with torch.no_grad():
            adv_term = trades_kl(logits_clean, logits_adv).mean() if trades else loss
            metrics.update(
                loss=loss.item(),
                clean_acc=(logits_eval.argmax(1) == y).float().mean().item(),
                adv_acc=(logits_adv.argmax(1) == y).float().mean().item(),
                # what the generator maximises: its loss term minus the regulariser
                adv_objective=(adv_term - regulariser).item(),
            )
            if trades:
                metrics["kl"] = adv_term.item()
        return StepOutput(loss + regulariser, metrics, x_adv.detach())


@register_method("exp-am")
class ADTExpAM(_AmortisedADT):
    """ADT-EXP-AM: the generator maps [x, g1, g2] to (μ, σ); one tanh-Gaussian sample per
    example. Forward passes of the classifier per step: 3 with CE (g1, g2, x'), 4 with
    TRADES (+ the train-mode clean pass). clean_acc comes from the eval-mode g1 pass."""

    def _build_generator(self) -> nn.Module:
        return ExplicitGenerator(self.ctx.in_channels, self.cfg.gen_width, self.cfg.gen_normalize_gradients)

    def _draw(self, x, g1, g2):
        mu, sigma = self.generator(x, g1, g2)
        delta, u, r = tg.sample(mu, sigma, self.ctx.eps)
        entropy = tg.entropy_estimate(sigma, u, r)
        return tg.apply_perturbation(x, delta.to(x.dtype)), -self.lam * entropy, {"entropy": entropy.item()}


@register_method("imp-am")
class ADTImpAM(_AmortisedADT):
    """ADT-IMP-AM: the generator maps [x, g1, g2, z] to δ = ε·tanh(out), z ~ U(−1, 1)^z_dim;
    its entropy is bounded through q_ψ(z | δ/ε) (`EntropyNet`, Adam at gen_lr).

    --imp-entropy hinge (default, released code): regulariser λ·max(neg_ent − imp_hinge, 0),
    λ = 1, imp_hinge = 0.9 — the entropy is only pushed up while q predicts z better than
    that. --imp-entropy paper: λ·neg_ent (= −λ·H up to the constant H(z)), λ = 0.01.
    Forward passes as for exp-am.
    """

    def __init__(self, cfg, ctx: MethodContext):
        if cfg.imp_entropy not in ("hinge", "paper"):
            raise UserError(f"unknown --imp-entropy {cfg.imp_entropy!r}: choose hinge or paper")
        if cfg.z_dim < 1:
            raise UserError(f"--z-dim must be a positive integer (got {cfg.z_dim})")
        super().__init__(cfg, ctx)
        self.entropy_net = EntropyNet(ctx.in_channels, cfg.z_dim).to(ctx.device)
        # Adam at the generator's lr with torch's default betas, as the released code
        self.entropy_opt = torch.optim.Adam(self.entropy_net.parameters(), lr=cfg.gen_lr)

    def _default_lambda(self) -> float:
        return IMP_HINGE_LAMBDA if self.cfg.imp_entropy == "hinge" else DEFAULT_LAMBDA

    def _build_generator(self) -> nn.Module:
        return ImplicitGenerator(self.ctx.in_channels, self.cfg.gen_width, self.cfg.z_dim,
                                 self.cfg.gen_normalize_gradients)

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "entropy_net": self.entropy_net}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": self.generator_opt, "entropy_net": self.entropy_opt}

    def _draw(self, x, g1, g2):
        z = self.generator.sample_z(x.shape[0], x.device)
        delta_unit = torch.tanh(self.generator(x, g1, g2, z))
        neg_ent = self.entropy_net.neg_entropy(z, delta_unit)
        if self.cfg.imp_entropy == "hinge":
            regulariser = self.lam * F.relu(neg_ent - self.cfg.imp_hinge)
        else:
            regulariser = self.lam * neg_ent
        x_adv = tg.apply_perturbation(x, (self.ctx.eps * delta_unit).to(x.dtype))
        return x_adv, regulariser, {"neg_ent": neg_ent.item()}
