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
        print(
            f"\n**{suite}** ({data['timestamp']}, {data['machine']['cpu']}, {data['machine']['cores']} "
            f"cores{', quick' if data.get('quick') else ''}{shape})\n"
        )
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
    """Ratios with their physical limits, the online load summary and the three scale curves."""
    limits = data.get("limits", {})
    print("| ratio (same run) | measured | physical limit | of limit |\n| --- | --- | --- | --- |")
    for name, value in data["ratios"].items():
        limit = limits.get(name)
        share = _num(value / limit) if value is not None and limit else "–"
        print(f"| {name} | {_num(value)} | {_num(limit) if limit else '–'} | {share} |")
    online = data.get("online")
    if online:
        print(
            f"\n| adapter set | highest rate with TTFT p90 <= {online['plan']['ttft_slo_s']} s (req/s) | "
            "there: TTFT p50 / p90 (s), TPOT p50 (ms) | highest rate: req/s served, TTFT p90 (s) | "
            "errors |"
        )
        print("| --- | --- | --- | --- | --- |")
        for name, result in online["results"].items():
            best, rows = result["max_rate_within_slo"], result["rates"]
            row, top = next((r for r in rows if r["rate"] == best), None), rows[-1]
            there = (
                "–"
                if row is None
                else f"{row['ttft_s']['p50']:.2f} / {row['ttft_s']['p90']:.2f}, {1e3 * row['tpot_s']['p50']:.0f}"
            )
            print(
                f"| {name} | {'none measured' if best is None else f'{best:g}'} | {there} | "
                f"{top['rate']:g}: {top['request_throughput']:.2f}, {top['ttft_s']['p90']:.2f} | "
                f"{sum(r['errors'] for r in rows)} |"
            )
    curves = data.get("scale")
    if curves:
        counts = sorted({int(k) for curve in curves["distinct"].values() for k in curve})
        print(
            "\n| distinct adapters per batch: throughput / 1 adapter | "
            + " | ".join(map(str, counts))
            + " |\n| --- |"
            + " --- |" * len(counts)
        )
        for label, curve in curves["distinct"].items():
            cells = [
                f"{curve[str(k)] / curve['1']:.2f} ({curves['distinct_limits'][label][str(k)]:.2f})"
                if str(k) in curve
                else "–"
                for k in counts
            ]
            print(f"| {label} (bandwidth limit) | " + " | ".join(cells) + " |")
        print("\n| rotation engine | adapters: tok/s (/ as many adapters as slots) |\n| --- | --- |")
        for label, rows in curves["rotation"].items():
            reference = next((r["stats"]["median"] for r in rows if r["adapters"] == r["per_wave"]), None)
            print(
                f"| {label} | "
                + ", ".join(
                    f"{r['adapters']}: {r['stats']['median']:.0f}"
                    + (f" ({r['stats']['median'] / reference:.2f})" if reference else "")
                    for r in rows
                )
                + " |"
            )
        print(
            "\n| first request (s): never seen / cached, not in a slot | "
            + " | ".join(next(iter(curves["first_request"].values())))
            + " |"
        )
        print("| --- |" + " --- |" * len(next(iter(curves["first_request"].values()))))
        for size, kinds in curves["first_request"].items():
            print(
                f"| {size} | " + " | ".join(f"{r['cold_s']:.3f} / {r['cached_s']:.3f}" for r in kinds.values()) + " |"
            )
