// SIMD building blocks shared by the kernels (AVX2 + FMA + F16C): horizontal sums, code
// widening, the quantized row loop, and a vectorised exp. Header-only, so each kernel file
// inlines them.
#pragma once
#include <torch/extension.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace pocketlm {

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline __m256 widen8(__m128i bytes) {  // the low 8 unsigned bytes -> 8 floats
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
}

// Load the 32 codes of block `blk` of a row as four vectors of 8 floats (columns in order).
template <int BITS>
inline void load_block(const uint8_t* row, int64_t blk, __m256 w[4]) {
  if constexpr (BITS == 8) {
    const uint8_t* p = row + blk * 32;
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    __m128i lo = _mm256_castsi256_si128(b), hi = _mm256_extracti128_si256(b, 1);
    w[0] = widen8(lo);
    w[1] = widen8(_mm_srli_si128(lo, 8));
    w[2] = widen8(hi);
    w[3] = widen8(_mm_srli_si128(hi, 8));
  } else {
    const uint8_t* p = row + blk * 16;
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(b, mask);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    w[0] = widen8(lo);
    w[1] = widen8(_mm_srli_si128(lo, 8));
    w[2] = widen8(hi);
    w[3] = widen8(_mm_srli_si128(hi, 8));
  }
}

// 8-bit codes with fp32 activations: codes widened to fp32 in registers, w = (q - z) * s.
// y[t, n] for TT rows of x at once (weights read once for all of them). xsum (TT, G): per-group
// sums of x.
template <int BITS, int TT>
void gemv_rows(const float* x, int64_t ldx, const uint8_t* codes, int64_t row_bytes,
               const at::Half* scales, const uint8_t* zeros, const float* xsum, int64_t G,
               int64_t gs, int64_t Kp, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t blocks_per_group = gs / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = codes + n * row_bytes;
    float out[TT];
    for (int t = 0; t < TT; ++t) out[t] = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t b0 = g * blocks_per_group;
      const int64_t b1 = std::min(b0 + blocks_per_group, Kp / 32);
      // Independent accumulators, so the FMAs of a block do not wait on each other.
      constexpr int NA = TT == 1 ? 4 : 2;
      __m256 acc[TT][NA];
      for (int t = 0; t < TT; ++t)
        for (int j = 0; j < NA; ++j) acc[t][j] = _mm256_setzero_ps();
      for (int64_t blk = b0; blk < b1; ++blk) {
        __m256 w[4];
        load_block<BITS>(row, blk, w);
        for (int t = 0; t < TT; ++t) {
          const float* xp = x + t * ldx + blk * 32;
          for (int i = 0; i < 4; ++i)
            acc[t][i % NA] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xp + 8 * i), acc[t][i % NA]);
        }
      }
      const float s = static_cast<float>(scales[n * G + g]);
      const float z = static_cast<float>(zeros[n * G + g]);
      for (int t = 0; t < TT; ++t) {
        __m256 sum = acc[t][0];
        for (int j = 1; j < NA; ++j) sum = _mm256_add_ps(sum, acc[t][j]);
        const float dot = hsum(sum);
        out[t] += s * (dot - z * xsum[t * G + g]);
      }
    }
    for (int t = 0; t < TT; ++t) y[t * ldy + n] = out[t];
  }
}


// exp(x) for 8 floats: Cephes' expf polynomial after range reduction by ln 2 (relative error
// ~1e-7 over the clamped range [-88, 88]).
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// s[j] <- exp(s[j] - m) for j < n; returns their sum (a softmax's numerators, in place).
inline float exp_shifted_sum(float* s, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 vsum = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
    _mm256_storeu_ps(s + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum(vsum);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    sum += s[j];
  }
  return sum;
}

// One dense fp32 dot product of length K (weights streamed once, x from cache).
inline float dot_f32(const float* w, const float* x, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
  }
  for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
  float acc = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; k < K; ++k) acc += w[k] * x[k];
  return acc;
}


// -- integer dot products: 4- and 3-bit weights x int8 activations ------------------------------
// For 4- and 3-bit codes, decode-time activations are rounded to int8 with one fp32 scale per
// block of 32 (as llama.cpp does for its quantized dot products), so a block's products are
// integer multiply-adds (dot_u8s8: VNNI or maddubs + madd -> s32) instead of widening
// codes to fp32: 120 -> 145 tokens/s for int4 g128, at +0.06% perplexity on the decode path.
// 8-bit codes keep fp32 activations (gemv_rows above): there the rounding cost +0.7%
// perplexity for a few % of speed, since 8-bit decode is bound by memory, not arithmetic.

