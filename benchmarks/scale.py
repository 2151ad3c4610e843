"""Scale curves: many adapters behind one vLLM engine.

1. Throughput against distinct adapters per batch (1 ... 32 in a batch of 32), plugin vs stock
   vLLM for LoRA, plugin for SORA.
2. Throughput against adapters in rotation beyond `max_loras` (4 slots; 4, 8, 32, 128 adapters,
   round-robin waves): `max_cpu_loras` large enough to hold them all, and a small one that they
   exceed (every wave then reads adapters from disk); plugin vs stock for LoRA.
3. First-request latency of an adapter the engine has not seen, per kind and against hidden size.

Scenarios are run by `benchmarks.vllm_worker`; this module builds them and reports on the results.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from .common import Target
from .shapes import KINDS, RANK, Shape, adapter_terms, decode_bytes

FIRST_REQUEST_KINDS = ("lora", "dora", "prediag", "sora")
KIND_LABELS = {"lora": "LoRA", "dora": "DoRA", "prediag": "Pre-Diag", "sora": "SORA", "sora_cayley": "SORA cayley"}


@dataclass(frozen=True)
class ScalePlan:
    distinct: tuple[int, ...]  # adapters per batch
    distinct_batch: int
    sora_distinct: tuple[int, ...]
    slots: int  # max_loras of the rotation engines
    rotation: tuple[int, ...]  # adapters in rotation
    small_cache: int  # max_cpu_loras of the variant the rotation exceeds
    waves: int
    wave_batch: int
    wave_tokens: int
    first_copies: int  # never-seen adapters timed per kind
    hidden_shapes: tuple[str, ...]  # shapes (names in SHAPES) of the first-request curve besides the suite's


def distinct_scenarios(
    plan: ScalePlan, prefix: str, names: list[str], tokens: int, counts: tuple[int, ...]
) -> list[dict]:
    """Decode scenarios with k distinct adapters in one batch; k = 1 also measures TTFT / TPOT (it is a point
    of the batch curves)."""
    return [
        {
            "name": f"{prefix}: {k} distinct",
            "kind": "decode",
            "adapters": names[:k],
            "batch": plan.distinct_batch,
            "prompt_len": 16,
            "max_tokens": tokens,
            "distinct": k,
            "ttft": k == 1,
        }
        for k in counts
    ]


def rotation_scenarios(plan: ScalePlan, copies: dict[int, list[str]], counts: tuple[int, ...]) -> list[dict]:
    """One scenario per adapter count; `copies[n]` names that run's own adapters (never shared
    between runs of one engine, so no run starts with another's adapters cached)."""
    return [
        {
            "name": f"rotation over {n}",
            "kind": "rotation",
            "adapters": copies[n],
            "per_wave": min(plan.slots, n),
            "batch": plan.wave_batch,
            "waves": plan.waves,
            "prompt_len": 16,
            "max_tokens": plan.wave_tokens,
        }
        for n in counts
    ]


def first_request_scenario(copies: dict[str, list[str]], fillers: list[str]) -> dict:
    return {
        "name": "first request",
        "kind": "first_request",
        "adapters": [n for names in copies.values() for n in names],
        "fillers": fillers,
        "prompt_len": 16,
    }


# ---------------------------------------------------------------- results


def first_request_table(result: dict, kinds: dict[str, str]) -> dict[str, dict]:
    """Per kind: medians over its copies of cold (never seen), cached (in vLLM's CPU cache, not
    in a slot) and resident latency; `load_s` = cold - resident, `activation_s` = cached - resident."""
    table = {}
    for kind in FIRST_REQUEST_KINDS:
        rows = [s for s in result["samples"] if kinds[s["adapter"]] == kind]
        med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
        table[kind] = {
            "cold_s": med("cold_s"),
            "cached_s": med("cached_s"),
            "resident_s": med("resident_s"),
            "load_s": statistics.median(r["cold_s"] - r["resident_s"] for r in rows),
            "activation_s": statistics.median(r["cached_s"] - r["resident_s"] for r in rows),
            "samples": rows,
        }
    return table


def factor_values(shape: Shape, kind: str) -> int:
    return adapter_terms(shape, kind)[0]


def first_request_values(shape: Shape, kind: str) -> int:
    """Values a never-seen adapter's one-token request must read: its factors, the base weights
    once (the request's forward), and for DoRA the adapted layers' W0 once more (W0 Aᵀ, for the
    row norms of W0 + sBA in g; exact g cannot skip it)."""
    reads_base = KINDS[kind]["method"] == "dora"
    adapted = shape.num_layers * sum(n_in * n_out for n_in, n_out in shape.projections().values())
    return factor_values(shape, kind) + shape.parameters() + (adapted if reads_base else 0)


