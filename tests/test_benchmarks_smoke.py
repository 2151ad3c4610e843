"""The benchmark suites' quick modes produce well-formed JSON, Markdown and PNG plots (no timing checks)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.quality import FULL, METHODS, sweep_from_grid
from sora_serve.errors import AdapterError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_suite(suite: str, out) -> dict:
    subprocess.run(
        [sys.executable, "-m", "benchmarks", suite, "--quick", "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    data = json.loads((out / f"{suite}-latest.json").read_text())
    assert data["suite"] == suite and data["machine"]["cores"] >= 1 and data["machine"]["versions"]["torch"]
    assert (out / f"{suite}-latest.md").read_text().startswith(f"# {suite} benchmark")
    pngs = list(out.glob(f"{suite}-latest-*.png"))
    assert pngs and all(p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000 for p in pngs)
    return data


@pytest.mark.slow
def test_training_suite(tmp_path):
    data = run_suite("training", tmp_path)
    assert set(data["results"]) == {
        "lora",
        "dora",
        "prediag",
        "sora",
        "sora_cayley",
        "prediag_recompute",
        "sora_recompute",
    }
    assert all(r["step_time_s"]["samples"] and r["peak_rss_mib"] > 0 for r in data["results"].values())
    assert {t["name"] for t in data["targets"]} >= {"Pre-Diag / LoRA step time", "SORA / LoRA step time"}


@pytest.mark.slow
def test_quality_suite(tmp_path, sst2_dir):
    data = run_suite("quality", tmp_path)
    methods = {"lora", "dora", "prediag", "sora_first_order", "sora_cayley"}
    assert set(data["tasks"]) == {"sst2", "books", "airline"} and set(data["lr_sweep"]["lr"]) == methods
    for task in data["tasks"].values():
        assert set(task["runs"]) == methods and all(len(runs) == 2 for runs in task["runs"].values())
        assert len({runs[0]["trainable_params"] for runs in task["runs"].values()}) == 1  # matched budgets
        assert all(0.0 <= s["mean"] <= 1.0 for s in task["summary"].values())
        assert all(runs[0]["diagnostics"] for runs in task["runs"].values())
    assert (
        data["pooled_paired"]["sora_cayley - lora"]["wins"] + data["pooled_paired"]["sora_cayley - lora"]["losses"] <= 6
    )
    assert all(d["predictions_equal"] for d in data["serving"]["domains"].values()) and data["serving"]["adapters"] == 2
    assert not (tmp_path / "quality-partial.json").exists()  # removed once the run is complete
    assert sorted(p.name for p in (tmp_path / "quality-adapters").iterdir()) == ["airline", "books"]


@pytest.mark.slow
def test_quality_stability_suite_and_the_quality_suite_reading_its_grid(tmp_path, sst2_dir):
    subprocess.run(
        [sys.executable, "-m", "benchmarks.quality_stability", "--quick", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    data = json.loads((tmp_path / "quality-stability-latest.json").read_text())
    assert {(e["method"], e["seed"]) for e in data["grid"]} == {(m, s) for m in METHODS for s in (100, 101)}
    assert all(set(e) >= {"method", "lr", "seed", "accuracy", "majority_share"} for e in data["grid"])
    cayley = [e for e in data["recipe_sweep"] if e["method"] == "sora_cayley"]
    assert {e["scale"] for e in cayley} == {1.0, 0.1} and all(
        e["orth_error_max"] < 1e-9 and e["K_norm_max"] > 0 for e in cayley
    )
    lrs = {e["scale"]: {g["role"]: g["lr"] for g in e["param_groups"]} for e in cayley}
    assert lrs[1.0]["rotation"] == lrs[1.0]["lowrank"] and lrs[0.1]["rotation"] == pytest.approx(
        0.1 * lrs[0.1]["lowrank"]
    )
    assert data["recipe_choice"]["scale"] in (1.0, 0.1) and set(data["best_lr"]) == set(METHODS)
    assert {e["steps"] for e in data["recipe_long_sweep"]} == {6} and {e["steps"] for e in data["recipe_sweep"]} == {4}
    assert (tmp_path / "quality-stability-latest-grid.png").stat().st_size > 0
    # the quick grid is not the full suite's protocol: refused on the first field that differs
    with pytest.raises(AdapterError, match="settings.sweep_held_out"):
        sweep_from_grid(tmp_path / "quality-stability-latest.json", FULL)


@pytest.mark.slow
def test_serving_suite(tmp_path):
    data = run_suite("serving", tmp_path)
    assert data["shape"] == "small" and data["settings"]["model"]["hidden_size"] == 512
    assert all(value is not None for value in data["ratios"].values()), data["ratios"]
    assert set(data["limits"]) == set(data["ratios"]) and all(
        0 < v <= 1 for v in data["limits"].values() if v is not None
    )
    # quick: no second hidden size, no first-request targets; no --peers: llama.cpp's targets not measured
    peer_targets = [t for t in data["targets"] if "llama.cpp" in t["name"]]
    assert len(data["targets"]) == 22 and len(peer_targets) == 4
    # paired engines: every ratio read in the one quick round, the shares among the targets
    assert all(len(r["per_round"]) == 1 and r["mean"] > 0 for r in data["paired"]["ratios"]), data["paired"]
    assert sum("(paired)" in t["name"] for t in data["targets"]) == 6
    assert all(t["met"] is None for t in peer_targets)
    assert all(t["met"] in (True, False) for t in data["targets"] if t not in peer_targets)
    assert all(row["tok_per_s"]["samples"] for row in data["vllm"] if row["kind"] in ("decode", "prefill"))
    # online load: every request streamed its tokens, at every rate, for every adapter set
    for result in data["online"]["results"].values():
        assert [r["rate"] for r in result["rates"]] == data["online"]["plan"]["rates"]
        assert all(r["errors"] == 0 and r["ttft_s"]["p50"] > 0 for r in result["rates"]), result
    # scale curves: every point measured, first requests for every kind
    assert set(data["scale"]["distinct"]) == {"plugin LoRA", "stock LoRA", "plugin SORA"}
    assert [r["adapters"] for r in data["scale"]["rotation"]["plugin, cache holds all"]] == data["settings"]["plan"][
        "scale"
    ]["rotation"]
    assert set(data["scale"]["first_request"]["small"]) == {"lora", "dora", "prediag", "sora"}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "readme", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "vLLM plugin LoRA / stock LoRA decode" in out.stdout and "physical limit" in out.stdout


def test_fused_op_tool_times_every_projection_per_row_count(tmp_path):
    """`benchmarks.fused_op` in its subprocess, one round: a sample per (rows, kind) with every
    projection of a decoder layer, and its table."""
    from sora_serve.vllm_plugin.backends import fused

    if fused.op() is None:
        pytest.skip("the fused op needs AVX512-BF16 and a compiler")
    subprocess.run(
        [sys.executable, "-m", "benchmarks.fused_op", "--rows", "8", "40", "--rounds", "1", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    data = json.loads((tmp_path / "fused-op.json").read_text())
    samples = data["rounds"][0]["this"]
    assert [(s["rows"], s["kind"]) for s in samples] == [(8, "lora"), (8, "sora"), (40, "lora"), (40, "sora")]
    assert all(set(s["parts"]) == {"qkv", "o", "gate_up", "down"} and s["ms"] > 0 for s in samples)
    assert all(s["ms"] == pytest.approx(sum(s["parts"].values())) for s in samples)
    table = (tmp_path / "fused-op.md").read_text()
    assert "| 40 | sora |" in table and "other checkout" not in table
