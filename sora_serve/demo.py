"""`make demo`: the main job end to end on an embedded default (no model hub needed).

1. builds a small Llama-architecture checkpoint locally (random init, local BPE tokenizer);
2. trains LoRA, DoRA (through PEFT), Pre-Diag and SORA (ours) on built-in text, same loop;
3. serves all four plus the base from one model in a mixed batch and checks each row;
4. folds the SORA adapter into a merged checkpoint and measures the logit error;
5. exports ONNX twice: the merged model, and one graph with the four adapters switchable;
6. serves base + the four adapters from one vLLM engine in one mixed batch, checked against eager;
7. rewrites a d = 1 SORA adapter as an exact plain PEFT LoRA.
Outputs go to ./out/demo (override with --out or SORA_DEMO_DIR). Quiet by default: tables and
verdicts only; `--verbose` (`make demo DEMO_ARGS=--verbose`) shows every library's logs and bars.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from transformers import AutoModelForCausalLM

import sora_serve as ss
from sora_serve.converters.fold import fold_adapter
from sora_serve.converters.onnx_export import export_onnx
from sora_serve.converters.to_lora import to_lora
from sora_serve.tiny import BUILTIN_TEXT, make_tiny_checkpoint
from sora_serve.training.train import TrainConfig, train_adapter

RUNS = {
    "lora": dict(method="lora"),
    "dora": dict(method="dora"),
    "prediag": dict(method="prediag"),
    "sora": dict(method="sora", rotation="cayley"),
}


# Wide enough that no table of the demo is cut or wrapped when the output is piped or saved.
PLAIN_WIDTH = 200


def make_console(file=None) -> Console:
    """rich's console for a terminal; for a pipe or file, a wide one with no colour codes, so
    tables are never cut at 80 columns (rich's default width off a terminal)."""
    console = Console(file=file)
    if console.is_terminal:
        return console
    return Console(file=file, width=PLAIN_WIDTH, no_color=True, highlight=False)


def new_table(title: str, console: Console) -> Table:
    """A table with box-drawing borders on a terminal and ASCII ones elsewhere (any encoding reads them)."""
    return Table(title=title, box=box.HEAVY_HEAD if console.is_terminal else box.ASCII)


def quiet_libraries() -> None:
    """Only errors from vLLM (its engine process inherits the level through the environment), and
    from transformers and PEFT; no library progress bars or deprecation notices."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # vLLM's engine runs in a child process: these reach it through the environment.
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def train_all(base: Path, root: Path, console: Console, verbose: bool) -> dict[str, dict]:
    results = {}
    for name, kwargs in RUNS.items():
        cfg = TrainConfig(
            model=base,
            data=BUILTIN_TEXT * 8,
            out=root / name,
            steps=40,
            lr=3e-3,
            r=8,
            force=True,
            progress=verbose,
            **kwargs,
        )
        results[name] = train_adapter(cfg)
    table = new_table("trained adapters (tiny Llama, built-in text, 40 steps each)", console)
    for column in ("adapter", "trainable params", "eval loss before", "eval loss after", "ms / step"):
        table.add_column(column, justify="right")
    for name, m in results.items():
        table.add_row(
            name,
            f"{m['trainable_params']:,}",
            f"{m['eval_before']['loss']:.4f}",
            f"{m['eval_after']['loss']:.4f}",
            f"{1000 * m['mean_step_time_s']:.1f}",
        )
    console.print(table)
    return results


@torch.no_grad()
def mixed_batch_check(base: Path, root: Path, console: Console) -> float:
    """One model, five rows: base and each adapter; each row must equal its adapter alone."""
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    for name in RUNS:
        ss.load_adapter(model, root / name, name=name)
    rows = [None, *RUNS]
    ids = torch.randint(1, model.config.vocab_size, (len(rows), 16), generator=torch.Generator().manual_seed(0))
    with ss.use_adapters(model, rows):
        mixed = model(ids).logits
    worst = 0.0
    for i, name in enumerate(rows):
        ss.set_active_adapter(model, name)
        worst = max(worst, (model(ids[i : i + 1]).logits[0] - mixed[i]).abs().max().item())
    console.print(escape(f"mixed batch [base, {', '.join(RUNS)}]: max |row - adapter alone| = {worst:.2e}"))
    return worst


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sora_serve.demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("SORA_DEMO_DIR", "out/demo")),
        help="where every output goes (default: $SORA_DEMO_DIR or out/demo)",
    )
    parser.add_argument("--verbose", action="store_true", help="show vLLM's, transformers' and PEFT's logs and bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.verbose:
        quiet_libraries()
    console = make_console(sys.stdout)
    root = args.out.absolute()
    start = time.perf_counter()
    base = make_tiny_checkpoint(
        "llama", root / "base", max_shard_size="1MB", hidden_size=256, intermediate_size=512, num_layers=4
    )
    console.print(f"built a 4-layer Llama (hidden 256) with a local tokenizer at {base}")
    train_all(base, root / "adapters", console, args.verbose)
    mixed_batch_check(base, root / "adapters", console)
    folded = fold_adapter(base, root / "adapters" / "sora", root / "merged-sora", force=True, progress=args.verbose)
    console.print(
        f"folded SORA (cayley) into {folded['out_dir']}: {folded['layers']} layers, {folded['shards']} "
        f"shards, max logit error {folded['max_abs_error']:.2e}"
    )
    merged_onnx = export_onnx(root / "merged-sora", root / "onnx-merged", force=True)
    console.print(
        f"ONNX (merged SORA, KV cache): max logit error vs PyTorch {merged_onnx['max_abs_error']['base']:.2e}"
    )
    switchable = export_onnx(base, root / "onnx-adapters", [root / "adapters" / n for n in RUNS], force=True)
    errors = ", ".join(f"{k} {v:.1e}" for k, v in switchable["max_abs_error"].items())
    console.print(f"ONNX (one graph, .onnx_adapter per adapter): max logit error vs PyTorch: {errors}")
    vllm_mixed_batch(base, root / "adapters", console, args.verbose)
    exact = exact_lora_rewrite(base, root, args.verbose)
    console.print(f"SORA with d = 1 as a plain PEFT LoRA of rank {exact['rank']}: exact, written to {exact['out_dir']}")
    console.print(f"[bold green]demo finished in {time.perf_counter() - start:.0f} s[/]; outputs under {root}")


def vllm_mixed_batch(base: Path, adapters: Path, console: Console, verbose: bool) -> None:
    """Base + the four kinds in one vLLM batch (through the plugin), each row checked against eager."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from sora_serve.vllm_plugin.engine import make_llm

    rows = [None, *RUNS]
    prompt = [5, 17, 99, 23, 4, 61]
    llm = make_llm(base, max_loras=4, max_lora_rank=16, use_tqdm_on_load=verbose)
    requests = [None if n is None else LoRARequest(n, i + 1, str(adapters / n)) for i, n in enumerate(rows)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": prompt}] * len(rows), params, lora_request=requests, use_tqdm=False)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    for name in RUNS:
        ss.load_adapter(model, adapters / name, name=name)
    with torch.no_grad(), ss.use_adapters(model, rows):
        ids = torch.tensor([prompt] * len(rows))
        eager = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12, do_sample=False
        )[:, len(prompt) :]
    table = new_table("vLLM (one engine, one mixed batch, sora-serve plugin) vs eager runtime", console)
    for column in ("request", "vLLM tokens", "same as eager"):
        table.add_column(column)
    for name, out, ref in zip(rows, outputs, eager.tolist()):
        tokens = list(out.outputs[0].token_ids)
        table.add_row(name or "base", " ".join(map(str, tokens)), "yes" if tokens == ref else "[red]NO[/]")
    console.print(table)
    del llm


def exact_lora_rewrite(base: Path, root: Path, verbose: bool) -> dict:
    """Pre-Diag/SORA with d = 1 on a base without biases is exactly a LoRA of rank r + 2 r_p."""
    model = AutoModelForCausalLM.from_pretrained(base)
    ss.attach(
        model,
        ss.AdapterConfig(method="sora", rotation="cayley", r=8, r_p=4, target_modules=["q_proj", "v_proj"]),
        "d1",
        verbose=False,
    )
    with torch.no_grad():
        for _, layer in ss.adapted_layers(model):
            layer.adapters["d1"].lora_B.normal_(0, 0.02)
            layer.adapters["d1"].sora_D.normal_(0, 0.05)
    ss.save_adapter(model, root / "adapters" / "sora-d1", "d1", force=True)
    return to_lora(base, root / "adapters" / "sora-d1", root / "sora-d1-as-lora", force=True, progress=verbose)


if __name__ == "__main__":
    main()
