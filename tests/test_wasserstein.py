"""Wasserstein distributional robustness: losses, the W-PGD primitives and loop,
clean statistics, the first-order estimate, the suite, the `wpgd` attack and
`wdat` fine-tuning (docs/evaluation.md and docs/methods.md, issue 5)."""
import json
import math
from pathlib import Path

import pytest
import torch

from adt_finetune.evaluation import wasserstein_suite as WS
from adt_finetune.perturb import distributional as W
from adt_finetune.attacks import make_attack
from adt_finetune.perturb.linf import sign_gradient_ascent
from adt_finetune.config import TrainConfig, read_recipe
from adt_finetune.errors import UserError
from adt_finetune.methods import MethodContext, make_method
from adt_finetune.models import SmallCNN
from adt_finetune.nets import PassCounter

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
N_EVAL = 200
EVAL_BUDGETS = [0.02, 0.05, 0.1]
EVAL_STEPS = 20


def per_image_linf(a, b):
    return (a - b).flatten(1).abs().amax(1)


# ------------------------------------------------------------------ losses and input checks

def test_dlr_and_redlr_by_hand():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [3.0, 1.0, 0.0, -1.0]])
    y = torch.tensor([0, 1])
    # correct: −(3 − 1)/(3 − 0); wrong (label 1): −(1 − 3)/(3 − 0)
    assert torch.allclose(W.dlr_loss(logits, y), torch.tensor([-2 / 3, 2 / 3]))
    assert torch.allclose(W.redlr_loss(logits, y), torch.tensor([-2 / 3, 0.0]))
    assert W.resolve_loss("ReDLR") is W.redlr_loss


@pytest.mark.parametrize("call", [
    lambda: W.parse_budgets("-0.1"),
    lambda: W.parse_budgets("0.05,abc"),
    lambda: W.parse_budgets("0.05,,0.1"),
    lambda: W.parse_budgets(""),
    lambda: W.parse_budgets("8/0"),
    lambda: W.parse_budgets("1.5"),
    lambda: W.resolve_loss("hinge"),
    lambda: W.first_order_estimate(0.9, -0.5, 0.0, 1.0, -0.1),
    lambda: W.wpgd(SmallCNN(width=4), torch.rand(2, 1, 28, 28), torch.tensor([0, 1]), budget=0.1, q=3),
    lambda: W.wpgd(SmallCNN(width=4), torch.rand(2, 1, 28, 28), torch.tensor([0, 1]), budget=-0.1),
    lambda: W.wpgd(SmallCNN(width=4), torch.rand(2, 1, 28, 28), torch.tensor([0, 1]), budget=0.1, loss="nope"),
    lambda: W.clean_statistics(SmallCNN(width=4), torch.rand(2, 1, 28, 28), torch.tensor([0, 1]), q=0),
    lambda: make_attack("wpgd", 0.1, q=3),
    lambda: make_attack("wpgd", 0.1, loss="nope"),
    lambda: make_attack("wpgd", 0.1, budget="-1/255"),
], ids=["negative", "unparsable", "empty-item", "empty", "div-zero", "above-1", "loss", "fo-negative", "q3",
        "wpgd-negative", "wpgd-loss", "stats-q0", "attack-q", "attack-loss", "attack-budget"])
def test_bad_input_is_one_line_user_error(call):
    with pytest.raises(UserError) as info:
        call()
    assert "\n" not in str(info.value)


def test_parse_budgets_fractions_sorted_unique():
    assert W.parse_budgets("16/255, 8/255,8/255") == pytest.approx([8 / 255, 16 / 255])
    assert W.parse_budgets([0.1, "0.05"]) == pytest.approx([0.05, 0.1])
    assert W.default_budgets(0.1) == pytest.approx([0.025, 0.05, 0.1, 0.2])
    assert W.default_budgets(0.8) == pytest.approx([0.2, 0.4, 0.8, 1.0])
    assert WS.flag_key("wpgd", 0.2) == "wpgd@0.2" and WS.flag_key("pgd20", 8 / 255) == "pgd20@8/255"


# ------------------------------------------------------------------ primitives

