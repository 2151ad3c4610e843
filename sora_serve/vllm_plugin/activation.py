"""Slot contents are computed once, when vLLM loads an adapter; entering a slot is a copy.

At load (`slot_weights`, called by the worker's loader in `loading.py`), each linear LoRA layer
the adapter touches gets its `ServingFactors` per output slice, already cut to this
tensor-parallel rank's shard and cast to the slot dtype, stored in vLLM's own `LoRAModel` (its
CPU cache entry) as a `SlotFactors` per layer. When the adapter later enters slot i, vLLM calls
the layer's `set_lora(i, ...)` with them (`layers.py`), a copy whatever the base model's size.

DoRA's g = m / ||W0 + sBA||_row is the only factor that reads the base. It never needs W0 as a
dense matrix: ||W0||^2 per row is recorded once per layer when vLLM processes the loaded weights
(`record_row_norms`, before vLLM CPU repacks W0 for oneDNN and drops `.weight`), and W0 A^T is the
layer's own GEMM on the r rows of A (see `sora_serve.methods.dora`).
"""

from __future__ import annotations

import functools

import torch

from sora_serve.adapter_format import AdapterFile
from sora_serve.errors import AdapterError
from sora_serve.methods import METHOD_CLASSES, BaseView, ServingFactors

from .layers import SlotFactors, is_plugin_layer, parallel_kind


def slice_paths(module_name: str, packed_modules_mapping: dict[str, list[str]]) -> list[str]:
    """HF module names of a vLLM layer's output slices (qkv_proj -> q_proj, k_proj, v_proj)."""
    prefix, _, last = module_name.rpartition(".")
    names = packed_modules_mapping.get(last, [last])
    return [f"{prefix}.{n}" if prefix else n for n in names]


def slice_offsets(layer) -> list[int]:
    offsets = [0]
    for n in layer.output_slices:
        offsets.append(offsets[-1] + n)
    return offsets


# ------------------------------------------------------------------ once per layer: ||W0||^2 per row


def record_row_norms(layer: torch.nn.Module) -> None:
    """||W0||^2 per output row (float64), this rank's shard, kept on the layer for DoRA."""
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2 and not weight.is_meta:
        layer.sora_row_sq_norms = torch.linalg.vector_norm(weight.detach(), dim=1, dtype=torch.float64) ** 2


def patch_weight_processing() -> None:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    stock = UnquantizedLinearMethod.process_weights_after_loading

    @functools.wraps(stock)
    def process_weights_after_loading(self, layer) -> None:
        record_row_norms(layer)  # before vLLM CPU repacks the weight and drops `.weight`
        stock(self, layer)

    UnquantizedLinearMethod.process_weights_after_loading = process_weights_after_loading


def row_sq_norms(layer) -> torch.Tensor:
    """||W0||^2 per row of this rank's output rows, whole rows (row-parallel ranks sum their parts once)."""
    full = getattr(layer, "sora_full_row_sq_norms", None)
    if full is None:
        base = layer.base_layer
        if not hasattr(base, "sora_row_sq_norms"):
            record_row_norms(base)  # weights still present (e.g. GPU), or loaded before the plugin
        if not hasattr(base, "sora_row_sq_norms"):
            raise RuntimeError(
                f"sora-serve: no row norms recorded for {type(base).__name__}; DoRA cannot be served on it"
            )
        full = base.sora_row_sq_norms
        if parallel_kind(layer) == "row":
            full = sum_over_ranks(full)
        layer.sora_full_row_sq_norms = full
    return full


@torch.no_grad()
def weight_times(layer, a: torch.Tensor) -> torch.Tensor:
    """W0 A^T for this rank's output rows, (out_local_total, r) in float64, by the layer's own GEMM.

    Row-parallel ranks hold input columns: each multiplies its columns of A and the parts are
    summed. The GEMM runs in the model dtype; its rounding enters g only through the cross term."""
    kind = parallel_kind(layer)
    a_local = _shard_input(layer, a) if kind == "row" else a
    dtype = layer.lora_a_stacked[0].dtype
    product = layer._get_quant_method().apply(layer.base_layer, a_local.to(dtype).contiguous(), None).double()
    return (sum_over_ranks(product) if kind == "row" else product).T


