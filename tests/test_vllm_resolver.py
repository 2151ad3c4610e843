"""An adapter store served on demand: `sora-serve serve --adapter-dir DIR`, requests name adapters in DIR."""

from __future__ import annotations

import asyncio
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

import sora_serve as ss
from sora_serve.errors import AdapterError
from sora_serve.tiny import make_tiny_checkpoint

from .helpers import complete, eager_greedy, eager_model, error_message, new_tokens, off_greedy, running_server, set_first_value, write_random_adapter

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
    write_random_adapter(root / "store" / "headed", ss.AdapterConfig(method="prediag", r=4, target_modules=["q_proj", "lm_head"]), seed=7, scale=0.05)
    write_random_adapter(root / "store" / "llama_sora", KINDS["sora"], seed=8, scale=0.05, arch="llama")
    (root / "store" / "notes").mkdir()  # a directory without adapter_config.json is no adapter
    write_random_adapter(root / "outside", KINDS["lora"], seed=9, scale=0.05)
    return root


@pytest.fixture(scope="module")
def server(store):
    arguments = ["--model", str(store / "base"), "--max-loras", "2", "--adapter-dir", str(store / "store"), "--", "--served-model-name", "base"]
    with running_server(arguments, store / "server.log") as (url, _):
        yield url


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
@pytest.mark.parametrize("name,file,reason", [
    ("nan", "nan/adapter_model.safetensors", "NaN"),
    ("text_rank", "text_rank/adapter_config.json", "'r'"),
    ("headed", "adapter_model.safetensors", "lm_head"),
    ("llama_sora", "adapter_config.json", "different base"),
])
def test_bad_store_adapter_is_400_naming_the_file_and_the_server_keeps_serving(store, server, name, file, reason):
    status, body = complete(server, name, PROMPT, MAX_TOKENS)
    message = error_message(body)
    assert status == 400, body
    assert file in message and reason in message and "<path>" not in message, message
    status, body = complete(server, "prediag", PROMPT, MAX_TOKENS)
    assert status == 200 and off_greedy(eager_model(store / "base", store / "store" / "prediag"), PROMPT, new_tokens(body)) == [], body


@pytest.mark.slow
def test_names_outside_the_store_are_refused(server):
    """`../outside` is a valid adapter next to the store: only the name check keeps it out."""
    for name in ("../outside", "lora/../../outside"):
        status, body = complete(server, name, PROMPT, MAX_TOKENS)
        assert status == 400 and "path separator" in error_message(body), (name, body)


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
