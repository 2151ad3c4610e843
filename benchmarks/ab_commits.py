"""Same machine, same engines, interleaved: the vLLM plugin of another checkout against this one.

    git worktree add /tmp/old REV
    python -m benchmarks.ab_commits /tmp/old [--rounds 3] [--out results/serving-ab.json]

The serving suite's ratios at the realistic shape (its cached base and adapters, engines with 32
slots as in its offline section), measured for both checkouts in the same run:

- plugin LoRA / stock LoRA, decode at batch 8;
- plugin SORA / plugin LoRA, decode at batch 8;
- 32 distinct LoRA / 1 LoRA, decode at batch 32.

This machine's speed drifts by more than the difference being looked for (15% between two runs
of the same code on 2026-12-03), so each round starts the other checkout's engine, this one's and
stock vLLM's in turn, the order reversed every other round, and each ratio is compared per round:
the report gives this/other per round with the mean's 95% confidence interval. Each engine runs
in its own process with PYTHONPATH set to its checkout, so vLLM's entry point loads that plugin.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from .common import mean_ci95
from .serving import decode, vllm_engine
from .shapes import KINDS, SHAPES, adapter_dirs, base_checkpoint, resolve_dtype

HERE = Path(__file__).resolve().parent.parent
SLOTS = 32
TOKENS = 16
DISTINCT_BATCH = 32
LORAS = [f"lora{i}" for i in range(SLOTS)]
PLUGIN_SCENARIOS = [
    decode("LoRA b8", ["lora"], 8, TOKENS),
    decode("SORA b8", ["sora"], 8, TOKENS),
    decode("LoRA 1 distinct b32", LORAS[:1], DISTINCT_BATCH, TOKENS),
    decode("LoRA 32 distinct b32", LORAS, DISTINCT_BATCH, TOKENS),
]
STOCK_SCENARIOS = PLUGIN_SCENARIOS[:1]
RATIOS = {
    "plugin LoRA / stock LoRA (b8)": ("LoRA b8", "stock LoRA b8"),
    "SORA / LoRA (b8)": ("SORA b8", "LoRA b8"),
    "32 distinct / 1 LoRA (b32)": ("LoRA 32 distinct b32", "LoRA 1 distinct b32"),
}


def medians(result: dict) -> dict[str, float]:
    return {row["name"]: row["tok_per_s"]["median"] for row in result["results"]}


def ratios(plugin: dict[str, float], stock: dict[str, float]) -> dict[str, float]:
    both = plugin | {f"stock {k}": v for k, v in stock.items()}
    return {name: both[num] / both[den] for name, (num, den) in RATIOS.items()}


def compare(rounds: list[dict]) -> dict[str, dict]:
    """Per ratio: this checkout's value over the other's in each round, their mean and its 95% CI."""
    out = {}
    for name in RATIOS:
        per_round = [r["ratios"]["this"][name] / r["ratios"]["other"][name] for r in rounds]
        low, high = mean_ci95(per_round)
        out[name] = {
            "other": statistics.median(r["ratios"]["other"][name] for r in rounds),
            "this": statistics.median(r["ratios"]["this"][name] for r in rounds),
            "this_over_other": per_round,
            "mean": statistics.mean(per_round),
            "ci95": [low, high],
            "within_noise": low <= 1.0 <= high,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "other", type=Path, help="another checkout of this repository (e.g. a git worktree at an older commit)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per scenario in an engine (default 3)")
    parser.add_argument("--out", type=Path, default=Path("results/serving-ab.json"))
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds: at least 2, for a confidence interval")
    if not (args.other / "sora_serve" / "vllm_plugin").is_dir():
        parser.error(f"other: {args.other} is not a checkout of this repository (no sora_serve/vllm_plugin)")
    shape = resolve_dtype(SHAPES["realistic"])
    base = base_checkpoint(shape).absolute()
    specs = {"sora": KINDS["sora"], "lora": KINDS["lora"], **{n: KINDS["lora"] for n in LORAS}}
    dirs = {k: str(Path(v).absolute()) for k, v in adapter_dirs(base, specs).items()}
    work = args.out.parent.absolute()
    work.mkdir(parents=True, exist_ok=True)

    def engine(checkout: Path, plugin: bool = True) -> dict[str, float]:
        adapters = dirs if plugin else {n: dirs[n] for n in ("lora", *LORAS)}
        scenarios = PLUGIN_SCENARIOS if plugin else STOCK_SCENARIOS
        return medians(
            vllm_engine(
                work,
                shape,
                base,
                adapters,
                scenarios,
                args.repeats,
                plugin=plugin,
                max_loras=SLOTS,
                max_cpu_loras=len(adapters) + 4,
                checkout=checkout,
            )
        )

    engines = {
        "other": lambda: engine(args.other.resolve()),
        "this": lambda: engine(HERE),
        "stock": lambda: engine(HERE, plugin=False),
    }
    rounds = []
    for i in tqdm(range(args.rounds), desc="interleaved rounds"):
        order = list(engines) if i % 2 == 0 else list(reversed(engines))
        tok_per_s = {name: engines[name]() for name in order}
        rounds.append(
            {
                "order": order,
                "tok_per_s": tok_per_s,
                "ratios": {k: ratios(tok_per_s[k], tok_per_s["stock"]) for k in ("other", "this")},
            }
        )
    payload = {
        "timestamp": time.strftime("%Y%m%d-%H%M%S"),
        "other": str(args.other),
        "rounds": rounds,
        "comparison": compare(rounds),
    }
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps(payload["comparison"], indent=1))


if __name__ == "__main__":
    main()
