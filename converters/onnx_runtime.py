"""Run an exported folder with ONNX Runtime: logits and greedy generation, adapter per run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sora_serve.errors import AdapterError

MANIFEST_FILE = "sora_onnx.json"
MODEL_FILE = "model.onnx"


class OnnxCausalLM:
    """`OnnxCausalLM(folder).generate(ids, 16, adapter="support")`; adapter None = the base."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifest = self.folder / MANIFEST_FILE
        if not manifest.is_file():
            raise AdapterError("not an exported folder (no manifest)", file=manifest)
        self.manifest = json.loads(manifest.read_text())
        options = ort.SessionOptions()
        options.log_severity_level = 3  # adapter inputs with initializer defaults are intended: no warning per input
        self.session = ort.InferenceSession(str(self.folder / MODEL_FILE), options, providers=["CPUExecutionProvider"])
        self.adapters: dict[str, ort.LoraAdapter] = {}
        for name in self.manifest["adapters"]:
            adapter = ort.LoraAdapter()
            adapter.Load(str(self.folder / "adapters" / f"{name}.onnx_adapter"))
            self.adapters[name] = adapter

    def _run_options(self, adapter: str | None) -> ort.RunOptions:
        options = ort.RunOptions()
        if adapter is not None:
            if adapter not in self.adapters:
                raise AdapterError(f"unknown adapter {adapter!r}; exported: {sorted(self.adapters)}", field="adapter")
            options.add_active_adapter(self.adapters[adapter])
        return options

    def _empty_past(self, batch: int) -> list[np.ndarray]:
        m = self.manifest
        return [
            np.zeros((batch, m["kv_heads"], 0, m["head_dim"]), dtype=np.float32) for _ in range(2 * m["num_layers"])
        ]

    def _step(
        self, ids: np.ndarray, past: list[np.ndarray], mask: np.ndarray, options: ort.RunOptions
    ) -> list[np.ndarray]:
        """One graph run; `mask` covers past + new tokens. Positions count real tokens only (left padding)."""
        positions = np.maximum(mask.cumsum(-1) - 1, 0)[:, -ids.shape[1] :]
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask, "position_ids": positions}
        feeds.update({f"past_key_values.{i // 2}.{'key' if i % 2 == 0 else 'value'}": p for i, p in enumerate(past)})
        return self.session.run(None, feeds, options)

    def logits(
        self, ids: np.ndarray, adapter: str | None = None, attention_mask: np.ndarray | None = None
    ) -> np.ndarray:
        mask = _full_mask(ids) if attention_mask is None else attention_mask.astype(np.int64)
        return self._step(ids, self._empty_past(ids.shape[0]), mask, self._run_options(adapter))[0]

    def generate(
        self, ids: np.ndarray, max_new_tokens: int, adapter: str | None = None, attention_mask: np.ndarray | None = None
    ) -> np.ndarray:
        """Greedy decoding with the KV cache; returns prompt + new tokens. Pad prompts on the left (mask 0)."""
        options = self._run_options(adapter)
        mask = _full_mask(ids) if attention_mask is None else attention_mask.astype(np.int64)
        tokens, past, step_ids = ids.astype(np.int64), self._empty_past(ids.shape[0]), ids.astype(np.int64)
        for _ in range(max_new_tokens):
            logits, *past = self._step(step_ids, past, mask, options)
            step_ids = logits[:, -1].argmax(-1)[:, None]
            tokens = np.concatenate([tokens, step_ids], axis=1)
            mask = np.concatenate([mask, np.ones_like(step_ids)], axis=1)
        return tokens


def _full_mask(ids: np.ndarray) -> np.ndarray:
    return np.ones(ids.shape, dtype=np.int64)
