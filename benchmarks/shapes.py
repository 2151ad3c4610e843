"""Model shapes of the serving suite, their cached checkpoints and adapters, and the physical limit.

`small` is the toy model CI runs (`--quick`); `realistic` is a Llama of hidden 2048 x 12 layers
with GQA and a 32k vocabulary (0.67B parameters), random weights. Checkpoints and adapters are
built once and cached under `cache_dir()` (default results/cache; `SORA_BENCH_CACHE`), keyed by
their spec, so repeated runs skip the build. The physical limit of an adapter deployment is the
throughput ratio its extra FLOPs (compute-bound prefill) or extra bytes read per step
(bandwidth-bound decode) would allow: `limit = base / (base + adapter terms)`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sora_serve.fs import atomic_output_dir

RANK, R_P = 16, 4  # one rank budget for every kind: r = 16 on all 7 projections, SORA r_p = 4
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KINDS = {
    "lora": dict(method="lora"),
    "dora": dict(method="dora"),
    "prediag": dict(method="prediag"),
    "sora": dict(method="sora", r_p=R_P, rotation="first_order"),  # explicit: the library's default rotation is Cayley
    "sora_cayley": dict(method="sora", r_p=R_P, rotation="cayley"),
}


@dataclass(frozen=True)
class Shape:
    """A Llama-architecture model: what the suite builds and what the limit arithmetic reads."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_layers: int
    vocab_size: int
    dtype: str  # weights and compute: "bfloat16" or "float32"
    max_position_embeddings: int = 2048

    @property
    def kv_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads * self.num_key_value_heads

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each adapted projection of one layer."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_dim
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def parameters(self) -> int:
        linear = sum(i * o for i, o in self.projections().values())
        return (
            self.num_layers * (linear + 2 * self.hidden_size)
            + 2 * self.vocab_size * self.hidden_size
            + self.hidden_size
        )

    @property
    def bytes_per_value(self) -> int:
        return torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    def model_kwargs(self) -> dict:
        spec = asdict(self)
        spec.pop("dtype")
        return spec


SHAPES = {
    # the toy model of earlier runs (no GQA): per-call overhead dominates its ratios
    "small": Shape(512, 1408, 8, 8, 4, 512, "float32", 1024),
    # TinyLlama / Llama-3.2-1B widths, 12 layers; bf16 runs natively on AVX512-BF16 CPUs
    "realistic": Shape(2048, 5632, 32, 8, 12, 32000, "bfloat16"),
    # the same family at hidden 1024, for the first-request latency against hidden size
    "hidden1024": Shape(1024, 2816, 16, 4, 12, 32000, "bfloat16"),
}


def bf16_flags() -> list[str]:
    """This CPU's native bf16 instruction sets (from /proc/cpuinfo)."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = (
        set(
            next(
                (
                    line.split(":", 1)[1].split()
                    for line in cpuinfo.read_text().splitlines()
                    if line.startswith("flags")
                ),
                [],
            )
        )
        if cpuinfo.is_file()
        else set()
    )
    return sorted(flags & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(shape: Shape) -> Shape:
    """bf16 only where this CPU has native bf16 dot products (avx512_bf16 or AMX); else fp32
    (emulated bf16 GEMMs are slower than fp32 ones)."""
    if shape.dtype == "bfloat16" and not bf16_flags():
        return Shape(**{**asdict(shape), "dtype": "float32"})
    return shape


def cache_dir() -> Path:
    return Path(os.environ.get("SORA_BENCH_CACHE", Path(os.environ.get("SORA_BENCH_RESULTS", "results")) / "cache"))


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer with one token per id (`t0` ... `t{V-1}`): every id a random model
    samples decodes, which a BPE trained on a few sentences cannot promise at a 32k vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token="t0", pad_token="t0", unk_token="t1")


def base_checkpoint(shape: Shape) -> Path:
    """The shape's random-weight checkpoint (built on first use, then cached)."""
    from transformers import GenerationConfig

    from sora_serve.tiny import make_tiny_model

    path = cache_dir() / f"base-{shape.hidden_size}x{shape.num_layers}-{shape.dtype}-{_key(asdict(shape))}"
    if (path / "config.json").is_file():
        return path
    print(f"building a {shape.parameters() / 1e9:.2f}B-parameter {shape.dtype} checkpoint at {path} (once)", flush=True)
    model = make_tiny_model("llama", **shape.model_kwargs()).to(getattr(torch, shape.dtype))
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with atomic_output_dir(path) as tmp:
        model.save_pretrained(tmp)
        word_tokenizer(shape.vocab_size).save_pretrained(tmp)
    return path


