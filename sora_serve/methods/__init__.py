"""The four adapter methods, one module each; `build_adapter` picks by name."""

from __future__ import annotations

import torch

from ..config import AdapterConfig
from .base import Adapter, ServingFactors
from .dora import DoRA
from .lora import LoRA
from .prediag import PreDiag
from .sora import SORA, cayley_core, rotation_factors, scaled_generator

METHOD_CLASSES: dict[str, type[Adapter]] = {"lora": LoRA, "dora": DoRA, "prediag": PreDiag, "sora": SORA}


def build_adapter(config: AdapterConfig, weight: torch.Tensor) -> Adapter:
    """A fresh adapter for a layer whose base weight is `weight` (out x in)."""
    out_features, in_features = weight.shape
    if config.method == "dora":
        return DoRA(in_features, out_features, config, weight)
    return METHOD_CLASSES[config.method](in_features, out_features, config)


__all__ = [
    "Adapter",
    "ServingFactors",
    "LoRA",
    "DoRA",
    "PreDiag",
    "SORA",
    "METHOD_CLASSES",
    "build_adapter",
    "cayley_core",
    "rotation_factors",
    "scaled_generator",
]
