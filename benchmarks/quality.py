"""Quality suite: LoRA / DoRA / Pre-Diag / SORA (both rotations) on all-MiniLM-L6-v2, a fair protocol.

Tasks: SST-2 (dev set) and the five Amazon review domains (a seeded subset of each test split).
Protocol, identical for every method:

- the same scale s = alpha / r = 2 and matched trainable parameters (12 adapted layers, 384 x 384):
  DoRA / Pre-Diag r = 8 add one vector per layer (8 * 768 + 384 = 6528); SORA r = 6, r_p = 2
  (6 * 768 + 384 + 2 * 384 * 2 = 6528); LoRA has no vector, so it gets r = 9 on query and r = 8 on
  value (PEFT rank_pattern): (9 + 8) * 768 = 2 * 6528. Every budget is exactly equal.
- AdamW with weight decay on matrices only (m and d are not pulled toward 0), linear warm-up/decay.
- the learning rate of each method comes from a sweep trained on SST-2's training set minus a
  held-out part, and scored on that held-out part (never on a dev or test set), by the
  one-standard-error rule (`best_lrs`); the chosen lr then serves every task.
- seeds: data order and head init are shared by all methods for a seed (paired comparison);
  the adapter init is the method's own draw (see training/train.py).

Then one SORA adapter per Amazon domain is loaded into one model and all domains run in one mixed
batch through the eager runtime (`use_adapters`, one adapter per row); each row's predictions must
equal those of its adapter alone.

Runs go seed round by seed round (every task and method for one seed), in SORA_QUALITY_WORKERS
processes. After each round `quality-partial.json` holds the results so far; running the same
command again with the same settings resumes from it (lr sweep and complete rounds kept).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import statistics
import time
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

from scipy import stats as scipy_stats
from tqdm.auto import tqdm

from .common import RESULTS, mean_ci95, plt, save_suite

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SST2 = SHARED_DATA / "sst2"
AMAZON = SHARED_DATA / "amazon-reviews"
DOMAINS = ("books", "dvd", "electronics", "kitchen", "airline")
SCALE = 2.0  # s = alpha / r for every method
HELD_OUT_SEED = 12345  # which SST-2 training sentences the lr sweep holds out
SERVED = "sora_cayley"  # the method whose Amazon adapters are served together
PARTIAL = "quality-partial.json"
# Training runs in parallel processes of one thread each (`init_worker`). On 2 shared cores, 2 such workers beat one
# 2-thread process by far: small GEMMs gain little from a second thread and lose a lot when it is descheduled.
WORKERS_ENV = "SORA_QUALITY_WORKERS"


@dataclass
class Method:
    """One column of the table: a training method at a budget-matching rank."""

    method: str
    r: int
    r_p: int = 1
    rotation: str = "cayley"
    rank_pattern: dict[str, int] | None = None

    def train_kwargs(self) -> dict:
        return dict(
            method=self.method,
            r=self.r,
            r_p=self.r_p,
            rotation=self.rotation,
            lora_alpha=SCALE * self.r,
            rank_pattern=self.rank_pattern,
        )


METHODS = {
    "lora": Method("lora", 8, rank_pattern={"query": 9}),
    "dora": Method("dora", 8),
    "prediag": Method("prediag", 8),
    "sora_first_order": Method("sora", 6, 2, "first_order"),
    "sora_cayley": Method("sora", 6, 2, "cayley"),
}
# Paired comparisons reported per seed: (method, reference).
PAIRS = [(m, "lora") for m in METHODS if m != "lora"] + [
    ("sora_cayley", "dora"),
    ("prediag", "dora"),
    ("sora_cayley", "sora_first_order"),
]


@dataclass
class Settings:
    seeds: tuple[int, ...]
    sweep_lrs: tuple[float, ...]
    sweep_seeds: tuple[int, ...]  # none of `seeds`; each method's lr: the best mean held-out accuracy over these
    sweep_held_out: int  # SST-2 training sentences held out to score the sweep
    sst2_steps: int
    sst2_eval: int | None  # dev sentences (None: all 872)
    amazon_steps: int
    amazon_eval: int  # test reviews per domain (a seeded random subset; the files are sorted by label)
    domains: tuple[str, ...] = DOMAINS
    batch_size: int = 16
    max_length: int = 64
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01


QUICK = Settings(
    seeds=(0, 1),
    sweep_lrs=(5e-3,),
    sweep_seeds=(100,),
    sweep_held_out=48,
    sst2_steps=4,
    sst2_eval=48,
    amazon_steps=3,
    amazon_eval=32,
    domains=("books", "airline"),
    max_length=48,
)
# Sized for about 1.5 hours on the 2-core CPU with 2 single-thread workers (two threads on two busy cores
# were 4x slower per step than one): the sweep, 5 methods x 4 lrs x 3 seeds on SST-2, then 5 seeds x 5 methods
# x (SST-2 + 5 Amazon domains); ~0.4 s per step of batch 16 plus a model load and an evaluation per run.
# Amazon gets 80 steps: at 20 some runs had not left chance (the old run's one-class Amazon results).
# `--lr-from` takes the sweep from the stability grid instead (same split, steps and recipe; 5 seeds).
FULL = Settings(
    seeds=(0, 1, 2, 3, 4),
    sweep_lrs=(1e-3, 2e-3, 5e-3, 1e-2),
    sweep_seeds=(100, 101, 102),
    sweep_held_out=500,
    sst2_steps=60,
    sst2_eval=None,
    amazon_steps=80,
    amazon_eval=200,
)
ONE_CLASS_SHARE = 0.95  # a run is one-class when one class takes more of its eval predictions than this


def read_tsv(path: Path) -> list[tuple[str, int]]:
    with path.open(newline="") as f:
        return [(row["sentence"], int(row["label"])) for row in csv.DictReader(f, delimiter="\t")]


def sample(examples: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(examples):
        return examples
    return random.Random(seed).sample(examples, n)


def train_one(
    name: str,
    train,
    eval_,
    steps: int,
    lr: float,
    seed: int,
    settings: Settings,
    out: Path | None = None,
    recipe: dict | None = None,
) -> dict:
    """One training run of method `name`; `recipe`: TrainConfig's recipe fields, else its defaults."""
    from sora_serve.training.train import TrainConfig, minilm_path, train_adapter

    cfg = TrainConfig(
        model=minilm_path(),
        data=train,
        eval_data=eval_,
        task="seq-cls",
        target_modules=["query", "value"],
        steps=steps,
        lr=lr,
        seed=seed,
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        warmup_ratio=settings.warmup_ratio,
        weight_decay=settings.weight_decay,
        progress=False,
        evaluate_before=False,
        out=out,
        force=True,
        **METHODS[name].train_kwargs(),
        **(recipe or {}),
    )
    m = train_adapter(cfg)
    after = m["eval_after"]
    last = m["diagnostics"][-1]
    return {
        "seed": seed,
        "lr": lr,
        "accuracy": after["accuracy"],
        "eval_loss": after["loss"],
        "majority_share": after["majority_share"],
        "final_train_loss": last["loss"],
        "trainable_params": m["trainable_params"],
        "train_time_s": m["train_time_s"],
        "mean_step_time_s": m["mean_step_time_s"],
        "param_groups": m["param_groups"],
        "diagnostics": m["diagnostics"],
        "predictions": after["predictions"],
    }


