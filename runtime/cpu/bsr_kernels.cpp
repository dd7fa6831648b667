// BSR x dense kernels for 1 x g blocks of int4/int8 codes with per-block fp16 scale and uint8 zero:
//   y[m, r] = sum_{b in row r} scale_b * sum_j (code_bj - zero_b) * x[m, col_b * g + j]
// Each block is dequantized once (into registers, or for M > 8 on AVX-512 into a small per-thread
// buffer of one row panel's blocks in one K chunk) and used for every row of x. Only the packed
// bytes are read: no dense weight exists at any point. AVX2 + FMA + F16C, AVX-512 where the CPU
// has it (fp32 x with M > 1, and the int8-activation mode), OpenMP over output rows.
// int4 layout: each 16 elements take 8 bytes; byte k holds element k (low nibble) and k + 8 (high).
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int MT = 8;                // rows of x handled together (accumulators kept in registers)

inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

// The 16 int4 codes packed in 8 bytes (byte k holds element k in its low nibble and k + 8 in its
// high one) as 16 bytes in element order.
inline __m128i nibbles16(const uint8_t* packed8) {
  const __m128i packed = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed8));
  const __m128i low = _mm_set1_epi8(0x0F);
  return _mm_unpacklo_epi64(_mm_and_si128(packed, low), _mm_and_si128(_mm_srli_epi16(packed, 4), low));
}

// Per-row float scales s and s * zero, converted 8 at a time. Where the arrays go on to at least
// ``readable`` blocks, the row's last partial eight are converted whole as well (the following
// row's values land in the outputs' slack: they need room for end - begin + 7 floats), which
// spares the scalar tail that took a tenth of the time of short-row GEMVs.
inline void row_params(const uint16_t* scales, const uint8_t* zeros, int32_t begin, int32_t end, float* s_out,
                       float* sz_out, int64_t readable = 0) {
  int32_t b = begin;
  const int32_t stop = end + 7 <= readable ? end + 7 : end;
  for (; b + 8 <= stop; b += 8) {
    __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + b)));
    __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zeros + b))));
    _mm256_storeu_ps(s_out + (b - begin), s);
    _mm256_storeu_ps(sz_out + (b - begin), _mm256_mul_ps(z, s));
  }
  for (; b < end; ++b) {
    s_out[b - begin] = _cvtsh_ss(scales[b]);
    sz_out[b - begin] = s_out[b - begin] * (float)zeros[b];
  }
}

// One block's weights, dequantized into registers: w[k] holds elements 8k .. 8k + 7.
// (code - zero) * scale is computed as code * scale - scale * zero: one conversion and one FMA per
// 8 codes (the OR-into-2^23 conversion, a subtraction and a multiply measured 3-14% slower at M = 1
// on Zen 3).
template <int BITS, int G>
struct Block {
  static constexpr int vecs = G / 8;
  static constexpr int64_t bytes = (int64_t)G * BITS / 8;
  __m256 w[vecs];

  inline void load(const uint8_t* values, int32_t b, float scale_zero, float scale) {
    const uint8_t* block = values + (int64_t)b * bytes;
    const __m256 zv = _mm256_set1_ps(scale_zero), sv = _mm256_set1_ps(scale);
    if constexpr (BITS == 4) {
      for (int k = 0; k < vecs; k += 2) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 4 * k)));
        w[k] = _mm256_fmsub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF))), sv, zv);
        w[k + 1] = _mm256_fmsub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), sv, zv);
      }
    } else {
      for (int k = 0; k < vecs; ++k)
        w[k] = _mm256_fmsub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 8 * k)))), sv, zv);
    }
  }

  inline void store(float* out) const {
    for (int k = 0; k < vecs; ++k) _mm256_storeu_ps(out + 8 * k, w[k]);
  }

  inline __m256 fma_into(const float* xp, __m256 acc) const {
    for (int k = 0; k < vecs; ++k) acc = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(xp + 8 * k), acc);
    return acc;
  }
};

constexpr int64_t kStackRow = 2048;  // per-row scale/zero buffers up to this many blocks live on the stack

// The first row whose blocks start at or after ``block`` (rows split so threads share blocks evenly).
inline int64_t row_for_block(const int32_t* indptr, int64_t N, int64_t block) {
  return std::lower_bound(indptr, indptr + N, (int32_t)block) - indptr;
}

