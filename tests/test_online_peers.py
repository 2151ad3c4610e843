"""The online load test's peers (stock vLLM, llama.cpp) without starting one: each server's request
dialect, the same workload on every server, the comparison tables, and the llama.cpp build,
conversion and server command lines."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest

from benchmarks import llama_cpp, online
from benchmarks.serve_process import running_process

PLAN = online.LoadPlan(rates=(2.0, 8.0), requests_per_rate=12, prompt_len=(8, 32), output_len=(4, 12), ttft_slo_s=1.0)
LORAS = {f"lora{i}": f"/adapters/lora{i}" for i in range(4)}
SETS = {"LoRA only": LORAS, "SORA only": {f"sora{i}": f"/adapters/sora{i}" for i in range(4)}}
COMPARISONS = {"one LoRA": {"lora0": LORAS["lora0"]}, "four LoRAs": LORAS}


# ---------------------------------------------------------------- dialects


def test_vllm_body_names_the_adapter_as_model():
    body = online.completion_body(online.Request(0.0, "lora2", [5, 6, 7], 9))
    assert body["model"] == "lora2" and body["prompt"] == [5, 6, 7] and body["max_tokens"] == 9
    assert body["ignore_eos"] and body["stream"] and body["stream_options"] == {"include_usage": True}
    assert "lora" not in body


def test_llama_cpp_body_scales_the_named_adapter_only():
    ids = llama_cpp.lora_ids(["lora0", "lora1", "lora2"])
    body = online.completion_body(online.Request(0.0, "lora1", [5, 6], 3), ids)
    assert body["lora"] == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}, {"id": 2, "scale": 0.0}]
    assert body["max_tokens"] == 3 and body["ignore_eos"] and body["stream"]


def test_llama_cpp_base_body_lists_every_adapter_at_zero():
    """An empty `lora` list would keep the slot's previous adapters: the base names them all at 0."""
    body = online.completion_body(online.Request(0.0, online.BASE_NAME, [5], 1), llama_cpp.lora_ids(["a", "b"]))
    assert body["lora"] == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}]


# ---------------------------------------------------------------- workloads


def test_round_robin_workload_shares_arrivals_prompts_and_lengths():
    mixed = online.workload(PLAN, 8.0, list(LORAS), 512)
    cycled = online.workload(PLAN, 8.0, list(LORAS), 512, round_robin=True)
    assert [(r.arrival_s, r.prompt, r.max_tokens) for r in mixed] == [
        (r.arrival_s, r.prompt, r.max_tokens) for r in cycled
    ]
    assert [r.model for r in cycled] == [f"lora{i % 4}" for i in range(PLAN.requests_per_rate)]
    assert online.BASE_NAME in {r.model for r in mixed}


def run_recorded(monkeypatch, peers: tuple[str, ...]) -> tuple[dict, list[tuple[str, list, dict | None]]]:
    """`run_online` with no server: each server a fake URL, each load recorded, every request served."""
    sent = []

    @contextlib.contextmanager
    def fake_serving(server, model, adapters, **_):
        yield f"http://{server}", 1.0, llama_cpp.lora_ids(list(adapters)) if server == online.LLAMA_CPP else None

    async def fake_load(url, requests, max_in_flight, lora_ids=None):
        sent.append((url.removeprefix("http://"), requests, lora_ids))
        return [
            {"model": r.model, "prompt_len": len(r.prompt), "output_len": r.max_tokens, "ttft_s": 0.1, "tpot_s": 0.01}
            | {"latency_s": 0.2}
            for r in requests
        ], 1.0

    monkeypatch.setattr(online, "serving", fake_serving)
    monkeypatch.setattr(online, "run_load", fake_load)
    monkeypatch.setattr(online, "warm_up", lambda *a, **k: None)
    monkeypatch.setattr(online, "server_info", lambda server: {})
    out = online.run_online(
        Path("/base"),
        SETS,
        PLAN,
        comparisons=COMPARISONS,
        stock_sets=["LoRA only"],
        peers=peers,
        max_loras=4,
        dtype="float32",
        vocab=512,
        log_dir=Path("/logs"),
    )
    return out, sent


def set_of(load: list) -> str:
    """Which of the test's sets a recorded load came from, by the models its requests name."""
    models = {r.model for r in load}
    if models <= {"lora0"}:
        return "one LoRA"
    if any(m.startswith("sora") for m in models):
        return "SORA only"
    return "LoRA only" if online.BASE_NAME in models else "four LoRAs"


