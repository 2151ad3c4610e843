"""Which base an adapter belongs to: the shapes of its base layers and a sample of their weights.

Every adapter dir sora-serve writes carries a `base_fingerprint` (in `adapter_config.json` for
Pre-Diag and SORA; beside PEFT's files, in `base_fingerprint.json`, for LoRA and DoRA):

    {"model_type": "llama", "sha256": "...",
     "modules": {path: [out, in, has_bias]},
     "weights": {path: [[row, col, W0[row, col]], ...]}}    # SAMPLES entries per layer, W0 is out x in

Shapes alone cannot tell an Instruct model from its base, or one fine-tune from another: those
differ in every weight by a little. The sampled entries can. Every entry point compares them with
the base in hand (`check_fingerprint`) and refuses a base on which any entry moved by more than a
dtype cast moves it:

    |recorded - base| <= CAST_RTOL * max(|recorded|, |base|) + CAST_ATOL

Rounding to bf16 moves a value by at most 2^-8 of itself (half a step of its 8-bit significand),
to fp16 by 2^-11; CAST_RTOL = 2^-7 leaves room for two casts in a row, CAST_ATOL = 2^-24 for fp16's
loss of tiny values. So an fp32 base re-saved in bf16 or fp16 (or the reverse) is the same base;
a quantized one (int8 / fp8 steps are 2^-4 of a value or more) is not. A fine-tune that moves the
weights by 1e-3 of their RMS moves about one entry in twelve beyond 2^-7 of itself (the small
entries; a Gaussian estimate), so 32 entries per layer catch it at the first layers (docs/VLLM.md, Security).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import AdapterError
from .layer import is_supported_layer, weight_out_in

SAMPLES = 32  # sampled W0 entries per layer
SAMPLE_SEED = 20251100  # positions are drawn once per shape from this seed, and stored with the values
CAST_RTOL = 2.0**-7
CAST_ATOL = 2.0**-24
# Override of the weight check (shapes are always checked). An environment variable, so that
# vLLM's worker processes see what `serve --allow-other-base` set.
ALLOW_OTHER_BASE_ENV = "SORA_SERVE_ALLOW_OTHER_BASE"

logger = logging.getLogger(__name__)

# Reads W0[rows[k], cols[k]] (W0 out x in) from wherever the base lives: a model, a checkpoint file.
WeightReader = Callable[[list[int], list[int]], torch.Tensor]


@dataclass(frozen=True)
class BaseLayer:
    """One base layer as the checks need it (from a model, a checkpoint's files or vLLM's layers)."""

    out_features: int
    in_features: int
    has_bias: bool
    weight_norm: float | None = None  # ||W0||_F of the layer when known (relative bound)
    read_weights: WeightReader | None = field(default=None, compare=False, repr=False)  # None: weights not at hand


def model_layers(model: nn.Module, paths: Iterable[str], *, norms: bool = True) -> dict[str, BaseLayer]:
    """`BaseLayer`s of `model`'s linear layers among `paths` (absent or non-linear modules are left out).

    The weight reader, and with `norms` ||W0||_F (a pass over every weight), are included unless
    the weights are on the meta device."""
    modules = dict(model.named_modules())
    layers = {}
    for path in paths:
        module = modules.get(path)
        base = getattr(module, "base_layer", module)  # ours (AdaptedLayer) or PEFT's wrapper of the base layer
        if module is None or not is_supported_layer(base):
            continue
        weight = weight_out_in(base).detach()
        has_weights = not weight.is_meta
        norm = weight.double().norm().item() if has_weights and norms else None
        reader = (lambda rows, cols, w=weight: w[rows, cols]) if has_weights else None
        layers[path] = BaseLayer(
            int(weight.shape[0]), int(weight.shape[1]), getattr(base, "bias", None) is not None, norm, reader
        )
    return layers


def base_fingerprint(layers: Mapping[str, BaseLayer], model_type: str | None) -> dict:
    """The fingerprint of the base layers an adapter was trained on (every layer's weights at hand)."""
    paths = sorted(layers, key=natural_key)
    shapes = {p: [layers[p].out_features, layers[p].in_features, layers[p].has_bias] for p in paths}
    digest = hashlib.sha256(json.dumps([model_type, shapes], sort_keys=True).encode()).hexdigest()[:16]
    return {
        "model_type": model_type,
        "modules": shapes,
        "sha256": digest,
        "weights": {p: sample_weights(layers[p]) for p in paths},
    }


def sample_weights(layer: BaseLayer) -> list[list]:
    """[[row, col, W0[row, col]], ...] at SAMPLES positions drawn from SAMPLE_SEED for this shape."""
    if layer.read_weights is None:
        raise ValueError("the base layer's weights are not at hand (meta device?); cannot fingerprint them")
    generator = torch.Generator().manual_seed(SAMPLE_SEED)
    rows = torch.randint(layer.out_features, (SAMPLES,), generator=generator).tolist()
    cols = torch.randint(layer.in_features, (SAMPLES,), generator=generator).tolist()
    values = layer.read_weights(rows, cols).double().tolist()
    return [[r, c, v] for r, c, v in zip(rows, cols, values)]


def natural_key(path: str) -> list:
    """model.layers.2 before model.layers.10: the order a reader expects 'the first layer' in."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


# ---------------------------------------------------------------- reading


def parse_fingerprint(fingerprint: Any, path: Path) -> dict:
    """A fingerprint as read from `path`, every field checked; AdapterError naming the field otherwise."""
    modules = fingerprint.get("modules") if isinstance(fingerprint, dict) else None
    if not isinstance(modules, dict):
        raise AdapterError("expected an object with 'modules'", file=path, field="base_fingerprint")
    model_type = fingerprint.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise AdapterError(
            f"expected a string or null, got {model_type!r}", file=path, field="base_fingerprint.model_type"
        )
    for module_path, entry in modules.items():
        ok = (
            isinstance(entry, list)
            and len(entry) == 3
            and all(_is_index(x) and x > 0 for x in entry[:2])
            and isinstance(entry[2], bool)
        )
        if not ok:
            raise AdapterError(
                f"expected [out, in, has_bias], got {entry!r}",
                file=path,
                field=f"base_fingerprint.modules.{module_path}",
            )
    weights = fingerprint.get("weights", {})
    if not isinstance(weights, dict):
        raise AdapterError(
            "expected an object {module path: [[row, col, value], ...]}", file=path, field="base_fingerprint.weights"
        )
    for module_path, samples in weights.items():
        _check_samples(samples, modules.get(module_path), path, f"base_fingerprint.weights.{module_path}")
    return fingerprint


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_samples(samples: Any, shape: list | None, path: Path, field_name: str) -> None:
    if shape is None:
        raise AdapterError("no entry for this module under base_fingerprint.modules", file=path, field=field_name)
    out_f, in_f = shape[:2]
    valid = (
        isinstance(samples, list)
        and bool(samples)
        and all(
            isinstance(s, list)
            and len(s) == 3
            and _is_index(s[0])
            and s[0] < out_f
            and _is_index(s[1])
            and s[1] < in_f
            and isinstance(s[2], (int, float))
            and not isinstance(s[2], bool)
            and math.isfinite(s[2])
            for s in samples
        )
    )
    if not valid:
        raise AdapterError(
            f"expected a non-empty list of [row < {out_f}, col < {in_f}, finite value]", file=path, field=field_name
        )


# ---------------------------------------------------------------- checking


def other_base_allowed(allow: bool | None = None) -> bool:
    """`allow` when given, else whether SORA_SERVE_ALLOW_OTHER_BASE is set to 1/true/yes."""
    if allow is not None:
        return allow
    return os.environ.get(ALLOW_OTHER_BASE_ENV, "").strip().lower() in ("1", "true", "yes")


def check_fingerprint(
    fingerprint: dict | None,
    file: Path,
    layers: Mapping[str, BaseLayer],
    model_type: str | None,
    *,
    allow_other_base: bool | None = None,
) -> None:
    """Refuse a base that is not the one the fingerprint (read from `file`) was taken on.

    model_type (when both are known) and [out, in, has_bias] per module always; the sampled
    weights wherever `layers` can read them, unless another base is allowed."""
    if fingerprint is None:
        _note_no_fingerprint(file.parent, "it has no base_fingerprint")
        return
    expected_type = fingerprint.get("model_type")
    if model_type is not None and expected_type is not None and model_type != expected_type:
        raise AdapterError(
            f"the base is a {model_type!r} model but the adapter was trained on a {expected_type!r} one: "
            "adapter for a different base",
            file=file,
            field="base_fingerprint.model_type",
        )
    for module_path, expected in fingerprint["modules"].items():
        layer = layers.get(module_path)
        ours = None if layer is None else [layer.out_features, layer.in_features, layer.has_bias]
        if ours != expected:
            raise AdapterError(
                f"module '{module_path}': base layer is {ours} (out, in, has_bias) but the adapter was "
                f"trained on {expected}: "
                "adapter for a different base",
                file=file,
                field="base_fingerprint",
            )
    if "weights" not in fingerprint:
        _note_no_fingerprint(
            file.parent, "its base_fingerprint records no weights (an older sora-serve, or `convert` without --base)"
        )
    elif not other_base_allowed(allow_other_base):
        _check_weights(fingerprint["weights"], file, layers)


def _check_weights(weights: dict, file: Path, layers: Mapping[str, BaseLayer]) -> None:
    for module_path in sorted(weights, key=natural_key):
        reader = layers[module_path].read_weights
        if reader is None:
            continue
        rows, cols, values = zip(*weights[module_path])
        recorded = torch.tensor(values, dtype=torch.float64)
        base = reader(list(rows), list(cols)).double()
        moved = (recorded - base).abs() > CAST_RTOL * torch.maximum(recorded.abs(), base.abs()) + CAST_ATOL
        if moved.any():
            raise AdapterError(
                f"module '{module_path}': the base's weights are not the ones the adapter was trained on: "
                f"{int(moved.sum())} of {len(values)} sampled entries differ by more than a dtype cast "
                f"(relative RMS difference {_relative_rms(recorded, base):.2g}; a bf16/fp16 cast stays "
                "within 2^-7 of each entry). "
                f"Adapter for another base of the same shapes (another fine-tune, an Instruct variant?); "
                f"if intended, pass --allow-other-base (allow_other_base=True, {ALLOW_OTHER_BASE_ENV}=1)",
                file=file,
                field=f"base_fingerprint.weights.{module_path}",
            )


def _relative_rms(recorded: torch.Tensor, base: torch.Tensor) -> float:
    return float((recorded - base).norm() / recorded.norm().clamp_min(1e-300))


_noted: set[Path] = set()


def _note_no_fingerprint(directory: Path, why: str) -> None:
    """Say once per directory that the base's weights could not be checked."""
    if directory not in _noted:
        _noted.add(directory)
        logger.warning("adapter %s: %s, so only module names and shapes are checked against the base", directory, why)
