"""A bad adapter fails its own requests, never anyone else's.

After every plugin layer, rows of adapter tokens that are not finite are zeroed with masked ops and
their slots flagged in a small device tensor (`quarantine_rows`): no host read per layer, nothing
a CUDA graph cannot capture (on a CPU, where a host read costs nothing, the grouped backend sums
the output first and runs that pass only when the sum is not finite). k/v come out of an adapted
`qkv_proj`, so nothing non-finite from an adapter is written to the KV cache, whose blocks other
requests reuse (stale NaN/inf there turned later, unrelated requests into `[0, 0, ...]`).

Once per step, when the worker returns the step's output (`Worker.sample_tokens` /
`execute_model`, after vLLM has synchronized to read the sampled tokens), the flags are read once
and cleared; the flagged adapters' requests are marked in the output's `num_nans_in_logits`
(value QUARANTINED: real NaN counts are >= 0), and the scheduler, in the engine-core process,
finishes them with vLLM's own error status (`FINISHED_ERROR`: finish_reason "error", HTTP 500 on
the API server) and logs which adapter did it.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import NamedTuple

import torch

logger = logging.getLogger("sora_serve.vllm_plugin")

QUARANTINED = -1
_flags: dict[torch.device, torch.Tensor] = {}  # per device: (max_loras + 1,) counts, the last entry for slot -1


def failure_flags(max_loras: int, device: torch.device | str) -> torch.Tensor:
    """The process's flag tensor for `device`, shared by every layer; allocated at engine start."""
    device = torch.device(device)
    flags = _flags.get(device)
    if flags is None or flags.shape[0] != max_loras + 1:
        flags = _flags[device] = torch.zeros(max_loras + 1, dtype=torch.int32, device=device)
    return flags


class TokenMasks(NamedTuple):
    """Per step, shared by every layer: which tokens have an adapter, and each token's flag entry."""

    adapted: torch.Tensor  # (tokens,) bool: slot >= 0
    flag_index: torch.Tensor  # (tokens,) long: the token's slot, or the last entry (slot -1)


def token_masks(token_slots: torch.Tensor, flags: torch.Tensor) -> TokenMasks:
    adapted = token_slots >= 0
    return TokenMasks(adapted, torch.where(adapted, token_slots, flags.shape[0] - 1).long())


def quarantine_rows(output: torch.Tensor, masks: TokenMasks, flags: torch.Tensor) -> None:
    """Zero the rows of adapter tokens that hold NaN/inf (or overflow the dtype); count their slots.

    One reduction per layer: a row's sum is non-finite iff the row holds NaN/inf or sums past the
    dtype's range, which no sane activation does; times 0 it is 0, or NaN when it is not finite
    (one op where `isfinite` takes four)."""
    bad = output.sum(dim=1).mul_(0).ne(0).logical_and_(masks.adapted)
    output.masked_fill_(bad[:, None], 0)
    flags.index_add_(0, masks.flag_index, bad.to(flags.dtype))


def quarantine_rows_host_checked(output: torch.Tensor, masks: TokenMasks, flags: torch.Tensor) -> None:
    """`quarantine_rows` for a CPU tensor: one sum of the whole output, read on the host (free on
    a CPU), and the masked pass only when it is not finite. Same effect: a finite total means
    every row is finite. The grouped backend's form, a third of the check's cost per layer."""
    if math.isfinite(output.sum().item()):
        return
    quarantine_rows(output, masks, flags)


def take_failed_slots() -> set[int]:
    """Slots flagged since the last call (one host read per device), flags cleared."""
    failed: set[int] = set()
    for flags in _flags.values():
        hits = flags[:-1].nonzero().flatten().tolist()
        if hits:
            failed.update(hits)
            flags.zero_()
    return failed


def mark_failed_requests(output, model_runner) -> None:
    """Mark the requests of adapters that went non-finite this step in the step's output."""
    failed = take_failed_slots()
    if not failed:
        return
    slot_ids = model_runner.lora_manager._adapter_manager.lora_index_to_id
    bad_ids = {slot_ids[s] for s in failed if s < len(slot_ids) and slot_ids[s] is not None}
    adapter_of = request_adapter_ids(model_runner)
    marked = {req_id: QUARANTINED for req_id in output.req_ids if adapter_of.get(req_id) in bad_ids}
    if marked:
        output.num_nans_in_logits = {**(output.num_nans_in_logits or {}), **marked}


def request_adapter_ids(model_runner) -> dict[str, int]:
    """Request id -> adapter id (lora_int_id) of the requests the runner holds."""
    lora_state = getattr(model_runner, "lora_state", None)
    if lora_state is not None:  # vLLM 0.34's model runner: a LoraState per runner
        return {req_id: request.lora_int_id for req_id, request in lora_state.lora_requests.items()}
    batch = model_runner.input_batch  # vLLM 0.32/0.33: the persistent InputBatch
    return {req_id: int(batch.request_lora_mapping[i]) for i, req_id in enumerate(batch.req_ids)}


def patch_worker() -> None:
    """Read the flags where the worker hands vLLM the step's output."""
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.worker.gpu_worker import Worker  # vLLM CPU's worker inherits it

    def reporting(stock):
        @functools.wraps(stock)
        def wrapper(self, *args, **kwargs):
            output = stock(self, *args, **kwargs)
            if isinstance(output, ModelRunnerOutput):
                mark_failed_requests(output, self.model_runner)
            elif output is not None and hasattr(output, "get_output"):  # async scheduling (GPU)
                output.get_output = _marking(output.get_output, self.model_runner)
            return output

        return wrapper

    Worker.sample_tokens = reporting(Worker.sample_tokens)
    Worker.execute_model = reporting(Worker.execute_model)


def _marking(get_output, model_runner):
    @functools.wraps(get_output)
    def wrapper():
        output = get_output()
        mark_failed_requests(output, model_runner)
        return output

    return wrapper


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
            logger.error(
                "sora-serve: adapter '%s' produced non-finite activations; request %s failed, other "
                "requests unaffected",
                name,
                req_id,
            )
        # vLLM's own path for requests that fail inside a step: finished with FINISHED_ERROR by this update.
        self.encoder_cache_mismatch_reqs.update(failed)
        return stock(self, scheduler_output, model_runner_output)

    Scheduler.update_from_output = update_from_output