def test_direction_q2_scales_each_image_by_its_l1_norm_over_upsilon():
    g = torch.tensor([[[1.0, -1.0], [0.0, 2.0]],      # ‖g‖_1 = 4
                      [[-0.5, 0.5], [0.5, -0.5]],     # ‖g‖_1 = 2
                      [[0.0, 0.0], [0.0, 0.0]]])      # ‖g‖_1 = 0
    upsilon = math.sqrt((4 ** 2 + 2 ** 2 + 0) / 3)
    l1 = g.flatten(1).abs().sum(1)
    assert W.sensitivity(l1, 2) == pytest.approx(upsilon)
    assert W.sensitivity(l1, 1) == pytest.approx(2.0)
    d = W.wpgd_direction(g, q=2)
    expected = g.sign() * torch.tensor([4.0, 2.0, 0.0]).view(3, 1, 1) / upsilon
    assert torch.allclose(d, expected)
    # every moving pixel of an image moves by the same amount, ∝ ‖g_i‖_1, with unit RMS over the set
    step_sizes = d.flatten(1).abs().amax(1)
    assert step_sizes[0] / step_sizes[1] == pytest.approx(2.0)
    assert float(step_sizes.pow(2).mean().sqrt()) == pytest.approx(1.0)
    assert torch.equal(W.wpgd_direction(g, q=1), g.sign())
    assert torch.allclose(W.wpgd_direction(g, q=2, upsilon=8.0), g.sign() * torch.tensor([4.0, 2, 0]).view(3, 1, 1) / 8)


def test_projection_shrinks_every_image_by_the_same_factor():
    gen = torch.Generator().manual_seed(0)
    x = 0.3 + 0.4 * torch.rand(20, 1, 6, 6, generator=gen)           # far from 0 and 1: no box clipping
    scales = torch.linspace(0.01, 0.2, 20).view(-1, 1, 1, 1)
    x_adv = x + scales * (2 * torch.rand(x.shape, generator=gen) - 1)
    before = per_image_linf(x_adv, x)
    dist = float(before.pow(2).mean().sqrt())
    budget = dist / 2
    out = W.project_w2_(x_adv.clone(), x, budget)
    after = per_image_linf(out, x)
    assert W.w2_distance(out, x) == pytest.approx(budget, rel=1e-5)
    assert torch.allclose(after, before / 2, atol=1e-6)
    # elements already within the shrunken bound are untouched
    small = (x_adv - x).abs() <= (before / 2).view(-1, 1, 1, 1) - 1e-6
    assert torch.allclose(out[small], x_adv[small], atol=1e-6)
    # inside the ball nothing moves
    assert torch.equal(W.project_w2_(x_adv.clone(), x, dist * 1.01), x_adv)


def test_projection_on_random_data_respects_budget_and_box():
    gen = torch.Generator().manual_seed(1)
    for budget in (0.0, 0.01, 0.1, 0.3):
        x = torch.rand(50, 3, 5, 5, generator=gen)
        x[:10] = 0.0                                              # black images: the box bites
        x_adv = x + 0.5 * torch.randn(x.shape, generator=gen) * torch.rand(50, 1, 1, 1, generator=gen)
        out = W.project_w2_(x_adv, x, budget)
        assert W.w2_distance(out, x) <= budget + 1e-6
        assert out.min() >= 0 and out.max() <= 1
        out1 = W.project_(x + 0.5 * torch.randn(x.shape, generator=gen), x, budget, q=1)
        assert per_image_linf(out1, x).max() <= budget + 1e-6 and out1.min() >= 0 and out1.max() <= 1


def test_first_order_estimate_by_hand():
    # A·(W0 − V0 − δΥ)/(W0 − V0) = 0.8·(2.0 − 0.4 − 0.1·3)/(2.0 − 0.4) = 0.65
    assert W.first_order_estimate(0.8, 0.4, 2.0, 3.0, 0.1) == pytest.approx(0.65)
    # ReDLR: W0 = 0, V0 = −0.5, Υ = 2, δ = 0.05 -> 0.9·(0.5 − 0.1)/0.5 = 0.72
    assert W.first_order_estimate(0.9, -0.5, 0.0, 2.0, 0.05) == pytest.approx(0.72)
    assert W.first_order_estimate(0.8, 0.4, 2.0, 3.0, 0.0) == pytest.approx(0.8)
    assert W.first_order_estimate(0.8, 0.4, 2.0, 3.0, 1.0) == 0.0          # clipped at 0
    assert math.isnan(W.first_order_estimate(0.8, 0.4, float("nan"), 3.0, 0.1))
    assert W.first_order_estimate(0.0, 0.0, 0.0, 0.0, 0.1) == 0.0


