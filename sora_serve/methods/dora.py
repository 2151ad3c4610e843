"""DoRA (Liu et al. 2024), inference form:

    y = g * (W0 x + s B A x) + b,   g = m / rownorm(W0 + s B A)

m (out,) is the learned magnitude, initialised to rownorm(W0). As in the DoRA paper and in
PEFT, the norm is treated as a constant for gradients. The bias is *not* scaled by g.

Serving needs g without W0 as a dense matrix (vLLM CPU keeps only a repacked W0). Per row,

    ||W0 + sBA||^2 = ||W0||^2 + 2 rowsum(sB * (W0 A^T)) + rowsum((sB (A A^T)) * sB)

where ||W0||^2 per row is recorded once per layer and W0 A^T is the layer's own GEMM on the r
rows of A: O(r * in * out), the cost of one LoRA matmul. `serving_factors` uses this form
everywhere (a `BaseView` answers both questions), so the plugin's factors are the eager ones.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import AdapterConfig
from .base import Adapter, BaseView, ServingFactors


class DoRA(Adapter):
    """Magnitude-direction decomposition. Parameters: lora_A, lora_B, magnitude (out,)."""

    method = "dora"
    peft_type, peft_layout = "LORA", True  # PEFT's LoRA layout with use_dora
    file_names = {**Adapter.file_names, "magnitude": "lora_magnitude_vector"}
    param_roles = {**Adapter.param_roles, "magnitude": "magnitude"}
    reads_base_weight = True

    def __init__(self, in_features: int, out_features: int, config: AdapterConfig):
        super().__init__(in_features, out_features, config)
        self.magnitude = nn.Parameter(torch.ones(out_features))  # set from the base by init_from_base

    def init_from_base(self, base: BaseView) -> None:
        # Same expression as in `magnitude_scale`, so g == 1 exactly right after init.
        with torch.no_grad():
            self.magnitude.copy_(base.weight().detach().norm(dim=1))

    def magnitude_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """g = m / rownorm(W0 + s B A), with the norm detached (PEFT and the paper do the same)."""
        delta = (self.lora_B @ self.lora_A) * self.scaling
        norm = (weight + delta.to(weight.dtype)).norm(dim=1).detach()
        return self.magnitude / norm

    def forward(self, x, base_out, base):
        weight, bias = base.weight(), base.bias
        g = self.magnitude_scale(weight)
        base_no_bias = base_out if bias is None else base_out - bias
        if not isinstance(self.dropout, nn.Identity):  # PEFT recomputes W0 x on the dropped-out input
            base_no_bias = self.dropout(x) @ weight.T
            base_out = base_no_bias if bias is None else base_no_bias + bias
        return self.add_lora_term(base_out + (g - 1) * base_no_bias, x, row_scale=g)

    def serving_factors(self, base, dtype=torch.float64) -> ServingFactors:
        """g of rows `base.rows` from ||W0||^2 per row and W0 A^T alone (the formula above), in
        float64, then cast: no dense W0 is needed, so eager, fold, ONNX and vLLM share one path."""
        a, sb = self.scaled_lora(torch.float64)
        sb = sb[base.rows]
        cross = (sb * base.weight_times(a)).sum(1)
        norm_sq = base.row_sq_norms() + 2 * cross + ((sb @ (a @ a.T)) * sb).sum(1)
        g = self.magnitude.detach().double()[base.rows] / norm_sq.clamp_min(0).sqrt()
        return _factors(a, sb, g, base.bias).to(dtype)


def _factors(a: torch.Tensor, sb: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None) -> ServingFactors:
    """y = g * (W0 x + sBAx) + b = g * base + (1 - g) b + (x A^T)(g sB)^T."""
    shift = None if bias is None else (1 - g) * bias.detach().double()
    return ServingFactors(lora_A=a, lora_B=g[:, None] * sb, scale=g, bias_shift=shift)
