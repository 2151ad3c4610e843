"""vLLM plugin: serve Pre-Diag, SORA and DoRA adapters through vLLM's own LoRA machinery.

Registered by the `vllm.general_plugins` entry point, so every vLLM process (API server, engine
core, workers) calls `register()` on start. It checks every vLLM symbol it touches
(`compat.py`: what, why, signature) and refuses a vLLM that changed one, naming it; then extends
vLLM through its seams, one module per concern (design and limits: docs/VLLM.md):

  layers.py      plugin-owned linear LoRA layers (subclasses in vLLM's layer table): slot buffers, op
  heads.py       vLLM's embedding and logits LoRA layers: the base path while no slot holds weights
  backends/      the op: `punica` (vLLM's punica API, graph-safe) or `grouped` (the CPU fast path)
  activation.py  slot factors computed once at load; entering a slot is a copy
  loading.py     every adapter through sora-serve's validator (front end and worker loader)
  registry.py    one read per adapter version and process
  isolation.py   non-finite adapter rows never reach the KV cache; their requests fail alone
  versions.py    one identity per adapter version (name, id): unload/reload under traffic is safe
  cpu_ops.py     vLLM CPU's torch LoRA ops without the slot -1 bug
  api_server.py  /v1/load_lora_adapter errors as 4xx; unload frees the engine's copy
  resolver.py    `--adapter-dir`: requests name adapters from a directory, every kind
  access.py      runtime loads confined to the directories `serve` allows (HTTP 403 elsewhere)
  launch.py      `serve`'s server process: exits non-zero when the engine core died
  compat.py      the vLLM symbols above, checked at start and against other vLLMs' sources
"""

from __future__ import annotations

import os

_APPLIED = False


def apply() -> None:
    """Check the installed vLLM, then install every extension once per process (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    from . import activation, api_server, backends, compat, cpu_ops, isolation, layers, loading, versions

    compat.check_installed()
    layers.install()
    loading.install_worker_manager()
    loading.patch_front_end()
    activation.patch_weight_processing()
    cpu_ops.patch_cpu_ops(backends.selected_name())
    isolation.patch_worker()
    isolation.patch_scheduler()
    versions.patch_request_identity()
    api_server.patch_api_server()
    _APPLIED = True


def register() -> None:
    apply()
    if os.environ.get("SORA_SERVE_ADAPTER_DIR"):  # `serve --adapter-dir`: requests name adapters in the store
        from .resolver import register_resolver

        register_resolver()
