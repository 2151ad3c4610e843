"""Training diagnostics that make a diverging adapter visible while it trains.

For every adapted layer (max over layers; min for s_p):

- SORA: s_p, |C|_F + |D|_F, |C - D|_F, the generator's spectral norm |K|_2 with
  K = s_p (D C^T - C D^T), and the rotation's orthogonality error |R^T R - I|_2.
  The first-order R = I + K has R^T R = I + K^T K (K is skew), so its singular values are
  sqrt(1 + sigma_i(K)^2) >= 1: every layer *amplifies* by up to sqrt(1 + |K|^2). Cayley's R
  is orthogonal for any K (error ~1e-15).
- Pre-Diag / SORA: max |d - 1| (d starts at 1).
- DoRA (PEFT): max |m / m0 - 1| (m starts at the row norms of W0).

All small linear algebra: with R = I + V U^T and [U V] = Q [a b] (QR),
R^T R - I = Q (a b^T + b a^T + a (b^T b) a^T) Q^T, a 2k x 2k problem, never out x out.
"""

from __future__ import annotations

import torch
from torch import nn

import sora_serve as ss
from sora_serve.methods.sora import SORA, rotation_factors, scaled_generator

# PEFT stores DoRA's magnitude in `lora_magnitude_vector`, sora_serve's DoRA in `magnitude`.
MAGNITUDE_NAME = "magnitude"


def spectral_norm_of_product(u: torch.Tensor, core: torch.Tensor) -> float:
    """|u core u^T|_2 through a thin QR of u."""
    _, r = torch.linalg.qr(u)
    return torch.linalg.matrix_norm(r @ core @ r.T, ord=2).item()


def orthogonality_error(u: torch.Tensor, v: torch.Tensor) -> float:
    """|R^T R - I|_2 for R = I + V U^T."""
    _, r = torch.linalg.qr(torch.cat([u, v], dim=1))
    a, b = r[:, : u.shape[1]], r[:, u.shape[1] :]
    return torch.linalg.matrix_norm(a @ b.T + b @ a.T + a @ (b.T @ b) @ a.T, ord=2).item()


def sora_layer_diagnostics(adapter: SORA) -> dict[str, float]:
    c, d = (p.detach().double() for p in (adapter.sora_C, adapter.sora_D))
    s_p, u, m = scaled_generator(c, d, adapter.s0)
    return {
        "s_p": s_p.item(),
        "norm_C_plus_D": (c.norm() + d.norm()).item(),
        "norm_C_minus_D": (c - d).norm().item(),
        "K_norm": spectral_norm_of_product(u, m),
        "orth_error": orthogonality_error(*rotation_factors(c, d, adapter.s0, adapter.rotation)),
    }


def magnitude_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """DoRA magnitudes at init, by parameter name (empty for other methods)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if MAGNITUDE_NAME in n}


def adapter_diagnostics(model: nn.Module, magnitudes0: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max over layers of each quantity above (min for s_p); keys absent where they do not apply."""
    layers: list[dict[str, float]] = []
    d_dev = []
    for _, layer in ss.adapted_layers(model):
        adapter = layer.adapters[layer.active_adapter] if layer.active_adapter in layer.adapters else None
        if isinstance(adapter, SORA):
            layers.append(sora_layer_diagnostics(adapter))
        if hasattr(adapter, "d"):
            d_dev.append((adapter.d.detach() - 1).abs().max().item())
    out: dict[str, float] = {}
    if layers:
        out["s_p_min"] = min(x["s_p"] for x in layers)
        for key in ("norm_C_plus_D", "norm_C_minus_D", "K_norm", "orth_error"):
            out[f"{key}_max"] = max(x[key] for x in layers)
    if d_dev:
        out["d_minus_1_max"] = max(d_dev)
    params = dict(model.named_parameters())
    if magnitudes0:
        out["m_over_m0_minus_1_max"] = max(
            (params[n].detach() / m0 - 1).abs().max().item() for n, m0 in magnitudes0.items()
        )
    return out
