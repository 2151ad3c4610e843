"""Adapter directories: read (validated), load into a model, save. Format: docs/FORMAT.md.

Two layouts share the PEFT file names (`adapter_config.json`, `adapter_model.safetensors`,
tensor keys `base_model.model.<module path>.<tensor>`):
  - ours, `peft_type` PREDIAG or SORA, with the extra tensors `sora_d`, `sora_C`, `sora_D`;
  - PEFT's LoRA / DoRA (`peft_type` LORA, `use_dora`), written by `peft` itself.
Everything is validated before the model is touched, and errors name the file and field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import FORMAT_VERSION, PEFT_TYPES, AdapterConfig
from .errors import AdapterError
from .fs import atomic_output_dir
from .layer import AdaptedLayer
from .methods import Adapter, build_adapter
from .model import CONFIGS_ATTR, adapted_layers, adapter_configs, base_fingerprint, set_active_adapter, wrap_layer

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Adapter parameter name -> tensor-name suffix in the file.
FILE_NAMES = {
    "lora_A": "lora_A.weight",
    "lora_B": "lora_B.weight",
    "magnitude": "lora_magnitude_vector",
    "d": "sora_d",
    "sora_C": "sora_C",
    "sora_D": "sora_D",
}
METHOD_TENSORS = {
    "lora": ("lora_A", "lora_B"),
    "dora": ("lora_A", "lora_B", "magnitude"),
    "prediag": ("lora_A", "lora_B", "d"),
    "sora": ("lora_A", "lora_B", "d", "sora_C", "sora_D"),
}
# PEFT LoraConfig options we cannot represent; refused rather than silently ignored.
PEFT_UNSUPPORTED = {
    "lora_bias": lambda v: bool(v),
    "bias": lambda v: v not in (None, "none"),
    "modules_to_save": lambda v: bool(v),
    "target_parameters": lambda v: bool(v),
    "trainable_token_indices": lambda v: bool(v),
    "layer_replication": lambda v: bool(v),
    "use_qalora": lambda v: bool(v),
    "use_bdlora": lambda v: bool(v),
}


@dataclass
class AdapterFile:
    """A validated adapter directory, not yet bound to a model."""

    directory: Path
    config: AdapterConfig
    module_configs: dict[str, AdapterConfig]  # per module: PEFT rank/alpha patterns resolved
    tensors: dict[str, dict[str, torch.Tensor]]  # module path -> parameter name -> tensor
    fingerprint: dict | None
    base_model_name_or_path: str | None
    fan_in_fan_out: bool = False

    @property
    def method(self) -> str:
        return self.config.method


def read_adapter(directory: str | Path) -> AdapterFile:
    """Read and validate an adapter directory (ours or PEFT's LoRA/DoRA)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError("adapter directory not found", file=directory)
    raw = _read_config_json(directory / CONFIG_FILE)
    peft_type = raw.get("peft_type")
    if peft_type in ("PREDIAG", "SORA"):
        config, module_configs_fn, fingerprint = _parse_our_config(raw, directory / CONFIG_FILE)
        fan_in_fan_out = False
    elif peft_type == "LORA":
        config, module_configs_fn = _parse_peft_config(raw, directory / CONFIG_FILE)
        fingerprint, fan_in_fan_out = None, bool(raw.get("fan_in_fan_out", False))
    else:
        raise AdapterError(
            f"unknown peft_type {peft_type!r}; expected PREDIAG, SORA or LORA", file=directory / CONFIG_FILE, field="peft_type"
        )
    tensors = _read_tensors(directory / WEIGHTS_FILE, config.method)
    module_configs = {path: module_configs_fn(path, t) for path, t in tensors.items()}
    for path, t in tensors.items():
        _check_shapes(directory / WEIGHTS_FILE, path, t, module_configs[path])
    return AdapterFile(directory, config, module_configs, tensors, fingerprint, raw.get("base_model_name_or_path"), fan_in_fan_out)


def _read_config_json(path: Path) -> dict:
    if not path.is_file():
        raise AdapterError("missing adapter config", file=path)
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"not valid JSON ({exc})", file=path) from exc
    if not isinstance(raw, dict):
        raise AdapterError("expected a JSON object", file=path)
    return raw


