"""Plugin-owned linear LoRA layers: vLLM's own layer classes, extended by subclassing.

vLLM wraps every adaptable linear layer with the first class in `vllm.lora.utils._all_lora_classes`
whose `can_replace_layer` accepts it. `install()` puts one subclass of each linear class vLLM
wraps (column, merged column, merged column with 3+ slices, QKV, merged QKV, row, replicated)
ahead of its parent, with the parent's own `can_replace_layer`, so the same layers get the same
kind of wrapper, ours. Each owns, next to vLLM's `lora_a_stacked`/`lora_b_stacked`:

    sora_scale[i]   (max_loras + 1, out_i)       per-slot output scale; row max_loras = 1 (no adapter)
    sora_shift[i]   (max_loras + 1, out_i)       per-slot bias shift; row max_loras = 0
    sora_rot_u[i]   (max_loras, 1, rank, out_i)  Uᵀ, stacked like lora_a (the rotation's shrink)
    sora_rot_v[i]   (max_loras, 1, out_i, rank)  V, stacked like lora_b (the rotation's expand)

(`sora_scale[i]` and `sora_shift[i]` are column views of one (max_loras + 1, out) tensor each,
`sora_scale_all` / `sora_shift_all`), plus whatever the backend packs from them (`pack_slot`).

so that a slot holds an adapter's whole `ServingFactors` (z = scale·base + shift + (x Aᵀ) Bᵀ,
y = z + (z U) Vᵀ), and `apply` runs the base GEMM, then the backend (`backends/`). Index -1 (a
token without adapter) reads the identity row of scale and shift, so a gather needs no branch.

`set_lora` receives what `activation.slot_weights` stored on vLLM's `LoRAModel` at load: per
slice factors already cut to this tensor-parallel rank and cast to the slot dtype, so entering a
slot is a copy. vLLM's own callers (its dummy LoRAs for warm-up) pass plain A/B tensors, which
take the parent's `set_lora` with identity extras.

Fully sharded LoRA (`fully_sharded_loras=True`) uses other classes (S-LoRA's sharded shrink)
that this plugin does not cover: an engine with it is refused at start, by name (`loading.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sora_serve.methods import ServingFactors

from . import backends, isolation


class SlotFactors(list):
    """One adapter's slot contents for one vLLM layer: a list of A tensors (None: slice not
    adapted), as vLLM's packed LoRA weights are, carrying the whole per-slice `ServingFactors`."""

    def __init__(self, factors: list[ServingFactors | None]):
        super().__init__(None if f is None else f.lora_A for f in factors)
        self.factors = factors


@dataclass
class SlotInfo:
    """What the grouped backend needs to know about a slot without reading tensors."""

    rank: int = 0  # LoRA rank, summed over the layer's slices (0: no input LoRA)
    rot_rank: int = 0  # rotation rank, summed over the layer's slices (0: none)
    scaled: bool = False
    shifted: bool = False

    @property
    def active(self) -> bool:
        return bool(self.rank or self.rot_rank or self.scaled or self.shifted)


