"""The fused native decode op (`backends/fused.py`, `fused_decode.cpp`) against float64, through
the plugin layer's slot writes and the grouped backend: every slice layout, rank mix, tail width
and thread count it must handle, the isolation flags, and the batches it leaves to the torch path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sora_serve.methods import ServingFactors
from sora_serve.vllm_plugin import apply, isolation
from sora_serve.vllm_plugin.backends import fused, grouped
from sora_serve.vllm_plugin.layers import SlotFactors

from .test_vllm_ops import per_slot_reference, plugin_layer, punica_wrapper

pytestmark = pytest.mark.skipif(fused.op() is None, reason="the fused op needs AVX512-BF16 and a C++ toolchain")

# bf16 keeps 8 bits: the op rounds p, q, z (when rotated) and the output once each (up to 2^-9
# each), the float64 reference on the same bf16 values rounds nothing: 1% of the output's norm.
REL_TOL = 0.01


def slice_factors(in_f: int, n: int, r: int, k: int, scaled: bool, shifted: bool) -> ServingFactors:
    return ServingFactors(
        torch.randn(r, in_f) / in_f**0.5,
        0.3 * torch.randn(n, r),
        1 + 0.1 * torch.randn(n) if scaled else None,
        0.1 * torch.randn(n) if shifted else None,
        torch.randn(n, k) / n**0.5 if k else None,
        0.3 * torch.randn(n, k) if k else None,
    ).to(torch.bfloat16)


def run_layer(layer, slots: dict[int, list[ServingFactors]], indices: list[int], in_f: int):
    """The layer's output and the float64 per-slot reference on random bf16 inputs (non-zero bias)."""
    for slot, factors in slots.items():
        layer.set_lora(slot, SlotFactors(factors), [f.lora_B for f in factors])
    layer.punica_wrapper = punica_wrapper(indices, len(layer.sora_slots), prefill=False)
    grouped.new_step()
    x = torch.randn(len(indices), in_f, dtype=torch.bfloat16)
    base = layer._get_quant_method().apply(layer, x, layer.base_layer.bias)
    expected = per_slot_reference(slots, torch.tensor(indices), x, base, layer.output_slices)
    return layer.apply(x, layer.base_layer.bias), expected


def relative_error(result: torch.Tensor, expected: torch.Tensor) -> float:
    return ((result.double() - expected).norm() / expected.norm()).item()


# (slice widths, per-slice (rank, rotation rank), scaled, shifted): widths off multiples of 16
# (masked tails), unequal and zero ranks, rotated and plain slices, scale/shift on and off, and
# [p q] widths past one AMX block (64: two blocks; 40: not whole blocks, the dot-product form).
CASES = {
    "qkv, SORA": ((48, 16, 16), [(8, 4), (8, 4), (8, 4)], True, True),
    "qkv, uneven ranks and tails": ((40, 18, 22), [(5, 2), (0, 3), (16, 0)], True, False),
    "gate_up, LoRA": ((70, 70), [(16, 0), (16, 0)], False, False),
    "one slice, Pre-Diag": ((34,), [(4, 0)], True, True),
    "one slice, scale only": ((30,), [(0, 0)], True, False),
    "only q adapted": ((32, 16, 16), [(6, 0), (0, 0), (0, 0)], False, False),
    "wide ranks": ((40, 24), [(48, 16), (40, 0)], True, True),
}
MAX_RANK = 48


def tiles_as(on: bool):
    """The op's GEMMs on AMX tiles or on AVX512 dot products for one test, then as before."""
    before = fused.tiles_on()
    if fused.use_amx(on) != on:
        fused.use_amx(before)
        pytest.skip("no AMX tiles on this CPU")
    yield on
    fused.use_amx(before)


@pytest.fixture(params=["amx", "avx512"])
def tiles(request):
    yield from tiles_as(request.param == "amx")


@pytest.fixture
def amx():
    yield from tiles_as(True)


@pytest.fixture
def avx512():
    yield from tiles_as(False)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rows", [1, 5, 8, 17, fused.MAX_DOT_ROWS])
