"""The plugin's layers and backends without an engine: slot writes, both backends against a float64
per-slot reference (through vLLM's real `PunicaWrapperCPU`), the grouped backend's per-step plan,
graph safety of the punica backend, the isolation flags, and vLLM CPU's mended torch LoRA ops
(stock, they gather `weights[indices]` per token and -1 wraps to the last slot)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from sora_serve.methods import ServingFactors
from sora_serve.vllm_plugin import apply, cpu_ops, isolation
from sora_serve.vllm_plugin.backends import grouped, prepacked, punica
from sora_serve.vllm_plugin.layers import SlotFactors, SoraLinearMixin

SLOTS, RANK, IN, OUT = 3, 4, 16, 24
INDICES = torch.tensor([0, -1, 2, 1, -1, 2, 2])
FP32_TOL = dict(atol=1e-4, rtol=1e-4)  # float32 GEMMs against float64


def reference(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """float64 rows weights[i] @ x for i >= 0, zero rows for -1."""
    rows = [
        torch.zeros(weights.shape[2], dtype=torch.float64) if i < 0 else weights[i, 0].double() @ xi.double()
        for xi, i in zip(x, indices.tolist())
    ]
    return torch.stack(rows)


@pytest.mark.parametrize("matmul", [cpu_ops.masked_matmul, cpu_ops.slot_matmul], ids=["graph_safe", "per_slot"])
def test_mended_cpu_lora_ops_leave_base_rows_alone(matmul):
    bgmv_shrink, bgmv_expand, bgmv_expand_slice = cpu_ops.ops_with(matmul)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(SLOTS, 1, RANK, IN, generator=gen)
    b = torch.randn(SLOTS, 1, OUT, RANK, generator=gen)
    x = torch.randn(len(INDICES), IN, generator=gen)
    base = torch.randn(len(INDICES), 2 * OUT, generator=gen)
    tol = dict(atol=1e-5, rtol=1e-5)

    shrunk = torch.empty(len(INDICES), RANK)
    bgmv_shrink(x, a, shrunk, INDICES, 0.5)
    assert torch.allclose(shrunk.double(), 0.5 * reference(x, a, INDICES), **tol)

    expanded = base[:, :OUT].clone()
    bgmv_expand(shrunk, b, expanded, INDICES, add_inputs=True)
    assert torch.allclose(expanded.double(), base[:, :OUT].double() + reference(shrunk, b, INDICES), **tol)

    sliced = base.clone()
    bgmv_expand_slice(shrunk, b, sliced, INDICES, OUT, OUT, add_inputs=True)
    assert torch.equal(sliced[:, :OUT], base[:, :OUT])
    assert torch.allclose(sliced[:, OUT:].double(), base[:, OUT:].double() + reference(shrunk, b, INDICES), **tol)
    base_rows = INDICES == -1
    assert torch.equal(expanded[base_rows], base[base_rows, :OUT]) and torch.equal(sliced[base_rows], base[base_rows])


@pytest.mark.parametrize("backend", ["punica", "grouped"])
def test_installed_cpu_ops_serve_the_prefill_form(backend):
    """vLLM's sgmv_* (one slot index per sequence) reach the mended bgmv ops where vLLM looks them up."""
    apply()
    cpu_ops.patch_cpu_ops(backend)
    from vllm.lora.punica_wrapper import punica_cpu

    gen = torch.Generator().manual_seed(1)
    a, x = torch.randn(SLOTS, 1, RANK, IN, generator=gen), torch.randn(len(INDICES), IN, generator=gen)
    per_sequence, lengths = torch.tensor([2, -1, 0]), torch.tensor([3, 2, 2])
    prefill = torch.empty(len(INDICES), RANK)
    punica_cpu.sgmv_shrink(x, a, prefill, None, lengths, per_sequence, 3, 3, len(INDICES), 1.0)
    assert torch.allclose(prefill.double(), reference(x, a, per_sequence.repeat_interleave(lengths)), atol=1e-5)


# ------------------------------------------------------------------ a layer with the plugin's mixin


