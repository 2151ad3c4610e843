"""The CPU backend: every token with its slot's `ServingFactors`, by slot.

Batches the fused native op takes (bf16, where it is built; any size on AMX tiles, else up to
`fused.MAX_DOT_ROWS` tokens) run one `fused_decode` call per layer for every slot present,
each on its rows (`fused.py`): scale and shift,
shrink, rotation, expansion and the finiteness check in one op, reading each slice's own factor
blocks once. Everything else (fp32, a CPU without AVX512-BF16, prefill without AMX) takes the torch path below,
with the same results up to bf16 rounding.

On the torch path a packed layer's slices (q, k, v; gate, up) run as one: at slot entry (`pack_slot`) the slices'
A are stacked along the rank and their Bᵀ, U and Vᵀ laid out block-diagonally, so the input LoRA
is one shrink GEMM and one expand GEMM added in place, and the rotation one pair more, whatever
the number of slices (one GEMM per factor per slice, then a concatenation, cost 3x as much at
decode batch 8 on qkv; docs/benchmarks/serving.md). The block-diagonal zeros add exact zeros;
they cost n_slices times the bytes of B, U and V per slot.

Tokens are grouped by slot once per step (the plan, shared by every layer and rebuilt when vLLM
sets the step's adapters, see `new_step`); every slot present runs over a padded (slots, tokens
per slot) layout that reads each slot's factors once, from the packed buffers or, below their
width, compact copies of them (`padded_operands`; one GEMM per slot when padding would more than
double the work). One slot for the whole batch (one
adapter) updates the base output in place. Slot -1 (no adapter) is left at the base output. The
plan's shapes depend on the tokens' slots and are read on the host once per step: fine on CPU,
where vLLM runs LoRA engines eagerly.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from .. import isolation
from ..layers import parallel_kind
from . import fused
from .prepacked import SlotOperands

_step = itertools.count()
_current_step = next(_step)
_slot_writes = itertools.count()
_slot_version = next(_slot_writes)  # bumped by every slot write, in any layer


def new_step() -> None:
    """vLLM has (re)written the token -> slot indices: plans of earlier steps are stale."""
    global _current_step
    _current_step = next(_step)


def allocate(layer, max_loras: int, max_rank: int) -> None:
    """The packed slot buffers: (slots, ranks of all slices, in) for A, (slots, ranks, out) for Bᵀ
    and Vᵀ, (slots, out, ranks) for U; a slot's slices sit side by side, `pack_slot` fills them."""
    n_slices, out = len(layer.lora_b_stacked), sum(b.shape[2] for b in layer.lora_b_stacked)
    a = layer.lora_a_stacked[0]
    width, like = n_slices * max_rank, dict(dtype=a.dtype, device=a.device)
    layer.sora_packed_a = torch.zeros(max_loras, width, a.shape[3], **like)
    layer.sora_packed_bt = torch.zeros(max_loras, width, out, **like)
    layer.sora_packed_u = torch.zeros(max_loras, out, width, **like)
    layer.sora_packed_vt = torch.zeros(max_loras, width, out, **like)
    layer.sora_packed_btu = torch.zeros(max_loras, width, width, **like)
    layer.sora_operands = [SlotOperands(*_packed(layer, i), 0, 0) for i in range(max_loras)]
    layer.sora_fused = [None] * max_loras
    layer.sora_fused_call = None  # (plan, slot version, the op's lists or None): see _fused_call
    # Built or loaded once per process here, at engine start, not in a request's first step.
    layer.sora_fused_op = a.device.type == "cpu" and a.dtype == torch.bfloat16 and fused.op() is not None
    layer.sora_at_rank = {}


