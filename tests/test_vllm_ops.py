"""The plugin's ops without an engine: the grouped linear op, its per-step plan, slot filling, and
vLLM CPU's torch LoRA ops (stock, they gather `weights[indices]` per token and -1 wraps to the last
slot; the embedding and logits LoRA layers still call them)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sora_serve.methods import ServingFactors
from sora_serve.vllm_plugin import apply, cpu_ops, op, slots

SLOTS, RANK, IN, OUT = 3, 4, 16, 24
INDICES = torch.tensor([0, -1, 2, 1, -1, 2, 2])


def reference(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """float64 rows weights[i] @ x for i >= 0, zero rows for -1."""
    rows = [torch.zeros(weights.shape[2], dtype=torch.float64) if i < 0 else weights[i, 0].double() @ xi.double() for xi, i in zip(x, indices.tolist())]
    return torch.stack(rows)


def test_cpu_lora_ops_leave_base_rows_alone():
    apply()
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


def random_slot_layer(slot_specs, sizes=(24, 8, 8), in_f=32, max_rank=16):
    """A stand-in for a vLLM linear LoRA layer (qkv-like, three slices) with random slot contents.

    slot_specs: (rank, rotation rank, has scale/shift) per slot."""
    layer = SimpleNamespace(
        tp_size=1, output_slices=sizes,
        lora_a_stacked=tuple(torch.zeros(len(slot_specs), 1, max_rank, in_f) for _ in sizes),
        lora_b_stacked=tuple(torch.zeros(len(slot_specs), 1, n, max_rank) for n in sizes),
    )
    state = slots.slot_state(layer)
    for slot, (r, k, scale) in enumerate(slot_specs):
        state.rank[slot], state.rot_rank[slot], state.has_scale[slot], state.has_shift[slot] = r, k, scale, scale
        for i, n in enumerate(sizes):
            layer.lora_a_stacked[i][slot, 0, :r] = torch.randn(r, in_f)
            layer.lora_b_stacked[i][slot, 0, :, :r] = torch.randn(n, r)
            if scale:
                state.scale[i][slot] = 1 + 0.1 * torch.randn(n)
                state.shift[i][slot] = 0.1 * torch.randn(n)
            state.rot_ut[i][slot, :k] = 0.1 * torch.randn(k, n)
            state.rot_vt[i][slot, :k] = 0.1 * torch.randn(k, n)
    return layer, state


def per_slot_reference(layer, state, indices, x, base):
    """float64 ServingFactors.apply, slot by slot and slice by slice; -1 rows stay base."""
    expected = base.double()
    for slot in sorted(s for s in set(indices.tolist()) if s >= 0):
        rows = (indices == slot).nonzero().squeeze(1)
        r, k = state.rank[slot], state.rot_rank[slot]
        expected[rows] = torch.cat([
            ServingFactors(
                layer.lora_a_stacked[i][slot, 0, :r], layer.lora_b_stacked[i][slot, 0, :, :r], state.scale[i][slot], state.shift[i][slot],
                state.rot_ut[i][slot, :k].T, state.rot_vt[i][slot, :k].T,
            ).to(torch.float64).apply(x[rows].double(), part)
            for i, part in enumerate(base[rows].double().split(layer.output_slices, dim=1))
        ], dim=1)
    return expected


# Token -> slot layouts, and the strategy of the op each one takes.
LAYOUTS = {
    "one slot, whole batch": ([1] * 6, "one slot"),
    "decode, one token per slot": ([0, 1, 2, 3, 4], "padded"),
    "uneven counts and base rows": ([0, 1, -1, 2, 3, 1, -1, 0, 1], "padded"),
    "slots absent inside the range": ([4, 0, 2, -1, 0, 2, 4], "padded"),
    "base rows only": ([-1, -1, -1], "none"),
    "very uneven (prefill)": ([2] * 12 + [0, -1, 1], "per slot"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grouped_op_equals_each_slot_alone(layout):
    """Every strategy of the plugin's op (one slot; padded batched GEMMs; one group per slot) gives
    each row its own slot's ServingFactors.apply, slot -1 rows untouched. Slots mix ranks 0-16,
    rotation ranks 0-4 and scale/shift on or off, so padding to the largest rank is exercised."""
    torch.manual_seed(0)
    layer, state = random_slot_layer([(4, 0, False), (8, 4, True), (16, 2, True), (2, 0, True), (0, 3, False)])
    indices, strategy = torch.tensor(LAYOUTS[layout][0]), LAYOUTS[layout][1]
    plan = op.make_plan(indices)
    assert ("none" if not plan.slots else "one slot" if plan.rows is None else "padded" if plan.balanced else "per slot") == strategy
    x, base = torch.randn(len(indices), 32), torch.randn(len(indices), sum(layer.output_slices))
    layer.punica_wrapper = SimpleNamespace(token_lora_indices=indices)
    result = op.grouped_adapter_op(layer, x, base.clone())
    assert torch.allclose(result.double(), per_slot_reference(layer, state, indices, x, base), atol=1e-4)  # fp32 GEMMs vs float64
    assert torch.equal(result[indices == -1], base[indices == -1])


def test_batch_plan_is_recomputed_when_vllm_rewrites_the_indices():
    """The per-step plan is cached across layers, and refreshed when the persistent index
    buffer is overwritten in place (as vLLM does every step), version counter bumped or not."""
    buffer = torch.tensor([0, 0, 1, -1])
    wrapper = SimpleNamespace(token_lora_indices=buffer)
    first = op.batch_plan(wrapper, 4)
    assert op.batch_plan(wrapper, 4) is first and first.slots == [0, 1] and first.counts == [2, 1]
    buffer.copy_(torch.tensor([2, 2, 2, 2]))
    second = op.batch_plan(wrapper, 4)
    assert second.slots == [2] and second.rows is None
    buffer.data.copy_(torch.tensor([1, -1, 1, 0]))  # .data: no version bump (as in vLLM's TP workers)
    third = op.batch_plan(wrapper, 4)
    assert third.slots == [0, 1] and third.counts == [1, 2]


def test_a_slot_refilled_by_plain_lora_has_identity_extras():
    """The padded path reads every present slot's extras: a slot reused by a plain LoRA must
    return to scale 1, shift 0, no rotation."""
    layer, state = random_slot_layer([(4, 0, False), (8, 4, True)])
    slots.fill_plain_lora_slot(layer, 1, None)
    assert state.rot_rank[1] == 0 and not state.has_scale[1]
    for i, n in enumerate(layer.output_slices):
        assert not state.rot_ut[i][1].any() and not state.rot_vt[i][1].any() and not state.shift[i][1].any()
        assert torch.equal(state.scale[i][1], torch.ones(n))


class LayerGemm:
    """The layer's own GEMM as vLLM's quant method exposes it: x W0^T (+ b), W0 never handed out."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return x @ self.weight.T if bias is None else x @ self.weight.T + bias


