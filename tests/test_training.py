"""Training: real task, all four methods, one loop; CLI errors; PEFT dirs load in our runtime."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import sora_serve as ss
from sora_serve.cli import main as cli_main
from sora_serve.errors import AdapterError
from sora_serve.tiny import BUILTIN_TEXT, make_tiny_model
from sora_serve.training.train import TrainConfig, minilm_path, train_adapter

from .helpers import fine_tuned_like, max_abs, perturb_adapter, random_ids


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
        model=minilm_path(),
        data=sst2_subset / "train.tsv",
        eval_data=sst2_subset / "dev.tsv",
        task="seq-cls",
        method=method,
        r=8,
        target_modules=["query", "value"],
        steps=40,
        batch_size=16,
        lr=5e-3,
        out=tmp_path / method,
        progress=False,
    )
    metrics = train_adapter(cfg)
    assert metrics["eval_after"]["loss"] < metrics["eval_before"]["loss"] - 0.02
    assert metrics["eval_after"]["accuracy"] > 0.6  # 0.5 is chance
    saved = json.loads((tmp_path / method / "metrics.json").read_text())
    assert len(saved["loss_curve"]) == 40 and saved["trainable_params"] == metrics["trainable_params"]


def test_causal_lm_on_builtin_text_and_peft_dirs_load_in_our_runtime(tiny_checkpoints, tmp_path):
    """Trained LoRA/DoRA dirs are PEFT's own and, like ours, record their base: a base of the same
    shapes whose weights moved as a fine-tune moves them is refused."""
    base_dir = tiny_checkpoints["qwen2"]
    ids = random_ids(512)
    for method in ("lora", "dora", "sora"):
        out = tmp_path / method
        metrics = train_adapter(
            TrainConfig(model=base_dir, data=BUILTIN_TEXT * 3, method=method, steps=8, lr=5e-3, out=out, progress=False)
        )
        assert metrics["eval_after"]["loss"] < metrics["eval_before"]["loss"]
        ours = ss.load_adapter(make_tiny_model("qwen2"), out)
        with torch.no_grad():
            got = ours(ids).logits
            if method != "sora":  # LoRA/DoRA were written by PEFT: PEFT's forward is the reference
                expected = PeftModel.from_pretrained(make_tiny_model("qwen2"), out).eval()(ids).logits
                assert max_abs(got, expected) <= 1e-5
            assert max_abs(got, make_tiny_model("qwen2")(ids).logits) > 1e-4  # training changed the model
        with pytest.raises(AdapterError, match="sampled entries differ by more than a dtype cast"):
            ss.load_adapter(fine_tuned_like(make_tiny_model("qwen2"), 1e-3, seed=5), out)


def test_cli_errors_are_clear_and_leave_nothing(tiny_checkpoints, tmp_path, capsys):
    base = str(tiny_checkpoints["llama"])
    data = tmp_path / "data.txt"
    data.write_text("\n".join(BUILTIN_TEXT))
    with pytest.raises(SystemExit) as exc:
        cli_main(["train", "--model", base, "--data", str(data), "--method", "vera", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "invalid choice: 'vera'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(
            [
                "train",
                "--model",
                base,
                "--data",
                str(data),
                "--method",
                "sora",
                "--out",
                str(tmp_path / "o"),
                "--r",
                "0",
            ]
        )
    assert exc.value.code == 2 and "--r: must be a positive integer" in capsys.readouterr().err

    assert (
        cli_main(
            [
                "train",
                "--model",
                base,
                "--data",
                str(tmp_path / "missing.jsonl"),
                "--method",
                "sora",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 1
    )
    assert "missing.jsonl: data file not found" in capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    assert (
        cli_main(["train", "--model", base, "--data", str(bad), "--method", "sora", "--out", str(tmp_path / "o")]) == 1
    )
    assert "bad.jsonl: field 'text': line 2" in capsys.readouterr().err

    labels = tmp_path / "labels.tsv"
    labels.write_text("sentence\tlabel\ngood\t1\nbad\tpositive\n")
    assert (
        cli_main(
            [
                "train",
                "--model",
                base,
                "--data",
                str(labels),
                "--method",
                "sora",
                "--task",
                "seq-cls",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 1
    )
    assert "field 'row 3 label'" in capsys.readouterr().err

    assert (
        cli_main(
            [
                "train",
                "--model",
                base,
                "--data",
                str(data),
                "--method",
                "sora",
                "--device",
                "gpu0",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 1
    )
    assert "field 'device'" in capsys.readouterr().err

    assert (
        cli_main(
            ["train", "--model", str(tmp_path), "--data", str(data), "--method", "sora", "--out", str(tmp_path / "o")]
        )
        == 1
    )
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
    ss.attach(
        model,
        ss.AdapterConfig(method=method, r=4, r_p=2, rotation=rotation, target_modules="all-linear"),
        "a",
        verbose=False,
    )
    perturb_adapter(model, "a", scale=0.1)
    ids = random_ids(model.config.vocab_size)

    base_calls = []
    next(layer for _, layer in ss.adapted_layers(model)).base_layer.register_forward_hook(
        lambda *_: base_calls.append(1)
    )

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
        train_adapter(
            TrainConfig(
                model=tiny_checkpoints["llama"],
                data=BUILTIN_TEXT,
                method="lora",
                steps=1,
                recompute_base=True,
                progress=False,
            )
        )


def test_methods_draw_their_own_adapter_init_but_share_data_order(tiny_checkpoints, tmp_path):
    """Same seed: the same batches for every method, but LoRA and DoRA no longer start from the
    same A (they used to, so short runs gave identical per-seed numbers); a rerun repeats exactly."""

    def lora_a(method: str, seed: int) -> torch.Tensor:
        out = tmp_path / f"{method}-{seed}"
        metrics = train_adapter(
            TrainConfig(
                model=tiny_checkpoints["llama"],
                data=BUILTIN_TEXT,
                method=method,
                steps=1,
                lr=1e-9,
                seed=seed,
                target_modules=["q_proj"],
                out=out,
                force=True,
                progress=False,
            )
        )
        tensors = load_file(str(out / "adapter_model.safetensors"))
        return next(v for k, v in sorted(tensors.items()) if "lora_A" in k), metrics["loss_curve"][0]

    (a_lora, loss_lora), (a_dora, loss_dora) = lora_a("lora", 0), lora_a("dora", 0)
    assert not torch.equal(a_lora, a_dora)
    assert loss_lora == pytest.approx(loss_dora, abs=1e-6)  # B = 0 at init: same model, same first batch, same loss
    assert torch.equal(lora_a("lora", 0)[0], a_lora) and not torch.equal(lora_a("lora", 1)[0], a_lora)


def dense_rotation(c: torch.Tensor, d: torch.Tensor, s0: float, rotation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, R) built densely in float64: the reference for the low-rank diagnostics."""
    s_p = min(1.0, s0 / (c.norm() + d.norm() + 1e-6).item())
    k = s_p * (d @ c.T - c @ d.T)
    eye = torch.eye(k.shape[0], dtype=k.dtype)
    return k, eye + k if rotation == "first_order" else torch.linalg.solve(eye - k, eye + k)


