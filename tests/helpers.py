"""What the test modules share to build their inputs: random adapters (`write_random_adapter`, the
one factory), bases, token ids; `sora-serve serve` and its HTTP client; the plugin's backends.
The expected outputs they are compared with are in `reference`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

import sora_serve as ss
from benchmarks import serve_process
from sora_serve.tiny import make_tiny_model


def perturb_adapter(model: nn.Module, name: str, scale: float = 0.05, seed: int = 0) -> None:
    """Move every parameter of adapter `name` away from its identity init (B = 0, d = 1, D = C)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in ss.adapted_layers(model):
            if name in layer.adapters:
                for p in layer.adapters[name].parameters():
                    p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@torch.no_grad()
def fine_tuned_like(model: nn.Module, relative: float = 1e-3, seed: int = 0) -> nn.Module:
    """`model` with every weight moved by `relative` of its tensor's RMS, as a fine-tune moves them
    (the same shapes, another base); in place, returned for chaining."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(relative * p.double().pow(2).mean().sqrt().item() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def save_base_copy(model: nn.Module, out: Path, tokenizer_from: Path, dtype: torch.dtype | None = None) -> Path:
    """Save `model` (cast to `dtype` if given) as a checkpoint with the tokenizer of `tokenizer_from`."""
    (model.to(dtype) if dtype else model).save_pretrained(out)
    for side in tokenizer_from.iterdir():
        if side.name.startswith("tokenizer") or side.name == "special_tokens_map.json":
            shutil.copy2(side, out / side.name)
    return out


def random_ids(vocab: int, batch: int = 3, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


ATTENTION_AND_MLP = {  # an attention and an MLP projection or two per arch; GPT-2's are Conv1D (fan_in_fan_out)
    "llama": ("q_proj", "v_proj", "down_proj"),
    "qwen2": ("q_proj", "v_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj"),
}


def write_random_adapter(
    out_dir: Path,
    config: ss.AdapterConfig | None = None,
    *,
    seed: int = 0,
    scale: float = 0.1,
    arch: str = "qwen2",
    model: nn.Module | None = None,
    factor_scale: float = 1.0,
    edit: Callable[[nn.Module], None] | None = None,
    name: str = "a",
    **config_fields,
) -> Path:
    """The tests' one adapter factory: an adapter with random factors (nothing trained), saved to `out_dir`.

    `config`, or `ss.AdapterConfig(**config_fields)`, is attached as `name` to `model` (default: a
    fresh `make_tiny_model(arch)`; a model passed in keeps the adapter, for callers that use it
    afterwards), moved off its identity init by `perturb_adapter(scale, seed)`, then
    `factor_scale` multiplies lora_B (e.g. 1e30: finite factors built to overflow) and `edit(model)`
    changes what else the caller needs, before saving."""
    if config is None:
        config = ss.AdapterConfig(**config_fields)
    elif config_fields:
        raise TypeError(f"pass a config or its fields, not both: {sorted(config_fields)}")
    model = make_tiny_model(arch) if model is None else model
    ss.attach(model, config, name, verbose=False)
    perturb_adapter(model, name, scale=scale, seed=seed)
    if factor_scale != 1.0:
        with torch.no_grad():
            for _, layer in ss.adapted_layers(model):
                layer.adapters[name].lora_B.mul_(factor_scale)
    if edit is not None:
        edit(model)
    return ss.save_adapter(model, out_dir, name)


REFERENCE_R, REFERENCE_R_P, REFERENCE_ALPHA = 4, 3, 8


def write_reference_dir(
    base: Path, out: Path, targets: list[str], seed: int = 0, initial_s_p: float | None = None
) -> Path:
    """An adapter as the paper's code (MaeChd/SORA) saves it: PEFT's LoRA dir (PEFT writes the
    config and A/B) plus, per module, the nn.Linear weights of C, D (out x r_p) and the diagonal
    (out x 1); all random, B != 0, C != D, d != 1. Conv1D bases get fan_in_fan_out as in PEFT."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers.pytorch_utils import Conv1D

    model = AutoModelForCausalLM.from_pretrained(base)
    conv1d = any(isinstance(m, Conv1D) for m in model.modules())
    config = LoraConfig(r=REFERENCE_R, lora_alpha=REFERENCE_ALPHA, target_modules=targets, fan_in_fan_out=conv1d)
    get_peft_model(model, config).save_pretrained(out)
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(out / "adapter_model.safetensors")
    for key in [k for k in tensors if k.endswith("lora_B.weight")]:
        out_features, prefix = tensors[key].shape[0], key.removesuffix("lora_B.weight")
        tensors[key] = 0.05 * torch.randn(tensors[key].shape, generator=gen)
        tensors[f"{prefix}lora_C.weight"] = 0.3 * torch.randn(out_features, REFERENCE_R_P, generator=gen)
        tensors[f"{prefix}lora_D.weight"] = 0.3 * torch.randn(out_features, REFERENCE_R_P, generator=gen)
        tensors[f"{prefix}lora_Diag.weight"] = 1 + 0.1 * torch.randn(out_features, 1, generator=gen)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    if initial_s_p is not None:
        saved = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**saved, "initial_s_p": initial_s_p}))
    return out


