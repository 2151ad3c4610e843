"""Adapter directories: read (validated), load into a model, save. Format: docs/FORMAT.md.

Two layouts share the PEFT file names (`adapter_config.json`, `adapter_model.safetensors`,
tensor keys `base_model.model.<module path>.<tensor>`):
  - ours, `peft_type` PREDIAG or SORA, with the extra tensors `sora_d`, `sora_C`, `sora_D`;
  - PEFT's LoRA / DoRA (`peft_type` LORA, `use_dora`), written by `peft` itself.

One validator for every entry point (eager load, fold, to-LoRA, ONNX, `serve`, the vLLM plugin):
`read_adapter` checks what the file alone can tell (known `peft_type`, the type of every config
field read, PEFT options that change the math, config rank = tensor rank as PEFT resolves it,
finite tensors, bounded updates); `check_against_base` checks it against a base described by
`BaseLayer`s (modules present, shapes, the base fingerprint of `sora_serve.fingerprint` with its
sampled weights, the update relative to ||W0||_F).
Errors name the file, the field and the module, before any model is touched.
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
from safetensors.torch import load_file, save_file
from torch import nn

from .config import FORMAT_VERSION, PEFT_TYPES, AdapterConfig
from .errors import AdapterError
from .fingerprint import BaseLayer, base_fingerprint, check_fingerprint, model_layers, parse_fingerprint
from .fs import atomic_output_dir, readable_dir, readable_file
from .methods import BaseView, ServingFactors, adapter_from_tensors, rotation_factors
from .model import CONFIGS_ATTR, adapted_layers, adapter_configs, set_active_adapter, wrap_layer

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# LoRA/DoRA dirs are PEFT's own files; the base fingerprint we record for them sits beside them.
FINGERPRINT_FILE = "base_fingerprint.json"
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
METHOD_TENSORS = {
    "lora": ("lora_A", "lora_B"),
    "dora": ("lora_A", "lora_B", "magnitude"),
    "prediag": ("lora_A", "lora_B", "d"),
    "sora": ("lora_A", "lora_B", "d", "sora_C", "sora_D"),
}

# ---------------------------------------------------------------- bounds on the update
# Override for the two magnitude bounds below (never for NaN/inf or float32 overflow). An
# environment variable, so that vLLM's worker processes see what `serve --allow-large-updates` set.
ALLOW_LARGE_UPDATES_ENV = "SORA_SERVE_ALLOW_LARGE_UPDATES"
# ||W - W0||_F / ||W0||_F for a layer whose base is known (an upper bound, see `UpdateSize`).
# Measured with our trainer (40 steps, tiny Llama, r = 8, all four methods): this bound is at most
# 2.1 at the demo's lr 3e-3 and 18.7 at a 10x larger lr 3e-2 (scale/rotation part <= 2.3); random
# or synthetic test adapters on tiny bases reach ~10. The bound sits 50x above the largest of
# these on purpose; what it stops is an update that drowns the base by orders of magnitude, on
# the way to the x1e30 files that poison shared state. The same bound applies to
# ||R diag(d) - I||_2 (scale and rotation) from the file alone.
RELATIVE_UPDATE_MAX = 1000.0
# From the file alone, for the low-rank term s B A (and DoRA's adapted weight): the RMS of its
# entries. Linear weights of real LLMs have entry RMS ~0.01-0.2 (Llama ~0.02, GPT-2 ~0.1-0.2) and
# the trained updates above reach 0.21: an entry RMS of 100 is >=500x any of them, so the bound
# only trips on absurd files.
UPDATE_RMS_MAX = 100.0
FLOAT32_MAX = torch.finfo(torch.float32).max


def large_updates_allowed(allow: bool | None = None) -> bool:
    """`allow` when given, else whether SORA_SERVE_ALLOW_LARGE_UPDATES is set to 1/true/yes."""
    if allow is not None:
        return allow
    return os.environ.get(ALLOW_LARGE_UPDATES_ENV, "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class UpdateSize:
    """How far one layer's adapter can move the layer, from the file alone (float64).

    Serving form W = R (diag(d) W0 + s B A), b = R (d b0 + shift) (see `ServingFactors`), so
        ||W - W0||_F = ||(R diag(d) - I) W0 + R s B A||_F <= g ||W0||_F + ||R||_2 ||s B A||_F,
    with g = max|d - 1| + ||R - I||_2 max|d| >= ||R diag(d) - I||_2 and ||R||_2 <= 1 + ||R - I||_2.
    DoRA's rows have norm m exactly (W = diag(m / rownorm(W0 + s B A)) (W0 + s B A)), so there
    ||W - W0||_F <= ||m||_2 + ||W0||_F.
    """

    out_features: int
    in_features: int
    lowrank: float  # ||s B A||_F
    rotation: float  # ||R - I||_2 (0 without a rotation)
    scale_max: float  # max|d| (1 without a scale)
    scale_rotation: float  # g above
    magnitude: float | None  # DoRA: ||m||_2 = ||W||_F
    largest_factor: float  # max |entry| over the float64 serving factors (A, s B, d, m, U, V)

    def entry_rms(self, norm: float) -> float:
        return norm / math.sqrt(self.out_features * self.in_features)

    def relative_bound(self, weight_norm: float) -> float:
        """Upper bound of ||W - W0||_F / ||W0||_F given ||W0||_F."""
        if weight_norm <= 0:
            return math.inf
        if self.magnitude is not None:
            return self.magnitude / weight_norm + 1.0
        return self.scale_rotation + (1.0 + self.rotation) * self.lowrank / weight_norm


def update_size(config: AdapterConfig, t: Mapping[str, torch.Tensor]) -> UpdateSize:
    """The `UpdateSize` of one layer's tensors (by parameter name) under its resolved config."""
    a = t["lora_A"].double()
    sb = t["lora_B"].double() * config.scaling
    lowrank = math.sqrt(max(((a @ a.T) * (sb.T @ sb)).sum().item(), 0.0))  # ||sBA||_F^2 = tr(A A^T B^T B s^2)
    factors = [a, sb]
    d = t["d"].double() if "d" in t else torch.ones(1, dtype=torch.float64)
    rotation = 0.0
    if "sora_C" in t:
        u, v = rotation_factors(t["sora_C"].double(), t["sora_D"].double(), config.s0, config.rotation)
        rotation = math.sqrt(torch.linalg.eigvals((u.T @ u) @ (v.T @ v)).abs().max().item())  # ||V U^T||_2
        factors += [u, v]
    magnitude = None
    if "magnitude" in t:
        magnitude = t["magnitude"].double().norm().item()
        factors.append(t["magnitude"].double())
    factors.append(d)
    return UpdateSize(
        out_features=int(t["lora_B"].shape[0]),
        in_features=int(t["lora_A"].shape[1]),
        lowrank=lowrank,
        rotation=rotation,
        scale_max=d.abs().max().item(),
        scale_rotation=(d - 1).abs().max().item() + rotation * d.abs().max().item(),
        magnitude=magnitude,
        largest_factor=max(f.abs().max().item() for f in factors),
    )


