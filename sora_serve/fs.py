"""Files in and out: readable inputs with one-line errors, output directories that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import AdapterError


def os_error(exc: OSError, path: str | Path) -> AdapterError:
    """An OSError as a one-line AdapterError naming `path`: a permission problem is called one."""
    if isinstance(exc, PermissionError):
        return AdapterError("permission denied: this user cannot read it (check the permissions of the file and its directories)", file=path)
    if isinstance(exc, FileNotFoundError):
        return AdapterError("missing", file=path)
    return AdapterError(f"cannot read it ({exc.strerror or exc})", file=path)


def readable_dir(path: str | Path, what: str) -> Path:
    """`path` if it is a directory this process can list; else an AdapterError saying why (missing, not a dir, permission)."""
    path = Path(path)
    try:
        with os.scandir(path):
            pass
    except FileNotFoundError as exc:
        raise AdapterError(f"{what} not found", file=path) from exc
    except NotADirectoryError as exc:
        raise AdapterError(f"{what} is not a directory", file=path) from exc
    except OSError as exc:
        raise os_error(exc, path) from exc
    return path


def readable_file(path: str | Path, what: str) -> Path:
    """`path` if it is a file this process can open for reading; else an AdapterError saying why."""
    path = Path(path)
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError as exc:
        raise AdapterError(f"missing {what}", file=path) from exc
    except IsADirectoryError as exc:
        raise AdapterError(f"{what} is a directory, expected a file", file=path) from exc
    except OSError as exc:
        raise os_error(exc, path) from exc
    return path


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
