"""Tiny Hugging Face checkpoints built locally (no model hub here): tests, demo and benchmarks.

`make_tiny_checkpoint("llama", out_dir)` writes a randomly initialised model of the named
architecture plus a byte-level BPE tokenizer trained on `BUILTIN_TEXT`. Head sizes are 32 or
more because vLLM's CPU attention refuses smaller ones.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel, PreTrainedTokenizerFast

BUILTIN_TEXT = [
    "the film is a charming and often moving story about two friends who never give up .",
    "a dull , lifeless script leaves the talented cast with nothing to do .",
    "it is one of the best movies of the year , funny and smart from start to finish .",
    "the plot is predictable and the jokes fall flat every single time .",
    "beautifully shot and well acted , the movie stays with you long after it ends .",
    "i wanted to like it , but the pacing is slow and the ending is a mess .",
    "a warm , generous comedy with real heart and a great soundtrack .",
    "the dialogue is clumsy and the characters are thin and forgettable .",
    "an ambitious , thrilling adventure that rewards patient viewers .",
    "too long , too loud and far too pleased with itself .",
    "the kitchen blender works great and is easy to clean after use .",
    "the battery died after two days and support never answered my emails .",
    "fast shipping , solid build quality , and the price was fair .",
    "the book is well written , with vivid characters and a clever plot .",
    "the flight was delayed for hours and the crew was rude to everyone .",
    "a sharp and touching film that earns every one of its tears .",
]

ARCHITECTURES = {
    "llama": dict(
        model_type="llama", hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2
    ),
    "qwen2": dict(
        model_type="qwen2", hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2
    ),
    "mistral": dict(
        model_type="mistral", hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2
    ),
    "gpt2": dict(model_type="gpt2", n_embd=128, n_head=4, n_positions=256),
}


def train_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the built-in text (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # a few ms of work; its bar left blank lines in every caller's output
    )
    tok.train_from_iterator(BUILTIN_TEXT, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def make_tiny_model(
    arch: str = "llama", *, num_layers: int = 2, vocab_size: int = 512, seed: int = 0, **overrides
) -> PreTrainedModel:
    """A randomly initialised causal LM of `arch`, float32, in eval mode."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    spec = dict(ARCHITECTURES[arch])
    model_type = spec.pop("model_type")
    layers_key = "n_layer" if model_type == "gpt2" else "num_hidden_layers"
    spec.update(
        {layers_key: num_layers, "vocab_size": vocab_size, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    )
    if model_type != "gpt2":
        spec.setdefault("max_position_embeddings", 256)
        spec.setdefault("tie_word_embeddings", False)
    spec.update(overrides)
    config = AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_biases(model)
    return model.eval()


@torch.no_grad()
def randomize_biases(model: torch.nn.Module, std: float = 0.05) -> None:
    """HF initialises biases to zero, which would hide every bias bug; real checkpoints have none zero."""
    for module in model.modules():
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.nn.Parameter) and bias.dim() == 1 and not isinstance(module, torch.nn.LayerNorm):
            bias.normal_(0.0, std)


def make_tiny_checkpoint(arch: str, out_dir: str | Path, *, max_shard_size: str | None = None, **kwargs) -> Path:
    """Save a tiny model, its tokenizer and a generation config to `out_dir`; return the path."""
    out_dir = Path(out_dir)
    model = make_tiny_model(arch, **kwargs)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **save_kwargs)
    train_tokenizer(model.config.vocab_size).save_pretrained(out_dir)
    return out_dir
