"""The feature-space attack of the ADT paper's suite (Dong et al. 2020, Appendix C.5;
docs/evaluation.md, "Attacks").

For each image, M copies each chase the features of one image of another class
(sign descent on 1 − cos); the image is broken as soon as any copy is
misclassified.

Where the features come from (setting `layer`):
- "pre-pool" (default, the appendix's choice): the last spatial feature map (4-D, larger than
  1×1) produced before the final linear layer runs, found by watching a forward pass,
  so a functional `F.avg_pool2d` (RobustBench's WideResNet) is no obstacle. An
  architecture without such a map falls back to "penultimate", and the settings say so.
- "penultimate": the input of the final linear layer (after pooling; the authors'
  released script taps here).

Targets come from a fixed pool: a seeded sample of `pool` training images when the
engine hands training images over, else of the evaluated images (then the pool does
depend on which images are evaluated); `target_pool` records which. Each image's M
targets are drawn from the pool's images of other classes, per-example seeded, without
replacement while there are enough (the released script draws with replacement from
the whole test set).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..nets import FEATURE_LAYERS, FeatureTap, OutputTap, eval_mode, find_feature_map, find_last_linear
from .base import (Attack, AttackResult, bool_setting, example_generators, float_setting, int_setting, register_attack,
                   verdict)
from ..perturb.linf import margin, project_linf


def feature_loss(feat_adv: torch.Tensor, feat_target: torch.Tensor) -> torch.Tensor:
    """Per-row 1 − cos(feat_adv, feat_target): 0 when the features point the same way."""
    return 1.0 - F.cosine_similarity(feat_adv.flatten(1), feat_target.flatten(1), dim=1)


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    for p in model.parameters():
        return p.device
    return fallback


@register_attack("feature")
class FeatureAttack(Attack):
    """Settings: layer ("pre-pool" | "penultimate"), targets (M, 200), pool (target pool size, 1000),
    steps (50), step_size (ε/8), random_start (true), chunk (copies per forward/backward, 400:
    bounds memory, not results; lower it if a large model runs out of memory).

    After `prepare`, `tap` names the layer really used and `target_pool` where the pool came from."""

    uses_training_data = True
    #: without training images the pool is a seeded sample of the evaluated images
    training_data_optional = True

    def __init__(self, eps: float, *, seed: int = 0, layer: Any = "pre-pool", targets: Any = 200, pool: Any = 1000,
                 steps: Any = 50, step_size: Any = None, random_start: Any = True, chunk: Any = 400,
                 **settings: Any):
        super().__init__(eps, seed=seed, **settings)
        self.layer = str(layer).strip().lower()
        if self.layer not in FEATURE_LAYERS:
            raise UserError(f"attack 'feature': layer must be one of {', '.join(FEATURE_LAYERS)}, got {layer!r}")
        self.targets = int_setting(self.name, "targets", targets, 1)
        self.pool = int_setting(self.name, "pool", pool, 1)
        self.steps = int_setting(self.name, "steps", steps, 0)
        self.step_size = float_setting(self.name, "step_size", self.eps / 8 if step_size is None else step_size)
        self.random_start = bool_setting(self.name, "random_start", random_start)
        self.chunk = int_setting(self.name, "chunk", chunk, 1)
        self.tap: str | None = None          # resolved in prepare: "pre-pool (module)" or "penultimate (...)"
        self.target_pool: str | None = None  # resolved in prepare: where the pool's images came from
        self._train_x: torch.Tensor | None = None
        self._train_y: torch.Tensor | None = None
        self._model: nn.Module | None = None
        self._head: nn.Module | None = None
        self._tap_module: nn.Module | None = None
        self._pool_features: torch.Tensor | None = None
        self._candidates: dict[int, torch.Tensor] = {}

    def _open_tap(self):
        """A context manager whose `.features` holds the tapped features of the latest forward."""
        if self._tap_module is None:
            return FeatureTap(self._head)
        return OutputTap(self._tap_module, self._head)

    def _resolve_tap(self, model: nn.Module, example: torch.Tensor) -> None:
        head_name, self._head = find_last_linear(model, example)
        found = find_feature_map(model, example, self._head) if self.layer == "pre-pool" else None
        if found is not None:
            self.tap, self._tap_module = f"pre-pool ({found[0]})", found[1]
        else:
            why = "no spatial feature map before the head" if self.layer == "pre-pool" else "asked for"
            self.tap, self._tap_module = f"penultimate (input of {head_name}; {why})", None

    def _pool_images(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A seeded sample of `pool` images: training images when given, else the evaluated ones."""
        if self._train_x is not None and len(self._train_x) > 0:
            source_x, source_y, where = self._train_x, self._train_y, "training images"
        else:
            source_x, source_y, where = x, y, "evaluated images (no training images given)"
        if len(source_x) == 0:
            raise UserError("the feature attack needs a non-empty evaluation set as its target pool")
        g = torch.Generator().manual_seed(self.seed)
        keep = torch.randperm(len(source_x), generator=g)[:self.pool].sort().values
        self.target_pool = f"{where}: seeded sample of {len(keep)} of {len(source_x)}"
        return source_x[keep], source_y[keep]

    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        """The target pool's features, computed once."""
        if len(x) == 0:
            raise UserError("the feature attack needs a non-empty evaluation set")
        device = _model_device(model, x.device)
        pool_x, pool_y = self._pool_images(x, y)
        with eval_mode(model), torch.no_grad():
            self._resolve_tap(model, pool_x[:1].to(device))
            features = []
            with self._open_tap() as tap:
                for i in range(0, len(pool_x), self.chunk):
                    model(pool_x[i:i + self.chunk].to(device))
                    features.append(tap.features.flatten(1).clone())
        self._model = model
        self._pool_features = torch.cat(features)
        labels = pool_y.to(device)
        self._candidates = {int(c): (labels != c).nonzero().squeeze(1) for c in labels.unique()}

    def _pick_targets(self, y: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """(B, M) pool indices, images of classes other than each example's own."""
        picks = []
        for label, g in zip(y.tolist(), generators):
            candidates = self._candidates.get(label)
            if candidates is None:  # a class absent from the pool: every pool image qualifies
                candidates = torch.arange(len(self._pool_features), device=self._pool_features.device)
            if len(candidates) == 0:
                raise UserError(f"the feature attack's target pool has no image of a class other than {label}: "
                                "raise feature.pool, or evaluate more examples")
            order = torch.randperm(len(candidates), generator=g, device=g.device)
            # Fewer candidates than M: reuse them; each copy still gets its own random start.
            picks.append(candidates[order[torch.arange(self.targets, device=g.device) % len(candidates)]])
        return torch.stack(picks)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        if self._pool_features is None or self._model is not model:
            raise RuntimeError("FeatureAttack.prepare(model, x_all, y_all) must run with this model first")
        x_adv, robust = x.clone(), torch.ones(len(x), dtype=torch.bool, device=x.device)
        generators = example_generators(x, f"{self.name}:{self.seed}")
        target_idx = self._pick_targets(y, generators)
        images_per_group = max(1, self.chunk // self.targets)
        with self._open_tap() as tap:
            for lo in range(0, len(x), images_per_group):
                hi = min(lo + images_per_group, len(x))

                def report(step: int, lo: int = lo, hi: int = hi) -> None:
                    # M copies × (steps + 1) rounds per group of images; a group stops early when all break
                    self.within_batch((lo + (hi - lo) * step / (self.steps + 1)) / len(x),
                                      f"images {lo + 1}–{hi} of {len(x)}, step {step}/{self.steps}")

                x_adv[lo:hi], robust[lo:hi] = self._attack_group(
                    model, tap, x[lo:hi], y[lo:hi], target_idx[lo:hi], generators[lo:hi], report)
        return AttackResult(x_adv, robust)

    def _attack_group(self, model, tap, x, y, target_idx, generators, report=lambda step: None):
        """All M copies of a few images; copy m of image i is row i·M + m."""
        n_images, m_copies = len(x), self.targets
        x_rep = x.repeat_interleave(m_copies, 0)
        y_rep = y.repeat_interleave(m_copies)
        target_features = self._pool_features[target_idx.flatten()]
        x_cur = x_rep.clone()
        if self.random_start:
            noise = torch.empty_like(x_rep)
            for i, g in enumerate(generators):
                noise[i * m_copies:(i + 1) * m_copies].uniform_(-1.0, 1.0, generator=g)
            x_cur = project_linf(x_rep + self.eps * noise, x_rep, self.eps)
        x_out, robust = x.clone(), torch.ones(n_images, dtype=torch.bool, device=x.device)
        active = torch.arange(n_images, device=x.device)
        copy_offsets = torch.arange(m_copies, device=x.device)
        # Step s evaluates the current copies (that forward both decides the early stop
        # and gives the gradient); the last round is a forward-only check of the final copies.
        for step in range(self.steps + 1):
            final = step == self.steps
            work = (active[:, None] * m_copies + copy_offsets).flatten()
            wrong = torch.empty(len(work), dtype=torch.bool, device=x.device)
            margins = torch.empty(len(work), device=x.device) if final else None
            stepped = None if final else x_cur.new_empty((len(work), *x_cur.shape[1:]))
            for lo in range(0, len(work), self.chunk):
                ids = work[lo:lo + self.chunk]
                if final:
                    with torch.no_grad():
                        logits = model(x_cur[ids])
                    margins[lo:lo + len(ids)] = margin(logits, y_rep[ids])
                else:
                    x_leaf = x_cur[ids].requires_grad_(True)
                    logits = model(x_leaf)
                    loss = feature_loss(tap.features, target_features[ids]).sum()
                    (grad,) = torch.autograd.grad(loss, x_leaf)
                    # descent: the copy's features should turn towards the target's
                    stepped[lo:lo + len(ids)] = project_linf(x_leaf.detach() - self.step_size * grad.sign(),
                                                             x_rep[ids], self.eps)
                wrong[lo:lo + len(ids)] = ~verdict(logits.detach(), y_rep[ids])
            wrong_by_image = wrong.view(-1, m_copies)
            broken = wrong_by_image.any(1)
            if final:
                # Still robust: report the copy closest to the decision boundary.
                pick = torch.where(broken, wrong_by_image.float().argmax(1), margins.view(-1, m_copies).argmin(1))
            else:
                pick = wrong_by_image.float().argmax(1)  # argmax returns the first wrong copy
            chosen = x_cur[active * m_copies + pick]
            done = broken | final
            x_out[active[done]] = chosen[done]
            robust[active[broken]] = False
            if final:
                break
            x_cur[work] = stepped
            active = active[~broken]
            report(step + 1)
            if len(active) == 0:
                break
        return x_out, robust

