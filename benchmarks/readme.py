"""Print the README's headline table from the latest results."""

from __future__ import annotations

import json
from pathlib import Path

from .common import RESULTS


def print_headline(out_dir: Path | None = None) -> None:
    out_dir = Path(out_dir or RESULTS)
    for suite in ("serving", "training", "quality"):
        path = out_dir / f"{suite}-latest.json"
        if not path.is_file():
            print(f"({suite}: no results yet; run `python -m benchmarks {suite}`)")
            continue
        data = json.loads(path.read_text())
        print(f"\n**{suite}** ({data['timestamp']}, {data['machine']['cpu']}, {data['machine']['cores']} cores{', quick' if data.get('quick') else ''})\n")
        if suite == "serving":
            print("| ratio | value |\n| --- | --- |")
            for k, v in data["ratios"].items():
                print(f"| {k} | {'n/a' if v is None else f'{v:.2f}'} |")
        if suite in ("serving", "training"):
            print("\n| target | measured | met |\n| --- | --- | --- |")
            for t in data["targets"]:
                value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
                print(f"| {t['name']} | {value} | {t['met']} |")
        if suite == "quality":
            print("| method | params | SST-2 dev acc (mean ± std, 3 seeds) |\n| --- | --- | --- |")
            for m, r in data["results"].items():
                print(f"| {m} | {r['trainable_params']:,} | {100 * r['mean']:.1f} ± {100 * r['std']:.1f} |")
