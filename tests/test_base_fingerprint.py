"""The base fingerprint's sampled weights: another base of the same shapes is refused at every
entry that has the base's weights (eager load, fold, to-LoRA, ONNX, `serve`'s pre-check), a dtype
cast of the same base is accepted. (vLLM's entries: test_vllm_resolver.py, test_vllm_engine.py.)"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import sora_serve as ss
from sora_serve.adapter_format import FINGERPRINT_FILE
from sora_serve.cli import main as cli_main
from sora_serve.converters.fold import fold_adapter
from sora_serve.converters.onnx_export import export_onnx
from sora_serve.converters.to_lora import to_lora
from sora_serve.fingerprint import ALLOW_OTHER_BASE_ENV, CAST_RTOL, SAMPLES
from sora_serve.tiny import make_tiny_checkpoint, make_tiny_model

from .helpers import fine_tuned_like, save_base_copy, write_random_adapter

KINDS = {
    "sora": ss.AdapterConfig(method="sora", r=4, r_p=2, target_modules="all-linear"),
    "lora": ss.AdapterConfig(method="lora", r=4, target_modules="all-linear"),  # PEFT's files + base_fingerprint.json
}
RANDOM_FACTORS = dict(seed=3, scale=0.05)  # every adapter here: write_random_adapter(..., **RANDOM_FACTORS)


@pytest.fixture(scope="module", params=["llama", "gpt2"])  # gpt2: Conv1D stores its weight (in, out)
def bases(request, tmp_path_factory):
    """The base (fp32), the same base re-saved in bf16, another base of the same shapes (a
    fine-tune-sized move of every weight), and one adapter per kind trained on the first."""
    arch, root = request.param, tmp_path_factory.mktemp(f"fingerprint-{request.param}")
    base = make_tiny_checkpoint(arch, root / "base")
    paths = {
        "base": base,
        "bf16": save_base_copy(make_tiny_model(arch), root / "bf16", base, torch.bfloat16),
        "other": save_base_copy(fine_tuned_like(make_tiny_model(arch), 1e-3, seed=11), root / "other", base),
    }
    adapters = {
        kind: write_random_adapter(root / kind, config, arch=arch, **RANDOM_FACTORS) for kind, config in KINDS.items()
    }
    return paths, adapters


def entries(tmp: Path) -> dict:
    """Every entry that has the base's weights, as (base dir, adapter dir, **overrides) -> None or AdapterError."""
    return {
        "load_adapter": lambda base, adapter, **o: ss.load_adapter(
            AutoModelForCausalLM.from_pretrained(base), adapter, **o
        ),
        "fold": lambda base, adapter, **o: fold_adapter(
            base, adapter, tmp / f"fold-{base.name}", verify=False, progress=False, force=True, **o
        ),
        "to_lora": lambda base, adapter, **o: to_lora(
            base, adapter, tmp / f"lora-{base.name}", allow_approx=True, rank=4, progress=False, force=True, **o
        ),
        "export_onnx": lambda base, adapter, **o: export_onnx(
            base, tmp / f"onnx-{base.name}", [adapter], force=True, verify=False, **o
        ),
    }