# ---------------------------------------------------------------- config fields and their types
_REQUIRED = object()


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_targets(v: Any) -> bool:
    return (isinstance(v, str) and bool(v)) or (isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v))


# name -> (predicate, what it should be)
TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "positive int": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
    "positive number": (lambda v: _is_number(v) and v > 0, "a positive finite number"),
    "fraction": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "optional str": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "targets": (_is_targets, "a module name or a non-empty list of module names"),
    "rank pattern": (
        lambda v: v is None or (isinstance(v, dict) and all(TYPES["positive int"][0](x) for x in v.values())),
        "an object mapping module patterns to positive integers",
    ),
    "alpha pattern": (
        lambda v: v is None or (isinstance(v, dict) and all(_is_number(x) and x > 0 for x in v.values())),
        "an object mapping module patterns to positive numbers",
    ),
    "init": (lambda v: isinstance(v, (bool, str)), "true, false or an init name"),
}


def _field(raw: dict, key: str, path: Path, kind: str, default: Any = _REQUIRED) -> Any:
    """raw[key] checked to be of `kind` (a key of TYPES); AdapterError naming file and field otherwise."""
    if key not in raw:
        if default is _REQUIRED:
            raise AdapterError("missing", file=path, field=key)
        return default
    check, expected = TYPES[kind]
    value = raw[key]
    if not check(value):
        raise AdapterError(f"expected {expected}, got {value!r}", file=path, field=key)
    return value


