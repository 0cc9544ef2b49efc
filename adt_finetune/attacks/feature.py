"""The penultimate-feature attack of the ADT paper's suite (docs/evaluation.md, "Attacks").

For each image, M copies each chase the penultimate features of one image of
another class (sign descent on 1 − cos); the image is broken as soon as any copy
is misclassified. Features are the input of the final linear layer, taken with a
forward hook, so any architecture whose head is an nn.Linear works.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..nets import FeatureTap, eval_mode, find_last_linear
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
    """Settings: targets (M, 200), steps (50), step_size (ε/8), random_start (true),
    chunk (copies per forward/backward, 400: bounds memory, not results;
    lower it if a large model runs out of memory)."""

    def __init__(self, eps: float, *, seed: int = 0, targets: Any = 200, steps: Any = 50, step_size: Any = None,
                 random_start: Any = True, chunk: Any = 400, **settings: Any):
        super().__init__(eps, seed=seed, **settings)
        self.targets = int_setting(self.name, "targets", targets, 1)
        self.steps = int_setting(self.name, "steps", steps, 0)
        self.step_size = float_setting(self.name, "step_size", self.eps / 8 if step_size is None else step_size)
        self.random_start = bool_setting(self.name, "random_start", random_start)
        self.chunk = int_setting(self.name, "chunk", chunk, 1)
        self._model: nn.Module | None = None
        self._head: nn.Module | None = None
        self._pool_features: torch.Tensor | None = None
        self._candidates: dict[int, torch.Tensor] = {}

    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        """Penultimate features of the whole evaluation set (the target pool), computed once."""
        if len(x) == 0:
            raise UserError("the feature attack needs a non-empty evaluation set as its target pool")
        device = _model_device(model, x.device)
        with eval_mode(model), torch.no_grad():
            _, head = find_last_linear(model, x[:1].to(device))
            features = []
            with FeatureTap(head) as tap:
                for i in range(0, len(x), self.chunk):
                    model(x[i:i + self.chunk].to(device))
                    features.append(tap.features.flatten(1).clone())
        self._model, self._head = model, head
        self._pool_features = torch.cat(features)
        labels = y.to(device)
        self._candidates = {int(c): (labels != c).nonzero().squeeze(1) for c in labels.unique()}

    def _pick_targets(self, y: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """(B, M) pool indices, images of classes other than each example's own."""
        picks = []
        for label, g in zip(y.tolist(), generators):
            candidates = self._candidates.get(label)
            if candidates is None:  # a class absent from the pool: every pool image qualifies
                candidates = torch.arange(len(self._pool_features), device=self._pool_features.device)
            if len(candidates) == 0:
                raise UserError(f"the feature attack needs evaluation images of a class other than {label}: "
                                "evaluate more examples")
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
        with FeatureTap(self._head) as tap:
            for lo in range(0, len(x), images_per_group):
                hi = min(lo + images_per_group, len(x))
                x_adv[lo:hi], robust[lo:hi] = self._attack_group(
                    model, tap, x[lo:hi], y[lo:hi], target_idx[lo:hi], generators[lo:hi])
        return AttackResult(x_adv, robust)

    def _attack_group(self, model, tap, x, y, target_idx, generators):
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
            if len(active) == 0:
                break
        return x_out, robust

