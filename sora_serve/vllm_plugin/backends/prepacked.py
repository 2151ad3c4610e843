"""One slot's packed factor as a thin GEMM operand, prepacked once by vLLM CPU's oneDNN handler.

At decode a plugin layer's adapter math is a few thin GEMMs (8 rows against ranks of 16-48).
On such shapes torch's bf16 CPU matmul costs 2-3x what the same GEMM costs with its weight
prepacked once, the way vLLM CPU runs its own linear layers (`vllm._custom_ops.create_onednn_mm`;
Llama 2048 qkv at batch 8, 2-core Xeon, a one-off hot-loop timing: shrink 33 -> 12 us, expand
39 -> 17 us plus the add; in an engine: `python -m benchmarks.adapter_cost`).
So each slot's factors are prepacked when the slot is written (docs/benchmarks/serving.md has
the decode-step profile before and after). Cost: a second copy of each filled slot's packed
factors (block-diagonal zeros included), and ~0.3 ms per factor and layer at slot entry.

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


class Factor:
    """`x @ weight` for a (k, n) factor of one slot: a view of the backend's packed buffers, which
    the slot keeps until it is written again (then its factors are built anew)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self._ops = _onednn_ops() if weight.device.type == "cpu" else None
        self.handler = None
        if self._ops is not None:
            try:
                with _ONEDNN:  # the handler copies the values in oneDNN's layout
                    self.handler = self._ops.create_onednn_mm(weight, KERNELS_KEPT)
            except RuntimeError:  # a dtype this CPU's oneDNN cannot run: torch's matmul does it
                self.handler = None

    def prepacked_for(self, x: torch.Tensor) -> bool:
        return self.handler is not None and x.shape[0] <= MAX_PREPACKED_ROWS

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.prepacked_for(x):
            with _ONEDNN:
                return self._ops.onednn_mm(self.handler, x, None)
        return x @ self.weight

    def add_product(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y += x @ weight, in place."""
        if self.prepacked_for(x):
            return y.add_(self(x))
        return y.addmm_(x, self.weight)


class SlotOperands:
    """A slot's packed factors of one layer as GEMM operands: Aᵀ and Bᵀ at its LoRA rank r, U and
    Vᵀ at its rotation rank k (None where the rank is 0)."""

    def __init__(self, a: torch.Tensor, bt: torch.Tensor, u: torch.Tensor, vt: torch.Tensor, r: int, k: int):
        self.a_t = Factor(a[:r].T) if r else None
        self.bt = Factor(bt[:r]) if r else None
        self.u = Factor(u[:, :k]) if k else None
        self.vt = Factor(vt[:k]) if k else None
