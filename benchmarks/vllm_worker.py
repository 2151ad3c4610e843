"""One vLLM engine, several timed scenarios; run as a subprocess by the serving suite.

    python -m benchmarks.vllm_worker CONFIG.json   ->   prints `RESULT <json>`
"""

from __future__ import annotations

import json
import sys
import time


def prepare(scenario: dict, adapter_dirs: dict[str, str]) -> dict:
    """The scenario's prompts, per-request adapters and sampling settings."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    ids = {name: i + 1 for i, name in enumerate(adapter_dirs)}
    names = scenario["adapters"]
    batch, prompt_len, max_tokens = scenario["batch"], scenario["prompt_len"], scenario["max_tokens"]
    return {
        "requests": [None if (n := names[i % len(names)]) is None else LoRARequest(n, ids[n], adapter_dirs[n]) for i in range(batch)],
        "prompts": [{"prompt_token_ids": [(7 * i + 13 * j) % 500 + 1 for j in range(prompt_len)]} for i in range(batch)],
        "params": SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
        "first_token": SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
        "tokens": batch * (max_tokens if scenario["kind"] == "decode" else prompt_len),
    }


def measure(llm, scenario: dict, prepared: dict, result: dict) -> None:
    """One sample: throughput, and for decode the time to first token (the same batch asked for
    one token) and time per further token. An untimed one-token call first puts the scenario's
    adapters into vLLM's slots, which the previous scenario may have taken."""

    def generate(params) -> float:
        start = time.perf_counter()
        llm.generate(prepared["prompts"], params, lora_request=prepared["requests"], use_tqdm=False)
        return time.perf_counter() - start

    generate(prepared["first_token"])
    elapsed = generate(prepared["params"])
    result["tok_per_s"].append(prepared["tokens"] / elapsed)
    if scenario["kind"] == "decode":
        result["ttft_s"].append(generate(prepared["first_token"]))
        result["tpot_s"].append((elapsed - result["ttft_s"][-1]) / (scenario["max_tokens"] - 1))


def run_scenarios(llm, scenarios: list[dict], adapter_dirs: dict[str, str], repeats: int) -> list[dict]:
    """Repeats run in rounds over all scenarios, so drift of a shared machine hits each alike."""
    prepared = [prepare(s, adapter_dirs) for s in scenarios]
    results = [{"name": s["name"], "kind": s["kind"], "tok_per_s": [], "ttft_s": [], "tpot_s": [], **{k: s[k] for k in ("batch", "prompt_len", "max_tokens", "adapters")}} for s in scenarios]
    for scenario, p in zip(scenarios, prepared):  # warm-up
        llm.generate(p["prompts"], p["params"], lora_request=p["requests"], use_tqdm=False)
    for _ in range(repeats):
        for scenario, p, result in zip(scenarios, prepared, results):
            measure(llm, scenario, p, result)
    return results


if __name__ == "__main__":
    config = json.loads(open(sys.argv[1]).read())
    from sora_serve.vllm_plugin.engine import make_llm

    llm = make_llm(config["model"], enable_lora=config["enable_lora"], max_loras=config.get("max_loras", 4), max_lora_rank=config.get("max_lora_rank", 16), max_model_len=512, max_num_seqs=64)
    results = run_scenarios(llm, config["scenarios"], config["adapters"], config["repeats"])
    print("RESULT " + json.dumps(results), flush=True)
