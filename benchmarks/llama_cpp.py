"""llama.cpp's `llama-server` as a peer of the online load test (`--peers llama.cpp`).

Anyone can rerun it: the server is built from the llama.cpp sources vendored in a pinned PyPI
sdist of llama-cpp-python (no model hub, no git), with cmake, only the `llama-server` target,
tuned for this CPU (`GGML_NATIVE`). The suite's base checkpoint and PEFT LoRA adapters become
GGUF files with the converters of the same sources. The build and every conversion are cached
under the bench cache (`benchmarks.shapes.cache_dir()`), keyed by the sdist version (and, for
conversions, by the cached checkpoint / adapter directory, whose names carry their spec's key).

One server loads every adapter without applying it (`--lora-init-without-apply`); each request
names its adapter by the request field `lora` (`completion_fields`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from .serve_process import running_process
from .shapes import cache_dir

VERSION = "0.3.36"  # llama-cpp-python sdist; its CHANGELOG names the vendored llama.cpp commit
SERVER_TARGET = "llama-server"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",  # this CPU's instruction set, as vLLM's CPU kernels get
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # else the build fetches the web UI from the Hugging Face hub
)
GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
CONTEXT_PER_SLOT = 512  # the vLLM servers' --max-model-len
PARALLEL = 8  # slots: requests decoded together (beyond them, requests wait in the server's queue)
LOG_TAIL_CHARS = 3000
NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]")


# ---------------------------------------------------------------- build


def root(version: str = VERSION) -> Path:
    return cache_dir() / f"llama.cpp-{version}"


def server_binary(version: str = VERSION) -> Path:
    return root(version) / "build" / "bin" / SERVER_TARGET


def sources(version: str = VERSION) -> Path:
    """The vendored llama.cpp tree of the sdist (downloaded and unpacked once)."""
    src = root(version) / "src"
    if (src / "CMakeLists.txt").is_file():
        return src
    with tempfile.TemporaryDirectory() as tmp:
        print(f"downloading the llama-cpp-python {version} sdist (llama.cpp sources, once)", flush=True)
        run_logged(download_command(version, Path(tmp)), Path(tmp) / "pip.log", "pip download of llama-cpp-python")
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        unpack(sdist, root(version))
    return src


def download_command(version: str, dest: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        f"llama-cpp-python=={version}",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--dest",
        str(dest),
    ]


def unpack(sdist: Path, dest: Path) -> None:
    """The sdist's `vendor/llama.cpp/` as `dest/src` (unpacked into a sibling, then renamed) and its
    CHANGELOG.md (which names the vendored commit) as `dest/CHANGELOG.md`."""
    partial = dest / "src.partial"
    with tarfile.open(sdist) as archive:
        top = archive.getnames()[0].split("/")[0]  # llama_cpp_python-<version>
        vendored = f"{top}/vendor/llama.cpp/"
        members = []
        for member in archive.getmembers():
            if member.name.startswith(vendored):
                member.name = member.name.removeprefix(vendored)
                members.append(member)
        archive.extractall(partial, members=members, filter="data")
        (dest / "CHANGELOG.md").write_bytes(archive.extractfile(f"{top}/CHANGELOG.md").read())
    partial.rename(dest / "src")


def configure_command(src: Path, build: Path) -> list[str]:
    return ["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", *CMAKE_FLAGS]


def build_command(build: Path, jobs: int) -> list[str]:
    return ["cmake", "--build", str(build), "--target", SERVER_TARGET, "-j", str(jobs)]


def llama_server(version: str = VERSION) -> Path:
    """`llama-server`, built once per sdist version (tens of minutes on 2 cores)."""
    binary = server_binary(version)
    if binary.is_file():
        return binary
    src, build = sources(version), root(version) / "build"
    run_logged(configure_command(src, build), root(version) / "configure.log", "cmake configure of llama.cpp")
    with_progress(build_command(build, usable_cpus()), root(version) / "build.log", f"building {SERVER_TARGET}")
    return binary


def build_info(version: str = VERSION) -> dict:
    """What the report names the peer by: the sdist version, llama.cpp's commit and the flags."""
    changelog = root(version) / "CHANGELOG.md"
    return {
        "llama_cpp_python": version,
        "llama_cpp_commit": changelog_commit(changelog.read_text(), version) if changelog.is_file() else None,
        "cmake_flags": list(CMAKE_FLAGS),
    }


