"""onnxruntime-genai folders (`export-onnx --format genai`): og.Model opens them, og.Adapters switches
every adapter kind per generator, and genai's greedy search gives the PyTorch runtime's tokens."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime_genai as og
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sora_serve as ss
from sora_serve.cli import main as cli_main
from sora_serve.converters.fold import fold_adapter
from sora_serve.converters.onnx_export import export_onnx
from sora_serve.converters.onnx_genai import GENAI_CONFIG_FILE, GenaiCausalLM

from .helpers import ATTENTION_AND_MLP, random_ids, write_random_adapter
from .reference import NEW_TOKENS, ONNX_TOL, generate_greedy

MLP = {"llama": ("o_proj", "up_proj"), "qwen2": ("o_proj", "up_proj"), "gpt2": ("c_fc",)}
# name -> (method, r, r_p, rotation, other layers): every kind, different ranks and layer sets;
# factors perturbed by 0.05 (the runtime refuses updates over 10x a layer's norm).
KINDS = {
    "lora4": ("lora", 4, 2, "first_order", False),
    "dora2": ("dora", 2, 2, "first_order", False),
    "prediag8": ("prediag", 8, 2, "first_order", True),
    "sora_first": ("sora", 8, 2, "first_order", False),
    "sora_cayley": ("sora", 4, 2, "cayley", True),
}


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def genai_export(request, tiny_checkpoints, tmp_path_factory):
    """(arch, base dir, adapter dirs, export result, GenaiCausalLM) for one architecture."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"genai-{arch}")
    adapters = [
        write_random_adapter(
            root / name,
            arch=arch,
            method=method,
            r=r,
            r_p=r_p,
            rotation=rotation,
            target_modules=list(MLP[arch] if other else ATTENTION_AND_MLP[arch]),
            seed=seed,
            scale=0.05,
        )
        for seed, (name, (method, r, r_p, rotation, other)) in enumerate(KINDS.items(), start=1)
    ]
    result = export_onnx(tiny_checkpoints[arch], root / "genai", adapters, output_format="genai")
    return arch, tiny_checkpoints[arch], adapters, result, GenaiCausalLM(root / "genai")


def test_export_writes_what_genai_reads(genai_export):
    arch, _, adapters, result, lm = genai_export
    folder = lm.folder
    config = json.loads((folder / GENAI_CONFIG_FILE).read_text())
    # genai's "gpt2" type expects one combined past_%d cache per layer; ours has key/value, as "decoder" does.
    assert config["model"]["type"] == {"llama": "llama", "qwen2": "qwen2", "gpt2": "decoder"}[arch]
    assert config["search"]["past_present_share_buffer"] is False  # present = past + new, not a max-length buffer
    assert lm.model.type == config["model"]["type"]
    assert sorted(p.name for p in (folder / "adapters").iterdir()) == sorted(f"{a.name}.onnx_adapter" for a in adapters)
    assert result["format"] == "genai" and set(result["genai_max_abs_error"]) == {"base", *KINDS}
    assert max(result["genai_max_abs_error"].values()) <= ONNX_TOL  # next-token logits through og.Generator
    assert max(result["max_abs_error"].values()) <= ONNX_TOL  # every position through onnxruntime


def test_every_adapter_kind_generates_the_runtime_tokens(genai_export):
    """16 greedy tokens (batch of 2, genai's own KV cache) = transformers' generate with the adapter loaded."""
    arch, base, adapters, _, lm = genai_export
    runtime = AutoModelForCausalLM.from_pretrained(base).eval()
    prompt = random_ids(512, batch=2, length=6, seed=11)
    base_tokens = generate_greedy(runtime, prompt)
    assert np.array_equal(lm.generate(prompt.numpy(), NEW_TOKENS), base_tokens)
    for adapter in adapters:
        ss.load_adapter(runtime, adapter)  # made active
        expected = generate_greedy(runtime, prompt)
        with torch.no_grad():
            next_logits = runtime(prompt).logits[:, -1].numpy()
        genai_logits = lm.next_token_logits(prompt.numpy(), adapter=adapter.name)
        assert np.abs(genai_logits - next_logits).max() <= ONNX_TOL, adapter.name
        assert np.abs(genai_logits - lm.next_token_logits(prompt.numpy())).max() > 1e-3, (
            f"{adapter.name} is not applied"
        )
        assert np.array_equal(lm.generate(prompt.numpy(), NEW_TOKENS, adapter=adapter.name), expected), adapter.name
    # The adapter is chosen per generator: a generator without one is the base again.
    assert np.array_equal(lm.generate(prompt.numpy(), NEW_TOKENS), base_tokens)
    with pytest.raises(ss.AdapterError, match="unknown adapter 'nope'"):
        lm.generate(prompt.numpy(), 2, adapter="nope")


def test_tokenizer_files_work_in_genai(genai_export):
    _, base, _, _, lm = genai_export
    text = "a warm , generous comedy with real heart ."
    assert og.Tokenizer(lm.model).encode(text).tolist() == AutoTokenizer.from_pretrained(base)(text)["input_ids"]


def test_merged_genai_export_through_the_cli(tiny_checkpoints, tmp_path, capsys):
    """A folded SORA-Cayley checkpoint (no adapter inputs) exported by the CLI runs in genai."""
    adapter = write_random_adapter(
        tmp_path / "sora",
        arch="qwen2",
        method="sora",
        r=4,
        r_p=2,
        rotation="cayley",
        target_modules=list(ATTENTION_AND_MLP["qwen2"]),
        seed=9,
    )
    merged = tmp_path / "merged"
    fold_adapter(tiny_checkpoints["qwen2"], adapter, merged, verify=False, progress=False)
    out = tmp_path / "genai"
    assert cli_main(["export-onnx", "--model", str(merged), "--out", str(out), "--format", "genai"]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime-genai (next token) vs PyTorch" in printed and f"wrote {out} (genai, merged)" in printed
    runtime = AutoModelForCausalLM.from_pretrained(merged).eval()
    prompt = random_ids(512, batch=1, length=7, seed=12)
    assert np.array_equal(GenaiCausalLM(out).generate(prompt.numpy(), NEW_TOKENS), generate_greedy(runtime, prompt))


def test_bad_input(tiny_checkpoints, tmp_path):
    with pytest.raises(ss.AdapterError, match="unknown format 'gguf'"):
        export_onnx(tiny_checkpoints["llama"], tmp_path / "out", output_format="gguf", verify=False)
    export_onnx(tiny_checkpoints["llama"], tmp_path / "plain", verify=False)  # the onnxruntime format: no genai config
    with pytest.raises(ss.AdapterError, match="genai_config.json: not a genai export"):
        GenaiCausalLM(tmp_path / "plain")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]
