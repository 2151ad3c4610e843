"""to-lora: exact rewrite loads in PEFT and matches SORA; SVD error falls with rank; refusals say why."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import sora_serve as ss
from sora_serve.cli import main
from sora_serve.converters.to_lora import to_lora
from sora_serve.tiny import make_tiny_checkpoint, make_tiny_model

from .helpers import max_abs, random_ids, write_random_adapter


def sora_adapter(arch, out, *, keep_d_one: bool, rotation="cayley"):
    """A random SORA adapter (`write_random_adapter`); `keep_d_one`: d = 1, the exact-rewrite case."""
    targets = ["c_attn", "c_fc"] if arch == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    config = ss.AdapterConfig(method="sora", r=4, r_p=2, rotation=rotation, target_modules=targets)
    return write_random_adapter(out, config, arch=arch, edit=pin_d_to_one if keep_d_one else None)


@torch.no_grad()
def pin_d_to_one(model) -> None:
    for _, layer in ss.adapted_layers(model):
        layer.adapters["a"].d.fill_(1.0)


@pytest.mark.parametrize("rotation", ["first_order", "cayley"])
def test_exact_rewrite_loads_in_peft_and_matches_sora(tmp_path, rotation):
    base = make_tiny_checkpoint("llama", tmp_path / "base")
    adapter = sora_adapter("llama", tmp_path / "sora", keep_d_one=True, rotation=rotation)
    result = to_lora(base, adapter, tmp_path / "lora", progress=False)
    assert result["exact"] and result["rank"] == 4 + 2 * 2
    ids = random_ids(512)
    with torch.no_grad():
        expected = ss.load_adapter(make_tiny_model("llama"), adapter)(ids).logits
        peft_logits = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path / "lora").eval()(ids).logits
    assert max_abs(expected, make_tiny_model("llama")(ids).logits) > 1e-3
    assert max_abs(peft_logits, expected) <= 1e-5


def test_approximation_error_falls_with_rank(tmp_path):
    base = make_tiny_checkpoint("llama", tmp_path / "base")
    adapter = sora_adapter("llama", tmp_path / "sora", keep_d_one=False)
    with pytest.raises(ss.AdapterError, match=r"output scale \(d\) != 1 makes the update full rank.*--allow-approx"):
        to_lora(base, adapter, tmp_path / "x", progress=False)
    errors = [
        to_lora(base, adapter, tmp_path / f"r{k}", allow_approx=True, rank=k, progress=False)["overall_error"]
        for k in (4, 16, 64)
    ]
    assert errors[0] > errors[1] > errors[2] > 0
    assert PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path / "r16") is not None  # loads in PEFT
    assert not (tmp_path / "x").exists()


def test_bias_changes_are_refused(tmp_path):
    base = make_tiny_checkpoint("qwen2", tmp_path / "base")  # q/v have biases: rotation changes them
    adapter = sora_adapter("qwen2", tmp_path / "sora", keep_d_one=True)
    for approx in (False, True):
        with pytest.raises(ss.AdapterError, match="changes its bias, which a LoRA cannot express"):
            to_lora(base, adapter, tmp_path / "out", allow_approx=approx, rank=8 if approx else None, progress=False)
    assert not (tmp_path / "out").exists()


def test_peft_lora_on_conv1d_via_cli_is_exact_and_dora_is_refused(tmp_path, capsys):
    """GPT-2 (Conv1D, fan_in_fan_out, biases kept): a LoRA written by PEFT round-trips exactly; DoRA's g does not."""
    base = make_tiny_checkpoint("gpt2", tmp_path / "base")
    config = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False)
    original = get_peft_model(make_tiny_model("gpt2"), LoraConfig(**config)).eval()
    original.save_pretrained(tmp_path / "peft")
    assert (
        main(["to-lora", "--base", str(base), "--adapter", str(tmp_path / "peft"), "--out", str(tmp_path / "lora")])
        == 0
    )
    assert "exact PEFT LoRA of rank 4" in capsys.readouterr().out
    ids = random_ids(512)
    with torch.no_grad():
        converted = PeftModel.from_pretrained(make_tiny_model("gpt2"), tmp_path / "lora").eval()
        assert converted.peft_config["default"].fan_in_fan_out
        assert max_abs(converted(ids).logits, original(ids).logits) <= 1e-5

    get_peft_model(make_tiny_model("gpt2"), LoraConfig(**config, use_dora=True)).save_pretrained(tmp_path / "dora")
    assert (
        main(["to-lora", "--base", str(base), "--adapter", str(tmp_path / "dora"), "--out", str(tmp_path / "x")]) == 1
    )
    assert "output scale (DoRA's magnitude g) != 1 makes the update full rank" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
