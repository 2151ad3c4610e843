"""Which CPU thread settings serve best: vLLM engines that differ only in their thread environment.

    python -m benchmarks.threads [--shape realistic] [--rounds 2] [--out results]

vLLM CPU binds its model worker's OpenMP threads to cores and, by default on x86, keeps one core
per worker for the engine core and API server (`VLLM_CPU_NUM_OF_RESERVED_CPU`): on a 2-core
machine the model computes on one core. Each setting of `settings()` gets its own plugin engine
(the serving suite's cached base and adapters) that decodes base, LoRA and SORA batches and a
LoRA prefill; settings run in rounds, the order reversed every other round, so a machine whose
speed drifts hits each alike. Each setting's throughput is compared with vLLM's default in the
same round (ratio per round, then the median and range over rounds).

Every setting names its variables, so none gets the defaults `sora-serve serve` (and the serving
suite) apply to an environment that chose none (`sora_serve.vllm_plugin.engine.cpu_thread_env`,
the winner here; docs/VLLM.md has the numbers). Writes `threads.json` and `threads.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from sora_serve.vllm_plugin.engine import intel_openmp

from .common import machine
from .serving import decode, make_plan, prefill, vllm_engine
from .shapes import KINDS, SHAPES, adapter_dirs, base_checkpoint, resolve_dtype

VLLM_DEFAULT = "vLLM default (one core reserved)"


def settings() -> dict[str, dict[str, str]]:
    """Thread environments to compare; Intel OpenMP only where the venv ships it (intel-openmp,
    a dependency of vllm-cpu), preloaded as vLLM CPU's install guide asks."""
    found = {
        VLLM_DEFAULT: {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"},  # vLLM's own choice for one x86 worker, spelled out
        "no core reserved": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
    }
    iomp = intel_openmp()
    if iomp is not None:  # with a core reserved it lost in every scenario of a first run: not kept
        found["no core reserved + Intel OpenMP"] = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "LD_PRELOAD": str(iomp)}
    return found


def scenarios(shape_name: str, tokens: int) -> list[dict]:
    """The serving suite's decode batches and prefill (its full plan's prompt shape)."""
    plan = make_plan(shape_name, quick=False)
    return [
        decode("base @ batch 8", [None], 8, tokens),
        decode("LoRA @ batch 1", ["lora"], 1, tokens),
        decode("LoRA @ batch 8", ["lora"], 8, tokens),
        decode("SORA @ batch 8", ["sora"], 8, tokens),
        decode("LoRA @ batch 32", ["lora"], 32, tokens),
        prefill("LoRA prefill", ["lora"], plan),
    ]


def run(shape_name: str, rounds: int, tokens: int, out: Path) -> dict:
    shape = resolve_dtype(SHAPES[shape_name])
    base = base_checkpoint(shape)
    dirs = adapter_dirs(base, {k: KINDS[k] for k in ("lora", "sora")})
    cases = scenarios(shape_name, tokens)
    envs = settings()
    per_round: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in tqdm(range(rounds), desc="rounds"):
            order = list(envs) if r % 2 == 0 else list(reversed(envs))
            measured = {}
            for name in tqdm(order, desc=f"round {r + 1}", leave=False):
                result = vllm_engine(Path(tmp), shape, base, dirs, cases, 1, max_loras=4, env=envs[name])
                measured[name] = {row["name"]: row["tok_per_s"]["median"] for row in result["results"]}
            per_round.append(measured)
    payload = {
        "machine": machine(),
        "shape": shape_name,
        "tokens_per_request": tokens,
        "settings": envs,
        "rounds": per_round,
    }
    (out / "threads.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / "threads.md").write_text(markdown(payload))
    return payload


def markdown(payload: dict) -> str:
    """tok/s (median over rounds) per setting and scenario, and the per-round ratio to vLLM's default."""
    rounds, names = payload["rounds"], list(payload["settings"])
    scenario_names = list(rounds[0][VLLM_DEFAULT])
    lines = [
        f"Thread settings, {payload['shape']} shape, {len(rounds)} rounds ({payload['machine']['cpu']}, "
        f"{payload['machine']['cores']} cores). tok/s, median over rounds, and in brackets the ratio to "
        "vLLM's default in the same round (median [min, max]):",
        "",
        "| setting | " + " | ".join(scenario_names) + " |",
        "| --- | " + " | ".join("---" for _ in scenario_names) + " |",
    ]
    for name in names:
        cells = []
        for scenario in scenario_names:
            values = [r[name][scenario] for r in rounds]
            ratios = [r[name][scenario] / r[VLLM_DEFAULT][scenario] for r in rounds]
            cells.append(
                f"{statistics.median(values):.1f} ({statistics.median(ratios):.2f} "
                f"[{min(ratios):.2f}, {max(ratios):.2f}])"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("small", "realistic"), default="realistic")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all settings (default 2)")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per decode request (default 16)")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(markdown(run(args.shape, args.rounds, args.tokens, args.out)))


if __name__ == "__main__":
    main()
