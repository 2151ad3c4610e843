"""Adapters saved by the paper's code (github MaeChd/SORA): a PEFT LoRA dir whose modules also hold
`lora_C.weight`, `lora_D.weight` (out x r_p) and `lora_Diag.weight` (out x 1). They read as
first-order SORA at every entry; checked against a float64 forward of the reference written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import sora_serve as ss
from sora_serve.adapter_format import REFERENCE_S0_ENV
from sora_serve.cli import main as cli_main
from sora_serve.converters.convert import convert
from sora_serve.converters.fold import fold_adapter
from sora_serve.tiny import make_tiny_checkpoint

from .helpers import REFERENCE_ALPHA as ALPHA
from .helpers import REFERENCE_R as R
from .helpers import REFERENCE_R_P as R_P
from .helpers import random_ids, write_random_adapter, write_reference_dir

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}  # gpt2: packed qkv, Conv1D


class ReferenceSora(nn.Module):
    """The reference forward in float64: z = d (W x + b) + s B A x, y = z + s_p (z C D^T - z D C^T)."""

    def __init__(self, base: nn.Module, t: dict[str, torch.Tensor], s0: float):
        super().__init__()
        self.base = base
        self.a, self.b = t["lora_A.weight"].double(), t["lora_B.weight"].double()
        self.c, self.d_rot, self.diag = (
            t["lora_C.weight"].double(),
            t["lora_D.weight"].double(),
            t["lora_Diag.weight"].double()[:, 0],
        )
        self.s_p = min(1.0, s0 / (self.c.norm().item() + self.d_rot.norm().item() + 1e-6))

    def forward(self, x):
        z = self.diag * self.base(x) + (ALPHA / R) * x @ self.a.T @ self.b.T
        return z + self.s_p * ((z @ self.c) @ self.d_rot.T - (z @ self.d_rot) @ self.c.T)


@torch.no_grad()
def reference_logits(base: Path, adapter: Path, ids: torch.Tensor, s0: float = 1.0) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(base).double().eval()
    tensors = load_file(adapter / "adapter_model.safetensors")
    for path, module in list(model.named_modules()):
        prefix = f"base_model.model.{path}."
        if f"{prefix}lora_A.weight" in tensors:
            parent, _, child = path.rpartition(".")
            own = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            setattr(model.get_submodule(parent), child, ReferenceSora(module, own, s0))
    return model(ids).logits


@pytest.fixture(scope="module", params=list(TARGETS))
def reference(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"reference-{request.param}")
    base = make_tiny_checkpoint(request.param, root / "base")
    return request.param, base, write_reference_dir(base, root / "adapter", TARGETS[request.param])


def test_reads_as_first_order_sora(reference):
    _, _, adapter = reference
    parsed = ss.read_adapter(adapter)
    assert (parsed.config.method, parsed.config.rotation, parsed.config.r_p, parsed.config.s0) == (
        "sora",
        "first_order",
        R_P,
        1.0,
    )
    some = next(iter(parsed.tensors.values()))
    assert some["d"].ndim == 1 and not torch.equal(some["sora_C"], some["sora_D"])


def test_eager_load_equals_the_reference_forward(reference):
    arch, base, adapter = reference
    ids = random_ids(512, seed=3)
    expected = reference_logits(base, adapter, ids)
    model = ss.load_adapter(AutoModelForCausalLM.from_pretrained(base).eval(), adapter, name="ref").double()
    with torch.no_grad():
        got = model(ids).logits
    assert (got - expected).abs().max().item() < 1e-9  # float64 both sides
    plain = AutoModelForCausalLM.from_pretrained(base).double().eval()
    assert (plain(ids).logits - expected).abs().max().item() > 1e-3  # the adapter does change the model


def test_fold_equals_the_reference_forward(reference, tmp_path):
    _, base, adapter = reference
    fold_adapter(base, adapter, tmp_path / "merged", math_dtype="float64", verify=False, progress=False)
    ids = random_ids(512, seed=4)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").double().eval()(ids).logits
    assert (merged - reference_logits(base, adapter, ids)).abs().max().item() < 1e-4  # the merged checkpoint is float32


def test_initial_s_p_from_the_config_or_the_environment(reference, tmp_path, monkeypatch):
    arch, base, _ = reference
    ids = random_ids(512, seed=5)
    for source, s0 in (("config", 0.25), ("environment", 0.5)):
        adapter = write_reference_dir(
            base, tmp_path / source, TARGETS[arch], initial_s_p=s0 if source == "config" else None
        )
        if source == "environment":
            monkeypatch.setenv(REFERENCE_S0_ENV, str(s0))
        assert ss.read_adapter(adapter).config.s0 == s0
        model = ss.load_adapter(AutoModelForCausalLM.from_pretrained(base).eval(), adapter, name="ref").double()
        with torch.no_grad():
            assert (model(ids).logits - reference_logits(base, adapter, ids, s0)).abs().max().item() < 1e-9


def test_reference_s0_flag(reference, tmp_path, monkeypatch):
    arch, base, adapter = reference
    monkeypatch.setenv(REFERENCE_S0_ENV, "1.0")  # restored after the test: the flag sets the variable in this process
    fold = ["fold", "--base", str(base), "--adapter", str(adapter), "--math-dtype", "float64", "--no-verify"]
    assert cli_main([*fold, "--out", str(tmp_path / "merged"), "--reference-s0", "0.5"]) == 0
    ids = random_ids(512, seed=7)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").double().eval()(ids).logits
    assert (merged - reference_logits(base, adapter, ids, s0=0.5)).abs().max().item() < 1e-4
    assert (merged - reference_logits(base, adapter, ids, s0=1.0)).abs().max().item() > 1e-3
    assert cli_main([*fold, "--out", str(tmp_path / "bad"), "--reference-s0", "-1"]) == 1


def damage(adapter: Path, how: str) -> str:
    """Break the reference dir; return the tensor the error must name."""
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_D.weight"))
    if how == "missing_D":
        del tensors[key]
    elif how == "r_p_mismatch":
        tensors[key] = torch.randn(tensors[key].shape[0], R_P + 1)
    elif how == "nan_C":
        key = key.replace("lora_D", "lora_C")
        tensors[key][0, 0] = float("nan")
    elif how == "diag_shape":
        key = key.replace("lora_D", "lora_Diag")
        tensors[key] = tensors[key][:, 0]
    save_file(tensors, adapter / "adapter_model.safetensors")
    return key


@pytest.mark.parametrize(
    "how,reason",
    [
        ("missing_D", "missing tensor"),
        ("r_p_mismatch", "does not match"),
        ("nan_C", "NaN"),
        ("diag_shape", r"expected shape \(out, 1\)"),
    ],
)
def test_bad_reference_dirs_are_refused_naming_file_and_tensor(reference, tmp_path, capsys, how, reason):
    arch, base, _ = reference
    adapter = write_reference_dir(base, tmp_path / "bad", TARGETS[arch])
    key = damage(adapter, how)
    with pytest.raises(ss.AdapterError, match=reason) as refused:
        ss.load_adapter(AutoModelForCausalLM.from_pretrained(base), adapter)
    assert "adapter_model.safetensors" in str(refused.value) and key.rsplit(".", 2)[0] in str(refused.value)
    assert (
        cli_main(
            ["fold", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged"), "--no-verify"]
        )
        == 1
    )
    assert reason.split("\\")[0] in capsys.readouterr().err and not (tmp_path / "merged").exists()


def test_initial_s_p_without_reference_tensors_is_refused(tmp_path):
    base = make_tiny_checkpoint("llama", tmp_path / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=R, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({**config, "initial_s_p": 0.5}))
    with pytest.raises(ss.AdapterError, match="field 'initial_s_p'"):
        ss.read_adapter(tmp_path / "lora")


def test_round_trip_reference_ours_reference_is_bit_identical(reference, tmp_path):
    _, base, adapter = reference
    ours = convert(adapter, tmp_path / "ours", "sora", base_dir=base)["out_dir"]
    assert json.loads((Path(ours) / "adapter_config.json").read_text())["peft_type"] == "SORA"
    ss.load_adapter(AutoModelForCausalLM.from_pretrained(base), ours)  # ours, with the base's fingerprint
    back = convert(ours, tmp_path / "back", "reference")["out_dir"]
    original, returned = (
        load_file(adapter / "adapter_model.safetensors"),
        load_file(Path(back) / "adapter_model.safetensors"),
    )
    assert original.keys() == returned.keys()
    assert all(original[k].dtype == returned[k].dtype and torch.equal(original[k], returned[k]) for k in original)
    assert json.loads((adapter / "adapter_config.json").read_text()) == json.loads(
        (Path(back) / "adapter_config.json").read_text()
    )


def test_our_first_order_sora_converts_to_the_reference_forward(tmp_path):
    """Ours -> reference, read back by the reference forward written here: the same logits; s0 != 1 kept as
    initial_s_p."""
    base = make_tiny_checkpoint("llama", tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    ours = write_random_adapter(
        tmp_path / "ours",
        ss.AdapterConfig(
            method="sora",
            rotation="first_order",
            r=R,
            lora_alpha=ALPHA,
            r_p=R_P,
            s0=0.5,
            target_modules=["q_proj", "up_proj"],
        ),
        model=model,
        scale=0.2,
        seed=2,
    )
    out = Path(convert(ours, tmp_path / "reference", "reference")["out_dir"])
    assert json.loads((out / "adapter_config.json").read_text())["initial_s_p"] == 0.5
    ids = random_ids(512, seed=6)
    with torch.no_grad():
        expected = model.double()(ids).logits
    assert (reference_logits(base, out, ids, s0=0.5) - expected).abs().max().item() < 1e-9


def test_cayley_converts_only_approximately_and_says_how_far(tmp_path, capsys):
    ours = write_random_adapter(
        tmp_path / "cayley",
        ss.AdapterConfig(method="sora", rotation="cayley", r=R, r_p=R_P, target_modules=["q_proj"]),
        arch="llama",
        scale=0.3,
        seed=1,
    )
    with pytest.raises(ss.AdapterError, match="field 'rotation': rotation 'cayley' is not the reference's forward"):
        convert(ours, tmp_path / "refused", "reference")
    assert not (tmp_path / "refused").exists()
    assert cli_main(["convert", "--to", "reference", "--allow-approx", str(ours), str(tmp_path / "approx")]) == 0
    printed = capsys.readouterr().out
    assert "approximate" in printed and "rotation relative Frobenius error" in printed
    result = convert(ours, tmp_path / "approx2", "reference", allow_approx=True)
    assert not result["exact"] and all(0 < e < 1 for e in result["rotation_errors"].values())


def test_convert_refuses_what_has_no_counterpart(reference, tmp_path):
    _, base, adapter = reference
    with pytest.raises(ss.AdapterError, match="already in the reference format"):
        convert(adapter, tmp_path / "x", "reference")
    lora = write_random_adapter(
        tmp_path / "lora",
        ss.AdapterConfig(method="lora", r=R, target_modules=["q_proj"]),
        arch="llama",
        scale=0.05,
        seed=4,
    )
    with pytest.raises(ss.AdapterError, match="no lora_C/lora_D/lora_Diag"):
        convert(lora, tmp_path / "y", "sora")
    with pytest.raises(ss.AdapterError, match="only SORA has a reference form"):
        convert(lora, tmp_path / "z", "reference")
