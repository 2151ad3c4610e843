"""The CPU backend: every token with its slot's `ServingFactors`, all slots of a step in batched GEMMs.

Tokens are grouped by slot once per step (the plan, shared by every layer and rebuilt when vLLM
sets the step's adapters, see `new_step`); every slot present runs `ServingFactors.apply` over a
padded (slots, tokens per slot) layout that reads each slot's factors once, as views of the
layer's slot buffers (one GEMM per slot when padding would more than double the work). Slot -1
(no adapter) is left at the base output. The plan's shapes depend on the tokens' slots and are
read on the host once per step: fine on CPU, where vLLM runs LoRA engines eagerly.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from sora_serve.methods import ServingFactors

from .. import isolation
from ..layers import parallel_kind

_step = itertools.count()
_current_step = next(_step)


def new_step() -> None:
    """vLLM has (re)written the token -> slot indices: plans of earlier steps are stale."""
    global _current_step
    _current_step = next(_step)


class BatchPlan(NamedTuple):
    """Where this step's adapter tokens go, computed once per step and shared by every layer.

    The padded layout has one row of `width` positions per slot of the range lo..hi of slots
    present, so each slot's factors are a view of the stacked buffers, never copied. `gather`
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


def step_plan(punica_wrapper, n_tokens: int) -> BatchPlan:
    """This step's plan, built by the first layer that asks and cached on the wrapper."""
    cached = getattr(punica_wrapper, "sora_plan", None)
    if cached is None or cached[0] != (_current_step, n_tokens):
        cached = punica_wrapper.sora_plan = (
            (_current_step, n_tokens),
            make_plan(punica_wrapper.token_lora_indices[:n_tokens]),
        )
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
    return BatchPlan(slot_list, count_list, rows, gather, keep, width)


class TokenGroup(NamedTuple):
    """Rows of the batch computed together, and their outputs per slice before the rotation."""

    rows: torch.Tensor | None  # output rows this group writes; None: the whole batch
    z: list[torch.Tensor]  # per slice: scale * base + shift + (x A^T) B^T; (tokens, out), or (slots, width, out) padded
    rotation: (
        list[tuple[torch.Tensor, torch.Tensor]] | None
    )  # per slice (U, V): 2-D for one slot, 3-D per slot when padded
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
            return t.index_select(0, self.gather).view(*self.z[0].shape[:2], *t.shape[1:])
        return t if self.rows is None else t.index_select(0, self.rows)


