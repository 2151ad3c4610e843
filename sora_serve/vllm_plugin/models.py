"""What vLLM's model registry says about an architecture: its class, and whether it can load an untied head.

Read by `sora-serve serve` before the engine starts and by `sora-serve fold` (a warning); imports vLLM
only when called.
"""

from __future__ import annotations

import inspect


def vllm_model_class(architecture: str) -> type | None:
    """vLLM's own class for `architecture` from its model registry; None when vLLM has none (its
    Transformers backend may still serve it: the engine decides)."""
    from vllm.model_executor.models import ModelRegistry

    registered = ModelRegistry.models.get(architecture)
    return None if registered is None else registered.load_model_cls()


def vllm_always_ties_head(architecture: str) -> bool:
    """Whether vLLM's class computes logits with the input embeddings whatever tie_word_embeddings says
    (Gemma2, Cohere): it has no lm_head, so an untied (folded) head cannot be loaded."""
    cls = vllm_model_class(architecture)
    if cls is None:
        return False
    source = inspect.getsource(cls.compute_logits)
    return "embed_tokens" in source and "lm_head" not in source
