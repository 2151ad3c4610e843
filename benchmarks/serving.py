"""Serving suite: one model shape, one rank budget (r = 16 on all 7 projections, SORA r_p = 4).

Deployments: vLLM (LoRA disabled; plugin engine with LoRA/DoRA/Pre-Diag/SORA; stock engine with
the plugin disabled), eager Hugging Face (base, merged SORA, PEFT LoRA/DoRA unmerged, our runtime
Pre-Diag/SORA), ONNX Runtime (merged vs switchable graph), an online load test through
`sora-serve serve` (benchmarks.online) and the scale curves (benchmarks.scale). Every ratio comes
from this one run and sits next to its physical limit (benchmarks.shapes).

`--shape realistic` (the full run's default): Llama hidden 2048 x 12 layers, GQA, 32k vocabulary,
bf16 where the CPU has native bf16; `--shape small` (the quick run's default): the toy model.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

import sora_serve as ss
from sora_serve.vllm_plugin.engine import default_thread_env

from . import llama_cpp, paired, scale
from . import online as online_load
from .common import RESULTS, Target, bar_chart, markdown_targets, mean_ci95, save_suite, stats
from .shapes import (
    KINDS,
    R_P,
    RANK,
    SHAPES,
    Shape,
    adapter_dirs,
    base_checkpoint,
    bf16_flags,
    cache_dir,
    decode_limit,
    linked_copies,
    prefill_limit,
    resolve_dtype,
)

ONLINE_SETS = {
    "LoRA only": [f"lora{i}" for i in range(4)],
    "SORA only": [f"sora{i}" for i in range(4)],
    "mixed kinds": ["lora", "dora", "prediag", "sora"],
}
ONLINE_STOCK_SETS = ["LoRA only"]  # what stock vLLM serves of ONLINE_SETS
# plain LoRA adapters, round-robin, no base requests: run on every server (ours, stock vLLM, --peers)
ONLINE_COMPARISON_SETS = {"one LoRA": ["lora0"], "four LoRAs": [f"lora{i}" for i in range(4)]}


@dataclass(frozen=True)
class Plan:
    """How much of everything a run measures."""

    shape: str
    quick: bool
    decode_tokens: int
    prefill: tuple[int, int]  # batch, prompt length
    sweep: tuple[int, ...]  # batch sizes of the decode curves
    repeats: int
    scale: scale.ScalePlan
    online: online_load.LoadPlan
    rotation_variants: bool  # the small-cache and stock rotation engines
    paired_rounds: int  # rounds of the LoRA-disabled and plugin engines in turn (`paired_engines`)
    eager_batches: tuple[int, ...]
    eager_tokens: int
    eager_repeats: int
    eager_distinct: tuple[int, ...]  # distinct SORA adapters in an eager batch of 16


def make_plan(shape: str | None, quick: bool) -> Plan:
    shape = shape or ("small" if quick else "realistic")
    if quick:
        return Plan(
            shape,
            True,
            16,
            (8, 128),
            (1, 8),
            1,
            scale.ScalePlan(
                distinct=(1, 2, 4, 8),
                distinct_batch=8,
                sora_distinct=(1, 4, 8),
                slots=2,
                rotation=(2, 4, 16),
                small_cache=4,
                waves=4,
                wave_batch=4,
                wave_tokens=4,
                first_copies=1,
                hidden_shapes=(),
            ),
            online_load.LoadPlan(
                rates=(2.0, 8.0), requests_per_rate=8, prompt_len=(8, 32), output_len=(4, 12), ttft_slo_s=1.0
            ),
            False,
            1,
            (8,),
            8,
            1,
            (1, 4),
        )
    full = Plan(
        shape,
        False,
        16,
        (4, 256),
        (1, 8, 32),
        2,
        scale.ScalePlan(
            distinct=(1, 2, 4, 8, 16, 32),
            distinct_batch=32,
            sora_distinct=(1, 16, 32),
            slots=4,
            rotation=(4, 8, 32, 128),
            small_cache=8,
            waves=6,
            wave_batch=8,
            wave_tokens=8,
            first_copies=3,
            hidden_shapes=("hidden1024",),
        ),
        online_load.LoadPlan(
            rates=(1.0, 2.0, 4.0, 8.0), requests_per_rate=24, prompt_len=(16, 128), output_len=(16, 64), ttft_slo_s=1.0
        ),
        True,
        4,
        (8,),
        8,
        2,
        (1, 4),
    )
    if shape == "small":  # the toy model is cheap: more repeats and tokens, no second hidden size
        full = replace(
            full,
            decode_tokens=64,
            prefill=(8, 256),
            repeats=5,
            eager_batches=(1, 8, 32),
            eager_tokens=32,
            eager_repeats=5,
            eager_distinct=(1, 4, 16),
            scale=replace(full.scale, hidden_shapes=()),
            online=replace(full.online, rates=(2.0, 4.0, 8.0, 16.0), ttft_slo_s=0.25),
        )
    return full


# ---------------------------------------------------------------- adapters


def build(shape: Shape, plan: Plan, root: Path) -> tuple[Path, dict[str, str]]:
    """The cached base and adapters (every kind, plus distinct LoRA / SORA adapters for the
    curves and the online sets), and hard-linked copies for the rotation and first requests."""
    base = base_checkpoint(shape)
    specs = {
        **KINDS,
        **{f"lora{i}": KINDS["lora"] for i in range(max(plan.scale.distinct))},
        **{f"sora{i}": KINDS["sora"] for i in range(max(plan.scale.sora_distinct))},
    }
    dirs = adapter_dirs(base, specs)
    links = root / "links"
    for n in plan.scale.rotation:
        dirs |= {f"rot{n}-{i}": path for i, path in enumerate(linked_copies(dirs["lora"], n, links / f"rot{n}"))}
    dirs |= first_request_copies(dirs, plan.scale, links)
    return base, dirs


def first_request_copies(dirs: dict[str, str], plan: scale.ScalePlan, links: Path) -> dict[str, str]:
    copies = {
        f"first-{kind}-{i}": path
        for kind in scale.FIRST_REQUEST_KINDS
        for i, path in enumerate(linked_copies(dirs[kind], plan.first_copies, links / f"first-{kind}"))
    }
    return copies | {
        f"filler-{i}": path for i, path in enumerate(linked_copies(dirs["lora"], plan.slots, links / "filler"))
    }


# ---------------------------------------------------------------- vLLM


def vllm_engine(
    root: Path,
    shape: Shape,
    base: Path,
    adapters: dict,
    scenarios: list[dict],
    repeats: int,
    *,
    plugin: bool = True,
    max_loras: int = 0,
    max_cpu_loras: int | None = None,
    backend: str | None = None,
    checkout: Path | None = None,
    env: dict[str, str] | None = None,
) -> dict:
    """One engine (`max_loras` 0: LoRA disabled) in a subprocess; returns its start time and results.
    `backend`: the plugin's backend (`SORA_SERVE_VLLM_BACKEND`), default the platform's; `checkout`:
    another checkout of this repository whose plugin (and worker) the engine runs; `env`: variables
    set for the engine on top of ours (thread settings)."""
    config = {
        "model": str(base),
        "dtype": shape.dtype,
        "adapters": adapters,
        "scenarios": scenarios,
        "repeats": repeats,
        "enable_lora": max_loras > 0,
        "max_loras": max(1, max_loras),
        "max_lora_rank": RANK,
    }
    if max_loras:
        config["max_cpu_loras"] = max_cpu_loras or max(8, 2 * max_loras)
    path = root / f"vllm-{len(list(root.glob('vllm-*.json')))}.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", **(env or {})}
    env |= default_thread_env(env)  # what `sora-serve serve` chooses, unless `env` chose
    if not plugin:
        env["VLLM_PLUGINS"] = "none"  # stock vLLM: our entry point is not loaded
    if backend:
        env["SORA_SERVE_VLLM_BACKEND"] = backend
    if checkout is not None:
        checkout = checkout_mirror(checkout, root)
        env["PYTHONPATH"] = str(checkout)  # vLLM's entry point then loads that checkout's plugin
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.vllm_worker", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=checkout,
        timeout=1800,
    )
    line = next((text for text in out.stdout.splitlines() if text.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"vLLM worker failed:\n{out.stderr[-4000:]}")
    result = json.loads(line[len("RESULT ") :])
    for row in result["results"]:
        row["engine"] = "plugin" if plugin else "stock"
        for metric in ("tok_per_s", "ttft_s", "tpot_s"):
            if metric in row:
                row[metric] = stats(row[metric]) if row[metric] else None
    return result


def checkout_mirror(checkout: Path, root: Path) -> Path:
    """A directory that imports `sora_serve` with its mapped subpackages (pyproject's package-dir:
    `converters/` and `training/` install as `sora_serve.converters` / `.training`) all from
    `checkout`: links to the checkout's entries, with `sora_serve` a directory of links that adds
    the mapped ones. Run from it (cwd and PYTHONPATH), a plain path import finds them; from the
    checkout itself the installed editable finder would serve this checkout's subpackages."""
    checkout = Path(checkout).resolve()
    mirror = Path(root) / f"checkout-{checkout.name}-{hashlib.sha256(str(checkout).encode()).hexdigest()[:12]}"
    package = mirror / "sora_serve"
    package.mkdir(parents=True, exist_ok=True)
    links = {e.name: e for e in checkout.iterdir() if e.name != "sora_serve"}
    mapped = {d: checkout / d for d in ("converters", "training") if (checkout / d).is_dir()}
    for folder, entries in (
        (mirror, links),
        (package, {e.name: e for e in (checkout / "sora_serve").iterdir()} | mapped),
    ):
        for name, target in entries.items():
            if not (folder / name).is_symlink():
                (folder / name).symlink_to(target)
    return mirror


