"""Who may load what: runtime loads read only under the directories the operator allowed.

`sora-serve serve` sets `SORA_SERVE_LOAD_ROOTS` (os.pathsep-separated, already resolved): the
`--adapter-dir` store, each `--adapter` directory and every `--allow-load-from DIR`. A runtime
load (`/v1/load_lora_adapter` and vLLM's SageMaker-style adapter route, which share
`OpenAIServingModels.load_lora_adapter`; the store's resolver) of a path outside them is
HTTP 403, decided before anything is read, so the answer tells nothing about what exists there.
Paths are resolved first (symlinks, `..`): a store entry linking out of the allowed roots is
refused like any other path. Without the variable (a plain `vllm serve` with the plugin) loads
are stock vLLM's: any path the server can read.
"""

from __future__ import annotations

import os
from http import HTTPStatus
from pathlib import Path

LOAD_ROOTS_ENV = "SORA_SERVE_LOAD_ROOTS"
RULE = "runtime loads read only under --adapter-dir, the --adapter directories and --allow-load-from DIR"


class LoadForbidden(Exception):
    """A runtime load outside the allowed roots (HTTP 403)."""


def allowed_roots() -> list[Path] | None:
    """The resolved roots runtime loads may read under; None: unconfined (not started by `serve`)."""
    value = os.environ.get(LOAD_ROOTS_ENV)
    if value is None:
        return None
    return [Path(root) for root in value.split(os.pathsep) if root]


def encode_roots(roots: list[str | Path]) -> str:
    """The environment value for `roots`, each resolved (symlinks, `..`) as the checks compare."""
    return os.pathsep.join(dict.fromkeys(str(Path(root).resolve()) for root in roots))


def check_load_dir(path: str | Path, what: str, roots: list[Path] | None = None) -> None:
    """Raise `LoadForbidden` unless the directory `path` and every entry in it, resolved, lie
    inside one of the allowed roots (an adapter file linking out is refused like a directory)."""
    roots = allowed_roots() if roots is None else roots
    if roots is None:
        return
    directory = Path(path)
    inside = lambda p: any(p.resolve().is_relative_to(root) for root in roots)  # noqa: E731
    if inside(directory) and (not directory.is_dir() or all(inside(entry) for entry in directory.iterdir())):
        return
    raise LoadForbidden(
        f"{what} is outside the directories this server loads adapters from ({RULE}); "
        "to allow it, restart `sora-serve serve` with --allow-load-from DIR"
    )


def forbidden_response(error: LoadForbidden, param: str):
    """The load endpoints' answer (they return vLLM's ErrorResponse, sent with its code)."""
    from vllm.entrypoints.serve import create_error_response

    return create_error_response(
        message=f"sora-serve: {error}", err_type="PermissionDenied", status_code=HTTPStatus.FORBIDDEN, param=param
    )


def forbidden_http_error(error: LoadForbidden):
    """The answer of a request naming a store adapter: vLLM's model check turns any resolver
    answer but a 400 into "does not exist" (404), so it is raised as FastAPI's HTTPException,
    which vLLM's handler sends as an OpenAI-style error with its status."""
    from fastapi import HTTPException

    return HTTPException(status_code=HTTPStatus.FORBIDDEN, detail=f"sora-serve: {error}")
