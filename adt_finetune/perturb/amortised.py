"""The amortised adversaries of ADT-EXP-AM and ADT-IMP-AM: a generator (and, for IMP-AM,
the variational posterior q_ψ) with the way it draws x' and the entropy regulariser
that goes with the draw (docs/methods.md, "ADT-EXP-AM", "ADT-IMP-AM"; Dong et al. 2020).

The training methods (`methods.adt_am`) and the retrained-generator attacks
(`attacks.generator_attacks`, via `perturb.generator_training`) both draw through these classes,
so training and evaluation cannot drift apart. The regulariser is written as it
enters a loss that both the generator and q_ψ *descend*: descending it raises the
entropy (and trains q_ψ to a tighter bound).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from . import tanh_gaussian as tg
from .exp_distribution import DEFAULT_LAMBDA
from .adt_networks import EntropyNet, ExplicitGenerator, ImplicitGenerator, diversity

#: --imp-entropy: "paper", the variational bound of the extended paper's Eq. 14–15 (default),
#: or "hinge", the released code's max(neg_ent − τ, 0)
IMP_ENTROPY_FORMS = ("paper", "hinge")
#: λ of the paper's bound (element mean over z's dimensions; 10/64 ≈ 0.16 in the paper's sum). The
#: bound's gradient reaches the generator only through how q_ψ reads z back from δ, and it fades as
#: q_ψ learns to ignore a δ that does not yet carry z: the generator has to build the dependence
#: first. Measured on Fashion-MNIST (width 8, batch 32, the released lr 2e-4, 300 steps; δ/ε's std
#: across z): 0.028 at λ = 0, 0.033 at 1, 0.21 at 3 (rising only after ~250 steps), 0.40 at 10 (from
#: ~100 steps, with q_ψ decoding z); EXP-AM's default reaches 0.17. λ = 10 is the smallest value
#: tried at which the term acted in every setting measured (docs/methods.md "ADT-IMP-AM").
IMP_PAPER_LAMBDA = 10.0
#: λ and τ of the released hinge
IMP_HINGE_LAMBDA = 1.0
IMP_HINGE_THRESHOLD = 0.9
#: draws of z (imp-am) or r (exp-am) per probe image for the diversity diagnostic
DIAGNOSTIC_DRAWS = 16
_LOG_2 = math.log(2.0)


def default_lambda(kind: str, imp_entropy: str = "paper") -> float:
    """The entropy weight λ each amortised method uses when none is given."""
    if kind == "imp-am":
        return IMP_HINGE_LAMBDA if imp_entropy == "hinge" else IMP_PAPER_LAMBDA
    return DEFAULT_LAMBDA


class ExplicitAdversary:
    """ADT-EXP-AM: (μ, σ) from the generator, one tanh-Gaussian sample per example;
    regulariser −λ·H with H the element-mean entropy estimate."""

    kind = "exp-am"

    def __init__(self, generator: ExplicitGenerator, eps: float, lam: float):
        self.generator, self.eps, self.lam = generator, float(eps), float(lam)

    def networks(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def draw(self, x: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor):
        """(x' differentiable in the generator, regulariser, metrics)."""
        mu, sigma = self.generator(x, g1, g2)
        delta, u, r = tg.sample(mu, sigma, self.eps)
        entropy = tg.entropy_estimate(sigma, u, r)
        return tg.apply_perturbation(x, delta.to(x.dtype)), -self.lam * entropy, {"entropy": entropy.item()}

    def diagnose(self, x, g1, g2, rng: torch.Generator) -> dict[str, float]:
        """diversity, and `sigma`: the mean σ of the Gaussian before tanh (networks in eval mode, no grad)."""
        mu, sigma = self.generator(x, g1, g2)
        shape = (DIAGNOSTIC_DRAWS, *mu.shape)
        units = tg.sample(mu.expand(shape), sigma.expand(shape), 1.0, rng)[0]
        return {"diversity": diversity(units), "sigma": sigma.mean().item()}


class ImplicitAdversary:
    """ADT-IMP-AM: δ = ε·tanh(G(x, g1, g2, z)), z ~ U(−1, 1)^z_dim, and q_ψ(z | δ/ε).

    neg_ent = E[−log q_ψ(z | δ)] averaged over z's dimensions (the released code's mean;
    the paper sums them, so λ here is the paper's λ times z_dim). H(z) + E[log q_ψ(z | δ)]
    = z_dim·(log 2 − neg_ent) lower-bounds I(z; δ), the paper's bound on the entropy.

    form "paper": regulariser λ·neg_ent, i.e. −λ·bound up to the constant H(z). It always
    acts: the generator is pushed to make δ carry z, q_ψ to read z back.
    form "hinge" (released code): λ·max(neg_ent − τ, 0). It acts only while q_ψ predicts z
    WORSE than τ = 0.9 nats per dimension. A q_ψ that ignores δ and predicts N(0, 1/3) for
    z ~ U(−1, 1) already scores ½ + ½·log(2π/3) = 0.8696 < 0.9, so a generator that
    ignores z satisfies the hinge and the term falls silent.
    """

    kind = "imp-am"

    def __init__(self, generator: ImplicitGenerator, entropy_net: EntropyNet, eps: float, lam: float,
                 form: str = "paper", hinge: float = IMP_HINGE_THRESHOLD):
        if form not in IMP_ENTROPY_FORMS:
            raise UserError(f"unknown `imp_entropy` {form!r}: choose paper or hinge")
        self.generator, self.entropy_net = generator, entropy_net
        self.eps, self.lam, self.form, self.hinge = float(eps), float(lam), form, float(hinge)

    def networks(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "entropy_net": self.entropy_net}

    def regulariser(self, neg_ent: torch.Tensor) -> torch.Tensor:
        if self.form == "hinge":
            return self.lam * F.relu(neg_ent - self.hinge)
        return self.lam * neg_ent

    def draw(self, x: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor):
        z = self.generator.sample_z(x.shape[0], x.device)
        delta_unit = torch.tanh(self.generator(x, g1, g2, z))
        neg_ent = self.entropy_net.neg_entropy(z, delta_unit)
        x_adv = tg.apply_perturbation(x, (self.eps * delta_unit).to(x.dtype))
        return x_adv, self.regulariser(neg_ent), {"neg_ent": neg_ent.item()}

    def diagnose(self, x, g1, g2, rng: torch.Generator) -> dict[str, float]:
        """diversity, and `mi_bound`: H(z) + E[log q_ψ(z | δ)] in nats, summed over z's
        dimensions; about −0.18·z_dim when δ ignores z (q_ψ's best Gaussian guess of a
        uniform z), growing as δ carries z."""
        units, neg_ents = [], []
        for _ in range(DIAGNOSTIC_DRAWS):
            z = self.generator.sample_z(x.shape[0], x.device, rng)
            unit = torch.tanh(self.generator(x, g1, g2, z))
            units.append(unit)
            neg_ents.append(self.entropy_net.neg_entropy(z, unit))
        neg_ent = torch.stack(neg_ents).mean().item()
        return {"diversity": diversity(torch.stack(units)), "mi_bound": self.generator.z_dim * (_LOG_2 - neg_ent)}


def build_adversary(kind: str, *, in_channels: int, width: int, eps: float, lam: float | None = None,
                    z_dim: int = 64, imp_entropy: str = "paper", imp_hinge: float = IMP_HINGE_THRESHOLD,
                    normalize_gradients: bool = True, gradient_divisor: float = 1.0,
                    device: torch.device | str = "cpu"):
    """A fresh ExplicitAdversary ("exp-am") or ImplicitAdversary ("imp-am"), networks on `device`.
    `gradient_divisor` (with normalize_gradients False): see `generators.gradient_input`."""
    lam = default_lambda(kind, imp_entropy) if lam is None else float(lam)
    if kind == "exp-am":
        gen = ExplicitGenerator(in_channels, width, normalize_gradients, gradient_divisor).to(device)
        return ExplicitAdversary(gen, eps, lam)
    if kind == "imp-am":
        if imp_entropy not in IMP_ENTROPY_FORMS:
            raise UserError(f"unknown `imp_entropy` {imp_entropy!r}: choose paper or hinge")
        gen = ImplicitGenerator(in_channels, width, z_dim, normalize_gradients, gradient_divisor,
                                normalize_z=normalize_gradients).to(device)
        return ImplicitAdversary(gen, EntropyNet(in_channels, z_dim).to(device), eps, lam, imp_entropy, imp_hinge)
    raise UserError(f"unknown generator kind {kind!r}: choose exp-am or imp-am")
