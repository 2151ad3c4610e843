"""vLLM's input-embedding and logits LoRA layers, at no cost while no slot holds weights for them.

With LoRA enabled, vLLM wraps a model's input embedding and its logits processor in LoRA layers that
run vLLM's LoRA ops on every step: a gather of the embedding's A rows and an expand, and for the
logits a shrink and an expand over the whole vocabulary, per slot in the batch. sora-serve never
puts weights there (its loader refuses an adapter naming an embedding or the output head,
`loading.check_targets`), and vLLM's warm-up LoRAs are zeros, so on every step those ops add zero
at a cost of ~2 ms per decode step of Llama 2048 x 12 on 2 cores (the "punica ops" row of
docs/benchmarks/profile-step-20261206-32slots.md; gone in profile-step-20261208.md).

These subclasses keep vLLM's buffers and slot writes, note which slots hold a non-zero B (with B
zero, a slot adds nothing whatever A holds), and take the base layer's own path while none does.
The embedding class enters vLLM's layer table like the linear ones (`layers.install`); vLLM builds
the logits wrapper itself, outside the table, so `adopt` gives that object our subclass once the
LoRA manager has built it. The branch reads host state that only slot writes change, so a graph
captured (CUDA graphs, torch.compile) replays the path of its capture; with sora-serve's loader no
weights reach these layers, so that path is the base one throughout.
"""

from __future__ import annotations

import functools

import torch


class WeightedSlotsMixin:
    """Tracks the slots whose B is non-zero; `has_weights` is false while every slot adds zero."""

    def set_lora(self, index: int, lora_a, lora_b) -> None:
        super().set_lora(index, lora_a, lora_b)  # vLLM's set_lora resets the slot first
        if bool(torch.count_nonzero(lora_b)):
            self._weighted_slots().add(index)

    def reset_lora(self, index: int) -> None:
        super().reset_lora(index)
        self._weighted_slots().discard(index)

    @property
    def has_weights(self) -> bool:
        return bool(self._weighted_slots())

    def _weighted_slots(self) -> set[int]:
        # No __init__ of ours runs on an adopted object; a plain attribute (not a buffer) on first use.
        return self.__dict__.setdefault("sora_weighted_slots", set())


@functools.cache
def embedding_class() -> type:
    from vllm.lora.layers import VocabParallelEmbeddingWithLoRA

    class SoraVocabParallelEmbeddingWithLoRA(WeightedSlotsMixin, VocabParallelEmbeddingWithLoRA):
        """vLLM's embedding LoRA layer; the base embedding alone while no slot holds weights."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.has_weights:
                return super().forward(x)
            return self.base_layer.forward(x)

    return SoraVocabParallelEmbeddingWithLoRA


@functools.cache
def logits_class() -> type:
    from vllm.lora.layers import LogitsProcessorWithLoRA

    class SoraLogitsProcessorWithLoRA(WeightedSlotsMixin, LogitsProcessorWithLoRA):
        """vLLM's logits LoRA layer; the base logits processor alone while no slot holds weights."""

        def _get_logits(self, hidden_states, lm_head, embedding_bias=None, skip_gather: bool = False):
            if self.has_weights or not self._base_path_is_identical():
                return super()._get_logits(hidden_states, lm_head, embedding_bias, skip_gather)
            head = getattr(lm_head, "base_layer", lm_head)
            return self.base_layer._get_logits(hidden_states, head, embedding_bias, skip_gather)

        def _base_path_is_identical(self) -> bool:
            # vLLM's LoRA path reorders tensor-parallel shards' padded logits and trims them to
            # vocab_size; the base path does neither, so it is taken only where both are no-ops.
            base = self.base_layer
            return self.sharded_to_full_mapping_gpu is None and base.vocab_size == base.org_vocab_size

    return SoraLogitsProcessorWithLoRA


def adopt(modules) -> None:
    """Give vLLM's logits LoRA layers among `modules` (the LoRA manager's) the plugin's subclass."""
    from vllm.lora.layers import LogitsProcessorWithLoRA

    for module in modules:
        if type(module) is LogitsProcessorWithLoRA:
            module.__class__ = logits_class()  # adds methods only: vLLM's object and buffers stay as built