def adapter_dirs(base: Path, specs: dict[str, dict]) -> dict[str, str]:
    """Adapters for `base` (r = RANK on all 7 projections), one per name in `specs` (kwargs of
    `AdapterConfig`), with seeded non-zero factors; built on first use, then cached."""
    import sora_serve as ss

    root = base.parent / f"adapters-{base.name}"
    dirs = {name: root / f"{name}-{_key(spec, RANK)}" for name, spec in specs.items()}
    missing = [name for name, path in dirs.items() if not (path / "adapter_config.json").is_file()]
    if missing:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()  # adapters are saved in fp32
        for name in missing:
            ss.attach(
                model,
                ss.AdapterConfig(**{"r": RANK, "target_modules": list(PROJECTIONS), **specs[name]}),
                "a",
                verbose=False,
            )
            seed = int(_key(name), 16) % 2**31
            with torch.no_grad():
                for _, layer in ss.adapted_layers(model):
                    for p in layer.adapters["a"].parameters():
                        p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
            ss.save_adapter(model, dirs[name], "a", base_model_name_or_path=str(base))
            ss.delete_adapter(model, "a")
    return {name: str(path) for name, path in dirs.items()}


def linked_copies(source: str, count: int, root: Path) -> list[str]:
    """`count` adapter directories holding hard links to `source`'s files: distinct adapters to
    vLLM (their own path and id) without writing the weights `count` times."""
    dirs = []
    for i in range(count):
        path = root / f"{Path(source).name}-copy{i}"
        if not path.is_dir():
            path.mkdir(parents=True)
            for f in Path(source).iterdir():
                os.link(f, path / f.name)
        dirs.append(str(path))
    return dirs


# ---------------------------------------------------------------- physical limit


def adapter_terms(shape: Shape, kind: str) -> tuple[int, int]:
    """(values read, multiply-adds per token) of one model's adapter terms, in the shared serving
    form `z = scale * W0 x + B (A x)`, `y = z + V (U^T z)` (sora_serve.methods.base).

    Per projection `in -> out`: LoRA reads A (r x in), B (out x r) and does r (in + out) MACs per
    token; DoRA and Pre-Diag add the per-row scale (out values, out MACs); SORA adds the scale and
    the rotation U, V (out x 2 r_p each: 4 r_p out values and MACs).
    """
    method = KINDS.get(kind, dict(method=kind))["method"]
    values = 0
    for n_in, n_out in shape.projections().values():
        extra = {"lora": 0, "dora": n_out, "prediag": n_out, "sora": n_out + 4 * R_P * n_out}[method]
        values += RANK * (n_in + n_out) + extra
    return shape.num_layers * values, shape.num_layers * values  # one MAC per value read, per token


def decode_bytes(shape: Shape, adapters: list[str]) -> int:
    """Bytes a bandwidth-bound decode step reads: the base weights once, plus the factors of every
    distinct adapter in the batch (`adapters`: their kinds). The plugin keeps factors in the
    model's dtype; the KV cache is left out (short contexts)."""
    return (shape.parameters() + sum(adapter_terms(shape, k)[0] for k in adapters)) * shape.bytes_per_value


def prefill_macs(shape: Shape, kind: str | None) -> int:
    """Multiply-adds per prompt token, compute-bound prefill (the embedding lookup does none)."""
    base = shape.parameters() - shape.vocab_size * shape.hidden_size
    return base + (adapter_terms(shape, kind)[1] if kind else 0)


def decode_limit(shape: Shape, numerator: list[str], denominator: list[str]) -> float:
    """The highest decode throughput ratio numerator / denominator the bytes allow."""
    return decode_bytes(shape, denominator) / decode_bytes(shape, numerator)


def prefill_limit(shape: Shape, numerator: str | None, denominator: str | None) -> float:
    """The highest prefill throughput ratio the multiply-adds allow."""
    return prefill_macs(shape, denominator) / prefill_macs(shape, numerator)
