"""Training: real task, all four methods, one loop; CLI errors; PEFT dirs load in our runtime."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from peft import PeftModel

import sora_serve as ss
from sora_serve.cli import main as cli_main
from sora_serve.errors import AdapterError
from sora_serve.tiny import BUILTIN_TEXT, make_tiny_model
from sora_serve.training.train import TrainConfig, minilm_path, train_adapter

from .helpers import max_abs, perturb_adapter, random_ids


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

    assert cli_main(["train", "--model", base, "--data", str(data), "--method", "sora", "--device", "gpu0", "--out", str(tmp_path / "o")]) == 1
    assert "field 'device'" in capsys.readouterr().err

    assert cli_main(["train", "--model", str(tmp_path), "--data", str(data), "--method", "sora", "--out", str(tmp_path / "o")]) == 1
    assert "no config.json" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "data.txt", "labels.tsv"]

    out = tmp_path / "o"
    args = ["train", "--model", base, "--data", str(data), "--method", "prediag", "--out", str(out), "--steps", "2"]
    assert cli_main(args) == 0 and (out / "adapter_config.json").is_file()
    assert cli_main(args) == 1 and "output exists" in capsys.readouterr().err
    assert cli_main(args + ["--force"]) == 0


@pytest.mark.parametrize("method,rotation", [("prediag", "first_order"), ("sora", "first_order"), ("sora", "cayley")])
def test_recompute_base_gives_the_same_loss_and_gradients(method, rotation):
    """--recompute-base (activation checkpointing of each adapted layer) changes memory, not math."""
    model = make_tiny_model("llama").double()
    ss.attach(model, ss.AdapterConfig(method=method, r=4, r_p=2, rotation=rotation, target_modules="all-linear"), "a", verbose=False)
    perturb_adapter(model, "a", scale=0.1)
    ids = random_ids(model.config.vocab_size)

    base_calls = []
    next(layer for _, layer in ss.adapted_layers(model)).base_layer.register_forward_hook(lambda *_: base_calls.append(1))

    def loss_and_grads(recompute: bool) -> tuple[float, dict[str, torch.Tensor]]:
        for _, layer in ss.adapted_layers(model):
            layer.recompute_base = recompute
        model.zero_grad(set_to_none=True)
        base_calls.clear()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = loss_and_grads(False)
    assert len(base_calls) == 1
    loss_recomputed, grads_recomputed = loss_and_grads(True)
    assert len(base_calls) == 2  # W0 x computed again in backward
    assert loss_recomputed == loss and grads.keys() == grads_recomputed.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.allclose(grads_recomputed[name], grad, rtol=0, atol=1e-12), name  # float64: same ops, same order


def test_recompute_base_is_refused_for_peft_methods(tiny_checkpoints):
    with pytest.raises(AdapterError, match="recompute_base"):
        train_adapter(TrainConfig(model=tiny_checkpoints["llama"], data=BUILTIN_TEXT, method="lora", steps=1, recompute_base=True, progress=False))
