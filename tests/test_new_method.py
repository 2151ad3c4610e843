"""A fifth method needs its own class plus one registry line: nothing else in the package changes.

`BiasLoRA` below exists only in this test. Registered with one line (`METHOD_CLASSES["biaslora"] =
BiasLoRA`), it attaches, saves (our layout, its own `peft_type` and tensor name), reads back through
the one validated reader, loads into a fresh model and folds into a plain checkpoint, each equal
to a float64 reference of its formula written here.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

import sora_serve as ss
from sora_serve.converters.fold import fold_adapter
from sora_serve.methods import METHOD_CLASSES, Adapter, ServingFactors
from sora_serve.tiny import make_tiny_checkpoint, make_tiny_model

from .helpers import max_abs, perturb_adapter, random_ids

EAGER_TOL = 1e-10  # float64 model vs the float64 formula
FOLD_TOL = 1e-4  # float32 folded checkpoint vs the float64 eager model, logits


class BiasLoRA(Adapter):
    """LoRA plus a learned output bias:  y = W0 x + b + s B A x + c,  c (out,) initialised to 0."""

    method = "biaslora"
    peft_type = "BIASLORA"
    file_names = {**Adapter.file_names, "c": "biaslora_c"}
    param_roles = {**Adapter.param_roles, "c": "other"}

    def __init__(self, in_features, out_features, config):
        super().__init__(in_features, out_features, config)
        self.c = nn.Parameter(torch.zeros(out_features))

    def forward(self, x, base_out, base):
        return self.add_lora_term(base_out + self.c, x)

    def serving_factors(self, base, dtype=torch.float64):
        a, b = self.scaled_lora(dtype)
        return ServingFactors(lora_A=a, lora_B=b, bias_shift=self.c.detach().to(dtype)).select_rows(base.rows)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(METHOD_CLASSES, "biaslora", BiasLoRA)  # the one registry line


def config() -> ss.AdapterConfig:
    # qwen2's q/k/v have biases: a folded bias shift needs one (fold refuses to invent a bias)
    return ss.AdapterConfig(method="biaslora", r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"])


def test_an_unregistered_method_is_refused_by_name():
    with pytest.raises(ss.AdapterError, match="unknown method 'biaslora'"):
        config()


def test_the_new_method_matches_its_formula_in_float64(registered):
    model = make_tiny_model("qwen2").double()
    ss.attach(model, config(), "toy", verbose=False)
    perturb_adapter(model, "toy", seed=1)
    path, layer = next((p, m) for p, m in ss.adapted_layers(model) if p.endswith("q_proj"))
    adapter = layer.adapters["toy"]
    x = torch.randn(3, 5, layer.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    w0, b0 = layer.weight.detach(), layer.bias.detach()
    expected = x @ w0.T + b0 + adapter.scaling * (x @ adapter.lora_A.T) @ adapter.lora_B.T + adapter.c
    assert layer.bias is not None and b0.abs().min() > 0  # qwen2's q_proj has a (random, non-zero) bias
    assert max_abs(layer(x), expected) <= EAGER_TOL, path


def test_the_new_method_saves_reads_loads_and_folds(registered, tmp_path):
    base = make_tiny_checkpoint("qwen2", tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64).eval()
    ss.attach(model, config(), "toy", verbose=False)
    perturb_adapter(model, "toy", seed=3)
    out = ss.save_adapter(model, tmp_path / "toy", "toy")

    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "BIASLORA"
    assert any(key.endswith(".biaslora_c") for key in load_file(out / "adapter_model.safetensors"))
    adapter = ss.read_adapter(out)
    assert adapter.method == "biaslora" and all(set(t) == {"lora_A", "lora_B", "c"} for t in adapter.tensors.values())

    ids = random_ids(model.config.vocab_size)
    with torch.no_grad():
        trained = model(ids).logits
        fresh = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64).eval()
        loaded = ss.load_adapter(fresh, out, "toy")(ids).logits
    assert max_abs(loaded, trained) <= EAGER_TOL

    fold_adapter(base, out, tmp_path / "merged", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert max_abs(merged(ids).logits, trained) <= FOLD_TOL