# ---------------------------------------------------------------- PEFT's LoraConfig options (PEFT 0.21)
# Every field of peft.LoraConfig, decided one by one (tests/test_validation.py checks that this
# table covers exactly the installed PEFT's fields, so an upgrade forces a decision):
#   read    - used to rebuild the adapter;
#   ignored - no effect on inference outputs (bookkeeping, training-only, or which modules were
#             targeted: the tensors in the file say that);
#   refused - changes the outputs in a way we do not implement (value -> why), refused when set.
PEFT_READ = {
    "peft_type",
    "r",
    "lora_alpha",
    "target_modules",
    "lora_dropout",
    "use_rslora",
    "use_dora",
    "fan_in_fan_out",
    "rank_pattern",
    "alpha_pattern",
    "bias",
    "init_lora_weights",
    "base_model_name_or_path",
}
PEFT_IGNORED = {
    "task_type",
    "auto_mapping",
    "peft_version",
    "revision",
    "inference_mode",
    "runtime_config",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",  # targeting: the file's tensors are the truth
    "megatron_config",
    "megatron_core",  # training-time parallel layers; same tensors
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",  # init-time only (the inits that move W0 are refused below)
    "velora_config",  # VeLoRA changes only the backward pass; the forward is plain LoRA
    "qalora_group_size",  # only read with use_qalora (refused)
    "ensure_weight_tying",  # ties adapters of tied layers at training; each module's tensors are in the file
}
PEFT_REFUSED = {
    "lora_bias": "adds a trained bias to lora_B",
    "modules_to_save": "replaces whole modules with trained copies",
    "target_parameters": "adapts raw nn.Parameters (MoE experts), not Linear layers",
    "trainable_token_indices": "trains embedding rows",
    "layer_replication": "duplicates decoder layers",
    "use_qalora": "pools the input before lora_A (QA-LoRA)",
    "use_bdlora": "block-diagonal LoRA factors",
    "alora_invocation_tokens": "activates the adapter only after invocation tokens (aLoRA)",
    "arrow_config": "routes tokens among several adapters (Arrow)",
    "kasa_config": "truncates W0's SVD and adds singular values (KaSA)",
    "monteclora_config": "samples the factors (MonteCLoRA)",
}
# init_lora_weights values whose init moves W0 (the adapter is then only right on that residual
# base); PEFT resets the field to true when it converts such an adapter to a plain LoRA.
BASE_MOVING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


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
    file_names: dict[str, str] = field(default_factory=lambda: FILE_NAMES)  # parameter -> tensor suffix in this file

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
        return self.directory / (FINGERPRINT_FILE if self.config.method in ("lora", "dora") else CONFIG_FILE)


