// Weight-only quantized matrix-vector products for x86 CPUs with AVX2 + FMA (+ F16C).
//
// Weights are unsigned codes q in [0, 2^bits) with one fp16 scale s and one uint8 zero point
// z per (output row, group of input columns): w = (q - z) * s. Two code layouts:
//   bits 8: one code per byte, rows padded to a multiple of 32 columns;
//   bits 4: two codes per byte in blocks of 32 columns: byte i of a block's 16 bytes holds
//           column i in its low nibble and column 16 + i in its high nibble.
// The product is computed group by group as  s * (sum_k q_k x_k - z * sum_k x_k), so codes
// are widened to fp32 in registers and never written back to memory; accumulation is fp32.
// Output rows are split across threads; each row's sum is sequential, so results do not
// depend on the thread count.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <vector>

namespace {

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

template <int BITS>
void gemv_dispatch(const float* x, int64_t T, const uint8_t* codes, int64_t row_bytes,
                   const at::Half* scales, const uint8_t* zeros, const float* xsum, int64_t G,
                   int64_t gs, int64_t Kp, float* y, int64_t N) {
  // Rows go out in small chunks, handed to whichever thread is free (dynamic schedule): on a
  // busy machine a thread that loses its core then delays one chunk, not half the matrix.
  // Small matrices stay on one thread, where waking a second one costs more than it saves.
  auto rows = [&](int64_t n0, int64_t n1) {
    int64_t t = 0;
    for (; t + 4 <= T; t += 4)
      gemv_rows<BITS, 4>(x + t * Kp, Kp, codes, row_bytes, scales, zeros, xsum + t * G, G, gs,
                         Kp, y + t * N, N, n0, n1);
    for (; t + 2 <= T; t += 2)
      gemv_rows<BITS, 2>(x + t * Kp, Kp, codes, row_bytes, scales, zeros, xsum + t * G, G, gs,
                         Kp, y + t * N, N, n0, n1);
    for (; t < T; ++t)
      gemv_rows<BITS, 1>(x + t * Kp, Kp, codes, row_bytes, scales, zeros, xsum + t * G, G, gs,
                         Kp, y + t * N, N, n0, n1);
  };
  const int threads = at::get_num_threads();
  if (threads <= 1 || N * Kp * T < (int64_t{1} << 21) || at::in_parallel_region()) {
    rows(0, N);
    return;
  }
  const int64_t chunk = 256;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t c = 0; c < (N + chunk - 1) / chunk; ++c)
    rows(c * chunk, std::min(N, (c + 1) * chunk));
}

void check(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& zeros,
           int64_t bits, int64_t gs) {
  TORCH_CHECK(bits == 8 || bits == 4, "qgemv: bits must be 8 or 4, got ", bits);
  TORCH_CHECK(gs % 32 == 0 && gs > 0, "qgemv: group size must be a multiple of 32");
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.is_contiguous() && codes.dim() == 2);
  TORCH_CHECK(scales.dtype() == torch::kHalf && scales.is_contiguous());
  TORCH_CHECK(zeros.dtype() == torch::kUInt8 && zeros.is_contiguous());
}

}  // namespace

// x (T, Kp) fp32 contiguous, Kp a multiple of 32 -> y (T, N) fp32.
torch::Tensor qgemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scales,
                    torch::Tensor zeros, int64_t bits, int64_t gs) {
  check(codes, scales, zeros, bits, gs);
  TORCH_CHECK(x.dtype() == torch::kFloat && x.is_contiguous() && x.dim() == 2);
  const int64_t T = x.size(0), Kp = x.size(1), N = codes.size(0), G = scales.size(1);
  TORCH_CHECK(Kp % 32 == 0, "qgemv: padded width must be a multiple of 32");
  TORCH_CHECK(codes.size(1) * (8 / bits) == Kp, "qgemv: x width does not match the codes");
  TORCH_CHECK(G == (Kp + gs - 1) / gs, "qgemv: scales have the wrong number of groups");
  auto y = torch::empty({T, N}, x.options());
  // Per-group sums of x, shared by every output row: (T, G).
  std::vector<float> xsum(T * G, 0.f);
  const float* xp = x.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < Kp; ++k) xsum[t * G + k / gs] += xp[t * Kp + k];
  const auto* s = scales.data_ptr<at::Half>();
  if (bits == 8)
    gemv_dispatch<8>(xp, T, codes.data_ptr<uint8_t>(), codes.size(1), s,
                     zeros.data_ptr<uint8_t>(), xsum.data(), G, gs, Kp, y.data_ptr<float>(), N);
  else
    gemv_dispatch<4>(xp, T, codes.data_ptr<uint8_t>(), codes.size(1), s,
                     zeros.data_ptr<uint8_t>(), xsum.data(), G, gs, Kp, y.data_ptr<float>(), N);
  return y;
}

