// Causal grouped-query attention for prefill (fp32, AVX2/FMA), flash-attention style.
//
// PyTorch's CPU flash-attention kernel splits keys into blocks as long as a 512-token prompt,
// so with is_causal it still computes every score above the diagonal and throws it away: on a
// 2-core AVX2 machine causal and full attention take the same ~4.5 ms a layer. Here each task
// is (sequence, kv head, block of QB queries); the G query heads that share the kv head are
// stacked into one tile of G*QB rows, so every key and value loaded serves all of them, and
// key blocks past the tile's last query are never touched. Scores are kept in a running
// (online) softmax per row, so nothing of size (T, L) is ever built.
//
// Query i (0-based in this call) sits at absolute position offset + i and attends keys
// 0..offset+i: a prompt from position 0 (offset 0, L == T), or new tokens after a cached
// prefix (offset = L - T).
#include "kernels.h"

#include <cmath>
#include <vector>

namespace pocketlm {
namespace {

constexpr int QB = 16;  // query positions per task
constexpr int KB = 64;  // keys per block

// The one micro-kernel of both products: for 4 rows r and 16 columns,
// C[r][0..16) = (C[r][0..16) if accumulate) + sum_{i < n} A[r * lda + i] * B[i * ldb + 0..16).
inline void tile4x16(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t n,
                     float* C, int64_t ldc, bool accumulate) {
  __m256 c[4][2];
  for (int r = 0; r < 4; ++r)
    for (int h = 0; h < 2; ++h)
      c[r][h] = accumulate ? _mm256_loadu_ps(C + r * ldc + 8 * h) : _mm256_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const __m256 b0 = _mm256_loadu_ps(B + i * ldb), b1 = _mm256_loadu_ps(B + i * ldb + 8);
    for (int r = 0; r < 4; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + i);
      c[r][0] = _mm256_fmadd_ps(a, b0, c[r][0]);
      c[r][1] = _mm256_fmadd_ps(a, b1, c[r][1]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(C + r * ldc + 8 * h, c[r][h]);
}

// Scores S[r][j] = sum_e Q[r][e] * KT[e][j] for R rows (R % 4 == 0) and KB keys; KT is the
// transposed key block, KT[e * ldk + j].
inline void scores_tile(const float* Q, int E, int R, const float* KT, int64_t ldk, float* S) {
  for (int r = 0; r < R; r += 4)
    for (int j = 0; j < KB; j += 16)
      tile4x16(Q + r * E, E, KT + j, ldk, E, S + r * KB + j, KB, false);
}

// O[r][:] += sum_{j < nk} P[r][j] * V[j][:] for R rows (R % 4 == 0); V rows ldv apart.
inline void values_tile(const float* P, int R, int nk, const float* V, int64_t ldv, int E,
                        float* O) {
  for (int r = 0; r < R; r += 4)
    for (int c = 0; c < E; c += 16)
      tile4x16(P + r * KB, KB, V + c, ldv, nk, O + r * E + c, E, true);
}

}  // namespace

// q (B, H, T, E) any strides; k, v (B, K, L, E) with unit stride along E; returns
// y (B, T, H, E) contiguous (what the output projection reads).
torch::Tensor causal_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               int64_t offset) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k.dtype() == torch::kFloat32 &&
                  v.dtype() == torch::kFloat32, "causal_attention: fp32 only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "causal_attention: 4-d tensors");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), E = q.size(3);
  const int64_t K = k.size(1), L = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == K && v.size(2) == L &&
                  k.size(3) == E && v.size(3) == E, "causal_attention: shape mismatch");
  TORCH_CHECK(H % K == 0 && E % 16 == 0 && E <= 256, "causal_attention: H % K, E % 16, E <= 256");
  TORCH_CHECK(offset >= 0 && offset + T <= L, "causal_attention: offset + T must be <= L");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "causal_attention: k, v need unit stride on E");
  const int64_t G = H / K, R = G * QB;
  const float scale = 1.0f / std::sqrt(static_cast<float>(E));
  auto y = torch::empty({B, T, H, E}, q.options());

  // Keys transposed once per (sequence, kv head): KT (E, Lp), zero-padded to whole blocks.
  const int64_t nkb = (offset + T + KB - 1) / KB, Lp = nkb * KB;
  std::vector<float> kt(static_cast<size_t>(B * K * E * Lp), 0.f);
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ksb = k.stride(0), ksh = k.stride(1), ksl = k.stride(2);
  const int64_t vsb = v.stride(0), vsh = v.stride(1), vsl = v.stride(2);
  const int64_t qsb = q.stride(0), qsh = q.stride(1), qst = q.stride(2), qse = q.stride(3);
  const int64_t used = std::min<int64_t>(L, offset + T);
  const int threads = at::get_num_threads();
