"""SORA (arXiv 2511.00051): Pre-Diag followed by a low-rank output rotation.

    z = d * (W0 x + b) + s B A x
    y = R z,   K = s_p (D C^T - C D^T),   s_p = min(1, s0 / (|C|_F + |D|_F + 1e-6))

C, D are (out x r_p). K is skew-symmetric of rank <= 2 r_p. With U = [C D] and
M = s_p [[0, -I], [I, 0]] we have K = U M U^T, and the two rotation modes are

    first_order:  R = I + K = I + U M U^T             (the paper's forward, exactly)
    cayley:       R = (I - K)^-1 (I + K) = I + U G U^T,   G = 2 M (I - U^T U M)^-1

The Cayley form follows from (I - U M U^T)^-1 = I + U M (I - U^T U M)^-1 U^T (Woodbury /
push-through); R is exactly orthogonal and only 2r_p x 2r_p systems are solved. Both modes
are served as y = z + (z U) V^T with V = U M or U G: no (out x out) tensor is ever built.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..config import AdapterConfig
from .base import ServingFactors, addmm_rows
from .prediag import PreDiag


def rotation_scale(c: torch.Tensor, d: torch.Tensor, s0: float) -> torch.Tensor:
    """s_p = min(1, s0 / (|C|_F + |D|_F + 1e-6)). It does not bound |K|: |D C^T - C D^T|_2 can reach
    (|C|_F + |D|_F)^2 / 2, so |K|_2 <= s0 (|C|_F + |D|_F) / 2 still grows with C and D. Cayley's R is
    orthogonal for any K; the first-order I + K amplifies by sqrt(1 + |K|_2^2) (training/diagnostics.py)."""
    return torch.clamp(s0 / (c.norm() + d.norm() + 1e-6), max=1.0)


def scaled_generator(c: torch.Tensor, d: torch.Tensor, s0: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s_p, U, M) with K = U M U^T, differentiable in c and d."""
    s_p = rotation_scale(c, d, s0)
    eye = torch.eye(c.shape[1], dtype=c.dtype, device=c.device)
    zero = torch.zeros_like(eye)
    m = s_p * torch.cat([torch.cat([zero, -eye], 1), torch.cat([eye, zero], 1)], 0)
    return s_p, torch.cat([c, d], dim=1), m


