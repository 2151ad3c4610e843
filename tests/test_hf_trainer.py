"""transformers.Trainer trains a `sora_serve.attach`-ed model; SaveAdapterCallback writes adapter dirs.

A few steps on random tokens with the tiny Llama (float32): only adapter parameters move, gradient
checkpointing + recompute-base give the same training, and each saved directory reproduces the
trained model (load_adapter: 1e-6, fold: 1e-4).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import sora_serve as ss
from sora_serve.converters.fold import fold_adapter
from sora_serve.training.hf_trainer import ADAPTER_SUBDIR, SaveAdapterCallback, use_recompute_base

from .helpers import random_ids

STEPS, SAVE_EVERY = 4, 2
LOAD_TOL = 1e-6  # fp32: the same tensors and ops, saved and loaded
FOLD_TOL = 1e-4  # fp32 merged weights (folded in float64) vs the runtime adapter
SAME_TRAINING_TOL = 1e-5  # fp32: checkpointed runs recompute the same GEMMs
CONFIGS = {
    "sora": ss.AdapterConfig(
        method="sora", r=4, r_p=2, rotation="cayley", target_modules=["q_proj", "v_proj", "down_proj"]
    ),
    "dora": ss.AdapterConfig(method="dora", r=4, target_modules=["q_proj", "v_proj", "up_proj"]),
}


def token_dataset(rows: int = 16, length: int = 12) -> list[dict]:
    ids = random_ids(512, batch=rows, length=length, seed=3)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]


def train(base, out, method: str, *, checkpointing: bool = False, resume: Path | None = None) -> dict:
    """Attach a fresh adapter `method` to the base and train it with Trainer (gradient checkpointing and
    recompute-base both on with `checkpointing`; from Trainer's checkpoint `resume` if given);
    returns the model, the weights before, the trainer."""
    torch.manual_seed(0)  # the adapter's random init
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    base_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ss.attach(model, CONFIGS[method], method, verbose=False)
    adapter_init = {name: p.detach().clone() for name, p in adapter_parameters(model).items()}
    if checkpointing:
        use_recompute_base(model)
    args = TrainingArguments(
        str(out),
        max_steps=STEPS,
        save_steps=SAVE_EVERY,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        gradient_checkpointing=checkpointing,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        logging_strategy="no",
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=token_dataset(),
        callbacks=[SaveAdapterCallback(base_model_name_or_path=str(base))],
    )
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return {
        "model": model.eval(),
        "base_before": base_before,
        "adapter_init": adapter_init,
        "trainer": trainer,
        "out": out,
    }


def adapter_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if ".adapters." in name}


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


@pytest.fixture(scope="module")
def trained(tiny_checkpoints, tmp_path_factory) -> dict[str, dict]:
    """SORA (Cayley) with gradient checkpointing + recompute-base, DoRA without; trained once per module."""
    base = tiny_checkpoints["llama"]
    return {
        method: train(base, tmp_path_factory.mktemp(f"trainer-{method}"), method, checkpointing=method == "sora")
        for method in CONFIGS
    }


@pytest.mark.parametrize("method", list(CONFIGS))
def test_only_adapter_parameters_train(trained, method):
    run = trained[method]
    model, adapter = run["model"], adapter_parameters(run["model"])
    optimized = {id(p) for group in run["trainer"].optimizer.param_groups for p in group["params"]}
    assert adapter and optimized == {id(p) for p in adapter.values()}
    for name, p in model.named_parameters():
        if name not in adapter:  # attach moved the wrapped layers' weights under `.base_layer`
            assert torch.equal(p, run["base_before"][name.replace(".base_layer", "")]), name
    unchanged = [name for name, p in adapter.items() if torch.equal(p, run["adapter_init"][name])]
    assert not unchanged, f"adapter tensors that did not train: {unchanged}"


def test_checkpointing_and_recompute_base_train_the_same(trained, tiny_checkpoints, tmp_path):
    checkpointed = trained["sora"]["model"]
    assert checkpointed.is_gradient_checkpointing and all(
        layer.recompute_base for _, layer in ss.adapted_layers(checkpointed)
    )
    plain = train(tiny_checkpoints["llama"], tmp_path, "sora")["model"]
    assert not plain.is_gradient_checkpointing
    reference = adapter_parameters(plain)
    for name, p in adapter_parameters(checkpointed).items():
        assert torch.allclose(p, reference[name], rtol=0, atol=SAME_TRAINING_TOL), name


@pytest.mark.parametrize("method", list(CONFIGS))
def test_saved_adapters_reproduce_the_trained_model(trained, tiny_checkpoints, method, tmp_path):
    run, base = trained[method], tiny_checkpoints["llama"]
    ids = random_ids(512, batch=2, length=10, seed=4)
    expected = logits(run["model"], ids)
    saves = [run["out"] / f"checkpoint-{step}" / ADAPTER_SUBDIR for step in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)]
    final = run["out"] / ADAPTER_SUBDIR  # written at the end of training
    for directory in [saves[-1], final]:
        loaded = ss.load_adapter(AutoModelForCausalLM.from_pretrained(base).eval(), directory)
        assert (logits(loaded, ids) - expected).abs().max() <= LOAD_TOL, directory
    first = ss.load_adapter(AutoModelForCausalLM.from_pretrained(base).eval(), saves[0])
    assert (logits(first, ids) - expected).abs().max() > 1e-4  # an earlier save holds the earlier weights
    fold_adapter(base, final, tmp_path / "merged", verify=False, progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (logits(merged, ids) - expected).abs().max() <= FOLD_TOL


def test_trainer_checkpoint_resumes_the_same_training(trained, tiny_checkpoints, tmp_path):
    """Trainer's own checkpoint (whole model state, adapter included) resumes to the same weights."""
    run = trained["sora"]
    resumed = train(
        tiny_checkpoints["llama"], tmp_path, "sora", checkpointing=True, resume=run["out"] / f"checkpoint-{SAVE_EVERY}"
    )["model"]
    reference = adapter_parameters(run["model"])
    for name, p in adapter_parameters(resumed).items():
        assert torch.allclose(p, reference[name], rtol=0, atol=SAME_TRAINING_TOL), name


def test_bad_use(tiny_checkpoints, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    with pytest.raises(ss.AdapterError, match="no adapted layer"):
        use_recompute_base(model)
    ss.attach(model, CONFIGS["dora"], "a", verbose=False)
    ss.attach(model, CONFIGS["sora"], "b", verbose=False)
    args = TrainingArguments(str(tmp_path), max_steps=1, use_cpu=True, report_to="none", disable_tqdm=True)
    for callback, match in [
        (SaveAdapterCallback(), r"needs one adapter name; attached adapters: \['a', 'b'\]"),
        (SaveAdapterCallback("c"), "needs 'c'"),
    ]:
        with pytest.raises(ss.AdapterError, match=match):
            Trainer(model=model, args=args, train_dataset=token_dataset(), callbacks=[callback]).train()
    assert not any(tmp_path.iterdir())  # refused before the first step: nothing saved
