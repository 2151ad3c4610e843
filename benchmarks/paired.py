"""The plugin's cost against the LoRA-disabled engine, both engines alive in one process, requests alternating.

    python -m benchmarks.paired [--shape realistic] [--rounds 8] [--out results]

Engines started a minute apart read up to ±25% apart on this VM (the serving run of 2026-12-08
03:56 started both engines afresh in each of 4 rounds: its ratios swung 0.72-1.27), far more than the
4% the shares' targets look for. Here one process holds both engines (the serving suite's settings:
its cached base and adapters, the offline section's slots), and each round runs the two engines'
scenarios interleaved, one engine's then the other's, seconds apart (the LoRA-disabled engine's
decode beside the plugin's base requests, its prefill beside the plugin's LoRA decode, the rest of
the plugin's scenarios right after), the order reversed every other round. An idle vLLM worker
keeps polling its queue for 1 s after its last step (`busy_loop_s` of vLLM's shared-memory queue)
before it sleeps, so each run waits `IDLE_S` first: the other engine's worker is asleep while one runs.

Each round gives one value of every ratio of `serving.PAIRED_RATIOS` (decode per further token,
prefill of fresh prompts, base requests' TTFT); the report has them per round, their mean with a
95% interval and the share of the limit. Writes paired.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .common import machine, run_worker, worker_tool_main

IDLE_S = 1.3  # > vLLM's busy_loop_s (1 s): the other engine's worker has stopped polling
ENGINES = ("no-lora", "plugin")


def worker(config: dict) -> None:
    """Both engines, then `rounds` rounds of every scenario on each, alternating."""
    import json

    from sora_serve.vllm_plugin.engine import make_llm

    from .vllm_worker import Requests, measure, prepare, timed_generate

    settings = dict(dtype=config["dtype"], max_model_len=512, max_num_seqs=64, max_lora_rank=config["max_lora_rank"])
    llms = {
        "no-lora": make_llm(config["model"], enable_lora=False, **settings),
        "plugin": make_llm(config["model"], max_loras=config["slots"], **settings),
    }
    requests = Requests(config["adapters"])
    scenarios = config["scenarios"]
    prepared = {engine: [prepare(s, requests) for s in scenarios[engine]] for engine in ENGINES}
    for engine in ENGINES:  # warm-up: first loads, allocations
        for p in prepared[engine]:
            timed_generate(llms[engine], p["prompts"], 2, p["requests"])
    rounds = []
    for i in range(config["rounds"]):
        order = list(ENGINES) if i % 2 == 0 else list(reversed(ENGINES))
        results = {engine: [] for engine in ENGINES}
        for index in range(max(len(scenarios[e]) for e in ENGINES)):
            for engine in order:
                if index >= len(scenarios[engine]):
                    continue
                time.sleep(IDLE_S)
                scenario, sample = scenarios[engine][index], {"tok_per_s": [], "ttft_s": [], "tpot_s": []}
                measure(llms[engine], scenario, prepared[engine][index], sample)
                results[engine].append(
                    {"name": scenario["name"]} | {m: {"median": v[0]} if v else None for m, v in sample.items()}
                )
        rounds.append({"order": order, "results": results})
    print("RESULT " + json.dumps(rounds), flush=True)


def pair_config(shape, base: Path, dirs: dict, plan, rounds: int) -> dict:
    """The worker's config: the suite's scenarios of `serving.PAIRED_RATIOS` for `shape`, its plan's
    decode tokens and prefill, and the plugin engine's slots of the suite's offline section."""
    from .serving import decode, prefill
    from .shapes import KINDS, RANK

    t = plan.decode_tokens
    kinds = (("LoRA", "lora"), ("SORA", "sora"))
    return {
        "model": str(base),
        "dtype": shape.dtype,
        "max_lora_rank": RANK,
        "slots": max(max(plan.scale.distinct), len(KINDS)),
        "adapters": {name: str(dirs[name]) for _, name in kinds},
        "scenarios": {
            "no-lora": [decode("decode", [None], 8, t), prefill("prefill", [None], plan)],
            "plugin": [decode("plugin: base requests", [None], 8, t)]
            + [decode(f"plugin: {label} @ batch 8", [name], 8, t) for label, name in kinds]
            + [prefill(f"plugin: {label} prefill", [name], plan) for label, name in kinds],
        },
        "rounds": rounds,
    }


def run_pairs(config: dict, work: Path) -> list[dict]:
    """The rounds of `worker`, run in a subprocess with `sora-serve serve`'s thread settings."""
    return run_worker("benchmarks.paired", config, work / "paired-config.json", {"VLLM_CPU_KVCACHE_SPACE": "2"})


def measure_pairs(out_dir: Path, shape_name: str, rounds: int) -> dict:
    from .serving import make_plan
    from .shapes import KINDS, SHAPES, adapter_dirs, base_checkpoint, resolve_dtype

    shape = resolve_dtype(SHAPES[shape_name])
    base = base_checkpoint(shape).absolute()
    dirs = adapter_dirs(base, {k: KINDS[k] for k in ("lora", "sora")})
    config = pair_config(
        shape, base, {k: Path(v).absolute() for k, v in dirs.items()}, make_plan(shape_name, False), rounds
    )
    return {
        "timestamp": time.strftime("%Y%m%d-%H%M%S"),
        "machine": machine(),
        "shape": shape_name,
        "idle_s": IDLE_S,
        "rounds": run_pairs(config, out_dir),
    }


def markdown(payload: dict) -> str:
    from .serving import paired_markdown, paired_rows
    from .shapes import SHAPES, resolve_dtype

    rows = paired_rows(payload["rounds"], resolve_dtype(SHAPES[payload["shape"]]))
    lines = paired_markdown(rows, len(payload["rounds"]))
    lines[0] = "## Both engines in one process: the plugin's cost against the LoRA-disabled engine"
    lines[2] = f"{payload['shape']} shape, {payload['machine']['cpu']}. " + lines[2]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("small", "realistic"), default="realistic")
    parser.add_argument("--rounds", type=int, default=8, help="rounds, each engine once per scenario (default 8)")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.worker and args.rounds < 2:
        parser.error("--rounds: at least 2, for a confidence interval")
    worker_tool_main(args, worker, lambda out: measure_pairs(out, args.shape, args.rounds), "paired", markdown)


if __name__ == "__main__":
    main()
