"""An adapter store served on demand: `sora-serve serve --adapter-dir DIR`, requests name adapters in DIR."""

from __future__ import annotations

import asyncio
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import sora_serve as ss
from sora_serve.errors import AdapterError
from sora_serve.tiny import make_tiny_checkpoint, make_tiny_model

from .helpers import (
    complete,
    error_message,
    fine_tuned_like,
    new_tokens,
    post,
    running_server,
    save_base_copy,
    set_first_value,
    write_random_adapter,
)
from .reference import eager_greedy, eager_model, off_greedy

KINDS = {
    "lora": ss.AdapterConfig(method="lora", r=8, target_modules="all-linear"),
    "dora": ss.AdapterConfig(method="dora", r=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "prediag": ss.AdapterConfig(method="prediag", r=4, target_modules="all-linear"),
    "sora": ss.AdapterConfig(method="sora", rotation="cayley", r=8, r_p=2, target_modules="all-linear"),
}
PROMPT = [5, 17, 99, 23, 4, 61]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """base/ (tiny qwen2), store/ with one adapter per kind and bad ones, outside/ a valid adapter beside the store."""
    root = tmp_path_factory.mktemp("resolver")
    make_tiny_checkpoint("qwen2", root / "base")
    for i, (name, config) in enumerate(KINDS.items()):
        write_random_adapter(root / "store" / name, config, seed=i, scale=0.05)
    shutil.copytree(root / "store" / "sora", root / "store" / "nan")
    set_first_value(root / "store" / "nan", "lora_B.weight", float("nan"))
    shutil.copytree(root / "store" / "prediag", root / "store" / "text_rank")
    config_path = root / "store" / "text_rank" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "r": "16"}))
    # Valid files the engine refuses: only the base can tell (the resolver passes the engine's reason on).
    write_random_adapter(
        root / "store" / "headed",
        ss.AdapterConfig(method="prediag", r=4, target_modules=["q_proj", "lm_head"]),
        seed=7,
        scale=0.05,
    )
    write_random_adapter(root / "store" / "llama_sora", KINDS["sora"], seed=8, scale=0.05, arch="llama")
    # Trained on another qwen2 of the same shapes (a fine-tune-sized move of every weight): only the
    # fingerprint's sampled weights tell. In the store (the resolver) and under extra/ (runtime loads).
    for directory in (root / "store" / "other_base", root / "extra" / "other_base"):
        other = fine_tuned_like(make_tiny_model("qwen2"), 1e-3, seed=12)
        write_random_adapter(directory, KINDS["sora"], model=other, seed=12, scale=0.05)
    save_base_copy(
        make_tiny_model("qwen2"), root / "base_bf16", root / "base", torch.bfloat16
    )  # the same base, re-saved in bf16
    (root / "store" / "notes").mkdir()  # a directory without adapter_config.json is no adapter
    write_random_adapter(root / "outside", KINDS["lora"], seed=9, scale=0.05)
    (root / "store" / "escape").symlink_to(root / "outside")  # a store entry linking out of the store
    write_random_adapter(root / "extra" / "lora", KINDS["lora"], seed=10, scale=0.05)  # under --allow-load-from
    (root / "extra" / "link").symlink_to(root / "outside")
    return root


@pytest.fixture(scope="module")
def server(store):
    arguments = [
        "--model",
        str(store / "base"),
        "--max-loras",
        "2",
        "--adapter-dir",
        str(store / "store"),
        "--allow-load-from",
        str(store / "extra"),
        "--",
        "--served-model-name",
        "base",
    ]
    with running_server(arguments, store / "server.log") as (url, _):
        yield url


def load(url: str, name: str, path) -> tuple[int, dict | str]:
    return post(f"{url}/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})


@pytest.mark.slow
def test_requests_name_store_adapters_of_every_kind(store, server):
    """No load call: each kind is found in the store, and equals the eager runtime (greedy, float64 reference)."""
    names = ["base", *KINDS, "sora", "base", "lora"]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda n: complete(server, n, PROMPT, MAX_TOKENS), names))
    base_tokens = eager_greedy(eager_model(store / "base"), PROMPT, MAX_TOKENS)
    for name, (status, body) in zip(names, responses):
        assert status == 200, (name, body)
        model = eager_model(store / "base", None if name == "base" else store / "store" / name)
        assert off_greedy(model, PROMPT, new_tokens(body)) == [], name
        if name != "base":
            assert new_tokens(body) != base_tokens, f"{name} should change the output"


@pytest.mark.slow
def test_unknown_names_are_404(server):
    for name in ("missing", "notes"):
        status, body = complete(server, name, PROMPT, MAX_TOKENS)
        assert status == 404, (name, body)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,file,reason",
    [
        ("nan", "nan/adapter_model.safetensors", "NaN"),
        ("text_rank", "text_rank/adapter_config.json", "'r'"),
        ("headed", "adapter_model.safetensors", "lm_head"),
        ("llama_sora", "adapter_config.json", "different base"),
        ("other_base", "adapter_config.json", "base_fingerprint.weights"),
    ],
)
def test_bad_store_adapter_is_400_naming_the_file_and_the_server_keeps_serving(store, server, name, file, reason):
    status, body = complete(server, name, PROMPT, MAX_TOKENS)
    message = error_message(body)
    assert status == 400, body
    assert file in message and reason in message and "<path>" not in message, message
    status, body = complete(server, "prediag", PROMPT, MAX_TOKENS)
    assert (
        status == 200
        and off_greedy(eager_model(store / "base", store / "store" / "prediag"), PROMPT, new_tokens(body)) == []
    ), body