def _require(raw: dict, key: str, path: Path):
    if key not in raw:
        raise AdapterError("missing", file=path, field=key)
    return raw[key]


def _config_or_error(path: Path, **kwargs) -> AdapterConfig:
    try:
        return AdapterConfig(**kwargs)
    except AdapterError as exc:
        raise AdapterError(str(exc).split(": ", 1)[-1], file=path, field=exc.field) from exc


def _parse_our_config(raw: dict, path: Path):
    version = _require(raw, "format_version", path)
    if version != FORMAT_VERSION:
        raise AdapterError(f"format_version {version!r} is not supported (this is {FORMAT_VERSION})", file=path, field="format_version")
    config = _config_or_error(
        path,
        method=raw["peft_type"].lower(),
        r=_require(raw, "r", path),
        lora_alpha=_require(raw, "lora_alpha", path),
        r_p=_require(raw, "r_p", path),
        s0=_require(raw, "s0", path),
        rotation=_require(raw, "rotation", path),
        target_modules=_require(raw, "target_modules", path),
        lora_dropout=raw.get("lora_dropout", 0.0),
    )
    fingerprint = _require(raw, "base_fingerprint", path)
    if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("modules"), dict):
        raise AdapterError("expected an object with 'modules'", file=path, field="base_fingerprint")
    return config, (lambda module_path, tensors: config), fingerprint


def _parse_peft_config(raw: dict, path: Path):
    for key, unsupported in PEFT_UNSUPPORTED.items():
        if key in raw and unsupported(raw[key]):
            raise AdapterError(f"PEFT option {key}={raw[key]!r} is not supported", file=path, field=key)
    config = _config_or_error(
        path,
        method="dora" if raw.get("use_dora") else "lora",
        r=_require(raw, "r", path),
        lora_alpha=_require(raw, "lora_alpha", path),
        target_modules=_require(raw, "target_modules", path),
        lora_dropout=raw.get("lora_dropout", 0.0),
        use_rslora=bool(raw.get("use_rslora", False)),
    )
    alpha_pattern = raw.get("alpha_pattern") or {}

    def module_config(module_path: str, tensors: dict[str, torch.Tensor]) -> AdapterConfig:
        # The rank comes from the tensors (covers rank_pattern); alpha from alpha_pattern.
        alpha = next((a for pat, a in alpha_pattern.items() if re.fullmatch(rf"(.*\.)?{pat}", module_path)), config.lora_alpha)
        return AdapterConfig(**{**config.to_dict(), "r": int(tensors["lora_A"].shape[0]), "lora_alpha": alpha})

    return config, module_config


def _read_tensors(path: Path, method: str) -> dict[str, dict[str, torch.Tensor]]:
    if not path.is_file():
        raise AdapterError("missing adapter weights", file=path)
    try:
        flat = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"corrupt safetensors file ({exc})", file=path) from exc
    suffix_to_param = {suffix: param for param, suffix in FILE_NAMES.items()}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        module_path, param = _split_key(key, suffix_to_param)
        if param is None or param not in METHOD_TENSORS[method]:
            raise AdapterError(f"unexpected tensor for a {method} adapter", file=path, field=key)
        if not tensor.is_floating_point():
            raise AdapterError(f"dtype {tensor.dtype} is not floating point", file=path, field=key)
        if not torch.isfinite(tensor).all():
            raise AdapterError("contains NaN or infinite values", file=path, field=key)
        modules.setdefault(module_path, {})[param] = tensor
    if not modules:
        raise AdapterError("no adapter tensors", file=path)
    for module_path, tensors in modules.items():
        missing = [p for p in METHOD_TENSORS[method] if p not in tensors]
        if missing:
            names = ", ".join(f"{PEFT_PREFIX}{module_path}.{FILE_NAMES[p]}" for p in missing)
            raise AdapterError(f"missing tensor(s) {names}", file=path, field=f"{PEFT_PREFIX}{module_path}")
    return modules