def cayley_core(u: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """H = M (I - U^T U M)^-1, so that (I - K)^-1 = I + U H U^T and the Cayley R = I + 2 U H U^T.

    The 2r_p x 2r_p system is solved in float32 at least: torch has no half/bfloat16 solve on CPU,
    and a bfloat16 model's rotation should not be rounded inside the inverse anyway."""
    dtype = torch.promote_types(m.dtype, torch.float32)
    u32, m32 = u.to(dtype), m.to(dtype)
    system = torch.eye(m.shape[0], dtype=dtype, device=m.device) - (u32.T @ u32) @ m32
    return torch.linalg.solve(system, m32, left=False).to(m.dtype)


def rotation_factors(c: torch.Tensor, d: torch.Tensor, s0: float, rotation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) with R = I + V U^T: the serving form of either rotation."""
    _, u, m = scaled_generator(c, d, s0)
    if rotation == "first_order":
        return u, u @ m
    if rotation == "cayley":
        return u, 2 * u @ cayley_core(u, m)
    raise ValueError(f"unknown rotation {rotation!r}")


def spectral_norm_of_product(u: torch.Tensor, core: torch.Tensor) -> float:
    """|u core u^T|_2 through a thin QR of u: a 2r_p x 2r_p problem, never out x out."""
    _, r = torch.linalg.qr(u)
    return torch.linalg.matrix_norm(r @ core @ r.T, ord=2).item()


def orthogonality_error(u: torch.Tensor, v: torch.Tensor) -> float:
    """|R^T R - I|_2 for R = I + V U^T: with [U V] = Q [a b] (QR),
    R^T R - I = Q (a b^T + b a^T + a (b^T b) a^T) Q^T."""
    _, r = torch.linalg.qr(torch.cat([u, v], dim=1))
    a, b = r[:, : u.shape[1]], r[:, u.shape[1] :]
    return torch.linalg.matrix_norm(a @ b.T + b @ a.T + a @ (b.T @ b) @ a.T, ord=2).item()


class SORA(PreDiag):
    """Parameters: lora_A, lora_B, d (from Pre-Diag), sora_C, sora_D (out x r_p).

    Init as the paper's code: C kaiming-uniform (fan_out), D = C, so K = 0 and the adapted
    layer starts equal to the base while both C and D get gradients.
    """

    method = "sora"
    peft_type = "SORA"
    file_names = {**PreDiag.file_names, "sora_C": "sora_C", "sora_D": "sora_D"}
    param_roles = {**PreDiag.param_roles, "sora_C": "rotation", "sora_D": "rotation"}

    def __init__(self, in_features: int, out_features: int, config: AdapterConfig):
        super().__init__(in_features, out_features, config)
        self.s0 = config.s0
        self.rotation = config.rotation
        c = torch.empty(out_features, config.r_p)
        nn.init.kaiming_uniform_(c, a=math.sqrt(5), mode="fan_out")
        self.sora_C = nn.Parameter(c)
        self.sora_D = nn.Parameter(c.clone())

    def rotate(self, z: torch.Tensor) -> torch.Tensor:
        """R z for row vectors z, as one rank-2r_p shrink and one fused expand-and-add GEMM.

        K z = s_p (z C D^T - z D C^T) is rewritten with E = z (C - D) as
        K z = [z C, E] (s_p [D - C, C])^T, which is exactly 0 while C == D (at init): both
        halves multiply an exact zero, so a fresh adapter leaves the base bit-exact.
        Cayley: R z = z + 2 (I - K)^-1 K z = z + 2 k + 2 ((k U) H^T) U^T with k = K z = q w^T,
        so R z = z + q (2 w^T + 2 ((w^T U) H^T) U^T): the factor is 2r_p x out, never out x out."""
        c, d = self.sora_C.to(z.dtype), self.sora_D.to(z.dtype)
        # Both thin factors are built as contiguous (2 r_p, out) matrices: CPU GEMMs with a
        # row-major 2r_p x out operand run 2-3x faster than with out x 2r_p, forward and backward.
        q = F.linear(z, torch.cat([c.T, (c - d).T]))  # (..., 2 r_p): the only read of z
        if self.rotation == "first_order":
            return addmm_rows(z, q, rotation_scale(c, d, self.s0) * torch.cat([(d - c).T, c.T]))  # K z = q w^T
        s_p, u, m = scaled_generator(c, d, self.s0)
        w_t = s_p * torch.cat([(d - c).T, c.T])
        return addmm_rows(z, q, 2 * (w_t + ((w_t @ u) @ cayley_core(u, m).T) @ u.T))

    def forward(self, x, base_out, base):
        return self.rotate(super().forward(x, base_out, base))

    def diagnostics(self) -> dict[str, float]:
        """Besides |d - 1|: s_p, |C|_F + |D|_F, |C - D|_F, |K|_2 and |R^T R - I|_2. The first-order
        R = I + K has R^T R = I + K^T K (K skew): it amplifies by up to sqrt(1 + |K|_2^2). Cayley's R
        is orthogonal for any K (error ~1e-15)."""
        c, d = (p.detach().double() for p in (self.sora_C, self.sora_D))
        s_p, u, m = scaled_generator(c, d, self.s0)
        return {
            **super().diagnostics(),
            "s_p": s_p.item(),
            "norm_C_plus_D": (c.norm() + d.norm()).item(),
            "norm_C_minus_D": (c - d).norm().item(),
            "K_norm": spectral_norm_of_product(u, m),
            "orth_error": orthogonality_error(*rotation_factors(c, d, self.s0, self.rotation)),
        }

    def serving_factors(self, base, dtype=torch.float64) -> ServingFactors:
        a, b = self.scaled_lora(dtype)
        c, d = (p.detach().to(dtype) for p in (self.sora_C, self.sora_D))
        u, v = rotation_factors(c, d, self.s0, self.rotation)
        factors = ServingFactors(lora_A=a, lora_B=b, scale=self.d.detach().to(dtype), rot_U=u, rot_V=v)
        return factors.select_rows(base.rows)