def read_adapter(directory: str | Path, *, allow_large_updates: bool | None = None) -> AdapterFile:
    """Read and validate an adapter directory (ours or PEFT's LoRA/DoRA) from the files alone.

    `allow_large_updates` (default: the SORA_SERVE_ALLOW_LARGE_UPDATES environment variable)
    lifts the magnitude bounds; non-finite values are always refused.
    """
    directory = readable_dir(directory, "adapter directory")
    config_path = directory / CONFIG_FILE
    raw = _read_config_json(config_path)
    peft_type = raw.get("peft_type")
    if peft_type in ("PREDIAG", "SORA"):
        config, fingerprint = _parse_our_config(raw, config_path)
        module_config: Callable[[str], AdapterConfig] = lambda module_path: config  # noqa: E731
        fan_in_fan_out = False
    elif peft_type == "LORA":
        config, module_config = _parse_peft_config(raw, config_path)
        fingerprint, fan_in_fan_out = (
            _read_side_fingerprint(directory),
            _field(raw, "fan_in_fan_out", config_path, "bool", False),
        )
    else:
        raise AdapterError(
            f"unknown peft_type {peft_type!r}; expected PREDIAG, SORA or LORA", file=config_path, field="peft_type"
        )
    weights_path = directory / WEIGHTS_FILE
    flat, names = _load_weights(weights_path), FILE_NAMES
    if peft_type == "LORA" and _is_reference_layout(flat):
        config, module_config = _reference_config(raw, config_path, config, module_config, flat, weights_path)
        names = REFERENCE_NAMES
    elif "initial_s_p" in raw:
        raise AdapterError(
            "initial_s_p is the paper's SORA option, but this dir has no lora_C/lora_D/lora_Diag tensors",
            file=config_path,
            field="initial_s_p",
        )
    tensors = _group_tensors(flat, weights_path, config.method, names)
    module_configs = {path: module_config(path) for path in tensors}
    for path, t in tensors.items():
        _check_shapes(weights_path, path, t, module_configs[path], names, peft=peft_type == "LORA")
    adapter = AdapterFile(
        directory,
        config,
        module_configs,
        tensors,
        fingerprint,
        _field(raw, "base_model_name_or_path", config_path, "optional str", None),
        fan_in_fan_out,
        updates={path: update_size(module_configs[path], t) for path, t in tensors.items()},
        file_names=names,
    )
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
    version = _field(raw, "format_version", path, "positive int")
    if version != FORMAT_VERSION:
        raise AdapterError(
            f"format_version {version!r} is not supported (this is {FORMAT_VERSION})", file=path, field="format_version"
        )
    if _field(raw, "bias", path, "str", "none") != "none":
        raise AdapterError(f"expected 'none', got {raw['bias']!r}", file=path, field="bias")
    config = _config_or_error(
        path,
        method=raw["peft_type"].lower(),
        r=_field(raw, "r", path, "positive int"),
        lora_alpha=_field(raw, "lora_alpha", path, "positive number"),
        r_p=_field(raw, "r_p", path, "positive int"),
        s0=_field(raw, "s0", path, "positive number"),
        rotation=_field(raw, "rotation", path, "str"),
        target_modules=_field(raw, "target_modules", path, "targets"),
        lora_dropout=_field(raw, "lora_dropout", path, "fraction", 0.0),
    )
    if "base_fingerprint" not in raw:
        raise AdapterError("missing", file=path, field="base_fingerprint")
    return config, parse_fingerprint(raw["base_fingerprint"], path)


def _parse_peft_config(raw: dict, path: Path) -> tuple[AdapterConfig, Callable[[str], AdapterConfig]]:
    """PEFT's LoraConfig: every option decided (see the tables above); rank/alpha patterns resolved per module."""
    _refuse_peft_options(raw, path)
    config = _config_or_error(
        path,
        method="dora" if _field(raw, "use_dora", path, "bool", False) else "lora",
        r=_field(raw, "r", path, "positive int"),
        lora_alpha=_field(raw, "lora_alpha", path, "positive number"),
        target_modules=_field(raw, "target_modules", path, "targets"),
        lora_dropout=_field(raw, "lora_dropout", path, "fraction", 0.0),
        use_rslora=_field(raw, "use_rslora", path, "bool", False),
    )
    rank_pattern = _compiled_patterns(
        _field(raw, "rank_pattern", path, "rank pattern", None) or {}, path, "rank_pattern"
    )
    alpha_pattern = _compiled_patterns(
        _field(raw, "alpha_pattern", path, "alpha pattern", None) or {}, path, "alpha_pattern"
    )

    def module_config(module_path: str) -> AdapterConfig:
        r = _pattern_value(rank_pattern, module_path, config.r)
        alpha = _pattern_value(alpha_pattern, module_path, config.lora_alpha)
        return AdapterConfig(**{**config.to_dict(), "r": r, "lora_alpha": alpha})

    return config, module_config


