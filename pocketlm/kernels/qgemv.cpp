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

#include "kernels.h"

namespace {
using namespace pocketlm;

// Rows out in small chunks, handed to whichever thread is free (dynamic schedule): on a busy
// machine a thread that loses its core then delays one chunk, not half the matrix. Small
// matrices stay on one thread, where waking a second one costs more than it saves.
template <typename Rows>
void share_rows(int64_t N, int64_t work, Rows rows) {
  const int threads = at::get_num_threads();
  if (threads <= 1 || work < (int64_t{1} << 21) || at::in_parallel_region()) {
    rows(0, N);
    return;
  }
  const int64_t chunk = 256;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t c = 0; c < (N + chunk - 1) / chunk; ++c)
    rows(c * chunk, std::min(N, (c + 1) * chunk));
}

// 8-bit codes, fp32 activations x (T, Kp) with per-group sums xsum (T, G).
void gemv8(const float* x, int64_t T, const uint8_t* codes, int64_t row_bytes,
           const at::Half* scales, const uint8_t* zeros, const float* xsum, int64_t G,
           int64_t gs, int64_t Kp, float* y, int64_t N) {
  share_rows(N, N * Kp * T, [&](int64_t n0, int64_t n1) {
    int64_t t = 0;
    for (; t + 4 <= T; t += 4)
      gemv_rows<8, 4>(x + t * Kp, Kp, codes, row_bytes, scales, zeros, xsum + t * G, G, gs, Kp,
                      y + t * N, N, n0, n1);
    for (; t + 2 <= T; t += 2)
      gemv_rows<8, 2>(x + t * Kp, Kp, codes, row_bytes, scales, zeros, xsum + t * G, G, gs, Kp,
                      y + t * N, N, n0, n1);
    for (; t < T; ++t)
      gemv_rows<8, 1>(x + t * Kp, Kp, codes, row_bytes, scales, zeros, xsum + t * G, G, gs, Kp,
                      y + t * N, N, n0, n1);
  });
}

// Activations rounded to int8 (T rows of x, prepared once in `a`), codes of any width: the
// pair kernel (kernels.h, pair_gemv).
template <int BITS>
void gemv_pairs(const PairScratch& a, int64_t T, const uint8_t* codes, int64_t row_bytes,
                const at::Half* scales, const uint8_t* zeros, int64_t G, int64_t gs, int64_t Kp,
                float* y, int64_t N) {
  share_rows(N, N * Kp * T, [&](int64_t n0, int64_t n1) {
    pair_gemv<BITS>(a.act.data(), T, codes, row_bytes, scales, zeros, G, gs, Kp, y, N, n0, n1);
  });
}

void check(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& zeros,
           int64_t bits, int64_t gs) {
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 3,
              "qgemv: bits must be 8, 4 or 3 (3: unpacked, one code a byte), got ", bits);
  TORCH_CHECK(gs % 32 == 0 && gs > 0, "qgemv: group size must be a multiple of 32");
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.is_contiguous() && codes.dim() == 2);
  TORCH_CHECK(scales.dtype() == torch::kHalf && scales.is_contiguous());
  TORCH_CHECK(zeros.dtype() == torch::kUInt8 && zeros.is_contiguous());
}

}  // namespace

// y (T, N) = x (T, Kp) @ dequant(codes)^T with x rounded to int8 per block of 32 columns first
// (one scale a block, as llama.cpp's q8 activations): integer dot products for every code
// width, the same numbers in every ISA build. T <= 8 rows (more: split by the caller).
torch::Tensor qgemv_q8(torch::Tensor x, torch::Tensor codes, torch::Tensor scales,
                       torch::Tensor zeros, int64_t bits, int64_t gs) {
  check(codes, scales, zeros, bits, gs);
  TORCH_CHECK(x.dtype() == torch::kFloat && x.is_contiguous() && x.dim() == 2);
  const int64_t T = x.size(0), Kp = x.size(1), N = codes.size(0), G = scales.size(1);
  TORCH_CHECK(Kp % 32 == 0, "qgemv: padded width must be a multiple of 32");
  TORCH_CHECK(codes.size(1) * (bits == 4 ? 2 : 1) == Kp, "qgemv: x width does not match the codes");
  TORCH_CHECK(G == (Kp + gs - 1) / gs, "qgemv: scales have the wrong number of groups");
  auto y = torch::empty({T, N}, x.options());
  PairScratch a;
  a.prepare(x.data_ptr<float>(), T, Kp, Kp, static_cast<int>(bits), gs);
  const auto* s = scales.data_ptr<at::Half>();
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const uint8_t* z = zeros.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t rb = codes.size(1);
  if (bits == 8) gemv_pairs<8>(a, T, c, rb, s, z, G, gs, Kp, yp, N);
  else if (bits == 4) gemv_pairs<4>(a, T, c, rb, s, z, G, gs, Kp, yp, N);
  else gemv_pairs<3>(a, T, c, rb, s, z, G, gs, Kp, yp, N);
  return y;
}

