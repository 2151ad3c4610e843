"""An adapter store served on demand: requests name adapters kept in one directory.

`sora-serve serve --adapter-dir DIR` sets `SORA_SERVE_ADAPTER_DIR` (and
`VLLM_ALLOW_RUNTIME_LORA_UPDATING`, without which vLLM never asks a resolver). A request for
model `foo` that names neither the base nor a loaded adapter then reaches
`AdapterStoreResolver`, which admits `DIR/foo` when it is a directory holding
`adapter_config.json`, of any kind we serve (Pre-Diag, SORA, PEFT LoRA and DoRA); vLLM's own
filesystem resolver takes plain LoRA only (`peft_type == "LORA"`).

How vLLM 0.32 uses it (`OpenAIServingModels.resolve_lora`, called from `_check_model` of every
OpenAI endpoint): the resolver's `None` becomes a 404; a `LoRARequest` is loaded into the engine
(`add_lora`) and kept under its name until unloaded. An exception raised by the resolver is
not caught there: it reaches FastAPI's handlers, which turn a `VLLMValidationError` into a 400
with its message. So the store's names and files are validated here, before vLLM sees them,
and a bad adapter is a 400 naming the file and field. vLLM replaces absolute paths in error
messages with `<path>` (`sanitize_message`), so files are named relative to the store.

A failure inside the engine's `add_lora` (what only the base model can tell: a module the
engine cannot adapt, a shape that does not fit) is reported by stock vLLM as a bare "was found
but could not be loaded"; `resolve_or_error` replaces `OpenAIServingModels.resolve_lora` with
the same logic that passes the loader's own message on.
"""

from __future__ import annotations

import asyncio
import logging
import os
from http import HTTPStatus
from pathlib import Path

from vllm.exceptions import VLLMValidationError
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from sora_serve.adapter_format import CONFIG_FILE
from sora_serve.errors import AdapterError

from . import access, registry
from .loading import ERROR_MARK

ADAPTER_DIR_ENV = "SORA_SERVE_ADAPTER_DIR"
RESOLVER_NAME = "sora_serve"

logger = logging.getLogger(__name__)


def plain_name_error(name: str) -> str | None:
    """Why `name` cannot name a directory inside the store (None if it can): one path component,
    so a request can never reach outside the store (`../x`, `/etc`, `a/../../b`)."""
    if not name or name in (".", ".."):
        return "is not an adapter name"
    if "/" in name or "\\" in name:  # '\\' too: a name is never a path, on any OS
        return "contains a path separator; adapter names in the store are plain directory names"
    if "\0" in name:
        return "contains a NUL character"
    return None


def store_relative(message: str, store: Path) -> str:
    """`message` with the store's absolute path dropped: vLLM would show it as `<path>`."""
    return message.replace(f"{store}{os.sep}", "").replace(str(store), ADAPTER_DIR_ENV)


class AdapterStoreResolver(LoRAResolver):
    """Maps a request's model name to `store/name`, read and validated once through the plugin's registry."""

    def __init__(self, store: str | Path):
        self.store = Path(store).resolve()

    def locate(self, lora_name: str) -> Path | None:
        """The adapter directory for `lora_name`, None when the store has none by that name;
        raises `VLLMValidationError` (HTTP 400) for a name that is not a plain directory name."""
        reason = plain_name_error(lora_name)
        if reason is not None:
            raise VLLMValidationError(f"adapter name {lora_name!r} {reason}", parameter="model")
        directory = self.store / lora_name
        # Confined before anything is read: an entry linking out of the store (or of the roots
        # `serve` allows) is refused (403) whether or not its target exists.
        access.check_load_dir(
            directory, f"adapter {lora_name!r} (in the store)", access.allowed_roots() or [self.store]
        )
        return directory if (directory / CONFIG_FILE).is_file() else None

    def validate(self, lora_name: str, directory: Path) -> None:
        """The registry's read of the directory (the front end's check then reuses it); its error
        (or an unreadable file) as a 400 naming the file."""
        try:
            registry.adapter(directory)
        except PermissionError as exc:
            message = f"{exc.filename}: permission denied (the server cannot read this file)"
        except (AdapterError, OSError) as exc:
            message = str(exc)
        else:
            return
        raise VLLMValidationError(
            f"adapter {lora_name!r} refused: {store_relative(message, self.store)}", parameter="model"
        )

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        directory = self.locate(lora_name)
        if directory is None:
            return None
        # Reading and checking every tensor is file I/O: off the event loop, other requests keep flowing.
        await asyncio.to_thread(self.validate, lora_name, directory)
        # vLLM replaces the id with its own counter's next value before loading.
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(directory))


