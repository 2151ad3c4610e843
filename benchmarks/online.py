"""Online load test: `sora-serve serve` on 127.0.0.1, many clients over HTTP, Poisson arrivals.

Each request names one adapter of a set (or the base) and streams a completion, so the client
sees the time to first token (TTFT) and the time per further output token (TPOT). Arrivals are
open-loop: a request's latency counts from its scheduled arrival, so a server that falls behind
shows it in TTFT. Prompt lengths, output lengths, adapter choices and arrival gaps come from one
seeded generator per rate: every set, on every server, sees the same workload shape.

Beside ours, the same client loads peers, one server at a time on the same machine: stock vLLM
(our plugin not loaded) with the LoRA-only sets, and llama.cpp's `llama-server` when asked
(`peers`, built by `benchmarks.llama_cpp`). The comparison sets (plain LoRA adapters,
round-robin, no base requests) run on every server; a server's request dialect
(`completion_body`) says how a request names its adapter there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import numpy as np
from tqdm.auto import tqdm

from sora_serve.vllm_plugin.engine import default_thread_env

from . import llama_cpp
from .common import Target
from .serve_process import default_env, running_process, running_server

BASE_NAME = "base"  # the served model name of base requests
OURS, STOCK, LLAMA_CPP = "sora-serve", "stock vLLM", "llama.cpp"
PEERS = (LLAMA_CPP,)  # servers that run only when asked (`--peers`)
MAX_LORA_RANK = 16  # `sora-serve serve`'s default, given to stock vLLM too


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


def workload(plan: LoadPlan, rate: float, names: list[str], vocab: int, *, round_robin: bool = False) -> list[Request]:
    """Poisson arrivals (exponential gaps of mean 1 / rate); each request names one of `names`
    or the base with equal probability, or (`round_robin`) the next of `names`, no base. The
    random choice is drawn either way, so arrivals, prompts and output lengths at a rate are the
    same for every set."""
    rng = np.random.default_rng([plan.seed, int(rate * 1000)])
    n = plan.requests_per_rate
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    choices = [*names, BASE_NAME]
    requests = []
    for i, arrival in enumerate(arrivals):
        chosen = choices[rng.integers(len(choices))]
        prompt = rng.integers(1, vocab, rng.integers(plan.prompt_len[0], plan.prompt_len[1] + 1)).tolist()
        max_tokens = int(rng.integers(plan.output_len[0], plan.output_len[1] + 1))
        requests.append(Request(float(arrival), names[i % len(names)] if round_robin else chosen, prompt, max_tokens))
    return requests


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


def stock_vllm_command(model: Path, adapters: dict[str, str], *, max_loras: int, dtype: str, port: int) -> list[str]:
    """vLLM's own OpenAI server with the settings `served` gives ours (eager on the CPU, as
    `sora-serve serve` runs there); run with VLLM_PLUGINS=none, so our plugin stays out."""
    import torch

    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--enable-lora",
        "--max-loras",
        str(max_loras),
        "--max-lora-rank",
        str(MAX_LORA_RANK),
        "--max-cpu-loras",
        str(len(adapters) + max_loras),
        "--max-model-len",
        "512",
        "--served-model-name",
        BASE_NAME,
        "--max-num-seqs",
        "64",
        *([] if torch.cuda.is_available() else ["--enforce-eager"]),
        "--lora-modules",
        *(f"{name}={path}" for name, path in adapters.items()),
    ]


@contextlib.contextmanager
def stock_served(
    model: Path, adapters: dict[str, str], *, max_loras: int, dtype: str, log_path: Path, timeout: float = 600
) -> Iterator[tuple[str, float]]:
    """Stock vLLM (`stock_vllm_command`) with the CPU thread settings `sora-serve serve` chooses, so
    the two differ in their LoRA path only; yields (url, seconds until /health answered)."""

    def command(port: int) -> list[str]:
        return stock_vllm_command(model, adapters, max_loras=max_loras, dtype=dtype, port=port)

    env = {**default_env(), "VLLM_PLUGINS": "none"}
    env |= default_thread_env(env)
    with running_process(command, log_path, name="stock vLLM", env=env, timeout=timeout) as (url, _, started_s):
        yield url, started_s


def completion_body(request: Request, lora_ids: Mapping[str, int] | None = None) -> dict:
    """The streamed /v1/completions body in a server's dialect. vLLM (ours, stock) serves each
    adapter as a model name; llama-server serves one model and takes per-request LoRA scales by
    adapter id (`lora_ids`: name -> id): the named adapter at 1, every other at 0, all 0 for the
    base (an empty list would keep whatever adapters the slot ran before)."""
    body = {
        "model": request.model,
        "prompt": request.prompt,
        "max_tokens": request.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if lora_ids is not None:
        body["lora"] = [{"id": i, "scale": 1.0 if name == request.model else 0.0} for name, i in lora_ids.items()]
    return body


async def stream_one(
    session: aiohttp.ClientSession,
    url: str,
    request: Request,
    start: float,
    bound: asyncio.Semaphore,
    lora_ids: Mapping[str, int] | None = None,
) -> dict:
    """One streamed completion; times count from the request's scheduled arrival."""
    await asyncio.sleep(max(0.0, start + request.arrival_s - time.perf_counter()))
    scheduled = start + request.arrival_s
    payload = completion_body(request, lora_ids)
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


