// The small per-token operations of a prefill, one pass each (fp32, AVX2/FMA, OpenMP):
// RMSNorm, SwiGLU's silu(gate) * up, and RoPE. In eager PyTorch each is several
// passes over memory (F.rms_norm alone is six ops on CPU); for a 512-token prompt of the
// default model they took ~45 ms of a ~700 ms prefill.
#include "kernels.h"

#include <cmath>

namespace pocketlm {
namespace {

int threads() { return at::get_num_threads(); }

}  // namespace

// y = x / sqrt(mean(x^2) + eps) * w over the last dimension; x (..., D) contiguous.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32 && x.is_contiguous() &&
                  w.is_contiguous(), "rms_norm: contiguous fp32");
  const int64_t D = x.size(-1), rows = x.numel() / D;
  TORCH_CHECK(w.numel() == D, "rms_norm: weight size");
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
#pragma omp parallel for schedule(static) num_threads(threads())
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = xp + r * D;
    float* out = yp + r * D;
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= D; j += 8) {
      const __m256 v = _mm256_loadu_ps(a + j);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = hsum(acc);
    for (; j < D; ++j) ss += a[j] * a[j];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
    const __m256 vi = _mm256_set1_ps(inv);
    for (j = 0; j + 8 <= D; j += 8)
      _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(a + j), vi),
                                              _mm256_loadu_ps(wp + j)));
    for (; j < D; ++j) out[j] = a[j] * inv * wp[j];
  }
  return y;
}

// silu(g) * u elementwise (both contiguous fp32, same shape).
torch::Tensor silu_mul(torch::Tensor g, torch::Tensor u) {
  TORCH_CHECK(g.dtype() == torch::kFloat32 && u.dtype() == torch::kFloat32 && g.is_contiguous() &&
                  u.is_contiguous() && g.numel() == u.numel(), "silu_mul: contiguous fp32, same size");
  const int64_t n = g.numel();
  auto y = torch::empty_like(g);
  const float* gp = g.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t chunk = 4096;
#pragma omp parallel for schedule(static) num_threads(threads())
  for (int64_t c = 0; c < (n + chunk - 1) / chunk; ++c) {
    const int64_t end = std::min(n, (c + 1) * chunk);
    int64_t i = c * chunk;
    const __m256 one = _mm256_set1_ps(1.f);
    for (; i + 8 <= end; i += 8) {
      const __m256 v = _mm256_loadu_ps(gp + i);
      const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), v))));
      _mm256_storeu_ps(yp + i, _mm256_mul_ps(_mm256_mul_ps(v, sig), _mm256_loadu_ps(up + i)));
    }
    for (; i < end; ++i) yp[i] = gp[i] / (1.f + std::exp(-gp[i])) * up[i];
  }
  return y;
}

// RoPE, "rotate half" layout: x (B, T, N, E) with unit stride on E; cos, sin (B, T, E)
// contiguous. y[:h] = x[:h] cos - x[h:] sin, y[h:] = x[h:] cos + x[:h] sin (h = E / 2);
// y (B, T, N, E) contiguous.
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && cos.dtype() == torch::kFloat32 &&
                  sin.dtype() == torch::kFloat32 && x.dim() == 4 && x.stride(3) == 1,
              "rope: fp32 (B, T, N, E) with unit stride on E");
  const int64_t B = x.size(0), T = x.size(1), N = x.size(2), E = x.size(3), h = E / 2;
  TORCH_CHECK(E % 16 == 0, "rope: head width must be a multiple of 16");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == B * T * E &&
                  sin.numel() == B * T * E, "rope: cos/sin (B, T, E) contiguous");
  auto y = torch::empty({B, T, N, E}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t sb = x.stride(0), st = x.stride(1), sn = x.stride(2);
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads())
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const float* c = cp + (b * T + t) * E;
      const float* s = sp + (b * T + t) * E;
      for (int64_t n = 0; n < N; ++n) {
        const float* v = xp + b * sb + t * st + n * sn;
        float* o = yp + ((b * T + t) * N + n) * E;
        for (int64_t j = 0; j < h; j += 8) {
          const __m256 lo = _mm256_loadu_ps(v + j), hi = _mm256_loadu_ps(v + h + j);
          const __m256 nlo = _mm256_sub_ps(_mm256_mul_ps(lo, _mm256_loadu_ps(c + j)),
                                           _mm256_mul_ps(hi, _mm256_loadu_ps(s + j)));
          const __m256 nhi = _mm256_add_ps(_mm256_mul_ps(hi, _mm256_loadu_ps(c + h + j)),
                                           _mm256_mul_ps(lo, _mm256_loadu_ps(s + h + j)));
          _mm256_storeu_ps(o + j, nlo);
          _mm256_storeu_ps(o + h + j, nhi);
        }
      }
    }
  return y;
}

}  // namespace pocketlm

void register_elementwise(pybind11::module& m) {
  m.def("rms_norm", &pocketlm::rms_norm, "RMSNorm over the last dimension (fp32)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("silu_mul", &pocketlm::silu_mul, "silu(g) * u (fp32)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rope", &pocketlm::rope, "rotary embedding, rotate-half layout (fp32)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