def decode(name: str, adapters: list, batch: int, tokens: int) -> dict:
    return {
        "name": name,
        "kind": "decode",
        "adapters": adapters,
        "batch": batch,
        "prompt_len": 16,
        "max_tokens": tokens,
    }


def prefill(name: str, adapters: list, plan: Plan) -> dict:
    return {
        "name": name,
        "kind": "prefill",
        "adapters": adapters,
        "batch": plan.prefill[0],
        "prompt_len": plan.prefill[1],
        "max_tokens": 1,
    }


def offline_engines(root: Path, shape: Shape, base: Path, dirs: dict, plan: Plan) -> dict[str, dict]:
    """The LoRA-disabled, plugin and stock engines: batch curves, kinds, prefill, distinct adapters."""
    t, sp = plan.decode_tokens, plan.scale
    sweep = [
        b for b in plan.sweep if b != sp.distinct_batch
    ]  # batch = distinct_batch comes from the distinct curve's k = 1
    loras, soras = [f"lora{i}" for i in range(max(sp.distinct))], [f"sora{i}" for i in range(max(sp.sora_distinct))]
    disabled = [prefill("no-lora engine prefill", [None], plan)] + [
        decode(f"no-lora engine @ batch {b}", [None], b, t) for b in plan.sweep
    ]
    plugin = [
        decode("plugin: base requests", [None], 8, t),
        prefill("plugin: LoRA prefill", ["lora"], plan),
        prefill("plugin: SORA prefill", ["sora"], plan),
        decode("plugin: DoRA", ["dora"], 8, t),
        decode("plugin: Pre-Diag", ["prediag"], 8, t),
        decode("plugin: SORA cayley", ["sora_cayley"], 8, t),
    ]
    plugin += [
        decode(f"plugin: {label} @ batch {b}", [name], b, t)
        for label, name in (("LoRA", "lora"), ("SORA", "sora"))
        for b in sweep
    ]
    plugin += scale.distinct_scenarios(sp, "plugin LoRA", loras, t, sp.distinct) + scale.distinct_scenarios(
        sp, "plugin SORA", soras, t, sp.sora_distinct
    )
    punica = [
        prefill("punica: LoRA prefill", ["lora"], plan),
        prefill("punica: SORA prefill", ["sora"], plan),
        decode("punica: SORA cayley", ["sora_cayley"], 8, t),
    ]
    punica += [
        decode(f"punica: {label} @ batch 8", [name], 8, t) for label, name in (("LoRA", "lora"), ("SORA", "sora"))
    ]
    punica += scale.distinct_scenarios(sp, "punica LoRA", loras, t, (1, max(sp.distinct))) + scale.distinct_scenarios(
        sp, "punica SORA", soras, t, (1, middle_sora(plan))
    )
    stock = [prefill("stock: LoRA prefill", ["lora"], plan)] + [
        decode(f"stock: LoRA @ batch {b}", ["lora"], b, t) for b in sweep
    ]
    stock += scale.distinct_scenarios(sp, "stock LoRA", loras, t, sp.distinct)
    kinds = {n: dirs[n] for n in (*KINDS, *loras, *soras)}
    slots = max(max(sp.distinct), len(KINDS))
    engines = {"no-lora": vllm_engine(root, shape, base, {}, disabled, plan.repeats)}
    engines["plugin"] = vllm_engine(
        root, shape, base, kinds, plugin, plan.repeats, max_loras=slots, max_cpu_loras=len(kinds) + 4
    )
    engines["plugin, punica backend"] = vllm_engine(
        root, shape, base, kinds, punica, plan.repeats, max_loras=slots, max_cpu_loras=len(kinds) + 4, backend="punica"
    )
    engines["stock"] = vllm_engine(
        root,
        shape,
        base,
        {n: dirs[n] for n in ("lora", *loras)},
        stock,
        plan.repeats,
        plugin=False,
        max_loras=slots,
        max_cpu_loras=len(loras) + 4,
    )
    return engines