@pytest.mark.slow
def test_names_outside_the_store_are_refused(server):
    """`../outside` is a valid adapter next to the store: only the name check keeps it out."""
    for name in ("../outside", "lora/../../outside"):
        status, body = complete(server, name, PROMPT, MAX_TOKENS)
        assert status == 400 and "path separator" in error_message(body), (name, body)


@pytest.mark.slow
def test_runtime_loads_read_only_under_the_allowed_roots(store, server):
    """403 before anything is read, whether the path exists or not (no file-existence oracle):
    a valid adapter beside the store, the same through `..`, a link out of an allowed root, /etc,
    a path that does not exist. Under --allow-load-from the load works and serves exactly."""
    outside = [
        store / "outside",
        store / "store" / ".." / "outside",
        store / "extra" / "link",
        "/etc",
        "/nonexistent/adapter",
    ]
    for path in outside:
        status, body = load(server, "x", path)
        assert status == 403 and "--allow-load-from DIR" in error_message(body), (path, body)
    assert complete(server, "x", PROMPT, MAX_TOKENS)[0] == 404  # nothing was loaded
    status, body = load(server, "other_base", store / "extra" / "other_base")
    assert (
        status == 400
        and "base_fingerprint.weights" in error_message(body)
        and "--allow-other-base" in error_message(body)
    ), body
    status, body = load(server, "extra_lora", store / "extra" / "lora")
    assert status == 200, body
    status, body = complete(server, "extra_lora", PROMPT, MAX_TOKENS)
    assert (
        status == 200
        and off_greedy(eager_model(store / "base", store / "extra" / "lora"), PROMPT, new_tokens(body)) == []
    ), body


@pytest.mark.slow
def test_a_store_entry_linking_out_of_the_store_is_403(server):
    status, body = complete(server, "escape", PROMPT, MAX_TOKENS)
    assert status == 403 and "outside the directories this server loads adapters from" in error_message(body), body


@pytest.fixture(scope="module")
def static_server(store):
    """On the base re-saved in bf16, with adapters trained on the fp32 one: the same base, accepted."""
    arguments = [
        "--model",
        str(store / "base_bf16"),
        "--max-loras",
        "1",
        "--no-runtime-loads",
        "--adapter",
        f"lora={store / 'store' / 'lora'}",
        "--adapter",
        f"sora={store / 'store' / 'sora'}",
        "--",
        "--served-model-name",
        "base",
    ]
    with running_server(arguments, store / "static-server.log") as (url, _):
        yield url


@pytest.mark.slow
def test_no_runtime_loads_has_no_load_endpoints_and_serves_its_adapters(store, static_server):
    assert load(static_server, "x", store / "store" / "lora")[0] == 404
    assert post(f"{static_server}/v1/unload_lora_adapter", {"lora_name": "lora"})[0] == 404
    for name in ("lora", "sora"):
        status, body = complete(static_server, name, PROMPT, MAX_TOKENS)
        assert (
            status == 200
            and off_greedy(eager_model(store / "base_bf16", store / "store" / name), PROMPT, new_tokens(body)) == []
        ), body
    assert complete(static_server, "prediag", PROMPT, MAX_TOKENS)[0] == 404  # the store is not consulted


def test_load_confinement_resolves_links_and_dots(tmp_path):
    from sora_serve.vllm_plugin.access import LoadForbidden, check_load_dir

    root, other = tmp_path / "root", tmp_path / "other"
    (root / "a").mkdir(parents=True)
    (other / "b").mkdir(parents=True)
    (other / "b" / "adapter_model.safetensors").write_bytes(b"")
    (root / "out").symlink_to(other / "b")
    (root / "a" / "adapter_model.safetensors").symlink_to(
        other / "b" / "adapter_model.safetensors"
    )  # a file linking out
    roots = [root.resolve()]
    for path in (root / "out", root / ".." / "other" / "b", other / "b", root / "a", tmp_path / "missing"):
        with pytest.raises(LoadForbidden, match="--allow-load-from"):
            check_load_dir(path, "lora_path", roots)
    (root / "a" / "adapter_model.safetensors").unlink()
    check_load_dir(root / "a", "lora_path", roots)
    check_load_dir(root / "a" / ".." / "a", "lora_path", roots)
    check_load_dir(root / "missing", "lora_path", roots)  # inside: the load itself says it does not exist (404)


def test_serve_refuses_runtime_roots_with_no_runtime_loads(tmp_path, capsys):
    from sora_serve.cli import main

    assert main(["serve", "--model", str(tmp_path), "--no-runtime-loads", "--adapter-dir", str(tmp_path)]) == 1
    assert "--adapter-dir" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--allow-load-from", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "--allow-load-from" in err and "not found" in err


@pytest.mark.parametrize("name", ["../x", "a/b", "/etc", "..", ".", "", "a\\b", "a\0b"])
def test_resolver_refuses_names_that_are_not_plain(tmp_path, name):
    from vllm.exceptions import VLLMValidationError

    from sora_serve.vllm_plugin.resolver import AdapterStoreResolver

    with pytest.raises(VLLMValidationError, match="adapter name"):
        asyncio.run(AdapterStoreResolver(tmp_path).resolve_lora("base", name))


def test_resolver_registers_only_with_a_store(tmp_path, monkeypatch):
    from vllm.lora.resolver import LoRAResolverRegistry

    from sora_serve.vllm_plugin.resolver import RESOLVER_NAME, register_resolver

    monkeypatch.setattr(LoRAResolverRegistry, "resolvers", {})
    monkeypatch.delenv("SORA_SERVE_ADAPTER_DIR", raising=False)
    register_resolver()
    assert RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers()
    monkeypatch.setenv("SORA_SERVE_ADAPTER_DIR", str(tmp_path / "missing"))
    with pytest.raises(AdapterError, match="SORA_SERVE_ADAPTER_DIR"):
        register_resolver()
