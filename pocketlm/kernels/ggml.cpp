// llama.cpp's (GGML's) quantized weight blocks, computed from as they are stored in a GGUF file.
//
// A weight row of K columns is K / QK blocks of BYTES bytes each (QK = 32 for Q4_0..Q8_0 and
// for our F16/BF16 "blocks", 256 for the K-quants). Two operations per type:
//   dequantize: rows of blocks -> fp32, bit-identical to gguf.quants.dequantize (same order of
//               float operations, no fused multiply-add) when asked for exact values;
//   gemv:       y (T, N) = x (T, K) @ W.T for a few rows of x (decode), block by block: each
//               block is decoded once in registers and multiplied with every row of x before
//               the next block is read, so each weight byte is read once. The quantized types
//               round x to int8 first and use integer dot products (see "int8 activations"
//               below; opt-in: POCKETLM_GGML_INT8_ACT=1); F16/BF16 use fp32.
// Output rows are shared among threads in chunks; each row's sum runs in one fixed order, so
// results do not depend on the thread count.
//
// The entry points are extern "C" on raw pointers: pocketlm/model/ggml.py calls them through
// ctypes on the loaded extension, so this file needs no line in another file's module table.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "ggml.h"

extern "C" int pocketlm_ggml_block(int type, int64_t* qk, int64_t* bytes);

namespace {

enum Type : int {  // gguf.GGMLQuantizationType values
  F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8,
  Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30,
};

inline float h2f(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline float bf2f(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <int TYPE> struct Traits;
template <> struct Traits<F16> { static constexpr int QK = 32, BYTES = 64; };
template <> struct Traits<BF16> { static constexpr int QK = 32, BYTES = 64; };
template <> struct Traits<Q4_0> { static constexpr int QK = 32, BYTES = 18; };
template <> struct Traits<Q4_1> { static constexpr int QK = 32, BYTES = 20; };
template <> struct Traits<Q5_0> { static constexpr int QK = 32, BYTES = 22; };
template <> struct Traits<Q5_1> { static constexpr int QK = 32, BYTES = 24; };
template <> struct Traits<Q8_0> { static constexpr int QK = 32, BYTES = 34; };
template <> struct Traits<Q4_K> { static constexpr int QK = 256, BYTES = 144; };
template <> struct Traits<Q5_K> { static constexpr int QK = 256, BYTES = 176; };
template <> struct Traits<Q6_K> { static constexpr int QK = 256, BYTES = 210; };

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K block's 12 packed bytes.
inline void scale_min_k4(int j, const uint8_t* q, int& sc, int& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// a * b + c rounded twice as numpy does (EXACT), or however the compiler likes (one FMA).
template <bool EXACT>
inline float mul_add(float a, float b, float c) {
  if constexpr (EXACT) {
    float p = a * b;
    asm("" : "+x"(p));  // an opaque value: the product cannot be fused into the addition
    return p + c;
  } else {
    return a * b + c;
  }
}

// One block -> QK floats. EXACT: the float operations gguf.quants uses (bit-identical).
template <int TYPE, bool EXACT = false>
inline void deq(const uint8_t* b, float* y) {
  if constexpr (TYPE == F16) {
    for (int i = 0; i < 32; ++i) y[i] = h2f(b + 2 * i);
  } else if constexpr (TYPE == BF16) {
    uint16_t v[32];
    std::memcpy(v, b, 64);
    for (int i = 0; i < 32; ++i) y[i] = bf2f(v[i]);
  } else if constexpr (TYPE == Q4_0) {
    const float d = h2f(b);
    const uint8_t* qs = b + 2;
    for (int i = 0; i < 16; ++i) {
      y[i] = d * float(int(qs[i] & 0xF) - 8);
      y[i + 16] = d * float(int(qs[i] >> 4) - 8);
    }
  } else if constexpr (TYPE == Q4_1) {
    const float d = h2f(b), m = h2f(b + 2);
    const uint8_t* qs = b + 4;
    for (int i = 0; i < 16; ++i) {
      y[i] = mul_add<EXACT>(d, float(qs[i] & 0xF), m);
      y[i + 16] = mul_add<EXACT>(d, float(qs[i] >> 4), m);
    }
  } else if constexpr (TYPE == Q5_0 || TYPE == Q5_1) {
    constexpr int off = TYPE == Q5_0 ? 0 : 2;
    const float d = h2f(b);
    const float m = TYPE == Q5_1 ? h2f(b + 2) : 0.f;
    uint32_t qh;
    std::memcpy(&qh, b + 2 + off, 4);
    const uint8_t* qs = b + 6 + off;
    for (int i = 0; i < 16; ++i) {
      const int lo = (qs[i] & 0xF) | (((qh >> i) & 1) << 4);
      const int hi = (qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4);
      if constexpr (TYPE == Q5_0) {
        y[i] = d * float(lo - 16);
        y[i + 16] = d * float(hi - 16);
      } else {
        y[i] = mul_add<EXACT>(d, float(lo), m);
        y[i + 16] = mul_add<EXACT>(d, float(hi), m);
      }
    }
  } else if constexpr (TYPE == Q8_0) {
    const float d = h2f(b);
    const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
    for (int i = 0; i < 32; ++i) y[i] = float(qs[i]) * d;
  } else if constexpr (TYPE == Q4_K || TYPE == Q5_K) {
    const float d = h2f(b), dmin = h2f(b + 2);
    const uint8_t* scales = b + 4;
    const uint8_t* qh = b + 16;                               // Q5_K only: 32 bytes
    const uint8_t* ql = b + (TYPE == Q4_K ? 16 : 48);         // 128 bytes, two nibbles each
    for (int c = 0; c < 4; ++c) {                             // 4 chunks of 64 values
      for (int h = 0; h < 2; ++h) {                           // low nibbles, then high
        const int s = 2 * c + h;
        int sc, mn;
        scale_min_k4(s, scales, sc, mn);
        const float ds = d * float(sc), dm = dmin * float(mn);
        float* out = y + 32 * s;
        for (int l = 0; l < 32; ++l) {
          int q = (ql[32 * c + l] >> (4 * h)) & 0xF;
          if constexpr (TYPE == Q5_K) q |= ((qh[l] >> s) & 1) << 4;
          out[l] = mul_add<EXACT>(ds, float(q), -dm);
        }
      }
    }
  } else if constexpr (TYPE == Q6_K) {
    const uint8_t* ql = b;          // 128
    const uint8_t* qh = b + 128;    // 64
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);  // 16
    const float d = h2f(b + 208);
    for (int half = 0; half < 2; ++half) {
      for (int j = 0; j < 4; ++j) {  // 4 runs of 32 values per half
        const uint8_t* l4 = ql + 64 * half + 32 * (j & 1);
        const uint8_t* h2 = qh + 32 * half;
        const int shift = 4 * (j >> 1);
        float* out = y + 128 * half + 32 * j;
        const int s0 = 8 * half + 2 * j;  // one scale per 16 values
        const float d0 = d * float(sc[s0]), d1 = d * float(sc[s0 + 1]);
        for (int l = 0; l < 32; ++l) {
          const int q = (((l4[l] >> shift) & 0xF) | (((h2[l] >> (2 * j)) & 3) << 4)) - 32;
          out[l] = (l < 16 ? d0 : d1) * float(q);
        }
      }
    }
  }
}

template <typename Rows>
void share_rows(int64_t N, int64_t work, Rows rows) {
  const int threads = at::get_num_threads();
  if (threads <= 1 || work < (int64_t{1} << 20) || at::in_parallel_region()) {
    rows(0, N);
    return;
  }
  const int64_t chunk = std::max<int64_t>(16, std::min<int64_t>(256, N / (4 * threads)));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t c = 0; c < (N + chunk - 1) / chunk; ++c)
    rows(c * chunk, std::min(N, (c + 1) * chunk));
}

template <int TYPE, bool EXACT>
void dequantize_rows(const uint8_t* w, int64_t row_bytes, int64_t K, int64_t n,
                     const int64_t* ids, float* out) {
  constexpr int QK = Traits<TYPE>::QK, BYTES = Traits<TYPE>::BYTES;
  share_rows(n, n * K, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = w + (ids ? ids[r] : r) * row_bytes;
      for (int64_t b = 0; b < K / QK; ++b) deq<TYPE, EXACT>(row + b * BYTES, out + r * K + b * QK);
    }
  });
}

