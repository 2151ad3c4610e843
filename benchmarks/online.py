"""Online load test: `sora-serve serve` on 127.0.0.1, many clients over HTTP, Poisson arrivals.

Each request names one adapter of a set (or the base) and streams a completion, so the client
sees the time to first token (TTFT) and the time per further output token (TPOT). Arrivals are
open-loop: a request's latency counts from its scheduled arrival, so a server that falls behind
shows it in TTFT. Prompt lengths, output lengths, adapter choices and arrival gaps come from one
seeded generator per (set, rate): every set sees the same workload shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import numpy as np
from tqdm.auto import tqdm

from .serve_process import running_server

BASE_NAME = "base"  # the served model name of base requests


@dataclass(frozen=True)
class LoadPlan:
    rates: tuple[float, ...]  # requests per second
    requests_per_rate: int
    prompt_len: tuple[int, int]  # uniform, inclusive
    output_len: tuple[int, int]
    ttft_slo_s: float  # the SLO: TTFT p90 at most this
    max_in_flight: int = 64  # the client's bound on open connections
    seed: int = 0


@dataclass(frozen=True)
class Request:
    arrival_s: float
    model: str
    prompt: list[int]
    max_tokens: int


def workload(plan: LoadPlan, rate: float, names: list[str], vocab: int) -> list[Request]:
    """Poisson arrivals (exponential gaps of mean 1 / rate); each request names one of `names`
    or the base with equal probability."""
    rng = np.random.default_rng([plan.seed, int(rate * 1000)])
    n = plan.requests_per_rate
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    choices = [*names, BASE_NAME]
    return [
        Request(
            float(t),
            choices[rng.integers(len(choices))],
            rng.integers(1, vocab, rng.integers(plan.prompt_len[0], plan.prompt_len[1] + 1)).tolist(),
            int(rng.integers(plan.output_len[0], plan.output_len[1] + 1)),
        )
        for t in arrivals
    ]


@contextlib.contextmanager
def served(
    model: Path, adapters: dict[str, str], *, max_loras: int, dtype: str, log_path: Path, timeout: float = 600
) -> Iterator[tuple[str, float]]:
    """`sora-serve serve` (see `serve_process.running_server`), its CPU cache holding every adapter;
    yields (url, seconds until /health answered)."""
    arguments = [
        "--model",
        str(model),
        "--max-loras",
        str(max_loras),
        "--max-cpu-loras",
        str(len(adapters) + max_loras),
        "--dtype",
        dtype,
        "--max-model-len",
        "512",
        *[a for name, path in adapters.items() for a in ("--adapter", f"{name}={path}")],
        "--",
        "--served-model-name",
        BASE_NAME,
        "--max-num-seqs",
        "64",
    ]
    with running_server(arguments, log_path, timeout=timeout) as (url, _, started_s):
        yield url, started_s


async def stream_one(
    session: aiohttp.ClientSession, url: str, request: Request, start: float, bound: asyncio.Semaphore
) -> dict:
    """One streamed completion; times count from the request's scheduled arrival."""
    await asyncio.sleep(max(0.0, start + request.arrival_s - time.perf_counter()))
    scheduled = start + request.arrival_s
    payload = {
        "model": request.model,
        "prompt": request.prompt,
        "max_tokens": request.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    token_times, tokens, error = [], None, None
    try:
        async with bound, session.post(f"{url}/v1/completions", json=payload) as response:
            if response.status != 200:
                return {"model": request.model, "error": f"HTTP {response.status}: {(await response.text())[:300]}"}
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    token_times.append(time.perf_counter())
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    if error is None and tokens != request.max_tokens:
        error = f"expected {request.max_tokens} tokens, got {tokens}"
    if error is not None or not token_times:
        return {"model": request.model, "error": error or "no tokens streamed"}
    return {
        "model": request.model,
        "prompt_len": len(request.prompt),
        "output_len": tokens,
        "ttft_s": token_times[0] - scheduled,
        "tpot_s": (token_times[-1] - token_times[0]) / max(1, tokens - 1),
        "latency_s": token_times[-1] - scheduled,
    }


async def run_load(url: str, requests: list[Request], max_in_flight: int) -> tuple[list[dict], float]:
    bound = asyncio.Semaphore(max_in_flight)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=max_in_flight)) as session:
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_one(session, url, r, start, bound) for r in requests))
        return list(results), time.perf_counter() - start


def summarize(results: list[dict], wall_s: float, rate: float) -> dict:
    ok = [r for r in results if "error" not in r]

    def percentiles(key: str) -> dict | None:
        return {f"p{p}": float(np.percentile([r[key] for r in ok], p)) for p in (50, 90, 99)} if ok else None

    return {
        "rate": rate,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_messages": sorted({r["error"] for r in results if "error" in r})[:5],
        "wall_s": wall_s,
        "request_throughput": len(ok) / wall_s,
        "output_tok_per_s": sum(r["output_len"] for r in ok) / wall_s,
        "ttft_s": percentiles("ttft_s"),
        "tpot_s": percentiles("tpot_s"),
        "latency_s": percentiles("latency_s"),
        "samples": results,
    }


