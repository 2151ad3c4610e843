"""Training stability: the recipe sweep that chose training/recipe.py's defaults, and the lr x seed grid.

    python -m benchmarks.quality_stability [--quick] [--part recipe|recipe_long|grid|all] [--out DIR]

Both train all-MiniLM-L6-v2 on SST-2's training set minus 500 held-out sentences and score on those
(the quality suite's lr-sweep split; never the dev set), with the quality suite's matched budgets.

- recipe: Pre-Diag and both SORA rotations at lr 5e-3 and 1e-2 with the d and C/D learning rates at
  lr * scale, scale in {1 (the paper's single lr), 0.3, 0.1, 0.03}, 3 seeds, 60 steps (the quality
  suite's horizon); recipe_long: scales 1 and 0.1 at lr 5e-3 over 300 steps, 2 seeds, where the
  rotation has time to run away. The chosen scale has no one-class run, then the best mean held-out accuracy.
- grid: the five methods x lr {1e-3, 2e-3, 5e-3, 1e-2} x 5 seeds with the default recipe. The
  quality suite picks each method's lr from it (`--lr-from`).

A run is one-class when one class takes > 95% of the held-out predictions: a collapse (train loss
back at ln 2) or a run that has not left chance. Runs go in SORA_QUALITY_WORKERS processes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path

from tqdm.auto import tqdm

from .common import RESULTS, plt, save_suite
from .quality import (
    FULL,
    METHODS,
    ONE_CLASS_SHARE,
    SST2,
    WORKERS_ENV,
    best_lrs,
    held_out_split,
    init_worker,
    lr_grid,
    quiet_transformers,
    read_tsv,
    recipe_defaults,
    sweep_entry,
    train_all,
)

RECIPE_METHODS = ("prediag", "sora_first_order", "sora_cayley")
RECIPE_SCALES = (1.0, 0.3, 0.1, 0.03)
PARTS = ("recipe", "recipe_long", "grid")
FULL_PLAN = {
    "recipe": {"lrs": (5e-3, 1e-2), "seeds": (200, 201, 202), "scales": RECIPE_SCALES, "steps": 60},
    # the horizon where an earlier trainer's single lr let the rotation run away (docs/benchmarks/rotation-collapse.md)
    "recipe_long": {"lrs": (5e-3,), "seeds": (200, 201), "scales": (1.0, 0.1), "steps": 300},
    "grid": {"lrs": (1e-3, 2e-3, 5e-3, 1e-2), "seeds": (100, 101, 102, 103, 104)},
    "steps": 60,
    "held_out": 500,
}
QUICK_PLAN = {
    "recipe": {"lrs": (1e-2,), "seeds": (200,), "scales": (1.0, 0.1), "steps": 4},
    "recipe_long": {"lrs": (1e-2,), "seeds": (200,), "scales": (1.0,), "steps": 6},
    "grid": {"lrs": (1e-2,), "seeds": (100, 101)},
    "steps": 4,
    "held_out": 48,
}


def recipe_sweep(plan: dict, sst2_train: list, settings, pool, bar) -> list[dict]:
    held_out, train = held_out_split(sst2_train, settings.sweep_held_out)
    jobs, scales = {}, {}
    for scale in plan["scales"]:
        recipe = {"single_lr": True} if scale == 1.0 else {"diag_lr_scale": scale, "rotation_lr_scale": scale}
        for name in RECIPE_METHODS:
            for lr in plan["lrs"]:
                for seed in plan["seeds"]:
                    label = f"recipe scale {scale:g} {name} lr {lr:g} seed {seed}"
                    jobs[label] = dict(
                        name=name,
                        train=train,
                        eval_=held_out,
                        steps=plan["steps"],
                        lr=lr,
                        seed=seed,
                        recipe=recipe,
                    )
                    scales[label] = scale
    runs = train_all(jobs, settings, pool, bar)
    return [
        {**sweep_entry(job["name"], runs[label]), "scale": scales[label], "steps": plan["steps"]}
        for label, job in jobs.items()
    ]


def choose_scale(sweep: list[dict]) -> dict:
    """Fewest one-class runs, then the best mean held-out accuracy over methods, lrs and seeds."""
    by_scale = {}
    for e in sweep:
        by_scale.setdefault(e["scale"], []).append(e)
    score = {
        s: (sum(e["one_class"] for e in es), statistics.mean(e["accuracy"] for e in es)) for s, es in by_scale.items()
    }
    best = min(score, key=lambda s: (score[s][0], -score[s][1]))
    return {
        "scale": best,
        "per_scale": {f"{s:g}": {"one_class": n, "mean_accuracy": acc} for s, (n, acc) in score.items()},
    }


def cells(rows: list[dict], key: str = "method") -> dict[tuple[str, float], list[dict]]:
    out = {}
    for e in rows:
        out.setdefault((e[key], e["lr"]), []).append(e)
    return out


def grid_target(rows: list[dict]) -> dict:
    """The issue's target: Pre-Diag and both SORAs have no one-class run in a cell where LoRA has
    none, and never more than LoRA elsewhere."""
    by_cell = cells(rows)
    failures = []
    for (method, lr), runs in by_cell.items():
        if method in RECIPE_METHODS:
            ours, lora = sum(e["one_class"] for e in runs), sum(e["one_class"] for e in by_cell[("lora", lr)])
            if (lora == 0 and ours > 0) or ours > lora:
                failures.append(f"{method} lr {lr:g}: {ours} one-class vs LoRA's {lora}")
    return {"met": not failures, "failures": failures}


def run(quick: bool, part: str = "all", out_dir: Path | None = None) -> Path | None:
    if not (SST2 / "train_full.tsv").is_file():
        print(f"stability suite skipped: SST-2 not found at {SST2}")
        return None
    plan = QUICK_PLAN if quick else FULL_PLAN
    settings = replace(
        FULL, sst2_steps=plan["steps"], sweep_held_out=plan["held_out"], max_length=48 if quick else FULL.max_length
    )
    quiet_transformers()
    sst2_train = read_tsv(SST2 / "train_full.tsv")
    parts = PARTS if part == "all" else (part,)
    n_runs = sum(
        len(plan[p]["lrs"])
        * len(plan[p]["seeds"])
        * (len(plan[p]["scales"]) * len(RECIPE_METHODS) if p.startswith("recipe") else len(METHODS))
        for p in parts
    )
    workers = int(os.environ.get(WORKERS_ENV, "1"))
    payload = {
        "quick": quick,
        "settings": {
            **asdict(settings),
            "methods": {k: asdict(v) for k, v in METHODS.items()},
            "recipe": recipe_defaults(),
            "plan": plan,
            "one_class_share": ONE_CLASS_SHARE,
            "workers": workers,
        },
    }
    started = time.perf_counter()
    with (
        tqdm(total=n_runs, desc="stability runs") as bar,
        ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=init_worker) as pool,
    ):
        for p in parts:
            if p.startswith("recipe"):
                payload[f"{p}_sweep"] = recipe_sweep(plan[p], sst2_train, settings, pool, bar)
                payload[f"{p}_choice"] = choose_scale(payload[f"{p}_sweep"])
        if "grid" in parts:
            payload["grid"] = lr_grid(
                METHODS, plan["grid"]["lrs"], plan["grid"]["seeds"], settings, sst2_train, pool, bar
            )
            payload["grid_target"] = grid_target(payload["grid"])
            payload["best_lr"] = best_lrs(payload["grid"])
    payload["runtime_s"] = time.perf_counter() - started
    figures = {}
    if "grid" in payload:
        figures["grid"] = heat_map(
            payload["grid"], "method", "one-class runs per cell (of {n})\nand mean held-out accuracy %"
        )
    for p in ("recipe", "recipe_long"):
        if f"{p}_sweep" in payload:
            figures[p.replace("_", "-")] = heat_map(
                [{**e, "method": f"{e['method']} × {e['scale']:g}"} for e in payload[f"{p}_sweep"]],
                "method",
                f"recipe sweep, {plan[p]['steps']} steps (method × lr scale of d, C, D)\n"
                "one-class runs (of {n}) and mean held-out accuracy %",
            )
    return save_suite(
        "quality-stability" if part in ("all", "grid") else f"quality-stability-{part.replace('_', '-')}",
        payload,
        markdown(payload),
        figures,
        out_dir,
    )


def markdown(payload: dict) -> str:
    s = payload["settings"]
    lines = [
        f"all-MiniLM-L6-v2, SST-2, batches of {s['batch_size']}, scored on "
        f"{s['plan']['held_out']} held-out training "
        f"sentences; one-class: > {100 * s['one_class_share']:.0f}% of predictions in one class. Runtime "
        f"{payload['runtime_s'] / 60:.1f} min, "
        f"{s['workers']} worker(s)."
    ]
    for part in ("recipe", "recipe_long"):
        if f"{part}_sweep" in payload:
            lines += recipe_markdown(payload[f"{part}_sweep"], payload[f"{part}_choice"], s["plan"][part])
    if "grid" in payload:
        by = cells(payload["grid"])
        lrs = s["plan"]["grid"]["lrs"]
        lines += [
            "",
            f"## lr × seed grid ({s['sst2_steps']} steps, default recipe)",
            "",
            "Held-out accuracy %, mean ± std over seeds (one-class runs):",
            "",
            "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr |",
            "| --- | " + " | ".join("---" for _ in lrs) + " | --- |",
        ]
        for method in dict.fromkeys(e["method"] for e in payload["grid"]):
            row = []
            for lr in lrs:
                accs = [100 * e["accuracy"] for e in by[(method, lr)]]
                std = statistics.stdev(accs) if len(accs) > 1 else 0.0
                row.append(f"{statistics.mean(accs):.1f} ± {std:.1f} ({sum(e['one_class'] for e in by[(method, lr)])})")
            lines.append(f"| {method} | " + " | ".join(row) + f" | {payload['best_lr'][method]:g} |")
        target = payload["grid_target"]
        lines += [
            "",
            "Target (Pre-Diag and both SORAs: no one-class run where LoRA has none, never more than LoRA): "
            + ("**met**" if target["met"] else "**not met**: " + "; ".join(target["failures"])),
        ]
    return "\n".join(lines)


def recipe_markdown(sweep: list[dict], choice: dict, plan: dict) -> list[str]:
    lines = [
        "",
        f"## Recipe sweep, {plan['steps']} steps (d and C/D at lr × scale; scale 1 is the paper's single lr)",
        "",
        "Mean held-out accuracy % (one-class runs; max over runs of |K|₂ for SORA, of |d − 1| for Pre-Diag):",
        "",
        "| method | lr | " + " | ".join(f"scale {k}" for k in choice["per_scale"]) + " |",
        "| --- | --- | " + " | ".join("---" for _ in choice["per_scale"]) + " |",
    ]
    by = cells(sweep)
    for method in RECIPE_METHODS:
        for lr in plan["lrs"]:
            row = []
            for scale in choice["per_scale"]:
                runs = [e for e in by.get((method, lr), []) if f"{e['scale']:g}" == scale]
                key = "K_norm_max" if method.startswith("sora") else "d_minus_1_max"
                row.append(
                    f"{100 * statistics.mean(e['accuracy'] for e in runs):.1f} "
                    f"({sum(e['one_class'] for e in runs)}; {max(e[key] for e in runs):.2f})"
                )
            lines.append(f"| {method} | {lr:g} | " + " | ".join(row) + " |")
    lines += [
        "",
        "Per scale, all methods, lrs and seeds: "
        + "; ".join(
            f"{k}: {v['one_class']} one-class, mean {100 * v['mean_accuracy']:.2f}%"
            for k, v in choice["per_scale"].items()
        )
        + f". Best by this rule (fewest one-class, then mean accuracy): **{choice['scale']:g}**.",
    ]
    return lines


def heat_map(rows: list[dict], key: str, title: str) -> plt.Figure:
    """Rows: methods; columns: lrs; colour: one-class runs in the cell; text: count and mean accuracy."""
    by = cells(rows, key)
    names = list(dict.fromkeys(e[key] for e in rows))
    lrs = sorted({e["lr"] for e in rows})
    counts = [[sum(e["one_class"] for e in by.get((n, lr), [])) for lr in lrs] for n in names]
    n = max(len(v) for v in by.values())
    fig, ax = plt.subplots(figsize=(max(5.5, 3 + 1.4 * len(lrs)), 1.4 + 0.45 * len(names)))
    image = ax.imshow(counts, cmap="Reds", vmin=0, vmax=n, aspect="auto")
    for i, name in enumerate(names):
        for j, lr in enumerate(lrs):
            runs = by.get((name, lr), [])
            if runs:
                acc = 100 * statistics.mean(e["accuracy"] for e in runs)
                ax.text(
                    j,
                    i,
                    f"{counts[i][j]}/{len(runs)}\n{acc:.1f}%",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if counts[i][j] > n / 2 else "black",
                )
    ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("learning rate")
    ax.set_title(title.format(n=n), fontsize=9)
    fig.colorbar(image, ax=ax, label="one-class runs", ticks=range(n + 1))
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality_stability", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one lr, one or two seeds, a few steps (a smoke run)")
    parser.add_argument(
        "--part", choices=(*PARTS, "all"), default="all", help="which study to run (default: all three)"
    )
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS})")
    args = parser.parse_args()
    run(args.quick, args.part, args.out)


if __name__ == "__main__":
    main()