def changelog_commit(changelog: str, version: str) -> str | None:
    """The llama.cpp commit a llama-cpp-python release vendors: the first `llama.cpp@<sha>` of the
    release's CHANGELOG section."""
    section = re.search(rf"^## \[{re.escape(version)}\]\n(.*?)(?=^## \[|\Z)", changelog, re.S | re.M)
    commit = section and re.search(r"llama\.cpp@([0-9a-f]{7,40})", section.group(1))
    return commit.group(1) if commit else None


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0))


def run_logged(command: list[str], log_path: Path, what: str, env: dict[str, str] | None = None) -> None:
    """`command` with its output in `log_path`; RuntimeError naming `what` with the log's tail if it fails."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if status:
        raise RuntimeError(f"{what} failed (status {status}, log {log_path}):\n{tail(log_path)}")


def with_progress(command: list[str], log_path: Path, what: str) -> None:
    """`run_logged` for a ninja build, its `[n/N]` steps shown as a progress bar."""
    with open(log_path, "w") as log, tqdm(desc=what, unit="step") as bar:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            log.write(line)
            if step := NINJA_STEP.match(line):
                bar.total = int(step.group(2))
                bar.update(int(step.group(1)) - bar.n)
        status = process.wait()
    if status:
        raise RuntimeError(f"{what} failed (status {status}, log {log_path}):\n{tail(log_path)}")


def tail(log_path: Path) -> str:
    return Path(log_path).read_text(errors="replace")[-LOG_TAIL_CHARS:]


# ---------------------------------------------------------------- GGUF conversions


def convert_base_command(src: Path, model_dir: Path, out: Path, outtype: str) -> list[str]:
    return [
        sys.executable,
        str(src / "convert_hf_to_gguf.py"),
        str(model_dir),
        "--outfile",
        str(out),
        "--outtype",
        outtype,
    ]


def convert_lora_command(src: Path, adapter_dir: Path, base_dir: Path, out: Path, outtype: str) -> list[str]:
    """`--base`: the converter reads only the base's config.json (no hub look-up)."""
    return [
        sys.executable,
        str(src / "convert_lora_to_gguf.py"),
        str(adapter_dir),
        "--base",
        str(base_dir),
        "--outfile",
        str(out),
        "--outtype",
        outtype,
    ]


def gguf_dir(model: Path, version: str = VERSION) -> Path:
    return cache_dir() / f"gguf-{Path(model).name}" / f"llama.cpp-{version}"


def gguf_base(model: Path, dtype: str, version: str = VERSION) -> Path:
    """The base checkpoint as GGUF in its own dtype (converted once). The converter needs a tokenizer
    it knows; the suite's checkpoints carry a word-level one (`shapes.word_tokenizer`), so the
    conversion reads a directory of links to the checkpoint's files plus a SentencePiece model
    with the same pieces (`t0` ... `t{V-1}`): the cached checkpoint itself is left as it is."""
    out = gguf_dir(model, version) / f"base-{GGUF_TYPES[dtype]}.gguf"
    if out.is_file():
        return out
    vocab_size = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    src = sources(version)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model"
        staged.mkdir()
        for entry in Path(model).iterdir():
            (staged / entry.name).symlink_to(entry.absolute())
        (staged / "tokenizer.model").write_bytes(sentencepiece_model(vocab_size))
        convert(out, "GGUF conversion of the base", lambda to: convert_base_command(src, staged, to, GGUF_TYPES[dtype]))
    return out


