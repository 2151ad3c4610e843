"""Adapter directories on disk: their layout, read (and validated) and written. Format: docs/FORMAT.md.

Two layouts share the PEFT file names (`adapter_config.json`, `adapter_model.safetensors`,
tensor keys `base_model.model.<module path>.<tensor>`):
  - ours, `peft_type` PREDIAG or SORA (each method's `peft_type`), with the method's extra tensors
    (`file_names` of its class in `sora_serve.methods`);
  - PEFT's LoRA / DoRA (`peft_type` LORA, `use_dora`), written by `peft` itself;
and a third is read: the paper's own code's (MaeChd/SORA), a PEFT LoRA dir with lora_C/lora_D/lora_Diag.

`read_adapter` is the one reader of every entry point (eager load, fold, to-LoRA, ONNX, `serve`,
the vLLM plugin): it parses the files and applies what `sora_serve.validation` checks of a file
alone. Checks against a base are `validation.check_against_base`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import FORMAT_VERSION, AdapterConfig
from .errors import AdapterError
from .fingerprint import parse_fingerprint
from .fs import readable_dir, readable_file
from .methods import METHOD_CLASSES, BaseView, ServingFactors, adapter_from_tensors
from .validation import (
    UpdateSize,
    check_shapes,
    check_update_bounds,
    config_field,
    refuse_peft_options,
    update_size,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# LoRA/DoRA dirs are PEFT's own files; the base fingerprint we record for them sits beside them.
FINGERPRINT_FILE = "base_fingerprint.json"
PEFT_PREFIX = "base_model.model."
# The paper's code (github MaeChd/SORA, a PEFT 0.14 fork): a PEFT LoRA dir whose modules also hold
# these tensors, nn.Linear weights: C, D (out x r_p) and the diagonal (out x 1). Its forward is our
# first-order SORA, z = d * (W0 x + b) + s B A x, y = z + s_p (z C D^T - z D C^T).
REFERENCE_NAMES = {
    "lora_A": "lora_A.weight",
    "lora_B": "lora_B.weight",
    "d": "lora_Diag.weight",
    "sora_C": "lora_C.weight",
    "sora_D": "lora_D.weight",
}
REFERENCE_S0 = 1.0  # SoraLinear's default numerator of s_p (`initial_s_p`), which its config does not save
REFERENCE_S0_ENV = "SORA_SERVE_REFERENCE_S0"  # a run that set initial_s_p gives it here (or in the config)
LAYOUTS = ("ours", "peft", "reference")


def our_peft_types() -> dict[str, str]:
    """`peft_type` -> method, for the methods stored in our layout (the registry's, at call time)."""
    return {cls.peft_type: method for method, cls in METHOD_CLASSES.items() if not cls.peft_layout}


def tensor_names(layout: str, method: str) -> dict[str, str]:
    """Parameter name -> tensor-name suffix: the paper's names in its layout, else the method's own."""
    return REFERENCE_NAMES if layout == "reference" else METHOD_CLASSES[method].file_names


@dataclass
class AdapterFile:
    """A validated adapter directory, not yet bound to a model."""

    directory: Path
    config: AdapterConfig  # a reference (MaeChd/SORA) dir reads as first-order SORA
    module_configs: dict[str, AdapterConfig]  # per module: PEFT rank/alpha patterns resolved
    tensors: dict[str, dict[str, torch.Tensor]]  # module path -> parameter name -> tensor
    fingerprint: dict | None  # `sora_serve.fingerprint`; None for PEFT dirs not written by us
    base_model_name_or_path: str | None
    fan_in_fan_out: bool = False
    updates: dict[str, UpdateSize] = field(default_factory=dict)  # module path -> its update's size
    layout: str = "ours"  # one of LAYOUTS: ours, PEFT's LoRA/DoRA, or the paper's code's

    @property
    def file_names(self) -> dict[str, str]:
        """Parameter name -> tensor-name suffix in this dir's weights file."""
        return tensor_names(self.layout, self.method)

    def tensor_key(self, module_path: str, param: str | None = None) -> str:
        """The weights file's key of `param` in module `module_path` (its prefix when `param` is None)."""
        key = f"{PEFT_PREFIX}{module_path}"
        return key if param is None else f"{key}.{self.file_names[param]}"

    @property
    def method(self) -> str:
        return self.config.method

    def serving_factors(self, path: str, base: BaseView, dtype: torch.dtype = torch.float64) -> ServingFactors:
        """The factors of module `path` on the base layer `base` describes (fold, to-lora, ONNX, vLLM)."""
        return adapter_from_tensors(self.module_configs[path], self.tensors[path]).serving_factors(base, dtype)

    @property
    def base_paths(self) -> set[str]:
        """Every base module the adapter names: its adapted layers and its fingerprint's."""
        return set(self.tensors) | set((self.fingerprint or {}).get("modules", {}))

    @property
    def weights_file(self) -> Path:
        return self.directory / WEIGHTS_FILE

    @property
    def config_file(self) -> Path:
        return self.directory / CONFIG_FILE

    @property
    def fingerprint_file(self) -> Path:
        """Where the fingerprint is (or would be) recorded: our config, or PEFT dirs' side file."""
        return self.directory / (FINGERPRINT_FILE if self.layout != "ours" else CONFIG_FILE)


def read_adapter(directory: str | Path, *, allow_large_updates: bool | None = None) -> AdapterFile:
    """Read and validate an adapter directory (ours or PEFT's LoRA/DoRA) from the files alone.

    `allow_large_updates` (default: the SORA_SERVE_ALLOW_LARGE_UPDATES environment variable)
    lifts the magnitude bounds; non-finite values are always refused.
    """
    directory = readable_dir(directory, "adapter directory")
    config_path = directory / CONFIG_FILE
    raw = _read_config_json(config_path)
    peft_type = raw.get("peft_type")
    if peft_type in our_peft_types():
        config, fingerprint = _parse_our_config(raw, config_path)
        module_config: Callable[[str], AdapterConfig] = lambda module_path: config  # noqa: E731
        fan_in_fan_out, layout = False, "ours"
    elif peft_type == "LORA":
        config, module_config = _parse_peft_config(raw, config_path)
        fingerprint, fan_in_fan_out, layout = (
            _read_side_fingerprint(directory),
            config_field(raw, "fan_in_fan_out", config_path, "bool", False),
            "peft",
        )
    else:
        raise AdapterError(
            f"unknown peft_type {peft_type!r}; expected one of {sorted({*our_peft_types(), 'LORA'})}",
            file=config_path,
            field="peft_type",
        )
    weights_path = directory / WEIGHTS_FILE
    flat = _load_weights(weights_path)
    if layout == "peft" and _is_reference_layout(flat):
        config, module_config = _reference_config(raw, config_path, config, module_config, flat, weights_path)
        layout = "reference"
    elif "initial_s_p" in raw:
        raise AdapterError(
            "initial_s_p is the paper's SORA option, but this dir has no lora_C/lora_D/lora_Diag tensors",
            file=config_path,
            field="initial_s_p",
        )
    names = tensor_names(layout, config.method)
    tensors = _group_tensors(flat, weights_path, config.method, names)
    module_configs = {path: module_config(path) for path in tensors}
    adapter = AdapterFile(
        directory,
        config,
        module_configs,
        tensors,
        fingerprint,
        config_field(raw, "base_model_name_or_path", config_path, "optional str", None),
        fan_in_fan_out,
        layout=layout,
    )
    check_shapes(adapter)
    adapter.updates = {path: update_size(module_configs[path], t) for path, t in tensors.items()}
    check_update_bounds(adapter, allow_large_updates=allow_large_updates)
    return adapter


def _read_side_fingerprint(directory: Path) -> dict | None:
    path = directory / FINGERPRINT_FILE
    if not path.exists():
        return None
    return parse_fingerprint(_read_config_json(path, "base fingerprint").get("base_fingerprint"), path)


def _read_config_json(path: Path, what: str = "adapter config") -> dict:
    readable_file(path, what)
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"not valid JSON ({exc})", file=path) from exc
    if not isinstance(raw, dict):
        raise AdapterError("expected a JSON object", file=path)
    return raw