class SoraLinearMixin:
    """The extras, the slot writes and the op, shared by every plugin-owned linear class."""

    def create_lora_weights(self, max_loras: int, lora_config, model_config=None) -> None:
        super().create_lora_weights(max_loras, lora_config, model_config)
        max_rank, dtype, device = lora_config.max_lora_rank, self.lora_b_stacked[0].dtype, self.lora_b_stacked[0].device
        sizes = [b.shape[2] for b in self.lora_b_stacked]
        self.sora_scale_all = torch.ones(max_loras + 1, sum(sizes), dtype=dtype, device=device)
        self.sora_shift_all = torch.zeros(max_loras + 1, sum(sizes), dtype=dtype, device=device)
        self.sora_scale = self.sora_scale_all.split(sizes, dim=1)
        self.sora_shift = self.sora_shift_all.split(sizes, dim=1)
        self.sora_rot_u = tuple(torch.zeros(max_loras, 1, max_rank, n, dtype=dtype, device=device) for n in sizes)
        self.sora_rot_v = tuple(torch.zeros(max_loras, 1, n, max_rank, dtype=dtype, device=device) for n in sizes)
        self.sora_slots = [SlotInfo() for _ in range(max_loras)]
        self.sora_failed = isolation.failure_flags(max_loras, device)
        self.sora_backend = backends.selected()
        self.sora_backend.allocate(self, max_loras, max_rank)

    def reset_lora(self, index: int) -> None:
        super().reset_lora(index)
        self._clear_extras(index)
        n_slices = len(self.lora_b_stacked)
        self._pack(index, SlotInfo(), [0] * n_slices, [0] * n_slices)

    def set_lora(self, index: int, lora_a, lora_b) -> None:
        n_slices = len(self.lora_b_stacked)
        if not isinstance(lora_a, SlotFactors):  # vLLM's own plain A/B (its dummy LoRAs)
            super().set_lora(index, lora_a, lora_b)
            self._clear_extras(index)
            max_rank = self.lora_a_stacked[0].shape[2]
            self._pack(index, SlotInfo(rank=n_slices * max_rank), [max_rank] * n_slices, [0] * n_slices)
            return
        super().reset_lora(index)
        self._clear_extras(index)  # packed once below, with the new contents (a swap's cost is its packs)
        info, ranks, rot_ranks = SlotInfo(), [0] * n_slices, [0] * n_slices
        for i, factors in enumerate(lora_a.factors):
            if factors is not None:
                ranks[i], rot_ranks[i] = self._write_slice(i, index, factors, info)
        info.rank, info.rot_rank = sum(ranks), sum(rot_ranks)
        self._pack(index, info, ranks, rot_ranks)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        output = self._get_quant_method().apply(self.base_layer, x, bias)
        flat = output.ndim == 3 and x.ndim == 3  # the transformers backend adds a batch dim
        result = self.sora_backend.apply(self, x.flatten(0, 1) if flat else x, output.flatten(0, 1) if flat else output)
        return result.view(output.shape) if flat else result

    def _clear_extras(self, index: int) -> None:
        """Slot `index`'s scale, shift and rotation back to the identity; the caller packs the slot."""
        self.sora_scale_all[index] = 1
        self.sora_shift_all[index] = 0
        for u, v in zip(self.sora_rot_u, self.sora_rot_v):
            u[index] = 0
            v[index] = 0

    def _pack(self, index: int, info: SlotInfo, ranks: list[int], rot_ranks: list[int]) -> None:
        self.sora_slots[index] = info
        self.sora_backend.pack_slot(self, index, ranks, rot_ranks)

    def _write_slice(self, i: int, index: int, f: ServingFactors, info: SlotInfo) -> tuple[int, int]:
        """Slice i of slot `index`; returns its LoRA and rotation ranks."""
        r = f.lora_A.shape[0]
        self.lora_a_stacked[i][index, 0, :r].copy_(f.lora_A)
        self.lora_b_stacked[i][index, 0, :, :r].copy_(f.lora_B)
        if f.scale is not None:
            self.sora_scale[i][index].copy_(f.scale)
            info.scaled = True
        if f.bias_shift is not None:
            self.sora_shift[i][index].copy_(f.bias_shift)
            info.shifted = True
        if f.rot_U is None:
            return r, 0
        k = f.rot_U.shape[1]
        self.sora_rot_u[i][index, 0, :k].copy_(f.rot_U.T)
        self.sora_rot_v[i][index, 0, :, :k].copy_(f.rot_V)
        return r, k


def parallel_kind(layer) -> str:
    """'column', 'row' or 'replicated': how tensor parallelism splits this layer (docs/VLLM.md)."""
    from vllm.lora.layers import ColumnParallelLinearWithLoRA, ReplicatedLinearWithLoRA, RowParallelLinearWithLoRA

    if layer.tp_size == 1 or isinstance(layer, ReplicatedLinearWithLoRA):
        return "replicated"
    if isinstance(layer, ColumnParallelLinearWithLoRA):
        return "column"
    if isinstance(layer, RowParallelLinearWithLoRA):
        return "row"
    raise NotImplementedError(f"sora-serve: tensor parallelism for {type(layer).__name__} is not supported")


def _plugin_class(parent: type) -> type:
    return type(
        f"Sora{parent.__name__}",
        (SoraLinearMixin, parent),
        {"__module__": __name__, "__doc__": f"{parent.__name__} serving every adapter kind (see module docstring)."},
    )


def linear_parents() -> tuple[type, ...]:
    """vLLM's linear LoRA classes this plugin subclasses, in vLLM's table order."""
    from vllm.lora import layers

    return (
        layers.ColumnParallelLinearWithLoRA,
        layers.MergedColumnParallelLinearWithLoRA,
        layers.MergedColumnParallelLinearVariableSliceWithLoRA,
        layers.QKVParallelLinearWithLoRA,
        layers.MergedQKVParallelLinearWithLoRA,
        layers.RowParallelLinearWithLoRA,
        layers.ReplicatedLinearWithLoRA,
    )


PLUGIN_CLASSES: dict[type, type] = {}


def install() -> None:
    """Put each plugin class (these linear ones, and `heads`' embedding) right before its parent in
    vLLM's layer table (idempotent)."""
    from vllm.lora import utils
    from vllm.lora.layers import VocabParallelEmbeddingWithLoRA

    from .heads import embedding_class

    for parent in linear_parents():
        PLUGIN_CLASSES.setdefault(parent, _plugin_class(parent))
    PLUGIN_CLASSES.setdefault(VocabParallelEmbeddingWithLoRA, embedding_class())
    table = [cls for cls in utils._all_lora_classes if cls not in PLUGIN_CLASSES.values()]
    for parent, ours in PLUGIN_CLASSES.items():
        table.insert(table.index(parent), ours)
    utils._all_lora_classes = tuple(table)


def is_plugin_layer(layer) -> bool:
    return isinstance(layer, SoraLinearMixin)
