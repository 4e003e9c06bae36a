// One decode step of a LLaMA-family decoder in a single call: every layer, for up to
// MAX_ROWS sequences of one new token each, inside one OpenMP parallel region.
//
// Why: at batch 1 a step is ~200 small matrix-vector products plus ~30 small ops per layer.
// Run op by op from Python that is ~7,600 dispatcher calls and an OpenMP wake-up per product,
// which costs as much as streaming the weights. Here the threads stay up for the whole step
// and meet at a barrier between dependent stages; the products split output rows between
// them. The maths is the same as pocketlm/model/transformer.py, stage for stage:
//
//   x = embedding (looked up by the caller)
//   per layer: h = rmsnorm(x); q, k, v = h Wq, h Wk, h Wv; rope(q, k) at each row's position;
//              write k, v into the cache at that position; y = softmax(q k^T / sqrt(E)) v over
//              positions 0..pos (grouped-query: query head h reads kv head h / (H / KV));
//              x += y Wo; h = rmsnorm(x); x += (silu(h Wg) * h Wu) Wd
//   logits = rmsnorm(x) Wout
//
// Weights are fp32 (row-major, (out, in)) or packed quantized codes (see qgemv.cpp), layer
// by layer, so quantized models take the same path. The caches are the model's KVCache
// tensors (rows, KV, S, E); the step writes position pos of rows row0..row0+B-1.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels.h"

namespace {
using namespace pocketlm;

constexpr int64_t MAX_ROWS = 8;

// A weight (N outputs, K inputs): dense fp32, or codes with bits 8, 4 or 3 (3-bit codes
// unpacked to one byte each).
struct Lin {
  int bits = 32;
  const float* w = nullptr;
  const uint8_t* codes = nullptr;
  const at::Half* scales = nullptr;
  const uint8_t* zeros = nullptr;
  int64_t N = 0, K = 0, G = 0, gs = 0, row_bytes = 0;
  bool int8_act = true;  // 8-bit codes: activations rounded to int8 (else fp32)
};

struct Layer {
  const float *in_norm, *post_norm;
  Lin q, k, v, o, gate, up, down;
  int64_t H = 0, KV = 0, F = 0;  // per layer: structured pruning may narrow some layers
};

// Per-thread scratch for quantized products: the input rows rounded to int8 in the pair
// layout (kernels.h), or per-group sums of the input (8-bit codes with fp32 activations).
struct ActScratch {
  PairScratch pairs;
  std::vector<float> bsum, gsum;
};

// Rows [n0, n1) of y (B, N) = x (B, K) @ W^T; integer-path weights read the int8 rows in A.
void lin_rows(const Lin& L, const float* x, int64_t B, const ActScratch& A, float* y,
              int64_t ldy, int64_t n0, int64_t n1) {
  if (L.bits == 32) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* wr = L.w + n * L.K;
      for (int64_t t = 0; t < B; ++t) y[t * ldy + n] = dot_f32(wr, x + t * L.K, L.K);
    }
    return;
  }
  if (L.bits == 8 && !L.int8_act) {  // fp32 activations, gsum = sums of x
    for (int64_t t = 0; t < B; ++t)
      gemv_rows<8, 1>(x + t * L.K, L.K, L.codes, L.row_bytes, L.scales, L.zeros,
                      A.gsum.data() + t * L.G, L.G, L.gs, L.K, y + t * ldy, ldy, n0, n1);
    return;
  }
  const PairAct* act = A.pairs.act.data();  // all B rows at once: each weight row read once
  if (L.bits == 8)
    pair_gemv<8>(act, B, L.codes, L.row_bytes, L.scales, L.zeros, L.G, L.gs, L.K, y, ldy, n0, n1);
  else if (L.bits == 4)
    pair_gemv<4>(act, B, L.codes, L.row_bytes, L.scales, L.zeros, L.G, L.gs, L.K, y, ldy, n0, n1);
  else
    pair_gemv<3>(act, B, L.codes, L.row_bytes, L.scales, L.zeros, L.G, L.gs, L.K, y, ldy, n0, n1);
}