def pack_slot(layer, index: int, ranks: list[int], rot_ranks: list[int]) -> None:
    """Slot `index` of the per-slice buffers, packed: slice i's first ranks[i] rows of A and its Bᵀ
    block (its own output columns), then its rotation's rot_ranks[i] columns of U and rows of Vᵀ."""
    for packed in _packed(layer, slice(None)):
        packed[index] = 0
    col, r0, k0 = 0, 0, 0
    for i, (r, k) in enumerate(zip(ranks, rot_ranks)):
        cols = slice(col, col + layer.lora_b_stacked[i].shape[2])
        layer.sora_packed_a[index, r0 : r0 + r] = layer.lora_a_stacked[i][index, 0, :r]
        layer.sora_packed_bt[index, r0 : r0 + r, cols] = layer.lora_b_stacked[i][index, 0, :, :r].T
        layer.sora_packed_u[index, cols, k0 : k0 + k] = layer.sora_rot_u[i][index, 0, :k].T
        layer.sora_packed_vt[index, k0 : k0 + k, cols] = layer.sora_rot_v[i][index, 0, :, :k].T
        col, r0, k0 = cols.stop, r0 + r, k0 + k
    bt, u = layer.sora_packed_bt[index, :r0], layer.sora_packed_u[index, :, :k0]
    layer.sora_packed_btu[index, :r0, :k0] = bt.double() @ u.double()  # rounded once, to the slot dtype
    layer.sora_operands[index] = SlotOperands(*_packed(layer, index), r0, k0)
    layer.sora_fused[index] = _fused_slot(layer, index, ranks, rot_ranks)
    global _slot_version
    _slot_version = next(_slot_writes)
    for (r, k), compact in layer.sora_at_rank.items():
        for copy, fresh in zip(compact, _padded_views(layer, r, k, slice(index, index + 1))):
            if copy[index].data_ptr() != fresh[0].data_ptr():  # a copy, not the buffer itself
                copy[index] = fresh[0]


def _fused_slot(layer, index: int, ranks: list[int], rot_ranks: list[int]) -> fused.FusedSlot | None:
    """Slot `index` for the fused decode op, or None where the op cannot take it: widths it cannot
    read in pairs, or a rotation split over column-parallel ranks (its projection sums over them,
    between the GEMMs: `_sum_over_ranks`)."""
    widths = [b.shape[2] for b in layer.lora_b_stacked]
    if not fused.FusedSlot.fits(layer.sora_packed_a.shape[2], rot_ranks, widths):
        return None
    if any(rot_ranks) and parallel_kind(layer) == "column":
        return None
    info = layer.sora_slots[index]
    scale = layer.sora_scale_all[index] if info.scaled else None
    shift = layer.sora_shift_all[index] if info.shifted else None
    return fused.FusedSlot(*_packed(layer, index), ranks, rot_ranks, widths, scale, shift)


def _packed(layer, index: int | slice) -> tuple[torch.Tensor, ...]:
    """Slot `index` of the packed A, Bᵀ, U, Vᵀ and BᵀU."""
    names = ("sora_packed_a", "sora_packed_bt", "sora_packed_u", "sora_packed_vt", "sora_packed_btu")
    return tuple(getattr(layer, name)[index] for name in names)


AT_RANK_KEPT = 2  # (r, k) pairs kept per layer: a server's adapters seldom have more than two shapes


class PaddedOperands(NamedTuple):
    """Slots' packed factors as (slots, ...) tensors: the steps of `SlotOperands` as batched GEMMs,
    the expansions over [Bᵀ; Vᵀ] stacked (one batched GEMM and one pass over z, not two)."""

    a: torch.Tensor  # (slots, r, in)
    u: torch.Tensor  # (slots, out, k)
    btu: torch.Tensor  # (slots, r, k)
    expand: torch.Tensor  # (slots, r + k, out)

    def shrink(self, x: torch.Tensor) -> torch.Tensor | None:
        return torch.bmm(x, self.a.transpose(1, 2)) if self.a.shape[1] else None

    def project(self, z: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor | None:
        if not self.u.shape[2]:
            return None
        q = torch.bmm(z, self.u)
        return q if p is None else q.baddbmm_(p, self.btu)

    def add_expansions(self, z: torch.Tensor, p: torch.Tensor | None, q: torch.Tensor | None) -> None:
        inputs = [t for t in (p, q) if t is not None]
        if inputs:
            z.baddbmm_(inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=2), self.expand)


