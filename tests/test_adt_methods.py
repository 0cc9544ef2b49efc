"""ADT-EXP, ADT-EXP-AM, ADT-IMP-AM: the tanh-Gaussian, bounds, pass counts, the
gradient-reversal signs, the generator file, and a short learning run on real data."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import AffineTransform, Normal, TanhTransform, TransformedDistribution

from adt_finetune.perturb.linf import sign_gradient_ascent
from adt_finetune.config import TrainConfig
from adt_finetune.errors import UserError
from adt_finetune.methods import MethodContext, make_method
from adt_finetune.perturb import tanh_gaussian as tg
from adt_finetune.perturb.exp_distribution import fit_exp_distribution, sample_exp
from adt_finetune.perturb.adt_networks import (EntropyNet, ExplicitGenerator, ImplicitGenerator,
                                               gradient_features, load_generator, save_generator)
from adt_finetune.models import SmallCNN
from adt_finetune.nets import PassCounter, eval_mode

EPS = 0.3  # large, so that clipping to [0, 1] matters
SIZE = 12  # small images keep the generators cheap; SmallCNN pools adaptively
TINY = dict(gen_width=4, exp_steps=3, exp_samples=2)


def ctx_for(size=SIZE, eps=EPS, channels=1):
    return MethodContext(eps=eps, in_channels=channels, num_classes=10, image_size=size, device=torch.device("cpu"))


def method_for(name, loss="ce", *, eps=EPS, size=SIZE, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = TrainConfig(method=name, loss=loss, **{**TINY, **overrides})
    return make_method(cfg, ctx_for(size, eps))


def saturated_batch(n=8, size=SIZE, seed=0):
    """Images whose pixels are mostly exactly 0 or 1, the case where clipping bites."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g)
    kind = torch.rand(n, 1, size, size, generator=g)
    x = torch.where(kind < 0.4, torch.zeros_like(x), torch.where(kind < 0.7, torch.ones_like(x), x))
    return x, torch.randint(0, 10, (n,), generator=g)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return SmallCNN(width=4).train()


# ---------------------------------------------------------------- the tanh-Gaussian

def test_log_prob_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    shape = (4, 3, 5, 5)
    mu = (torch.rand(shape, generator=g, dtype=torch.float64) * 4 - 2)
    sigma = torch.rand(shape, generator=g, dtype=torch.float64) * 1.4 + 0.1
    eps = 0.3
    delta, _, _ = tg.sample(mu, sigma, eps, generator=g)
    reference = TransformedDistribution(Normal(mu, sigma), [TanhTransform(), AffineTransform(0.0, eps)])
    torch.testing.assert_close(tg.log_prob(delta, mu, sigma, eps), reference.log_prob(delta), rtol=1e-9, atol=1e-9)


def test_log_one_minus_tanh_sq_is_exact_and_finite():
    u = torch.linspace(-5, 5, 101, dtype=torch.float64)
    torch.testing.assert_close(tg.log_one_minus_tanh_sq(u), torch.log(1 - torch.tanh(u) ** 2), rtol=1e-10, atol=1e-10)
    big = tg.log_one_minus_tanh_sq(torch.tensor([30.0, -30.0]))  # float32: 1 − tanh² rounds to 0 here
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big, torch.tensor([2 * (math.log(2) - 30.0)] * 2))


def test_entropy_estimate_is_minus_mean_log_density_without_constants():
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    sigma = F.softplus(torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64))
    eps = 8 / 255
    delta, u, r = tg.sample(mu, sigma, eps, generator=g)
    exact = -tg.log_prob(delta, mu, sigma, eps).mean()
    torch.testing.assert_close(tg.entropy_estimate(sigma, u, r) + tg.entropy_constant(eps), exact,
                               rtol=1e-9, atol=1e-9)


def test_sample_stays_strictly_inside_eps():
    mu = torch.tensor([-50.0, -3.0, 0.0, 3.0, 50.0])
    delta, _, _ = tg.sample(mu, torch.full_like(mu, 0.5), 0.1, generator=torch.Generator().manual_seed(0))
    assert delta.abs().max() <= 0.1
    assert torch.sign(delta[[0, -1]]).tolist() == [-1.0, 1.0]


# ---------------------------------------------------------------- every x' in the ε-ball and [0, 1]

