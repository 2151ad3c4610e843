"""One identity per loaded adapter version, so unload + reload of a name under traffic is safe.

vLLM's `LoRARequest` compares and hashes by name only. After `unload x; load x` (new path, new
lora_int_id) while requests to the old x are still running, one batch holds two ids for one name:
the worker's set of active requests collapses them, one id never gets a slot, and
`convert_mapping` raises KeyError, killing the engine. Here a request is identified by
(name, lora_int_id): each version keeps its own slot until its requests finish, and responses
come from the version a request was admitted with. The prefix-cache key gets the id too, so KV
blocks computed by an old version (even from the same path, rewritten) are never reused by a new one.
"""

from __future__ import annotations

import functools


def patch_request_identity() -> None:
    from vllm.lora.request import LoRARequest
    from vllm.v1.core import kv_cache_utils

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoRARequest) and (self.lora_name, self.lora_int_id) == (
            other.lora_name,
            other.lora_int_id,
        )

    def __hash__(self) -> int:
        return hash((self.lora_name, self.lora_int_id))

    LoRARequest.__eq__, LoRARequest.__hash__ = __eq__, __hash__

    stock_keys = kv_cache_utils._gen_lora_extra_hash_keys

    @functools.wraps(stock_keys)
    def lora_extra_hash_keys(request):
        keys = stock_keys(request)
        return [(*key, request.lora_request.lora_int_id) for key in keys]

    kv_cache_utils._gen_lora_extra_hash_keys = lora_extra_hash_keys
