"""The plugin's patches to vLLM 0.32's LoRA path. Each keeps vLLM's own code for what it does right.

1. Loading (`LoRAModel.from_local_checkpoint`, `PEFTHelper.validate_legal`): adapter dirs that
   need more than A/B (our PREDIAG/SORA, PEFT DoRA) are read and validated by
   `sora_serve.read_adapter`; vLLM gets their A/B as usual and the `LoRAModel` carries the
   whole `AdapterFile`. Plain LoRA dirs take vLLM's path untouched.
2. Activation (`LoRAModelManager.activate_adapter`): when an adapter enters slot i, each linear
   layer's slot i is filled with that adapter's `ServingFactors`, computed from the layer's own
   base weight (DoRA's g needs it), slice by slice for packed layers (qkv_proj, gate_up_proj).
3. The op (`BaseLinearLayerWithLoRA._apply_lora_to_output`): tokens are grouped by slot and
   each slot runs `ServingFactors.apply` with one GEMM per factor; with many slots and few tokens
   each (decode), every token's factors are gathered and applied in one batched GEMM instead. Slot -1 (no adapter) is left
   at the base output; vLLM CPU's stock ops index weights[-1], the last slot, instead.
4. Unload (`OpenAIServingModels.unload_lora_adapter`): also removes the adapter from the engine,
   so its slot is freed, not only its name.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field

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
    rot_u: list[torch.Tensor]  # (max_loras, out_slice, max_lora_rank)
    rot_v: list[torch.Tensor]
    rank: list[int] = field(default_factory=list)  # LoRA rank per slot (0: nothing to do)
    rot_rank: list[int] = field(default_factory=list)
    has_scale: list[bool] = field(default_factory=list)
    has_shift: list[bool] = field(default_factory=list)


def slot_state(layer) -> SlotState:
    state = getattr(layer, "sora_slots", None)
    if state is None:
        if layer.tp_size > 1:
            raise NotImplementedError(
                "sora-serve's vLLM plugin supports tensor_parallel_size=1 only (see docs/VLLM.md for the TP design)"
            )
        max_loras, _, _, max_rank = layer.lora_b_stacked[0].shape
        dtype, device = layer.lora_b_stacked[0].dtype, layer.lora_b_stacked[0].device
        sizes = layer.output_slices
        state = SlotState(
            scale=[torch.ones(max_loras, n, dtype=dtype, device=device) for n in sizes],
            shift=[torch.zeros(max_loras, n, dtype=dtype, device=device) for n in sizes],
            rot_u=[torch.zeros(max_loras, n, max_rank, dtype=dtype, device=device) for n in sizes],
            rot_v=[torch.zeros(max_loras, n, max_rank, dtype=dtype, device=device) for n in sizes],
            rank=[0] * max_loras, rot_rank=[0] * max_loras, has_scale=[False] * max_loras, has_shift=[False] * max_loras,
        )
        layer.sora_slots = state
    return state


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
        _reset_extras(state, i, index)  # the gathered path reads every slot's extras, padded


def _reset_extras(state: SlotState, i: int, index: int) -> None:
    """Identity extras for slice i of slot `index`: scale 1, shift 0, no rotation."""
    state.scale[i][index] = 1
    state.shift[i][index] = 0
    state.rot_u[i][index].zero_()
    state.rot_v[i][index].zero_()


def _max_rank(lora_weights) -> int:
    a = lora_weights.lora_a
    return max((t.shape[0] for t in a if t is not None), default=0) if isinstance(a, list) else a.shape[0]


def fill_adapter_slot(layer, index: int, module_name: str, lora_model, packed_modules_mapping) -> None:
    """Write the adapter's ServingFactors for every slice of this layer into slot `index`."""
    adapter: AdapterFile = lora_model.sora_adapter
    by_vllm_name = {v: k for k, v in lora_model.sora_paths.items()}
    state = slot_state(layer)
    _require_plain_weights(layer, module_name)
    offsets = [0]
    for n in layer.output_slices:
        offsets.append(offsets[-1] + n)
    state.rank[index] = state.rot_rank[index] = 0
    state.has_scale[index] = state.has_shift[index] = False
    full_weight = base_weight(layer) if adapter.method == "dora" else None
    for i, hf_name in enumerate(slice_paths(module_name, packed_modules_mapping)):
        path = lora_model.sora_paths.get(hf_name, by_vllm_name.get(hf_name, hf_name))
        _reset_slice(layer, state, i, index)
        if path not in adapter.tensors:
            continue
        if full_weight is None:  # only DoRA's g reads W0; the others need its shape alone
            weight = torch.empty(layer.output_slices[i], layer.input_size, dtype=torch.float64, device="meta")
        else:
            weight = full_weight[offsets[i] : offsets[i + 1]]
        bias = layer.base_layer.bias
        bias = None if bias is None else bias[offsets[i] : offsets[i + 1]].detach().double()
        factors = adapter_from_tensors(adapter.module_configs[path], adapter.tensors[path], weight).serving_factors(weight, bias)
        _write_slice(layer, state, i, index, factors)


@torch.no_grad()
def base_weight(layer) -> torch.Tensor:
    """W0 (out x in, float64) of a vLLM linear layer. vLLM CPU repacks weights for oneDNN and
    drops `.weight`, so W0 is read back through the layer's own GEMM on the identity (exact)."""
    eye = torch.eye(layer.input_size, dtype=layer.lora_a_stacked[0].dtype, device=layer.device)
    return layer._get_quant_method().apply(layer.base_layer, eye, None).T.double()