# ---------------------------------------------------------------- `sora-serve serve` in tests


def post(url: str, payload: dict, timeout: float = 120) -> tuple[int, dict | str]:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read().decode(), exc.code
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, body


@contextmanager
def running_server(
    arguments: list[str], log_path: Path, timeout: float = 300
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`sora-serve serve --port P ARGUMENTS` on 127.0.0.1, healthy: yields its URL and process; the
    process group is stopped on exit (`benchmarks.serve_process.running_server`, shared with the
    online benchmark)."""
    with serve_process.running_server(arguments, log_path, timeout=timeout) as (url, process, _):
        yield url, process


def complete(
    url: str, model: str, prompt: str | list[int], max_tokens: int = 6, timeout: float = 120
) -> tuple[int, dict | str]:
    """Greedy /v1/completions (EOS ignored), the generated token ids in the body."""
    payload = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    return post(f"{url}/v1/completions", payload, timeout=timeout)


def new_tokens(body: dict) -> list[int]:
    return body["choices"][0]["token_ids"]


def error_message(body: dict | str) -> str:
    """The message of an OpenAI-style error body (the whole body when it is not one)."""
    return body["error"]["message"] if isinstance(body, dict) and "error" in body else json.dumps(body)


def set_first_value(adapter_dir: Path, key_suffix: str, value: float) -> str:
    """Overwrite element [0, 0] of the first tensor whose name ends with `key_suffix` (e.g. a NaN
    into lora_B) in the adapter's safetensors file; returns the tensor's name."""
    from safetensors.torch import load_file, save_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in sorted(tensors) if k.endswith(key_suffix))
    tensors[key][0, 0] = value
    save_file(tensors, path, metadata={"format": "pt"})
    return key


# ---------------------------------------------------------------- the plugin's two backends

# Every adapter kind an engine test serves (name -> AdapterConfig arguments, r = 8 unless given).
SERVED_KINDS = {
    "lora": dict(method="lora"),
    "dora": dict(method="dora"),
    "prediag": dict(method="prediag", r=4),
    "sora_fo": dict(method="sora", r_p=2),
    "sora_cay": dict(method="sora", rotation="cayley", r=4, r_p=3),
}
VLLM_BACKENDS = ("grouped", "punica")  # sora_serve.vllm_plugin.backends; the engine tests run on both


@contextmanager
def vllm_backend(name: str) -> Iterator[str]:
    """SORA_SERVE_VLLM_BACKEND=name for the vLLM processes started inside (they inherit the environment)."""
    previous = os.environ.get("SORA_SERVE_VLLM_BACKEND")
    os.environ["SORA_SERVE_VLLM_BACKEND"] = name
    try:
        yield name
    finally:
        if previous is None:
            del os.environ["SORA_SERVE_VLLM_BACKEND"]
        else:
            os.environ["SORA_SERVE_VLLM_BACKEND"] = previous