def _config_or_error(path: Path, **kwargs) -> AdapterConfig:
    try:
        return AdapterConfig(**kwargs)
    except AdapterError as exc:
        raise AdapterError(str(exc).split(": ", 1)[-1], file=path, field=exc.field) from exc


def _parse_our_config(raw: dict, path: Path) -> tuple[AdapterConfig, dict]:
    version = config_field(raw, "format_version", path, "positive int")
    if version != FORMAT_VERSION:
        raise AdapterError(
            f"format_version {version!r} is not supported (this is {FORMAT_VERSION})", file=path, field="format_version"
        )
    if config_field(raw, "bias", path, "str", "none") != "none":
        raise AdapterError(f"expected 'none', got {raw['bias']!r}", file=path, field="bias")
    config = _config_or_error(
        path,
        method=our_peft_types()[raw["peft_type"]],
        r=config_field(raw, "r", path, "positive int"),
        lora_alpha=config_field(raw, "lora_alpha", path, "positive number"),
        r_p=config_field(raw, "r_p", path, "positive int"),
        s0=config_field(raw, "s0", path, "positive number"),
        rotation=config_field(raw, "rotation", path, "str"),
        target_modules=config_field(raw, "target_modules", path, "targets"),
        lora_dropout=config_field(raw, "lora_dropout", path, "fraction", 0.0),
    )
    if "base_fingerprint" not in raw:
        raise AdapterError("missing", file=path, field="base_fingerprint")
    return config, parse_fingerprint(raw["base_fingerprint"], path)


