"""`sora-serve to-lora`: rewrite an adapter as a plain PEFT LoRA (for stock PEFT / vLLM).

Exact when every layer has no output scale (d = 1) and leaves the bias unchanged. Then, with
W' = W0 + B A (B scaled) and R = I + V U^T,

    R W' - W0 = B A + V (U^T W')  =  [B  V] @ [A ; U^T W']        (rank r + 2 r_p)

Otherwise the dense delta R(scale W0 + B A) - W0 is full rank: only `--allow-approx --rank K`
writes its truncated SVD, reporting the relative Frobenius error per layer and overall. A
changed bias cannot be expressed by LoRA at all and is refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

import sora_serve as ss
from sora_serve.errors import AdapterError
from sora_serve.fs import atomic_output_dir
from sora_serve.io import PEFT_PREFIX, WEIGHTS_FILE, adapter_from_tensors, check_base
from sora_serve.methods import ServingFactors

from .checkpoint import Checkpoint


def is_exactly_lora(factors: ServingFactors) -> bool:
    """No scale (or d == 1), no bias shift: the update is W0 + low rank."""
    return (factors.scale is None or bool(torch.all(factors.scale == 1))) and factors.bias_shift is None


def changes_bias(factors: ServingFactors, bias: torch.Tensor | None) -> bool:
    if bias is None:
        return False
    _, merged = factors.dense(torch.zeros(bias.shape[0], 1, dtype=bias.dtype), bias)
    return not torch.equal(merged, bias)


def exact_factors(factors: ServingFactors, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') with B' A' = R (W0 + B A) - W0, of rank r + 2 r_p (see the module docstring)."""
    if factors.rot_U is None:
        return factors.lora_A, factors.lora_B
    adapted = weight + factors.lora_B @ factors.lora_A
    return torch.cat([factors.lora_A, factors.rot_U.T @ adapted]), torch.cat([factors.lora_B, factors.rot_V], dim=1)


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` (A, B) of `delta` and the relative Frobenius error."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.shape[0])
    b, a = u[:, :k] * s[:k], vh[:k]
    error = (s[k:].square().sum().sqrt() / s.square().sum().sqrt().clamp_min(1e-300)).item()
    return a, b, error


def to_lora(base_dir, adapter_dir, out_dir, *, allow_approx: bool = False, rank: int | None = None, force: bool = False, progress: bool = True) -> dict:
    """Write a PEFT LoRA dir equal (or, with allow_approx, closest at `rank`) to the adapter."""
    if allow_approx and (rank is None or rank <= 0):
        raise AdapterError("--allow-approx needs a positive --rank", field="rank")
    checkpoint = Checkpoint(base_dir)
    adapter = ss.read_adapter(adapter_dir)
    check_base(adapter, checkpoint.meta_model)
    modules = dict(checkpoint.meta_model.named_modules())
    tensors, errors, exact = {}, {}, True
    for path in tqdm(sorted(adapter.tensors), desc="to-lora", disable=not progress):
        transposed = isinstance(modules[path], Conv1D)
        raw = checkpoint.get_tensor(f"{path}.weight").double()
        weight = raw.T if transposed else raw
        bias = checkpoint.get_tensor(f"{path}.bias").double() if f"{path}.bias" in checkpoint.weight_map else None
        factors = adapter_from_tensors(adapter.module_configs[path], adapter.tensors[path], weight).serving_factors(weight, bias)
        if changes_bias(factors, bias):
            raise AdapterError(f"layer '{path}': the adapter changes its bias, which a LoRA cannot express", file=adapter.directory)
        if is_exactly_lora(factors) and not allow_approx:
            a, b = exact_factors(factors, weight)
            errors[path] = 0.0
        elif allow_approx:
            merged, _ = factors.dense(weight, bias)
            a, b, errors[path] = svd_factors(merged - weight, rank)
            exact = False
        else:
            raise AdapterError(
                f"layer '{path}': the output scale d != 1 makes the update full rank; pass --allow-approx --rank K for a truncated SVD",
                file=adapter.directory,
            )
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b.float().contiguous()
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")}
    out_rank = max(ranks)
    for key in [k for k in tensors if k.endswith("lora_A.weight")]:  # pad the rare smaller-rank layer (tiny SVD) to one rank
        tensors[key], b_key = _pad_rank(tensors[key], tensors[key.replace("lora_A", "lora_B")], out_rank)
        tensors[key.replace("lora_A", "lora_B")] = b_key
    config = LoraConfig(
        r=out_rank, lora_alpha=out_rank, target_modules=sorted(adapter.tensors),  # s = 1: B A is the update itself
        fan_in_fan_out=any(isinstance(modules[p], Conv1D) for p in adapter.tensors),
        base_model_name_or_path=adapter.base_model_name_or_path,
    )
    with atomic_output_dir(out_dir, force=force) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    overall = 0.0 if exact else rms(errors.values())
    return {"exact": exact, "rank": out_rank, "layer_errors": errors, "overall_error": overall, "out_dir": str(out_dir)}


def _pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = rank - a.shape[0]
    if extra == 0:
        return a, b
    return torch.cat([a, a.new_zeros(extra, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)


def rms(errors) -> float:
    """Overall error: root-mean-square of the per-layer relative errors."""
    errors = list(errors)
    return (sum(e * e for e in errors) / len(errors)) ** 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base Hugging Face checkpoint directory")
    parser.add_argument("--adapter", required=True, help="adapter directory")
    parser.add_argument("--out", required=True, help="PEFT LoRA directory to write")
    parser.add_argument("--allow-approx", action="store_true", help="allow a truncated-SVD approximation when exactness is impossible")
    parser.add_argument("--rank", type=int, help="rank of the approximation (with --allow-approx)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")


def run(args: argparse.Namespace) -> None:
    result = to_lora(args.base, args.adapter, args.out, allow_approx=args.allow_approx, rank=args.rank, force=args.force)
    if result["exact"]:
        print(f"wrote an exact PEFT LoRA of rank {result['rank']} to {args.out}")
        return
    for path, error in result["layer_errors"].items():
        print(f"  {path}: relative Frobenius error {error:.4f}")
    print(f"wrote a rank-{result['rank']} approximation to {args.out}: overall (RMS) relative error {result['overall_error']:.4f}")
