"""A small CNN digit classifier: the feature space for the quality metrics (our stand-in for Inception).

No Inception weights can be downloaded here, so the Fréchet and kernel distances of ``benchmarks/quality.py``
are measured in the 128-d penultimate features of this network, trained by ``examples/train_tiny_dit.py`` on
the same digits as the DiT. Its held-out accuracy is in the model card.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DigitClassifier(nn.Module):
    feature_dim = 128

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.GELU(),
        )
        self.features_head = nn.Linear(64 * 7 * 7, self.feature_dim)
        self.logits_head = nn.Linear(self.feature_dim, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations for images in [-1, 1], shape (B, 1, 28, 28)."""
        return F.gelu(self.features_head(self.conv(images).flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_head(self.features(images))
