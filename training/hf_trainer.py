"""Train any sora-serve adapter with Hugging Face's `transformers.Trainer`.

    model = ss.attach(AutoModelForCausalLM.from_pretrained(base), ss.AdapterConfig(method="sora", ...), "a")
    use_recompute_base(model)                       # optional: Pre-Diag/SORA at LoRA-level activation memory
    args = TrainingArguments("runs/a", save_steps=100, gradient_checkpointing=True)
    Trainer(model=model, args=args, train_dataset=..., callbacks=[SaveAdapterCallback("a")]).train()
    # runs/a/checkpoint-100/sora_adapter/, ..., and runs/a/sora_adapter/ at the end: adapter directories

Nothing else is needed: `attach` leaves only the adapter's parameters with `requires_grad`, and
Trainer's optimizer takes exactly those. Gradient checkpointing (`gradient_checkpointing=True`)
works as it does for PEFT: transformers 5 checkpoints each decoder layer with
`use_reentrant=False` and makes the embeddings' output require grad, so gradients reach the
adapters of frozen layers. `use_recompute_base` is `sora-serve train --recompute-base`: each
adapted layer also checkpoints itself (nested inside a checkpointed decoder layer when both are on).

Trainer still writes its own checkpoint (the whole model state, for `resume_from_checkpoint`);
the callback adds our adapter directory beside it, which `load_adapter`, `sora-serve fold` /
`export-onnx` and the vLLM plugin read.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import sora_serve as ss
from sora_serve.errors import AdapterError

ADAPTER_SUBDIR = "sora_adapter"


def use_recompute_base(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Recompute W0 x in backward in every adapted layer (activation checkpointing per layer)."""
    layers = list(ss.adapted_layers(model))
    if not layers:
        raise AdapterError(f"{type(model).__name__} has no adapted layer; call sora_serve.attach first", field="model")
    for _, layer in layers:
        layer.recompute_base = enabled
    return model


class SaveAdapterCallback(TrainerCallback):
    """At each Trainer save, write adapter `adapter_name` to `<checkpoint-N>/sora_adapter`; at the end
    of training to `<output_dir>/sora_adapter`. Each write is atomic (`sora_serve.save_adapter`)."""

    def __init__(
        self,
        adapter_name: str | None = None,
        *,
        base_model_name_or_path: str | None = None,
        subdir: str = ADAPTER_SUBDIR,
    ):
        self.adapter_name = adapter_name
        self.base_model_name_or_path = base_model_name_or_path
        self.subdir = subdir

    def _name(self, model: nn.Module) -> str:
        """The adapter to save: the one given, else the only one attached."""
        attached = sorted(ss.adapter_configs(model))
        if self.adapter_name is None and len(attached) == 1:
            return attached[0]
        if self.adapter_name in attached:
            return self.adapter_name
        wanted = "one adapter name" if self.adapter_name is None else f"'{self.adapter_name}'"
        raise AdapterError(f"SaveAdapterCallback needs {wanted}; attached adapters: {attached}", field="adapter_name")

    def save(self, model: nn.Module, directory: str | Path) -> Path:
        out = Path(directory) / self.subdir
        return ss.save_adapter(
            model, out, self._name(model), base_model_name_or_path=self.base_model_name_or_path, force=True
        )

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ):
        self._name(model)  # a wrong name fails before the first step, not at the first save

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        if state.is_world_process_zero:
            self.save(model, os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        if state.is_world_process_zero:
            self.save(model, args.output_dir)
