"""attach / active adapter / mixed batch / disabled, on tiny models of several architectures."""

from __future__ import annotations

import pytest
import torch

import sora_serve as ss
from sora_serve.tiny import make_tiny_model

from .helpers import max_abs, perturb_adapter, random_ids

KINDS = {
    "lora": ss.AdapterConfig(method="lora", r=4, target_modules="all-linear"),
    "dora": ss.AdapterConfig(method="dora", r=4, target_modules="all-linear"),
    "prediag": ss.AdapterConfig(method="prediag", r=4, target_modules="all-linear"),
    "sora_fo": ss.AdapterConfig(method="sora", r=4, r_p=2, target_modules="all-linear"),
    "sora_cay": ss.AdapterConfig(
        method="sora", r=2, r_p=3, rotation="cayley", target_modules=["q_proj", "v_proj", "c_attn", "c_fc"]
    ),
}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_attach_keeps_logits_exact_and_freezes_the_base(arch):
    model = make_tiny_model(arch)
    ids = random_ids(model.config.vocab_size)
    with torch.no_grad():
        base = model(ids).logits
    for name, config in KINDS.items():
        ss.attach(model, config, name, verbose=False)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, base), name
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(f"adapters.{name}." in n for n in trainable), name


@pytest.fixture(scope="module")
def model_with_adapters():
    model = make_tiny_model("llama").double()
    for name, config in KINDS.items():
        ss.attach(model, config, name, verbose=False)
        perturb_adapter(model, name, seed=len(name))
    return model


def test_mixed_batch_rows_equal_their_adapter_alone(model_with_adapters):
    model = model_with_adapters
    names = [None, "lora", "dora", "prediag", "sora_fo", "sora_cay", "sora_fo", None]
    ids = random_ids(model.config.vocab_size, batch=len(names))
    with torch.no_grad(), ss.use_adapters(model, names):
        mixed = model(ids).logits
    with torch.no_grad(), ss.adapters_disabled(model):
        base = model(ids).logits
    for row, name in enumerate(names):
        ss.set_active_adapter(model, name)
        with torch.no_grad():
            alone = model(ids[row : row + 1]).logits[0]
        assert max_abs(mixed[row], alone) <= 1e-10, (row, name)
        if name is None:
            assert torch.equal(mixed[row], base[row])
        else:
            assert max_abs(alone, base[row]) > 1e-3, f"adapter {name} had no effect"


def test_generate_with_per_row_adapters(model_with_adapters):
    model = model_with_adapters
    names = ["sora_cay", None, "dora"]
    ids = random_ids(model.config.vocab_size, batch=3, length=5, seed=3)
    with torch.no_grad(), ss.use_adapters(model, names):
        mixed = model.generate(ids, max_new_tokens=6, do_sample=False)
    for row, name in enumerate(names):
        ss.set_active_adapter(model, name)
        with torch.no_grad():
            alone = model.generate(ids[row : row + 1], max_new_tokens=6, do_sample=False)
        assert torch.equal(mixed[row], alone[0]), name


def test_disabled_and_none_active_run_the_base():
    model = make_tiny_model("gpt2")
    ids = random_ids(model.config.vocab_size)
    with torch.no_grad():
        base = model(ids).logits
    ss.attach(model, KINDS["sora_cay"], "a", verbose=False)
    perturb_adapter(model, "a")
    with torch.no_grad():
        assert max_abs(model(ids).logits, base) > 1e-4
        with ss.adapters_disabled(model):
            assert torch.equal(model(ids).logits, base)
        ss.set_active_adapter(model, None)
        assert torch.equal(model(ids).logits, base)


def test_unknown_names_and_targets_are_refused():
    model = make_tiny_model("llama")
    with pytest.raises(ss.AdapterError, match="target_modules"):
        ss.attach(model, ss.AdapterConfig(target_modules=["nope_proj"]), "a")
    with pytest.raises(ss.AdapterError, match="embed_tokens.*Embedding"):
        ss.attach(model, ss.AdapterConfig(target_modules=["embed_tokens"]), "a")
    ss.attach(model, ss.AdapterConfig(), "a", verbose=False)
    with pytest.raises(ss.AdapterError, match="already attached"):
        ss.attach(model, ss.AdapterConfig(), "a")
    with pytest.raises(ss.AdapterError, match="unknown adapter"):
        ss.set_active_adapter(model, "b")
    with pytest.raises(ss.AdapterError, match="unknown adapter"):
        with ss.use_adapters(model, ["a", "b"]):
            pass
    with pytest.raises(ss.AdapterError, match="method"):
        ss.AdapterConfig(method="vera")


def test_trainable_count_is_reported(capsys):
    model = make_tiny_model("llama")
    ss.attach(model, ss.AdapterConfig(method="prediag", r=4, target_modules=["q_proj"]), "a")
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    expected = layers * (4 * hidden + hidden * 4 + hidden)  # A, B, d per q_proj
    assert ss.count_parameters(model)[0] == expected
    assert f"{expected:,} trainable" in capsys.readouterr().out