// This thread's rows: one contiguous range holding an equal share of the blocks (static: no
// scheduling traffic, which costs more than the work on decode-sized layers; balanced when rows
// hold different numbers of blocks, as under layer or global pruning budgets).
inline std::pair<int64_t, int64_t> thread_rows(const int32_t* indptr, int64_t N) {
  const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
  const int64_t first = row_for_block(indptr, N, (int64_t)indptr[N] * tid / nth);
  const int64_t last = tid + 1 == nth ? N : row_for_block(indptr, N, (int64_t)indptr[N] * (tid + 1) / nth);
  return {first, last};
}

// ---------------------------------------------------------------------------------------------
// int8-activation mode (opt-in, lossy in x like MatMulNBits accuracy_level 4 and llama.cpp's
// Q4 x Q8): x is quantized per (row m, column block of g) to int8 with its own fp32 scale, and
// each 1 x g int4 block becomes integer dot products of 4 u8 x s8 products per int32 lane
// (vpdpbusd on AVX512-VNNI; vpmaddubsw + vpmaddwd on AVX2, exact as well: |code * q| pairs stay
// within int16). Lanes run over rows of x (8 per ymm tile, up to 8 tiles in registers), so every
// instruction serves 8 rows and a block's codes are unpacked once per output row, in registers:
//   y[m, r] = sum_b s_b * (sx[m, c_b] * sum_k q[m, k] code_bk  -  z_b * sx[m, c_b] * sum_k q[m, k])
// with q = round(x / sx) in [-127, 127]. The codes are the unsigned operand, q the signed one; the
// zero point's term uses the per-(row, column block) sum of q computed once with q.
// x layout: xq[((c * g/4 + k/4) * Mp + m) * 4 + k % 4], so one 32-byte load feeds 8 rows.
// The kernels' body is bsr_a8.inc, compiled twice: namespace a8 (VNNI, plus a 512-bit GEMV) and
// namespace a8_avx2 (every AVX2 CPU).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,avx2,fma,f16c")
namespace a8 {

inline __m256i dot2(__m256i acc, __m256i a1, __m256i b1, __m256i a2, __m256i b2) {
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc, a1, b1), a2, b2);
}

#include "bsr_a8.inc"

