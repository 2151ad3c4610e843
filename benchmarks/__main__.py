"""`python -m benchmarks {serving,training,quality,all,readme} [--quick] [--shape small|realistic] [--out DIR]`
`[--peers llama.cpp]`;
`--help` for each option."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

SUITES = ("serving", "training", "quality")
PEERS = ("llama.cpp",)  # benchmarks.online.PEERS, named here so that --help stays fast


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("suite", choices=[*SUITES, "all", "readme"])
    parser.add_argument("--quick", action="store_true", help="small settings (each suite < 5 min on 2 cores)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default ./results)")
    parser.add_argument(
        "--shape",
        choices=["small", "realistic"],
        default=None,
        help="serving suite only: model shape (default: realistic, small with --quick)",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="FILE",
        help="serving suite only: reuse the finished sections saved in FILE (serving-sections-*.json) by a cut-off run",
    )
    parser.add_argument(
        "--peers",
        nargs="+",
        choices=PEERS,
        default=[],
        help="serving suite only: servers the online load test also runs beside ours and stock vLLM "
        "(llama.cpp: built once from the pinned llama-cpp-python sdist, needs cmake, ninja and a C++ compiler)",
    )
    parser.add_argument(
        "--device", default="cpu", help="training suite only: torch device to train on, e.g. cuda (default cpu)"
    )
    parser.add_argument(
        "--lr-from",
        type=Path,
        default=None,
        metavar="FILE",
        help="quality suite only: each method's lr from a stability grid (quality-stability*.json) run with the "
        "same split, steps and recipe, instead of the suite's own sweep",
    )
    args = parser.parse_args()
    if args.suite == "readme":
        from .readme import print_headline

        print_headline(args.out)
        return
    for suite in SUITES if args.suite == "all" else (args.suite,):
        options = {
            "training": {"device": args.device},
            "serving": {"shape": args.shape, "resume": args.resume, "peers": tuple(args.peers)},
            "quality": {"lr_from": args.lr_from},
        }.get(suite, {})
        importlib.import_module(f"benchmarks.{suite}").run(args.quick, args.out, **options)


if __name__ == "__main__":
    main()