def _padded_views(layer, r: int, k: int, slots: slice = slice(None)) -> PaddedOperands:
    """`slots` of the packed buffers at LoRA rank r and rotation rank k: views, but for [Bᵀ; Vᵀ]."""
    bt, vt = layer.sora_packed_bt[slots, :r], layer.sora_packed_vt[slots, :k]
    return PaddedOperands(
        layer.sora_packed_a[slots, :r],
        layer.sora_packed_u[slots, :, :k],
        layer.sora_packed_btu[slots, :r, :k],
        vt if not r else bt if not k else torch.cat([bt, vt], dim=1),
    )


def padded_operands(layer, r: int, k: int) -> PaddedOperands:
    """Every slot's packed factors at ranks (r, k), each slot's block contiguous.

    Below the buffers' width (n_slices x max_lora_rank), a view at rank r is strided between
    slots, and torch's CPU bmm copies such an operand first or runs ~3x slower on it (bf16,
    hidden 2048, 16 slots; docs/benchmarks/serving.md). So the padded path reads compact
    copies, made once per (r, k) and kept current by `pack_slot`; at full width, the buffers
    (but for the stacked [Bᵀ; Vᵀ] of a rotation: a copy of those)."""
    compact = layer.sora_at_rank.get((r, k))
    if compact is None:
        while len(layer.sora_at_rank) >= AT_RANK_KEPT:
            del layer.sora_at_rank[next(iter(layer.sora_at_rank))]
        # Plain tensors, like the buffers: slot writes update them outside vLLM's inference mode.
        with torch.inference_mode(False):
            compact = PaddedOperands(*(t.contiguous() for t in _padded_views(layer, r, k)))
        layer.sora_at_rank[(r, k)] = compact
    return compact


class BatchPlan(NamedTuple):
    """Where this step's adapter tokens go, computed once per step and shared by every layer.

    The padded layout has one row of `width` positions per slot of the range lo..hi of slots
    present, so each slot's factors are a slice of the stacked operands, never gathered. `gather`
    is the token row of each position (padding repeats a real row; its results are dropped),
    `keep` the positions of real tokens in `rows` order (None when nothing is padded)."""

    slots: list[int]  # slots present (>= 0), ascending
    counts: list[int]  # tokens per slot
    rows: torch.Tensor | None  # token rows with an adapter, grouped by slot; None: the whole batch, one slot
    gather: torch.Tensor | None
    keep: torch.Tensor | None
    width: int  # the most tokens any slot has
    slot_rows: tuple[torch.Tensor, ...] = ()  # `rows` split per slot (empty when rows is None)

    @property
    def slot_range(self) -> slice:
        return slice(self.slots[0], self.slots[-1] + 1)

    @property
    def balanced(self) -> bool:
        """Padding at most doubles the work: worth it to run every slot in one batched GEMM."""
        return (self.slots[-1] - self.slots[0] + 1) * self.width <= 2 * sum(self.counts)


def step_plan(punica_wrapper, n_tokens: int, flags: torch.Tensor) -> tuple[BatchPlan, isolation.TokenMasks]:
    """This step's plan and isolation masks, built by the first layer that asks and cached on the
    wrapper. A step whose tokens have the slots of the previous one (a decode batch that did not
    change) keeps its plan object, so what layers built for it stays valid (`_fused_call`)."""
    cached = getattr(punica_wrapper, "sora_plan", None)
    if cached is None or cached[0] != (_current_step, n_tokens):
        indices = punica_wrapper.token_lora_indices[:n_tokens]
        same = cached is not None and torch.equal(cached[3], indices)
        cached = punica_wrapper.sora_plan = (
            (_current_step, n_tokens),
            cached[1] if same else make_plan(indices),
            isolation.token_masks(indices, flags),
            indices.clone(),  # vLLM rewrites its buffer in place
        )
    return cached[1], cached[2]


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
    source = torch.where(
        range_counts[:, None] > 0, starts[:, None] + torch.minimum(position, range_counts[:, None] - 1), 0
    )
    gather = rows.index_select(0, source.reshape(-1))
    keep = None
    if n_range * width != n_adapted:
        slot_of_token = (slots - slot_list[0]).repeat_interleave(counts)
        rank_in_slot = torch.arange(n_adapted, device=indices.device) - (
            torch.cumsum(counts, 0) - counts
        ).repeat_interleave(counts)
        keep = slot_of_token * width + rank_in_slot
    return BatchPlan(slot_list, count_list, rows, gather, keep, width, rows.split(count_list))