def _refuse_peft_options(raw: dict, path: Path) -> None:
    for key, value in raw.items():
        if key in PEFT_REFUSED and value:
            raise AdapterError(
                f"PEFT option {key}={value!r} is not supported: it {PEFT_REFUSED[key]}", file=path, field=key
            )
        if key not in PEFT_READ | PEFT_IGNORED | PEFT_REFUSED.keys() | {"initial_s_p"} and value not in (
            None,
            False,
            [],
            {},
        ):
            raise AdapterError(
                f"unknown LoraConfig option {key}={value!r} (not in PEFT 0.21): it may change the outputs",
                file=path,
                field=key,
            )
    if _field(raw, "bias", path, "str", "none") != "none":
        raise AdapterError(
            f"PEFT option bias={raw['bias']!r} is not supported: it trains the base layers' biases",
            file=path,
            field="bias",
        )
    init = _field(raw, "init_lora_weights", path, "init", True)
    if isinstance(init, str) and init.startswith(BASE_MOVING_INITS):
        raise AdapterError(
            f"init_lora_weights={init!r} moved the base weights at init, so this adapter is only right on "
            "that residual base; "
            "convert it with PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...)) to a plain LoRA",
            file=path,
            field="init_lora_weights",
        )


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
    s0 = _field(raw, "initial_s_p", path, "positive number", _reference_s0_from_environment())
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
        if param is None or param not in METHOD_TENSORS[method]:
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
        missing = [p for p in METHOD_TENSORS[method] if p not in tensors]
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


def _check_shapes(
    path: Path,
    module_path: str,
    t: dict[str, torch.Tensor],
    config: AdapterConfig,
    names: Mapping[str, str],
    *,
    peft: bool,
) -> None:
    """Every tensor's shape from the config's ranks: the config's r is the rank (as PEFT and vLLM read it)."""
    out_f, in_f = t["lora_B"].shape[0], t["lora_A"].shape[-1]
    expected = {
        "lora_A": (config.r, in_f),
        "lora_B": (out_f, config.r),
        "magnitude": (out_f,),
        "d": (out_f,),
        "sora_C": (out_f, config.r_p),
        "sora_D": (out_f, config.r_p),
    }
    rank_source = "field 'r' (or its rank_pattern entry)" if peft else "field 'r'"
    for param, tensor in t.items():
        if tuple(tensor.shape) != expected[param]:
            raise AdapterError(
                f"module '{module_path}': shape {tuple(tensor.shape)} does not match the config's r={config.r} "
                f"({rank_source} of {CONFIG_FILE}), r_p={config.r_p}, out={out_f}: expected {expected[param]}",
                file=path,
                field=f"{PEFT_PREFIX}{module_path}.{names[param]}",
            )


def check_update_bounds(adapter: AdapterFile, *, allow_large_updates: bool | None = None) -> None:
    """What the file alone bounds: float32-representable serving factors (always), and, unless
    allowed, the low-rank term's entry RMS <= UPDATE_RMS_MAX and the scale/rotation gain <= RELATIVE_UPDATE_MAX."""
    allowed = large_updates_allowed(allow_large_updates)
    for module_path, size in adapter.updates.items():
        key = f"{PEFT_PREFIX}{module_path}"
        values = (size.lowrank, size.rotation, size.scale_rotation, size.largest_factor, size.magnitude or 0.0)
        if not all(math.isfinite(v) for v in values) or size.largest_factor > FLOAT32_MAX:
            raise AdapterError(
                f"module '{module_path}': the serving factors overflow float32 (largest |entry| "
                f"{size.largest_factor:.3g})",
                file=adapter.weights_file,
                field=key,
            )
        if allowed:
            continue
        checks = [
            (size.entry_rms(size.lowrank), UPDATE_RMS_MAX, "lora_B", "the low-rank update s B A has entry RMS"),
            (
                size.scale_rotation,
                RELATIVE_UPDATE_MAX,
                "d" if size.scale_max >= size.rotation else "sora_C",  # the larger culprit
                "the output scale and rotation change the layer by up to (||R diag(d) - I||_2 <=)",
            ),
        ]
        if size.magnitude is not None:
            checks.append(
                (size.entry_rms(size.magnitude), UPDATE_RMS_MAX, "magnitude", "DoRA's adapted weight has entry RMS")
            )
        for value, bound, param, what in checks:
            if value > bound:
                raise _too_large(
                    adapter.weights_file,
                    f"{key}.{adapter.file_names[param]}",
                    module_path,
                    f"{what} {value:.3g} > {bound:g}",
                )


def _too_large(file: Path, field_name: str, module_path: str, what: str) -> AdapterError:
    return AdapterError(
        f"module '{module_path}': {what}, far beyond what training produces; if intended, set "
        f"{ALLOW_LARGE_UPDATES_ENV}=1 (or pass allow_large_updates=True / --allow-large-updates)",
        file=file,
        field=field_name,
    )


