"""Training diagnostics that make a diverging adapter visible while it trains.

Each method reports its own scalars (`Adapter.diagnostics` in `sora_serve/methods/`: Pre-Diag
|d - 1|; SORA also s_p, |C| + |D|, |C - D|, |K|_2 and |R^T R - I|_2). Here they are combined over
the adapted layers (max; min for s_p) into `<key>_max` / `s_p_min`, plus PEFT DoRA's
max |m / m0 - 1| (m starts at the row norms of W0), read from PEFT's parameters by name.
"""

from __future__ import annotations

import torch
from torch import nn

import sora_serve as ss

# PEFT stores DoRA's magnitude in `lora_magnitude_vector`, sora_serve's DoRA in `magnitude`.
MAGNITUDE_NAME = "magnitude"


def magnitude_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """DoRA magnitudes at init, by parameter name (empty for other methods)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if MAGNITUDE_NAME in n}


def adapter_diagnostics(model: nn.Module, magnitudes0: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max over layers of each adapter's diagnostics (min for s_p); keys absent where they do not apply."""
    per_key: dict[str, list[float]] = {}
    for _, layer in ss.adapted_layers(model):
        adapter = layer.adapters[layer.active_adapter] if layer.active_adapter in layer.adapters else None
        for key, value in ({} if adapter is None else adapter.diagnostics()).items():
            per_key.setdefault(key, []).append(value)
    out = {
        f"{k}_min" if k.startswith("s_p") else f"{k}_max": min(v) if k.startswith("s_p") else max(v)
        for k, v in per_key.items()
    }
    params = dict(model.named_parameters())
    if magnitudes0:
        out["m_over_m0_minus_1_max"] = max(
            (params[n].detach() / m0 - 1).abs().max().item() for n, m0 in magnitudes0.items()
        )
    return out
