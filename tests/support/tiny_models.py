"""Tiny models every test suite shares, and a helper to export them as `.pt2` programs."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.export import Dim


class TinyMLP(nn.Module):
    """Two Linear layers and a classifier: one float input, one output (logits)."""

    def __init__(self, features: int = 32, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TinyConvNet(nn.Module):
    """Two 3x3 convs and a Linear head over 1x12x12 images."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.head = nn.Linear(32 * 6 * 6, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(image))))
        return self.head(h.flatten(1))


class TinyTextEncoder(nn.Module):
    """Token ids and an attention mask in (int64); pooled logits and hidden states out."""

    def __init__(self, vocab: int = 64, dim: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.mlp_in = nn.Linear(dim, 4 * dim)
        self.mlp_out = nn.Linear(4 * dim, dim)
        self.classifier = nn.Linear(dim, classes)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(input_ids)
        mask = attention_mask.unsqueeze(1).to(h.dtype)  # (b, 1, t)
        scores = self.query(h) @ self.key(h).transpose(1, 2) / h.shape[-1] ** 0.5
        scores = scores.masked_fill(mask == 0, -1e4)
        h = h + torch.softmax(scores, dim=-1) @ self.value(h)
        h = h + self.mlp_out(torch.relu(self.mlp_in(h)))
        weights = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.classifier(pooled), h


def example_inputs(model: nn.Module, batch: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Return example inputs for one of the tiny models, by input name."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, TinyMLP):
        return {"x": torch.randn(batch, model.fc1.in_features, generator=g)}
    if isinstance(model, TinyConvNet):
        return {"image": torch.randn(batch, 1, 12, 12, generator=g)}
    if isinstance(model, TinyTextEncoder):
        ids = torch.randint(0, model.embed.num_embeddings, (batch, 8), generator=g)
        mask = torch.ones(batch, 8, dtype=torch.int64)
        mask[:, 6:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    raise TypeError(f"no example inputs for {type(model).__name__}")


def export_pt2(model: nn.Module, inputs: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Export `model` with a dynamic batch dimension and save it to `path` (a `.pt2`)."""
    model = model.eval()
    batch = Dim("batch", min=1, max=65536)
    program = torch.export.export(
        model, (), kwargs=inputs, dynamic_shapes={name: {0: batch} for name in inputs}
    )
    torch.export.save(program, str(path))
    return Path(path)


MODEL_CLASSES = {"mlp": TinyMLP, "conv": TinyConvNet, "text": TinyTextEncoder}


def make_pt2(kind: str, path: str | Path, seed: int = 0) -> Path:
    """Build the tiny model named `kind` ('mlp', 'conv', 'text') with `seed` and export it."""
    torch.manual_seed(seed)
    model = MODEL_CLASSES[kind]()
    return export_pt2(model, example_inputs(model), path)