def test_every_server_gets_the_same_comparison_workload(monkeypatch):
    out, sent = run_recorded(monkeypatch, (online.LLAMA_CPP,))
    assert list(out["servers"]) == [online.OURS, online.STOCK, online.LLAMA_CPP]
    assert {(r["server"], r["set"]) for r in out["results"].values()} == {
        *((online.OURS, s) for s in [*SETS, *COMPARISONS]),
        *((online.STOCK, s) for s in ["LoRA only", *COMPARISONS]),
        *((online.LLAMA_CPP, s) for s in COMPARISONS),
    }
    loads = {}
    for server, requests, _ in sent:
        loads.setdefault(server, []).append(requests)
    # each server runs its sets in turn at each rate: the comparison sets' loads (no base requests,
    # 2 sets x 2 rates) are the same on every server, in the same order
    compared = {
        server: [load for load in server_loads if online.BASE_NAME not in {r.model for r in load}]
        for server, server_loads in loads.items()
    }
    assert len(compared[online.OURS]) == 4
    assert compared[online.OURS] == compared[online.STOCK] == compared[online.LLAMA_CPP]
    # ours runs every set at a rate before the next rate, the order reversed at the second
    order = ["LoRA only", "SORA only", "one LoRA", "four LoRAs"]
    assert [set_of(load) for load in loads[online.OURS]] == order + order[::-1]
    assert out["peers_skipped"] == [] and out["comparison_sets"] == list(COMPARISONS)


def test_llama_cpp_runs_only_when_asked(monkeypatch):
    out, sent = run_recorded(monkeypatch, ())
    assert online.LLAMA_CPP not in out["servers"] and out["peers_skipped"] == [online.LLAMA_CPP]
    assert {server for server, _, _ in sent} == {online.OURS, online.STOCK}
    assert "--peers llama.cpp" in "\n".join(online.markdown(out | {"servers": servers_with_start(out)}))


def test_unknown_peer_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="unknown peers"):
        run_recorded(monkeypatch, ("tgi",))


# ---------------------------------------------------------------- report


def servers_with_start(out: dict) -> dict:
    return {server: {"start_s": 3.0, **info} for server, info in out["servers"].items()}


def rate_row(rate: float, tpot_p50: float, ttft_p90: float) -> dict:
    return {
        "rate": rate,
        "requests": 4,
        "errors": 0,
        "error_messages": [],
        "wall_s": 2.0,
        "request_throughput": 2.0,
        "output_tok_per_s": 20.0,
        "ttft_s": {"p50": ttft_p90 / 2, "p90": ttft_p90, "p99": ttft_p90},
        "tpot_s": {"p50": tpot_p50, "p90": tpot_p50, "p99": tpot_p50},
        "latency_s": {"p50": 1.0, "p90": 1.0, "p99": 1.0},
        "samples": [],
    }


def synthetic_online() -> dict:
    """Ours twice as fast as llama.cpp, as fast as stock, at one rate on one comparison set."""
    results = {}
    for server, tpot, ttft in ((online.OURS, 0.02, 0.5), (online.STOCK, 0.02, 0.5), (online.LLAMA_CPP, 0.04, 1.0)):
        rows = [rate_row(2.0, tpot, ttft)]
        results[online.result_key(server, "one LoRA")] = {
            "server": server,
            "set": "one LoRA",
            "rates": rows,
            "max_rate_within_slo": 2.0,
        }
    build = {"llama_cpp_python": "0.3.36", "llama_cpp_commit": "0c1e57098", "cmake_flags": []}
    return {
        "plan": {**online.asdict(PLAN), "rates": [2.0]},
        "max_loras": 4,
        "sets": {"one LoRA": ["lora0"]},
        "comparison_sets": ["one LoRA"],
        "peers_skipped": [],
        "servers": {
            online.OURS: {"start_s": 30.0, "sets": ["one LoRA"]},
            online.STOCK: {"start_s": 25.0, "sets": ["one LoRA"]},
            online.LLAMA_CPP: {"start_s": 2.0, "sets": ["one LoRA"], "build": build, "parallel": 8, "threads": 2},
        },
        "results": results,
    }


