"""One vLLM engine, several timed scenarios; run as a subprocess by the serving suite.

    python -m benchmarks.vllm_worker CONFIG.json   ->   prints `RESULT <json>`
"""

from __future__ import annotations

import json
import sys
import time


def run_scenario(llm, scenario: dict, adapter_dirs: dict[str, str], repeats: int) -> dict:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    ids = {name: i + 1 for i, name in enumerate(adapter_dirs)}
    names = scenario["adapters"]
    batch, prompt_len, max_tokens = scenario["batch"], scenario["prompt_len"], scenario["max_tokens"]
    requests = [None if (n := names[i % len(names)]) is None else LoRARequest(n, ids[n], adapter_dirs[n]) for i in range(batch)]
    prompts = [{"prompt_token_ids": [(7 * i + 13 * j) % 500 + 1 for j in range(prompt_len)]} for i in range(batch)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts, params, lora_request=requests, use_tqdm=False)  # warm-up: loads adapters into slots
    first_token = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    samples, ttft, tpot = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = batch * (max_tokens if scenario["kind"] == "decode" else prompt_len)
        samples.append(tokens / elapsed)
        if scenario["kind"] == "decode":  # time to first token: the same batch asked for one token
            start = time.perf_counter()
            llm.generate(prompts, first_token, lora_request=requests, use_tqdm=False)
            ttft.append(time.perf_counter() - start)
            tpot.append((elapsed - ttft[-1]) / (max_tokens - 1))
    return {"name": scenario["name"], "kind": scenario["kind"], "tok_per_s": samples, "ttft_s": ttft, "tpot_s": tpot, **{k: scenario[k] for k in ("batch", "prompt_len", "max_tokens", "adapters")}}


if __name__ == "__main__":
    config = json.loads(open(sys.argv[1]).read())
    from sora_serve.vllm_plugin.engine import make_llm

    llm = make_llm(config["model"], enable_lora=config["enable_lora"], max_loras=config.get("max_loras", 4), max_lora_rank=config.get("max_lora_rank", 16), max_model_len=512, max_num_seqs=64)
    results = [run_scenario(llm, s, config["adapters"], config["repeats"]) for s in config["scenarios"]]
    print("RESULT " + json.dumps(results), flush=True)