def packed_float64_layer(sizes=(24, 8, 8), in_f=32, max_rank=16, max_loras=2):
    """A qkv-like float64 linear LoRA layer (three slices, random non-zero bias), tensor parallel 1,
    with ||W0||^2 per row recorded as the plugin does when vLLM processes the loaded weights."""
    from sora_serve.vllm_plugin.activation import record_row_norms

    weight = torch.randn(sum(sizes), in_f, dtype=torch.float64) / in_f**0.5
    base = SimpleNamespace(weight=weight, bias=0.1 * torch.randn(sum(sizes), dtype=torch.float64))
    record_row_norms(base)
    del base.weight  # vLLM CPU drops it after repacking: the activation path must not need it
    gemm = LayerGemm(weight)
    layer = SimpleNamespace(
        tp_size=1, output_slices=sizes, base_layer=base, _get_quant_method=lambda: gemm,
        lora_a_stacked=tuple(torch.zeros(max_loras, 1, max_rank, in_f, dtype=torch.float64) for _ in sizes),
        lora_b_stacked=tuple(torch.zeros(max_loras, 1, n, max_rank, dtype=torch.float64) for n in sizes),
    )
    return layer, weight


METHODS = {
    "lora": dict(method="lora"),
    "dora": dict(method="dora"),
    "prediag": dict(method="prediag"),
    "sora_first_order": dict(method="sora", rotation="first_order"),
    "sora_cayley": dict(method="sora", rotation="cayley"),
}