# ------------------------------------------------------------------ clean statistics

def test_clean_statistics_match_per_example_computation(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:32], fmnist_test[1][:32]
    for loss in ("redlr", "ce"):
        stats = W.clean_statistics(trained_cnn, x, y, loss=loss, batch_size=12)
        fn = W.resolve_loss(loss)
        values, norms = [], []
        for i in range(len(x)):  # one image at a time: no batching in the reference
            xi = x[i:i + 1].clone().requires_grad_(True)
            v = fn(trained_cnn(xi), y[i:i + 1])
            (g,) = torch.autograd.grad(v.sum(), xi)
            values.append(float(v.detach()))
            norms.append(float(g.abs().sum()))
        with torch.no_grad():
            correct = trained_cnn(x).argmax(1) == y
        values_t = torch.tensor(values, dtype=torch.float64)
        assert 0 < correct.sum() < len(x), "the test needs both correct and misclassified images"
        assert stats.accuracy == pytest.approx(float(correct.double().mean()))
        assert stats.v0 == pytest.approx(float(values_t.mean()), rel=1e-5, abs=1e-7)
        assert stats.w0 == pytest.approx(float(values_t[~correct].mean()), rel=1e-5, abs=1e-7)
        assert stats.upsilon == pytest.approx(math.sqrt(sum(n * n for n in norms) / len(norms)), rel=1e-5)
    assert stats.w0 > stats.v0  # CE: misclassified points carry more loss than the average


# ------------------------------------------------------------------ the W-PGD loop

def test_wpgd_run_steps_projection_and_bookkeeping(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:64], fmnist_test[1][:64]
    budget, steps, ratio = 0.05, 8, 1.875
    step_size = ratio * budget / steps
    stats = W.clean_statistics(trained_cnn, x, y)
    x_leaf = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(W.redlr_loss(trained_cnn(x_leaf), y).sum(), x_leaf)
    g_norms = g.flatten(1).abs().sum(1)
    seen = []

    def check(t, x_adv):
        assert W.w2_distance(x_adv, x) <= budget + 1e-6, f"step {t}: W2 distance over budget"
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        seen.append((t, x_adv.clone()))

    with PassCounter(trained_cnn) as passes:
        res = W.wpgd(trained_cnn, x, y, budget=budget, steps=steps, ratio=ratio, batch_size=16, on_step=check)
    n_batches = 4
    assert len(res.accuracies) == steps + 1, "no early stop expected at this budget"
    # every iterate's accuracy comes from the next gradient pass: only the last one needs its own forward
    assert passes.backward == steps * n_batches
    assert passes.forward == (steps + 1) * n_batches
    assert [t for t, _ in seen] == list(range(1, len(seen) + 1))

    # step 1 (step < budget, so no projection): image i moves by step·‖g_i‖_1/Υ
    first = per_image_linf(seen[0][1], x)
    expected = step_size * g_norms / stats.upsilon
    assert torch.allclose(first, expected, rtol=1e-4, atol=1e-7)
    assert (first[g_norms == 0] == 0).all(), "misclassified images (no ReDLR gradient) must not move"

    # the result is the best iterate, and its flags are the model's verdict on it
    with torch.no_grad():
        verdict = trained_cnn(res.x_adv).argmax(1) == y
    assert torch.equal(verdict, res.robust)
    assert res.accuracy == pytest.approx(float(verdict.double().mean())) == pytest.approx(min(res.accuracies))
    assert res.best_step == res.accuracies.index(min(res.accuracies)) and res.best_step > 0
    assert torch.equal(res.x_adv, seen[res.best_step - 1][1])
    assert res.accuracy < stats.accuracy
    assert res.distance == pytest.approx(W.w2_distance(res.x_adv, x))


