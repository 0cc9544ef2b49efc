"""Expectation over Transformation (Athalye et al. 2018, "Obfuscated Gradients Give a False Sense of
Security", §4.3) for randomised models: a wrapper that any gradient attack of the registry can attack.

The wrapper's logits are log E[softmax(f(x))] over `samples` independent forward passes of the
randomised model, so the cross-entropy an attack climbs is −log E[p_y(x)] and its input gradient
averages over the model's randomness; its prediction (the verdict) is the expected prediction.
"""
from __future__ import annotations

import torch
from torch import nn


class ExpectationModel(nn.Module):
    """log of the mean softmax of `samples` forward passes of `model` (docs/evaluation.md, "Audit")."""

    def __init__(self, model: nn.Module, samples: int):
        super().__init__()
        if int(samples) < 1:
            raise ValueError(f"EOT samples must be >= 1, got {samples}")
        self.model, self.samples = model, int(samples)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.model(x).float(), dim=1)
        for _ in range(self.samples - 1):
            probs = probs + torch.softmax(self.model(x).float(), dim=1)
        # clamp: a class no sample gives any mass would be log 0 = −inf, which the verdict treats as non-finite
        return torch.log((probs / self.samples).clamp_min(torch.finfo(torch.float32).tiny))
