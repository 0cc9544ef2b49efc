"""A small CNN for CPU-scale experiments (quickstart, tests, the Fashion-MNIST study)."""
from __future__ import annotations

from torch import nn


class SmallCNN(nn.Module):
    """Two conv blocks with BatchNorm, a hidden linear layer and a linear head.

    Works on any image size (adaptive pooling) so the same class serves 28×28
    Fashion-MNIST and 32×32 CIFAR. The constructor's defaults fit Fashion-MNIST so
    that `adt_finetune.models.small:SmallCNN` builds without arguments.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU(inplace=True))
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.fc(self.hidden(self.features(x)))
