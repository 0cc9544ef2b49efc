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
from adt_finetune.perturb.adt_networks import EntropyNet, save_generator

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
    z = torch.rand(2048, 64) * 2 - 1
    delta = torch.rand(2048, 1, 4, 4, requires_grad=True)
    neg_ent = q.neg_entropy(z, delta)
    assert neg_ent.item() == pytest.approx(0.5 + 0.5 * math.log(2 * math.pi / 3), abs=0.01)
    hinge = F.relu(neg_ent - 0.9)
    assert hinge.item() == 0.0
    (grad,) = torch.autograd.grad(hinge, delta, allow_unused=True)
    assert grad is None or not grad.any()


def _imp_am_run(fmnist_train, trained_cnn, lam, steps=60, size=16):
    """IMP-AM fine-tuning on Fashion-MNIST at 16×16 (width-4 generator, batch 16, gen lr 1e-3):
    (diversity after `steps` steps, fraction of steps on which the regulariser's gradient
    reached the generator)."""
    x = F.interpolate(fmnist_train[0][:1024], size=(size, size), mode="bilinear", align_corners=False)
    y = fmnist_train[1][:1024]
    model = copy.deepcopy(trained_cnn).train()
    torch.manual_seed(0)
    cfg = TrainConfig(method="imp-am", gen_width=4, gen_lr=1e-3, adt_lambda=lam)
    method = make_method(cfg, MethodContext(eps=EPS, in_channels=1, num_classes=10, image_size=size,
                                            device=torch.device("cpu")))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    order = torch.Generator().manual_seed(0)
    reached = 0
    for _ in range(steps):
        idx = torch.randint(0, len(x), (16,), generator=order)
        method.zero_grad()
        opt.zero_grad()
        draws = []
        draw = method.adversary.draw
        method.adversary.draw = lambda *a: draws.append(draw(*a)) or draws[-1]
        out = method.step(model, x[idx], y[idx])
        method.adversary.draw = draw
        regulariser = draws[0][1]
        if lam > 0:  # the entropy term's own gradient at the generator, before the shared backward
            grads = torch.autograd.grad(regulariser, list(method.generator.parameters()), retain_graph=True,
                                        allow_unused=True)
            reached += any(g is not None and g.abs().sum() > 0 for g in grads)
        out.loss.backward()
        opt.step()
        method.after_backward()
    return method.epoch_diagnostics(model, x[:32], y[:32])["diversity"], reached / steps


@pytest.mark.slow
def test_imp_am_entropy_term_spreads_delta_over_z(fmnist_train, trained_cnn):
    """Ext. Eq. 14–15: the default entropy term (the variational bound at the default λ) must act:
    δ spreads over z at least twice as much as without it, and its gradient reaches the generator
    on most steps (the released hinge reached it on 33 of 150 steps and left δ a point)."""
    from adt_finetune.perturb.amortised import IMP_PAPER_LAMBDA

    assert TrainConfig().imp_entropy == "paper" and TrainConfig().adt_lambda is None
    with_entropy, reached = _imp_am_run(fmnist_train, trained_cnn, IMP_PAPER_LAMBDA)
    without, _ = _imp_am_run(fmnist_train, trained_cnn, 0.0)
    assert with_entropy >= 2 * without, (f"diversity (mean std of δ/ε across 16 draws of z) after 60 steps: "
                                         f"{with_entropy:.4f} at λ = {IMP_PAPER_LAMBDA}, {without:.4f} at λ = 0")
    assert reached > 0.9, f"the regulariser's gradient reached the generator on {reached:.0%} of the steps"


# ---------------------------------------------------------------- 2. the paper's EXP-AM / IMP-AM attacks

def _cotrained_generator_of_an_unrelated_run(path, fmnist_train):
    """An ADT-EXP-AM run's generator, co-trained with ANOTHER classifier (a fresh SmallCNN)."""
    torch.manual_seed(1)
    other = SmallCNN(width=8).train()
    cfg = TrainConfig(method="exp-am", gen_width=4, gen_lr=2e-3, batch_size=32)
    method = make_method(cfg, MethodContext(eps=EPS, in_channels=1, num_classes=10, image_size=28,
                                            device=torch.device("cpu")))
    opt = torch.optim.SGD(other.parameters(), lr=0.05, momentum=0.9)
    x, y = fmnist_train
    for i in range(20):
        idx = slice(32 * i, 32 * (i + 1))
        method.zero_grad()
        opt.zero_grad()
        method.step(other, x[idx], y[idx]).loss.backward()
        opt.step()
        method.after_backward()
    save_generator(path, method)


