"""The evaluation attacks (issue 4; docs/evaluation.md, "Attacks"): the ε-ball invariant, strength on an
attackable model, agreement with torchattacks and pyautoattack, hand-computed losses,
early stopping, seeding and RNG hygiene."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import import_isolated

torchattacks = import_isolated("torchattacks")

from adt_finetune.attacks import ATTACKS, make_attack
from adt_finetune.attacks.feature import FeatureAttack, feature_loss
from adt_finetune.attacks.gradient import margin_loss
from adt_finetune.errors import UserError
from adt_finetune.models import SmallCNN
from adt_finetune.nets import PassCounter

MINE = ["fgsm", "pgd", "pgd20", "pgd100", "mim", "cw", "feature", "spsa", "exp", "exp-am", "imp-am",
        "exp-am-cotrained", "imp-am-cotrained", "autoattack"]

# Small settings for the tests that only check invariants; the defaults are the paper's.
FAST = {
    "pgd": {"steps": 5}, "pgd20": {"steps": 5}, "pgd100": {"steps": 5}, "mim": {"steps": 5}, "cw": {"steps": 5},
    "feature": {"targets": 4, "steps": 3, "chunk": 10},
    "spsa": {"iterations": 3, "samples": 8, "chunk": 20},
    "exp": {"steps": 2, "samples": 3},
    "exp-am-cotrained": {"samples": 2}, "imp-am-cotrained": {},
    # retrained against the model on training images first: a token budget
    "exp-am": {"steps": 2, "width": 2, "batch": 4, "samples": 2}, "imp-am": {"steps": 2, "width": 2, "batch": 4, "z_dim": 4},
    "autoattack": {"attacks": ["apgd-ce"]},
}


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _run(name, eps, model, x, y, seed=0, train=None, **settings):
    attack = make_attack(name, eps, seed=seed, **settings)
    if train is not None and attack.uses_training_data:
        attack.set_training_data(*train)
    attack.prepare(model, x, y)
    return attack(model, x, y)


@pytest.fixture(scope="module")
def generator_files(tmp_path_factory):
    """A randomly initialised generator file of each kind, as an ADT run would save it."""
    from adt_finetune.perturb.adt_networks import ExplicitGenerator, ImplicitGenerator, save_generator

    root = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    paths = {}
    for kind, gen in (("exp-am", ExplicitGenerator(in_channels=1, width=4)),
                      ("imp-am", ImplicitGenerator(in_channels=1, width=4, z_dim=8))):
        paths[f"{kind}-cotrained"] = root / f"{kind}.pt"
        save_generator(paths[f"{kind}-cotrained"], SimpleNamespace(generator=gen, ctx=SimpleNamespace(eps=0.1)))
    return paths


def _settings(name, generator_files):
    settings = dict(FAST.get(name, {}))
    if name in generator_files:
        settings["path"] = generator_files[name]
    return settings


def test_registry_has_every_attack():
    assert set(MINE) <= set(ATTACKS)
    assert ATTACKS["spsa"].black_box and not any(ATTACKS[n].black_box for n in MINE if n != "spsa")
    assert ATTACKS["square"].black_box and not any(ATTACKS[n].black_box for n in ("apgd-ce", "apgd-t", "fab-t"))
    assert make_attack("pgd", 0.1).steps == 20 and make_attack("pgd100", 0.1).steps == 100
    cw = make_attack("cw", 0.1)
    assert (cw.steps, cw.kappa, cw.step_size, cw.random_start) == (30, 50.0, 0.025, True)
    feat = make_attack("feature", 0.1)
    assert (feat.targets, feat.steps, feat.step_size) == (200, 50, 0.0125)
    spsa = make_attack("spsa", 0.1)
    assert (spsa.iterations, spsa.samples, spsa.delta, spsa.lr) == (100, 256, 0.001, 0.01)
    assert make_attack("autoattack", 8 / 255).version == "standard"


@pytest.mark.parametrize("name,settings", [
    ("pgd", {"stepz": 3}), ("pgd", {"steps": -1}), ("pgd", {"steps": "many"}), ("mim", {"decay": "x"}),
    ("spsa", {"samples": 7}), ("spsa", {"delta": 0}), ("autoattack", {"version": "turbo"}),
    ("autoattack", {"attacks": "apgd-ce,nope"}), ("exp-am-cotrained", {}), ("fgsm", {"steps": 3}), ("nope", {}),
    ("exp-am", {"z_dim": 8}), ("imp-am", {"steps": 0}), ("exp-am", {"path": "generator.pt"}),
    ("feature", {"layer": "logits"}), ("square", {"version": "plus"}), ("apgd-ce", {"attacks": "square"}),
])
def test_bad_settings_are_user_errors(name, settings):
    with pytest.raises(UserError):
        make_attack(name, 0.1, **settings)


def test_bad_eps_is_user_error():
    with pytest.raises(UserError):
        make_attack("pgd", 1.5)
    with pytest.raises(UserError):
        make_attack("pgd", -0.1)


def test_generator_kind_must_match(generator_files):
    attack = make_attack("imp-am-cotrained", 0.1, path=generator_files["exp-am-cotrained"])
    with pytest.raises(UserError, match="exp-am"):
        attack.prepare(SmallCNN(width=4), torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))


def test_margin_loss_hand_computed():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]], requires_grad=True)
    y = torch.tensor([0, 2])
    # margins z_y − max_{j≠y} z_j: 3 − 2 = 1 and 1 − 5 = −4
    assert torch.equal(margin_loss(logits, y, 0.0), torch.tensor([-1.0, 0.0]))
    assert torch.equal(margin_loss(logits, y, 50.0), torch.tensor([-51.0, -46.0]))
    # ascending it lowers the true logit and raises the best other one
    (grad,) = torch.autograd.grad(margin_loss(logits, y, 50.0).sum(), logits)
    assert torch.equal(grad, torch.tensor([[-1.0, 0.0, 1.0], [0.0, 1.0, -1.0]]))


def test_feature_loss_hand_computed():
    adv = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0], [1.0, 0.0]])
    target = torch.tensor([[0.0, 1.0], [2.0, 2.0], [4.0, 3.0], [-2.0, 0.0]])
    # 1 − cos: orthogonal 1, parallel 0, cos = 24/25, opposite 2
    assert torch.allclose(feature_loss(adv, target), torch.tensor([1.0, 0.0, 1 / 25, 2.0]), atol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.0371, 0.3])
@pytest.mark.parametrize("name", MINE)
def test_every_attack_stays_in_ball_and_box(name, eps, generator_files):
    """Random images with many exact 0/1 pixels; labels = the model's own predictions,
    so every attack has to move to break anything."""
    g = torch.Generator().manual_seed(int(eps * 1e4))
    torch.manual_seed(1)
    model = SmallCNN(width=4).eval()
    with torch.no_grad():  # a random head predicts one class everywhere; the feature attack needs two
        model.fc.weight.mul_(30)
        model.fc.bias.zero_()
    x = torch.rand(10, 1, 28, 28, generator=g)
    u = torch.rand(x.shape, generator=g)
    x[u < 0.4] = 0.0
    x[u > 0.8] = 1.0
    with torch.no_grad():
        y = model(x).argmax(1)
    assert len(y.unique()) > 1
    train = (torch.rand(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g))
    result = _run(name, eps, model, x, y, train=train, **_settings(name, generator_files))
    assert result.x_adv.shape == x.shape and result.robust.shape == y.shape and result.robust.dtype == torch.bool
    assert (result.x_adv - x).abs().max() <= eps + 1e-6
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    # "broken if any copy is" attacks return the copy that broke it: the flag always
    # agrees with the model on the returned x'.
    with torch.no_grad():
        assert torch.equal(result.robust, model(result.x_adv).argmax(1) == y)
    if eps == 0:
        assert result.robust.all()


@pytest.mark.slow
def test_white_box_attacks_lower_accuracy(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:64], fmnist_test[1][:64]
    clean = _accuracy(trained_cnn, x, y)
    assert clean > 0.6
    robust = {}
    for name, settings in [("fgsm", {}), ("pgd20", {}), ("pgd100", {}), ("mim", {}), ("cw", {}),
                           ("feature", {"targets": 10, "steps": 10}), ("exp", {"steps": 5, "samples": 5})]:
        robust[name] = _run(name, 0.1, trained_cnn, x, y, **settings).robust.float().mean().item()
    for name, acc in robust.items():
        assert acc < clean - 0.3, f"{name}: clean {clean:.2f}, robust {acc:.2f}"
    assert robust["pgd20"] < robust["fgsm"]
    assert robust["pgd100"] <= robust["pgd20"] + 1 / len(x)


@pytest.mark.parametrize("name", ["fgsm", "pgd20", "mim"])
def test_agrees_with_torchattacks(name, trained_cnn, fmnist_test):
    """Same model, examples, ε, step and steps. ε = 0.03 leaves accuracy mid-range so
    that a difference could show. torchattacks' MI-FGSM has no random start (ours
    does by default), so MIM is compared with it off; torchattacks also normalises
    by the per-example mean |∇| over C, H, W with decay 1.0, as we do."""
    x, y = fmnist_test[0][:200], fmnist_test[1][:200]
    eps = 0.03
    if name == "fgsm":
        ours, theirs = make_attack("fgsm", eps), torchattacks.FGSM(trained_cnn, eps=eps)
    elif name == "pgd20":
        ours = make_attack("pgd20", eps)
        theirs = torchattacks.PGD(trained_cnn, eps=eps, alpha=eps / 4, steps=20, random_start=True)
    else:
        ours = make_attack("mim", eps, random_start=False)
        theirs = torchattacks.MIFGSM(trained_cnn, eps=eps, alpha=eps / 4, steps=20, decay=1.0)
    torch.manual_seed(0)
    ours_acc = ours(trained_cnn, x, y).robust.float().mean().item()
    theirs_acc = _accuracy(trained_cnn, theirs(x, y), y)
    assert _accuracy(trained_cnn, x, y) - ours_acc > 0.1  # the comparison is not between two no-ops
    assert abs(ours_acc - theirs_acc) <= 0.02, f"{name}: ours {ours_acc:.3f}, torchattacks {theirs_acc:.3f}"


def test_autoattack_parts_run_alone_with_the_standard_versions_parameters(monkeypatch, trained_cnn, fmnist_test):
    """Each part is standard AutoAttack's sub-attack alone: pyautoattack's version 'custom' would give
    APGD-CE 5 restarts and FAB 5 restarts, so a part built that way would be a different attack."""
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
    from pyautoattack.fab_pt import FABAttack_PT
    from pyautoattack.square import SquareAttack

    seen: list[tuple] = []
    spied = {APGDAttack: lambda a: ("apgd", a.loss, a.n_restarts, a.n_iter),
             APGDAttack_targeted: lambda a: ("apgd-t", a.n_target_classes, a.n_restarts, a.n_iter),
             FABAttack_PT: lambda a: ("fab", a.targeted, a.n_target_classes, a.n_restarts),
             SquareAttack: lambda a: ("square", a.n_queries, a.p_init)}
    for cls, fields in spied.items():
        def perturb(self, x, y, _fields=fields):
            seen.append(_fields(self))
            return x.clone()  # records the parameters only: every point stays robust
        monkeypatch.setattr(cls, "perturb", perturb)
    x, y = fmnist_test[0][:8], fmnist_test[1][:8]
    expected = {"apgd-ce": ("apgd", "ce", 1, 100), "apgd-t": ("apgd-t", 9, 1, 100),
                "fab-t": ("fab", True, 9, 1), "square": ("square", 5000, 0.8)}
    for name, fields in expected.items():
        seen.clear()
        make_attack(name, 0.1, seed=1)(trained_cnn, x, y)
        assert seen == [fields], name  # this sub-attack once, and no other
    seen.clear()
    make_attack("autoattack", 0.1, attacks=["apgd-ce"])(trained_cnn, x, y)
    assert seen == [("apgd", "ce", 5, 100)]  # what 'custom' gives: why the parts do not use it


@pytest.mark.slow
def test_square_finds_what_masked_gradients_hide_and_the_engine_says_so(monkeypatch, trained_cnn, fmnist_test):
    """A model that rounds its input has zero gradient almost everywhere: white-box attacks lose their
    way, gradient-free Square does not, and the black-box vs white-box check fails on it (and only on it)."""
    from pyautoattack.autoattack import AutoAttack
    from torch import nn

    from adt_finetune.evaluation import evaluate

    standard = AutoAttack._set_version

    def fewer_queries(self, version="standard"):
        standard(self, version)
        self.square.n_queries = 300  # 5,000 (checked above) spends ~20 s per robust point here; 300 suffice

    monkeypatch.setattr(AutoAttack, "_set_version", fewer_queries)

    class Rounded(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(torch.round(x * 2) / 2)

    x, y = fmnist_test[0][:24], fmnist_test[1][:24]
    attacks = ["clean", "pgd20", "apgd-ce", "square"]
    masked = evaluate(Rounded(trained_cnn).eval(), x, y, attacks=attacks, eps=0.1)
    checks = {c.name: c for c in masked.sanity}
    assert checks["linf"].ok and checks["range"].ok
    assert masked.per_attack["square"] < min(masked.per_attack["pgd20"], masked.per_attack["apgd-ce"])
    assert checks["black-box vs white-box"].ok is False and "square" in checks["black-box vs white-box"].detail
    plain = evaluate(trained_cnn, x, y, attacks=attacks, eps=0.1)
    assert {c.name: c for c in plain.sanity}["black-box vs white-box"].ok


@pytest.mark.slow
def test_autoattack_matches_pyautoattack_and_keeps_global_rng(trained_cnn, fmnist_test):
    from pyautoattack import AutoAttack

    x, y = fmnist_test[0][:24], fmnist_test[1][:24]
    eps, seed = 0.05, 3
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    ours = make_attack("autoattack", eps, seed=seed, attacks=["apgd-ce"])(trained_cnn, x, y)
    assert torch.equal(torch.get_rng_state(), rng_before)

    direct = AutoAttack(trained_cnn, attacks=["apgd-ce"], device="cpu", eps=eps, norm="Linf", seed=seed,
                        version="custom")
    direct.verbose = False
    x_direct, _ = direct.run_standard_evaluation(x, y, batch_size=len(x))
    assert not torch.equal(torch.get_rng_state(), rng_before)  # pyautoattack itself does reseed
    with torch.no_grad():
        direct_robust = trained_cnn(x_direct).argmax(1) == y
    assert torch.equal(ours.robust, direct_robust)
    assert 0 < ours.robust.sum() < _accuracy(trained_cnn, x, y) * len(x)  # a real test: some broken, some not


def test_feature_attack_stops_images_already_wrong(trained_cnn, fmnist_test):
    """ε = 0: every copy is the image itself, so clean errors must stop after the first
    forward and correct images run every step; the count of images forwarded says so."""
    x, y = fmnist_test[0][:32], fmnist_test[1][:32]
    with torch.no_grad():
        correct = trained_cnn(x).argmax(1) == y
    n_right, n_wrong = int(correct.sum()), int((~correct).sum())
    assert n_wrong > 0 and n_right > 0
    targets, steps = 4, 3
    attack = FeatureAttack(0.0, targets=targets, steps=steps, chunk=3)  # chunk < M: copies split across passes
    attack.prepare(trained_cnn, x, y)
    with PassCounter(trained_cnn) as counter:
        result = attack(trained_cnn, x, y)
    assert counter.images_forward == targets * (n_wrong * 1 + n_right * (steps + 1))
    assert torch.equal(result.robust, correct)
    assert torch.equal(result.x_adv, x)


def test_feature_chunk_bounds_memory_not_results(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:8], fmnist_test[1][:8]
    results = []
    for chunk in (3, 1000):  # copies of one image split over passes / all images in one pass
        attack = FeatureAttack(0.1, targets=4, steps=3, chunk=chunk)
        attack.prepare(trained_cnn, x, y)
        results.append(attack(trained_cnn, x, y))
    assert torch.equal(results[0].robust, results[1].robust)
    assert ((results[0].x_adv - results[1].x_adv).abs() > 1e-6).float().mean() < 1e-3


def test_feature_targets_are_other_classes(fmnist_test):
    x, y = fmnist_test[0][:50], fmnist_test[1][:50]
    attack = FeatureAttack(0.1, targets=30)
    attack.prepare(SmallCNN(width=4).eval(), x, y)
    from adt_finetune.attacks.base import example_generators

    picks = attack._pick_targets(y, example_generators(x, "feature:0"))
    assert picks.shape == (50, 30)
    assert (y[picks] != y[:, None]).all()
    assert len(set(picks[0].tolist())) == 30  # without replacement while there are enough


def test_spsa_lowers_accuracy(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:40], fmnist_test[1][:40]
    # Random signs at full ε: what SPSA must beat to show it finds adversarial directions.
    noise = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noisy = _accuracy(trained_cnn, (x + 0.1 * noise).clamp(0, 1), y)
    # Fewer iterations and samples than the paper's 100 and 256, so a larger Adam step
    # to reach the ε-ball's edge in time.
    result = _run("spsa", 0.1, trained_cnn, x, y, iterations=10, samples=32, lr=0.02)
    assert result.robust.float().mean().item() <= noisy - 0.1
    with torch.no_grad():
        assert torch.equal(result.robust, trained_cnn(result.x_adv).argmax(1) == y)


@pytest.mark.parametrize("name,settings", [("pgd", {"steps": 3}), ("feature", {"targets": 3, "steps": 2}),
                                           ("spsa", {"iterations": 2, "samples": 4})])
def test_result_does_not_depend_on_batch(name, settings, trained_cnn, fmnist_test):
    """Randomness is drawn per example: the same examples in other batches, in another
    order, give the same x' (so cascade and independent evaluation agree)."""
    x, y = fmnist_test[0][:12], fmnist_test[1][:12]
    attack = make_attack(name, 0.1, **settings)
    attack.prepare(trained_cnn, x, y)
    whole = attack(trained_cnn, x, y)
    order = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])
    part = attack(trained_cnn, x[order], y[order])
    # Batch-dependent noise would move nearly every pixel; allow the odd sign flip of a
    # gradient component that is zero up to round-off (convolutions round per batch size).
    moved = ((part.x_adv - whole.x_adv[order]).abs() > 1e-6).float().mean().item()
    assert moved < 1e-3
    assert torch.equal(part.robust, whole.robust[order])
    other_seed = make_attack(name, 0.1, seed=1, **settings)
    other_seed.prepare(trained_cnn, x, y)
    assert not torch.equal(other_seed(trained_cnn, x, y).x_adv, whole.x_adv)


