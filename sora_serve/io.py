"""Adapters and models: load an adapter directory into a model, save one from it.

The directory's layout and reading are `adapter_format`'s, what it must satisfy `validation`'s;
this module binds a validated `AdapterFile` to a model (on top of `model.attach`) and writes a
model's adapter back out.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .adapter_format import (
    CONFIG_FILE,
    PEFT_PREFIX,
    WEIGHTS_FILE,
    our_config_json,
    peft_lora_config,
    read_adapter,
    write_json,
    write_side_fingerprint,
)
from .errors import AdapterError
from .fingerprint import base_fingerprint, model_layers
from .fs import atomic_output_dir
from .methods import METHOD_CLASSES, adapter_from_tensors
from .model import adapted_layers, adapter_configs, attach
from .validation import check_base, model_type_of


def load_adapter(
    model: nn.Module,
    adapter_dir: str | Path,
    name: str | None = None,
    *,
    allow_large_updates: bool | None = None,
    allow_other_base: bool | None = None,
) -> nn.Module:
    """Load an adapter directory into `model` (wrapping layers as needed) and make it active.

    Validated first (`read_adapter`, then `check_base` against `model`); `allow_large_updates`
    as in `read_adapter`, `allow_other_base` as in `sora_serve.fingerprint.check_fingerprint`."""
    adapter = read_adapter(adapter_dir, allow_large_updates=allow_large_updates)
    name = name or Path(adapter_dir).absolute().name
    if name in adapter_configs(model):
        raise AdapterError(f"an adapter named '{name}' is already attached", field="name")
    check_base(adapter, model, allow_large_updates=allow_large_updates, allow_other_base=allow_other_base)
    modules = {path: adapter_from_tensors(adapter.module_configs[path], t) for path, t in adapter.tensors.items()}
    return attach(model, adapter.config, name, verbose=False, adapters=modules)


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their file names (contiguous copies, in float32 or wider)."""
    flat = {}
    for module_path, layer in adapted_layers(model):
        if name not in layer.adapters:
            continue
        for param, tensor in layer.adapters[name].state_dict().items():
            suffix = layer.adapters[name].file_names[param]
            flat[f"{PEFT_PREFIX}{module_path}.{suffix}"] = tensor.detach().clone().contiguous()
    if not flat:
        raise AdapterError(f"no layer holds an adapter named '{name}'", field="name")
    return flat


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    name: str = "default",
    *,
    base_model_name_or_path: str | None = None,
    force: bool = False,
) -> Path:
    """Write adapter `name` as a directory (whole or not at all): ours for Pre-Diag/SORA, PEFT's for LoRA/DoRA."""
    with atomic_output_dir(out_dir, force=force) as tmp:
        write_adapter_files(model, tmp, name, base_model_name_or_path=base_model_name_or_path)
    return Path(out_dir)


def write_adapter_files(
    model: nn.Module, directory: Path, name: str, *, base_model_name_or_path: str | None = None
) -> None:
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
    fingerprint = base_fingerprint(
        model_layers(model, module_paths, norms=False), model_type_of(model)
    )  # samples only: no pass over W0
    if METHOD_CLASSES[config.method].peft_layout:
        fan_in_fan_out = any(layer.fan_in_fan_out for _, layer in adapted_layers(model) if name in layer.adapters)
        peft_lora_config(config, base_name, fan_in_fan_out).save_pretrained(str(directory))
        write_side_fingerprint(directory, fingerprint)
    else:
        write_json(directory / CONFIG_FILE, our_config_json(config, base_name, fingerprint))
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