// M = 1: lanes run over K instead. x is quantized as above (for one row the layout is plain
// order), and the weights go 16 codes ("units") at a time, four units per 512-bit vpdpbusd: the
// 32 code bytes of four units are spread so each 128-bit lane holds one unit's codes in order,
// and four 16-byte slices of q are loaded into the matching lanes. The blocks' float work rides
// along in 128-bit vectors (one lane per block): cs_b = s_b * sx[c_b] multiplies the block's
// integer dot product, and z_b * s_b * sxq[c_b] (the zero point's term) is summed apart and
// subtracted once per row. sx and sxq are read with scalar loads: AVX-512 gathers measured as
// slow as the whole dot-product loop on Zen 4.
template <int G>
void gemv_a8(const float* x, int64_t /* M = 1 */, int64_t K, const int32_t* indptr, const uint16_t* indices,
             const uint8_t* values, const uint16_t* scales, const uint8_t* zeros, float* y, int64_t N) {
  constexpr int UPB = G / 16;                 // units per block
  constexpr int NB = UPB >= 4 ? 1 : 4 / UPB;  // blocks per four units
  const int64_t C = K / G;
  std::vector<int8_t> xq((size_t)K);
  std::vector<float> sx((size_t)C), sxq((size_t)C);
  quantize_x<G>(x, 1, K, 1, xq.data(), sx.data(), sxq.data());
  std::vector<double> pairs((size_t)C);
  scale_pairs(sx.data(), sxq.data(), C, pairs.data());
  const double* pair = pairs.data();
  alignas(16) static const int8_t nothing[16] = {};
#pragma omp parallel
  {
    const auto [first, last] = thread_rows(indptr, N);
    const __m512i spread = _mm512_set_epi64(3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i shifts = _mm512_set_epi64(4, 0, 4, 0, 4, 0, 4, 0);
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512i lane_block = _mm512_set_epi32(3 / UPB, 3 / UPB, 3 / UPB, 3 / UPB, 2 / UPB, 2 / UPB, 2 / UPB,
                                                2 / UPB, 1 / UPB, 1 / UPB, 1 / UPB, 1 / UPB, 0, 0, 0, 0);
    for (int64_t r = first; r < last; ++r) {
      const int32_t begin = indptr[r], n = indptr[r + 1] - begin;
      const uint8_t* codes = values + (int64_t)begin * (G / 2);
      const uint16_t* idx = indices + begin;
      const int64_t units = (int64_t)n * UPB;
      // one accumulator: its fma chain (4 cycles) is shorter than an iteration, and an array of
      // two indexed by (u >> 2) & 1 was kept on the stack (a store-to-load chain per iteration)
      __m512 acc = _mm512_setzero_ps();
      __m128 zacc = _mm_setzero_ps();
      const int8_t* xqp = xq.data();
      // four units; FULL: all four lie in the row (the main loop: no masks, no branches), else
      // the row's last partial four (masked loads, lanes past the end read zeros)
      auto step = [&](int64_t u, auto full_tag) {
        constexpr bool FULL = decltype(full_tag)::value;
        const int64_t j0 = u / UPB;  // first block of these four units
        const int nv = FULL ? NB : (int)std::min<int64_t>(NB, n - j0);
        // a block of 8 units (g = 128) spans two passes: its zero point's term counts once
        const __m128 cs4 = block_factors<NB>(pair, idx + j0, scales + begin + j0, zeros + begin + j0, nv,
                                             UPB < 4 || u % UPB == 0, zacc, nv);
        const __m512 cs = _mm512_permutexvar_ps(lane_block, _mm512_castps128_ps512(cs4));
        // the codes of four units, one unit per 128-bit lane, in element order
        const __m256i c32 = FULL ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + u * 8))
                                 : _mm256_maskz_loadu_epi8((__mmask32)((1ull << (8 * (units - u))) - 1), codes + u * 8);
        __m512i w = _mm512_permutexvar_epi64(spread, _mm512_castsi256_si512(c32));
        w = _mm512_and_si512(_mm512_srlv_epi64(w, shifts), low);
        auto x_of = [&](int64_t v) -> const __m128i* {
          return reinterpret_cast<const __m128i*>(FULL || v < units ? xqp + (int64_t)idx[v / UPB] * G + (v % UPB) * 16
                                                                    : nothing);
        };
        __m512i q = _mm512_castsi128_si512(_mm_loadu_si128(x_of(u)));
        q = _mm512_inserti32x4(q, _mm_loadu_si128(x_of(u + 1)), 1);
        q = _mm512_inserti32x4(q, _mm_loadu_si128(x_of(u + 2)), 2);
        q = _mm512_inserti32x4(q, _mm_loadu_si128(x_of(u + 3)), 3);
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, q);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), cs, acc);
      };
      int64_t u = 0;
      for (; u + 4 <= units; u += 4) step(u, std::true_type{});
      if (u < units) step(u, std::false_type{});
      const __m128 z2 = _mm_add_ps(zacc, _mm_movehl_ps(zacc, zacc));
      y[r] = _mm512_reduce_add_ps(acc) - _mm_cvtss_f32(_mm_add_ss(z2, _mm_movehdup_ps(z2)));
    }
  }
}

}  // namespace a8
#pragma GCC pop_options

namespace a8_avx2 {

// two vpmaddubsw products (each pair sum at most 2 * 15 * 127) add exactly in int16 lanes
inline __m256i dot2(__m256i acc, __m256i a1, __m256i b1, __m256i a2, __m256i b2) {
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(a1, b1), _mm256_maddubs_epi16(a2, b2));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

#include "bsr_a8.inc"

}  // namespace a8_avx2

// ---------------------------------------------------------------------------------------------
// fp32 x with more than one row, on AVX-512 CPUs (kernel() dispatches here; AVX2 otherwise).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace wide {

// Codes v * 16 .. v * 16 + 15 of a block as int32 lanes, in element order.
template <int BITS>
inline __m512i codes16(const uint8_t* block, int v) {
  return _mm512_cvtepu8_epi32(BITS == 4 ? nibbles16(block + 8 * v)
                                        : _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 16 * v)));
}