def warm_up(url: str, names: list[str], vocab: int) -> None:
    """One short request per adapter of the set (and the base), so slots hold the set before timing."""
    requests = [Request(0.0, name, list(range(1, 9)), 2) for name in [*names, BASE_NAME]]
    results, _ = asyncio.run(run_load(url, requests, len(requests)))
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        raise RuntimeError(f"warm-up requests failed: {failed}")


def max_rate_within_slo(rows: list[dict], slo_s: float) -> float | None:
    """The highest measured rate such that it and every lower rate keep TTFT p90 <= slo_s."""
    best = None
    for row in sorted(rows, key=lambda r: r["rate"]):
        if row["errors"] or row["ttft_s"] is None or row["ttft_s"]["p90"] > slo_s:
            break
        best = row["rate"]
    return best


def run_online(
    model: Path,
    sets: dict[str, dict[str, str]],
    plan: LoadPlan,
    *,
    max_loras: int,
    dtype: str,
    vocab: int,
    log_dir: Path,
) -> dict:
    """Every adapter set against one server (all sets' adapters registered; each set fits the
    slots, so a set's timing starts with its adapters resident), every rate in turn."""
    adapters = {name: path for members in sets.values() for name, path in members.items()}
    out = {
        "plan": asdict(plan),
        "max_loras": max_loras,
        "sets": {name: sorted(members) for name, members in sets.items()},
        "results": {},
    }
    with served(model, adapters, max_loras=max_loras, dtype=dtype, log_path=log_dir / "online-server.log") as (
        url,
        started_s,
    ):
        out["server_start_s"] = started_s
        for set_name, members in sets.items():
            warm_up(url, list(members), vocab)
            rows = []
            for rate in tqdm(plan.rates, desc=f"online load, {set_name}", leave=False):
                results, wall = asyncio.run(
                    run_load(url, workload(plan, rate, list(members), vocab), plan.max_in_flight)
                )
                rows.append(summarize(results, wall, rate))
            out["results"][set_name] = {
                "rates": rows,
                "max_rate_within_slo": max_rate_within_slo(rows, plan.ttft_slo_s),
            }
    return out


def latency_plot(online: dict):
    """TTFT and TPOT p50 / p90 against the offered request rate, one colour per adapter set."""
    import matplotlib.pyplot as plt

    fig, (ttft, tpot) = plt.subplots(1, 2, figsize=(11, 4))
    for (set_name, result), colour in zip(online["results"].items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        rows = [r for r in result["rates"] if r["ttft_s"]]
        rates = [r["rate"] for r in rows]
        for ax, key in ((ttft, "ttft_s"), (tpot, "tpot_s")):
            ax.plot(rates, [r[key]["p50"] for r in rows], marker="o", color=colour, label=f"{set_name} p50")
            ax.plot(
                rates, [r[key]["p90"] for r in rows], marker="^", linestyle="--", color=colour, label=f"{set_name} p90"
            )
    ttft.axhline(online["plan"]["ttft_slo_s"], color="grey", linestyle=":", label="SLO (TTFT p90)")
    ttft.set_ylabel("time to first token (s)")
    tpot.set_ylabel("time per output token (s)")
    for ax in (ttft, tpot):
        ax.set_xlabel("offered load (requests / s, Poisson)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("sora-serve serve over HTTP: latency against request rate")
    return fig


def markdown(online: dict) -> list[str]:
    plan = online["plan"]
    md = [
        "## Online load (sora-serve serve over HTTP)",
        "",
        f"One server on 127.0.0.1 (`--max-loras {online['max_loras']}`, started in "
        f"{online['server_start_s']:.0f} s), a bounded asyncio "
        f"client (aiohttp, at most {plan['max_in_flight']} open requests), Poisson arrivals, "
        f"{plan['requests_per_rate']} streamed requests per rate; "
        f"prompt length uniform in {plan['prompt_len']}, output length uniform in {plan['output_len']} "
        "tokens (ignore_eos); each request names one "
        f"adapter of the set or the base with equal probability (seed {plan['seed']}). SLO: TTFT p90 <= "
        f"{plan['ttft_slo_s']} s.",
        "",
        "| adapter set | rate (req/s) | throughput (req/s) | output tok/s | TTFT p50 / p90 / p99 (s) | "
        "TPOT p50 / p90 / p99 (ms) | errors |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for set_name, result in online["results"].items():
        for r in result["rates"]:
            t, p = r["ttft_s"], r["tpot_s"]
            ttft = "–" if t is None else f"{t['p50']:.2f} / {t['p90']:.2f} / {t['p99']:.2f}"
            tpot = "–" if p is None else f"{1e3 * p['p50']:.0f} / {1e3 * p['p90']:.0f} / {1e3 * p['p99']:.0f}"
            md.append(
                f"| {set_name} ({', '.join(online['sets'][set_name])}) | {r['rate']:g} | "
                f"{r['request_throughput']:.2f} | {r['output_tok_per_s']:.0f} | {ttft} | {tpot} | "
                f"{r['errors']} |"
            )
    md += ["", "| adapter set | highest measured rate with TTFT p90 within the SLO (req/s) |", "| --- | --- |"]
    for set_name, result in online["results"].items():
        best = result["max_rate_within_slo"]
        md.append(f"| {set_name} | {'none of the measured rates' if best is None else f'{best:g}'} |")
    return md
