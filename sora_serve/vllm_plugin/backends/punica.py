"""The portable backend: vLLM's punica-wrapper API and gathers by slot, nothing else.

For a layer with output slices i (qkv: 3) and tokens t with slot s(t) (-1: no adapter):

    out_i[t] = scale_i[s(t)] * out_i[t] + shift_i[s(t)]       (row -1 of scale/shift is the identity)
    out     += (x A_sᵀ) B_sᵀ                                   (punica add_lora_linear, vLLM's own op)
    p_i      = z_i U_i[s]                                       (punica add_shrink on z_i, one per slice)
    out_i   += p_i V_i[s]ᵀ                                      (punica add_expand, all slices)

The punica kernels skip tokens of slot -1 (CPU: the mended torch ops in `cpu_ops.py`), so base
rows stay base. Every shape is fixed by the batch size and every decision by the layer, never by
the tokens' slots: no `.item()`, `.tolist()` or data-dependent branch, which is what CUDA-graph
capture and `torch.compile(fullgraph=True)` need. All terms run for every token, adapter or not:
with static shapes there is nothing to skip cheaply, and the extra work is rank-sized.

Column-parallel layers hold some output rows: (z U) is summed over ranks (one all-reduce of
tokens x rank values per slice) before the expand. Row-parallel layers hold partial sums that vLLM
reduces after the op; R is linear, so rotating each partial is exact.
"""

from __future__ import annotations

import torch

from .. import isolation
from ..layers import parallel_kind


def apply(layer, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    wrapper = layer.punica_wrapper
    slots = wrapper.token_lora_indices[: output.shape[0]]
    _scale_and_shift(layer, output, slots)
    wrapper.add_lora_linear(output, x, layer.lora_a_stacked, layer.lora_b_stacked, 1.0, layer.output_slices)
    _rotate(layer, wrapper, output)
    isolation.quarantine_rows(output, isolation.token_masks(slots, layer.sora_failed), layer.sora_failed)
    return output


def _scale_and_shift(layer, output: torch.Tensor, slots: torch.Tensor) -> None:
    """In place, slice by slice: index -1 picks the last row, the identity (see layers.py)."""
    for part, scale, shift in zip(output.split(layer.output_slices, dim=1), layer.sora_scale, layer.sora_shift):
        part.mul_(scale[slots]).add_(shift[slots])


def _rotate(layer, wrapper, output: torch.Tensor) -> None:
    """out_i += (z_i U_i) V_iᵀ for every slice: the projections first (they read z), then the expand."""
    max_rank = layer.sora_rot_u[0].shape[2]
    projections = torch.zeros(
        len(layer.output_slices), output.shape[0], max_rank, dtype=torch.float32, device=output.device
    )
    for i, (part, u) in enumerate(zip(output.split(layer.output_slices, dim=1), layer.sora_rot_u)):
        wrapper.add_shrink(projections[i : i + 1], part.contiguous(), (u,), 1.0)
    if parallel_kind(layer) == "column":
        from vllm.distributed import tensor_model_parallel_all_reduce

        projections = tensor_model_parallel_all_reduce(projections)
    wrapper.add_expand(output, projections, layer.sora_rot_v, layer.output_slices, offset_start=0, add_inputs=True)


def allocate(layer, max_loras: int, max_rank: int) -> None:
    """Nothing beyond the layer's per-slice buffers: vLLM's kernels read those."""


def pack_slot(layer, index: int, ranks: list[int], rot_ranks: list[int]) -> None:
    """Nothing to pack: vLLM's kernels read the per-slice buffers."""
