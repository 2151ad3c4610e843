"""vLLM with the plugin at tensor_parallel_size=2 (two CPU workers): exact against the eager runtime.

Column-parallel layers (qkv_proj with biases, gate_up_proj) hold output-row shards: SORA's rotation
all-reduces (z U) in token order (each rank may hold an adapter in another slot), DoRA's g comes from the
rank's own rows of ||W0||^2 and W0 A^T. Row-parallel layers (o_proj, down_proj) hold input-column shards:
DoRA sums the ranks' partial ||W0||^2 and W0 A^T in float64, the bias shift is added on rank 0 only."""

from __future__ import annotations

import os

import pytest

import sora_serve as ss
from sora_serve.tiny import make_tiny_checkpoint

from .helpers import VLLM_BACKENDS, vllm_backend, write_random_adapter
from .reference import LOGPROB_TOL, PROMPTS, eager_reference

KINDS = {
    "sora_cay": dict(method="sora", rotation="cayley", r=4, r_p=3),
    "sora_fo": dict(method="sora", rotation="first_order", r=4, r_p=2),
    "dora": dict(method="dora"),
    "prediag": dict(method="prediag", r=4),
}


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two TP workers need two CPUs")
@pytest.mark.parametrize("backend", VLLM_BACKENDS)
def test_tensor_parallel_mixed_batch_equals_eager(tmp_path, backend):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from sora_serve.vllm_plugin.engine import make_llm

    base = make_tiny_checkpoint("qwen2", tmp_path / "base")  # 4 heads, 2 kv heads: one kv head per rank
    for i, (name, kwargs) in enumerate(KINDS.items()):
        config = ss.AdapterConfig(**{"r": 8, "target_modules": "all-linear", **kwargs})
        write_random_adapter(tmp_path / name, config, seed=10 + i, scale=0.1)
    with vllm_backend(backend):
        llm = make_llm(
            base, max_loras=3, tensor_parallel_size=2
        )  # 3 slots < 4 adapters, all full: base rows must stay base
    # Two rotations in one step: the ranks' slot numbers for them may differ (set order by name hash).
    names = [None, "sora_cay", "sora_fo", "dora", "prediag", "sora_cay", "sora_fo", None]
    ids = {name: i + 1 for i, name in enumerate(KINDS)}
    requests = [None if n is None else LoRARequest(n, ids[n], str(tmp_path / n)) for n in names]
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=0, ignore_eos=True)
    outputs = llm.generate(
        [{"prompt_token_ids": PROMPTS[0]}] * len(names), params, lora_request=requests, use_tqdm=False
    )
    del llm
    expected = {n: eager_reference(tmp_path, n, PROMPTS[0]) for n in set(names)}
    assert len({tuple(t) for t, _ in expected.values()}) == len(expected), "every adapter should change the output"
    for name, output in zip(names, outputs):
        tokens = list(output.outputs[0].token_ids)
        logprobs = [lp[t].logprob for lp, t in zip(output.outputs[0].logprobs, tokens)]
        assert tokens == expected[name][0], name
        assert max(abs(a - b) for a, b in zip(logprobs, expected[name][1])) <= LOGPROB_TOL, name
