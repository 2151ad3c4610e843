"""Every slot's whole `ServingFactors` for a decode batch in one native op call per layer (`fused_decode.cpp`).

The torch path runs a slot's factors on a decode batch as 3-6 thin GEMMs and passes over the
output per layer, and each call costs several times what its bytes do (8 rows against ranks of
16-48: `python -m benchmarks.adapter_cost`, docs/benchmarks/serving.md). `sora_serve::fused_decode`
does scale and shift, the shrink, the rotation's projection, the expansion and the finiteness
check in one pass per slice over the factors, for every slot of the batch on its own rows in one
call (a batch spread over 32 adapters paid ~7 us of dispatch per slot and layer when each slot was
its own call: a one-off timing on the 2-core Xeon), reading only each slice's own blocks (not the
block-diagonal zeros of the packed torch operands), with fp32 accumulation. Its GEMMs run on AMX
tiles where the CPU has AMX-BF16 (16x an AVX512 dot product's work per instruction; what lets a
batch of 32 cost little more than one of 8), else on AVX512 dot products; `SORA_SERVE_FUSED_AMX=0`
keeps them off the tiles.

Decode batches (up to `MAX_DOT_ROWS` tokens) take it on every CPU it runs on, prefill batches too
where its GEMMs run on AMX tiles. It needs a CPU with
AVX512-BF16 (and BW, VL), bf16 activations, even widths where pairs are read (the layer's input;
each rotated slice's output), and is built on first use with torch's `cpp_extension` (a C++ compiler
and ninja; ~15 s, cached under `TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions). Where any
of that is missing, or `SORA_SERVE_FUSED_DECODE=0`, the torch path (`prepacked.SlotOperands`) runs
instead, with the same results up to bf16 rounding."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

logger = logging.getLogger("sora_serve.vllm_plugin")

FUSED_ENV = "SORA_SERVE_FUSED_DECODE"
AMX_ENV = "SORA_SERVE_FUSED_AMX"  # 0: AVX512 dot products only, even where AMX tiles are there
# On AMX tiles the op takes batches of every size: inside one engine it was ahead of the torch path
# on prefills of 8 x 16 tokens (our code 23 against 447 ms; torch's bf16 matmul and sums at these
# row counts cost far more in vLLM's worker than alone) and of 4 x 256 (95 against 104 ms; one-off
# A/B, 2-core Xeon; docs/VLLM.md). On AVX512 dot products alone, decode-sized batches only.
MAX_DOT_ROWS = 32
ENABLED = True  # read per call: `benchmarks.adapter_cost` compares the paths inside one engine
_tiles = False
_SOURCE = Path(__file__).with_name("fused_decode.cpp")
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
_AMX_FLAGS = ("amx_tile", "amx_bf16")
_COMPILE_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16"]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _put_venv_ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; the `ninja` the `vllm` extra installs sits beside this
    interpreter, which is not on PATH when the venv's python is run without activating it."""
    beside = Path(sys.executable).parent
    if shutil.which("ninja") is None and (beside / "ninja").exists():
        os.environ["PATH"] = f"{beside}{os.pathsep}{os.environ.get('PATH', '')}"


@functools.cache
def _module():
    """The op's extension module, built and loaded once per process, or None where this machine or
    the environment cannot run it (the reason is logged once)."""
    if os.environ.get(FUSED_ENV, "1").strip() == "0":
        return None
    flags = _cpu_flags()
    missing = [flag for flag in _CPU_FLAGS if flag not in flags]
    if missing:
        logger.info("sora-serve: fused decode op off, this CPU lacks %s", ", ".join(missing))
        return None
    _put_venv_ninja_on_path()
    try:
        from torch.utils import cpp_extension

        module = cpp_extension.load(name="sora_serve_fused_decode", sources=[str(_SOURCE)], extra_cflags=_COMPILE_FLAGS)
    except Exception as error:  # no compiler, no ninja, a read-only cache: the torch path serves
        logger.warning("sora-serve: fused decode op off, building %s failed: %s", _SOURCE.name, error)
        return None
    global _tiles
    _tiles = module.use_amx(all(flag in flags for flag in _AMX_FLAGS) and os.environ.get(AMX_ENV, "1").strip() != "0")
    return module


@functools.cache
def op():
    """`fused_decode(x, y, scale, shift, a, rank_pad, e, u, btu, meta, rows) -> bool` (`run_slots`
    builds its per-slot lists), or None where it cannot run here; looked up once (every layer calls it)."""
    module = _module()
    return None if module is None else module.fused_decode


def use_amx(on: bool) -> bool:
    """AMX tiles for the op's GEMMs on (where the kernel grants this process their state) or off
    (AVX512 dot products alone); returns whether they are on. Call after `op()` has loaded it."""
    global _tiles
    _tiles = _module().use_amx(on)
    return _tiles


def tiles_on() -> bool:
    return _tiles


def takes(rows: int) -> bool:
    """Whether the op runs a batch of `rows` tokens (where it is built): any size on tiles."""
    return ENABLED and (_tiles or rows <= MAX_DOT_ROWS)


