"""Each method on one layer against the float64 dense reference written from the paper's formulas
(`reference.reference_dense`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sora_serve import AdapterConfig
from sora_serve.layer import AdaptedLayer
from sora_serve.methods import BaseView, build_adapter, rotation_factors

from .reference import CASES, IN, LAYER_KINDS, R, make_layer, reference_dense

TOL64 = 1e-9  # float64 forward vs dense reference


@pytest.mark.parametrize("kind,bias", LAYER_KINDS)
@pytest.mark.parametrize("method,rotation", CASES)
def test_forward_and_factors_match_dense_reference(kind, bias, method, rotation):
    layer = make_layer(kind, bias, method, rotation)
    w_ref, b_ref = reference_dense(layer, method, rotation)
    x = torch.randn(3, 5, IN, dtype=torch.float64)
    expected = x @ w_ref.T + (0 if b_ref is None else b_ref)

    with torch.no_grad():
        got = layer(x)
        factors = layer.adapters["a"].serving_factors(layer.base_view())
        served = factors.apply(x, layer.base_layer(x))
        w, b = factors.dense(layer.weight, layer.bias)

    assert (got - expected).abs().max() <= TOL64
    assert (served - expected).abs().max() <= TOL64
    assert (w - w_ref).abs().max() <= TOL64
    assert (b is None) == (b_ref is None)
    if b is not None:
        assert (b - b_ref).abs().max() <= TOL64


@pytest.mark.parametrize("method,rotation", CASES)
def test_factors_of_some_rows_are_those_rows_of_the_full_factors(method, rotation):
    """What a column-parallel vLLM rank asks for: `BaseView(rows=...)` gives exactly those output
    rows of every output-side factor (DoRA's g from those rows' norms alone), A whole."""
    layer = make_layer("linear", True, method, rotation)
    rows = torch.tensor([0, 3, 4, 9])
    full = layer.adapters["a"].serving_factors(layer.base_view())
    part = layer.adapters["a"].serving_factors(BaseView(layer.weight, layer.bias, rows))
    assert torch.equal(part.lora_A, full.lora_A)
    for field in ("lora_B", "scale", "bias_shift", "rot_U", "rot_V"):
        whole, cut = getattr(full, field), getattr(part, field)
        assert (whole is None) == (cut is None), field
        if whole is not None:
            assert torch.allclose(cut, whole[rows], rtol=0, atol=1e-14), field


def test_first_order_equals_the_papers_forward():
    """The paper's code: z + s_p (z C D^T - z D C^T), z = d * base + s B A x (row vectors)."""
    layer = make_layer("linear", True, "sora", "first_order")
    a = layer.adapters["a"]
    x = torch.randn(7, IN, dtype=torch.float64)
    with torch.no_grad():
        z = layer.base_layer(x) * a.d + (x @ a.lora_A.T @ a.lora_B.T) * (8 / R)
        s_p = torch.clamp(1.0 / (a.sora_C.norm("fro") + a.sora_D.norm("fro") + 1e-6), max=1.0)
        paper = z + s_p * ((z @ a.sora_C) @ a.sora_D.T - (z @ a.sora_D) @ a.sora_C.T)
        assert (layer(x) - paper).abs().max() <= TOL64


def test_cayley_rotation_is_orthogonal_in_float32():
    out, r_p = 512, 8
    c, d = torch.randn(out, r_p), torch.randn(out, r_p)
    c, d = c / c.norm(), d / d.norm()  # |C| = |D| = 1: s_p = 0.5, |K|_F ~ 1
    u, v = rotation_factors(c, d, s0=1.0, rotation="cayley")
    rot = torch.eye(out) + v @ u.T  # built here only to check it
    k_norm = (rot - rot.T).norm() / 2
    assert 0.3 < k_norm < 3.0
    assert (rot.T @ rot - torch.eye(out)).abs().max() <= 1e-5
    assert (rot @ rot.T - torch.eye(out)).abs().max() <= 1e-5


def test_first_order_rotation_is_not_orthogonal():
    """Guards the test above: the paper's R = I + K is only orthogonal to first order."""
    out, r_p = 64, 4
    c, d = torch.randn(out, r_p), torch.randn(out, r_p)
    u, v = rotation_factors(c / c.norm(), d / d.norm(), s0=1.0, rotation="first_order")
    rot = torch.eye(out) + v @ u.T
    assert (rot.T @ rot - torch.eye(out)).abs().max() > 1e-3


class ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("rotation", ["first_order", "cayley"])
def test_sora_forward_never_builds_an_out_by_out_tensor(rotation):
    out_f, in_f = 300, 64
    layer = AdaptedLayer(nn.Linear(in_f, out_f))
    adapter = build_adapter(AdapterConfig(method="sora", r=4, r_p=2, rotation=rotation), layer.base_view())
    layer.add_adapter("a", adapter)
    layer.active_adapter = "a"
    x = torch.randn(2, 3, in_f)
    recorder = ShapeRecorder()
    with recorder:
        y = layer(x)
        y.sum().backward()  # the backward pass too
    assert recorder.shapes, "the recorder saw no ops"
    assert any(out_f in s for s in recorder.shapes)  # it did see the layer's outputs
    assert not [s for s in recorder.shapes if s.count(out_f) >= 2]


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_cayley_sora_runs_in_half_precision(dtype, tol):
    """torch has no half/bfloat16 linear solve on CPU: the 2r_p x 2r_p Cayley system is solved in
    float32, so a half-precision SORA layer trains and matches the float64 formula within the
    dtype's rounding (tolerance relative to the output scale)."""
    layer = make_layer("linear", True, "sora", "cayley")
    w_ref, b_ref = reference_dense(layer, "sora", "cayley")
    x = torch.randn(4, IN, dtype=torch.float64)
    expected = x @ w_ref.T + b_ref
    half = layer.to(dtype)
    got = half(x.to(dtype))
    got.float().square().sum().backward()
    assert got.dtype == dtype and half.adapters["a"].sora_C.grad is not None
    assert (got.double() - expected).abs().max() <= tol * expected.abs().max()