def apply(layer, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """All slots present at once, as batched GEMMs over a padded (slots, tokens per slot) layout;
    when padding would more than double the work (uneven prefill), each slot on its own tokens."""
    plan = step_plan(layer.punica_wrapper, x.shape[0])
    if not any(layer.sora_slots[s].active for s in plan.slots):  # all base (or all-zero slots)
        return output
    if plan.rows is None:
        groups = [_slot_group(layer, plan.slots[0], None, x, output)]
    elif plan.balanced:
        groups = [_padded_group(layer, plan, x, output)]
    else:
        groups = [_slot_group(layer, s, rows, x, output) for s, rows in zip(plan.slots, plan.rows.split(plan.counts))]
    _rotate(layer, groups, x.shape[0])
    for group in groups:
        output = _write_group(output, group)
    isolation.quarantine_rows(output, layer.punica_wrapper.token_lora_indices[: output.shape[0]], layer.sora_failed)
    return output


def _write_group(output: torch.Tensor, group: TokenGroup) -> torch.Tensor:
    z = group.z[0] if len(group.z) == 1 else torch.cat(group.z, dim=-1)
    z = z.reshape(-1, z.shape[-1])
    if group.keep is not None:
        z = z.index_select(0, group.keep)
    return z if group.rows is None else output.index_copy_(0, group.rows, z)


def _slot_group(layer, slot: int, rows: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor) -> TokenGroup:
    """One slot on its tokens (`rows`; None: the whole batch), one GEMM per factor at its own rank."""
    if rows is not None:
        x, y = x.index_select(0, rows), y.index_select(0, rows)
    info = layer.sora_slots[slot]
    r, k = info.rank, info.rot_rank
    z = []
    for i, part in enumerate(y.split(layer.output_slices, dim=1)):
        factors = ServingFactors(
            lora_A=layer.lora_a_stacked[i][slot, 0, :r],
            lora_B=layer.lora_b_stacked[i][slot, 0, :, :r],
            scale=layer.sora_scale[i][slot] if info.scaled else None,
            bias_shift=layer.sora_shift[i][slot] if info.shifted else None,
        )  # the rotation is applied by _rotate, across ranks
        z.append(factors.apply(x, part))
    rotation = (
        [(layer.sora_rot_u[i][slot, 0, :k].T, layer.sora_rot_v[i][slot, 0, :, :k]) for i in range(len(z))]
        if k
        else None
    )
    return TokenGroup(rows, z, rotation)


def _padded_group(layer, plan: BatchPlan, x: torch.Tensor, y: torch.Tensor) -> TokenGroup:
    """Every slot at once: (slots, width, in) tokens against each slot's factors (views of the
    stacked buffers), padded to the largest rank present. Padding holds zeros (A, B, U, V) and
    the identity (scale 1, shift 0), so it adds exact zeros; absent slots' rows are dropped."""
    span = plan.slot_range
    n_slots, width = span.stop - span.start, plan.width
    x = x.index_select(0, plan.gather).view(n_slots, width, -1)
    y = y.index_select(0, plan.gather).view(n_slots, width, -1)
    present = [layer.sora_slots[s] for s in plan.slots]
    r, k = max(s.rank for s in present), max(s.rot_rank for s in present)
    scaled, shifted = any(s.scaled for s in present), any(s.shifted for s in present)
    z = []
    for i, zi in enumerate(y.split(layer.output_slices, dim=2)):
        if scaled:
            zi = zi * layer.sora_scale[i][span, None, :]
        if shifted:
            zi = zi + layer.sora_shift[i][span, None, :]
        if r:
            a = layer.lora_a_stacked[i][span, 0, :r]  # (slots, r, in)
            b = layer.lora_b_stacked[i][span, 0, :, :r]  # (slots, out, r)
            zi = torch.baddbmm(zi, torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))
        z.append(zi)
    rotation = (
        [(layer.sora_rot_u[i][span, 0, :k].transpose(1, 2), layer.sora_rot_v[i][span, 0, :, :k]) for i in range(len(z))]
        if k
        else None
    )
    return TokenGroup(plan.rows, z, rotation, plan.keep, plan.gather)


def _rotate(layer, groups: list[TokenGroup], n_tokens: int) -> None:
    """z += (z U) V^T in place of each group's z, with one all-reduce of (z U) under column parallelism."""
    rotated = [group for group in groups if group.rotation]
    projections = [[z @ u for z, (u, _) in zip(group.z, group.rotation)] for group in rotated]
    if rotated and parallel_kind(layer) == "column":
        projections = _sum_over_ranks(rotated, projections, n_tokens)
    for group, parts in zip(rotated, projections):
        for i, (zu, (_, v)) in enumerate(zip(parts, group.rotation)):
            group.z[i] = (
                torch.addmm(group.z[i], zu, v.T) if v.ndim == 2 else torch.baddbmm(group.z[i], zu, v.transpose(1, 2))
            )


def _sum_over_ranks(
    groups: list[TokenGroup], projections: list[list[torch.Tensor]], n_tokens: int
) -> list[list[torch.Tensor]]:
    """(z U) sums over the full output dim. A column-parallel rank holds some output rows of z and
    U, so the ranks add their partial products: one all-reduce of (slices, tokens, rank) values.
    Row-parallel ranks hold partial sums of z that vLLM reduces after the op; R is linear, so
    rotating each partial is exact.

    The sum is laid out by token, never by slot: each TP worker's LoRA manager fills its slots in
    the iteration order of a set of requests hashed by adapter name (string hashes differ per
    process), so the same adapter can sit in different slots on different ranks."""
    from vllm.distributed import tensor_model_parallel_all_reduce

    n_slices, width = len(projections[0]), max(p.shape[-1] for parts in projections for p in parts)
    by_token = projections[0][0].new_zeros(n_slices, n_tokens, width)
    for group, parts in zip(groups, projections):
        rows = slice(None) if group.rows is None else group.rows
        for i, part in enumerate(parts):
            by_token[i, rows, : part.shape[-1]] = group.real_rows(part)
    total = tensor_model_parallel_all_reduce(by_token)
    return [
        [group.from_token_order(total[i, :, : part.shape[-1]]) for i, part in enumerate(parts)]
        for group, parts in zip(groups, projections)
    ]