def _vnni(w: torch.Tensor, cols_pad: int) -> torch.Tensor:
    """(rows, cols) -> (rows / 2, cols_pad, 2) bf16, rows padded to even and columns to cols_pad
    with zeros: each pair of rows interleaved, the operand layout of AVX512's bf16 dot product."""
    rows, cols = w.shape
    padded = w.new_zeros(rows + rows % 2, cols_pad)
    padded[:rows, :cols] = w
    return padded.view(-1, 2, cols_pad).transpose(1, 2).contiguous()


def _pad16(n: int) -> int:
    return -(-n // 16) * 16


class FusedSlot:
    """A slot's factors of one layer for `fused_decode`: views of the backend's packed buffers
    and scale/shift rows (valid until the slot is written again, which makes a new FusedSlot), laid out at first use
    (`buffers`): Aᵀ for all slices' ranks, and per slice its own blocks [B_jᵀ; V_jᵀ], U_j and
    B_jᵀU_j, with a meta row each (`Slice` in the source): columns, ranks in p and in q, offsets."""

    def __init__(self, a, bt, u, vt, btu, ranks: list[int], rot_ranks: list[int], widths: list[int], scale, shift):
        self.packed = (a, bt, u, vt, btu)
        self.ranks, self.rot_ranks, self.widths = ranks, rot_ranks, widths
        self.scale, self.shift = scale, shift  # the slot's rows of the layer's tables, or None: identity

    @staticmethod
    def fits(in_features: int, rot_ranks: list[int], widths: list[int]) -> bool:
        """Pairs are read along the input and along each rotated slice's outputs."""
        return in_features % 2 == 0 and all(n % 2 == 0 for k, n in zip(rot_ranks, widths) if k)

    @functools.cached_property
    def buffers(self) -> tuple:
        a, bt, u, vt, btu = self.packed
        rank = sum(self.ranks)
        rank_pad = _pad16(rank) if rank else 0
        a_vnni = _vnni(a[:rank].T, rank_pad) if rank else a.new_zeros(0)
        e_parts, u_parts, btu_parts, meta = [], [], [], []
        e_at = u_at = btu_at = col = r0 = k0 = 0
        for r, k, n in zip(self.ranks, self.rot_ranks, self.widths):
            cols = slice(col, col + n)
            e = _vnni(torch.cat([bt[r0 : r0 + r, cols], vt[k0 : k0 + k, cols]]), n).flatten()
            u_j, btu_j = self._rotation_blocks(u[cols, k0 : k0 + k], btu[r0 : r0 + r, k0 : k0 + k], cols)
            meta.append([col, n, r0, r, k0, k, e_at, u_at, btu_at])
            e_parts.append(e), u_parts.append(u_j), btu_parts.append(btu_j)
            e_at, u_at, btu_at = e_at + e.numel(), u_at + u_j.numel(), btu_at + btu_j.numel()
            col, r0, k0 = col + n, r0 + r, k0 + k
        meta = torch.tensor(meta, dtype=torch.long)
        e_parts.append(a.new_zeros(32))  # AMX reads whole 16-column blocks: up to 15 pairs past the last slice
        return a_vnni, rank_pad, torch.cat(e_parts), torch.cat(u_parts), torch.cat(btu_parts), meta

    def _rotation_blocks(self, u: torch.Tensor, btu: torch.Tensor, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """A slice's U and BᵀU blocks for the op, which reads the base output y in place for the
        rotation's projection: z U = y (scale U) + shift U, so U comes scaled and BᵀU with shift U as
        one more row (computed in fp32, rounded once)."""
        k = u.shape[1]
        if not k:
            return u.new_zeros(0), btu.flatten()
        scaled_u = u.float() * self.scale[cols, None].float() if self.scale is not None else u.float()
        shift_u = self.shift[cols].float() @ u.float() if self.shift is not None else u.new_zeros(k, dtype=torch.float)
        return _vnni(scaled_u.to(u.dtype), _pad16(k)).flatten(), torch.cat([btu.flatten(), shift_u.to(u.dtype)])

    @property
    def operands(self) -> tuple:
        """This slot's entries of the op's per-slot lists: scale, shift, then `buffers`."""
        return (self.scale, self.shift, *self.buffers)


def slot_lists(runs: list[tuple[torch.Tensor | None, FusedSlot]]) -> tuple[list, ...]:
    """The op's per-slot lists for these (rows, slot) runs: rows None is every row of the batch, else
    the slot's token rows of a batch that mixes slots. Valid while the slots' contents are."""
    per_slot = [list(entries) for entries in zip(*(slot.operands for _, slot in runs))]
    return (*per_slot, [rows for rows, _ in runs])


def run_slots(x: torch.Tensor, y: torch.Tensor, lists: tuple[list, ...]) -> bool:
    """y = each slot's ServingFactors on (x, base output y), in place, on its rows (`slot_lists`), all
    slots in one op call; True if those rows hold NaN/inf."""
    return op()(x, y, *lists)