// Sums of four adjacent u8 x s8 products, as 8 int32: one VNNI instruction (vpdpbusd) where
// the build has it (AVX512-VNNI with VL, or AVX-VNNI), else maddubs (u8 x s8 -> s16 pairs)
// then madd against ones (-> s32). Same result for codes < 16 (no int16 saturation).
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// x (K floats, K a multiple of 32) -> xq (K int8), d (K/32 scales), bsum (K/32 sums of the
// rounded values d * sum(xq), for the zero-point term).
inline void quantize_act(const float* x, int64_t K, int8_t* xq, float* d, float* bsum) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < K / 32; ++b) {
    const float* p = x + b * 32;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(p + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_mask, v[i]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float a = _mm_cvtss_f32(m);
    const float dd = a / 127.f;
    const __m256 id = _mm256_set1_ps(dd > 0.f ? 1.f / dd : 0.f);
    __m256i q[4];
    for (int i = 0; i < 4; ++i)
      q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], id),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    const __m256i p16a = _mm256_packs_epi32(q[0], q[1]);
    const __m256i p16b = _mm256_packs_epi32(q[2], q[3]);
    const __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + b * 32), p8);
    d[b] = dd;
    bsum[b] = dd * static_cast<float>(_mm_cvtsi128_si32(s4));
  }
}

// Rows [n0, n1) of y (TT, ldy) = xhat (TT rows) @ dequant(codes)^T, where xhat = d * xq are
// activations from quantize_act and gsum (TT, G) their per-group sums. Per group g of a row
// with scale s and zero point z:  s * (sum_k q_k xhat_k - z * gsum_g). BITS 4: two codes a
// byte (qgemv.cpp's layout); BITS 3: 3-bit codes unpacked to one byte each. Codes < 16, so
// unsigned x signed byte products never overflow int16.
// The 32 codes of block `blk` of a row as 32 unsigned bytes, columns in order.
template <int BITS>
inline __m256i load_codes(const uint8_t* row, int64_t blk) {
  if constexpr (BITS == 4) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + blk * 16));
    const __m128i lo = _mm_and_si128(b, low4);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
    return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
  } else {  // one byte a code
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + blk * 32));
  }
}

template <int BITS, int TT>
void gemv_rows_i8(const int8_t* xq, const float* d, int64_t Kp, const float* gsum,
                  const uint8_t* codes, int64_t row_bytes, const at::Half* scales,
                  const uint8_t* zeros, int64_t G, int64_t gs, float* y, int64_t ldy,
                  int64_t n0, int64_t n1) {
  static_assert(BITS == 4 || BITS == 3, "integer path: 4- or 3-bit codes");
  const int64_t bpg = gs / 32, nb = Kp / 32, ldd = Kp / 32;
  if constexpr (TT == 1) {
    // Two output rows at a time: two independent FMA chains (one alone waits on the FMA's
    // latency every block) sharing each activation load and scale broadcast.
    for (; n0 + 2 <= n1; n0 += 2) {
      const uint8_t* r0 = codes + n0 * row_bytes;
      const uint8_t* r1 = r0 + row_bytes;
      __m256 out0 = _mm256_setzero_ps(), out1 = _mm256_setzero_ps();
      float c0 = 0.f, c1 = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t b0 = g * bpg, b1 = std::min(b0 + bpg, nb);
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (int64_t blk = b0; blk < b1; ++blk) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + blk * 32));
          const __m256 dv = _mm256_set1_ps(d[blk]);
          const __m256i p0 = dot_u8s8(load_codes<BITS>(r0, blk), xv);
          const __m256i p1 = dot_u8s8(load_codes<BITS>(r1, blk), xv);
          acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), dv, acc0);
          acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), dv, acc1);
        }
        const float s0 = static_cast<float>(scales[n0 * G + g]);
        const float s1 = static_cast<float>(scales[(n0 + 1) * G + g]);
        out0 = _mm256_fmadd_ps(acc0, _mm256_set1_ps(s0), out0);
        out1 = _mm256_fmadd_ps(acc1, _mm256_set1_ps(s1), out1);
        c0 -= s0 * static_cast<float>(zeros[n0 * G + g]) * gsum[g];
        c1 -= s1 * static_cast<float>(zeros[(n0 + 1) * G + g]) * gsum[g];
      }
      y[n0] = hsum(out0) + c0;
      y[n0 + 1] = hsum(out1) + c1;
    }
  }
  for (int64_t n = n0; n < n1; ++n) {  // TT rows of x at once (or the last odd row when TT = 1)
    const uint8_t* row = codes + n * row_bytes;
    __m256 out[TT];
    float corr[TT];
    for (int t = 0; t < TT; ++t) {
      out[t] = _mm256_setzero_ps();
      corr[t] = 0.f;
    }
    for (int64_t g = 0; g < G; ++g) {
      const int64_t b0 = g * bpg, b1 = std::min(b0 + bpg, nb);
      __m256 acc[TT];
      for (int t = 0; t < TT; ++t) acc[t] = _mm256_setzero_ps();
      for (int64_t blk = b0; blk < b1; ++blk) {
        const __m256i w = load_codes<BITS>(row, blk);
        for (int t = 0; t < TT; ++t) {
          const __m256i xv =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + t * Kp + blk * 32));
          const __m256i p = dot_u8s8(w, xv);
          acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d[t * ldd + blk]), acc[t]);
        }
      }
      const float s = static_cast<float>(scales[n * G + g]);
      const float z = static_cast<float>(zeros[n * G + g]);
      const __m256 sv = _mm256_set1_ps(s);
      for (int t = 0; t < TT; ++t) {
        out[t] = _mm256_fmadd_ps(acc[t], sv, out[t]);
        corr[t] -= s * z * gsum[t * G + g];
      }
    }
    for (int t = 0; t < TT; ++t) y[t * ldy + n] = hsum(out[t]) + corr[t];
  }
}

