"""Hugging Face safetensors checkpoints, one tensor at a time: read lazily, write streaming.

Fold, to-lora, convert, `sora-serve serve` and the vLLM plugin read base checkpoints through
`Checkpoint`; `check_adapter_against` is the one "adapter dir against its base's files" check they share.
Tensors are read through `safe_open`, learn the module structure (layer classes, tied
weights) from a model built on the `meta` device, which costs no memory, and write shards with
`write_safetensors`, which holds one tensor at a time instead of the whole shard.

Tensor names: a module `<path>` (its name in the `AutoModelForCausalLM`) has its weight under
`<path>.weight`, or under that name without the model's base prefix (`transformer.` for GPT-2,
`model.` for Llama), as in older checkpoints; other renamings are not supported.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from .adapter_format import AdapterFile
from .errors import AdapterError
from .fingerprint import BaseLayer
from .fs import readable_dir, readable_file
from .layer import is_supported_layer, stores_in_out, weight_out_in
from .methods import BaseView
from .validation import check_against_base

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_CACHED_SAMPLES = 4096  # (tensor, positions) entries kept per checkpoint: a few bases of a few hundred layers
# safetensors dtype names (the header's "dtype" field).
DTYPE_NAMES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class Checkpoint:
    def __init__(self, directory: str | Path):
        self.directory = readable_dir(directory, "model directory")
        config_file = readable_file(
            self.directory / "config.json", "model config (not a Hugging Face checkpoint directory?)"
        )
        try:
            self.config_dict = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterError(f"not valid JSON ({exc})", file=config_file) from exc
        if not isinstance(self.config_dict, dict):
            raise AdapterError("expected a JSON object", file=config_file)
        self.weight_map = self._read_weight_map()
        # Every adapter of this base samples the same W0 entries (positions drawn per shape, see
        # fingerprint.py): read once, each later adapter's check costs no file access.
        self._entries: dict[tuple, torch.Tensor] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}

    def _read_weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX_FILE
        if index.exists():
            readable_file(index, "safetensors index")
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise AdapterError(f"bad safetensors index ({exc})", file=index, field="weight_map") from exc
        single = self.directory / SINGLE_FILE
        if not single.is_file():
            raise AdapterError(
                f"no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are supported)", file=self.directory
            )
        return {key: SINGLE_FILE for key in self._keys(single)}

    @staticmethod
    def _keys(path: Path) -> list[str]:
        readable_file(path, "safetensors file")
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as exc:
            raise AdapterError(f"corrupt safetensors file ({exc})", file=path) from exc

    @property
    def is_sharded(self) -> bool:
        return (self.directory / INDEX_FILE).is_file()

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def open(self, shard: str):
        path = readable_file(self.directory / shard, "safetensors shard")
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise AdapterError(f"corrupt or missing safetensors shard ({exc})", file=path) from exc

    def get_tensor(self, key: str) -> torch.Tensor:
        shard = self.weight_map.get(key)
        if shard is None:
            raise AdapterError(f"tensor '{key}' not in the checkpoint", file=self.directory)
        with self.open(shard) as f:
            return f.get_tensor(key)

    def validate(self) -> None:
        """Every shard opens (headers parse) and holds the tensors its index assigns to it."""
        for shard in self.shards:
            with self.open(shard) as f:
                present = set(f.keys())
            missing = sorted(k for k, s in self.weight_map.items() if s == shard and k not in present)
            if missing:
                raise AdapterError(
                    f"the index puts {missing[:3]} in this shard but it lacks them", file=self.directory / shard
                )

    def read_entries(self, key: str, rows: list[int], cols: list[int]) -> torch.Tensor:
        """tensor[rows[k], cols[k]] for every k, each read alone from the (memory-mapped) file once."""
        cache_key = (key, tuple(rows), tuple(cols))
        if cache_key not in self._entries:
            with self.open(self.weight_map[key]) as f:
                stored = f.get_slice(key)
                values = torch.stack([stored[r : r + 1, c : c + 1].reshape(()) for r, c in zip(rows, cols)])
            if len(self._entries) >= MAX_CACHED_SAMPLES:
                del self._entries[next(iter(self._entries))]
            self._entries[cache_key] = values
        return self._entries[cache_key].clone()

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self._shapes:
            with self.open(self.weight_map[key]) as f:
                self._shapes[key] = tuple(f.get_slice(key).get_shape())
        return self._shapes[key]

    def base_view(self, module_path: str, dtype: torch.dtype) -> BaseView:
        """The layer's W0 (as out x in, whatever the file's orientation) and bias, read in `dtype`."""
        raw = self.get_tensor(self.weight_key(module_path)).to(dtype)
        weight = raw.T if self.is_transposed(module_path) else raw
        bias_key = self.tensor_key(module_path, "bias")
        return BaseView(weight, None if bias_key is None else self.get_tensor(bias_key).to(dtype))

    def is_transposed(self, module_path: str) -> bool:
        """Whether the file stores the layer's weight as (in, out): GPT-2's Conv1D."""
        return stores_in_out(self.meta_model.get_submodule(module_path))

    def tensor_key(self, module_path: str, param: str) -> str | None:
        """Name of `<module_path>.<param>` in the file, with or without the base prefix; None if absent."""
        key = f"{module_path}.{param}"
        prefix = f"{self.meta_model.base_model_prefix}."
        for candidate in (key, key.removeprefix(prefix)):
            if candidate in self.weight_map:
                return candidate
        return None

    def weight_key(self, module_path: str) -> str:
        """Where the layer's weight is stored: its own key or, for a tied head, its embedding's."""
        key = self.tensor_key(module_path, "weight") or self.tied_source(module_path)
        if key is None:
            raise AdapterError(f"tensor '{module_path}.weight' not in the base checkpoint", file=self.directory)
        return key

    @cached_property
    def meta_model(self) -> nn.Module:
        """The model's modules with no weights (device 'meta'): layer classes, names, tying."""
        config = AutoConfig.from_pretrained(self.directory)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)

    def tied_source(self, module_path: str) -> str | None:
        """For an output head tied to the input embeddings, the embedding's key in the file."""
        model = self.meta_model
        if not getattr(model.config, "tie_word_embeddings", False):
            return None
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        modules = dict(model.named_modules())
        if modules.get(module_path) is not head:
            return None
        embed_path = next(name for name, m in model.named_modules() if m is embed)
        return self.tensor_key(embed_path, "weight")


