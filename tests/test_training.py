"""Training: real task, all four methods, one loop; CLI errors; PEFT dirs load in our runtime."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from peft import PeftModel

import sora_serve as ss
from sora_serve.cli import main as cli_main
from sora_serve.tiny import BUILTIN_TEXT, make_tiny_model
from training.train import TrainConfig, minilm_path, train_adapter

from .helpers import max_abs, random_ids


@pytest.fixture(scope="module")
def sst2_subset(sst2_dir, tmp_path_factory):
    """The first 960 training sentences and 160 dev sentences of SST-2, as TSV files."""
    root = tmp_path_factory.mktemp("sst2")
    for name, source, n in (("train.tsv", "train_full.tsv", 960), ("dev.tsv", "dev.tsv", 160)):
        with (sst2_dir / source).open(newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))[: n + 1]
        with (root / name).open("w", newline="") as f:
            csv.writer(f, delimiter="\t").writerows(rows)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora", "prediag", "sora"])
def test_training_lowers_eval_loss_on_sst2_with_minilm(method, sst2_subset, tmp_path):
    cfg = TrainConfig(
        model=minilm_path(), data=sst2_subset / "train.tsv", eval_data=sst2_subset / "dev.tsv", task="seq-cls",
        method=method, r=8, target_modules=["query", "value"], steps=40, batch_size=16, lr=5e-3, out=tmp_path / method, progress=False,
    )
    metrics = train_adapter(cfg)
    assert metrics["eval_after"]["loss"] < metrics["eval_before"]["loss"] - 0.02
    assert metrics["eval_after"]["accuracy"] > 0.6  # 0.5 is chance
    saved = json.loads((tmp_path / method / "metrics.json").read_text())
    assert len(saved["loss_curve"]) == 40 and saved["trainable_params"] == metrics["trainable_params"]


def test_causal_lm_on_builtin_text_and_peft_dirs_load_in_our_runtime(tiny_checkpoints, tmp_path):
    base_dir = tiny_checkpoints["qwen2"]
    ids = random_ids(512)
    for method in ("lora", "dora", "sora"):
        out = tmp_path / method
        metrics = train_adapter(TrainConfig(model=base_dir, data=BUILTIN_TEXT * 3, method=method, steps=8, lr=5e-3, out=out, progress=False))
        assert metrics["eval_after"]["loss"] < metrics["eval_before"]["loss"]
        ours = ss.load_adapter(make_tiny_model("qwen2"), out)
        with torch.no_grad():
            got = ours(ids).logits
            if method != "sora":  # LoRA/DoRA were written by PEFT: PEFT's forward is the reference
                expected = PeftModel.from_pretrained(make_tiny_model("qwen2"), out).eval()(ids).logits
                assert max_abs(got, expected) <= 1e-5
            assert max_abs(got, make_tiny_model("qwen2")(ids).logits) > 1e-4  # training changed the model


def test_cli_errors_are_clear_and_leave_nothing(tiny_checkpoints, tmp_path, capsys):
    base = str(tiny_checkpoints["llama"])
    data = tmp_path / "data.txt"
    data.write_text("\n".join(BUILTIN_TEXT))
    with pytest.raises(SystemExit) as exc:
        cli_main(["train", "--model", base, "--data", str(data), "--method", "vera", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "invalid choice: 'vera'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(["train", "--model", base, "--data", str(data), "--method", "sora", "--out", str(tmp_path / "o"), "--r", "0"])
    assert exc.value.code == 2 and "--r: must be a positive integer" in capsys.readouterr().err

    assert cli_main(["train", "--model", base, "--data", str(tmp_path / "missing.jsonl"), "--method", "sora", "--out", str(tmp_path / "o")]) == 1
    assert "missing.jsonl: data file not found" in capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    assert cli_main(["train", "--model", base, "--data", str(bad), "--method", "sora", "--out", str(tmp_path / "o")]) == 1
    assert "bad.jsonl: field 'text': line 2" in capsys.readouterr().err

    labels = tmp_path / "labels.tsv"
    labels.write_text("sentence\tlabel\ngood\t1\nbad\tpositive\n")
    assert cli_main(["train", "--model", base, "--data", str(labels), "--method", "sora", "--task", "seq-cls", "--out", str(tmp_path / "o")]) == 1
    assert "field 'row 3 label'" in capsys.readouterr().err

    assert cli_main(["train", "--model", str(tmp_path), "--data", str(data), "--method", "sora", "--out", str(tmp_path / "o")]) == 1
    assert "no config.json" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "data.txt", "labels.tsv"]

    out = tmp_path / "o"
    args = ["train", "--model", base, "--data", str(data), "--method", "prediag", "--out", str(out), "--steps", "2"]
    assert cli_main(args) == 0 and (out / "adapter_config.json").is_file()
    assert cli_main(args) == 1 and "output exists" in capsys.readouterr().err
    assert cli_main(args + ["--force"]) == 0