// Called by every thread of the team: y = x @ W^T, output rows shared out in chunks.
// No barrier at the end (callers put one where the result is needed).
void lin_team(const Lin& L, const float* x, int64_t B, float* y, int64_t ldy, ActScratch& A,
              int nthreads) {
  // Each thread prepares the input itself (K values: cheaper than a barrier): x rounded to
  // int8 in the codes' layout, or per-group sums of x for 8-bit codes with fp32 activations.
  if (L.bits == 8 && !L.int8_act) {
    const int64_t ld = L.K / 32;
    for (int64_t t = 0; t < B; ++t) {
      for (int64_t b = 0; b < ld; ++b) {
        float s = 0.f;
        for (int64_t k = b * 32; k < b * 32 + 32; ++k) s += x[t * L.K + k];
        A.bsum[t * ld + b] = s;
      }
      group_sums(A.bsum.data() + t * ld, L.K, L.gs, A.gsum.data() + t * L.G);
    }
  } else if (L.bits != 32) {
    A.pairs.prepare(x, B, L.K, L.K, L.bits, L.gs);
  }
  const int64_t chunk = std::max<int64_t>(16, (L.N + 8 * nthreads - 1) / (8 * nthreads));
  const int64_t chunks = (L.N + chunk - 1) / chunk;
#pragma omp for schedule(dynamic, 1) nowait
  for (int64_t c = 0; c < chunks; ++c)
    lin_rows(L, x, B, A, y, ldy, c * chunk, std::min(L.N, (c + 1) * chunk));
}

void rmsnorm(const float* x, const float* w, float* y, int64_t D, float eps) {
  double ss = 0.0;
  for (int64_t i = 0; i < D; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float r = 1.0f / std::sqrt(static_cast<float>(ss / D) + eps);
  for (int64_t i = 0; i < D; ++i) y[i] = x[i] * r * w[i];
}

// "Rotate half" RoPE on one head of width E in place, with that position's cos/sin rows.
void rope(float* x, const float* c, const float* s, int64_t E) {
  const int64_t h = E / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * c[i] - b * s[i];
    x[i + h] = b * c[i + h] + a * s[i + h];
  }
}

class DecodePlan {
 public:
  DecodePlan(std::vector<torch::Tensor> norms, std::vector<std::vector<torch::Tensor>> lins,
             std::vector<std::vector<int64_t>> meta, torch::Tensor cos, torch::Tensor sin,
             double eps)
      : eps_(static_cast<float>(eps)), cos_(cos), sin_(sin) {
    const int64_t n_layers = static_cast<int64_t>(norms.size() - 1) / 2;
    TORCH_CHECK(norms.size() == static_cast<size_t>(2 * n_layers + 1) &&
                lins.size() == static_cast<size_t>(7 * n_layers + 1) && meta.size() == lins.size(),
                "DecodePlan: expected 2 norms and 7 weights per layer, then the final norm and "
                "the output weight");
    for (auto& t : norms) check_f32(t, "norm");
    check_f32(cos, "cos");
    check_f32(sin, "sin");
    E_ = cos.size(1);
    std::vector<Lin> L;
    for (size_t i = 0; i < lins.size(); ++i) L.push_back(make_lin(lins[i], meta[i]));
    for (int64_t l = 0; l < n_layers; ++l) {
      Layer y;
      y.in_norm = norms[2 * l].data_ptr<float>();
      y.post_norm = norms[2 * l + 1].data_ptr<float>();
      y.q = L[7 * l];
      y.k = L[7 * l + 1];
      y.v = L[7 * l + 2];
      y.o = L[7 * l + 3];
      y.gate = L[7 * l + 4];
      y.up = L[7 * l + 5];
      y.down = L[7 * l + 6];
      y.H = y.q.N / E_;
      y.KV = y.k.N / E_;
      y.F = y.gate.N;
      layers_.push_back(y);
    }
    final_norm_ = norms.back().data_ptr<float>();
    head_ = L.back();
    keep_ = norms;
    for (auto& v : lins) keep_.insert(keep_.end(), v.begin(), v.end());
    D_ = head_.K;
    for (auto& y : layers_) {
      TORCH_CHECK(y.KV > 0 && y.H % y.KV == 0 && y.q.N == y.H * E_ && y.k.N == y.KV * E_ &&
                  y.v.N == y.KV * E_ && y.o.N == D_ && y.up.N == y.F && y.down.N == D_ &&
                  y.q.K == D_ && y.k.K == D_ && y.v.K == D_ && y.gate.K == D_ && y.up.K == D_ &&
                  y.o.K == y.H * E_ && y.down.K == y.F,
                  "DecodePlan: a layer's weights do not fit the model's shapes");
      Hmax_ = std::max(Hmax_, y.H);
      KVmax_ = std::max(KVmax_, y.KV);
      Fmax_ = std::max(Fmax_, y.F);
    }
  }