// Dequantize to a dense (N, Kp) fp32 weight: w = (q - z) * s, for prefill-sized matmuls.
torch::Tensor dequantize(torch::Tensor codes, torch::Tensor scales, torch::Tensor zeros,
                         int64_t bits, int64_t gs) {
  check(codes, scales, zeros, bits, gs);
  const int64_t N = codes.size(0), Kp = codes.size(1) * (8 / bits), G = scales.size(1);
  auto w = torch::empty({N, Kp}, torch::dtype(torch::kFloat));
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const auto* s = scales.data_ptr<at::Half>();
  const uint8_t* zp = zeros.data_ptr<uint8_t>();
  float* wp = w.data_ptr<float>();
  const int64_t row_bytes = codes.size(1);
  const int64_t grain = std::max<int64_t>(16, (int64_t{1} << 20) / Kp);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = c + n * row_bytes;
      for (int64_t blk = 0; blk < Kp / 32; ++blk) {
        const int64_t g = blk * 32 / gs;
        const __m256 sv = _mm256_set1_ps(static_cast<float>(s[n * G + g]));
        const __m256 zv = _mm256_set1_ps(static_cast<float>(zp[n * G + g]));
        __m256 v[4];
        if (bits == 8) load_block<8>(row, blk, v); else load_block<4>(row, blk, v);
        for (int i = 0; i < 4; ++i)
          _mm256_storeu_ps(wp + n * Kp + blk * 32 + 8 * i, _mm256_mul_ps(_mm256_sub_ps(v[i], zv), sv));
      }
    }
  });
  return w;
}

// Dense fp32 product for a few rows of x: y (T, N) = x (T, K) @ w (N, K)^T, w row-major.
// At batch-1 decode this is pure weight streaming; PyTorch's BLAS call reads weights at
// about a third of the memory bandwidth for these shapes, this loop at close to all of it.
// Each output is one sequential dot product, so results do not depend on the thread count.
torch::Tensor gemv_f32(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dtype() == torch::kFloat && w.dtype() == torch::kFloat, "gemv_f32: fp32 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.dim() == 2 && w.dim() == 2 &&
              x.size(1) == w.size(1), "gemv_f32: x (T, K) and w (N, K), both contiguous");
  const int64_t T = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({T, N}, x.options());
  const float* X = x.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  auto rows = [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* wr = W + n * K;
      for (int64_t t = 0; t < T; ++t) {
        const float* xr = X + t * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) {
          a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k), _mm256_loadu_ps(xr + k), a0);
          a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 8), _mm256_loadu_ps(xr + k + 8), a1);
          a2 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 16), _mm256_loadu_ps(xr + k + 16), a2);
          a3 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 24), _mm256_loadu_ps(xr + k + 24), a3);
        }
        for (; k + 8 <= K; k += 8)
          a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k), _mm256_loadu_ps(xr + k), a0);
        float acc = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        for (; k < K; ++k) acc += wr[k] * xr[k];
        Y[t * N + n] = acc;
      }
    }
  };
  const int threads = at::get_num_threads();
  if (threads <= 1 || N * K < (int64_t{1} << 16) || at::in_parallel_region()) {
    rows(0, N);
    return y;
  }
  const int64_t chunk = 64;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t c = 0; c < (N + chunk - 1) / chunk; ++c)
    rows(c * chunk, std::min(N, (c + 1) * chunk));
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qgemv", &qgemv, "y = x @ dequant(codes).T from packed codes (AVX2/FMA)");
  m.def("gemv_f32", &gemv_f32, "y = x @ w.T for a few fp32 rows, w row-major (AVX2/FMA)");
  m.def("dequantize", &dequantize, "dense fp32 weight from packed codes");
}