def rotation_limit(shape: Shape, scenario: dict) -> float:
    """The swap-heavy ratio the bytes allow: a wave's decode steps read the base weights and the
    wave's adapters; swapping copies `per_wave` LoRA adapters into slots (read + write)."""
    steps = scenario["max_tokens"]
    compute = steps * decode_bytes(shape, ["lora"] * scenario["per_wave"])
    copy = 2 * scenario["per_wave"] * factor_values(shape, "lora") * shape.bytes_per_value
    return compute / (compute + copy)


def targets(
    distinct: dict, rotation: dict, first: dict[str, dict[str, dict]], shapes: dict[str, Shape], slots: int
) -> list[Target]:
    """The scale targets, from the curves: distinct adapters per batch, rotation through more adapters
    than slots, and the first request of an adapter the engine has not seen (cost and growth with size)."""
    out = []
    plugin = distinct.get("plugin LoRA", {})
    if plugin:
        most = max(plugin)
        out.append(
            Target(f"{most} distinct LoRA adapters / 1 adapter, batch {most} (plugin)", plugin[most] / plugin[1], 0.8)
        )
    cached = rotation.get("plugin, cache holds all", {})
    n8 = 8 * slots
    value = cached[n8] / cached[slots] if n8 in cached and slots in cached else None
    out.append(
        Target(
            f"rotation over {n8} adapters (8x max_loras) / {slots} (all resident), plugin",
            value,
            0.6,
            note="waves round-robin through the adapters; the reference is the same engine and waves with as "
            "many adapters as slots",
        )
    )
    wide = [name for name, s in shapes.items() if s.hidden_size >= 1536]
    for name in wide:
        lora = first[name]["lora"]["cold_s"]
        for kind in ("dora", "prediag", "sora"):
            out.append(
                Target(
                    f"first request {KIND_LABELS[kind]} / LoRA, hidden {shapes[name].hidden_size}",
                    first[name][kind]["cold_s"] / lora,
                    1.5,
                    higher_is_better=False,
                    note=f"bytes allow "
                    f"{first_request_values(shapes[name], kind) / first_request_values(shapes[name], 'lora'):.2f} "
                    f"(factors x{factor_values(shapes[name], kind) / factor_values(shapes[name], 'lora'):.2f})",
                )
            )
    ordered = sorted(shapes, key=lambda n: shapes[n].hidden_size)
    if len(ordered) >= 2:
        small, large = ordered[0], ordered[-1]
        for kind in FIRST_REQUEST_KINDS:
            growth = first[large][kind]["activation_s"] / max(first[small][kind]["activation_s"], 1e-6)
            size_growth = factor_values(shapes[large], kind) / factor_values(shapes[small], kind)
            out.append(
                Target(
                    f"{KIND_LABELS[kind]} activation growth / factor-size growth, hidden "
                    f"{shapes[small].hidden_size} -> {shapes[large].hidden_size}",
                    growth / size_growth,
                    1.0,
                    higher_is_better=False,
                    note=f"activation x{growth:.2f}, factors x{size_growth:.2f}; activation = cached - resident "
                    "request",
                )
            )
    return out


# ---------------------------------------------------------------- plots


def distinct_plot(distinct: dict[str, dict[int, float]], limits: dict[str, dict[int, float]], batch: int):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, curve in distinct.items():
        xs = sorted(curve)
        (line,) = ax.plot(xs, [curve[x] for x in xs], marker="o", label=label)
        if label in limits:
            ax.plot(
                xs,
                [curve[1] * limits[label][x] for x in xs],
                linestyle=":",
                color=line.get_color(),
                label=f"{label}: bandwidth limit",
            )
    return finish(
        fig,
        ax,
        f"distinct adapters in a batch of {batch}",
        "decode throughput (tokens / s, median)",
        "Throughput against distinct adapters per batch",
    )


def rotation_plot(rotation: dict[str, dict[int, float]], slots: int, cache: int):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, curve in rotation.items():
        xs = sorted(curve)
        ax.plot(xs, [curve[x] for x in xs], marker="o", label=label)
    ax.axvline(cache, color="grey", linestyle=":", label=f"small max_cpu_loras = {cache}")
    return finish(
        fig,
        ax,
        f"adapters in rotation (round-robin waves, max_loras = {slots})",
        "throughput (tokens / s, median over waves)",
        "Swap-heavy regime: adapters beyond the slots",
    )


