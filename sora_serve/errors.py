"""One exception type for everything a user can get wrong, always naming the file and field."""

from __future__ import annotations

from pathlib import Path


class AdapterError(ValueError):
    """Bad adapter, base model or argument. The message names the file and the field at fault."""

    def __init__(self, message: str, *, file: str | Path | None = None, field: str | None = None):
        where = []
        if file is not None:
            where.append(str(file))
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)
        self.file = None if file is None else str(file)
        self.field = field