def test_comparison_rows_pair_ours_with_the_peer():
    (row,) = online.comparison(synthetic_online(), online.LLAMA_CPP)
    assert row == {
        "set": "one LoRA",
        "rate": 2.0,
        "ours_tpot_p50_s": 0.02,
        "peer_tpot_p50_s": 0.04,
        "ours_ttft_p90_s": 0.5,
        "peer_ttft_p90_s": 1.0,
    }


def test_markdown_has_a_server_column_and_both_comparison_tables():
    md = "\n".join(online.markdown(synthetic_online()))
    assert "| llama.cpp | one LoRA (lora0) | 2 |" in md
    assert "| one LoRA | 2 | 20.0 / 40.0 | 0.50 | 0.50 / 1.00 | 0.50 |" in md  # ours vs llama.cpp
    assert "| one LoRA | 2 | 20.0 / 20.0 | 1.00 | 0.50 / 0.50 | 1.00 |" in md  # ours vs stock
    assert md.index("Ours against llama.cpp") < md.index("Ours against stock vLLM")
    assert "0c1e57098" in md and "--peers llama.cpp` builds it" not in md


def test_comparison_table_dashes_a_rate_without_successes():
    data = synthetic_online()
    data["results"][online.result_key(online.LLAMA_CPP, "one LoRA")]["rates"][0] |= {"ttft_s": None, "tpot_s": None}
    assert "| one LoRA | 2 | – | – | – | – |" in online.comparison_markdown(
        online.comparison(data, online.LLAMA_CPP), online.LLAMA_CPP
    )


def test_latency_plot_has_a_row_per_comparison_set():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    fig = online.latency_plot(synthetic_online())
    assert len(fig.axes) == 2  # one row (one LoRA; no own sets here): TTFT and TPOT


# ---------------------------------------------------------------- command lines


def test_stock_vllm_command_serves_the_loras_without_our_plugin_settings():
    command = online.stock_vllm_command(Path("/base"), LORAS, max_loras=4, dtype="bfloat16", port=9000)
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    text = " ".join(command)
    for flag in ("--enable-lora", "--max-loras 4", "--max-lora-rank 16", "--max-cpu-loras 8", "--max-model-len 512"):
        assert flag in text
    assert "--max-num-seqs 64" in text and "--dtype bfloat16" in text and "--port 9000" in text
    assert command[command.index("--lora-modules") + 1 :] == [f"{n}={p}" for n, p in LORAS.items()]
    assert command[command.index("--served-model-name") + 1] == online.BASE_NAME


def test_llama_server_command_loads_every_lora_unapplied():
    command = llama_cpp.server_command(
        Path("/b/llama-server"),
        Path("/g/base.gguf"),
        [Path("/g/a.gguf"), Path("/g/b.gguf")],
        port=8123,
        threads=2,
        parallel=8,
    )
    assert command[:3] == ["/b/llama-server", "-m", "/g/base.gguf"]
    assert command[3:7] == ["--lora", "/g/a.gguf", "--lora", "/g/b.gguf"]
    assert "--lora-init-without-apply" in command
    assert command[command.index("-c") + 1] == str(8 * llama_cpp.CONTEXT_PER_SLOT)
    assert command[command.index("--parallel") + 1] == "8" and command[command.index("-t") + 1] == "2"
    assert command[-4:] == ["--host", "127.0.0.1", "--port", "8123"]


def test_build_commands_configure_natively_and_build_only_the_server():
    configure = llama_cpp.configure_command(Path("/s"), Path("/b"))
    assert configure[:5] == ["cmake", "-S", "/s", "-B", "/b"] and "-DGGML_NATIVE=ON" in configure
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in configure  # no fetch from the hub at build time
    assert llama_cpp.build_command(Path("/b"), 2) == ["cmake", "--build", "/b", "--target", "llama-server", "-j", "2"]
    download = llama_cpp.download_command("0.3.36", Path("/d"))
    assert "llama-cpp-python==0.3.36" in download and download[download.index("--no-binary") + 1] == ":all:"


