"""Shared by the suites: machine description, statistics, and writing JSON + Markdown + PNG."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(os.environ.get("SORA_BENCH_RESULTS", "results"))


def machine() -> dict:
    import torch
    import transformers

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    for name in ("peft", "vllm", "onnxruntime"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    mem = next(
        (
            int(line.split()[1]) // 1024
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        None,
    )
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_mib": mem, "gpu": gpu, "versions": versions}


def run_worker(module: str, config: dict, path: Path, env: dict[str, str]) -> Any:
    """`python -m <module> --worker <path>` with `config` written to `path`, `env` on top of this
    process's environment and `sora-serve serve`'s CPU thread settings; the JSON of the line the
    worker printed as `RESULT <json>`."""
    from sora_serve.vllm_plugin.engine import default_thread_env

    path.write_text(json.dumps(config))
    full_env = {**os.environ, **env}
    full_env |= default_thread_env(full_env)
    done = subprocess.run(
        [sys.executable, "-m", module, "--worker", str(path)], capture_output=True, text=True, env=full_env
    )
    line = next((t for t in done.stdout.splitlines() if t.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{module} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(line[len("RESULT ") :])


def worker_tool_main(args, worker, measure, stem: str, markdown) -> None:
    """The `main` of a tool that measures in a worker subprocess: `--worker FILE` runs
    `worker(config)`; otherwise `measure(out_dir)`'s payload is written as `<stem>.{json,md}`."""
    if args.worker:
        worker(json.loads(args.worker.read_text()))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    payload = measure(args.out.absolute())
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(payload))
    print(markdown(payload))


def stats(samples: list[float]) -> dict:
    ordered = sorted(samples)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]

    return {
        "median": statistics.median(ordered),
        "p10": pct(0.1),
        "p90": pct(0.9),
        "n": len(ordered),
        "samples": samples,
    }


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Student-t 95% confidence interval of the mean (the point itself for n = 1)."""
    from scipy import stats as scipy_stats

    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, mean
    half = float(scipy_stats.t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


@dataclass
class Target:
    name: str
    value: float | None
    threshold: float
    higher_is_better: bool = True
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold

    def row(self) -> str:
        sign = ">=" if self.higher_is_better else "<="
        value = "n/a" if self.value is None else f"{self.value:.3f}"
        verdict = {True: "met", False: "**not met**", None: "not measured"}[self.met]
        return f"| {self.name} | {value} | {sign} {self.threshold} | {verdict} | {self.note} |"


def markdown_targets(targets: list[Target]) -> str:
    lines = ["| target | measured | required | verdict | note |", "| --- | --- | --- | --- | --- |"]
    return "\n".join(lines + [t.row() for t in targets])


def save_suite(
    suite: str, payload: dict, markdown: str, figures: dict[str, plt.Figure], out_dir: Path | None = None
) -> Path:
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = {"suite": suite, "timestamp": stamp, "machine": machine(), **payload}
    base = out_dir / f"{suite}-{stamp}"
    for name, fig in figures.items():
        fig.tight_layout()
        fig.savefig(f"{base}-{name}.png", dpi=120)
        shutil.copy(f"{base}-{name}.png", out_dir / f"{suite}-latest-{name}.png")
        plt.close(fig)
        markdown += f"\n\n![{name}]({suite}-{stamp}-{name}.png)"
    m = payload["machine"]
    header = f"# {suite} benchmark ({stamp})\n\nMachine: {m['cpu']}, {m['cores']} cores, {m['gpu'] or 'no GPU'}.\n\n"
    Path(f"{base}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    Path(f"{base}.md").write_text(header + markdown + "\n")
    shutil.copy(f"{base}.json", out_dir / f"{suite}-latest.json")
    shutil.copy(f"{base}.md", out_dir / f"{suite}-latest.md")
    print(header + markdown)
    return Path(f"{base}.json")


def bar_chart(
    title: str, labels: list[str], values: list[float], errors: tuple[list[float], list[float]] | None, ylabel: str
) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 4))
    ax.bar(labels, values, yerr=errors, capsize=4, color="#4c72b0", label="median (p10-p90)")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=30)
    ax.legend()
    return fig
