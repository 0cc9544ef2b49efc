"""The tanh-transformed, ε-scaled Gaussian that ADT-EXP and ADT-EXP-AM put over δ.

    r ~ N(0, I),  u = μ + σ·r,  δ = ε·tanh(u)        (element-wise, same shape as x)

|δ| < ε by construction. The adversarial input is x' = clamp(x + δ, 0, 1); see
`apply_perturbation` for why a plain clamp is the right thing here even though it
is the wrong thing inside PGD.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F

_LOG_2 = math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


#: where a draw's randomness comes from: the global RNG (None), one generator for the whole draw,
#: or one generator per example (each example's noise is then the same whatever batch it sits in)
Rng = Union[torch.Generator, Sequence[torch.Generator], None]


def noise(kind: str, shape: Sequence[int], *, device: torch.device | str, dtype: torch.dtype = torch.float32,
          generator: Rng = None, batch_dim: int = 0) -> torch.Tensor:
    """N(0, 1) (`kind="normal"`) or U(0, 1) (`"uniform"`) noise of `shape`. With a list of
    generators, example i's slice along `batch_dim` is drawn from generator i alone."""
    draw = torch.randn if kind == "normal" else torch.rand
    shape = tuple(shape)
    if generator is None or isinstance(generator, torch.Generator):
        return draw(shape, generator=generator, device=device, dtype=dtype)
    generators = list(generator)
    if len(generators) != shape[batch_dim]:
        raise ValueError(f"{len(generators)} generators for {shape[batch_dim]} examples")
    one = shape[:batch_dim] + shape[batch_dim + 1:]
    return torch.stack([draw(one, generator=g, device=device, dtype=dtype) for g in generators], dim=batch_dim)


def sample(mu: torch.Tensor, sigma: torch.Tensor, eps: float, generator: Rng = None,
           batch_dim: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One reparameterised draw: returns (δ, u, r) so the caller can form the entropy
    estimate from the same noise. Gradients reach μ and σ through u. `batch_dim` is the
    examples' dimension, for per-example generators (`noise`)."""
    r = noise("normal", mu.shape, device=mu.device, dtype=mu.dtype, generator=generator, batch_dim=batch_dim)
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