@pytest.mark.parametrize("name", ["exp", "exp-am", "imp-am", "exp-am-cotrained", "imp-am-cotrained"])
def test_randomised_attacks_draw_per_example(name, trained_cnn, fmnist_test, fmnist_train, generator_files):
    """exp's samples and the generators' draws come from each example's own generator: the same
    examples in a smaller batch, in another order, get the same noise and the same verdict."""
    x, y = fmnist_test[0][:12], fmnist_test[1][:12]
    train = (fmnist_train[0][:64], fmnist_train[1][:64])

    def built(seed=0):
        attack = make_attack(name, 0.1, seed=seed, **_settings(name, generator_files))
        if attack.uses_training_data:
            attack.set_training_data(*train)
        attack.prepare(trained_cnn, x, y)
        return attack

    attack = built()
    whole = attack(trained_cnn, x, y)
    order = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])
    part = attack(trained_cnn, x[order], y[order])
    moved = ((part.x_adv - whole.x_adv[order]).abs() > 1e-6).float().mean().item()
    assert moved < 1e-3  # batch-keyed noise would move nearly every pixel
    assert torch.equal(part.robust, whole.robust[order])
    assert not torch.equal(built(seed=1)(trained_cnn, x, y).x_adv, whole.x_adv)


def test_imp_am_noise_is_drawn_per_example(generator_files):
    """imp-am's z: the attack hands one generator per example, so an example's z is the same
    in any batch (an untrained imp-am generator barely reads z, so the test above cannot see it)."""
    from adt_finetune.attacks.base import example_generators
    from adt_finetune.perturb.adt_networks import load_generator

    gen, _ = load_generator(generator_files["imp-am-cotrained"])
    x = torch.rand(6, 1, 28, 28)
    whole = gen.sample_z(6, "cpu", example_generators(x, "imp-am:0"))
    part = gen.sample_z(3, "cpu", example_generators(x[[4, 1, 2]], "imp-am:0"))
    assert torch.equal(part, whole[[4, 1, 2]])
    assert not torch.equal(whole[0], whole[1]) and whole.abs().max() <= 1


