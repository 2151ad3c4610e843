"""The fused op alone, per decoder layer at the realistic shape, from decode to prefill row counts.

    python -m benchmarks.fused_op [--rows 8 32 128 1024] [--rounds 4] [--against CHECKOUT] [--out results]

One slot on every row, bf16, one thread (vLLM CPU's worker on this 2-core machine), random
factors of the suite's adapters: r = 16 on the 7 projections; SORA with r_p = 4 (a rotation of
rank 8), a scale and a shift. A sample is the op's time on each projection of one decoder layer
(median of `CALLS` calls, the base output restored between calls, outside the timing), summed,
times the number of layers: the op's share of a step, not counting Python's way to it (that is in
`benchmarks.profile_step`). Warm caches: in an engine the op runs after a base GEMM has streamed
the layer's weights through them.

`--against` times another checkout's op in the same rounds, each checkout in its own process
(its `sora_serve` imported from a mirror of it, its extension built in its own directory), the
order reversed every other round, as this VM's speed drifts by more than the change looked for;
the report gives this/other per round. Writes fused-op.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
CALLS = 15
RANK, ROTATION_RANK = 16, 8
KINDS = {"lora": (0, False), "sora": (ROTATION_RANK, True)}  # kind: (rotation rank, scale and shift)


PACKED = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


def packed_layers(projections: dict[str, tuple[int, int]]) -> dict[str, tuple[int, list[int]]]:
    """vLLM's packed layers of a Llama decoder layer from `Shape.projections()`: (input width, slices)."""
    return {name: (projections[parts[0]][0], [projections[p][1] for p in parts]) for name, parts in PACKED.items()}


def random_slot(fused, in_features: int, widths: list[int], rotation_rank: int, scaled: bool, generator):
    import torch

    def randn(*shape, std=0.02):
        return (std * torch.randn(*shape, generator=generator)).to(torch.bfloat16)

    slices, out = len(widths), sum(widths)
    k = rotation_rank * slices
    bt, u = randn(RANK * slices, out), randn(out, k)
    return fused.FusedSlot(
        randn(RANK * slices, in_features),
        bt,
        u,
        randn(k, out),
        (bt.float() @ u.float()).to(torch.bfloat16),
        [RANK] * slices,
        [rotation_rank] * slices,
        widths,
        (1 + randn(out, std=0.1).float()).to(torch.bfloat16) if scaled else None,
        randn(out, std=0.1) if scaled else None,
    )


def worker(config: dict) -> None:
    """One sample per (rows, kind): the op's ms per step, per projection and summed."""
    import torch

    from sora_serve.vllm_plugin.backends import fused

    torch.set_num_threads(1)
    if fused.op() is None:
        raise SystemExit("the fused op cannot run on this machine (see the log above)")
    generator = torch.Generator().manual_seed(0)
    layers = packed_layers(config["projections"])
    results = []
    for rows in config["rows"]:
        for kind, (rotation_rank, scaled) in KINDS.items():
            per_projection = {}
            for name, (in_features, widths) in layers.items():
                slot = random_slot(fused, in_features, widths, rotation_rank, scaled, generator)
                lists = fused.slot_lists([(None, slot)])
                x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
                base = torch.randn(rows, sum(widths), generator=generator).to(torch.bfloat16)
                y, times = base.clone(), []
                for _ in range(CALLS):
                    y.copy_(base)
                    start = time.perf_counter()
                    fused.run_slots(x, y, lists)
                    times.append(time.perf_counter() - start)
                per_projection[name] = 1e3 * statistics.median(times) * config["layers"]
            results.append({"rows": rows, "kind": kind, "ms": sum(per_projection.values()), "parts": per_projection})
    print("RESULT " + json.dumps(results), flush=True)


