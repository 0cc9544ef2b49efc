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


class _Block(nn.Module):
    """A basic residual block (two 3×3 convs with BatchNorm), projecting the shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A conv stem, residual stages with BatchNorm, global average pooling and a linear head.

    Unlike SmallCNN it keeps a real spatial feature map up to the global pooling
    (7×7 for 28×28 inputs with the default three stages), so the feature attack's
    default `pre-pool` tap applies (docs/evaluation.md "Feature attack"). Defaults
    fit Fashion-MNIST; `width` is the first stage's channels, doubled per later stage.
    `stem_stride` 2 halves the maps after the stem (28×28 → 14×14 → 7×7 → 4×4), about 4×
    cheaper per forward pass: what lets AutoAttack on a robust model fit a CPU budget.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, stages: int = 3,
                 stem_stride: int = 1):
        super().__init__()
        if stages < 1:
            raise ValueError(f"SmallResNet needs at least one stage, got {stages}")
        if stem_stride not in (1, 2):
            raise ValueError(f"SmallResNet's stem_stride must be 1 or 2, got {stem_stride}")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, stride=stem_stride, padding=1, bias=False),
                                  nn.BatchNorm2d(width),
                                  nn.ReLU())
        blocks, c = [], width
        for i in range(stages):
            c_out = width * 2 ** i
            blocks.append(_Block(c, c_out, stride=1 if i == 0 else 2))
            c = c_out
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.stages(self.stem(x))))