#ifdef __AVX512F__
using V = __m512;
constexpr int VW = 16;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline float vsum(V v) { return _mm512_reduce_add_ps(v); }
#else
using V = __m256;
constexpr int VW = 8;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline float vsum(V v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  return _mm_cvtss_f32(_mm_add_ss(lo, _mm_movehdup_ps(lo)));
}
#endif

#ifdef __AVX512F__
inline __m512 u8x16(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)); }
inline __m512 i8x16(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)); }

// The types of real Q4_K_M files, with the block scale applied once per 16 or 32 products
// instead of once per weight: codes widened to fp32 in registers, one FMA per 16 weights per
// row of x. xs (T, K/32): sums of x per 32 columns (Q4_K's mins).
template <int TYPE, int T>
bool gemv_rows_fast(const float* x, int64_t K, const uint8_t* w, int64_t row_bytes, float* y,
                    int64_t N, int64_t n0, int64_t n1, const float* xs) {
  if constexpr (TYPE == Q8_0 || TYPE == Q5_0 || TYPE == Q4_K || TYPE == Q6_K) {
    constexpr int QK = Traits<TYPE>::QK, BYTES = Traits<TYPE>::BYTES;
    const int64_t G = K / 32;
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = w + n * row_bytes;
      __m512 acc[T];
      float mins[T];
      for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps(), mins[t] = 0.f;
      for (int64_t b = 0; b < K / QK; ++b) {
        const uint8_t* blk = row + b * BYTES;
        const float* xb = x + b * QK;
        if constexpr (TYPE == Q8_0) {
          const __m512 s = _mm512_set1_ps(h2f(blk));
          const __m512 q0 = i8x16(_mm_loadu_si128((const __m128i*)(blk + 2)));
          const __m512 q1 = i8x16(_mm_loadu_si128((const __m128i*)(blk + 18)));
          for (int t = 0; t < T; ++t) {
            __m512 v = _mm512_mul_ps(q0, _mm512_loadu_ps(xb + t * K));
            v = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xb + t * K + 16), v);
            acc[t] = _mm512_fmadd_ps(v, s, acc[t]);
          }
        } else if constexpr (TYPE == Q5_0) {  // d * (q - 16): the 16 * d * sum(x) apart
          const float d = h2f(blk);
          uint32_t qh;
          std::memcpy(&qh, blk + 2, 4);
          const __m128i b0 = _mm_loadu_si128((const __m128i*)(blk + 6)), m4 = _mm_set1_epi8(0x0F);
          const __m512 k16 = _mm512_set1_ps(16.f), s = _mm512_set1_ps(d);
          __m512 q0 = u8x16(_mm_and_si128(b0, m4));
          __m512 q1 = u8x16(_mm_and_si128(_mm_srli_epi16(b0, 4), m4));
          q0 = _mm512_mask_add_ps(q0, __mmask16(qh & 0xFFFF), q0, k16);
          q1 = _mm512_mask_add_ps(q1, __mmask16(qh >> 16), q1, k16);
          for (int t = 0; t < T; ++t) {
            __m512 v = _mm512_mul_ps(q0, _mm512_loadu_ps(xb + t * K));
            v = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xb + t * K + 16), v);
            acc[t] = _mm512_fmadd_ps(v, s, acc[t]);
            mins[t] += 16.f * d * xs[t * G + b];
          }
        } else if constexpr (TYPE == Q4_K) {
          const float d = h2f(blk), dmin = h2f(blk + 2);
          const uint8_t* ql = blk + 16;
          const __m128i mask = _mm_set1_epi8(0x0F);
          for (int c = 0; c < 4; ++c) {
            const __m128i b0 = _mm_loadu_si128((const __m128i*)(ql + 32 * c));
            const __m128i b1 = _mm_loadu_si128((const __m128i*)(ql + 32 * c + 16));
            const __m512 q[4] = {u8x16(_mm_and_si128(b0, mask)), u8x16(_mm_and_si128(b1, mask)),
                                 u8x16(_mm_and_si128(_mm_srli_epi16(b0, 4), mask)),
                                 u8x16(_mm_and_si128(_mm_srli_epi16(b1, 4), mask))};
            for (int h = 0; h < 2; ++h) {
              const int sub = 2 * c + h;
              int sc, mn;
              scale_min_k4(sub, blk + 4, sc, mn);
              const __m512 ds = _mm512_set1_ps(d * float(sc));
              const float dm = dmin * float(mn);
              const float* xp = xb + 32 * sub;
              for (int t = 0; t < T; ++t) {
                __m512 v = _mm512_mul_ps(q[2 * h], _mm512_loadu_ps(xp + t * K));
                v = _mm512_fmadd_ps(q[2 * h + 1], _mm512_loadu_ps(xp + t * K + 16), v);
                acc[t] = _mm512_fmadd_ps(v, ds, acc[t]);
                mins[t] += dm * xs[t * G + b * 8 + sub];
              }
            }
          }
        } else {  // Q6_K
          const uint8_t* ql = blk;
          const uint8_t* qh = blk + 128;
          const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
          const float d = h2f(blk + 208);
          const __m128i m4 = _mm_set1_epi8(0x0F), m2 = _mm_set1_epi8(0x03), k32 = _mm_set1_epi8(32);
          for (int half = 0; half < 2; ++half) {
            for (int j = 0; j < 4; ++j) {
              const uint8_t* l4 = ql + 64 * half + 32 * (j & 1);
              const uint8_t* h2 = qh + 32 * half;
              for (int p = 0; p < 2; ++p) {  // 16 values, one scale
                __m128i lo = _mm_loadu_si128((const __m128i*)(l4 + 16 * p));
                __m128i hi = _mm_loadu_si128((const __m128i*)(h2 + 16 * p));
                if (j >> 1) lo = _mm_srli_epi16(lo, 4);
                lo = _mm_and_si128(lo, m4);
                hi = _mm_and_si128(_mm_srl_epi16(hi, _mm_cvtsi32_si128(2 * j)), m2);
                const __m128i q8 = _mm_sub_epi8(_mm_or_si128(lo, _mm_slli_epi16(hi, 4)), k32);
                const __m512 q = i8x16(q8);
                const int s0 = 8 * half + 2 * j + p;
                const __m512 ds = _mm512_set1_ps(d * float(sc[s0]));
                const float* xp = xb + 128 * half + 32 * j + 16 * p;
                for (int t = 0; t < T; ++t)
                  acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(q, _mm512_loadu_ps(xp + t * K)), ds, acc[t]);
              }
            }
          }
        }
      }
      for (int t = 0; t < T; ++t) y[t * N + n] = _mm512_reduce_add_ps(acc[t]) - mins[t];
    }
    return true;
  }
  return false;
}
#endif

