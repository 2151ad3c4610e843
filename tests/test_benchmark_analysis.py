"""The benchmark tools' analysis (no engine here): py-spy stacks by category, and the A/B comparison."""

from __future__ import annotations

import pytest

from benchmarks.ab_commits import RATIOS, compare
from benchmarks.profile_step import ENGINE, MODEL_OTHER, WORKER_OTHER, breakdown

WORKER = (
    "run (vllm/v1/executor/multiproc_executor.py:900);worker_busy_loop (vllm/v1/executor/multiproc_executor.py:950)"
)
STEP = (
    f"{WORKER};reporting.<locals>.wrapper (sora_serve/vllm_plugin/isolation.py:90);"
    "execute_model (vllm/v1/worker/gpu_worker.py:500)"
)
GROUPED = "sora_serve/vllm_plugin/backends/grouped.py"
LAYER = f"{STEP};forward (vllm/model_executor/models/llama.py:200);apply (sora_serve/vllm_plugin/layers.py:96)"


@pytest.mark.parametrize(
    "stack, category",
    [
        (f"{LAYER};UnquantizedLinearMethod.apply (vllm/model_executor/layers/linear.py:230)", "base linear GEMMs"),
        (
            f"{LAYER};ops_with.<locals>.bgmv_expand (sora_serve/vllm_plugin/cpu_ops.py:60)",
            "punica ops (vLLM's CPU ops, mended)",
        ),
        (f"{LAYER};apply (sora_serve/vllm_plugin/backends/grouped.py:140)", "adapter math (ours)"),
        (
            f"{LAYER};apply ({GROUPED}:137);step_plan ({GROUPED}:64)",
            "step plan (ours)",
        ),
        (
            f"{LAYER};apply ({GROUPED}:150);quarantine_rows (sora_serve/vllm_plugin/isolation.py:44)",
            "isolation check (ours)",
        ),
        (f"{STEP};set_active_adapters (vllm/lora/worker_manager.py:80)", "vLLM LoRA bookkeeping"),
        (f"{STEP};forward (vllm/attention/layer.py:300)", "attention"),
        # the plugin's wrapper around the worker's step does not claim what runs inside it
        (f"{STEP};forward (vllm/model_executor/layers/layernorm.py:120)", MODEL_OTHER),
        (f"{WORKER};dequeue (vllm/distributed/device_communicators/shm_broadcast.py:971)", ENGINE),
        (WORKER, WORKER_OTHER),
    ],
)
def test_a_sample_goes_to_the_innermost_category(stack, category):
    assert breakdown(f"{stack} 3\n") == {category: 3}


def test_samples_add_up_per_category():
    gemm = f"{LAYER};apply (vllm/model_executor/layers/linear.py"
    raw = f"{gemm}:230) 5\n{gemm}:231) 2\n{WORKER} 1\n"
    assert breakdown(raw) == {"base linear GEMMs": 7, WORKER_OTHER: 1}


def ab_round(this: float, other: float) -> dict:
    return {"ratios": {"this": dict.fromkeys(RATIOS, this), "other": dict.fromkeys(RATIOS, other)}}


def test_ab_comparison_says_within_noise_only_when_the_interval_holds_one():
    noisy = compare([ab_round(1.70, 1.75), ab_round(1.80, 1.70), ab_round(1.72, 1.74)])
    slower = compare([ab_round(1.60, 1.75), ab_round(1.61, 1.76), ab_round(1.59, 1.74)])
    for name in RATIOS:
        low, high = noisy[name]["ci95"]
        assert low < 1 < high and noisy[name]["within_noise"]
        assert slower[name]["ci95"][1] < 1 and not slower[name]["within_noise"]
        assert slower[name]["this_over_other"] == pytest.approx([1.60 / 1.75, 1.61 / 1.76, 1.59 / 1.74])


def test_adapter_cost_table_takes_medians_per_path_and_switches_every_setting():
    """The A/B/C of the grouped backend's decode paths: medians per (batch, kind, path), the default
    path's ratio to torch's, our code's parts and its bytes floor; and `use_path` switches the GEMMs,
    the fused op and the isolation check (timed), back and forth."""
    from benchmarks import adapter_cost
    from sora_serve.vllm_plugin import isolation
    from sora_serve.vllm_plugin.backends import fused, prepacked

    samples = [
        {
            "batch": 8,
            "kind": "lora",
            "path": path,
            "ours_ms": ours,
            "parts_ms": {"factor GEMMs": ours / 2, "isolation check": 1.0},
            "step_ms": 70.0 + ours,
        }
        for path, values in (("torch", (16.0, 30.0, 15.0)), ("prepacked", (8.0, 9.0, 40.0)), ("fused", (4.0, 3.0)))
        for ours in values
    ]
    rows = adapter_cost.summary({"samples": samples})
    assert [(r["path"], r["ours_ms"]) for r in rows] == [("fused", 3.5), ("prepacked", 9.0), ("torch", 16.0)]
    assert rows[1]["parts_ms"] == {"factor GEMMs": 4.5, "scale and shift": 0.0, "isolation check": 1.0, "fused op": 0.0}
    payload = {"samples": samples, "shape": "realistic", "rounds": 3, "machine": {"cpu": "x"}}
    # the rest of the step (79 - 9 ms) reads 70 MB of base weights: 1 MB/ms, so 2 MB of factors take 2 ms
    table = adapter_cost.markdown(payload | {"base_bytes": 70e6, "factor_bytes": {"lora": 2e6}})
    assert "| 8 | lora | 16.0 | 9.0 | 3.5 | 0.22 | 86.0 | 79.0 | 73.5 |" in table
    assert "| 8 | lora | prepacked | 9.0 | 4.5 | 0.0 | 1.0 | 0.0 | 3.5 | 2.0 |" in table
    without_fused = [s for s in samples if s["path"] != "fused"]
    assert "| 8 | lora | 16.0 | 9.0 | 0.56 | 86.0 | 79.0 |" in adapter_cost.markdown(
        payload | {"samples": without_fused, "base_bytes": 70e6, "factor_bytes": {"lora": 2e6}}
    )
    timer = adapter_cost.PartTimer()
    try:
        adapter_cost.use_path("torch", timer)
        assert (prepacked.MAX_PREPACKED_ROWS, fused.ENABLED) == (0, False)
        assert isolation.quarantine_rows_host_checked.__wrapped__ is isolation.quarantine_rows
        adapter_cost.use_path("prepacked", timer)
        assert (prepacked.MAX_PREPACKED_ROWS, fused.ENABLED) == (prepacked.KERNELS_KEPT, False)
        assert isolation.quarantine_rows_host_checked.__wrapped__ is adapter_cost.HOST_CHECKED
        adapter_cost.use_path("fused", timer)
        assert (prepacked.MAX_PREPACKED_ROWS, fused.ENABLED) == (prepacked.KERNELS_KEPT, True)
    finally:
        isolation.quarantine_rows_host_checked = adapter_cost.HOST_CHECKED
        fused.ENABLED = True


