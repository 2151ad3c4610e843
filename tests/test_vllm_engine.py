"""vLLM with the plugin: a mixed batch of every adapter kind equals the eager runtime (one engine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import sora_serve as ss
from sora_serve.tiny import make_tiny_checkpoint, make_tiny_model

from .helpers import (
    SERVED_KINDS,
    VLLM_BACKENDS,
    fine_tuned_like,
    vllm_backend,
    write_random_adapter,
    write_reference_dir,
)
from .reference import LOGPROB_TOL, PROMPTS, eager_reference


@pytest.fixture(scope="module", params=VLLM_BACKENDS)
def served(tmp_path_factory, request):
    """One engine per backend: the batch tests run on both, the others once (they do not reach the op)."""
    root = tmp_path_factory.mktemp(f"vllm-{request.param}")
    base = make_tiny_checkpoint("qwen2", root / "base")  # q/k/v biases: the bias path is exercised
    for i, (name, kwargs) in enumerate(SERVED_KINDS.items()):
        config = ss.AdapterConfig(**{"r": 8, "target_modules": "all-linear", **kwargs})
        write_random_adapter(root / name, config, seed=i, scale=0.1)
    write_reference_dir(
        base, root / "reference", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    from sora_serve.vllm_plugin.engine import make_llm

    with vllm_backend(request.param):
        llm = make_llm(base, max_loras=4, max_lora_rank=16)  # 4 slots < 5 adapters: slots are evicted and reused
    yield root, llm, request.param
    del llm


def once(served) -> None:
    """Tests of loading and refusal do not reach the op: they run on the first backend's engine only."""
    if served[2] != VLLM_BACKENDS[0]:
        pytest.skip(f"backend-independent: runs on the {VLLM_BACKENDS[0]} engine")