def test_conversion_commands_use_the_vendored_converters():
    base = llama_cpp.convert_base_command(Path("/s"), Path("/m"), Path("/o/base.gguf"), "bf16")
    assert base == [sys.executable, "/s/convert_hf_to_gguf.py", "/m", "--outfile", "/o/base.gguf", "--outtype", "bf16"]
    lora = llama_cpp.convert_lora_command(Path("/s"), Path("/a/lora0"), Path("/m"), Path("/o/l.gguf"), "f32")
    assert lora[1:3] == ["/s/convert_lora_to_gguf.py", "/a/lora0"]
    assert lora[lora.index("--base") + 1] == "/m" and lora[lora.index("--outtype") + 1] == "f32"


def test_cached_files_are_keyed_by_version_and_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setenv("SORA_BENCH_CACHE", str(tmp_path))
    assert llama_cpp.server_binary("9.9.9") == tmp_path / "llama.cpp-9.9.9" / "build" / "bin" / "llama-server"
    assert llama_cpp.gguf_dir(Path("/c/base-512x4-x"), "9.9.9") == tmp_path / "gguf-base-512x4-x" / "llama.cpp-9.9.9"


def test_changelog_names_the_vendored_commit():
    changelog = "## [Unreleased]\n\n## [0.3.36]\n\n- feat: update llama.cpp to ggml-org/llama.cpp@0c1e57098\n\n"
    changelog += "## [0.3.35]\n\n- feat: update llama.cpp to ggml-org/llama.cpp@4df29be4f\n"
    assert llama_cpp.changelog_commit(changelog, "0.3.36") == "0c1e57098"
    assert llama_cpp.changelog_commit(changelog, "0.3.35") == "4df29be4f"
    assert llama_cpp.changelog_commit(changelog, "0.1.0") is None


def test_sentencepiece_model_has_one_word_piece_per_id(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    path = tmp_path / "tokenizer.model"
    path.write_bytes(llama_cpp.sentencepiece_model(16))
    tokenizer = spm.SentencePieceProcessor(model_file=str(path))
    assert [tokenizer.IdToPiece(i) for i in range(16)] == [f"t{i}" for i in range(16)]
    assert tokenizer.IsControl(0) and tokenizer.IsUnknown(1) and not tokenizer.IsControl(2)


# ---------------------------------------------------------------- the process runner


def test_running_process_waits_for_health_and_names_a_dead_server(tmp_path):
    """Any command that takes a port (here a 20-line Python server); the name is in the error."""
    script = tmp_path / "health.py"
    script.write_text(
        "import sys, http.server\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.end_headers(); self.wfile.write(b'ok')\n"
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
    )
    with running_process(lambda port: [sys.executable, str(script), str(port)], tmp_path / "a.log", name="toy") as (
        url,
        process,
        started_s,
    ):
        assert url.startswith("http://127.0.0.1:") and process.poll() is None and started_s >= 0
    assert process.poll() is not None
    with pytest.raises(RuntimeError, match="toy exited with status 3"):
        with running_process(lambda port: [sys.executable, "-c", "exit(3)"], tmp_path / "b.log", name="toy"):
            pass


def test_targets_take_each_comparison_at_its_worst_rate():
    """Ours at half llama.cpp's TPOT and TTFT on one LoRA meets 'no worse'; SORA-only at 1.2x
    LoRA-only's TPOT on one rate fails the 10% target though the other rate is equal; four LoRAs
    not run is 'not measured', not met; llama.cpp's failures do not count against ours."""
    data = synthetic_online()
    for set_name, tpot in (("LoRA only", (0.02, 0.02)), ("SORA only", (0.02, 0.024))):
        data["results"][online.result_key(online.OURS, set_name)] = {
            "server": online.OURS,
            "set": set_name,
            "rates": [rate_row(2.0, tpot[0], 0.5), rate_row(8.0, tpot[1], 0.5)],
        }
    data["results"][online.result_key(online.LLAMA_CPP, "one LoRA")]["rates"][0]["errors"] = 3
    found = {t.name: t for t in online.targets(data)}
    sora_tpot = found["online SORA only / LoRA only, TPOT p50 (worst rate)"]
    assert sora_tpot.value == pytest.approx(1.2) and sora_tpot.met is False
    assert found["online SORA only / LoRA only, TTFT p90 (worst rate)"].met is True
    one = found["online one LoRA: ours / llama.cpp, TPOT P50 (worst rate)"]
    assert one.value == pytest.approx(0.5) and one.met is True
    assert found["online four LoRAs: ours / llama.cpp, TTFT P90 (worst rate)"].met is None
    assert found["online load: failed requests of ours (all sets, all rates)"].value == 0