class LayerGemm:
    """The layer's own GEMM as vLLM's quant method exposes it: x W0^T (+ b), W0 never handed out."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return x @ self.weight.T if bias is None else x @ self.weight.T + bias


class PlainLinearWithLoRA:
    """What the mixin takes from vLLM's linear LoRA classes (tensor parallel 1): A/B slot buffers
    per output slice, their set/reset, the base GEMM. The engine tests run the real classes."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: tuple[int, ...]):
        self.tp_size, self.output_slices, self.n_slices = 1, sizes, len(sizes)
        self.base_layer = SimpleNamespace(bias=bias)
        self._gemm = LayerGemm(weight)

    def _get_quant_method(self) -> LayerGemm:
        return self._gemm

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        in_f, dtype = self._gemm.weight.shape[1], self._gemm.weight.dtype
        self.lora_a_stacked = tuple(
            torch.zeros(max_loras, 1, lora_config.max_lora_rank, in_f, dtype=dtype) for _ in self.output_slices
        )
        self.lora_b_stacked = tuple(
            torch.zeros(max_loras, 1, n, lora_config.max_lora_rank, dtype=dtype) for n in self.output_slices
        )

    def reset_lora(self, index: int) -> None:
        for a, b in zip(self.lora_a_stacked, self.lora_b_stacked):
            a[index], b[index] = 0, 0

    def set_lora(self, index: int, lora_a, lora_b) -> None:
        self.reset_lora(index)
        for i, (a, b) in enumerate(zip(lora_a, lora_b)):
            self.lora_a_stacked[i][index, 0, : a.shape[0]] = a
            self.lora_b_stacked[i][index, 0, :, : b.shape[1]] = b


class PluginLayer(SoraLinearMixin, PlainLinearWithLoRA):
    pass


def plugin_layer(
    sizes=(24, 8, 8), in_f=32, max_rank=16, max_loras=5, dtype=torch.float32, backend="grouped", monkeypatch=None
) -> PluginLayer:
    """A qkv-like plugin layer (three slices, random non-zero bias) with empty slots."""
    if monkeypatch is not None:
        monkeypatch.setenv("SORA_SERVE_VLLM_BACKEND", backend)
    weight = torch.randn(sum(sizes), in_f, dtype=dtype) / in_f**0.5
    layer = PluginLayer(weight, 0.1 * torch.randn(sum(sizes), dtype=dtype), sizes)
    layer.create_lora_weights(max_loras, SimpleNamespace(max_lora_rank=max_rank, fully_sharded_loras=False))
    return layer


def random_factors(layer, r: int, k: int, scaled: bool) -> list[ServingFactors]:
    """Per-slice factors of rank r, rotation rank k (0: none), with or without scale and shift."""
    in_f = layer.lora_a_stacked[0].shape[3]
    return [
        ServingFactors(
            torch.randn(r, in_f),
            torch.randn(n, r),
            1 + 0.1 * torch.randn(n) if scaled else None,
            0.1 * torch.randn(n) if scaled else None,
            0.1 * torch.randn(n, k) if k else None,
            0.1 * torch.randn(n, k) if k else None,
        )
        for n in layer.output_slices
    ]


def punica_wrapper(indices: list[int], max_loras: int, prefill: bool, vocab_size: int = 32000):
    """vLLM's CPU punica wrapper with its metadata set for a step whose tokens have these slots."""
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    wrapper = PunicaWrapperCPU(max(64, len(indices)), 16, "cpu")
    lora_ids = [100 + slot for slot in range(max_loras)]
    ids = [0 if slot < 0 else lora_ids[slot] for slot in indices]
    wrapper.update_metadata(LoRAMapping(ids, ids, is_prefill=prefill), lora_ids, max_loras + 1, vocab_size)
    assert wrapper.token_lora_indices.tolist() == indices
    return wrapper


def per_slot_reference(slot_factors: dict[int, list[ServingFactors]], indices: torch.Tensor, x, base, sizes):
    """float64 ServingFactors.apply, slot by slot and slice by slice; -1 rows stay base."""
    expected = base.double()
    for slot, factors in slot_factors.items():
        rows = (indices == slot).nonzero().squeeze(1)
        if len(rows):
            expected[rows] = torch.cat(
                [
                    f.to(torch.float64).apply(x[rows].double(), part)
                    for f, part in zip(factors, base[rows].double().split(sizes, dim=1))
                ],
                dim=1,
            )
    return expected


