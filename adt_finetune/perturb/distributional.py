"""Wasserstein distributional robustness (docs/evaluation.md, "Distributional robustness"): W-PGD, the sensitivity Υ and
the first-order estimate of distributional adversarial accuracy.

Threat model. The attacker may move the whole evaluation distribution P (labels
fixed) to any Q with W_p(P, Q) ≤ δ for the ground cost ‖x − x'‖_∞. On the
empirical distribution of N images with W_2 this is the constraint
D(X', X) = sqrt(mean_i ‖x'_i − x_i‖_∞²) ≤ δ: the budget is shared, so an image
that is easy to flip can take more than δ while robust ones take less. The
ε-ball of pointwise L∞ robustness (every image ≤ ε) lies inside the W_2 ball
of radius ε, so distributional accuracy at δ = ε is at most pointwise accuracy.
W_∞ with the same cost (q = 1 here) is exactly the pointwise threat.

Loss. W-PGD, V(0), W(0) and Υ all use the same per-example loss J on the same
set (ReDLR by default). The first-order estimate rests on
A_δ ≈ A·(W(0) − V(δ))/(W(0) − V(0)) with V(δ) ≈ V(0) + δ·Υ, where V is the
mean of J over all points and W(0) its mean over the misclassified ones; that
identity only holds when the three statistics and the attack share one loss.
ReDLR is DLR on correctly classified points and 0 elsewhere, so W(0) = 0 and a
point that is already wrong neither has a gradient nor consumes budget.

Conjugates: q is the conjugate of p (q = 2 for W_2, q = 1 for W_∞) and s = 1 is
the conjugate of the l∞ ground cost, hence ‖g‖_1 throughout.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..nets import eval_mode
from ..utils import parse_eps
from .linf import project_linf, verdict

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, y) -> per-example loss

DEFAULT_STEPS = 50        # itr of the W-PGD paper
DEFAULT_RATIO = 1.875     # step = ratio·δ/itr: the total path length is 1.875·δ
DEFAULT_LOSS = "redlr"
#: the default budget grid, as multiples of the dataset's pointwise ε
DEFAULT_BUDGET_FACTORS = (0.25, 0.5, 1.0, 2.0)


# ------------------------------------------------------------------ losses

def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Croce & Hein's DLR: −(z_y − max_{j≠y} z_j)/(z_π1 − z_π3 + 1e-12).

    Negative on correctly classified points, non-negative on misclassified ones;
    the denominator makes it invariant to the scale of the logits.
    """
    if logits.shape[1] < 3:
        raise UserError(f"the DLR losses need at least 3 classes, the model has {logits.shape[1]}: use `loss` ce")
    top = logits.topk(3, dim=1).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    is_label = F.one_hot(y, logits.shape[1]).bool()
    z_other = logits.masked_fill(is_label, float("-inf")).amax(1)
    return -(z_y - z_other) / (top[:, 0] - top[:, 2] + 1e-12)


def redlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DLR on correctly classified points, 0 (and no gradient) on the others."""
    correct = verdict(logits, y)
    return torch.where(correct, dlr_loss(logits, y), torch.zeros((), dtype=logits.dtype, device=logits.device))


LOSSES: dict[str, LossFn] = {"redlr": redlr_loss, "dlr": dlr_loss, "ce": ce_loss}


def resolve_loss(name: str) -> LossFn:
    key = str(name).strip().lower()
    if key not in LOSSES:
        raise UserError(f"unknown Wasserstein loss {name!r}: choose from {', '.join(LOSSES)}")
    return LOSSES[key]


def _check_q(q: int) -> int:
    if q not in (1, 2) or isinstance(q, bool):
        raise UserError(f"q must be 1 (W_∞, pointwise) or 2 (W_2), got {q!r}")
    return int(q)


def _check_budget(budget: float) -> float:
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise UserError(f"cannot parse budget {budget!r}: give a number like 0.1 or a fraction like 8/255") from None
    if not math.isfinite(value) or value < 0:
        raise UserError(f"budget {budget!r} must be a non-negative number")
    return value


def parse_budgets(text: str | float | Sequence[str | float]) -> list[float]:
    """'0.05,0.1' or '8/255,16/255' (or a list of such) -> sorted unique budgets in [0, 1].

    Budgets are in pixel units of the l∞ ground cost. A W_2 budget may exceed
    the pointwise ε, but not 1: no image can move further than 1 in l∞, so a
    larger budget is the same as 1 and almost certainly a typo.
    """
    items: Iterable[Any]
    if isinstance(text, str):
        items = [t for t in text.split(",")]
    elif isinstance(text, (int, float)):
        items = [text]
    else:
        items = list(text)
    values: list[float] = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            raise UserError(f"empty budget in {text!r}: give a comma-separated list like 0.05,0.1 or 8/255,16/255")
        try:
            values.append(parse_eps(item))
        except UserError:
            raise UserError(f"budget {str(item).strip()!r} is not a number in [0, 1]: give a comma-separated "
                            "list like 0.05,0.1 or 8/255,16/255") from None
    if not values:
        raise UserError("no budgets given: give a comma-separated list like 0.05,0.1 or 8/255,16/255")
    return sorted(set(values))


def default_budgets(eps: float) -> list[float]:
    """ε·(1/4, 1/2, 1, 2), capped at 1: two budgets inside the pointwise ball's
    radius, the radius itself (where W_2 accuracy ≤ pointwise accuracy), and one
    beyond it."""
    return sorted({min(1.0, f * eps) for f in DEFAULT_BUDGET_FACTORS})


# ------------------------------------------------------------------ the W-PGD primitives

def sensitivity(l1_norms: torch.Tensor, q: int = 2) -> float:
    """Υ = (mean_i ‖g_i‖_1^q)^{1/q} from the per-image gradient norms."""
    q = _check_q(q)
    n = l1_norms.double()
    return float(n.pow(q).mean().pow(1.0 / q)) if n.numel() else 0.0


def direction_scale(l1_norms: torch.Tensor, q: int = 2, upsilon: float | None = None) -> torch.Tensor:
    """The per-image multiplier of sign(g_i) in one unit W-PGD step.

    q = 2: ‖g_i‖_1 / D with D = sqrt(mean_i ‖g_i‖_1²) (= Υ at the current iterate,
    or the `upsilon` given, e.g. a running average across mini-batches), so the
    RMS of the per-image step lengths is exactly one step and images with large
    gradients take larger steps. q = 1: 1 for every image (plain sign steps).
    A set whose gradients all vanish does not move.
    """
    q = _check_q(q)
    if q == 1:
        return torch.ones_like(l1_norms)
    denom = sensitivity(l1_norms, 2) if upsilon is None else float(upsilon)
    if denom <= 0:
        return torch.zeros_like(l1_norms)
    return l1_norms / denom


def _per_image(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *[1] * (like.dim() - 1))


def wpgd_direction(grad: torch.Tensor, q: int = 2, upsilon: float | None = None) -> torch.Tensor:
    """d_i = sign(g_i)·‖g_i‖_1^{q−1} / D for a whole set of gradients (N, ...)."""
    scale = direction_scale(grad.flatten(1).abs().sum(1), q, upsilon)
    return grad.sign() * _per_image(scale.to(grad.dtype), grad)


def linf_norms(x_adv: torch.Tensor, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """‖x'_i − x_i‖_∞ per image, computed in chunks so no N-sized difference is held."""
    out = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for i in range(0, len(x), batch_size):
        out[i:i + batch_size] = (x_adv[i:i + batch_size] - x[i:i + batch_size]).flatten(1).abs().amax(1)
    return out


def w2_distance(x_adv: torch.Tensor, x: torch.Tensor, batch_size: int = 1024) -> float:
    """D(X', X) = sqrt(mean_i ‖x'_i − x_i‖_∞²): the W_2 distance of the two empirical
    distributions under the pairing x_i ↔ x'_i (an upper bound on the optimal one)."""
    if len(x) == 0:
        return 0.0
    return float(linf_norms(x_adv, x, batch_size).double().pow(2).mean().sqrt())


def project_w2_(x_adv: torch.Tensor, x: torch.Tensor, budget: float, batch_size: int = 1024) -> torch.Tensor:
    """Project X' in place onto {D(X', X) ≤ budget} ∩ [0, 1], as docs/evaluation.md describes it.

    With ρ = min(1, budget/D) every image's perturbation is clipped elementwise to
    ±ρ·‖Δ_i‖_∞: each image keeps its share of the budget and its shape, and D
    shrinks by exactly ρ. Clipping into [0, 1] afterwards only moves pixels toward
    x (x itself is in [0, 1]), so it cannot push D back over the budget.
    """
    budget = _check_budget(budget)
    norms = linf_norms(x_adv, x, batch_size)
    dist = float(norms.double().pow(2).mean().sqrt()) if len(x) else 0.0
    if dist <= budget:
        # Inside the ball: recomputing x + Δ would only add rounding noise.
        return x_adv.clamp_(0.0, 1.0)
    rho = budget / dist
    for i in range(0, len(x), batch_size):
        sl = slice(i, i + batch_size)
        bound = _per_image(rho * norms[sl], x[sl])
        delta = torch.minimum(torch.maximum(x_adv[sl] - x[sl], -bound), bound)
        x_adv[sl] = (x[sl] + delta).clamp_(0.0, 1.0)
    return x_adv


