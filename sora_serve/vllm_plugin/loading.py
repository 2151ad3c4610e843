"""Every adapter vLLM loads goes through sora-serve's one validator, ours and PEFT's alike.

- Front end (`InputProcessor._validate_lora`, in the API server or the `vllm.LLM` process):
  before a request is admitted, its adapter dir is checked by `sora_serve.read_adapter` (finite
  tensors, config rank = tensor rank, known peft_type, typed config fields, bounded update) and
  against the base checkpoint's safetensors headers (modules, shapes, fingerprint); the verdict
  is cached by the files' size and mtime, so a dir is read once, not per request.
  A bad adapter is a ValueError there: HTTP 400, or an exception from `LLM.generate`, and the
  engine never sees it.
- Worker (`LoRAModel.from_local_checkpoint`, `_validate_modules_to_save`): the same validator,
  then the adapter against this engine's base layers (`check_against_base`: modules, shapes,
  `base_fingerprint`, update size relative to ||W0||), then the servability of every module and,
  for our kinds and DoRA, the slot factors (`activation.precompute_factors`). Plain LoRA dirs then
  take vLLM's own loader.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from sora_serve.errors import AdapterError
from sora_serve.io import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE, AdapterFile, read_adapter

from .activation import check_servable, precompute_factors, row_sq_norms, slice_offsets, slice_paths
from .slots import parallel_kind

ERROR_MARK = "sora-serve:"  # lets the API server tell an adapter's fault (HTTP 400) from an engine fault


def needs_plugin(adapter: AdapterFile) -> bool:
    """Adapters stock vLLM cannot serve but we can: ours (PREDIAG/SORA) and PEFT DoRA."""
    return adapter.method != "lora"


def adapter_error(lora_name: str, lora_dir: str | Path, exc: Exception) -> AdapterError:
    """The validator's message with file paths relative to the adapter dir: vLLM's API server
    masks absolute paths as `<path>` in error responses, and the client knows its dir anyway."""
    message = str(exc).replace(f"{Path(lora_dir).absolute()}{os.sep}", "").replace(f"{lora_dir}{os.sep}", "")
    return AdapterError(f"{ERROR_MARK} adapter '{lora_name}': {message}")


# ------------------------------------------------------------------ front end


_verdicts: dict[tuple, str | None] = {}  # (dir, sizes, mtimes) -> None (valid) or the error message


def _files_key(lora_dir: str) -> tuple:
    stats = []
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            st = os.stat(os.path.join(lora_dir, name))
            stats.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append(None)
    return (os.path.abspath(lora_dir), *stats)


@functools.lru_cache(maxsize=4)
def _base_checkpoint(model_dir: str):
    from sora_serve.converters.checkpoint import Checkpoint

    return Checkpoint(model_dir)


def check_against_checkpoint(adapter: AdapterFile, model_dir: str) -> None:
    """Modules, shapes and fingerprint against the base's safetensors headers (no weights read);
    the update's size relative to ||W0|| is checked in the worker, where row norms are recorded."""
    from sora_serve.converters.checkpoint import checkpoint_layers
    from sora_serve.io import check_against_base

    checkpoint = _base_checkpoint(model_dir)
    layers = checkpoint_layers(checkpoint, adapter.tensors, norms=False)
    check_against_base(adapter, layers, model_type=checkpoint.config_dict.get("model_type"))
    head = checkpoint.meta_model.get_output_embeddings()
    head_path = next((name for name, module in checkpoint.meta_model.named_modules() if module is head), None)
    if head_path in adapter.tensors:  # refused in the worker too; here it never reaches the engine
        raise AdapterError(f"module '{head_path}': vLLM does not apply LoRA to the output head", file=adapter.weights_file, field=f"{PEFT_PREFIX}{head_path}")


def validate_request_adapter(lora_request, model_dir: str | None = None) -> None:
    """Raise AdapterError (a ValueError) for a request whose adapter dir is invalid, or does not
    fit the base checkpoint in `model_dir` (a local dir; hub names are checked in the worker)."""
    model_dir = model_dir if model_dir and os.path.isdir(model_dir) else None
    key = (*_files_key(lora_request.lora_path), model_dir)
    if key not in _verdicts:
        try:
            adapter = read_adapter(lora_request.lora_path)
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


_validated: dict[str, AdapterFile] = {}  # lora_dir -> adapter read by `_load_adapter`, taken by the loader


