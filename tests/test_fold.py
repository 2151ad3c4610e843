"""Fold: merged checkpoints equal the runtime adapter, keep the base's sharding, stream, refuse bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import sora_serve as ss
from converters.fold import fold_adapter
from sora_serve.tiny import make_tiny_checkpoint, make_tiny_model

from .helpers import max_abs, perturb_adapter, random_ids

FOLD_TOL = 1e-4  # fp32 logits, merged vs runtime adapter
KINDS = [("lora", "first_order"), ("dora", "first_order"), ("prediag", "first_order"), ("sora", "first_order"), ("sora", "cayley")]


def make_adapter(arch: str, method: str, rotation: str, out, targets="all-linear", **overrides):
    model = make_tiny_model(arch, **overrides)
    ss.attach(model, ss.AdapterConfig(method=method, rotation=rotation, r=4, r_p=2, target_modules=targets), "a", verbose=False)
    perturb_adapter(model, "a", scale=0.1)
    return ss.save_adapter(model, out, "a")


@pytest.fixture(scope="module")
def sharded_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {arch: make_tiny_checkpoint(arch, root / arch, max_shard_size="300KB") for arch in ("llama", "qwen2", "gpt2")}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("method,rotation", KINDS)
def test_merged_logits_equal_runtime_adapter(sharded_bases, tmp_path, arch, method, rotation):
    base = sharded_bases[arch]
    adapter = make_adapter(arch, method, rotation, tmp_path / "adapter")
    result = fold_adapter(base, adapter, tmp_path / "merged", verify=False, progress=False)

    ids = random_ids(512, batch=2, length=12)
    runtime = ss.load_adapter(AutoModelForCausalLM.from_pretrained(base).eval(), adapter)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        expected, got = runtime(ids).logits, merged(ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(base).eval()(ids).logits
    assert max_abs(expected, base_logits) > 1e-3  # the adapter matters
    assert max_abs(got, expected) <= FOLD_TOL
    # Same shards, same index layout, same side files; the base is untouched.
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"] and result["shards"] >= 2
    assert {p.name for p in base.iterdir()} == {p.name for p in (tmp_path / "merged").iterdir()}


def test_verify_reports_the_error_and_float64_math(sharded_bases, tmp_path):
    adapter = make_adapter("qwen2", "sora", "cayley", tmp_path / "adapter")
    result = fold_adapter(sharded_bases["qwen2"], adapter, tmp_path / "m", math_dtype="float64", progress=False)
    assert 0 <= result["max_abs_error"] <= FOLD_TOL


def test_tied_output_head_is_untied(tmp_path, capsys):
    base = make_tiny_checkpoint("llama", tmp_path / "base", tie_word_embeddings=True)
    adapter = make_adapter("llama", "sora", "first_order", tmp_path / "adapter", targets=["lm_head", "q_proj"], tie_word_embeddings=True)
    result = fold_adapter(base, adapter, tmp_path / "merged", progress=False)
    assert result["untied"] == ["lm_head"] and "untied ['lm_head']" in capsys.readouterr().out
    assert result["max_abs_error"] <= FOLD_TOL
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not torch.equal(merged.lm_head.weight, merged.model.embed_tokens.weight)
    original = AutoModelForCausalLM.from_pretrained(base)
    assert torch.equal(merged.model.embed_tokens.weight, original.model.embed_tokens.weight)


PEAK_SCRIPT = """
import resource, sys
from converters.fold import fold_adapter
from converters.checkpoint import Checkpoint
import sora_serve as ss
Checkpoint(sys.argv[1]).meta_model; ss.read_adapter(sys.argv[2])  # imports and lazy set-up first
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fold_adapter(sys.argv[1], sys.argv[2], sys.argv[3], verify=False, progress=False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.slow
def test_peak_memory_stays_near_one_shard(tmp_path):
    big = dict(hidden_size=1024, intermediate_size=2048, num_layers=6, vocab_size=4096)
    base = make_tiny_checkpoint("llama", tmp_path / "base", max_shard_size="40MB", **big)
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    adapter = make_adapter("llama", "sora", "cayley", tmp_path / "adapter", **big)
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(base), str(adapter), str(tmp_path / "m")], capture_output=True, text=True, check=True)
    growth = int(out.stdout.split()[-1])
    shards = len(list(base.glob("*.safetensors")))
    assert shards >= 5 and model_bytes > 200e6
    # One 40 MB shard read + written, plus a few layer-sized temporaries; the whole model never.
    assert growth < 0.5 * model_bytes, f"RSS grew {growth / 1e6:.0f} MB folding a {model_bytes / 1e6:.0f} MB model"


def test_bad_input_is_refused_without_leftovers(sharded_bases, tmp_path):
    base = sharded_bases["llama"]
    adapter = make_adapter("llama", "sora", "first_order", tmp_path / "adapter")
    other = make_adapter("qwen2", "sora", "first_order", tmp_path / "qwen-adapter")
    out = tmp_path / "out"
    with pytest.raises(ss.AdapterError, match="base_fingerprint.*different base"):
        fold_adapter(base, other, out, progress=False)
    (tmp_path / "nocfg").mkdir()
    with pytest.raises(ss.AdapterError, match=r"nocfg/config.json: missing model config"):
        fold_adapter(tmp_path / "nocfg", adapter, out, progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in base.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    (broken / "model-00001-of-00007.safetensors").write_bytes(b"garbage!" * 4)
    with pytest.raises(ss.AdapterError, match="model-00001-of-00007.safetensors: corrupt"):
        fold_adapter(broken, adapter, out, progress=False, verify=False)
    with pytest.raises(ss.AdapterError, match="adapter_config.json: missing"):
        fold_adapter(base, tmp_path, out, progress=False)
    assert not out.exists()
    out.mkdir()
    with pytest.raises(ss.AdapterError, match="output exists"):
        fold_adapter(base, adapter, out, progress=False)
    # Unwritable output (a path through a regular file: refused even for root).
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    with pytest.raises(ss.AdapterError, match="blocker/out: cannot write output"):
        fold_adapter(base, adapter, blocker / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "blocker", "broken", "nocfg", "out", "qwen-adapter"]
    assert list(out.iterdir()) == []
