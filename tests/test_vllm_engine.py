"""vLLM with the plugin: a mixed batch of every adapter kind equals the eager runtime (one engine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import sora_serve as ss
from sora_serve.tiny import make_tiny_checkpoint, make_tiny_model
from sora_serve.vllm_plugin import check_vllm_version

from .helpers import perturb_adapter

LOGPROB_TOL = 1e-4  # fp32, per generated token
KINDS = {
    "lora": dict(method="lora"),
    "dora": dict(method="dora"),
    "prediag": dict(method="prediag", r=4),
    "sora_fo": dict(method="sora", r_p=2),
    "sora_cay": dict(method="sora", rotation="cayley", r=4, r_p=3),
}
PROMPTS = [[5, 17, 99, 23, 4], [7, 7, 300, 12], [101, 44, 9, 250, 3, 88]]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    base = make_tiny_checkpoint("qwen2", root / "base")  # q/k/v biases: the bias path is exercised
    for i, (name, kwargs) in enumerate(KINDS.items()):
        model = make_tiny_model("qwen2")
        ss.attach(model, ss.AdapterConfig(**{"r": 8, "target_modules": "all-linear", **kwargs}), "a", verbose=False)
        perturb_adapter(model, "a", scale=0.1, seed=i)
        ss.save_adapter(model, root / name, "a")
    from sora_serve.vllm_plugin.engine import make_llm

    llm = make_llm(base, max_loras=4, max_lora_rank=16)  # 4 slots < 5 adapters: slots are evicted and reused
    yield root, llm
    del llm


def vllm_generate(llm, root, names: list[str | None], prompts: list[list[int]], max_tokens: int = 8):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    ids = {name: i + 1 for i, name in enumerate(KINDS)}
    requests = [None if n is None else LoRARequest(n, ids[n], str(root / n)) for n in names]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=requests, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]) for o in outputs]


@torch.no_grad()
def eager_reference(root, name: str | None, prompt: list[int], max_tokens: int = 8):
    """Greedy tokens and their log-probabilities from the HF model with our runtime adapter."""
    model = AutoModelForCausalLM.from_pretrained(root / "base").eval()
    if name is not None:
        ss.load_adapter(model, root / name)
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    logprobs = torch.log_softmax(model(torch.tensor([tokens])).logits[0].double(), -1)
    new = tokens[len(prompt) :]
    return new, [logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(new)]


@pytest.mark.slow
def test_mixed_batch_of_every_kind_equals_eager(served):
    root, llm = served
    names = [None, *KINDS, "sora_cay", None, "lora"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    results = vllm_generate(llm, root, names, prompts)
    base_tokens = eager_reference(root, None, PROMPTS[0])[0]
    for name, prompt, (tokens, logprobs) in zip(names, prompts, results):
        expected_tokens, expected_logprobs = eager_reference(root, name, prompt)
        assert tokens == expected_tokens, name
        assert max(abs(a - b) for a, b in zip(logprobs, expected_logprobs)) <= LOGPROB_TOL, name
        if name is not None and prompt == PROMPTS[0]:
            assert tokens != base_tokens, f"{name} should change the output"


@pytest.mark.slow
def test_base_requests_stay_base_with_all_slots_full(served):
    """vLLM CPU's stock ops give base rows the last slot's adapter here (index -1 wraps)."""
    root, llm = served
    names = ["sora_cay", "dora", None, "prediag", "lora", "sora_cay"]  # 4 adapters in 4 slots: decode runs them padded in one batch
    results = vllm_generate(llm, root, names, [PROMPTS[0]] * len(names))
    assert results[2][0] == eager_reference(root, None, PROMPTS[0])[0]
    for i in (0, 1, 3, 4):
        assert results[i][0] == eager_reference(root, names[i], PROMPTS[0])[0], names[i]


STOCK_LOAD = """
import sys
from vllm.lora.lora_model import LoRAModel
from vllm.lora.peft_helper import PEFTHelper
from vllm.config.lora import LoRAConfig
from vllm.plugins import load_general_plugins
load_general_plugins()  # what every vLLM process does at start; VLLM_PLUGINS decides whether ours loads
helper = PEFTHelper.from_local_dir(sys.argv[1], 256)
try:
    helper.validate_legal(LoRAConfig(max_lora_rank=16))
    LoRAModel.from_local_checkpoint(sys.argv[1], {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, helper, device="cpu")
    print("LOADED")
except ValueError as exc:
    print("REFUSED", exc)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind,stock_error", [("sora_cay", "is unsupported LoRA weight"), ("dora", "vLLM does not yet support DoRA")])
def test_stock_vllm_refuses_what_the_plugin_loads(served, kind, stock_error):
    root, _ = served
    # VLLM_PLUGINS names the plugins allowed to load: a non-matching name disables ours (stock vLLM).
    for plugins, expected in (("no-such-plugin", f"REFUSED"), ("sora_serve", "LOADED")):
        env = {**os.environ, "VLLM_PLUGINS": plugins}
        out = subprocess.run([sys.executable, "-c", STOCK_LOAD, str(root / kind)], capture_output=True, text=True, timeout=300, env=env)
        assert expected in out.stdout, out.stdout + out.stderr[-2000:]
        if expected == "REFUSED":
            assert stock_error in out.stdout


def test_plugin_refuses_untested_vllm_versions():
    check_vllm_version("0.32.3")
    with pytest.raises(RuntimeError, match="refuses vLLM 0.33.0"):
        check_vllm_version("0.33.0")


MERGED_SCRIPT = """
import json, sys
if __name__ == "__main__":
    from vllm import SamplingParams
    from sora_serve.vllm_plugin.engine import make_llm
    llm = make_llm(sys.argv[1], enable_lora=False)
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=0, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": json.loads(sys.argv[2])}], params, use_tqdm=False)[0].outputs[0]
    print("RESULT", json.dumps([list(out.token_ids), [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)]]))
"""


@pytest.mark.slow
def test_folded_checkpoint_serves_as_a_plain_model(served, tmp_path):
    from sora_serve.converters.fold import fold_adapter

    root, _ = served
    fold_adapter(root / "base", root / "sora_cay", tmp_path / "merged", verify=False, progress=False)
    script = tmp_path / "merged.py"
    script.write_text(MERGED_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "merged"), str(PROMPTS[0])], capture_output=True, text=True, timeout=600)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT")), None)
    assert line is not None, out.stderr[-3000:]
    tokens, logprobs = json.loads(line.split(" ", 1)[1])
    expected_tokens, expected_logprobs = eager_reference(root, "sora_cay", PROMPTS[0])
    assert tokens == expected_tokens
    assert max(abs(a - b) for a, b in zip(logprobs, expected_logprobs)) <= LOGPROB_TOL


