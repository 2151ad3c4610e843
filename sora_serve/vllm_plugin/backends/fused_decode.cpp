// Each slot's ServingFactors on its rows of a batch, in place, in one op per layer (AVX512-BF16):
//
//     z = scale * y + shift;   p = x Aᵀ;   q = z U + p (BᵀU);   y = z + [p q] [Bᵀ; Vᵀ]
//
// with z U computed as y (scale U) + shift U from the base output in place (z is never stored),
// per slice of a packed layer (q, k, v; gate, up), reading only each slice's own blocks of the
// factors (the block-diagonal zeros of the torch path's packed operands are never read), and
// returning whether any output value is NaN/inf (the caller then runs the masked quarantine).
// Why native: at decode these GEMMs have 1-32 rows against ranks of 4-64, and a torch or oneDNN
// call per factor costs several times what its bytes do (docs/benchmarks/serving.md); one pass
// per slice over the factors, fp32 accumulation, and no temporaries but p and q.
//
// Layouts (prepared once per slot by fused.py): every factor is "VNNI" bf16, (rows/2,
// cols, 2), so one 32-bit broadcast of an activation pair times 16 column pairs is one
// _mm512_dpbf16_ps. A: (in/2, Rp, 2), Rp = all slices' ranks padded to 16. Per slice j, in flat
// buffers at its offsets: E_j = [B_jᵀ; V_jᵀ] as (Hp_j/2, n_j, 2), H_j = r_j + k_j padded to even;
// U_j scaled by the slice's scale (scale_j U_j) as (n_j/2, Kp_j, 2), Kp_j = k_j padded to 16;
// [BᵀU_j; shift_j U_j] as (r_j + 1, k_j) row-major (the last row zeros where there is no shift).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <torch/extension.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kMetaFields = 9;  // see Slice

struct Slice {
  int64_t col, n;        // output columns
  int64_t rank_at, r;    // its ranks in p (and rows of E_j)
  int64_t rot_at, k;     // its rotation ranks in q
  int64_t e_at, u_at, btu_at;  // offsets in the flat E, U, BᵀU buffers
  int64_t h_pad() const { return (r + k + 1) / 2 * 2; }
  int64_t k_pad() const { return (k + 15) / 16 * 16; }
};

inline __m512 bf16_to_fp32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

inline __m256i fp32_to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

inline float bf16_value(uint16_t bits) {
  uint32_t wide = uint32_t(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof out);
  return out;
}

