"""The L2 perturbation layer (perturb/l2.py): the ball is respected, the step is the normalised
gradient, and PGD-L2 agrees with torchattacks' PGDL2 on the session's trained CNN."""
from __future__ import annotations

import torch
from torch import nn

from adt_finetune.attacks.base import example_generators
from adt_finetune.perturb.l2 import l2_norms, l2_start, normalized_gradient_ascent, project_l2
from conftest import import_isolated

torchattacks = import_isolated("torchattacks")


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_projection_keeps_the_ball_and_the_box_and_leaves_inside_points_alone():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8, generator=g)
    far = x + 5 * torch.randn(x.shape, generator=g)
    out = project_l2(far, x, 0.5)
    assert (l2_norms(out - x) <= 0.5 + 1e-5).all()
    assert out.min() >= 0 and out.max() <= 1
    near = (x + 0.01 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert torch.allclose(project_l2(near, x, 0.5), near)
    # Inside [0, 1], a long δ is scaled back to exactly ε along its own direction.
    mid = torch.full((1, 3, 8, 8), 0.5)
    d = torch.zeros_like(mid)
    d[0, 0, 0, 0] = 0.3
    assert torch.allclose(project_l2(mid + d, mid, 0.1) - mid, d / 3, atol=1e-6)


def test_random_start_is_per_example_and_inside_the_ball():
    x = torch.rand(6, 1, 28, 28)
    a = l2_start(x, 1.0, example_generators(x, "s"))
    b = l2_start(x[:3], 1.0, example_generators(x[:3], "s"))
    assert torch.equal(a[:3], b)  # an example's start does not depend on its batch
    assert (l2_norms(a - x) <= 1.0 + 1e-5).all() and (l2_norms(a - x) > 0).all()


def test_one_step_from_x_moves_along_the_normalised_gradient():
    """On a linear model far from the box's edges, FGM-L2 (one step of ε) is x + ε·∇/‖∇‖₂ exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.full((2, 3, 2, 2), 0.5), torch.tensor([0, 2])
    out = normalized_gradient_ascent(model, x, y, eps=0.1, step_size=0.1, steps=1)
    x_leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(x_leaf), y, reduction="sum"), x_leaf)
    expected = x + 0.1 * grad / l2_norms(grad).view(-1, 1, 1, 1)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(l2_norms(out - x), torch.full((2,), 0.1), atol=1e-5)


def test_pgd_l2_agrees_with_torchattacks(trained_cnn, fmnist_test):
    """Same model, examples, ε, step (ε/4) and 20 steps, random starts on both sides. ε = 1.0 on
    28×28 images leaves accuracy mid-range, so a difference could show."""
    x, y = fmnist_test[0][:200], fmnist_test[1][:200]
    eps = 1.0
    ours_x = normalized_gradient_ascent(trained_cnn, x, y, eps=eps, step_size=eps / 4, steps=20,
                                        init=l2_start(x, eps, example_generators(x, "pgd-l2")))
    assert (l2_norms(ours_x - x) <= eps + 1e-5).all()
    torch.manual_seed(0)
    theirs_x = torchattacks.PGDL2(trained_cnn, eps=eps, alpha=eps / 4, steps=20, random_start=True)(x, y)
    ours, theirs, clean = (_accuracy(trained_cnn, ours_x, y), _accuracy(trained_cnn, theirs_x, y),
                           _accuracy(trained_cnn, x, y))
    assert clean - ours > 0.1  # the comparison is not between two no-ops
    assert abs(ours - theirs) <= 0.02, f"ours {ours:.3f}, torchattacks {theirs:.3f}"