def held_out_split(examples: list, n: int) -> tuple[list, list]:
    """(n held-out examples, the rest), by a fixed shuffle: what lr sweeps train and score on."""
    shuffled = sample(examples, len(examples), HELD_OUT_SEED)
    return shuffled[:n], shuffled[n:]


def train_all(jobs: dict[str, dict], settings: Settings, pool: Executor, bar) -> dict[str, dict]:
    """train_one for every job (label -> keyword arguments), `workers` at a time; one line per finished run."""
    futures = {pool.submit(train_one, settings=settings, **job): label for label, job in jobs.items()}
    results = {}
    for future in as_completed(futures):
        label, run = futures[future], future.result()
        results[label] = run
        bar.update(1)
        bar.write(f"{label}: accuracy {100 * run['accuracy']:.2f} ({run['train_time_s']:.0f} s training)")
    return results


def sweep_entry(method: str, run: dict) -> dict:
    """One (method, lr, seed) cell of an lr sweep: the scores and the peak adapter diagnostics."""
    peaks = {}
    for key in ("K_norm_max", "orth_error_max", "norm_C_minus_D_max", "d_minus_1_max"):
        values = [d[key] for d in run["diagnostics"] if key in d]
        if values:
            peaks[key] = max(values)
    return {
        "method": method,
        "lr": run["lr"],
        "seed": run["seed"],
        "accuracy": run["accuracy"],
        "eval_loss": run["eval_loss"],
        "majority_share": run["majority_share"],
        "one_class": run["majority_share"] > ONE_CLASS_SHARE,
        "final_train_loss": run["final_train_loss"],
        "param_groups": run["param_groups"],
        **peaks,
    }