// 2 <= M <= 8: output rows one by one as in kernel(), but each 16 weights of a block are one
// 512-bit register (code * s - s * zero in one FMA) used for every row of x: 1.1-1.4x the AVX2
// loop at M = 2-8 (at M = 1 the AVX2 loop stays ahead).
template <int BITS, int G, int MT>
void rows_small(const float* x, int64_t K, const int32_t* indptr, const uint16_t* indices, const uint8_t* values,
                const uint16_t* scales, const uint8_t* zeros, float* y, int64_t N) {
  constexpr int64_t bytes = (int64_t)G * BITS / 8;
#pragma omp parallel
  {
    const auto [first, last] = thread_rows(indptr, N);
    std::vector<float> S(K / G + 16), SZ(K / G + 16);
    for (int64_t r = first; r < last; ++r) {
      const int32_t begin = indptr[r], end = indptr[r + 1];
      row_params(scales, zeros, begin, end, S.data(), SZ.data());
      __m512 acc[MT];
      for (int i = 0; i < MT; ++i) acc[i] = _mm512_setzero_ps();
      for (int32_t b = begin; b < end; ++b) {
        const float* xp = x + (int64_t)indices[b] * G;
        const __m512 s = _mm512_set1_ps(S[b - begin]), sz = _mm512_set1_ps(SZ[b - begin]);
        for (int v = 0; v < G / 16; ++v) {
          const __m512 w = _mm512_fmsub_ps(_mm512_cvtepi32_ps(codes16<BITS>(values + b * bytes, v)), s, sz);
          for (int i = 0; i < MT; ++i) acc[i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xp + i * K + 16 * v), acc[i]);
        }
      }
      for (int i = 0; i < MT; ++i) y[i * N + r] = _mm512_reduce_add_ps(acc[i]);
    }
  }
}

// M > 8: column-outer register tiles. x is transposed into tiles of 16 rows
// (xt[(t * K + k) * 16 + l] = x[16 t + l, k]), so one register holds column k for 16 rows of x.
// Output rows go in panels and K in chunks; a panel's blocks in a chunk are dequantized once and
// bucketed by column block. For each column block, x's 16 registers per 16 columns are loaded once
// and serve every block of the panel in that column (about half the panel's rows at 50%
// sparsity): each weight is one broadcast FMA operand, eight rows' accumulators in flight. This
// is the register reuse of a dense GEMM, which a row-by-row walk cannot have (every block reloads
// its x, from L2 once x outgrows L1): 1.7-2.5x the AVX2 K-chunked GEMM at M = 16-64.
constexpr int L = 16;

// n blocks of one column block (dequantized weights one after another, G floats each; rows[e]
// is block e's row offset in the partial sums), for one tile of x and 16 of the block's columns.
template <int G>
inline void column_slice(const float* xc, const float* w, const int32_t* rows, int64_t n, float* part) {
  __m512 xr[16];
  for (int j = 0; j < 16; ++j) xr[j] = _mm512_loadu_ps(xc + j * L);
  auto fma = [&](const float* wp, int j, __m512 acc) { return _mm512_fmadd_ps(_mm512_set1_ps(wp[j]), xr[j], acc); };
  int64_t e = 0;
  for (; e + 8 <= n; e += 8) {  // eight chains in flight
    __m512 a[8];
    for (int i = 0; i < 8; ++i) a[i] = _mm512_loadu_ps(part + rows[e + i]);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j)
      for (int i = 0; i < 8; ++i) a[i] = fma(w + (e + i) * G, j, a[i]);
    for (int i = 0; i < 8; ++i) _mm512_storeu_ps(part + rows[e + i], a[i]);
  }
  for (; e < n; ++e) {  // the last one to seven: four chains over the block's columns
    __m512 a[4] = {_mm512_loadu_ps(part + rows[e]), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) a[j % 4] = fma(w + e * G, j, a[j % 4]);
    _mm512_storeu_ps(part + rows[e], _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
  }
}

// One block's G weights, (code - zero) * scale: integer code - zero, then one conversion and the
// scale (a scalar int-to-float conversion of the zero would chain every block to the previous one).
template <int BITS, int G>
inline void dequant_block(const uint8_t* block, uint16_t scale, uint8_t zero, float* out) {
  const __m512 sv = _mm512_cvtph_ps(_mm256_set1_epi16((short)scale));
  const __m512i zv = _mm512_set1_epi32(zero);
  for (int v = 0; v < G / 16; ++v)
    _mm512_storeu_ps(out + 16 * v, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(codes16<BITS>(block, v), zv)), sv));
}

constexpr int SLICE = 16;

#include "bsr_cols.inc"

