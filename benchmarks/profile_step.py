"""Where a vLLM decode step's (or prefill's) time goes, with and without adapters: py-spy samples by category.

    python -m benchmarks.profile_step [--shape realistic] [--batch 8] [--seconds 20] [--out results]
    python -m benchmarks.profile_step --prompt-len 256 --batch 4 --tokens 1   # prefill

Three engines at the serving suite's shape (its cached base and adapters): LoRA disabled, and
the plugin (default backend) serving base requests, LoRA and SORA. While an engine decodes the
same batch again and again, py-spy samples the process that runs the model (vLLM's worker,
below the engine core); every sample is put in one category by the innermost frame that names
one (`CATEGORIES`), else by whether it is in the worker's step or waiting for the engine core's
next one; the category's share of the samples times the measured time per decode step gives
its milliseconds per step.

Writes `profile-step.json` and `profile-step.md` (the table docs/benchmarks/serving.md quotes).
py-spy (`pip install py-spy`) must be able to attach to a child process (root, or
`kernel.yama.ptrace_scope` 0).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from .common import machine, run_worker, worker_tool_main

# (category, predicate on one frame's (function, file)); the innermost matching frame decides.
CATEGORIES: list[tuple[str, object]] = [
    ("isolation check (ours)", lambda fn, f: f.endswith("vllm_plugin/isolation.py")),
    ("step plan (ours)", lambda fn, f: fn in ("make_plan", "step_plan") and "vllm_plugin/backends/" in f),
    (
        "adapter math (ours)",
        lambda fn, f: "vllm_plugin/backends/" in f or "sora_serve/methods/" in f,
    ),
    ("punica ops (vLLM's CPU ops, mended)", lambda fn, f: f.endswith("vllm_plugin/cpu_ops.py")),
    ("plugin other (ours)", lambda fn, f: f.startswith("sora_serve/")),
    ("vLLM LoRA bookkeeping", lambda fn, f: f.startswith("vllm/lora/")),
    ("attention", lambda fn, f: "attention" in f),
    (
        "base linear GEMMs",
        lambda fn, f: (
            f.startswith("vllm/model_executor/layers/")
            and ("linear" in f or "utils" in f)
            and fn.rpartition(".")[2] == "apply"
            or "cpu_unquantized_gemm" in fn
        ),
    ),
    ("sampling", lambda fn, f: "sample" in f),
]
IN_STEP = ("execute_model", "sample_tokens")  # the worker's step: inputs, forward, sampling
WAITING = ("acquire_read", "dequeue")  # the worker spinning for the engine core's next step
MODEL_OTHER = "model step other (inputs, embedding, norms, activations, dispatch)"
ENGINE = "waiting for the engine core (scheduler, outputs)"
WORKER_OTHER = "worker other"
ORDER = [c for c, _ in CATEGORIES] + [MODEL_OTHER, ENGINE, WORKER_OTHER]

CASES = {
    # case: (engine with LoRA, adapter name or None)
    "LoRA disabled": (False, None),
    "plugin: base requests": (True, None),
    "plugin: LoRA": (True, "lora"),
    "plugin: SORA": (True, "sora"),
}


def parse_frame(frame: str) -> tuple[str, str]:
    """`func (file:line)` -> (func, file)."""
    func, _, where = frame.rpartition(" (")
    return func, where.rstrip(")").rsplit(":", 1)[0]


def classify(stack: list[tuple[str, str]]) -> str:
    """A sample's category: the innermost frame matching a rule, else inside / outside the step.
    Pass-through wrappers (the plugin's around vLLM's worker step) never claim their callees."""
    for fn, f in reversed(stack):
        if fn.endswith("wrapper"):
            continue
        for name, matches in CATEGORIES:
            if matches(fn, f):
                return name
    names = [fn.rpartition(".")[2] for fn, _ in stack]
    if any(n in IN_STEP for n in names):
        return MODEL_OTHER
    return ENGINE if any(n in WAITING for n in names) else WORKER_OTHER


def breakdown(raw: str) -> Counter:
    """Samples per category from py-spy's raw (folded) output."""
    counts: Counter = Counter()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if stack:
            counts[classify([parse_frame(f) for f in stack.split(";")])] += int(n)
    return counts


# ---------------------------------------------------------------- the engine side (a subprocess)


