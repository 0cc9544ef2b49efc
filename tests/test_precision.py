"""Mixed-precision helpers: bf16 autocast must not change what an attack finds or what a loss says.

The numerical comparisons run on CPU, where bf16 autocast exists too, on the
session's small CNN trained on real Fashion-MNIST.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from adt_finetune.perturb.linf import sign_gradient_ascent
from adt_finetune.errors import UserError
from adt_finetune.methods.losses import training_loss
from adt_finetune.precision import (
    amp_dtype_name,
    autocast_context,
    check_dtype,
    make_grad_scaler,
    maybe_compile,
    needs_grad_scaler,
    parse_dtype,
    supports_bf16,
    to_channels_last,
    torch_dtype,
)

CPU = torch.device("cpu")
# ε = 0.03 rather than the dataset's 0.1: at 0.1 PGD-10 drives this non-robust CNN
# to ~8% and both precisions would agree trivially near zero; at 0.03 robust
# accuracy sits mid-range (~56%), where a precision-induced change would show.
EPS = 0.03


def _pgd10(model, x, y, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    with autocast_context(CPU, dtype):
        x_adv = sign_gradient_ascent(model, x, y, eps=EPS, step_size=EPS / 4, steps=10, generator=g)
        with torch.no_grad():
            logits = model(x_adv)
    return x_adv, logits


def test_bf16_pgd10_matches_fp32_robust_accuracy(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:200], fmnist_test[1][:200]
    with torch.no_grad():
        clean = (trained_cnn(x).argmax(1) == y).float().mean().item()
    for seed in (0, 1):
        x32, logits32 = _pgd10(trained_cnn, x, y, "fp32", seed)
        x16, logits16 = _pgd10(trained_cnn, x, y, "bf16", seed)
        # Not vacuous: autocast really ran the model in bf16 and changed the attack's path.
        assert logits32.dtype == torch.float32 and logits16.dtype == torch.bfloat16
        assert (x32 != x16).float().mean().item() > 0.01
        assert (x16 - x).abs().max().item() <= EPS + 1e-6 and x16.min() >= 0 and x16.max() <= 1
        acc32 = (logits32.argmax(1) == y).float().mean().item()
        acc16 = (logits16.argmax(1) == y).float().mean().item()
        assert acc32 < clean - 0.1, f"PGD-10 should bite: clean {clean:.3f}, robust {acc32:.3f}"
        # 3 points = 6 of 200 images. bf16 flips a sign step only where a gradient
        # component is within bf16's ~0.4% relative rounding of zero; measured
        # differences are 0–1 point (0–2 images).
        assert abs(acc16 - acc32) <= 0.03, f"seed {seed}: fp32 {acc32:.3f} vs bf16 {acc16:.3f}"


@pytest.mark.parametrize("kind, rtol", [("ce", 0.01), ("trades", 0.03)])
def test_bf16_training_loss_matches_fp32(trained_cnn, fmnist_test, kind, rtol):
    """Tolerances: bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2% per
    value), logits inherit a few of those roundings, and autocast computes the
    softmax/CE in fp32 from them. CE moves by ~0.2% (measured); TRADES' KL is a
    difference of two log-softmaxes scaled by β = 6, which amplifies logit errors
    (measured ≤ 0.8%), hence 1% and 3%."""
    x, y = fmnist_test[0][:200], fmnist_test[1][:200]
    x_adv, _ = _pgd10(trained_cnn, x, y, "fp32", seed=0)
    with torch.no_grad():
        ref = training_loss(kind, trained_cnn(x_adv), y, logits_clean=trained_cnn(x)).item()
        with autocast_context(CPU, "bf16"):
            logits_adv, logits_clean = trained_cnn(x_adv), trained_cnn(x)
            low = training_loss(kind, logits_adv, y, logits_clean=logits_clean)
    assert logits_adv.dtype == torch.bfloat16
    assert low.dtype == torch.float32  # autocast keeps the loss itself in fp32
    assert low.item() == pytest.approx(ref, rel=rtol)
    assert low.item() != ref  # bf16 did change something: the comparison is not fp32 vs fp32


def test_autocast_context_kinds():
    lin = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    for dtype in (None, "fp32", "float32"):
        with autocast_context(CPU, dtype):
            assert not torch.is_autocast_enabled("cpu")
            assert lin(x).dtype == torch.float32
    with autocast_context("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu")
        assert lin(x).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_bad_dtypes_are_user_errors():
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        autocast_context(CPU, "fp16")
    with pytest.raises(UserError, match="unknown dtype"):
        autocast_context(CPU, "int8")
    with pytest.raises(UserError, match="unknown dtype"):
        parse_dtype("fp64")
    assert check_dtype(CPU, "bfloat16") == "bf16"


def test_amp_and_scaler_choices():
    assert supports_bf16(CPU)
    assert amp_dtype_name(CPU, True) == "bf16" and amp_dtype_name(CPU, False) == "fp32"
    assert torch_dtype("bf16") is torch.bfloat16 and torch_dtype("fp32") is None
    assert needs_grad_scaler("fp16") and not needs_grad_scaler("bf16") and not needs_grad_scaler(None)
    scaler = make_grad_scaler(CPU, "bf16")
    assert not scaler.is_enabled()
    loss = torch.tensor(2.0)
    assert scaler.scale(loss) is loss  # disabled scaler: one code path for every dtype


def test_channels_last_and_compile_helpers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    weight = model[0].weight
    x = torch.rand(2, 3, 8, 8)
    out_model, out_x = to_channels_last(model, x)
    assert out_model is model and model[0].weight is weight  # optimisers keep valid references
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert out_x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out_x, x)
    assert to_channels_last(x=x).is_contiguous(memory_format=torch.channels_last)
    assert maybe_compile(model, False) is model
    compiled = maybe_compile(model, True)  # lazy: nothing compiles until it is called
    assert compiled is not model and compiled._orig_mod is model
