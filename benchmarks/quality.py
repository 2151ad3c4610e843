"""Quality suite: SST-2 dev accuracy on all-MiniLM-L6-v2, LoRA / DoRA / Pre-Diag / SORA, three seeds.

Budgets are matched by rank: LoRA r=8 on query/value is the reference; DoRA and Pre-Diag add
one vector per layer; SORA trades rank for its rotation (r=6, r_p=2: 6*(in+out) + out + 4*out).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from .common import bar_chart, save_suite

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
RUNS = {"lora": dict(r=8), "dora": dict(r=8), "prediag": dict(r=8), "sora": dict(r=6, r_p=2)}


def run(quick: bool, out_dir: Path | None = None) -> Path | None:
    if not (SST2 / "dev.tsv").is_file():
        print(f"quality suite skipped: SST-2 not found at {SST2}")
        return None
    from sora_serve.training.train import TrainConfig, minilm_path, train_adapter

    steps, seeds = (30, (0, 1, 2)) if quick else (300, (0, 1, 2))
    dev = SST2 / "dev.tsv"
    if quick:  # the first 300 dev sentences keep the quick mode under 5 minutes
        dev = Path(tempfile.mkdtemp()) / "dev300.tsv"
        dev.write_text("".join((SST2 / "dev.tsv").read_text().splitlines(keepends=True)[:301]))
    results = {}
    for method, ranks in RUNS.items():
        runs = []
        for seed in seeds:
            cfg = TrainConfig(model=minilm_path(), data=SST2 / "train_full.tsv", eval_data=dev, task="seq-cls", method=method,
                              target_modules=["query", "value"], steps=steps, batch_size=16, lr=5e-3, seed=seed, progress=False, **ranks)
            m = train_adapter(cfg)
            runs.append({"seed": seed, "accuracy": m["eval_after"]["accuracy"], "trainable_params": m["trainable_params"]})
        accs = [r["accuracy"] for r in runs]
        results[method] = {"runs": runs, "mean": statistics.mean(accs), "std": statistics.stdev(accs), "trainable_params": runs[0]["trainable_params"]}
    md = ["| method | trainable params (incl. 2-class head) | dev accuracy mean ± std (3 seeds) |", "| --- | --- | --- |"]
    md += [f"| {m} | {r['trainable_params']:,} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f} |" for m, r in results.items()]
    md += ["", f"{steps} steps, batch 16, lr 5e-3, AdamW with linear warm-up/decay, targets query/value, {'first 300 sentences of' if quick else 'full'} SST-2 dev set."]
    names = list(results)
    fig = bar_chart("SST-2 dev accuracy (all-MiniLM-L6-v2)", names, [100 * results[n]["mean"] for n in names],
                    ([100 * results[n]["std"] for n in names], [100 * results[n]["std"] for n in names]), "accuracy (%)")
    fig.axes[0].set_ylim(40, 100)
    payload = {"quick": quick, "settings": {"steps": steps, "seeds": list(seeds), "runs": RUNS}, "results": results}
    return save_suite("quality", payload, "\n".join(md), {"accuracy": fig}, out_dir)
