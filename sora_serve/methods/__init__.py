"""The adapter methods, one module each, and their registry; `build_adapter` / `adapter_from_tensors` pick by name."""

from __future__ import annotations

import torch

from ..config import AdapterConfig
from .base import Adapter, BaseView, ServingFactors
from .dora import DoRA
from .lora import LoRA
from .prediag import PreDiag
from .sora import SORA, cayley_core, rotation_factors, scaled_generator

# The registry: a fifth method is one module defining an `Adapter` subclass plus one line here.
METHOD_CLASSES: dict[str, type[Adapter]] = {"lora": LoRA, "dora": DoRA, "prediag": PreDiag, "sora": SORA}


def tensor_shapes(config: AdapterConfig, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape for a layer of this size under `config`, built on the meta device."""
    with torch.device("meta"):
        module = METHOD_CLASSES[config.method](in_features, out_features, config)
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def build_adapter(config: AdapterConfig, base: BaseView) -> Adapter:
    """A fresh adapter for the layer `base` describes (its init may read the base: DoRA's m)."""
    adapter = METHOD_CLASSES[config.method](base.in_features, base.out_features, config)
    adapter.init_from_base(base)
    return adapter


def adapter_from_tensors(config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> Adapter:
    """The method's module holding copies of exactly `tensors` (their dtype and device kept, so a
    float64 file stays float64), no base needed."""
    out_features, in_features = tensors["lora_B"].shape[0], tensors["lora_A"].shape[1]
    adapter = METHOD_CLASSES[config.method](in_features, out_features, config)
    adapter.load_state_dict({k: v.detach().clone() for k, v in tensors.items()}, strict=True, assign=True)
    return adapter


__all__ = [
    "Adapter",
    "BaseView",
    "ServingFactors",
    "LoRA",
    "DoRA",
    "PreDiag",
    "SORA",
    "METHOD_CLASSES",
    "adapter_from_tensors",
    "build_adapter",
    "cayley_core",
    "rotation_factors",
    "scaled_generator",
    "tensor_shapes",
]