class StackedProjections:
    """W0 A_i^T for every slice i of one layer from a single GEMM over the slices' stacked A.

    vLLM CPU holds a packed layer's W0 (all slices' rows) as one repacked matrix, so W0 A_i^T
    per slice would read all of it once per slice (3x for qkv_proj, 2x for gate_up_proj): the
    bulk of a DoRA adapter's load time. Stacked, the layer's W0 is read once per adapter; the
    GEMM is bandwidth-bound, so the cross products it also computes (slice j's rows against
    slice i's A) cost next to nothing and are dropped."""

    def __init__(self, layer, slice_a: list[torch.Tensor | None]):
        self.layer, self.slice_a = layer, slice_a
        self._product: torch.Tensor | None = None

    def weight_times(self, i: int, a: torch.Tensor) -> torch.Tensor:
        """W0 a^T for all the layer's output rows on this rank, (rows, r) float64; from the
        stacked GEMM when `a` is slice i's A as the file holds it (what DoRA asks for)."""
        own = self.slice_a[i]
        if own is None or not torch.equal(a.double(), own.double()):
            return weight_times(self.layer, a)
        if self._product is None:
            self._product = weight_times(self.layer, torch.cat([x for x in self.slice_a if x is not None]))
        start = sum(x.shape[0] for x in self.slice_a[:i] if x is not None)
        return self._product[:, start : start + own.shape[0]]


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The float64 sum of `t` over tensor-parallel ranks. vLLM CPU's all-reduce has no float64,
    and a float32 sum would round: each rank sends t as float32 hi + lo parts (exact to ~1e-14)
    through an all-gather, and the parts are added in float64."""
    from vllm.distributed import tensor_model_parallel_all_gather

    hi = t.float()
    parts = torch.stack([hi, (t - hi.double()).float()])[None]  # (1, 2, ...)
    gathered = tensor_model_parallel_all_gather(parts.contiguous(), dim=0)  # (ranks, 2, ...)
    return gathered.double().sum(dim=(0, 1))


# ------------------------------------------------------------------ once per adapter: factors at load


def slot_weights(
    adapter: AdapterFile, paths: dict[str, str], modules: dict, packed_modules_mapping: dict[str, list[str]]
) -> dict:
    """vLLM `LoRAModel.loras` for `adapter`: per adapted layer, its per-slice factors for this rank.

    `paths` maps vLLM module names to the file's module paths. Plugin layers get a `SlotFactors`
    (set_lora copies it); a layer vLLM wrapped with its own class can take a plain LoRA only."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    loras = {}
    for module_name, layer in modules.items():
        if not isinstance(layer, BaseLinearLayerWithLoRA):
            continue
        slice_names = [paths.get(n) for n in slice_paths(module_name, packed_modules_mapping)]
        if any(name in adapter.tensors for name in slice_names):
            projections = StackedProjections(
                layer, [adapter.tensors[n]["lora_A"] if n in adapter.tensors else None for n in slice_names]
            )
            factors = [
                slice_factors(layer, i, adapter, name, projections) if name in adapter.tensors else None
                for i, name in enumerate(slice_names)
            ]
            loras[module_name] = _layer_weights(module_name, layer, factors)
    return loras


def _layer_weights(module_name: str, layer, factors: list[ServingFactors | None]):
    """vLLM's weights object for one layer; B carries s already (scaling 1: vLLM leaves it)."""
    from vllm.lora.lora_weights import LoRALayerWeights, PackedLoRALayerWeights

    rank = max(f.lora_A.shape[0] for f in factors if f is not None)
    lora_b = [None if f is None else f.lora_B for f in factors]
    if is_plugin_layer(layer):
        return PackedLoRALayerWeights(
            module_name, rank, [rank] * len(factors), SlotFactors(factors), lora_b, scaling=[1] * len(factors)
        )
    lora_a = _plain_lora(module_name, factors)
    if len(factors) == 1:  # vLLM's single-slice layers take tensors, packed ones lists
        return LoRALayerWeights(module_name, rank, rank, lora_a[0], lora_b[0], scaling=1)
    return PackedLoRALayerWeights(module_name, rank, [rank] * len(factors), lora_a, lora_b, scaling=[1] * len(factors))


def _plain_lora(module_name: str, factors: list[ServingFactors | None]) -> list:
    """A's per slice for a layer that is not ours (vLLM kept its own class): plain LoRA only."""
    for f in factors:
        if f is not None and (f.scale is not None or f.bias_shift is not None or f.rot_U is not None):
            raise ValueError(
                f"sora-serve cannot serve this adapter on '{module_name}': vLLM wraps it with its own LoRA "
                "class, which takes plain LoRA only"
            )
    return [None if f is None else f.lora_A for f in factors]


class SliceBase(BaseView):
    """Output slice i of a vLLM linear LoRA layer as a method sees it, for this rank's rows: the bias
    and, on demand, ||W0||^2 per row (recorded at weight loading) and W0 A^T (the layer's own GEMM);
    never a dense W0, which vLLM CPU no longer holds after repacking it.

    Column-parallel ranks hold whole output rows (`rows`: theirs); row-parallel ranks sum their
    partial W0 A^T and norms over ranks, and only rank 0 sees the bias (vLLM adds b once)."""

    def __init__(self, layer, i: int, out_features: int, in_features: int, projections: StackedProjections):
        self.layer, self.i, self.projections, self.kind = layer, i, projections, parallel_kind(layer)
        self.lo, self.hi = slice_offsets(layer)[i : i + 2]
        self.out_features, self.in_features = out_features, in_features
        self.rows = (
            _shard_rows(layer, i, torch.arange(out_features)[:, None])[:, 0] if self.kind == "column" else slice(None)
        )

    @property
    def bias(self) -> torch.Tensor | None:
        bias = self.layer.base_layer.bias  # column-parallel: this rank's rows already; otherwise whole
        if bias is None or (self.kind == "row" and self.layer.tp_rank != 0):
            return None
        return bias.detach()[self.lo : self.hi]

    def weight(self) -> torch.Tensor:
        raise RuntimeError("sora-serve: a vLLM layer has no dense W0 to give; serving factors use its projections")

    def row_sq_norms(self) -> torch.Tensor:
        return row_sq_norms(self.layer)[self.lo : self.hi]

    def weight_times(self, a: torch.Tensor) -> torch.Tensor:
        return self.projections.weight_times(self.i, a)[self.lo : self.hi]