# Token -> slot layouts, and the strategy of the grouped backend each one takes.
LAYOUTS = {
    "one slot, whole batch": ([1] * 6, "one slot"),
    "one slot, prefill-sized": ([1] * 40, "one slot"),  # past prepacked.MAX_PREPACKED_ROWS: torch's matmul
    "decode, one token per slot": ([0, 1, 2, 3, 4], "padded"),
    "uneven counts and base rows": ([0, 1, -1, 2, 3, 1, -1, 0, 1], "padded"),
    "slots absent inside the range": ([4, 0, 2, -1, 0, 2, 4], "padded"),
    "base rows only": ([-1, -1, -1], "none"),
    "very uneven (prefill)": ([2] * 12 + [0, -1, 1], "per slot"),
}
# Slots mix ranks 0-16, rotation ranks 0-4 and scale/shift on or off, so padding to the largest rank is exercised.
SLOT_SPECS = [(4, 0, False), (8, 4, True), (16, 2, True), (2, 0, True), (1, 3, False)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "backend,prefill",
    [("grouped", True), ("punica", False), ("punica", True)],
    ids=["grouped", "punica-decode", "punica-prefill"],
)
def test_backend_gives_every_token_its_slot(layout, backend, prefill, monkeypatch):
    """Both backends give each row its own slot's ServingFactors.apply (the base output includes the
    bias), slot -1 rows untouched; the punica backend through vLLM's decode (bgmv) and prefill
    (sgmv) kernels' CPU forms, the grouped one through every strategy of its plan."""
    apply()
    cpu_ops.patch_cpu_ops(backend)
    torch.manual_seed(0)
    layer = plugin_layer(backend=backend, monkeypatch=monkeypatch)
    slots = {slot: random_factors(layer, *spec) for slot, spec in enumerate(SLOT_SPECS)}
    for slot, factors in slots.items():
        layer.set_lora(slot, SlotFactors(factors), [f.lora_B for f in factors])
    indices, strategy = LAYOUTS[layout]
    layer.punica_wrapper = punica_wrapper(indices, len(SLOT_SPECS), prefill)
    grouped.new_step()
    if backend == "grouped":
        plan, _ = grouped.step_plan(layer.punica_wrapper, len(indices), layer.sora_failed)
        assert (
            "none" if not plan.slots else "one slot" if plan.rows is None else "padded" if plan.balanced else "per slot"
        ) == strategy
    x = torch.randn(len(indices), 32)
    base = layer._get_quant_method().apply(layer, x, layer.base_layer.bias)
    result = layer.apply(x, layer.base_layer.bias)
    index_tensor = torch.tensor(indices)
    assert torch.allclose(
        result.double(), per_slot_reference(slots, index_tensor, x, base, layer.output_slices), **FP32_TOL
    )
    assert torch.equal(result[index_tensor == -1], base[index_tensor == -1])


def test_padded_path_follows_slots_rewritten_after_it_ran(monkeypatch):
    """The padded path reads compact copies of the slots' factors below the buffers' width
    (`grouped.padded_operands`): after a step, a slot rewritten at the same ranks, one reset, and
    one given larger ranks are what the next steps compute, against float64."""
    apply()
    torch.manual_seed(5)
    layer = plugin_layer(monkeypatch=monkeypatch)
    indices = [0, 1, 2, -1, 1, 0]
    layer.punica_wrapper = punica_wrapper(indices, 5, prefill=False)
    slots = {slot: random_factors(layer, 4, 2, True) for slot in range(3)}

    def check_step():
        for slot, factors in slots.items():
            if factors:
                layer.set_lora(slot, SlotFactors(factors), [f.lora_B for f in factors])
        grouped.new_step()
        x = torch.randn(len(indices), 32)
        base = layer._get_quant_method().apply(layer, x, layer.base_layer.bias)
        expected = per_slot_reference(
            {s: f for s, f in slots.items() if f}, torch.tensor(indices), x, base, layer.output_slices
        )
        with torch.inference_mode():  # as vLLM runs the forward; the slot writes run outside it
            result = layer.apply(x, layer.base_layer.bias)
        assert torch.allclose(result.double(), expected, **FP32_TOL)

    check_step()
    assert set(layer.sora_at_rank) == {(12, 6)}  # 3 slices x (4, 2), below the width 3 x 16
    slots[1] = random_factors(layer, 4, 2, False)
    check_step()
    layer.reset_lora(2)
    slots[2] = None
    check_step()
    slots[0] = random_factors(layer, 8, 3, True)
    check_step()
    assert (24, 9) in layer.sora_at_rank and len(layer.sora_at_rank) <= grouped.AT_RANK_KEPT


def test_grouped_plan_is_built_once_per_step():
    """Every layer of a step shares the plan; a new step (vLLM rewrote the indices in place, as it
    does every step, version counter bumped or not) rebuilds it."""
    buffer = torch.tensor([0, 0, 1, -1])
    wrapper = SimpleNamespace(token_lora_indices=buffer)
    grouped.new_step()
    flags = isolation.failure_flags(2, "cpu")
    first, masks = grouped.step_plan(wrapper, 4, flags)
    assert grouped.step_plan(wrapper, 4, flags)[0] is first and first.slots == [0, 1] and first.counts == [2, 1]
    assert masks.adapted.tolist() == [True, True, True, False] and masks.flag_index.tolist() == [0, 0, 1, 2]
    buffer.data.copy_(torch.tensor([2, 2, 2, 2]))  # .data: no version bump
    grouped.new_step()
    second, _ = grouped.step_plan(wrapper, 4, flags)
    assert second.slots == [2] and second.rows is None