def gguf_lora(adapter_dir: Path, model: Path, dtype: str, version: str = VERSION) -> Path:
    """A PEFT LoRA directory as a GGUF adapter in the base's dtype (converted once)."""
    out = gguf_dir(model, version) / f"{Path(adapter_dir).name}-{GGUF_TYPES[dtype]}.gguf"
    if not out.is_file():
        src = sources(version)
        convert(
            out,
            f"GGUF conversion of {adapter_dir}",
            lambda to: convert_lora_command(src, Path(adapter_dir), Path(model), to, GGUF_TYPES[dtype]),
        )
    return out


def convert(out: Path, what: str, command: Callable[[Path], list[str]]) -> None:
    """Run a converter (`command(path to write)`) into a sibling of `out`, renamed to `out` once it
    succeeded: an interrupted conversion never passes for a cached one."""
    partial = out.with_name(out.stem + ".partial.gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    run_logged(command(partial), out.with_name(out.name + ".log"), what)
    partial.rename(out)


def sentencepiece_model(vocab_size: int) -> bytes:
    """A SentencePiece model with one piece per id, named as `shapes.word_tokenizer` names them:
    every id decodes to a non-empty piece, so the server streams one text chunk per token. Id 0 is
    the control token (BOS / EOS / pad of the checkpoint), id 1 the unknown one, as there."""
    from sentencepiece import sentencepiece_model_pb2 as spm

    piece_type = spm.ModelProto.SentencePiece
    proto = spm.ModelProto()
    proto.trainer_spec.model_type = spm.TrainerSpec.UNIGRAM
    proto.trainer_spec.vocab_size = vocab_size
    proto.trainer_spec.unk_id = 1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    for i in range(vocab_size):
        piece = proto.pieces.add()
        piece.piece, piece.score = f"t{i}", 0.0
        piece.type = {0: piece_type.CONTROL, 1: piece_type.UNKNOWN}.get(i, piece_type.NORMAL)
    return proto.SerializeToString()


# ---------------------------------------------------------------- the server


def server_command(binary: Path, base: Path, loras: list[Path], *, port: int, threads: int, parallel: int) -> list[str]:
    """Every adapter loaded, none applied until a request names it; `parallel` slots of
    CONTEXT_PER_SLOT tokens each (the context is shared out among the slots)."""
    return [
        str(binary),
        "-m",
        str(base),
        *[a for lora in loras for a in ("--lora", str(lora))],
        "--lora-init-without-apply",
        "-t",
        str(threads),
        "--parallel",
        str(parallel),
        "-c",
        str(parallel * CONTEXT_PER_SLOT),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def lora_ids(names: list[str]) -> dict[str, int]:
    """Adapter name -> its id on the server: the position of its `--lora` (`server_command`)."""
    return {name: i for i, name in enumerate(names)}


def prepare(model: Path, adapter_dirs: list[str], dtype: str) -> tuple[Path, Path, list[Path]]:
    """The server binary, the base and each adapter as GGUF (built / converted on first use)."""
    binary, base = llama_server(), gguf_base(model, dtype)
    return binary, base, [gguf_lora(Path(path), model, dtype) for path in tqdm(adapter_dirs, desc="GGUF adapters")]


@contextlib.contextmanager
def served(
    model: Path, adapters: dict[str, str], *, dtype: str, log_path: Path, parallel: int = PARALLEL, timeout: float = 600
) -> Iterator[tuple[str, float, dict[str, int]]]:
    """`llama-server` with `adapters` (built and converted on first use); yields (url, seconds until
    /health answered, adapter name -> id)."""
    binary, base, loras = prepare(model, list(adapters.values()), dtype)

    def command(port: int) -> list[str]:
        return server_command(binary, base, loras, port=port, threads=usable_cpus(), parallel=parallel)

    with running_process(command, log_path, name=SERVER_TARGET, timeout=timeout) as (url, _, started_s):
        yield url, started_s, lora_ids(list(adapters))
