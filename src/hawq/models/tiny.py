"""Tiny networks for tests: small enough for dense Hessians and brute force over every plan."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from hawq.models import register_model


class TinyMLP(nn.Module):
    def __init__(self, in_features: int = 8, hidden: int = 6, num_classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class TinyCNN(nn.Module):
    """conv-bn-relu, conv-relu, max-pool, residual add, linear: the pieces of the paper's networks."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, C, H, W)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.conv2(x)) + x
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@register_model
def tiny_mlp(in_features: int = 8, num_classes: int = 3, in_channels: int | None = None) -> nn.Module:
    return TinyMLP(in_features=in_features, num_classes=num_classes)


@register_model
def tiny_cnn(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    return TinyCNN(in_channels, num_classes)