// y[t, n] for rows n0..n1 and all T rows of x: each block decoded once, used T times.
template <int TYPE, int T>
void gemv_rows(const float* x, int64_t K, const uint8_t* w, int64_t row_bytes, float* y,
               int64_t N, int64_t n0, int64_t n1, const float* xs) {
#ifdef __AVX512F__
  if (gemv_rows_fast<TYPE, T>(x, K, w, row_bytes, y, N, n0, n1, xs)) return;
#endif
  (void)xs;
  constexpr int QK = Traits<TYPE>::QK, BYTES = Traits<TYPE>::BYTES;
  constexpr int NA = T == 1 ? 4 : (T <= 2 ? 2 : 1);  // independent accumulators per row of x
  alignas(64) float buf[QK];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    V acc[T][NA];
    for (int t = 0; t < T; ++t)
      for (int a = 0; a < NA; ++a) acc[t][a] = vzero();
    for (int64_t b = 0; b < K / QK; ++b) {
      deq<TYPE>(row + b * BYTES, buf);
      const float* xb = x + b * QK;
      for (int t = 0; t < T; ++t)
        for (int i = 0; i < QK / VW; ++i)
          acc[t][i % NA] = vfma(vload(buf + i * VW), vload(xb + t * K + i * VW), acc[t][i % NA]);
    }
    for (int t = 0; t < T; ++t) {
      V s = acc[t][0];
      for (int a = 1; a < NA; ++a) s = vadd(s, acc[t][a]);
      y[t * N + n] = vsum(s);
    }
  }
}

