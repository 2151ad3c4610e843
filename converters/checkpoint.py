"""Read a Hugging Face safetensors checkpoint lazily: shards, tensor index, and a weightless model.

Converters touch one tensor at a time through `safe_open`, and learn the module structure
(layer classes, tied weights) from a model built on the `meta` device, which costs no memory.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from sora_serve.errors import AdapterError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class Checkpoint:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise AdapterError("model directory not found", file=self.directory)
        config_file = self.directory / "config.json"
        if not config_file.is_file():
            raise AdapterError("missing model config", file=config_file)
        try:
            self.config_dict = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise AdapterError(f"not valid JSON ({exc})", file=config_file) from exc
        self.weight_map = self._read_weight_map()

    def _read_weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise AdapterError(f"bad safetensors index ({exc})", file=index, field="weight_map") from exc
        single = self.directory / SINGLE_FILE
        if not single.is_file():
            raise AdapterError(f"no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are supported)", file=self.directory)
        return {key: SINGLE_FILE for key in self._keys(single)}

    @staticmethod
    def _keys(path: Path) -> list[str]:
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
        path = self.directory / shard
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

    def shard_metadata(self, shard: str) -> dict[str, str] | None:
        with self.open(shard) as f:
            return f.metadata()

    @cached_property
    def meta_model(self) -> nn.Module:
        """The model's modules with no weights (device 'meta'): layer classes, names, tying."""
        config = AutoConfig.from_pretrained(self.directory)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)

    def tied_source(self, module_path: str) -> str | None:
        """For an output head whose weight is tied (absent from the file), the key it shares."""
        model = self.meta_model
        if not getattr(model.config, "tie_word_embeddings", False):
            return None
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        modules = dict(model.named_modules())
        if modules.get(module_path) is not head:
            return None
        embed_path = next(name for name, m in model.named_modules() if m is embed)
        return f"{embed_path}.weight"