def test_q1_is_pgd_without_random_start(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:100], fmnist_test[1][:100]
    budget, steps, ratio = 0.1, 4, 1.0
    iterates = {}
    res = W.wpgd(trained_cnn, x, y, budget=budget, q=1, steps=steps, ratio=ratio, loss="ce", batch_size=len(x),
                 on_step=lambda t, xa: iterates.__setitem__(t, xa.clone()))
    assert sorted(iterates) == list(range(1, steps + 1))
    for t, x_t in iterates.items():
        pgd = sign_gradient_ascent(trained_cnn, x, y, eps=budget, step_size=ratio * budget / steps, steps=t,
                                   start=None)
        assert torch.equal(x_t, pgd), f"W-PGD q=1 differs from PGD after {t} steps"
    assert torch.equal(res.x_adv, iterates[res.best_step])
    assert res.distance == pytest.approx(float(per_image_linf(res.x_adv, x).max()))


# ------------------------------------------------------------------ the suite on a real model

@pytest.fixture(scope="module")
def suite_report(_trained_cnn_state, fmnist_test):
    model = SmallCNN(width=16)
    model.load_state_dict(_trained_cnn_state)
    model.eval()
    return WS.wasserstein_suite(model, fmnist_test[0][:N_EVAL], fmnist_test[1][:N_EVAL], eps=0.1,
                               budgets=EVAL_BUDGETS, steps=EVAL_STEPS)


def test_wpgd_beats_pointwise_pgd_and_is_monotone(suite_report):
    rows = suite_report.rows
    table = suite_report.to_markdown()
    assert [r["budget"] for r in rows] == EVAL_BUDGETS
    for r in rows:
        # the W2 ball of radius δ contains the pointwise δ-ball
        assert r["wpgd_acc"] <= r["pgd_acc"] + 0.01, table
        assert r["wpgd_acc"] <= suite_report.clean.accuracy
        assert r["wpgd_distance"] <= r["budget"] + 1e-6
    wpgd = [r["wpgd_acc"] for r in rows]
    assert all(b <= a for a, b in zip(wpgd, wpgd[1:])), table
    assert wpgd[-1] < suite_report.clean.accuracy - 0.3, table


def test_suite_report_flags_and_json(suite_report):
    rep = suite_report
    assert set(rep.flags) == {f"{a}@{b}" for a in ("wpgd", "pgd20") for b in ("0.02", "0.05", "0.1")}
    for r in rep.rows:
        key = WS.flag_key("wpgd", r["budget"])
        assert rep.flags[key].shape == (N_EVAL,) and rep.flags[key].dtype == torch.bool
        assert float(rep.flags[key].double().mean()) == pytest.approx(r["wpgd_acc"])
        assert float(rep.flags[WS.flag_key("pgd20", r["budget"])].double().mean()) == pytest.approx(r["pgd_acc"])
        c = rep.clean
        assert r["first_order"] == pytest.approx(W.first_order_estimate(c.accuracy, c.v0, c.w0, c.upsilon,
                                                                         r["budget"]))
    assert float(rep.clean_flags.double().mean()) == pytest.approx(rep.clean.accuracy)
    data = json.loads(json.dumps(rep.to_json(), allow_nan=False))
    assert data["clean"]["upsilon"] == pytest.approx(rep.clean.upsilon)
    assert [row["wpgd_acc"] for row in data["rows"]] == [r["wpgd_acc"] for r in rep.rows]
    assert "| 0.05 |" in rep.to_markdown()


def test_wpgd_attack_is_dataset_level(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:32], fmnist_test[1][:32]
    attack = make_attack("wpgd", 0.1, budget="0.05", steps=4)
    assert attack.dataset_level and not attack.linf_bounded
    assert attack.budget == pytest.approx(0.05)
    out = attack(trained_cnn, x, y)
    ref = W.wpgd(trained_cnn, x, y, budget=0.05, steps=4)
    assert torch.equal(out.robust, ref.robust) and torch.equal(out.x_adv, ref.x_adv)
    assert make_attack("wpgd", 0.1).budget == pytest.approx(0.1)   # default budget: ε


# ------------------------------------------------------------------ wdat (issue 24)

