"""Per-slot state next to vLLM's `lora_a_stacked`/`lora_b_stacked`, and writing one slot.

vLLM keeps each linear LoRA layer's adapters in slot buffers (A, B per output slice). Our methods
also need an output scale, a bias shift and a low-rank rotation (`ServingFactors`): they live in
`SlotState`, allocated once per layer at engine start, and a slot is filled by copying factors
computed when the adapter was loaded (`activation.py`), never by recomputing them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sora_serve.methods import ServingFactors


@dataclass
class SlotState:
    """Per-layer, per-slot extras next to vLLM's lora_a/b_stacked (one tensor per output slice)."""

    scale: list[torch.Tensor]  # (max_loras, out_slice)
    shift: list[torch.Tensor]
    # U^T and V^T, (max_loras, max_lora_rank, out_slice): a rank-k slice is k contiguous rows, so
    # decode with many slots reads only the k x out values it uses (U is out x k in ServingFactors).
    rot_ut: list[torch.Tensor]
    rot_vt: list[torch.Tensor]
    rank: list[int] = field(default_factory=list)  # LoRA rank per slot (0: nothing to do)
    rot_rank: list[int] = field(default_factory=list)
    has_scale: list[bool] = field(default_factory=list)
    has_shift: list[bool] = field(default_factory=list)

    def clear_flags(self, index: int) -> None:
        self.rank[index] = self.rot_rank[index] = 0
        self.has_scale[index] = self.has_shift[index] = False


def slot_state(layer) -> SlotState:
    state = getattr(layer, "sora_slots", None)
    if state is None:
        parallel_kind(layer)  # refuses layer kinds the op does not cover, before any request runs
        max_loras, _, _, max_rank = layer.lora_b_stacked[0].shape
        dtype, device = layer.lora_b_stacked[0].dtype, layer.lora_b_stacked[0].device
        sizes = layer.output_slices
        state = SlotState(
            scale=[torch.ones(max_loras, n, dtype=dtype, device=device) for n in sizes],
            shift=[torch.zeros(max_loras, n, dtype=dtype, device=device) for n in sizes],
            rot_ut=[torch.zeros(max_loras, max_rank, n, dtype=dtype, device=device) for n in sizes],
            rot_vt=[torch.zeros(max_loras, max_rank, n, dtype=dtype, device=device) for n in sizes],
            rank=[0] * max_loras, rot_rank=[0] * max_loras, has_scale=[False] * max_loras, has_shift=[False] * max_loras,
        )
        layer.sora_slots = state
    return state


def parallel_kind(layer) -> str:
    """'column', 'row' or 'replicated': how tensor parallelism splits this layer (see docs/VLLM.md)."""
    from vllm.lora.layers import ColumnParallelLinearWithLoRA, ReplicatedLinearWithLoRA, RowParallelLinearWithLoRA

    lora_config = getattr(layer, "lora_config", None)
    if lora_config is not None and lora_config.fully_sharded_loras:
        raise NotImplementedError("sora-serve: fully_sharded_loras=True is not supported (its layers bypass the plugin's op)")
    if layer.tp_size == 1 or isinstance(layer, ReplicatedLinearWithLoRA):
        return "replicated"
    if isinstance(layer, ColumnParallelLinearWithLoRA):
        return "column"
    if isinstance(layer, RowParallelLinearWithLoRA):
        return "row"
    raise NotImplementedError(f"sora-serve: tensor parallelism for {type(layer).__name__} is not supported")


def fill_slot(layer, index: int, factors: list[ServingFactors | None]) -> None:
    """Copy an adapter's precomputed per-slice factors into slot `index` (None: slice not adapted)."""
    state = slot_state(layer)
    state.clear_flags(index)
    for i, f in enumerate(factors):
        layer.lora_a_stacked[i][index].zero_()
        layer.lora_b_stacked[i][index].zero_()
        _reset_extras(state, i, index)
        if f is not None:
            _write_slice(layer, state, i, index, f)


def fill_plain_lora_slot(layer, index: int, lora_weights) -> None:
    """vLLM already copied A/B; record the rank so the op skips the zero padding."""
    state = slot_state(layer)
    state.clear_flags(index)
    state.rank[index] = 0 if lora_weights is None else _max_rank(lora_weights)
    for i in range(len(layer.output_slices)):
        _reset_extras(state, i, index)  # the padded path reads them for every slot of its range


def _reset_extras(state: SlotState, i: int, index: int) -> None:
    """Identity extras for slice i of slot `index`: scale 1, shift 0, no rotation."""
    state.scale[i][index] = 1
    state.shift[i][index] = 0
    state.rot_ut[i][index].zero_()
    state.rot_vt[i][index].zero_()


def _max_rank(lora_weights) -> int:
    a = lora_weights.lora_a
    return max((t.shape[0] for t in a if t is not None), default=0) if isinstance(a, list) else a.shape[0]


def _write_slice(layer, state: SlotState, i: int, index: int, f: ServingFactors) -> None:
    r = f.lora_A.shape[0]
    layer.lora_a_stacked[i][index, 0, :r].copy_(f.lora_A)
    layer.lora_b_stacked[i][index, 0, :, :r].copy_(f.lora_B)
    state.rank[index] = max(state.rank[index], r)
    if f.scale is not None:
        state.scale[i][index].copy_(f.scale)
        state.has_scale[index] = True
    if f.bias_shift is not None:
        state.shift[i][index].copy_(f.bias_shift)
        state.has_shift[index] = True
    if f.rot_U is not None:
        k = f.rot_U.shape[1]
        state.rot_ut[i][index, :k].copy_(f.rot_U.T)
        state.rot_vt[i][index, :k].copy_(f.rot_V.T)
        state.rot_rank[index] = max(state.rot_rank[index], k)
