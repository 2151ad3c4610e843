"""The optimizer recipe (training/recipe.py): which tensor is in which group, at which lr and decay,
through `parameter_groups`, `sora-serve train`'s flags and the Trainer helper."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import sora_serve as ss
from sora_serve.cli import main as cli_main
from sora_serve.errors import AdapterError
from sora_serve.tiny import BUILTIN_TEXT
from sora_serve.training.recipe import Recipe, parameter_groups, recipe_optimizer, trainer_optimizer
from sora_serve.training.train import TrainConfig, train_adapter

from .helpers import random_ids

LR, DECAY = 4e-3, 0.05
SORA = ss.AdapterConfig(method="sora", r=4, r_p=2, target_modules=["q_proj", "v_proj"])


def sora_model(base):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return ss.attach(model, SORA, "a", verbose=False)


def groups_by_role(groups: list[dict]) -> dict[tuple[str, bool], dict]:
    return {(g["role"], g["weight_decay"] > 0): g for g in groups}


def names_of(model, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {name.rsplit(".", 1)[-1] for name, p in model.named_parameters() if id(p) in ids}


def test_sora_groups_name_each_tensor_with_its_lr_and_decay(tiny_checkpoints):
    model = sora_model(tiny_checkpoints["llama"])
    recipe = Recipe(diag_lr_scale=0.25, rotation_lr_scale=0.05)
    groups = groups_by_role(parameter_groups(model, LR, DECAY, recipe))
    assert set(groups) == {("lowrank", True), ("diag", False), ("rotation", True)}
    assert names_of(model, groups[("lowrank", True)]) == {"lora_A", "lora_B"}
    assert names_of(model, groups[("diag", False)]) == {"d"}
    assert names_of(model, groups[("rotation", True)]) == {"sora_C", "sora_D"}
    assert groups[("lowrank", True)]["lr"] == LR and groups[("lowrank", True)]["weight_decay"] == DECAY
    assert groups[("diag", False)]["lr"] == pytest.approx(LR * 0.25) and groups[("diag", False)]["weight_decay"] == 0.0
    assert groups[("rotation", True)]["lr"] == pytest.approx(LR * 0.05)
    grouped = [p for g in groups.values() for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len({id(p) for p in grouped}) == len(trainable)  # each trainable tensor in exactly one group


def test_single_lr_is_the_papers_one_lr_for_all(tiny_checkpoints):
    groups = parameter_groups(sora_model(tiny_checkpoints["llama"]), LR, DECAY, Recipe(single_lr=True))
    assert {g["lr"] for g in groups} == {LR}
    assert {g["role"]: g["weight_decay"] for g in groups}["diag"] == 0.0  # decay rules stay


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_lora_and_dora_keep_one_lr_and_no_decay_on_m(tiny_checkpoints, use_dora):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=use_dora))
    groups = groups_by_role(parameter_groups(model, LR, DECAY))
    assert {g["lr"] for g in groups.values()} == {LR}
    assert (
        names_of(model, groups[("lowrank", True)]) == {"weight"} and len(groups[("lowrank", True)]["params"]) == 2 * 2
    )  # A, B x 2 layers
    if use_dora:
        assert len(groups[("magnitude", False)]["params"]) == 2 and groups[("magnitude", False)]["weight_decay"] == 0.0
    else:
        assert set(groups) == {("lowrank", True)}


def test_decay_pulls_matrices_toward_zero_and_leaves_d_at_its_init(tiny_checkpoints):
    """With zero gradients AdamW's step is the decoupled decay alone: w <- w (1 - lr wd) for
    decayed groups; d (init 1) must not move, or decay would pull it toward 0, not toward its init."""
    model = sora_model(tiny_checkpoints["llama"])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = recipe_optimizer(model, 0.1, weight_decay=0.5, recipe=Recipe(diag_lr_scale=1.0, rotation_lr_scale=1.0))
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        if name in before:
            expected = before[name] if name.endswith(".d") else before[name] * (1 - 0.1 * 0.5)
            assert torch.allclose(p, expected, rtol=1e-6, atol=0), name


@pytest.mark.parametrize("value", [0.0, -0.1, 1e3, float("nan")])
def test_bad_scales_are_refused_naming_the_field(value):
    with pytest.raises(AdapterError, match="rotation_lr_scale"):
        Recipe(rotation_lr_scale=value)


def test_a_model_without_adapters_is_refused(tiny_checkpoints):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"]).requires_grad_(False)
    with pytest.raises(AdapterError, match="no trainable parameter"):
        parameter_groups(model, LR)


def test_train_cli_flags_reach_the_optimizer_and_the_rotation_moves_less(tiny_checkpoints, tmp_path):
    """`sora-serve train --rotation-lr-scale/--diag-lr-scale` set the groups' lrs (metrics.json
    records the optimizer's groups); a rotation at 1e-3 of lr barely leaves its init."""

    def train(out, *flags):
        cli_main(
            [
                "train",
                "--model",
                str(tiny_checkpoints["llama"]),
                "--data",
                str(write_text(tmp_path)),
                "--method",
                "sora",
                "--target-modules",
                "q_proj,v_proj",
                "--r",
                "4",
                "--r-p",
                "2",
                "--steps",
                "6",
                "--lr",
                "1e-2",
                "--out",
                str(out),
                *flags,
            ]
        )
        return json.loads((out / "metrics.json").read_text())

    slow = train(tmp_path / "slow", "--rotation-lr-scale", "0.001", "--diag-lr-scale", "0.5")
    lrs = {g["role"]: g["lr"] for g in slow["param_groups"]}
    assert lrs == pytest.approx({"lowrank": 1e-2, "diag": 5e-3, "rotation": 1e-5})
    single = train(tmp_path / "single", "--single-lr")
    assert {g["role"]: g["lr"] for g in single["param_groups"]} == pytest.approx(
        {"lowrank": 1e-2, "diag": 1e-2, "rotation": 1e-2}
    )
    moved = {run: rotation_change(tmp_path / run) for run in ("slow", "single")}
    assert moved["slow"] < 0.01 * moved["single"], moved


