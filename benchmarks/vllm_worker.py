"""One vLLM engine, several timed scenarios; run as a subprocess by the serving suite.

    python -m benchmarks.vllm_worker CONFIG.json   ->   prints `RESULT <json>`

Scenario kinds: `decode` and `prefill` (one batch, repeated in rounds over all such scenarios),
`rotation` (waves of requests cycling through more adapters than the engine has slots) and
`first_request` (a one-token request for an adapter the engine has never seen, per adapter).
"""

from __future__ import annotations

import itertools
import json
import sys
import time

from tqdm.auto import tqdm


class Requests:
    """LoRARequests with stable integer ids for every adapter directory of the run."""

    def __init__(self, adapter_dirs: dict[str, str]):
        from vllm.lora.request import LoRARequest

        self.requests = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapter_dirs.items())}

    def __getitem__(self, name: str | None):
        return None if name is None else self.requests[name]


def prompts(batch: int, prompt_len: int, offset: int = 0) -> list[dict]:
    return [
        {"prompt_token_ids": [(7 * (i + offset) + 13 * j) % 500 + 1 for j in range(prompt_len)]} for i in range(batch)
    ]


_prompt_sets = itertools.count(1)  # set 0 is `prompts`' default


def fresh_prompts(batch: int, prompt_len: int) -> list[dict]:
    """Prompts whose first two tokens, hence first KV-cache block, no earlier prompt of this process
    has: vLLM's prefix cache (on by default) serves the full blocks of a repeated prompt, so a
    repeated 256-token prompt recomputes only its last block and its "prefill" is half of one
    (0.8 s against 1.4 s for 4 x 256 tokens, realistic shape, a one-off timing on the 2-core Xeon)."""
    first = batch * next(_prompt_sets)
    if first + batch > 500 * 500:  # two tokens of 500 values each
        raise RuntimeError(f"no fresh prompts left for batches of {batch} in this process")
    return [
        {
            "prompt_token_ids": (
                [n % 500 + 1, n // 500 + 1] + [(7 * n + 13 * j) % 500 + 1 for j in range(2, prompt_len)]
            )[:prompt_len]
        }
        for n in range(first, first + batch)
    ]


def sampling(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, detokenize=False)


def timed_generate(llm, batch_prompts: list[dict], max_tokens: int, lora: list) -> float:
    start = time.perf_counter()
    llm.generate(batch_prompts, sampling(max_tokens), lora_request=lora, use_tqdm=False)
    return time.perf_counter() - start


def prepare(scenario: dict, requests: Requests) -> dict:
    """The scenario's prompts and per-request adapters."""
    names, batch = scenario["adapters"], scenario["batch"]
    return {
        "requests": [requests[names[i % len(names)]] for i in range(batch)],
        "prompts": prompts(batch, scenario["prompt_len"]),
        "fill": (prompts(len(names), 8), [requests[n] for n in names]),
        "tokens": batch * (scenario["max_tokens"] if scenario["kind"] == "decode" else scenario["prompt_len"]),
    }


def measure(llm, scenario: dict, prepared: dict, result: dict) -> None:
    """One sample: throughput (of prompts never seen before, for prefill), and for decode (unless the
    scenario says `"ttft": false`) the time to first token (the same batch asked for one token) and
    time per further token. An untimed one-token
    request per adapter first puts the scenario's adapters into vLLM's slots, which the previous scenario
    may have taken."""
    args = (
        fresh_prompts(scenario["batch"], scenario["prompt_len"])
        if scenario["kind"] == "prefill"
        else prepared["prompts"],
    )
    fill_prompts, fill_requests = prepared["fill"]
    timed_generate(llm, fill_prompts, 1, fill_requests)
    elapsed = timed_generate(llm, *args, scenario["max_tokens"], prepared["requests"])
    result["tok_per_s"].append(prepared["tokens"] / elapsed)
    if scenario["kind"] == "decode" and scenario.get("ttft", True):
        result["ttft_s"].append(timed_generate(llm, *args, 1, prepared["requests"]))
        result["tpot_s"].append((elapsed - result["ttft_s"][-1]) / (scenario["max_tokens"] - 1))


def run_batches(llm, scenarios: list[dict], requests: Requests, repeats: int) -> list[dict]:
    """Repeats run in rounds over all scenarios, so drift of a shared machine hits each alike."""
    prepared = [prepare(s, requests) for s in scenarios]
    results = [
        {
            "name": s["name"],
            "kind": s["kind"],
            "tok_per_s": [],
            "ttft_s": [],
            "tpot_s": [],
            **{k: s[k] for k in ("batch", "prompt_len", "max_tokens", "adapters")},
        }
        for s in scenarios
    ]
    for p in prepared:  # warm-up: first loads, allocations
        timed_generate(llm, p["prompts"], 2, p["requests"])
    for _ in tqdm(range(repeats), desc="vLLM rounds", leave=False):
        for scenario, p, result in zip(scenarios, prepared, results):
            measure(llm, scenario, p, result)
    return results


def run_rotation(llm, scenario: dict, requests: Requests) -> dict:
    """Waves of `batch` requests, `per_wave` distinct adapters each, taking the next adapters of
    the rotation round-robin; the engine has fewer slots than adapters, so every wave swaps
    adapters into slots (and, past `max_cpu_loras`, loads them from disk). Every adapter is
    requested once first (one token, in rotation order), as a server has seen every adapter it
    rotates through, so the timed waves see the steady state: the front end's one-time check of
    each adapter done (`add_lora` alone skips it and leaves it to the adapter's first timed wave),
    and a CPU cache that holds them all, or, when it is smaller, one that misses on every access."""
    names = scenario["adapters"]
    timed_generate(llm, prompts(len(names), scenario["prompt_len"]), 1, [requests[name] for name in names])
    per_wave, batch, waves = scenario["per_wave"], scenario["batch"], scenario["waves"]
    wave_prompts = prompts(batch, scenario["prompt_len"])

    def wave(w: int) -> float:
        wave_names = [names[(w * per_wave + i) % len(names)] for i in range(per_wave)]
        return timed_generate(
            llm, wave_prompts, scenario["max_tokens"], [requests[wave_names[i % per_wave]] for i in range(batch)]
        )

    wave(-1)  # untimed: with as many adapters as slots, the first wave is the only one that fills them
    elapsed = [wave(w) for w in range(waves)]
    tokens = batch * scenario["max_tokens"]
    return {
        **{k: v for k, v in scenario.items() if k != "adapters"},
        "adapters": len(names),
        "wave_s": elapsed,
        "tok_per_s": [tokens / t for t in elapsed],
    }


def run_first_requests(llm, scenario: dict, requests: Requests) -> dict:
    """Per adapter: a one-token request for an adapter the engine has never seen (`cold`: read
    from disk, prepared, moved into a slot), the same request again (`resident`), then another
    adapter's request and this one again once the slots have been taken by others (`cached`: in
    vLLM's CPU cache, not in a slot). `filler` adapters take the slots."""
    one = prompts(1, scenario["prompt_len"])
    fillers = [requests[n] for n in scenario["fillers"]]
    timed_generate(
        llm, prompts(len(fillers), scenario["prompt_len"]), 1, fillers
    )  # untimed: the engine's first adapter load pays one-off costs
    samples = []
    for name in scenario["adapters"]:
        cold = timed_generate(llm, one, 1, [requests[name]])
        resident = timed_generate(llm, one, 1, [requests[name]])
        timed_generate(llm, prompts(len(fillers), scenario["prompt_len"]), 1, fillers)
        cached = timed_generate(llm, one, 1, [requests[name]])
        samples.append({"adapter": name, "cold_s": cold, "resident_s": resident, "cached_s": cached})
    return {**scenario, "samples": samples}


def run_scenarios(llm, scenarios: list[dict], adapter_dirs: dict[str, str], repeats: int) -> list[dict]:
    requests = Requests(adapter_dirs)
    results = [
        run_first_requests(llm, s, requests) for s in scenarios if s["kind"] == "first_request"
    ]  # before anything fills the cache
    results += run_batches(llm, [s for s in scenarios if s["kind"] in ("decode", "prefill")], requests, repeats)
    results += [run_rotation(llm, s, requests) for s in scenarios if s["kind"] == "rotation"]
    return results


if __name__ == "__main__":
    config = json.loads(open(sys.argv[1]).read())
    from sora_serve.vllm_plugin.engine import make_llm

    engine = {k: config[k] for k in ("dtype", "max_cpu_loras", "max_num_seqs", "max_model_len") if k in config}
    start = time.perf_counter()
    llm = make_llm(
        config["model"],
        enable_lora=config["enable_lora"],
        max_loras=config.get("max_loras", 4),
        max_lora_rank=config.get("max_lora_rank", 16),
        **{"max_model_len": 512, "max_num_seqs": 64, **engine},
    )
    started = time.perf_counter() - start
    results = run_scenarios(llm, config["scenarios"], config["adapters"], config["repeats"])
    print("RESULT " + json.dumps({"engine_start_s": started, "results": results}), flush=True)