def random_slot_layer(slot_specs, sizes=(24, 8, 8), in_f=32, max_rank=16):
    """A stand-in for a vLLM linear LoRA layer (qkv-like, three slices) with random slot contents.

    slot_specs: (rank, rotation rank, has scale/shift) per slot."""
    from types import SimpleNamespace

    from sora_serve.vllm_plugin import patches

    layer = SimpleNamespace(
        tp_size=1, output_slices=sizes,
        lora_a_stacked=tuple(torch.zeros(len(slot_specs), 1, max_rank, in_f) for _ in sizes),
        lora_b_stacked=tuple(torch.zeros(len(slot_specs), 1, n, max_rank) for n in sizes),
    )
    state = patches.slot_state(layer)
    for slot, (r, k, scale) in enumerate(slot_specs):
        state.rank[slot], state.rot_rank[slot], state.has_scale[slot], state.has_shift[slot] = r, k, scale, scale
        for i, n in enumerate(sizes):
            layer.lora_a_stacked[i][slot, 0, :r] = torch.randn(r, in_f)
            layer.lora_b_stacked[i][slot, 0, :, :r] = torch.randn(n, r)
            if scale:
                state.scale[i][slot] = 1 + 0.1 * torch.randn(n)
                state.shift[i][slot] = 0.1 * torch.randn(n)
            state.rot_ut[i][slot, :k] = 0.1 * torch.randn(k, n)
            state.rot_vt[i][slot, :k] = 0.1 * torch.randn(k, n)
    return layer, state