def _split_key(key: str, suffix_to_param: dict[str, str]) -> tuple[str, str | None]:
    body = key.removeprefix(PEFT_PREFIX)
    for suffix, param in suffix_to_param.items():
        if body.endswith("." + suffix):
            return body[: -len(suffix) - 1], param
    return body, None


def _check_shapes(path: Path, module_path: str, t: dict[str, torch.Tensor], config: AdapterConfig) -> None:
    r, out_f = t["lora_A"].shape[0], t["lora_B"].shape[0]
    expected = {
        "lora_A": (config.r, t["lora_A"].shape[-1]),
        "lora_B": (out_f, config.r),
        "magnitude": (out_f,),
        "d": (out_f,),
        "sora_C": (out_f, config.r_p),
        "sora_D": (out_f, config.r_p),
    }
    for param, tensor in t.items():
        if tuple(tensor.shape) != expected[param]:
            raise AdapterError(
                f"shape {tuple(tensor.shape)} does not match r={r if param == 'lora_A' else config.r}, "
                f"r_p={config.r_p}, out={out_f}: expected {expected[param]}",
                file=path,
                field=f"{PEFT_PREFIX}{module_path}.{FILE_NAMES[param]}",
            )


def check_base(adapter: AdapterFile, model: nn.Module) -> None:
    """Refuse an adapter whose modules are absent from `model` or differ in shape or bias."""
    modules = dict(model.named_modules())
    weights_file = adapter.directory / WEIGHTS_FILE
    for module_path, t in adapter.tensors.items():
        layer = modules.get(module_path)
        if layer is None:
            raise AdapterError(
                f"module '{module_path}' not found in {type(model).__name__}: adapter for a different base?",
                file=weights_file,
                field=f"{PEFT_PREFIX}{module_path}",
            )
        shape = _out_in(layer)
        got = (t["lora_B"].shape[0], t["lora_A"].shape[1])
        if shape != got:
            raise AdapterError(
                f"adapter is {got[0]}x{got[1]} but base layer '{module_path}' is {shape[0]}x{shape[1]}: adapter for a different base?",
                file=weights_file,
                field=f"{PEFT_PREFIX}{module_path}",
            )
    if adapter.fingerprint is not None:
        ours = base_fingerprint(model, list(adapter.tensors))
        for module_path, expected in adapter.fingerprint["modules"].items():
            if ours["modules"].get(module_path) != expected:
                raise AdapterError(
                    f"base layer '{module_path}' is {ours['modules'].get(module_path)} (out, in, bias) but the adapter was "
                    f"trained on {expected}: adapter for a different base",
                    file=adapter.directory / CONFIG_FILE,
                    field="base_fingerprint",
                )


def _out_in(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, AdaptedLayer):
        return layer.out_features, layer.in_features
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    weight = getattr(layer, "weight", None)
    if weight is None or weight.dim() != 2:
        return (-1, -1)
    return int(weight.shape[1]), int(weight.shape[0])  # Conv1D stores (in, out)


