"""The op: every token with its slot's `ServingFactors`, all slots of a step in batched GEMMs.

Replaces `BaseLinearLayerWithLoRA._apply_lora_to_output`. Tokens are grouped by slot once per
step (the plan, shared by every layer); every slot present runs `ServingFactors.apply` over a
padded (slots, tokens per slot) layout that reads each slot's factors once (one GEMM per slot
when padding would more than double the work). Slot -1 (no adapter) is left at the base output;
vLLM CPU's stock ops index weights[-1], the last slot, instead. Rows of adapter tokens that are not
finite after the op are zeroed and their slot reported (`isolation.py`), so nothing non-finite
from an adapter reaches the KV cache or the next layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sora_serve.methods import ServingFactors

from .isolation import quarantine_rows
from .slots import SlotState, parallel_kind, slot_state


class BatchPlan(NamedTuple):
    """Where this step's adapter tokens go, computed once per step and shared by every layer.

    The padded layout has one row of `width` positions per slot of the range lo..hi of slots
    present, so each slot's factors are a view of vLLM's stacked buffers, never copied. `gather`
    is the token row of each position (padding repeats a real row; its results are dropped),
    `keep` the positions of real tokens in `rows` order (None when nothing is padded)."""

    slots: list[int]  # slots present (>= 0), ascending
    counts: list[int]  # tokens per slot
    rows: torch.Tensor | None  # token rows with an adapter, grouped by slot; None: the whole batch, one slot
    gather: torch.Tensor | None
    keep: torch.Tensor | None
    width: int  # the most tokens any slot has

    @property
    def slot_range(self) -> slice:
        return slice(self.slots[0], self.slots[-1] + 1)

    @property
    def balanced(self) -> bool:
        """Padding at most doubles the work: worth it to run every slot in one batched GEMM."""
        return (self.slots[-1] - self.slots[0] + 1) * self.width <= 2 * sum(self.counts)


def batch_plan(punica_wrapper, n_tokens: int) -> BatchPlan:
    """The step's plan, cached on the wrapper while the token indices stay the same. Compared by
    value: vLLM rewrites them in place in a persistent buffer, and not every path bumps the
    tensor's version counter (tensor-parallel workers gave stale plans when keyed on it)."""
    indices = punica_wrapper.token_lora_indices[:n_tokens]
    cached = getattr(punica_wrapper, "sora_plan", None)
    if cached is None or cached[0].shape != indices.shape or not torch.equal(cached[0], indices):
        cached = punica_wrapper.sora_plan = (indices.clone(), make_plan(indices))
    return cached[1]


