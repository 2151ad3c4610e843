"""`sora-serve fold`: fold an adapter exactly into the base weights, shard by shard.

For every adapted layer the merged weight and bias come from `ServingFactors.dense`:
W = R (scale W0 + B A), b = R (scale b0 + bias_shift), computed in float32 or float64 and
cast back. The output has the base's files and sharding; only adapted tensors change (and an
output head tied to the embeddings is untied when the adapter touches it). Shards are written
tensor by tensor, so peak memory is the adapter plus a few layers, never a whole shard or model.
The result is written to a temporary directory and renamed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

import sora_serve as ss
from sora_serve.adapter_format import AdapterFile
from sora_serve.checkpoint import INDEX_FILE, Checkpoint, check_adapter_against, tensor_spec, write_safetensors
from sora_serve.cli import add_override_flags, override_kwargs
from sora_serve.errors import AdapterError
from sora_serve.fs import atomic_output_dir

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LayerFolder:
    """Computes the merged (weight, bias) of each adapted layer from the checkpoint's tensors.

    An output head tied to the embeddings is untied when the adapter changes it: its merged
    weight is written as `<path>.weight`, next to the embedding if the file holds only that.
    """

    def __init__(self, checkpoint: Checkpoint, adapter: AdapterFile, math_dtype: torch.dtype):
        self.checkpoint, self.adapter, self.math_dtype = checkpoint, adapter, math_dtype
        paths = sorted(adapter.tensors)
        self.weight_keys = {p: checkpoint.weight_key(p) for p in paths}
        self.bias_keys = {p: checkpoint.tensor_key(p, "bias") for p in paths}
        self.untied = {p: source for p in paths if (source := checkpoint.tied_source(p)) is not None}
        # Untied heads stored only as the embedding: path -> the embedding key they are read from.
        self.new_heads = {p: source for p, source in self.untied.items() if self.weight_keys[p] == source}

    def keys_to_layers(self) -> dict[str, str]:
        """File key -> adapted layer, for every stored tensor the fold replaces."""
        owners = {self.weight_keys[p]: p for p in self.weight_keys if p not in self.new_heads}
        return owners | {key: p for p, key in self.bias_keys.items() if key is not None}

    def fold(self, path: str) -> dict[str, torch.Tensor]:
        """The layer's merged tensors in the math dtype, by output key (weight in the file's orientation)."""
        base = self.checkpoint.base_view(path, self.math_dtype)
        weight, bias, bias_key = base.weight(), base.bias, self.bias_keys[path]
        merged_w, merged_b = self.adapter.serving_factors(path, base, self.math_dtype).dense(weight, bias)
        if bias is None and merged_b is not None:
            raise AdapterError(
                f"the merged layer '{path}' needs a bias the base layer does not have", field=f"{path}.bias"
            )
        weight_key = f"{path}.weight" if path in self.new_heads else self.weight_keys[path]
        merged = {weight_key: (merged_w.T if self.checkpoint.is_transposed(path) else merged_w).contiguous()}
        return merged if bias_key is None else merged | {bias_key: merged_b}


def fold_adapter(
    base_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "auto",
    math_dtype: str = "float32",
    force: bool = False,
    verify: bool = True,
    progress: bool = True,
    allow_large_updates: bool | None = None,
    allow_other_base: bool | None = None,
) -> dict:
    """Write base + adapter as one plain checkpoint; return what was done and the measured error.

    The adapter is validated against the base first (`check_adapter_against`, with ||W0||_F and the
    fingerprint's weights); `allow_large_updates` as in `read_adapter`, `allow_other_base` as in
    `sora_serve.fingerprint.check_fingerprint`."""
    if math_dtype not in ("float32", "float64"):
        raise AdapterError(f"math dtype must be float32 or float64, got {math_dtype!r}", field="math_dtype")
    if dtype != "auto" and dtype not in DTYPES:
        raise AdapterError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(DTYPES)}", field="dtype")
    checkpoint = Checkpoint(base_dir)
    adapter = ss.read_adapter(adapter_dir, allow_large_updates=allow_large_updates)
    checkpoint.validate()
    overrides = {"allow_large_updates": allow_large_updates, "allow_other_base": allow_other_base}
    check_adapter_against(adapter, checkpoint, **overrides)
    folder = LayerFolder(checkpoint, adapter, DTYPES[math_dtype])
    out_dtype = None if dtype == "auto" else DTYPES[dtype]
    with atomic_output_dir(out_dir, force=force) as tmp:
        copy_side_files(checkpoint, tmp, untie=bool(folder.untied), dtype=dtype)
        write_shards(checkpoint, folder, tmp, out_dtype, progress)
    if folder.untied:
        print(
            f"untied {sorted(folder.untied)} from {sorted(set(folder.untied.values()))}: the adapter "
            "changes the output head"
        )
        warn_if_vllm_ties_the_head(checkpoint.config_dict)
    result = {
        "out_dir": str(out_dir),
        "layers": len(adapter.tensors),
        "shards": len(checkpoint.shards),
        "untied": sorted(folder.untied),
    }
    if verify:
        result["max_abs_error"] = verify_fold(base_dir, adapter_dir, out_dir, **overrides)
        print(f"verified: max |merged - runtime adapter| logit error = {result['max_abs_error']:.3e}")
    return result


def copy_side_files(checkpoint: Checkpoint, out: Path, *, untie: bool, dtype: str) -> None:
    """config (edited if untied or recast), generation config, tokenizer files: everything but weights."""
    for path in checkpoint.directory.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and path.name != INDEX_FILE:
            shutil.copy2(path, out / path.name)
    edits = ({"tie_word_embeddings": False} if untie else {}) | ({"dtype": dtype} if dtype != "auto" else {})
    if edits:
        config = checkpoint.config_dict | edits
        if dtype != "auto" and "torch_dtype" in config:  # the older name, still read by some tools
            config["torch_dtype"] = dtype
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_shards(
    checkpoint: Checkpoint, folder: LayerFolder, out: Path, out_dtype: torch.dtype | None, progress: bool
) -> None:
    """Each shard rewritten under its name, tensor by tensor, adapted ones replaced; index kept.

    A layer is folded once, when the first of its tensors comes up; the other one (bias or
    weight, possibly in a later shard) waits in `pending`. Memory: a few layers, not a shard.
    """
    owners = folder.keys_to_layers()
    new_heads = {f"{path}.weight": path for path in folder.new_heads}
    weight_map = dict(checkpoint.weight_map) | {
        key: checkpoint.weight_map[folder.new_heads[p]] for key, p in new_heads.items()
    }
    pending: dict[str, torch.Tensor] = {}

    def produce(f, key: str, dtype: torch.dtype) -> torch.Tensor:
        if key in new_heads:
            return folder.fold(new_heads[key])[key].to(dtype)
        if key in owners and key not in pending:
            pending.update(folder.fold(owners[key]))
        return (pending.pop(key) if key in pending else f.get_tensor(key)).to(dtype)

    total_size = 0
    for shard in tqdm(checkpoint.shards, desc="fold shards", disable=not progress):
        with checkpoint.open(shard) as f:
            specs = {key: tensor_spec(f, key) for key in f.keys()}
            specs |= {key: specs[folder.new_heads[p]] for key, p in new_heads.items() if folder.new_heads[p] in specs}
            entries = [(key, _output_dtype(dtype, out_dtype), shape) for key, (dtype, shape) in specs.items()]
            dtypes = {key: dtype for key, dtype, _ in entries}
            total_size += write_safetensors(
                out / shard, entries, lambda key: produce(f, key, dtypes[key]), f.metadata() or {"format": "pt"}
            )
    if checkpoint.is_sharded:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _output_dtype(stored: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    return requested if requested is not None and stored.is_floating_point else stored


def warn_if_vllm_ties_the_head(config: dict) -> None:
    """Warn (stderr) when vLLM's implementation of the architecture always ties the head.

    Such a class (Gemma2, Cohere, ...) computes logits with the input embeddings and has no
    `lm_head` to load, so vLLM cannot serve the untied checkpoint (`sora-serve serve` refuses it
    before the engine starts). A warning, not a refusal: the merged checkpoint is exact and
    transformers and ONNX honour `tie_word_embeddings: false`.
    """
    try:
        from sora_serve.vllm_plugin.models import vllm_always_ties_head
    except ImportError:  # vLLM is an optional extra
        return
    architecture = next(iter(config.get("architectures") or []), None)
    if architecture and vllm_always_ties_head(architecture):
        print(
            f"WARNING: vLLM's {architecture} always ties the output head to the input embeddings: it cannot serve this "
            "untied checkpoint (transformers and ONNX can). To serve with vLLM, train the adapter without lm_head.",
            file=sys.stderr,
        )


@torch.no_grad()
def verify_fold(
    base_dir: str | Path, adapter_dir: str | Path, merged_dir: str | Path, seed: int = 0, **overrides: bool | None
) -> float:
    """Max |logits(merged) - logits(base + runtime adapter)| on random token ids (loads both models)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    runtime = ss.load_adapter(base, adapter_dir, **overrides)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, runtime.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    return (merged(ids).logits - runtime(ids).logits).abs().max().item()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base Hugging Face checkpoint directory (safetensors)")
    parser.add_argument("--adapter", required=True, help="adapter directory (ours, or PEFT LoRA/DoRA)")
    parser.add_argument("--out", required=True, help="merged checkpoint directory to write")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="output dtype (default: the base's)")
    parser.add_argument(
        "--math-dtype", default="float32", choices=["float32", "float64"], help="dtype of the fold math"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the logit check (it loads base and merged models)"
    )
    add_override_flags(parser)


def run(args: argparse.Namespace) -> None:
    result = fold_adapter(
        args.base,
        args.adapter,
        args.out,
        dtype=args.dtype,
        math_dtype=args.math_dtype,
        force=args.force,
        verify=not args.no_verify,
        **override_kwargs(args),
    )
    print(f"wrote {result['out_dir']}: {result['layers']} layers folded across {result['shards']} shard(s)")