def lr_grid(names, lrs, seeds, settings: Settings, sst2_train: list, pool: Executor, bar) -> list[dict]:
    """Every method x lr x seed, trained on SST-2's training set minus a held-out part and scored on it."""
    held_out, rest = held_out_split(sst2_train, settings.sweep_held_out)
    jobs = {
        f"sweep {name} lr {lr:g} seed {seed}": dict(
            name=name, train=rest, eval_=held_out, steps=settings.sst2_steps, lr=lr, seed=seed
        )
        for name in names
        for lr in lrs
        for seed in seeds
    }
    runs = train_all(jobs, settings, pool, bar)
    return [sweep_entry(job["name"], runs[label]) for label, job in jobs.items()]


def best_lrs(grid: list[dict]) -> dict[str, float]:
    """Each method's lr by the one-standard-error rule over the grid's seeds.

    Among the lrs with the fewest one-class seeds (none, unless every lr has some), take the best
    mean held-out accuracy; then choose the lowest lr whose mean is within one standard error (of
    the best lr's seeds) of that best. A higher lr that wins by less than the seed noise is not
    evidence, and it sits nearer the edge where runs stop learning: the 2026-12-05 run took
    first-order SORA's SST-2 best, 1e-2, by 0.4 points (one SE 0.55), and 5 of its 25 Amazon runs
    at 80 steps came out one-class.
    """
    cells: dict[str, dict[float, list[dict]]] = {}
    for e in grid:
        cells.setdefault(e["method"], {}).setdefault(e["lr"], []).append(e)
    return {m: one_standard_error_lr(by_lr) for m, by_lr in cells.items()}


def one_standard_error_lr(by_lr: dict[float, list[dict]]) -> float:
    def mean_accuracy(lr: float) -> float:
        return statistics.mean(e["accuracy"] for e in by_lr[lr])

    def one_class(lr: float) -> int:
        return sum(e["one_class"] for e in by_lr[lr])

    fewest = min(one_class(lr) for lr in by_lr)
    stable = [lr for lr in by_lr if one_class(lr) == fewest]
    best = max(stable, key=lambda lr: (mean_accuracy(lr), -statistics.mean(e["eval_loss"] for e in by_lr[lr])))
    best_accs = [e["accuracy"] for e in by_lr[best]]
    standard_error = statistics.stdev(best_accs) / math.sqrt(len(best_accs)) if len(best_accs) > 1 else 0.0
    return min(lr for lr in stable if mean_accuracy(lr) >= mean_accuracy(best) - standard_error)


def sweep_lr(settings: Settings, sst2_train: list, pool: Executor, bar) -> dict:
    grid = lr_grid(METHODS, settings.sweep_lrs, settings.sweep_seeds, settings, sst2_train, pool, bar)
    return {"source": "this run", "seeds": list(settings.sweep_seeds), "grid": grid, "lr": best_lrs(grid)}


SWEEP_FIELDS = ("sweep_held_out", "sst2_steps", "batch_size", "max_length", "warmup_ratio", "weight_decay")