async def run_load(
    url: str, requests: list[Request], max_in_flight: int, lora_ids: Mapping[str, int] | None = None
) -> tuple[list[dict], float]:
    bound = asyncio.Semaphore(max_in_flight)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=max_in_flight)) as session:
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_one(session, url, r, start, bound, lora_ids) for r in requests))
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


def warm_up(url: str, names: list[str], lora_ids: Mapping[str, int] | None = None) -> None:
    """One short request per name (adapters of the set, the base if it is requested), so slots hold
    the set before timing."""
    requests = [Request(0.0, name, list(range(1, 9)), 2) for name in names]
    results, _ = asyncio.run(run_load(url, requests, len(requests), lora_ids))
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
    comparisons: dict[str, dict[str, str]],
    stock_sets: list[str],
    peers: tuple[str, ...] = (),
    max_loras: int,
    dtype: str,
    vocab: int,
    log_dir: Path,
) -> dict:
    """Ours with every set, then stock vLLM with `stock_sets` and the comparison sets, then each
    of `peers` (llama.cpp) with the comparison sets: one server at a time, each registering the
    adapters of all its sets. `sets` mix the base into their requests; `comparisons` are plain
    LoRA adapters, round-robin, no base requests: what every server can serve.

    On a server, the sets take turns at each rate (`interleaved`), so the ratios the targets read
    between sets of one server (SORA only / LoRA only) compare loads minutes apart at most, not a
    whole set's sweep apart: this machine's speed drifts by more than those targets' margins."""
    unknown = set(peers) - set(PEERS)
    if unknown:
        raise ValueError(f"unknown peers {sorted(unknown)}; known: {list(PEERS)}")
    every_set = {**sets, **comparisons}
    schedule = {OURS: [*sets, *comparisons], STOCK: [*stock_sets, *comparisons]}
    schedule |= {peer: list(comparisons) for peer in peers}
    out = {
        "plan": asdict(plan),
        "max_loras": max_loras,
        "sets": {name: sorted(members) for name, members in every_set.items()},
        "comparison_sets": list(comparisons),
        "peers_skipped": [peer for peer in PEERS if peer not in peers],
        "servers": {},
        "results": {},
    }
    for server, set_names in schedule.items():
        adapters = {name: path for s in set_names for name, path in every_set[s].items()}
        with serving(server, model, adapters, max_loras=max_loras, dtype=dtype, log_dir=log_dir) as (
            url,
            started_s,
            lora_ids,
        ):
            out["servers"][server] = {"start_s": started_s, "sets": set_names, **server_info(server)}
            rows: dict[str, list[dict]] = {name: [] for name in set_names}
            for rate, set_name in tqdm(interleaved(plan.rates, set_names), desc=f"online load, {server}", leave=False):
                names, round_robin = list(every_set[set_name]), set_name in comparisons
                rows[set_name].append(measure_rate(url, names, plan, rate, vocab, lora_ids, round_robin=round_robin))
            for set_name, set_rows in rows.items():
                set_rows.sort(key=lambda row: row["rate"])
                out["results"][result_key(server, set_name)] = {
                    "server": server,
                    "set": set_name,
                    "rates": set_rows,
                    "max_rate_within_slo": max_rate_within_slo(set_rows, plan.ttft_slo_s),
                }
    return out


