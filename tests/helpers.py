"""Small helpers shared by test modules."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import sora_serve as ss
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


def write_random_adapter(
    out_dir: Path,
    config: ss.AdapterConfig,
    *,
    seed: int,
    scale: float = 0.1,
    arch: str = "qwen2",
    factor_scale: float = 1.0,
) -> Path:
    """An adapter for `make_tiny_checkpoint(arch)` with random factors, saved to `out_dir` (nothing trained).
    `factor_scale` multiplies lora_B afterwards (e.g. 1e30: finite factors built to overflow)."""
    model = make_tiny_model(arch)
    ss.attach(model, config, "a", verbose=False)
    perturb_adapter(model, "a", scale=scale, seed=seed)
    with torch.no_grad():
        for _, layer in ss.adapted_layers(model):
            layer.adapters["a"].lora_B.mul_(factor_scale)
    ss.save_adapter(model, out_dir, "a")
    return Path(out_dir)


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


# ---------------------------------------------------------------- eager references (float64)


@torch.no_grad()
def eager_model(base_dir: Path, adapter_dir: Path | None = None) -> nn.Module:
    """The HF base model in float64, with the adapter loaded by our eager runtime."""
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if adapter_dir is not None:
        ss.load_adapter(model, adapter_dir, name="adapter")  # the dir name may not be a module name
    return model.double()


@torch.no_grad()
def eager_greedy(model: nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt) :]


GREEDY_TOL = 1e-3  # log-prob; fp32 engine vs float64 reference differ by ~1e-5 (test_vllm_engine: <= 1e-4)


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


# ---------------------------------------------------------------- `sora-serve serve` in tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def wait_healthy(process: subprocess.Popen, url: str, log_path: Path, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited: {log_path.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=5)
            return url
        except (urllib.error.URLError, ConnectionError):
            time.sleep(2)
    pytest.fail(f"server did not become healthy in {timeout} s")


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM (vLLM shuts down cleanly), then SIGKILL whatever of the group is left."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


@contextmanager
def running_server(arguments: list[str], log_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`sora-serve serve --port P ARGUMENTS` on 127.0.0.1, healthy: yields its URL and process; stopped on exit."""
    port = free_port()
    command = [sys.executable, "-m", "sora_serve.cli", "serve", "--port", str(port), *arguments]
    # Own process group: teardown stops the API server, its engine core and workers together.
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
            start_new_session=True,
        )
    try:
        yield wait_healthy(process, f"http://127.0.0.1:{port}", log_path), process
    finally:
        stop_group(process)


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
