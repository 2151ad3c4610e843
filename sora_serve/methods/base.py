"""What every adapter shares: the input-side LoRA term and the serving form.

At serving time every method is the same op (`ServingFactors.apply`), for a layer whose base
output is `base = W0 x + b`:

    z = scale * base + bias_shift + (x A^T) B^T          (B already carries s and any scale)
    y = z + (z U) V^T                                     (R = I + V U^T, a low-rank rotation)

LoRA has no scale and no rotation; DoRA and Pre-Diag a scale; SORA everything. fold, ONNX
and the vLLM plugin consume only these factors, so they serve all four methods with one op.

A method sees its base layer through a `BaseView`: sizes, bias, and W0 only on demand (its row
norms, its product with A, or the dense matrix). Only DoRA reads any of it, and the vLLM plugin
answers those questions without a dense W0; no caller needs to know which method it holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn
from torch.nn import functional as F

from ..config import AdapterConfig


class BaseView:
    """What an adapter may ask of its base layer, for output rows `rows` (all by default).

    This implementation reads a dense (out, in) `weight`; the vLLM plugin's answers the same
    questions from recorded row norms and the layer's own GEMM (`vllm_plugin/activation.py`).
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, rows: slice | torch.Tensor = slice(None)
    ):
        self._weight, self._bias, self.rows = weight, bias, rows
        self.out_features, self.in_features = weight.shape

    @property
    def bias(self) -> torch.Tensor | None:
        """b of the selected rows (None when the layer has none)."""
        return None if self._bias is None else self._bias[self.rows]

    def weight(self) -> torch.Tensor:
        """W0 (out, in), all rows, as the layer holds it (training forwards read it)."""
        return self._weight

    def row_sq_norms(self) -> torch.Tensor:
        """||W0||^2 per selected row, float64."""
        return self._weight[self.rows].detach().double().square().sum(1)

    def weight_times(self, a: torch.Tensor) -> torch.Tensor:
        """W0 A^T for the selected rows, (rows, r) float64."""
        return self._weight[self.rows].detach().double() @ a.double().T


@dataclass
class ServingFactors:
    """An adapter on one layer, in the shared serving form (all tensors on one dtype/device)."""

    lora_A: torch.Tensor  # (r, in)
    lora_B: torch.Tensor  # (out, r), scaled
    scale: torch.Tensor | None = None  # (out,)
    bias_shift: torch.Tensor | None = None  # (out,)
    rot_U: torch.Tensor | None = None  # (out, k)
    rot_V: torch.Tensor | None = None  # (out, k)

    def to(self, dtype: torch.dtype) -> "ServingFactors":
        return ServingFactors(**{f.name: _cast(getattr(self, f.name), dtype) for f in fields(self)})

    def select_rows(self, rows: slice | torch.Tensor) -> "ServingFactors":
        """The factors of output rows `rows`: every output-side tensor cut, A (input side) whole."""
        if isinstance(rows, slice) and rows == slice(None):
            return self

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows]

        return ServingFactors(
            self.lora_A, cut(self.lora_B), cut(self.scale), cut(self.bias_shift), cut(self.rot_U), cut(self.rot_V)
        )

    def apply(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """The runtime op: `base_out` is the base layer's output (bias included)."""
        z = base_out if self.scale is None else base_out * self.scale
        if self.bias_shift is not None:
            z = z + self.bias_shift
        z = z + (x @ self.lora_A.T) @ self.lora_B.T
        if self.rot_U is not None:
            z = z + (z @ self.rot_U) @ self.rot_V.T
        return z

    def dense(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Effective (out, in) weight and bias: fold = R (scale W0 + B A), R (scale b + shift)."""
        w = weight if self.scale is None else self.scale[:, None] * weight
        w = w + self.lora_B @ self.lora_A
        b = bias if bias is None or self.scale is None else self.scale * bias
        if self.bias_shift is not None:
            b = self.bias_shift if b is None else b + self.bias_shift
        if self.rot_U is not None:
            w = w + self.rot_V @ (self.rot_U.T @ w)
            if b is not None:
                b = b + self.rot_V @ (self.rot_U.T @ b)
        return w, b


def addmm_rows(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """y + a @ b over the last dimension, for any leading dimensions, as one fused GEMM."""
    return torch.addmm(y.reshape(-1, y.shape[-1]), a.reshape(-1, a.shape[-1]), b).view(y.shape)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


class Adapter(nn.Module):
    """Base of the four methods: owns the LoRA pair (A: r x in, B: out x r), B initialised to 0.

    Subclasses implement `forward(x, base_out, base)`, their formula written plainly (used for
    training and eager inference), and `serving_factors(base)`, both given a `BaseView`; a method
    whose init depends on the base overrides `init_from_base`.
    """

    method: str = ""
    # Its files: `peft_type` in adapter_config.json, and each parameter's tensor-name suffix in
    # adapter_model.safetensors. A method PEFT writes (LoRA, DoRA) keeps PEFT's own layout.
    peft_type: str = ""
    peft_layout: bool = False
    file_names: dict[str, str] = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
    # What each parameter is to an optimizer recipe (training/recipe.py gives each role its lr and decay).
    param_roles: dict[str, str] = {"lora_A": "lowrank", "lora_B": "lowrank"}
    # What serving must know of the base: whether the factors read W0 (DoRA's norms), and whether
    # they change the base output itself (a scale or rotation, so the bias must be inside the op).
    reads_base_weight: bool = False
    changes_base_output: bool = True

    def __init__(self, in_features: int, out_features: int, config: AdapterConfig):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.r = config.r
        self.scaling = config.scaling
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    def add_lora_term(self, y: torch.Tensor, x: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
        """y + s diag(row_scale) B A x, never forming B A: s goes on the rank-r activations and the
        expansion adds into y inside one GEMM, so the out-sized tensor is written once."""
        b = self.lora_B if row_scale is None else row_scale[:, None] * self.lora_B
        return addmm_rows(y, F.linear(self.dropout(x), self.lora_A) * self.scaling, b.T.contiguous())

    def init_from_base(self, base: BaseView) -> None:
        """A fresh adapter's base-dependent init (DoRA's magnitude); most methods need none."""

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseView) -> torch.Tensor:
        raise NotImplementedError

    def diagnostics(self) -> dict[str, float]:
        """Scalars that show this adapter drifting while it trains (training/diagnostics.py logs the
        max over layers, the min for keys starting with "s_p")."""
        return {}

    def serving_factors(self, base: BaseView, dtype: torch.dtype = torch.float64) -> ServingFactors:
        """The factors of output rows `base.rows`, in `dtype`."""
        raise NotImplementedError

    def scaled_lora(
        self, dtype: torch.dtype, row_scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, s * diag(row_scale) B) in `dtype`, detached: the LoRA part of the serving factors."""
        b = self.lora_B.detach().to(dtype) * self.scaling
        if row_scale is not None:
            b = row_scale[:, None] * b
        return self.lora_A.detach().to(dtype), b