def project_(x_adv: torch.Tensor, x: torch.Tensor, budget: float, q: int, batch_size: int = 1024) -> torch.Tensor:
    """The W-PGD projection for q: the W_2 ball (q = 2) or the pointwise L∞ ball (q = 1)."""
    if _check_q(q) == 1:
        for i in range(0, len(x), batch_size):
            sl = slice(i, i + batch_size)
            x_adv[sl] = project_linf(x_adv[sl], x[sl], budget)
        return x_adv
    return project_w2_(x_adv, x, budget, batch_size)


def distance(x_adv: torch.Tensor, x: torch.Tensor, q: int) -> float:
    """The distance the budget constrains: W_2 (q = 2) or W_∞ = max_i ‖Δ_i‖_∞ (q = 1)."""
    if _check_q(q) == 1:
        return float(linf_norms(x_adv, x).max()) if len(x) else 0.0
    return w2_distance(x_adv, x)


# ------------------------------------------------------------------ clean statistics

@dataclass
class CleanStats:
    accuracy: float   # A
    v0: float         # V(0): mean loss over all points
    w0: float         # W(0): mean loss over misclassified points (NaN if there are none and the loss is not ReDLR)
    upsilon: float    # Υ = (mean_i ‖∇x J(x_i, y_i)‖_1^q)^{1/q}
    loss: str
    q: int
    n: int

    def to_json(self) -> dict[str, Any]:
        return {k: _json_float(v) for k, v in asdict(self).items()}


def _json_float(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _device_of(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _check_set(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
    if len(x) == 0:
        raise UserError("no examples to evaluate: give at least one image")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    if batch_size <= 0:
        raise UserError(f"batch size must be positive, got {batch_size}")


def clean_statistics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss: str = DEFAULT_LOSS, q: int = 2,
                     batch_size: int = 256, device: str | torch.device | None = None) -> CleanStats:
    """A, V(0), W(0) and Υ of `loss` on (x, y), with the classifier in eval mode."""
    loss_fn = resolve_loss(loss)
    q = _check_q(q)
    _check_set(x, y, batch_size)
    dev = _device_of(model, device)
    losses, correct, norms = [], [], []
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].detach().to(dev).clone().requires_grad_(True)
            yb = y[i:i + batch_size].to(dev)
            logits = model(xb)
            per_example = loss_fn(logits, yb)
            (grad,) = torch.autograd.grad(per_example.sum(), xb)
            losses.append(per_example.detach().double())
            correct.append(verdict(logits.detach(), yb))
            norms.append(grad.flatten(1).abs().sum(1).double())
    j, ok, n1 = torch.cat(losses), torch.cat(correct), torch.cat(norms)
    wrong = ~ok
    if wrong.any():
        w0 = float(j[wrong].mean())
    else:
        # ReDLR is 0 on misclassified points by definition; other losses have no value to report.
        w0 = 0.0 if str(loss).lower() == "redlr" else float("nan")
    return CleanStats(accuracy=float(ok.double().mean()), v0=float(j.mean()), w0=w0, upsilon=sensitivity(n1, q),
                      loss=str(loss).lower(), q=q, n=len(x))


def first_order_estimate(accuracy: float, v0: float, w0: float, upsilon: float, budget: float) -> float:
    """A·(W(0) − V(0) − δ·Υ)/(W(0) − V(0)), clipped to [0, A].

    Clipped because it estimates an accuracy: it cannot exceed the clean accuracy
    (the attack may stay put) nor drop below 0. NaN when the loss does not
    separate misclassified from correct points (W(0) ≤ V(0), or W(0) undefined),
    except that a clean accuracy of 0 is an estimate of 0 at every budget.
    """
    budget = _check_budget(budget)
    if accuracy <= 0:
        return 0.0
    gap = w0 - v0
    if not (math.isfinite(gap) and gap > 0 and math.isfinite(upsilon)):
        return float("nan")
    value = accuracy * (gap - budget * upsilon) / gap
    return min(accuracy, max(0.0, value))


# ------------------------------------------------------------------ W-PGD over a whole set

@dataclass
class WPGDResult:
    x_adv: torch.Tensor    # (N, ...) the best iterate over the set
    robust: torch.Tensor   # (N,) bool: still correct at that iterate
    accuracy: float        # mean of `robust`
    best_step: int         # 0 is the clean set
    distance: float        # W_2 (q = 2) or W_∞ (q = 1) distance of x_adv from x
    accuracies: list[float] = field(default_factory=list)  # per iterate, 0..last evaluated


def wpgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, budget: float, q: int = 2,
         steps: int = DEFAULT_STEPS, ratio: float = DEFAULT_RATIO, loss: str = DEFAULT_LOSS,
         batch_size: int = 256, device: str | torch.device | None = None,
         progress: Callable[[int, float], None] | None = None,
         on_step: Callable[[int, torch.Tensor], None] | None = None) -> WPGDResult:
    """Dataset-level W-PGD: all N images move together under one shared budget.

    Each step: one forward/backward pass over the set in batches gives every
    image's gradient sign (kept as int8) and ‖g_i‖_1; the same logits score the
    current iterate, so scoring costs no extra pass except after the last step.
    Then every image moves by step·sign(g_i)·‖g_i‖_1/Υ_t (q = 2; q = 1: step·sign)
    with step = ratio·budget/steps, and the set is projected back (`project_`).
    The returned iterate is the one with the lowest accuracy over the whole set
    (the clean set included), ties going to the earlier, smaller perturbation.

    Memory: x' (N floats per pixel), the int8 signs, and one copy of the best
    iterate once an attacked iterate beats the clean one. `progress(t, acc)` is
    told each iterate's accuracy; `on_step(t, x')` sees x' after step t's
    projection (read only).
    """
    loss_fn = resolve_loss(loss)
    q = _check_q(q)
    budget = _check_budget(budget)
    if int(steps) < 1:
        raise UserError(f"W-PGD needs at least one step, got {steps}")
    if not ratio > 0:
        raise UserError(f"the W-PGD step ratio must be positive, got {ratio}")
    _check_set(x, y, batch_size)
    steps = int(steps)
    dev = _device_of(model, device)
    x = x.detach().to(dev)
    y = y.to(dev)
    n = len(x)
    step_size = ratio * budget / steps

    x_adv = x.clone()
    signs = torch.empty(x.shape, dtype=torch.int8, device=dev)
    l1 = torch.empty(n, dtype=x.dtype, device=dev)
    correct = torch.empty(n, dtype=torch.bool, device=dev)
    best_x: torch.Tensor | None = None      # None: the clean set is the best so far
    best_flags = None
    best_acc, best_step = math.inf, 0
    history: list[float] = []

    with eval_mode(model):
        for t in range(steps + 1):
            last = t == steps
            _score_and_gradients(model, x_adv, y, loss_fn, batch_size, correct, None if last else (signs, l1))
            acc = float(correct.double().mean())
            history.append(acc)
            if progress is not None:
                progress(t, acc)
            if acc < best_acc:
                best_acc, best_step, best_flags = acc, t, correct.clone()
                if t > 0:
                    best_x = x_adv.clone() if best_x is None else best_x.copy_(x_adv)
            if last or acc == 0.0:
                break  # nothing can beat an accuracy of 0
            _step_(x_adv, x, signs, l1, step_size=step_size, budget=budget, q=q, batch_size=batch_size)
            if on_step is not None:
                on_step(t + 1, x_adv)

    result_x = x.clone() if best_x is None else best_x
    assert best_flags is not None
    return WPGDResult(x_adv=result_x, robust=best_flags, accuracy=best_acc, best_step=best_step,
                      distance=distance(result_x, x, q), accuracies=history)


