"""DoRA (Liu et al. 2024), inference form:

    y = g * (W0 x + s B A x) + b,   g = m / rownorm(W0 + s B A)

m (out,) is the learned magnitude, initialised to rownorm(W0). As in the DoRA paper and in
PEFT, the norm is treated as a constant for gradients. The bias is *not* scaled by g.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import AdapterConfig
from .base import Adapter, ServingFactors


class DoRA(Adapter):
    """Magnitude-direction decomposition. Parameters: lora_A, lora_B, magnitude (out,)."""

    method = "dora"

    def __init__(self, in_features: int, out_features: int, config: AdapterConfig, weight: torch.Tensor):
        super().__init__(in_features, out_features, config)
        # Same expression as in `magnitude_scale`, so g == 1 exactly right after init.
        self.magnitude = nn.Parameter(weight.detach().norm(dim=1))

    def magnitude_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """g = m / rownorm(W0 + s B A), with the norm detached (PEFT and the paper do the same)."""
        delta = (self.lora_B @ self.lora_A) * self.scaling
        norm = (weight + delta.to(weight.dtype)).norm(dim=1).detach()
        return self.magnitude / norm

    def forward(self, x, base_out, weight, bias):
        g = self.magnitude_scale(weight)
        base_no_bias = base_out if bias is None else base_out - bias
        if not isinstance(self.dropout, nn.Identity):  # PEFT recomputes W0 x on the dropped-out input
            base_no_bias = self.dropout(x) @ weight.T
            base_out = base_no_bias if bias is None else base_no_bias + bias
        return self.add_lora_term(base_out + (g - 1) * base_no_bias, x, row_scale=g)

    def serving_factors(self, weight, bias, dtype=torch.float64) -> ServingFactors:
        w = weight.detach().to(dtype)
        a, sb = self.scaled_lora(dtype)
        g = self.magnitude.detach().to(dtype) / (w + sb @ a).norm(dim=1)
        shift = None if bias is None else (1 - g) * bias.detach().to(dtype)
        return ServingFactors(lora_A=a, lora_B=g[:, None] * sb, scale=g, bias_shift=shift)