def model_worker_pid() -> int:
    """The process that runs the model (vLLM titles it `VLLM::Worker...`), below the engine core."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        if "::Worker" in child.name() or "::Worker" in " ".join(child.cmdline()):
            return child.pid
    raise RuntimeError("no vLLM worker process (VLLM::Worker) found to profile")


def worker(config: dict) -> None:
    """Start one engine; per case, run the batch (decode, or prefill with `tokens` 1) until py-spy has
    sampled for `seconds`."""
    from sora_serve.vllm_plugin.engine import make_llm

    from .vllm_worker import Requests, fresh_prompts, prompts, timed_generate

    llm = make_llm(
        config["model"],
        enable_lora=config["enable_lora"],
        max_loras=config["max_loras"],
        max_lora_rank=config["max_lora_rank"],
        dtype=config["dtype"],
        max_model_len=512,
        max_num_seqs=64,
    )
    requests, pid, batch, tokens = Requests(config["adapters"]), model_worker_pid(), config["batch"], config["tokens"]
    prefill = tokens == 1  # then every sample's prompts are new ones: vLLM's prefix cache would serve repeats
    results = {}
    for case, adapter in config["cases"].items():
        lora = [requests[adapter]] * batch
        batch_prompts = prompts(batch, config["prompt_len"])
        timed_generate(llm, batch_prompts, tokens, lora)  # warm-up: the adapter's load, allocations
        raw = Path(config["out"]) / f"py-spy-{case.replace(' ', '_').replace(':', '')}.txt"
        spy = subprocess.Popen(
            [config["py_spy"], "record", "--pid", str(pid), "--duration", str(config["seconds"]), "--rate", "200"]
            + ["--format", "raw", "--nonblocking", "-o", str(raw)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        steps, elapsed = 0, 0.0
        while spy.poll() is None:
            elapsed += timed_generate(
                llm, fresh_prompts(batch, config["prompt_len"]) if prefill else batch_prompts, tokens, lora
            )
            steps += tokens
        if spy.returncode != 0 or not raw.exists():
            raise RuntimeError(f"py-spy failed on the vLLM worker (pid {pid}): {spy.stderr.read()[-2000:]}")
        results[case] = {"ms_per_step": 1000 * elapsed / steps, "samples": dict(breakdown(raw.read_text()))}
    print("RESULT " + json.dumps(results), flush=True)


# ---------------------------------------------------------------- the report


def profile(
    out_dir: Path, shape_name: str, batch: int, seconds: int, tokens: int, prompt_len: int, max_loras: int
) -> dict:
    from .shapes import KINDS, RANK, SHAPES, adapter_dirs, base_checkpoint, resolve_dtype

    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy")
    shape = resolve_dtype(SHAPES[shape_name])
    base = base_checkpoint(shape).absolute()
    dirs = {k: str(Path(v).absolute()) for k, v in adapter_dirs(base, {k: KINDS[k] for k in ("lora", "sora")}).items()}
    results = {}
    for enable_lora in (False, True):
        cases = {case: adapter for case, (lora, adapter) in CASES.items() if lora == enable_lora}
        config = {
            "model": str(base),
            "dtype": shape.dtype,
            "enable_lora": enable_lora,
            "max_lora_rank": RANK,
            "max_loras": max_loras,
            "adapters": dirs,
            "cases": cases,
            "batch": batch,
            "tokens": tokens,
            "prompt_len": prompt_len,
            "seconds": seconds,
            "out": str(out_dir),
            "py_spy": py_spy,
        }
        results |= run_worker(
            "benchmarks.profile_step",
            config,
            out_dir / f"profile-config-{int(enable_lora)}.json",
            {"VLLM_CPU_KVCACHE_SPACE": "2"},
        )
    return {
        "machine": machine(),
        "shape": shape_name,
        "batch": batch,
        "tokens_per_request": tokens,
        "prompt_len": prompt_len,
        "max_loras": max_loras,
        "seconds_sampled": seconds,
        "cases": results,
    }


def ms_by_category(case: dict) -> dict[str, float]:
    total = sum(case["samples"].values()) or 1
    return {c: case["ms_per_step"] * case["samples"].get(c, 0) / total for c in ORDER}


def markdown(payload: dict) -> str:
    cases = payload["cases"]
    rows = {name: ms_by_category(case) for name, case in cases.items()}
    prompt_len = payload.get("prompt_len", 16)
    what = (
        f"Prefill of {payload['batch']} prompts of {prompt_len} tokens, ms per prefill"
        if payload["tokens_per_request"] == 1
        else f"Decode at batch {payload['batch']}, ms per step"
    )
    lines = [
        f"{what} by category ({payload['shape']} shape, {payload.get('max_loras', 4)} LoRA slots; "
        f"py-spy, {payload['seconds_sampled']} s per case at 200 Hz; {payload['machine']['cpu']}):",
        "",
        "| category | " + " | ".join(rows) + " |",
        "| --- | " + " | ".join("---" for _ in rows) + " |",
    ]
    for category in ORDER:
        if any(r[category] >= 0.05 for r in rows.values()):
            lines.append(f"| {category} | " + " | ".join(f"{r[category]:.1f}" for r in rows.values()) + " |")
    lines.append("| **step** | " + " | ".join(f"**{c['ms_per_step']:.1f}**" for c in cases.values()) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("small", "realistic"), default="realistic")
    parser.add_argument("--batch", type=int, default=8, help="decode batch (default 8)")
    parser.add_argument(
        "--tokens", type=int, default=32, help="new tokens per request (default 32; 1: profile the prefill)"
    )
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per request (default 16)")
    parser.add_argument(
        "--max-loras", type=int, default=4, help="the LoRA engine's adapter slots (default 4; the serving suite's: 32)"
    )
    parser.add_argument("--seconds", type=int, default=20, help="py-spy sampling per case (default 20)")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    worker_tool_main(
        args,
        worker,
        lambda out: profile(out, args.shape, args.batch, args.seconds, args.tokens, args.prompt_len, args.max_loras),
        "profile-step" if args.tokens > 1 else "profile-prefill",
        markdown,
    )


if __name__ == "__main__":
    main()