def engine_refusal_response(lora_name: str, error: BaseException, resolver: LoRAResolver):
    """The 400 vLLM's resolve_lora would give, with the engine's reason instead of none."""
    from vllm.entrypoints.serve import create_error_response

    reason = str(error)
    if ERROR_MARK in reason:  # our validator's refusal inside vLLM's "Call to add_lora method failed: ..." wrapper
        reason = reason[reason.index(ERROR_MARK) :]
    if isinstance(resolver, AdapterStoreResolver):
        reason = store_relative(reason, resolver.store)
    return create_error_response(
        message=f"adapter {lora_name!r} could not be loaded: {reason}",
        err_type="BadRequestError",
        status_code=HTTPStatus.BAD_REQUEST,
        param="model",
    )


async def resolve_or_error(self, lora_name: str):
    """`OpenAIServingModels.resolve_lora` of vLLM 0.32, except that an adapter the engine refuses
    gives a 400 with the engine's message (naming file and module) rather than a bare "could not
    be loaded". Same contract: the `LoRARequest`, a 404 when no resolver knows the name, a 400
    when one does and the load fails. A dead engine is not a bad adapter: it propagates."""
    from vllm.entrypoints.serve import create_error_response
    from vllm.v1.engine.exceptions import EngineDeadError

    async with self.lora_resolver_lock[lora_name]:
        if lora_name in self.lora_requests:
            return self.lora_requests[lora_name]
        refusal = None
        for resolver in self.lora_resolvers:
            try:
                lora_request = await resolver.resolve_lora(self.model_config.model, lora_name)
            except access.LoadForbidden as exc:
                raise access.forbidden_http_error(exc) from None
            if lora_request is None:
                continue
            lora_request.lora_int_id = self.lora_id_counter.inc(1)
            try:
                await self.engine_client.add_lora(lora_request)
            except EngineDeadError:
                raise
            except Exception as exc:  # noqa: BLE001 - any loader failure is this adapter's; try the next resolver
                logger.warning(
                    "adapter %r resolved by %s was refused by the engine: %s", lora_name, type(resolver).__name__, exc
                )
                refusal = refusal or engine_refusal_response(lora_name, exc, resolver)
                continue
            self.lora_requests[lora_name] = lora_request
            logger.info("resolved and loaded adapter %r from %s", lora_name, lora_request.lora_path)
            return lora_request
        return refusal or create_error_response(
            message=f"LoRA adapter {lora_name} does not exist",
            err_type="NotFoundError",
            status_code=HTTPStatus.NOT_FOUND,
        )


def register_resolver() -> None:
    """Register the store resolver when `SORA_SERVE_ADAPTER_DIR` is set (does nothing otherwise),
    and make the engine's load errors reach the client (`resolve_or_error`)."""
    store = os.environ.get(ADAPTER_DIR_ENV)
    if not store:
        return
    if not Path(store).is_dir():
        raise AdapterError("adapter store directory not found", file=store, field=ADAPTER_DIR_ENV)
    import vllm.envs as envs
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.lora.resolver import LoRAResolverRegistry

    if not envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING:
        logger.warning(
            "%s is set but VLLM_ALLOW_RUNTIME_LORA_UPDATING is not: vLLM never consults resolvers, the store is unused",
            ADAPTER_DIR_ENV,
        )
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, AdapterStoreResolver(store))
    OpenAIServingModels.resolve_lora = resolve_or_error
