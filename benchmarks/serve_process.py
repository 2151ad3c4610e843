"""An HTTP server as a child process: started in its own process group, waited on until /health
answers, stopped with the whole group. The one implementation behind the online benchmark's
servers (`sora-serve serve`, stock vLLM, llama.cpp's `llama-server`) and the server tests
(`tests.helpers.running_server`)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

HEALTH_POLL_S = 1.0
TERM_GRACE_S = 60  # vLLM's clean shutdown after SIGTERM
LOG_TAIL_CHARS = 3000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_env() -> dict[str, str]:
    """The server's environment: ours, with a 1 GiB KV cache when vLLM runs on the CPU."""
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group (vLLM shuts down cleanly), then SIGKILL to whatever of it is left
    (engine core and workers that outlive the API server); a group already gone is no error."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=TERM_GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def wait_healthy(
    process: subprocess.Popen, url: str, log_path: Path, start: float, timeout: float, name: str = "sora-serve serve"
) -> None:
    """Return once `url`/health answers (200; llama-server answers 503 while it loads); RuntimeError
    naming the server (`name`) with the log's tail if it exits first or `timeout` seconds pass since
    `start` (a time.perf_counter() value)."""
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with status {process.returncode}:\n{log_tail(log_path)}")
        if time.perf_counter() - start > timeout:
            raise RuntimeError(f"{name} did not become healthy in {timeout:g} s:\n{log_tail(log_path)}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=5)
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(HEALTH_POLL_S)


def log_tail(log_path: Path) -> str:
    return Path(log_path).read_text(errors="replace")[-LOG_TAIL_CHARS:]


@contextlib.contextmanager
def running_server(
    arguments: list[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
) -> Iterator[tuple[str, subprocess.Popen, float]]:
    """`sora-serve serve --port P ARGUMENTS` (see `running_process`)."""

    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "sora_serve.cli", "serve", "--port", str(port), *arguments]

    with running_process(command, log_path, name="sora-serve serve", env=env, timeout=timeout) as started:
        yield started


@contextlib.contextmanager
def running_process(
    command: Callable[[int], list[str]],
    log_path: Path,
    *,
    name: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
) -> Iterator[tuple[str, subprocess.Popen, float]]:
    """`command(port)` serving HTTP on 127.0.0.1:port in its own process group, its output in
    `log_path`; yields (url, process, seconds until /health answered) once healthy, stops the group
    on exit. `env`: the server's environment (default: `default_env()`). RuntimeError naming the
    server (`name`) with the log's tail when it exits or is not healthy within `timeout` seconds."""
    port = free_port()
    start = time.perf_counter()
    # Own process group: stopping reaches the API server, its engine core and workers together.
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command(port),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(default_env() if env is None else env),
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, url, Path(log_path), start, timeout, name)
        yield url, process, time.perf_counter() - start
    finally:
        stop_group(process)
