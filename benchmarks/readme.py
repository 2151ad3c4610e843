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
        shape = f", shape {data['shape']}" if data.get("shape") else ""
        print(f"\n**{suite}** ({data['timestamp']}, {data['machine']['cpu']}, {data['machine']['cores']} cores{', quick' if data.get('quick') else ''}{shape})\n")
        if suite == "serving":
            print_serving(data)
        if suite in ("serving", "training"):
            print("\n| target | measured | met |\n| --- | --- | --- |")
            for t in data["targets"]:
                value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
                print(f"| {t['name']} | {value} | {t['met']} |")
        if suite == "quality":
            print("| method | params | SST-2 dev acc (mean ± std, 3 seeds) |\n| --- | --- | --- |")
            for m, r in data["results"].items():
                print(f"| {m} | {r['trainable_params']:,} | {100 * r['mean']:.1f} ± {100 * r['std']:.1f} |")


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def print_serving(data: dict) -> None:
    """Ratios with their physical limits, the online load summary and the scale curves."""
    limits = data.get("limits", {})
    print("| ratio (same run) | measured | physical limit |\n| --- | --- | --- |")
    for name, value in data["ratios"].items():
        print(f"| {name} | {_num(value)} | {_num(limits.get(name))} |")
    online = data.get("online")
    if online:
        print(f"\n| online set (TTFT p90 SLO {online['plan']['ttft_slo_s']} s) | highest rate within SLO (req/s) | at that rate: TTFT p50 / p90 (s), TPOT p50 (ms), req/s |\n| --- | --- | --- |")
        for name, result in online["results"].items():
            best = result["max_rate_within_slo"]
            row = next((r for r in result["rates"] if r["rate"] == best), None)
            detail = "–" if row is None else f"{row['ttft_s']['p50']:.2f} / {row['ttft_s']['p90']:.2f}, {1e3 * row['tpot_s']['p50']:.0f}, {row['request_throughput']:.2f}"
            print(f"| {name} | {'none measured' if best is None else best} | {detail} |")
    curves = data.get("scale")
    if curves:
        for label, curve in curves["distinct"].items():
            points = ", ".join(f"{k}: {v / curve['1']:.2f}" for k, v in curve.items())
            print(f"\nDistinct adapters per batch, {label} (throughput / 1 adapter): {points}")
        for label, rows in curves["rotation"].items():
            print(f"Rotation, {label} (tok/s by adapters): " + ", ".join(f"{r['adapters']}: {r['stats']['median']:.0f}" for r in rows))
        for size, kinds in curves["first_request"].items():
            print(f"First request, {size} (s, never seen / cached): " + ", ".join(f"{k} {r['cold_s']:.3f} / {r['cached_s']:.3f}" for k, r in kinds.items()))
