"""DoRA (Liu et al. 2024), inference form:

    y = g * (W0 x + s B A x) + b,   g = m / rownorm(W0 + s B A)

m (out,) is the learned magnitude, initialised to rownorm(W0). As in the DoRA paper and in
PEFT, the norm is treated as a constant for gradients. The bias is *not* scaled by g.

Serving needs g without W0 as a dense matrix (vLLM CPU keeps only a repacked W0). Per row,

    ||W0 + sBA||^2 = ||W0||^2 + 2 rowsum(sB * (W0 A^T)) + rowsum((sB (A A^T)) * sB)

where ||W0||^2 per row is recorded once per layer and W0 A^T is the layer's own GEMM on the r
rows of A: O(r * in * out), the cost of one LoRA matmul (`serving_factors_from_projections`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import AdapterConfig
from .base import Adapter, ServingFactors


class DoRA(Adapter):
    """Magnitude-direction decomposition. Parameters: lora_A, lora_B, magnitude (out,)."""

    method = "dora"
    param_roles = {**Adapter.param_roles, "magnitude": "magnitude"}

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
        return _factors(a, sb, g, bias, dtype)

    def serving_factors_from_projections(
        self,
        row_sq_norms: torch.Tensor,
        weight_a_t: torch.Tensor,
        bias: torch.Tensor | None,
        rows: slice | torch.Tensor = slice(None),
    ) -> ServingFactors:
        """The serving factors of output `rows` from ||W0||^2 per row (rows,) and W0 A^T (rows, r)
        alone, in float64. Equal to `serving_factors` up to rounding (tested to 1e-10)."""
        a, sb = self.scaled_lora(torch.float64)
        sb = sb[rows]
        norm_sq = row_sq_norms.double() + 2 * (sb * weight_a_t.double()).sum(1) + ((sb @ (a @ a.T)) * sb).sum(1)
        g = self.magnitude.detach().double()[rows] / norm_sq.clamp_min(0).sqrt()
        return _factors(a, sb, g, bias, torch.float64)


def _factors(
    a: torch.Tensor, sb: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> ServingFactors:
    """y = g * (W0 x + sBAx) + b = g * base + (1 - g) b + (x A^T)(g sB)^T."""
    shift = None if bias is None else (1 - g) * bias.detach().to(dtype)
    return ServingFactors(lora_A=a, lora_B=g[:, None] * sb, scale=g, bias_shift=shift)
