"""vLLM CPU's torch LoRA ops, still used by the embedding and logits LoRA layers.

Stock, they gather `weights[indices]` per token and index -1 (no adapter) wraps to the last slot:
a base request was computed with the last slot's adapter. Here: one GEMM per slot, -1 rows left alone.
"""

from __future__ import annotations

import torch


def slot_matmul(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """out[t] = weights[indices[t]] @ inputs[t], one GEMM per slot; rows with index -1 (no adapter) are 0.

    Stands in for the per-token gather `weights[indices]` of vLLM's torch ops, where -1 wraps to
    the last slot."""
    weights = weights.squeeze(1) if weights.ndim == 4 else weights
    out = torch.zeros(indices.shape[0], weights.shape[1], dtype=dtype, device=inputs.device)
    for slot in torch.unique(indices).tolist():
        if slot >= 0:
            rows = (indices == slot).nonzero().squeeze(1)
            out.index_copy_(0, rows, inputs.index_select(0, rows).to(dtype) @ weights[slot].to(dtype).T)
    return out


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0) -> None:
    out = slot_matmul(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : out.shape[1]] = scaling * out


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True) -> None:
    out = slot_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    rows = 1 if out.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    columns = min(out.shape[1], output_tensor.shape[1])  # adapter and model may pad differently
    if add_inputs:
        output_tensor[:, :columns] += out[:rows, :columns]
    else:
        output_tensor[:, :columns] = out[:rows, :columns]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int, add_inputs: bool = True) -> None:
    out = slot_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += out
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = out


def patch_cpu_ops() -> None:
    """The layers the grouped op does not replace (embeddings, logits) still call vLLM's torch ops."""
    import vllm.lora.ops.torch_ops as torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for module in (lora_ops, torch_ops, punica_cpu):  # sgmv_* call lora_ops' names; punica_cpu bound its own
        module.bgmv_shrink, module.bgmv_expand, module.bgmv_expand_slice = bgmv_shrink, bgmv_expand, bgmv_expand_slice