# (ratio, plugin scenario, LoRA-disabled scenario, metric, adapter kind for the limit or None: 1.0)
PAIRED_RATIOS = [
    (
        "plugin LoRA / LoRA-disabled engine, decode b8 per further token",
        "plugin: LoRA @ batch 8",
        "decode",
        "tpot_s",
        "lora",
    ),
    (
        "plugin SORA / LoRA-disabled engine, decode b8 per further token",
        "plugin: SORA @ batch 8",
        "decode",
        "tpot_s",
        "sora",
    ),
    ("plugin LoRA prefill / LoRA-disabled engine prefill", "plugin: LoRA prefill", "prefill", "tok_per_s", "lora"),
    ("plugin SORA prefill / LoRA-disabled engine prefill", "plugin: SORA prefill", "prefill", "tok_per_s", "sora"),
    (
        "base requests / LoRA-disabled engine, decode b8 per further token",
        "plugin: base requests",
        "decode",
        "tpot_s",
        None,
    ),
    (
        "plugin LoRA / LoRA-disabled engine, 16-token requests b8 (first token included)",
        "plugin: LoRA @ batch 8",
        "decode",
        "tok_per_s",
        None,
    ),
    (
        "plugin SORA / LoRA-disabled engine, 16-token requests b8 (first token included)",
        "plugin: SORA @ batch 8",
        "decode",
        "tok_per_s",
        None,
    ),
    ("base requests / LoRA-disabled engine, time to first token b8", "plugin: base requests", "decode", "ttft_s", None),
]


def paired_engines(root: Path, shape: Shape, base: Path, dirs: dict, plan: Plan) -> list[dict]:
    """The plugin's shares against the LoRA-disabled engine, read in pairs: both engines alive in
    one process, every scenario on one then the other seconds apart (`benchmarks.paired`). The
    offline section runs each engine once, minutes apart, and on this VM engines started even a
    minute apart read up to ±25% apart, far more than the 4% those targets look for."""
    config = paired.pair_config(shape, base, dirs, plan, plan.paired_rounds)
    return paired.run_pairs(config, root)


def paired_rows(rounds: list[dict], shape: Shape) -> list[dict]:
    """Per ratio of `PAIRED_RATIOS`: its value in each round (speed over speed: 1 / time for TPOT
    and TTFT), their mean with its 95% interval, and the limit its bytes or multiply-adds allow."""
    rows = []
    for name, plugin_row, disabled_row, metric, kind in PAIRED_RATIOS:
        per_round = []
        for rnd in rounds:
            medians = {
                engine: {r["name"]: (r.get(metric) or {}).get("median") for r in results}
                for engine, results in rnd["results"].items()
            }
            num, den = medians["plugin"].get(plugin_row), medians["no-lora"].get(disabled_row)
            if num and den:
                per_round.append(den / num if metric in ("tpot_s", "ttft_s") else num / den)
        limit = (
            1.0
            if kind is None
            else decode_limit(shape, [kind], [])
            if metric == "tpot_s"
            else prefill_limit(shape, kind, None)
        )
        mean = sum(per_round) / len(per_round) if per_round else None
        rows.append(
            {
                "ratio": name,
                "per_round": per_round,
                "mean": mean,
                "ci95": list(mean_ci95(per_round)) if per_round else None,
                "limit": limit,
                "share": None if mean is None else mean / limit,
            }
        )
    return rows