def interleaved(rates: tuple[float, ...], set_names: list[str]) -> list[tuple[float, str]]:
    """(rate, set) in the order a server runs them: every set at a rate before the next rate, the
    sets' order reversed at every other rate, so no set always runs first or last."""
    return [(rate, name) for i, rate in enumerate(rates) for name in (set_names if i % 2 == 0 else set_names[::-1])]


@contextlib.contextmanager
def serving(
    server: str, model: Path, adapters: dict[str, str], *, max_loras: int, dtype: str, log_dir: Path
) -> Iterator[tuple[str, float, dict[str, int] | None]]:
    """`server` with `adapters`; yields (url, seconds until /health answered, its request dialect:
    adapter name -> LoRA id for llama-server, None for the vLLM servers)."""
    log_path = log_dir / f"online-{server.replace(' ', '-')}.log"
    if server == LLAMA_CPP:
        with llama_cpp.served(model, adapters, dtype=dtype, log_path=log_path) as served_peer:
            yield served_peer
        return
    start = served if server == OURS else stock_served
    with start(model, adapters, max_loras=max_loras, dtype=dtype, log_path=log_path) as (url, started_s):
        yield url, started_s, None


def server_info(server: str) -> dict:
    """What the report says a server was: llama.cpp's sdist version, commit, slots and threads."""
    if server != LLAMA_CPP:
        return {}
    return {"build": llama_cpp.build_info(), "parallel": llama_cpp.PARALLEL, "threads": llama_cpp.usable_cpus()}


def result_key(server: str, set_name: str) -> str:
    return f"{server}: {set_name}"


def measure_rate(
    url: str,
    names: list[str],
    plan: LoadPlan,
    rate: float,
    vocab: int,
    lora_ids: Mapping[str, int] | None,
    *,
    round_robin: bool,
) -> dict:
    """One set at one rate on a running server, its adapters (and the base) warmed into the slots
    first: the set before it on this server may have held them."""
    warm_up(url, names if round_robin else [*names, BASE_NAME], lora_ids)
    requests = workload(plan, rate, names, vocab, round_robin=round_robin)
    results, wall = asyncio.run(run_load(url, requests, plan.max_in_flight, lora_ids))
    return summarize(results, wall, rate)


def comparison(online: dict, peer: str) -> list[dict]:
    """Ours against `peer` on each comparison set both ran, rate by rate: TPOT p50 and TTFT p90
    (what the peer targets compare; None where a rate had no successful request)."""
    rows = []
    for set_name in online["comparison_sets"]:
        ours = online["results"].get(result_key(OURS, set_name))
        theirs = online["results"].get(result_key(peer, set_name))
        if ours is None or theirs is None:
            continue
        for mine, other in zip(ours["rates"], theirs["rates"]):
            rows.append(
                {
                    "set": set_name,
                    "rate": mine["rate"],
                    "ours_tpot_p50_s": mine["tpot_s"] and mine["tpot_s"]["p50"],
                    "peer_tpot_p50_s": other["tpot_s"] and other["tpot_s"]["p50"],
                    "ours_ttft_p90_s": mine["ttft_s"] and mine["ttft_s"]["p90"],
                    "peer_ttft_p90_s": other["ttft_s"] and other["ttft_s"]["p90"],
                }
            )
    return rows


def worst_ratio(pairs: list[tuple[float | None, float | None]]) -> float | None:
    """The largest numerator / denominator over rates (None if any rate lacks one: not measured)."""
    if not pairs or any(a is None or b is None for a, b in pairs):
        return None
    return max(a / b for a, b in pairs)


