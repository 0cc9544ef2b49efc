"""The L2 threat model through evaluation: the gradient attacks' L2 versions, AutoAttack with
norm='L2' (cross-checked against pyautoattack itself), the L2 sanity check, the L∞-only attacks'
refusal, and an L2 zoo model evaluated end to end into leaderboard/cifar10/L2/."""
from __future__ import annotations

import json

import pytest
import torch

from adt_finetune.attacks import make_attack
from adt_finetune.data import CIFAR10_CLASSES
from adt_finetune.errors import UserError
from adt_finetune.evaluation.engine import evaluate
from adt_finetune.perturb.l2 import l2_norms


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("name", ["fgsm", "pgd20", "cw"])
def test_gradient_attacks_in_l2_stay_in_the_l2_ball_and_lower_accuracy(trained_cnn, fmnist_test, name):
    x, y = fmnist_test[0][:100], fmnist_test[1][:100]
    res = make_attack(name, 1.0, threat_model="L2")(trained_cnn, x, y)
    d = l2_norms(res.x_adv - x)
    assert (d <= 1.0 + 1e-5).all() and res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    # An L2 step, not an L∞ one: an L∞ ε = 1 step would move pixels by up to 1 (norm ≫ 1).
    assert d.max() > 0.5
    assert res.robust.float().mean().item() < _accuracy(trained_cnn, x, y) - 0.1


@pytest.mark.parametrize("name", ["mim", "feature", "exp", "exp-am", "imp-am-cotrained", "spsa", "wpgd"])
def test_linf_only_attacks_refuse_l2_in_one_line(name):
    with pytest.raises(UserError, match=r"does not run in the L2 threat model") as e:
        make_attack(name, 0.5, threat_model="L2")
    assert "\n" not in str(e.value)


def test_apgd_ce_in_l2_agrees_with_pyautoattack(trained_cnn, fmnist_test):
    """Our APGD-CE part in L2 against pyautoattack's AutoAttack(norm='L2', attacks=['apgd-ce']) run directly,
    same seed: the same robust flags."""
    from pyautoattack import AutoAttack

    x, y = fmnist_test[0][:32], fmnist_test[1][:32]
    eps = 1.0
    ours = make_attack("apgd-ce", eps, threat_model="L2", seed=0)(trained_cnn, x, y)
    assert (l2_norms(ours.x_adv - x) <= eps + 1e-5).all()
    adversary = AutoAttack(trained_cnn.eval(), norm="L2", eps=eps, version="standard", seed=0, device="cpu")
    adversary.attacks_to_run = ["apgd-ce"]
    adversary.verbose = False
    x_theirs, _ = adversary.run_standard_evaluation(x, y, batch_size=len(x))
    theirs = _accuracy(trained_cnn, x_theirs, y)
    assert ours.robust.float().mean().item() < _accuracy(trained_cnn, x, y) - 0.1
    assert abs(ours.robust.float().mean().item() - theirs) <= 1 / 32 + 1e-9


def test_engine_checks_l2_distances_and_files_them_as_l2(trained_cnn, fmnist_test):
    x, y = fmnist_test[0][:40], fmnist_test[1][:40]
    r = evaluate(trained_cnn, x, y, attacks=["clean", "pgd20"], eps=1.0, threat_model="L2",
                 attack_settings={"pgd20": {"steps": 5}})
    check = next(c for c in r.sanity if c.name == "l2")
    assert check.ok and "‖x'−x‖₂" in check.detail
    assert 0.5 < r.max_linf["pgd20"] <= 1.0 + 1e-5  # an L2 norm: an L∞ distance would be ≤ 1/4 of it here
    doc = r.to_json()
    assert doc["threat_model"] == "L2" and "max_l2" in doc and "max_linf" not in doc
    assert r.attack_settings["pgd20"]["threat_model"] == "L2"
    linf = evaluate(trained_cnn, x, y, attacks=["clean", "pgd20"], eps=8 / 255, attack_settings={"pgd20": {"steps": 2}})
    assert [c.name for c in linf.sanity if c.name in ("l2", "linf")] == ["linf"]
    assert "threat_model" not in linf.attack_settings["pgd20"]


