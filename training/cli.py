"""`sora-serve train`: the command-line face of `training.train.train_adapter`."""

from __future__ import annotations

import argparse

from sora_serve.config import ROTATIONS
from sora_serve.methods import METHOD_CLASSES

from .recipe import Recipe
from .train import TASKS, TrainConfig, train_adapter


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face model directory (the base)")
    parser.add_argument(
        "--data", required=True, help="training data: .jsonl (text[, label]), .tsv/.csv with a header, or plain text"
    )
    parser.add_argument("--method", required=True, choices=tuple(METHOD_CLASSES))
    parser.add_argument("--out", required=True, help="adapter directory to write (with metrics.json)")
    parser.add_argument("--task", default="causal-lm", choices=TASKS)
    parser.add_argument("--eval-data", help="evaluation data (default: 10%% held out from --data)")
    parser.add_argument("--r", type=positive_int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--alpha", type=positive_float, default=16.0, help="LoRA alpha; s = alpha / r (default 16)")
    parser.add_argument("--r-p", type=positive_int, default=4, help="SORA rotation rank (default 4)")
    parser.add_argument("--s0", type=positive_float, default=1.0, help="SORA s_p numerator (default 1)")
    parser.add_argument(
        "--rotation",
        default="cayley",
        choices=ROTATIONS,
        help="sora: cayley (exactly orthogonal, stable; default) or first_order (the paper's I + K; "
        "not orthogonal, can diverge at high lr)",
    )
    parser.add_argument(
        "--target-modules", default="all-linear", help="comma-separated module-name suffixes, or all-linear"
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, help="optimizer steps")
    length.add_argument("--epochs", type=positive_float, default=1.0, help="epochs over --data (default 1)")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="base learning rate (default 1e-3)")
    parser.add_argument(
        "--diag-lr-scale",
        type=positive_float,
        default=Recipe.diag_lr_scale,
        help=f"pre-diag/sora: the diagonal d trains at lr times this (default {Recipe.diag_lr_scale:g})",
    )
    parser.add_argument(
        "--rotation-lr-scale",
        type=positive_float,
        default=Recipe.rotation_lr_scale,
        help=f"sora: the rotation's C and D train at lr times this (default {Recipe.rotation_lr_scale:g})",
    )
    parser.add_argument(
        "--single-lr",
        action="store_true",
        help="every parameter at --lr, as the paper's code trains (ignores the two scales above)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--max-length", type=positive_int, default=64, help="tokens per example (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", default="auto", help="torch device, e.g. cpu, cuda, cuda:1 (default: CUDA when available)"
    )
    parser.add_argument(
        "--recompute-base",
        action="store_true",
        help="pre-diag/sora: recompute W0 x in backward instead of storing it (activation memory of LoRA, one "
        "more GEMM per layer)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --out")


def run(args: argparse.Namespace) -> None:
    targets = (
        args.target_modules if args.target_modules == "all-linear" else [t for t in args.target_modules.split(",") if t]
    )
    cfg = TrainConfig(
        model=args.model,
        data=args.data,
        method=args.method,
        out=args.out,
        task=args.task,
        eval_data=args.eval_data,
        r=args.r,
        lora_alpha=args.alpha,
        r_p=args.r_p,
        s0=args.s0,
        rotation=args.rotation,
        target_modules=targets,
        steps=args.steps,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        force=args.force,
        device=args.device,
        recompute_base=args.recompute_base,
        diag_lr_scale=args.diag_lr_scale,
        rotation_lr_scale=args.rotation_lr_scale,
        single_lr=args.single_lr,
    )
    metrics = train_adapter(cfg)
    before, after = metrics["eval_before"], metrics["eval_after"]
    summary = ", ".join(f"eval {k} {before[k]:.4f} -> {after[k]:.4f}" for k in ("loss", "accuracy") if k in after)
    print(
        f"{args.method}: {metrics['trainable_params']:,} trainable params, {metrics['steps']} steps, "
        f"{summary}; wrote {args.out}"
    )