def vllm_generate(llm, root, names: list[str | None], prompts: list[list[int]], max_tokens: int = 8):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    ids = {name: i + 1 for i, name in enumerate([*SERVED_KINDS, "reference"])}
    requests = [None if n is None else LoRARequest(n, ids[n], str(root / n)) for n in names]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=requests, use_tqdm=False)
    return [
        (list(o.outputs[0].token_ids), [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
        for o in outputs
    ]


@pytest.mark.slow
def test_mixed_batch_of_every_kind_equals_eager(served):
    root, llm, _ = served
    names = [None, *SERVED_KINDS, "sora_cay", None, "lora"]
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
def test_paper_format_adapter_in_a_mixed_batch_equals_eager(served):
    """A dir as MaeChd/SORA saves it (lora_C/lora_D/lora_Diag, packed qkv and gate_up in vLLM)
    beside our own kinds; eager = the reference forward is pinned in test_reference_format.py."""
    root, llm, _ = served
    names = ["reference", "sora_fo", None, "lora", "reference"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    for name, prompt, (tokens, logprobs) in zip(names, prompts, vllm_generate(llm, root, names, prompts)):
        expected_tokens, expected_logprobs = eager_reference(root, name, prompt)
        assert tokens == expected_tokens, name
        assert max(abs(a - b) for a, b in zip(logprobs, expected_logprobs)) <= LOGPROB_TOL, name
    assert vllm_generate(llm, root, ["reference"], [PROMPTS[0]])[0][0] != eager_reference(root, None, PROMPTS[0])[0]


@pytest.mark.slow
def test_base_requests_stay_base_with_all_slots_full(served):
    """vLLM CPU's stock ops give base rows the last slot's adapter here (index -1 wraps)."""
    root, llm, _ = served
    names = [
        "sora_cay",
        "dora",
        None,
        "prediag",
        "lora",
        "sora_cay",
    ]  # 4 adapters in 4 slots: decode runs them padded in one batch
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
from vllm.v1.worker import lora_model_runner_mixin
load_general_plugins()  # what every vLLM process does at start; VLLM_PLUGINS decides whether ours loads
print("WORKER MANAGER", lora_model_runner_mixin.LRUCacheWorkerLoRAManager.__name__)
helper = PEFTHelper.from_local_dir(sys.argv[1], 256)
try:
    helper.validate_legal(LoRAConfig(max_lora_rank=16))
    LoRAModel.from_local_checkpoint(sys.argv[1], \
{"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, helper, device="cpu")
    print("LOADED")
except ValueError as exc:
    print("REFUSED", exc)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind,stock_error", [("sora_cay", "is unsupported LoRA weight"), ("dora", "vLLM does not yet support DoRA")]
)
def test_stock_vllm_refuses_what_the_plugin_loads(served, kind, stock_error):
    """Without the plugin, vLLM's own loader refuses our files (it never serves them wrong); with
    it, the model runner builds the plugin's loader, which the mixed-batch test shows serving them."""
    once(served)
    root, _, _ = served
    # VLLM_PLUGINS names the plugins allowed to load: a non-matching name disables ours (stock vLLM).
    for plugins, manager in (("no-such-plugin", "LRUCacheWorkerLoRAManager"), ("sora_serve", "SoraWorkerLoRAManager")):
        env = {**os.environ, "VLLM_PLUGINS": plugins}
        out = subprocess.run(
            [sys.executable, "-c", STOCK_LOAD, str(root / kind)], capture_output=True, text=True, timeout=300, env=env
        )
        assert f"WORKER MANAGER {manager}\n" in out.stdout, out.stdout + out.stderr[-2000:]
        assert "REFUSED" in out.stdout and stock_error in out.stdout, out.stdout + out.stderr[-2000:]


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

    once(served)
    root, _, _ = served
    fold_adapter(root / "base", root / "sora_cay", tmp_path / "merged", verify=False, progress=False)
    script = tmp_path / "merged.py"
    script.write_text(MERGED_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "merged"), str(PROMPTS[0])],
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = next((text for text in out.stdout.splitlines() if text.startswith("RESULT")), None)
    assert line is not None, out.stderr[-3000:]
    tokens, logprobs = json.loads(line.split(" ", 1)[1])
    expected_tokens, expected_logprobs = eager_reference(root, "sora_cay", PROMPTS[0])
    assert tokens == expected_tokens
    assert max(abs(a - b) for a, b in zip(logprobs, expected_logprobs)) <= LOGPROB_TOL


def broken_copy(root, defect: str, tmp_path):
    """A copy of the served PEFT LoRA (or an adapter for another base) with one defect."""
    import shutil

    from safetensors.torch import load_file, save_file

    target = tmp_path / defect
    if defect in (
        "other_base",
        "same_shape_other_base",
        "output_head",
    ):  # trained elsewhere; or on a module vLLM cannot adapt
        model = make_tiny_model("qwen2", **({"intermediate_size": 80} if defect == "other_base" else {}))
        if defect == "same_shape_other_base":
            fine_tuned_like(model, 1e-3, seed=13)
        targets = ["q_proj", "lm_head"] if defect == "output_head" else "all-linear"
        config = ss.AdapterConfig(method="sora", r=8, target_modules=targets)
        return write_random_adapter(target, config, model=model, seed=5, scale=0.1)
    if defect == "reference_missing_D":  # the paper's format, one lora_D.weight gone
        shutil.copytree(root / "reference", target)
        weights = load_file(target / "adapter_model.safetensors")
        del weights[next(k for k in weights if k.endswith("lora_D.weight"))]
        save_file(weights, target / "adapter_model.safetensors")
        return target
    shutil.copytree(root / "lora", target)
    config = json.loads((target / "adapter_config.json").read_text())
    if defect == "rank_mismatch":  # PEFT refuses it; vLLM alone would scale by alpha/4, eager by alpha/8
        config["r"] = 4
    elif defect == "unknown_peft_type":
        config["peft_type"] = "FOO"
    elif defect == "nan":
        weights = load_file(target / "adapter_model.safetensors")
        key = next(k for k in weights if k.endswith("lora_B.weight"))
        weights[key][0, 0] = float("nan")
        save_file(weights, target / "adapter_model.safetensors")
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


@pytest.mark.slow
@pytest.mark.parametrize(
    "defect,message",
    [
        ("rank_mismatch", r"field 'r'|rank"),
        ("unknown_peft_type", "peft_type"),
        ("nan", "NaN"),
        ("other_base", "different base"),
        ("same_shape_other_base", "base_fingerprint.weights"),
        ("reference_missing_D", r"missing tensor.*lora_D\.weight"),
        ("output_head", "output head"),
    ],
)
def test_bad_adapters_are_refused_before_admission(served, tmp_path, defect, message):
    """`vllm.LLM` with a LoRARequest runs the same validator as eager loading: each defect is a
    ValueError naming the file and field before the engine sees the request, and the engine
    keeps serving (no EngineDeadError, the next request is exact)."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    once(served)
    root, llm, _ = served
    path = broken_copy(root, defect, tmp_path)
    with pytest.raises(ValueError, match=message) as refused:
        llm.generate(
            [{"prompt_token_ids": PROMPTS[0]}],
            SamplingParams(max_tokens=4),
            lora_request=LoRARequest(defect, 900, str(path)),
            use_tqdm=False,
        )
    assert "adapter_config.json" in str(refused.value) or "adapter_model.safetensors" in str(refused.value)
    if defect != "output_head":  # eager serves the head; vLLM cannot
        with pytest.raises(ss.AdapterError, match=message):  # eager agrees on the same file
            ss.load_adapter(make_tiny_model("qwen2"), path)
    assert vllm_generate(llm, root, ["lora"], [PROMPTS[1]])[0][0] == eager_reference(root, "lora", PROMPTS[1])[0]


READ_COUNT = """
import json, sys
from collections import Counter

opened = Counter()  # (adapter file, opened by vLLM rather than sora_serve): every Python-level open
ADAPTER_DIRS = tuple(path.rstrip("/") + "/" for path in sys.argv[2:])


def count_opens(event, args):
    if event == "open" and isinstance(args[0], str) and args[0].startswith(ADAPTER_DIRS):
        frame, by_us = sys._getframe(1), False
        while frame is not None and not by_us:
            by_us, frame = "/sora_serve/" in frame.f_code.co_filename, frame.f_back
        opened[f"{args[0]} {'sora_serve' if by_us else 'other'}"] += 1


sys.addaudithook(count_opens)
from vllm import SamplingParams
from vllm.lora.request import LoRARequest
from sora_serve.adapter_format import read_adapter
from sora_serve.vllm_plugin import registry
from sora_serve.vllm_plugin.engine import make_llm

base, adapters = sys.argv[1], sys.argv[2:]
llm = make_llm(base, max_loras=2)
params = SamplingParams(max_tokens=2, temperature=0)
for _ in range(2):  # the second round must read nothing
    for i, path in enumerate(adapters):
        llm.generate([{"prompt_token_ids": [5, 17, 99]}], params, lora_request=LoRARequest(f"a{i}", i + 1, path), \
use_tqdm=False)
serving = dict(opened)
opened.clear()
for path in adapters:  # what one read opens, for comparison
    read_adapter(path)
print("COUNTS", json.dumps({"reads": dict(registry.reads), "serving": serving, "one_read": dict(opened)}))
"""


def in_process_engine(script: str, tmp_path, args: list[str], marker: str):
    """Run `script` with `args` in a fresh interpreter whose engine core and worker run in its own
    process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), and return the JSON it printed after `marker`."""
    path = tmp_path / f"{marker.lower()}.py"
    path.write_text(script)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    out = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=600, env=env)
    line = next((text for text in out.stdout.splitlines() if text.startswith(marker)), None)
    assert line is not None, out.stderr[-3000:]
    return json.loads(line.split(" ", 1)[1])


@pytest.mark.slow
def test_each_adapter_is_read_once(served, tmp_path):
    """Front end and worker in one process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): two rounds of
    requests for a SORA and a plain LoRA read each adapter's files once in all, through the
    registry; vLLM's own loader (PEFTHelper, LoRAModel.from_local_checkpoint) never opens them."""
    once(served)
    root, _, _ = served
    adapters = [str(root / "sora_cay"), str(root / "lora")]
    counts = in_process_engine(READ_COUNT, tmp_path, [str(root / "base"), *adapters], "COUNTS")
    assert counts["reads"] == {path: 1 for path in adapters}
    assert counts["serving"] == counts["one_read"]  # the files were opened as by one read each, all by sora_serve
    assert all(key.endswith(" sora_serve") for key in counts["serving"])
    assert {key.split(" ")[0] for key in counts["serving"]} >= {f"{path}/adapter_config.json" for path in adapters}


HEAD_LAYERS = """
import json, sys
from vllm import SamplingParams
from vllm.lora.layers import LogitsProcessorWithLoRA, VocabParallelEmbeddingWithLoRA
from vllm.lora.request import LoRARequest
from sora_serve.vllm_plugin.engine import make_llm


def head_layers(model):
    kinds = (LogitsProcessorWithLoRA, VocabParallelEmbeddingWithLoRA)
    return {name: [type(m).__name__, m.has_weights] for name, m in model.named_modules() if isinstance(m, kinds)}


base, adapters = sys.argv[1], sys.argv[2:]
llm = make_llm(base, max_loras=2)
params = SamplingParams(max_tokens=2, temperature=0)
requests = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(adapters)]
llm.generate([{"prompt_token_ids": [5, 17, 99]}] * len(requests), params, lora_request=requests, use_tqdm=False)
print("HEADS", json.dumps(llm.apply_model(head_layers)[0]))
"""


@pytest.mark.slow
def test_embedding_and_logits_lora_layers_stay_base_while_serving(tmp_path):
    """vLLM wraps a Llama's input embedding and logits in LoRA layers (models that list
    `embedding_modules`); no adapter the plugin serves puts weights there, and vLLM's warm-up LoRAs
    are zeros, so after serving a SORA and a LoRA both are the plugin's classes and hold no weights:
    they run the base layers' own path (their outputs: tests/test_vllm_heads.py)."""
    base = make_tiny_checkpoint("llama", tmp_path / "base")
    adapters = [
        write_random_adapter(
            tmp_path / name, arch="llama", seed=i, **{"r": 8, "target_modules": "all-linear", **kwargs}
        )
        for i, (name, kwargs) in enumerate((("sora", SERVED_KINDS["sora_cay"]), ("lora", SERVED_KINDS["lora"])))
    ]
    layers = in_process_engine(HEAD_LAYERS, tmp_path, [str(base), *map(str, adapters)], "HEADS")
    assert sorted(kind for kind, _ in layers.values()) == [
        "SoraLogitsProcessorWithLoRA",
        "SoraVocabParallelEmbeddingWithLoRA",
    ], layers
    assert not any(has_weights for _, has_weights in layers.values()), layers
