"""`sora-serve export-onnx`: a decoder LM with KV cache, merged or with switchable adapters.

Exporter: `torch.onnx.export` on a wrapper that takes the KV cache as flat tensors and rebuilds
transformers' `DynamicCache`; eager attention. The TorchScript tracer (`dynamo=False`, deprecated
but ~10x faster here) is the default, the torch.export one (`--exporter dynamo`) gives the same
results. optimum-onnx was not used: its only release pins transformers < 4.58 and fails to
import with 5.x, which this project needs (vLLM 0.32). Details in docs/ONNX.md.

Adapters mode: every adapted layer (union over the adapters given) computes
`ServingFactors.apply` from six tensors (scale, bias_shift, lora_A, lora_B, rot_U, rot_V),
zero-padded to the largest ranks. They are traced as graph inputs (named `<module>.<tensor>`)
and then given initializers of the same name holding the identity (scale 1, zeros
elsewhere): the graph fed nothing is the base model, and ONNX Runtime's LoRA adapter files
override them per run (`RunOptions.add_active_adapter`); ONNX Runtime 1.32 overrides only
initializers that are also graph inputs. Tracing them as parameters instead would make plain
initializers, which the exporter may also merge when equal (all the zero defaults).

`--format genai` writes the same folder plus `genai_config.json`, which onnxruntime-genai's
`og.Model` reads (converters/onnx_genai.py); verification then also runs the folder through genai.
"""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache

import sora_serve as ss
from sora_serve.cli import add_override_flags, override_kwargs
from sora_serve.errors import AdapterError
from sora_serve.fs import atomic_output_dir
from sora_serve.methods import ServingFactors
from sora_serve.validation import check_base

from .onnx_genai import GenaiCausalLM, import_genai, write_genai_config
from .onnx_runtime import MANIFEST_FILE, MODEL_FILE

EXPORTERS = ("torchscript", "dynamo")
FORMATS = ("onnxruntime", "genai")  # genai: + genai_config.json for onnxruntime-genai
FACTOR_NAMES = ("scale", "bias_shift", "lora_A", "lora_B", "rot_U", "rot_V")