@pytest.mark.parametrize("name", ["exp", "exp-am", "imp-am"])
@pytest.mark.parametrize("loss", ["ce", "trades"])
def test_training_inputs_stay_in_ball_and_box(name, loss):
    x, y = saturated_batch()
    out = method_for(name, loss).step(tiny_model(), x, y)
    x_adv = out.x_adv
    assert x_adv.shape == x.shape
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    # pixels at the bounds are not frozen: some black ones brighten, some white ones darken
    assert (x_adv[x == 0] > 0).float().mean() > 0.2
    assert (x_adv[x == 1] < 1).float().mean() > 0.2
    assert torch.isfinite(out.loss)


def generator_attack(gen, meta, model, x, y, generator=None):
    """One x' per example drawn from a generator (eval mode), as the exp-am/imp-am attacks draw them."""
    eps = float(meta["eps"])
    g1, g2, _ = gradient_features(model, x, y, eps)
    with torch.no_grad(), eval_mode(gen):
        delta = gen.sample_delta(x, g1, g2, eps, generator=generator)
    return tg.apply_perturbation(x.detach(), delta)


def test_exp_attack_pieces_and_generator_attack_stay_in_ball_and_box():
    x, y = saturated_batch()
    model = tiny_model().eval()
    mu, v = fit_exp_distribution(model, x, y, eps=EPS, steps=2, samples=3, lr=0.3, lam=0.01)
    delta = sample_exp(mu, v, EPS, 5, generator=torch.Generator().manual_seed(0))
    assert delta.shape == (5, *x.shape)
    x_adv = tg.apply_perturbation(x.unsqueeze(0), delta)
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    for name in ("exp-am", "imp-am"):
        method = method_for(name)
        x_adv = generator_attack(method.generator, {"eps": EPS}, model, x, y)
        assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


# ---------------------------------------------------------------- pass budget

# (forward calls, backward passes) of the classifier per step, T = 3 inner steps
EXPECTED_PASSES = {
    ("exp", "ce"): (3 + 1, 3 + 1),           # T batched k·B passes + the update pass
    ("exp", "trades"): (1 + 3 + 2, 3 + 2),   # eval-mode KL target (no backward), T, train clean + adversarial
    ("exp-am", "ce"): (3, 3),                # g1, g2, x'
    ("exp-am", "trades"): (4, 4),            # g1, g2, train-mode clean, x'
    ("imp-am", "ce"): (3, 3),
    ("imp-am", "trades"): (4, 4),
}


@pytest.mark.parametrize("name,loss", sorted(EXPECTED_PASSES))
def test_forward_and_backward_pass_budget(name, loss):
    x, y = saturated_batch()
    model = tiny_model()
    method = method_for(name, loss)
    with PassCounter(model) as counter:
        out = method.step(model, x, y)
        # the adversary's search must leave the classifier's parameter gradients alone
        assert all(p.grad is None for p in model.parameters())
        out.loss.backward()
    assert (counter.forward, counter.backward) == EXPECTED_PASSES[name, loss]
    if name == "exp":  # the k samples really are one batch of k·B
        k, steps, b = TINY["exp_samples"], TINY["exp_steps"], len(x)
        assert counter.images_forward == steps * k * b + b * (3 if loss == "trades" else 1)
    assert model.training, "the classifier must come back in train mode"
    assert all(p.grad is not None for p in model.parameters())


