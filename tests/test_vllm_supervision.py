"""`sora-serve serve` under a supervisor: a dead engine core ends the server with a non-zero status,
and the request in flight gets an error, so systemd's Restart=on-failure or Kubernetes restart it."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

import sora_serve as ss
from sora_serve.tiny import make_tiny_checkpoint
from sora_serve.vllm_plugin.launch import ENGINE_DIED_EXIT

from .helpers import complete, running_server, write_random_adapter


def engine_core(server: psutil.Process) -> psutil.Process:
    """The server's engine core process (vLLM titles it VLLM::EngineCore)."""
    for child in server.children(recursive=True):
        try:
            if "EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name():
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no EngineCore among {[c.name() for c in server.children(recursive=True)]}")


@pytest.mark.slow
def test_killed_engine_core_ends_the_server_non_zero_and_fails_the_request_in_flight(tmp_path):
    make_tiny_checkpoint("llama", tmp_path / "base")
    write_random_adapter(
        tmp_path / "sora",
        ss.AdapterConfig(method="sora", r=4, r_p=2, target_modules="all-linear"),
        seed=3,
        scale=0.05,
        arch="llama",
    )
    arguments = [
        "--model",
        str(tmp_path / "base"),
        "--adapter",
        f"sora={tmp_path / 'sora'}",
        "--",
        "--served-model-name",
        "base",
    ]
    with running_server(arguments, tmp_path / "server.log") as (url, process):
        statuses: list[int | str] = []  # HTTP statuses, then the error that ended the traffic
        traffic = threading.Thread(target=keep_requesting, args=(url, statuses))
        traffic.start()
        while not statuses:  # requests are flowing
            time.sleep(0.2)
        os.kill(engine_core(psutil.Process(process.pid)).pid, signal.SIGKILL)
        started = time.monotonic()
        status = process.wait(timeout=60)
        took = time.monotonic() - started
        traffic.join(timeout=60)
    log = (tmp_path / "server.log").read_text()
    assert status == ENGINE_DIED_EXIT, (status, log[-3000:])
    assert "engine core died" in log and took < 60
    assert statuses[0] == 200 and not traffic.is_alive(), statuses
    assert statuses[-1] != 200 and (isinstance(statuses[-1], str) or statuses[-1] >= 500), (
        statuses
    )  # no request hangs or succeeds on a dead engine


def keep_requesting(url: str, statuses: list[int | str]) -> None:
    """Completions one after another until one fails to connect (the server is gone)."""
    while True:
        try:
            statuses.append(complete(url, "sora", [5, 17, 99], 200, timeout=60)[0])
        except OSError as exc:  # refused or reset: the server has exited
            statuses.append(type(exc).__name__)
            return
