"""Our code's share of a decode step, timed inside one engine: the grouped backend's decode paths A/B/C.

    python -m benchmarks.adapter_cost [--shape realistic] [--batches 8 32] [--rounds 4] [--out results]

One plugin engine in this process's child (vLLM's engine core and worker in-process, with the
thread settings `sora-serve serve` picks), so both paths run the same model on the same memory:
the wall time of every plugin layer's backend call (`grouped.apply`, the adapter math and the
isolation check) is summed per decode step, for

- `torch`: torch's matmul for every factor, and the masked isolation check (the forms the
  backend takes past `prepacked.MAX_PREPACKED_ROWS` rows, and off a CPU);
- `prepacked`: each slot's factors prepacked by vLLM CPU's oneDNN handler, and the isolation check
  as one sum read on the host (the default at decode for mixed-slot batches, and for one slot where
  the fused op cannot run);
- `fused`: the default at decode for one slot: the fused native op (`backends/fused.py`), where
  this machine can run it (else this path is left out).

Rounds alternate the order of the paths (this VM's speed drifts over minutes); decode-only
time is a 17-token run less a 1-token run. Single steps swing; the medians of our code's time are
steadier than whole steps', because our code is timed alone. Our code is also split into its
parts (`PARTS`: the factor GEMMs with the adds they do in place, the scale-and-shift pass, the
isolation check, and the rest: plan lookups, Python dispatch, vLLM's GEMM wrapper), beside the
floor its bytes allow: the slot's factors read at the bandwidth the step's own base GEMMs reach.
Writes adapter-cost.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

from sora_serve.vllm_plugin import isolation
from sora_serve.vllm_plugin.backends import fused, prepacked

from .common import machine, run_worker, worker_tool_main

KINDS = ("lora", "prediag", "sora")
PATHS = ("torch", "prepacked", "fused")
HOST_CHECKED = isolation.quarantine_rows_host_checked
PARTS = ("factor GEMMs", "scale and shift", "isolation check", "fused op")


class PartTimer:
    """Wall time spent in wrapped functions, per label, since the last `take`."""

    def __init__(self):
        self.spent: dict[str, float] = {}

    def wrap(self, label: str, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.spent[label] = self.spent.get(label, 0.0) + time.perf_counter() - start

        return timed

    def take(self) -> dict[str, float]:
        spent, self.spent = self.spent, {}
        return spent


def use_path(name: str, timer: PartTimer) -> None:
    """Point the grouped backend at one of its paths (module-level names it reads per call)."""
    prepacked.MAX_PREPACKED_ROWS = 0 if name == "torch" else prepacked.KERNELS_KEPT
    fused.ENABLED = name == "fused"
    check = isolation.quarantine_rows if name == "torch" else HOST_CHECKED
    isolation.quarantine_rows_host_checked = timer.wrap("isolation check", check)


def time_parts(timer: PartTimer) -> None:
    """Wrap our code (`grouped.apply`, as "ours") and its parts where the backend looks them up."""
    from sora_serve.vllm_plugin.backends import grouped

    grouped.apply = timer.wrap("ours", grouped.apply)
    grouped._scale_and_shift = timer.wrap("scale and shift", grouped._scale_and_shift)
    for step in ("shrink", "project", "add_expansions"):
        setattr(prepacked.SlotOperands, step, timer.wrap("factor GEMMs", getattr(prepacked.SlotOperands, step)))
    fused.run_slots = timer.wrap("fused op", fused.run_slots)


def worker(config: dict) -> None:
    """In the child: one engine, every (batch, kind, path) measured `rounds` times."""
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
    requests, timer = Requests(config["adapters"]), PartTimer()
    time_parts(timer)
    paths = PATHS if fused.op() is not None else PATHS[:-1]
    results = []
    for batch in config["batches"]:
        batch_prompts = prompts(batch, 16)
        for kind in KINDS:
            lora = [requests[kind]] * batch
            timed_generate(llm, batch_prompts, 8, lora)  # the adapter's load, the row counts' kernels
            for round_ in range(config["rounds"]):
                for path in paths if round_ % 2 == 0 else paths[::-1]:
                    use_path(path, timer)
                    timed_generate(llm, batch_prompts, 2, lora)  # this path's kernels, untimed
                    timer.take()
                    first = timed_generate(llm, batch_prompts, 1, lora)
                    first_parts = timer.take()
                    whole = timed_generate(llm, batch_prompts, 17, lora)
                    parts = {k: 1000 * (v - first_parts.get(k, 0.0)) / 16 for k, v in timer.take().items()}
                    results.append(
                        {
                            "batch": batch,
                            "kind": kind,
                            "path": path,
                            "ours_ms": parts.pop("ours"),
                            "parts_ms": parts,
                            "step_ms": 1000 * (whole - first) / 16,
                        }
                    )
    print("RESULT " + json.dumps(results), flush=True)


def measure(out_dir: Path, shape_name: str, batches: list[int], rounds: int) -> dict:
    from .shapes import KINDS as ADAPTER_KINDS
    from .shapes import RANK, SHAPES, adapter_dirs, adapter_terms, base_checkpoint, resolve_dtype

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
    return {
        "machine": machine(),
        "shape": shape_name,
        "rounds": rounds,
        "base_bytes": shape.parameters() * shape.bytes_per_value,
        "factor_bytes": {kind: adapter_terms(shape, kind)[0] * shape.bytes_per_value for kind in KINDS},
        "samples": samples,
    }


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
            "parts_ms": {part: statistics.median(s["parts_ms"].get(part, 0.0) for s in samples) for part in PARTS},
            "step_ms": statistics.median(s["step_ms"] for s in samples),
        }
        for (batch, kind, path), samples in sorted(groups.items())
    ]


def bytes_floor_ms(payload: dict, row: dict) -> float:
    """The time the slot's factors take to read at the bandwidth the rest of the step reaches on the
    base weights (the rest also holds attention and sampling, so this floor is on the high side)."""
    bandwidth = payload["base_bytes"] / (row["step_ms"] - row["ours_ms"])
    return payload["factor_bytes"][row["kind"]] / bandwidth


def markdown(payload: dict) -> str:
    rows = {(r["batch"], r["kind"], r["path"]): r for r in summary(payload)}
    paths = [path for path in PATHS if any(p == path for _, _, p in rows)]

    def cell(batch: int, kind: str, path: str, field: str) -> str:
        row = rows.get((batch, kind, path))
        return "–" if row is None else f"{row[field]:.1f}"

    lines = [
        f"Our code per decode step, one engine ({payload['shape']} shape, bf16; medians of "
        f"{payload['rounds']} alternating rounds; {payload['machine']['cpu']}), ms; the last path is the "
        "default for one slot at decode:",
        "",
        f"| batch | adapter | {' | '.join(paths)} | {paths[-1]} / torch | {' | '.join(f'step ({p})' for p in paths)} |",
        "| --- | --- |" + " --- |" * (2 * len(paths) + 1),
    ]
    for batch, kind in sorted({(b, k) for b, k, _ in rows}):
        ratio = rows[(batch, kind, paths[-1])]["ours_ms"] / rows[(batch, kind, "torch")]["ours_ms"]
        ours = " | ".join(cell(batch, kind, p, "ours_ms") for p in paths)
        steps = " | ".join(cell(batch, kind, p, "step_ms") for p in paths)
        lines.append(f"| {batch} | {kind} | {ours} | {ratio:.2f} | {steps} |")
    lines += [
        "",
        "Our code's parts per path past torch's, ms per decode step; the rest is plan lookups, Python "
        "dispatch and vLLM's GEMM wrapper; the bytes floor reads the slot's factors at the bandwidth the "
        "step's base GEMMs reach:",
        "",
        f"| batch | adapter | path | ours | {' | '.join(PARTS)} | rest | bytes floor |",
        "| --- | --- | --- |" + " --- |" * (len(PARTS) + 3),
    ]
    for (batch, kind, path), row in sorted(rows.items()):
        if path == "torch":
            continue
        parts = [row["parts_ms"][part] for part in PARTS]
        lines.append(
            f"| {batch} | {kind} | {path} | {row['ours_ms']:.1f} | {' | '.join(f'{v:.1f}' for v in parts)} | "
            f"{row['ours_ms'] - sum(parts):.1f} | {bytes_floor_ms(payload, row):.1f} |"
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