#pragma omp parallel for collapse(2) num_threads(threads)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < K; ++h) {
      float* dst = kt.data() + (b * K + h) * E * Lp;
      const float* src = kp + b * ksb + h * ksh;
      for (int64_t j = 0; j < used; ++j)
        for (int64_t e = 0; e < E; ++e) dst[e * Lp + j] = src[j * ksl + e];
    }

  const int64_t nqb = (T + QB - 1) / QB, tasks = B * K * nqb;
  // Largest tasks (last query blocks, which see the most keys) first, for balance.
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> Q(R * E), S(R * KB), O(R * E), m(R), l(R);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t qb = nqb - 1 - task % nqb, bh = task / nqb, b = bh / K, h = bh % K;
      const int64_t t0 = qb * QB;
      // Row r = g * QB + i: query head h * G + g at query t0 + i (clamped at the end; those
      // rows are computed and not written).
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < QB; ++i) {
          const int64_t t = std::min(t0 + i, T - 1);
          const float* src = qp + b * qsb + (h * G + g) * qsh + t * qst;
          float* dst = Q.data() + (g * QB + i) * E;
          for (int64_t e = 0; e < E; ++e) dst[e] = src[e * qse] * scale;
        }
      std::fill(O.begin(), O.end(), 0.f);
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.f);
      const int64_t last = offset + std::min(t0 + QB, T) - 1;  // the tile's last query position
      const float* KT = kt.data() + (b * K + h) * E * Lp;
      const float* Vh = vp + b * vsb + h * vsh;
      for (int64_t kb = 0; kb <= last; kb += KB) {
        const int nk = static_cast<int>(std::min<int64_t>(KB, std::min(L, last + 1) - kb));
        scores_tile(Q.data(), static_cast<int>(E), static_cast<int>(R), KT + kb, Lp, S.data());
        const bool diagonal = kb + KB - 1 > offset + t0;  // some key here is after some query
        for (int64_t r = 0; r < R; ++r) {
          float* s = S.data() + r * KB;
          const int64_t pos = offset + std::min(t0 + r % QB, T - 1);
          const int64_t lim = diagonal ? std::min<int64_t>(nk, pos - kb + 1) : nk;  // keys < lim
          __m256 mx = _mm256_set1_ps(-INFINITY);
          int64_t j = 0;
          for (; j + 8 <= lim; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + j));
          float mrow = m[r];
          alignas(32) float tmp[8];
          _mm256_store_ps(tmp, mx);
          for (int u = 0; u < 8; ++u) mrow = std::max(mrow, tmp[u]);
          for (; j < lim; ++j) mrow = std::max(mrow, s[j]);
          const float alpha = std::exp(m[r] - mrow);  // 0 on the first block (m = -inf)
          const float rowsum = exp_shifted_sum(s, std::max<int64_t>(lim, 0), mrow);
          for (j = std::max<int64_t>(lim, 0); j < KB; ++j) s[j] = 0.f;  // after the query or past the keys
          m[r] = mrow;
          l[r] = l[r] * alpha + rowsum;
          if (alpha != 1.f) {
            float* o = O.data() + r * E;
            for (int64_t e = 0; e < E; ++e) o[e] *= alpha;
          }
        }
        values_tile(S.data(), static_cast<int>(R), nk, Vh + kb * vsl, vsl, static_cast<int>(E),
                    O.data());
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < QB && t0 + i < T; ++i) {
          const int64_t r = g * QB + i;
          const float inv = 1.f / l[r];
          float* dst = yp + ((b * T + t0 + i) * H + h * G + g) * E;
          const float* o = O.data() + r * E;
          for (int64_t e = 0; e < E; ++e) dst[e] = o[e] * inv;
        }
    }
  }
  return y;
}

}  // namespace pocketlm

void register_attention(pybind11::module& m) {
  m.def("causal_attention", &pocketlm::causal_attention,
        "causal grouped-query attention for prefill: y (B, T, H, E) from q (B, H, T, E), "
        "k/v (B, K, L, E), query i at position offset + i",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