def sweep_from_grid(path: Path, settings: Settings) -> dict:
    """The lr sweep read from a stability grid (benchmarks/quality_stability.py) run with this suite's
    split, steps, budgets and recipe: refused, naming the field, when any of them differs."""
    from sora_serve.errors import AdapterError

    try:
        grid_run = json.loads(Path(path).read_text())
        grid, theirs = grid_run["grid"], grid_run["settings"]
    except (OSError, ValueError, KeyError) as err:
        raise AdapterError(f"not a stability grid result ({err})", file=path) from None
    ours = {**asdict(settings), "methods": {k: asdict(v) for k, v in METHODS.items()}, "recipe": recipe_defaults()}
    for field in (*SWEEP_FIELDS, "methods", "recipe"):
        if json.loads(json.dumps(theirs.get(field))) != json.loads(json.dumps(ours[field])):
            raise AdapterError(
                f"the grid ran with {theirs.get(field)!r}, this suite with {ours[field]!r}",
                file=path,
                field=f"settings.{field}",
            )
    if {e["method"] for e in grid} != set(METHODS):
        raise AdapterError(
            f"the grid has methods {sorted({e['method'] for e in grid})}, this suite {sorted(METHODS)}",
            file=path,
            field="grid",
        )
    seeds = sorted({e["seed"] for e in grid})
    if len(seeds) < 3 or set(seeds) & set(settings.seeds):
        raise AdapterError(
            f"need at least 3 sweep seeds, none of {list(settings.seeds)}; the grid has {seeds}",
            file=path,
            field="grid",
        )
    return {"source": str(path), "seeds": seeds, "grid": grid, "lr": best_lrs(grid)}


def recipe_defaults() -> dict:
    from sora_serve.training.recipe import Recipe

    return asdict(Recipe())


def paired(a: list[float], b: list[float]) -> dict:
    """Per-seed differences a - b: mean with its 95% CI, std, wins/losses/ties, two-sided sign test and
    paired t-test."""
    diff = [x - y for x, y in zip(a, b)]
    wins, losses = sum(d > 0 for d in diff), sum(d < 0 for d in diff)
    sign_p = float(scipy_stats.binomtest(wins, wins + losses).pvalue) if wins + losses else 1.0
    t = scipy_stats.ttest_rel(a, b) if len(diff) > 1 and statistics.pstdev(diff) > 0 else None
    return {
        "diff": diff,
        "mean": statistics.mean(diff),
        "ci95": list(mean_ci95(diff)),
        "std": statistics.stdev(diff) if len(diff) > 1 else 0.0,
        "wins": wins,
        "losses": losses,
        "ties": len(diff) - wins - losses,
        "sign_p": sign_p,
        "t": None if t is None else float(t.statistic),
        "t_p": None if t is None else float(t.pvalue),
    }


def summarize(runs: list[dict]) -> dict:
    accs = [r["accuracy"] for r in runs]
    return {
        "mean": statistics.mean(accs),
        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "one_class": sum(r["majority_share"] > ONE_CLASS_SHARE for r in runs),
        "train_time_s": statistics.mean(r["train_time_s"] for r in runs),
    }


def task_comparisons(task: dict) -> dict:
    acc = {m: [r["accuracy"] for r in task["runs"][m]] for m in task["runs"]}
    return {f"{a} - {b}": paired(acc[a], acc[b]) for a, b in PAIRS if a in acc and b in acc}


def pooled_comparisons(tasks: dict) -> dict:
    """All (task, seed) pairs together: the Amazon mean alone would hide per-domain signs."""
    out = {}
    for a, b in PAIRS:
        xs = [r["accuracy"] for t in tasks.values() for r in t["runs"].get(a, [])]
        ys = [r["accuracy"] for t in tasks.values() for r in t["runs"].get(b, [])]
        if xs and len(xs) == len(ys):
            out[f"{a} - {b}"] = paired(xs, ys)
    return out