def test_gradient_features_are_per_example_input_gradients():
    x, y = saturated_batch(n=5)
    model = tiny_model()
    with PassCounter(model) as counter:
        g1, g2, logits = gradient_features(model, x, y, EPS)
    assert (counter.forward, counter.backward) == (2, 2)
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    model.eval()
    for i in range(len(x)):  # one example at a time: the gradient must not depend on the batch
        xi = x[i:i + 1].clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i:i + 1]), xi)
        torch.testing.assert_close(g1[i:i + 1], gi, rtol=1e-4, atol=1e-7)
        x_fgsm = (x[i:i + 1] + EPS * gi.sign()).clamp(0, 1).requires_grad_(True)
        (gi2,) = torch.autograd.grad(F.cross_entropy(model(x_fgsm), y[i:i + 1]), x_fgsm)
        torch.testing.assert_close(g2[i:i + 1], gi2, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(logits, model(x).detach())


# ---------------------------------------------------------------- gradient reversal

# Each case names the quantity the adversary must have improved, read from the metrics
# independently of how the code folds it into its one total loss: with λ = 0 the
# training loss on x' (the reversal's sign), with a large λ the entropy (its sign).
@pytest.mark.parametrize("name,overrides,quantity,direction", [
    ("exp-am", dict(adt_lambda=0.0), "loss", +1),
    ("exp-am", dict(adt_lambda=100.0), "entropy", +1),
    ("imp-am", dict(adt_lambda=0.0, imp_entropy="paper"), "loss", +1),
    ("imp-am", dict(adt_lambda=100.0, imp_entropy="paper"), "neg_ent", -1),
    ("imp-am", dict(adt_lambda=100.0, imp_entropy="hinge", imp_hinge=0.0), "neg_ent", -1),  # hinge active
])
def test_one_step_helps_the_adversary_and_the_classifier(name, overrides, quantity, direction):
    x, y = saturated_batch(n=16, seed=3)
    model = tiny_model(seed=1)
    original = copy.deepcopy(model)
    method = method_for(name, gen_lr=1e-4, **overrides)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    torch.manual_seed(7)
    method.zero_grad()
    opt.zero_grad()
    before = method.step(model, x, y)
    before.loss.backward()
    opt.step()
    method.after_backward()

    torch.manual_seed(7)  # same noise, updated generator, ORIGINAL classifier
    after = method.step(original, x, y)
    change = direction * (after.metrics[quantity] - before.metrics[quantity])
    assert change > 0, (f"the generator's step moved its {quantity} the wrong way: "
                        f"{before.metrics[quantity]:.6f} → {after.metrics[quantity]:.6f}")
    if overrides["adt_lambda"] == 0:  # then the adversary's objective is the loss itself
        assert after.metrics["adv_objective"] > before.metrics["adv_objective"]

    with torch.no_grad():  # same x', updated classifier (train mode, as in the step)
        after_cls = F.cross_entropy(model(before.x_adv), y).item()
    assert after_cls < before.metrics["loss"], (
        f"the classifier's step raised its loss: {before.metrics['loss']:.6f} → {after_cls:.6f}")


def test_trades_reversed_gradient_is_divided_by_beta():
    x, y = saturated_batch(n=8, seed=4)
    model = tiny_model(seed=2)
    grads = {}
    for beta in (1.0, 6.0):
        method = method_for("exp-am", "trades", beta=beta, seed=0)
        torch.manual_seed(3)
        method.step(copy.deepcopy(model), x, y).loss.backward()
        grads[beta] = [p.grad.clone() for p in method.generator.parameters()]
    # the generator ascends KL itself whatever β is: its gradient must not scale with β
    for g1, g6 in zip(grads[1.0], grads[6.0]):
        torch.testing.assert_close(g6, g1, rtol=1e-4, atol=1e-9)
    assert any(g.abs().sum() > 0 for g in grads[1.0])


# ---------------------------------------------------------------- ADT-EXP's inner problem

def test_fitted_distribution_beats_its_starting_point(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:64], fmnist_test[1][:64]
    eps = 0.1
    for p in trained_cnn.parameters():
        p.grad = None
    mu, v = fit_exp_distribution(trained_cnn, x, y, eps=eps, steps=5, samples=3, lr=0.3, lam=0.01,
                                 generator=torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in trained_cnn.parameters())

    def mean_ce(mu, v):
        delta = sample_exp(mu, v, eps, 4, generator=torch.Generator().manual_seed(1))
        x_adv = tg.apply_perturbation(x.unsqueeze(0), delta).flatten(0, 1)
        with torch.no_grad():
            return F.cross_entropy(trained_cnn(x_adv), y.repeat(4)).item()

    start, fitted = mean_ce(torch.zeros_like(mu), torch.zeros_like(v)), mean_ce(mu, v)
    assert fitted > start + 1.0, f"fitted distribution CE {fitted:.3f} vs starting distribution {start:.3f}"


def test_accumulated_gradients_follow_the_running_sum():
    """With a linear loss whose gradient flips sign every step, accumulating keeps
    stepping the same way (the sum stays positive); not accumulating oscillates."""
    calls = {"n": 0}

    class Flip(torch.nn.Module):
        def forward(self, x):
            calls["n"] += 1
            # step 1: +1000·sum(x'), step 2: −1·sum(x'): the running sum stays positive
            w = 1000.0 if calls["n"] % 2 == 1 else -1.0
            return torch.stack([w * x.flatten(1).sum(1), torch.zeros(len(x))], 1)

    x = torch.full((2, 1, 2, 2), 0.5)
    y = torch.zeros(2, dtype=torch.long)

    def objective(logits, _y):
        return logits[:, 0]

    results = {}
    for accumulate in (True, False):
        calls["n"] = 0
        mu, _ = fit_exp_distribution(Flip(), x, y, eps=0.1, steps=2, samples=1, lr=0.3, lam=0.0,
                                     accumulate=accumulate, objective=objective,
                                     generator=torch.Generator().manual_seed(0))
        results[accumulate] = mu
    torch.testing.assert_close(results[True], torch.full_like(x, 0.6), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[False], torch.zeros_like(x), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- architectures and the generator file

@pytest.mark.parametrize("size", [28, 32, 12])
def test_generators_and_entropy_net_work_at_any_image_size(size):
    x = torch.rand(2, 3, size, size)
    mu, sigma = ExplicitGenerator(3, width=4)(x, x, x)
    assert mu.shape == sigma.shape == x.shape and (sigma > 0).all()
    gen = ImplicitGenerator(3, width=4, z_dim=8)
    out = gen(x, x, x, gen.sample_z(2, "cpu"))
    assert out.shape == x.shape
    mean, var = EntropyNet(3, z_dim=8)(torch.tanh(out))
    assert mean.shape == var.shape == (2, 8) and (var > 0).all()


@pytest.mark.parametrize("name", ["exp-am", "imp-am"])
def test_generator_file_round_trip(tmp_path, name):
    x, y = saturated_batch(n=6)
    model = tiny_model()
    method = method_for(name)
    out = method.step(model, x, y)  # move BN statistics and weights away from their init
    out.loss.backward()
    method.after_backward()
    path = tmp_path / "generator.pt"
    save_generator(path, method)
    blob = torch.load(path, weights_only=True)
    assert blob["kind"] == name and isinstance(blob["eps"], float)
    loaded, meta = load_generator(path)
    assert meta["kind"] == name and meta["eps"] == pytest.approx(EPS)
    assert type(loaded) is type(method.generator)
    model.eval()
    a = generator_attack(method.generator, meta, model, x, y, generator=torch.Generator().manual_seed(5))
    b = generator_attack(loaded, meta, model, x, y, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, x)


def test_load_generator_rejects_other_files(tmp_path):
    other = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(UserError):
        load_generator(other)
    with pytest.raises(UserError):
        load_generator(tmp_path / "missing.pt")


@pytest.mark.parametrize("name,overrides", [
    ("exp", dict(exp_steps=0)), ("exp", dict(exp_lr=0.0)), ("exp-am", dict(gen_width=0)),
    ("imp-am", dict(imp_entropy="nonsense")), ("exp-am", dict(adt_lambda=-1.0)),
])
def test_bad_settings_are_user_errors(name, overrides):
    with pytest.raises(UserError):
        method_for(name, **overrides)


def test_lambda_defaults():
    from adt_finetune.perturb.amortised import IMP_PAPER_LAMBDA

    assert method_for("exp").lam == 0.01
    assert method_for("exp-am").lam == 0.01
    assert method_for("imp-am").cfg.imp_entropy == "paper"  # the paper's bound by default, the hinge by name
    assert method_for("imp-am").lam == IMP_PAPER_LAMBDA
    assert method_for("imp-am", imp_entropy="hinge").lam == 1.0
    assert method_for("imp-am", imp_entropy="paper", adt_lambda=0.01).lam == 0.01


# ---------------------------------------------------------------- learning on real data

def _pgd20_accuracy(model, x, y, eps):
    model.eval()
    x_adv = sign_gradient_ascent(model, x, y, eps=eps, step_size=eps / 4, steps=20,
                                 generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


@pytest.mark.slow
def test_exp_am_fine_tuning_raises_pgd_accuracy(trained_cnn, fmnist_train, fmnist_test):
    eps = 0.1
    x_test, y_test = fmnist_test
    before = _pgd20_accuracy(trained_cnn, x_test, y_test, eps)

    x_train, y_train = fmnist_train[0][:1024], fmnist_train[1][:1024]
    # One epoch over 1,024 images in batches of 64 with a narrow generator (width 4) at
    # 25× the released generator lr (2e-4 needs far more steps than a test can afford),
    # SGD with a cosine decay so the result does not hinge on where the last step landed.
    method = method_for("exp-am", eps=eps, size=28, gen_width=4, gen_lr=5e-3, seed=0)
    model = trained_cnn.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batch = 64
    steps = len(x_train) // batch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))
    for i in range(steps):
        idx = perm[i * batch:(i + 1) * batch]
        method.zero_grad()
        opt.zero_grad()
        method.step(model, x_train[idx], y_train[idx]).loss.backward()
        opt.step()
        method.after_backward()
        schedule.step()

    after = _pgd20_accuracy(model, x_test, y_test, eps)
    assert after > before + 0.15, (f"PGD-20 accuracy (ε = 0.1, first 500 Fashion-MNIST test images): "
                                   f"{before:.1%} before exp-am fine-tuning, {after:.1%} after")


@pytest.mark.parametrize("name", ["exp-am", "imp-am"])
def test_generator_gradient_inputs_raw_or_normalised(name):
    """--gen-normalize-gradients (default): the generator's backbone sees g/mean|g| per example;
    --no-gen-normalize-gradients feeds the released code's raw gradients, those of the batch-MEAN
    CE: the per-example gradient divided by the training batch size, a divisor saved with the
    generator so that the attack feeds the same scale at any batch size."""
    from adt_finetune.perturb.adt_networks import normalize_gradient

    x, _ = saturated_batch(n=4)
    g = torch.Generator().manual_seed(1)
    g1, g2 = 1e-3 * torch.randn(x.shape, generator=g), 1e-3 * torch.randn(x.shape, generator=g)
    for normalise in (True, False):
        gen = method_for(name, gen_normalize_gradients=normalise, batch_size=64).generator.eval()
        assert gen.init_kwargs["normalize_gradients"] is normalise  # saved with the run, so the attack matches
        assert gen.init_kwargs["gradient_divisor"] == (1.0 if normalise else 64.0)
        seen = []
        handle = gen.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
        with torch.no_grad():
            gen.sample_delta(x, g1, g2, EPS)
        handle.remove()
        c = x.shape[1]
        fed = seen[0][:, c:3 * c]  # [x, g1, g2(, z map)] channels
        want = torch.cat([normalize_gradient(g1), normalize_gradient(g2)] if normalise else [g1 / 64, g2 / 64], 1)
        assert torch.allclose(fed, want), (name, normalise)


# ---------------------------------------------------------------- the diversity diagnostic

@pytest.mark.parametrize("name,extra", [("exp-am", "sigma"), ("imp-am", "mi_bound")])
def test_epoch_diagnostics_measure_without_changing_anything(name, extra):
    """Read once per epoch on a probe batch: no parameter, BatchNorm statistic, optimiser state
    or global RNG changes, and the same numbers twice."""
    x, y = saturated_batch(n=6)
    model = tiny_model().eval()
    method = method_for(name)
    out = method.step(model, x, y)  # BatchNorm statistics and Adam state away from their init
    out.loss.backward()
    method.after_backward()
    state = copy.deepcopy(method.state_dict())
    torch.manual_seed(11)
    rng = torch.get_rng_state()
    first = method.epoch_diagnostics(model, x, y)
    assert torch.equal(torch.get_rng_state(), rng)
    assert set(first) == {"diversity", extra} and all(math.isfinite(v) for v in first.values())
    assert 0 < first["diversity"] < 1
    assert method.epoch_diagnostics(model, x, y) == first
    for kind in ("modules", "optimizers"):
        for key, saved in state[kind].items():
            now = method.state_dict()[kind][key]
            torch.testing.assert_close(now, saved, rtol=0, atol=0)


def test_exp_am_diversity_is_the_spread_of_delta_over_eps_across_draws():
    """diversity = mean over pixels of the std of tanh(μ + σ·r) across 16 draws: 0 for σ → 0,
    about std(tanh(N(0, 1))) = 0.63 for μ = 0, σ = 1; `sigma` is the mean σ."""
    x, y = saturated_batch(n=8)
    model = tiny_model().eval()
    method = method_for("exp-am")
    for sigma, lo, hi in [(1e-6, 0.0, 1e-5), (1.0, 0.55, 0.70)]:
        method.generator.forward = lambda x, g1, g2, s=sigma: (torch.zeros_like(x), torch.full_like(x, s))
        d = method.epoch_diagnostics(model, x, y)
        assert lo <= d["diversity"] <= hi and d["sigma"] == pytest.approx(sigma), d


def test_imp_am_diversity_is_zero_for_a_generator_that_ignores_z():
    x, y = saturated_batch(n=8)
    model = tiny_model().eval()
    method = method_for("imp-am")
    assert method.epoch_diagnostics(model, x, y)["diversity"] > 0
    method.generator.forward = lambda x, g1, g2, z: x - 0.5
    assert method.epoch_diagnostics(model, x, y)["diversity"] == 0.0
