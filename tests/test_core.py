"""Foundation helpers: ε parsing, atomic writes, generic model helpers, the PGD loop."""
import os

import pytest
import torch
from torch import nn

from adt_finetune.perturb.linf import project_linf, sign_gradient_ascent
from adt_finetune.errors import UserError
from adt_finetune.nets import PassCounter, eval_mode, find_last_linear
from adt_finetune.utils import atomic_write_text, format_eps, parse_eps


@pytest.mark.parametrize("text,value", [("8/255", 8 / 255), ("0.031", 0.031), ("0.1", 0.1), (0.1, 0.1), ("0", 0.0)])
def test_parse_eps(text, value):
    assert parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize("bad", ["eight", "8/0", "", "-0.1", "2", "nan", "8//255"])
def test_parse_eps_rejects(bad):
    with pytest.raises(UserError):
        parse_eps(bad)


def test_format_eps():
    assert format_eps(8 / 255) == "8/255"
    assert format_eps(0.1) == "0.1"
    assert format_eps(0.031) == "0.031"


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")
    from adt_finetune import utils

    with pytest.raises(RuntimeError):
        with utils.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_find_last_linear_follows_forward_order():
    class Odd(nn.Module):  # head registered first, used last
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.body = nn.Linear(3, 4)

        def forward(self, x):
            return self.head(self.body(x))

    m = Odd()
    name, layer = find_last_linear(m, torch.zeros(1, 3))
    assert name == "head" and layer is m.head


def test_eval_mode_restores_mixed_flags():
    m = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2))
    m.train()
    m[0].eval()
    with eval_mode(m):
        assert not any(x.training for x in m.modules())
    assert m.training and not m[0].training and m[1].training


def test_pass_counter_counts_forward_and_backward():
    m = nn.Linear(3, 2)
    with PassCounter(m) as pc:
        out = m(torch.randn(5, 3, requires_grad=True)).sum()
        with torch.no_grad():
            m(torch.randn(5, 3))
        out.backward()
    assert (pc.forward, pc.backward, pc.images_forward) == (2, 1, 10)


def test_pgd_stays_in_ball_and_beats_clamp_trap(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:200], fmnist_test[1][:200]
    eps = 0.1
    x_adv = sign_gradient_ascent(trained_cnn, x, y, eps=eps, step_size=eps / 4, steps=10,
                                 generator=torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    # Pixels at 0 (black background) must move: the clamp trap would freeze them.
    at_zero = x == 0
    assert (x_adv[at_zero] > 0).float().mean() > 0.3
    with torch.no_grad():
        clean = (trained_cnn(x).argmax(1) == y).float().mean()
        adv = (trained_cnn(x_adv).argmax(1) == y).float().mean()
    assert adv < clean - 0.3, f"PGD-10 at ε=0.1 should break a standard model: clean {clean:.2f}, adv {adv:.2f}"


def test_project_linf_is_intersection():
    x = torch.tensor([0.0, 0.5, 1.0])
    out = project_linf(torch.tensor([-1.0, 0.9, 0.95]), x, 0.1)
    assert torch.allclose(out, torch.tensor([0.0, 0.6, 0.95]))
