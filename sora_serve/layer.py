"""`AdaptedLayer`: a base linear layer plus any number of named adapters.

Wraps `nn.Linear` or transformers' GPT-2 `Conv1D` (weight stored in x out), with or without
bias. Modes, in order of precedence:
  - adapters disabled: the base layer alone;
  - per-row adapters (`row_adapters`, one name or None per batch row): a mixed batch, each
    group of rows computed once with its own adapter, rows with None left at the base output;
  - otherwise the active adapter, or the base output if none is active.

With `recompute_base` set (training), the layer runs under activation checkpointing: backward
recomputes W0 x and the adapter's forward from x instead of keeping their outputs, so Pre-Diag
(which needs W0 x for d's gradient) and SORA (also z for the rotation's) hold no more activations
than LoRA, for one more base GEMM per layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.pytorch_utils import Conv1D

from .errors import AdapterError
from .methods import Adapter, BaseView


def is_supported_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def stores_in_out(layer: nn.Module) -> bool:
    """Whether the layer keeps its weight as (in, out), GPT-2's Conv1D (PEFT's `fan_in_fan_out`): the
    one place that knows; everything else asks it or goes through `weight_out_in`."""
    return isinstance(layer, Conv1D)


def weight_out_in(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in): a view for a layer that stores it (in, out)."""
    return layer.weight.T if stores_in_out(layer) else layer.weight


class AdaptedLayer(nn.Module):
    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not is_supported_layer(base_layer):
            raise AdapterError(f"cannot adapt a {type(base_layer).__name__}; only nn.Linear and Conv1D")
        self.base_layer = base_layer
        self.fan_in_fan_out = stores_in_out(base_layer)
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.row_adapters: Sequence[str | None] | None = None
        self.adapters_disabled = False
        self.recompute_base = False

    @property
    def weight(self) -> torch.Tensor:
        """The base weight as (out, in), a view for Conv1D."""
        return weight_out_in(self.base_layer)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def base_view(self) -> BaseView:
        """What the adapters may read of the base layer (`sora_serve.methods.BaseView`)."""
        return BaseView(self.weight, self.bias)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def add_adapter(self, name: str, adapter: Adapter) -> None:
        if (adapter.out_features, adapter.in_features) != tuple(self.weight.shape):
            raise AdapterError(
                f"adapter '{name}' is {adapter.out_features}x{adapter.in_features}, "
                f"layer is {self.out_features}x{self.in_features}"
            )
        self.adapters[name] = adapter.to(device=self.weight.device, dtype=self.weight.dtype)

    def delete_adapter(self, name: str) -> None:
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute_base and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        base_out = self.base_layer(x)
        if self.adapters_disabled or not len(self.adapters):
            return base_out
        if self.row_adapters is not None:
            return self._mixed_batch(x, base_out)
        if self.active_adapter not in self.adapters:  # None, or an adapter not on this layer
            return base_out
        return self.adapters[self.active_adapter](x, base_out, self.base_view())

    def _mixed_batch(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        names = self.row_adapters
        if len(names) != x.shape[0]:
            raise AdapterError(f"{len(names)} adapter names for a batch of {x.shape[0]} rows")
        out = base_out.clone()
        for name in dict.fromkeys(n for n in names if n in self.adapters):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            out[rows] = self.adapters[name](x[rows], base_out[rows], self.base_view()).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active_adapter}"
