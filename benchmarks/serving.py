"""Serving suite: one model, one rank budget (r = 16 on all 7 projections, SORA r_p = 4).

Deployments: vLLM (LoRA disabled; plugin engine with LoRA/DoRA/Pre-Diag/SORA; stock engine with
the plugin disabled), eager Hugging Face (base, merged SORA, PEFT LoRA/DoRA unmerged, our runtime
Pre-Diag/SORA, 1/4/16 distinct adapters per batch), ONNX Runtime (merged vs switchable graph).
All ratios come from this one run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

import sora_serve as ss
from sora_serve.tiny import make_tiny_checkpoint, make_tiny_model

from .common import Target, bar_chart, markdown_targets, save_suite, stats

MODEL = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=8, num_layers=4, max_position_embeddings=1024)
KINDS = {
    "lora": dict(method="lora"),
    "dora": dict(method="dora"),
    "prediag": dict(method="prediag"),
    "sora": dict(method="sora", r_p=4),
    "sora_cayley": dict(method="sora", r_p=4, rotation="cayley"),
}


def build(root: Path, extra_sora: int) -> tuple[Path, dict[str, str]]:
    """The base checkpoint and adapters (plus `extra_sora` more SORA adapters for the multi-adapter runs)."""
    base = make_tiny_checkpoint("llama", root / "base", **MODEL)
    dirs = {}
    specs = {**KINDS, **{f"sora{i}": dict(method="sora", r_p=4) for i in range(extra_sora)}}
    for seed, (name, kwargs) in enumerate(specs.items()):
        model = make_tiny_model("llama", **MODEL)
        ss.attach(model, ss.AdapterConfig(**{"r": 16, "target_modules": "all-linear", **kwargs}), "a", verbose=False)
        with torch.no_grad():
            for _, layer in ss.adapted_layers(model):
                for p in layer.adapters["a"].parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        dirs[name] = str(ss.save_adapter(model, root / name, "a"))
    return base, dirs


# ---------------------------------------------------------------- vLLM


def vllm_engine(root: Path, base: Path, adapters: dict, scenarios: list[dict], repeats: int, *, enable_lora: bool, plugin: bool, max_loras: int) -> list[dict]:
    config = {"model": str(base), "adapters": adapters, "scenarios": scenarios, "repeats": repeats, "enable_lora": enable_lora, "max_loras": max_loras, "max_lora_rank": 16}
    path = root / f"vllm-{len(list(root.glob('vllm-*.json')))}.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
    if not plugin:
        env["VLLM_PLUGINS"] = "none"  # stock vLLM: our entry point is not loaded
    out = subprocess.run([sys.executable, "-m", "benchmarks.vllm_worker", str(path)], capture_output=True, text=True, env=env, timeout=1800)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"vLLM worker failed:\n{out.stderr[-4000:]}")
    return json.loads(line[len("RESULT ") :])


def vllm_scenarios(quick: bool, distinct: list[str]) -> tuple[list[dict], list[dict], list[dict]]:
    t = 16 if quick else 64
    prefill = 128 if quick else 256

    def decode(name, adapters, batch=8):
        return {"name": name, "kind": "decode", "adapters": adapters, "batch": batch, "prompt_len": 16, "max_tokens": t}

    def pre(name, adapters):
        return {"name": name, "kind": "prefill", "adapters": adapters, "batch": 8, "prompt_len": prefill, "max_tokens": 1}

    sweep = (1, 8, 32) if not quick else (1, 8)  # batch sizes of the latency/throughput curves; 8 is the reference
    disabled = [pre("no-lora engine prefill", [None])] + [decode(f"no-lora engine @ batch {b}", [None], batch=b) for b in sweep]
    plugin = [
        decode("plugin: base requests", [None]),
        pre("plugin: LoRA prefill", ["lora"]),
        decode("plugin: DoRA", ["dora"]), decode("plugin: Pre-Diag", ["prediag"]), decode("plugin: SORA cayley", ["sora_cayley"]),
        decode("plugin: 1 adapter x16", ["sora"], batch=16),
        decode("plugin: 4 adapters x16", distinct[:4], batch=16),
        decode("plugin: 16 adapters x16", distinct[:16], batch=16),
    ]
    plugin += [decode(f"plugin: {kind} @ batch {b}", [name], batch=b) for kind, name in (("LoRA", "lora"), ("SORA", "sora")) for b in sweep]
    stock = [pre("stock: LoRA prefill", ["lora"])] + [decode(f"stock: LoRA @ batch {b}", ["lora"], batch=b) for b in sweep]
    return disabled, plugin, stock


# ---------------------------------------------------------------- eager and ONNX


@torch.no_grad()
def time_in_rounds(cases: dict[str, tuple[Callable, int]], new_tokens: int, repeats: int, vocab: int = 512) -> dict:
    """Throughput, time to first token and time per output token of greedy `generate(prompt, n)`
    calls, one (generate, batch) per case. Repeats run in rounds over all cases, so drift of a
    shared machine hits every case alike."""
    prompts = {name: torch.randint(1, vocab, (batch, 16), generator=torch.Generator().manual_seed(0)) for name, (_, batch) in cases.items()}
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
        results[name] = {"tok_per_s": stats([batch * new_tokens / t for t in total[name]]), "ttft_s": stats(ttft[name]), "tpot_s": stats(tpot)}
    return results


def hf_generate(model, names=None):
    def generate(prompt, n):
        if names is None:
            return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        with ss.use_adapters(model, [names[i % len(names)] for i in range(prompt.shape[0])]):
            return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    return generate


def eager_deployments(root: Path, base: Path, dirs: dict, quick: bool) -> dict:
    from peft import PeftModel

    from sora_serve.converters.fold import fold_adapter

    fold_adapter(base, dirs["sora"], root / "merged-sora", verify=False, progress=False)
    load = lambda path=base: AutoModelForCausalLM.from_pretrained(path).eval()  # noqa: E731
    runtime = load()
    for name in ("prediag", "sora", "sora_cayley", *[n for n in dirs if n.startswith("sora") and n[4:].isdigit()]):
        ss.load_adapter(runtime, dirs[name], name=name)
    deployments = {
        "base": hf_generate(load()),
        "merged SORA": hf_generate(load(root / "merged-sora")),
        "PEFT LoRA (unmerged)": hf_generate(PeftModel.from_pretrained(load(), dirs["lora"]).eval()),
        "PEFT DoRA (unmerged)": hf_generate(PeftModel.from_pretrained(load(), dirs["dora"]).eval()),
        "ours Pre-Diag": hf_generate(runtime, ["prediag"]),
        "ours SORA": hf_generate(runtime, ["sora"]),
        "ours SORA cayley": hf_generate(runtime, ["sora_cayley"]),
    }
    distinct = [n for n in dirs if n.startswith("sora") and n[4:].isdigit()]
    batches = (1, 8) if quick else (1, 8, 32)
    new_tokens, repeats = (8, 2) if quick else (32, 5)
    cases = {f"{name} @ batch {batch}": (generate, batch) for name, generate in deployments.items() for batch in batches}
    cases |= {f"ours SORA, {k} distinct adapters @ batch 16": (hf_generate(runtime, distinct[:k]), 16) for k in (1, 4, 16)}
    return time_in_rounds(cases, new_tokens, repeats)


def onnx_deployments(root: Path, base: Path, dirs: dict, quick: bool) -> dict:
    from sora_serve.converters.onnx_export import export_onnx
    from sora_serve.converters.onnx_runtime import OnnxCausalLM

    export_onnx(root / "merged-sora", root / "onnx-merged", verify=False)
    export_onnx(base, root / "onnx-adapters", [dirs[n] for n in KINDS], verify=False)
    merged, switchable = OnnxCausalLM(root / "onnx-merged"), OnnxCausalLM(root / "onnx-adapters")
    new_tokens, repeats = (8, 2) if quick else (32, 5)
    cases = {}
    for batch in (1, 8):
        cases[f"ONNX merged SORA @ batch {batch}"] = (lambda p, n: merged.generate(p.numpy(), n), batch)
        cases[f"ONNX switchable, SORA active @ batch {batch}"] = (lambda p, n: switchable.generate(p.numpy(), n, adapter="sora"), batch)
    return time_in_rounds(cases, new_tokens, repeats)


# ---------------------------------------------------------------- report


def run(quick: bool, out_dir: Path | None = None) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, dirs = build(root, extra_sora=16)
        distinct = [n for n in dirs if n.startswith("sora") and n[4:].isdigit()]
        disabled, plugin, stock = vllm_scenarios(quick, distinct)
        repeats = 1 if quick else 5
        vllm = []
        vllm += vllm_engine(root, base, {}, disabled, repeats, enable_lora=False, plugin=True, max_loras=1)
        vllm += vllm_engine(root, base, dirs, plugin, repeats, enable_lora=True, plugin=True, max_loras=16)
        vllm += vllm_engine(root, base, {"lora": dirs["lora"]}, stock, repeats, enable_lora=True, plugin=False, max_loras=4)
        eager = eager_deployments(root, base, dirs, quick)
        onnx = onnx_deployments(root, base, dirs, quick)
    for row in vllm:
        for metric in ("tok_per_s", "ttft_s", "tpot_s"):
            row[metric] = stats(row[metric]) if row.get(metric) else None
    return report(vllm, eager, onnx, quick, out_dir)


def _ms(s: dict | None, digits: int = 1) -> str:
    return "–" if s is None else f"{1e3 * s['median']:.{digits}f} / {1e3 * s['p90']:.{digits}f}"


def batch_curves(vllm: list[dict]):
    """Decode throughput and time per output token against batch size, one line per deployment."""
    import matplotlib.pyplot as plt

    fig, (tput, tpot) = plt.subplots(1, 2, figsize=(11, 4))
    for prefix in ("no-lora engine", "plugin: LoRA", "plugin: SORA", "stock: LoRA"):
        rows = sorted((r for r in vllm if r["name"].startswith(f"{prefix} @ batch")), key=lambda r: r["batch"])
        if rows:
            batches = [r["batch"] for r in rows]
            tput.plot(batches, [r["tok_per_s"]["median"] for r in rows], marker="o", label=prefix)
            tpot.plot(batches, [1e3 * r["tpot_s"]["median"] for r in rows], marker="o", label=prefix)
    for ax, label in ((tput, "decode throughput (tokens / s)"), (tpot, "time per output token, p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (requests)")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("vLLM CPU decode against batch size")
    return fig


def report(vllm: list[dict], eager: dict, onnx: dict, quick: bool, out_dir) -> Path:
    v = {row["name"]: row["tok_per_s"]["median"] for row in vllm}
    e = {name: r["tok_per_s"]["median"] for name, r in eager.items()}
    o = {name: r["tok_per_s"]["median"] for name, r in onnx.items()}
    ratio = lambda a, b: a / b if a and b else None  # noqa: E731
    ratios = {
        "eager merged SORA / base decode (batch 8)": ratio(e["merged SORA @ batch 8"], e["base @ batch 8"]),
        "vLLM plugin SORA / plugin LoRA decode": ratio(v["plugin: SORA @ batch 8"], v["plugin: LoRA @ batch 8"]),
        "vLLM plugin SORA cayley / plugin LoRA decode": ratio(v["plugin: SORA cayley"], v["plugin: LoRA @ batch 8"]),
        "vLLM plugin Pre-Diag / plugin LoRA decode": ratio(v["plugin: Pre-Diag"], v["plugin: LoRA @ batch 8"]),
        "vLLM plugin DoRA / plugin LoRA decode": ratio(v["plugin: DoRA"], v["plugin: LoRA @ batch 8"]),
        "vLLM plugin LoRA / stock LoRA decode": ratio(v["plugin: LoRA @ batch 8"], v["stock: LoRA @ batch 8"]),
        "vLLM plugin LoRA / stock LoRA prefill": ratio(v["plugin: LoRA prefill"], v["stock: LoRA prefill"]),
        "vLLM base requests (adapters loaded) / LoRA-disabled engine": ratio(v["plugin: base requests"], v["no-lora engine @ batch 8"]),
        "vLLM 16 adapters / 1 adapter (batch 16)": ratio(v["plugin: 16 adapters x16"], v["plugin: 1 adapter x16"]),
        "eager ours SORA / PEFT LoRA (batch 8)": ratio(e["ours SORA @ batch 8"], e["PEFT LoRA (unmerged) @ batch 8"]),
        "eager ours Pre-Diag / PEFT LoRA (batch 8)": ratio(e["ours Pre-Diag @ batch 8"], e["PEFT LoRA (unmerged) @ batch 8"]),
        "eager 16 adapters / 1 adapter (batch 16)": ratio(e["ours SORA, 16 distinct adapters @ batch 16"], e["ours SORA, 1 distinct adapters @ batch 16"]),
        "ONNX switchable / ONNX merged (batch 8)": ratio(o["ONNX switchable, SORA active @ batch 8"], o["ONNX merged SORA @ batch 8"]),
    }
    targets = [
        Target("eager merged / base decode", ratios["eager merged SORA / base decode (batch 8)"], 0.98),
        Target("vLLM SORA / LoRA decode (plugin)", ratios["vLLM plugin SORA / plugin LoRA decode"], 0.9),
        Target("vLLM Pre-Diag / LoRA decode (plugin)", ratios["vLLM plugin Pre-Diag / plugin LoRA decode"], 0.95),
        Target("vLLM plugin LoRA / stock LoRA decode", ratios["vLLM plugin LoRA / stock LoRA decode"], 1.3),
        Target("vLLM plugin LoRA / stock LoRA prefill", ratios["vLLM plugin LoRA / stock LoRA prefill"], 3.0),
        Target("vLLM base requests with adapters / LoRA disabled", ratios["vLLM base requests (adapters loaded) / LoRA-disabled engine"], 0.95),
        Target("vLLM 16 adapters / 1 adapter", ratios["vLLM 16 adapters / 1 adapter (batch 16)"], 0.8),
    ]
    md = ["## Ratios (one run)", "", "| ratio | value |", "| --- | --- |"]
    md += [f"| {k} | {'n/a' if r is None else f'{r:.3f}'} |" for k, r in ratios.items()]
    md += ["", "## Targets", "", markdown_targets(targets), "", "## vLLM", "",
           "Decode: prompts of 16 tokens; TTFT is the same batch asked for one token, TPOT the rest of the time per further token.", "",
           "| scenario | batch | tok/s median [p10, p90] | TTFT p50 / p90 (ms) | TPOT p50 / p90 (ms) |", "| --- | --- | --- | --- | --- |"]
    md += [f"| {row['name']} | {row['batch']} | {row['tok_per_s']['median']:.0f} [{row['tok_per_s']['p10']:.0f}, {row['tok_per_s']['p90']:.0f}] | {_ms(row['ttft_s'])} | {_ms(row['tpot_s'], 2)} |" for row in vllm]
    md += ["", "## Eager Hugging Face and ONNX Runtime", "", "| deployment | tok/s | TTFT p50 / p90 (ms) | TPOT p50 / p90 (ms) |", "| --- | --- | --- | --- |"]
    for name, r in {**eager, **onnx}.items():
        md.append(f"| {name} | {r['tok_per_s']['median']:.0f} | {1e3 * r['ttft_s']['median']:.1f} / {1e3 * r['ttft_s']['p90']:.1f} | {1e3 * r['tpot_s']['median']:.2f} / {1e3 * r['tpot_s']['p90']:.2f} |")
    figures = {
        "vllm": bar_chart("vLLM CPU decode/prefill throughput", [r["name"] for r in vllm], [r["tok_per_s"]["median"] for r in vllm],
                          ([r["tok_per_s"]["median"] - r["tok_per_s"]["p10"] for r in vllm], [r["tok_per_s"]["p90"] - r["tok_per_s"]["median"] for r in vllm]), "tokens / s"),
        "vllm-batch": batch_curves(vllm),
        "eager": bar_chart("Eager HF and ONNX Runtime greedy decode", list({**eager, **onnx}), [r["tok_per_s"]["median"] for r in {**eager, **onnx}.values()], None, "tokens / s"),
    }
    payload = {"quick": quick, "settings": {"model": MODEL, "rank": 16, "r_p": 4, "kinds": KINDS}, "vllm": vllm, "eager": eager, "onnx": onnx, "ratios": ratios, "targets": [t.__dict__ | {"met": t.met} for t in targets]}
    return save_suite("serving", payload, "\n".join(md), figures, out_dir)
