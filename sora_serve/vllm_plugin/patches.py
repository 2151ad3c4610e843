"""The plugin's patches to vLLM 0.32's LoRA path. Each keeps vLLM's own code for what it does right.

1. Loading (`LoRAModel.from_local_checkpoint`, `PEFTHelper.validate_legal`): adapter dirs that
   need more than A/B (our PREDIAG/SORA, PEFT DoRA) are read and validated by
   `sora_serve.read_adapter`; vLLM gets their A/B as usual and the `LoRAModel` carries the
   whole `AdapterFile`. Plain LoRA dirs take vLLM's path untouched.
2. Activation (`LoRAModelManager.activate_adapter`): when an adapter enters slot i, each linear
   layer's slot i is filled with that adapter's `ServingFactors`, computed from the layer's own
   base weight (DoRA's g needs it), slice by slice for packed layers (qkv_proj, gate_up_proj).
   At load (`_validate_modules_to_save`, vLLM's own validation hook) an adapter is refused,
   naming the module, unless every module it adapts is a plain unquantized linear LoRA layer;
   at engine start (`register_module`) the per-slot extras are allocated and TP > 1 is refused.
3. The op (`BaseLinearLayerWithLoRA._apply_lora_to_output`): tokens are grouped by slot once
   per step, and every slot present runs `ServingFactors.apply` in batched GEMMs over a padded
   (slots, tokens per slot) layout, each slot's factors read once (one GEMM per slot when
   padding would more than double the work). Slot -1 (no adapter) is left at the base output;
   vLLM CPU's stock ops index weights[-1], the last slot, instead.
4. vLLM CPU's torch LoRA ops (still used by embedding and logits LoRA layers): the same
   grouped GEMMs, -1 rows left alone.
5. Unload (`OpenAIServingModels.unload_lora_adapter`): also removes the adapter from the engine,
   so its slot is freed, not only its name.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from sora_serve.errors import AdapterError
from sora_serve.io import CONFIG_FILE, PEFT_PREFIX, AdapterFile, adapter_from_tensors, read_adapter
from sora_serve.methods import ServingFactors

_APPLIED = False


def needs_plugin(lora_dir: str) -> bool:
    """True for adapter dirs stock vLLM cannot serve but we can (ours, PEFT DoRA)."""
    try:
        with open(os.path.join(lora_dir, CONFIG_FILE)) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False  # let vLLM report it
    return raw.get("peft_type") in ("PREDIAG", "SORA") or bool(raw.get("use_dora"))


# ------------------------------------------------------------------ 1. loading


def patch_loading() -> None:
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import get_lora_id, parse_fine_tuned_lora_name

    stock_load = LoRAModel.from_local_checkpoint.__func__
    stock_validate = PEFTHelper.validate_legal

    @functools.wraps(stock_validate)
    def validate_legal(self, lora_config):
        use_dora, self.use_dora = self.use_dora, False  # DoRA is served by this plugin
        try:
            stock_validate(self, lora_config)
        finally:
            self.use_dora = use_dora

    @functools.wraps(stock_load)
    def from_local_checkpoint(cls, lora_dir, expected_lora_modules, peft_helper, **kwargs):
        if not needs_plugin(lora_dir):
            return stock_load(cls, lora_dir, expected_lora_modules, peft_helper, **kwargs)
        adapter = read_adapter(lora_dir)
        tensors = {}
        for path, t in adapter.tensors.items():
            if path.rsplit(".", 1)[-1] not in expected_lora_modules:
                raise ValueError(f"While loading {lora_dir}, expected target modules in {expected_lora_modules} but received {path}.")
            # Copies: vLLM scales lora_b in place (LoRALayerWeights.optimize); our factors need the originals.
            tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = t["lora_A"].clone()
            tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = t["lora_B"].clone()
        model = cls.from_lora_tensors(
            lora_model_id=kwargs.get("lora_model_id") or get_lora_id(),
            tensors=tensors,
            peft_helper=peft_helper,
            device=kwargs.get("device", "cpu"),
            dtype=kwargs.get("dtype"),
            model_vocab_size=kwargs.get("model_vocab_size"),
            weights_mapper=kwargs.get("weights_mapper"),
            skip_prefixes=kwargs.get("skip_prefixes"),
        )
        mapper = kwargs.get("weights_mapper")
        model.sora_adapter = adapter
        model.sora_paths = {parse_fine_tuned_lora_name(f"{PEFT_PREFIX}{p}.lora_A.weight", mapper)[0]: p for p in adapter.tensors}
        return model

    PEFTHelper.validate_legal = validate_legal
    LoRAModel.from_local_checkpoint = classmethod(from_local_checkpoint)


# ------------------------------------------------------------------ 2. activation


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


def slice_paths(module_name: str, packed_modules_mapping: dict[str, list[str]]) -> list[str]:
    """HF module names of a vLLM layer's output slices (qkv_proj -> q_proj, k_proj, v_proj)."""
    prefix, _, last = module_name.rpartition(".")
    names = packed_modules_mapping.get(last, [last])
    return [f"{prefix}.{n}" if prefix else n for n in names]