def targets(online: dict) -> list[Target]:
    """Issue 21's online targets, each the worst rate's ratio: SORA-only within 10% of LoRA-only
    (ours); ours no worse than llama.cpp with one adapter and ahead of it with several; and no
    failed request of ours."""
    results, out = online["results"], []
    lora, sora = results.get(result_key(OURS, "LoRA only")), results.get(result_key(OURS, "SORA only"))
    if lora and sora:
        for metric, p in (("tpot_s", "p50"), ("ttft_s", "p90")):
            pairs = [
                (s[metric] and s[metric][p], r[metric] and r[metric][p]) for s, r in zip(sora["rates"], lora["rates"])
            ]
            out.append(
                Target(
                    f"online SORA only / LoRA only, {metric[:4].upper()} {p} (worst rate)",
                    worst_ratio(pairs),
                    1.1,
                    False,
                )
            )
    rows = comparison(online, LLAMA_CPP)
    for set_name, threshold, wanted in (("one LoRA", 1.0, "no worse than"), ("four LoRAs", 1.0, "ahead of")):
        for metric in ("tpot_p50", "ttft_p90"):
            pairs = [(r[f"ours_{metric}_s"], r[f"peer_{metric}_s"]) for r in rows if r["set"] == set_name]
            out.append(
                Target(
                    f"online {set_name}: ours / llama.cpp, {metric.replace('_', ' ').upper()} (worst rate)",
                    worst_ratio(pairs),
                    threshold,
                    False,
                    note=f"ours {wanted} llama-server" + ("" if pairs else "; run with `--peers llama.cpp` to measure"),
                )
            )
    failed = sum(row["errors"] for r in results.values() if r["server"] == OURS for row in r["rates"])
    out.append(Target("online load: failed requests of ours (all sets, all rates)", failed, 0, False))
    return out