def sample(checkout: Path, config: dict, work: Path, label: str) -> list[dict]:
    """One worker run with `checkout`'s op (this file's worker, that checkout's sora_serve)."""
    from .serving import checkout_mirror

    root = checkout if checkout == HERE else checkout_mirror(checkout, work)
    path = work / f"fused-op-{label}.json"
    path.write_text(json.dumps(config))
    run = f"runpy.run_path({str(Path(__file__).resolve())!r}, run_name='__main__')"
    env = {**os.environ, "PYTHONPATH": str(root), "TORCH_EXTENSIONS_DIR": str(work / f"torch-extensions-{label}")}
    done = subprocess.run(
        # run by path without its folder on sys.path (its modules' names would shadow others)
        [sys.executable, "-c", f"import runpy, sys; sys.argv[1:] = ['--worker', {str(path)!r}]; {run}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
    )
    line = next((t for t in done.stdout.splitlines() if t.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"fused-op worker ({label}: {checkout}) failed:\n{done.stderr[-4000:]}")
    return json.loads(line[len("RESULT ") :])


def measure(args, work: Path) -> dict:
    from tqdm import tqdm

    from .common import machine
    from .shapes import SHAPES

    shape = SHAPES["realistic"]
    config = {
        "rows": args.rows,
        "projections": shape.projections(),
        "layers": shape.num_layers,
    }
    checkouts = {"this": HERE} | ({"other": args.against.resolve()} if args.against else {})
    rounds = []
    for i in tqdm(range(args.rounds), desc="fused-op rounds"):
        order = list(checkouts) if i % 2 == 0 else list(reversed(checkouts))
        rounds.append({"order": order} | {label: sample(checkouts[label], config, work, label) for label in order})
    return {
        "timestamp": time.strftime("%Y%m%d-%H%M%S"),
        "machine": machine(),
        "shape": "realistic",
        "config": config,
        "other": str(args.against) if args.against else None,
        "rounds": rounds,
    }


def markdown(payload: dict) -> str:
    keys = [(r["rows"], r["kind"]) for r in payload["rounds"][0]["this"]]

    def ms(label: str, key: tuple) -> list[float]:
        return [next(r["ms"] for r in rnd[label] if (r["rows"], r["kind"]) == key) for rnd in payload["rounds"]]

    head = "| rows | adapter | this checkout, ms per step |"
    if payload["other"]:
        head += " other checkout, ms per step | this / other per round |"
    lines = [
        f"The fused op alone, ms per step ({payload['config']['layers']} decoder layers, realistic shape, bf16, "
        f"1 thread; median of {len(payload['rounds'])} rounds; {payload['machine']['cpu']}"
        + (f"; other: `{payload['other']}`" if payload["other"] else "")
        + "):",
        "",
        head,
        "| --- " * (head.count("|") - 1) + "|",
    ]
    for key in keys:
        row = f"| {key[0]} | {key[1]} | {statistics.median(ms('this', key)):.1f} |"
        if payload["other"]:
            per_round = [t / o for t, o in zip(ms("this", key), ms("other", key))]
            row += f" {statistics.median(ms('other', key)):.1f} | {' / '.join(f'{r:.2f}' for r in per_round)} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32, 128, 1024], help="tokens per call")
    parser.add_argument("--rounds", type=int, default=4, help="rounds (default 4)")
    parser.add_argument("--against", type=Path, help="another checkout of this repository (e.g. a git worktree)")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker.read_text()))
        return
    if min(args.rows) < 1:
        parser.error(f"--rows: every row count must be at least 1, got {min(args.rows)}")
    if args.against and not (args.against / "sora_serve" / "vllm_plugin" / "backends" / "fused.py").is_file():
        parser.error(f"--against: {args.against} is not a checkout of this repository with the fused op")
    args.out.mkdir(parents=True, exist_ok=True)
    payload = measure(args, args.out.absolute())
    (args.out / "fused-op.json").write_text(json.dumps(payload, indent=1) + "\n")
    (args.out / "fused-op.md").write_text(markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
