"""vLLM's input-embedding and logits LoRA layers under the plugin (`heads.py`), without an engine.

While no slot holds a non-zero B they must be the base layers exactly, without calling vLLM's LoRA
ops; once a slot holds weights, vLLM's own LoRA path (checked against a float64 reference); after a
reset, or with vLLM's all-zero warm-up weights, the base path again."""

from __future__ import annotations

import pytest
import torch

from sora_serve.vllm_plugin import apply, heads

from .test_vllm_ops import punica_wrapper

VOCAB, HIDDEN, RANK, SLOTS = 96, 32, 4, 3  # RANK below max_lora_rank (8): slots are padded
SLOT_OF_ROW = [1, -1, 1, 0, 2]  # slot 1 will hold weights; 0 and 2 stay empty
TOL = dict(atol=1e-4, rtol=1e-4)  # float32 layers against float64


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    """vLLM's embedding and logits LoRA wrappers, built the way its LoRA manager builds them."""
    from vllm.config import LoRAConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import (
        destroy_distributed_environment,
        destroy_model_parallel,
        init_distributed_environment,
        initialize_model_parallel,
    )
    from vllm.lora.utils import from_layer, from_layer_logits_processor
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    apply()
    torch.manual_seed(0)
    lora_config = LoRAConfig(max_lora_rank=8, max_loras=SLOTS, lora_dtype=torch.float32)
    rendezvous = tmp_path_factory.mktemp("distributed") / "store"
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(1, 0, distributed_init_method=f"file://{rendezvous}", local_rank=0, backend="gloo")
        initialize_model_parallel(1, 1)
        try:
            embedding = from_layer(VocabParallelEmbedding(VOCAB, HIDDEN), SLOTS, lora_config, [], None)
            head = ParallelLMHead(VOCAB, HIDDEN)
            logits = from_layer_logits_processor(LogitsProcessor(VOCAB), head, SLOTS, lora_config)
            heads.adopt([logits])
            for layer in (embedding.base_layer, head):  # random weights, then what vLLM's loader runs
                layer.weight.data.normal_()
                layer.sora_test_weight = layer.weight.detach().clone()  # vLLM CPU may repack .weight
                layer.quant_method.process_weights_after_loading(layer)
            wrapper = punica_wrapper(SLOT_OF_ROW, SLOTS, prefill=False, vocab_size=VOCAB)
            embedding.set_mapping(wrapper)
            logits.set_mapping(wrapper)
            yield embedding, logits, head
        finally:
            destroy_model_parallel()
            destroy_distributed_environment()


def refuse_lora_ops(monkeypatch, wrapper) -> None:
    for name in ("add_lora_embedding", "add_lora_logits"):
        monkeypatch.setattr(wrapper, name, lambda *a, name=name, **k: pytest.fail(f"{name} ran with no weights"))


def outputs(embedding, logits, head, ids, hidden) -> tuple[torch.Tensor, torch.Tensor]:
    return embedding(ids), logits(head, hidden)


def lora_reference(ids, hidden, embedding, head, slot_weights):
    """float64: the base embedding and logits, plus B A on the rows whose slot holds weights."""
    emb = embedding.base_layer.sora_test_weight.double()[ids]
    out = hidden.double() @ head.sora_test_weight.double()[:VOCAB].T
    for row, slot in enumerate(SLOT_OF_ROW):
        if slot in slot_weights:
            (ea, eb), (la, lb) = slot_weights[slot]
            emb[row] += eb.double() @ ea.double()[:, ids[row]]
            out[row] += lb.double() @ (la.double() @ hidden[row].double())
    return emb, out


def test_the_plugin_owns_both_layers(layers):
    embedding, logits, _ = layers
    assert type(embedding) is heads.embedding_class()
    assert type(logits) is heads.logits_class()


def test_no_weights_means_the_base_layers_exactly(layers, monkeypatch):
    embedding, logits, head = layers
    refuse_lora_ops(monkeypatch, embedding.punica_wrapper)
    ids, hidden = torch.randint(0, VOCAB, (len(SLOT_OF_ROW),)), torch.randn(len(SLOT_OF_ROW), HIDDEN)
    emb, out = outputs(embedding, logits, head, ids, hidden)
    assert torch.equal(emb, embedding.base_layer(ids))
    assert torch.equal(out, logits.base_layer(head, hidden))
    expected_emb, expected_out = lora_reference(ids, hidden, embedding, head, {})
    torch.testing.assert_close(emb.double(), expected_emb, **TOL)
    torch.testing.assert_close(out.double(), expected_out, **TOL)


def test_a_slot_with_weights_takes_vllms_lora_path_until_it_is_reset(layers, monkeypatch):
    embedding, logits, head = layers
    ids, hidden = torch.randint(0, VOCAB, (len(SLOT_OF_ROW),)), torch.randn(len(SLOT_OF_ROW), HIDDEN)
    weights = {
        1: (
            (torch.randn(RANK, VOCAB), torch.randn(HIDDEN, RANK)),  # embedding A (r x vocab), B (hidden x r)
            (torch.randn(RANK, HIDDEN), torch.randn(VOCAB, RANK)),  # logits A (r x hidden), B (vocab x r)
        )
    }
    (ea, eb), (la, lb) = weights[1]
    embedding.set_lora(1, ea, eb)
    logits.set_lora(1, la, lb)
    try:
        assert embedding.has_weights and logits.has_weights
        emb, out = outputs(embedding, logits, head, ids, hidden)
        expected_emb, expected_out = lora_reference(ids, hidden, embedding, head, weights)
        torch.testing.assert_close(emb.double(), expected_emb, **TOL)
        torch.testing.assert_close(out.double(), expected_out, **TOL)
    finally:
        embedding.reset_lora(1)
        logits.reset_lora(1)
    refuse_lora_ops(monkeypatch, embedding.punica_wrapper)
    emb, out = outputs(embedding, logits, head, ids, hidden)
    assert torch.equal(emb, embedding.base_layer(ids))
    assert torch.equal(out, logits.base_layer(head, hidden))


def test_vllms_all_zero_warm_up_weights_keep_the_base_path(layers, monkeypatch):
    embedding, logits, head = layers
    embedding.set_lora(2, torch.zeros(RANK, VOCAB), torch.zeros(HIDDEN, RANK))
    logits.set_lora(2, torch.zeros(RANK, HIDDEN), torch.zeros(VOCAB, RANK))
    assert not embedding.has_weights and not logits.has_weights
    refuse_lora_ops(monkeypatch, embedding.punica_wrapper)
    ids, hidden = torch.randint(0, VOCAB, (len(SLOT_OF_ROW),)), torch.randn(len(SLOT_OF_ROW), HIDDEN)
    emb, out = outputs(embedding, logits, head, ids, hidden)
    assert torch.equal(emb, embedding.base_layer(ids))
    assert torch.equal(out, logits.base_layer(head, hidden))