@pytest.mark.parametrize("entry", ["plugin factors", "vLLM plain A/B"])
def test_grouped_packs_a_slots_slices_side_by_side(entry, monkeypatch):
    """The grouped backend's packed buffers hold slice i's A rows and its Bᵀ, U, Vᵀ blocks on its own
    output columns, zeros elsewhere, for plugin factors of uneven ranks and for vLLM's plain A/B
    (its dummy LoRAs, at the max rank); one slot over the whole batch then matches float64."""
    apply()
    torch.manual_seed(3)
    layer = plugin_layer(monkeypatch=monkeypatch)
    sizes, r_of, k_of = layer.output_slices, [3, 16, 7], [2, 0, 4]
    factors = [
        ServingFactors(
            torch.randn(r, 32), torch.randn(n, r), None, None, *((0.1 * torch.randn(n, k),) * 2 if k else (None, None))
        )
        for n, r, k in zip(sizes, r_of, k_of)
    ]
    if entry == "vLLM plain A/B":
        factors = [ServingFactors(f.lora_A, f.lora_B) for f in factors]
        layer.set_lora(2, [f.lora_A for f in factors], [f.lora_B for f in factors])
        r_of, k_of = [16] * 3, [0] * 3  # vLLM's slot rank: zero-padded A and B
    else:
        layer.set_lora(2, SlotFactors(factors), [f.lora_B for f in factors])
    a, bt, u, vt = (
        t[2] for t in (layer.sora_packed_a, layer.sora_packed_bt, layer.sora_packed_u, layer.sora_packed_vt)
    )
    assert layer.sora_slots[2].rank == sum(r_of) and layer.sora_slots[2].rot_rank == sum(k_of)
    col, r0, k0 = 0, 0, 0
    for f, n, r, k in zip(factors, sizes, r_of, k_of):
        rows, cols = slice(r0, r0 + r), slice(col, col + n)
        r_real = f.lora_A.shape[0]
        assert torch.equal(a[r0 : r0 + r_real], f.lora_A) and not a[r0 + r_real : r0 + r].any()
        assert torch.equal(bt[r0 : r0 + r_real, cols], f.lora_B.T)
        assert not bt[rows, :col].any() and not bt[rows, col + n :].any()
        if k:
            assert torch.equal(u[cols, k0 : k0 + k], f.rot_U) and torch.equal(vt[k0 : k0 + k, cols], f.rot_V.T)
            assert not u[:col, k0 : k0 + k].any() and not vt[k0 : k0 + k, col + n :].any()
        col, r0, k0 = col + n, r0 + r, k0 + k
    assert not a[r0:].any() and not u[:, k0:].any()
    layer.punica_wrapper = punica_wrapper([2] * 5, 5, prefill=False)
    grouped.new_step()
    x = torch.randn(5, 32)
    base = layer._get_quant_method().apply(layer, x, layer.base_layer.bias)
    expected = per_slot_reference({2: factors}, torch.full((5,), 2), x, base, sizes)
    assert torch.allclose(layer.apply(x, layer.base_layer.bias).double(), expected, **FP32_TOL)
    layer.reset_lora(2)
    assert not any(t[2].any() for t in (layer.sora_packed_a, layer.sora_packed_bt, layer.sora_packed_u))


def test_slot_reused_by_a_plain_lora_or_reset_has_identity_extras(monkeypatch):
    """A slot that held a SORA adapter and then vLLM's own plain A/B (its dummy LoRAs), or is reset,
    returns to scale 1, shift 0, no rotation: the padded path and the punica gathers read them."""
    layer = plugin_layer(monkeypatch=monkeypatch)
    factors = random_factors(layer, 8, 4, True)
    for refill in ("plain", "reset"):
        layer.set_lora(1, SlotFactors(factors), [f.lora_B for f in factors])
        assert layer.sora_slots[1].rot_rank == 3 * 4 and layer.sora_slots[1].scaled  # summed over 3 slices
        if refill == "plain":
            layer.set_lora(1, [f.lora_A for f in factors], [f.lora_B for f in factors])
            assert torch.equal(layer.lora_a_stacked[0][1, 0, :8], factors[0].lora_A)
        else:
            layer.reset_lora(1)
            assert not layer.lora_a_stacked[0][1].any()
        assert layer.sora_slots[1].rot_rank == 0 and not layer.sora_slots[1].scaled
        for i, n in enumerate(layer.output_slices):
            assert (
                not layer.sora_rot_u[i][1].any()
                and not layer.sora_rot_v[i][1].any()
                and not layer.sora_shift[i][1].any()
            )
            assert torch.equal(layer.sora_scale[i][1], torch.ones(n))
            assert (
                torch.equal(layer.sora_scale[i][-1], torch.ones(n)) and not layer.sora_shift[i][-1].any()
            )  # slot -1's row