def test_fused_decode_matches_float64(case, rows, tiles, monkeypatch):
    """Input width 70: two whole AMX blocks of the reduction and a tail; 17 and 32 rows: two row tiles."""
    apply()
    torch.manual_seed(rows)
    sizes, ranks, scaled, shifted = CASES[case]
    in_f = 70
    layer = plugin_layer(sizes=sizes, in_f=in_f, max_rank=MAX_RANK, dtype=torch.bfloat16, monkeypatch=monkeypatch)
    factors = [slice_factors(in_f, n, r, k, scaled, shifted) for n, (r, k) in zip(sizes, ranks)]
    result, expected = run_layer(layer, {2: factors}, [2] * rows, in_f)
    assert "buffers" in vars(layer.sora_fused[2]), "the fused op did not run"
    assert relative_error(result, expected) < REL_TOL


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_decode_at_model_scale(threads, tiles, monkeypatch):
    """A Llama qkv at hidden 2048 (q 2048, k and v 512) at decode batch 8; with two threads the
    shrink's reduction is split over them (partial sums) and the expansion's columns too."""
    apply()
    torch.manual_seed(threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sizes, in_f = (2048, 512, 512), 2048
        layer = plugin_layer(sizes=sizes, in_f=in_f, max_loras=2, dtype=torch.bfloat16, monkeypatch=monkeypatch)
        factors = [slice_factors(in_f, n, 16, 8, True, True) for n in sizes]
        result, expected = run_layer(layer, {0: factors}, [0] * 8, in_f)
    finally:
        torch.set_num_threads(before)
    assert "buffers" in vars(layer.sora_fused[0])
    assert relative_error(result, expected) < REL_TOL


def test_mixed_decode_batches_run_each_slot_on_its_own_rows(tiles, monkeypatch):
    """A decode batch mixing slots of every kind with base rows: one fused op per slot on its tokens'
    rows, each row its own slot's ServingFactors, base rows (-1) left exactly as they were."""
    apply()
    torch.manual_seed(7)
    in_f, sizes = 64, (48, 16, 16)
    layer = plugin_layer(sizes=sizes, in_f=in_f, dtype=torch.bfloat16, monkeypatch=monkeypatch)
    specs = {0: (8, 0, False, False), 1: (16, 4, True, True), 2: (0, 0, True, True), 4: (4, 2, False, True)}
    slots = {s: [slice_factors(in_f, n, *spec) for n in sizes] for s, spec in specs.items()}
    indices = [0, -1, 1, 2, 4, 0, 1, -1, 2, 4, 4]
    result, expected = run_layer(layer, slots, indices, in_f)
    assert all("buffers" in vars(layer.sora_fused[s]) for s in slots)
    base_rows = torch.tensor(indices) == -1
    assert torch.equal(result[base_rows].double(), expected[base_rows])
    assert relative_error(result, expected) < REL_TOL


def test_slots_written_between_steps_of_an_unchanged_batch_serve_their_new_contents(tiles, monkeypatch):
    """vLLM keeps its punica wrapper across steps; a decode batch whose tokens keep their slots keeps
    its plan (and each layer its op lists), while an adapter swapped into a slot, or a slot reset,
    between two such steps must be served from the next step on."""
    apply()
    torch.manual_seed(13)
    in_f, sizes, indices = 64, (48, 16, 16), [0, 1, 0, -1, 1]
    layer = plugin_layer(sizes=sizes, in_f=in_f, dtype=torch.bfloat16, monkeypatch=monkeypatch)
    layer.punica_wrapper = punica_wrapper(indices, len(layer.sora_slots), prefill=False)
    slots = {s: [slice_factors(in_f, n, 8, 4, True, True) for n in sizes] for s in (0, 1)}
    plans = []
    for step in ("first", "slot 0 swapped", "slot 1 reset"):
        if step == "slot 0 swapped":
            slots[0] = [slice_factors(in_f, n, 4, 2, False, True) for n in sizes]
        for slot, factors in slots.items():
            layer.set_lora(slot, SlotFactors(factors), [f.lora_B for f in factors])
        if step == "slot 1 reset":
            layer.reset_lora(1)
            del slots[1]
        grouped.new_step()  # as vLLM's set_active_adapters does every step
        plans.append(grouped.step_plan(layer.punica_wrapper, len(indices), layer.sora_failed)[0])
        x = torch.randn(len(indices), in_f, dtype=torch.bfloat16)
        base = layer._get_quant_method().apply(layer, x, layer.base_layer.bias)
        expected = per_slot_reference(slots, torch.tensor(indices), x, base, layer.output_slices)
        result = layer.apply(x, layer.base_layer.bias)
        assert relative_error(result, expected) < REL_TOL, step
    assert plans[0] is plans[1] is plans[2]
    assert all("buffers" in vars(layer.sora_fused[s]) for s in slots), "the fused op did not run"


def test_fused_decode_quarantines_non_finite_rows(tiles, monkeypatch):
    """An adapter whose factors overflow bf16 has its rows zeroed and its slot flagged, as on the
    torch path; another slot's rows in the same batch are untouched by it."""
    apply()
    torch.manual_seed(3)
    layer = plugin_layer(sizes=(24, 8, 8), in_f=32, dtype=torch.bfloat16, monkeypatch=monkeypatch)
    isolation.take_failed_slots()
    slots = {s: [slice_factors(32, n, 4, 2, True, True) for n in (24, 8, 8)] for s in (0, 1)}
    slots[1][1] = dataclasses.replace(slots[1][1], lora_B=torch.full_like(slots[1][1].lora_B, 3e38))
    indices = [1, 0, 1, 0, 0]
    result, expected = run_layer(layer, slots, indices, 32)
    assert all("buffers" in vars(layer.sora_fused[s]) for s in slots)
    bad_rows = torch.tensor(indices) == 1
    assert not result[bad_rows].any()
    assert relative_error(result[~bad_rows], expected[~bad_rows]) < REL_TOL
    assert isolation.take_failed_slots() == {1}


def test_prefill_sized_batches_run_on_tiles(amx, monkeypatch):
    """On AMX tiles the op takes batches of any size: one slot's prefill, and a prefill whose slots
    have very uneven token counts, with base rows; 150 and 80 rows: the op's blocks of 64 rows and a tail."""
    apply()
    torch.manual_seed(9)
    in_f, sizes = 96, (48, 16, 16)
    layer = plugin_layer(sizes=sizes, in_f=in_f, dtype=torch.bfloat16, monkeypatch=monkeypatch)
    slots = {s: [slice_factors(in_f, n, 8, 4, True, True) for n in sizes] for s in (0, 3)}
    for indices in ([3] * 60, [0] * 45 + [-1] * 5 + [3] * 3, [3] * 150, [0] * 80 + [-1] * 7 + [3] * 66):
        result, expected = run_layer(layer, slots, indices, in_f)
        assert relative_error(result, expected) < REL_TOL
    assert all("buffers" in vars(layer.sora_fused[s]) for s in slots)


def test_batches_the_fused_op_does_not_take_run_the_torch_path(avx512, monkeypatch):
    """Batches past `MAX_DOT_ROWS` on dot products, and layers whose input width is odd (the op
    reads pairs), give the same float64-close results through the torch path, the op untouched."""
    apply()
    torch.manual_seed(5)
    in_f, sizes = 33, (24, 8, 8)
    layer = plugin_layer(sizes=sizes, in_f=in_f, dtype=torch.bfloat16, monkeypatch=monkeypatch)
    factors = [slice_factors(in_f, n, 4, 2, True, True) for n in sizes]
    result, expected = run_layer(layer, {0: factors}, [0] * 8, in_f)
    assert layer.sora_fused[0] is None
    assert relative_error(result, expected) < REL_TOL

    in_f = 32
    layer = plugin_layer(sizes=sizes, in_f=in_f, dtype=torch.bfloat16, monkeypatch=monkeypatch)
    slots = {s: [slice_factors(in_f, n, 4, 2, True, True) for n in sizes] for s in (0, 1)}
    for indices in ([0] * (fused.MAX_DOT_ROWS + 1), [0, 1] * (fused.MAX_DOT_ROWS // 2 + 1)):
        result, expected = run_layer(layer, slots, indices, in_f)
        assert relative_error(result, expected) < REL_TOL
    assert all("buffers" not in vars(slot) for slot in layer.sora_fused if slot is not None)


def test_fused_op_rejects_rows_outside_the_batch_before_writing_any_slot(monkeypatch):
    """A row index past the batch, in any slot's rows, is an error naming the op, raised before the
    first slot writes its rows."""
    apply()
    torch.manual_seed(11)
    layer = plugin_layer(sizes=(24, 8, 8), in_f=32, dtype=torch.bfloat16, monkeypatch=monkeypatch)
    for slot in (0, 1):
        factors = [slice_factors(32, n, 4, 2, True, True) for n in (24, 8, 8)]
        layer.set_lora(slot, SlotFactors(factors), [f.lora_B for f in factors])
    x, y = torch.randn(3, 32, dtype=torch.bfloat16), torch.randn(3, 40, dtype=torch.bfloat16)
    before = y.clone()
    runs = [(torch.tensor([0, 1]), layer.sora_fused[0]), (torch.tensor([2, 7]), layer.sora_fused[1])]
    with pytest.raises(RuntimeError, match=r"sora_serve::fused_decode: row 7 out of range"):
        fused.run_slots(x, y, fused.slot_lists(runs))
    assert torch.equal(y, before)
