"""What an adapter must satisfy, apart from how its files are laid out (`adapter_format`).

- bounds on the update: finite, float32-representable serving factors; the low-rank term's entry
  RMS and the scale/rotation gain bounded from the file alone (`UpdateSize`), and the update
  relative to ||W0||_F once the base is known;
- typed config fields (`config_field`): the type of every field read, named on error;
- PEFT's LoraConfig policy: every option read, ignored or refused, with the reason;
- shapes from the config's ranks, and the checks against a base described by `BaseLayer`s
  (modules present, shapes, the base fingerprint of `sora_serve.fingerprint`).

Every error names the file, the field and the module.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import AdapterConfig
from .errors import AdapterError
from .fingerprint import BaseLayer, check_fingerprint, model_layers
from .methods import rotation_factors, tensor_shapes

if TYPE_CHECKING:
    from .adapter_format import AdapterFile

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


def config_field(raw: dict, key: str, path: Path, kind: str, default: Any = _REQUIRED) -> Any:
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


def refuse_peft_options(raw: dict, path: Path) -> None:
    """PEFT's LoraConfig `raw`: refuse, naming the field, any option set that changes the outputs in a
    way we do not implement (PEFT_REFUSED, a trained bias, a W0-moving init) or that PEFT 0.21 lacks."""
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
    if config_field(raw, "bias", path, "str", "none") != "none":
        raise AdapterError(
            f"PEFT option bias={raw['bias']!r} is not supported: it trains the base layers' biases",
            file=path,
            field="bias",
        )
    init = config_field(raw, "init_lora_weights", path, "init", True)
    if isinstance(init, str) and init.startswith(BASE_MOVING_INITS):
        raise AdapterError(
            f"init_lora_weights={init!r} moved the base weights at init, so this adapter is only right on "
            "that residual base; "
            "convert it with PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...)) to a plain LoRA",
            file=path,
            field="init_lora_weights",
        )


def check_shapes(adapter: AdapterFile) -> None:
    """Every tensor's shape from the config's ranks (the method's own parameter shapes): the config's r
    is the rank, as PEFT and vLLM read it."""
    rank_source = "field 'r' (or its rank_pattern entry)" if adapter.layout != "ours" else "field 'r'"
    for module_path, t in adapter.tensors.items():
        config = adapter.module_configs[module_path]
        out_f, in_f = t["lora_B"].shape[0], t["lora_A"].shape[-1]
        expected = tensor_shapes(config, in_f, out_f)
        for param, tensor in t.items():
            if tuple(tensor.shape) != expected[param]:
                raise AdapterError(
                    f"module '{module_path}': shape {tuple(tensor.shape)} does not match the config's r={config.r} "
                    f"({rank_source} of {adapter.config_file.name}), r_p={config.r_p}, out={out_f}: "
                    f"expected {expected[param]}",
                    file=adapter.weights_file,
                    field=adapter.tensor_key(module_path, param),
                )


def check_update_bounds(adapter: AdapterFile, *, allow_large_updates: bool | None = None) -> None:
    """What the file alone bounds: float32-representable serving factors (always), and, unless
    allowed, the low-rank term's entry RMS <= UPDATE_RMS_MAX and the scale/rotation gain <= RELATIVE_UPDATE_MAX."""
    allowed = large_updates_allowed(allow_large_updates)
    for module_path, size in adapter.updates.items():
        key = adapter.tensor_key(module_path)
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
                    adapter.tensor_key(module_path, param),
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
        key = adapter.tensor_key(module_path)
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
                adapter.tensor_key(module_path),
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
        model_type=model_type_of(model),
        allow_large_updates=allow_large_updates,
        allow_other_base=allow_other_base,
    )


def model_type_of(model: nn.Module) -> str | None:
    """The base's `config.model_type`, None for a model without an HF config."""
    return getattr(getattr(model, "config", None), "model_type", None)