def test_punica_backend_compiles_as_one_graph(monkeypatch):
    """A decode step (what CUDA graphs capture) through the punica backend, base GEMM, slot
    gathers, both shrink/expand pairs and the isolation mask, traces into one graph: no
    `.item()`, `.tolist()` or data-dependent branch in our code (vLLM CPU's ops: the graph-safe mend)."""
    apply()
    cpu_ops.patch_cpu_ops("punica")
    torch.manual_seed(4)
    layer = plugin_layer(backend="punica", monkeypatch=monkeypatch)
    for slot, spec in enumerate(SLOT_SPECS[:3]):
        factors = random_factors(layer, *spec)
        layer.set_lora(slot, SlotFactors(factors), [f.lora_B for f in factors])
    layer.punica_wrapper = punica_wrapper([0, -1, 2, 1, 2], len(SLOT_SPECS), prefill=False)
    x = torch.randn(5, 32)
    compiled = torch.compile(
        lambda inputs: layer.apply(inputs, layer.base_layer.bias), fullgraph=True, backend="aot_eager"
    )
    assert torch.allclose(compiled(x), layer.apply(x, layer.base_layer.bias), atol=1e-6)


class TwoRankAllReduce:
    """vLLM's `tensor_model_parallel_all_reduce` for two ranks running as two threads: each call
    returns the sum of both ranks' tensors of the same call, as the collective does."""

    def __init__(self):
        self.barrier, self.inputs = threading.Barrier(2, timeout=30), {}

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        self.inputs[threading.current_thread().name] = t
        self.barrier.wait()
        total = sum(self.inputs.values())
        self.barrier.wait()  # both have read before the next call overwrites
        return total


def column_shard(f: ServingFactors, rank: int) -> ServingFactors:
    """Rank `rank` of 2 of a column-parallel slice: output rows split, A whole (what vLLM's slice_lora_b does)."""

    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.chunk(2, dim=0)[rank]

    return ServingFactors(f.lora_A, rows(f.lora_B), rows(f.scale), rows(f.bias_shift), rows(f.rot_U), rows(f.rot_V))


# Token -> adapter layouts; each rank maps adapters to its own slots.
TP_LAYOUTS = {
    "decode": [0, 1, 2, -1],
    "uneven": [0, 1, -1, 2, 1, 0, 2, 2],
    "one adapter": [2] * 5,
    "prefill": [1] * 12 + [0, -1, 2],
}


