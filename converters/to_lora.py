"""`sora-serve to-lora`: rewrite an adapter as a plain PEFT LoRA (for stock PEFT / vLLM).

Exact when every layer has no output scale (Pre-Diag/SORA d = 1, or plain LoRA) and leaves the
bias unchanged. Then, with W' = W0 + B A (B scaled) and R = I + V U^T,

    R W' - W0 = B A + V (U^T W')  =  [B  V] @ [A ; U^T W']        (rank r + 2 r_p)

written with lora_alpha = r so that PEFT's s = 1. Otherwise the dense delta R(scale W0 + B A) - W0
is full rank: `--allow-approx --rank K` writes its truncated SVD (for every layer, exact-able or
not), reporting the relative Frobenius error per layer and overall. A changed bias (a rotation
or d != 1 on a layer with a bias) cannot be expressed by LoRA at all and is always refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from tqdm.auto import tqdm

import sora_serve as ss
from sora_serve.adapter_format import PEFT_PREFIX, WEIGHTS_FILE, write_side_fingerprint
from sora_serve.checkpoint import Checkpoint, check_adapter_against
from sora_serve.cli import add_override_flags, override_kwargs
from sora_serve.errors import AdapterError
from sora_serve.fingerprint import base_fingerprint
from sora_serve.fs import atomic_output_dir
from sora_serve.layer import stores_in_out
from sora_serve.methods import ServingFactors

BIAS_RTOL = 1e-9  # float64 math: DoRA's g b + (1 - g) b equals b only up to rounding


def is_exactly_lora(factors: ServingFactors) -> bool:
    """No output scale (or all ones) and no bias shift: the update is W0 + low rank."""
    no_scale = factors.scale is None or bool(torch.all(factors.scale == 1))
    return no_scale and (factors.bias_shift is None or not bool(torch.any(factors.bias_shift)))


def changes_bias(factors: ServingFactors, bias: torch.Tensor | None, out_features: int) -> bool:
    """Whether the folded bias R (scale b + shift) differs from b (a missing bias counts as 0)."""
    zeros = torch.zeros(out_features, dtype=factors.lora_B.dtype)
    _, merged = factors.dense(zeros[:, None], bias)
    if merged is None:
        return False
    reference = zeros if bias is None else bias
    return not torch.allclose(merged, reference, rtol=BIAS_RTOL, atol=BIAS_RTOL * reference.abs().max().item())


def exact_factors(factors: ServingFactors, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') with B' A' = R (W0 + B A) - W0, of rank r + 2 r_p (see the module docstring)."""
    if factors.rot_U is None:
        return factors.lora_A, factors.lora_B
    adapted = weight + factors.lora_B @ factors.lora_A
    return torch.cat([factors.lora_A, factors.rot_U.T @ adapted]), torch.cat([factors.lora_B, factors.rot_V], dim=1)


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-`rank` (A, B) of `delta` (Eckart-Young), with |delta - B A|_F and |delta|_F."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.shape[0])
    return vh[:k], u[:, :k] * s[:k], s[k:].norm().item(), s.norm().item()