def _ctx(images=None):
    """wdat's context; `images` (x, y) stand in for the training set Υ is computed over."""
    train_images = None if images is None else (lambda n: (images[0][:n], images[1][:n]))
    return MethodContext(eps=0.1, in_channels=1, num_classes=10, image_size=28, device=torch.device("cpu"),
                         train_images=train_images)


def _l1_one_by_one(model, x, y, loss):
    """‖∇_x J(x_i, y_i)‖_1 image by image: no batching, no shared code with the method."""
    fn = W.resolve_loss(loss)
    model.eval()
    out = []
    for i in range(len(x)):
        xi = x[i:i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(model(xi), y[i:i + 1]).sum(), xi)
        out.append(float(g.abs().sum()))
    return out


@pytest.mark.parametrize("loss", ["redlr", "ce"])
def test_wdat_upsilon_over_a_fixed_set_equals_an_independent_computation(trained_cnn, fmnist_train, loss):
    x, y = fmnist_train[0][:150], fmnist_train[1][:150]
    method = make_method(TrainConfig(method="wdat", wdat_split_loss=loss, wdat_upsilon_images=120), _ctx((x, y)))
    split = method.refresh(trained_cnn)
    norms = _l1_one_by_one(trained_cnn, x[:120], y[:120], loss)  # the first 120 images, as set
    assert split.n == 120
    assert split.upsilon == pytest.approx(math.sqrt(sum(n * n for n in norms) / len(norms)), rel=1e-5)
    # the evaluation suite's Υ (its own code path) agrees on the same set
    assert split.upsilon == pytest.approx(W.clean_statistics(trained_cnn, x[:120], y[:120], loss=loss).upsilon,
                                          rel=1e-5)


def test_wdat_budget_split_by_hand_sums_to_the_total_and_respects_the_cap():
    from adt_finetune.perturb.budget_split import make_split, split_budgets, split_scale

    norms = torch.tensor([4.0, 2.0, 1.0, 1.0])
    # No binding cap: δ_i = δ·n_i/Υ with Υ = sqrt(22/4).
    c = split_scale(norms, 1.0, 10.0)
    assert c == pytest.approx(1 / math.sqrt(5.5))
    # Cap 1.5: the first image sits at the cap, the rest share 4 − 1.5² over Σ n² = 6 → c = sqrt(1.75/6).
    c = split_scale(norms, 1.0, 1.5)
    assert c == pytest.approx(math.sqrt(1.75 / 6))
    b = split_budgets(norms, c, 1.5)
    assert b.tolist() == pytest.approx([1.5, 2 * c, c, c])
    assert float(b.pow(2).sum()) == pytest.approx(4 * 1.0 ** 2)   # Σ δ_i² = N·δ²: the whole W_2 budget
    # A realistic spread: many images beyond the cap, still the whole budget, none above the cap.
    g = torch.Generator().manual_seed(0)
    norms = torch.distributions.LogNormal(0.0, 1.5).sample((5000,))
    norms[:300] = 0.0  # misclassified under ReDLR: no gradient, no budget
    for cap in (1.2, 2.0, 3.0):
        s = make_split(norms, 0.1, cap * 0.1)
        b = split_budgets(norms, s.scale, cap * 0.1)
        assert float(b.pow(2).sum()) == pytest.approx(5000 * 0.1 ** 2, rel=1e-9)
        assert float(b.max()) <= cap * 0.1 * (1 + 1e-12) and s.capped > 0 and (b[:300] == 0).all()
        assert s.rms == pytest.approx(0.1)
    # A budget that cannot be spent (cap below δ): every image with a gradient at the cap.
    s = make_split(norms, 0.1, 0.05)
    assert s.scale == math.inf and s.rms < 0.1
    assert split_budgets(norms, s.scale, 0.05)[300:].eq(0.05).all()
    del g