def kv_shape(config) -> tuple[int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


class DecoderWithCache(nn.Module):
    """(input_ids, attention_mask, position_ids, *past, *adapter tensors) -> (logits, *present)."""

    def __init__(self, model: nn.Module, switchable: dict | None = None):
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers
        self.switchable = switchable or {}

    def forward(self, input_ids, attention_mask, position_ids, *past_and_factors):
        past, factors = past_and_factors[: 2 * self.num_layers], iter(past_and_factors[2 * self.num_layers :])
        for layer in self.switchable.values():  # adapter tensors arrive as graph inputs, in this order
            layer.factors = {name: next(factors) for name in FACTOR_NAMES}
        cache = DynamicCache(config=self.model.config)
        for layer in range(self.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


class SwitchableFactors(nn.Module):
    """A base layer followed by `ServingFactors.apply` on tensors fed to the graph as inputs."""

    def __init__(self, base_layer: nn.Module, out_features: int, in_features: int, rank: int, rot_rank: int):
        super().__init__()
        self.base_layer = base_layer
        self.shapes = {
            "scale": (out_features,),
            "bias_shift": (out_features,),
            "lora_A": (rank, in_features),
            "lora_B": (out_features, rank),
            "rot_U": (out_features, rot_rank),
            "rot_V": (out_features, rot_rank),
        }
        self.factors: dict[str, torch.Tensor] = self.identity()

    def identity(self) -> dict[str, torch.Tensor]:
        """The defaults: scale 1, everything else 0, so the layer is its base layer."""
        return {
            name: torch.ones(shape) if name == "scale" else torch.zeros(shape) for name, shape in self.shapes.items()
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ServingFactors(**self.factors).apply(x, self.base_layer(x))


def padded_factors(factors: ServingFactors, rank: int, rot_rank: int) -> dict[str, np.ndarray]:
    """The six tensors of one layer, missing parts as identity, ranks zero-padded."""
    out_f = factors.lora_B.shape[0]
    full = {
        "scale": torch.ones(out_f, dtype=torch.float64) if factors.scale is None else factors.scale,
        "bias_shift": torch.zeros(out_f, dtype=torch.float64) if factors.bias_shift is None else factors.bias_shift,
        "lora_A": _pad(factors.lora_A, 0, rank),
        "lora_B": _pad(factors.lora_B, 1, rank),
        "rot_U": _pad(
            factors.rot_U if factors.rot_U is not None else torch.zeros(out_f, 0, dtype=torch.float64), 1, rot_rank
        ),
        "rot_V": _pad(
            factors.rot_V if factors.rot_V is not None else torch.zeros(out_f, 0, dtype=torch.float64), 1, rot_rank
        ),
    }
    return {k: v.float().numpy() for k, v in full.items()}


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def adapter_factors(
    model: nn.Module, adapters: list, **overrides: bool | None
) -> dict[str, dict[str, dict[str, ServingFactors]]]:
    """adapter name -> module path -> ServingFactors (float64), computed from the base weights.

    Each adapter is checked against the model first (`check_base`, with `overrides`)."""
    modules = dict(model.named_modules())
    result = {}
    for adapter in adapters:
        check_base(adapter, model, **overrides)
        per_layer = {}
        for path in adapter.tensors:
            layer = ss.layer.AdaptedLayer(modules[path])  # for (out, in) weight access, Conv1D included
            per_layer[path] = adapter.serving_factors(path, layer.base_view())
        result[adapter.directory.name] = per_layer
    return result


def install_switchable_layers(
    model: nn.Module, factors: dict[str, dict[str, ServingFactors]]
) -> dict[str, SwitchableFactors]:
    """Replace every adapted layer with SwitchableFactors sized for the largest ranks; return them by path."""
    ranks: dict[str, tuple[int, int]] = {}
    for per_layer in factors.values():
        for path, f in per_layer.items():
            r, k = ranks.get(path, (0, 0))
            ranks[path] = (max(r, f.lora_A.shape[0]), max(k, 0 if f.rot_U is None else f.rot_U.shape[1]))
    for path, (r, k) in ranks.items():
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        base = getattr(parent, child)
        out_f, in_f = ss.layer.AdaptedLayer(base).weight.shape
        setattr(parent, child, SwitchableFactors(base, out_f, in_f, max(r, 1), max(k, 1)))
    return {path: model.get_submodule(path) for path in ranks}


def export_graph(
    model: nn.Module, path: Path, opset: int, switchable: dict[str, SwitchableFactors], exporter: str
) -> None:
    """Trace the decoder with a non-empty cache and dynamic batch/sequence/past axes."""
    layers = model.config.num_hidden_layers
    kv_heads, head_dim = kv_shape(model.config)
    past = [torch.randn(1, kv_heads, 3, head_dim) for _ in range(2 * layers)]
    ids = torch.randint(1, model.config.vocab_size, (1, 4))
    mask, positions = torch.ones(1, 7, dtype=torch.long), torch.arange(3, 7)[None]
    past_names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present_names = [n.replace("past_key_values", "present") for n in past_names]
    factor_names = [f"{p}.{name}" for p in switchable for name in FACTOR_NAMES]
    defaults = [t for layer in switchable.values() for t in layer.identity().values()]
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    axes.update({n: {0: "batch", 2: "past"} for n in past_names})
    axes.update({n: {0: "batch", 2: "total"} for n in present_names})
    dynamic = (
        {"dynamic_axes": axes}
        if exporter == "torchscript"
        else {"dynamic_shapes": export_dims(len(past), len(defaults))}
    )
    with torch.no_grad(), warnings.catch_warnings():
        # Constants that transformers creates (the empty cache, the mask's fill value) are meant to be constant.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            DecoderWithCache(model, switchable),
            (ids, mask, positions, *past, *defaults),
            str(path),
            input_names=["input_ids", "attention_mask", "position_ids", *past_names, *factor_names],
            output_names=["logits", *present_names],
            opset_version=opset,
            dynamo=exporter == "dynamo",
            **dynamic,
        )
    if switchable:
        add_identity_defaults(path, dict(zip(factor_names, defaults)))


def export_dims(num_past: int, num_factors: int) -> tuple:
    """torch.export's form of the dynamic axes, shaped like `DecoderWithCache.forward`'s arguments.

    The mask's length is its own dim: torch.export accepts `Dim + int` but not `sequence + past`.
    """
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    total, past = torch.export.Dim("total"), torch.export.Dim("past")
    tokens = {0: batch, 1: sequence}
    return tokens, {0: batch, 1: total}, tokens, (*[{0: batch, 2: past}] * num_past, *[None] * num_factors)


def add_identity_defaults(path: Path, defaults: dict[str, torch.Tensor]) -> None:
    """Give each adapter input an initializer of the same name: optional inputs, identity when not fed."""
    # the weights stay in their external files: loaded inline, a model over 2 GB cannot be re-serialised
    # (protobuf limit)
    graph = onnx.load(str(path), load_external_data=False)
    missing = sorted(set(defaults) - {i.name for i in graph.graph.input})
    if missing:  # an adapter tensor the traced graph never reads would be silently ignored: fail instead
        raise RuntimeError(f"adapter tensors are not inputs of the traced graph: {missing[:3]}")
    graph.graph.initializer.extend(onnx.numpy_helper.from_array(t.numpy(), name) for name, t in defaults.items())
    onnx.save(graph, str(path))


def export_onnx(
    model_dir,
    out_dir,
    adapters=None,
    force: bool = False,
    *,
    opset: int = 18,
    exporter: str = "torchscript",
    output_format: str = "onnxruntime",
    verify: bool = True,
    allow_large_updates: bool | None = None,
    allow_other_base: bool | None = None,
) -> dict:
    """Export `model_dir` (merged if no adapters, else switchable); return the measured errors.

    Adapters are validated as everywhere (`read_adapter`, `check_base`); the overrides as in
    `read_adapter` and `sora_serve.fingerprint.check_fingerprint`.

    `exporter`: "torchscript" (torch.onnx's tracer, default: ~10x faster here) or "dynamo" (torch.export).
    `output_format`: "onnxruntime" (the folder `OnnxCausalLM` runs) or "genai" (also `og.Model`'s).
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise AdapterError("missing model config", file=model_dir / "config.json")
    overrides = {"allow_large_updates": allow_large_updates, "allow_other_base": allow_other_base}
    adapter_files = [ss.read_adapter(a, allow_large_updates=allow_large_updates) for a in adapters or []]
    names = [a.directory.name for a in adapter_files]
    if len(set(names)) != len(names):
        raise AdapterError(
            f"adapter directory names must be unique (they name the .onnx_adapter files): {names}", field="adapters"
        )
    if exporter not in EXPORTERS:
        raise AdapterError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}", field="exporter")
    if output_format not in FORMATS:
        raise AdapterError(f"unknown format {output_format!r}; expected one of {FORMATS}", field="format")
    genai = output_format == "genai"
    if genai and verify:
        import_genai()  # verification runs genai: fail before any work if it is missing
    with atomic_output_dir(out_dir, force=force) as tmp:  # refuses an existing output before any work
        manifest = write_export(model_dir, tmp, adapter_files, opset, exporter, genai, overrides)
    result = {"out_dir": str(out_dir), "mode": manifest["mode"], "format": output_format, "adapters": names}
    if verify:
        result.update(verify_export(model_dir, out_dir, adapters or [], genai=genai, overrides=overrides))
        for key, label in (
            ("max_abs_error", "ONNX Runtime"),
            ("genai_max_abs_error", "onnxruntime-genai (next token)"),
        ):
            if key in result:
                print(
                    f"verified {label} vs PyTorch max |logit error|: "
                    + ", ".join(f"{k}: {v:.2e}" for k, v in result[key].items())
                )
    return result


def write_export(
    model_dir: Path,
    out: Path,
    adapter_files: list,
    opset: int,
    exporter: str,
    genai: bool = False,
    overrides: dict | None = None,
) -> dict:
    """model.onnx, adapters/<name>.onnx_adapter, tokenizer/config files, the manifest (and genai_config.json);
    returns the manifest."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    factors = adapter_factors(model, adapter_files, **(overrides or {}))
    switchable = install_switchable_layers(model, factors) if adapter_files else {}
    export_graph(model, out / MODEL_FILE, opset, switchable, exporter)
    (out / "adapters").mkdir()
    for name, per_layer in factors.items():  # milliseconds each: no progress bar
        write_onnx_adapter(out / "adapters" / f"{name}.onnx_adapter", per_layer, switchable)
    for side in model_dir.iterdir():
        if side.is_file() and (
            side.name.startswith("tokenizer")
            or side.name in ("config.json", "generation_config.json", "special_tokens_map.json")
        ):
            shutil.copy2(side, out / side.name)
    kv_heads, head_dim = kv_shape(model.config)
    manifest = {
        "num_layers": model.config.num_hidden_layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "adapters": list(factors),
        "mode": "adapters" if switchable else "merged",
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    if genai:
        write_genai_config(out, model.config, model_dir, manifest)
    return manifest


def write_onnx_adapter(
    path: Path, per_layer: dict[str, ServingFactors], switchable: dict[str, SwitchableFactors]
) -> None:
    """One adapter's padded tensors, named like the graph inputs they override."""
    import onnxruntime as ort

    params = {}
    for module_path, f in per_layer.items():
        shapes = switchable[module_path].shapes
        for name, array in padded_factors(f, shapes["lora_A"][0], shapes["rot_U"][1]).items():
            params[f"{module_path}.{name}"] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(params)
    fmt.export_adapter(str(path))


@torch.no_grad()
def reference_logits(
    model_dir, adapters: list, seed: int = 0, **overrides: bool | None
) -> tuple[np.ndarray, dict[str | None, np.ndarray]]:
    """Random ids and the PyTorch runtime's logits for them: the base (key None) and each adapter."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(1, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    logits = {None: base(ids).logits.numpy()}
    for adapter_dir in adapters:
        name = Path(adapter_dir).name
        ss.load_adapter(base, adapter_dir, name=name, **overrides)
        logits[name] = base(ids).logits.numpy()
        ss.set_active_adapter(base, None)
    return ids.numpy(), logits


def verify_export(
    model_dir, out_dir, adapters: list, seed: int = 0, *, genai: bool = False, overrides: dict | None = None
) -> dict[str, dict[str, float]]:
    """Max |ONNX - PyTorch| logits per adapter (and the base) on random ids: every position through
    ONNX Runtime (`max_abs_error`); with `genai`, also the next-token logits through onnxruntime-genai
    (`genai_max_abs_error`)."""
    from .onnx_runtime import OnnxCausalLM  # imports onnxruntime

    ids, expected = reference_logits(model_dir, adapters, seed, **(overrides or {}))
    onnx_lm = OnnxCausalLM(out_dir)
    errors = {
        "max_abs_error": {
            name or "base": float(np.abs(onnx_lm.logits(ids, adapter=name) - ref).max())
            for name, ref in expected.items()
        }
    }
    if genai:
        genai_lm = GenaiCausalLM(out_dir)
        errors["genai_max_abs_error"] = {
            name or "base": float(np.abs(genai_lm.next_token_logits(ids, adapter=name) - ref[:, -1]).max())
            for name, ref in expected.items()
        }
    return errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint (a base or a folded model)")
    parser.add_argument("--out", required=True, help="output folder (model.onnx, adapters/, tokenizer)")
    parser.add_argument(
        "--adapters", nargs="+", default=[], metavar="DIR", help="adapter directories for --mode adapters"
    )
    parser.add_argument(
        "--mode",
        choices=["merged", "adapters"],
        default="merged",
        help="merged: the checkpoint as is; adapters: switchable inputs",
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    parser.add_argument(
        "--exporter", choices=EXPORTERS, default="torchscript", help="torch.onnx exporter (docs/ONNX.md)"
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="onnxruntime",
        help="genai: also write genai_config.json, so onnxruntime-genai's og.Model opens the folder (needs "
        "sora-serve[genai] to verify)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-verify", action="store_true", help="skip the logit check against PyTorch")
    add_override_flags(parser)


def run(args: argparse.Namespace) -> None:
    if (args.mode == "adapters") != bool(args.adapters):
        raise AdapterError(
            "--mode adapters needs --adapters DIR [...], and --adapters needs --mode adapters", field="adapters"
        )
    result = export_onnx(
        args.model,
        args.out,
        args.adapters,
        force=args.force,
        opset=args.opset,
        exporter=args.exporter,
        output_format=args.format,
        verify=not args.no_verify,
        **override_kwargs(args),
    )
    adapters = ": " + ", ".join(result["adapters"]) if result["adapters"] else ""
    print(f"wrote {result['out_dir']} ({result['format']}, {result['mode']}{adapters})")
