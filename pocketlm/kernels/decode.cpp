// One decode step of the decoder in a single call: every layer, for up to MAX_ROWS new tokens
// (one per sequence, or several of one sequence: a speculative draft's verification), inside
// one OpenMP parallel region.
//
// Why: at batch 1 a step is ~200 small matrix-vector products plus ~30 small ops per layer.
// Run op by op from Python that is ~7,600 dispatcher calls and an OpenMP wake-up per product,
// which costs as much as streaming the weights. Here the threads stay up for the whole step
// and meet at a barrier between dependent stages; the products split output rows between
// them. The maths is the same as pocketlm/model/transformer.py, stage for stage, with the
// config's family fields (LLaMA, Qwen2, Qwen3, Gemma 3):
//
//   x = embedding (looked up and scaled by the caller: Gemma's sqrt(D))
//   per layer: h = rmsnorm(x); q, k, v = h Wq (+ bq), h Wk (+ bk), h Wv (+ bv)  [Qwen2 biases]
//              q, k = rmsnorm of each head                                    [Qwen3, Gemma]
//              rope(q, k) at each row's position, with the layer's tables     [Gemma: local]
//              write k, v into the cache at that position;
//              y = softmax(q k^T * scale) v over positions 0..pos, or over the last `window`
//              positions on a local layer (grouped-query: query head h reads kv head h / G)
//              o = y Wo;  LLaMA: x += o; h = rmsnorm(x)
//                         Gemma: x += rmsnorm(o); h = rmsnorm(x) (pre-feed-forward norm)
//              m = (act(h Wg) * h Wu) Wd, act silu or gelu-tanh
//                         LLaMA: x += m;  Gemma: x += rmsnorm(m)
//   logits = rmsnorm(x) Wout, soft-capped (cap * tanh(logits / cap)) where the config says
//
// Weights are fp32 (row-major, (out, in)), packed quantized codes (see qgemv.cpp), or a GGUF
// file's GGML blocks (ggml.h: Q4_0..Q8_0, K-quants, F16/BF16; each weight its own type),
// layer by layer, so quantized and GGUF models take the same path. The caches are the model's
// KVCache tensors (rows, KV, S, E); entry b of the step writes position pos[b] of cache row
// rows[b]. Several entries may share a row (at distinct positions): every key is written before
// anyone attends, so entry b sees the earlier entries of its row, causally.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "ggml.h"
#include "kernels.h"

namespace {
using namespace pocketlm;

constexpr int64_t MAX_ROWS = 8;

// A weight (N outputs, K inputs): dense fp32, codes with bits 8, 4 or 3 (3-bit codes unpacked
// to one byte each), or GGML blocks (bits 0, type gtype); an optional fp32 bias (N).
struct Lin {
  int bits = 32;
  int gtype = 0;
  const float* w = nullptr;
  const uint8_t* codes = nullptr;  // our codes, or the GGML blocks
  const at::Half* scales = nullptr;
  const uint8_t* zeros = nullptr;
  const float* bias = nullptr;
  int64_t N = 0, K = 0, G = 0, gs = 0, row_bytes = 0;
  bool int8_act = true;  // 8-bit codes: activations rounded to int8 (else fp32)
};

struct Layer {
  const float *in_norm = nullptr, *post_norm = nullptr;
  const float *pre_ff_norm = nullptr, *post_ff_norm = nullptr;  // Gemma: both, or neither
  const float *q_norm = nullptr, *k_norm = nullptr;             // per-head norms, or none
  Lin q, k, v, o, gate, up, down;
  int64_t H = 0, KV = 0, F = 0;  // per layer: structured pruning may narrow some layers
  int64_t window = 0;            // a local layer's sliding window; 0: attends to every position
  const float *cos = nullptr, *sin = nullptr;  // this layer's RoPE tables (S, E)
};

// Per-thread scratch for quantized products: the input rows rounded to int8 in the pair
// layout (kernels.h), per-group sums of the input (8-bit codes with fp32 activations), or what
// a GGML type's row kernel reads (ggml_prepare).
struct ActScratch {
  PairScratch pairs;
  std::vector<float> bsum, gsum, gact;
};

// cap * tanh(y / cap) in place, n values: tanh(u) = 2 sigmoid(2u) - 1.
void softcap(float* y, int64_t n, float cap) {
  const __m256 k = _mm256_set1_ps(-2.f / cap), c = _mm256_set1_ps(cap), one = _mm256_set1_ps(1.f);
  const __m256 two = _mm256_set1_ps(2.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp256(_mm256_mul_ps(_mm256_loadu_ps(y + i), k));  // exp(-2 y / cap)
    const __m256 t = _mm256_sub_ps(_mm256_div_ps(two, _mm256_add_ps(one, e)), one);
    _mm256_storeu_ps(y + i, _mm256_mul_ps(t, c));
  }
  for (; i < n; ++i) y[i] = std::tanh(y[i] / cap) * cap;
}

// g <- act(g) * u for n values: silu(g) = g sigmoid(g); gelu_tanh(g) = g sigmoid(2u),
// u = sqrt(2/pi) (g + 0.044715 g^3) (= 0.5 g (1 + tanh(u)), PyTorch's approximate="tanh").
void gated(float* g, const float* u, int64_t n, bool gelu) {
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  const __m256 a = _mm256_set1_ps(-2.f * 0.7978845608028654f), b = _mm256_set1_ps(0.044715f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    __m256 z;  // the sigmoid's argument, negated
    if (gelu) z = _mm256_mul_ps(a, _mm256_fmadd_ps(_mm256_mul_ps(b, x), _mm256_mul_ps(x, x), x));
    else z = _mm256_sub_ps(zero, x);
    const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp256(z)));
    _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_mul_ps(x, sig), _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) {
    const float x = g[i];
    const float z = gelu ? -2.f * 0.7978845608028654f * (x + 0.044715f * x * x * x) : -x;
    g[i] = x / (1.f + std::exp(z)) * u[i];
  }
}