def test_wdat_step_budgets_are_per_image_and_do_not_depend_on_the_batch(trained_cnn, fmnist_train):
    x, y = fmnist_train[0][:96], fmnist_train[1][:96]
    cfg = TrainConfig(method="wdat", loss="trades", wdat_steps=3, wdat_budget="0.05", wdat_upsilon_images=64,
                      wdat_upsilon_every=1000)
    method = make_method(cfg, _ctx((x, y)))
    model = trained_cnn.train()
    bn = model.features[1]
    running = bn.running_mean.clone()
    x_adv, budgets = method.adversarial(model, x[:32], y[:32])
    assert torch.equal(bn.running_mean, running), "the inner map must run the classifier in eval mode"
    assert model.training and bn.training
    # Each image inside its own l∞ budget, which is min(cap, c·‖g_i‖_1) of the reference split.
    norms = torch.tensor(_l1_one_by_one(model, x[:32], y[:32], "redlr"), dtype=torch.float64)
    model.train()
    expected = (method.split.scale * norms).clamp(max=2 * 0.05)
    assert budgets.double().tolist() == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-9)
    moved = (x_adv - x[:32]).flatten(1).abs().amax(1)
    assert (moved <= budgets + 1e-6).all() and moved.max() > 0
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    # The same image in another batch gets the same budget: nothing is shared within a batch.
    _, other = method.adversarial(model, torch.cat([x[64:96], x[:1]]), torch.cat([y[64:96], y[:1]]))
    assert float(other[-1]) == pytest.approx(float(budgets[0]), rel=1e-5)


def test_wdat_refreshes_upsilon_on_schedule_and_resumes_exactly(trained_cnn, fmnist_train):
    x, y = fmnist_train[0][:96], fmnist_train[1][:96]
    cfg = TrainConfig(method="wdat", loss="trades", wdat_steps=2, wdat_upsilon_images=48, wdat_upsilon_every=2)
    method = make_method(cfg, _ctx((x, y)))
    model = trained_cnn.train()
    opt = torch.optim.SGD(model.parameters(), 0.05)
    seen = []
    for i in (0, 32, 64):
        method.zero_grad()
        opt.zero_grad()
        out = method.step(model, x[i:i + 32], y[i:i + 32])
        out.loss.backward()
        opt.step()
        seen.append(method.split.upsilon)
    assert method.refreshes == 2 and seen[0] == seen[1] != seen[2]  # refreshed at steps 0 and 2
    state = method.state_dict()
    resumed = make_method(cfg, _ctx((x, y)))
    resumed.load_state_dict(state)
    twin = SmallCNN(width=16)
    twin.load_state_dict(model.state_dict())
    twin.train()
    a = method.step(model, x[:32], y[:32])
    b = resumed.step(twin, x[:32], y[:32])
    assert torch.equal(a.x_adv, b.x_adv) and float(a.loss.detach()) == float(b.loss.detach())
    assert method.split == resumed.split
    d = method.epoch_diagnostics(model, x[:8], y[:8])
    assert d["budget_images"] == 4 * 32 and d["upsilon_images"] == 48 and d["upsilon_every"] == 2
    assert method.epoch_budgets == []  # the next epoch starts its own distribution


def test_wdat_run_records_upsilon_and_the_budget_distribution_per_epoch(tmp_path):
    from adt_finetune.progress import Reporter
    from adt_finetune.training import train

    from test_trainer import _workspace

    class Messages(Reporter):
        def __init__(self):
            self.lines = []

        def message(self, text):
            self.lines.append(text)

    rep = Messages()
    cfg = TrainConfig(method="wdat", epochs=2, train_subset=96, batch_size=32, wdat_steps=1, device="cpu",
                      wdat_upsilon_images=40, wdat_upsilon_every=2, wdat_cap=1.5)
    result = train(cfg, workspace=_workspace(tmp_path), reporter=rep)
    meta = json.loads((result.path / "run.json").read_text())
    assert meta["config"]["wdat_split_loss"] == "redlr" and meta["config"]["wdat_upsilon_every"] == 2
    assert len(meta["diagnostics"]) == 2
    # 3 steps per epoch, Υ refreshed at global steps 0, 2 and 4
    assert [d["upsilon_refreshes"] for d in meta["diagnostics"]] == [2, 1]
    for d in meta["diagnostics"]:
        assert d["upsilon"] > 0 and d["upsilon_images"] == 40 and d["upsilon_every"] == 2
        assert d["budget_images"] == 96
        assert 0 <= d["budget_median"] <= d["budget_p95"] <= d["budget_max"] <= 0.15 + 1e-6
        assert 0 <= d["share_beyond_eps"] <= 1 and 0 <= d["share_capped"] <= 1
    beyond = [line for line in rep.lines if "beyond ε" in line]
    assert len(beyond) == 2 and f"{100 * meta['diagnostics'][1]['share_beyond_eps']:.1f}% of images" in beyond[1]