// -- int8 activations: integer dot products, as llama.cpp computes ------------------------------
// For the quantized types each row of x is rounded to int8 once per product (ggml_prepare) and
// a block's products are integer multiply-adds. One activation scale per 4 columns: the columns
// of one int32 lane of the dot products (vpdpbusd / maddubs + madd sum 4 adjacent products),
// whose sums are converted to fp32 anyway, so a scale per lane costs a vector load instead of
// a broadcast:
//   Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: sum_b dw_b * sum_lanes dx_l * sum_i q_i x_i (+ the block's
//     min times the block's x sum);
//   Q4_K, Q5_K, Q6_K: a super-block's sub-block scales multiply int16 pair sums in integers;
//     each 32 or 64 columns' lanes are converted and scaled by dx_l, and the super-block's fp32
//     scale is applied once per 256 weights.
// Rounding: d = max|x| / 127 per 4 columns, x_q = nearest-even(x * (1 / d)) (the same fp32
// operations in every build). The integer sums are exact; results differ from the fp32
// activations by the rounding of x and no longer match the dequantized product bit for bit.
// Why 4: with llama.cpp's blocks (a scale per 32 columns, per 256 for the K-quants) WikiText-2
// perplexity moved +0.40% (SmolLM2 Q4_1) and +0.78% (Gemma 3 270M) against fp32 activations
// through the decode path, over issue #20's 0.3% bar; simulated per layer kind the loss was
// spread over every kind (outlier channels flatten whole 32- or 256-column blocks), and a scale
// per 4 columns took its KL divergence from 4.5e-3 to 0.3e-3 (Gemma; bench/int8_act_quality.py
// measures the real kernels). POCKETLM_GGML_INT8_ACT=0/1 (read once) forces either path, as
// does pocketlm_ggml_set_int8_act at run time (tests, comparisons).
//
// Integer building blocks on 256-bit vectors (VNNI where the build has it, else AVX2):
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
inline __m256i dp_u8s8(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
inline __m256i dp_s16(__m256i acc, __m256i a, __m256i b) { return _mm256_dpwssd_epi32(acc, a, b); }
#elif defined(__AVXVNNI__)
inline __m256i dp_u8s8(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
inline __m256i dp_s16(__m256i acc, __m256i a, __m256i b) { return _mm256_dpwssd_avx_epi32(acc, a, b); }
#else
// acc + sums of 4 adjacent u8 x s8 products; exact while a pair of products fits int16
// (u <= 128: every use below).
inline __m256i dp_u8s8(__m256i acc, __m256i u, __m256i s) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
inline __m256i dp_s16(__m256i acc, __m256i a, __m256i b) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
}
#endif
// Signed x signed bytes: |a| (<= 128 as u8) times b with a's sign.
inline __m256i dp_s8s8(__m256i acc, __m256i a, __m256i b) {
  return dp_u8s8(acc, _mm256_abs_epi8(a), _mm256_sign_epi8(b, a));
}
inline float hsum8(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  return _mm_cvtss_f32(_mm_add_ss(lo, _mm_movehdup_ps(lo)));
}

std::atomic<int> g_int8_act{-1};

bool int8_act_on() {
  int v = g_int8_act.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* e = std::getenv("POCKETLM_GGML_INT8_ACT");
    v = (e != nullptr && e[0] == '1') ? 1 : 0;
    g_int8_act.store(v, std::memory_order_relaxed);
  }
  return v == 1;
}

constexpr bool has_int8(int type) {
  return type == Q4_0 || type == Q4_1 || type == Q5_0 || type == Q5_1 || type == Q8_0 ||
         type == Q4_K || type == Q5_K || type == Q6_K;
}
constexpr bool is_kquant(int type) { return type == Q4_K || type == Q5_K || type == Q6_K; }

// The scratch (floats): [0] a tag, 1 for int8 activations, 0 for fp32 ones; from HEAD on, T
// rows of `row_floats` each. fp32: sums of x per 32 columns (K/32). int8, 32-column types
// (nb = K/32): d[8 nb] (a scale per 4 columns), dsum[nb] = sum of d * x_q, corr[8 nb]
// int32, x_q[K] int8, where corr (Q4_0 and Q5_0) is -c * the sum of each 4 x_q (c = 8, 16: the
// codes' offset) for the dot product to start from. K-quants: d[K/4], fsum[K/16] = sums of
// d * x_q per 16 columns (Q6_K's offset) or per 32 (Q4_K/Q5_K's mins, the first K/32), x_q[K].
constexpr int64_t HEAD = 16;
int64_t int8_row_floats(int type, int64_t K) {
  if (is_kquant(type)) return K / 4 + K / 16 + K / 4;
  return (K / 32) * (8 + 1 + 8) + K / 4;
}
int64_t row_floats(int type, int64_t K) {
  return has_int8(type) ? std::max(K / 32, int8_row_floats(type, K)) : K / 32;
}

struct I8Row {
  const float* d;     // a scale per 4 columns
  const float* dsum;  // 32-column types: per block
  const int32_t* corr;
  const float* fsum;  // K-quants
  const int8_t* xq;
};

template <int TYPE>
I8Row i8_row(const float* act, int64_t K, int64_t t) {
  const float* r = act + HEAD + t * row_floats(TYPE, K);
  if constexpr (is_kquant(TYPE)) {
    return {r, nullptr, nullptr, r + K / 4, reinterpret_cast<const int8_t*>(r + K / 4 + K / 16)};
  } else {
    const int64_t nb = K / 32;
    return {r, r + 8 * nb, reinterpret_cast<const int32_t*>(r + 9 * nb), nullptr,
            reinterpret_cast<const int8_t*>(r + 17 * nb)};
  }
}

// 32 floats -> int8 with one scale per 4 columns, the columns of one int32 lane of the
// dot products (so the scales cost nothing there: each lane's sum is converted to fp32 and
// scaled anyway). d[8] per lane, each repeated over the lane's group; d = max|x| / 127 over
// the group, x_q = nearest-even(x * (1 / d)).
inline void round_lanes(const float* x, int8_t* q, float* d) {
  const __m256 sign = _mm256_set1_ps(-0.0f), k127 = _mm256_set1_ps(127.f), zero = _mm256_setzero_ps();
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i v[4];
  for (int j = 0; j < 4; ++j) {  // 8 values: two lanes
    const __m256 xv = _mm256_loadu_ps(x + 8 * j);
    __m256 m = _mm256_andnot_ps(sign, xv);  // max over each 4 (the 128-bit halves)
    m = _mm256_max_ps(m, _mm256_permute_ps(m, 0xB1));
    m = _mm256_max_ps(m, _mm256_permute_ps(m, 0x4E));
    const __m256 dv = _mm256_div_ps(m, k127);
    const __m256 id = _mm256_blendv_ps(zero, _mm256_div_ps(_mm256_set1_ps(1.f), dv),
                                       _mm256_cmp_ps(dv, zero, _CMP_GT_OQ));
    d[2 * j] = _mm256_cvtss_f32(dv);
    d[2 * j + 1] = _mm_cvtss_f32(_mm256_extractf128_ps(dv, 1));
    v[j] = _mm256_cvtps_epi32(_mm256_mul_ps(xv, id));  // nearest even (the default MXCSR mode)
  }
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permutevar8x32_epi32(p, order));
}