inline uint16_t bf16_bits(float value) {  // round to nearest even, as _mm512_cvtneps_pbh
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7f800000u) == 0x7f800000u) return uint16_t((bits >> 16) | ((bits & 0xffff) ? 0x40 : 0));
  return uint16_t((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

// out[m, c] (+)= sum_i in[m, i] w[i, c] for c < cols_pad (a multiple of 16), i in [i0, i1) (even),
// w VNNI with row stride 2 * cols_pad: MB rows x NB column vectors of accumulators in registers.
template <int MB, int NB>
void thin_block(const uint16_t* in, int64_t ld_in, int64_t i0, int64_t i1, const uint16_t* w,
                            int64_t cols_pad, float* out, int64_t ld_out) {
  __m512 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_loadu_ps(out + m * ld_out + b * 16);
  for (int64_t i = i0; i < i1; i += 2) {
    const uint16_t* w_row = w + (i / 2) * cols_pad * 2;
    _mm_prefetch(reinterpret_cast<const char*>(w_row + 16 * cols_pad), _MM_HINT_T0);
    __m512bh wv[NB];
    for (int b = 0; b < NB; ++b) wv[b] = (__m512bh)_mm512_loadu_si512(w_row + b * 32);
    for (int m = 0; m < MB; ++m) {
      int32_t pair;
      std::memcpy(&pair, in + m * ld_in + i, sizeof pair);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_dpbf16_ps(acc[m][b], xv, wv[b]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int b = 0; b < NB; ++b) _mm512_storeu_ps(out + m * ld_out + b * 16, acc[m][b]);
}

// At most 16 accumulators: 8 rows x 2 column vectors, or 4 rows x 4.
template <int MB>
void thin_rows(const uint16_t* in, int64_t ld_in, int64_t i0, int64_t i1, const uint16_t* w,
               int64_t cols_pad, float* out, int64_t ld_out) {
  constexpr int64_t kMaxVectors = MB > 4 ? 2 : 4;
  for (int64_t c = 0; c < cols_pad; c += 16 * kMaxVectors) {
    const int64_t vectors = std::min<int64_t>(kMaxVectors, (cols_pad - c) / 16);
    const uint16_t* wc = w + c * 2;
    float* oc = out + c;
    switch (vectors) {
      case 4: thin_block<MB, (kMaxVectors > 2 ? 4 : 1)>(in, ld_in, i0, i1, wc, cols_pad, oc, ld_out); break;
      case 3: thin_block<MB, (kMaxVectors > 2 ? 3 : 1)>(in, ld_in, i0, i1, wc, cols_pad, oc, ld_out); break;
      case 2: thin_block<MB, 2>(in, ld_in, i0, i1, wc, cols_pad, oc, ld_out); break;
      default: thin_block<MB, 1>(in, ld_in, i0, i1, wc, cols_pad, oc, ld_out); break;
    }
  }
}

// Rows [m, m + rows) of a thin GEMM: blocks of 8 rows where the columns are few (<= 32), else 4.
void thin_row_block(const uint16_t* in, int64_t ld_in, int64_t rows, int64_t i0, int64_t i1, const uint16_t* w,
                    int64_t cols_pad, float* out) {
  const int64_t block = cols_pad <= 32 ? 8 : 4;
  for (int64_t m = 0; m < rows; m += block) {
    const int64_t mb = std::min<int64_t>(block, rows - m);
    const uint16_t* in_m = in + m * ld_in;
    float* out_m = out + m * cols_pad;
    switch (mb) {
      case 8: thin_rows<8>(in_m, ld_in, i0, i1, w, cols_pad, out_m, cols_pad); break;
      case 7: thin_rows<7>(in_m, ld_in, i0, i1, w, cols_pad, out_m, cols_pad); break;
      case 6: thin_rows<6>(in_m, ld_in, i0, i1, w, cols_pad, out_m, cols_pad); break;
      case 5: thin_rows<5>(in_m, ld_in, i0, i1, w, cols_pad, out_m, cols_pad); break;
      case 4: thin_rows<4>(in_m, ld_in, i0, i1, w, cols_pad, out_m, cols_pad); break;
      case 3: thin_rows<3>(in_m, ld_in, i0, i1, w, cols_pad, out_m, cols_pad); break;
      case 2: thin_rows<2>(in_m, ld_in, i0, i1, w, cols_pad, out_m, cols_pad); break;
      default: thin_rows<1>(in_m, ld_in, i0, i1, w, cols_pad, out_m, cols_pad); break;
    }
  }
}

// AMX (where the CPU has it and the kernel grants this process its tile state: use_amx): the
// same thin GEMMs as tiles, 16 rows x 32 bf16 of activations against 16 pairs x 16 columns of a
// factor per instruction, 16x the work of one AVX512 dot product. Tiles 0 (activations), 1-3
// (factor blocks) and 4-6 (fp32 sums) are configured per task; each thread has its own tile state.
bool amx_enabled = false;

// Tiles on (where the kernel grants them) or off; returns whether they are on.
bool use_amx(bool on) {
  constexpr int kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  amx_enabled = on && syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  return amx_enabled;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tile 0: rows x depth_bytes of activations; 1-3: depth_bytes / 4 pairs x 16 columns; 4-6: rows x 16 fp32.
void configure_tiles(int64_t rows, int64_t depth_bytes) {
  TileConfig config;
  config.rows[0] = uint8_t(rows), config.colsb[0] = uint16_t(depth_bytes);
  for (int t = 1; t <= 3; ++t) config.rows[t] = uint8_t(depth_bytes / 4), config.colsb[t] = 64;
  for (int t = 4; t <= 6; ++t) config.rows[t] = uint8_t(rows), config.colsb[t] = 64;
  _tile_loadconfig(&config);
}

// out[:, 0 : 16 NB] += in[:, i0:i1] w[i0:i1, 0 : 16 NB], (i1 - i0) a multiple of 32, tiles configured.
template <int NB>
void amx_thin_block(const uint16_t* in, int64_t ld_in, int64_t i0, int64_t i1, const uint16_t* w, int64_t cols_pad,
                    float* out, int64_t ld_out) {
  _tile_loadd(4, out, ld_out * 4);
  if constexpr (NB > 1) _tile_loadd(5, out + 16, ld_out * 4);
  if constexpr (NB > 2) _tile_loadd(6, out + 32, ld_out * 4);
  for (int64_t i = i0; i < i1; i += 32) {
    _tile_loadd(0, in + i, ld_in * 2);
    const uint16_t* w_i = w + (i / 2) * cols_pad * 2;
    _tile_loadd(1, w_i, cols_pad * 4);
    _tile_dpbf16ps(4, 0, 1);
    if constexpr (NB > 1) {
      _tile_loadd(2, w_i + 32, cols_pad * 4);
      _tile_dpbf16ps(5, 0, 2);
    }
    if constexpr (NB > 2) {
      _tile_loadd(3, w_i + 64, cols_pad * 4);
      _tile_dpbf16ps(6, 0, 3);
    }
  }
  _tile_stored(4, out, ld_out * 4);
  if constexpr (NB > 1) _tile_stored(5, out + 16, ld_out * 4);
  if constexpr (NB > 2) _tile_stored(6, out + 32, ld_out * 4);
}

// A thin GEMM's rows [0, rows) over [i0, i1) with tiles: whole 32-blocks of the reduction on AMX,
// the rest (< 32, even) with AVX512 dot products.
void amx_thin_rows(const uint16_t* in, int64_t ld_in, int64_t rows, int64_t i0, int64_t i1, const uint16_t* w,
                   int64_t cols_pad, float* out) {
  const int64_t tiled_end = i0 + (i1 - i0) / 32 * 32;
  for (int64_t m = 0; m < rows; m += 16) {
    const int64_t mb = std::min<int64_t>(16, rows - m);
    configure_tiles(mb, 64);
    for (int64_t c = 0; c < cols_pad; c += 48) {
      const uint16_t* in_m = in + m * ld_in;
      float* out_m = out + m * cols_pad + c;
      switch (std::min<int64_t>(3, (cols_pad - c) / 16)) {
        case 3: amx_thin_block<3>(in_m, ld_in, i0, tiled_end, w + c * 2, cols_pad, out_m, cols_pad); break;
        case 2: amx_thin_block<2>(in_m, ld_in, i0, tiled_end, w + c * 2, cols_pad, out_m, cols_pad); break;
        default: amx_thin_block<1>(in_m, ld_in, i0, tiled_end, w + c * 2, cols_pad, out_m, cols_pad); break;
      }
    }
  }
  _tile_release();
  if (tiled_end < i1) thin_row_block(in, ld_in, rows, tiled_end, i1, w, cols_pad, out);
}

// A thin GEMM whose reduction runs over `depth` (even): out (rows, cols_pad) fp32 = in w.
// The reduction is split over threads, each into its own partial sum, added at the end.
void thin_gemm(const uint16_t* in, int64_t ld_in, int64_t rows, int64_t depth, const uint16_t* w,
               int64_t cols_pad, float* out) {
  constexpr int64_t kGrain = 1024;  // reduction length per task: below it threads cost more than they save
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), depth / kGrain));
  const int64_t per_chunk = ((depth + 31) / 32 + chunks - 1) / chunks * 32;  // whole AMX blocks but the last's tail
  std::vector<float> partial(chunks * rows * cols_pad, 0.0f);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const int64_t i0 = c * per_chunk, i1 = std::min(depth, i0 + per_chunk);
      if (i0 >= i1) continue;
      float* part = partial.data() + c * rows * cols_pad;
      if (amx_enabled)
        amx_thin_rows(in, ld_in, rows, i0, i1, w, cols_pad, part);
      else
        thin_row_block(in, ld_in, rows, i0, i1, w, cols_pad, part);
    }
  });
  std::copy(partial.begin(), partial.begin() + rows * cols_pad, out);
  for (int64_t c = 1; c < chunks; ++c)
    for (int64_t e = 0; e < rows * cols_pad; ++e) out[e] += partial[c * rows * cols_pad + e];
}