  // x (B, D) embeddings of the new tokens; positions (B,); caches per layer (rows, KV, S, E).
  torch::Tensor step(torch::Tensor x, torch::Tensor positions, std::vector<torch::Tensor> kc,
                     std::vector<torch::Tensor> vc, int64_t row0) {
    const int64_t B = x.size(0);
    TORCH_CHECK(x.dim() == 2 && x.size(1) == D_ && x.dtype() == torch::kFloat && B >= 1 &&
                B <= MAX_ROWS, "decode step: x must be (B <= 8, D) fp32");
    TORCH_CHECK(positions.dtype() == torch::kLong && positions.numel() == B,
                "decode step: one int64 position per row");
    TORCH_CHECK(kc.size() == layers_.size() && vc.size() == layers_.size(),
                "decode step: one key and one value cache per layer");
    const int64_t S = kc.empty() ? 0 : kc[0].size(2);
    for (size_t l = 0; l < kc.size(); ++l) {
      for (auto* c : {&kc[l], &vc[l]}) {
        TORCH_CHECK(c->dtype() == torch::kFloat && c->is_contiguous() && c->dim() == 4 &&
                    c->size(1) == layers_[l].KV && c->size(2) == S && c->size(3) == E_ &&
                    row0 + B <= c->size(0), "decode step: caches must be fp32 (rows, KV, S, E)");
      }
    }
    auto pos_t = positions.contiguous();
    const int64_t* pos = pos_t.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(pos[b] >= 0 && pos[b] < S && pos[b] < cos_.size(0),
                  "decode step: position ", pos[b], " is outside the cache");

    const int64_t D = D_, E = E_;
    const int nt = std::max(1, at::get_num_threads());
    auto xin = x.contiguous();
    std::vector<float> X(xin.data_ptr<float>(), xin.data_ptr<float>() + B * D);
    std::vector<float> Hb(B * D), Q(B * Hmax_ * E), Kn(B * KVmax_ * E), Vn(B * KVmax_ * E),
        Y(B * Hmax_ * E), O(B * D), Gt(B * Fmax_), U(B * Fmax_);
    std::vector<float> scratch(nt * std::max<int64_t>(S, 1));
    const int64_t kmax = std::max(D, std::max(Fmax_, Hmax_ * E)) + 32;
    std::vector<ActScratch> scratch_act(nt);
    for (auto& A : scratch_act) {  // (the pair scratch sizes itself on first use)
      A.bsum.resize(B * kmax / 32);
      A.gsum.resize(B * kmax / 32);
    }
    auto logits = torch::empty({B, head_.N}, x.options());
    float* out = logits.data_ptr<float>();
    const float* cosp = cos_.data_ptr<float>();
    const float* sinp = sin_.data_ptr<float>();
    const float scale = 1.0f / std::sqrt(static_cast<float>(E));

#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num();
      ActScratch& xs = scratch_act[tid];
      float* sc = scratch.data() + tid * std::max<int64_t>(S, 1);
      for (size_t l = 0; l < layers_.size(); ++l) {
        const Layer& Ly = layers_[l];
        const int64_t H = Ly.H, KV = Ly.KV, F = Ly.F, G = H / KV;
        float* kcache = kc[l].data_ptr<float>();
        float* vcache = vc[l].data_ptr<float>();
#pragma omp single
        for (int64_t b = 0; b < B; ++b) rmsnorm(&X[b * D], Ly.in_norm, &Hb[b * D], D, eps_);
        lin_team(Ly.q, Hb.data(), B, Q.data(), H * E, xs, nt);
        lin_team(Ly.k, Hb.data(), B, Kn.data(), KV * E, xs, nt);
        lin_team(Ly.v, Hb.data(), B, Vn.data(), KV * E, xs, nt);
#pragma omp barrier
        // Rope the new keys and write keys and values into the cache; rope the queries.
#pragma omp for schedule(static)
        for (int64_t i = 0; i < B * (KV + H); ++i) {
          const int64_t b = i / (KV + H), j = i % (KV + H), p = pos[b];
          if (j < KV) {
            float* kn = &Kn[(b * KV + j) * E];
            rope(kn, cosp + p * E, sinp + p * E, E);
            const int64_t off = (((row0 + b) * KV + j) * S + p) * E;
            std::copy(kn, kn + E, kcache + off);
            std::copy(&Vn[(b * KV + j) * E], &Vn[(b * KV + j) * E] + E, vcache + off);
          } else {
            rope(&Q[(b * H + (j - KV)) * E], cosp + p * E, sinp + p * E, E);
          }
        }  // implicit barrier: every key is in the cache before anyone attends
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < B * H; ++i) {
          const int64_t b = i / H, h = i % H, p = pos[b], kvh = h / G;
          const float* q = &Q[(b * H + h) * E];
          const float* kb = kcache + ((row0 + b) * KV + kvh) * S * E;
          const float* vb = vcache + ((row0 + b) * KV + kvh) * S * E;
          float m = -INFINITY;
          for (int64_t j = 0; j <= p; ++j) {
            sc[j] = dot_f32(kb + j * E, q, E) * scale;
            m = std::max(m, sc[j]);
          }
          const int64_t L = p + 1;
          const float sum = exp_shifted_sum(sc, L, m);
          float* y = &Y[(b * H + h) * E];
          std::fill(y, y + E, 0.f);
          for (int64_t jj = 0; jj < L; ++jj) {
            const __m256 pj = _mm256_set1_ps(sc[jj] / sum);
            const float* vr = vb + jj * E;
            int64_t e = 0;
            for (; e + 8 <= E; e += 8)
              _mm256_storeu_ps(y + e, _mm256_fmadd_ps(pj, _mm256_loadu_ps(vr + e),
                                                      _mm256_loadu_ps(y + e)));
            for (; e < E; ++e) y[e] += sc[jj] / sum * vr[e];
          }
        }  // implicit barrier
        lin_team(Ly.o, Y.data(), B, O.data(), D, xs, nt);
#pragma omp barrier
#pragma omp single
        for (int64_t b = 0; b < B; ++b) {
          for (int64_t i = 0; i < D; ++i) X[b * D + i] += O[b * D + i];
          rmsnorm(&X[b * D], Ly.post_norm, &Hb[b * D], D, eps_);
        }
        lin_team(Ly.gate, Hb.data(), B, Gt.data(), F, xs, nt);
        lin_team(Ly.up, Hb.data(), B, U.data(), F, xs, nt);
#pragma omp barrier
#pragma omp single
        for (int64_t i = 0; i < B * F; i += 8) {  // silu(g) * u, F a multiple of 8 or tail
          if (i + 8 <= B * F) {
            const __m256 g = _mm256_loadu_ps(&Gt[i]);
            const __m256 sig = _mm256_div_ps(
                _mm256_set1_ps(1.f),
                _mm256_add_ps(_mm256_set1_ps(1.f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), g))));
            _mm256_storeu_ps(&Gt[i], _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(&U[i])));
          } else {
            for (int64_t r = i; r < B * F; ++r) Gt[r] = Gt[r] / (1.f + std::exp(-Gt[r])) * U[r];
          }
        }
        lin_team(Ly.down, Gt.data(), B, O.data(), D, xs, nt);