def test_weight_perturbation_moves_only_trained_weights_by_their_scale(tmp_path):
    from adt_finetune.training import train

    from test_trainer import _workspace

    ws = _workspace(tmp_path)
    base = dict(method="pgd-at", loss="ce", epochs=1, train_subset=64, batch_size=32, pgd_steps=1, device="cpu",
                scope="last-layer", lr=1e-12, momentum=0.0, weight_decay=0.0)
    plain = train(TrainConfig(**base, run_name="plain"), workspace=ws).model.state_dict()
    moved = train(TrainConfig(**base, weight_perturb=0.1, run_name="moved"), workspace=ws).model.state_dict()
    head = [k for k in plain if k.startswith("fc.")]
    assert head and all(torch.equal(plain[k], moved[k]) for k in plain if k not in head)  # frozen body untouched
    for k in head:
        rel = float((moved[k] - plain[k]).pow(2).mean().sqrt() / plain[k].pow(2).mean().sqrt())
        assert 0.05 < rel < 0.2, (k, rel)
    with pytest.raises(UserError, match="weight_perturb"):
        train(TrainConfig(**base, weight_perturb=-1.0), workspace=ws)


@pytest.mark.parametrize("bad,match", [(dict(wdat_cap=0.5), "wdat_cap"), (dict(wdat_split_loss="kl"),
                                       "wdat_split_loss"), (dict(wdat_upsilon_every=0), "wdat_upsilon_every"),
                                       (dict(wdat_steps=0), "wdat_steps")])
def test_wdat_settings_are_checked_by_name(bad, match):
    from adt_finetune.training.train_config import validate_config

    with pytest.raises(UserError, match=match):
        validate_config(TrainConfig(method="wdat", **bad))


@pytest.mark.slow
def test_wdat_finetune_raises_wpgd_accuracy(trained_cnn, fmnist_train, fmnist_test, suite_report):
    x_train, y_train = fmnist_train[0][:1000], fmnist_train[1][:1000]
    x_test, y_test = fmnist_test[0][:N_EVAL], fmnist_test[1][:N_EVAL]
    before = next(r["wpgd_acc"] for r in suite_report.rows if r["budget"] == 0.1)
    # β = 1: at the default β = 6 TRADES first trades clean accuracy for smoothness, and
    # 20 updates from a non-robust model are too few to see the robust accuracy rise.
    cfg = TrainConfig(method="wdat", loss="trades", beta=1.0, wdat_steps=5, wdat_upsilon_images=1000,
                      wdat_upsilon_every=10)
    method = make_method(cfg, _ctx((x_train, y_train)))
    model = trained_cnn.train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(x_train), 100):
            idx = perm[i:i + 100]
            method.zero_grad()
            opt.zero_grad()
            out = method.step(model, x_train[idx], y_train[idx])
            out.loss.backward()
            opt.step()
            method.after_backward()
    model.eval()
    after = W.wpgd(model, x_test, y_test, budget=0.1, steps=EVAL_STEPS).accuracy
    with torch.no_grad():
        clean = float((model(x_test).argmax(1) == y_test).float().mean())
    assert after >= before + 0.05, (f"W-PGD accuracy at δ=0.1 should rise with wdat: before {before:.3f}, "
                                    f"after {after:.3f} (clean after {clean:.3f})")


@pytest.mark.parametrize("name", ["wdat-zhang2019.yaml", "wdat-zhang2019-last-layer.yaml"])
def test_wdat_recipes_are_valid(name):
    cfg = TrainConfig().updated(read_recipe(RECIPES / name))
    assert cfg.method == "wdat" and cfg.loss == "trades" and cfg.epochs == 20
    assert cfg.model == "Zhang2019Theoretically"
    method = make_method(cfg, MethodContext(eps=8 / 255, in_channels=3, num_classes=10, image_size=32,
                                            device=torch.device("cpu")))
    assert method.budget == pytest.approx(8 / 255) and method.steps == cfg.wdat_steps
