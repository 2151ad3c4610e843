"""The quality suite's bookkeeping: paired statistics and resuming a stopped run (no training here)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from benchmarks.quality import (
    FULL,
    METHODS,
    PARTIAL,
    QUICK,
    best_lrs,
    paired,
    recipe_defaults,
    resume_from_partial,
    sweep_from_grid,
)
from sora_serve.errors import AdapterError


def test_paired_comparison_counts_signs_and_tests():
    p = paired([0.80, 0.82, 0.79, 0.81, 0.80], [0.79, 0.80, 0.80, 0.80, 0.78])
    assert (p["wins"], p["losses"], p["ties"]) == (4, 1, 0)
    assert p["mean"] == pytest.approx(0.01) and p["sign_p"] == pytest.approx(0.375)  # 2 * P(X >= 4), X ~ Bin(5, 1/2)
    assert 0 < p["t_p"] < 1
    # differences 0.01, 0.02, -0.01, 0.01, 0.02: sd = sqrt(6e-4 / 4), t(0.975, 4) = 2.776445
    half = 2.776445 * (6e-4 / 4) ** 0.5 / 5**0.5
    assert p["ci95"] == pytest.approx([0.01 - half, 0.01 + half], abs=1e-6)
    assert p["ci95"][0] < 0 < p["ci95"][1] and p["t_p"] > 0.05  # the interval covers 0 exactly when t p > 0.05
    same = paired([0.5, 0.6], [0.5, 0.6])
    assert same["ties"] == 2 and same["sign_p"] == 1.0 and same["t_p"] is None and same["ci95"] == [0.0, 0.0]


def partial_payload(settings: dict, rounds: dict[str, int]) -> dict:
    runs = {m: [{"seed": s, "accuracy": 0.5} for s in range(rounds.get(m, 2))] for m in METHODS}
    return {
        "quick": True,
        "settings": settings,
        "lr_sweep": {"lr": {m: 1e-3 for m in METHODS}},
        "runtime_s": 100.0,
        "tasks": {t: {"runs": runs} for t in ("sst2", *QUICK.domains)},
    }


def fresh_payload(settings: dict) -> dict:
    return {
        "quick": True,
        "settings": settings,
        "tasks": {t: {"runs": {m: [] for m in METHODS}} for t in ("sst2", *QUICK.domains)},
    }


def test_resume_takes_complete_rounds_only_with_the_same_settings(tmp_path):
    settings = {**json.loads(json.dumps(asdict(QUICK))), "workers": 1}
    for domain in QUICK.domains:
        (tmp_path / "quality-adapters" / domain).mkdir(parents=True)
        (tmp_path / "quality-adapters" / domain / "head.safetensors").write_bytes(b"")
    (tmp_path / PARTIAL).write_text(
        json.dumps(partial_payload({**settings, "workers": 4}, {"lora": 1}))
    )  # lora: one round only
    payload = fresh_payload(settings)
    assert resume_from_partial(payload, tmp_path) == 1
    assert all(len(runs) == 1 for task in payload["tasks"].values() for runs in task["runs"].values())
    assert payload["runtime_before_resume_s"] == 100.0 and payload["lr_sweep"]["lr"]["dora"] == 1e-3

    other = fresh_payload({**settings, "amazon_steps": 99})  # different settings: start afresh
    assert resume_from_partial(other, tmp_path) == 0 and "lr_sweep" not in other
    (tmp_path / "quality-adapters" / "books" / "head.safetensors").unlink()  # the serving check's adapters are gone
    assert resume_from_partial(fresh_payload(settings), tmp_path) == 0


def grid_file(tmp_path, settings: dict, seeds=(100, 101, 102)) -> str:
    """A stability grid where every method is best at lr 2e-3 on average, though 5e-3 wins one seed."""
    grid = [
        {
            "method": m,
            "lr": lr,
            "seed": s,
            "eval_loss": 0.5,
            "one_class": False,
            "accuracy": {2e-3: 0.80, 5e-3: 0.90 if s == seeds[0] else 0.70}[lr],
        }
        for m in METHODS
        for lr in (2e-3, 5e-3)
        for s in seeds
    ]
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"grid": grid, "settings": settings}))
    return path


def full_settings() -> dict:
    return {**asdict(FULL), "methods": {k: asdict(v) for k, v in METHODS.items()}, "recipe": recipe_defaults()}


def test_lr_from_a_grid_takes_the_best_mean_over_seeds(tmp_path):
    sweep = sweep_from_grid(grid_file(tmp_path, full_settings()), FULL)
    assert sweep["lr"] == {m: 2e-3 for m in METHODS} and sweep["seeds"] == [100, 101, 102]


def cell(method: str, lr: float, accuracies: list[float], one_class: int = 0) -> list[dict]:
    return [
        {"method": method, "lr": lr, "seed": i, "accuracy": a, "eval_loss": 0.5, "one_class": i < one_class}
        for i, a in enumerate(accuracies)
    ]


def test_best_lrs_takes_the_lowest_lr_within_one_standard_error_of_the_best():
    # 1e-2 is best by 0.4 points; its seeds' standard error is 0.55 points, so 5e-3 is chosen.
    # 2e-3 is 1.2 points down, outside that error, so it is not.
    grid = (
        cell("m", 1e-2, [0.798, 0.812, 0.798, 0.824, 0.794])
        + cell("m", 5e-3, [0.794, 0.784, 0.814, 0.816, 0.796])
        + cell("m", 2e-3, [0.786, 0.802, 0.808, 0.800, 0.770])
    )
    assert best_lrs(grid) == {"m": 5e-3}
    # With the seeds closer together (standard error 0.1 points) the best lr stands.
    tight = cell("m", 1e-2, [0.804, 0.806, 0.805, 0.803, 0.807]) + cell("m", 5e-3, [0.801] * 5)
    assert best_lrs(tight) == {"m": 1e-2}


def test_best_lrs_prefers_the_lrs_with_the_fewest_one_class_seeds():
    grid = cell("m", 1e-2, [0.95, 0.95, 0.52], one_class=1) + cell("m", 5e-3, [0.80, 0.81, 0.79])
    assert best_lrs(grid) == {"m": 5e-3}
    # When every lr has one (short quick runs), the lrs with the fewest compete.
    everywhere = cell("m", 1e-2, [0.52, 0.9, 0.9], one_class=1) + cell("m", 5e-3, [0.52, 0.52, 0.8], one_class=2)
    assert best_lrs(everywhere) == {"m": 1e-2}


@pytest.mark.parametrize(
    "field, value", [("sst2_steps", 100), ("sweep_held_out", 200), ("recipe", {"single_lr": True})]
)
def test_lr_from_a_grid_with_another_protocol_is_refused_naming_the_field(tmp_path, field, value):
    with pytest.raises(AdapterError, match=f"settings.{field}"):
        sweep_from_grid(grid_file(tmp_path, {**full_settings(), field: value}), FULL)


def test_lr_from_a_grid_needs_three_seeds_apart_from_the_suites(tmp_path):
    for seeds in ((100, 101), (0, 100, 101)):
        with pytest.raises(AdapterError, match="at least 3 sweep seeds"):
            sweep_from_grid(grid_file(tmp_path, full_settings(), seeds), FULL)
    with pytest.raises(AdapterError, match="not a stability grid"):
        sweep_from_grid(tmp_path / "missing.json", FULL)