// Rows [n0, n1) of y (B, N) = x (B, K) @ W^T (+ bias); integer-path weights read the int8
// rows in A.
void lin_rows(const Lin& L, const float* x, int64_t B, const ActScratch& A, float* y,
              int64_t ldy, int64_t n0, int64_t n1) {
  if (L.bits == 32) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* wr = L.w + n * L.K;
      for (int64_t t = 0; t < B; ++t) y[t * ldy + n] = dot_f32(wr, x + t * L.K, L.K);
    }
  } else if (L.bits == 0) {
    ggml_rows(L.gtype, A.gact.data(), x, B, L.K, L.codes, L.row_bytes, y, ldy, n0, n1);
  } else if (L.bits == 8 && !L.int8_act) {  // fp32 activations, gsum = sums of x
    for (int64_t t = 0; t < B; ++t)
      gemv_rows<8, 1>(x + t * L.K, L.K, L.codes, L.row_bytes, L.scales, L.zeros,
                      A.gsum.data() + t * L.G, L.G, L.gs, L.K, y + t * ldy, ldy, n0, n1);
  } else {
    const PairAct* act = A.pairs.act.data();  // all B rows at once: each weight row read once
    if (L.bits == 8)
      pair_gemv<8>(act, B, L.codes, L.row_bytes, L.scales, L.zeros, L.G, L.gs, L.K, y, ldy, n0, n1);
    else if (L.bits == 4)
      pair_gemv<4>(act, B, L.codes, L.row_bytes, L.scales, L.zeros, L.G, L.gs, L.K, y, ldy, n0, n1);
    else
      pair_gemv<3>(act, B, L.codes, L.row_bytes, L.scales, L.zeros, L.G, L.gs, L.K, y, ldy, n0, n1);
  }
  if (L.bias)
    for (int64_t t = 0; t < B; ++t)
      for (int64_t n = n0; n < n1; ++n) y[t * ldy + n] += L.bias[n];
}

// Called by every thread of the team: y = x @ W^T (+ bias; soft-capped where cap > 0), output
// rows shared out in chunks. No barrier at the end (callers put one where the result is needed).
void lin_team(const Lin& L, const float* x, int64_t B, float* y, int64_t ldy, ActScratch& A,
              int nthreads, float cap = 0.f) {
  // Each thread prepares the input itself (K values: cheaper than a barrier): x rounded to
  // int8 in the codes' layout, per-group sums of x for 8-bit codes with fp32 activations, or
  // what the GGML type's kernel reads.
  if (L.bits == 0) {
    const int64_t n = std::max<int64_t>(1, ggml_act_floats(L.gtype, B, L.K));
    if (static_cast<int64_t>(A.gact.size()) < n) A.gact.resize(n);
    ggml_prepare(L.gtype, x, B, L.K, A.gact.data());
  } else if (L.bits == 8 && !L.int8_act) {
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
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t n0 = c * chunk, n1 = std::min(L.N, (c + 1) * chunk);
    lin_rows(L, x, B, A, y, ldy, n0, n1);
    if (cap > 0.f)
      for (int64_t t = 0; t < B; ++t) softcap(y + t * ldy + n0, n1 - n0, cap);
  }
}