def test_train_adapter_defaults_are_the_recipe(tiny_checkpoints):
    metrics = train_adapter(
        TrainConfig(
            model=tiny_checkpoints["llama"],
            data=BUILTIN_TEXT,
            method="sora",
            target_modules=["q_proj"],
            steps=1,
            lr=1e-3,
            progress=False,
        )
    )
    lrs = {g["role"]: g["lr"] for g in metrics["param_groups"]}
    assert lrs == pytest.approx(
        {"lowrank": 1e-3, "diag": 1e-3 * Recipe.diag_lr_scale, "rotation": 1e-3 * Recipe.rotation_lr_scale}
    )


def test_trainer_helper_gives_trainer_the_same_groups(tiny_checkpoints, tmp_path):
    model = sora_model(tiny_checkpoints["llama"])
    args = TrainingArguments(
        str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=LR,
        weight_decay=DECAY,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        logging_strategy="no",
        save_strategy="no",
    )
    rows = random_ids(512, batch=4, length=8, seed=1)
    data = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in rows]
    c_before = next(p for n, p in model.named_parameters() if n.endswith("sora_C")).detach().clone()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        optimizer_cls_and_kwargs=trainer_optimizer(model, args, Recipe(rotation_lr_scale=0.2)),
    )
    trainer.train()
    groups = {(g["role"], g["weight_decay"]): g["initial_lr"] for g in trainer.optimizer.param_groups}
    assert groups == pytest.approx(
        {("lowrank", DECAY): LR, ("diag", 0.0): LR * Recipe.diag_lr_scale, ("rotation", DECAY): LR * 0.2}
    )
    assert not torch.equal(
        next(p for n, p in model.named_parameters() if n.endswith("sora_C")), c_before
    )  # Trainer stepped our groups


def write_text(tmp_path):
    path = tmp_path / "text.txt"
    if not path.exists():
        path.write_text("\n".join(BUILTIN_TEXT) + "\n")
    return path


def rotation_change(adapter_dir) -> float:
    """|C - D|_F summed over layers: 0 at init (D = C), so it measures how far the rotation trained."""
    from safetensors.torch import load_file

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return sum((tensors[k] - tensors[k.replace("sora_C", "sora_D")]).norm().item() for k in tensors if "sora_C" in k)