// Per-group sums (G) from per-block sums (Kp/32).
inline void group_sums(const float* bsum, int64_t Kp, int64_t gs, float* gsum) {
  const int64_t bpg = gs / 32, nb = Kp / 32, G = (nb + bpg - 1) / bpg;
  for (int64_t g = 0; g < G; ++g) {
    float s = 0.f;
    for (int64_t b = g * bpg; b < std::min(nb, (g + 1) * bpg); ++b) s += bsum[b];
    gsum[g] = s;
  }
}

// -- integer dot products on pairs of blocks (all code widths; 512-bit VNNI where built) ---------
// The activation row is rounded to int8 once per matmul (one scale a block of 32, as above) and
// laid out in the order the codes unpack in, a pair of blocks (64 columns) at a time, so the
// inner loop is: load codes, one integer dot product, one int -> float convert, one FMA, for
// 64 columns of a row. The pair's 16 int32 lanes (each the sum of 4 adjacent products) are:
//   4-bit codes (16 bytes a block, low nibbles = columns 0-15, high = 16-31): lanes 0-3 block
//     a's columns 0-15, 4-7 block b's 0-15, 8-11 a's 16-31, 12-15 b's 16-31 (one 32-byte load
//     gives the low half as its low nibbles and the high half as its high nibbles);
//   8- and 3-bit codes (one a byte): lanes 0-7 block a, 8-15 block b, columns in order.
// The products are centred: lane = sum (q - c) x_q with c = 2^(bits-1), exact in int32 (the
// dot product starts from a precomputed -c * sum(x_q) per lane, ``bias``), so an 8-bit row's
// sums do not cancel ~128x larger terms in fp32, and a symmetric grid (z = c) needs no
// zero-point term. A 512-bit build (AVX512-VNNI) holds the 16 lanes in one register; the
// 256-bit builds (AVX-VNNI / AVX512-VL VNNI, or AVX2's maddubs) hold them as two halves and
// do the same per-lane integer and float operations, so every build gives the same result,
// bit for bit. An odd last block is paired with a zero block (x_q = 0, scale 0).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define POCKETLM_512 1
#endif

// One activation row, prepared for codes of one width (prepare_act).
struct PairAct {
  const int8_t* xq;     // (npairs * 64) int8 in the codes' order
  const float* d;       // (npairs * 16) the lane's block scale
  const int32_t* bias;  // (npairs * 16) -c * sum of the lane's 4 x_q
  const float* gsum;    // (G) per group sum of the rounded activations, d * sum(x_q)
};