template <int TYPE>
void prepare_i8(const float* x, int64_t T, int64_t K, float* act) {
  for (int64_t t = 0; t < T; ++t) {
    float* r = act + HEAD + t * row_floats(TYPE, K);
    const float* xr = x + t * K;
    if constexpr (is_kquant(TYPE)) {
      float* fsum = r + K / 4;
      int8_t* xq = reinterpret_cast<int8_t*>(r + K / 4 + K / 16);
      constexpr int G = TYPE == Q6_K ? 16 : 32;  // columns per fsum
      for (int64_t b = 0; b < K / 32; ++b) round_lanes(xr + 32 * b, xq + 32 * b, r + 8 * b);
      for (int64_t g = 0; g < K / G; ++g) {
        float v = 0.f;
        for (int l = 0; l < G / 4; ++l) {
          const int8_t* q = xq + G * g + 4 * l;
          v += r[G / 4 * g + l] * float(q[0] + q[1] + q[2] + q[3]);
        }
        fsum[g] = v;
      }
    } else {
      const int64_t nb = K / 32;
      float* dsum = r + 8 * nb;
      int32_t* corr = reinterpret_cast<int32_t*>(r + 9 * nb);
      int8_t* xq = reinterpret_cast<int8_t*>(r + 17 * nb);
      constexpr int C = TYPE == Q4_0 ? 8 : TYPE == Q5_0 ? 16 : 0;
      for (int64_t b = 0; b < nb; ++b) {
        round_lanes(xr + 32 * b, xq + 32 * b, r + 8 * b);
        const int8_t* q = xq + 32 * b;
        float ds = 0.f;
        for (int l = 0; l < 8; ++l) {
          const int s4 = q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3];
          corr[8 * b + l] = -C * s4;
          ds += r[8 * b + l] * float(s4);
        }
        dsum[b] = ds;
      }
    }
  }
  act[0] = 1.f;
}

// Bit j of `bits` -> 0x10 in byte j (the 5th bit of a Q5 block's codes), AVX2.
inline __m256i bits_to_0x10(uint32_t bits) {
  const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                        2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
  __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(int(bits)), shuf);
  v = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
  return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

// The 32 codes of a 32-column block as bytes in column order: u8 (Q4/Q5) or s8 (Q8_0).
template <int TYPE>
inline __m256i codes32(const uint8_t* blk) {
  if constexpr (TYPE == Q8_0) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
  } else {
    constexpr int qs_at = TYPE == Q4_0 ? 2 : TYPE == Q4_1 ? 4 : TYPE == Q5_0 ? 6 : 8;
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + qs_at));
    const __m128i m4 = _mm_set1_epi8(0x0F);
    __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m4), _mm_and_si128(b, m4));
    if constexpr (TYPE == Q5_0 || TYPE == Q5_1) {
      uint32_t qh;
      std::memcpy(&qh, blk + qs_at - 4, 4);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
      u = _mm256_mask_add_epi8(u, __mmask32(qh), u, _mm256_set1_epi8(0x10));
#else
      u = _mm256_or_si256(u, bits_to_0x10(qh));
#endif
    }
    return u;
  }
}

// y[t * ldy + n] = x_q[t] . W[n] for the 32-column types.
template <int TYPE, int T>
void rows_i8_32(const float* act, int64_t K, const uint8_t* w, int64_t row_bytes, float* y,
                int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int BYTES = Traits<TYPE>::BYTES;
  constexpr int NA = T <= 2 ? 2 : 1;  // independent accumulators: blocks alternate
  const int64_t nb = K / 32;
  I8Row a[T];
  for (int t = 0; t < T; ++t) a[t] = i8_row<TYPE>(act, K, t);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    __m256 acc[NA][T];
    float mins[T];
    for (int t = 0; t < T; ++t) {
      mins[t] = 0.f;
      for (int k = 0; k < NA; ++k) acc[k][t] = _mm256_setzero_ps();
    }
    int64_t b = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
    // 512-bit: a pair of blocks an instruction (lanes 0-7 block b, 8-15 block b + 1)
    __m512 acc2[T];
    for (int t = 0; t < T; ++t) acc2[t] = _mm512_setzero_ps();
    for (; b + 2 <= nb; b += 2) {
      const uint8_t* blk = row + b * BYTES;
      const __m512i u = _mm512_inserti64x4(_mm512_castsi256_si512(codes32<TYPE>(blk)),
                                           codes32<TYPE>(blk + BYTES), 1);
      const __m512 dw = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(h2f(blk))),
                                           _mm256_set1_ps(h2f(blk + BYTES)), 1);
      for (int t = 0; t < T; ++t) {
        const __m512i xv = _mm512_loadu_si512(a[t].xq + 32 * b);
        __m512i p;
        if constexpr (TYPE == Q8_0) {
          p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(u),
                                  _mm512_mask_sub_epi8(xv, _mm512_movepi8_mask(u), _mm512_setzero_si512(), xv));
        } else if constexpr (TYPE == Q4_0 || TYPE == Q5_0) {
          p = _mm512_dpbusd_epi32(_mm512_loadu_si512(a[t].corr + 8 * b), u, xv);
        } else {
          p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, xv);
        }
        const __m512 dx = _mm512_loadu_ps(a[t].d + 8 * b);  // a scale per lane, both blocks
        acc2[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dw, dx), acc2[t]);
      }
      if constexpr (TYPE == Q4_1 || TYPE == Q5_1) {
        const float m0 = h2f(blk + 2), m1 = h2f(blk + BYTES + 2);
        for (int t = 0; t < T; ++t) mins[t] += m0 * a[t].dsum[b] + m1 * a[t].dsum[b + 1];
      }
    }
    for (int t = 0; t < T; ++t)
      acc[0][t] = _mm256_add_ps(acc[0][t], _mm256_add_ps(_mm512_castps512_ps256(acc2[t]),
                                                         _mm512_extractf32x8_ps(acc2[t], 1)));