// The fp32-x entry for M > 1.
template <int BITS, int G>
void gemm(const float* x, int64_t M, int64_t K, const int32_t* indptr, const uint16_t* indices, const uint8_t* values,
          const uint16_t* scales, const uint8_t* zeros, float* y, int64_t N) {
  switch (M) {
#define EFFC_SMALL(n) case n: rows_small<BITS, G, n>(x, K, indptr, indices, values, scales, zeros, y, N); return;
    EFFC_SMALL(2) EFFC_SMALL(3) EFFC_SMALL(4) EFFC_SMALL(5) EFFC_SMALL(6) EFFC_SMALL(7) EFFC_SMALL(8)
#undef EFFC_SMALL
    default: gemm_cols<BITS, G>(x, M, K, indptr, indices, values, scales, zeros, y, N);
  }
}

}  // namespace wide
#pragma GCC pop_options

// M > 8 on AVX2 CPUs: the same column-outer register tiles in 256-bit registers (8 rows of x per
// register). With 16 ymm registers, eight of x's columns stay in registers (not sixteen) and four
// accumulator chains run (not eight).
namespace cols8 {

constexpr int L = 8, SLICE = 8;

template <int G>
inline void column_slice(const float* xc, const float* w, const int32_t* rows, int64_t n, float* part) {
  __m256 xr[SLICE];
  for (int j = 0; j < SLICE; ++j) xr[j] = _mm256_loadu_ps(xc + j * L);
  auto fma = [&](const float* wp, int j, __m256 acc) { return _mm256_fmadd_ps(_mm256_set1_ps(wp[j]), xr[j], acc); };
  int64_t e = 0;
  for (; e + 4 <= n; e += 4) {  // four chains in flight
    __m256 a[4];
    for (int i = 0; i < 4; ++i) a[i] = _mm256_loadu_ps(part + rows[e + i]);
#pragma GCC unroll 8
    for (int j = 0; j < SLICE; ++j)
      for (int i = 0; i < 4; ++i) a[i] = fma(w + (e + i) * G, j, a[i]);
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(part + rows[e + i], a[i]);
  }
  for (; e < n; ++e) {  // the last one to three: two chains over the block's columns
    __m256 a[2] = {_mm256_loadu_ps(part + rows[e]), _mm256_setzero_ps()};
#pragma GCC unroll 8
    for (int j = 0; j < SLICE; ++j) a[j % 2] = fma(w + e * G, j, a[j % 2]);
    _mm256_storeu_ps(part + rows[e], _mm256_add_ps(a[0], a[1]));
  }
}

template <int BITS, int G>
inline void dequant_block(const uint8_t* block, uint16_t scale, uint8_t zero, float* out) {
  const float s = _cvtsh_ss(scale);
  Block<BITS, G> blk;
  blk.load(block, 0, s * (float)zero, s);
  blk.store(out);
}

#include "bsr_cols.inc"

}  // namespace cols8

// Small GEMM for 8 < M < 12 on AVX2: each thread walks its rows in panels of up to 256 rows; within a panel K
// is cut into chunks whose slice of x (all M rows) stays in L2, and each row's blocks in a chunk
// are dequantized once into a small buffer that then serves every tile of MT rows of x. Partial
// sums go to a panel-local (row, m) buffer (no strided writes into y per chunk); each row keeps a
// cursor into its ascending blocks.
template <int BITS, int G>
void gemm_chunked(const float* x, int64_t M, int64_t K, const int32_t* indptr, const uint16_t* indices,
                  const uint8_t* values, const uint16_t* scales, const uint8_t* zeros, float* y, int64_t N) {
  const int64_t cols = K / G;
  const int64_t chunk = std::min<int64_t>(std::max<int64_t>((int64_t)(192 * 1024 / 4) / (M * G), 8), cols);
  constexpr int64_t PANEL = 256;
#pragma omp parallel
  {
    const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t first = row_for_block(indptr, N, (int64_t)indptr[N] * tid / nth);
    const int64_t last = tid + 1 == nth ? N : row_for_block(indptr, N, (int64_t)indptr[N] * (tid + 1) / nth);
    std::vector<int32_t> cursor(PANEL);
    std::vector<float> wbuf((size_t)chunk * G), S(chunk + 8), SZ(chunk + 8), part((size_t)PANEL * M);
    for (int64_t p0 = first; p0 < last; p0 += PANEL) {
      const int64_t p1 = std::min(p0 + PANEL, last);
      std::copy(indptr + p0, indptr + p1, cursor.begin());
      std::fill(part.begin(), part.end(), 0.0f);
      for (int64_t c0 = 0; c0 < cols; c0 += chunk) {
        const int64_t c1 = std::min(c0 + chunk, cols);
        for (int64_t r = p0; r < p1; ++r) {
          const int32_t b0 = cursor[r - p0], row_end = indptr[r + 1];
          int32_t b1 = b0;
          while (b1 < row_end && indices[b1] < c1) ++b1;
          cursor[r - p0] = b1;
          if (b0 == b1) continue;
          row_params(scales, zeros, b0, b1, S.data(), SZ.data());
          Block<BITS, G> blk;
          for (int32_t b = b0; b < b1; ++b) {
            blk.load(values, b, SZ[b - b0], S[b - b0]);
            blk.store(wbuf.data() + (int64_t)(b - b0) * G);
          }
          float* out = part.data() + (r - p0) * M;
          for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int mt = (int)std::min<int64_t>(MT, M - m0);
            __m256 acc[MT];
            for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps();
            const float* xm = x + m0 * K;
            for (int32_t b = b0; b < b1; ++b) {
              const float* wp = wbuf.data() + (int64_t)(b - b0) * G;
              const float* xp = xm + (int64_t)indices[b] * G;
              for (int k = 0; k < G / 8; ++k) {
                const __m256 w = _mm256_loadu_ps(wp + 8 * k);
                if (mt == MT) {
                  for (int i = 0; i < MT; ++i) acc[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp + i * K + 8 * k), acc[i]);
                } else {
                  for (int i = 0; i < mt; ++i) acc[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp + i * K + 8 * k), acc[i]);
                }
              }
            }
            for (int i = 0; i < mt; ++i) out[m0 + i] += hsum(acc[i]);
          }
        }
      }
      for (int64_t r = p0; r < p1; ++r)
        for (int64_t m = 0; m < M; ++m) y[m * N + r] = part[(r - p0) * M + m];
    }
  }
}

bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return yes;
}
bool wide_enabled = true;  // tests turn it off to check the AVX2 kernels on AVX-512 machines

// GEMV of two short rows that hold the same number n of blocks (every row under per-row budgets),
// blocks begin .. begin + 2n - 1: one pass converts both rows' scales, and the two rows' chains
// (two each) hide each other's latency. At K = 576 (decode's layers; 18 blocks a row at 50%) this
// takes 0.88-0.92x the time of the row-by-row loop; at 48 blocks and more it gains nothing, and
// on long rows (128+) two chains a row are latency-bound (1.5x slower), hence kPairBlocks.
constexpr int32_t kPairBlocks = 32;

template <int BITS, int G>
inline void gemv_pair(const float* x, const uint16_t* indices, const uint8_t* values, const uint16_t* scales,
                      const uint8_t* zeros, int32_t begin, int32_t n, float* S, float* SZ, float* y2, int64_t nnzb) {
  row_params(scales, zeros, begin, begin + 2 * n, S, SZ, nnzb);
  const float* s = S - begin;
  const float* sz = SZ - begin;
  __m256 a[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, c[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  Block<BITS, G> blk;
  auto both = [&](int32_t j, int u) {
    const int32_t b = begin + j, b2 = b + n;
    blk.load(values, b, sz[b], s[b]);
    a[u] = blk.fma_into(x + (int64_t)indices[b] * G, a[u]);
    blk.load(values, b2, sz[b2], s[b2]);
    c[u] = blk.fma_into(x + (int64_t)indices[b2] * G, c[u]);
  };
  int32_t j = 0;
  for (; j + 2 <= n; j += 2) both(j, 0), both(j + 1, 1);
  if (j < n) both(j, 0);
  y2[0] = hsum(_mm256_add_ps(a[0], a[1]));
  y2[1] = hsum(_mm256_add_ps(c[0], c[1]));
}

template <int BITS, int G>
void kernel(const float* x, int64_t M, int64_t K, const int32_t* indptr, const uint16_t* indices,
            const uint8_t* values, const uint16_t* scales, const uint8_t* zeros, float* y, int64_t N) {
  const int64_t max_row = K / G;
  if (M > 1 && wide_enabled && has_avx512()) {
    wide::gemm<BITS, G>(x, M, K, indptr, indices, values, scales, zeros, y, N);
    return;
  }
  if (M > MT) {
    // the register tiles pad M to a multiple of 8: below 12 rows the K-chunked GEMM costs less
    // (Zen 3: 0.87x the tiles' time at M = 9; the tiles take 0.69-0.72x its time at M = 16 and
    // 0.47-0.60x at M = 64)
    if (M >= 12) cols8::gemm_cols<BITS, G>(x, M, K, indptr, indices, values, scales, zeros, y, N);
    else gemm_chunked<BITS, G>(x, M, K, indptr, indices, values, scales, zeros, y, N);
    return;
  }
#pragma omp parallel
  {
    const auto [first, last] = thread_rows(indptr, N);
    float S_stack[kStackRow], SZ_stack[kStackRow];
    std::vector<float> S_heap, SZ_heap;
    float *S = S_stack, *SZ = SZ_stack;
    if (max_row + 8 > kStackRow) {
      S_heap.resize(max_row + 8), SZ_heap.resize(max_row + 8);
      S = S_heap.data(), SZ = SZ_heap.data();
    }
    for (int64_t r = first; r < last; ++r) {
      const int32_t begin = indptr[r], end = indptr[r + 1];
      if (M == 1 && end - begin <= kPairBlocks && r + 1 < last && indptr[r + 2] - end == end - begin) {
        gemv_pair<BITS, G>(x, indices, values, scales, zeros, begin, end - begin, S, SZ, y + r, indptr[N]);
        ++r;
        continue;
      }
      row_params(scales, zeros, begin, end, S, SZ, indptr[N]);
      const float* s = S - begin;
      const float* sz = SZ - begin;
      if (M == 1) {  // GEMV: four independent accumulator chains over the row's blocks
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        Block<BITS, G> blk[4];
        int32_t b = begin;
        for (; b + 4 <= end; b += 4) {
          // codes 256 bytes ahead (prefetches never fault past the end): on Zen 4 0.91-0.93x the
          // time at K = 11008, where x (44 kB) outgrows L1, and 0.95-0.97x at K = 4096
          _mm_prefetch(reinterpret_cast<const char*>(values + (int64_t)b * Block<BITS, G>::bytes + 256), _MM_HINT_T0);
          for (int u = 0; u < 4; ++u) {
            blk[u].load(values, b + u, sz[b + u], s[b + u]);
            acc[u] = blk[u].fma_into(x + (int64_t)indices[b + u] * G, acc[u]);
          }
        }
        for (; b < end; ++b) {
          blk[0].load(values, b, sz[b], s[b]);
          acc[0] = blk[0].fma_into(x + (int64_t)indices[b] * G, acc[0]);
        }
        y[r] = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        continue;
      }
      for (int64_t m0 = 0; m0 < M; m0 += MT) {  // small GEMM: each dequantized block serves MT rows of x
        const int mt = (int)std::min<int64_t>(MT, M - m0);
        __m256 acc[MT];
        for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps();
        Block<BITS, G> blk;
        for (int32_t b = begin; b < end; ++b) {
          blk.load(values, b, sz[b], s[b]);
          const float* xp = x + m0 * K + (int64_t)indices[b] * G;
          if (mt == MT) {
            for (int i = 0; i < MT; ++i) acc[i] = blk.fma_into(xp + i * K, acc[i]);
          } else {
            for (int i = 0; i < mt; ++i) acc[i] = blk.fma_into(xp + i * K, acc[i]);
          }
        }
        for (int i = 0; i < mt; ++i) y[(m0 + i) * N + r] = hsum(acc[i]);
      }
    }
  }
}

}  // namespace


torch::Tensor bsr_linear(torch::Tensor x, torch::Tensor indptr, torch::Tensor indices, torch::Tensor values,
                         torch::Tensor scales, torch::Tensor zeros, int64_t out_features, int64_t group,
                         int64_t bits) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be contiguous float32 (M, K)");
  TORCH_CHECK(group % (bits == 4 ? 16 : 8) == 0 && x.size(1) % group == 0, "group must divide K (multiple of 16 for int4, 8 for int8)");
  TORCH_CHECK(indptr.size(0) == out_features + 1, "indptr must have out_features + 1 entries");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(group == 16 || group == 32 || group == 64 || group == 128, "group must be 16, 32, 64 or 128");
  auto y = torch::empty({x.size(0), out_features}, x.options());
  const auto* idx = reinterpret_cast<const uint16_t*>(indices.data_ptr());
  const auto* sc = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  auto args = std::make_tuple(x.data_ptr<float>(), x.size(0), x.size(1), indptr.data_ptr<int32_t>(), idx,
                              values.data_ptr<uint8_t>(), sc, zeros.data_ptr<uint8_t>(), y.data_ptr<float>(), out_features);
#define EFFC_DISPATCH(B, G) if (bits == B && group == G) std::apply(kernel<B, G>, args);
  EFFC_DISPATCH(4, 16) EFFC_DISPATCH(4, 32) EFFC_DISPATCH(4, 64) EFFC_DISPATCH(4, 128)
  EFFC_DISPATCH(8, 16) EFFC_DISPATCH(8, 32) EFFC_DISPATCH(8, 64) EFFC_DISPATCH(8, 128)
#undef EFFC_DISPATCH
  return y;
}

