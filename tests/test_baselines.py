"""PGD-AT and TRADES baselines: the loss formula, the ε-ball, the pass counts, and the loss rules."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adt_finetune.config import TrainConfig
from adt_finetune.errors import UserError
from adt_finetune.methods import MethodContext, make_method
from adt_finetune.methods.losses import trades_kl, training_loss
from adt_finetune.nets import PassCounter, eval_mode, find_last_linear
from adt_finetune.training import build_config, resolve_loss

EPS = 0.1


def _method(name: str, model: nn.Module, train_images=None, **cfg):
    _, head = find_last_linear(model, torch.zeros(1, 1, 28, 28))
    ctx = MethodContext(eps=EPS, in_channels=1, num_classes=10, image_size=28, device=torch.device("cpu"), head=head,
                        train_images=train_images)
    loss = cfg.pop("loss", {"pgd-at": "ce", "trades": "trades"}.get(name))
    return make_method(TrainConfig(method=name, loss=loss, **cfg), ctx)


def _last_layer_modes(model: nn.Module) -> None:
    """What the trainer does for --scope last-layer: body in eval mode, head in train mode."""
    model.eval()
    find_last_linear(model, torch.zeros(1, 1, 28, 28))[1].train()


def test_trades_loss_by_hand_on_fixed_logits():
    clean = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    adv = torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]])
    y = torch.tensor([0, 2])
    beta = 6.0

    def softmax(row):
        exps = [math.exp(v) for v in row]
        return [e / sum(exps) for e in exps]

    ce, kl = 0.0, 0.0
    for i in range(2):
        p, q = softmax(clean[i].tolist()), softmax(adv[i].tolist())
        ce += -math.log(p[y[i]])
        kl += sum(pj * math.log(pj / qj) for pj, qj in zip(p, q))
    expected = ce / 2 + beta * kl / 2
    got = training_loss("trades", adv, y, logits_clean=clean, beta=beta)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert trades_kl(clean, adv).mean().item() == pytest.approx(kl / 2, rel=1e-6)
    assert training_loss("ce", adv, y).item() == pytest.approx(F.cross_entropy(adv, y).item())


@pytest.mark.parametrize("name", ["pgd-at", "trades"])
def test_adversarial_inputs_stay_in_ball_and_box(name, trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:64], fmnist_test[1][:64]
    trained_cnn.train()
    out = _method(name, trained_cnn).step(trained_cnn, x, y)
    assert (out.x_adv - x).abs().max().item() <= EPS + 1e-6
    assert out.x_adv.min().item() >= 0.0 and out.x_adv.max().item() <= 1.0
    # The attack actually moved: most pixels sit far from x (PGD ends on the ball's faces).
    assert ((out.x_adv - x).abs() > EPS / 2).float().mean().item() > 0.3


@pytest.mark.parametrize("name", ["pgd-at", "trades"])
def test_attack_finds_harder_inputs_than_clean(name, trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:64], fmnist_test[1][:64]
    trained_cnn.train()
    out = _method(name, trained_cnn).step(trained_cnn, x, y)
    with torch.no_grad(), eval_mode(trained_cnn):
        clean_acc = (trained_cnn(x).argmax(1) == y).float().mean().item()
        adv_acc = (trained_cnn(out.x_adv).argmax(1) == y).float().mean().item()
    assert adv_acc < clean_acc - 0.3, f"{name}: clean {clean_acc:.2f} vs adversarial {adv_acc:.2f}"


def test_pgd_at_pass_counts(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:16], fmnist_test[1][:16]
    trained_cnn.train()
    method = _method("pgd-at", trained_cnn)
    with PassCounter(trained_cnn) as pc:
        out = method.step(trained_cnn, x, y)
        out.loss.backward()
    assert (pc.forward, pc.backward) == (7 + 1, 7 + 1)


@pytest.mark.parametrize("steps", [1, 3])
def test_pgd_at_steps_setting(steps, trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:8], fmnist_test[1][:8]
    trained_cnn.train()
    method = _method("pgd-at", trained_cnn, pgd_steps=steps)
    with PassCounter(trained_cnn) as pc:
        method.step(trained_cnn, x, y)
    assert pc.forward == steps + 1


class _NoNormCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("case,expected", [
    ("full, BatchNorm", 10 + 3),     # eval-mode target pass + clean and adversarial train-mode passes
    ("last-layer, BatchNorm", 10 + 2),  # frozen body in eval mode: the clean pass serves as target too
    ("full, no BatchNorm", 10 + 2),  # train and eval mode are the same function
])
def test_trades_pass_counts(case, expected, trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:16], fmnist_test[1][:16]
    model = _NoNormCNN() if "no BatchNorm" in case else trained_cnn
    if case.startswith("last-layer"):
        _last_layer_modes(model)
    else:
        model.train()
    method = _method("trades", model)
    with PassCounter(model) as pc:
        out = method.step(model, x, y)
        out.loss.backward()
    assert pc.forward == expected
    assert pc.backward == 10 + 2  # attack steps + the clean and adversarial terms of the loss


def test_trades_step_loss_is_ce_plus_beta_kl(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:32], fmnist_test[1][:32]
    _last_layer_modes(trained_cnn)  # deterministic forward: recomputing below gives the same logits
    out = _method("trades", trained_cnn, beta=3.0).step(trained_cnn, x, y)
    with torch.no_grad():
        clean, adv = trained_cnn(x), trained_cnn(out.x_adv)
    expected = F.cross_entropy(clean, y) + 3.0 * trades_kl(clean, adv).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.metrics["kl"] > 0 and 0 <= out.metrics["clean_acc"] <= 1 and 0 <= out.metrics["adv_acc"] <= 1


def test_trades_attack_uses_eval_mode_target(trained_cnn, fmnist_test, monkeypatch):
    """With BatchNorm training, the attack's KL target must be the eval-mode prediction
    (the mode the attack runs in), not the train-mode logits of the loss."""
    import copy

    import adt_finetune.methods.baselines as baselines

    x, y = fmnist_test[0][:32], fmnist_test[1][:32]
    trained_cnn.train()
    with torch.no_grad():
        train_mode_logits = copy.deepcopy(trained_cnn)(x)
        eval_logits = copy.deepcopy(trained_cnn).eval()(x)
    assert not torch.allclose(train_mode_logits, eval_logits, atol=1e-3)  # the distinction matters here

    targets = []

    def spy(target, logits):
        targets.append(target.detach().clone())
        return trades_kl(target, logits)

    monkeypatch.setattr(baselines, "trades_kl", spy)
    _method("trades", trained_cnn).step(trained_cnn, x, y)
    assert torch.allclose(targets[0], eval_logits, atol=1e-5)


def test_loss_rules_for_baselines():
    with pytest.raises(UserError, match="does not apply to `method` pgd-at"):
        resolve_loss(TrainConfig(method="pgd-at", loss="trades"))
    with pytest.raises(UserError, match="does not apply to `method` trades"):
        build_config(overrides={"method": "trades", "loss": "ce"})
    # Left out, the loss is the method's own.
    assert build_config(overrides={"method": "trades"}).loss == "trades"
    assert build_config(overrides={"method": "pgd-at"}).loss == "ce"
    assert resolve_loss(TrainConfig(method="trades")) == "trades"
    with pytest.raises(UserError, match="unknown loss"):
        resolve_loss(TrainConfig(method="exp-am", loss="hinge"))


@pytest.mark.parametrize("name,settings,inner", [
    ("trades", {}, 10),
    ("exp", {"exp_steps": 2, "exp_samples": 3}, 2),
    # wdat: 3 PGD steps, plus the forward of Υ's refresh over its reference set and of the batch's
    # first-order budget split (both need gradients at the clean images, so neither can share the
    # no-grad clean pass that is counted here)
    ("wdat", {"wdat_steps": 3}, 3 + 2),
])
def test_trades_loss_shares_the_clean_pass_when_modes_agree(name, settings, inner, trained_cnn, fmnist_test,
                                                             monkeypatch):
    """--scope last-layer keeps the body in eval mode, so the eval-mode KL target and the
    train-mode clean logits are one function: one clean pass serves both, and the loss and
    its gradient are exactly what two separate passes give."""
    from adt_finetune.methods import losses

    x, y = fmnist_test[0][:16], fmnist_test[1][:16]
    _last_layer_modes(trained_cnn)
    head = find_last_linear(trained_cnn, torch.zeros(1, 1, 28, 28))[1]

    def one_step(force_separate: bool):
        if force_separate:
            monkeypatch.setattr(losses, "needs_separate_target", lambda model: True)
        torch.manual_seed(0)
        # wdat computes Υ on training images when it is made (before the counted step)
        images = (lambda n: (fmnist_test[0][:n], fmnist_test[1][:n])) if name == "wdat" else None
        method = _method(name, trained_cnn, train_images=images, loss="trades", **settings)
        with PassCounter(trained_cnn) as pc:
            out = method.step(trained_cnn, x, y)
            head.zero_grad(set_to_none=True)
            out.loss.backward()
        monkeypatch.undo()
        return pc.forward, out.loss.detach(), head.weight.grad.clone()

    shared_passes, shared_loss, shared_grad = one_step(False)
    separate_passes, separate_loss, separate_grad = one_step(True)
    assert shared_passes == inner + 2 and separate_passes == inner + 3
    assert torch.allclose(shared_loss, separate_loss, rtol=1e-5, atol=1e-6), (shared_loss, separate_loss)
    assert torch.allclose(shared_grad, separate_grad, rtol=1e-4, atol=1e-6)
