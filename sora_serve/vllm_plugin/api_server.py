"""The OpenAI API server's adapter endpoints: client errors as 4xx, unload frees the engine's copy.

- `/v1/load_lora_adapter`: stock vLLM answers every failed load with HTTP 500. A bad adapter is
  the client's fault: errors from sora-serve's validator (marked `sora-serve:`) become 400 with
  the validator's message (file, field and module, paths relative to the adapter dir); a dir that
  does not exist stays vLLM's 404.
- Both answer 403 for a `lora_path` outside the directories `sora-serve serve` allows (`access.py`).
- `/v1/unload_lora_adapter`: stock only drops the name from the server's table; here the engine's
  `remove_lora` also frees the slot and the CPU copy. Requests still running on the unloaded
  version finish with it (each version has its own id, see `versions.py`).
"""

from __future__ import annotations

import functools
from http import HTTPStatus

from . import access
from .loading import ERROR_MARK


def as_client_error(response):
    """A 500 from a load that our validator refused, as a 400 naming what is wrong."""
    from vllm.entrypoints.serve import create_error_response
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    if not isinstance(response, ErrorResponse) or response.error.code != HTTPStatus.INTERNAL_SERVER_ERROR:
        return response
    message = response.error.message
    if ERROR_MARK not in message:
        return response
    return create_error_response(
        message=message[message.index(ERROR_MARK) :], err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST
    )


def patch_api_server() -> None:
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    stock_load = OpenAIServingModels.load_lora_adapter
    stock_unload = OpenAIServingModels.unload_lora_adapter

    @functools.wraps(stock_load)
    async def load_lora_adapter(self, request, base_model_name=None):
        try:
            access.check_load_dir(request.lora_path, "lora_path")
        except access.LoadForbidden as exc:
            return access.forbidden_response(exc, "lora_path")
        return as_client_error(await stock_load(self, request, base_model_name))

    @functools.wraps(stock_unload)
    async def unload_lora_adapter(self, request):
        lora_request = self.lora_requests.get(request.lora_name)
        result = await stock_unload(self, request)
        if lora_request is not None and request.lora_name not in self.lora_requests:
            await self.engine_client.remove_lora(lora_request.lora_int_id)  # frees the slot and the CPU copy
        return result

    OpenAIServingModels.load_lora_adapter = load_lora_adapter
    OpenAIServingModels.unload_lora_adapter = unload_lora_adapter