void rmsnorm(const float* x, const float* w, float* y, int64_t D, float eps) {  // y may be x
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
  // norms: per layer {input, post-attention, pre-feed-forward, post-feed-forward, q, k} (an
  // empty tensor where the family has none), then {final}; lins: 7 per layer (q, k, v, o, gate,
  // up, down) then the output head, with meta per weight (make_lin); rope: {cos, sin, local
  // cos, local sin}, each (S, E); windows: per layer, the sliding window of a local layer (0 for
  // a global one); opts: {eps, attention scale, final soft-cap (0: none), gelu-tanh gate (0/1)}.
  DecodePlan(std::vector<std::vector<torch::Tensor>> norms,
             std::vector<std::vector<torch::Tensor>> lins, std::vector<std::vector<int64_t>> meta,
             std::vector<torch::Tensor> rope, std::vector<int64_t> windows,
             std::vector<double> opts) {
    const int64_t n_layers = static_cast<int64_t>(norms.size()) - 1;
    TORCH_CHECK(n_layers >= 0 && lins.size() == static_cast<size_t>(7 * n_layers + 1) &&
                meta.size() == lins.size() && windows.size() == static_cast<size_t>(n_layers) &&
                rope.size() == 4 && opts.size() == 4 && norms.back().size() == 1,
                "DecodePlan: expected 6 norms, 7 weights and a window per layer, then the final "
                "norm and the output weight; 4 RoPE tables; 4 options");
    eps_ = static_cast<float>(opts[0]);
    scale_ = static_cast<float>(opts[1]);
    cap_ = static_cast<float>(opts[2]);
    gelu_ = opts[3] != 0.0;
    for (auto& t : rope) {
      check_f32(t, "RoPE table");
      TORCH_CHECK(t.dim() == 2 && t.sizes() == rope[0].sizes(), "DecodePlan: RoPE tables (S, E)");
    }
    E_ = rope[0].size(1);
    S_rope_ = rope[0].size(0);
    std::vector<Lin> L;
    for (size_t i = 0; i < lins.size(); ++i) L.push_back(make_lin(lins[i], meta[i]));
    for (int64_t l = 0; l < n_layers; ++l) {
      const auto& nl = norms[l];
      TORCH_CHECK(nl.size() == 6, "DecodePlan: 6 norm slots per layer");
      Layer y;
      y.in_norm = norm_ptr(nl[0], -1, true);
      y.post_norm = norm_ptr(nl[1], -1, true);
      y.pre_ff_norm = norm_ptr(nl[2], -1, false);
      y.post_ff_norm = norm_ptr(nl[3], -1, false);
      y.q_norm = norm_ptr(nl[4], E_, false);
      y.k_norm = norm_ptr(nl[5], E_, false);
      TORCH_CHECK(!y.pre_ff_norm == !y.post_ff_norm && !y.q_norm == !y.k_norm,
                  "DecodePlan: Gemma's feed-forward norms and the q/k norms come in pairs");
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
      y.window = windows[l];
      TORCH_CHECK(y.window >= 0, "DecodePlan: negative window");
      const bool local = y.window > 0;
      y.cos = rope[local ? 2 : 0].data_ptr<float>();
      y.sin = rope[local ? 3 : 1].data_ptr<float>();
      layers_.push_back(y);
    }
    final_norm_ = norm_ptr(norms.back()[0], -1, true);
    head_ = L.back();
    for (auto& v : norms) keep_.insert(keep_.end(), v.begin(), v.end());
    for (auto& v : lins) keep_.insert(keep_.end(), v.begin(), v.end());
    keep_.insert(keep_.end(), rope.begin(), rope.end());
    D_ = head_.K;
    for (size_t i = 0; i < norms.size(); ++i)
      for (size_t j = 0; j < norms[i].size(); ++j)
        TORCH_CHECK(norms[i][j].numel() == 0 || j >= 4 || norms[i][j].numel() == D_,
                    "DecodePlan: a norm weight is not the model's width");
    for (auto& y : layers_) {
      TORCH_CHECK(y.KV > 0 && y.H % y.KV == 0 && y.q.N == y.H * E_ && y.k.N == y.KV * E_ &&
                  y.v.N == y.KV * E_ && y.o.N == D_ && y.up.N == y.F && y.down.N == D_ &&
                  y.q.K == D_ && y.k.K == D_ && y.v.K == D_ && y.gate.K == D_ && y.up.K == D_ &&
                  y.o.K == y.H * E_ && y.down.K == y.F && !y.o.bias && !y.gate.bias &&
                  !y.up.bias && !y.down.bias,
                  "DecodePlan: a layer's weights do not fit the model's shapes");
      Hmax_ = std::max(Hmax_, y.H);
      KVmax_ = std::max(KVmax_, y.KV);
      Fmax_ = std::max(Fmax_, y.F);
    }
    TORCH_CHECK(!head_.bias, "DecodePlan: the output layer has no bias");
  }

  // x (B, D) embeddings of the new tokens; positions (B,); rows (B,) the cache row of each;
  // caches per layer (rows, KV, S, E). Entries sharing a row must have distinct positions.
  torch::Tensor step(torch::Tensor x, torch::Tensor positions, std::vector<torch::Tensor> kc,
                     std::vector<torch::Tensor> vc, torch::Tensor rows) {
    const int64_t B = x.size(0);
    TORCH_CHECK(x.dim() == 2 && x.size(1) == D_ && x.dtype() == torch::kFloat && B >= 1 &&
                B <= MAX_ROWS, "decode step: x must be (B <= 8, D) fp32");
    TORCH_CHECK(positions.dtype() == torch::kLong && positions.numel() == B &&
                rows.dtype() == torch::kLong && rows.numel() == B,
                "decode step: one int64 position and one int64 cache row per entry");
    TORCH_CHECK(kc.size() == layers_.size() && vc.size() == layers_.size(),
                "decode step: one key and one value cache per layer");
    const int64_t S = kc.empty() ? 0 : kc[0].size(2);
    const int64_t n_rows = kc.empty() ? 0 : kc[0].size(0);
    for (size_t l = 0; l < kc.size(); ++l) {
      for (auto* c : {&kc[l], &vc[l]}) {
        TORCH_CHECK(c->dtype() == torch::kFloat && c->is_contiguous() && c->dim() == 4 &&
                    c->size(0) == n_rows && c->size(1) == layers_[l].KV && c->size(2) == S &&
                    c->size(3) == E_, "decode step: caches must be fp32 (rows, KV, S, E)");
      }
    }
    auto pos_t = positions.contiguous();
    auto rows_t = rows.contiguous();
    const int64_t* pos = pos_t.data_ptr<int64_t>();
    const int64_t* row = rows_t.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(pos[b] >= 0 && pos[b] < S && pos[b] < S_rope_,
                  "decode step: position ", pos[b], " is outside the cache");
      TORCH_CHECK(row[b] >= 0 && row[b] < n_rows, "decode step: cache row ", row[b],
                  " is outside the cache");
      for (int64_t c = 0; c < b; ++c)
        TORCH_CHECK(row[c] != row[b] || pos[c] != pos[b],
                    "decode step: two entries write the same position of one cache row");
    }

    const int64_t D = D_, E = E_;
    const int nt = std::max(1, at::get_num_threads());
    auto xin = x.contiguous();
    std::vector<float> X(xin.data_ptr<float>(), xin.data_ptr<float>() + B * D);
    std::vector<float> Hb(B * D), Q(B * Hmax_ * E), Kn(B * KVmax_ * E), Vn(B * KVmax_ * E),
        Y(B * Hmax_ * E), O(B * D), Gt(B * Fmax_), U(B * Fmax_);
    std::vector<float> scratch(nt * std::max<int64_t>(S, 1));
    const int64_t kmax = std::max(D, std::max(Fmax_, Hmax_ * E)) + 32;
    std::vector<ActScratch> scratch_act(nt);
    for (auto& A : scratch_act) {  // (the pair and GGML scratch size themselves on first use)
      A.bsum.resize(B * kmax / 32);
      A.gsum.resize(B * kmax / 32);
    }
    auto logits = torch::empty({B, head_.N}, x.options());
    float* out = logits.data_ptr<float>();
    const float scale = scale_;

#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num();
      ActScratch& xs = scratch_act[tid];
      float* sc = scratch.data() + tid * std::max<int64_t>(S, 1);
      for (size_t l = 0; l < layers_.size(); ++l) {
        const Layer& Ly = layers_[l];
        const int64_t H = Ly.H, KV = Ly.KV, F = Ly.F, G = H / KV;
        const float* cosp = Ly.cos;
        const float* sinp = Ly.sin;
        float* kcache = kc[l].data_ptr<float>();
        float* vcache = vc[l].data_ptr<float>();
#pragma omp single
        for (int64_t b = 0; b < B; ++b) rmsnorm(&X[b * D], Ly.in_norm, &Hb[b * D], D, eps_);
        lin_team(Ly.q, Hb.data(), B, Q.data(), H * E, xs, nt);
        lin_team(Ly.k, Hb.data(), B, Kn.data(), KV * E, xs, nt);
        lin_team(Ly.v, Hb.data(), B, Vn.data(), KV * E, xs, nt);
#pragma omp barrier
        // Norm (Qwen3, Gemma) and rope the new keys, write keys and values into the cache;
        // norm and rope the queries.
#pragma omp for schedule(static)
        for (int64_t i = 0; i < B * (KV + H); ++i) {
          const int64_t b = i / (KV + H), j = i % (KV + H), p = pos[b];
          if (j < KV) {
            float* kn = &Kn[(b * KV + j) * E];
            if (Ly.k_norm) rmsnorm(kn, Ly.k_norm, kn, E, eps_);
            rope(kn, cosp + p * E, sinp + p * E, E);
            const int64_t off = ((row[b] * KV + j) * S + p) * E;
            std::copy(kn, kn + E, kcache + off);
            std::copy(&Vn[(b * KV + j) * E], &Vn[(b * KV + j) * E] + E, vcache + off);
          } else {
            float* qh = &Q[(b * H + (j - KV)) * E];
            if (Ly.q_norm) rmsnorm(qh, Ly.q_norm, qh, E, eps_);
            rope(qh, cosp + p * E, sinp + p * E, E);
          }
        }  // implicit barrier: every key is in the cache before anyone attends
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < B * H; ++i) {
          const int64_t b = i / H, h = i % H, p = pos[b], kvh = h / G;
          const int64_t j0 = Ly.window > 0 ? std::max<int64_t>(0, p - Ly.window + 1) : 0;
          const float* q = &Q[(b * H + h) * E];
          const float* kb = kcache + (row[b] * KV + kvh) * S * E;
          const float* vb = vcache + (row[b] * KV + kvh) * S * E;
          const int64_t L = p + 1 - j0;  // keys j0..p, as scores sc[0..L)
          float m = -INFINITY;
          for (int64_t j = 0; j < L; ++j) {
            sc[j] = dot_f32(kb + (j0 + j) * E, q, E) * scale;
            m = std::max(m, sc[j]);
          }
          const float sum = exp_shifted_sum(sc, L, m);
          float* y = &Y[(b * H + h) * E];
          std::fill(y, y + E, 0.f);
          for (int64_t jj = 0; jj < L; ++jj) {
            const __m256 pj = _mm256_set1_ps(sc[jj] / sum);
            const float* vr = vb + (j0 + jj) * E;
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
          float* o = &O[b * D];
          float* xb = &X[b * D];
          if (Ly.pre_ff_norm) {  // Gemma: the attention output is normed, then the MLP input
            rmsnorm(o, Ly.post_norm, o, D, eps_);
            for (int64_t i = 0; i < D; ++i) xb[i] += o[i];
            rmsnorm(xb, Ly.pre_ff_norm, &Hb[b * D], D, eps_);
          } else {
            for (int64_t i = 0; i < D; ++i) xb[i] += o[i];
            rmsnorm(xb, Ly.post_norm, &Hb[b * D], D, eps_);
          }
        }
        lin_team(Ly.gate, Hb.data(), B, Gt.data(), F, xs, nt);
        lin_team(Ly.up, Hb.data(), B, U.data(), F, xs, nt);
#pragma omp barrier
#pragma omp single
        gated(Gt.data(), U.data(), B * F, gelu_);
        lin_team(Ly.down, Gt.data(), B, O.data(), D, xs, nt);
#pragma omp barrier
#pragma omp single
        for (int64_t b = 0; b < B; ++b) {
          float* o = &O[b * D];
          if (Ly.post_ff_norm) rmsnorm(o, Ly.post_ff_norm, o, D, eps_);
          for (int64_t i = 0; i < D; ++i) X[b * D + i] += o[i];
        }
      }
#pragma omp single
      for (int64_t b = 0; b < B; ++b) rmsnorm(&X[b * D], final_norm_, &Hb[b * D], D, eps_);
      lin_team(head_, Hb.data(), B, out, head_.N, xs, nt, cap_);
    }
    return logits;
  }

 private:
  static void check_f32(const torch::Tensor& t, const char* what) {
    TORCH_CHECK(t.dtype() == torch::kFloat && t.is_contiguous(), "DecodePlan: ", what,
                " must be contiguous fp32");
  }

  // A norm weight's data (numel n where n >= 0), or nullptr for an empty tensor where allowed.
  static const float* norm_ptr(const torch::Tensor& t, int64_t n, bool required) {
    if (t.numel() == 0) {
      TORCH_CHECK(!required, "DecodePlan: a required norm weight is missing");
      return nullptr;
    }
    check_f32(t, "norm");
    TORCH_CHECK(n < 0 || t.numel() == n, "DecodePlan: a q/k norm is not one head wide");
    return t.data_ptr<float>();
  }

  // meta: {bits, K (input width; padded for codes), group size or GGML type[, int8
  // activations]}; tensors: {w}, {codes, scales, zeros} or {blocks}, each then an optional fp32
  // bias. bits 32: dense fp32; 8, 4, 3: our codes (the fourth meta entry, default 1, matters for
  // 8-bit codes only: 0 keeps their activations fp32); 0: GGML blocks (N, row_bytes) of the type.
  static Lin make_lin(const std::vector<torch::Tensor>& t, const std::vector<int64_t>& meta) {
    TORCH_CHECK(meta.size() == 3 || meta.size() == 4,
                "DecodePlan: weight meta is {bits, K, group size or type[, int8 activations]}");
    Lin L;
    L.bits = static_cast<int>(meta[0]);
    L.K = meta[1];
    L.int8_act = meta.size() == 3 || meta[3] != 0;
    const size_t n_main = L.bits == 32 || L.bits == 0 ? 1 : 3;
    TORCH_CHECK(t.size() == n_main || t.size() == n_main + 1, "DecodePlan: bad weight tensors");
    if (L.bits == 32) {
      TORCH_CHECK(t[0].dim() == 2 && t[0].size(1) == L.K, "DecodePlan: bad weight");
      check_f32(t[0], "weight");
      L.w = t[0].data_ptr<float>();
      L.N = t[0].size(0);
    } else if (L.bits == 0) {
      L.gtype = static_cast<int>(meta[2]);
      TORCH_CHECK(ggml_act_floats(L.gtype, 1, L.K) >= 0, "DecodePlan: GGML type ", L.gtype,
                  " is not one the kernels compute");
      TORCH_CHECK(t[0].dtype() == torch::kUInt8 && t[0].is_contiguous() && t[0].dim() == 2,
                  "DecodePlan: GGML blocks must be contiguous (N, row bytes) uint8");
      L.codes = t[0].data_ptr<uint8_t>();
      L.N = t[0].size(0);
      L.row_bytes = t[0].size(1);
    } else {
      TORCH_CHECK(L.bits == 8 || L.bits == 4 || L.bits == 3,
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
    }
    if (t.size() == n_main + 1) {
      check_f32(t.back(), "bias");
      TORCH_CHECK(t.back().numel() == L.N, "DecodePlan: a bias is not the layer's width");
      L.bias = t.back().data_ptr<float>();
    }
    return L;
  }

  std::vector<Layer> layers_;
  const float* final_norm_ = nullptr;
  Lin head_;
  int64_t D_ = 0, E_ = 0, S_rope_ = 0, Hmax_ = 1, KVmax_ = 1, Fmax_ = 1;
  float eps_ = 1e-5f, scale_ = 1.f, cap_ = 0.f;
  bool gelu_ = false;
  std::vector<torch::Tensor> keep_;  // the tensors whose memory the raw pointers above use
};

}  // namespace

void register_decode(pybind11::module& m) {
  pybind11::class_<DecodePlan>(m, "DecodePlan")
      .def(pybind11::init<std::vector<std::vector<torch::Tensor>>,
                          std::vector<std::vector<torch::Tensor>>,
                          std::vector<std::vector<int64_t>>, std::vector<torch::Tensor>,
                          std::vector<int64_t>, std::vector<double>>())
      .def("step", &DecodePlan::step, pybind11::call_guard<pybind11::gil_scoped_release>());
}
