"""Every vLLM symbol the plugin touches: what, why, with what signature; checked at start.

`register()` calls `check_installed()` in every vLLM process: a symbol that moved, vanished or
changed its parameters stops the plugin with a message naming it, instead of a version pin or a
failure deep inside a request. The same table can be checked without importing (or being able
to run) another vLLM, from its wheel or source tree:

    python -m sora_serve.vllm_plugin.compat vllm-0.34.0-cp38-abi3-manylinux_2_28_x86_64.whl
    python -m sora_serve.vllm_plugin.compat path/to/vllm/checkout      # exit 0: compatible, 1: what differs

How each symbol is used: `subclassed` (a seam: vLLM's class, extended by our subclass),
`overridden` (a method our subclass overrides or calls through super()), `called` (a public
function or method we call), `wrapped` (a vLLM method replaced by one that calls the stock one),
`replaced` (a vLLM name rebound to ours). Only `wrapped` and `replaced` are patches.
"""

from __future__ import annotations

import argparse
import ast
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Symbol:
    target: str  # "module:qualname"
    use: str
    why: str
    params: tuple[str, ...] | None = None  # leading parameter names of a callable, in order
    mentions: tuple[str, ...] = ()  # names the module's source must still mention (attributes read at run time)
    alternatives: tuple[str, ...] = ()  # targets that serve the same purpose in other vLLMs (the plugin handles each)

    @property
    def module(self) -> str:
        return self.target.split(":")[0]

    @property
    def qualname(self) -> str:
        return self.target.split(":")[1]


LAYER_PARENTS = (
    "ColumnParallelLinearWithLoRA",
    "MergedColumnParallelLinearWithLoRA",
    "MergedColumnParallelLinearVariableSliceWithLoRA",
    "QKVParallelLinearWithLoRA",
    "MergedQKVParallelLinearWithLoRA",
    "RowParallelLinearWithLoRA",
    "ReplicatedLinearWithLoRA",
)
LAYER_METHODS = {
    "create_lora_weights": ("self", "max_loras", "lora_config", "model_config"),
    "set_lora": ("self", "index", "lora_a", "lora_b"),
    "reset_lora": ("self", "index"),
    "apply": ("self", "x", "bias"),
    "can_replace_layer": ("cls", "source_layer", "lora_config", "packed_modules_list"),
}
PUNICA = "vllm.lora.punica_wrapper.punica_base:PunicaWrapperBase"
SLOT_TRACKING = (  # heads.py's classes note which slots hold a non-zero B
    ("set_lora", ("self", "index", "lora_a", "lora_b"), "notes the slots holding a non-zero B"),
    ("reset_lora", ("self", "index"), "same"),
)


def overrides(cls: str, *methods: tuple[str, tuple[str, ...], str]) -> tuple[Symbol, ...]:
    """`cls`'s methods our subclass overrides: (name, leading parameters, why) each."""
    return tuple(Symbol(f"{cls}.{name}", "overridden", why, params) for name, params, why in methods)