@pytest.mark.slow
def test_retrained_generator_attack_beats_an_unrelated_cotrained_generator(trained_cnn, fmnist_train, fmnist_test,
                                                                           tmp_path):
    """Ext. §5.4: "we retrain the generator networks for each pretrained defense". A generator
    trained against the evaluated model (on training images) lowers its accuracy far more than
    the generator co-trained in an unrelated run, which barely beats no attack; the settings
    record the training budget."""
    x, y = fmnist_test[0][:200], fmnist_test[1][:200]
    clean = _accuracy(trained_cnn, x, y)
    _cotrained_generator_of_an_unrelated_run(tmp_path / "generator.pt", fmnist_train)
    cotrained = make_attack("exp-am-cotrained", EPS, path=tmp_path / "generator.pt")
    cotrained.prepare(trained_cnn, x, y)
    cotrained_acc = cotrained(trained_cnn, x, y).robust.float().mean().item()

    budget = {"steps": 30, "width": 4, "batch": 32, "lr": 1e-2}
    retrained = make_attack("exp-am", EPS, **budget)
    assert retrained.uses_training_data
    retrained.set_training_data(fmnist_train[0][:2000], fmnist_train[1][:2000])
    retrained.prepare(trained_cnn, x, y)
    retrained_acc = retrained(trained_cnn, x, y).robust.float().mean().item()
    message = f"clean {clean:.3f}, co-trained (unrelated run) {cotrained_acc:.3f}, retrained {retrained_acc:.3f}"
    assert retrained_acc < clean - 0.3, message
    assert retrained_acc < cotrained_acc - 0.2, message
    settings = retrained.settings()
    assert {k: settings[k] for k in budget} == budget and settings["lam"] == 0.01, settings


def test_retrained_generator_is_cached_for_a_resumed_evaluation(trained_cnn, fmnist_train, fmnist_test, tmp_path,
                                                                 monkeypatch):
    """With a cache folder (the engine's, kept beside the partial results) the trained generator
    is saved, and a resumed evaluation reuses it instead of training again; progress goes to the
    reporter. A different model does not reuse it."""
    import adt_finetune.attacks.generator_attacks as generator_attacks
    from adt_finetune.progress import Reporter

    class Recorder(Reporter):
        def __init__(self):
            self.events = []

        def start(self, key, description, total, completed=0, status=""):
            self.events.append(("start", key, total))

        def advance(self, key, n=1, status=None):
            self.events.append(("advance", key, n))

        def finish(self, key):
            self.events.append(("finish", key))

        def message(self, text):
            self.events.append(("message", text))

    x, y = fmnist_test[0][:16], fmnist_test[1][:16]
    train = (fmnist_train[0][:256], fmnist_train[1][:256])
    settings = dict(steps=3, width=2, batch=16, z_dim=4)
    first, rep = make_attack("imp-am", EPS, **settings), Recorder()
    first.set_training_data(*train)
    first.bind(reporter=rep, cache_dir=tmp_path / "imp-am")
    first.prepare(trained_cnn, x, y)
    assert rep.events[0] == ("start", "imp-am generator", 3) and rep.events[-1] == ("finish", "imp-am generator")
    assert (tmp_path / "imp-am" / "generator.pt").exists()

    def no_training(*args, **kwargs):
        raise AssertionError("a resumed evaluation must reuse the cached generator")

    monkeypatch.setattr(generator_attacks, "fit_generator", no_training)
    resumed, rep2 = make_attack("imp-am", EPS, **settings), Recorder()
    resumed.set_training_data(*train)
    resumed.bind(reporter=rep2, cache_dir=tmp_path / "imp-am")
    resumed.prepare(trained_cnn, x, y)
    assert [e[0] for e in rep2.events] == ["message"]
    torch.testing.assert_close(resumed(trained_cnn, x, y).x_adv, first(trained_cnn, x, y).x_adv, rtol=0, atol=0)

    other_model = copy.deepcopy(trained_cnn)
    with torch.no_grad():
        other_model.fc.bias.add_(0.1)
    again = make_attack("imp-am", EPS, **settings)
    again.set_training_data(*train)
    again.bind(cache_dir=tmp_path / "imp-am")
    with pytest.raises(AssertionError, match="reuse the cached"):
        again.prepare(other_model, x, y)


