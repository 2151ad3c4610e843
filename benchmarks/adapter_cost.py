"""Our code's share of a decode step, timed inside one engine: the grouped backend's GEMM paths A/B.

    python -m benchmarks.adapter_cost [--shape realistic] [--batches 8 32] [--rounds 4] [--out results]

One plugin engine in this process's child (vLLM's engine core and worker in-process, with the
thread settings `sora-serve serve` picks), so both paths run the same model on the same memory:
the wall time of every plugin layer's backend call (`grouped.apply`, the adapter math and the
isolation check) is summed per decode step, for

- `torch`: torch's matmul for every factor, and the masked isolation check (the forms the
  backend takes past `prepacked.MAX_PREPACKED_ROWS` rows, and off a CPU);
- `prepacked`: the backend's default at decode: each slot's factors prepacked by vLLM CPU's oneDNN
  handler, and the isolation check as one sum read on the host.

Rounds alternate the order of the two paths (this VM's speed drifts over minutes); decode-only
time is a 17-token run less a 1-token run. Single steps swing; the medians of our code's time are
steadier than whole steps', because our code is timed alone. Writes adapter-cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from sora_serve.vllm_plugin import isolation
from sora_serve.vllm_plugin.backends import prepacked

from .common import machine, run_worker, worker_tool_main

KINDS = ("lora", "prediag", "sora")
PATHS = ("torch", "prepacked")
HOST_CHECKED = isolation.quarantine_rows_host_checked


def use_path(name: str) -> None:
    """Point the grouped backend at one of its two paths (module-level names it reads per call)."""
    prepacked.MAX_PREPACKED_ROWS = prepacked.KERNELS_KEPT if name == "prepacked" else 0
    isolation.quarantine_rows_host_checked = HOST_CHECKED if name == "prepacked" else isolation.quarantine_rows


def worker(config: dict) -> None:
    """In the child: one engine, every (batch, kind, path) measured `rounds` times."""
    from sora_serve.vllm_plugin.backends import grouped
    from sora_serve.vllm_plugin.engine import make_llm

    from .vllm_worker import Requests, prompts, timed_generate

    llm = make_llm(
        config["model"],
        enable_lora=True,
        max_loras=4,
        max_lora_rank=config["max_lora_rank"],
        dtype=config["dtype"],
        max_model_len=512,
        max_num_seqs=64,
    )
    requests, spent = Requests(config["adapters"]), [0.0]
    stock_apply = grouped.apply

    def timed_apply(layer, x, output):
        start = time.perf_counter()
        result = stock_apply(layer, x, output)
        spent[0] += time.perf_counter() - start
        return result

    grouped.apply = timed_apply
    results = []
    for batch in config["batches"]:
        batch_prompts = prompts(batch, 16)
        for kind in KINDS:
            lora = [requests[kind]] * batch
            timed_generate(llm, batch_prompts, 8, lora)  # the adapter's load, the row counts' kernels
            for round_ in range(config["rounds"]):
                for path in PATHS if round_ % 2 == 0 else PATHS[::-1]:
                    use_path(path)
                    timed_generate(llm, batch_prompts, 2, lora)  # this path's kernels, untimed
                    spent[0] = 0.0
                    first = timed_generate(llm, batch_prompts, 1, lora)
                    ours_first, spent[0] = spent[0], 0.0
                    whole = timed_generate(llm, batch_prompts, 17, lora)
                    results.append(
                        {
                            "batch": batch,
                            "kind": kind,
                            "path": path,
                            "ours_ms": 1000 * (spent[0] - ours_first) / 16,
                            "step_ms": 1000 * (whole - first) / 16,
                        }
                    )
    print("RESULT " + json.dumps(results), flush=True)


def measure(out_dir: Path, shape_name: str, batches: list[int], rounds: int) -> dict:
    from .shapes import KINDS as ADAPTER_KINDS
    from .shapes import RANK, SHAPES, adapter_dirs, base_checkpoint, resolve_dtype

    shape = resolve_dtype(SHAPES[shape_name])
    base = base_checkpoint(shape).absolute()
    dirs = adapter_dirs(base, {k: ADAPTER_KINDS[k] for k in KINDS})
    config = {
        "model": str(base),
        "dtype": shape.dtype,
        "max_lora_rank": RANK,
        "adapters": {k: str(Path(v).absolute()) for k, v in dirs.items()},
        "batches": batches,
        "rounds": rounds,
    }
    samples = run_worker(
        "benchmarks.adapter_cost",
        config,
        out_dir / "adapter-cost-config.json",
        {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    )
    return {"machine": machine(), "shape": shape_name, "rounds": rounds, "samples": samples}


def summary(payload: dict) -> list[dict]:
    """Median ms per decode step of our code and of the step, per (batch, kind, path)."""
    groups: dict[tuple, list[dict]] = {}
    for sample in payload["samples"]:
        groups.setdefault((sample["batch"], sample["kind"], sample["path"]), []).append(sample)
    return [
        {
            "batch": batch,
            "kind": kind,
            "path": path,
            "ours_ms": statistics.median(s["ours_ms"] for s in samples),
            "step_ms": statistics.median(s["step_ms"] for s in samples),
        }
        for (batch, kind, path), samples in sorted(groups.items())
    ]


def markdown(payload: dict) -> str:
    rows = {(r["batch"], r["kind"], r["path"]): r for r in summary(payload)}
    lines = [
        f"Our code per decode step, one engine ({payload['shape']} shape, bf16; medians of "
        f"{payload['rounds']} alternating rounds; {payload['machine']['cpu']}), ms:",
        "",
        "| batch | adapter | torch GEMMs + masked check | prepacked + host-read check | ratio | "
        "step (torch) | step (prepacked) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for batch, kind in sorted({(b, k) for b, k, _ in rows}):
        before, after = rows[(batch, kind, "torch")], rows[(batch, kind, "prepacked")]
        lines.append(
            f"| {batch} | {kind} | {before['ours_ms']:.1f} | {after['ours_ms']:.1f} | "
            f"{after['ours_ms'] / before['ours_ms']:.2f} | {before['step_ms']:.1f} | {after['step_ms']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("small", "realistic"), default="realistic")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32], help="decode batches (default 8 32)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per path, alternating (default 4)")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    worker_tool_main(
        args, worker, lambda out: measure(out, args.shape, args.batches, args.rounds), "adapter-cost", markdown
    )


if __name__ == "__main__":
    main()
