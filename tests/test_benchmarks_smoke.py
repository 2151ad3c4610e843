"""The benchmark suites' quick modes produce well-formed JSON, Markdown and PNG plots (no timing checks)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_suite(suite: str, out) -> dict:
    subprocess.run([sys.executable, "-m", "benchmarks", suite, "--quick", "--out", str(out)], check=True, capture_output=True, text=True, timeout=1200)
    data = json.loads((out / f"{suite}-latest.json").read_text())
    assert data["suite"] == suite and data["machine"]["cores"] >= 1 and data["machine"]["versions"]["torch"]
    assert (out / f"{suite}-latest.md").read_text().startswith(f"# {suite} benchmark")
    pngs = list(out.glob(f"{suite}-latest-*.png"))
    assert pngs and all(p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000 for p in pngs)
    return data


@pytest.mark.slow
def test_training_suite(tmp_path):
    data = run_suite("training", tmp_path)
    assert set(data["results"]) == {"lora", "dora", "prediag", "sora", "sora_cayley", "prediag_recompute", "sora_recompute"}
    assert all(r["step_time_s"]["samples"] and r["peak_rss_mib"] > 0 for r in data["results"].values())
    assert {t["name"] for t in data["targets"]} >= {"Pre-Diag / LoRA step time", "SORA / LoRA step time"}


@pytest.mark.slow
def test_quality_suite(tmp_path, sst2_dir):
    data = run_suite("quality", tmp_path)
    for result in data["results"].values():
        assert len(result["runs"]) == 3 and 0.0 <= result["mean"] <= 1.0


@pytest.mark.slow
def test_serving_suite(tmp_path):
    data = run_suite("serving", tmp_path)
    assert all(value is not None for value in data["ratios"].values()), data["ratios"]
    assert len(data["targets"]) == 7 and all(t["met"] in (True, False) for t in data["targets"])
    assert all(row["tok_per_s"]["samples"] for row in data["vllm"])
    out = subprocess.run([sys.executable, "-m", "benchmarks", "readme", "--out", str(tmp_path)], capture_output=True, text=True, check=True)
    assert "vLLM plugin LoRA / stock LoRA decode" in out.stdout
