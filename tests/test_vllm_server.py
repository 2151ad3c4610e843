"""`sora-serve serve`: vLLM's OpenAI server with the plugin, adapters per request, runtime load/unload."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoTokenizer

import sora_serve as ss
from sora_serve.tiny import make_tiny_checkpoint

from .helpers import complete as complete_tokens
from .helpers import new_tokens, post, running_server, write_random_adapter
from .reference import eager_greedy, eager_model

PROMPT = "the film is a charming"
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    base = make_tiny_checkpoint("llama", root / "base")
    for i, (name, config) in enumerate(
        {
            "sora": ss.AdapterConfig(method="sora", rotation="cayley", r=8, r_p=2, target_modules="all-linear"),
            "dora": ss.AdapterConfig(method="dora", r=8, target_modules=["q_proj", "v_proj", "down_proj"]),
            "prediag": ss.AdapterConfig(method="prediag", r=4, target_modules="all-linear"),
            "headed": ss.AdapterConfig(
                method="prediag", r=4, target_modules=["q_proj", "lm_head"]
            ),  # lm_head: not servable
        }.items()
    ):
        write_random_adapter(root / name, config, arch="llama", seed=i, scale=0.15)
    (root / "chat.jinja").write_text(CHAT_TEMPLATE)
    arguments = [
        "--model",
        str(base),
        "--max-loras",
        "2",
        "--adapter",
        f"sora={root / 'sora'}",
        "--adapter",
        f"dora={root / 'dora'}",
        "--allow-load-from",
        str(root),
        "--",
        "--served-model-name",
        "base",
        "--chat-template",
        str(root / "chat.jinja"),
    ]
    with running_server(arguments, root / "server.log") as (url, _):
        yield url, root


def eager_tokens(root, adapter: str | None, prompt: str = PROMPT, max_tokens: int = 6) -> list[int]:
    """The fp32 eager runtime's greedy tokens for the text `prompt` (the base's tokenizer)."""
    model = eager_model(root / "base", None if adapter is None else root / adapter, dtype=torch.float32)
    return eager_greedy(model, AutoTokenizer.from_pretrained(root / "base")(prompt).input_ids, max_tokens)


def complete(url: str, model: str) -> tuple[int, dict | str]:
    return complete_tokens(url, model, PROMPT)


@pytest.mark.slow
def test_concurrent_adapters_runtime_load_and_unload(server):
    url, root = server
    names = ["sora", "base", "dora", "sora", "base", "dora"]
    with ThreadPoolExecutor(len(names)) as pool:
        responses = list(pool.map(lambda n: complete(url, n), names))
    expected = {n: eager_tokens(root, None if n == "base" else n) for n in set(names)}
    assert len({tuple(t) for t in expected.values()}) == 3, "the adapters should change the output"
    for name, (status, body) in zip(names, responses):
        assert status == 200, body
        assert new_tokens(body) == expected[name], name

    status, body = post(
        f"{url}/v1/chat/completions",
        {
            "model": "dora",
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 6,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )
    assert status == 200 and new_tokens(body) == expected["dora"], body

    # lm_head is vLLM's logits processor, not a linear LoRA layer: refused at load, module named, engine unharmed.
    status, body = post(f"{url}/v1/load_lora_adapter", {"lora_name": "headed", "lora_path": str(root / "headed")})
    assert status >= 400 and "lm_head" in json.dumps(body), body
    assert complete(url, "headed")[0] == 404

    status, body = post(f"{url}/v1/load_lora_adapter", {"lora_name": "prediag", "lora_path": str(root / "prediag")})
    assert status == 200, body
    status, body = complete(url, "prediag")
    assert status == 200 and new_tokens(body) == eager_tokens(root, "prediag"), body

    status, body = post(f"{url}/v1/unload_lora_adapter", {"lora_name": "sora"})
    assert status == 200, body
    status, body = complete(url, "sora")
    assert status == 404, body
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as response:
        served = {m["id"] for m in json.load(response)["data"]}
    assert "sora" not in served and {"base", "dora", "prediag"} <= served
    # Fill both slots with the remaining adapters around base requests: sora's output never returns.
    with ThreadPoolExecutor(4) as pool:
        after = list(pool.map(lambda n: complete(url, n), ["dora", "base", "prediag", "base"]))
    outputs = [new_tokens(body) for _, body in after]
    assert outputs == [expected["dora"], expected["base"], eager_tokens(root, "prediag"), expected["base"]]
    assert expected["sora"] not in outputs


def test_bad_serve_arguments_fail_before_the_engine_starts(tmp_path, capsys):
    from sora_serve.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--model", str(tmp_path), "--adapter", "no-equals-sign"])
    assert exc.value.code == 2 and "expected NAME=DIR" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--adapter", f"a={tmp_path / 'missing'}"]) == 1
    assert "missing: adapter directory not found" in capsys.readouterr().err