def _require_plain_weights(layer, module_name: str) -> None:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    if not isinstance(layer.base_layer.quant_method, UnquantizedLinearMethod):
        raise NotImplementedError(f"sora-serve: layer '{module_name}' is quantized; Pre-Diag/SORA/DoRA need its plain weight")
    if layer.base_layer.bias is not None and layer.base_layer.skip_bias_add:
        raise NotImplementedError(f"sora-serve: layer '{module_name}' adds its bias outside the LoRA op (skip_bias_add)")


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
        if k > state.rot_u[i].shape[-1]:
            raise ValueError(f"sora-serve: SORA rotation rank 2*r_p = {k} exceeds max_lora_rank {state.rot_u[i].shape[-1]}")
        state.rot_u[i][index, :, :k].copy_(f.rot_U.to(dtype))
        state.rot_v[i][index, :, :k].copy_(f.rot_V.to(dtype))
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
        adapted = set(getattr(lora_model, "sora_paths", {}))
        for module_name, module in self.modules.items():
            if isinstance(module, BaseLinearLayerWithLoRA):
                if hasattr(lora_model, "sora_adapter"):
                    fill_adapter_slot(module, index, module_name, lora_model, self.packed_modules_mapping)
                else:
                    fill_plain_lora_slot(module, index, self._get_lora_layer_weights(lora_model, module_name))
                adapted -= set(slice_paths(module_name, self.packed_modules_mapping)) | {module_name}
        if adapted:  # e.g. an embedding or MoE expert: never serve an adapter partially
            raise NotImplementedError(f"sora-serve: cannot serve adapter layers {sorted(adapted)} in vLLM (not plain linear layers)")
        return activated

    LoRAModelManager.activate_adapter = activate_adapter


# ------------------------------------------------------------------ 3. the op


def grouped_adapter_op(layer, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """For each slot present in the batch: ServingFactors.apply on its tokens, one GEMM per factor."""
    original_shape = output.shape if output.ndim == 3 else None
    if x.ndim == 3 and output.ndim == 3:
        output, x = output.flatten(0, 1), x.flatten(0, 1)
    state = slot_state(layer)
    indices = layer.punica_wrapper.token_lora_indices[: x.shape[0]]
    slots = [s for s in torch.unique(indices).tolist() if s >= 0 and (state.rank[s] or state.has_scale[s] or state.rot_rank[s])]
    if len(slots) > 2 and x.shape[0] <= GATHER_TOKENS_PER_SLOT * len(slots):
        output = _apply_gathered(layer, state, slots, indices, x, output)
        return output if original_shape is None else output.reshape(original_shape)
    for slot in slots:
        rows = None if len(slots) == 1 and bool((indices == slot).all()) else (indices == slot).nonzero().squeeze(1)
        xs = x if rows is None else x.index_select(0, rows)
        ys = output if rows is None else output.index_select(0, rows)
        ys = _apply_slot(layer, state, slot, xs, ys)
        if rows is None:
            output = ys
        else:
            output.index_copy_(0, rows, ys)
    return output if original_shape is None else output.reshape(original_shape)


def _apply_slot(layer, state: SlotState, slot: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r, k = state.rank[slot], state.rot_rank[slot]
    pieces, offset = [], 0
    for i, size in enumerate(layer.output_slices):
        part = y[:, offset : offset + size]
        offset += size
        factors = ServingFactors(
            lora_A=layer.lora_a_stacked[i][slot, 0, :r],
            lora_B=layer.lora_b_stacked[i][slot, 0, :, :r],
            scale=state.scale[i][slot] if state.has_scale[slot] else None,
            bias_shift=state.shift[i][slot] if state.has_shift[slot] else None,
            rot_U=state.rot_u[i][slot, :, :k] if k else None,
            rot_V=state.rot_v[i][slot, :, :k] if k else None,
        )
        pieces.append(factors.apply(x, part))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


# Below this many tokens per slot (decode with many adapters), per-token gathered factors and
# one batched GEMM beat a loop of tiny per-slot GEMMs.
GATHER_TOKENS_PER_SLOT = 4


def _apply_gathered(layer, state: SlotState, slots: list[int], indices: torch.Tensor, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """ServingFactors.apply for every token at once, each with its own slot's (padded) factors.

    Unused slots and padding hold the identity (scale 1, zeros), so padding to the largest rank
    present is exact."""
    rows = (indices >= 0).nonzero().squeeze(1)
    token_slots = indices.index_select(0, rows)
    xs, ys = x.index_select(0, rows), output.index_select(0, rows)
    r = max(state.rank[s] for s in slots)
    k = max(state.rot_rank[s] for s in slots)
    pieces, offset = [], 0
    for i, size in enumerate(layer.output_slices):
        y = ys[:, offset : offset + size] * state.scale[i][token_slots] + state.shift[i][token_slots]
        offset += size
        if r:
            a = layer.lora_a_stacked[i][token_slots, 0, :r]  # (tokens, r, in)
            b = layer.lora_b_stacked[i][token_slots, 0, :, :r]  # (tokens, out, r)
            y = y + torch.bmm(b, torch.bmm(a, xs.unsqueeze(2))).squeeze(2)
        if k:
            u, v = state.rot_u[i][token_slots, :, :k], state.rot_v[i][token_slots, :, :k]
            y = y + torch.bmm(v, torch.bmm(u.transpose(1, 2), y.unsqueeze(2))).squeeze(2)
        pieces.append(y)
    output.index_copy_(0, rows, pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1))
    return output


def patch_op() -> None:
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    BaseLinearLayerWithLoRA._apply_lora_to_output = grouped_adapter_op


# ------------------------------------------------------------------ 4. unload


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
    patch_unload()
    _APPLIED = True