@pytest.mark.parametrize("entry", ["load_adapter", "fold", "to_lora", "export_onnx"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_entry_refuses_another_base_of_the_same_shapes_and_accepts_a_cast(bases, tmp_path, entry, kind):
    paths, adapters = bases
    if entry == "to_lora" and kind == "sora" and paths["base"].parent.name.startswith("fingerprint-gpt2"):
        pytest.skip("GPT-2's layers have biases, which SORA changes and no LoRA can (test_to_lora.py)")
    run = entries(tmp_path)[entry]
    with pytest.raises(
        ss.AdapterError,
        match=r"field 'base_fingerprint\.weights\.[\w.]+': module '[\w.]+': the base's weights are not the ones",
    ) as refused:
        run(paths["other"], adapters[kind])
    file = FINGERPRINT_FILE if kind == "lora" else "adapter_config.json"
    assert f"{adapters[kind] / file}" in str(refused.value) and f"of {SAMPLES} sampled entries" in str(refused.value)
    run(paths["bf16"], adapters[kind])  # the same base, cast: accepted
    run(paths["other"], adapters[kind], allow_other_base=True)  # the override lifts the weight check


def test_serve_refuses_another_base_before_the_engine(bases, capsys):
    paths, adapters = bases
    assert cli_main(["serve", "--model", str(paths["other"]), "--adapter", f"a={adapters['sora']}"]) == 1
    assert "base_fingerprint.weights" in capsys.readouterr().err


def test_cli_flag_and_environment_lift_the_weight_check(bases, tmp_path, monkeypatch):
    paths, adapters = bases
    fold = ["fold", "--base", str(paths["other"]), "--adapter", str(adapters["sora"]), "--no-verify"]
    assert cli_main([*fold, "--out", str(tmp_path / "refused")]) == 1 and not (tmp_path / "refused").exists()
    assert cli_main([*fold, "--out", str(tmp_path / "flag"), "--allow-other-base"]) == 0
    monkeypatch.setenv(ALLOW_OTHER_BASE_ENV, "1")
    assert cli_main([*fold, "--out", str(tmp_path / "env")]) == 0


def test_shapes_are_checked_whatever_the_override(bases, tmp_path):
    _, adapters = bases
    wider = save_base_copy(
        make_tiny_model("llama", intermediate_size=192),
        tmp_path / "wider",
        make_tiny_checkpoint("llama", tmp_path / "tok"),
    )
    with pytest.raises(ss.AdapterError, match="different base"):
        ss.load_adapter(AutoModelForCausalLM.from_pretrained(wider), adapters["sora"], allow_other_base=True)


def test_to_lora_output_records_its_base(bases, tmp_path):
    paths, adapters = bases
    out = to_lora(paths["base"], adapters["lora"], tmp_path / "converted", progress=False)["out_dir"]
    recorded = json.loads((Path(out) / FINGERPRINT_FILE).read_text())["base_fingerprint"]
    assert set(recorded["weights"]) == set(ss.read_adapter(adapters["lora"]).tensors)
    ss.load_adapter(AutoModelForCausalLM.from_pretrained(paths["bf16"]), out)
    with pytest.raises(ss.AdapterError, match="base_fingerprint.weights"):
        ss.load_adapter(AutoModelForCausalLM.from_pretrained(paths["other"]), out)


@pytest.mark.parametrize("relative", [1e-3, 1e-4])
def test_fine_tune_sized_moves_are_caught_and_casts_are_not(tmp_path, relative):
    """A base on which every weight moved by `relative` of its RMS is refused; fp32 <-> bf16 / fp16
    casts, in both directions, are accepted (each stays within CAST_RTOL of every entry)."""
    adapter = write_random_adapter(tmp_path / "a", KINDS["sora"], arch="llama", **RANDOM_FACTORS)
    with pytest.raises(ss.AdapterError, match="sampled entries differ by more than a dtype cast"):
        ss.load_adapter(fine_tuned_like(make_tiny_model("llama"), relative, seed=5), adapter)
    for dtype in (torch.bfloat16, torch.float16):
        ss.load_adapter(make_tiny_model("llama").to(dtype), adapter)
        recorded_on_cast = write_random_adapter(
            tmp_path / f"from-{str(dtype).removeprefix('torch.')}",
            KINDS["sora"],
            model=make_tiny_model("llama").to(dtype).float(),
            **RANDOM_FACTORS,
        )
        ss.load_adapter(make_tiny_model("llama"), recorded_on_cast)
    values = [
        v
        for samples in json.loads((adapter / "adapter_config.json").read_text())["base_fingerprint"]["weights"].values()
        for *_, v in samples
    ]
    as_bf16 = torch.tensor(values, dtype=torch.float64).to(torch.bfloat16).double()
    assert (
        (as_bf16 - torch.tensor(values)).abs() <= CAST_RTOL / 2 * as_bf16.abs()
    ).all()  # the margin the tolerance leaves


def test_dirs_without_sampled_weights_are_checked_by_shape_with_a_warning(tmp_path, caplog):
    model = make_tiny_model("llama")
    adapters = {
        kind: write_random_adapter(tmp_path / kind, config, arch="llama", **RANDOM_FACTORS)
        for kind, config in KINDS.items()
    }
    (adapters["lora"] / FINGERPRINT_FILE).unlink()  # as PEFT writes it
    config = json.loads((adapters["sora"] / "adapter_config.json").read_text())
    del config["base_fingerprint"]["weights"]  # as an older sora-serve wrote it
    (adapters["sora"] / "adapter_config.json").write_text(json.dumps(config))
    other = fine_tuned_like(model, 1e-2, seed=1)
    with caplog.at_level(logging.WARNING, logger="sora_serve.fingerprint"):
        for kind, adapter in adapters.items():
            ss.load_adapter(other, adapter, name=kind)
    assert "no base_fingerprint" in caplog.text and "records no weights" in caplog.text


@pytest.mark.parametrize(
    "weights,field",
    [
        (
            {"model.layers.0.self_attn.q_proj": [[128, 0, 0.1]]},
            "base_fingerprint.weights.model.layers.0.self_attn.q_proj",
        ),  # row out of range
        (
            {"model.layers.0.self_attn.q_proj": [[0, 0, "0.1"]]},
            "base_fingerprint.weights.model.layers.0.self_attn.q_proj",
        ),
        ({"model.layers.0.self_attn.q_proj": []}, "base_fingerprint.weights.model.layers.0.self_attn.q_proj"),
        ({"model.layers.0.self_attn.nope": [[0, 0, 0.1]]}, "base_fingerprint.weights.model.layers.0.self_attn.nope"),
        ([1, 2], "base_fingerprint.weights"),
    ],
)
def test_malformed_sampled_weights_are_refused_naming_the_field(tmp_path, weights, field):
    adapter = write_random_adapter(tmp_path / "a", KINDS["sora"], arch="llama", **RANDOM_FACTORS)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_fingerprint"]["weights"] = weights
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ss.AdapterError, match=rf"adapter_config.json: field '{field}'"):
        ss.read_adapter(adapter)


def test_a_checkpoint_reads_its_sampled_entries_once_and_still_refuses_another_base(bases, monkeypatch):
    """Every adapter of a base samples the same W0 entries, so a server's second adapter is checked
    without opening the base's files again; the values come from that base, so an adapter of the
    same shapes is still refused against another base's checkpoint, and a changed record against
    the cached values."""
    from sora_serve.adapter_format import read_adapter
    from sora_serve.checkpoint import Checkpoint, check_adapter_against

    paths, adapters = bases
    checkpoint, other = Checkpoint(paths["base"]), Checkpoint(paths["other"])
    check_adapter_against(read_adapter(adapters["sora"]), checkpoint)
    opened = []
    monkeypatch.setattr(Checkpoint, "open", lambda self, shard: opened.append(shard) or pytest.fail("file opened"))
    check_adapter_against(read_adapter(adapters["lora"]), checkpoint, norms=False)
    assert opened == []
    monkeypatch.undo()
    with pytest.raises(ss.AdapterError, match="the base's weights are not the ones"):
        check_adapter_against(read_adapter(adapters["lora"]), other, norms=False)
    adapter = read_adapter(adapters["lora"])
    module, samples = next(iter(adapter.fingerprint["weights"].items()))
    samples[0][2] = samples[0][2] * 1.5 + 1.0  # a record that no longer matches the cached entry
    with pytest.raises(ss.AdapterError, match=f"module '{module}'"):
        check_adapter_against(adapter, checkpoint, norms=False)
