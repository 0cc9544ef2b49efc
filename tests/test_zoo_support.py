"""Zoo-wide support: every architecture of RobustBench 1.1.1's model list, built offline with random
weights, checked for what training and the attacks need (the head, the feature tap, train mode,
BatchNorm), and the finders on small transformer and ConvNeXt models of timm's own classes."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from adt_finetune.data import DATASETS
from adt_finetune.errors import UserError
from adt_finetune.nets import (find_feature_map, find_head_and_feature_map, find_last_linear, head_refusal,
                               train_mode_refusal)
from adt_finetune.zoo import catalog, resolve_name
from adt_finetune.zoo.support import ALL, LAST_LAYER, REFUSED, check_entry

README = Path(__file__).resolve().parents[1] / "README.md"
TRANSFORMER = re.compile(r"ViT|DeiT|Swin|XCiT", re.I)


@pytest.fixture(scope="module")
def zoo_support():
    cache: dict = {}
    return [check_entry(e, cache) for e in catalog() if e.loadable]


@pytest.mark.slow
def test_every_zoo_architecture_is_supported_or_refused_in_one_line(zoo_support):
    assert len(zoo_support) == 206
    verdicts = {(s.entry.dataset, s.entry.threat_model, s.entry.name): s.verdict for s in zoo_support}
    not_all = {k: v for k, v in verdicts.items() if v != ALL}
    # MixedNUTS ensembles assert their base classifiers are in eval mode; Diffenderfer's binary networks
    # end in a binary layer, not nn.Linear; Bai2023Improving's last linear layer is its mixing network's.
    assert not_all == {
        **{(ds, "Linf", "Bai2024MixedNUTS"): LAST_LAYER for ds in ("cifar10", "cifar100", "imagenet")},
        **{(ds, "corruptions", f"Diffenderfer2021Winning_{n}"): REFUSED
           for ds in ("cifar10", "cifar100") for n in ("Binary", "Binary_CARD_Deck")},
        ("cifar10", "Linf", "Bai2023Improving_edm"): REFUSED, ("cifar100", "Linf", "Bai2023Improving_edm"): REFUSED,
        ("cifar100", "Linf", "Bai2023Improving_trades"): REFUSED}
    for s in zoo_support:
        assert s.why == [] if s.verdict == ALL else s.why, s.entry.name
        assert all("\n" not in w for w in s.why)
        if s.verdict == REFUSED:
            assert s.scopes == [] and s.attacks_left_out == ["feature"]
            continue
        assert s.head is not None and s.tap is not None, s.entry.name
        # Never an identity or a piece of attention: ConvNeXt's norm_pre, ViT's k_norm / attn_drop.
        assert not re.search(r"(norm_pre|k_norm|q_norm|attn_drop|attn)$", s.tap), (s.entry.name, s.tap)
        if TRANSFORMER.search(s.entry.architecture) and "ConvNeXt" not in s.entry.architecture:
            assert re.fullmatch(r"(model\.|rob_model\.model\.)?norm", s.tap), (s.entry.name, s.tap)
            assert not s.batchnorm or "XCiT" in s.entry.architecture, s.entry.name
        if "ConvNeXt" in s.entry.architecture and "+" not in s.entry.architecture:
            assert s.tap.endswith("stages"), (s.entry.name, s.tap)
        if s.entry.architecture.startswith("WideResNet"):
            assert s.batchnorm
    counts = {v: sum(1 for s in zoo_support if s.verdict == v) for v in (ALL, LAST_LAYER, REFUSED)}
    assert counts == {ALL: 196, LAST_LAYER: 3, REFUSED: 7}
    assert (f"{counts[ALL]} of 206 RobustBench architectures: all methods; {counts[LAST_LAYER]}: last layer only; "
            f"{counts[REFUSED]}: refused") in README.read_text()


def _vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=10,
                             qk_norm=False).eval()


def test_transformer_tap_is_the_tokens_before_pooling():
    """The final norm's (B, tokens, D) output, not a tensor inside attention (the old 4-D rule's pick)."""
    model, x = _vit(), torch.rand(1, 3, 32, 32)
    name, head = find_last_linear(model, x)
    assert name == "head"
    tap_name, tap = find_feature_map(model, x, head)
    assert tap_name == "norm" and tap is model.norm
    assert find_head_and_feature_map(model, x) == ("head", head, "norm")


def test_convnext_tap_is_the_last_stage_not_the_identity_after_it():
    from timm.models.convnext import ConvNeXt

    model = ConvNeXt(num_classes=10, depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), patch_size=2).eval()
    assert isinstance(model.norm_pre, nn.Identity)
    tap_name, _ = find_feature_map(model, torch.rand(1, 3, 64, 64), model.head.fc)
    assert tap_name == "stages"


class _AssertsEval(nn.Module):
    """Like RobustBench's MixedNUTS: its body must stay in eval mode."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten())
        self.fc = nn.Linear(4 * 30 * 30, 10)

    def forward(self, x):
        assert not self.body.training, "the body must be in eval mode"
        return self.fc(self.body(x))


