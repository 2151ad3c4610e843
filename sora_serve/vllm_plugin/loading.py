"""Every adapter vLLM loads goes through sora-serve's one validator, read once per process.

- Front end (`InputProcessor._validate_lora`, in the API server or the `vllm.LLM` process):
  before a request is admitted, its adapter dir is checked by `sora_serve.read_adapter` (finite
  tensors, config rank = tensor rank, known peft_type, typed config fields, bounded update) and
  against the base checkpoint's files (modules and shapes from the safetensors headers, the base
  fingerprint's sampled weights read entry by entry: `sora_serve.fingerprint`); the verdict
  is cached per version of the dir (`registry.version_key`), so a dir is read once, not per request.
  A bad adapter is a ValueError there: HTTP 400, or an exception from `LLM.generate`, and the
  engine never sees it.
- Worker (`SoraWorkerLoRAManager`, vLLM's worker-side LoRA manager subclassed): the adapter from
  the registry, against the base checkpoint's files as above (runtime loads reach the engine
  without the front end's check), then against this engine's base layers (`check_against_base`:
  modules, shapes, update size relative to ||W0||), the servability of every module, and the
  slot factors per layer (`activation.slot_weights`), which become vLLM's `LoRAModel`. Every kind,
  plain LoRA included, takes this path: vLLM's own loader never re-reads the files.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from sora_serve.adapter_format import PEFT_PREFIX, AdapterFile
from sora_serve.errors import AdapterError

from . import heads, registry
from .activation import check_servable, row_sq_norms, slice_offsets, slice_paths, slot_weights
from .backends import grouped
from .layers import parallel_kind

ERROR_MARK = "sora-serve:"  # lets the API server tell an adapter's fault (HTTP 400) from an engine fault


def adapter_error(lora_name: str, lora_dir: str | Path, exc: Exception) -> AdapterError:
    """The validator's message with file paths relative to the adapter dir: vLLM's API server
    masks absolute paths as `<path>` in error responses, and the client knows its dir anyway."""
    message = str(exc).replace(f"{Path(lora_dir).absolute()}{os.sep}", "").replace(f"{lora_dir}{os.sep}", "")
    return AdapterError(f"{ERROR_MARK} adapter '{lora_name}': {message}")


# ------------------------------------------------------------------ front end


_verdicts: dict[tuple, str | None] = {}  # (dir version, base dir) -> None (valid) or the error message


@functools.lru_cache(maxsize=4)
def _base_checkpoint(model_dir: str):
    from sora_serve.checkpoint import Checkpoint

    return Checkpoint(model_dir)


def check_against_checkpoint(adapter: AdapterFile, model_dir: str) -> None:
    """Modules, shapes and the base fingerprint against the base's files (headers, and the sampled
    entries of W0); the update's size relative to ||W0|| is checked in the worker, where row norms
    are recorded."""
    from sora_serve.checkpoint import check_adapter_against

    checkpoint = _base_checkpoint(model_dir)
    check_adapter_against(adapter, checkpoint, norms=False)
    head = checkpoint.meta_model.get_output_embeddings()
    head_path = next((name for name, module in checkpoint.meta_model.named_modules() if module is head), None)
    if head_path in adapter.tensors:  # refused in the worker too; here it never reaches the engine
        raise AdapterError(
            f"module '{head_path}': vLLM does not apply LoRA to the output head",
            file=adapter.weights_file,
            field=f"{PEFT_PREFIX}{head_path}",
        )


def local_model_dir(model: str | None) -> str | None:
    """The engine's model when it is a local directory (a hub name has no files here to check)."""
    return model if model and os.path.isdir(model) else None


def validate_request_adapter(lora_request, model_dir: str | None = None) -> None:
    """Raise AdapterError (a ValueError) for a request whose adapter dir is invalid, or does not
    fit the base checkpoint in `model_dir` (a local dir; hub names are checked in the worker)."""
    model_dir = local_model_dir(model_dir)
    key = (registry.version_key(lora_request.lora_path), model_dir)
    if key not in _verdicts:
        try:
            adapter = registry.adapter(lora_request.lora_path)
            if model_dir is not None:
                check_against_checkpoint(adapter, model_dir)
            _verdicts[key] = None
        except AdapterError as exc:
            _verdicts[key] = str(adapter_error(lora_request.lora_name, lora_request.lora_path, exc))
        if len(_verdicts) > 4096:  # bounded: the oldest verdicts go first
            del _verdicts[next(iter(_verdicts))]
    if _verdicts[key] is not None:
        raise AdapterError(_verdicts[key])


def patch_front_end() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    stock = InputProcessor._validate_lora

    @functools.wraps(stock)
    def _validate_lora(self, lora_request) -> None:
        stock(self, lora_request)
        if lora_request is not None:
            validate_request_adapter(lora_request, self.model_config.model)

    InputProcessor._validate_lora = _validate_lora


# ------------------------------------------------------------------ worker


