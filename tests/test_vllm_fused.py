"""The fused op inside a real bf16 vLLM engine: a mixed batch of every adapter kind and base requests
gives the tokens and log-probabilities the torch path gives, in prefill and in decode (one engine,
in-process, the op switched off and on between two runs of the same batch)."""

from __future__ import annotations

import os

import pytest

import sora_serve as ss
from sora_serve.tiny import make_tiny_checkpoint
from sora_serve.vllm_plugin.backends import fused

from .helpers import SERVED_KINDS, write_random_adapter
from .reference import PROMPTS

# bf16 between two forms of the same math that round at different points (the op accumulates in
# fp32 and rounds each stored value once; the torch path rounds after each GEMM): log-probabilities
# of the same tokens agree to a few hundredths of a nat.
LOGPROB_TOL = 0.05

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(fused.op() is None, reason="the fused op needs AVX512-BF16 and a C++ toolchain"),
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-fused")
    base = make_tiny_checkpoint("qwen2", root / "base")
    for i, (name, kwargs) in enumerate(SERVED_KINDS.items()):
        write_random_adapter(
            root / name, ss.AdapterConfig(**{"r": 8, "target_modules": "all-linear", **kwargs}), seed=i
        )
    from sora_serve.vllm_plugin.engine import make_llm

    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker in this process: the switch reaches it
    try:
        llm = make_llm(base, max_loras=len(SERVED_KINDS), max_lora_rank=16, dtype="bfloat16")
    finally:
        if previous is None:
            del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous
    yield root, llm
    del llm


def generate(llm, root, names: list[str | None]):
    """Per request: its greedy tokens and, per step, the top-5 {token: log-probability}."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    requests = [None if n is None else LoRARequest(n, list(SERVED_KINDS).index(n) + 1, str(root / n)) for n in names]
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=5, ignore_eos=True)
    prompts = [{"prompt_token_ids": PROMPTS[i % len(PROMPTS)]} for i in range(len(names))]
    outputs = llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
    return [
        (list(o.outputs[0].token_ids), [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs])
        for o in outputs
    ]


def compared_steps(served, expected, name: str) -> int:
    """Steps of one request checked: each step's distribution is compared while both runs have fed
    the same tokens, up to and including the first step whose greedy choice differs (a near-tie on
    this random tiny model: the other run's token must then be in this run's top 5, as likely)."""
    (tokens, logprobs), (expected_tokens, expected_logprobs) = served, expected
    for step, (token, expected_token) in enumerate(zip(tokens, expected_tokens)):
        assert expected_token in logprobs[step], (name, step)
        difference = abs(logprobs[step][expected_token] - expected_logprobs[step][expected_token])
        assert difference <= LOGPROB_TOL, (name, step, difference)
        if token != expected_token:
            return step + 1
    return len(tokens)


def test_fused_op_serves_what_the_torch_path_serves(engine, monkeypatch):
    root, llm = engine
    calls = []
    stock = fused.run_slots
    monkeypatch.setattr(fused, "run_slots", lambda *a: calls.append(1) or stock(*a))
    for names in ([*SERVED_KINDS, None], ["sora_cay"] * 3, ["lora"]):  # every kind mixed; one slot for the batch
        monkeypatch.setattr(fused, "ENABLED", False)
        expected = generate(llm, root, names)
        assert not calls
        monkeypatch.setattr(fused, "ENABLED", True)
        served = generate(llm, root, names)
        assert calls, "the fused op did not run"
        calls.clear()
        steps = [compared_steps(s, e, str(name)) for name, s, e in zip(names, served, expected)]
        assert sum(steps) > 2 * len(names), steps  # decode steps compared, not only the prefill's
