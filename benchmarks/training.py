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

METHODS = {
    "lora": {"method": "lora"},
    "dora": {"method": "dora"},
    "prediag": {"method": "prediag"},
    "sora": {"method": "sora"},
    "sora_cayley": {"method": "sora", "rotation": "cayley"},
    # recompute W0 x in backward (activation checkpointing of the adapted layer): LoRA-level memory
    "prediag_recompute": {"method": "prediag", "recompute_base": True},
    "sora_recompute": {"method": "sora", "recompute_base": True},
}
MODEL = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=8, num_layers=4)
# On a GPU the CPU model would time kernel launches, not work: a 1.3B-parameter Llama shape, longer rows.
GPU_MODEL = dict(
    hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16, num_layers=16
)
SHAPES = {
    "cpu": dict(model=MODEL, max_length=48, long_rows=False),
    "cuda": dict(model=GPU_MODEL, max_length=256, long_rows=True),
}

WORKER = """
import json, sys
from sora_serve.training.train import TrainConfig, train_adapter
from sora_serve.tiny import BUILTIN_TEXT
cfg = json.loads(sys.argv[1])
data = [" ".join(BUILTIN_TEXT)] * 400 if cfg["long_rows"] else BUILTIN_TEXT * 20
m = train_adapter(TrainConfig(model=cfg["model"], data=data, method=cfg["method"], steps=cfg["steps"], \
batch_size=16, max_length=cfg["max_length"],
                              r=16, r_p=4, rotation=cfg.get("rotation", "first_order"), \
recompute_base=cfg.get("recompute_base", False),
                              progress=False, device=cfg["device"]))
print("RESULT " + json.dumps({"step_times": m["step_times_s"], "mean": m["mean_step_time_s"], \
"rss": m["peak_rss_mib"], "gpu_mem": m["peak_device_memory_mib"], \
"params": m["trainable_params"], "loss": m["loss_curve"]}))
"""


WARMUP_STEPS = 2  # first steps of each process: allocator and oneDNN warm-up


