"""The adapters on a CUDA device: the same numbers as the float64 CPU reference, and training
there gives an adapter that serves on CPU. Skipped where torch sees no GPU (CI, this project's
CPU machines); run on a GPU machine with `pytest tests/test_cuda.py`."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import sora_serve as ss
from sora_serve.tiny import BUILTIN_TEXT
from sora_serve.training.train import TrainConfig, train_adapter

from .reference import CASES, IN, LAYER_KINDS, make_layer, reference_dense

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# float64 on the GPU is as exact as on the CPU; float32 GEMMs (TF32 off, torch's default) to ~1e-6.
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind,bias", LAYER_KINDS)
@pytest.mark.parametrize("method,rotation", CASES)
def test_forward_and_factors_on_cuda_match_dense_reference(kind, bias, method, rotation, dtype):
    layer = make_layer(kind, bias, method, rotation)
    w_ref, b_ref = reference_dense(layer, method, rotation)
    x = torch.randn(4, 7, IN, dtype=torch.float64)
    expected = x @ w_ref.T + (0 if b_ref is None else b_ref)

    layer = layer.to("cuda", dtype)
    with torch.no_grad():
        x_cuda = x.to("cuda", dtype)
        got = layer(x_cuda)
        factors = layer.adapters["a"].serving_factors(layer.base_view(), dtype)
        served = factors.apply(x_cuda, layer.base_layer(x_cuda))
    assert got.device.type == "cuda"
    assert (got.double().cpu() - expected).abs().max() <= TOL[dtype]
    assert (served.double().cpu() - expected).abs().max() <= TOL[dtype]


@pytest.mark.parametrize("method", ["sora", "prediag"])
def test_adapter_trained_on_cuda_serves_on_cpu(tiny_checkpoints, tmp_path, method):
    base = tiny_checkpoints["llama"]
    metrics = train_adapter(
        TrainConfig(
            model=base,
            data=BUILTIN_TEXT * 4,
            method=method,
            rotation="cayley",
            steps=20,
            lr=5e-3,
            out=tmp_path / "a",
            device="cuda",
            progress=False,
        )
    )
    assert metrics["device"].startswith("cuda") and metrics["peak_device_memory_mib"] > 0
    assert metrics["eval_after"]["loss"] < metrics["eval_before"]["loss"]

    ids = torch.randint(1, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    model = ss.load_adapter(AutoModelForCausalLM.from_pretrained(base).eval(), tmp_path / "a")
    with torch.no_grad():
        on_cpu = model(ids).logits
        on_gpu = model.cuda()(ids.cuda()).logits.cpu()
    assert (on_cpu - on_gpu).abs().max() <= 1e-4  # fp32 on two devices
