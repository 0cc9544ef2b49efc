"""The outer training losses shared by every method (docs/methods.md, "Losses")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nets import eval_mode

# Layers whose output depends on train/eval mode. A custom module that branches on
# `self.training` by itself is not detected; zoo architectures do not do that.
_MODE_DEPENDENT = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)


def needs_separate_target(model: nn.Module) -> bool:
    """Whether the eval-mode clean logits (TRADES' attack target) differ from the train-mode ones.

    The attack runs in eval mode (docs/methods.md, "Training methods"), so its KL target must be the eval-mode
    prediction; the loss' clean pass runs in train mode. With no mode-dependent
    layer in train mode (e.g. --scope last-layer, where the body stays in eval mode)
    the two are the same function and one pass serves both.
    """
    return any(m.training and isinstance(m, _MODE_DEPENDENT) for m in model.modules())


def trades_target(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(train-mode clean logits for the loss, or None; the detached eval-mode KL target).

    One pass when the two modes agree: its logits keep their graph for the loss and
    serve, detached, as the target. Otherwise the target is a no-grad eval-mode pass
    and the caller makes the train-mode clean pass itself after the attack.
    """
    if needs_separate_target(model):
        with torch.no_grad(), eval_mode(model):
            return None, model(x)
    logits = model(x)
    return logits, logits.detach()


def trades_kl(logits_clean: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """Per-example KL(softmax f(x) ‖ softmax f(x')), summed over classes.

    TRADES' reference code uses KLDivLoss(reduction='sum') / batch size, i.e. the
    batch mean of this quantity.
    """
    log_p_clean = F.log_softmax(logits_clean, dim=1)
    log_p_adv = F.log_softmax(logits_adv, dim=1)
    return (log_p_clean.exp() * (log_p_clean - log_p_adv)).sum(1)


def training_loss(kind: str, logits_adv: torch.Tensor, y: torch.Tensor, *, logits_clean: torch.Tensor | None = None,
                  beta: float = 6.0) -> torch.Tensor:
    """Batch-mean training loss: 'ce' is CE(f(x'), y); 'trades' is CE(f(x), y) + β·KL(f(x) ‖ f(x'))."""
    if kind == "ce":
        return F.cross_entropy(logits_adv, y)
    if kind == "trades":
        if logits_clean is None:
            raise ValueError("the TRADES loss needs the clean logits")
        return F.cross_entropy(logits_clean, y) + beta * trades_kl(logits_clean, logits_adv).mean()
    raise ValueError(f"unknown loss {kind!r}")