def train_worker(config: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(config)], capture_output=True, text=True, timeout=1800
    )
    line = next((text for text in out.stdout.splitlines() if text.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(line[len("RESULT ") :])


def run(quick: bool, out_dir: Path | None = None, device: str = "cpu") -> Path:
    from sora_serve.tiny import make_tiny_checkpoint

    steps, rounds = (6, 2) if quick else (20, 5)  # quick: a smoke run (CI), not for numbers
    samples: dict[str, list[float]] = {name: [] for name in METHODS}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        shape = SHAPES["cuda" if device.startswith("cuda") else "cpu"]
        base = make_tiny_checkpoint("llama", Path(tmp) / "base", **shape["model"])
        for _ in tqdm(range(rounds), desc="training rounds"):
            for name, extra in METHODS.items():
                r = train_worker(
                    {
                        "model": str(base),
                        "steps": steps,
                        "device": device,
                        "max_length": shape["max_length"],
                        "long_rows": shape["long_rows"],
                        **extra,
                    }
                )
                samples[name] += r["step_times"][WARMUP_STEPS:]
                previous = results.get(name, {}).get("peak_rss_mib", 0)
                results[name] = {
                    "peak_rss_mib": max(previous, r["rss"]),
                    "peak_gpu_memory_mib": r["gpu_mem"],
                    "trainable_params": r["params"],
                    "loss_curve": r["loss"],
                }
    for name in METHODS:
        results[name]["step_time_s"] = stats(samples[name])
    t = {k: v["step_time_s"]["median"] for k, v in results.items()}
    on_gpu = results["lora"]["peak_gpu_memory_mib"] is not None
    memory = "peak GPU memory" if on_gpu else "peak RSS"  # on a GPU, RSS is the host process, not the training
    mem = {k: v["peak_gpu_memory_mib" if on_gpu else "peak_rss_mib"] for k, v in results.items()}
    targets = [
        Target("Pre-Diag / LoRA step time", t["prediag"] / t["lora"], 1.05, higher_is_better=False),
        Target("SORA / LoRA step time", t["sora"] / t["lora"], 1.15, higher_is_better=False),
        Target(
            "SORA cayley / LoRA step time",
            t["sora_cayley"] / t["lora"],
            1.15,
            higher_is_better=False,
            note="not a stated target; for reference",
        ),
        Target("Pre-Diag / DoRA step time (below DoRA)", t["prediag"] / t["dora"], 1.0, higher_is_better=False),
        Target("SORA / DoRA step time (below DoRA)", t["sora"] / t["dora"], 1.0, higher_is_better=False),
        Target(f"Pre-Diag / LoRA {memory}", mem["prediag"] / mem["lora"], 1.10, higher_is_better=False),
        Target(f"SORA / LoRA {memory}", mem["sora"] / mem["lora"], 1.10, higher_is_better=False),
        Target(
            f"Pre-Diag (recompute) / LoRA {memory}",
            mem["prediag_recompute"] / mem["lora"],
            1.10,
            higher_is_better=False,
            note="--recompute-base",
        ),
        Target(
            f"SORA (recompute) / LoRA {memory}",
            mem["sora_recompute"] / mem["lora"],
            1.10,
            higher_is_better=False,
            note="--recompute-base",
        ),
        Target(
            "Pre-Diag (recompute) / LoRA step time",
            t["prediag_recompute"] / t["lora"],
            1.05,
            higher_is_better=False,
            note="--recompute-base",
        ),
        Target(
            "SORA (recompute) / LoRA step time",
            t["sora_recompute"] / t["lora"],
            1.15,
            higher_is_better=False,
            note="--recompute-base",
        ),
    ]
    md = [
        f"| method | trainable params | step time median [p10, p90] (ms) | / LoRA | {memory} (MiB) | / LoRA |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        s = r["step_time_s"]
        md.append(
            f"| {name} | {r['trainable_params']:,} | {1e3 * s['median']:.1f} [{1e3 * s['p10']:.1f}, "
            f"{1e3 * s['p90']:.1f}] | {t[name] / t['lora']:.3f} | {mem[name]:.0f} | "
            f"{mem[name] / mem['lora']:.3f} |"
        )
    memory_note = (
        "torch.cuda.max_memory_allocated over the training steps"
        if on_gpu
        else "each method's process lifetime peak resident memory, VmHWM (model, data, optimizer, interpreter)"
    )
    md += [
        "",
        f"Device {device}, model {shape['model']}, batch 16 x {shape['max_length']} tokens, r = 16 on all "
        "linear layers, r_p = 4. "
        f"{rounds} interleaved rounds of {steps} steps per method, first {WARMUP_STEPS} steps of each "
        f"dropped. Peak memory: {memory_note}, the largest over rounds.",
        "",
        markdown_targets(targets),
    ]
    names = list(results)
    figures = {
        "step-time": bar_chart(
            f"Training step time (batch 16, {shape['max_length']} tokens, {device})",
            names,
            [1e3 * t[n] for n in names],
            (
                [1e3 * (t[n] - results[n]["step_time_s"]["p10"]) for n in names],
                [1e3 * (results[n]["step_time_s"]["p90"] - t[n]) for n in names],
            ),
            "ms / step",
        )
    }
    payload = {
        "quick": quick,
        "settings": {
            "device": device,
            "model": shape["model"],
            "r": 16,
            "r_p": 4,
            "steps": steps,
            "rounds": rounds,
            "warmup_steps": WARMUP_STEPS,
            "batch": 16,
            "max_length": shape["max_length"],
        },
        "results": results,
        "targets": [x.__dict__ | {"met": x.met} for x in targets],
    }
    return save_suite("training", payload, "\n".join(md), figures, out_dir)
