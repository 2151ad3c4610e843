"""Small helpers shared by test modules."""

from __future__ import annotations

import torch
from torch import nn

import sora_serve as ss


def perturb_adapter(model: nn.Module, name: str, scale: float = 0.05, seed: int = 0) -> None:
    """Move every parameter of adapter `name` away from its identity init (B = 0, d = 1, D = C)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in ss.adapted_layers(model):
            if name in layer.adapters:
                for p in layer.adapters[name].parameters():
                    p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def random_ids(vocab: int, batch: int = 3, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()