// Columns [c, c + 16) of z = scale * y + shift for one row, in fp32 (tail columns masked).
inline __m512 scaled_shifted(const uint16_t* y, const uint16_t* scale, const uint16_t* shift, int64_t c,
                                        __mmask16 mask) {
  __m512 z = bf16_to_fp32(_mm256_maskz_loadu_epi16(mask, y + c));
  if (scale) z = _mm512_mul_ps(z, bf16_to_fp32(_mm256_maskz_loadu_epi16(mask, scale + c)));
  if (shift) z = _mm512_add_ps(z, bf16_to_fp32(_mm256_maskz_loadu_epi16(mask, shift + c)));
  return z;
}

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1); }

// Whether any stored bf16 value is NaN/inf (exponent bits all set), accumulated in a register.
struct NonFinite {
  const __m256i exponent = _mm256_set1_epi16(0x7f80);
  __m256i seen = _mm256_setzero_si256();
  void add(__m256i out, __mmask16 mask) {
    const __m256i all_ones = _mm256_cmpeq_epi16(_mm256_and_si256(out, exponent), exponent);
    seen = _mm256_or_si256(seen, _mm256_maskz_mov_epi16(mask, all_ones));
  }
  bool any() const { return !_mm256_testz_si256(seen, seen); }
};

