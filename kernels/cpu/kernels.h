// What one kernel source file offers another (decode_layer.cpp composes a whole decoder layer
// from quant.cpp's matvec and fast_math.cpp's norm, SwiGLU and attention).
#pragma once

#include <cstdint>

namespace mlxgen {

// y (m, n) = x (m, k) @ w.T for an affine-quantized w in MLX's layout; scales and biases are
// float32 (scale_dtype 0), float16 (1) or bfloat16 (2). Defined in quant.cpp.
void qmatvec(const void* w, const void* scales, const void* biases, int scale_dtype, int64_t n, int64_t k,
             int group_size, int bits, const float* x, float* y, int64_t m, int threads);

// Defined in fast_math.cpp.
void rms_norm(const float* x, const float* w, float* y, int64_t rows, int64_t d, float eps);
void silu_mul(const float* g, const float* u, float* out, int64_t size);
// rows (rows, D) rotated in place at one position, as mx.fast.rope at `offset` (full rotary).
void rope_rows(float* x, int64_t rows, int64_t D, const float* inv_freq, float scale, int64_t offset,
               bool traditional);

// One query row per head against n cached keys; strides in elements over batch, head, position.
struct AttnShape {
  int64_t B, H, KV, n, D, Dv;
  int64_t kb, kh, kn, vb, vh, vn;
  float scale;
};
// q (B, H, D) float32 -> out (B, H, Dv); keys and values float32 or float16 (KT).
template <typename KT>
void decode_attention(const AttnShape& s, const float* q, const KT* k, const KT* v, float* out, int threads);

}  // namespace mlxgen