def _score_and_gradients(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, batch_size: int,
                         correct: torch.Tensor, grads: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """One pass over the set in batches: `correct` (in place) and, unless `grads` is None, each
    image's gradient sign (int8) and ‖g_i‖_1 into the (signs, l1) buffers."""
    for i in range(0, len(x_adv), batch_size):
        sl = slice(i, i + batch_size)
        if grads is None:
            with torch.no_grad():
                correct[sl] = verdict(model(x_adv[sl]), y[sl])
            continue
        signs, l1 = grads
        # A fresh leaf already inside [0, 1]: never differentiate through a clamp.
        xb = x_adv[sl].clone().requires_grad_(True)
        logits = model(xb)
        (grad,) = torch.autograd.grad(loss_fn(logits, y[sl]).sum(), xb)
        signs[sl] = grad.sign().to(torch.int8)
        l1[sl] = grad.flatten(1).abs().sum(1)
        correct[sl] = verdict(logits.detach(), y[sl])


@torch.no_grad()
def _step_(x_adv: torch.Tensor, x: torch.Tensor, signs: torch.Tensor, l1: torch.Tensor, *, step_size: float,
           budget: float, q: int, batch_size: int) -> None:
    """Move every image by step·sign(g_i)·‖g_i‖_1/Υ_t (q = 2; q = 1: step·sign), then project the set."""
    scale = direction_scale(l1, q)
    for i in range(0, len(x), batch_size):
        sl = slice(i, i + batch_size)
        move = signs[sl].to(x.dtype)
        if q == 2:
            move = move * _per_image(scale[sl], move)
        x_adv[sl] = x_adv[sl] + step_size * move
    project_(x_adv, x, budget, q, batch_size)