// Buffers of the calling thread reused from call to call, one per role, never shrunk: at prefill
// sizes (MBs) a fresh vector is an mmap whose pages the kernel zeroes on every call. They hold the
// largest mixed-slot batch seen: its tokens x (in + out) bf16, e.g. 2048 tokens of gate_up 50 MB.
enum ScratchRole { kGatheredX, kGatheredY };

template <ScratchRole Role>
uint16_t* scratch(int64_t count) {
  thread_local std::vector<uint16_t> buffer;
  if (int64_t(buffer.size()) < count) buffer.resize(count);
  return buffer.data();
}

// What the expansion of one slice reads and writes (see expand_slice).
struct Expansion {
  uint16_t* y;
  int64_t ld_y;
  const uint16_t *scale, *shift, *h;
  int64_t h_pad;
  const uint16_t* e;
  int64_t n;
};

// Rows [m0, m0 + MB) x columns [c, c + 16) of y = z + h E, in registers; true if any is NaN/inf.
template <int MB>
bool expand_block(const Expansion& x, int64_t m0, int64_t c) {
  const __mmask16 mask = tail_mask(x.n - c);
  const __mmask32 pair_mask = x.n - c >= 16 ? __mmask32(0xffffffff) : __mmask32((1ull << (2 * (x.n - c))) - 1);
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m)
    acc[m] = scaled_shifted(x.y + (m0 + m) * x.ld_y, x.scale, x.shift, c, mask);
  for (int64_t i = 0; i < x.h_pad; i += 2) {
    const __m512bh ev = (__m512bh)_mm512_maskz_loadu_epi16(pair_mask, x.e + (i / 2) * x.n * 2 + c * 2);
    for (int m = 0; m < MB; ++m) {
      int32_t pair;
      std::memcpy(&pair, x.h + (m0 + m) * x.h_pad + i, sizeof pair);
      acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_set1_epi32(pair), ev);
    }
  }
  NonFinite check;
  for (int m = 0; m < MB; ++m) {
    const __m256i out = fp32_to_bf16(acc[m]);
    check.add(out, mask);
    _mm256_mask_storeu_epi16(x.y + (m0 + m) * x.ld_y + c, mask, out);
  }
  return check.any();
}

constexpr int kExpandRows = 8;  // rows per block: 8 independent accumulator chains hide the dot product's latency

bool expand_rows(const Expansion& x, int64_t m0, int64_t rows, int64_t c) {
  switch (rows) {
    case 8: return expand_block<8>(x, m0, c);
    case 7: return expand_block<7>(x, m0, c);
    case 6: return expand_block<6>(x, m0, c);
    case 5: return expand_block<5>(x, m0, c);
    case 4: return expand_block<4>(x, m0, c);
    case 3: return expand_block<3>(x, m0, c);
    case 2: return expand_block<2>(x, m0, c);
    default: return expand_block<1>(x, m0, c);
  }
}