def run_round(
    seed: int, tasks: dict, data: dict, lrs: dict, settings: Settings, pool: Executor, bar, keep_root: Path
) -> None:
    """Every task and method for one seed; seed 0 of SERVED on Amazon is saved for the serving check."""
    kept = {task for task in data if task in settings.domains and seed == settings.seeds[0]}
    jobs = {
        (task, name): dict(
            name=name,
            train=train,
            eval_=eval_,
            steps=steps,
            lr=lrs[name],
            seed=seed,
            out=keep_root / task if task in kept and name == SERVED else None,
        )
        for task, (train, eval_, steps) in data.items()
        for name in METHODS
    }
    runs = train_all({f"seed {seed} {task} {name}": job for (task, name), job in jobs.items()}, settings, pool, bar)
    for task, name in jobs:  # in a fixed order, whatever order the workers finished in
        run = runs[f"seed {seed} {task} {name}"]
        if not (task in kept and name == SERVED):
            run.pop("predictions")
        tasks[task]["runs"][name].append(run)
    for task in tasks.values():
        task["summary"] = {m: summarize(r) for m, r in task["runs"].items()}
        task["paired"] = task_comparisons(task)


def serve_domains_together(
    adapters: dict[str, Path], evals: dict[str, list], settings: Settings, train_predictions: dict
) -> dict:
    """All domain adapters in one model; one mixed batch stream vs each adapter alone."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import sora_serve as ss
    from sora_serve.training.train import HEAD_FILE, minilm_path

    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    heads = {}
    for domain, path in adapters.items():
        ss.load_adapter(model, path, name=domain)
        head = torch.nn.Linear(model.config.hidden_size, 2)
        head.load_state_dict({k.split(".", 1)[1]: v for k, v in load_file(str(path / HEAD_FILE)).items()})
        heads[domain] = head.eval()

    def encode(texts):
        return tokenizer(
            texts, padding="max_length", truncation=True, max_length=settings.max_length, return_tensors="pt"
        )

    @torch.no_grad()
    def predict_alone(domain: str, texts: list[str]) -> list[int]:
        """The plain forward: one active adapter, the domain's head in place of the classifier."""
        ss.set_active_adapter(model, domain)
        model.classifier = heads[domain]
        return model(**encode(texts)).logits.argmax(-1).tolist()

    @torch.no_grad()
    def predict_mixed(rows: list[tuple[str, str]]) -> list[int]:
        """rows: (domain, text); one encoder pass, each row its own adapter, then its own head."""
        with ss.use_adapters(model, [d for d, _ in rows]):
            pooled = model.bert(**encode([t for _, t in rows])).pooler_output
        return [heads[d](pooled[i]).argmax().item() for i, (d, _) in enumerate(rows)]

    alone = {
        d: [p for i in range(0, len(ex), 32) for p in predict_alone(d, [t for t, _ in ex[i : i + 32]])]
        for d, ex in evals.items()
    }
    mixed_rows = [
        (d, i) for i in range(max(map(len, evals.values()))) for d in evals if i < len(evals[d])
    ]  # interleaved
    mixed = {d: [None] * len(evals[d]) for d in evals}
    start = time.perf_counter()
    for b in range(0, len(mixed_rows), 32):
        chunk = mixed_rows[b : b + 32]
        for (d, i), p in zip(chunk, predict_mixed([(d, evals[d][i][0]) for d, i in chunk])):
            mixed[d][i] = p
    mixed_time = time.perf_counter() - start
    out = {}
    for domain, examples in evals.items():
        labels = [y for _, y in examples]
        out[domain] = {
            "accuracy_mixed": sum(p == y for p, y in zip(mixed[domain], labels)) / len(labels),
            "accuracy_alone": sum(p == y for p, y in zip(alone[domain], labels)) / len(labels),
            "predictions_equal": mixed[domain] == alone[domain],
            "predictions_differing": sum(p != q for p, q in zip(mixed[domain], alone[domain])),
            "agreement_with_training_eval": sum(p == q for p, q in zip(alone[domain], train_predictions[domain]))
            / len(labels),
        }
    return {
        "method": SERVED,
        "adapters": len(adapters),
        "rows": len(mixed_rows),
        "batch": 32,
        "mixed_time_s": mixed_time,
        "domains": out,
    }