#endif
    for (; b < nb; ++b) {
      const uint8_t* blk = row + b * BYTES;
      const __m256i u = codes32<TYPE>(blk);
      const __m256 dw = _mm256_set1_ps(h2f(blk));
      __m256* ac = acc[NA == 2 ? (b & 1) : 0];
      for (int t = 0; t < T; ++t) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[t].xq + 32 * b));
        __m256i p;
        if constexpr (TYPE == Q8_0) {
          p = dp_s8s8(_mm256_setzero_si256(), u, xv);
        } else if constexpr (TYPE == Q4_0 || TYPE == Q5_0) {
          p = dp_u8s8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[t].corr + 8 * b)), u, xv);
        } else {
          p = dp_u8s8(_mm256_setzero_si256(), u, xv);
        }
        ac[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw, _mm256_loadu_ps(a[t].d + 8 * b)), ac[t]);
      }
      if constexpr (TYPE == Q4_1 || TYPE == Q5_1) {
        const float m = h2f(blk + 2);
        for (int t = 0; t < T; ++t) mins[t] += m * a[t].dsum[b];
      }
    }
    for (int t = 0; t < T; ++t) {
      __m256 s = acc[0][t];
      if constexpr (NA == 2) s = _mm256_add_ps(s, acc[1][t]);
      y[t * ldy + n] = hsum8(s) + mins[t];
    }
  }
}

// The 8 6-bit scales and 8 mins of a Q4_K/Q5_K block's 12 bytes, as bytes (scale_min_k4's
// layout, four at a time).
inline void scales_mins_k4(const uint8_t* q, uint8_t sc[8], uint8_t mn[8]) {
  uint32_t u[3];
  std::memcpy(u, q, 12);
  const uint32_t lo6 = 0x3F3F3F3F, lo4 = 0x0F0F0F0F, lo2 = 0x03030303;
  const uint32_t s[2] = {u[0] & lo6, (u[2] & lo4) | (((u[0] >> 6) & lo2) << 4)};
  const uint32_t m[2] = {u[1] & lo6, ((u[2] >> 4) & lo4) | (((u[1] >> 6) & lo2) << 4)};
  std::memcpy(sc, s, 8);
  std::memcpy(mn, m, 8);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define POCKETLM_GGML_512 1
// acc + scale-weighted pair sums of 64 codes (lo: the first 32, hi: the next 32) times 64 int8
// x, with int16 scales s_lo / s_hi for each half's pairs: one 512-bit maddubs + vpdpwssd.
inline __m512i k_dot512(__m512i acc, __m256i lo, __m256i hi, const int8_t* x, __m512i sc) {
  const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  return _mm512_dpwssd_epi32(acc, _mm512_maddubs_epi16(w, _mm512_loadu_si512(x)), sc);
}
inline __m512i join16(__m256i a, __m256i b) { return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1); }
#endif

// y[t * ldy + n] = x_q[t] . W[n] for the K-quants. The sub-block scales multiply int16 pair
// sums in integers; each 32 (256-bit) or 64 (512-bit) columns' int32 lanes are then converted
// to fp32 and multiplied by their activation scales (a lane: 4 columns, one scale), and the
// super-block's fp32 scale is applied once per 256 weights. The codes' mins (Q4_K/Q5_K) and
// offset (Q6_K) are fp32 dot products of the sub-block scales with fsum.
template <int TYPE, int T>
void rows_i8_k(const float* act, int64_t K, const uint8_t* w, int64_t row_bytes, float* y,
               int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int BYTES = Traits<TYPE>::BYTES;
  const int64_t ns = K / 256;
  I8Row a[T];
  for (int t = 0; t < T; ++t) a[t] = i8_row<TYPE>(act, K, t);
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    __m256 acc[T], mins[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps(), mins[t] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < ns; ++sb) {
      const uint8_t* blk = row + sb * BYTES;
      const int64_t c0 = 256 * sb;  // the super-block's first column
      __m256 fs[T];                 // sum over lanes of (integer lane sum) * (lane's scale)
      for (int t = 0; t < T; ++t) fs[t] = _mm256_setzero_ps();
#ifdef POCKETLM_GGML_512
      __m512 fs2[T];
      for (int t = 0; t < T; ++t) fs2[t] = _mm512_setzero_ps();
#endif
      float dd;
      if constexpr (TYPE == Q4_K || TYPE == Q5_K) {
        dd = h2f(blk);
        const float dmin = h2f(blk + 2);
        alignas(16) uint8_t sc[8], mn[8];
        scales_mins_k4(blk + 4, sc, mn);
        const __m256 mnf = _mm256_mul_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mn)))));
        for (int t = 0; t < T; ++t)  // dmin * sum_j m_j * (sum of x over sub-block j)
          mins[t] = _mm256_fmadd_ps(mnf, _mm256_loadu_ps(a[t].fsum + c0 / 32), mins[t]);
        const uint8_t* ql = blk + (TYPE == Q4_K ? 16 : 48);
        __m256i qh;
        if constexpr (TYPE == Q5_K) qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16));
        const __m256i one = _mm256_set1_epi8(1);
        for (int c = 0; c < 4; ++c) {
          const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32 * c));
          __m256i lo = _mm256_and_si256(b, m4), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m4);
          if constexpr (TYPE == Q5_K) {
            lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * c), one), 4));
            hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * c + 1), one), 4));
          }
          const __m256i s0 = _mm256_set1_epi16(sc[2 * c]), s1 = _mm256_set1_epi16(sc[2 * c + 1]);
          const int64_t col = c0 + 64 * c;
#ifdef POCKETLM_GGML_512
          const __m512i s01 = join16(s0, s1);
          for (int t = 0; t < T; ++t) {
            const __m512i p = k_dot512(_mm512_setzero_si512(), lo, hi, a[t].xq + col, s01);
            fs2[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_loadu_ps(a[t].d + col / 4), fs2[t]);
          }
          continue;