// Rows [m0, m0 + mb) x columns [c, c + 16 NB) of y = z + h E with tiles (configured for these rows
// and h's depth); the sums come back through memory for the epilogue: z, rounding, check, store.
template <int NB>
bool amx_expand_block(const Expansion& x, int64_t m0, int64_t mb, int64_t c) {
  alignas(64) float sums[16 * 48];
  _tile_zero(4);
  if constexpr (NB > 1) _tile_zero(5);
  if constexpr (NB > 2) _tile_zero(6);
  for (int64_t i = 0; i < x.h_pad; i += 32) {
    _tile_loadd(0, x.h + m0 * x.h_pad + i, x.h_pad * 2);
    const uint16_t* e_i = x.e + (i / 2) * x.n * 2 + c * 2;
    _tile_loadd(1, e_i, x.n * 4);
    _tile_dpbf16ps(4, 0, 1);
    if constexpr (NB > 1) {
      _tile_loadd(2, e_i + 32, x.n * 4);
      _tile_dpbf16ps(5, 0, 2);
    }
    if constexpr (NB > 2) {
      _tile_loadd(3, e_i + 64, x.n * 4);
      _tile_dpbf16ps(6, 0, 3);
    }
  }
  _tile_stored(4, sums, 48 * 4);
  if constexpr (NB > 1) _tile_stored(5, sums + 16, 48 * 4);
  if constexpr (NB > 2) _tile_stored(6, sums + 32, 48 * 4);
  // The epilogue is most of the op's time at prefill (a load, two conversions, an add and a store
  // per 16 outputs): masks once per block, row pointers once per row, and the NaN/inf check kept
  // in a vector register (a mask moved to a general register per store cost as much again).
  __mmask16 masks[NB];
  for (int b = 0; b < NB; ++b) masks[b] = tail_mask(x.n - c - 16 * b);
  const uint16_t *scale = x.scale ? x.scale + c : nullptr, *shift = x.shift ? x.shift + c : nullptr;
  NonFinite check;
  for (int64_t m = 0; m < mb; ++m) {
    uint16_t* y_row = x.y + (m0 + m) * x.ld_y + c;
    for (int b = 0; b < NB; ++b) {
      const __m512 z = scaled_shifted(y_row, scale, shift, 16 * b, masks[b]);
      const __m256i out = fp32_to_bf16(_mm512_add_ps(z, _mm512_load_ps(sums + m * 48 + 16 * b)));
      check.add(out, masks[b]);
      _mm256_mask_storeu_epi16(y_row + 16 * b, masks[b], out);
    }
  }
  return check.any();
}

// Column vectors [first, last) of a slice's expansion with tiles. Factor tiles read up to 15
// columns past the slice's end (dropped by the masked stores; the flat E has a 32-value tail).
bool amx_expand_columns(const Expansion& x, int64_t rows, int64_t first, int64_t last) {
  bool bad = false;
  for (int64_t m0 = 0; m0 < rows; m0 += 16) {
    const int64_t mb = std::min<int64_t>(16, rows - m0);
    configure_tiles(mb, std::min<int64_t>(x.h_pad, 32) * 2);
    for (int64_t v = first; v < last; v += 3) {
      switch (std::min<int64_t>(3, last - v)) {
        case 3: bad |= amx_expand_block<3>(x, m0, mb, v * 16); break;
        case 2: bad |= amx_expand_block<2>(x, m0, mb, v * 16); break;
        default: bad |= amx_expand_block<1>(x, m0, mb, v * 16); break;
      }
    }
  }
  _tile_release();
  return bad;
}

// y[:, cols] = z + h E over one slice's columns, h = [p_j q_j] (rows, h_pad) bf16, z = scale * y + shift
// computed from y in fp32 as each block is stored.
// Returns whether any stored value is NaN/inf.
bool expand_slice(const Expansion& x, int64_t rows) {
  constexpr int64_t kColsPerTask = 256;
  std::atomic<bool> nonfinite{false};
  // Tiles take h's depth in one block of up to 32 or in whole blocks of 32.
  const bool tiled = amx_enabled && x.h_pad > 0 && (x.h_pad <= 32 || x.h_pad % 32 == 0);
  at::parallel_for(0, (x.n + 15) / 16, kColsPerTask / 16, [&](int64_t first, int64_t last) {
    bool bad = false;
    if (tiled)
      bad = amx_expand_columns(x, rows, first, last);
    else
      for (int64_t v = first; v < last; ++v)
        for (int64_t m0 = 0; m0 < rows; m0 += kExpandRows)
          bad |= expand_rows(x, m0, std::min<int64_t>(kExpandRows, rows - m0), v * 16);
    if (bad) nonfinite.store(true, std::memory_order_relaxed);
  });
  return nonfinite.load();
}

std::vector<Slice> read_slices(const at::Tensor& meta) {
  TORCH_CHECK(meta.dtype() == at::kLong && meta.dim() == 2 && meta.size(1) == kMetaFields && meta.is_contiguous(),
              "sora_serve::fused_decode: meta must be a contiguous (slices, ", kMetaFields, ") int64 tensor");
  std::vector<Slice> slices(meta.size(0));
  std::memcpy(slices.data(), meta.data_ptr<int64_t>(), slices.size() * sizeof(Slice));
  return slices;
}