def patch_worker_loading() -> None:
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import get_adapter_absolute_path, get_lora_id, parse_fine_tuned_lora_name
    from vllm.lora.worker_manager import WorkerLoRAManager

    stock_load_adapter = WorkerLoRAManager._load_adapter
    stock_load = LoRAModel.from_local_checkpoint.__func__
    stock_legal = PEFTHelper.validate_legal
    stock_validate = LoRAModelManager._validate_modules_to_save

    @functools.wraps(stock_legal)
    def validate_legal(self, lora_config):
        use_dora, self.use_dora = self.use_dora, False  # DoRA is served by this plugin
        try:
            stock_legal(self, lora_config)
        finally:
            self.use_dora = use_dora

    @functools.wraps(stock_load_adapter)
    def _load_adapter(self, lora_request):
        """Our validator first: vLLM's own config parsing (PEFTHelper) would otherwise meet a bad
        file before it, with a Python error (e.g. TypeError for `r: "16"`) instead of ours."""
        lora_dir = get_adapter_absolute_path(lora_request.lora_path)
        if os.path.isdir(lora_dir):  # a missing dir stays vLLM's "not found" (HTTP 404)
            try:
                _validated[lora_dir] = read_adapter(lora_dir)
            except AdapterError as exc:
                raise adapter_error(lora_request.lora_name, lora_dir, exc) from exc
        try:
            return stock_load_adapter(self, lora_request)
        finally:
            _validated.pop(lora_dir, None)

    @functools.wraps(stock_load)
    def from_local_checkpoint(cls, lora_dir, expected_lora_modules, peft_helper, **kwargs):
        try:
            adapter = _validated.pop(lora_dir, None) or read_adapter(lora_dir)
            check_targets(adapter, expected_lora_modules)
        except AdapterError as exc:
            raise adapter_error(Path(lora_dir).name, lora_dir, exc) from exc
        mapper = kwargs.get("weights_mapper")
        paths = {parse_fine_tuned_lora_name(f"{PEFT_PREFIX}{p}.lora_A.weight", mapper)[0]: p for p in adapter.tensors}
        if not needs_plugin(adapter):
            model = stock_load(cls, lora_dir, expected_lora_modules, peft_helper, **kwargs)
            model.sora_checks = (adapter, paths)  # for the base check; dropped right after it
            return model
        tensors = {}
        for path, t in adapter.tensors.items():
            # Copies: vLLM scales lora_b in place (LoRALayerWeights.optimize); our factors need the originals.
            tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = t["lora_A"].clone()
            tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = t["lora_B"].clone()
        model = cls.from_lora_tensors(
            lora_model_id=kwargs.get("lora_model_id") or get_lora_id(),
            tensors=tensors,
            peft_helper=peft_helper,
            device=kwargs.get("device", "cpu"),
            dtype=kwargs.get("dtype"),
            model_vocab_size=kwargs.get("model_vocab_size"),
            weights_mapper=mapper,
            skip_prefixes=kwargs.get("skip_prefixes"),
        )
        model.sora_adapter, model.sora_paths = adapter, paths
        model.sora_checks = (adapter, paths)
        return model

    @functools.wraps(stock_validate)
    def validate_at_load(self, lora_model) -> None:
        """Runs inside vLLM's adapter loading, before any slot is touched: errors are load errors."""
        stock_validate(self, lora_model)
        checks = lora_model.__dict__.pop("sora_checks", None)
        if checks is None:  # not read from a directory by us (vLLM's own dummy adapters)
            return
        adapter, paths = checks
        try:
            check_base_layers(adapter, paths, self.modules, self.packed_modules_mapping)
            if hasattr(lora_model, "sora_adapter"):
                check_servable(lora_model, self.modules, self.packed_modules_mapping)
                precompute_factors(lora_model, self.modules, self.packed_modules_mapping)
                adapter.tensors.clear()  # the factors are what slots need; keep one copy per adapter
        except (AdapterError, ValueError) as exc:
            raise adapter_error(adapter.directory.name, adapter.directory, exc) from exc

    WorkerLoRAManager._load_adapter = _load_adapter
    PEFTHelper.validate_legal = validate_legal
    LoRAModel.from_local_checkpoint = classmethod(from_local_checkpoint)
    LoRAModelManager._validate_modules_to_save = validate_at_load


def check_targets(adapter: AdapterFile, expected_lora_modules: set[str]) -> None:
    """Every adapted module must be one vLLM can adapt in this model (lm_head and embeddings are not)."""
    for path in adapter.tensors:
        if path.rsplit(".", 1)[-1] not in expected_lora_modules:
            raise AdapterError(
                f"module '{path}': vLLM cannot adapt it in this model (adaptable: {', '.join(sorted(expected_lora_modules))})",
                file=adapter.weights_file, field=f"{PEFT_PREFIX}{path}",
            )


def check_base_layers(adapter: AdapterFile, paths: dict[str, str], modules: dict, packed_modules_mapping: dict[str, list[str]]) -> None:
    """`check_against_base` with this engine's layers: whole (unsharded) shapes, bias, ||W0||_F."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    from sora_serve.io import BaseLayer, check_against_base

    layers = {}
    for module_name, layer in modules.items():
        if not isinstance(layer, BaseLinearLayerWithLoRA):
            continue
        base = layer.base_layer
        sizes = list(getattr(base, "output_sizes", None) or [base.output_size])
        for i, name in enumerate(slice_paths(module_name, packed_modules_mapping)):
            if name in paths:
                out_features = sizes[i] if len(sizes) == len(layer.output_slices) else layer.output_slices[i] * layer.tp_size
                layers[paths[name]] = BaseLayer(out_features, base.input_size, base.bias is not None, _weight_norm(layer, i))
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
