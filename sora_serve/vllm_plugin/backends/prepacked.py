"""One slot's packed factor as a thin GEMM operand, prepacked once by vLLM CPU's oneDNN handler.

The torch path's form at decode, where the fused native op (`fused.py`) does not run (fp32, a CPU
without AVX512-BF16, a rotated slot on column-parallel ranks). At decode a plugin layer's adapter
math is a few thin GEMMs (8 rows against ranks of 16-48). On such shapes torch's bf16 CPU matmul
costs 2-3x what the same GEMM costs with its weight prepacked once, the way vLLM CPU runs its own
linear layers (`vllm._custom_ops.create_onednn_mm`; Llama 2048 qkv at batch 8, 2-core Xeon, a
one-off hot-loop timing: shrink 33 -> 12 us, expand 39 -> 17 us plus the add; in an engine: `python
-m benchmarks.adapter_cost`).
So each slot's factors are prepacked, once per slot write, the first time a decode-sized batch
runs them alone (docs/benchmarks/serving.md has the decode-step profile before and after). Cost:
a second copy of such a slot's packed factors (block-diagonal zeros included), and ~0.2 ms per
factor and layer, paid by that first step, not at slot entry: a slot whose tokens only ever run
with other slots' (the padded path) or in prefill-sized batches never prepacks, so an adapter
swapped in for a mixed wave costs a copy, not a repack.

oneDNN builds one kernel per number of rows the first time it sees it (1-6 ms), and keeps 32
per weight shape. So rows up to `MAX_PREPACKED_ROWS` = 32 (decode batches; on these shapes the
prepacked GEMM stays ahead up to 64 rows) take the prepacked GEMM, each row count built once and
never evicted; more rows (prefill, whose row counts vary every step and whose GEMMs are large
enough for torch's per-call cost not to matter) take torch's matmul on the same values. No bias
is passed to oneDNN: with and without one are two kernels, which would overflow those 32.
Without vLLM's oneDNN ops (another platform or build), torch's matmul does it all.
"""

from __future__ import annotations

import functools
import importlib
import threading

import torch

KERNELS_KEPT = 32  # row counts oneDNN keeps per weight shape (create_onednn_mm's cache size)
MAX_PREPACKED_ROWS = KERNELS_KEPT
# vLLM's oneDNN handlers share per-shape state that two threads must not use at once (seen: wrong
# sums from two tensor-parallel ranks run as threads of one process). vLLM runs one model thread
# per process, where this lock is never contended.
_ONEDNN = threading.Lock()


@functools.cache
def _onednn_ops():
    """vLLM CPU's prepacked oneDNN GEMM (create_onednn_mm, onednn_mm), or None where it has none:
    `vllm._cpu_ops` from 0.34, `vllm._custom_ops` before (compat.py lists both)."""
    for name in ("vllm._cpu_ops", "vllm._custom_ops"):
        try:
            ops = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(ops, "create_onednn_mm"):
            return ops if getattr(ops, "_supports_onednn", False) else None
    return None


def _prepack(weight: torch.Tensor):
    """vLLM's oneDNN handler holding `weight` (k, n) in its own layout, or None where it cannot."""
    ops = _onednn_ops() if weight.device.type == "cpu" else None
    if ops is None:
        return None
    try:
        with _ONEDNN:  # the handler copies the values in oneDNN's layout
            return ops.create_onednn_mm(weight, KERNELS_KEPT)
    except RuntimeError:  # a dtype this CPU's oneDNN cannot run: torch's matmul does it
        return None


def _prepacked_mm(handler, x: torch.Tensor) -> torch.Tensor:
    with _ONEDNN:
        return _onednn_ops().onednn_mm(handler, x, None)


class Factor:
    """`x @ weight` for a (k, n) factor of one slot: a view of the backend's packed buffers, which
    the slot keeps until it is written again (then its factors are built anew, so the prepacked
    copy, taken at first use, always holds the slot's current values)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    @functools.cached_property
    def handler(self):
        return _prepack(self.weight)

    def prepacked_for(self, x: torch.Tensor) -> bool:
        return x.shape[0] <= MAX_PREPACKED_ROWS and self.handler is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.prepacked_for(x):
            return _prepacked_mm(self.handler, x)
        return x @ self.weight

    def add_product(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y += x @ weight, in place."""
        if self.prepacked_for(x):
            return y.add_(self(x))
        return y.addmm_(x, self.weight)


class Expand:
    """y += p Bᵀ + q Vᵀ as one GEMM: [p q] against [Bᵀ; Vᵀ] (either part may be absent). These
    GEMMs' cost is their (tokens, out) output, not their rank: one GEMM and one pass over y in
    place of two of each (docs/benchmarks/serving.md). At decode the stacked factor is prepacked
    once (at first use, like `Factor`); past the prepacked row limit it is stacked per call from
    the buffers' views (r + k rows, small beside the tokens' activation), so no second torch copy
    is kept."""

    def __init__(self, bt: torch.Tensor | None, vt: torch.Tensor | None):
        self.parts = [w for w in (bt, vt) if w is not None]

    @functools.cached_property
    def handler(self):
        return _prepack(torch.cat(self.parts)) if self.parts else None

    def add_products(self, y: torch.Tensor, *inputs: torch.Tensor | None) -> None:
        inputs = [x for x in inputs if x is not None]
        if not inputs:
            return
        stacked = inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1)
        if y.shape[0] <= MAX_PREPACKED_ROWS and self.handler is not None:
            y.add_(_prepacked_mm(self.handler, stacked))
        else:
            y.addmm_(stacked, self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts))


class SlotOperands:
    """A slot's packed factors of one layer as GEMM operands, at its LoRA rank r and rotation rank
    k: Aᵀ, U, BᵀU (k x r, so the rotation's projection needs no pass over z + p Bᵀ) and [Bᵀ; Vᵀ].
    The three steps of `ServingFactors` on these tokens, z being scale * base + shift in place:

        p = x Aᵀ;  q = z U + p (BᵀU);  z += p Bᵀ + q Vᵀ     (= z + p Bᵀ + ((z + p Bᵀ) U) Vᵀ)
    """

    def __init__(self, a, bt, u, vt, btu, r: int, k: int):
        self.a_t = Factor(a[:r].T) if r else None
        self.u = Factor(u[:, :k]) if k else None
        self.btu = Factor(btu[:r, :k]) if r and k else None
        self.expand = Expand(bt[:r] if r else None, vt[:k] if k else None)

    def shrink(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.a_t is None else self.a_t(x)

    def project(self, z: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor | None:
        if self.u is None:
            return None
        q = self.u(z)
        if self.btu is not None:
            self.btu.add_product(q, p)
        return q

    def add_expansions(self, z: torch.Tensor, p: torch.Tensor | None, q: torch.Tensor | None) -> None:
        self.expand.add_products(z, p, q)
