// The GGML-block products that other kernels (decode.cpp's DecodePlan) call from inside their
// own OpenMP region: single-threaded, on a range of output rows. Implemented in ggml.cpp.
//
//   ggml_act_floats(type, T, K)  floats of scratch one call of ggml_prepare needs;
//   ggml_prepare(type, x, T, K, act)
//                                x (T, K) turned into what the type's row kernel reads: for
//                                the quantized types x rounded to int8 blocks with their
//                                scales and sums (integer dot products, as llama.cpp), else
//                                (F16/BF16, or int8 activations off: the default) sums of x per 32
//                                columns; act records which, so ggml_rows reads it right;
//                                one thread;
//   ggml_rows(type, act, x, T, K, w, row_bytes, y, ldy, n0, n1)
//                                y[t * ldy + n] = x[t] . W[n] for n in [n0, n1), t < T <= 8;
//                                one thread, each row's sum in a fixed order (results do not
//                                depend on how rows are shared out).
// Both return false for a type they do not compute.
#pragma once
#include <cstdint>

namespace pocketlm {

int64_t ggml_act_floats(int type, int64_t T, int64_t K);
bool ggml_prepare(int type, const float* x, int64_t T, int64_t K, float* act);
bool ggml_rows(int type, const float* act, const float* x, int64_t T, int64_t K,
               const uint8_t* w, int64_t row_bytes, float* y, int64_t ldy, int64_t n0,
               int64_t n1);

}  // namespace pocketlm
