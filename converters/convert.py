"""`sora-serve convert --to sora|reference IN OUT`: between our SORA dirs and the paper's own format.

The paper's code (github MaeChd/SORA) saves a PEFT LoRA dir whose modules also hold
`lora_C.weight`, `lora_D.weight` (out x r_p) and `lora_Diag.weight` (out x 1); its forward is our
first-order SORA (docs/FORMAT.md). Both directions copy the tensors unchanged (the diagonal only
reshaped), so reference -> ours -> reference gives back the same tensors and config.

- `--to sora`: from a reference dir (read and validated as every entry reads it). Its PEFT config
  is kept in ours under `reference_config`, for the way back; `--base` records the base fingerprint.
- `--to reference`: from our SORA dir. A first-order rotation is exact. A Cayley rotation is not
  the reference's forward: refused, or with `--allow-approx` written with the same C, D and the
  error reported per layer, ||R_cayley - (I + K)||_F / ||R_cayley||_F (the rotation alone).
  Pre-Diag, LoRA and DoRA have no reference form here and are refused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import sora_serve as ss
from sora_serve.adapter_format import (
    CONFIG_FILE,
    PEFT_PREFIX,
    REFERENCE_NAMES,
    REFERENCE_S0,
    WEIGHTS_FILE,
    AdapterFile,
    our_config_json,
)
from sora_serve.checkpoint import Checkpoint, check_adapter_against
from sora_serve.errors import AdapterError
from sora_serve.fingerprint import base_fingerprint
from sora_serve.fs import atomic_output_dir
from sora_serve.methods import METHOD_CLASSES, rotation_factors

TARGETS = ("sora", "reference")


def convert(
    in_dir: str | Path,
    out_dir: str | Path,
    to: str,
    *,
    base_dir: str | Path | None = None,
    allow_approx: bool = False,
    force: bool = False,
) -> dict:
    """Write `in_dir` in the format `to` ("sora" or "reference") to `out_dir`, whole or not at all.

    Returns {"out_dir", "exact", "rotation_errors": {module: relative error}} (errors only when approximate)."""
    if to not in TARGETS:
        raise AdapterError(f"unknown target format {to!r}; expected one of {TARGETS}", field="to")
    adapter = ss.read_adapter(in_dir)
    is_reference = adapter.layout == "reference"
    if to == "sora":
        if not is_reference:
            raise AdapterError(
                "not a MaeChd/SORA dir (no lora_C/lora_D/lora_Diag tensors): nothing to convert",
                file=adapter.weights_file,
            )
        with atomic_output_dir(out_dir, force=force) as tmp:
            write_ours(adapter, tmp, _fingerprint(adapter, base_dir))
        return {"out_dir": str(out_dir), "exact": True, "rotation_errors": {}}
    if is_reference or adapter.method != "sora":
        what = (
            "already in the reference format"
            if is_reference
            else f"a {adapter.method} adapter; only SORA has a reference form"
        )
        raise AdapterError(what, file=adapter.config_file, field="peft_type")
    errors = {} if adapter.config.rotation == "first_order" else cayley_errors(adapter)
    if errors and not allow_approx:
        raise AdapterError(
            "rotation 'cayley' is not the reference's forward (y = z + K z): the same C, D give a "
            "rotation differing by up to "
            f"{max(errors.values()):.3g} (relative Frobenius); pass --allow-approx to write it anyway",
            file=adapter.config_file,
            field="rotation",
        )
    with atomic_output_dir(out_dir, force=force) as tmp:
        write_reference(adapter, tmp)
    return {"out_dir": str(out_dir), "exact": not errors, "rotation_errors": errors}


def _fingerprint(adapter: AdapterFile, base_dir: str | Path | None) -> dict:
    """The base's fingerprint with `--base` (checked against the adapter first), else an empty one."""
    if base_dir is None:
        return {"model_type": None, "modules": {}}
    checkpoint = Checkpoint(base_dir)
    layers = check_adapter_against(adapter, checkpoint)
    return base_fingerprint(layers, checkpoint.config_dict.get("model_type"))


