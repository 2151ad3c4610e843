"""Many adapters through `vllm.LLM` (CI size): 40 adapters of every kind and mixed
ranks registered over time with max_loras=2 and max_cpu_loras=4, so vLLM's LRU keeps evicting
them; every answer equals its adapter alone, base requests stay base, and memory stays bounded."""

from __future__ import annotations

import os

import psutil
import pytest

import sora_serve as ss
from sora_serve.tiny import make_tiny_checkpoint

from .helpers import set_first_value, write_random_adapter
from .reference import eager_model, off_greedy

# 10 rounds of 4 new adapters; memory compared after 16 and after all. SORA_SERVE_SCALE_ADAPTERS=256
# runs the full size (about 10 minutes here) with the same checks.
N_ADAPTERS = int(os.environ.get("SORA_SERVE_SCALE_ADAPTERS", "40"))
PER_ROUND, FIRST = 4, 16
KINDS = (
    dict(method="lora"),
    dict(method="dora"),
    dict(method="prediag"),
    dict(method="sora", rotation="cayley", r_p=2),
    dict(method="sora", r_p=3),  # first-order rotation
)
RANKS = (2, 4, 8, 16)  # <= max_lora_rank
TARGETS = ("all-linear", ["q_proj", "v_proj", "down_proj"], ["k_proj", "o_proj", "gate_proj", "up_proj"])
PROMPTS = ([5, 17, 99, 23, 4, 61], [7, 7, 300, 12], [101, 44, 9, 250, 3, 88, 17])
MAX_TOKENS = 8
RSS_GROWTH_MAX = 1.10
ENGINE_START_S = 240  # pytest-timeout counts the module's engine start in whichever test runs first


def adapter_config(i: int) -> ss.AdapterConfig:
    """Adapter i's kind, rank and targets: every kind meets every rank over the 40 (5 and 4 are coprime)."""
    return ss.AdapterConfig(
        **{"r": RANKS[i % len(RANKS)], "target_modules": TARGETS[i % len(TARGETS)], **KINDS[i % len(KINDS)]}
    )


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    make_tiny_checkpoint("qwen2", root / "base")  # q/k/v biases, random and non-zero
    for i in range(N_ADAPTERS):
        write_random_adapter(root / f"a{i:02d}", adapter_config(i), seed=i, scale=0.05)
    from sora_serve.vllm_plugin.engine import make_llm

    llm = make_llm(root / "base", max_loras=2, max_cpu_loras=4, max_lora_rank=16)
    yield root, llm
    del llm


def generate(llm, root, requests: list[tuple[int | None, list[int]]]) -> list[list[int]]:
    """Greedy tokens for (adapter index or None for base, prompt) pairs, in one `generate` batch."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    loras = [None if i is None else LoRARequest(f"a{i:02d}", i + 1, str(root / f"a{i:02d}")) for i, _ in requests]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for _, p in requests], params, lora_request=loras, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def engine_rss() -> int:
    """Resident memory of the engine: vllm.LLM runs its engine core (and, at TP=1, the worker) in child processes."""
    children = psutil.Process().children(recursive=True)
    assert children, "expected vLLM's engine core in a child process"
    return sum(child.memory_info().rss for child in children)


@pytest.mark.slow
@pytest.mark.timeout(ENGINE_START_S + 6 * N_ADAPTERS)
def test_many_adapters_cycled_through_two_slots(engine):
    """Each round brings 4 new adapters, one evicted earlier adapter (read back from disk) and two
    base requests into one batch; every answer is checked against the float64 eager runtime."""
    root, llm = engine
    answers: dict[int | None, list[tuple[list[int], list[int]]]] = {}
    rss = {}
    for first in range(0, N_ADAPTERS, PER_ROUND):
        new = list(range(first, first + PER_ROUND))
        revisit = [first // 2] if first else []  # left the 4-adapter CPU cache rounds ago
        requests = [(i, PROMPTS[i % len(PROMPTS)]) for i in new + revisit] + [
            (None, PROMPTS[first % len(PROMPTS)]),
            (None, PROMPTS[-1]),
        ]
        for (i, prompt), tokens in zip(requests, generate(llm, root, requests)):
            answers.setdefault(i, []).append((prompt, tokens))
        if first + PER_ROUND in (FIRST, N_ADAPTERS):
            rss[first + PER_ROUND] = engine_rss()

    base = eager_model(root / "base")
    for adapter, pairs in answers.items():
        model = base if adapter is None else eager_model(root / "base", root / f"a{adapter:02d}")
        for prompt, tokens in pairs:
            assert off_greedy(model, prompt, tokens) == [], (
                f"adapter {adapter} ({adapter_config(adapter) if adapter is not None else 'base'}): {tokens}"
            )
            if adapter is not None:
                assert off_greedy(base, prompt, tokens) != [], f"adapter {adapter} answered like the base"
    print(
        f"engine RSS: {rss[FIRST] / 2**20:.1f} MiB after {FIRST} adapters, {rss[N_ADAPTERS] / 2**20:.1f} "
        f"MiB after {N_ADAPTERS}"
    )
    assert rss[N_ADAPTERS] <= RSS_GROWTH_MAX * rss[FIRST], (
        f"engine RSS grew from {rss[FIRST] / 2**20:.0f} MiB after {FIRST} adapters to "
        f"{rss[N_ADAPTERS] / 2**20:.0f} MiB after {N_ADAPTERS}"
    )


@pytest.mark.slow
@pytest.mark.timeout(ENGINE_START_S + 60)
def test_a_nan_adapter_request_is_refused_and_the_engine_keeps_serving(engine, tmp_path):
    """A NaN adapter through `vllm.LLM`: a plain PEFT LoRA with one NaN in lora_B, named by a
    LoRARequest, is refused with an error naming the file; the same engine then serves on. (Here,
    not in test_vllm_churn, to share this module's engine.)"""
    root, llm = engine
    bad = write_random_adapter(tmp_path / "nan_lora", adapter_config(0), seed=99, scale=0.05)
    set_first_value(bad, "lora_B.weight", float("nan"))
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    with pytest.raises(Exception, match="adapter_model.safetensors") as refused:
        llm.generate(
            [{"prompt_token_ids": PROMPTS[0]}],
            SamplingParams(max_tokens=4),
            lora_request=LoRARequest("nan_lora", 1000, str(bad)),
            use_tqdm=False,
        )
    assert "NaN" in str(refused.value)
    (tokens,) = generate(llm, root, [(3, PROMPTS[0])])
    assert off_greedy(eager_model(root / "base", root / "a03"), PROMPTS[0], tokens) == []
