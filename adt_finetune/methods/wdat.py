"""`wdat`: Wasserstein distributional adversarial training (Bai, He, Jiang, Obłój 2025), as
docs/methods.md ("wdat") describes it: what is the paper's and what is our guess.

Each step:
1. every `wdat_upsilon_every` optimisation steps (and at the first), Υ is recomputed over the
   first `wdat_upsilon_images` training images (never augmented) with `wdat_split_loss`
   (ReDLR or CE), and with it the scale of the budget split (perturb/budget_split.py);
2. each image of the batch gets its own l∞ budget δ_i = min(κδ, c·‖∇_x J(x_i)‖_1), from its
   clean gradient: its share of the W_2 budget δ, never redistributed within the batch;
3. PGD inside each image's budget ascends TRADES' KL(f(x) ‖ f(x')) from x + 0.001·N(0, I)
   (with `--loss ce`: CE from x), with the classifier in eval mode;
4. the classifier minimises CE(f(x), y) + β·KL(f(x) ‖ f(x')) (`--loss ce`: CE(f(x'), y)).

The per-image budgets of each epoch are kept for the epoch diagnostics (median, 95th
percentile, max, share beyond ε, share at the cap), which run.json records per epoch with
Υ. Under torchrun every process computes the same Υ (same weights, same images) and the
diagnostics are rank 0's share of the batches.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..errors import UserError
from ..nets import eval_mode
from ..perturb.budget_split import Split, gradient_l1_norms, make_split, pgd_in_budgets, split_budgets
from ..perturb.distributional import LOSSES as SPLIT_LOSSES
from ..perturb.distributional import parse_budgets
from ..perturb.linf import accuracy
from .base import MethodContext, StepOutput, TrainMethod, register_method
from .losses import trades_kl, trades_target, training_loss

TRADES_START_STD = 0.001
SPLIT_LOSS_NAMES = ("redlr", "ce")


def check_wdat_settings(cfg: TrainConfig) -> None:
    """UserError naming the setting when a wdat setting cannot run."""
    if int(cfg.wdat_steps) < 1:
        raise UserError(f"wdat_steps must be at least 1, got {cfg.wdat_steps}")
    if not float(cfg.wdat_ratio) > 0:
        raise UserError(f"wdat_ratio must be positive, got {cfg.wdat_ratio}")
    if cfg.wdat_split_loss not in SPLIT_LOSS_NAMES or cfg.wdat_split_loss not in SPLIT_LOSSES:
        raise UserError(f"unknown wdat_split_loss {cfg.wdat_split_loss!r}: choose {' or '.join(SPLIT_LOSS_NAMES)}")
    if int(cfg.wdat_upsilon_images) < 1:
        raise UserError(f"wdat_upsilon_images must be at least 1, got {cfg.wdat_upsilon_images}")
    if int(cfg.wdat_upsilon_every) < 1:
        raise UserError(f"wdat_upsilon_every must be at least 1, got {cfg.wdat_upsilon_every}")
    if not float(cfg.wdat_cap) >= 1.0:
        raise UserError(f"wdat_cap must be at least 1 (a multiple of the budget δ), got {cfg.wdat_cap}")


@register_method("wdat")
class WDAT(TrainMethod):
    accepts_loss: ClassVar[tuple[str, ...]] = ("trades", "ce")
    #: the loss the method is defined with; front ends may default --loss to it
    default_loss: ClassVar[str] = "trades"

    def __init__(self, cfg: TrainConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        check_wdat_settings(cfg)
        self.budget = float(ctx.eps) if cfg.wdat_budget in (None, "") else parse_budgets([cfg.wdat_budget])[0]
        self.cap = float(cfg.wdat_cap) * self.budget
        self.steps = int(cfg.wdat_steps)
        self.ratio = float(cfg.wdat_ratio)
        self.every = int(cfg.wdat_upsilon_every)
        self.split: Split | None = None
        self.steps_done = 0                 # optimisation steps taken, for the refresh schedule
        self.refreshes = 0                  # refreshes since the last epoch diagnostics
        self.epoch_budgets: list[torch.Tensor] = []
        self._reference: tuple[torch.Tensor, torch.Tensor] | None = None
        # Own generator for the start noise, saved with the state so resume is exact.
        self.generator = torch.Generator().manual_seed(int(cfg.seed) + 0x5DA7)

    # -------------------------------------------------------------- Υ and the split

    def reference_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The images Υ is computed over (loaded once)."""
        if self._reference is None:
            if self.ctx.train_images is None:
                raise UserError("wdat needs the training images to compute Υ: train it with 'adt-ft train' "
                                "or pass train_images in the method context")
            x, y = self.ctx.train_images(int(self.cfg.wdat_upsilon_images))
            self._reference = (x.to(self.ctx.device), y.to(self.ctx.device))
        return self._reference

    def refresh(self, model: nn.Module) -> Split:
        """Υ and the split scale over the reference set, with the current weights."""
        x, y = self.reference_set()
        norms = gradient_l1_norms(model, x, y, self.cfg.wdat_split_loss)
        self.split = make_split(norms, self.budget, self.cap)
        self.refreshes += 1
        return self.split

    def budgets(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each image's l∞ budget from its clean gradient and the current split."""
        if self.split is None or self.steps_done % self.every == 0:
            self.refresh(model)
        assert self.split is not None
        norms = gradient_l1_norms(model, x, y, self.cfg.wdat_split_loss)
        return split_budgets(norms, self.split.scale, self.cap).to(x.dtype)

    # -------------------------------------------------------------- the training step

    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x', per-image budgets), found with the classifier in eval mode (`target`: the
        eval-mode clean logits, the KL reference of the TRADES loss)."""
        budgets = self.budgets(model, x, y)
        if self.cfg.loss == "trades" and target is None:
            with torch.no_grad(), eval_mode(model):
                target = model(x)
        with eval_mode(model):
            if self.cfg.loss == "trades":
                noise = self.example_noise(x, "normal")  # per example when the trainer keys the batch
                if noise is None:
                    noise = torch.randn(x.shape, generator=self.generator, dtype=x.dtype).to(x.device)
                start = (x + TRADES_START_STD * noise).clamp(0.0, 1.0)

                def objective(logits: torch.Tensor) -> torch.Tensor:
                    return trades_kl(target, logits)
            else:
                start = None

                def objective(logits: torch.Tensor) -> torch.Tensor:
                    return F.cross_entropy(logits, y, reduction="none")

            x_adv = pgd_in_budgets(model, x, budgets, objective, steps=self.steps, ratio=self.ratio, start=start)
        return x_adv, budgets

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        logits_clean = target = None
        if self.cfg.loss == "trades":
            logits_clean, target = trades_target(model, x)
        x_adv, budgets = self.adversarial(model, x, y, target)
        self.steps_done += 1
        self.epoch_budgets.append(budgets.detach().double().cpu())
        if self.cfg.loss == "trades" and logits_clean is None:
            logits_clean = model(x)  # clean before adversarial, as TRADES does
        logits_adv = model(x_adv)
        assert self.split is not None
        metrics: dict[str, float] = {"budget_mean": float(budgets.mean()), "upsilon": self.split.upsilon}
        if self.cfg.loss == "trades":
            loss = training_loss("trades", logits_adv, y, logits_clean=logits_clean, beta=self.cfg.beta)
            with torch.no_grad():
                metrics["kl"] = float(trades_kl(logits_clean, logits_adv).mean())
                metrics["clean_acc"] = accuracy(logits_clean, y)
        else:
            loss = training_loss("ce", logits_adv, y)
        metrics["adv_acc"] = accuracy(logits_adv, y)
        return StepOutput(loss=loss, metrics=metrics, x_adv=x_adv)

    # -------------------------------------------------------------- diagnostics

    def epoch_diagnostics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Υ as last refreshed, and the distribution of this epoch's per-image budgets."""
        out: dict[str, float] = {}
        if self.split is not None:
            s = self.split
            out.update(upsilon=s.upsilon, upsilon_images=float(s.n), upsilon_every=float(self.every),
                       upsilon_refreshes=float(self.refreshes), reference_rms=s.rms, reference_capped=s.capped)
            if math.isfinite(s.scale):  # inf: the budget cannot be spent, every image with a gradient is capped
                out["split_scale"] = s.scale
        if self.epoch_budgets:
            b = torch.cat(self.epoch_budgets)
            q = torch.quantile(b, torch.tensor([0.5, 0.95], dtype=b.dtype))
            out.update(budget_median=float(q[0]), budget_p95=float(q[1]), budget_max=float(b.max()),
                       share_beyond_eps=float((b > float(self.ctx.eps) * (1 + 1e-9)).double().mean()),
                       share_capped=float((b >= self.cap * (1 - 1e-9)).double().mean()), budget_images=float(len(b)))
        # A new epoch's distribution starts empty: this is bookkeeping, not training state.
        self.epoch_budgets, self.refreshes = [], 0
        return out

    def diagnostics_line(self, diagnostics: dict[str, float]) -> str | None:
        if "share_beyond_eps" not in diagnostics:
            return None
        d = diagnostics
        return (f"wdat budgets this epoch: median {d['budget_median']:.4g}, 95th percentile {d['budget_p95']:.4g}, "
                f"max {d['budget_max']:.4g}; {100 * d['share_beyond_eps']:.1f}% of images beyond ε = "
                f"{float(self.ctx.eps):.4g}, {100 * d['share_capped']:.1f}% at the cap {self.cap:.4g}; "
                f"Υ = {d.get('upsilon', float('nan')):.4g} over {int(d.get('upsilon_images', 0))} images "
                f"({self.cfg.wdat_split_loss}, every {self.every} steps)")

    # -------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        split = None if self.split is None else dict(vars(self.split))
        state["wdat"] = {"split": split, "steps_done": self.steps_done, "refreshes": self.refreshes,
                         "epoch_budgets": torch.cat(self.epoch_budgets) if self.epoch_budgets else torch.zeros(0),
                         "generator": self.generator.get_state()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        own = state["wdat"]
        if "steps_done" not in own:
            raise UserError("the checkpoint holds the state of an earlier wdat (per-batch W_2 projection), which "
                            "this version no longer trains: start a new run")
        self.split = None if own["split"] is None else Split(**own["split"])
        self.steps_done = int(own["steps_done"])
        self.refreshes = int(own["refreshes"])
        self.epoch_budgets = [own["epoch_budgets"].double()] if own["epoch_budgets"].numel() else []
        self.generator.set_state(own["generator"])
