"""Shared fixtures: tiny local checkpoints (no hub) and the shared data folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sora_serve.tiny import make_tiny_checkpoint

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One saved tiny checkpoint per architecture, shared by the whole session (read-only!)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_checkpoint(arch, root / arch) for arch in ("llama", "qwen2", "gpt2")}


@pytest.fixture(scope="session")
def sst2_dir() -> Path:
    path = SHARED_DATA / "sst2"
    if not (path / "dev.tsv").is_file():
        pytest.skip(f"SST-2 not found at {path}: the shared data folder is absent on this machine")
    return path