def fill_plain_lora_slot(layer, index: int, lora_weights) -> None:
    """vLLM already copied A/B; record the rank so the op skips the zero padding."""
    state = slot_state(layer)
    state.rank[index] = 0 if lora_weights is None else _max_rank(lora_weights)
    state.rot_rank[index], state.has_scale[index], state.has_shift[index] = 0, False, False
    for i in range(len(layer.output_slices)):
        _reset_extras(state, i, index)  # the gathered path reads them, padded, for every slot


def _reset_extras(state: SlotState, i: int, index: int) -> None:
    """Identity extras for slice i of slot `index`: scale 1, shift 0, no rotation."""
    state.scale[i][index] = 1
    state.shift[i][index] = 0
    state.rot_ut[i][index].zero_()
    state.rot_vt[i][index].zero_()


def _max_rank(lora_weights) -> int:
    a = lora_weights.lora_a
    return max((t.shape[0] for t in a if t is not None), default=0) if isinstance(a, list) else a.shape[0]


def fill_adapter_slot(layer, index: int, module_name: str, lora_model, packed_modules_mapping) -> None:
    """Write the adapter's ServingFactors for every slice of this layer into slot `index`.

    Factors are computed over the slice's full (unsharded) shape, then cut to this rank's shard
    by vLLM's own LoRA slicing, so every tensor-parallel layout vLLM supports is followed."""
    adapter: AdapterFile = lora_model.sora_adapter
    by_vllm_name = {v: k for k, v in lora_model.sora_paths.items()}
    state = slot_state(layer)
    _require_plain_weights(layer, module_name)
    offsets = [0]
    for n in layer.output_slices:
        offsets.append(offsets[-1] + n)
    state.rank[index] = state.rot_rank[index] = 0
    state.has_scale[index] = state.has_shift[index] = False
    local_weight = base_weight(layer) if adapter.method == "dora" else None
    for i, hf_name in enumerate(slice_paths(module_name, packed_modules_mapping)):
        path = lora_model.sora_paths.get(hf_name, by_vllm_name.get(hf_name, hf_name))
        _reset_slice(layer, state, i, index)
        if path not in adapter.tensors:
            continue
        tensors = adapter.tensors[path]
        shape = (tensors["lora_B"].shape[0], tensors["lora_A"].shape[1])
        if local_weight is None:  # only DoRA's g and bias shift read W0 and b; the others need the shape alone
            weight, bias = torch.empty(shape, dtype=torch.float64, device="meta"), None
        else:
            weight, bias = full_slice_weight(layer, i, local_weight[offsets[i] : offsets[i + 1]], offsets, shape[0])
        factors = adapter_from_tensors(adapter.module_configs[path], tensors, weight).serving_factors(weight, bias)
        _write_slice(layer, state, i, index, shard_factors(layer, i, factors))


def _shard(layer, i: int, t: torch.Tensor, which: str) -> torch.Tensor:
    """This rank's part of slice i's full-size tensor, by the layer's `slice_lora_a`/`slice_lora_b`
    (B's rows: output rows; A's columns: input columns)."""
    if layer.tp_size == 1:
        return t
    slicer = getattr(layer, f"slice_lora_{which}")
    if layer.n_slices == 1:
        return slicer(t)
    parts = [None] * layer.n_slices
    parts[i] = t
    return slicer(parts)[i]


def shard_factors(layer, i: int, f: ServingFactors) -> ServingFactors:
    """Column-parallel: output rows of B, scale, shift, U, V. Row-parallel: input columns of A, and
    the bias shift on rank 0 only (vLLM sums the ranks' partial outputs, bias included once)."""
    kind = parallel_kind(layer)
    if kind == "replicated":
        return f
    if kind == "row":
        shift = f.bias_shift if layer.tp_rank == 0 else None
        return ServingFactors(_shard(layer, i, f.lora_A, "a"), f.lora_B, f.scale, shift, f.rot_U, f.rot_V)
    rows = lambda t: None if t is None else _shard(layer, i, t, "b")  # noqa: E731
    vector_rows = lambda t: None if t is None else rows(t[:, None])[:, 0]  # noqa: E731
    return ServingFactors(f.lora_A, rows(f.lora_B), vector_rows(f.scale), vector_rows(f.bias_shift), rows(f.rot_U), rows(f.rot_V))