def quiet_transformers() -> None:
    """Hundreds of model loads: keep the log to one line per run (no load reports or bars)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def init_worker() -> None:
    """A training worker: quiet, and one intra-op thread. Workers run side by side on every core, and
    a second thread per process on oversubscribed cores made each step ~4x slower (torch spins)."""
    import torch

    quiet_transformers()
    torch.set_num_threads(1)


def write_partial(payload: dict, out_dir: Path) -> None:
    """The results so far, so a run stopped late still leaves its finished rounds (and can resume)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"{PARTIAL}.tmp"
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(out_dir / PARTIAL)


def resume_from_partial(payload: dict, out_dir: Path) -> int:
    """Continue a stopped run with the same settings: take its lr sweep and its complete seed rounds
    (and the saved serving adapters) into `payload`; returns how many rounds are done (0: start afresh)."""
    from sora_serve.training.train import HEAD_FILE

    path = out_dir / PARTIAL
    if not path.is_file():
        return 0
    old = json.loads(path.read_text())
    comparable = ("workers", "torch_threads")
    same = json.loads(json.dumps({k: v for k, v in payload["settings"].items() if k not in comparable}))
    if (
        old.get("quick") != payload["quick"]
        or {k: v for k, v in old["settings"].items() if k not in comparable} != same
    ):
        return 0
    done = min(len(runs) for task in old["tasks"].values() for runs in task["runs"].values())
    if done == 0 or not all(
        (out_dir / "quality-adapters" / d / HEAD_FILE).is_file() for d in payload["settings"]["domains"]
    ):
        return 0
    payload["lr_sweep"] = old["lr_sweep"]
    for name, task in old["tasks"].items():
        payload["tasks"][name]["runs"] = {m: runs[:done] for m, runs in task["runs"].items()}
    payload["runtime_before_resume_s"] = old.get("runtime_s", 0.0)
    payload["resumed"] = {"from_rounds": done, "previous_runtime_s": old.get("runtime_s")}
    return done