def paired_markdown(rows: list[dict], rounds: int) -> list[str]:
    lines = [
        "## Paired engines: the plugin's cost against the LoRA-disabled engine",
        "",
        f"{rounds} round{'s' if rounds > 1 else ''} (`python -m benchmarks.paired`): both engines alive in one "
        "process (the plugin's with as many slots as in the offline section), the two engines' scenarios "
        f"interleaved {paired.IDLE_S} s apart, the order reversed every other round; each ratio is taken within "
        "a round, then averaged. Decode shares are per further token (TPOT), which is what the "
        "bytes-per-step limit bounds; the 16-token rows include the first token (a prefill of 8 x 16), as "
        "the offline section's decode rows do.",
        "",
        "| ratio | per round | mean [95% CI] | limit | share of limit |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if row["mean"] is None:
            lines.append(f"| {row['ratio']} | n/a | n/a | {row['limit']:.3f} | n/a |")
            continue
        low, high = row["ci95"]
        lines.append(
            f"| {row['ratio']} | {' / '.join(f'{v:.3f}' for v in row['per_round'])} | "
            f"{row['mean']:.3f} [{low:.3f}, {high:.3f}] | {row['limit']:.3f} | {row['share']:.2f} |"
        )
    return lines


def scale_engines(root: Path, shape: Shape, base: Path, dirs: dict, plan: Plan) -> dict[str, dict]:
    """Rotation engines (`max_loras` = slots) and first-request engines, one per hidden size."""
    sp = plan.scale
    copies = {n: [f"rot{n}-{i}" for i in range(n)] for n in sp.rotation}
    firsts = {kind: [f"first-{kind}-{i}" for i in range(sp.first_copies)] for kind in scale.FIRST_REQUEST_KINDS}
    fillers = [f"filler-{i}" for i in range(sp.slots)]
    first = scale.first_request_scenario(firsts, fillers)
    rotation_dirs = {n: dirs[n] for names in copies.values() for n in names}
    first_dirs = {n: dirs[n] for n in (*first["adapters"], *fillers)}
    large = sum(sp.rotation) + len(first_dirs)  # a CPU cache that holds every adapter of the engine
    engines = {
        "plugin, cache holds all": vllm_engine(
            root,
            shape,
            base,
            rotation_dirs | first_dirs,
            [first, *scale.rotation_scenarios(sp, copies, sp.rotation)],
            1,
            max_loras=sp.slots,
            max_cpu_loras=large,
        )
    }
    if plan.rotation_variants:
        beyond = tuple(n for n in sp.rotation if n == sp.slots or n > sp.small_cache)
        engines[f"plugin, max_cpu_loras {sp.small_cache}"] = vllm_engine(
            root,
            shape,
            base,
            {n: dirs[n] for b in beyond for n in copies[b]},
            scale.rotation_scenarios(sp, copies, beyond),
            1,
            max_loras=sp.slots,
            max_cpu_loras=sp.small_cache,
        )
        engines["stock, cache holds all"] = vllm_engine(
            root,
            shape,
            base,
            rotation_dirs,
            scale.rotation_scenarios(sp, copies, sp.rotation),
            1,
            plugin=False,
            max_loras=sp.slots,
            max_cpu_loras=large,
        )
    for name in sp.hidden_shapes:
        other = resolve_dtype(SHAPES[name])
        other_base, other_dirs = (
            base_checkpoint(other),
            adapter_dirs(base_checkpoint(other), {k: KINDS[k] for k in scale.FIRST_REQUEST_KINDS}),
        )
        links = first_request_copies(other_dirs, sp, root / "links" / name)
        engines[f"first request, {name}"] = vllm_engine(
            root, other, other_base, links, [first], 1, max_loras=sp.slots, max_cpu_loras=len(links) + 4
        )
    return engines


# ---------------------------------------------------------------- eager and ONNX


@torch.no_grad()
def time_in_rounds(cases: dict[str, tuple[Callable, int]], new_tokens: int, repeats: int, vocab: int) -> dict:
    """Throughput, time to first token and time per output token of greedy `generate(prompt, n)`
    calls, one (generate, batch) per case. Repeats run in rounds over all cases, so drift of a
    shared machine hits every case alike."""
    prompts = {
        name: torch.randint(1, vocab, (batch, 16), generator=torch.Generator().manual_seed(0))
        for name, (_, batch) in cases.items()
    }
    for name, (generate, _) in cases.items():
        generate(prompts[name], 1)  # warm-up
    ttft: dict[str, list[float]] = {name: [] for name in cases}
    total: dict[str, list[float]] = {name: [] for name in cases}
    for _ in tqdm(range(repeats), desc="eager/ONNX rounds", leave=False):
        for name, (generate, _) in cases.items():
            start = time.perf_counter()
            generate(prompts[name], 1)
            ttft[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            generate(prompts[name], new_tokens)
            total[name].append(time.perf_counter() - start)
    results = {}
    for name, (_, batch) in cases.items():
        tpot = [(t - f) / (new_tokens - 1) for t, f in zip(total[name], ttft[name])]
        results[name] = {
            "tok_per_s": stats([batch * new_tokens / t for t in total[name]]),
            "ttft_s": stats(ttft[name]),
            "tpot_s": stats(tpot),
        }
    return results


def hf_generate(model, names=None):
    def run(prompt, n):  # unpadded prompts: the mask is all ones
        return model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False
        )

    def generate(prompt, n):
        if names is None:
            return run(prompt, n)
        with ss.use_adapters(model, [names[i % len(names)] for i in range(prompt.shape[0])]):
            return run(prompt, n)

    return generate


def merged_sora(base: Path, dirs: dict) -> Path:
    """base + the SORA adapter folded into one checkpoint (cached beside the base)."""
    from sora_serve.converters.fold import fold_adapter

    path = cache_dir() / f"merged-sora-{base.name}-{Path(dirs['sora']).name}"
    if not (path / "config.json").is_file():
        fold_adapter(base, dirs["sora"], path, verify=False, progress=False)
    return path


def eager_deployments(shape: Shape, base: Path, dirs: dict, plan: Plan) -> dict:
    from peft import PeftModel

    dtype = getattr(torch, shape.dtype)
    load = lambda path=base: AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()  # noqa: E731
    runtime = load()
    distinct = [f"sora{i}" for i in range(max(plan.eager_distinct))]
    # the eager Cayley rotation solves a linear system: torch has no bf16 CPU kernel for it
    cayley = ["sora_cayley"] if dtype != torch.bfloat16 else []
    for name in ("prediag", "sora", *cayley, *distinct):
        ss.load_adapter(runtime, dirs[name], name=name)
    deployments = {
        "base": hf_generate(load()),
        "merged SORA": hf_generate(load(merged_sora(base, dirs))),
        "PEFT LoRA (unmerged)": hf_generate(PeftModel.from_pretrained(load(), dirs["lora"]).eval()),
        "PEFT DoRA (unmerged)": hf_generate(PeftModel.from_pretrained(load(), dirs["dora"]).eval()),
        "ours Pre-Diag": hf_generate(runtime, ["prediag"]),
        "ours SORA": hf_generate(runtime, ["sora"]),
        **{"ours SORA cayley": hf_generate(runtime, cayley) for _ in cayley},
    }
    cases = {
        f"{name} @ batch {batch}": (generate, batch)
        for name, generate in deployments.items()
        for batch in plan.eager_batches
    }
    cases |= {
        f"ours SORA, {k} distinct adapters @ batch 16": (hf_generate(runtime, distinct[:k]), 16)
        for k in plan.eager_distinct
    }
    return time_in_rounds(cases, plan.eager_tokens, plan.eager_repeats, shape.vocab_size)


def onnx_fits(shape: Shape) -> dict:
    """Whether exporting (fp32, ~7 bytes per parameter at peak: 4.6 GB measured for 0.67B) and
    running two sessions (merged + switchable, 4 bytes per parameter each) fit in the memory
    available now, with a quarter left for the rest of the machine."""
    available = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemAvailable")
    )
    need = max(7, 2 * 4) * shape.parameters()
    return {"need_gib": need / 2**30, "available_gib": available / 2**30, "fits": need < 0.75 * available}


def onnx_exports(base: Path, dirs: dict) -> tuple[Path, Path]:
    """The merged-SORA graph and the switchable graph with every kind (cached beside the base)."""
    from sora_serve.converters.onnx_export import export_onnx

    key = "-".join(Path(dirs[n]).name.rsplit("-", 1)[1] for n in KINDS)  # the adapters' cache keys
    merged, switchable = (
        cache_dir() / f"onnx-merged-{base.name}-{key}",
        cache_dir() / f"onnx-switchable-{base.name}-{key}",
    )
    if not (merged / "model.onnx").is_file():
        export_onnx(merged_sora(base, dirs), merged, verify=False)
    if not (switchable / "model.onnx").is_file():
        export_onnx(base, switchable, [dirs[n] for n in KINDS], verify=False)
    return merged, switchable


def onnx_deployments(shape: Shape, base: Path, dirs: dict, plan: Plan) -> dict:
    from sora_serve.converters.onnx_runtime import OnnxCausalLM

    merged_dir, switchable_dir = onnx_exports(base, dirs)
    merged, switchable = OnnxCausalLM(merged_dir), OnnxCausalLM(switchable_dir)
    cases = {}
    for batch in plan.eager_batches:
        cases[f"ONNX merged SORA @ batch {batch}"] = (lambda p, n: merged.generate(p.numpy(), n), batch)
        cases[f"ONNX switchable, SORA active @ batch {batch}"] = (
            lambda p, n: switchable.generate(p.numpy(), n, adapter=Path(dirs["sora"]).name),
            batch,
        )
    return time_in_rounds(cases, plan.eager_tokens, plan.eager_repeats, shape.vocab_size)


