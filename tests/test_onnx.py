"""ONNX: merged decoder with KV cache = PyTorch; switchable-adapter graph = runtime adapters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import sora_serve as ss
from converters.fold import fold_adapter
from converters.onnx_export import export_onnx
from converters.onnx_runtime import OnnxCausalLM
from sora_serve.tiny import make_tiny_model

from .helpers import perturb_adapter, random_ids

ONNX_TOL = 1e-4  # fp32 logits, ONNX Runtime vs PyTorch


def save_random_adapter(arch, out, method, r, r_p=2, rotation="first_order", targets=("q_proj", "v_proj", "down_proj"), seed=0):
    model = make_tiny_model(arch)
    ss.attach(model, ss.AdapterConfig(method=method, r=r, r_p=r_p, rotation=rotation, target_modules=list(targets)), "a", verbose=False)
    perturb_adapter(model, "a", scale=0.1, seed=seed)
    return ss.save_adapter(model, out, "a")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_merged_export_generates_the_same_tokens(tiny_checkpoints, tmp_path, arch):
    adapter = save_random_adapter(arch, tmp_path / "sora", "sora", 4, rotation="cayley")
    merged = tmp_path / "merged"
    fold_adapter(tiny_checkpoints[arch], adapter, merged, verify=False, progress=False)
    result = export_onnx(merged, tmp_path / "onnx", verify=True)
    assert result["max_abs_error"]["base"] <= ONNX_TOL

    torch_model = AutoModelForCausalLM.from_pretrained(merged).eval()
    prompt = random_ids(512, batch=2, length=6, seed=5)
    with torch.no_grad():
        expected = torch_model.generate(prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16).numpy()
        logits = torch_model(torch.from_numpy(expected)).logits.numpy()
    onnx_lm = OnnxCausalLM(tmp_path / "onnx")
    tokens = onnx_lm.generate(prompt.numpy(), 16)
    assert np.array_equal(tokens, expected)
    assert np.abs(onnx_lm.logits(expected) - logits).max() <= ONNX_TOL


def test_switchable_adapters_match_the_runtime(tiny_checkpoints, tmp_path):
    base = tiny_checkpoints["qwen2"]
    adapters = [
        save_random_adapter("qwen2", tmp_path / "lora4", "lora", 4, seed=1),
        save_random_adapter("qwen2", tmp_path / "prediag8", "prediag", 8, targets=("q_proj", "o_proj", "up_proj"), seed=2),
        save_random_adapter("qwen2", tmp_path / "soracay", "sora", 8, r_p=2, rotation="cayley", seed=3),
    ]
    result = export_onnx(base, tmp_path / "onnx", adapters, verify=False)
    assert result["mode"] == "adapters"
    onnx_lm = OnnxCausalLM(tmp_path / "onnx")
    ids = random_ids(512, batch=2, length=10, seed=7)
    runtime = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        base_logits = runtime(ids).logits.numpy()
    assert np.abs(onnx_lm.logits(ids.numpy()) - base_logits).max() <= ONNX_TOL
    for adapter in adapters:
        ss.load_adapter(runtime, adapter)
        with torch.no_grad():
            expected = runtime(ids).logits.numpy()
        got = onnx_lm.logits(ids.numpy(), adapter=adapter.name)
        assert np.abs(expected - base_logits).max() > 1e-3, f"{adapter.name} should change the logits"
        assert np.abs(got - expected).max() <= ONNX_TOL, adapter.name
    # The adapters really switch per run: back to the base with no adapter.
    assert np.abs(onnx_lm.logits(ids.numpy()) - base_logits).max() <= ONNX_TOL
    with pytest.raises(ss.AdapterError, match="unknown adapter 'nope'"):
        onnx_lm.logits(ids.numpy(), adapter="nope")


def test_bad_input(tiny_checkpoints, tmp_path):
    with pytest.raises(ss.AdapterError, match="config.json: missing model config"):
        export_onnx(tmp_path, tmp_path / "out")
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(ss.AdapterError, match="output exists"):
        export_onnx(tiny_checkpoints["llama"], out, verify=False)
    other = save_random_adapter("qwen2", tmp_path / "qwen-adapter", "sora", 4)
    with pytest.raises(ss.AdapterError, match="base_fingerprint"):
        export_onnx(tiny_checkpoints["llama"], tmp_path / "out", [other], verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "qwen-adapter"]
    assert list(out.iterdir()) == []
