"""Same machine, same engine: the vLLM plugin of another checkout against this one, and stock LoRA.

    git worktree add /tmp/old REV
    python -m benchmarks.ab_commits /tmp/old [--out results/serving-ab.json]

Decode at batch 8 (prompts of 16 tokens, 16 new tokens, 3 repeats, median) of LoRA and SORA on the
realistic shape (the serving suite's cached base and adapters), engines with 4 slots: the other
checkout's plugin, this checkout's plugin, then stock vLLM (plugin disabled). Each engine runs in
its own process with PYTHONPATH set to its checkout, so vLLM's entry point loads that plugin.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .serving import decode, vllm_engine
from .shapes import KINDS, SHAPES, adapter_dirs, base_checkpoint, resolve_dtype

HERE = Path(__file__).resolve().parent.parent
SCENARIOS = [decode("LoRA b8", ["lora"], 8, 16), decode("SORA b8", ["sora"], 8, 16)]


def medians(result: dict) -> dict[str, float]:
    return {row["name"]: row["tok_per_s"]["median"] for row in result["results"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "other", type=Path, help="another checkout of this repository (e.g. a git worktree at an older commit)"
    )
    parser.add_argument("--out", type=Path, default=Path("results/serving-ab.json"))
    args = parser.parse_args()
    shape = resolve_dtype(SHAPES["realistic"])
    base = base_checkpoint(shape).absolute()
    dirs = {k: str(Path(v).absolute()) for k, v in adapter_dirs(base, {k: KINDS[k] for k in ("lora", "sora")}).items()}
    work = args.out.parent.absolute()
    work.mkdir(parents=True, exist_ok=True)

    def engine(checkout: Path, plugin: bool = True) -> dict[str, float]:
        adapters, scenarios = (dirs, SCENARIOS) if plugin else ({"lora": dirs["lora"]}, SCENARIOS[:1])
        return medians(
            vllm_engine(
                work,
                shape,
                base,
                adapters,
                scenarios,
                3,
                plugin=plugin,
                max_loras=4,
                max_cpu_loras=8,
                checkout=checkout,
            )
        )

    results = {
        "other plugin": engine(args.other.resolve()),
        "this plugin": engine(HERE),
        "stock": engine(HERE, plugin=False),
    }
    ratios = {
        f"{k} LoRA / stock LoRA": results[k]["LoRA b8"] / results["stock"]["LoRA b8"]
        for k in ("other plugin", "this plugin")
    }
    ratios |= {
        f"{k} SORA / LoRA": results[k]["SORA b8"] / results[k]["LoRA b8"] for k in ("other plugin", "this plugin")
    }
    payload = {
        "timestamp": time.strftime("%Y%m%d-%H%M%S"),
        "other": str(args.other),
        "tok_per_s": results,
        "ratios": ratios,
    }
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