def test_attacks_run_in_eval_mode_and_restore_it(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:16], fmnist_test[1][:16]
    model = copy.deepcopy(trained_cnn).train()
    model.features[1].eval()  # a mixed state must come back as it was
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    reference = _run("pgd", 0.1, trained_cnn.eval(), x, y, steps=3)
    result = _run("pgd", 0.1, model, x, y, steps=3)
    assert model.training and not model.features[1].training and model.features[4].training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())  # BN statistics untouched
    assert torch.equal(result.x_adv, reference.x_adv)  # eval-mode forward passes throughout


def test_attacks_do_not_touch_global_rng(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:8], fmnist_test[1][:8]
    torch.manual_seed(5)
    before = torch.get_rng_state()
    first = _run("pgd", 0.1, trained_cnn, x, y, steps=2).x_adv
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(99)
    assert torch.equal(_run("pgd", 0.1, trained_cnn, x, y, steps=2).x_adv, first)


def test_cw_ascends_the_margin_loss(trained_cnn, fmnist_test):
    """The sign convention: CW's x' must lower z_y − max_{j≠y} z_j, not raise it."""
    x, y = fmnist_test[0][:50], fmnist_test[1][:50]
    x_adv = _run("cw", 0.05, trained_cnn, x, y, steps=5, random_start=False).x_adv
    with torch.no_grad():
        before, after = margin_loss(trained_cnn(x), y, 50.0), margin_loss(trained_cnn(x_adv), y, 50.0)
    assert (after > before).float().mean() > 0.9
