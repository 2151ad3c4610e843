"""A bad adapter fails its own requests, never anyone else's.

The op zeroes any adapter-token row that is not finite after a LoRA layer (`quarantine_rows`)
and records its slot: k/v come out of an adapted `qkv_proj`, so nothing non-finite from an
adapter is written to the KV cache, whose blocks other requests reuse (stale NaN/inf there turned
later, unrelated requests into `[0, 0, ...]`). The worker then flags that adapter's requests in
the step's output (`num_nans_in_logits`, value QUARANTINED: real NaN counts are >= 0), and the
scheduler, in the engine-core process, finishes them with vLLM's own error status
(`FINISHED_ERROR`: finish_reason "error", HTTP 500 on the API server) and logs which adapter did it.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger("sora_serve.vllm_plugin")

QUARANTINED = -1
_poisoned_slots: set[int] = set()
slot_lora_ids: dict[int, int] = {}  # slot index -> lora_int_id, kept by the activation patch


def quarantine_rows(output: torch.Tensor, token_slots: torch.Tensor) -> None:
    """Zero the rows of adapter tokens that hold NaN/inf (or overflow the dtype) and record their slots.

    One reduction per layer: a row's sum is non-finite iff the row holds NaN/inf or sums past the
    dtype's range, which no sane activation does."""
    bad = ~torch.isfinite(output.sum(dim=1)) & (token_slots >= 0)
    if bool(bad.any()):  # a host sync per layer: free on CPU; on GPU this would be deferred to the step
        output[bad] = 0
        _poisoned_slots.update(token_slots[bad].unique().tolist())


def take_poisoned_lora_ids() -> set[int]:
    ids = {slot_lora_ids[s] for s in _poisoned_slots if s in slot_lora_ids}
    _poisoned_slots.clear()
    return ids


def patch_model_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # vLLM CPU's runner inherits it

    stock = GPUModelRunner._bookkeeping_sync

    @functools.wraps(stock)
    def _bookkeeping_sync(self, *args, **kwargs):
        result = stock(self, *args, **kwargs)
        bad_ids = take_poisoned_lora_ids()
        if bad_ids and isinstance(result[0], dict):  # result[0]: the step's num_nans_in_logits
            batch = self.input_batch
            result[0].update({req_id: QUARANTINED for i, req_id in enumerate(batch.req_ids) if int(batch.request_lora_mapping[i]) in bad_ids})
        return result

    GPUModelRunner._bookkeeping_sync = _bookkeeping_sync


def patch_scheduler() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    stock = Scheduler.update_from_output

    @functools.wraps(stock)
    def update_from_output(self, scheduler_output, model_runner_output):
        nans = model_runner_output.num_nans_in_logits
        failed = [req_id for req_id, n in (nans or {}).items() if n == QUARANTINED]
        for req_id in failed:
            del nans[req_id]  # not a NaN count: keep vLLM's statistics clean
            request = self.requests.get(req_id)
            name = request.lora_request.lora_name if request is not None and request.lora_request else "?"
            logger.error("sora-serve: adapter '%s' produced non-finite activations; request %s failed, other requests unaffected", name, req_id)
        # vLLM's own path for requests that fail inside a step: finished with FINISHED_ERROR by this update.
        self.encoder_cache_mismatch_reqs.update(failed)
        return stock(self, scheduler_output, model_runner_output)

    Scheduler.update_from_output = update_from_output