def test_part_timer_passes_results_through_and_sums_per_label():
    from benchmarks import adapter_cost

    timer = adapter_cost.PartTimer()
    double = timer.wrap("math", lambda x: 2 * x)
    assert [double(1), double(2)] == [2, 4]
    spent = timer.take()
    assert list(spent) == ["math"] and spent["math"] > 0
    assert timer.take() == {}


def engine_rows(rows: dict[str, dict[str, float]]) -> list[dict]:
    """An engine's result rows with these metric medians (None: not measured)."""
    return [
        {"name": name} | {m: None if v is None else {"median": v} for m, v in metrics.items()}
        for name, metrics in rows.items()
    ]


def test_paired_ratios_are_taken_within_each_round_as_speed_over_speed():
    from benchmarks.serving import PAIRED_RATIOS, paired_rows
    from benchmarks.shapes import SHAPES, decode_limit

    def round_(scale: float) -> dict:  # the whole machine `scale` times slower in this round
        disabled = {"decode": {"tpot_s": 0.05 * scale, "ttft_s": 0.2 * scale, "tok_per_s": 100 / scale}}
        disabled["prefill"] = {"tok_per_s": 400 / scale}
        plugin = {
            "plugin: base requests": {"tpot_s": 0.05 * scale, "ttft_s": 0.25 * scale, "tok_per_s": 95 / scale},
            "plugin: LoRA @ batch 8": {"tpot_s": 0.0505 * scale, "ttft_s": 0.25 * scale, "tok_per_s": 90 / scale},
            "plugin: SORA @ batch 8": {"tpot_s": 0.052 * scale, "ttft_s": 0.25 * scale, "tok_per_s": 85 / scale},
            "plugin: LoRA prefill": {"tok_per_s": 380 / scale},
            "plugin: SORA prefill": {"tok_per_s": 360 / scale},
        }
        return {
            "order": ["no-lora", "plugin"],
            "results": {"no-lora": engine_rows(disabled), "plugin": engine_rows(plugin)},
        }

    shape = SHAPES["realistic"]
    rows = {r["ratio"]: r for r in paired_rows([round_(1.0), round_(2.5)], shape)}
    assert list(rows) == [name for name, *_ in PAIRED_RATIOS]
    expected = {
        "plugin LoRA / LoRA-disabled engine, decode b8 per further token": 0.05 / 0.0505,
        "plugin SORA prefill / LoRA-disabled engine prefill": 360 / 400,
        "base requests / LoRA-disabled engine, time to first token b8": 0.2 / 0.25,
        "plugin SORA / LoRA-disabled engine, 16-token requests b8 (first token included)": 85 / 100,
    }
    for name, value in expected.items():  # the drift between rounds cancels within each
        assert rows[name]["per_round"] == pytest.approx([value, value]) and rows[name]["mean"] == pytest.approx(value)
    lora = rows["plugin LoRA / LoRA-disabled engine, decode b8 per further token"]
    assert lora["limit"] == pytest.approx(decode_limit(shape, ["lora"], []))
    assert lora["share"] == pytest.approx(lora["mean"] / lora["limit"])
    assert rows["base requests / LoRA-disabled engine, time to first token b8"]["limit"] == 1.0


def test_a_paired_ratio_missing_from_every_round_is_not_measured():
    from benchmarks.serving import paired_rows
    from benchmarks.shapes import SHAPES

    empty = {"order": ["plugin", "no-lora"], "results": {"no-lora": [], "plugin": []}}
    assert all(r["mean"] is None and r["per_round"] == [] for r in paired_rows([empty], SHAPES["realistic"]))


def test_fused_op_table_gives_this_over_other_per_round():
    from benchmarks.fused_op import markdown

    def sample(rows: int, kind: str, ms: float) -> dict:
        return {"rows": rows, "kind": kind, "ms": ms, "parts": {}}

    rounds = [
        {"order": ["this", "other"], "this": [sample(8, "lora", 1.0)], "other": [sample(8, "lora", 2.0)]},
        {"order": ["other", "this"], "this": [sample(8, "lora", 3.0)], "other": [sample(8, "lora", 4.0)]},
    ]
    payload = {"rounds": rounds, "other": "/tmp/old", "config": {"layers": 12}, "machine": {"cpu": "x"}}
    assert "| 8 | lora | 2.0 | 3.0 | 0.50 / 0.75 |" in markdown(payload)
