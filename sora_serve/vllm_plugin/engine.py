"""A vLLM engine with settings that work on CPU here; shared by tests, demo and benchmarks."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_binding(tensor_parallel_size: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND splitting this process's CPUs evenly between the TP ranks
    (vLLM CPU's automatic binding wants one NUMA node per rank)."""
    cpus = sorted(os.sched_getaffinity(0))
    per_rank = len(cpus) // tensor_parallel_size
    if per_rank == 0:
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} needs at least that many CPUs; {len(cpus)} available"
        )
    return "|".join(",".join(map(str, cpus[i * per_rank : (i + 1) * per_rank])) for i in range(tensor_parallel_size))


def make_llm(model_dir: str | Path, *, max_loras: int = 4, max_lora_rank: int = 16, enable_lora: bool = True, **kwargs):
    """`vllm.LLM` in float32, eager mode, LoRA on; the caller needs an `if __name__ == "__main__"` guard."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    tensor_parallel_size = kwargs.get("tensor_parallel_size", 1)
    if tensor_parallel_size > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_binding(tensor_parallel_size))
    from vllm import LLM

    lora = (
        dict(enable_lora=True, max_loras=max_loras, max_lora_rank=max_lora_rank, max_cpu_loras=max(8, 2 * max_loras))
        if enable_lora
        else {}
    )
    settings = dict(dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=32, seed=0, **lora)
    settings.update(kwargs)
    return LLM(model=str(model_dir), **settings)