class TokenGroup(NamedTuple):
    """Rows of the batch computed together: z = scale * base + shift, then, in place, the slots'
    LoRA and rotation (`SlotOperands` has the three steps)."""

    rows: torch.Tensor | None  # output rows this group writes; None: the whole batch
    z: torch.Tensor  # (tokens, out), or (slots, width, out) padded
    p: torch.Tensor | None  # x Aᵀ, all slices; None: no input LoRA
    operands: SlotOperands | PaddedOperands
    keep: torch.Tensor | None = None  # padded: the positions that are real tokens (None: all are)
    gather: torch.Tensor | None = None  # padded: the token row of each position

    @property
    def padded(self) -> bool:
        return self.gather is not None

    def real_rows(self, t: torch.Tensor) -> torch.Tensor:
        """A per-position tensor of this group as (tokens, ...) in `rows` order."""
        if not self.padded:
            return t
        t = t.reshape(-1, *t.shape[2:])
        return t if self.keep is None else t.index_select(0, self.keep)

    def from_token_order(self, t: torch.Tensor) -> torch.Tensor:
        """This group's positions read from a (batch tokens, ...) tensor."""
        if self.padded:
            return t.index_select(0, self.gather).view(*self.z.shape[:2], *t.shape[1:])
        return t if self.rows is None else t.index_select(0, self.rows)


