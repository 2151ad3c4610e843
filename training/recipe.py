"""The optimizer recipe: AdamW with a learning rate and a weight-decay rule per parameter role.

Roles (each method names its own in `param_roles`; PEFT's LoRA/DoRA by parameter name):

    role       parameters                         lr                        weight decay
    lowrank    lora_A, lora_B                     lr                        yes
    diag       Pre-Diag / SORA d (init 1)         lr * diag_lr_scale        no
    magnitude  DoRA m (init rownorm W0)           lr                        no
    rotation   SORA C, D                          lr * rotation_lr_scale    yes
    other      anything else trainable (a head)   lr                        matrices only

Why scales exist: Adam moves every entry by about lr per step whatever its gradient's size. For
A and B that is a small change of a rank-r update; for d it rescales whole output rows (d = 1 ±
steps * lr) and for C, D it turns the whole output space: |C - D|_F grows by up to
2 lr sqrt(out r_p) per step (docs/benchmarks/rotation-collapse.md traces an earlier collapse to it).
Why the default is 1 (the paper's one lr): the recipe sweeps of `benchmarks/quality_stability.py`
(docs/benchmarks/quality-stability-recipe*.md: Pre-Diag and both SORA rotations, scales 1, 0.3,
0.1, 0.03, 60 and 300 steps) found no one-class run at any scale, and scale 1 the most accurate
over both horizons (pooled 81.1% vs 80.9% at 0.1; at 300 steps 83.9% vs 83.0%): a smaller scale
keeps |K|_2 and |d - 1| small (0.14 vs 0.9 at 300 steps) by barely training them. Lower them when
the logged diagnostics show |K| running away. `single_lr=True` forces one lr whatever the scales.
Decay never applies to d or m: they start at non-zero values and decay would pull them toward 0,
not toward their init.

    optimizer = recipe_optimizer(model, lr=5e-3)                         # any loop
    Trainer(model=model, args=args, optimizer_cls_and_kwargs=trainer_optimizer(model, args))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import sora_serve as ss
from sora_serve.errors import AdapterError

ROLES = ("lowrank", "diag", "magnitude", "rotation", "other")
NO_DECAY_ROLES = ("diag", "magnitude")
PEFT_ROLES = {".lora_A.": "lowrank", ".lora_B.": "lowrank", ".lora_magnitude_vector.": "magnitude"}


@dataclass(frozen=True)
class Recipe:
    """Learning-rate multipliers of the roles that are not plain LoRA factors."""

    diag_lr_scale: float = 1.0
    rotation_lr_scale: float = 1.0
    single_lr: bool = False  # the paper's code: every parameter at the base lr

    def __post_init__(self):
        for field in ("diag_lr_scale", "rotation_lr_scale"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and 0 < value <= 100):
                raise AdapterError(f"must be a number in (0, 100], got {value!r}", field=field)

    def lr_scale(self, role: str) -> float:
        if self.single_lr:
            return 1.0
        return {"diag": self.diag_lr_scale, "rotation": self.rotation_lr_scale}.get(role, 1.0)


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """Role of every trainable parameter, by its name in `model.named_parameters()`."""
    by_id = {}
    for _, layer in ss.adapted_layers(model):
        for adapter in layer.adapters.values():
            by_id.update({id(getattr(adapter, name)): role for name, role in adapter.param_roles.items()})
    roles = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            peft_role = next((role for key, role in PEFT_ROLES.items() if key in name), None)
            roles[name] = by_id.get(id(param)) or peft_role or "other"
    return roles


def parameter_groups(
    model: nn.Module, lr: float, weight_decay: float = 0.0, recipe: Recipe = Recipe()
) -> list[dict[str, Any]]:
    """AdamW parameter groups, one per (role, decayed or not), each with its own "lr" and a "role"
    key (kept by torch; a learning-rate schedule scales every group's lr by the same factor)."""
    if not lr > 0:
        raise AdapterError(f"must be positive, got {lr!r}", field="lr")
    roles = parameter_roles(model)
    if not roles:
        raise AdapterError(f"{type(model).__name__} has no trainable parameter; attach an adapter first", field="model")
    params = dict(model.named_parameters())
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, role in roles.items():
        decay = role not in NO_DECAY_ROLES and params[name].ndim >= 2
        group = groups.setdefault(
            (role, decay),
            {
                "params": [],
                "role": role,
                "lr": lr * recipe.lr_scale(role),
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(params[name])
    return [groups[key] for key in sorted(groups, key=lambda k: (ROLES.index(k[0]), not k[1]))]


def recipe_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.01, recipe: Recipe = Recipe()
) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters with the recipe's groups."""
    return torch.optim.AdamW(parameter_groups(model, lr, weight_decay, recipe), lr=lr)


def trainer_optimizer(
    model: nn.Module, args, recipe: Recipe = Recipe()
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """`Trainer(optimizer_cls_and_kwargs=...)`: AdamW with the recipe's groups at `args.learning_rate`
    and `args.weight_decay`; Trainer builds its own schedule over them as usual."""
    groups = parameter_groups(model, args.learning_rate, args.weight_decay, recipe)
    return torch.optim.AdamW, {
        "params": groups,
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
    }