@pytest.mark.parametrize("kind", METHODS)
def test_activation_factors_equal_the_dense_formula(kind, tmp_path):
    """Factors computed once at load, per slice of a packed layer with a bias, equal each method's
    dense float64 `serving_factors(W0, b)` to 1e-10; DoRA's come from ||W0||^2 per row and the
    layer's GEMM on A, never from W0. Filling a slot copies exactly those factors."""
    import sora_serve as ss
    from sora_serve.vllm_plugin.activation import adapter_module, slice_factors

    from .helpers import perturb_adapter

    torch.manual_seed(3)
    layer, weight = packed_float64_layer()
    names = ["q_proj", "k_proj", "v_proj"]
    model = torch.nn.ModuleDict({n: torch.nn.Linear(32, size, dtype=torch.float64) for n, size in zip(names, layer.output_slices)})
    config = ss.AdapterConfig(r=6, r_p=3, target_modules=names, **METHODS[kind])
    ss.attach(model, config, "a", verbose=False)
    perturb_adapter(model, "a", scale=0.2, seed=7)
    adapter = ss.read_adapter(ss.save_adapter(model, tmp_path / kind, "a"))
    offsets = [0, 24, 32, 40]
    for i, name in enumerate(names):
        dense = adapter_module(adapter, name).serving_factors(weight[offsets[i] : offsets[i + 1]], layer.base_layer.bias[offsets[i] : offsets[i + 1]])
        got = slice_factors(layer, i, adapter, name)
        for field, expected in vars(dense).items():
            actual = getattr(got, field)
            assert (actual is None) == (expected is None), field
            if expected is not None:
                assert torch.allclose(actual, expected, rtol=1e-10, atol=1e-12), (name, field, (actual - expected).abs().max())
        slots.fill_slot(layer, 1, [got if j == i else None for j in range(3)])
        state = slots.slot_state(layer)
        assert torch.equal(layer.lora_b_stacked[i][1, 0, :, : got.lora_B.shape[1]], got.lora_B)
        assert state.has_scale[1] == (got.scale is not None) and state.rot_rank[1] == (0 if got.rot_U is None else got.rot_U.shape[1])


def test_non_finite_adapter_rows_are_zeroed_and_traced_to_their_adapter():
    """Rows of adapter tokens holding NaN/inf are zeroed (nothing non-finite reaches the KV cache)
    and their adapter's id is reported once; finite rows and base rows (-1) are left as they are."""
    from sora_serve.vllm_plugin import isolation

    output = torch.randn(5, 6)
    output[1, 2], output[3, 0], output[4, 5] = float("nan"), float("inf"), float("nan")
    token_slots = torch.tensor([0, 1, 0, 1, -1])  # row 4 is a base row: not ours to touch
    before = output.clone()
    isolation.slot_lora_ids.update({0: 11, 1: 12})
    isolation.quarantine_rows(output, token_slots)
    assert not output[1].any() and not output[3].any()
    assert torch.equal(output[[0, 2]], before[[0, 2]]) and torch.isnan(output[4, 5])
    assert isolation.take_poisoned_lora_ids() == {12}
    assert isolation.take_poisoned_lora_ids() == set()