@pytest.mark.parametrize("layout", TP_LAYOUTS)
@pytest.mark.parametrize("backend", ["grouped", "punica"])
def test_column_parallel_ranks_agree_whatever_slots_hold_the_adapters(layout, backend, monkeypatch):
    """Each TP worker's LoRA manager fills slots in the order of a set hashed by adapter name, so
    rank 0 and rank 1 can hold the same adapters in different slots. The rotation's all-reduced
    (z U) must pair each token with itself, not each slot: summed in slot order, the grouped backend
    mixed two adapters' projections (its padded path failed the TP=2 engine test 3 runs in 4; its
    per-slot path fails here whenever two rotations sit in opposite slot order on the two ranks)."""
    apply()
    cpu_ops.patch_cpu_ops(backend)
    monkeypatch.setenv("SORA_SERVE_VLLM_BACKEND", backend)
    monkeypatch.setattr("vllm.distributed.tensor_model_parallel_all_reduce", TwoRankAllReduce())
    monkeypatch.setattr(grouped, "parallel_kind", lambda layer: "column")
    monkeypatch.setattr(punica, "parallel_kind", lambda layer: "column")
    torch.manual_seed(5)
    sizes, in_f = (24, 8, 8), 32
    weight, bias = torch.randn(sum(sizes), in_f) / in_f**0.5, 0.1 * torch.randn(sum(sizes))
    specs = [(8, 0, True), (4, 3, True), (6, 2, False)]  # two rotations of different ranks, one scale-only
    full = [
        random_factors(SimpleNamespace(lora_a_stacked=[torch.zeros(1, 1, 1, in_f)], output_slices=sizes), *spec)
        for spec in specs
    ]
    slot_of = [{0: 0, 1: 1, 2: 2}, {0: 1, 1: 2, 2: 0}]  # adapter -> slot, per rank: the two rotations in opposite order
    adapters = TP_LAYOUTS[layout]
    x = torch.randn(len(adapters), in_f)
    results = [None, None]

    def serve_rank(rank: int) -> None:
        def shard(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([part.chunk(2, dim=0)[rank] for part in t.split(sizes)])

        layer = PluginLayer(shard(weight), shard(bias), tuple(n // 2 for n in sizes))
        layer.tp_size = 2
        layer.create_lora_weights(3, SimpleNamespace(max_lora_rank=16, fully_sharded_loras=False))
        for adapter, slot in slot_of[rank].items():
            factors = [column_shard(f, rank) for f in full[adapter]]
            layer.set_lora(slot, SlotFactors(factors), [f.lora_B for f in factors])
        layer.punica_wrapper = punica_wrapper(
            [-1 if a < 0 else slot_of[rank][a] for a in adapters], 3, prefill=layout == "prefill"
        )
        results[rank] = layer.apply(x, layer.base_layer.bias)

    grouped.new_step()
    threads = [threading.Thread(target=serve_rank, args=(rank,), name=f"rank{rank}") for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = per_slot_reference(dict(enumerate(full)), torch.tensor(adapters), x, x @ weight.T + bias, sizes)
    for rank, result in enumerate(results):
        halves = torch.cat([part.chunk(2, dim=1)[rank] for part in expected.split(sizes, dim=1)], dim=1)
        assert torch.allclose(result.double(), halves, **FP32_TOL), f"rank {rank}"


# ------------------------------------------------------------------ factors at load


def packed_float64_layer(monkeypatch, sizes=(24, 8, 8), in_f=32):
    """A qkv-like float64 plugin layer, with ||W0||^2 per row recorded as the plugin does when vLLM
    processes the loaded weights; W0 is then gone from the layer (vLLM CPU drops it after repacking)."""
    from sora_serve.vllm_plugin.activation import record_row_norms

    layer = plugin_layer(sizes, in_f, max_loras=2, dtype=torch.float64, monkeypatch=monkeypatch)
    base = SimpleNamespace(weight=layer._gemm.weight, bias=layer.base_layer.bias)
    record_row_norms(base)
    del base.weight
    layer.base_layer = base
    return layer, layer._gemm.weight


METHODS = {
    "lora": dict(method="lora"),
    "dora": dict(method="dora"),
    "prediag": dict(method="prediag"),
    "sora_first_order": dict(method="sora", rotation="first_order"),
    "sora_cayley": dict(method="sora", rotation="cayley"),
}


@pytest.mark.parametrize("kind", METHODS)
def test_activation_factors_equal_the_dense_formula(kind, tmp_path, monkeypatch):
    """Factors computed once at load, per slice of a packed layer with a bias, equal each method's
    float64 `serving_factors` on a dense view of (W0, b) to 1e-10; the plugin's DoRA factors come
    from the norms recorded at load and one GEMM of the layer on all slices' A, never from W0.
    Entering a slot copies exactly those factors."""
    import sora_serve as ss
    from sora_serve.methods import BaseView
    from sora_serve.vllm_plugin.activation import StackedProjections, slice_factors

    from .helpers import write_random_adapter

    torch.manual_seed(3)
    layer, weight = packed_float64_layer(monkeypatch)
    names = ["q_proj", "k_proj", "v_proj"]
    model = torch.nn.ModuleDict(
        {n: torch.nn.Linear(32, size, dtype=torch.float64) for n, size in zip(names, layer.output_slices)}
    )
    config = ss.AdapterConfig(r=6, r_p=3, target_modules=names, **METHODS[kind])
    adapter = ss.read_adapter(write_random_adapter(tmp_path / kind, config, model=model, scale=0.2, seed=7))
    offsets = [0, 24, 32, 40]
    gemm_calls = []
    quant_method = layer._get_quant_method()
    stock_apply = quant_method.apply
    monkeypatch.setattr(quant_method, "apply", lambda *a, **k: gemm_calls.append(1) or stock_apply(*a, **k))
    projections = StackedProjections(layer, [adapter.tensors[n]["lora_A"] for n in names])
    for i, name in enumerate(names):
        rows = slice(offsets[i], offsets[i + 1])
        dense = adapter.serving_factors(name, BaseView(weight[rows], layer.base_layer.bias[rows]))
        got = slice_factors(layer, i, adapter, name, projections)
        for field, expected in vars(dense).items():
            actual = getattr(got, field)
            assert (actual is None) == (expected is None), field
            if expected is not None:
                assert torch.allclose(actual, expected, rtol=1e-10, atol=1e-12), (
                    name,
                    field,
                    (actual - expected).abs().max(),
                )
        factors = [got if j == i else None for j in range(3)]
        layer.set_lora(1, SlotFactors(factors), [None if f is None else f.lora_B for f in factors])
        assert torch.equal(layer.lora_b_stacked[i][1, 0, :, : got.lora_B.shape[1]], got.lora_B)
        assert layer.sora_slots[1].scaled == (got.scale is not None) and layer.sora_slots[1].rot_rank == (
            0 if got.rot_U is None else got.rot_U.shape[1]
        )
    assert len(gemm_calls) == (1 if kind == "dora" else 0)  # W0 read once for the three slices
    other = torch.randn(2, 32, dtype=torch.float64)  # not slice 0's A: its own GEMM, same answer
    assert torch.allclose(projections.weight_times(0, other), weight @ other.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, dict(atol=0.05, rtol=0.02))])
@pytest.mark.parametrize("rows", [1, 8, prepacked.MAX_PREPACKED_ROWS, prepacked.MAX_PREPACKED_ROWS + 1, 64])
def test_prepacked_factor_is_the_same_gemm(rows, dtype, tol):
    """A slot's factor gives x @ w (+ y) against float64 whichever GEMM runs: vLLM CPU's
    prepacked oneDNN one for decode-sized rows, torch's above; the prepacked copy is taken at the
    first decode-sized call, so later writes to the packed buffer leave it alone until it is rebuilt.
    (bf16: the output's rounding, 2^-8 of values of ~5.)"""
    torch.manual_seed(rows)
    packed = torch.randn(48, 96, dtype=dtype)
    factor = prepacked.Factor(packed[:40].T)  # a rank-40 view of the buffer, as SlotOperands takes
    assert factor.handler is not None  # vLLM CPU has its oneDNN ops here
    assert factor.prepacked_for(torch.empty(rows, 96)) == (rows <= prepacked.MAX_PREPACKED_ROWS)
    x, y = torch.randn(rows, 96, dtype=dtype), torch.randn(rows, 40, dtype=dtype)
    expected = x.double() @ packed[:40].T.double()
    assert torch.allclose(factor(x).double(), expected, **tol)
    assert torch.allclose(factor.add_product(y.clone(), x).double(), y.double() + expected, **tol)
    if factor.prepacked_for(x):
        packed.zero_()
        assert torch.allclose(factor(x).double(), expected, **tol)


def test_slots_prepack_only_for_the_decode_batches_that_run_them_alone(monkeypatch):
    """Writing a slot copies its factors and prepacks nothing (a swap for a mixed wave costs a
    copy); the first decode-sized batch that runs one slot alone prepacks that slot's factors, once,
    and prefill-sized or padded batches never do. Outputs stay exact throughout."""
    built = []
    stock = prepacked._prepack
    monkeypatch.setattr(prepacked, "_prepack", lambda weight: built.append(weight.shape) or stock(weight))
    layer = plugin_layer(monkeypatch=monkeypatch)
    slots = {s: random_factors(layer, 4, 2, scaled=True) for s in (0, 1)}
    for s, factors in slots.items():
        layer.set_lora(s, SlotFactors(factors), None)
    assert built == []

    def run(indices: list[int]) -> None:
        index = torch.tensor(indices)
        x = torch.randn(len(indices), 32)
        base = layer._get_quant_method().apply(layer.base_layer, x, layer.base_layer.bias)
        layer.punica_wrapper = punica_wrapper(indices, 5, prefill=False)
        grouped.new_step()
        expected = per_slot_reference(slots, index, x, base, layer.output_slices)
        assert torch.allclose(layer.apply(x, layer.base_layer.bias), expected.float(), **FP32_TOL)

    run([0, 1, 0, 1])  # padded: both slots in one batched GEMM
    run([0] * (prepacked.MAX_PREPACKED_ROWS + 1))  # prefill-sized: torch's matmul
    assert built == []
    run([1] * 8)  # decode-sized, one slot: its shrink, projection, BᵀU and stacked expansion
    assert len(built) == 4
    run([1] * 4)
    assert len(built) == 4


BF16_LAYOUTS = {"decode": [1] * 8, "prefill": [1] * (prepacked.MAX_PREPACKED_ROWS + 8), "padded": [0, 1, 2, 3, 4, 1]}


@pytest.mark.parametrize("layout", BF16_LAYOUTS)
def test_bf16_slots_match_float64(layout, monkeypatch):
    """In bf16 (the serving dtype), each strategy's steps (p = x Aᵀ; q = z U + p (BᵀU); z += p Bᵀ
    + q Vᵀ, with BᵀU rounded once at slot entry, and the prepacked stacked [Bᵀ; Vᵀ] at decode)
    match float64 ServingFactors.apply on the same bf16 values, to 1% of the output's norm (bf16
    keeps 8 bits; each of the ~4 roundings on the way costs up to 2^-9)."""
    apply()
    torch.manual_seed(11)
    indices = BF16_LAYOUTS[layout]
    layer = plugin_layer(dtype=torch.bfloat16, monkeypatch=monkeypatch)
    slots = {}
    for slot, spec in enumerate(SLOT_SPECS):
        factors = [f.to(torch.bfloat16) for f in random_factors(layer, *spec)]
        layer.set_lora(slot, SlotFactors(factors), [f.lora_B for f in factors])
        slots[slot] = factors
    layer.punica_wrapper = punica_wrapper(indices, len(SLOT_SPECS), prefill=False)
    grouped.new_step()
    x = torch.randn(len(indices), 32, dtype=torch.bfloat16)
    base = layer._get_quant_method().apply(layer, x, layer.base_layer.bias)
    expected = per_slot_reference(slots, torch.tensor(indices), x, base, layer.output_slices)
    error = (layer.apply(x, layer.base_layer.bias).double() - expected).norm() / expected.norm()
    assert error < 0.01


def test_host_checked_quarantine_does_what_the_masked_one_does():
    """The CPU form (one sum read on the host, the masked pass only when it is not finite) leaves a
    finite output and the flags alone, and otherwise zeroes and flags exactly what the masked form does."""
    flags = isolation.failure_flags(4, "cpu")
    isolation.take_failed_slots()
    token_slots = torch.tensor([0, 1, 0, 1, -1])
    finite = torch.randn(5, 6)
    checked = finite.clone()
    isolation.quarantine_rows_host_checked(checked, isolation.token_masks(token_slots, flags), flags)
    assert torch.equal(checked, finite) and not flags.any()
    bad = finite.clone()
    bad[1, 2], bad[4, 5] = float("nan"), float("inf")
    masked, checked = bad.clone(), bad.clone()
    isolation.quarantine_rows(masked, isolation.token_masks(token_slots, flags), flags)
    masked_flags = flags.clone()
    flags.zero_()
    isolation.quarantine_rows_host_checked(checked, isolation.token_masks(token_slots, flags), flags)
    assert torch.equal(checked.nan_to_num(7.0, 7.0), masked.nan_to_num(7.0, 7.0)) and not checked[1].any()
    assert torch.equal(flags, masked_flags) and flags.tolist() == [0, 1, 0, 0, 0]
    flags.zero_()


def test_non_finite_adapter_rows_are_zeroed_and_flagged_on_the_device():
    """Rows of adapter tokens holding NaN/inf are zeroed with masked ops (nothing non-finite reaches
    the KV cache) and counted per slot in a device tensor, read once per step; finite rows and base
    rows (-1) are left as they are."""
    flags = isolation.failure_flags(4, "cpu")
    isolation.take_failed_slots()
    output = torch.randn(5, 6)
    output[1, 2], output[3, 0], output[4, 5] = float("nan"), float("inf"), float("nan")
    token_slots = torch.tensor([0, 1, 0, 1, -1])  # row 4 is a base row: not ours to touch
    before = output.clone()
    isolation.quarantine_rows(output, isolation.token_masks(token_slots, flags), flags)
    assert not output[1].any() and not output[3].any()
    assert torch.equal(output[[0, 2]], before[[0, 2]]) and torch.isnan(output[4, 5])
    assert flags.tolist() == [0, 2, 0, 0, 0]
    assert isolation.take_failed_slots() == {1}
    assert isolation.take_failed_slots() == set() and not flags.any()


def test_failed_requests_are_found_in_either_runner_layout():
    """The step's requests of a flagged slot are marked QUARANTINED in the output, reading the
    request -> adapter map from vLLM 0.32/0.33's persistent input batch or 0.34's LoraState."""
    from types import SimpleNamespace

    from vllm.lora.request import LoRARequest
    from vllm.v1.outputs import ModelRunnerOutput

    manager = SimpleNamespace(_adapter_manager=SimpleNamespace(lora_index_to_id=[7, 9]))  # slot 1 holds adapter 9
    old_batch = SimpleNamespace(req_ids=["a", "b", "c"], request_lora_mapping=torch.tensor([9, 0, 7]))
    new_state = SimpleNamespace(lora_requests={"a": LoRARequest("x", 9, "/x"), "c": LoRARequest("y", 7, "/y")})
    for runner in (
        SimpleNamespace(lora_manager=manager, input_batch=old_batch),
        SimpleNamespace(lora_manager=manager, lora_state=new_state),
    ):
        flags = isolation.failure_flags(2, "cpu")
        flags[1] = 3
        output = ModelRunnerOutput(req_ids=["a", "b", "c"], req_id_to_index={"a": 0, "b": 1, "c": 2})
        isolation.mark_failed_requests(output, runner)
        assert output.num_nans_in_logits == {"a": isolation.QUARANTINED}