def test_train_mode_refusal_names_the_assertion_and_changes_nothing():
    model = _AssertsEval().eval()
    x = torch.rand(2, 3, 32, 32)
    stats = model.body[1].running_mean.clone()
    assert train_mode_refusal(model, x) == "its forward pass refuses train mode (the body must be in eval mode)"
    assert train_mode_refusal(model, x, only=model.fc) is None  # last layer: body in eval mode
    assert not any(m.training for m in model.modules())
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    before = plain[1].running_mean.clone()
    assert train_mode_refusal(plain, x) is None
    assert torch.equal(plain[1].running_mean, before) and torch.equal(model.body[1].running_mean, stats)


def test_a_last_linear_that_is_not_a_classifier_head_is_refused():
    assert head_refusal(nn.Linear(8, 10), "fc", 10) is None
    why = head_refusal(nn.Linear(8, 1), "policy.linear", 10)
    assert "policy.linear gives 1 outputs, not the 10 class logits" in why


def test_training_refuses_a_model_whose_forward_asserts_eval_mode_in_one_line():
    from adt_finetune.config import TrainConfig
    from adt_finetune.training.run_state import Session

    info = DATASETS["cifar10"]
    data = torch.utils.data.TensorDataset(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(UserError, match=r"scope full: its forward pass refuses train mode .*last-layer"):
        Session(TrainConfig(method="pgd-at", scope="full", batch_size=2, lr=0.1), _AssertsEval(), data, info,
                torch.device("cpu"), eps=8 / 255, reinit_head=False)
    session = Session(TrainConfig(method="pgd-at", scope="last-layer", batch_size=2, lr=0.1), _AssertsEval(), data, info,
                      torch.device("cpu"), eps=8 / 255, reinit_head=False)
    assert session.head_name == "fc"


def test_models_check_prints_what_applies_and_why_not(cli):
    code, out, err = cli("models", "Addepalli2021Towards_RN18", "--check")
    assert code == 0, err
    assert "Addepalli2021Towards_RN18 (cifar10/Linf, ResNet-18): all methods" in out
    assert "head (last layer): linear" in out and "feature tap: layer4" in out
    assert "training scopes: full, last-layer" in out
    code, out, err = cli("models", "Diffenderfer2021Winning_Binary", "-t", "corruptions", "--check")
    assert code == 0, err
    assert "Diffenderfer2021Winning_Binary (cifar10/corruptions, WideResNet-18-2): refused" in out
    assert "attacks: all but feature" in out and "no nn.Linear layer" in out
    assert "eval takes it with the corruptions suite only, and training refuses it" in out
    code, out, err = cli("models", "Kireev", "-t", "corruptions", "--check")  # several entries: a table
    assert code == 0, err
    assert "what adt-ft can do with 5 entries" in out
    assert re.search(r"Kireev2021Effectiveness_RLAT\s+│ all methods │ linear\s+│ bn", out)
    assert "Traceback" not in out + err


def test_an_entry_without_an_architecture_is_a_user_error():
    unloadable = next(e for e in catalog("cifar10", "Linf") if not e.loadable)
    with pytest.raises(UserError, match="ships no checkpoint or architecture"):
        check_entry(resolve_name(unloadable.name, "cifar10", "Linf"))