#endif
          for (int t = 0; t < T; ++t) {
            const int8_t* xp = a[t].xq + col;
            const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp));
            const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 32));
            const __m256i p0 = dp_s16(_mm256_setzero_si256(), _mm256_maddubs_epi16(lo, x0), s0);
            const __m256i p1 = dp_s16(_mm256_setzero_si256(), _mm256_maddubs_epi16(hi, x1), s1);
            fs[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_loadu_ps(a[t].d + col / 4), fs[t]);
            fs[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_loadu_ps(a[t].d + col / 4 + 8), fs[t]);
          }
        }
      } else {  // Q6_K: codes 0..63 (offset 32), a signed scale per 16
        const uint8_t* ql = blk;
        const uint8_t* qhp = blk + 128;
        const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
        dd = h2f(blk + 208);
        // the offset: 32 * sum_k sc_k * (sum of x over the 16 columns k), scaled by dd below
        const __m128i sc8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sc));
        const __m256 k32 = _mm256_set1_ps(32.f);
        const __m256 so0 = _mm256_mul_ps(k32, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc8)));
        const __m256 so1 = _mm256_mul_ps(k32, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc8, 8))));
        for (int t = 0; t < T; ++t) {
          fs[t] = _mm256_fnmadd_ps(so0, _mm256_loadu_ps(a[t].fsum + c0 / 16), fs[t]);
          fs[t] = _mm256_fnmadd_ps(so1, _mm256_loadu_ps(a[t].fsum + c0 / 16 + 8), fs[t]);
        }
        const __m256i m2 = _mm256_set1_epi8(0x03);
        for (int half = 0; half < 2; ++half) {
          const __m256i qa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 64 * half));
          const __m256i qb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 64 * half + 32));
          const __m256i hq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qhp + 32 * half));
          __m256i qj[4], sv[4];
          for (int j = 0; j < 4; ++j) {
            const __m256i l4 = (j & 1) ? qb : qa;
            const __m256i lo = (j >> 1) ? _mm256_and_si256(_mm256_srli_epi16(l4, 4), m4) : _mm256_and_si256(l4, m4);
            const __m256i hb = _mm256_and_si256(_mm256_srli_epi16(hq, 2 * j), m2);
            qj[j] = _mm256_or_si256(lo, _mm256_slli_epi16(hb, 4));
            const int s0 = 8 * half + 2 * j;
            sv[j] = _mm256_set_m128i(_mm_set1_epi16(sc[s0 + 1]), _mm_set1_epi16(sc[s0]));
          }
#ifdef POCKETLM_GGML_512
          for (int jp = 0; jp < 4; jp += 2) {  // runs jp, jp + 1: 64 contiguous columns
            const __m512i s2 = join16(sv[jp], sv[jp + 1]);
            const int64_t col = c0 + 128 * half + 32 * jp;
            for (int t = 0; t < T; ++t) {
              const __m512i p = k_dot512(_mm512_setzero_si512(), qj[jp], qj[jp + 1], a[t].xq + col, s2);
              fs2[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_loadu_ps(a[t].d + col / 4), fs2[t]);
            }
          }
          continue;
#endif
          for (int j = 0; j < 4; ++j) {
            const int64_t col = c0 + 128 * half + 32 * j;
            for (int t = 0; t < T; ++t) {
              const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[t].xq + col));
              const __m256i p = dp_s16(_mm256_setzero_si256(), _mm256_maddubs_epi16(qj[j], xv), sv[j]);
              fs[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_loadu_ps(a[t].d + col / 4), fs[t]);
            }
          }
        }
      }
      const __m256 ddv = _mm256_set1_ps(dd);
      for (int t = 0; t < T; ++t) {
#ifdef POCKETLM_GGML_512
        fs[t] = _mm256_add_ps(fs[t], _mm256_add_ps(_mm512_castps512_ps256(fs2[t]), _mm512_extractf32x8_ps(fs2[t], 1)));
#endif
        acc[t] = _mm256_fmadd_ps(fs[t], ddv, acc[t]);
      }
    }
    for (int t = 0; t < T; ++t) y[t * ldy + n] = hsum8(acc[t]) - hsum8(mins[t]);
  }
}

// fp32 activations (the path above): sums of x per 32 columns (T, K/32) at act + HEAD, with
// row stride row_floats(type, K).
void prepare_fp32(int type, const float* x, int64_t T, int64_t K, float* act) {
  const int64_t G = K / 32, stride = row_floats(type, K);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int j = 0; j < 32; ++j) s += x[t * K + g * 32 + j];
      act[HEAD + t * stride + g] = s;
    }
  act[0] = 0.f;
}

template <int TYPE, int T>
void rows_t(const float* act, const float* x, int64_t K, const uint8_t* w, int64_t row_bytes,
            float* y, int64_t ldy, int64_t n0, int64_t n1) {
  if constexpr (has_int8(TYPE)) {
    if (act[0] == 1.f) {
      if constexpr (is_kquant(TYPE)) rows_i8_k<TYPE, T>(act, K, w, row_bytes, y, ldy, n0, n1);
      else rows_i8_32<TYPE, T>(act, K, w, row_bytes, y, ldy, n0, n1);
      return;
    }
  }
  const int64_t stride = row_floats(TYPE, K);
  if (stride == K / 32) {
    gemv_rows<TYPE, T>(x, K, w, row_bytes, y, ldy, n0, n1, act + HEAD);
    return;
  }
  std::vector<float> xs(T * (K / 32));  // the sums, packed (T, K/32) as gemv_rows reads them
  for (int t = 0; t < T; ++t) std::copy(act + HEAD + t * stride, act + HEAD + t * stride + K / 32, xs.data() + t * (K / 32));
  gemv_rows<TYPE, T>(x, K, w, row_bytes, y, ldy, n0, n1, xs.data());
}

// y[t * ldy + n] for n in [n0, n1), T <= 8 rows of x.
template <int TYPE>
void rows_range(const float* act, const float* x, int64_t T, int64_t K, const uint8_t* w,
                int64_t row_bytes, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  switch (T) {
    case 1: rows_t<TYPE, 1>(act, x, K, w, row_bytes, y, ldy, n0, n1); break;
    case 2: rows_t<TYPE, 2>(act, x, K, w, row_bytes, y, ldy, n0, n1); break;
    case 3: rows_t<TYPE, 3>(act, x, K, w, row_bytes, y, ldy, n0, n1); break;
    case 4: rows_t<TYPE, 4>(act, x, K, w, row_bytes, y, ldy, n0, n1); break;
    case 5: rows_t<TYPE, 5>(act, x, K, w, row_bytes, y, ldy, n0, n1); break;
    case 6: rows_t<TYPE, 6>(act, x, K, w, row_bytes, y, ldy, n0, n1); break;
    case 7: rows_t<TYPE, 7>(act, x, K, w, row_bytes, y, ldy, n0, n1); break;
    default: rows_t<TYPE, 8>(act, x, K, w, row_bytes, y, ldy, n0, n1); break;
  }
}