def _parse_peft_config(raw: dict, path: Path) -> tuple[AdapterConfig, Callable[[str], AdapterConfig]]:
    """PEFT's LoraConfig: every option decided (see the tables above); rank/alpha patterns resolved per module."""
    refuse_peft_options(raw, path)
    config = _config_or_error(
        path,
        method="dora" if config_field(raw, "use_dora", path, "bool", False) else "lora",
        r=config_field(raw, "r", path, "positive int"),
        lora_alpha=config_field(raw, "lora_alpha", path, "positive number"),
        target_modules=config_field(raw, "target_modules", path, "targets"),
        lora_dropout=config_field(raw, "lora_dropout", path, "fraction", 0.0),
        use_rslora=config_field(raw, "use_rslora", path, "bool", False),
    )
    rank_pattern = _compiled_patterns(
        config_field(raw, "rank_pattern", path, "rank pattern", None) or {}, path, "rank_pattern"
    )
    alpha_pattern = _compiled_patterns(
        config_field(raw, "alpha_pattern", path, "alpha pattern", None) or {}, path, "alpha_pattern"
    )

    def module_config(module_path: str) -> AdapterConfig:
        r = _pattern_value(rank_pattern, module_path, config.r)
        alpha = _pattern_value(alpha_pattern, module_path, config.lora_alpha)
        return AdapterConfig(**{**config.to_dict(), "r": r, "lora_alpha": alpha})

    return config, module_config


def _compiled_patterns(pattern: dict, path: Path, name: str) -> list[tuple[re.Pattern, Any]]:
    """PEFT 0.21 `get_pattern_key`: key k matches module path p when re.match(rf"(.*\\.)?({k})$", p)."""
    compiled = []
    for key, value in pattern.items():
        try:
            compiled.append((re.compile(rf"(.*\.)?({key})$"), value))
        except re.error as exc:
            raise AdapterError(
                f"pattern {key!r} is not a valid regular expression ({exc})", file=path, field=name
            ) from exc
    return compiled


def _pattern_value(compiled: list[tuple[re.Pattern, Any]], module_path: str, default: Any) -> Any:
    """The value of the first pattern (in file order) matching `module_path`, as PEFT picks it; else `default`."""
    return next((value for regex, value in compiled if regex.match(module_path)), default)


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    readable_file(path, "adapter weights")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"corrupt safetensors file ({exc})", file=path) from exc


def _is_reference_layout(flat: Mapping[str, torch.Tensor]) -> bool:
    """A LoRA dir holding the paper's extra tensors (any of C, D, the diagonal) is the reference's."""
    extra = tuple(f".{REFERENCE_NAMES[p]}" for p in ("d", "sora_C", "sora_D"))
    return any(key.endswith(extra) for key in flat)