def test_retrained_generator_default_budget_is_cpu_sized_and_recorded():
    exp_am, imp_am = make_attack("exp-am", EPS).settings(), make_attack("imp-am", EPS).settings()
    assert {k: exp_am[k] for k in ("steps", "width", "batch", "lr", "lam", "samples")} == {
        "steps": 100, "width": 8, "batch": 64, "lr": 2e-3, "lam": 0.01, "samples": 1}
    assert (imp_am["lam"], imp_am["z_dim"]) == (10.0, 64) and "z_dim" not in exp_am


def test_retrained_generator_attack_needs_training_images(trained_cnn, fmnist_test):
    from adt_finetune.errors import UserError

    x, y = fmnist_test[0][:8], fmnist_test[1][:8]
    with pytest.raises(UserError, match="training images"):
        make_attack("exp-am", EPS, steps=1).prepare(trained_cnn, x, y)


def test_evaluation_records_the_generator_budget_and_the_feature_tap(trained_cnn, fmnist_train, fmnist_test):
    """Through the engine: the retrained generator trains on the training images it is handed, and
    the result's settings record its budget and the feature attack's tap and target pool."""
    from adt_finetune.evaluation import evaluate

    x, y = fmnist_test[0][:12], fmnist_test[1][:12]
    result = evaluate(trained_cnn, x, y, attacks=["clean", "exp-am", "feature"], eps=EPS,
                      train_data=(fmnist_train[0][:200], fmnist_train[1][:200]),
                      attack_settings={"exp-am": {"steps": 2, "width": 2, "batch": 8},
                                       "feature": {"targets": 3, "steps": 2, "pool": 100}})
    recorded = result.to_json()["attack_settings"]
    assert {k: recorded["exp-am"][k] for k in ("steps", "width", "batch", "lr", "lam")} == {
        "steps": 2, "width": 2, "batch": 8, "lr": 2e-3, "lam": 0.01}
    assert recorded["feature"]["tap"] == "pre-pool (features.8)"  # SmallCNN's 4×4 map before the flatten
    assert recorded["feature"]["target_pool"] == "training images: seeded sample of 100 of 200"


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


# ---------------------------------------------------------------- 4. recipes say what they run

RELEASED_COMMON = dict(model="scratch", dataset="cifar10", scope="full", epochs=76, batch_size=64, lr=0.1,
                       momentum=0.9, weight_decay=2e-4, schedule="step", milestones=[75], gamma=0.1)
RELEASED_METHOD = {
    "exp": dict(exp_steps=7, exp_samples=5, exp_lr=0.3, exp_accumulate_grad=True, adt_lambda=0.01),
    "exp-am": dict(adt_lambda=0.01, gen_width=256, gen_lr=2e-4, gen_betas=(0.5, 0.999),
                   gen_normalize_gradients=False),
    "imp-am": dict(imp_entropy="hinge", adt_lambda=1.0, imp_hinge=0.9, z_dim=64, gen_width=256, gen_lr=2e-4,
                   gen_betas=(0.5, 0.999), gen_normalize_gradients=False),
}


@pytest.mark.parametrize("name", ["paper-cifar10-exp", "paper-cifar10-exp-am", "paper-cifar10-imp-am",
                                  "paper-cifar10-exp-trades", "paper-cifar10-exp-am-trades",
                                  "paper-cifar10-imp-am-trades"])
def test_paper_recipes_are_the_released_code_settings(name):
    """Every setting the released scripts fix is written out, so the recipe does not inherit an
    adt-ft default (normalised generator inputs, the IMP-AM bound) that the released code lacks."""
    from adt_finetune.training import build_config

    cfg = build_config(name)
    want = {**RELEASED_COMMON, **RELEASED_METHOD[cfg.method]}
    assert {k: getattr(cfg, k) for k in want} == want
    assert cfg.loss == ("trades" if name.endswith("-trades") else "ce")
    if cfg.method != "exp":  # the generator reads the released features: batch-mean CE gradients, raw z map
        tiny = cfg.updated({"gen_width": 2})
        method = make_method(tiny, MethodContext(eps=8 / 255, in_channels=3, num_classes=10, image_size=32,
                                                 device=torch.device("cpu")))
        assert method.generator.init_kwargs["normalize_gradients"] is False
        assert method.generator.init_kwargs["gradient_divisor"] == 64.0
        assert method.generator.init_kwargs.get("normalize_z", False) is False


# ---------------------------------------------------------------- 4. SPSA at clipped pixels (issue 13, item 4)

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
