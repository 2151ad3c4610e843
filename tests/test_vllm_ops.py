"""vLLM CPU's torch LoRA ops as the plugin replaces them: per-slot GEMMs, rows with slot -1 untouched.

Stock, they gather `weights[indices]` per token and -1 wraps to the last slot; the embedding and
logits LoRA layers still call them (linear layers use the plugin's own op)."""

from __future__ import annotations

import torch

from sora_serve.vllm_plugin import patches

SLOTS, RANK, IN, OUT = 3, 4, 16, 24
INDICES = torch.tensor([0, -1, 2, 1, -1, 2, 2])


def reference(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """float64 rows weights[i] @ x for i >= 0, zero rows for -1."""
    rows = [torch.zeros(weights.shape[2], dtype=torch.float64) if i < 0 else weights[i, 0].double() @ xi.double() for xi, i in zip(x, indices.tolist())]
    return torch.stack(rows)


def test_cpu_lora_ops_leave_base_rows_alone():
    patches.apply()
    from vllm.lora.punica_wrapper import punica_cpu

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(SLOTS, 1, RANK, IN, generator=gen)
    b = torch.randn(SLOTS, 1, OUT, RANK, generator=gen)
    x = torch.randn(len(INDICES), IN, generator=gen)
    base = torch.randn(len(INDICES), 2 * OUT, generator=gen)
    tol = dict(atol=1e-5, rtol=1e-5)  # float32 GEMMs against float64

    shrunk = torch.empty(len(INDICES), RANK)
    punica_cpu.bgmv_shrink(x, a, shrunk, INDICES, 0.5)
    assert torch.allclose(shrunk.double(), 0.5 * reference(x, a, INDICES), **tol)

    expanded = base[:, :OUT].clone()
    punica_cpu.bgmv_expand(shrunk, b, expanded, INDICES, add_inputs=True)
    assert torch.allclose(expanded.double(), base[:, :OUT].double() + reference(shrunk, b, INDICES), **tol)

    sliced = base.clone()
    punica_cpu.bgmv_expand_slice(shrunk, b, sliced, INDICES, OUT, OUT, add_inputs=True)
    assert torch.equal(sliced[:, :OUT], base[:, :OUT])
    assert torch.allclose(sliced[:, OUT:].double(), base[:, OUT:].double() + reference(shrunk, b, INDICES), **tol)
    base_rows = INDICES == -1
    assert torch.equal(expanded[base_rows], base[base_rows, :OUT]) and torch.equal(sliced[base_rows], base[base_rows])

    # Prefill form: one slot index per sequence, expanded to tokens through the patched bgmv ops.
    per_sequence, lengths = torch.tensor([2, -1, 0]), torch.tensor([3, 2, 2])
    prefill = torch.empty(len(INDICES), RANK)
    punica_cpu.sgmv_shrink(x, a, prefill, None, lengths, per_sequence, 3, 3, len(INDICES), 1.0)
    assert torch.allclose(prefill.double(), reference(x, a, per_sequence.repeat_interleave(lengths)), **tol)