def full_slice_weight(layer, i: int, local: torch.Tensor, offsets: list[int], out_features: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W0 (out x in) and b of slice i, whole (DoRA's g = m / rownorm(W0 + sBA) needs whole rows).

    Under tensor parallelism the ranks all-gather their shards; activation runs in lockstep on
    every rank. Column-parallel shards are placed by their global row ids, which vLLM's own
    slicing of arange(out) yields (q/k/v heads and replicated kv heads included)."""
    bias = layer.base_layer.bias
    kind = parallel_kind(layer)
    if kind == "replicated":
        return local, None if bias is None else bias[offsets[i] : offsets[i + 1]].detach().double()
    from vllm.distributed import tensor_model_parallel_all_gather

    if kind == "row":  # input columns split in rank order; the bias is whole on every rank
        weight = tensor_model_parallel_all_gather(local.float().contiguous(), dim=1).double()
        return weight, None if bias is None else bias.detach().double()
    row_ids = _shard(layer, i, torch.arange(out_features, dtype=torch.float32, device=local.device)[:, None], "b")
    columns = [row_ids, local.float()]
    if bias is not None:
        columns.append(bias[offsets[i] : offsets[i + 1]].detach().float()[:, None])
    gathered = tensor_model_parallel_all_gather(torch.cat(columns, dim=1).contiguous(), dim=0).double()
    whole = gathered.new_empty(out_features, gathered.shape[1] - 1)
    whole[gathered[:, 0].long()] = gathered[:, 1:]
    in_features = local.shape[1]
    return whole[:, :in_features], None if bias is None else whole[:, in_features]


@torch.no_grad()
def base_weight(layer) -> torch.Tensor:
    """This rank's W0 (out x in, float64) of a vLLM linear layer. vLLM CPU repacks weights for
    oneDNN and drops `.weight`, so W0 is read back through the layer's own GEMM on the identity (exact)."""
    eye = torch.eye(layer.input_size, dtype=layer.lora_a_stacked[0].dtype, device=layer.device)
    return layer._get_quant_method().apply(layer.base_layer, eye, None).T.double()


def _require_plain_weights(layer, module_name: str) -> None:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    if not isinstance(layer.base_layer.quant_method, UnquantizedLinearMethod):
        raise ValueError(f"sora-serve cannot serve adapter module '{module_name}' in vLLM: its layer is quantized; Pre-Diag/SORA/DoRA need its plain weight")
    if layer.base_layer.bias is not None and layer.base_layer.skip_bias_add:
        raise ValueError(f"sora-serve cannot serve adapter module '{module_name}' in vLLM: its layer adds the bias outside the LoRA op (skip_bias_add)")


def _reset_slice(layer, state: SlotState, i: int, index: int) -> None:
    layer.lora_a_stacked[i][index].zero_()
    layer.lora_b_stacked[i][index].zero_()
    _reset_extras(state, i, index)


def _write_slice(layer, state: SlotState, i: int, index: int, f: ServingFactors) -> None:
    dtype = layer.lora_a_stacked[i].dtype
    r = f.lora_A.shape[0]
    layer.lora_a_stacked[i][index, 0, :r].copy_(f.lora_A.to(dtype))
    layer.lora_b_stacked[i][index, 0, :, :r].copy_(f.lora_B.to(dtype))
    state.rank[index] = max(state.rank[index], r)
    if f.scale is not None:
        state.scale[i][index].copy_(f.scale.to(dtype))
        state.has_scale[index] = True
    if f.bias_shift is not None:
        state.shift[i][index].copy_(f.bias_shift.to(dtype))
        state.has_shift[index] = True
    if f.rot_U is not None:
        k = f.rot_U.shape[1]
        if k > state.rot_ut[i].shape[1]:
            raise ValueError(f"sora-serve: SORA rotation rank 2*r_p = {k} exceeds max_lora_rank {state.rot_ut[i].shape[1]}")
        state.rot_ut[i][index, :k].copy_(f.rot_U.T.to(dtype))
        state.rot_vt[i][index, :k].copy_(f.rot_V.T.to(dtype))
        state.rot_rank[index] = max(state.rot_rank[index], k)


def patch_activation() -> None:
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.model_manager import LoRAModelManager

    stock_activate = LoRAModelManager.activate_adapter

    @functools.wraps(stock_activate)
    def activate_adapter(self, lora_id: int) -> bool:
        activated = stock_activate(self, lora_id)
        if not activated:
            return activated
        index = self.lora_index_to_id.index(lora_id)
        lora_model = self._registered_adapters[lora_id]
        for module_name, module in self.modules.items():
            if isinstance(module, BaseLinearLayerWithLoRA):
                if hasattr(lora_model, "sora_adapter"):
                    fill_adapter_slot(module, index, module_name, lora_model, self.packed_modules_mapping)
                else:
                    fill_plain_lora_slot(module, index, self._get_lora_layer_weights(lora_model, module_name))
        return activated

    stock_validate = LoRAModelManager._validate_modules_to_save

    @functools.wraps(stock_validate)
    def validate_at_load(self, lora_model) -> None:
        """Runs inside vLLM's adapter loading, before any slot is touched: errors are load errors."""
        stock_validate(self, lora_model)
        if hasattr(lora_model, "sora_adapter"):
            check_servable(lora_model, self.modules, self.packed_modules_mapping)

    stock_register = LoRAModelManager.register_module

    @functools.wraps(stock_register)
    def register_module(self, module_name: str, module) -> None:
        stock_register(self, module_name, module)
        if isinstance(module, BaseLinearLayerWithLoRA):
            slot_state(module)  # allocate the extras at engine start; refuses TP > 1 there

    LoRAModelManager.activate_adapter = activate_adapter
    LoRAModelManager._validate_modules_to_save = validate_at_load
    LoRAModelManager.register_module = register_module


def check_servable(lora_model, modules: dict, packed_modules_mapping: dict[str, list[str]]) -> None:
    """Every adapted module must be a plain (unquantized) linear LoRA layer of this vLLM model.

    Fails closed, naming the module: an embedding, MoE expert or quantized layer would otherwise
    be served partially or with the wrong W0."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    packed_parent = {part: packed for packed, parts in packed_modules_mapping.items() for part in parts}
    for vllm_name, path in lora_model.sora_paths.items():
        prefix, _, last = vllm_name.rpartition(".")
        layer_name = f"{prefix}.{packed_parent.get(last, last)}" if prefix else packed_parent.get(last, last)
        layer = modules.get(layer_name)
        if not isinstance(layer, BaseLinearLayerWithLoRA):
            kind = "not found" if layer is None else f"a {type(layer).__name__}, not a plain linear layer"
            raise ValueError(f"sora-serve cannot serve adapter module '{path}' in vLLM: '{layer_name}' is {kind}")
        _require_plain_weights(layer, path)


# ------------------------------------------------------------------ 3. the op


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


# ------------------------------------------------------------------ 4. vLLM CPU's other LoRA ops


def slot_matmul(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """out[t] = weights[indices[t]] @ inputs[t], one GEMM per slot; rows with index -1 (no adapter) are 0.

    Stands in for the per-token gather `weights[indices]` of vLLM's torch ops, where -1 wraps to
    the last slot."""
    weights = weights.squeeze(1) if weights.ndim == 4 else weights
    out = torch.zeros(indices.shape[0], weights.shape[1], dtype=dtype, device=inputs.device)
    for slot in torch.unique(indices).tolist():
        if slot >= 0:
            rows = (indices == slot).nonzero().squeeze(1)
            out.index_copy_(0, rows, inputs.index_select(0, rows).to(dtype) @ weights[slot].to(dtype).T)
    return out


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0) -> None:
    out = slot_matmul(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : out.shape[1]] = scaling * out


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True) -> None:
    out = slot_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    rows = 1 if out.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    columns = min(out.shape[1], output_tensor.shape[1])  # adapter and model may pad differently
    if add_inputs:
        output_tensor[:, :columns] += out[:rows, :columns]
    else:
        output_tensor[:, :columns] = out[:rows, :columns]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int, add_inputs: bool = True) -> None:
    out = slot_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += out
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = out


def patch_cpu_ops() -> None:
    """The layers the grouped op does not replace (embeddings, logits) still call vLLM's torch ops."""
    import vllm.lora.ops.torch_ops as torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for module in (lora_ops, torch_ops, punica_cpu):  # sgmv_* call lora_ops' names; punica_cpu bound its own
        module.bgmv_shrink, module.bgmv_expand, module.bgmv_expand_slice = bgmv_shrink, bgmv_expand, bgmv_expand_slice


# ------------------------------------------------------------------ 5. unload


def patch_unload() -> None:
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    stock_unload = OpenAIServingModels.unload_lora_adapter

    @functools.wraps(stock_unload)
    async def unload_lora_adapter(self, request):
        lora_request = self.lora_requests.get(request.lora_name)
        result = await stock_unload(self, request)
        if lora_request is not None and request.lora_name not in self.lora_requests:
            await self.engine_client.remove_lora(lora_request.lora_int_id)  # frees the slot and the CPU copy
        return result

    OpenAIServingModels.unload_lora_adapter = unload_lora_adapter


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    patch_loading()
    patch_activation()
    patch_op()
    patch_cpu_ops()
    patch_unload()
    _APPLIED = True