#pragma omp barrier
#pragma omp single
        for (int64_t i = 0; i < B * D; ++i) X[i] += O[i];
      }
#pragma omp single
      for (int64_t b = 0; b < B; ++b) rmsnorm(&X[b * D], final_norm_, &Hb[b * D], D, eps_);
      lin_team(head_, Hb.data(), B, out, head_.N, xs, nt);
    }
    return logits;
  }

 private:
  static void check_f32(const torch::Tensor& t, const char* what) {
    TORCH_CHECK(t.dtype() == torch::kFloat && t.is_contiguous(), "DecodePlan: ", what,
                " must be contiguous fp32");
  }

  // meta: {bits, K (input width; padded for codes), group size[, int8 activations]}; tensors:
  // {w} or {codes, scales, zeros}. The fourth entry (default 1) matters for 8-bit codes only:
  // 0 keeps their activations fp32.
  static Lin make_lin(const std::vector<torch::Tensor>& t, const std::vector<int64_t>& meta) {
    TORCH_CHECK(meta.size() == 3 || meta.size() == 4,
                "DecodePlan: weight meta is {bits, K, group size[, int8 activations]}");
    Lin L;
    L.bits = static_cast<int>(meta[0]);
    L.K = meta[1];
    L.int8_act = meta.size() == 3 || meta[3] != 0;
    if (L.bits == 32) {
      TORCH_CHECK(t.size() == 1 && t[0].dim() == 2 && t[0].size(1) == L.K, "DecodePlan: bad weight");
      check_f32(t[0], "weight");
      L.w = t[0].data_ptr<float>();
      L.N = t[0].size(0);
      return L;
    }
    TORCH_CHECK((L.bits == 8 || L.bits == 4 || L.bits == 3) && t.size() == 3,
                "DecodePlan: codes must be 8, 4 or 3 bits (3: unpacked, one a byte)");
    TORCH_CHECK(t[0].dtype() == torch::kUInt8 && t[0].is_contiguous() && t[0].dim() == 2 &&
                t[1].dtype() == torch::kHalf && t[1].is_contiguous() &&
                t[2].dtype() == torch::kUInt8 && t[2].is_contiguous(), "DecodePlan: bad codes");
    L.gs = meta[2];
    TORCH_CHECK(L.K % 32 == 0 && L.gs % 32 == 0 && t[0].size(1) * (L.bits == 4 ? 2 : 1) == L.K,
                "DecodePlan: codes do not match the padded width");
    L.codes = t[0].data_ptr<uint8_t>();
    L.scales = t[1].data_ptr<at::Half>();
    L.zeros = t[2].data_ptr<uint8_t>();
    L.N = t[0].size(0);
    L.G = t[1].size(1);
    L.row_bytes = t[0].size(1);
    TORCH_CHECK(L.G == (L.K + L.gs - 1) / L.gs && L.G <= 64 * 1024, "DecodePlan: bad scales");
    return L;
  }

  std::vector<Layer> layers_;
  const float* final_norm_ = nullptr;
  Lin head_;
  int64_t D_ = 0, E_ = 0, Hmax_ = 1, KVmax_ = 1, Fmax_ = 1;
  float eps_;
  torch::Tensor cos_, sin_;
  std::vector<torch::Tensor> keep_;  // the tensors whose memory the raw pointers above use
};

}  // namespace

void register_decode(pybind11::module& m) {
  pybind11::class_<DecodePlan>(m, "DecodePlan")
      .def(pybind11::init<std::vector<torch::Tensor>, std::vector<std::vector<torch::Tensor>>,
                          std::vector<std::vector<int64_t>>, torch::Tensor, torch::Tensor,
                          double>())
      .def("step", &DecodePlan::step, pybind11::call_guard<pybind11::gil_scoped_release>());
}