def onnx_section(shape: Shape, base: Path, dirs: dict, plan: Plan) -> dict:
    """ONNX Runtime on the suite's shape where it fits in memory, else on the small shape (said so)."""
    fit = onnx_fits(shape)
    if not fit["fits"]:
        small = resolve_dtype(SHAPES["small"])
        small_base = base_checkpoint(small)
        small_dirs = adapter_dirs(small_base, KINDS)
        return {"shape": "small", "fit": fit, "results": onnx_deployments(small, small_base, small_dirs, plan)}
    return {"shape": plan.shape, "fit": fit, "results": onnx_deployments(shape, base, dirs, plan)}


# ---------------------------------------------------------------- run


def run(
    quick: bool,
    out_dir: Path | None = None,
    shape: str | None = None,
    resume: Path | None = None,
    peers: tuple[str, ...] = (),
) -> Path:
    """Build (cached), run every section, report. Each section's raw result is saved as it
    finishes (`serving-sections-<stamp>.json` in the results folder); `resume` names such a
    file, whose finished sections are reused (a run cut off by a crash or a reboot goes on).
    `peers`: servers the online load test runs beside ours and stock vLLM (`online.PEERS`)."""
    started = time.perf_counter()
    plan = make_plan(shape, quick)
    out = Path(out_dir or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / f"serving-sections-{time.strftime('%Y%m%d-%H%M%S')}.json"
    previous = json.loads(resume.read_text()) if resume else {}
    if previous and previous["plan"] != json.loads(json.dumps(asdict(plan))):
        raise ValueError(f"{resume} was written by another plan (shape / quick); run without --resume")
    if previous and previous.get("peers") != list(peers):  # the online section's servers differ
        written = previous.get("peers")
        by = "a version without --peers" if written is None else f"--peers {' '.join(written) or '(none)'}"
        raise ValueError(f"{resume} was written by {by}; resume with the same --peers, or run without --resume")
    model = resolve_dtype(SHAPES[plan.shape])
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, dirs = build(model, plan, root)
        # exports before any timing: they are cached, so only a first run pays for them
        merged_sora(base, dirs)
        if onnx_fits(model)["fits"]:
            onnx_exports(base, dirs)
        for name in plan.scale.hidden_shapes:
            other = resolve_dtype(SHAPES[name])
            adapter_dirs(base_checkpoint(other), {k: KINDS[k] for k in scale.FIRST_REQUEST_KINDS})
        if online_load.LLAMA_CPP in peers:  # built and converted before any timing, too (cached)
            comparison_loras = {dirs[n]: None for names in ONLINE_COMPARISON_SETS.values() for n in names}
            llama_cpp.prepare(base, list(comparison_loras), model.dtype)
        timings["build_s"] = time.perf_counter() - started
        sections = [
            ("vLLM engines", lambda: offline_engines(root, model, base, dirs, plan)),
            ("paired engines", lambda: paired_engines(root, model, base, dirs, plan)),
            ("scale engines", lambda: scale_engines(root, model, base, dirs, plan)),
            (
                "online load",
                lambda: online_load.run_online(
                    base,
                    {s: {n: dirs[n] for n in names} for s, names in ONLINE_SETS.items()},
                    plan.online,
                    comparisons={s: {n: dirs[n] for n in names} for s, names in ONLINE_COMPARISON_SETS.items()},
                    stock_sets=ONLINE_STOCK_SETS,
                    peers=peers,
                    max_loras=4,
                    dtype=model.dtype,
                    vocab=model.vocab_size,
                    log_dir=root,
                ),
            ),
            ("eager", lambda: eager_deployments(model, base, dirs, plan)),
            ("onnx", lambda: onnx_section(model, base, dirs, plan)),
        ]
        results = dict(previous.get("results", {}))
        timings |= {k: v for k, v in previous.get("timings", {}).items() if k.removesuffix("_s") in results}
        for name, section in tqdm([s for s in sections if s[0] not in results], desc="serving suite"):
            start = time.perf_counter()
            results[name] = section()
            timings[f"{name}_s"] = time.perf_counter() - start
            saved.write_text(
                json.dumps(
                    {"plan": asdict(plan), "peers": list(peers), "results": results, "timings": timings}, default=str
                )
            )
            gc.collect()
    timings["total_s"] = sum(
        timings.values()
    )  # build + every section (a resumed run counts its reused sections' times)
    return report(plan, model, results, timings, out_dir)


# ---------------------------------------------------------------- report


def _ms(s: dict | None, digits: int = 1) -> str:
    return "–" if not s else f"{1e3 * s['median']:.{digits}f} / {1e3 * s['p90']:.{digits}f}"


def batch_curves(vllm: list[dict], distinct_batch: int):
    """Decode throughput and time per output token against batch size, one line per deployment."""
    import matplotlib.pyplot as plt

    fig, (tput, tpot) = plt.subplots(1, 2, figsize=(11, 4))
    for prefix in ("no-lora engine", "plugin: LoRA", "plugin: SORA", "stock: LoRA"):
        rows = sorted(batch_rows(vllm, prefix, distinct_batch).items())
        if rows:
            tput.plot([b for b, _ in rows], [r["tok_per_s"]["median"] for _, r in rows], marker="o", label=prefix)
            tpot.plot([b for b, _ in rows], [1e3 * r["tpot_s"]["median"] for _, r in rows], marker="o", label=prefix)
    for ax, label in ((tput, "decode throughput (tokens / s)"), (tpot, "time per output token, p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (requests)")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("vLLM CPU decode against batch size")
    return fig


def batch_rows(vllm: list[dict], prefix: str, distinct_batch: int) -> dict[int, dict]:
    """A deployment's decode rows by batch size; the batch of the distinct curve is its k = 1 row."""
    rows = {r["batch"]: r for r in vllm if r["name"].startswith(f"{prefix} @ batch")}
    one = next((r for r in vllm if r["name"] == f"{prefix.replace(':', '')}: 1 distinct"), None)
    if one is not None:
        rows[distinct_batch] = one
    return rows


def middle_sora(plan: Plan) -> int:
    """The SORA distinct count of the 16-adapter target: the largest below the curve's end."""
    counts = sorted(plan.scale.sora_distinct)
    return counts[-2] if len(counts) > 1 else counts[-1]


def ratio_rows(
    plan: Plan, shape: Shape, v: dict, e: dict, o: dict, onnx_shape: Shape
) -> list[tuple[str, float | None, float]]:
    """(ratio, measured, physical limit): decode limits from bytes read per step, prefill limits
    from multiply-adds per token (benchmarks.shapes)."""
    ratio = lambda a, b: a / b if a and b else None  # noqa: E731
    b = plan.scale.distinct_batch
    v = {
        **v,
        **{
            f"{prefix} @ batch {b}": v[f"{prefix.replace(':', '')}: 1 distinct"]
            for prefix in ("plugin: LoRA", "plugin: SORA", "stock: LoRA")
            if f"{prefix.replace(':', '')}: 1 distinct" in v
        },
    }
    lora1, sora1 = v.get("plugin LoRA: 1 distinct"), v.get("plugin SORA: 1 distinct")
    most_lora, mid_sora = max(plan.scale.distinct), middle_sora(plan)
    dl = lambda num, den: decode_limit(shape, num, den)  # noqa: E731
    return [
        ("eager merged SORA / base decode (batch 8)", ratio(e["merged SORA @ batch 8"], e["base @ batch 8"]), 1.0),
        (
            "vLLM plugin SORA / plugin LoRA decode (batch 8)",
            ratio(v["plugin: SORA @ batch 8"], v["plugin: LoRA @ batch 8"]),
            dl(["sora"], ["lora"]),
        ),
        (
            "vLLM plugin SORA cayley / plugin LoRA decode",
            ratio(v["plugin: SORA cayley"], v["plugin: LoRA @ batch 8"]),
            dl(["sora"], ["lora"]),
        ),
        (
            "vLLM plugin Pre-Diag / plugin LoRA decode",
            ratio(v["plugin: Pre-Diag"], v["plugin: LoRA @ batch 8"]),
            dl(["prediag"], ["lora"]),
        ),
        (
            "vLLM plugin DoRA / plugin LoRA decode",
            ratio(v["plugin: DoRA"], v["plugin: LoRA @ batch 8"]),
            dl(["dora"], ["lora"]),
        ),
        (
            "vLLM plugin LoRA / LoRA-disabled engine decode (batch 8)",
            ratio(v["plugin: LoRA @ batch 8"], v["no-lora engine @ batch 8"]),
            dl(["lora"], []),
        ),
        (
            "vLLM stock LoRA / LoRA-disabled engine decode (batch 8)",
            ratio(v["stock: LoRA @ batch 8"], v["no-lora engine @ batch 8"]),
            dl(["lora"], []),
        ),
        (
            "vLLM plugin SORA / LoRA-disabled engine decode (batch 8)",
            ratio(v["plugin: SORA @ batch 8"], v["no-lora engine @ batch 8"]),
            dl(["sora"], []),
        ),
        (
            "vLLM plugin LoRA / stock LoRA decode (batch 8)",
            ratio(v["plugin: LoRA @ batch 8"], v["stock: LoRA @ batch 8"]),
            1.0,
        ),
        (
            "vLLM plugin LoRA prefill / LoRA-disabled engine prefill",
            ratio(v["plugin: LoRA prefill"], v["no-lora engine prefill"]),
            prefill_limit(shape, "lora", None),
        ),
        (
            "vLLM stock LoRA prefill / LoRA-disabled engine prefill",
            ratio(v["stock: LoRA prefill"], v["no-lora engine prefill"]),
            prefill_limit(shape, "lora", None),
        ),
        (
            "vLLM plugin SORA prefill / LoRA-disabled engine prefill",
            ratio(v["plugin: SORA prefill"], v["no-lora engine prefill"]),
            prefill_limit(shape, "sora", None),
        ),
        ("vLLM plugin LoRA / stock LoRA prefill", ratio(v["plugin: LoRA prefill"], v["stock: LoRA prefill"]), 1.0),
        (
            "vLLM base requests (adapters loaded) / LoRA-disabled engine",
            ratio(v["plugin: base requests"], v["no-lora engine @ batch 8"]),
            1.0,
        ),
        (
            f"vLLM {most_lora} distinct LoRA / 1 LoRA (plugin, batch {b})",
            ratio(v.get(f"plugin LoRA: {most_lora} distinct"), lora1),
            dl(["lora"] * most_lora, ["lora"]),
        ),
        (
            f"vLLM {most_lora} distinct LoRA / 1 LoRA (stock, batch {b})",
            ratio(v.get(f"stock LoRA: {most_lora} distinct"), v.get("stock LoRA: 1 distinct")),
            dl(["lora"] * most_lora, ["lora"]),
        ),
        (
            f"vLLM {mid_sora} distinct SORA / 1 SORA (plugin, batch {b})",
            ratio(v.get(f"plugin SORA: {mid_sora} distinct"), sora1),
            dl(["sora"] * mid_sora, ["sora"]),
        ),
        *punica_rows(plan, shape, v),
        (
            "eager ours SORA / PEFT LoRA (batch 8)",
            ratio(e["ours SORA @ batch 8"], e["PEFT LoRA (unmerged) @ batch 8"]),
            dl(["sora"], ["lora"]),
        ),
        (
            "eager ours Pre-Diag / PEFT LoRA (batch 8)",
            ratio(e["ours Pre-Diag @ batch 8"], e["PEFT LoRA (unmerged) @ batch 8"]),
            dl(["prediag"], ["lora"]),
        ),
        (
            f"eager {max(plan.eager_distinct)} adapters / 1 adapter (batch 16)",
            ratio(
                e[f"ours SORA, {max(plan.eager_distinct)} distinct adapters @ batch 16"],
                e["ours SORA, 1 distinct adapters @ batch 16"],
            ),
            dl(["sora"] * max(plan.eager_distinct), ["sora"]),
        ),
        (
            "ONNX switchable / ONNX merged (batch 8)",
            ratio(o["ONNX switchable, SORA active @ batch 8"], o["ONNX merged SORA @ batch 8"]),
            decode_limit(replace(onnx_shape, dtype="float32"), ["sora"], []),
        ),
        (
            "ONNX merged SORA / vLLM LoRA-disabled engine (batch 8)",
            ratio(o["ONNX merged SORA @ batch 8"], v["no-lora engine @ batch 8"]),
            None,
        ),
        (
            "ONNX switchable SORA / vLLM plugin SORA (batch 8)",
            ratio(o["ONNX switchable, SORA active @ batch 8"], v["plugin: SORA @ batch 8"]),
            None,
        ),
    ]


def punica_rows(plan: Plan, shape: Shape, v: dict) -> list[tuple[str, float | None, float]]:
    """The portable (punica) backend beside the CPU default (grouped): same engine settings."""
    ratio = lambda a, b: a / b if a and b else None  # noqa: E731
    b, most_lora, mid_sora = plan.scale.distinct_batch, max(plan.scale.distinct), middle_sora(plan)
    dl = lambda num, den: decode_limit(shape, num, den)  # noqa: E731
    return [
        (
            "vLLM punica backend LoRA / grouped LoRA decode (batch 8)",
            ratio(v.get("punica: LoRA @ batch 8"), v["plugin: LoRA @ batch 8"]),
            1.0,
        ),
        (
            "vLLM punica backend SORA / grouped SORA decode (batch 8)",
            ratio(v.get("punica: SORA @ batch 8"), v["plugin: SORA @ batch 8"]),
            1.0,
        ),
        (
            "vLLM punica backend SORA / punica LoRA decode (batch 8)",
            ratio(v.get("punica: SORA @ batch 8"), v.get("punica: LoRA @ batch 8")),
            dl(["sora"], ["lora"]),
        ),
        (
            "vLLM punica backend SORA cayley / punica LoRA decode",
            ratio(v.get("punica: SORA cayley"), v.get("punica: LoRA @ batch 8")),
            dl(["sora"], ["lora"]),
        ),
        (
            "vLLM punica backend LoRA / stock LoRA decode (batch 8)",
            ratio(v.get("punica: LoRA @ batch 8"), v["stock: LoRA @ batch 8"]),
            1.0,
        ),
        (
            "vLLM punica backend LoRA prefill / LoRA-disabled engine prefill",
            ratio(v.get("punica: LoRA prefill"), v["no-lora engine prefill"]),
            prefill_limit(shape, "lora", None),
        ),
        (
            "vLLM punica backend SORA prefill / LoRA-disabled engine prefill",
            ratio(v.get("punica: SORA prefill"), v["no-lora engine prefill"]),
            prefill_limit(shape, "sora", None),
        ),
        (
            f"vLLM {most_lora} distinct LoRA / 1 LoRA (punica backend, batch {b})",
            ratio(v.get(f"punica LoRA: {most_lora} distinct"), v.get("punica LoRA: 1 distinct")),
            dl(["lora"] * most_lora, ["lora"]),
        ),
        (
            f"vLLM {mid_sora} distinct SORA / 1 SORA (punica backend, batch {b})",
            ratio(v.get(f"punica SORA: {mid_sora} distinct"), v.get("punica SORA: 1 distinct")),
            dl(["sora"] * mid_sora, ["sora"]),
        ),
    ]


def curves(
    plan: Plan, shape: Shape, vllm: list[dict], scale_results: dict[str, dict]
) -> tuple[dict, dict, dict, dict, dict]:
    """The three scale curves as {label: {x: median}} (plus raw rotation rows and first-request tables)."""
    distinct, limits = {}, {}
    for label, kind in (("plugin LoRA", "lora"), ("stock LoRA", "lora"), ("plugin SORA", "sora")):
        rows = {
            len(r["adapters"]): r
            for r in vllm
            if r["name"].startswith(f"{label}: ") and r["name"].endswith(" distinct")
        }
        if rows:
            distinct[label] = {k: r["tok_per_s"]["median"] for k, r in rows.items()}
            limits[label] = {k: decode_limit(shape, [kind] * k, [kind]) for k in rows}
    rotation, rotation_raw = {}, {}
    for label, engine in scale_results.items():
        rows = [r for r in engine["results"] if r["kind"] == "rotation"]
        if rows:
            for r in rows:
                r["stats"], r["limit"] = (
                    r["tok_per_s"],
                    scale.rotation_limit(shape, r),
                )  # tok_per_s: stats over the waves (vllm_engine)
            rotation[label] = {r["adapters"]: r["stats"]["median"] for r in rows}
            rotation_raw[label] = rows
    first = {}
    for label, engine in scale_results.items():
        for r in engine["results"]:
            if r["kind"] == "first_request":  # adapters are named first-<kind>-<i> (first_request_copies)
                name = label.removeprefix("first request, ") if label.startswith("first request, ") else plan.shape
                first[name] = scale.first_request_table(r, {n: n.split("-")[1] for n in r["adapters"]})
    return distinct, limits, rotation, rotation_raw, first


def limit_targets(rows: list[tuple[str, float | None, float]], plan: Plan, paired: list[dict]) -> list[Target]:
    """The ratios users pay on every token, each at >= 0.96 of what its bytes or multiply-adds allow:
    the plugin's against the LoRA-disabled engine from the paired rounds (`paired_engines`), the
    distinct-adapter one from the offline engine."""
    distinct = f"vLLM {middle_sora(plan)} distinct SORA / 1 SORA (plugin, batch {plan.scale.distinct_batch})"
    found = {name: (value, limit) for name, value, limit in rows}
    shares = [(f"{r['ratio']} (paired)", r["mean"], r["limit"]) for r in paired if r["limit"] != 1.0]
    return [
        Target(f"{name}, share of its limit", None if value is None else value / limit, 0.96, note=f"limit {limit:.3f}")
        for name, value, limit in [*shares, (distinct, *found[distinct])]
    ]


def base_request_targets(paired: list[dict]) -> list[Target]:
    """Base requests on an engine with adapters cost what they cost with LoRA disabled (within 5%)."""
    return [Target(f"{r['ratio']} (paired)", r["mean"], 0.95) for r in paired if r["ratio"].startswith("base requests")]


def report(plan: Plan, shape: Shape, results: dict, timings: dict, out_dir) -> Path:
    engines, scale_results, online, eager, onnx = (
        results[k] for k in ("vLLM engines", "scale engines", "online load", "eager", "onnx")
    )
    vllm = [row for engine in engines.values() for row in engine["results"]]
    onnx_shape = resolve_dtype(SHAPES[onnx["shape"]])
    v = {row["name"]: row["tok_per_s"]["median"] for row in vllm}
    e = {name: r["tok_per_s"]["median"] for name, r in eager.items()}
    o = {name: r["tok_per_s"]["median"] for name, r in onnx["results"].items()}
    rows = ratio_rows(plan, shape, v, e, o, onnx_shape)
    paired = paired_rows(results["paired engines"], shape)
    ratios = {name: value for name, value, _ in rows}
    first_shapes = {plan.shape: shape, **{n: resolve_dtype(SHAPES[n]) for n in plan.scale.hidden_shapes}}
    distinct, distinct_limits, rotation, rotation_raw, first = curves(plan, shape, vllm, scale_results)
    most_sora = middle_sora(plan)
    targets = [
        Target("eager merged / base decode", ratios["eager merged SORA / base decode (batch 8)"], 0.98),
        Target("vLLM SORA / LoRA decode (plugin)", ratios["vLLM plugin SORA / plugin LoRA decode (batch 8)"], 0.9),
        Target("vLLM Pre-Diag / LoRA decode (plugin)", ratios["vLLM plugin Pre-Diag / plugin LoRA decode"], 0.95),
        Target("vLLM plugin LoRA / stock LoRA decode", ratios["vLLM plugin LoRA / stock LoRA decode (batch 8)"], 1.3),
        Target("vLLM plugin LoRA / stock LoRA prefill", ratios["vLLM plugin LoRA / stock LoRA prefill"], 3.0),
        Target(
            f"vLLM {most_sora} SORA adapters / 1 adapter (batch {plan.scale.distinct_batch})",
            ratios[f"vLLM {most_sora} distinct SORA / 1 SORA (plugin, batch {plan.scale.distinct_batch})"],
            0.8,
            note="the 16-adapter target, read from the distinct-adapter curve",
        ),
        *scale.targets(distinct, rotation, first, first_shapes, plan.scale.slots),
    ]
    targets += base_request_targets(paired) + limit_targets(rows, plan, paired)
    targets += online_load.targets(online)
    m = resolve_dtype(shape)
    md = [
        f"Shape `{plan.shape}`: Llama, hidden {m.hidden_size}, {m.num_layers} layers, "
        f"{m.num_attention_heads} heads / {m.num_key_value_heads} KV heads, "
        f"intermediate {m.intermediate_size}, vocab {m.vocab_size} ({m.parameters() / 1e9:.2f}B "
        f"parameters, random weights), {m.dtype} "
        f"(CPU bf16 flags: {', '.join(bf16_flags()) or 'none'}); "
        f"r = {RANK} on all 7 projections, SORA r_p = {R_P}; {'quick' if plan.quick else 'full'} mode, "
        f"{plan.repeats} interleaved repeats. "
        f"Run time {timings['total_s'] / 60:.1f} min ("
        + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in timings.items() if k != "total_s")
        + "); "
        "engine starts: "
        + ", ".join(f"{k} {e['engine_start_s']:.0f} s" for k, e in {**engines, **scale_results}.items())
        + ".",
        "",
        "## Ratios (one run) and their physical limit",
        "",
        "The limit is the ratio the extra bytes (bandwidth-bound decode: base weights + adapter factors "
        "read per step) or multiply-adds "
        "(compute-bound prefill) of the adapter terms allow, from the shapes and ranks; `of limit` = measured / limit.",
        "",
        "| ratio | measured | limit | of limit |",
        "| --- | --- | --- | --- |",
    ]
    for name, value, limit in rows:
        md.append(
            f"| {name} | {'n/a' if value is None else f'{value:.3f}'} | "
            f"{'–' if limit is None else f'{limit:.3f}'} | "
            f"{'–' if value is None or limit is None else f'{value / limit:.2f}'} |"
        )
    md += [
        "",
        "## Targets",
        "",
        markdown_targets(targets),
        "",
        *paired_markdown(paired, plan.paired_rounds),
        "",
        *online_load.markdown(online),
        "",
        *scale.markdown(distinct, distinct_limits, rotation, rotation_raw, first, first_shapes, plan.scale),
        "",
        "## vLLM",
        "",
        "Decode: prompts of 16 tokens; TTFT is the same batch asked for one token, TPOT the rest of the "
        "time per further token.",
        "",
        "| scenario | batch | tok/s median [p10, p90] | TTFT p50 / p90 (ms) | TPOT p50 / p90 (ms) |",
        "| --- | --- | --- | --- | --- |",
    ]
    md += [
        f"| {row['name']} | {row['batch']} | {row['tok_per_s']['median']:.0f} "
        f"[{row['tok_per_s']['p10']:.0f}, {row['tok_per_s']['p90']:.0f}] | {_ms(row.get('ttft_s'))} | "
        f"{_ms(row.get('tpot_s'), 2)} |"
        for row in vllm
    ]
    fit = onnx["fit"]
    md += [
        "",
        "## Eager Hugging Face and ONNX Runtime",
        "",
        f"""Eager runs in {m.dtype}{
            " (SORA cayley left out: its eager forward calls torch.linalg.solve, which has no bf16 CPU kernel)"
            if m.dtype == "bfloat16"
            else ""
        }; """
        f"ONNX Runtime runs the fp32 export (the converters export fp32) on shape `{onnx['shape']}` "
        f"(export + two sessions need ~{fit['need_gib']:.1f} GiB, {fit['available_gib']:.1f} GiB available "
        "at the start of the section).",
        "",
        "| deployment | tok/s | TTFT p50 / p90 (ms) | TPOT p50 / p90 (ms) |",
        "| --- | --- | --- | --- |",
    ]
    for name, r in {**eager, **onnx["results"]}.items():
        md.append(
            f"| {name} | {r['tok_per_s']['median']:.0f} | {1e3 * r['ttft_s']['median']:.1f} / "
            f"{1e3 * r['ttft_s']['p90']:.1f} | {1e3 * r['tpot_s']['median']:.2f} / "
            f"{1e3 * r['tpot_s']['p90']:.2f} |"
        )
    figures = {
        "vllm": bar_chart(
            "vLLM CPU decode/prefill throughput",
            [r["name"] for r in vllm],
            [r["tok_per_s"]["median"] for r in vllm],
            (
                [r["tok_per_s"]["median"] - r["tok_per_s"]["p10"] for r in vllm],
                [r["tok_per_s"]["p90"] - r["tok_per_s"]["median"] for r in vllm],
            ),
            "tokens / s",
        ),
        "vllm-batch": batch_curves(vllm, plan.scale.distinct_batch),
        "eager": bar_chart(
            "Eager HF and ONNX Runtime greedy decode",
            list({**eager, **onnx["results"]}),
            [r["tok_per_s"]["median"] for r in {**eager, **onnx["results"]}.values()],
            None,
            "tokens / s",
        ),
        "online-latency": online_load.latency_plot(online),
        "scale-distinct": scale.distinct_plot(distinct, distinct_limits, plan.scale.distinct_batch),
        "scale-rotation": scale.rotation_plot(rotation, plan.scale.slots, plan.scale.small_cache),
        "scale-first-request": scale.first_request_plot(first, first_shapes),
    }
    payload = {
        "quick": plan.quick,
        "shape": plan.shape,
        "settings": {"plan": asdict(plan), "model": asdict(m), "rank": RANK, "r_p": R_P, "kinds": KINDS},
        "timings_s": timings,
        "engine_start_s": {k: e["engine_start_s"] for k, e in {**engines, **scale_results}.items()},
        "vllm": vllm,
        "paired": {"rounds": results["paired engines"], "ratios": paired},
        "scale": {
            "distinct": distinct,
            "distinct_limits": distinct_limits,
            "rotation": rotation_raw,
            "first_request": first,
            "raw": scale_results,
        },
        "online": online,
        "eager": eager,
        "onnx": onnx,
        "ratios": ratios,
        "limits": {name: limit for name, _, limit in rows},
        "targets": [t.__dict__ | {"met": t.met} for t in targets],
    }
    return save_suite("serving", payload, "\n".join(md), figures, out_dir)
