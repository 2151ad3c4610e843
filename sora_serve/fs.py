"""Files in and out: readable inputs with one-line errors, output directories that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import AdapterError


def os_error(exc: OSError, path: str | Path) -> AdapterError:
    """An OSError as a one-line AdapterError naming `path`: a permission problem is called one."""
    if isinstance(exc, PermissionError):
        return AdapterError(
            "permission denied: this user cannot read it (check the permissions of the file and its directories)",
            file=path,
        )
    if isinstance(exc, FileNotFoundError):
        return AdapterError("missing", file=path)
    return AdapterError(f"cannot read it ({exc.strerror or exc})", file=path)


def readable_dir(path: str | Path, what: str) -> Path:
    """`path` if it is a directory this process can list; else an AdapterError saying why (missing, not a dir,
    permission)."""
    return _probe(
        Path(path),
        lambda p: os.scandir(p).close(),
        f"{what} not found",
        NotADirectoryError,
        f"{what} is not a directory",
    )


def readable_file(path: str | Path, what: str) -> Path:
    """`path` if it is a file this process can open for reading; else an AdapterError saying why."""
    return _probe(
        Path(path),
        lambda p: open(p, "rb").close(),
        f"missing {what}",
        IsADirectoryError,
        f"{what} is a directory, expected a file",
    )


def _probe(
    path: Path, probe: Callable[[Path], None], missing: str, wrong_kind: type[OSError], wrong_kind_message: str
) -> Path:
    """Run `probe(path)` (open and close it); its OSError becomes a one-line AdapterError naming `path`."""
    try:
        probe(path)
    except FileNotFoundError as exc:
        raise AdapterError(missing, file=path) from exc
    except wrong_kind as exc:
        raise AdapterError(wrong_kind_message, file=path) from exc
    except OSError as exc:
        raise os_error(exc, path) from exc
    return path


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask sets as it reads)."""
    try:
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def follow_umask(directory: Path) -> None:
    """Give `directory` and everything in it the modes the umask allows: mkdtemp makes 0700 and
    safetensors writes 0600, so a server running as another user could not read an adapter."""
    mask = current_umask()
    directory.chmod(0o777 & ~mask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


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
        follow_umask(tmp)
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
