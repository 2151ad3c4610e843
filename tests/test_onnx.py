"""ONNX: merged decoder with KV cache = PyTorch; switchable-adapter graph = runtime adapters."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForCausalLM

import sora_serve as ss
from sora_serve.cli import main as cli_main
from sora_serve.converters.fold import fold_adapter
from sora_serve.converters.onnx_export import FACTOR_NAMES, export_onnx
from sora_serve.converters.onnx_runtime import OnnxCausalLM

from .helpers import ATTENTION_AND_MLP, random_ids, write_random_adapter
from .reference import NEW_TOKENS, ONNX_TOL, generate_greedy


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_merged_export_generates_the_same_tokens(tiny_checkpoints, tmp_path, arch):
    adapter = write_random_adapter(
        tmp_path / "sora",
        arch=arch,
        method="sora",
        r=4,
        r_p=2,
        rotation="cayley",
        target_modules=list(ATTENTION_AND_MLP[arch]),
    )
    merged = tmp_path / "merged"
    fold_adapter(tiny_checkpoints[arch], adapter, merged, verify=False, progress=False)
    result = export_onnx(merged, tmp_path / "onnx", verify=True)
    assert result["mode"] == "merged" and result["max_abs_error"]["base"] <= ONNX_TOL

    torch_model = AutoModelForCausalLM.from_pretrained(merged).eval()
    prompt = random_ids(512, batch=2, length=6, seed=5)
    expected = generate_greedy(torch_model, prompt)
    with torch.no_grad():
        logits = torch_model(torch.from_numpy(expected)).logits.numpy()
    onnx_lm = OnnxCausalLM(tmp_path / "onnx")
    assert np.array_equal(onnx_lm.generate(prompt.numpy(), NEW_TOKENS), expected)  # prefill + 16 cached steps
    assert np.abs(onnx_lm.logits(expected) - logits).max() <= ONNX_TOL
    # A left-padded batch (prompts of different lengths): same tokens as transformers' generate.
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    padded = generate_greedy(torch_model, prompt, attention_mask=mask)
    assert np.array_equal(onnx_lm.generate(prompt.numpy(), NEW_TOKENS, attention_mask=mask.numpy()), padded)
    if arch == "llama":  # --force replaces a finished export (here by the unmerged base)
        export_onnx(tiny_checkpoints[arch], tmp_path / "onnx", force=True, verify=False)
        with torch.no_grad():
            base_logits = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch])(
                torch.from_numpy(expected)
            ).logits.numpy()
        assert np.abs(OnnxCausalLM(tmp_path / "onnx").logits(expected) - base_logits).max() <= ONNX_TOL


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_switchable_adapters_match_the_runtime(tiny_checkpoints, tmp_path, arch):
    base = tiny_checkpoints[arch]
    mlp = {"qwen2": ("q_proj", "o_proj", "up_proj"), "gpt2": ("c_fc", "c_proj")}[arch]
    kinds = {  # different kinds, ranks and layer sets: padding to r_max / k_max and the union of layers
        "lora4": ("lora", 4, "first_order", ATTENTION_AND_MLP[arch]),
        "prediag8": ("prediag", 8, "first_order", mlp),
        "soracay": ("sora", 8, "cayley", ATTENTION_AND_MLP[arch]),
        "dora2": ("dora", 2, "first_order", ATTENTION_AND_MLP[arch]),
    }
    adapters = [
        write_random_adapter(
            tmp_path / name,
            arch=arch,
            method=method,
            r=r,
            r_p=2,
            rotation=rotation,
            target_modules=list(targets),
            seed=seed,
        )
        for seed, (name, (method, r, rotation, targets)) in enumerate(kinds.items(), start=1)
    ]
    out = tmp_path / "onnx"
    assert (
        cli_main(
            [
                "export-onnx",
                "--model",
                str(base),
                "--out",
                str(out),
                "--mode",
                "adapters",
                "--no-verify",
                "--adapters",
                *map(str, adapters),
            ]
        )
        == 0
    )
    assert_adapter_inputs_have_identity_defaults(out / "model.onnx")

    onnx_lm = OnnxCausalLM(out)
    assert list(onnx_lm.adapters) == [a.name for a in adapters]
    ids = random_ids(512, batch=2, length=10, seed=7)
    runtime = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        base_logits = runtime(ids).logits.numpy()
    assert np.abs(onnx_lm.logits(ids.numpy()) - base_logits).max() <= ONNX_TOL
    for adapter in adapters:
        ss.load_adapter(runtime, adapter)  # made active
        with torch.no_grad():
            expected = runtime(ids).logits.numpy()
        assert np.abs(expected - base_logits).max() > 1e-3, f"{adapter.name} should change the logits"
        assert np.abs(onnx_lm.logits(ids.numpy(), adapter=adapter.name) - expected).max() <= ONNX_TOL, adapter.name
    # Greedy decoding with the KV cache and the last adapter loaded (SORA-Cayley is the richest op).
    ss.set_active_adapter(runtime, "soracay")
    prompt = random_ids(512, batch=2, length=5, seed=8)
    assert np.array_equal(
        onnx_lm.generate(prompt.numpy(), NEW_TOKENS, adapter="soracay"), generate_greedy(runtime, prompt)
    )
    # Adapters switch per run: back to the base with none.
    assert np.abs(onnx_lm.logits(ids.numpy()) - base_logits).max() <= ONNX_TOL
    with pytest.raises(ss.AdapterError, match="unknown adapter 'nope'"):
        onnx_lm.logits(ids.numpy(), adapter="nope")


@pytest.mark.slow  # torch.export is ~10x slower than the TorchScript tracer
def test_dynamo_exporter_gives_the_same_graph_behaviour(tiny_checkpoints, tmp_path):
    base = tiny_checkpoints["llama"]
    adapter = write_random_adapter(
        tmp_path / "sora",
        arch="llama",
        method="sora",
        r=4,
        r_p=2,
        rotation="cayley",
        target_modules=list(ATTENTION_AND_MLP["llama"]),
        seed=6,
    )
    result = export_onnx(base, tmp_path / "onnx", [adapter], exporter="dynamo", verify=True)
    assert max(result["max_abs_error"].values()) <= ONNX_TOL  # the base (nothing fed) and the adapter
    assert_adapter_inputs_have_identity_defaults(tmp_path / "onnx" / "model.onnx")
    runtime = ss.load_adapter(AutoModelForCausalLM.from_pretrained(base).eval(), adapter)
    prompt = random_ids(512, batch=2, length=5, seed=9)
    assert np.array_equal(
        OnnxCausalLM(tmp_path / "onnx").generate(prompt.numpy(), NEW_TOKENS, adapter="sora"),
        generate_greedy(runtime, prompt),
    )


@pytest.mark.parametrize("as_input", [True, False])
def test_onnxruntime_overrides_only_initializers_that_are_inputs(tmp_path, as_input):
    """The design assumption of the adapters mode, checked on ONNX Runtime itself: y = x + w, w = 0 by default."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x_info, w_info, y_info = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [2]) for name in "xwy")
    w_default = onnx.numpy_helper.from_array(np.zeros(2, np.float32), "w")
    inputs = [x_info, w_info] if as_input else [x_info]
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", inputs, [y_info], [w_default])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({"w": ort.OrtValue.ortvalue_from_numpy(np.array([1.0, 2.0], np.float32))})
    fmt.export_adapter(str(tmp_path / "w.onnx_adapter"))
    adapter = ort.LoraAdapter()
    adapter.Load(str(tmp_path / "w.onnx_adapter"))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    run_options = ort.RunOptions()
    run_options.add_active_adapter(adapter)
    x = {"x": np.ones(2, np.float32)}
    assert session.run(None, x)[0].tolist() == [1.0, 1.0]
    if as_input:
        assert session.run(None, x, run_options)[0].tolist() == [2.0, 3.0]
    else:
        with pytest.raises(Exception, match="Invalid input name: w"):
            session.run(None, x, run_options)


