"""The tanh-transformed, ε-scaled Gaussian that ADT-EXP and ADT-EXP-AM put over δ.

    r ~ N(0, I),  u = μ + σ·r,  δ = ε·tanh(u)        (element-wise, same shape as x)

|δ| < ε by construction. The adversarial input is x' = clamp(x + δ, 0, 1); see
`apply_perturbation` for why a plain clamp is the right thing here even though it
is the wrong thing inside PGD.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_LOG_2 = math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def sample(mu: torch.Tensor, sigma: torch.Tensor, eps: float,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One reparameterised draw: returns (δ, u, r) so the caller can form the entropy
    estimate from the same noise. Gradients reach μ and σ through u."""
    r = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    u = mu + sigma * r
    return eps * torch.tanh(u), u, r


def log_one_minus_tanh_sq(u: torch.Tensor) -> torch.Tensor:
    """log(1 − tanh(u)²) = 2·(log 2 − u − softplus(−2u)), finite for any u.

    The direct form rounds 1 − tanh(u)² to 0 once |u| ≳ 9 in float32 and returns −inf
    (the released code adds 1e-8 inside the log instead, which caps it at −18.4).
    """
    return 2.0 * (_LOG_2 - u - F.softplus(-2.0 * u))


def entropy_estimate(sigma: torch.Tensor, u: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Single-sample estimate of the entropy, averaged over ALL elements (batch included).

    Per element this is −log p(δ) minus its two constants: log σ + log(1 − tanh(u)²) + r²/2.
    The dropped constants, ½·log 2π and log ε, carry no gradient. The mean (not a sum
    over dimensions per example) follows the released code, so λ = 0.01 keeps its meaning.
    """
    return (torch.log(sigma) + log_one_minus_tanh_sq(u) + 0.5 * r.square()).mean()


def entropy_constant(eps: float) -> float:
    """What `entropy_estimate` leaves out per element: mean(−log p(δ)) = estimate + this."""
    return _HALF_LOG_2PI + math.log(eps)


def log_prob(delta: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, eps: float) -> torch.Tensor:
    """Exact element-wise log-density of δ (all constants included).

    log p(δ) = log N(u; μ, σ²) − log(1 − tanh(u)²) − log ε,  u = atanh(δ/ε).
    """
    u = torch.atanh(delta / eps)
    z = (u - mu) / sigma
    return -0.5 * z.square() - torch.log(sigma) - _HALF_LOG_2PI - log_one_minus_tanh_sq(u) - math.log(eps)


def apply_perturbation(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """x' = clamp(x + δ, 0, 1), differentiable in δ (the released code's choice).

    Why a plain clamp is right for a *distribution* although it is the trap in PGD:
    clamp's gradient is zero only where x + δ lies outside [0, 1]. A PGD iterate sits
    exactly on the bound with positive probability, so it freezes there. A sample
    from a continuous distribution lands exactly on a bound with probability zero,
    and where it lands beyond one the clipped pixel really does not change when δ
    moves a little — so the pathwise gradient through clamp is the unbiased gradient
    of E[L(clamp(x + δ))], the objective we optimise. A straight-through clip would
    instead claim that pushing a black pixel further below 0 still raises the loss,
    biasing μ and σ. |δ| < ε already holds, so clamping to [0, 1] keeps x' in the
    ε-ball as well.
    """
    return torch.clamp(x + delta, 0.0, 1.0)