def run(quick: bool, out_dir: Path | None = None, lr_from: Path | None = None) -> Path | None:
    if not (SST2 / "dev.tsv").is_file() or not AMAZON.is_dir():
        print(f"quality suite skipped: SST-2 or the Amazon reviews not found under {SHARED_DATA}")
        return None
    settings = QUICK if quick else FULL
    out_dir = Path(out_dir or RESULTS)
    quiet_transformers()
    started = time.perf_counter()
    sst2_train = read_tsv(SST2 / "train_full.tsv")
    sweep = None if lr_from is None else sweep_from_grid(lr_from, settings)  # a bad file fails before any training
    sweep_runs = 0 if sweep else len(METHODS) * len(settings.sweep_lrs) * len(settings.sweep_seeds)
    n_runs = sweep_runs + len(METHODS) * len(settings.seeds) * (1 + len(settings.domains))
    import torch

    payload = {
        "quick": quick,
        "settings": {
            **asdict(settings),
            "scale": SCALE,
            "methods": {k: asdict(v) for k, v in METHODS.items()},
            "recipe": recipe_defaults(),
            "torch_threads": torch.get_num_threads(),
        },
    }
    data = {"sst2": (sst2_train, sample(read_tsv(SST2 / "dev.tsv"), settings.sst2_eval, 0), settings.sst2_steps)}
    for domain in settings.domains:
        data[domain] = (
            read_tsv(AMAZON / domain / "train.tsv"),
            sample(read_tsv(AMAZON / domain / "test-labeled.tsv"), settings.amazon_eval, 0),
            settings.amazon_steps,
        )
    tasks = payload["tasks"] = {
        t: {"steps": steps, "n_eval": len(ev), "runs": {m: [] for m in METHODS}} for t, (_, ev, steps) in data.items()
    }
    keep_root = out_dir / "quality-adapters"  # seed 0 of SERVED per domain, for the serving check
    payload["settings"]["workers"] = workers = int(os.environ.get(WORKERS_ENV, "1"))
    done = resume_from_partial(payload, out_dir)
    if done:
        print(f"resuming {out_dir / PARTIAL}: lr sweep and {done} seed round(s) already done")
    with (
        tqdm(total=n_runs, initial=done and sweep_runs + done * len(METHODS) * len(data), desc="quality runs") as bar,
        ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=init_worker) as pool,
    ):
        if not done:
            payload["lr_sweep"] = sweep or sweep_lr(settings, sst2_train, pool, bar)
        lrs = payload["lr_sweep"]["lr"]
        for seed in settings.seeds[done:]:  # seed-major: a run stopped late keeps whole rounds of every task
            run_round(seed, tasks, data, lrs, settings, pool, bar, keep_root)
            payload["runtime_s"] = payload.get("runtime_before_resume_s", 0.0) + time.perf_counter() - started
            write_partial(payload, out_dir)
    evals = {d: data[d][1] for d in settings.domains}
    train_predictions = {d: tasks[d]["runs"][SERVED][0].pop("predictions") for d in settings.domains}
    payload["serving"] = serve_domains_together(
        {d: keep_root / d for d in settings.domains}, evals, settings, train_predictions
    )
    payload["pooled_paired"] = pooled_comparisons(tasks)
    payload["amazon_paired"] = pooled_comparisons({d: tasks[d] for d in settings.domains})
    payload["runtime_s"] = payload.get("runtime_before_resume_s", 0.0) + time.perf_counter() - started
    result = save_suite(
        "quality", payload, markdown(payload, settings), {"accuracy": accuracy_figure(payload)}, out_dir
    )
    (out_dir / PARTIAL).unlink()  # finished: a later run starts afresh
    return result


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def markdown(payload: dict, settings: Settings) -> str:
    tasks = payload["tasks"]
    names = list(METHODS)
    first = tasks["sst2"]["runs"]
    lines = [
        f"all-MiniLM-L6-v2, adapters on query/value in all 6 layers, s = alpha/r = {SCALE:g} for every method, "
        f"{'quick (smoke) mode' if payload['quick'] else 'full mode'}, {len(settings.seeds)} seeds, total runtime "
        f"{payload['runtime_s'] / 60:.1f} min ({payload['settings']['torch_threads']} torch thread(s)).",
        "",
        "| method | trainable params (incl. head) | lr (sweep) | "
        + " | ".join(tasks)
        + " | Amazon mean | train time / run (s) | one-class runs |",
        "| --- | --- | --- | " + " | ".join("---" for _ in tasks) + " | --- | --- | --- |",
    ]
    for m in names:
        cells = [f"{pct(t['summary'][m]['mean'])} ± {pct(t['summary'][m]['std'])}" for t in tasks.values()]
        amazon = [
            statistics.mean(tasks[d]["runs"][m][i]["accuracy"] for d in settings.domains)
            for i in range(len(settings.seeds))
        ]
        amazon_cell = (
            f"{pct(statistics.mean(amazon))} ± {pct(statistics.stdev(amazon))}" if len(amazon) > 1 else pct(amazon[0])
        )
        time_per_run = statistics.mean(t["summary"][m]["train_time_s"] for t in tasks.values())
        one_class = sum(t["summary"][m]["one_class"] for t in tasks.values())
        lines.append(
            f"| {m} | {first[m][0]['trainable_params']:,} | {payload['lr_sweep']['lr'][m]:g} | "
            + " | ".join(cells)
            + f" | {amazon_cell} | {time_per_run:.1f} | {one_class} |"
        )
    lines += [
        "",
        "Accuracy in % (mean ± std over seeds). Amazon mean: per seed, the mean over the five domains; "
        "then mean ± std over seeds.",
        "One-class runs: > 95% of the eval predictions in one class, either a collapse (train loss back at ln 2 after "
        "having learned) or a run that has not left chance yet (its diagnostics in the JSON tell which).",
        f"Steps: SST-2 {settings.sst2_steps}, Amazon {settings.amazon_steps} per domain; batch "
        f"{settings.batch_size}, max "
        f"{settings.max_length} tokens. Eval: SST-2 dev ({tasks['sst2']['n_eval']} sentences), Amazon "
        f"{settings.amazon_eval} random test reviews per domain.",
        "",
        "Paired per seed (accuracy points, a - b): mean of the difference [its 95% confidence interval], "
        "wins/losses, two-sided sign test p, paired t-test p.",
        "",
        "| comparison | SST-2 | Amazon (all domains × seeds) | all tasks × seeds |",
        "| --- | --- | --- | --- |",
    ]

    def cell(p: dict) -> str:
        t_p = "n/a" if p["t_p"] is None else f"{p['t_p']:.3f}"
        low, high = p["ci95"]
        return (
            f"{100 * p['mean']:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}], {p['wins']}/{p['losses']}, sign p "
            f"{p['sign_p']:.3f}, t p {t_p}"
        )

    for key in payload["pooled_paired"]:
        lines.append(
            f"| {key} | {cell(tasks['sst2']['paired'][key])} | {cell(payload['amazon_paired'][key])} | "
            f"{cell(payload['pooled_paired'][key])} |"
        )
    sweep = payload["lr_sweep"]
    lines += [
        "",
        f"lr sweep (trained on SST-2's training set minus {settings.sweep_held_out} held-out sentences, "
        "scored on those; "
        f"seeds {sweep['seeds']}; from {sweep['source']}): mean held-out accuracy % per lr (one-class runs); "
        "chosen: the lowest lr within one standard error of the best mean among the lrs with the fewest "
        "one-class runs (`best_lrs`)",
        "",
        "| method | " + " | ".join(f"{lr:g}" for lr in settings.sweep_lrs) + " | chosen |",
        "| --- | " + " | ".join("---" for _ in settings.sweep_lrs) + " | --- |",
    ]
    for m in METHODS:
        row = []
        for lr in settings.sweep_lrs:
            runs = [e for e in sweep["grid"] if e["method"] == m and e["lr"] == lr]
            row.append(
                f"{pct(statistics.mean(e['accuracy'] for e in runs))} ({sum(e['one_class'] for e in runs)})"
                if runs
                else "–"
            )
        lines.append(f"| {m} | " + " | ".join(row) + f" | {sweep['lr'][m]:g} |")
    serving = payload["serving"]
    lines += [
        "",
        f"Served together: {serving['adapters']} {serving['method']} adapters (one per Amazon domain, seed "
        f"{settings.seeds[0]}) in one "
        f"model, {serving['rows']} rows in mixed batches of {serving['batch']} (eager runtime, "
        "`use_adapters`, each row its own head):",
        "",
        "| domain | accuracy mixed batch | accuracy adapter alone | predictions equal (differing) |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {d} | {pct(v['accuracy_mixed'])} | {pct(v['accuracy_alone'])} | {v['predictions_equal']} "
        f"({v['predictions_differing']}) |"
        for d, v in serving["domains"].items()
    ]
    lines += ["", "vLLM does not serve BERT encoders with LoRA adapters, so this check uses the eager runtime only."]
    return "\n".join(lines)


def accuracy_figure(payload: dict) -> plt.Figure:
    tasks = list(payload["tasks"])
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(tasks)), 4))
    width = 0.8 / len(METHODS)
    for i, m in enumerate(METHODS):
        xs = [j + (i - (len(METHODS) - 1) / 2) * width for j in range(len(tasks))]
        means = [100 * payload["tasks"][t]["summary"][m]["mean"] for t in tasks]
        stds = [100 * payload["tasks"][t]["summary"][m]["std"] for t in tasks]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=m)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("accuracy (%), mean ± std over seeds")
    ax.set_title("all-MiniLM-L6-v2, matched budgets")
    low = min(100 * s["mean"] for t in payload["tasks"].values() for s in t["summary"].values())
    ax.set_ylim(max(0, math.floor(low / 5) * 5 - 5), 100)
    ax.legend(fontsize=7, ncol=len(METHODS))
    return fig