def latency_plot(online: dict):
    """TTFT and TPOT p50 / p90 against the offered request rate: the first row every server's own
    sets (one colour per server and set), then one row per comparison set (one colour per server)."""
    import matplotlib.pyplot as plt

    comparisons = online["comparison_sets"]
    panels = [("own sets", [k for k, r in online["results"].items() if r["set"] not in comparisons])]
    panels += [(s, [k for k, r in online["results"].items() if r["set"] == s]) for s in comparisons]
    panels = [(title, keys) for title, keys in panels if keys]
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.5 * len(panels)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (title, keys), (ttft, tpot) in zip(panels, axes):
        for key, colour in zip(keys, colours):
            rows = [r for r in online["results"][key]["rates"] if r["ttft_s"]]
            rates = [r["rate"] for r in rows]
            label = key if title == "own sets" else online["results"][key]["server"]
            for ax, metric in ((ttft, "ttft_s"), (tpot, "tpot_s")):
                ax.plot(rates, [r[metric]["p50"] for r in rows], marker="o", color=colour, label=f"{label} p50")
                ax.plot(
                    rates,
                    [r[metric]["p90"] for r in rows],
                    marker="^",
                    linestyle="--",
                    color=colour,
                    label=f"{label} p90",
                )
        ttft.axhline(online["plan"]["ttft_slo_s"], color="grey", linestyle=":", label="SLO (TTFT p90)")
        ttft.set_ylabel(f"{title}\ntime to first token (s)")
        tpot.set_ylabel("time per output token (s)")
        for ax in (ttft, tpot):
            ax.set_xlabel("offered load (requests / s, Poisson)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.suptitle("online load over HTTP: latency against request rate, one server at a time")
    fig.tight_layout()
    return fig


def markdown(online: dict) -> list[str]:
    plan = online["plan"]
    md = [
        "## Online load (sora-serve serve and its peers over HTTP)",
        "",
        f"One server at a time on 127.0.0.1: {servers_sentence(online)}. A bounded asyncio "
        f"client (aiohttp, at most {plan['max_in_flight']} open requests), Poisson arrivals, "
        f"{plan['requests_per_rate']} streamed requests per rate; on each server the sets take turns at "
        "each rate (the order reversed every other rate), each set's adapters warmed into the slots "
        "before its load; "
        f"prompt length uniform in {plan['prompt_len']}, output length uniform in {plan['output_len']} "
        "tokens (ignore_eos); the same arrivals, prompts and lengths per rate for every set and server. "
        f"In our sets each request names one adapter of the set or the base with equal probability (seed "
        f"{plan['seed']}); the comparison sets ({', '.join(online['comparison_sets'])}) name their plain "
        f"LoRA adapters round-robin, no base. SLO: TTFT p90 <= {plan['ttft_slo_s']} s.",
        "",
        "| server | adapter set | rate (req/s) | throughput (req/s) | output tok/s | TTFT p50 / p90 / p99 (s) | "
        "TPOT p50 / p90 / p99 (ms) | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in online["results"].values():
        for r in result["rates"]:
            t, p = r["ttft_s"], r["tpot_s"]
            ttft = "–" if t is None else f"{t['p50']:.2f} / {t['p90']:.2f} / {t['p99']:.2f}"
            tpot = "–" if p is None else f"{1e3 * p['p50']:.0f} / {1e3 * p['p90']:.0f} / {1e3 * p['p99']:.0f}"
            md.append(
                f"| {result['server']} | {result['set']} ({', '.join(online['sets'][result['set']])}) | "
                f"{r['rate']:g} | {r['request_throughput']:.2f} | {r['output_tok_per_s']:.0f} | {ttft} | {tpot} | "
                f"{r['errors']} |"
            )
    md += [
        "",
        "| server | adapter set | highest measured rate with TTFT p90 within the SLO (req/s) |",
        "| --- | --- | --- |",
    ]
    for result in online["results"].values():
        best = result["max_rate_within_slo"]
        within = "none of the measured rates" if best is None else f"{best:g}"
        md.append(f"| {result['server']} | {result['set']} | {within} |")
    for peer in (LLAMA_CPP, STOCK):
        if peer in online["servers"]:
            md += ["", *comparison_markdown(comparison(online, peer), peer)]
    return md


def servers_sentence(online: dict) -> str:
    """Which servers ran (and how long each took to start), and how to add a skipped peer."""
    parts = []
    for server, info in online["servers"].items():
        build = info.get("build")
        made = (
            f", llama.cpp {build['llama_cpp_commit']} from the llama-cpp-python {build['llama_cpp_python']} sdist, "
            f"{info['parallel']} slots, {info['threads']} threads"
            if build
            else ""
        )
        parts.append(f"{server} (started in {info['start_s']:.0f} s{made})")
    sentence = f"{', '.join(parts)}; both vLLM servers with `--max-loras {online['max_loras']}`"
    if LLAMA_CPP in online["peers_skipped"]:
        sentence += (
            "; llama.cpp's llama-server did not run: `python -m benchmarks serving --peers llama.cpp` builds it "
            "(once, from the pinned llama-cpp-python sdist) and adds it"
        )
    return sentence


def comparison_markdown(rows: list[dict], peer: str) -> list[str]:
    """The peer target's table: ours / peer per comparison set and rate (below 1: ours is faster)."""
    md = [
        f"Ours against {peer} on the comparison sets (same model, machine, rates and requests; ours / {peer} "
        "below 1: ours is faster):",
        "",
        f"| adapter set | rate (req/s) | TPOT p50 ours / {peer} (ms) | ratio | TTFT p90 ours / {peer} (s) | ratio |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        tpot = pair(r["ours_tpot_p50_s"], r["peer_tpot_p50_s"], 1e3, 1)
        ttft = pair(r["ours_ttft_p90_s"], r["peer_ttft_p90_s"], 1, 2)
        md.append(f"| {r['set']} | {r['rate']:g} | {tpot} | {ttft} |")
    return md


def pair(ours: float | None, peer: float | None, unit: float, digits: int) -> str:
    """`ours / peer | ratio` in `unit`, dashes where either is missing."""
    if ours is None or peer is None:
        return "– | –"
    return f"{unit * ours:.{digits}f} / {unit * peer:.{digits}f} | {ours / peer:.2f}"
