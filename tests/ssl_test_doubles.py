"""Test doubles shared by the SSL engine and method tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyQuality(nn.Module):
    """g(cat([image, mask])) -> (B, 1) in [0, 1], the quality-predictor contract."""

    def __init__(self, in_channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 2, 3, padding=1)
        self.head = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.conv(x).mean(dim=(2, 3))))
