"""Same machine, same engine: the vLLM plugin of another checkout against this one, and stock LoRA.

    git worktree add /tmp/old REV
    python -m benchmarks.ab_commits /tmp/old [--out docs/benchmarks/serving-ab.json]

Decode at batch 8 (prompts of 16 tokens, 16 new tokens, 3 repeats, median) of LoRA and SORA on the
realistic shape (the serving suite's cached base and adapters), engines with 4 slots: the other
checkout's plugin, this checkout's plugin, then stock vLLM (plugin disabled). Each engine runs in
its own process with PYTHONPATH set to its checkout, so vLLM's entry point loads that plugin.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .shapes import KINDS, SHAPES, adapter_dirs, base_checkpoint, resolve_dtype

HERE = Path(__file__).resolve().parent.parent


def decode(name: str, adapter: str) -> dict:
    return {"name": name, "kind": "decode", "adapters": [adapter], "batch": 8, "prompt_len": 16, "max_tokens": 16}


def engine(checkout: Path, plugin: bool, base: Path, adapters: dict[str, str], scenarios: list[dict], work: Path) -> dict[str, float]:
    config = {"model": str(base), "dtype": resolve_dtype(SHAPES["realistic"]).dtype, "adapters": adapters, "scenarios": scenarios, "repeats": 3,
              "enable_lora": True, "max_loras": 4, "max_lora_rank": 16, "max_cpu_loras": 8}
    path = work / f"ab-{len(list(work.glob('ab-*.json')))}.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "PYTHONPATH": str(checkout)}
    if not plugin:
        env["VLLM_PLUGINS"] = "none"
    out = subprocess.run([sys.executable, "-m", "benchmarks.vllm_worker", str(path)], capture_output=True, text=True, env=env, cwd=checkout, timeout=1800)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"vLLM worker failed ({checkout}):\n{out.stderr[-3000:]}")
    return {r["name"]: sorted(r["tok_per_s"])[len(r["tok_per_s"]) // 2] for r in json.loads(line[len("RESULT "):])["results"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="another checkout of this repository (e.g. a git worktree at an older commit)")
    parser.add_argument("--out", type=Path, default=Path("results/serving-ab.json"))
    args = parser.parse_args()
    shape = resolve_dtype(SHAPES["realistic"])
    base = base_checkpoint(shape).absolute()
    dirs = {k: str(Path(v).absolute()) for k, v in adapter_dirs(base, {k: KINDS[k] for k in ("lora", "sora")}).items()}
    work = args.out.parent
    work.mkdir(parents=True, exist_ok=True)
    both = [decode("LoRA b8", "lora"), decode("SORA b8", "sora")]
    results = {
        "other plugin": engine(args.other.resolve(), True, base, dirs, both, work),
        "this plugin": engine(HERE, True, base, dirs, both, work),
        "stock": engine(HERE, False, base, {"lora": dirs["lora"]}, both[:1], work),
    }
    ratios = {f"{k} LoRA / stock LoRA": results[k]["LoRA b8"] / results["stock"]["LoRA b8"] for k in ("other plugin", "this plugin")}
    ratios |= {f"{k} SORA / LoRA": results[k]["SORA b8"] / results[k]["LoRA b8"] for k in ("other plugin", "this plugin")}
    payload = {"timestamp": time.strftime("%Y%m%d-%H%M%S"), "other": str(args.other), "tok_per_s": results, "ratios": ratios}
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
