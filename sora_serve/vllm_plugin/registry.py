"""One read per adapter version and process: the parsed, validated `AdapterFile`, shared.

The API server process reads an adapter once for the resolver and the front end's check; a
worker process reads it once for its loader (the processes share no memory, so that is one read
each; with `VLLM_ENABLE_V1_MULTIPROCESSING=0` the engine runs in the front end's process and the
worker takes the same entry). vLLM's own loader never reads our files: the worker builds vLLM's
`LoRAModel` from this entry (`loading.py`).

An entry is one version of an adapter directory: its path and the sizes and mtimes of its two
files, so every (name, id) naming that directory shares it, and rewriting the directory (a new
version under the same path) is a new entry. A bounded LRU: entries hold tensors.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter, OrderedDict
from pathlib import Path

from sora_serve.adapter_format import CONFIG_FILE, FINGERPRINT_FILE, WEIGHTS_FILE, AdapterFile, read_adapter

logger = logging.getLogger("sora_serve.vllm_plugin")

MAX_ENTRIES = 8
_entries: OrderedDict[tuple, AdapterFile] = OrderedDict()
_lock = threading.Lock()
reads: Counter[str] = Counter()  # adapter dir -> reads in this process (logged; tests count them)


def version_key(directory: str | Path) -> tuple:
    stats = []
    for name in (CONFIG_FILE, WEIGHTS_FILE, FINGERPRINT_FILE):
        try:
            st = os.stat(os.path.join(directory, name))
            stats.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append(None)
    return (os.path.abspath(directory), *stats)


def adapter(directory: str | Path) -> AdapterFile:
    """The validated adapter in `directory`, read at most once per version; raises AdapterError."""
    key = version_key(directory)
    with _lock:  # one reader at a time: a second request for the same version waits for the first
        cached = _entries.get(key)
        if cached is not None:
            _entries.move_to_end(key)
            return cached
        parsed = read_adapter(directory)
        reads[key[0]] += 1
        logger.debug("sora-serve: read adapter %s (read %d in this process)", key[0], reads[key[0]])
        _entries[key] = parsed
        while len(_entries) > MAX_ENTRIES:
            _entries.popitem(last=False)
        return parsed


def forget(directory: str | Path) -> None:
    """Drop the entries of `directory` (the worker keeps its own factors once it has them)."""
    path = os.path.abspath(directory)
    with _lock:
        for key in [k for k in _entries if k[0] == path]:
            del _entries[key]
