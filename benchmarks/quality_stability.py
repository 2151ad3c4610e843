"""SORA training stability: first-order vs Cayley rotation over an lr sweep and several seeds.

    python -m benchmarks.quality_stability [--quick] [--out DIR]

SST-2 training set minus a held-out part (the quality suite's lr-sweep split), all-MiniLM-L6-v2,
SORA r = 6, r_p = 2 on query/value with the quality suite's protocol. A run counts as collapsed
when one class takes > 95% of the held-out predictions (the issue's failure: every prediction
the same class, train loss stuck at ln 2). Diagnostics are the max over training and layers of
|K|_2, |R^T R - I|_2 and |C|_F + |D|_F (training/diagnostics.py).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from .common import RESULTS, plt, save_suite
from .quality import FULL, SST2, held_out_split, quiet_transformers, read_tsv, train_one

ROTATIONS = ("sora_first_order", "sora_cayley")
COLLAPSE_SHARE = 0.95
DIAGNOSTICS = ("K_norm_max", "orth_error_max", "norm_C_plus_D_max", "norm_C_minus_D_max")


def peak(run: dict, key: str) -> float:
    return max(d[key] for d in run["diagnostics"])


def run(quick: bool, out_dir: Path | None = None) -> Path | None:
    if not (SST2 / "train_full.tsv").is_file():
        print(f"stability suite skipped: SST-2 not found at {SST2}")
        return None
    # full: 30 runs of 100 steps (~40 min on 2 shared cores): the upper half of issue 11's lr range, where
    # training moves far enough in 100 steps to tell a collapse from a slow start (at 1e-3 it does not)
    lrs, seeds, steps, held = ((1e-2,), (0, 1), 6, 64) if quick else ((2e-3, 5e-3, 1e-2), (0, 1, 2, 3, 4), 100, 200)
    settings = replace(FULL, seeds=seeds, sst2_steps=steps)
    quiet_transformers()
    held_out, train = held_out_split(read_tsv(SST2 / "train_full.tsv"), held)
    started = time.perf_counter()
    results = {name: {} for name in ROTATIONS}
    with tqdm(total=len(ROTATIONS) * len(lrs) * len(seeds), desc="stability runs") as bar:
        for lr in lrs:
            for seed in seeds:
                for name in ROTATIONS:
                    r = train_one(name, train, held_out, steps, lr, seed, settings)
                    r.pop("predictions")
                    r.update({k: peak(r, k) for k in DIAGNOSTICS}, collapsed=r["majority_share"] > COLLAPSE_SHARE)
                    results[name].setdefault(f"{lr:g}", []).append(r)
                    bar.update(1)
                    bar.write(f"{name} lr {lr:g} seed {seed}: held-out accuracy {100 * r['accuracy']:.1f}, majority {r['majority_share']:.2f}, "
                              f"max |K| {r['K_norm_max']:.2f}, max |R^T R - I| {r['orth_error_max']:.2e}")
    payload = {"quick": quick, "settings": {"lrs": lrs, "seeds": seeds, "steps": steps, "held_out": held, "collapse_share": COLLAPSE_SHARE},
               "results": results, "runtime_s": time.perf_counter() - started}
    return save_suite("quality-stability", payload, markdown(payload), {"accuracy": figure(payload)}, out_dir)


def markdown(payload: dict) -> str:
    s = payload["settings"]
    lines = [f"SORA r = 6, r_p = 2 (query/value), s = 2, {s['steps']} steps, batch 16, seeds {list(s['seeds'])}; held-out: {s['held_out']} "
             f"SST-2 training sentences. Collapsed: one class > {100 * s['collapse_share']:.0f}% of held-out predictions. "
             f"Runtime {payload['runtime_s'] / 60:.1f} min.", "",
             "| rotation | lr | held-out accuracy % (mean ± std, min) | collapsed | final train loss (max) | max |K|_2 | max |R^T R - I|_2 | max |C|+|D| |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, by_lr in payload["results"].items():
        for lr, runs in by_lr.items():
            accs = [100 * r["accuracy"] for r in runs]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            lines.append(f"| {name} | {lr} | {statistics.mean(accs):.2f} ± {std:.2f}, {min(accs):.2f} | {sum(r['collapsed'] for r in runs)}/{len(runs)} | "
                         f"{max(r['final_train_loss'] for r in runs):.3f} | {max(r['K_norm_max'] for r in runs):.2f} | "
                         f"{max(r['orth_error_max'] for r in runs):.2e} | {max(r['norm_C_plus_D_max'] for r in runs):.2f} |")
    return "\n".join(lines)


def figure(payload: dict) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_lr in payload["results"].items():
        for lr, runs in by_lr.items():
            ax.scatter([float(lr)] * len(runs), [100 * r["accuracy"] for r in runs], label=name if lr == next(iter(by_lr)) else None,
                       marker="o" if name == ROTATIONS[0] else "x", color="#c44e52" if name == ROTATIONS[0] else "#4c72b0")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("held-out accuracy (%), one point per seed")
    ax.set_title("SORA: first-order vs Cayley rotation")
    ax.legend()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality_stability", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one lr, two seeds, a few steps (a smoke run)")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS})")
    args = parser.parse_args()
    run(args.quick, args.out)


if __name__ == "__main__":
    main()
