"""Adapter directories: round trip, PEFT's own LoRA/DoRA dirs, and every kind of bad input."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import sora_serve as ss
from sora_serve.tiny import make_tiny_model

from .helpers import max_abs, random_ids, write_random_adapter

PEFT_TOL = 1e-5  # fp32 logits, our runtime vs PEFT's forward


def saved_adapter(tmp_path, arch="llama", method="sora", rotation="cayley", name="a", **kw):
    """A random adapter (`write_random_adapter`) and the model that holds it as `name`."""
    model = make_tiny_model(arch)
    targets = ["q_proj", "v_proj", "o_proj"] if arch != "gpt2" else ["c_attn", "c_proj"]
    config = ss.AdapterConfig(method=method, r=4, r_p=2, rotation=rotation, target_modules=targets, **kw)
    out = write_random_adapter(tmp_path / f"{arch}-{method}-{rotation}", config, model=model, scale=0.05, name=name)
    return model, out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize(
    "method,rotation",
    [
        ("prediag", "first_order"),
        ("sora", "first_order"),
        ("sora", "cayley"),
        ("lora", "first_order"),
        ("dora", "first_order"),
    ],
)
def test_save_load_round_trip_is_bit_exact(tmp_path, arch, method, rotation):
    trained, out = saved_adapter(tmp_path, arch, method, rotation)
    fresh = ss.load_adapter(make_tiny_model(arch), out, name="a")
    for (path, a), (path2, b) in zip(ss.adapted_layers(trained), ss.adapted_layers(fresh), strict=True):
        assert path == path2
        for (k, v), (k2, v2) in zip(
            a.adapters["a"].state_dict().items(), b.adapters["a"].state_dict().items(), strict=True
        ):
            assert k == k2 and torch.equal(v, v2), (path, k)
    ids = random_ids(trained.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(trained(ids).logits, fresh(ids).logits)
    # Loading an adapter never modifies the files it came from.
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


def test_default_name_is_the_directory_name(tmp_path):
    _, out = saved_adapter(tmp_path)
    model = ss.load_adapter(make_tiny_model("llama"), out)
    assert list(ss.adapter_configs(model)) == [out.name]


@pytest.mark.parametrize(
    "arch,use_dora,extra",
    [
        ("llama", False, {}),
        ("llama", True, {}),
        ("qwen2", True, {}),  # biases in q/k/v: DoRA must not scale them
        ("gpt2", True, {"fan_in_fan_out": True}),  # Conv1D
        ("llama", False, {"use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"o_proj": 3}}),
    ],
)
def test_peft_dirs_give_peft_logits(tmp_path, arch, use_dora, extra):
    targets = ["c_attn", "c_proj"] if arch == "gpt2" else ["q_proj", "v_proj", "o_proj"]
    peft_model = get_peft_model(
        make_tiny_model(arch),
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora, init_lora_weights=False, **extra),
    )
    with torch.no_grad():  # random magnitudes too, so g != 1
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "peft")
    ids = random_ids(peft_model.config.vocab_size)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(ids).logits
        ours = ss.load_adapter(make_tiny_model(arch), tmp_path / "peft", name="p")
        got = ours(ids).logits
    with torch.no_grad():
        base = make_tiny_model(arch)(ids).logits
    assert max_abs(expected, base) > 1e-3, "the PEFT adapter should change the logits"
    assert max_abs(got, expected) <= PEFT_TOL


def test_our_lora_and_dora_dirs_load_in_peft(tmp_path):
    for method in ("lora", "dora"):
        ours, out = saved_adapter(tmp_path, "qwen2", method)
        peft_model = PeftModel.from_pretrained(make_tiny_model("qwen2"), out).eval()
        ids = random_ids(ours.config.vocab_size)
        with torch.no_grad():
            assert max_abs(peft_model(ids).logits, ours(ids).logits) <= PEFT_TOL, method


# ---------------------------------------------------------------- bad input


def edit_config(out, **changes):
    path = out / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(out, fn):
    path = out / "adapter_model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def test_adapter_for_a_different_base_is_refused(tmp_path):
    _, out = saved_adapter(tmp_path)
    with pytest.raises(ss.AdapterError, match=r"adapter_model.safetensors.*different base"):
        ss.load_adapter(make_tiny_model("llama", hidden_size=96), out)
    with pytest.raises(ss.AdapterError, match=r"module 'model.layers.0.self_attn.o_proj' not found in the base model"):
        ss.load_adapter(make_tiny_model("gpt2"), out)
    # Same shapes, bias differs: only the fingerprint can tell (qwen2 has q/k/v biases).
    _, out_q = saved_adapter(tmp_path, "qwen2")
    with pytest.raises(
        ss.AdapterError,
        match=r"adapter_config.json: field 'base_fingerprint.model_type': the base is a 'llama' model but the "
        r"adapter was trained on a 'qwen2' one",
    ):
        ss.load_adapter(make_tiny_model("llama"), out_q)


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda out: (out / "adapter_config.json").unlink(), r"adapter_config.json: missing adapter config"),
        (
            lambda out: (out / "adapter_model.safetensors").unlink(),
            r"adapter_model.safetensors: missing adapter weights",
        ),
        (lambda out: (out / "adapter_config.json").write_text("{not json"), r"adapter_config.json: not valid JSON"),
        (
            lambda out: (out / "adapter_model.safetensors").write_bytes(b"\x00" * 40),
            r"adapter_model.safetensors: corrupt safetensors",
        ),
        (lambda out: edit_config(out, peft_type="VERA"), r"field 'peft_type': unknown peft_type 'VERA'"),
        (lambda out: edit_config(out, rotation="exp"), r"field 'rotation': unknown rotation"),
        (
            lambda out: edit_config(out, r=8),
            r"field 'base_model.model.*lora_A.weight': module '.*': shape \(4, 128\) does not match the config's r=8",
        ),
        (lambda out: edit_config(out, r_p=3), r"field 'base_model.model.*sora_C': module '.*': shape"),
        (lambda out: edit_config(out, format_version=99), r"field 'format_version'"),
        (lambda out: edit_config(out, s0=-1), r"field 's0'"),
        (
            lambda out: edit_tensors(
                out,
                lambda t: t.__setitem__(next(k for k in t if k.endswith("sora_d")), torch.full((128,), float("nan"))),
            ),
            r"field 'base_model.model.*sora_d': module '.*': contains NaN",
        ),
        (
            lambda out: edit_tensors(out, lambda t: t.pop(next(k for k in t if k.endswith("sora_D")))),
            r"missing tensor\(s\) base_model.model.*sora_D",
        ),
        (
            lambda out: edit_tensors(
                out, lambda t: t.__setitem__("base_model.model.model.layers.0.mlp.up_proj.magic", torch.ones(2))
            ),
            r"field 'base_model.model.model.layers.0.mlp.up_proj.magic': unexpected tensor for a sora adapter",
        ),
    ],
)
def test_damaged_adapter_dirs_get_clear_errors(tmp_path, damage, match):
    _, out = saved_adapter(tmp_path)
    damage(out)
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ss.AdapterError, match=match):
        ss.load_adapter(model, out)
    # Validation happens before the model is touched.
    assert not list(ss.adapted_layers(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_save_refuses_existing_dir_and_nan_without_leftovers(tmp_path):
    model, out = saved_adapter(tmp_path)
    with pytest.raises(ss.AdapterError, match="output exists"):
        ss.save_adapter(model, out, "a")
    with torch.no_grad():
        next(iter(ss.adapted_layers(model)))[1].adapters["a"].d[0] = float("nan")
    with pytest.raises(ss.AdapterError, match="NaN"):
        ss.save_adapter(model, tmp_path / "nan", "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_stock_peft_lora_options_we_cannot_serve_are_refused(tmp_path):
    peft_model = get_peft_model(make_tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
    peft_model.save_pretrained(tmp_path / "p")
    with pytest.raises(ss.AdapterError, match="field 'lora_bias'"):
        ss.read_adapter(tmp_path / "p")


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_written_adapter_dirs_follow_the_umask(tmp_path, umask):
    """A server running as another user (group) can read what an operator wrote under umask 022
    (027): the dir gets the mode PEFT's `save_pretrained` gives its dir, and every file 0666 & ~umask
    (safetensors alone writes 0600, PEFT's weights file included)."""
    model = make_tiny_model("llama")
    ss.attach(model, ss.AdapterConfig(method="sora", r=4, r_p=2, target_modules=["q_proj"]), "a", verbose=False)
    peft_model = get_peft_model(make_tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    previous = os.umask(umask)
    try:
        ours = ss.save_adapter(model, tmp_path / "ours", "a")
        peft_model.save_pretrained(tmp_path / "peft")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(ours.stat().st_mode) == stat.S_IMODE((tmp_path / "peft").stat().st_mode) == 0o777 & ~umask
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert stat.S_IMODE((ours / name).stat().st_mode) == 0o666 & ~umask, name