def adapter_from_tensors(config: AdapterConfig, tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> Adapter:
    """An Adapter module holding exactly `tensors`, for a layer with base weight `weight` (out x in)."""
    adapter = build_adapter(config, weight)
    adapter.load_state_dict({k: v.to(weight.dtype) for k, v in tensors.items()}, strict=True)
    return adapter


def load_adapter(model: nn.Module, adapter_dir: str | Path, name: str | None = None) -> nn.Module:
    """Load an adapter directory into `model` (wrapping layers as needed) and make it active."""
    adapter = read_adapter(adapter_dir)
    name = name or Path(adapter_dir).absolute().name
    if name in adapter_configs(model):
        raise AdapterError(f"an adapter named '{name}' is already attached", field="name")
    check_base(adapter, model)
    modules = dict(model.named_modules())
    for param in model.parameters():
        param.requires_grad_(False)
    for module_path, tensors in adapter.tensors.items():
        layer = wrap_layer(model, module_path, modules[module_path])
        layer.add_adapter(name, adapter_from_tensors(adapter.module_configs[module_path], tensors, layer.weight))
    setattr(model, CONFIGS_ATTR, {**adapter_configs(model), name: adapter.config})
    set_active_adapter(model, name)
    return model


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their file names (contiguous copies, in float32 or wider)."""
    flat = {}
    for module_path, layer in adapted_layers(model):
        if name not in layer.adapters:
            continue
        for param, tensor in layer.adapters[name].state_dict().items():
            flat[f"{PEFT_PREFIX}{module_path}.{FILE_NAMES[param]}"] = tensor.detach().clone().contiguous()
    if not flat:
        raise AdapterError(f"no layer holds an adapter named '{name}'", field="name")
    return flat


def save_adapter(
    model: nn.Module, out_dir: str | Path, name: str = "default", *, base_model_name_or_path: str | None = None, force: bool = False
) -> Path:
    """Write adapter `name` as a directory (whole or not at all): ours for Pre-Diag/SORA, PEFT's for LoRA/DoRA."""
    with atomic_output_dir(out_dir, force=force) as tmp:
        write_adapter_files(model, tmp, name, base_model_name_or_path=base_model_name_or_path)
    return Path(out_dir)


def write_adapter_files(model: nn.Module, directory: Path, name: str, *, base_model_name_or_path: str | None = None) -> None:
    """Write the config and weights of adapter `name` into an existing (temporary) directory."""
    if name not in adapter_configs(model):
        raise AdapterError(f"no adapter named '{name}'; attached: {sorted(adapter_configs(model))}", field="name")
    config = adapter_configs(model)[name]
    state = adapter_state(model, name)
    for key, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise AdapterError("adapter weights contain NaN or infinite values; refusing to save", field=key)
    module_paths = [p for p, layer in adapted_layers(model) if name in layer.adapters]
    base_name = base_model_name_or_path or getattr(getattr(model, "config", None), "name_or_path", None) or None
    if config.method in ("lora", "dora"):
        fan_in_fan_out = any(layer.fan_in_fan_out for _, layer in adapted_layers(model) if name in layer.adapters)
        _peft_lora_config(config, base_name, fan_in_fan_out).save_pretrained(str(directory))
    else:
        config_json = _our_config_json(config, base_name, base_fingerprint(model, module_paths))
        (directory / CONFIG_FILE).write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


def _our_config_json(config: AdapterConfig, base_name: str | None, fingerprint: dict) -> dict:
    return {
        "peft_type": PEFT_TYPES[config.method],
        "format_version": FORMAT_VERSION,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "r_p": config.r_p,
        "s0": config.s0,
        "rotation": config.rotation,
        "target_modules": config.target_modules,
        "lora_dropout": config.lora_dropout,
        "base_model_name_or_path": base_name,
        "base_fingerprint": fingerprint,
        # Keeps stock vLLM's PEFTHelper on its LoRA path, where our extra tensors are refused.
        "bias": "none",
    }


def _peft_lora_config(config: AdapterConfig, base_name: str | None, fan_in_fan_out: bool):
    """LoRA and DoRA adapters are written by PEFT's own config class, in PEFT's layout."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        target_modules=config.target_modules,
        lora_dropout=config.lora_dropout,
        use_dora=config.method == "dora",
        use_rslora=config.use_rslora,
        fan_in_fan_out=fan_in_fan_out,
        base_model_name_or_path=base_name,
    )