// x (T, Kp) fp32 contiguous, Kp a multiple of 32 -> y (T, N) fp32. For 4- and 3-bit codes x
// is rounded to int8 per block of 32 columns first (see quantize_act in kernels.h).
torch::Tensor qgemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scales,
                    torch::Tensor zeros, int64_t bits, int64_t gs) {
  check(codes, scales, zeros, bits, gs);
  TORCH_CHECK(x.dtype() == torch::kFloat && x.is_contiguous() && x.dim() == 2);
  const int64_t T = x.size(0), Kp = x.size(1), N = codes.size(0), G = scales.size(1);
  TORCH_CHECK(Kp % 32 == 0, "qgemv: padded width must be a multiple of 32");
  TORCH_CHECK(codes.size(1) * (bits == 4 ? 2 : 1) == Kp, "qgemv: x width does not match the codes");
  TORCH_CHECK(G == (Kp + gs - 1) / gs, "qgemv: scales have the wrong number of groups");
  auto y = torch::empty({T, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const auto* s = scales.data_ptr<at::Half>();
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const uint8_t* z = zeros.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  if (bits == 8) {  // fp32 activations; per-group sums of x shared by every output row
    std::vector<float> xsum(T * G, 0.f);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < Kp; ++k) xsum[t * G + k / gs] += xp[t * Kp + k];
    gemv8(xp, T, c, codes.size(1), s, z, xsum.data(), G, gs, Kp, yp, N);
    return y;
  }
  return qgemv_q8(x, codes, scales, zeros, bits, gs);
}

// Dequantize to a dense (N, Kp) fp32 weight: w = (q - z) * s, for prefill-sized matmuls.
torch::Tensor dequantize(torch::Tensor codes, torch::Tensor scales, torch::Tensor zeros,
                         int64_t bits, int64_t gs) {
  check(codes, scales, zeros, bits, gs);
  const int64_t N = codes.size(0), Kp = codes.size(1) * (bits == 4 ? 2 : 1), G = scales.size(1);
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
        if (bits == 4) load_block<4>(row, blk, v); else load_block<8>(row, blk, v);
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
      for (int64_t t = 0; t < T; ++t) Y[t * N + n] = dot_f32(wr, X + t * K, K);
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

void register_decode(pybind11::module& m);  // decode.cpp
void register_attention(pybind11::module& m);  // attention.cpp
void register_elementwise(pybind11::module& m);  // elementwise.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_decode(m);
  register_attention(m);
  register_elementwise(m);
  m.def("qgemv", &qgemv, "y = x @ dequant(codes).T from packed codes (AVX2/FMA)");
  m.def("qgemv_q8", &qgemv_q8, "qgemv with x rounded to int8 per block of 32, any code width");
  m.def("isa", []() {
#if defined(POCKETLM_512)
    return std::string("avx512");
#elif defined(__AVX512VNNI__) || defined(__AVXVNNI__)
    return std::string("avx2+vnni");
#else
    return std::string("avx2");
#endif
  }, "the instruction set this extension was compiled for");
  m.def("gemv_f32", &gemv_f32, "y = x @ w.T for a few fp32 rows, w row-major (AVX2/FMA)");
  m.def("dequantize", &dequantize, "dense fp32 weight from packed codes");
}