@pytest.mark.parametrize("rotation", ["first_order", "cayley"])
def test_sora_diagnostics_match_dense_float64(rotation):
    """|K|_2 and |R^T R - I|_2 from the low-rank formulas equal the dense ones (tolerance 1e-10).
    The defect they expose: s_p does not bound K (|K| grows with |C| + |D|), and the first-order
    R = I + K then amplifies every layer by sqrt(1 + |K|^2); Cayley stays orthogonal."""
    torch.manual_seed(3)
    layer = ss.attach(
        torch.nn.Sequential(torch.nn.Linear(24, 40)),
        ss.AdapterConfig(method="sora", r=2, r_p=3, rotation=rotation, target_modules=["0"]),
        "a",
        verbose=False,
    )
    adapter = layer[0].adapters["a"]
    for growth in (1.0, 10.0):
        with torch.no_grad():
            adapter.sora_C.copy_(growth * torch.randn(40, 3))
            adapter.sora_D.copy_(growth * torch.randn(40, 3))
        got = adapter.diagnostics()
        k, r = dense_rotation(adapter.sora_C.double(), adapter.sora_D.double(), adapter.s0, rotation)
        eye = torch.eye(40, dtype=torch.float64)
        assert got["K_norm"] == pytest.approx(torch.linalg.matrix_norm(k, ord=2).item(), rel=1e-10)
        assert got["orth_error"] == pytest.approx(
            torch.linalg.matrix_norm(r.T @ r - eye, ord=2).item(), rel=1e-8, abs=1e-12
        )
        if growth == 10.0:
            assert got["K_norm"] > 5  # s_p = s0 / (|C| + |D|) leaves |K| ~ s0 (|C| + |D|) / 2
            assert (got["orth_error"] > 25) if rotation == "first_order" else (got["orth_error"] < 1e-9)


def test_diagnostics_are_logged_during_training(tiny_checkpoints, tmp_path):
    metrics = train_adapter(
        TrainConfig(
            model=tiny_checkpoints["llama"],
            data=BUILTIN_TEXT,
            method="sora",
            steps=6,
            diagnostics_every=2,
            out=tmp_path / "a",
            progress=False,
        )
    )
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())["diagnostics"]
    assert saved == metrics["diagnostics"] and [d["step"] for d in saved] == [2, 4, 6]
    assert all(
        d["K_norm_max"] > 0 and d["d_minus_1_max"] > 0 and d["orth_error_max"] < 1e-9 and d["s_p_min"] <= 1
        for d in saved
    )
    dora = train_adapter(
        TrainConfig(model=tiny_checkpoints["llama"], data=BUILTIN_TEXT, method="dora", steps=2, lr=1e-2, progress=False)
    )
    assert dora["diagnostics"][-1]["m_over_m0_minus_1_max"] > 0 and "K_norm_max" not in dora["diagnostics"][-1]


def test_quality_budgets_are_matched_at_the_same_scale():
    """The quality suite's ranks give every method exactly the same trainable parameters on
    all-MiniLM-L6-v2 (query/value), and the same s = alpha / r on every adapted module."""
    from benchmarks.quality import METHODS, SCALE
    from sora_serve.training.train import add_adapter, load_model

    counts, scales = {}, set()
    for name, method in METHODS.items():
        cfg = TrainConfig(
            model=minilm_path(), data=[], task="seq-cls", target_modules=["query", "value"], **method.train_kwargs()
        )
        model = add_adapter(load_model(cfg, num_labels=2)[0], cfg)
        counts[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        peft_scales = [
            s for m in model.modules() if isinstance(getattr(m, "scaling", None), dict) for s in m.scaling.values()
        ]
        our_scales = [adapter.scaling for _, layer in ss.adapted_layers(model) for adapter in layer.adapters.values()]
        assert len(peft_scales) + len(our_scales) == 12  # query and value in 6 layers
        scales |= set(peft_scales + our_scales)
    assert len(set(counts.values())) == 1, counts
    assert scales == {SCALE}