int64_t act_floats(int type, int64_t T, int64_t K) { return HEAD + T * row_floats(type, K); }

template <int TYPE>
void prepare(const float* x, int64_t T, int64_t K, float* act) {
  if constexpr (has_int8(TYPE)) {
    if (int8_act_on()) {
      prepare_i8<TYPE>(x, T, K, act);
      return;
    }
  }
  prepare_fp32(TYPE, x, T, K, act);
}

template <int TYPE>
void gemv(const float* x, int64_t T, int64_t K, const uint8_t* w, int64_t row_bytes,
          int64_t N, float* y) {
  // at most 8 rows of x per pass over W, each pass with its own prepared activations
  const int64_t passes = (T + 7) / 8, per = act_floats(TYPE, 8, K);
  std::vector<float> act(passes * per);
  for (int64_t p = 0; p < passes; ++p)
    prepare<TYPE>(x + 8 * p * K, std::min<int64_t>(8, T - 8 * p), K, act.data() + p * per);
  share_rows(N, N * K * T, [&](int64_t n0, int64_t n1) {
    for (int64_t p = 0; p < passes; ++p)
      rows_range<TYPE>(act.data() + p * per, x + 8 * p * K, std::min<int64_t>(8, T - 8 * p), K,
                       w, row_bytes, y + 8 * p * N, N, n0, n1);
  });
}

// Calls F<TYPE>::run(args...) for a runtime type id; false for a type we do not compute.
#define POCKETLM_GGML_DISPATCH(type, CALL)          \
  switch (type) {                                   \
    case F16: CALL(F16); break;                     \
    case BF16: CALL(BF16); break;                   \
    case Q4_0: CALL(Q4_0); break;                   \
    case Q4_1: CALL(Q4_1); break;                   \
    case Q5_0: CALL(Q5_0); break;                   \
    case Q5_1: CALL(Q5_1); break;                   \
    case Q8_0: CALL(Q8_0); break;                   \
    case Q4_K: CALL(Q4_K); break;                   \
    case Q5_K: CALL(Q5_K); break;                   \
    case Q6_K: CALL(Q6_K); break;                   \
    default: return -1;                             \
  }

}  // namespace

namespace pocketlm {

int64_t ggml_act_floats(int type, int64_t T, int64_t K) {
  int64_t qk, bytes;
  if (pocketlm_ggml_block(type, &qk, &bytes) != 0) return -1;
  return act_floats(type, T, K);
}

bool ggml_prepare(int type, const float* x, int64_t T, int64_t K, float* act) {
#define POCKETLM_PREP(T_) prepare<T_>(x, T, K, act)
  auto run = [&]() -> int {
    POCKETLM_GGML_DISPATCH(type, POCKETLM_PREP)
    return 0;
  };
#undef POCKETLM_PREP
  return run() == 0;
}

bool ggml_rows(int type, const float* act, const float* x, int64_t T, int64_t K,
               const uint8_t* w, int64_t row_bytes, float* y, int64_t ldy, int64_t n0,
               int64_t n1) {
  if (T < 1 || T > 8) return false;
#define POCKETLM_ROWS(T_) rows_range<T_>(act, x, T, K, w, row_bytes, y, ldy, n0, n1)
  auto run = [&]() -> int {
    POCKETLM_GGML_DISPATCH(type, POCKETLM_ROWS)
    return 0;
  };
#undef POCKETLM_ROWS
  return run() == 0;
}

}  // namespace pocketlm

extern "C" {

// (values per block, bytes per block) of a type, or -1 for one we do not compute.
int pocketlm_ggml_block(int type, int64_t* qk, int64_t* bytes) {
#define POCKETLM_TRAITS(T) *qk = Traits<T>::QK; *bytes = Traits<T>::BYTES
  POCKETLM_GGML_DISPATCH(type, POCKETLM_TRAITS)
#undef POCKETLM_TRAITS
  return 0;
}

// out (n, K) = rows ids[0..n) (or 0..n when ids is null) of W, dequantized to fp32; exact:
// bit-identical to gguf.quants (else a multiply-add may be fused: faster, for GEMM tiles).
int pocketlm_ggml_dequantize(int type, const uint8_t* w, int64_t row_bytes, int64_t K, int64_t n,
                             const int64_t* ids, float* out, int exact) {
#define POCKETLM_DEQ(T)                                         \
  if (exact) dequantize_rows<T, true>(w, row_bytes, K, n, ids, out); \
  else dequantize_rows<T, false>(w, row_bytes, K, n, ids, out)
  POCKETLM_GGML_DISPATCH(type, POCKETLM_DEQ)
#undef POCKETLM_DEQ
  return 0;
}

// y (T, N) = x (T, K) @ W.T, W = N rows of row_bytes bytes of blocks.
int pocketlm_ggml_gemv(int type, const float* x, int64_t T, int64_t K, const uint8_t* w,
                       int64_t row_bytes, int64_t N, float* y) {
#define POCKETLM_GEMV(T_) gemv<T_>(x, T, K, w, row_bytes, N, y)
  POCKETLM_GGML_DISPATCH(type, POCKETLM_GEMV)
#undef POCKETLM_GEMV
  return 0;
}

// Whether the quantized types round x to int8 (1) or keep fp32 activations (0); on < 0 only
// asks. Returns the setting before the call (the default: 0 unless POCKETLM_GGML_INT8_ACT=1).
int pocketlm_ggml_set_int8_act(int on) {
  const int before = int8_act_on() ? 1 : 0;
  if (on >= 0) g_int8_act.store(on ? 1 : 0, std::memory_order_relaxed);
  return before;
}

}  // extern "C"