def rice_l2_workspace(tmp_path, image_folder):
    """A workspace whose current model is Rice2020Overfitting (CIFAR-10 L2) with random weights written
    where the loader looks, and a CIFAR-10 image folder: (workspace, images, checkpoint path)."""
    from adt_finetune.workspace import ModelRef, Workspace
    from adt_finetune.zoo import build_architecture

    ws = Workspace(tmp_path / "ws")
    path = ws.model_path("cifar10", "L2", "Rice2020Overfitting")
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(build_architecture("Rice2020Overfitting", "cifar10", "L2").state_dict(), path)
    ws.set_current_model(ModelRef(name="Rice2020Overfitting", arch="Rice2020Overfitting", dataset="cifar10",
                                  threat_model="L2", path=str(path)))
    root, _ = image_folder(tmp_path / "images", CIFAR10_CLASSES)
    return ws, root, path


def test_an_l2_zoo_model_evaluates_into_the_l2_leaderboard(tmp_path, cli, image_folder):
    """Rice2020Overfitting (CIFAR-10 L2, PreAct ResNet-18) with random weights written where the loader looks,
    pulled as the current model; `--suite aa` with APGD-CE alone on foolbox's CIFAR-10 images, at the
    default ε = 0.5."""
    ws, root, path = rice_l2_workspace(tmp_path, image_folder)
    code, out, err = cli("eval", "--suite", "aa", "--set", "autoattack.attacks=apgd-ce", "-n", "4",
                         "--dataset", str(root), "-w", tmp_path / "ws", "--no-progress", "--entry", "rice-l2")
    assert code == 0, err
    entry = json.loads((tmp_path / "ws" / "leaderboard" / "cifar10" / "L2" / "rice-l2.json").read_text())
    text = json.dumps(entry)
    assert '"threat_model": "L2"' in text and '"eps": 0.5' in text
    assert '"max_l2"' in text and '"max_linf"' not in text
    assert not (tmp_path / "ws" / "leaderboard" / "cifar10" / "Linf").exists()
    # The site's entry page heads the distance column with the L2 norm and shows the L2 distance.
    code, out, err = cli("leaderboard", "--html", tmp_path / "site", "-w", tmp_path / "ws")
    assert code == 0, err
    page = (tmp_path / "site" / "cifar10" / "L2" / "rice-l2.html").read_text()
    assert "max ‖x′−x‖₂" in page and "‖x′−x‖∞" not in page
    assert f"{entry['adt_ft']['max_l2']['autoattack']:.6g}" in page
    # RobustBench's CIFAR-10 L2 leaderboard takes it (ε 0.5), but only as a draft: APGD-CE alone on 4 images.
    from adt_finetune.leaderboard import read_entry
    from adt_finetune.publish.export import check_exportable

    e = read_entry(tmp_path / "ws" / "leaderboard" / "cifar10" / "L2" / "rice-l2.json")
    assert "not 'standard'" in check_exportable(e, allow_partial=True)
    with pytest.raises(UserError, match="not AutoAttack \\(standard\\)"):
        check_exportable(e)


def test_an_l2_zoo_name_evaluates_with_threat_model_l2(tmp_path, cli, image_folder):
    """--model NAME --threat-model L2: the name is looked up in the L2 leaderboard (Rice2020Overfitting is in
    both; its L2 weights are the ones written here), and the entry lands under L2."""
    from adt_finetune.workspace import Workspace
    from adt_finetune.zoo import build_architecture

    ws = Workspace(tmp_path / "ws")
    path = ws.model_path("cifar10", "L2", "Rice2020Overfitting")
    path.parent.mkdir(parents=True)
    torch.save(build_architecture("Rice2020Overfitting", "cifar10", "L2").state_dict(), path)
    root, _ = image_folder(tmp_path / "images", CIFAR10_CLASSES)
    code, out, err = cli("eval", "--model", "Rice2020Overfitting", "--threat-model", "L2", "--attacks", "fgsm",
                         "-n", "2", "--dataset", str(root), "-w", tmp_path / "ws", "--no-progress", "--entry", "r")
    assert code == 0, err
    entry = json.loads((tmp_path / "ws" / "leaderboard" / "cifar10" / "L2" / "r.json").read_text())
    assert entry["adt_ft"]["threat_model"] == "L2" and entry["adt_ft"]["max_l2"]["fgsm"] <= 0.5 + 1e-5


def test_corruptions_models_are_still_refused(tmp_path, cli):
    from adt_finetune.workspace import ModelRef, Workspace

    ws = Workspace(tmp_path)
    ws.set_current_model(ModelRef(name="Hendrycks2020AugMix_WRN", arch="Hendrycks2020AugMix_WRN",
                                  dataset="cifar10", threat_model="corruptions",
                                  path=str(ws.model_path("cifar10", "corruptions", "Hendrycks2020AugMix_WRN"))))
    code, out, err = cli("eval", "--attacks", "fgsm", "-n", "8", "-w", tmp_path, "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "RobustBench corruptions model" in err