inline int64_t n_pairs(int64_t Kp) { return (Kp / 32 + 1) / 2; }

// Scratch sizes per activation row for width Kp: int8 bytes, floats (d), int32 (bias).
inline int64_t pair_bytes(int64_t Kp) { return n_pairs(Kp) * 64; }
inline int64_t pair_lanes(int64_t Kp) { return n_pairs(Kp) * 16; }

// x (Kp floats) -> a PairAct for `bits` in the caller's buffers xq (pair_bytes), d and bias
// (pair_lanes), gsum (G). Rounding as quantize_act (identical in every build: AVX2 code).
inline void prepare_act(const float* x, int64_t Kp, int bits, int64_t gs, int8_t* xq, float* d,
                        int32_t* bias, float* gsum) {
  const int64_t nb = Kp / 32, np = n_pairs(Kp), bpg = gs / 32;
  float bd[2], bs[2];
  alignas(32) int8_t tmp[32];
  const int c = 1 << (bits - 1);
  for (int64_t g = 0; g * bpg < nb; ++g) gsum[g] = 0.f;
  for (int64_t p = 0; p < np; ++p) {
    int8_t* out = xq + p * 64;
    for (int h = 0; h < 2; ++h) {
      const int64_t b = 2 * p + h;
      if (b < nb) {
        quantize_act(x + b * 32, 32, tmp, &bd[h], &bs[h]);
        gsum[b / bpg] += bs[h];
      } else {
        std::fill(tmp, tmp + 32, int8_t{0});
        bd[h] = 0.f;
      }
      if (bits == 4) {  // columns 0-15 to bytes [16h, 16h + 16), 16-31 to [32 + 16h, ...)
        std::copy(tmp, tmp + 16, out + 16 * h);
        std::copy(tmp + 16, tmp + 32, out + 32 + 16 * h);
      } else {
        std::copy(tmp, tmp + 32, out + 32 * h);
      }
    }
    for (int l = 0; l < 16; ++l) {
      const int8_t* q = out + 4 * l;
      bias[p * 16 + l] = -c * (q[0] + q[1] + q[2] + q[3]);
      const int h = bits == 4 ? (l / 4) % 2 : l / 8;  // which block of the pair this lane reads
      d[p * 16 + l] = bd[h];
    }
  }
}

inline float half_to_float(at::Half h) { return _cvtsh_ss(h.x); }

#ifdef POCKETLM_512
using LaneF = __m512;
inline LaneF lane_zero() { return _mm512_setzero_ps(); }
inline LaneF lane_set1(float v) { return _mm512_set1_ps(v); }
inline LaneF lane_fma(LaneF a, LaneF b, LaneF c) { return _mm512_fmadd_ps(a, b, c); }
inline LaneF lane_mul(LaneF a, LaneF b) { return _mm512_mul_ps(a, b); }
inline float lane_sum(LaneF v) {
  return hsum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}
// Lanes of block b of a pair take s1, of block a s0.
template <int BITS>
inline LaneF lane_blend(float s0, float s1) {
  return _mm512_mask_blend_ps(BITS == 4 ? 0xF0F0 : 0xFF00, _mm512_set1_ps(s0), _mm512_set1_ps(s1));
}
template <int BITS>
inline LaneF pair_dot_f(const uint8_t* row, int64_t p, bool half, const PairAct& a) {
  __m512i w;
  if constexpr (BITS == 4) {
    const uint8_t* src = row + p * 32;
    const __m256i b = half ? _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)))
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    w = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(b), _mm256_srli_epi16(b, 4), 1),
                         _mm512_set1_epi8(0x0F));
  } else {
    const uint8_t* src = row + p * 64;
    w = half ? _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)))
             : _mm512_loadu_si512(src);
  }
  const __m512i x = _mm512_loadu_si512(a.xq + p * 64);
  const __m512i s = _mm512_dpbusd_epi32(_mm512_loadu_si512(a.bias + p * 16), w, x);
  return _mm512_cvtepi32_ps(s);
}
inline LaneF lane_load(const float* f) { return _mm512_loadu_ps(f); }
#else
struct LaneF {
  __m256 a, b;
};
inline LaneF lane_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline LaneF lane_set1(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
inline LaneF lane_fma(LaneF x, LaneF y, LaneF z) {
  return {_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)};
}
inline LaneF lane_mul(LaneF x, LaneF y) { return {_mm256_mul_ps(x.a, y.a), _mm256_mul_ps(x.b, y.b)}; }
inline float lane_sum(LaneF v) { return hsum(_mm256_add_ps(v.a, v.b)); }
template <int BITS>
inline LaneF lane_blend(float s0, float s1) {
  const __m256 v0 = _mm256_set1_ps(s0), v1 = _mm256_set1_ps(s1);
  if constexpr (BITS == 4) {
    const __m256 m = _mm256_blend_ps(v0, v1, 0xF0);
    return {m, m};
  } else {
    return {v0, v1};
  }
}
// 32 code bytes u (0..2^BITS-1) times 32 int8 x, 8 lanes of centred sums starting from bias.
template <int BITS>
inline __m256i half_dot(__m256i u, __m256i x, __m256i bias) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(bias, u, x);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(bias, u, x);
#else
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (BITS == 8) {  // u * x overflows maddubs' int16 pairs: multiply (u - 128) * x,
    // as |u - 128| * (x with u - 128's sign) (<= 128 * 127 a product, 2 a pair: no saturation)
    const __m256i w = _mm256_xor_si256(u, _mm256_set1_epi8(static_cast<char>(0x80)));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)), ones);
  } else {  // codes < 16: no int16 saturation
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(u, x), ones), bias);
  }
