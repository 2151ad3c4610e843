"""Output directories that appear whole or not at all."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import AdapterError


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to fill; rename it to `path` only on success.

    An existing `path` is refused unless `force`; with `force` it is replaced only once the new
    directory is complete. On any error the temporary directory is removed.
    """
    path = Path(path).absolute()
    if path.exists() and not force:
        raise AdapterError("output exists; pass --force (force=True) to replace it", file=path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as exc:
        raise AdapterError(f"cannot write output: {exc.strerror or exc}", file=path) from exc
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{tmp.name[-8:]}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