def assert_adapter_inputs_have_identity_defaults(path) -> None:
    """ONNX Runtime overrides only initializers that are also graph inputs (1.32: plain ones are
    'Invalid input name')."""
    graph = onnx.load(str(path)).graph
    inputs = {i.name for i in graph.input}
    defaults = {
        t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer if t.name.rsplit(".", 1)[-1] in FACTOR_NAMES
    }
    assert defaults and set(defaults) <= inputs
    assert {n.rsplit(".", 1)[-1] for n in defaults} == set(FACTOR_NAMES)
    for name, value in defaults.items():
        assert np.all(value == (1.0 if name.endswith(".scale") else 0.0)), name


def test_bad_input(tiny_checkpoints, tmp_path, capsys):
    with pytest.raises(ss.AdapterError, match="config.json: missing model config"):
        export_onnx(tmp_path, tmp_path / "out")
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(ss.AdapterError, match="output exists"):
        export_onnx(tiny_checkpoints["llama"], out, verify=False)
    other = write_random_adapter(
        tmp_path / "qwen-adapter",
        arch="qwen2",
        method="sora",
        r=4,
        r_p=2,
        rotation="first_order",
        target_modules=list(ATTENTION_AND_MLP["qwen2"]),
    )
    with pytest.raises(ss.AdapterError, match="base_fingerprint"):
        export_onnx(tiny_checkpoints["llama"], tmp_path / "out", [other], verify=False)
    with pytest.raises(ss.AdapterError, match="must be unique"):
        export_onnx(tiny_checkpoints["qwen2"], tmp_path / "out", [other, other], verify=False)
    with pytest.raises(ss.AdapterError, match="unknown exporter"):
        export_onnx(tiny_checkpoints["qwen2"], tmp_path / "out", exporter="optimum", verify=False)
    # The CLI reports the same errors (exit 1, one line), and refuses --adapters without --mode adapters.
    model = str(tiny_checkpoints["llama"])
    capsys.readouterr()
    assert cli_main(["export-onnx", "--model", model, "--out", str(out)]) == 1
    assert cli_main(["export-onnx", "--model", model, "--out", str(tmp_path / "out"), "--adapters", str(other)]) == 1
    assert cli_main(["export-onnx", "--model", model, "--out", str(tmp_path / "out"), "--mode", "adapters"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sora-serve export-onnx: error:")]
    assert len(err) == 3
    assert "output exists" in err[0] and "--mode adapters" in err[1]
    with pytest.raises(ss.AdapterError, match="no manifest"):
        OnnxCausalLM(tmp_path)
    # Nothing half-written: no output and no temporary folder left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "qwen-adapter"]
    assert list(out.iterdir()) == []