def _reference_config(
    raw: dict,
    path: Path,
    config: AdapterConfig,
    module_config: Callable[[str], AdapterConfig],
    flat: Mapping[str, torch.Tensor],
    weights: Path,
) -> tuple[AdapterConfig, Callable[[str], AdapterConfig]]:
    """The reference dir's PEFT config as first-order SORA: r_p from its C tensors, s0 from
    `initial_s_p` (config or SORA_SERVE_REFERENCE_S0), else the reference's default 1.0."""
    if config.method == "dora":
        raise AdapterError(
            "use_dora=true with the paper's SORA tensors (lora_C/lora_D/lora_Diag): no such adapter exists",
            file=path,
            field="use_dora",
        )
    c_key = next((k for k in flat if k.endswith(f".{REFERENCE_NAMES['sora_C']}")), None)
    if c_key is None:
        raise AdapterError(f"a MaeChd/SORA adapter without any {REFERENCE_NAMES['sora_C']} tensor", file=weights)
    if flat[c_key].ndim != 2:
        raise AdapterError(f"expected (out, r_p), got shape {tuple(flat[c_key].shape)}", file=weights, field=c_key)
    s0 = config_field(raw, "initial_s_p", path, "positive number", _reference_s0_from_environment())
    rotation = {"method": "sora", "rotation": "first_order", "r_p": int(flat[c_key].shape[1]), "s0": s0}
    as_sora = lambda c: AdapterConfig(**{**c.to_dict(), **rotation})  # noqa: E731
    return as_sora(config), lambda module_path: as_sora(module_config(module_path))


def _reference_s0_from_environment() -> float:
    text = os.environ.get(REFERENCE_S0_ENV, "").strip()
    try:
        s0 = float(text) if text else REFERENCE_S0
    except ValueError:
        s0 = math.nan
    if not (math.isfinite(s0) and s0 > 0):
        raise AdapterError(
            f"{REFERENCE_S0_ENV} (--reference-s0) must be a positive number, got {text!r}", field="reference_s0"
        )
    return s0


def _group_tensors(
    flat: Mapping[str, torch.Tensor], path: Path, method: str, names: Mapping[str, str]
) -> dict[str, dict[str, torch.Tensor]]:
    """module path -> parameter -> tensor; every tensor known, floating point and finite, none missing."""
    suffix_to_param = {suffix: param for param, suffix in names.items()}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        module_path, param = _split_key(key, suffix_to_param)
        if param is None:
            raise AdapterError(f"unexpected tensor for a {method} adapter", file=path, field=key)
        if not tensor.is_floating_point():
            raise AdapterError(f"dtype {tensor.dtype} is not floating point", file=path, field=key)
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"module '{module_path}': contains NaN or infinite values", file=path, field=key)
        if names is REFERENCE_NAMES and param == "d":  # the reference's diagonal is an (out x 1) nn.Linear weight
            if tensor.ndim != 2 or tensor.shape[1] != 1:
                raise AdapterError(
                    f"module '{module_path}': expected shape (out, 1), got {tuple(tensor.shape)}", file=path, field=key
                )
            tensor = tensor[:, 0]
        modules.setdefault(module_path, {})[param] = tensor
    if not modules:
        raise AdapterError("no adapter tensors", file=path)
    for module_path, tensors in modules.items():
        missing = [p for p in names if p not in tensors]
        if missing:
            listed = ", ".join(f"{PEFT_PREFIX}{module_path}.{names[p]}" for p in missing)
            raise AdapterError(f"missing tensor(s) {listed}", file=path, field=f"{PEFT_PREFIX}{module_path}")
    return modules


def _split_key(key: str, suffix_to_param: dict[str, str]) -> tuple[str, str | None]:
    body = key.removeprefix(PEFT_PREFIX)
    for suffix, param in suffix_to_param.items():
        if body.endswith("." + suffix):
            return body[: -len(suffix) - 1], param
    return body, None


def write_side_fingerprint(directory: Path, fingerprint: dict) -> None:
    """The base fingerprint of a PEFT-format dir, in its own file (PEFT's config stays PEFT's)."""
    write_json(directory / FINGERPRINT_FILE, {"base_fingerprint": fingerprint})


def write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def our_config_json(config: AdapterConfig, base_name: str | None, fingerprint: dict) -> dict:
    return {
        "peft_type": METHOD_CLASSES[config.method].peft_type,
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


def peft_lora_config(config: AdapterConfig, base_name: str | None, fan_in_fan_out: bool):
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