def slice_factors(layer, i: int, adapter: AdapterFile, path: str, projections: StackedProjections) -> ServingFactors:
    """This rank's ServingFactors for output slice i of `layer`, in the slot dtype, contiguous."""
    tensors = adapter.tensors[path]
    _check_ranks(layer, adapter, path, tensors)
    base = SliceBase(layer, i, tensors["lora_B"].shape[0], tensors["lora_A"].shape[1], projections)
    factors = adapter.serving_factors(path, base)  # output rows already this rank's
    if base.kind == "row":  # input columns of A; the bias shift (from b) only where b is: rank 0
        factors.lora_A = _shard_input(layer, factors.lora_A, i)
    dtype = layer.lora_a_stacked[i].dtype
    return ServingFactors(**{k: None if v is None else v.to(dtype).contiguous() for k, v in vars(factors).items()})


def _check_ranks(layer, adapter: AdapterFile, path: str, tensors: dict[str, torch.Tensor]) -> None:
    max_rank = layer.lora_a_stacked[0].shape[2]
    ranks = {"r": tensors["lora_A"].shape[0]}
    if "sora_C" in tensors:
        ranks["2*r_p"] = 2 * tensors["sora_C"].shape[1]  # the rotation's rank: U = [C D]
    for name, rank in ranks.items():
        if rank > max_rank:
            raise AdapterError(
                f"{name} = {rank} exceeds the engine's max_lora_rank {max_rank} (module {path})",
                file=adapter.directory,
                field=name,
            )


# ------------------------------------------------------------------ tensor-parallel shards


def _shard_input(layer, a: torch.Tensor, i: int = 0) -> torch.Tensor:
    """This rank's input columns of A (row-parallel layers)."""
    return _slice_lora(layer, i, a, "a")


def _shard_rows(layer, i: int, t: torch.Tensor) -> torch.Tensor:
    """This rank's output rows of slice i (column-parallel layers)."""
    return _slice_lora(layer, i, t, "b")


def _slice_lora(layer, i: int, t: torch.Tensor, which: str) -> torch.Tensor:
    """vLLM's own `slice_lora_a`/`slice_lora_b`, so every layout vLLM supports is followed."""
    if layer.tp_size == 1:
        return t
    slicer = getattr(layer, f"slice_lora_{which}")
    if layer.n_slices == 1:
        return slicer(t)
    parts = [None] * layer.n_slices
    parts[i] = t
    return slicer(parts)[i]


# ------------------------------------------------------------------ servability, checked at load


def check_servable(
    adapter: AdapterFile, paths: dict[str, str], modules: dict, packed_modules_mapping: dict[str, list[str]]
) -> None:
    """Every adapted module must be a linear LoRA layer of this vLLM model; DoRA needs its plain
    (unquantized) weight, and a scale needs the bias inside the layer's output.

    Fails closed, naming the module: an embedding, MoE expert or quantized layer would otherwise
    be served partially or with the wrong W0."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    packed_parent = {part: packed for packed, parts in packed_modules_mapping.items() for part in parts}
    for vllm_name, path in paths.items():
        prefix, _, last = vllm_name.rpartition(".")
        layer_name = f"{prefix}.{packed_parent.get(last, last)}" if prefix else packed_parent.get(last, last)
        layer = modules.get(layer_name)
        if not isinstance(layer, BaseLinearLayerWithLoRA):
            kind = "not found" if layer is None else f"a {type(layer).__name__}, not a plain linear layer"
            raise ValueError(f"sora-serve cannot serve adapter module '{path}' in vLLM: '{layer_name}' is {kind}")
        base = layer.base_layer
        method = METHOD_CLASSES[adapter.method]
        if method.reads_base_weight and not isinstance(base.quant_method, UnquantizedLinearMethod):
            raise ValueError(
                f"sora-serve cannot serve adapter module '{path}' in vLLM: its layer is quantized; "
                f"{adapter.method} needs its plain weight"
            )
        if method.changes_base_output and base.bias is not None and base.skip_bias_add:
            raise ValueError(
                f"sora-serve cannot serve adapter module '{path}' in vLLM: its layer adds the bias outside "
                "the LoRA op (skip_bias_add)"
            )