def write_ours(adapter: AdapterFile, directory: Path, fingerprint: dict) -> None:
    raw = json.loads(adapter.config_file.read_text())
    config = {**our_config_json(adapter.config, adapter.base_model_name_or_path, fingerprint), "reference_config": raw}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _save(adapter, directory / WEIGHTS_FILE, METHOD_CLASSES["sora"].file_names, lambda d: d)


def write_reference(adapter: AdapterFile, directory: Path) -> None:
    raw = json.loads(adapter.config_file.read_text())
    if "reference_config" in raw:  # converted from the reference: its own config, as it was
        (directory / CONFIG_FILE).write_text(json.dumps(raw["reference_config"], indent=2, sort_keys=True) + "\n")
    else:
        write_reference_config(adapter, directory)
    _save(adapter, directory / WEIGHTS_FILE, REFERENCE_NAMES, lambda d: d[:, None])


def write_reference_config(adapter: AdapterFile, directory: Path) -> None:
    """PEFT's LoraConfig (peft_type LORA), written by PEFT; s0 as `initial_s_p` when it is not the reference's 1."""
    from peft import LoraConfig

    config = adapter.config
    LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        target_modules=config.target_modules,
        lora_dropout=config.lora_dropout,
        base_model_name_or_path=adapter.base_model_name_or_path,
    ).save_pretrained(str(directory))
    if config.s0 != REFERENCE_S0:
        path = directory / CONFIG_FILE
        path.write_text(
            json.dumps({**json.loads(path.read_text()), "initial_s_p": config.s0}, indent=2, sort_keys=True) + "\n"
        )


def _save(adapter: AdapterFile, path: Path, names: dict[str, str], diagonal) -> None:
    tensors = {}
    for module_path, params in adapter.tensors.items():
        for param, tensor in params.items():
            tensors[f"{PEFT_PREFIX}{module_path}.{names[param]}"] = (
                diagonal(tensor) if param == "d" else tensor
            ).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def cayley_errors(adapter: AdapterFile) -> dict[str, float]:
    """Per module ||R_cayley - R_first_order||_F / ||R_cayley||_F for the same C, D (float64).

    Both are I + V U^T with the same U = [C, D], so the difference is (V_c - V_f) U^T and its norm
    comes from two small Gram matrices; ||R_cayley||_F = sqrt(out) (orthogonal)."""
    errors = {}
    for module_path, t in adapter.tensors.items():
        c, d = t["sora_C"].double(), t["sora_D"].double()
        u, v_cayley = rotation_factors(c, d, adapter.config.s0, "cayley")
        _, v_first = rotation_factors(c, d, adapter.config.s0, "first_order")
        diff = v_cayley - v_first
        sq = torch.trace((diff.T @ diff) @ (u.T @ u)).clamp_min(0)
        errors[module_path] = float(sq.sqrt() / c.shape[0] ** 0.5)
    return errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="adapter directory to convert")
    parser.add_argument("output", metavar="OUT", help="directory to write")
    parser.add_argument(
        "--to",
        required=True,
        choices=TARGETS,
        help="sora: our format, from a MaeChd/SORA dir; reference: the paper's format, from ours",
    )
    parser.add_argument(
        "--base", help="with --to sora: base checkpoint whose fingerprint the output records (checked first)"
    )
    parser.add_argument(
        "--allow-approx",
        action="store_true",
        help="with --to reference: write a Cayley SORA with the same C, D (reports the error)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing OUT")
    parser.add_argument(
        "--reference-s0",
        type=float,
        metavar="S",
        help="s_p numerator of a reference IN whose run set initial_s_p (default 1.0); kept in OUT",
    )


def run(args: argparse.Namespace) -> None:
    result = convert(
        args.input, args.output, args.to, base_dir=args.base, allow_approx=args.allow_approx, force=args.force
    )
    for module_path, error in result["rotation_errors"].items():
        print(f"  {module_path}: rotation relative Frobenius error {error:.3g}")
    print(f"wrote {'an exact' if result['exact'] else 'an approximate'} {args.to} adapter to {result['out_dir']}")
