"""The L2 threat model through training: pgd-at and trades maximise in the L2 ball of an L2 model,
the ADT methods and wdat refuse it in one line, and an L2 zoo model fine-tunes for one step."""
from __future__ import annotations

import json

import pytest
import torch

from adt_finetune.config import TrainConfig
from adt_finetune.errors import UserError
from adt_finetune.methods import MethodContext, make_method
from adt_finetune.nets import find_last_linear
from adt_finetune.perturb.l2 import l2_norms
from test_l2_eval import rice_l2_workspace


def _method(name: str, model, threat_model: str, eps: float = 1.0):
    _, head = find_last_linear(model, torch.zeros(1, 1, 28, 28))
    ctx = MethodContext(eps=eps, in_channels=1, num_classes=10, image_size=28, device=torch.device("cpu"), head=head,
                        threat_model=threat_model)
    loss = {"pgd-at": "ce", "trades": "trades"}.get(name)
    return make_method(TrainConfig(method=name, loss=loss), ctx)


@pytest.mark.parametrize("name", ["pgd-at", "trades"])
def test_baselines_maximise_in_the_l2_ball(trained_cnn, fmnist_test, name):
    x, y = fmnist_test[0][:32], fmnist_test[1][:32]
    out = _method(name, trained_cnn, "L2").step(trained_cnn, x, y)
    d = l2_norms(out.x_adv - x)
    assert (d <= 1.0 + 1e-5).all() and out.x_adv.min() >= 0 and out.x_adv.max() <= 1
    assert d.max() > 0.5  # an L2 step of ε/4 per step, not an L∞ one (which would reach norms of ~10 here)
    assert torch.isfinite(out.loss)
    linf = _method(name, trained_cnn, "Linf", eps=0.1).step(trained_cnn, x, y)
    assert l2_norms(linf.x_adv - x).max() > 1.0  # the L∞ version really is a different ball


@pytest.mark.parametrize("name", ["exp", "exp-am", "imp-am", "wdat"])
def test_adt_methods_and_wdat_refuse_l2_in_one_line(trained_cnn, name):
    with pytest.raises(UserError, match="does not train an L2 model") as e:
        _method(name, trained_cnn, "L2")
    assert "\n" not in str(e.value)


def test_an_l2_zoo_model_fine_tunes_one_step_with_pgd_at(tmp_path, cli, image_folder):
    ws, root, path = rice_l2_workspace(tmp_path, image_folder)
    code, out, err = cli("train", "--method", "pgd-at", "--max-steps", "1", "--batch-size", "4",
                         "--dataset", str(root), "-w", tmp_path / "ws", "--no-progress")
    assert code == 0, err
    run_json = next((tmp_path / "ws" / "runs").glob("*/run.json"))
    meta = json.loads(run_json.read_text())
    assert meta["threat_model"] == "L2" and meta["eps"] == 0.5
