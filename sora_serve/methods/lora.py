"""LoRA (Hu et al. 2021):  y = W0 x + b + s B A x,  s = lora_alpha / r."""

from __future__ import annotations

import torch

from .base import Adapter, ServingFactors


class LoRA(Adapter):
    """Low-rank update on the input side. Parameters: lora_A (r x in), lora_B (out x r, init 0)."""

    method = "lora"
    peft_type, peft_layout = "LORA", True
    changes_base_output = False

    def forward(self, x, base_out, base):
        return self.add_lora_term(base_out, x)

    def serving_factors(self, base, dtype=torch.float64) -> ServingFactors:
        a, b = self.scaled_lora(dtype)
        return ServingFactors(lora_A=a, lora_B=b).select_rows(base.rows)
