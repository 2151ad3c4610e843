"""Training-cost suite: step time and peak memory of LoRA, DoRA (PEFT), Pre-Diag and SORA.

Same model, data, batch, optimizer and loop (`training.train`); each method in its own
subprocess so peak RSS (ru_maxrss) is per method. Methods run in interleaved rounds
(LoRA, DoRA, ..., LoRA, DoRA, ...) and their step times are pooled, so slow drift of a shared
machine lands on every method alike instead of on whichever ran last.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from .common import Target, bar_chart, markdown_targets, save_suite, stats

METHODS = {"lora": {}, "dora": {}, "prediag": {}, "sora": {}, "sora_cayley": {"rotation": "cayley"}}
MODEL = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=8, num_layers=4)

WORKER = """
import json, sys
from training.train import TrainConfig, train_adapter
from sora_serve.tiny import BUILTIN_TEXT
cfg = json.loads(sys.argv[1])
m = train_adapter(TrainConfig(model=cfg["model"], data=BUILTIN_TEXT * 20, method=cfg["method"], steps=cfg["steps"], batch_size=16,
                              max_length=48, r=16, r_p=4, rotation=cfg.get("rotation", "first_order"), progress=False))
print("RESULT " + json.dumps({"step_times": m["step_times_s"], "mean": m["mean_step_time_s"], "rss": m["peak_rss_mib"], "params": m["trainable_params"], "loss": m["loss_curve"]}))
"""


WARMUP_STEPS = 2  # first steps of each process: allocator and oneDNN warm-up


def train_worker(config: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", WORKER, json.dumps(config)], capture_output=True, text=True, timeout=1800)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(line[len("RESULT ") :])


def run(quick: bool, out_dir: Path | None = None) -> Path:
    from sora_serve.tiny import make_tiny_checkpoint

    steps, rounds = (8, 3) if quick else (20, 5)
    samples: dict[str, list[float]] = {name: [] for name in METHODS}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = make_tiny_checkpoint("llama", Path(tmp) / "base", **MODEL)
        for _ in tqdm(range(rounds), desc="training rounds"):
            for name, extra in METHODS.items():
                r = train_worker({"model": str(base), "method": "sora" if name.startswith("sora") else name, "steps": steps, **extra})
                samples[name] += r["step_times"][WARMUP_STEPS:]
                previous = results.get(name, {}).get("peak_rss_mib", 0)
                results[name] = {"peak_rss_mib": max(previous, r["rss"]), "trainable_params": r["params"], "loss_curve": r["loss"]}
    for name in METHODS:
        results[name]["step_time_s"] = stats(samples[name])
    t = {k: v["step_time_s"]["median"] for k, v in results.items()}
    mem = {k: v["peak_rss_mib"] for k, v in results.items()}
    targets = [
        Target("Pre-Diag / LoRA step time", t["prediag"] / t["lora"], 1.05, higher_is_better=False),
        Target("SORA / LoRA step time", t["sora"] / t["lora"], 1.15, higher_is_better=False),
        Target("SORA cayley / LoRA step time", t["sora_cayley"] / t["lora"], 1.15, higher_is_better=False, note="not a stated target; for reference"),
        Target("Pre-Diag / DoRA step time (below DoRA)", t["prediag"] / t["dora"], 1.0, higher_is_better=False),
        Target("SORA / DoRA step time (below DoRA)", t["sora"] / t["dora"], 1.0, higher_is_better=False),
        Target("Pre-Diag / LoRA peak RSS", mem["prediag"] / mem["lora"], 1.10, higher_is_better=False),
        Target("SORA / LoRA peak RSS", mem["sora"] / mem["lora"], 1.10, higher_is_better=False),
    ]
    md = ["| method | trainable params | step time median [p10, p90] (ms) | / LoRA | peak RSS (MiB) |", "| --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        s = r["step_time_s"]
        md.append(f"| {name} | {r['trainable_params']:,} | {1e3 * s['median']:.1f} [{1e3 * s['p10']:.1f}, {1e3 * s['p90']:.1f}] | {t[name] / t['lora']:.3f} | {r['peak_rss_mib']:.0f} |")
    md += ["", f"{rounds} interleaved rounds of {steps} steps per method, first {WARMUP_STEPS} steps of each dropped. Peak memory is each method's process lifetime ru_maxrss (model, data, optimizer, interpreter), the largest over rounds.", "", markdown_targets(targets)]
    names = list(results)
    figures = {"step-time": bar_chart("Training step time (batch 16, 48 tokens)", names, [1e3 * t[n] for n in names],
                                      ([1e3 * (t[n] - results[n]["step_time_s"]["p10"]) for n in names], [1e3 * (results[n]["step_time_s"]["p90"] - t[n]) for n in names]), "ms / step")}
    payload = {"quick": quick, "settings": {"model": MODEL, "r": 16, "r_p": 4, "steps": steps, "rounds": rounds, "warmup_steps": WARMUP_STEPS, "batch": 16, "max_length": 48}, "results": results, "targets": [x.__dict__ | {"met": x.met} for x in targets]}
    return save_suite("training", payload, "\n".join(md), figures, out_dir)