def worker_manager_class() -> type:
    """`SoraWorkerLoRAManager`: vLLM's LRU worker LoRA manager with our loader."""
    from vllm.exceptions import LoRAAdapterNotFoundError
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.utils import get_adapter_absolute_path
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    class SoraWorkerLoRAManager(LRUCacheWorkerLoRAManager):
        """Loads every adapter kind from sora-serve's registry into vLLM's `LoRAModel`."""

        def create_lora_manager(self, model, vllm_config):
            self.sora_model_dir = local_model_dir(vllm_config.model_config.model)
            if self.lora_config.fully_sharded_loras:
                raise NotImplementedError(
                    "sora-serve's vLLM plugin does not cover fully_sharded_loras=True (S-LoRA's sharded layers); "
                    "start the engine without --fully-sharded-loras"
                )
            model = super().create_lora_manager(model, vllm_config)
            heads.adopt(self._adapter_manager.modules.values())
            return model

        def set_active_adapters(self, requests, mapping) -> None:
            super().set_active_adapters(requests, mapping)
            grouped.new_step()  # vLLM has just rewritten the token -> slot indices

        def _load_adapter(self, lora_request) -> LoRAModel:
            lora_dir = get_adapter_absolute_path(lora_request.lora_path)
            if not os.path.isdir(lora_dir):
                raise LoRAAdapterNotFoundError(lora_request.lora_name, lora_request.lora_path)
            manager = self._adapter_manager
            try:
                adapter = registry.adapter(lora_dir)
                paths = vllm_module_paths(adapter, getattr(manager.model, "hf_to_vllm_mapper", None))
                check_targets(adapter, expected_modules(manager))
                if self.sora_model_dir is not None:
                    check_against_checkpoint(adapter, self.sora_model_dir)
                check_base_layers(adapter, paths, manager.modules, manager.packed_modules_mapping)
                check_servable(adapter, paths, manager.modules, manager.packed_modules_mapping)
                loras = slot_weights(adapter, paths, manager.modules, manager.packed_modules_mapping)
            except (AdapterError, ValueError) as exc:
                raise adapter_error(lora_request.lora_name, lora_dir, exc) from exc
            finally:
                registry.forget(lora_dir)  # the LoRAModel holds the factors; vLLM caches it
            rank = max(lora.rank for lora in loras.values())
            return LoRAModel(lora_request.lora_int_id, rank, loras)

    return SoraWorkerLoRAManager


def install_worker_manager() -> None:
    """vLLM's model runner builds its worker LoRA manager from this module-level name."""
    from vllm.v1.worker import lora_model_runner_mixin

    lora_model_runner_mixin.LRUCacheWorkerLoRAManager = worker_manager_class()


def expected_modules(manager) -> set[str]:
    """The HF module names vLLM can adapt in this model (packed layers by their parts), as vLLM's loader
    computes them."""
    names: set[str] = set()
    for module in manager.supported_lora_modules:
        names.update(manager.packed_modules_mapping.get(module, [module]))
    return names


def vllm_module_paths(adapter: AdapterFile, hf_to_vllm_mapper) -> dict[str, str]:
    """vLLM module name -> the file's module path, through the model's rename mapper (Qwen2-VL...)."""
    from vllm.lora.utils import parse_fine_tuned_lora_name

    mapper = None if hf_to_vllm_mapper is None else hf_to_vllm_mapper.get_rename_mapper()
    return {parse_fine_tuned_lora_name(f"{PEFT_PREFIX}{p}.lora_A.weight", mapper)[0]: p for p in adapter.tensors}


def check_targets(adapter: AdapterFile, expected_lora_modules: set[str]) -> None:
    """Every adapted module must be one vLLM can adapt in this model (lm_head and embeddings are not)."""
    for path in adapter.tensors:
        if path.rsplit(".", 1)[-1] not in expected_lora_modules:
            raise AdapterError(
                f"module '{path}': vLLM cannot adapt it in this model (adaptable: "
                f"{', '.join(sorted(expected_lora_modules))})",
                file=adapter.weights_file,
                field=f"{PEFT_PREFIX}{path}",
            )


def check_base_layers(
    adapter: AdapterFile, paths: dict[str, str], modules: dict, packed_modules_mapping: dict[str, list[str]]
) -> None:
    """`check_against_base` with this engine's layers: whole (unsharded) shapes, bias, ||W0||_F."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    from sora_serve.fingerprint import BaseLayer
    from sora_serve.validation import check_against_base

    layers = {}
    for module_name, layer in modules.items():
        if not isinstance(layer, BaseLinearLayerWithLoRA):
            continue
        base = layer.base_layer
        sizes = list(getattr(base, "output_sizes", None) or [base.output_size])
        for i, name in enumerate(slice_paths(module_name, packed_modules_mapping)):
            if name in paths:
                out_features = (
                    sizes[i] if len(sizes) == len(layer.output_slices) else layer.output_slices[i] * layer.tp_size
                )
                layers[paths[name]] = BaseLayer(
                    out_features, base.input_size, base.bias is not None, _weight_norm(layer, i)
                )
    check_against_base(adapter, layers)


def _weight_norm(layer, i: int) -> float | None:
    """||W0||_F of slice i when this rank holds whole rows of it (None under column sharding)."""
    if parallel_kind(layer) == "column":
        return None
    try:
        lo, hi = slice_offsets(layer)[i : i + 2]
        return float(row_sq_norms(layer)[lo:hi].sum().sqrt())
    except RuntimeError:
        return None
