"""`sora-serve fold`: fold an adapter exactly into the base weights, shard by shard.

For every adapted layer the merged weight and bias come from `ServingFactors.dense`:
W = R (scale W0 + B A), b = R (scale b0 + bias_shift), computed in float32 or float64 and
cast back. The output has the base's files and sharding; only adapted tensors change (and an
output head tied to the embeddings is untied when the adapter touches it). Peak memory is one
shard plus the adapter. The result is written to a temporary directory and renamed.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

import sora_serve as ss
from sora_serve.errors import AdapterError
from sora_serve.fs import atomic_output_dir
from sora_serve.io import AdapterFile, adapter_from_tensors, check_base

from .checkpoint import INDEX_FILE, Checkpoint

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LayerFolder:
    """Computes the merged (weight, bias) of each adapted layer from the checkpoint's tensors."""

    def __init__(self, checkpoint: Checkpoint, adapter: AdapterFile, math_dtype: torch.dtype):
        self.checkpoint, self.adapter, self.math_dtype = checkpoint, adapter, math_dtype
        modules = dict(checkpoint.meta_model.named_modules())
        self.transposed = {p: isinstance(modules[p], Conv1D) for p in adapter.tensors}
        self.untied: dict[str, str] = {}  # module path -> tied source key (head whose weight is not in the file)
        for path in adapter.tensors:
            if f"{path}.weight" not in checkpoint.weight_map:
                source = checkpoint.tied_source(path)
                if source is None:
                    raise AdapterError(f"tensor '{path}.weight' not in the base checkpoint", file=checkpoint.directory)
                self.untied[path] = source

    def weight_key(self, path: str) -> str:
        return self.untied.get(path, f"{path}.weight")

    def fold(self, path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Merged (weight in the file's orientation, bias or None) in the math dtype."""
        raw = self.checkpoint.get_tensor(self.weight_key(path)).to(self.math_dtype)
        weight = raw.T if self.transposed[path] else raw
        bias_key = f"{path}.bias"
        bias = self.checkpoint.get_tensor(bias_key).to(self.math_dtype) if bias_key in self.checkpoint.weight_map else None
        module = adapter_from_tensors(self.adapter.module_configs[path], self.adapter.tensors[path], weight)
        merged_w, merged_b = module.serving_factors(weight, bias, self.math_dtype).dense(weight, bias)
        if bias is None and merged_b is not None:
            raise AdapterError(f"the merged layer '{path}' needs a bias the base layer does not have", field=bias_key)
        return (merged_w.T if self.transposed[path] else merged_w).contiguous(), merged_b


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
) -> dict:
    """Write base + adapter as one plain checkpoint; return what was done and the measured error."""
    if math_dtype not in ("float32", "float64"):
        raise AdapterError(f"math dtype must be float32 or float64, got {math_dtype!r}", field="math_dtype")
    if dtype != "auto" and dtype not in DTYPES:
        raise AdapterError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(DTYPES)}", field="dtype")
    checkpoint = Checkpoint(base_dir)
    adapter = ss.read_adapter(adapter_dir)
    check_base(adapter, checkpoint.meta_model)
    folder = LayerFolder(checkpoint, adapter, DTYPES[math_dtype])
    out_dtype = None if dtype == "auto" else DTYPES[dtype]
    with atomic_output_dir(out_dir, force=force) as tmp:
        copy_side_files(checkpoint, tmp, untie=bool(folder.untied), dtype=dtype)
        write_shards(checkpoint, folder, tmp, out_dtype, progress)
    if folder.untied:
        print(f"untied {sorted(folder.untied)} from {sorted(set(folder.untied.values()))}: the adapter changes the output head")
    result = {"out_dir": str(out_dir), "layers": len(adapter.tensors), "shards": len(checkpoint.shards), "untied": sorted(folder.untied)}
    if verify:
        result["max_abs_error"] = verify_fold(base_dir, adapter_dir, out_dir)
        print(f"verified: max |merged - runtime adapter| logit error = {result['max_abs_error']:.3e}")
    return result


def copy_side_files(checkpoint: Checkpoint, out: Path, *, untie: bool, dtype: str) -> None:
    """config (edited if untied or recast), generation config, tokenizer files: everything but weights."""
    for path in checkpoint.directory.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and path.name not in (INDEX_FILE, "config.json"):
            shutil.copy2(path, out / path.name)
    config = dict(checkpoint.config_dict)
    if untie:
        config["tie_word_embeddings"] = False
    if dtype != "auto":
        config["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_shards(checkpoint: Checkpoint, folder: LayerFolder, out: Path, out_dtype: torch.dtype | None, progress: bool) -> None:
    """Each shard read, its adapted tensors replaced, written under the same name; index kept."""
    weight_paths = {f"{p}.weight": p for p in folder.adapter.tensors if p not in folder.untied}
    bias_paths = {f"{p}.bias": p for p in folder.adapter.tensors if f"{p}.bias" in checkpoint.weight_map}
    weight_map = dict(checkpoint.weight_map)
    for path, source in folder.untied.items():  # the untied head goes in its source's shard
        weight_map[f"{path}.weight"] = checkpoint.weight_map[source]
    total_size = 0
    for shard in tqdm(checkpoint.shards, desc="fold shards", disable=not progress):
        tensors: dict[str, torch.Tensor] = {}
        pending_bias: dict[str, torch.Tensor | None] = {}
        with checkpoint.open(shard) as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if key in weight_paths:
                    tensor, pending_bias[weight_paths[key]] = _fold_keep_dtype(folder, weight_paths[key], tensor.dtype)
                elif key in bias_paths:
                    path = bias_paths[key]
                    tensor = pending_bias.pop(path) if path in pending_bias else _fold_keep_dtype(folder, path, tensor.dtype)[1]
                tensors[key] = tensor
        for path in folder.untied:
            if weight_map[f"{path}.weight"] == shard:
                tensors[f"{path}.weight"] = _fold_keep_dtype(folder, path, tensors[folder.untied[path]].dtype)[0]
        if out_dtype is not None:
            tensors = {k: v.to(out_dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(out / shard), metadata=checkpoint.shard_metadata(shard) or {"format": "pt"})
        del tensors
    if checkpoint.is_sharded:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _fold_keep_dtype(folder: LayerFolder, path: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight, bias = folder.fold(path)
    return weight.to(dtype), None if bias is None else bias.to(dtype)


@torch.no_grad()
def verify_fold(base_dir: str | Path, adapter_dir: str | Path, merged_dir: str | Path, seed: int = 0) -> float:
    """Max |logits(merged) - logits(base + runtime adapter)| on random token ids (loads both models)."""
    from transformers import AutoModelForCausalLM

    runtime = ss.load_adapter(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval(), adapter_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, runtime.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    return (merged(ids).logits - runtime(ids).logits).abs().max().item()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base Hugging Face checkpoint directory (safetensors)")
    parser.add_argument("--adapter", required=True, help="adapter directory (ours, or PEFT LoRA/DoRA)")
    parser.add_argument("--out", required=True, help="merged checkpoint directory to write")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="output dtype (default: the base's)")
    parser.add_argument("--math-dtype", default="float32", choices=["float32", "float64"], help="dtype of the fold math")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-verify", action="store_true", help="skip the logit check (it loads base and merged models)")


def run(args: argparse.Namespace) -> None:
    result = fold_adapter(
        args.base, args.adapter, args.out, dtype=args.dtype, math_dtype=args.math_dtype, force=args.force, verify=not args.no_verify
    )
    print(f"wrote {result['out_dir']}: {result['layers']} layers folded across {result['shards']} shard(s)")