bool has_vnni() { return has_avx512() && __builtin_cpu_supports("avx512vnni"); }

// The int8-activation mode (see namespace a8): int4 weights only (code - zero must fit a byte).
// AVX512-VNNI CPUs take namespace a8 (unless use_avx512(false)), every other one a8_avx2, where
// M < 8 runs row by row (1.0-2.8x the 8-row tiles on Zen 3, which cost the same at M = 1 as at 8).
torch::Tensor bsr_linear_a8(torch::Tensor x, torch::Tensor indptr, torch::Tensor indices, torch::Tensor values,
                            torch::Tensor scales, torch::Tensor zeros, int64_t out_features, int64_t group) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be contiguous float32 (M, K)");
  TORCH_CHECK(x.size(1) % group == 0, "group must divide K");
  TORCH_CHECK(indptr.size(0) == out_features + 1, "indptr must have out_features + 1 entries");
  TORCH_CHECK(group == 16 || group == 32 || group == 64 || group == 128, "group must be 16, 32, 64 or 128");
  auto y = torch::empty({x.size(0), out_features}, x.options());
  const auto* idx = reinterpret_cast<const uint16_t*>(indices.data_ptr());
  const auto* sc = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  auto args = std::make_tuple(x.data_ptr<float>(), x.size(0), x.size(1), indptr.data_ptr<int32_t>(), idx,
                              values.data_ptr<uint8_t>(), sc, zeros.data_ptr<uint8_t>(), y.data_ptr<float>(), out_features);
  const bool one = x.size(0) == 1, vnni = wide_enabled && has_vnni(), rows = x.size(0) < a8_avx2::TILE;
