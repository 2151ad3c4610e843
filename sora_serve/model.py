"""Attach adapters to any Hugging Face model and pick which one runs.

model = attach(model, AdapterConfig(method="sora", target_modules=["q_proj", "v_proj"]), "a")
set_active_adapter(model, "a")
with use_adapters(model, ["a", None, "b"]):      # one name (or None = base) per batch row
    logits = model(input_ids).logits               # works for generate() too
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

from torch import nn

from .config import AdapterConfig
from .errors import AdapterError
from .layer import AdaptedLayer, is_supported_layer
from .methods import Adapter, build_adapter

# The adapters attached to a model, by name, live here on the model object.
CONFIGS_ATTR = "sora_adapter_configs"


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """(module path in the HF model, wrapper) for every adapted layer."""
    for path, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield path, module


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    return getattr(model, CONFIGS_ATTR, {})


def matches_target(path: str, target_modules: list[str] | str) -> bool:
    """PEFT's rule: a list matches a name or a dotted suffix; "all-linear" every linear layer."""
    if target_modules == "all-linear":
        return True
    return any(path == t or path.endswith("." + t) for t in target_modules)


def find_target_layers(model: nn.Module, target_modules: list[str] | str) -> dict[str, nn.Module]:
    """Base layers (already wrapped or not) to adapt, by module path; errors if none match."""
    found: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if not path or path.endswith(".base_layer") or not matches_target(path, target_modules):
            continue
        base = module.base_layer if isinstance(module, AdaptedLayer) else module
        if target_modules == "all-linear" and (not is_supported_layer(base) or _is_output_head(model, base)):
            continue
        if not is_supported_layer(base):
            raise AdapterError(
                f"module '{path}' is a {type(module).__name__}; only nn.Linear and Conv1D can be adapted",
                field="target_modules",
            )
        found[path] = module
    if not found:
        raise AdapterError(f"no module of {type(model).__name__} matches {target_modules!r}", field="target_modules")
    return found


def _is_output_head(model: nn.Module, module: nn.Module) -> bool:
    get_out = getattr(model, "get_output_embeddings", None)
    return get_out is not None and get_out() is module


def wrap_layer(model: nn.Module, path: str, module: nn.Module) -> AdaptedLayer:
    if isinstance(module, AdaptedLayer):
        return module
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    wrapper = AdaptedLayer(module)
    setattr(parent, child, wrapper)
    return wrapper


def attach(
    model: nn.Module,
    config: AdapterConfig,
    name: str = "default",
    *,
    verbose: bool = True,
    adapters: Mapping[str, Adapter] | None = None,
) -> nn.Module:
    """Add adapter `name`: a fresh one on every layer named by `config.target_modules`, or, given
    `adapters` (module path -> adapter module, e.g. read from a file), exactly those.

    The base is frozen, the new adapter is made active, and (if `verbose`) the trainable-parameter
    count is printed. Right after a fresh attach the model computes exactly what the base computed.
    """
    if name in adapter_configs(model):
        raise AdapterError(f"an adapter named '{name}' is already attached", field="name")
    if adapters is None:
        targets = find_target_layers(model, config.target_modules)
    else:
        modules = dict(model.named_modules())
        targets = {path: modules[path] for path in adapters}
    for param in model.parameters():
        param.requires_grad_(False)
    for path, module in targets.items():
        layer = wrap_layer(model, path, module)
        layer.add_adapter(name, build_adapter(config, layer.base_view()) if adapters is None else adapters[path])
    setattr(model, CONFIGS_ATTR, {**adapter_configs(model), name: config})
    set_active_adapter(model, name)
    if verbose:
        trainable, total = count_parameters(model)
        print(
            f"attached {config.method} adapter '{name}' to {len(targets)} layers: "
            f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)"
        )
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _check_names(model: nn.Module, names: Sequence[str | None]) -> None:
    known = adapter_configs(model)
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise AdapterError(f"unknown adapter(s) {unknown}; attached: {sorted(known)}")


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Make `name` the adapter every layer runs (None: the base model). Only it trains."""
    _check_names(model, [name])
    for _, layer in adapted_layers(model):
        layer.active_adapter = name
        for adapter_name, adapter in layer.adapters.items():
            adapter.requires_grad_(adapter_name == name)


def delete_adapter(model: nn.Module, name: str) -> None:
    _check_names(model, [name])
    for _, layer in adapted_layers(model):
        if name in layer.adapters:
            layer.delete_adapter(name)
    configs = dict(adapter_configs(model))
    del configs[name]
    setattr(model, CONFIGS_ATTR, configs)


@contextlib.contextmanager
def use_adapters(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Per-row adapters for the calls inside: `names[i]` for batch row i (None = base)."""
    _check_names(model, names)
    layers = [layer for _, layer in adapted_layers(model)]
    for layer in layers:
        layer.row_adapters = list(names)
    try:
        yield
    finally:
        for layer in layers:
            layer.row_adapters = None


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model alone for the calls inside."""
    layers = [layer for _, layer in adapted_layers(model)]
    for layer in layers:
        layer.adapters_disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.adapters_disabled = False
