// SIMD building blocks shared by the kernels (AVX2 + FMA + F16C): horizontal sums, code
// widening, the quantized row loop, and a vectorised exp. Header-only, so each kernel file
// inlines them.
#pragma once
#include <torch/extension.h>
#include <immintrin.h>
#include <algorithm>
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

// y[t, n] for TT rows of x at once (weights read once for all of them).
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

}  // namespace pocketlm
