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
  imp-am: λ·neg_ent, minus the paper's variational lower bound H(z) + E[log q_ψ(z | δ)]
  up to the constant H(z) (Dong et al. 2020, extended version, Eq. 14–15; λ = 10, see
  `ADTImpAM`), or with --imp-entropy hinge the released code's λ·max(neg_ent − τ, 0)
  (λ = 1, τ = 0.9). Descending it also trains q_ψ to a tighter bound (the paper's max over ψ).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import run_folder
from ..errors import UserError
from ..perturb.linf import accuracy
from ..perturb.amortised import IMP_ENTROPY_FORMS, build_adversary, default_lambda
from ..perturb.adt_networks import diagnostic_rng, gradient_features, modules_in_eval_mode, save_generator
from .base import MethodContext, StepOutput, TrainMethod, register_method
from .losses import trades_kl, training_loss


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
    """The shared step of both amortised methods; `perturb.amortised` draws x' and the regulariser."""

    kind = ""

    def __init__(self, cfg, ctx: MethodContext):
        super().__init__(cfg, ctx)
        if cfg.gen_width < 1:
            raise UserError(f"`gen_width` must be a positive integer (got {cfg.gen_width})")
        if cfg.gen_lr <= 0:
            raise UserError(f"`gen_lr` must be positive (got {cfg.gen_lr})")
        if cfg.loss == "trades" and cfg.beta <= 0:
            raise UserError(f"`beta` must be positive with `loss` trades (got {cfg.beta})")
        if self.kind == "imp-am" and cfg.imp_entropy not in IMP_ENTROPY_FORMS:
            raise UserError(f"unknown `imp_entropy` {cfg.imp_entropy!r}: choose paper or hinge")
        if self.kind == "imp-am" and cfg.z_dim < 1:
            raise UserError(f"`z_dim` must be a positive integer (got {cfg.z_dim})")
        self.lam = default_lambda(self.kind, cfg.imp_entropy) if cfg.adt_lambda is None else float(cfg.adt_lambda)
        if self.lam < 0:
            raise UserError(f"`adt_lambda` must be non-negative (got {self.lam})")
        self.adversary = build_adversary(self.kind, in_channels=ctx.in_channels, width=cfg.gen_width, eps=ctx.eps,
                                         lam=self.lam, z_dim=cfg.z_dim, imp_entropy=cfg.imp_entropy,
                                         imp_hinge=cfg.imp_hinge, normalize_gradients=cfg.gen_normalize_gradients,
                                         # raw gradients as the released code feeds them: of the batch-mean CE
                                         gradient_divisor=1.0 if cfg.gen_normalize_gradients else float(cfg.batch_size),
                                         device=ctx.device)
        self.generator = self.adversary.generator
        self.generator_opt = torch.optim.Adam(self.generator.parameters(), lr=cfg.gen_lr, betas=tuple(cfg.gen_betas))

    def modules(self) -> dict[str, nn.Module]:
        return self.adversary.networks()

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": self.generator_opt}

    def resolved_settings(self) -> dict:
        return {"adt_lambda": float(self.lam)}

    def save_networks(self, run_dir: Path) -> str:
        """generator.pt, which the `<method>-cotrained` attacks of `adt-ft eval` draw from."""
        save_generator(run_dir / run_folder.GENERATOR, self)
        return run_folder.GENERATOR

    def epoch_diagnostics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """How spread out the adversarial distribution is on a fixed probe batch
        (docs/methods.md "Diagnostics"): `diversity` = mean over pixels of the standard deviation
        of δ/ε across 16 draws for the same x (0: a point mass), plus `sigma` (exp-am: mean σ)
        or `mi_bound` (imp-am: the entropy bound, nats). The networks run in eval mode, no
        parameter or BatchNorm statistic changes, and the draws come from a private seeded
        generator, so calling this between steps leaves training (and an exact resume) alone."""
        device = next(self.generator.parameters()).device
        x, y = x.to(device), y.to(device)
        g1, g2, _ = gradient_features(model, x, y, self.ctx.eps)
        with torch.no_grad(), modules_in_eval_mode(self.modules().values()):
            return self.adversary.diagnose(x, g1, g2, diagnostic_rng(device))

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        cfg = self.cfg
        trades = cfg.loss == "trades"
        g1, g2, logits_eval = gradient_features(model, x, y, self.ctx.eps)
        self.train(True)  # generator BatchNorm on batch statistics while it learns
        x_adv, regulariser, metrics = self.adversary.draw(x, g1, g2)
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
                clean_acc=accuracy(logits_eval, y),
                adv_acc=accuracy(logits_adv, y),
                # what the generator maximises: its loss term minus the regulariser
                adv_objective=(adv_term - regulariser).item(),
            )
            if trades:
                metrics["kl"] = adv_term.item()
        return StepOutput(loss + regulariser, metrics, x_adv.detach())


@register_method("exp-am")
class ADTExpAM(_AmortisedADT):
    """ADT-EXP-AM: the generator maps [x, g1, g2] to (μ, σ); one tanh-Gaussian sample per
    example; regulariser −λ·H, λ = 0.01. Forward passes of the classifier per step: 3 with
    CE (g1, g2, x'), 4 with TRADES (+ the train-mode clean pass). clean_acc comes from the
    eval-mode g1 pass."""

    kind = "exp-am"


@register_method("imp-am")
class ADTImpAM(_AmortisedADT):
    """ADT-IMP-AM: the generator maps [x, g1, g2, z] to δ = ε·tanh(out), z ~ U(−1, 1)^z_dim;
    its entropy is bounded through q_ψ(z | δ/ε) (`EntropyNet`, Adam at gen_lr, trained
    jointly in the same backward). --imp-entropy paper (default): λ·neg_ent, the paper's
    bound, λ = 10; --imp-entropy hinge: the released λ·max(neg_ent − imp_hinge, 0), λ = 1,
    which falls silent once q predicts z better than imp_hinge (see
    `perturb.amortised.ImplicitAdversary`). Forward passes as for exp-am.
    """

    kind = "imp-am"

    def __init__(self, cfg, ctx: MethodContext):
        super().__init__(cfg, ctx)
        self.entropy_net = self.adversary.entropy_net
        # Adam at the generator's lr with torch's default betas, as the released code
        self.entropy_opt = torch.optim.Adam(self.entropy_net.parameters(), lr=cfg.gen_lr)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": self.generator_opt, "entropy_net": self.entropy_opt}