#define EFFC_A8(G)                                                                   \
  if (group == G) {                                                                  \
    if (vnni) std::apply(one ? a8::gemv_a8<G> : a8::gemm_a8<G>, args);               \
    else std::apply(rows ? a8_avx2::gemv_a8y<G> : a8_avx2::gemm_a8<G>, args);        \
  }
  EFFC_A8(16) EFFC_A8(32) EFFC_A8(64) EFFC_A8(128)
#undef EFFC_A8
  return y;
}

// Sum of all bytes of a buffer, read with the given threads: the memory-bandwidth probe that
// benchmarks use for their floor (a read-only reduction over touched memory).
double read_bytes(torch::Tensor buffer) {
  const auto* p = reinterpret_cast<const __m256i*>(buffer.data_ptr());
  const int64_t n = buffer.numel() * buffer.element_size() / 32;
  int64_t total = 0;
#pragma omp parallel reduction(+ : total)
  {
    __m256i acc = _mm256_setzero_si256();
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) acc = _mm256_add_epi64(acc, _mm256_sad_epu8(_mm256_loadu_si256(p + i), _mm256_setzero_si256()));
    alignas(32) int64_t lanes[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
    total += lanes[0] + lanes[1] + lanes[2] + lanes[3];
  }
  return (double)total;
}

void register_decode_ops(pybind11::module_& m);  // decode_ops.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_decode_ops(m);
  m.def("read_bytes", &read_bytes, "sum of all bytes (bandwidth probe)");
  m.def("bsr_linear", &bsr_linear, "BSR (1 x g blocks, int4/int8) times dense x");
  m.def("bsr_linear_a8", &bsr_linear_a8, "BSR int4 times x quantized to int8 per (row, block) (VNNI or AVX2)");
  m.def("use_avx512", [](bool on) { const bool was = wide_enabled && has_avx512(); wide_enabled = on; return was; },
        "turn the AVX-512 kernels (fp32 x with M > 1, and VNNI for int8 x) on or off (returns whether they were in use)");
  m.def("has_avx512", &has_avx512, "whether this CPU runs the AVX-512 fp32-x kernels");
  m.def("has_vnni", &has_vnni, "whether this CPU runs the AVX512-VNNI int8-activation kernels");
}
