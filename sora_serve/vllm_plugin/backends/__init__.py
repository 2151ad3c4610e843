"""Two backends behind one interface: give every token of a step its slot's `ServingFactors`.

    z = scale[slot] * base + shift[slot] + (x A[slot]ᵀ) B[slot]ᵀ,    y = z + (z U[slot]) V[slot]ᵀ

for the rows of tokens with an adapter (slot >= 0); rows with slot -1 keep the base output.

- `punica` (portable): only vLLM's punica-wrapper API (`add_lora_linear`, `add_shrink`,
  `add_expand`; Triton kernels on GPU, torch ops on CPU) plus gathers by the wrapper's
  `token_lora_indices`. Static shapes, no host reads: what a CUDA graph can capture.
- `grouped` (CPU): tokens grouped by slot once per step, all slots in one padded batched GEMM
  that reads each slot's factors once. Data-dependent shapes; the fastest path on CPU.

A backend module has `apply(layer, x, output) -> output`, and `allocate(layer, max_loras,
max_rank)` / `pack_slot(layer, index, ranks, rot_ranks)`, called by the layer when it creates its
slot buffers and after it writes a slot, for a backend that lays factors out its own way.

`SORA_SERVE_VLLM_BACKEND=punica|grouped` overrides the platform's default (grouped on CPU,
punica elsewhere); every vLLM process inherits it.
"""

from __future__ import annotations

import os
from types import ModuleType

BACKEND_ENV = "SORA_SERVE_VLLM_BACKEND"
BACKENDS = ("punica", "grouped")


def selected_name() -> str:
    name = os.environ.get(BACKEND_ENV, "").strip().lower()
    if not name:
        from vllm.platforms import current_platform

        return "grouped" if current_platform.is_cpu() else "punica"
    if name not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def selected() -> ModuleType:
    """The backend module (`apply(layer, x, output) -> output`) this process serves with."""
    from . import grouped, punica

    return {"punica": punica, "grouped": grouped}[selected_name()]