const uint16_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }

const uint16_t* optional_bits(const std::optional<at::Tensor>& t) { return t ? bits(*t) : nullptr; }

// Rows of x (activations) and y (base outputs, updated in place), each row contiguous.
struct Batch {
  const uint16_t* x;
  int64_t ld_x, in;
  uint16_t* y;
  int64_t ld_y, rows, y_cols;
};

bool apply_rows(const Batch& batch, const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                const at::Tensor& a, int64_t rank_pad, const at::Tensor& e, const at::Tensor& u, const at::Tensor& btu,
                const std::vector<Slice>& slices) {
  const int64_t rows = batch.rows, ld_y = batch.ld_y;
  uint16_t* out = batch.y;
  const uint16_t *scale_bits = optional_bits(scale), *shift_bits = optional_bits(shift);

  std::vector<float> p(rows * std::max<int64_t>(rank_pad, 16), 0.0f);
  if (rank_pad) thin_gemm(batch.x, batch.ld_x, rows, batch.in, bits(a), rank_pad, p.data());

  bool nonfinite = false;
  for (const Slice& s : slices) {
    const uint16_t* sc = scale_bits ? scale_bits + s.col : nullptr;
    const uint16_t* sh = shift_bits ? shift_bits + s.col : nullptr;
    if (!s.r && !s.k && !sc && !sh) continue;  // a slice the adapter leaves alone keeps the base output
    uint16_t* y_slice = out + s.col;
    std::vector<uint16_t> h(rows * s.h_pad(), 0);
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t i = 0; i < s.r; ++i) h[m * s.h_pad() + i] = bf16_bits(p[m * rank_pad + s.rank_at + i]);
    if (s.k) {
      // z U = y (scale U) + shift U: the base output is read in place, with no copy of z.
      std::vector<float> q(rows * s.k_pad(), 0.0f);
      thin_gemm(y_slice, ld_y, rows, s.n, bits(u) + s.u_at, s.k_pad(), q.data());
      const uint16_t* btu_j = bits(btu) + s.btu_at;
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t j = 0; j < s.k; ++j) {
          float sum = q[m * s.k_pad() + j] + bf16_value(btu_j[s.r * s.k + j]);
          for (int64_t i = 0; i < s.r; ++i) sum += bf16_value(h[m * s.h_pad() + i]) * bf16_value(btu_j[i * s.k + j]);
          h[m * s.h_pad() + s.r + j] = bf16_bits(sum);
        }
    }
    const Expansion expansion{y_slice, ld_y, sc, sh, h.data(), s.h_pad(), bits(e) + s.e_at, s.n};
    nonfinite |= expand_slice(expansion, rows);
  }
  return nonfinite;
}

// Rows in blocks of kRowBlock: a block's output rows stay in L2 from the rotation's projection to
// the expansion, where a whole prefill slice (128 x 5632 bf16: 1.4 MB) spills and each pass read
// it back from L3.
constexpr int64_t kRowBlock = 64;

bool apply_slot(const Batch& batch, const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                const at::Tensor& a, int64_t rank_pad, const at::Tensor& e, const at::Tensor& u, const at::Tensor& btu,
                const at::Tensor& meta) {
  const std::vector<Slice> slices = read_slices(meta);
  bool nonfinite = false;
  for (int64_t m0 = 0; m0 < batch.rows; m0 += kRowBlock) {
    const Batch block{batch.x + m0 * batch.ld_x, batch.ld_x, batch.in, batch.y + m0 * batch.ld_y,
                      batch.ld_y, std::min(kRowBlock, batch.rows - m0), batch.y_cols};
    nonfinite |= apply_rows(block, scale, shift, a, rank_pad, e, u, btu, slices);
  }
  return nonfinite;
}

void check_rows(const std::optional<at::Tensor>& rows, int64_t batch_rows) {
  if (!rows) return;
  TORCH_CHECK(rows->dtype() == at::kLong && rows->dim() == 1 && rows->is_contiguous(),
              "sora_serve::fused_decode: rows must be a contiguous 1-d int64 tensor");
  const int64_t* index = rows->data_ptr<int64_t>();
  for (int64_t m = 0; m < rows->size(0); ++m)
    TORCH_CHECK(index[m] >= 0 && index[m] < batch_rows, "sora_serve::fused_decode: row ", index[m], " out of range");
}