def apply(layer, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """All slots at once, as batched GEMMs over a padded (slots, tokens per slot) layout; when
    padding would more than double the work (uneven prefill), each slot on its own tokens; one
    slot for the whole batch, in place on the base output."""
    plan, masks = step_plan(layer.punica_wrapper, x.shape[0], layer.sora_failed)
    call = _fused_call(layer, plan, x, output)
    if call is not None:
        if call and fused.run_slots(x, output, call):  # the masked pass finds the rows and flags their slots
            isolation.quarantine_rows(output, masks, layer.sora_failed)
        return output
    if not any(layer.sora_slots[s].active for s in plan.slots):  # all base (or all-zero slots)
        return output
    if plan.rows is None:
        groups = [_slot_group(layer, plan.slots[0], None, x, output)]
    elif plan.balanced:
        groups = [_padded_group(layer, plan, x, output)]
    else:
        groups = [_slot_group(layer, s, rows, x, output) for s, rows in zip(plan.slots, plan.rows.split(plan.counts))]
    projections = [group.operands.project(group.z, group.p) for group in groups]
    if parallel_kind(layer) == "column" and any(q is not None for q in projections):
        projections = _sum_over_ranks(groups, projections, x.shape[0])
    for group, q in zip(groups, projections):
        group.operands.add_expansions(group.z, group.p, q)
        output = _write_group(output, group)
    quarantine = isolation.quarantine_rows_host_checked if output.device.type == "cpu" else isolation.quarantine_rows
    quarantine(output, masks, layer.sora_failed)
    return output


def _fused_call(layer, plan: BatchPlan, x: torch.Tensor, output: torch.Tensor) -> tuple | None:
    """The fused op's lists for this layer's active slots in `plan` (empty: none is active), or None
    where the torch path runs. Built once per plan and slot contents, not per step: each layer's
    call comes right after its base GEMM has streamed the weights through the caches, where every
    Python object touched costs a memory read (docs/VLLM.md, "The fused op")."""
    if not layer.sora_fused_op or not fused.takes(x.shape[0]) or output.stride(-1) != 1:
        return None
    cached = layer.sora_fused_call
    if cached is None or cached[0] is not plan or cached[1] != _slot_version:
        runs = _fused_slots(layer, plan)
        lists = None if runs is None else fused.slot_lists(runs) if runs else ()
        cached = layer.sora_fused_call = (plan, _slot_version, lists)
    return cached[2]


def _fused_slots(layer, plan: BatchPlan) -> list | None:
    """(its token rows or None for the whole batch, its `FusedSlot`) for every active slot of the
    batch; None where a slot is one the op cannot take (`_fused_slot`)."""
    rows = (None,) if plan.rows is None else plan.slot_rows
    runs = []
    for slot, slot_rows in zip(plan.slots, rows):
        fused_slot = layer.sora_fused[slot]
        if fused_slot is None:
            return None
        if layer.sora_slots[slot].active:
            runs.append((slot_rows, fused_slot))
    return runs


def _write_group(output: torch.Tensor, group: TokenGroup) -> torch.Tensor:
    if group.rows is None:
        return group.z  # the base output itself, updated in place
    z = group.z.reshape(-1, group.z.shape[-1])
    if group.keep is not None:
        z = z.index_select(0, group.keep)
    return output.index_copy_(0, group.rows, z)


def _scale_and_shift(z: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None) -> None:
    """z = scale * z + shift in place: one pass when both are set."""
    if scale is not None and shift is not None:
        torch.addcmul(shift, z, scale, out=z)
    elif scale is not None:
        z.mul_(scale)
    elif shift is not None:
        z.add_(shift)


def _slot_group(layer, slot: int, rows: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor) -> TokenGroup:
    """One slot on its tokens (`rows`: a gathered copy; None: the whole batch, `y` updated in place),
    one GEMM per step at the slot's packed ranks (prepacked operands, `prepacked.py`)."""
    if rows is not None:
        x, y = x.index_select(0, rows), y.index_select(0, rows)
    info, operands = layer.sora_slots[slot], layer.sora_operands[slot]
    _scale_and_shift(
        y, layer.sora_scale_all[slot] if info.scaled else None, layer.sora_shift_all[slot] if info.shifted else None
    )
    return TokenGroup(rows, y, operands.shrink(x), operands)


def _padded_group(layer, plan: BatchPlan, x: torch.Tensor, y: torch.Tensor) -> TokenGroup:
    """Every slot at once: (slots, width, in) tokens against each slot's packed factors, padded to
    the largest ranks present (`padded_operands`). Padding holds zeros (A, Bᵀ, U, Vᵀ) and the
    identity (scale 1, shift 0), so it adds exact zeros; absent slots' rows are dropped."""
    span = plan.slot_range
    n_slots, width = span.stop - span.start, plan.width
    x = x.index_select(0, plan.gather).view(n_slots, width, -1)
    z = y.index_select(0, plan.gather).view(n_slots, width, -1)
    present = [layer.sora_slots[s] for s in plan.slots]
    _scale_and_shift(
        z,
        layer.sora_scale_all[span, None, :] if any(s.scaled for s in present) else None,
        layer.sora_shift_all[span, None, :] if any(s.shifted for s in present) else None,
    )
    r, k = max(s.rank for s in present), max(s.rot_rank for s in present)
    operands = PaddedOperands(*(t[span] for t in padded_operands(layer, r, k)))
    return TokenGroup(plan.rows, z, operands.shrink(x), operands, plan.keep, plan.gather)


def _sum_over_ranks(
    groups: list[TokenGroup], projections: list[torch.Tensor | None], n_tokens: int
) -> list[torch.Tensor | None]:
    """q = z U + p (BᵀU) sums over the full output dim. A column-parallel rank holds some output
    columns of z, rows of U and columns of Bᵀ (p is whole on every rank: A is not split), so the
    ranks add their partial products: one all-reduce of (tokens, packed rank) values. Row-parallel
    ranks hold partial sums of z and p that vLLM reduces after the op; R is linear, so rotating
    each partial is exact.

    The sum is laid out by token, never by slot: each TP worker's LoRA manager fills its slots in
    the iteration order of a set of requests hashed by adapter name (string hashes differ per
    process), so the same adapter can sit in different slots on different ranks. Its packed
    layout is the same on every rank (it follows the adapter's per-slice ranks)."""
    from vllm.distributed import tensor_model_parallel_all_reduce

    rotated = [(group, q) for group, q in zip(groups, projections) if q is not None]
    width = max(q.shape[-1] for _, q in rotated)
    by_token = rotated[0][1].new_zeros(n_tokens, width)
    for group, q in rotated:
        rows = slice(None) if group.rows is None else group.rows
        by_token[rows, : q.shape[-1]] = group.real_rows(q)
    total = tensor_model_parallel_all_reduce(by_token)
    return [
        None if q is None else group.from_token_order(total[:, : q.shape[-1]]) for group, q in zip(groups, projections)
    ]
