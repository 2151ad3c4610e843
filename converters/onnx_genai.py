"""onnxruntime-genai folders: `sora-serve export-onnx --format genai` and a token-id runner.

onnxruntime-genai (`og.Model(folder)`) reads `genai_config.json` beside the graph. The graph that
`onnx_export` traces already has the inputs and outputs genai's decoder-only model feeds, with
the names it expects (`input_ids`, `attention_mask`, `position_ids`, `past_key_values.%d.key` /
`.value` -> `logits`, `present.%d.key` / `.value`), so the genai format is the same folder plus
that config: no graph change. Three settings make genai drive our graph (all checked in
tests/test_genai.py; read in onnxruntime-genai's `src/config.cpp`, `src/models/model.cpp`,
`src/models/kv_cache.cpp` and its model builder's `make_genai_config`):

- `search.past_present_share_buffer: false`: our attention concatenates past and new keys, so
  `present` is past + sequence long; genai's shared-buffer mode needs a graph that writes into
  a max-length buffer in place (its builder's GroupQueryAttention).
- `model.type`: genai's class follows the type. For "gpt2" genai builds `Gpt_Model`, whose cache
  is one combined `past_%d` tensor per layer (2, batch, heads, past, head_dim), which our graph
  does not have (`og.Generator` fails with "Model input was not found"). Every architecture not
  tested here under its own name is therefore declared as genai's generic "decoder" type, which
  takes separate key/value caches like llama.
- `session_options.log_severity_level: 3`: the switchable graph's adapter tensors are graph
  inputs with identity initializers (docs/ONNX.md); ONNX Runtime warns once per such input.

Adapters: genai loads the same `adapters/<name>.onnx_adapter` files (onnxruntime's
`AdapterFormat`) with `og.Adapters(model).load(file, name)` and overrides the graph inputs of
that name per generator (`generator.set_active_adapter(adapters, name)`), like
`RunOptions.add_active_adapter` does for a plain session.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from transformers import PretrainedConfig

from sora_serve.errors import AdapterError

from .onnx_runtime import MANIFEST_FILE, MODEL_FILE

GENAI_CONFIG_FILE = "genai_config.json"
# HF model types kept as genai's `model.type` (llama, qwen2 in tests; mistral by hand); any other runs as "decoder".
GENAI_NAMED_TYPES = ("llama", "mistral", "qwen2")
PAST_NAMES = {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
PRESENT_NAMES = {"present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}


def genai_config(config: PretrainedConfig, generation_config: dict, manifest: dict) -> dict:
    """genai_config.json for a graph written by `onnx_export` (`config`: the transformers config).

    Special token ids come from generation_config.json when it has them, as transformers'
    `generate` reads them; pad falls back to eos (genai pads batch rows with it).
    """
    tokens = {
        key: generation_config.get(key, getattr(config, key, None))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id")
    }
    if tokens["pad_token_id"] is None:
        tokens["pad_token_id"] = tokens["eos_token_id"]
    context = int(config.max_position_embeddings)
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "log_severity_level": 3, "provider_options": []},
        "filename": MODEL_FILE,
        "head_size": manifest["head_dim"],
        "hidden_size": int(config.hidden_size),
        "num_attention_heads": int(config.num_attention_heads),
        "num_hidden_layers": manifest["num_layers"],
        "num_key_value_heads": manifest["kv_heads"],
        "inputs": {
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "position_ids": "position_ids",
            **PAST_NAMES,
        },
        "outputs": {"logits": "logits", **PRESENT_NAMES},
    }
    model_type = config.model_type if config.model_type in GENAI_NAMED_TYPES else "decoder"
    search = {
        "do_sample": False,
        "num_beams": 1,
        "num_return_sequences": 1,
        "max_length": context,
        "min_length": 0,
        "past_present_share_buffer": False,
        "temperature": 1.0,
        "top_k": 1,
        "top_p": 1.0,
        "repetition_penalty": 1.0,
        "length_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "diversity_penalty": 0.0,
        "early_stopping": True,
    }
    model = {
        **tokens,
        "context_length": context,
        "vocab_size": int(config.vocab_size),
        "type": model_type,
        "decoder": decoder,
    }
    return {"model": model, "search": search}


def write_genai_config(out: Path, config: PretrainedConfig, model_dir: Path, manifest: dict) -> None:
    """Write `out/genai_config.json` for the export in `out` of the checkpoint in `model_dir`."""
    generation = model_dir / "generation_config.json"
    generation_config = json.loads(generation.read_text()) if generation.is_file() else {}
    (out / GENAI_CONFIG_FILE).write_text(json.dumps(genai_config(config, generation_config, manifest), indent=2) + "\n")


def import_genai():
    try:
        import onnxruntime_genai
    except ImportError as exc:
        raise AdapterError(
            f"onnxruntime-genai is not installed ({exc}); pip install 'sora-serve[genai]'", field="format"
        ) from None
    return onnxruntime_genai


class GenaiCausalLM:
    """An exported genai folder run by onnxruntime-genai on token ids, every exported adapter loaded.

    `GenaiCausalLM(folder).generate(ids, 16, adapter="sora")`; adapter None = the base. Driven with
    token ids (`generator.append_tokens`), so it needs no tokenizer; `og.Tokenizer(lm.model)` reads
    the tokenizer files the export copied, when the checkpoint has them.
    """

    def __init__(self, folder: str | Path):
        self.og = import_genai()
        self.folder = Path(folder)
        config = self.folder / GENAI_CONFIG_FILE
        if not config.is_file():
            raise AdapterError("not a genai export (no genai_config.json; export with --format genai)", file=config)
        self.model = self.og.Model(str(self.folder))
        self.adapters = self.og.Adapters(self.model)
        self.adapter_names = json.loads((self.folder / MANIFEST_FILE).read_text())["adapters"]
        for name in self.adapter_names:
            self.adapters.load(str(self.folder / "adapters" / f"{name}.onnx_adapter"), name)

    def _generator(self, ids: np.ndarray, max_length: int, adapter: str | None):
        """A greedy generator with the prompt appended; EOS is suppressed until `max_length`."""
        if adapter is not None and adapter not in self.adapter_names:
            raise AdapterError(f"unknown adapter {adapter!r}; exported: {self.adapter_names}", field="adapter")
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(
            do_sample=False, batch_size=ids.shape[0], max_length=max_length, min_length=max_length
        )
        generator = self.og.Generator(self.model, params)
        if adapter is not None:
            generator.set_active_adapter(self.adapters, adapter)
        generator.append_tokens(np.ascontiguousarray(ids, dtype=np.int32))
        return generator

    def next_token_logits(self, ids: np.ndarray, adapter: str | None = None) -> np.ndarray:
        """(batch, vocab) logits after the prompt, as genai computes them before the first pick."""
        return self._generator(ids, ids.shape[1] + 1, adapter).get_logits().reshape(ids.shape[0], -1)

    def generate(self, ids: np.ndarray, max_new_tokens: int, adapter: str | None = None) -> np.ndarray:
        """Greedy decoding (genai's search, KV cache in genai); returns prompt + exactly `max_new_tokens`."""
        generator = self._generator(ids, ids.shape[1] + max_new_tokens, adapter)
        while not generator.is_done():
            generator.generate_next_token()
        return np.stack([np.asarray(generator.get_sequence(row), dtype=np.int64) for row in range(ids.shape[0])])