def to_lora(
    base_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    allow_approx: bool = False,
    rank: int | None = None,
    force: bool = False,
    progress: bool = True,
    allow_large_updates: bool | None = None,
    allow_other_base: bool | None = None,
) -> dict:
    """Write a PEFT LoRA dir equal to the adapter (or, with allow_approx, its best rank-`rank` fit).

    The adapter is validated against the base first (`check_adapter_against`, with ||W0||_F and the
    fingerprint's weights); `allow_large_updates` as in `read_adapter`, `allow_other_base` as in
    `sora_serve.fingerprint.check_fingerprint`. The output records this base's fingerprint.

    Returns exact, rank, per-layer relative Frobenius errors and the overall one,
    |all residuals|_F / |all deltas|_F (0 when exact).
    """
    if allow_approx != (rank is not None) or (rank is not None and rank <= 0):
        raise AdapterError("--allow-approx and a positive --rank go together", field="rank")
    checkpoint = Checkpoint(base_dir)
    adapter = ss.read_adapter(adapter_dir, allow_large_updates=allow_large_updates)
    layers = check_adapter_against(
        adapter, checkpoint, allow_large_updates=allow_large_updates, allow_other_base=allow_other_base
    )
    model_type = checkpoint.config_dict.get("model_type")
    modules = dict(checkpoint.meta_model.named_modules())
    tensors, errors, residual_sq, delta_sq = {}, {}, 0.0, 0.0
    for path in tqdm(sorted(adapter.tensors), desc="to-lora", disable=not progress):
        base = checkpoint.base_view(path, torch.float64)
        weight, bias, factors = base.weight(), base.bias, adapter.serving_factors(path, base)
        if changes_bias(factors, bias, weight.shape[0]):
            raise AdapterError(
                f"layer '{path}': the adapter changes its bias, which a LoRA cannot express", file=adapter.directory
            )
        if allow_approx:
            a, b, residual, norm = svd_factors(factors.dense(weight, bias)[0] - weight, rank)
            errors[path] = residual / max(norm, 1e-300)
            residual_sq, delta_sq = residual_sq + residual**2, delta_sq + norm**2
        elif is_exactly_lora(factors):
            a, b = exact_factors(factors, weight)
        else:
            scale = "DoRA's magnitude g" if adapter.module_configs[path].method == "dora" else "d"
            raise AdapterError(
                f"layer '{path}': the output scale ({scale}) != 1 makes the update full rank; "
                "pass --allow-approx --rank K for a truncated SVD",
                file=adapter.directory,
            )
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b.float().contiguous()
    out_rank = max(t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight"))
    for a_key in [k for k in tensors if k.endswith("lora_A.weight")]:  # one rank for all layers (vLLM needs it)
        b_key = a_key.replace("lora_A", "lora_B")
        tensors[a_key], tensors[b_key] = _pad_rank(tensors[a_key], tensors[b_key], out_rank)
    config = LoraConfig(
        r=out_rank,
        lora_alpha=out_rank,
        target_modules=sorted(adapter.tensors),  # s = 1: B A is the update itself
        fan_in_fan_out=any(stores_in_out(modules[p]) for p in adapter.tensors),
        base_model_name_or_path=adapter.base_model_name_or_path,
    )
    with atomic_output_dir(out_dir, force=force) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_side_fingerprint(tmp, base_fingerprint({p: layers[p] for p in adapter.tensors}, model_type))
    overall = (residual_sq / max(delta_sq, 1e-300)) ** 0.5 if allow_approx else 0.0
    return {
        "exact": not allow_approx,
        "rank": out_rank,
        "layer_errors": errors,
        "overall_error": overall,
        "out_dir": str(out_dir),
    }


def _pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = rank - a.shape[0]
    if extra == 0:
        return a, b
    return torch.cat([a, a.new_zeros(extra, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base Hugging Face checkpoint directory")
    parser.add_argument("--adapter", required=True, help="adapter directory")
    parser.add_argument("--out", required=True, help="PEFT LoRA directory to write")
    parser.add_argument(
        "--allow-approx",
        action="store_true",
        help="write the best rank-K fit (truncated SVD of each layer's update) instead of the exact form",
    )
    parser.add_argument("--rank", type=int, help="rank of the approximation (with --allow-approx)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    add_override_flags(parser)


def run(args: argparse.Namespace) -> None:
    result = to_lora(
        args.base,
        args.adapter,
        args.out,
        allow_approx=args.allow_approx,
        rank=args.rank,
        force=args.force,
        **override_kwargs(args),
    )
    if result["exact"]:
        print(f"wrote an exact PEFT LoRA of rank {result['rank']} to {args.out}")
        return
    for path, error in result["layer_errors"].items():
        print(f"  {path}: relative Frobenius error {error:.4f}")
    print(
        f"wrote a rank-{result['rank']} approximation to {args.out}: overall relative Frobenius error "
        f"{result['overall_error']:.4f}"
    )