// One slot on every row of the batch in place, or with `rows` only those rows: its tokens of a
// batch that mixes slots, gathered here and written back (a few rows, cheap beside the factors;
// plain copies, as a torch op per slot would cost more than its bytes).
bool run_slot(const Batch& batch, const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
              const at::Tensor& a, int64_t rank_pad, const at::Tensor& e, const at::Tensor& u, const at::Tensor& btu,
              const at::Tensor& meta, const std::optional<at::Tensor>& rows) {
  if (!rows) return apply_slot(batch, scale, shift, a, rank_pad, e, u, btu, meta);
  const int64_t n_rows = rows->size(0);
  const int64_t* index = rows->data_ptr<int64_t>();
  const int64_t out_cols = batch.y_cols;
  uint16_t *x_rows = scratch<kGatheredX>(n_rows * batch.in), *y_rows = scratch<kGatheredY>(n_rows * out_cols);
  for (int64_t m = 0; m < n_rows; ++m) {
    std::memcpy(x_rows + m * batch.in, batch.x + index[m] * batch.ld_x, batch.in * sizeof(uint16_t));
    std::memcpy(y_rows + m * out_cols, batch.y + index[m] * batch.ld_y, out_cols * sizeof(uint16_t));
  }
  const Batch gathered{x_rows, batch.in, batch.in, y_rows, out_cols, n_rows, out_cols};
  const bool nonfinite = apply_slot(gathered, scale, shift, a, rank_pad, e, u, btu, meta);
  for (int64_t m = 0; m < n_rows; ++m)
    std::memcpy(batch.y + index[m] * batch.ld_y, y_rows + m * out_cols, out_cols * sizeof(uint16_t));
  return nonfinite;
}

// Every slot of a batch in one call (entry i of each list is slot i's): one op dispatch per layer
// and step, not one per slot, which is what a batch spread over many adapters pays for.
using Tensors = std::vector<at::Tensor>;
using OptionalTensors = std::vector<std::optional<at::Tensor>>;

bool fused_decode(const at::Tensor& x, at::Tensor& y, const OptionalTensors& scale, const OptionalTensors& shift,
                  const Tensors& a, const std::vector<int64_t>& rank_pad, const Tensors& e, const Tensors& u,
                  const Tensors& btu, const Tensors& meta, const OptionalTensors& rows) {
  const size_t n = a.size();
  TORCH_CHECK(scale.size() == n && shift.size() == n && rank_pad.size() == n && e.size() == n && u.size() == n &&
                  btu.size() == n && meta.size() == n && rows.size() == n,
              "sora_serve::fused_decode: one entry per slot in every list");
  TORCH_CHECK(x.dtype() == at::kBFloat16 && y.dtype() == at::kBFloat16 && y.dim() == 2 && y.stride(1) == 1,
              "sora_serve::fused_decode: x and y must be bf16, y's rows contiguous");
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0 && x.size(0) == y.size(0), "sora_serve::fused_decode: x (",
              x.sizes(), ") and y (", y.sizes(), ") do not fit");
  for (size_t i = 0; i < n; ++i) check_rows(rows[i], x.size(0));  // all of them before any slot writes y
  const at::Tensor x_rows = x.stride(1) == 1 ? x : x.contiguous();
  const Batch batch{bits(x_rows), x_rows.stride(0), x.size(1), reinterpret_cast<uint16_t*>(y.data_ptr()),
                    y.stride(0), x.size(0), y.size(1)};
  bool nonfinite = false;
  for (size_t i = 0; i < n; ++i)
    nonfinite |= run_slot(batch, scale[i], shift[i], a[i], rank_pad[i], e[i], u[i], btu[i], meta[i], rows[i]);
  return nonfinite;
}

}  // namespace

// A Python module, not a torch op: in a serving step every layer calls it right after its base
// GEMM has streamed the weights through the caches, and there a call through torch's dispatcher
// cost ~34 us against ~11 us through pybind11 (an empty call after a 64 MB read; one-off timing,
// 2-core Xeon). The engine runs it eagerly, between the layers' torch ops.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("use_amx", &use_amx, "AMX tiles for the GEMMs on or off; returns whether they are on");
  m.def("fused_decode", &fused_decode, "each slot's ServingFactors on its rows of y, in place; true if any is NaN/inf");
}