SYMBOLS: tuple[Symbol, ...] = (
    # layers.py: plugin-owned layer classes
    Symbol(
        "vllm.lora.utils:_all_lora_classes",
        "replaced",
        "vLLM's layer table: each plugin class is inserted before the class it extends",
    ),
    Symbol(
        "vllm.lora.utils:from_layer",
        "called",
        "vLLM wraps layers with the first class of the table whose can_replace_layer accepts them",
        ("layer", "max_loras", "lora_config", "packed_modules_list"),
        mentions=("_all_lora_classes", "can_replace_layer", "create_lora_weights"),
    ),
    *(
        Symbol(f"vllm.lora.layers:{parent}", "subclassed", "a plugin layer class extends it")
        for parent in LAYER_PARENTS
    ),
    *(
        Symbol(
            f"vllm.lora.layers.base_linear:BaseLinearLayerWithLoRA.{name}",
            "overridden",
            "the plugin layers' slot buffers and op",
            params,
        )
        for name, params in LAYER_METHODS.items()
        if name != "can_replace_layer"
    ),
    Symbol(
        "vllm.lora.layers.base_linear:BaseLinearLayerWithLoRA._get_quant_method",
        "called",
        "the base layer's GEMM (the op's base output; DoRA's W0 Aᵀ)",
        ("self",),
    ),
    Symbol(
        "vllm.lora.layers.column_parallel_linear:ColumnParallelLinearWithLoRA.can_replace_layer",
        "overridden",
        "plugin classes accept exactly the layers their parent accepts",
        LAYER_METHODS["can_replace_layer"],
    ),
    Symbol(
        "vllm.lora.layers.column_parallel_linear:ColumnParallelLinearWithLoRA.slice_lora_b",
        "called",
        "tensor-parallel shard of the factors' output rows",
        ("self", "lora_b"),
    ),
    Symbol(
        "vllm.lora.layers.row_parallel_linear:RowParallelLinearWithLoRA.slice_lora_a",
        "called",
        "tensor-parallel shard of A's input columns",
        ("self", "lora_a"),
    ),
    # heads.py: embedding and logits LoRA layers, the base path while no slot holds weights
    Symbol(
        "vllm.lora.layers:VocabParallelEmbeddingWithLoRA",
        "subclassed",
        "the plugin's embedding class, inserted before it in the layer table",
    ),
    *overrides(
        "vllm.lora.layers.vocab_parallel_embedding:VocabParallelEmbeddingWithLoRA",
        ("forward", ("self", "x"), "the base embedding alone while no slot holds weights"),
        *SLOT_TRACKING,
    ),
    Symbol(
        "vllm.lora.layers:LogitsProcessorWithLoRA",
        "subclassed",
        "vLLM builds it outside the layer table; `heads.adopt` gives the LoRA manager's object the plugin's subclass",
        mentions=("sharded_to_full_mapping_gpu",),
    ),
    *overrides(
        "vllm.lora.layers.logits_processor:LogitsProcessorWithLoRA",
        (
            "_get_logits",
            ("self", "hidden_states", "lm_head", "embedding_bias", "skip_gather"),
            "the base logits alone while no slot holds weights",
        ),
        *SLOT_TRACKING,
    ),
    Symbol(
        "vllm.model_executor.layers.logits_processor:LogitsProcessor._get_logits",
        "called",
        "the base logits, as the LoRA-disabled engine computes them",
        ("self", "hidden_states", "lm_head", "embedding_bias", "skip_gather"),
        mentions=("org_vocab_size",),
    ),
    # backends/: the punica wrapper API
    Symbol(
        f"{PUNICA}.add_lora_linear",
        "called",
        "punica backend: the input LoRA",
        ("self", "y", "x", "lora_a_stacked", "lora_b_stacked", "scale", "output_slices"),
    ),
    Symbol(
        f"{PUNICA}.add_shrink",
        "called",
        "punica backend: the rotation's z U",
        ("self", "y", "x", "lora_a_stacked", "scale"),
    ),
    Symbol(
        f"{PUNICA}.add_expand",
        "called",
        "punica backend: the rotation's (z U) Vᵀ",
        ("self", "y", "x", "lora_b_stacked", "output_slices", "offset_start", "add_inputs"),
    ),
    Symbol(
        f"{PUNICA}.token_lora_indices",
        "called",
        "each token's slot (-1: none); grouped backend's plan, punica backend's gathers",
    ),
    Symbol(
        "vllm.distributed:tensor_model_parallel_all_reduce",
        "called",
        "column-parallel rotation: (z U) summed over ranks",
        ("input_",),
    ),
    Symbol(
        "vllm.distributed:tensor_model_parallel_all_gather",
        "called",
        "row-parallel DoRA: float64 sums of ||W0||² and W0 Aᵀ",
        ("input_", "dim"),
    ),
    # backends/prepacked.py
    Symbol(
        "vllm._custom_ops:create_onednn_mm",
        "called",
        "the grouped backend prepacks each slot's thin factors the way vLLM CPU prepacks its linear weights",
        ("weight", "primitive_cache_size"),
        mentions=("_supports_onednn",),
        alternatives=("vllm._cpu_ops:create_onednn_mm",),  # vLLM 0.34 moved the CPU ops there
    ),
    Symbol(
        "vllm._custom_ops:onednn_mm",
        "called",
        "decode-sized GEMMs against a slot's prepacked factor",
        ("dnnl_handler", "x", "bias"),
        alternatives=("vllm._cpu_ops:onednn_mm",),
    ),
    # cpu_ops.py
    *(
        Symbol(
            f"vllm.lora.ops.torch_ops.lora_ops:{op}",
            "replaced",
            "vLLM CPU's torch op wraps slot -1 to the last slot (base requests got an adapter)",
            params,
        )
        for op, params in (
            ("bgmv_shrink", ("inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "scaling")),
            ("bgmv_expand", ("inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "add_inputs")),
            (
                "bgmv_expand_slice",
                (
                    "inputs",
                    "lora_b_weights",
                    "output_tensor",
                    "lora_indices_tensor",
                    "slice_offset",
                    "slice_size",
                    "add_inputs",
                ),
            ),
        )
    ),
    Symbol(
        "vllm.lora.punica_wrapper.punica_cpu:PunicaWrapperCPU",
        "replaced",
        "its module binds the same three ops by name (replaced there too)",
        mentions=("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"),
    ),
    # loading.py: one validator, one read
    Symbol(
        "vllm.lora.worker_manager:LRUCacheWorkerLoRAManager",
        "subclassed",
        "the worker's loader: adapters from our registry into vLLM's LoRAModel",
    ),
    Symbol(
        "vllm.lora.worker_manager:WorkerLoRAManager._load_adapter",
        "overridden",
        "loads every kind from our parsed files (vLLM's loader never re-reads them)",
        ("self", "lora_request"),
    ),
    Symbol(
        "vllm.lora.worker_manager:WorkerLoRAManager.set_active_adapters",
        "overridden",
        "marks a new step for the grouped backend's plan",
        ("self", "requests", "mapping"),
    ),
    Symbol(
        "vllm.lora.worker_manager:WorkerLoRAManager.create_lora_manager",
        "overridden",
        "refuses fully_sharded_loras, which our layers do not cover; records the model dir for the fingerprint check; "
        "gives the logits LoRA layer the plugin's class (heads.adopt) from the manager it built",
        ("self", "model", "vllm_config"),
        mentions=("_adapter_manager",),
    ),
    Symbol(
        "vllm.v1.worker.lora_model_runner_mixin:LRUCacheWorkerLoRAManager",
        "replaced",
        "the model runner builds its worker LoRA manager from this module-level name",
    ),
    Symbol(
        "vllm.lora.lora_model:LoRAModel.__init__",
        "called",
        "the adapter's CPU cache entry, built from our factors",
        ("self", "lora_model_id", "rank", "loras"),
    ),
    Symbol(
        "vllm.lora.lora_weights:PackedLoRALayerWeights.__init__",
        "called",
        "one layer's factors in vLLM's cache",
        ("self", "module_name", "rank", "lora_alphas", "lora_a", "lora_b", "scaling"),
    ),
    Symbol(
        "vllm.lora.lora_weights:LoRALayerWeights.__init__",
        "called",
        "plain LoRA on a layer vLLM kept its own class for",
        ("self", "module_name", "rank", "lora_alpha", "lora_a", "lora_b", "scaling"),
    ),
    Symbol(
        "vllm.lora.utils:parse_fine_tuned_lora_name",
        "called",
        "vLLM's module name of a file's tensor (weights mapper included)",
        ("name", "weights_mapper"),
    ),
    Symbol("vllm.lora.utils:get_adapter_absolute_path", "called", "the adapter dir vLLM would read", ("lora_path",)),
    Symbol("vllm.exceptions:LoRAAdapterNotFoundError", "called", "a missing dir stays vLLM's 404"),
    Symbol(
        "vllm.lora.model_manager:LoRAModelManager",
        "called",
        "read: modules, packed_modules_mapping, supported_lora_modules, lora_index_to_id",
        mentions=(
            "modules",
            "packed_modules_mapping",
            "supported_lora_modules",
            "lora_index_to_id",
            "set_lora",
            "reset_lora",
        ),
    ),
    Symbol(
        "vllm.v1.engine.input_processor:InputProcessor._validate_lora",
        "wrapped",
        "front end: a bad adapter is refused before admission (HTTP 400)",
        ("self", "lora_request"),
    ),
    Symbol(
        "vllm.model_executor.layers.linear:UnquantizedLinearMethod.process_weights_after_loading",
        "wrapped",
        "DoRA: ||W0||² per row recorded before vLLM CPU repacks the weight and drops it",
        ("self", "layer"),
    ),
    # isolation.py
    Symbol(
        "vllm.v1.worker.gpu_worker:Worker.sample_tokens",
        "wrapped",
        "reads the step's non-finite flags once, where vLLM has synchronized",
        ("self", "grammar_output"),
    ),
    Symbol(
        "vllm.v1.worker.gpu_worker:Worker.execute_model",
        "wrapped",
        "same, for steps whose output it returns",
        ("self", "scheduler_output"),
    ),
    Symbol(
        "vllm.v1.outputs:ModelRunnerOutput",
        "called",
        "num_nans_in_logits carries failed requests to the scheduler",
        mentions=("num_nans_in_logits",),
    ),
    Symbol("vllm.v1.outputs:ModelRunnerOutput.req_ids", "called", "the step's requests, to mark a failed adapter's"),
    Symbol(
        "vllm.v1.worker.gpu_input_batch:InputBatch",
        "called",
        "request -> adapter id (vLLM <= 0.33's runner)",
        mentions=("req_ids", "request_lora_mapping"),
        alternatives=("vllm.v1.worker.gpu.lora_utils:LoraState",),
    ),
    Symbol(
        "vllm.v1.core.sched.scheduler:Scheduler.update_from_output",
        "wrapped",
        "finishes a failed adapter's requests with FINISHED_ERROR",
        ("self", "scheduler_output", "model_runner_output"),
        mentions=("encoder_cache_mismatch_reqs",),
    ),
    # versions.py
    Symbol(
        "vllm.lora.request:LoRARequest",
        "replaced",
        "__eq__/__hash__ by (name, id): two live versions of one name keep their own slots",
        mentions=("lora_name", "lora_int_id"),
    ),
    Symbol(
        "vllm.v1.core.kv_cache_utils:_gen_lora_extra_hash_keys",
        "replaced",
        "the prefix-cache key includes the adapter's id",
        ("request",),
    ),
    # api_server.py, resolver.py
    Symbol(
        "vllm.entrypoints.openai.models.serving:OpenAIServingModels.load_lora_adapter",
        "wrapped",
        "a refused load is HTTP 400 naming file and field",
        ("self", "request", "base_model_name"),
    ),
    Symbol(
        "vllm.entrypoints.openai.models.serving:OpenAIServingModels.unload_lora_adapter",
        "wrapped",
        "unload also frees the engine's copy",
        ("self", "request"),
    ),
    Symbol(
        "vllm.entrypoints.openai.models.serving:OpenAIServingModels.resolve_lora",
        "replaced",
        "the engine's refusal reaches the client (stock: a bare 'could not be loaded')",
        ("self", "lora_name"),
    ),
    Symbol(
        "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackend.get_supported_head_sizes",
        "called",
        "serve: a head size vLLM CPU cannot run is refused before the engine starts",
        ("cls",),
    ),
    Symbol("vllm.lora.resolver:LoRAResolverRegistry", "called", "the adapter store is a registered resolver"),
    # launch.py: `sora-serve serve`'s server process
    Symbol(
        "vllm.entrypoints.launchers.api_server.entry:main",
        "called",
        "vLLM's OpenAI server, run by `sora-serve serve`",
        (),
    ),
    Symbol(
        "vllm.entrypoints.launchers.launcher:terminate_if_errored",
        "wrapped",
        "remembers that the engine died: the server then exits non-zero",
        ("server", "engine"),
    ),
    Symbol(
        "vllm.entrypoints.serve.exception_handling.handlers.vllm_error:terminate_if_errored",
        "replaced",
        "the engine-error handler binds terminate_if_errored by name (rebound there too)",
        ("server", "engine"),
    ),
    Symbol(
        "vllm.lora.resolver:LoRAResolver.resolve_lora",
        "overridden",
        "the adapter store",
        ("self", "base_model_name", "lora_name"),
    ),
)


@dataclass(frozen=True)
class Found:
    params: tuple[tuple[str, bool], ...] | None  # (name, has default) of a callable; None otherwise
    source: str  # the module's source text


# ------------------------------------------------------------------ comparing


def problems(symbol: Symbol, found: Found | None) -> list[str]:
    """What differs between `symbol` and what a vLLM has (empty: compatible)."""
    if found is None:
        return [f"{symbol.target} is missing"]
    issues = [f"{symbol.target}: the module no longer mentions '{m}'" for m in symbol.mentions if m not in found.source]
    if symbol.params is not None:
        if found.params is None:
            return [*issues, f"{symbol.target} is no longer a function"]
        names = tuple(name for name, _ in found.params)
        extra_required = [name for name, has_default in found.params[len(symbol.params) :] if not has_default]
        if names[: len(symbol.params)] != symbol.params or extra_required:
            issues.append(
                f"{symbol.target}: parameters changed from ({', '.join(symbol.params)}) to ({', '.join(names)})"
            )
    return issues


# ------------------------------------------------------------------ the installed vLLM


def check_installed() -> None:
    """Raise naming every symbol the installed vLLM lacks or changed (called by `register()`).

    Read from the installed sources, not imported: importing every module named here would slow
    each vLLM process's start, and decorated methods hide their signatures at run time."""
    import vllm

    issues = [issue for _symbol, found in report(Path(vllm.__file__).parent.parent) for issue in found]
    if issues:
        raise RuntimeError(
            f"sora-serve's vLLM plugin cannot serve vLLM {vllm.__version__}: "
            + "; ".join(issues)
            + " (the plugin's vLLM symbols and their reasons: sora_serve/vllm_plugin/compat.py; docs/VLLM.md "
            "lists the tested versions)"
        )


# ------------------------------------------------------------------ another vLLM's sources, not imported


class SourceTree:
    """vLLM's Python sources from a wheel (.whl) or a directory holding `vllm/`."""

    def __init__(self, location: str | Path):
        location = Path(location)
        if location.is_file():
            self._archive: zipfile.ZipFile | None = zipfile.ZipFile(location)
            self._names = set(self._archive.namelist())
        elif (location / "vllm").is_dir():
            self._archive, self._root = None, location
        else:
            raise FileNotFoundError(f"{location}: neither a wheel nor a directory containing vllm/")
        self._parsed: dict[str, tuple[str, ast.Module] | None] = {}

    def _exists(self, name: str) -> bool:
        return name in self._names if self._archive is not None else (self._root / name).is_file()

    def _read(self, name: str) -> str:
        return self._archive.read(name).decode() if self._archive is not None else (self._root / name).read_text()

    def module(self, dotted: str) -> tuple[str, ast.Module] | None:
        if dotted not in self._parsed:
            base = dotted.replace(".", "/")
            name = next((n for n in (f"{base}.py", f"{base}/__init__.py") if self._exists(n)), None)
            if name is None:
                self._parsed[dotted] = None
            else:
                text = self._read(name)
                self._parsed[dotted] = (text, ast.parse(text))
        return self._parsed[dotted]

    def find(self, dotted: str, qualname: str, depth: int = 0) -> Found | None:
        parsed = self.module(dotted)
        if parsed is None or depth > 5:
            return None
        source, tree = parsed
        head, *rest = qualname.split(".")
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and any((alias.asname or alias.name) == head for alias in node.names):
                alias = next(a for a in node.names if (a.asname or a.name) == head)
                origin = _absolute(dotted, node, parsed_is_package=self._is_package(dotted))
                return self.find(origin, ".".join([alias.name, *rest]), depth + 1)
            if _defines(node, head):
                return self._member(source, node, rest, dotted, depth)
        for node in tree.body:  # `from .x import *`
            if isinstance(node, ast.ImportFrom) and any(alias.name == "*" for alias in node.names):
                found = self.find(
                    _absolute(dotted, node, parsed_is_package=self._is_package(dotted)), qualname, depth + 1
                )
                if found is not None:
                    return found
        return None

    def _member(self, source: str, node: ast.AST, rest: list[str], dotted: str, depth: int) -> Found | None:
        for k, part in enumerate(rest):
            if not isinstance(node, ast.ClassDef):
                return None
            member = next((n for n in node.body if _defines(n, part)), None)
            if member is None:  # inherited: look in the bases named in this module or imported into it
                return next((f for base in node.bases if (f := self._inherited(dotted, base, rest[k:], depth))), None)
            node = member
        params = _params(node) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) else None
        return Found(params, source)

    def _inherited(self, dotted: str, base: ast.expr, rest: list[str], depth: int) -> Found | None:
        name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
        return None if name is None else self.find(dotted, ".".join([name, *rest]), depth + 1)

    def _is_package(self, dotted: str) -> bool:
        return self._exists(f"{dotted.replace('.', '/')}/__init__.py")


def _absolute(dotted: str, node: ast.ImportFrom, parsed_is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = dotted.split(".")
    anchor = parts if parsed_is_package else parts[:-1]
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join([*anchor, node.module] if node.module else anchor)


def _defines(node: ast.AST, name: str) -> bool:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return node.name == name
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
    if isinstance(node, ast.AnnAssign):
        return isinstance(node.target, ast.Name) and node.target.id == name
    return False


def _params(node: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[tuple[str, bool], ...]:
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    n_plain = len(positional) - len(args.defaults)
    listed = [(a.arg, i >= n_plain) for i, a in enumerate(positional)]
    listed += [(a.arg, d is not None) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    return tuple(listed)


def report(location: str | Path) -> list[tuple[Symbol, list[str]]]:
    tree = SourceTree(location)
    return [(symbol, _problems_of_any(tree, symbol)) for symbol in SYMBOLS]


def _problems_of_any(tree: SourceTree, symbol: Symbol) -> list[str]:
    """The symbol's problems, or none when one of its alternatives is there."""
    issues = problems(symbol, tree.find(symbol.module, symbol.qualname))
    for target in symbol.alternatives if issues else ():
        module, qualname = target.split(":")
        if tree.find(module, qualname) is not None:
            return []
    return issues


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sora_serve.vllm_plugin.compat",
        description="Check the vLLM symbols sora-serve's plugin touches against another vLLM's sources (not imported).",
    )
    parser.add_argument("vllm", help="a vLLM wheel (.whl) or a directory containing vllm/")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table of every symbol")
    args = parser.parse_args(argv)
    try:
        results = report(args.vllm)
    except (FileNotFoundError, zipfile.BadZipFile) as exc:
        parser.error(str(exc))
    if args.markdown:
        print("| symbol | use | status |\n| --- | --- | --- |")
        for symbol, issues in results:
            print(f"| `{symbol.target}` | {symbol.use} | {'ok' if not issues else '; '.join(issues)} |")
    differing = [(s, i) for s, i in results if i]
    if not args.markdown:
        for _symbol, issues in differing:
            for issue in issues:
                print(issue)
    print(f"{len(results) - len(differing)} of {len(results)} symbols compatible", file=sys.stderr)
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
