// llama.cpp's (GGML's) quantized weight blocks, computed from as they are stored in a GGUF file.
//
// A weight row of K columns is K / QK blocks of BYTES bytes each (QK = 32 for Q4_0..Q8_0 and
// for our F16/BF16 "blocks", 256 for the K-quants). Two operations per type:
//   dequantize: rows of blocks -> fp32, bit-identical to gguf.quants.dequantize (same order of
//               float operations, no fused multiply-add) when asked for exact values;
//   gemv:       y (T, N) = x (T, K) @ W.T for a few rows of x (decode), block by block: each
//               block is decoded into a small fp32 buffer in registers/L1 and multiplied with
//               every row of x before the next block is read, so each weight byte is read once.
// Output rows are shared among threads in chunks; each row's sum runs in one fixed order, so
// results do not depend on the thread count.
//
// The entry points are extern "C" on raw pointers: pocketlm/model/ggml.py calls them through
// ctypes on the loaded extension, so this file needs no line in another file's module table.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
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

// What a type's row kernel reads of x besides x itself: sums of x per 32 columns (T, K/32).
int64_t act_floats(int64_t T, int64_t K) { return T * (K / 32); }

void prepare_act(const float* x, int64_t T, int64_t K, float* act) {
  for (int64_t i = 0; i < T * (K / 32); ++i) {
    float s = 0.f;
    for (int j = 0; j < 32; ++j) s += x[i * 32 + j];
    act[i] = s;
  }
}

// y[t * ldy + n] for n in [n0, n1), T <= 8 rows of x.
template <int TYPE>
void rows_range(const float* act, const float* x, int64_t T, int64_t K, const uint8_t* w,
                int64_t row_bytes, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  switch (T) {
    case 1: gemv_rows<TYPE, 1>(x, K, w, row_bytes, y, ldy, n0, n1, act); break;
    case 2: gemv_rows<TYPE, 2>(x, K, w, row_bytes, y, ldy, n0, n1, act); break;
    case 3: gemv_rows<TYPE, 3>(x, K, w, row_bytes, y, ldy, n0, n1, act); break;
    case 4: gemv_rows<TYPE, 4>(x, K, w, row_bytes, y, ldy, n0, n1, act); break;
    case 5: gemv_rows<TYPE, 5>(x, K, w, row_bytes, y, ldy, n0, n1, act); break;
    case 6: gemv_rows<TYPE, 6>(x, K, w, row_bytes, y, ldy, n0, n1, act); break;
    case 7: gemv_rows<TYPE, 7>(x, K, w, row_bytes, y, ldy, n0, n1, act); break;
    default: gemv_rows<TYPE, 8>(x, K, w, row_bytes, y, ldy, n0, n1, act); break;
  }
}

template <int TYPE>
void gemv(const float* x, int64_t T, int64_t K, const uint8_t* w, int64_t row_bytes,
          int64_t N, float* y) {
  std::vector<float> act(act_floats(T, K));
  prepare_act(x, T, K, act.data());
  share_rows(N, N * K * T, [&](int64_t n0, int64_t n1) {
    for (int64_t t0 = 0; t0 < T; t0 += 8)  // at most 8 rows of x per pass over W
      rows_range<TYPE>(act.data() + t0 * (K / 32), x + t0 * K, std::min<int64_t>(8, T - t0), K,
                       w, row_bytes, y + t0 * N, N, n0, n1);
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
  return act_floats(T, K);
}

bool ggml_prepare(int type, const float* x, int64_t T, int64_t K, float* act) {
  if (ggml_act_floats(type, T, K) < 0) return false;
  prepare_act(x, T, K, act);
  return true;
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

}  // extern "C"
