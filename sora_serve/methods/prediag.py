"""Pre-Diag (arXiv 2511.00051): a learned diagonal calibration of the base output plus LoRA:

    z = d * (W0 x + b) + s B A x,   d (out,) initialised to ones.

Equivalent to the weight diag(d) W0 + s B A and bias d * b; unlike DoRA there is no norm.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import AdapterConfig
from .base import Adapter, ServingFactors


class PreDiag(Adapter):
    """Parameters: lora_A (r x in), lora_B (out x r, init 0), d (out, init 1)."""

    method = "prediag"
    peft_type = "PREDIAG"
    file_names = {**Adapter.file_names, "d": "sora_d"}
    param_roles = {**Adapter.param_roles, "d": "diag"}

    def __init__(self, in_features: int, out_features: int, config: AdapterConfig):
        super().__init__(in_features, out_features, config)
        self.d = nn.Parameter(torch.ones(out_features))

    def forward(self, x, base_out, base):
        return self.add_lora_term(self.d * base_out, x)

    def diagnostics(self) -> dict[str, float]:
        return {"d_minus_1": (self.d.detach() - 1).abs().max().item()}  # d starts at 1

    def serving_factors(self, base, dtype=torch.float64) -> ServingFactors:
        a, b = self.scaled_lora(dtype)
        return ServingFactors(lora_A=a, lora_B=b, scale=self.d.detach().to(dtype)).select_rows(base.rows)