def first_request_plot(first: dict[str, dict[str, dict]], shapes: dict[str, Shape]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    names = sorted(first, key=lambda n: shapes[n].hidden_size)
    hidden = [shapes[n].hidden_size for n in names]
    for kind in FIRST_REQUEST_KINDS:
        ax.plot(
            hidden,
            [first[n][kind]["cold_s"] for n in names],
            marker="o",
            label=f"{KIND_LABELS[kind]}: never seen (disk + prepare + slot)",
        )
        ax.plot(
            hidden,
            [first[n][kind]["cached_s"] for n in names],
            marker="^",
            linestyle="--",
            label=f"{KIND_LABELS[kind]}: in CPU cache, not in a slot",
        )
    ax.set_yscale("log")
    layers = "/".join(sorted({str(shapes[n].num_layers) for n in names}))
    finish(
        fig,
        ax,
        f"hidden size (Llama, {layers} layers, r = {RANK} on all 7 projections)",
        "latency of a 1-token request (s, median)",
        "First request of a non-resident adapter",
    )
    ax.set_xticks(hidden, [str(h) for h in hidden])
    return fig


def finish(fig, ax, xlabel: str, ylabel: str, title: str):
    """Log-2 x axis, labels, grid, legend."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6)
    return fig


# ---------------------------------------------------------------- markdown


def markdown(
    distinct: dict,
    distinct_limits: dict,
    rotation: dict,
    rotation_raw: dict,
    first: dict,
    shapes: dict[str, Shape],
    plan: ScalePlan,
) -> list[str]:
    md = [
        "## Scale curves (many adapters)",
        "",
        f"Distinct adapters: decode, batch {plan.distinct_batch}, prompts of 16 tokens; request i names "
        "adapter i mod k. "
        "The limit is the bandwidth bound: base weights + k adapters' factors read per step against base + "
        "one adapter's.",
        "",
        "| deployment | " + " | ".join(f"k = {k}" for k in plan.distinct) + " |",
        "| --- |" + " --- |" * len(plan.distinct),
    ]
    for label, curve in distinct.items():
        cells = [
            f"{curve[k]:.0f} ({curve[k] / curve[1]:.2f}, limit {distinct_limits[label][k]:.2f})" if k in curve else "–"
            for k in plan.distinct
        ]
        md.append(f"| {label} tok/s (/ k = 1) | " + " | ".join(cells) + " |")
    md += [
        "",
        f"Rotation: {plan.slots} slots (max_loras); waves of {plan.wave_batch} requests over {plan.slots} adapters, "
        f"{plan.wave_tokens} tokens each, taking the next adapters round-robin ({plan.waves} timed waves "
        "after every adapter was requested once). "
        "The limit counts the copy of each wave's adapters into slots against the wave's decode bytes.",
        "",
        "| engine | adapters | tok/s median [p10, p90] | / all resident | limit |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, rows in rotation_raw.items():
        reference = rotation[label].get(plan.slots) or rotation.get("plugin, cache holds all", {}).get(plan.slots)
        for row in rows:
            s = row["stats"]
            md.append(
                f"| {label} | {row['adapters']} | {s['median']:.0f} [{s['p10']:.0f}, {s['p90']:.0f}] | "
                f"{s['median'] / reference:.2f} | {row['limit']:.2f} |"
            )
    md += [
        "",
        "First request of an adapter the engine has not seen (one prompt of 16 tokens, one output token; median over "
        f"{plan.first_copies} adapters per kind): never seen = read from disk, prepared, moved into a "
        "slot; cached = in vLLM's CPU cache "
        "but not in a slot; resident = the same request with the adapter in a slot (the compute alone). "
        "Factor size = values of the serving factors.",
        "",
        "| hidden | kind | never seen (s) | cached, not in a slot (s) | resident (s) | / LoRA (never seen) "
        "| factor values (M) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in sorted(first, key=lambda n: shapes[n].hidden_size):
        lora = first[name]["lora"]["cold_s"]
        for kind, r in first[name].items():
            md.append(
                f"| {shapes[name].hidden_size} | {KIND_LABELS[kind]} | {r['cold_s']:.3f} | "
                f"{r['cached_s']:.3f} | {r['resident_s']:.3f} | {r['cold_s'] / lora:.2f} | "
                f"{factor_values(shapes[name], kind) / 1e6:.2f} |"
            )
    return md