#endif
}
template <int BITS>
inline LaneF pair_dot_f(const uint8_t* row, int64_t p, bool half, const PairAct& a) {
  __m256i lo, hi;
  if constexpr (BITS == 4) {
    const uint8_t* src = row + p * 32;
    const __m256i b = half ? _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)))
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    const __m256i m = _mm256_set1_epi8(0x0F);
    lo = _mm256_and_si256(b, m);
    hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
  } else {
    const uint8_t* src = row + p * 64;
    lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    hi = half ? _mm256_set1_epi8(BITS == 8 ? static_cast<char>(0x80) : 0)
              : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32));
  }
  const int8_t* xp = a.xq + p * 64;
  const int32_t* bp = a.bias + p * 16;
  const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp));
  const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 32));
  const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp));
  const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + 8));
  return {_mm256_cvtepi32_ps(half_dot<BITS>(lo, x0, b0)), _mm256_cvtepi32_ps(half_dot<BITS>(hi, x1, b1))};
}
inline LaneF lane_load(const float* f) { return {_mm256_loadu_ps(f), _mm256_loadu_ps(f + 8)}; }
#endif

// Rows [n, n + R) of y (T activation rows, stride ldy) from codes in the pair layout above:
// y[t, r] = sum_g s_rg * (sum over g's blocks of d_b * lanes - (z_rg - c) * gsum_tg).
template <int BITS, int R, int T>
inline void pair_rows(const PairAct* act, const uint8_t* codes, int64_t row_bytes,
                      const at::Half* scales, const uint8_t* zeros, int64_t G, int64_t gs,
                      int64_t Kp, float* y, int64_t ldy, int64_t n) {
  constexpr int C = 1 << (BITS - 1);
  const int64_t nb = Kp / 32, np = n_pairs(Kp), bpg = gs / 32;
  const uint8_t* row[R];
  for (int r = 0; r < R; ++r) row[r] = codes + (n + r) * row_bytes;
  LaneF out[R][T];
  float corr[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      out[r][t] = lane_zero();
      corr[r][t] = 0.f;
    }
  if (bpg % 2 == 0 || G == 1) {  // pairs never straddle groups: scale once a group
    const int64_t ppg = G == 1 ? np : bpg / 2;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t p0 = g * ppg, p1 = std::min(np, p0 + ppg);
      LaneF acc[R][T];
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = lane_zero();
      for (int64_t p = p0; p < p1; ++p) {
        const bool half = 2 * p + 1 == nb;
        for (int t = 0; t < T; ++t) {
          const LaneF dv = lane_load(act[t].d + p * 16);
          for (int r = 0; r < R; ++r)
            acc[r][t] = lane_fma(pair_dot_f<BITS>(row[r], p, half, act[t]), dv, acc[r][t]);
        }
      }
      for (int r = 0; r < R; ++r) {
        const float s = half_to_float(scales[(n + r) * G + g]);
        const float zc = static_cast<float>(static_cast<int>(zeros[(n + r) * G + g]) - C);
        const LaneF sv = lane_set1(s);
        for (int t = 0; t < T; ++t) {
          out[r][t] = lane_fma(acc[r][t], sv, out[r][t]);
          corr[r][t] -= s * zc * act[t].gsum[g];
        }
      }
    }
  } else {  // odd blocks a group (e.g. group size 32): a pair may span two groups
    for (int64_t p = 0; p < np; ++p) {
      const bool half = 2 * p + 1 == nb;
      const int64_t g0 = (2 * p) / bpg, g1 = half ? g0 : (2 * p + 1) / bpg;
      for (int r = 0; r < R; ++r) {
        const LaneF sv = lane_blend<BITS>(half_to_float(scales[(n + r) * G + g0]),
                                          half_to_float(scales[(n + r) * G + g1]));
        for (int t = 0; t < T; ++t)
          out[r][t] = lane_fma(pair_dot_f<BITS>(row[r], p, half, act[t]),
                               lane_mul(lane_load(act[t].d + p * 16), sv), out[r][t]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int64_t g = 0; g < G; ++g) {
        const float s = half_to_float(scales[(n + r) * G + g]);
        const float zc = static_cast<float>(static_cast<int>(zeros[(n + r) * G + g]) - C);
        for (int t = 0; t < T; ++t) corr[r][t] -= s * zc * act[t].gsum[g];
      }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) y[t * ldy + n + r] = lane_sum(out[r][t]) + corr[r][t];
}

// Rows [n0, n1) of y for T <= 8 activation rows: several weight rows at a time (independent
// FMA chains sharing each activation load), as many as the build's registers hold.
template <int BITS>
inline void pair_gemv(const PairAct* act, int64_t T, const uint8_t* codes, int64_t row_bytes,
                      const at::Half* scales, const uint8_t* zeros, int64_t G, int64_t gs,
                      int64_t Kp, float* y, int64_t ldy, int64_t n0, int64_t n1) {
#ifdef POCKETLM_512
  constexpr int RW = 4;
#else
  constexpr int RW = 2;
#endif
  int64_t t = 0;
  for (; t + 2 <= T; t += 2) {  // two activation rows, RW / 2 weight rows at a time
    int64_t n = n0;
    for (; n + RW / 2 <= n1; n += RW / 2)
      pair_rows<BITS, RW / 2, 2>(act + t, codes, row_bytes, scales, zeros, G, gs, Kp, y + t * ldy,
                                 ldy, n);
    for (; n < n1; ++n)
      pair_rows<BITS, 1, 2>(act + t, codes, row_bytes, scales, zeros, G, gs, Kp, y + t * ldy, ldy, n);
  }
  for (; t < T; ++t) {
    int64_t n = n0;
    for (; n + RW <= n1; n += RW)
      pair_rows<BITS, RW, 1>(act + t, codes, row_bytes, scales, zeros, G, gs, Kp, y + t * ldy, ldy, n);
    for (; n < n1; ++n)
      pair_rows<BITS, 1, 1>(act + t, codes, row_bytes, scales, zeros, G, gs, Kp, y + t * ldy, ldy, n);
  }
}

// Per-row activation scratch for pair_gemv, sized for width Kp and G groups.
struct PairScratch {
  std::vector<int8_t> xq;
  std::vector<float> d, gsum;
  std::vector<int32_t> bias;
  std::vector<PairAct> act;
  void prepare(const float* x, int64_t T, int64_t ldx, int64_t Kp, int bits, int64_t gs) {
    const int64_t nbytes = pair_bytes(Kp), nl = pair_lanes(Kp), G = (Kp + gs - 1) / gs;
    if (static_cast<int64_t>(xq.size()) < T * nbytes) xq.resize(T * nbytes);
    if (static_cast<int64_t>(d.size()) < T * nl) d.resize(T * nl), bias.resize(T * nl);
    if (static_cast<int64_t>(gsum.size()) < T * G) gsum.resize(T * G);
    act.resize(T);
    for (int64_t t = 0; t < T; ++t) {
      prepare_act(x + t * ldx, Kp, bits, gs, xq.data() + t * nbytes, d.data() + t * nl,
                  bias.data() + t * nl, gsum.data() + t * G);
      act[t] = {xq.data() + t * nbytes, d.data() + t * nl, bias.data() + t * nl, gsum.data() + t * G};
    }
  }
};

}  // namespace pocketlm