def check_stored_shape(checkpoint: Checkpoint, key: str, expected: tuple[int, ...], path: str) -> None:
    """The stored tensor `key` has the shape the model built from config.json gives layer `path`."""
    got = checkpoint.shape(key)
    if got != expected:
        raise AdapterError(
            f"tensor '{key}' is {list(got)} but config.json makes layer '{path}' {list(expected)}: weights "
            "and config disagree",
            file=checkpoint.directory / checkpoint.weight_map[key],
        )


def checkpoint_layers(checkpoint: Checkpoint, paths: Iterable[str], *, norms: bool = True) -> dict[str, BaseLayer]:
    """`BaseLayer`s for the linear layers among `paths`, shapes from the safetensors headers.

    Layers the model does not have (or that are not Linear / Conv1D) are left out, so
    `check_against_base` names them. With `norms`, ||W0||_F is read too, one tensor at a time;
    the fingerprint's sampled weights are read entry by entry when the check asks for them.
    """
    modules = dict(checkpoint.meta_model.named_modules())
    layers = {}
    for path in paths:
        module = modules.get(path)
        if module is None or not is_supported_layer(module):
            continue
        key = checkpoint.weight_key(path)
        check_stored_shape(checkpoint, key, tuple(module.weight.shape), path)
        out_f, in_f = weight_out_in(module).shape
        norm = checkpoint.get_tensor(key).double().norm().item() if norms else None
        layers[path] = BaseLayer(
            int(out_f),
            int(in_f),
            checkpoint.tensor_key(path, "bias") is not None,
            norm,
            _entry_reader(checkpoint, key, module),
        )
    return layers


def check_adapter_against(
    adapter: AdapterFile,
    checkpoint: Checkpoint,
    *,
    norms: bool = True,
    allow_large_updates: bool | None = None,
    allow_other_base: bool | None = None,
) -> dict[str, BaseLayer]:
    """Check `adapter` against the base checkpoint's files: every module present with the adapter's
    shapes, the base fingerprint (shapes and sampled weights), and with `norms` the update's size
    relative to ||W0||_F (the vLLM worker checks that where it records row norms). Returns the layers."""
    layers = checkpoint_layers(checkpoint, adapter.base_paths, norms=norms)
    model_type = checkpoint.config_dict.get("model_type")
    overrides = {"allow_large_updates": allow_large_updates, "allow_other_base": allow_other_base}
    check_against_base(adapter, layers, model_type=model_type, **overrides)
    return layers


def _entry_reader(checkpoint: Checkpoint, key: str, module: nn.Module):
    """W0[rows, cols] of a layer (out x in) from the file, which stores Conv1D weights (in, out)."""
    if stores_in_out(module):
        return lambda rows, cols: checkpoint.read_entries(key, cols, rows)
    return lambda rows, cols: checkpoint.read_entries(key, rows, cols)


def tensor_spec(shard, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
    """(dtype, shape) of `key` in the open shard (a `safe_open` handle), from its header alone."""
    tensor_slice = shard.get_slice(key)
    name = tensor_slice.get_dtype()
    if name not in DTYPE_NAMES:
        raise AdapterError(f"tensor '{key}' has dtype {name}, which this tool does not handle")
    return DTYPE_NAMES[name], tuple(tensor_slice.get_shape())


def write_safetensors(
    path: Path,
    entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a safetensors file tensor by tensor; return its data size in bytes.

    The header (8-byte length, JSON with dtype, shape and byte offsets, space-padded to 8 bytes)
    follows from `entries` alone, so each tensor is produced, written and dropped in turn.
    """
    names = {dtype: name for name, dtype in DTYPE_NAMES.items()}
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, dtype, shape in entries:
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key, dtype, shape in entries:
            tensor = produce(key)
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise RuntimeError(
                    f"{key}: produced {tensor.dtype} {list(tensor.shape)}, header says {dtype} {list(shape)}"
                )
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return offset
