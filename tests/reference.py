"""What the tests compare against: a layer's effective weight written from the paper's formulas
in float64, and whole models through the eager runtime (float64 unless a test pins fp32), with
the tolerances their comparisons use. Builders of the inputs live in `helpers`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import sora_serve as ss
from sora_serve import AdapterConfig
from sora_serve.layer import AdaptedLayer
from sora_serve.methods import build_adapter

# ---------------------------------------------------------------- one layer: the dense float64 reference

IN, OUT, R, R_P = 48, 40, 4, 3

CASES = [
    ("lora", "first_order"),
    ("dora", "first_order"),
    ("prediag", "first_order"),
    ("sora", "first_order"),
    ("sora", "cayley"),
]
LAYER_KINDS = [("linear", True), ("linear", False), ("conv1d", True)]  # transformers' Conv1D always has a bias


def make_layer(kind: str, bias: bool, method: str, rotation: str, s0: float = 1.0) -> AdaptedLayer:
    base = nn.Linear(IN, OUT, bias=bias) if kind == "linear" else Conv1D(OUT, IN)
    if kind == "conv1d":
        nn.init.normal_(base.weight, std=0.2)
        if bias:
            nn.init.normal_(base.bias, std=0.2)
    layer = AdaptedLayer(base.double())
    config = AdapterConfig(method=method, r=R, lora_alpha=8, r_p=R_P, s0=s0, rotation=rotation)
    layer.add_adapter("a", build_adapter(config, layer.base_view()))
    with torch.no_grad():  # make every parameter non-trivial (B = 0, d = 1, D = C at init)
        for p in layer.adapters["a"].parameters():
            p.add_(0.3 * torch.randn_like(p))
    layer.active_adapter = "a"
    return layer


def reference_dense(layer: AdaptedLayer, method: str, rotation: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W_eff, b_eff straight from the formulas, materialising every matrix (fine at this size)."""
    a = layer.adapters["a"]
    w0, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    s = 8 / R
    delta = s * a.lora_B.detach() @ a.lora_A.detach()
    if method == "lora":
        return w0 + delta, b
    if method == "dora":
        g = a.magnitude.detach() / (w0 + delta).norm(dim=1)
        return g[:, None] * (w0 + delta), b
    d = a.d.detach()
    w, bb = d[:, None] * w0 + delta, None if b is None else d * b
    if method == "prediag":
        return w, bb
    c, dd = a.sora_C.detach(), a.sora_D.detach()
    s_p = min(1.0, 1.0 / (c.norm() + dd.norm() + 1e-6).item())
    k = s_p * (dd @ c.T - c @ dd.T)
    eye = torch.eye(OUT, dtype=torch.float64)
    rot = eye + k if rotation == "first_order" else torch.linalg.solve(eye - k, eye + k)
    return rot @ w, None if bb is None else rot @ bb


# ---------------------------------------------------------------- whole models: the eager runtime


@torch.no_grad()
def eager_model(base_dir: Path, adapter_dir: Path | None = None, dtype: torch.dtype = torch.float64) -> nn.Module:
    """The HF base model in `dtype` (float64 unless asked), with the adapter loaded by our eager runtime."""
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if adapter_dir is not None:
        ss.load_adapter(model, adapter_dir, name="adapter")  # the dir name may not be a module name
    return model.to(dtype)


@torch.no_grad()
def eager_greedy(model: nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt) :]


GREEDY_TOL = 1e-3  # log-prob; fp32 engine vs float64 reference differ by ~1e-5 (LOGPROB_TOL)


@torch.no_grad()
def off_greedy(model: nn.Module, prompt: list[int], tokens: list[int], tol: float = GREEDY_TOL) -> list[int]:
    """Positions where `tokens` is not the greedy continuation of `prompt` under `model`.

    Teacher forcing, one forward: token i must have log p(token_i | prompt, tokens_<i) within
    `tol` of the best token's. Strict (another adapter's tokens fail at once) without failing
    on an fp32-vs-float64 near tie in long generations."""
    if not tokens:
        return []
    logprobs = torch.log_softmax(model(torch.tensor([list(prompt) + list(tokens)])).logits[0].double(), -1)
    rows = logprobs[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
    chosen = rows.gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
    return (chosen < rows.max(1).values - tol).nonzero().squeeze(1).tolist()


LOGPROB_TOL = 1e-4  # fp32 vLLM vs the fp32 eager runtime, per generated token's log-probability
PROMPTS = [[5, 17, 99, 23, 4], [7, 7, 300, 12], [101, 44, 9, 250, 3, 88]]  # token ids for the engine tests


@torch.no_grad()
def eager_reference(root: Path, name: str | None, prompt: list[int], max_tokens: int = 8):
    """Greedy tokens and their log-probabilities from the fp32 HF model `root`/base with the
    adapter `root`/`name` (None: the base) loaded by our runtime."""
    model = eager_model(root / "base", None if name is None else root / name, dtype=torch.float32)
    new = eager_greedy(model, prompt, max_tokens)
    logprobs = torch.log_softmax(model(torch.tensor([list(prompt) + new])).logits[0].double(), -1)
    return new, [logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(new)]


# ---------------------------------------------------------------- ONNX exports: transformers' generate

ONNX_TOL = 1e-4  # fp32 logits, ONNX Runtime vs PyTorch
NEW_TOKENS = 16


@torch.no_grad()
def generate_greedy(model, prompt: torch.Tensor, attention_mask: torch.Tensor | None = None) -> np.ndarray:
    """NEW_TOKENS greedy tokens from transformers' generate (EOS ignored), prompt included."""
    mask = torch.ones_like(prompt) if attention_mask is None else attention_mask
    return model.generate(
        prompt, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
    ).numpy()