def make_plan(indices: torch.Tensor) -> BatchPlan:
    slots, counts = torch.unique(indices, return_counts=True)
    slots, counts = slots[slots >= 0], counts[slots >= 0]
    slot_list, count_list = slots.tolist(), counts.tolist()
    n_adapted, width = sum(count_list), max(count_list, default=0)
    if len(slot_list) == 1 and n_adapted == indices.shape[0]:
        return BatchPlan(slot_list, count_list, None, None, None, width)
    rows = torch.argsort(indices, stable=True)[indices.shape[0] - n_adapted :]  # slot -1 sorts first
    if not slot_list:
        return BatchPlan(slot_list, count_list, rows, None, None, width)
    # Every slot of the range gets `width` positions; position p of slot s reads the token at
    # rows[start(s) + min(p, count(s) - 1)]; slots absent from the batch read rows[0].
    n_range = slot_list[-1] - slot_list[0] + 1
    range_counts = torch.zeros(n_range, dtype=torch.long, device=indices.device)
    range_counts[slots - slot_list[0]] = counts
    starts = torch.cumsum(range_counts, 0) - range_counts
    position = torch.arange(width, device=indices.device)
    source = torch.where(range_counts[:, None] > 0, starts[:, None] + torch.minimum(position, range_counts[:, None] - 1), 0)
    gather = rows.index_select(0, source.reshape(-1))
    keep = None
    if n_range * width != n_adapted:
        slot_of_token = (slots - slot_list[0]).repeat_interleave(counts)
        rank_in_slot = torch.arange(n_adapted, device=indices.device) - (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
        keep = slot_of_token * width + rank_in_slot
    return BatchPlan(slot_list, count_list, rows, gather, keep, width)


class TokenGroup(NamedTuple):
    """Rows of the batch computed together, and their outputs per slice before the rotation."""

    rows: torch.Tensor | None  # output rows this group writes; None: the whole batch
    z: list[torch.Tensor]  # per slice: scale * base + shift + (x A^T) B^T; (tokens, out), or (slots, width, out) padded
    rotation: list[tuple[torch.Tensor, torch.Tensor]] | None  # per slice (U, V): 2-D for one slot, 3-D per slot when padded
    keep: torch.Tensor | None = None  # padded: the positions that are real tokens


def grouped_adapter_op(layer, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """ServingFactors.apply for every token with its slot's factors; slot -1 (no adapter) stays base.

    All slots present run at once, as batched GEMMs over a padded (slots, tokens per slot) layout
    that reads each slot's factors once; when padding would more than double the work (uneven
    prefill), each slot runs on its own tokens instead."""
    original_shape = output.shape if output.ndim == 3 else None
    if x.ndim == 3 and output.ndim == 3:
        output, x = output.flatten(0, 1), x.flatten(0, 1)
    state = slot_state(layer)
    plan = batch_plan(layer.punica_wrapper, x.shape[0])
    if any(state.rank[s] or state.has_scale[s] or state.rot_rank[s] for s in plan.slots):  # else: all base
        if plan.rows is None:
            groups = [_slot_group(layer, state, plan.slots[0], None, x, output)]
        elif plan.balanced and layer.tp_size == 1:  # TP > 1 mismatched eager with it: per slot there
            groups = [_padded_group(layer, state, plan, x, output)]
        else:
            groups = [_slot_group(layer, state, s, rows, x, output) for s, rows in zip(plan.slots, plan.rows.split(plan.counts))]
        _rotate(layer, groups)
        for group in groups:
            output = _write_group(output, group)
    if plan.slots:
        quarantine_rows(output, layer.punica_wrapper.token_lora_indices[: output.shape[0]])
    return output if original_shape is None else output.reshape(original_shape)


def _write_group(output: torch.Tensor, group: TokenGroup) -> torch.Tensor:
    z = group.z[0] if len(group.z) == 1 else torch.cat(group.z, dim=-1)
    z = z.reshape(-1, z.shape[-1])
    if group.keep is not None:
        z = z.index_select(0, group.keep)
    return z if group.rows is None else output.index_copy_(0, group.rows, z)


def _slot_group(layer, state: SlotState, slot: int, rows: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor) -> TokenGroup:
    """One slot on its tokens (`rows`; None: the whole batch), one GEMM per factor at its own rank."""
    if rows is not None:
        x, y = x.index_select(0, rows), y.index_select(0, rows)
    r, k = state.rank[slot], state.rot_rank[slot]
    z, offset = [], 0
    for i, size in enumerate(layer.output_slices):
        factors = ServingFactors(
            lora_A=layer.lora_a_stacked[i][slot, 0, :r],
            lora_B=layer.lora_b_stacked[i][slot, 0, :, :r],
            scale=state.scale[i][slot] if state.has_scale[slot] else None,
            bias_shift=state.shift[i][slot] if state.has_shift[slot] else None,
        )  # the rotation is applied by _rotate, across ranks
        z.append(factors.apply(x, y[:, offset : offset + size]))
        offset += size
    rotation = [(state.rot_ut[i][slot, :k].T, state.rot_vt[i][slot, :k].T) for i in range(len(z))] if k else None
    return TokenGroup(rows, z, rotation)


def _padded_group(layer, state: SlotState, plan: BatchPlan, x: torch.Tensor, y: torch.Tensor) -> TokenGroup:
    """Every slot at once: (slots, width, in) tokens against each slot's factors (views of the
    stacked buffers), padded to the largest rank present. Padding holds zeros (A, B, U, V) and
    the identity (scale 1, shift 0), so it adds exact zeros; absent slots' rows are dropped."""
    span = plan.slot_range
    n_slots, width = span.stop - span.start, plan.width
    x = x.index_select(0, plan.gather).view(n_slots, width, -1)
    y = y.index_select(0, plan.gather).view(n_slots, width, -1)
    r = max(state.rank[s] for s in plan.slots)
    k = max(state.rot_rank[s] for s in plan.slots)
    scaled = any(state.has_scale[s] for s in plan.slots)
    shifted = any(state.has_shift[s] for s in plan.slots)
    z, offset = [], 0
    for i, size in enumerate(layer.output_slices):
        zi = y[:, :, offset : offset + size]
        offset += size
        if scaled:
            zi = zi * state.scale[i][span, None, :]
        if shifted:
            zi = zi + state.shift[i][span, None, :]
        if r:
            a = layer.lora_a_stacked[i][span, 0, :r]  # (slots, r, in)
            b = layer.lora_b_stacked[i][span, 0, :, :r]  # (slots, out, r)
            zi = torch.baddbmm(zi, torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))
        z.append(zi)
    rotation = [(state.rot_ut[i][span, :k].transpose(1, 2), state.rot_vt[i][span, :k].transpose(1, 2)) for i in range(len(z))] if k else None
    return TokenGroup(plan.rows, z, rotation, plan.keep)


def _rotate(layer, groups: list[TokenGroup]) -> None:
    """z += (z U) V^T in place of each group's z, with one all-reduce of (z U) under column parallelism."""
    todo = [(group, i) for group in groups if group.rotation for i in range(len(group.z))]
    projections = [group.z[i] @ group.rotation[i][0] for group, i in todo]
    for (group, i), zu in zip(todo, _sum_over_ranks(layer, projections)):
        v = group.rotation[i][1]
        group.z[i] = torch.addmm(group.z[i], zu, v.T) if v.ndim == 2 else torch.baddbmm(group.z[i], zu, v.transpose(1, 2))


def _sum_over_ranks(layer, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """(z U) sums over the full output dim. A column-parallel rank holds some output rows of z and
    U, so the ranks add their partial products: one all-reduce of tokens x 2r_p values per slice.
    Row-parallel ranks hold partial sums of z that vLLM reduces after the op; R is linear, so
    rotating each partial is exact."""
    if not parts or parallel_kind(layer) != "column":
        return parts
    from vllm.distributed import tensor_model_parallel_all_reduce

    total = tensor_model_parallel_all_reduce(torch.cat([p.reshape(-1) for p in parts]))
    return [t.view_as(p) for t, p in zip(total.split([p.numel() for p in parts]), parts)]


def patch_op() -> None:
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    BaseLinearLayerWithLoRA._apply_lora_to_output = grouped_adapter_op
