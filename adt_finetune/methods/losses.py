"""The outer training losses shared by every method (SPEC §4.4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
