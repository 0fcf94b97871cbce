"""The digits example: a small CNN on scikit-learn's bundled 8x8 handwritten digits."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

NUM_CLASSES = 10


class DigitsCNN(nn.Module):
    """Three 3x3 convs, one 2x2 max-pool and a two-layer head over 1x8x8 images in [0, 1]."""

    def __init__(self, classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, 128)
        self.head = nn.Linear(128, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(image))))
        h = torch.relu(self.conv3(nn.functional.max_pool2d(h, 2)))
        return self.head(torch.relu(self.fc(h.flatten(1))))


def load_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (train images, train labels, test images, test labels): a fixed stratified 80/20 split.

    Images are float32 (N, 1, 8, 8) scaled from the data set's 0..16 to [0, 1].
    """
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train, test = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.2, random_state=seed, stratify=digits.target
    )
    return images[train], labels[train], images[test], labels[test]