# ---------------------------------------------------------------- against a known base
def check_against_base(
    adapter: AdapterFile,
    layers: Mapping[str, BaseLayer],
    *,
    model_type: str | None = None,
    allow_large_updates: bool | None = None,
    allow_other_base: bool | None = None,
) -> None:
    """Refuse an adapter that does not fit the base described by `layers` (HF module path -> layer).

    Every adapted module must exist with the adapter's (out, in); the adapter's base fingerprint
    must agree (`sora_serve.fingerprint`: model_type, shapes, and the sampled weights where
    `layers` can read them, unless `allow_other_base`); and where ||W0||_F is known the update's
    relative size ||W - W0||_F / ||W0||_F (an upper bound, `UpdateSize`) must be at most
    RELATIVE_UPDATE_MAX unless large updates are allowed.
    """
    for module_path, t in adapter.tensors.items():
        key = f"{PEFT_PREFIX}{module_path}"
        layer = layers.get(module_path)
        if layer is None:
            raise AdapterError(
                f"module '{module_path}' not found in the base model (or not a linear layer there): "
                "adapter for a different base?",
                file=adapter.weights_file,
                field=key,
            )
        got = (int(t["lora_B"].shape[0]), int(t["lora_A"].shape[1]))
        if got != (layer.out_features, layer.in_features):
            raise AdapterError(
                f"module '{module_path}': adapter is {got[0]}x{got[1]} but the base layer is "
                f"{layer.out_features}x{layer.in_features} (out x in): adapter for a different base?",
                file=adapter.weights_file,
                field=key,
            )
    check_fingerprint(
        adapter.fingerprint, adapter.fingerprint_file, layers, model_type, allow_other_base=allow_other_base
    )
    if large_updates_allowed(allow_large_updates):
        return
    for module_path, size in adapter.updates.items():
        norm = layers[module_path].weight_norm
        if norm is not None and (bound := size.relative_bound(norm)) > RELATIVE_UPDATE_MAX:
            raise _too_large(
                adapter.weights_file,
                f"{PEFT_PREFIX}{module_path}",
                module_path,
                f"the update can be {bound:.3g}x the base layer's norm (||W - W0||_F / ||W0||_F <= "
                f"{bound:.3g} > {RELATIVE_UPDATE_MAX:g})",
            )


def check_base(
    adapter: AdapterFile,
    model: nn.Module,
    *,
    allow_large_updates: bool | None = None,
    allow_other_base: bool | None = None,
) -> None:
    """`check_against_base` with the base read from `model` (an nn.Module, weights or meta)."""
    check_against_base(
        adapter,
        model_layers(model, adapter.base_paths),
        model_type=_model_type(model),
        allow_large_updates=allow_large_updates,
        allow_other_base=allow_other_base,
    )


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


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
    modules = dict(model.named_modules())
    for param in model.parameters():
        param.requires_grad_(False)
    for module_path, tensors in adapter.tensors.items():
        layer = wrap_layer(model, module_path, modules[module_path])
        layer.add_adapter(name, adapter_from_tensors(adapter.module_configs[module_path], tensors))
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
        model_layers(model, module_paths, norms=False), _model_type(model)
    )  # samples only: no pass over W0
    if config.method in ("lora", "dora"):
        fan_in_fan_out = any(layer.fan_in_fan_out for _, layer in adapted_layers(model) if name in layer.adapters)
        _peft_lora_config(config, base_name, fan_in_fan_out).save_pretrained(str(directory))
        write_side_fingerprint(directory, fingerprint)
    else:
        _write_json(directory / CONFIG_FILE, our_config_json(config, base_name, fingerprint))
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


def write_side_fingerprint(directory: Path, fingerprint: dict) -> None:
    """The base fingerprint of a PEFT-format dir, in its own file (PEFT's config stays PEFT's)."""
    _write_json(directory / FINGERPRINT_FILE, {"base_fingerprint": fingerprint})


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def our_config_json(config: AdapterConfig, base_name: str | None, fingerprint: dict) -> dict:
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
