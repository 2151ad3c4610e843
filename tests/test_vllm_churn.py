"""Adapter churn and isolation through `sora-serve serve`, one server per module.

Every response is checked against the float64 eager runtime for the adapter version it can have
been admitted with; an adapter version's output may never appear outside the time it was loaded.
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

import sora_serve as ss
from sora_serve.tiny import make_tiny_checkpoint

from .helpers import (
    VLLM_BACKENDS,
    complete,
    error_message,
    new_tokens,
    post,
    running_server,
    set_first_value,
    vllm_backend,
    write_random_adapter,
)
from .reference import eager_greedy, eager_model, off_greedy

VERSIONS = {  # adapter dirs that names get loaded with; scale 0.05 keeps them inside the validator's bounds
    "lora_a": ss.AdapterConfig(method="lora", r=8, target_modules="all-linear"),
    "prediag_b": ss.AdapterConfig(method="prediag", r=4, target_modules="all-linear"),
    "sora_c": ss.AdapterConfig(method="sora", rotation="cayley", r=8, r_p=2, target_modules="all-linear"),
    "dora_d": ss.AdapterConfig(method="dora", r=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "sora_e": ss.AdapterConfig(method="sora", r=4, r_p=2, target_modules="all-linear"),
    "lora_f": ss.AdapterConfig(method="lora", r=16, target_modules=["q_proj", "o_proj", "up_proj"]),
}
STATIC = "s1"  # served from the start (--adapter s1=...)
# Long enough to outlast the reload: a 200-token stream finishes before the reload does here.
STREAM_TOKENS = 1000
PROMPTS = ([5, 17, 99, 23, 4, 61], [7, 7, 300, 12])
# pytest-timeout counts the module's server start (60-100 s on a busy 2-core machine) in whichever test runs first.
SERVER_START_S = 240


@pytest.fixture(scope="module", params=VLLM_BACKENDS)
def served(tmp_path_factory, request):
    """One server per backend: churn and isolation reach the op, so both backends run them."""
    root = tmp_path_factory.mktemp(f"churn-{request.param}")
    make_tiny_checkpoint("qwen2", root / "base", max_position_embeddings=STREAM_TOKENS + 64)
    for i, (name, config) in enumerate(VERSIONS.items()):
        write_random_adapter(root / name, config, seed=i, scale=0.05)
    write_random_adapter(
        root / STATIC,
        ss.AdapterConfig(method="sora", rotation="cayley", r=4, r_p=2, target_modules="all-linear"),
        seed=10,
        scale=0.05,
    )
    write_random_adapter(root / "nan_lora", VERSIONS["lora_a"], seed=11, scale=0.05)
    set_first_value(root / "nan_lora", "lora_B.weight", float("nan"))
    for name, key, value in (("text_rank", "r", "16"), ("foo_type", "peft_type", "FOO")):
        write_random_adapter(root / name, VERSIONS["lora_a"], seed=13, scale=0.05)
        config = json.loads((root / name / "adapter_config.json").read_text())
        (root / name / "adapter_config.json").write_text(json.dumps({**config, key: value}))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SORA_SERVE_ALLOW_LARGE_UPDATES", "1")  # finite, passes the validator only with the override
        write_random_adapter(root / "overflow", VERSIONS["sora_c"], seed=12, scale=0.05, factor_scale=1e30)
    arguments = [
        "--model",
        str(root / "base"),
        "--max-loras",
        "2",
        "--adapter",
        f"{STATIC}={root / STATIC}",
        "--allow-large-updates",
        "--allow-load-from",
        str(root),
        "--",
        "--served-model-name",
        "base",
    ]
    with vllm_backend(request.param), running_server(arguments, root / "server.log") as (url, process):
        yield url, root, process, request.param


@cache
def reference(root: Path, version: str | None):
    """The float64 eager model of `version` (an adapter dir under root; None: the base)."""
    return eager_model(root / "base", None if version is None else root / version)


def load(url: str, name: str, path: Path) -> tuple[int, dict | str]:
    return post(f"{url}/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})


def unload(url: str, name: str) -> tuple[int, dict | str]:
    return post(f"{url}/v1/unload_lora_adapter", {"lora_name": name})


def assert_alive(url: str, process) -> None:
    assert process.poll() is None, "the server exited"
    with urllib.request.urlopen(f"{url}/health", timeout=30) as response:
        assert response.status == 200


def stream_tokens(url: str, model: str, prompt: list[int], max_tokens: int, first_chunk: threading.Event) -> dict:
    """A streamed greedy completion: its tokens, finish reason, error (if any) and end time."""
    payload = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream": True,
    }
    request = urllib.request.Request(
        f"{url}/v1/completions", json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    result = {"tokens": [], "finish_reason": None, "error": None}
    with urllib.request.urlopen(request, timeout=300) as response:
        for line in response:
            data = line.decode().strip().removeprefix("data: ")
            if not data or data == "[DONE]":
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                result["error"] = chunk["error"]
                break
            choice = chunk["choices"][0]
            result["tokens"] += choice.get("token_ids") or []
            result["finish_reason"] = choice.get("finish_reason") or result["finish_reason"]
            first_chunk.set()
    result["ended"] = time.monotonic()
    first_chunk.set()
    return result


@pytest.mark.slow
@pytest.mark.timeout(SERVER_START_S + 120)
def test_reloading_a_name_while_its_stream_runs(served):
    """Reloading a name mid-stream: x = A streaming; unload x; load x = B; a request to s1, one to x while the
    stream runs. No engine death; the stream ends with A's tokens, x answers with B's."""
    url, root, process, _ = served
    first_chunk = threading.Event()
    assert load(url, "x", root / "lora_a")[0] == 200
    with ThreadPoolExecutor(3) as pool:
        stream = pool.submit(stream_tokens, url, "x", PROMPTS[0], STREAM_TOKENS, first_chunk)
        assert first_chunk.wait(120)
        assert unload(url, "x")[0] == 200
        status, body = load(url, "x", root / "prediag_b")
        assert status == 200, body
        to_s1 = pool.submit(complete, url, STATIC, PROMPTS[1], 6)
        x_sent = time.monotonic()
        to_x = pool.submit(complete, url, "x", PROMPTS[1], 6)
        first = stream.result(timeout=200)
        (s1_status, s1_body), (x_status, x_body) = to_s1.result(timeout=120), to_x.result(timeout=120)
    assert first["ended"] > x_sent, (
        "the stream ended before the request to the reloaded x was sent: the race was not exercised"
    )
    assert first["error"] is None and first["finish_reason"] == "length", first
    assert (
        len(first["tokens"]) == STREAM_TOKENS
        and off_greedy(reference(root, "lora_a"), PROMPTS[0], first["tokens"]) == []
    )
    assert s1_status == 200 and off_greedy(reference(root, STATIC), PROMPTS[1], new_tokens(s1_body)) == [], s1_body
    assert x_status == 200 and off_greedy(reference(root, "prediag_b"), PROMPTS[1], new_tokens(x_body)) == [], x_body
    assert_alive(url, process)
    assert unload(url, "x")[0] == 200


@dataclass
class NameHistory:
    """When each version of a name can have been the served one. A load or unload takes effect at
    some moment between sending the call and its reply, so each interval spans both ends."""

    versions: list[tuple[str, float, float]] = field(default_factory=list)  # (dir, load sent, unload replied or inf)
    absent: list[tuple[float, float]] = field(
        default_factory=lambda: [(float("-inf"), float("inf"))]
    )  # (unload sent, load replied)

    def loaded(self, version: str, sent: float, replied: float) -> None:
        self.absent[-1] = (self.absent[-1][0], replied)
        self.versions.append((version, sent, float("inf")))

    def unloaded(self, sent: float, replied: float) -> None:
        version, start, _ = self.versions[-1]
        self.versions[-1] = (version, start, replied)
        self.absent.append((sent, float("inf")))

    def possible(self, start: float, end: float) -> tuple[set[str], bool]:
        """Versions that can have answered a request sent at `start` and answered at `end`, and
        whether the name can have been unloaded meanwhile (a clean 404/400 is then correct)."""
        versions = {v for v, a, b in self.versions if a <= end and b >= start}
        return versions, any(a <= end and b >= start for a, b in self.absent)


@pytest.mark.slow
@pytest.mark.timeout(SERVER_START_S + 180)
def test_load_unload_races_under_traffic(served):
    """300 requests from 4 threads while 3 names go through 30 unload/load cycles over 6 adapter
    dirs. No engine death; each answer is the greedy output of a version that was loaded while the
    request was in flight (or a clean 404/400 when the name may have been absent)."""
    url, root, process, _ = served
    names, n_requests, n_cycles = ["c0", "c1", "c2"], 300, 30
    for prompt in PROMPTS:  # otherwise a wrong version's answer could pass for the right one
        assert (
            len({tuple(eager_greedy(reference(root, v), prompt, 4)) for v in [*VERSIONS, STATIC, None]})
            == len(VERSIONS) + 2
        )
    histories = {name: NameHistory() for name in names}
    done = []  # (model, prompt index, status, body, sent, replied)
    lock = threading.Lock()

    def cycles() -> None:
        rng = random.Random(1)
        for i in range(n_cycles):
            while len(done) < i * n_requests // (n_cycles + 2):  # spread the cycles over the traffic
                time.sleep(0.01)
            name = names[i % len(names)]
            history = histories[name]
            if history.versions and history.versions[-1][2] == float("inf"):
                sent = time.monotonic()
                assert unload(url, name)[0] == 200
                history.unloaded(sent, time.monotonic())
            previous = history.versions[-1][0] if history.versions else None
            version = rng.choice([v for v in VERSIONS if v != previous])
            sent = time.monotonic()
            status, body = load(url, name, root / version)
            assert status == 200, body
            history.loaded(version, sent, time.monotonic())

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(n_requests // 4):
            model, prompt = rng.choice([*names, *names, STATIC, "base"]), rng.randrange(len(PROMPTS))
            sent = time.monotonic()
            status, body = complete(
                url, model, PROMPTS[prompt], rng.choice((4, 16))
            )  # longer ones stay in flight across reloads
            with lock:
                done.append((model, prompt, status, body, sent, time.monotonic()))

    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(cycles), *(pool.submit(client, seed) for seed in range(4))]
        for future in futures:
            future.result(timeout=170)

    assert_alive(url, process)
    refused, wrong = 0, []
    for model, prompt, status, body, sent, replied in done:
        if model in names:
            versions, may_be_absent = histories[model].possible(sent, replied)
        else:
            versions, may_be_absent = {STATIC if model == STATIC else None}, False
        if status != 200:
            assert status in (400, 404) and may_be_absent, (model, status, body)
            refused += 1
            continue
        if not any(off_greedy(reference(root, v), PROMPTS[prompt], new_tokens(body)) == [] for v in versions):
            wrong.append((model, sorted(map(str, versions)), new_tokens(body)))
    assert not wrong, f"{len(wrong)} of {len(done)} answers are no version loaded during the request: {wrong[:5]}"
    assert refused < len(done) // 2, f"{refused} of {len(done)} requests refused"
    print(f"{len(done)} requests, {refused} refused (name absent during the request), {n_cycles} load/unload cycles")
    for name in names:
        assert unload(url, name)[0] == 200
        assert complete(url, name, PROMPTS[0], 4)[0] == 404


@pytest.mark.slow
@pytest.mark.timeout(SERVER_START_S + 60)
def test_bad_adapters_are_refused_at_load_with_400_naming_the_file(served):
    """Bad adapters refused at load: a plain PEFT LoRA with one NaN in lora_B (accepted by stock vLLM), `r: "16"`
    (a TypeError inside vLLM) and `peft_type: "FOO"` (served by stock vLLM): each a 400 naming file and field."""
    url, root, process, backend = served
    if backend != VLLM_BACKENDS[0]:
        pytest.skip(f"refused before the op: runs on the {VLLM_BACKENDS[0]} server")
    status, body = load(url, "nan", root / "nan_lora")
    message = error_message(body)
    assert status == 400, body
    assert "adapter_model.safetensors" in message and "NaN" in message and "<path>" not in message, message
    assert complete(url, "nan", PROMPTS[0], 4)[0] == 404
    for name, quoted in (
        ("text_rank", "'r'"),
        ("foo_type", "'peft_type'"),
    ):  # vLLM's own config parsing never sees them
        status, body = load(url, name, root / name)
        assert status == 400 and "adapter_config.json" in error_message(body) and quoted in error_message(body), body
    status, body = complete(url, STATIC, PROMPTS[0], 4)
    assert status == 200 and off_greedy(reference(root, STATIC), PROMPTS[0], new_tokens(body)) == [], body
    assert_alive(url, process)


@pytest.mark.slow
@pytest.mark.timeout(SERVER_START_S + 120)
def test_an_overflowing_adapter_fails_alone(served):
    """Finite factors x1e30 (admitted with SORA_SERVE_ALLOW_LARGE_UPDATES=1) overflow at run time.
    Its requests fail with a clear error; the base and clean-adapter requests batched
    with them answer as they do alone, and so do the next 8 unrelated requests (no [0, 0, ...])."""
    url, root, process, _ = served
    status, body = load(url, "overflow", root / "overflow")
    assert status == 200, body
    batch = ["base", STATIC, "overflow", "base", STATIC, "overflow"]
    with ThreadPoolExecutor(len(batch)) as pool:
        results = list(pool.map(lambda m: complete(url, m, PROMPTS[0], 8), batch))
    for model, (status, body) in zip(batch, results):
        if model == "overflow":
            failed = status >= 400 or body["choices"][0]["finish_reason"] == "error"
            assert failed, f"the overflowing adapter's request did not fail: {body}"
        else:
            assert status == 200, body
            assert (
                off_greedy(reference(root, None if model == "base" else STATIC), PROMPTS[0], new_tokens(body)) == []
            ), (model, body)
    after = ["base", STATIC] * 4
    for model in after:
        status, body = complete(url, model, PROMPTS[1], 8)
        assert (
            status == 200
            and off_greedy(reference(root, None if model == "base" else STATIC), PROMPTS[1], new_tokens(body)) == []
        ), (model, body)
    assert_alive(url, process)
    assert unload(url, "overflow")[0] == 200