def per_slot_reference(layer, state, indices, x, base):
    """float64 ServingFactors.apply, slot by slot and slice by slice; -1 rows stay base."""
    from sora_serve.methods import ServingFactors

    expected = base.double()
    for slot in sorted(s for s in set(indices.tolist()) if s >= 0):
        rows = (indices == slot).nonzero().squeeze(1)
        r, k = state.rank[slot], state.rot_rank[slot]
        expected[rows] = torch.cat([
            ServingFactors(
                layer.lora_a_stacked[i][slot, 0, :r], layer.lora_b_stacked[i][slot, 0, :, :r], state.scale[i][slot], state.shift[i][slot],
                state.rot_ut[i][slot, :k].T, state.rot_vt[i][slot, :k].T,
            ).to(torch.float64).apply(x[rows].double(), part)
            for i, part in enumerate(base[rows].double().split(layer.output_slices, dim=1))
        ], dim=1)
    return expected


# Token -> slot layouts, and the strategy of the op each one takes.
LAYOUTS = {
    "one slot, whole batch": ([1] * 6, "one slot"),
    "decode, one token per slot": ([0, 1, 2, 3, 4], "padded"),
    "uneven counts and base rows": ([0, 1, -1, 2, 3, 1, -1, 0, 1], "padded"),
    "slots absent inside the range": ([4, 0, 2, -1, 0, 2, 4], "padded"),
    "base rows only": ([-1, -1, -1], "none"),
    "very uneven (prefill)": ([2] * 12 + [0, -1, 1], "per slot"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grouped_op_equals_each_slot_alone(layout):
    """Every strategy of the plugin's op (one slot; padded batched GEMMs; one group per slot) gives
    each row its own slot's ServingFactors.apply, slot -1 rows untouched. Slots mix ranks 0-16,
    rotation ranks 0-4 and scale/shift on or off, so padding to the largest rank is exercised."""
    from types import SimpleNamespace

    from sora_serve.vllm_plugin import patches

    torch.manual_seed(0)
    layer, state = random_slot_layer([(4, 0, False), (8, 4, True), (16, 2, True), (2, 0, True), (0, 3, False)])
    indices, strategy = torch.tensor(LAYOUTS[layout][0]), LAYOUTS[layout][1]
    plan = patches.make_plan(indices)
    assert ("none" if not plan.slots else "one slot" if plan.rows is None else "padded" if plan.balanced else "per slot") == strategy
    x, base = torch.randn(len(indices), 32), torch.randn(len(indices), sum(layer.output_slices))
    layer.punica_wrapper = SimpleNamespace(token_lora_indices=indices)
    result = patches.grouped_adapter_op(layer, x, base.clone())
    assert torch.allclose(result.double(), per_slot_reference(layer, state, indices, x, base), atol=1e-4)  # fp32 GEMMs vs float64
    assert torch.equal(result[indices == -1], base[indices == -1])


def test_batch_plan_is_recomputed_when_vllm_rewrites_the_indices():
    """The per-step plan is cached across layers, and refreshed when the persistent index
    buffer is overwritten in place (as vLLM does every step), version counter bumped or not."""
    from types import SimpleNamespace

    from sora_serve.vllm_plugin import patches

    buffer = torch.tensor([0, 0, 1, -1])
    wrapper = SimpleNamespace(token_lora_indices=buffer)
    first = patches.batch_plan(wrapper, 4)
    assert patches.batch_plan(wrapper, 4) is first and first.slots == [0, 1] and first.counts == [2, 1]
    buffer.copy_(torch.tensor([2, 2, 2, 2]))
    second = patches.batch_plan(wrapper, 4)
    assert second.slots == [2] and second.rows is None
    buffer.data.copy_(torch.tensor([1, -1, 1, 0]))  # .data: no version bump (as in vLLM's TP workers)
    third = patches.batch_plan(wrapper, 4)
    assert third.slots == [0, 1] and third.counts == [1, 2]


def test_a_slot_refilled_by_plain_lora_has_identity_extras():
    """The padded path reads every present slot's extras: a slot reused by a plain LoRA must
    return to scale 1, shift 0, no rotation."""
    from sora_serve.vllm_plugin import patches

    layer, state = random_slot_layer([(4, 0, False), (8, 4, True)])
    patches.fill_plain_lora_slot(layer, 1, None)
    assert state.rot_rank[1] == 0 and not state.has_scale[1]
    for i, n in enumerate(layer.output_slices):
        assert not state.rot_ut[i][1].any() and not state.rot_vt[i][1].any() and not state.shift[i][1].any()
        assert torch.equal(state.scale[i][1], torch.ones(n))
