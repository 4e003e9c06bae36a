// SIMD building blocks shared by the kernels (AVX2 + FMA + F16C): horizontal sums, code
// widening, the quantized row loop, and a vectorised exp. Header-only, so each kernel file
// inlines them.
#pragma once
#include <torch/extension.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>

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

}  // namespace pocketlm
