"""vLLM CPU's torch LoRA ops (`PunicaWrapperCPU`), with the slot -1 wrap mended.

Stock, they gather `weights[indices]` per token, and index -1 (a token without adapter) wraps to
the last slot: once every slot is full, a base request is computed with the last slot's adapter.
The embedding and logits LoRA layers always call them; with the punica backend, every linear
layer does too. Two mended forms, both exact:

- `graph_safe`: the stock gather with -1 rows masked to zero. Static shapes, no host reads (what
  the GPU kernels do: they skip lora id -1); used with the punica backend, whose point is that.
- `per_slot`: one GEMM per slot present, -1 rows untouched (reads each slot's weights once
  instead of one copy per token, and the slots on the host); used with the grouped CPU backend.
"""

from __future__ import annotations

import torch


def _selected_weights(weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    weights = weights.squeeze(1) if weights.ndim == 4 else weights
    return weights[indices.clamp(min=0)].to(dtype)


def masked_matmul(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """out[t] = weights[indices[t]] @ inputs[t], rows with index -1 zero; graph-safe."""
    out = torch.einsum("bi, boi -> bo", inputs.to(dtype), _selected_weights(weights, indices, dtype))
    return out * (indices >= 0).to(dtype)[:, None]


def slot_matmul(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """out[t] = weights[indices[t]] @ inputs[t], one GEMM per slot; rows with index -1 are 0."""
    weights = weights.squeeze(1) if weights.ndim == 4 else weights
    out = torch.zeros(indices.shape[0], weights.shape[1], dtype=dtype, device=inputs.device)
    for slot in torch.unique(indices).tolist():
        if slot >= 0:
            rows = (indices == slot).nonzero().squeeze(1)
            out.index_copy_(0, rows, inputs.index_select(0, rows).to(dtype) @ weights[slot].to(dtype).T)
    return out


def ops_with(matmul):
    """bgmv_shrink / bgmv_expand / bgmv_expand_slice with vLLM's signatures around `matmul`."""

    def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0) -> None:
        out = matmul(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
        output_tensor[:, : out.shape[1]] = scaling * out

    def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True) -> None:
        out = matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
        rows = 1 if out.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
        columns = min(out.shape[1], output_tensor.shape[1])  # adapter and model may pad differently
        if add_inputs:
            output_tensor[:, :columns] += out[:rows, :columns]
        else:
            output_tensor[:, :columns] = out[:rows, :columns]

    def bgmv_expand_slice(
        inputs,
        lora_b_weights,
        output_tensor,
        lora_indices_tensor,
        slice_offset: int,
        slice_size: int,
        add_inputs: bool = True,
    ) -> None:
        out = matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
        if add_inputs:
            output_tensor[:, slice_offset : slice_offset + slice_size] += out
        else:
            output_tensor[:, slice_offset : slice_offset + slice_size] = out

    return bgmv_shrink, bgmv_expand, bgmv_expand_slice


def patch_cpu_ops(backend: str) -> None:
    """Install the mended ops where vLLM CPU looks them up (sgmv_* call lora_ops' names; punica_cpu bound its own)."""
    import vllm.lora.ops.torch_ops as torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    ops = ops_with(masked_matmul if backend == "punica" else slot_matmul)
    for module in (lora_ops, torch_ops, punica_cpu):
        module.bgmv_shrink, module.bgmv_expand, module.bgmv_expand_slice = ops
