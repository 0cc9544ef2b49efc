"""adt-ft computes what the ADT papers define (issue 13): an IMP-AM entropy term that acts, the
exp-am/imp-am attacks retrained against the evaluated model, the appendix's feature attack,
recipes that are the released code's settings, and SPSA's finite differences at clipped pixels."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adt_finetune.attacks import make_attack
from adt_finetune.attacks.base import example_generators
from adt_finetune.config import TrainConfig
from adt_finetune.methods import MethodContext, make_method
from adt_finetune.models import SmallCNN
from adt_finetune.nets import find_feature_map, find_last_linear
from adt_finetune.perturb.generators import EntropyNet, save_generator

EPS = 0.1  # Fashion-MNIST's budget


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


# ---------------------------------------------------------------- 1. IMP-AM's entropy term acts

def test_released_hinge_is_satisfied_by_a_q_that_ignores_delta():
    """The reason the paper's bound is the default: for z ~ U(−1, 1) the best Gaussian that ignores
    δ, N(0, 1/3), already has a negative log-likelihood of ½ + ½·log(2π/3) = 0.8696 < 0.9 per
    dimension, so the released hinge max(neg_ent − 0.9, 0) is 0 with no gradient."""
    torch.manual_seed(0)
    q = EntropyNet(1, z_dim=64)
    with torch.no_grad():  # q ignores its input: mean 0, variance softplus(b) = 1/3
        q.head.weight.zero_()
        q.head.bias[:64] = 0.0
        q.head.bias[64:] = math.log(math.expm1(1 / 3))
    z = torch.rand(4096, 64) * 2 - 1
    delta = torch.rand(4096, 1, 8, 8, requires_grad=True)
    neg_ent = q.neg_entropy(z, delta)
    assert neg_ent.item() == pytest.approx(0.5 + 0.5 * math.log(2 * math.pi / 3), abs=0.01)
    assert F.relu(neg_ent - 0.9).item() == 0.0


# ---------------------------------------------------------------- 3. the appendix's feature attack

class _FunctionalPoolNet(nn.Module):
    """Ends as RobustBench's WideResNet does: relu(bn(conv(x))) as modules, then a functional
    global average pool, a view and the linear head, so no module ever outputs the pooled map."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width))
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        out = self.relu(self.bn1(self.block(self.conv(x))))
        out = F.avg_pool2d(out, out.shape[-1])
        return self.fc(out.view(len(out), -1))


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 32), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.body(x))


def test_feature_attack_taps_the_map_before_global_pooling(fmnist_test):
    """Appendix C.5: the features are the last feature map BEFORE global average pooling; a
    functional pool is no obstacle, a model without a spatial map falls back to the head's
    input, and the settings name the tap that was used."""
    x, y = fmnist_test[0][:20], fmnist_test[1][:20]
    torch.manual_seed(0)
    net = _FunctionalPoolNet().eval()
    name, module = find_feature_map(net, x[:1], find_last_linear(net, x[:1])[1])
    assert (name, module) == ("relu", net.relu)
    attack = make_attack("feature", EPS, targets=3, steps=2)
    attack.prepare(net, x, y)
    assert attack.settings()["layer"] == "pre-pool" and attack.settings()["tap"] == "pre-pool (relu)"
    assert attack._pool_features.shape == (20, 6 * 14 * 14)  # the 6×14×14 map, not the 6 pooled features
    assert attack(net, x, y).x_adv.shape == x.shape

    penultimate = make_attack("feature", EPS, layer="penultimate", targets=3, steps=2)
    penultimate.prepare(net, x, y)
    assert penultimate._pool_features.shape == (20, 6) and penultimate.tap.startswith("penultimate")

    mlp = make_attack("feature", EPS, targets=3, steps=2)
    mlp.prepare(_MLP().eval(), x, y)
    assert mlp.tap.startswith("penultimate") and "no spatial feature map" in mlp.tap
    assert mlp._pool_features.shape == (20, 32)


def test_feature_targets_come_from_a_fixed_pool_of_training_images(trained_cnn, fmnist_train, fmnist_test):
    """The M targets of an image do not depend on how many images are evaluated: they come
    from a seeded sample of training images (recorded), not from the evaluated subset."""
    from adt_finetune.attacks.base import example_generators as gens

    x, y = fmnist_test
    picks, pools = [], []
    for n in (10, 60):
        attack = make_attack("feature", EPS, targets=50, pool=300)
        attack.set_training_data(*fmnist_train)
        attack.prepare(trained_cnn, x[:n], y[:n])
        assert attack.target_pool == "training images: seeded sample of 300 of 4000"
        pools.append(attack._pool_features)
        picks.append(attack._pick_targets(y[:10], gens(x[:10], "feature:0")))
    torch.testing.assert_close(pools[0], pools[1], rtol=0, atol=0)
    assert torch.equal(picks[0], picks[1])
    assert len(set(picks[0][0].tolist())) == 50  # 200+ other-class images in the pool: no repeats

    fallback = make_attack("feature", EPS, targets=5)
    fallback.prepare(trained_cnn, x[:30], y[:30])
    assert fallback.target_pool.startswith("evaluated images (no training images given)")


# ---------------------------------------------------------------- 4. SPSA at clipped pixels

class _LinearMargin(nn.Module):
    """Margin z_0 − z_1 = w·x + 10 exactly (class 0 always wins), so ∇x margin = w everywhere."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = w

    def forward(self, x):
        m = (x.flatten(1) * self.w).sum(1) + 10.0
        return torch.stack([m, torch.zeros_like(m)], 1)


def test_spsa_divides_by_the_distance_its_clipped_probes_really_are_apart():
    """At a pixel at 0 or 1 only one of the two clipped probes moves, so the pair is δ apart,
    not 2δ. On a linear margin w·x the estimate must be w at every pixel, saturated ones
    included; dividing every pixel by 2δ gives w/2 at the pixels at 0 and 1."""
    w = torch.tensor([1.0, -2.0, 3.0, -1.5])
    x = torch.tensor([0.0, 1.0, 0.5, 0.0]).view(1, 1, 2, 2)  # three saturated pixels, one free
    y = torch.tensor([0])
    attack = make_attack("spsa", EPS, samples=20000, delta=0.01)
    wrong, grad = attack._gradient_estimate(_LinearMargin(w), x, y, example_generators(x, "spsa:0"))
    assert not wrong.any()
    # statistical error of 10,000 pairs: ≤ 0.07 at a saturated pixel; the old estimate was off by ≥ 0.5
    torch.testing.assert_close(grad.flatten(), w, rtol=0, atol=0.3)
