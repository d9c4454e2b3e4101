// A decoder layer's decode step (one token per sequence) in two CPU ops instead of ~20 MLX graph
// nodes: at one token the layer's work is mostly reading its quantized weights, and MLX's per-node
// CPU cost (dispatch, allocation, bookkeeping) was a large share of the step (bench/NOTES.md).
//
//   decode_qkv: RMSNorm -> q, k, v projections (+ bias) -> (q/k RMSNorm) -> RoPE of q and k,
//               k and v returned in the cache's dtype for its slice update;
//   decode_out: attention over the cache -> output projection -> residual -> RMSNorm ->
//               SwiGLU MLP -> residual.
// The cache write between them stays MLX's slice update, which updates the buffer in place
// (buffer donation); a fused op with the buffer as one of several outputs could not.

#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "kernels.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;
namespace nb = nanobind;

namespace {

#include "cpu_kernel.h"

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument("decode layer: " + what); }

// One quantized projection: input arrays (w, scales, biases) at `at`, and its shape.
struct Proj {
  int at, bits, group_size, scale_dtype;
  int64_t n, k;
  void run(const std::vector<const void*>& in, const float* x, float* y, int64_t m, int threads) const {
    mlxgen::qmatvec(in[at], in[at + 1], in[at + 2], scale_dtype, n, k, group_size, bits, x, y, m, threads);
  }
};

// Checks w, scales, biases (at `at` in `arrays`) as an (n, k) projection; mx.quantize's layout.
Proj projection(const std::vector<mx::array>& arrays, int at, int bits, int group_size, int64_t n, int64_t k,
                const char* name) {
  const auto &w = arrays[at], &s = arrays[at + 1], &b = arrays[at + 2];
  std::string p = std::string(name) + ": ";
  if (bits != 2 && bits != 3 && bits != 4 && bits != 5 && bits != 6 && bits != 8) bad(p + "unsupported bits.");
  if (group_size != 32 && group_size != 64 && group_size != 128) bad(p + "unsupported group_size.");
  if (w.dtype() != mx::uint32 || w.ndim() != 2 || w.shape(0) != n || int64_t(w.shape(1)) * 32 != k * bits)
    bad(p + "w must be uint32 (" + std::to_string(n) + ", " + std::to_string(k * bits / 32) + ").");
  mx::Shape g = {static_cast<int>(n), static_cast<int>(k / group_size)};
  if (k % group_size || s.shape() != g || b.shape() != g || s.dtype() != b.dtype() ||
      (s.dtype() != mx::float32 && s.dtype() != mx::float16 && s.dtype() != mx::bfloat16))
    bad(p + "scales and biases must share one float dtype and have shape (n, k / group_size).");
  int st = s.dtype() == mx::float32 ? 0 : s.dtype() == mx::float16 ? 1 : 2;
  return {at, bits, group_size, st, n, k};
}

void need_f32(const mx::array& a, int64_t size, const char* what) {
  if (a.dtype() != mx::float32 || static_cast<int64_t>(a.size()) != size)
    bad(std::string(what) + " must be float32 with " + std::to_string(size) + " elements.");
}

// The inputs' data pointers: a task captures these, not the arrays, so that it holds no reference
// that would stop the next slice update of a cache buffer from updating it in place.
std::vector<const void*> pointers(const std::vector<mx::array>& in) {
  std::vector<const void*> p;
  for (const auto& a : in) p.push_back(a.data<void>());
  return p;
}

template <typename T>
const T* at(const std::vector<const void*>& p, size_t i) { return static_cast<const T*>(p[i]); }

void store_as(const float* src, void* dst, int64_t size, bool half) {
  if (!half) return (void)std::memcpy(dst, src, size * sizeof(float));
  auto* d = static_cast<_Float16*>(dst);
  for (int64_t i = 0; i < size; ++i) d[i] = static_cast<_Float16>(src[i]);
}

// arrays: x (B, 1, dim), norm (dim), q/k/v (w, scales, biases) x 3, inv_freq (D / 2),
// then q/k/v biases if `bias`, then q_norm, k_norm (D) if `qk_norm`.
// Returns q (B, H, 1, D) float32, k (B, KV, 1, D) and v (B, KV, 1, D) in kv_dtype, all rotated.
std::vector<mx::array> decode_qkv_op(const std::vector<mx::array>& arrays, std::vector<int> bits,
                                     std::vector<int> group_sizes, int n_heads, int n_kv_heads, int head_dim,
                                     float eps, int64_t offset, float rope_scale, bool traditional, float mscale,
                                     bool bias,
                                     bool qk_norm, mx::Dtype kv_dtype, int threads) {
  if (arrays.size() != static_cast<size_t>(12 + 3 * bias + 2 * qk_norm) || bits.size() != 3 ||
      group_sizes.size() != 3)
    bad("decode_qkv takes x, norm, 3 projections, inv_freq, [3 biases], [2 q/k norms], and 3 bits/group sizes.");
  if (kv_dtype != mx::float32 && kv_dtype != mx::float16) bad("the cache must be float32 or float16.");
  const auto& x = arrays[0];
  if (x.ndim() != 3 || x.shape(1) != 1) bad("x must be (B, 1, dim).");
  int64_t B = x.shape(0), dim = x.shape(2), H = n_heads, KV = n_kv_heads, D = head_dim;
  if (H < 1 || KV < 1 || H % KV || D < 2 || D % 2) bad("heads must divide evenly and head_dim be even.");
  need_f32(x, B * dim, "x");
  need_f32(arrays[1], dim, "norm");
  Proj q = projection(arrays, 2, bits[0], group_sizes[0], H * D, dim, "q_proj");
  Proj k = projection(arrays, 5, bits[1], group_sizes[1], KV * D, dim, "k_proj");
  Proj v = projection(arrays, 8, bits[2], group_sizes[2], KV * D, dim, "v_proj");
  need_f32(arrays[11], D / 2, "inv_freq");
  if (bias) need_f32(arrays[12], H * D, "q bias"), need_f32(arrays[13], KV * D, "k bias"), need_f32(arrays[14], KV * D, "v bias");
  int nb_at = 12 + 3 * bias;
  if (qk_norm) need_f32(arrays[nb_at], D, "q_norm"), need_f32(arrays[nb_at + 1], D, "k_norm");
  bool half = kv_dtype == mx::float16;
  Kernels fn = [=](const std::vector<mx::array>& in, std::vector<mx::array>& out) -> Task {
    return [=, in = pointers(in), qo = out[0].data<float>(), ko = out[1].data<void>(), vo = out[2].data<void>()]() {
      std::vector<float> h(B * dim), qv(B * H * D), kv(B * KV * D), vv(B * KV * D);
      mlxgen::rms_norm(at<float>(in, 0), at<float>(in, 1), h.data(), B, dim, eps);
      q.run(in, h.data(), qv.data(), B, threads);
      k.run(in, h.data(), kv.data(), B, threads);
      v.run(in, h.data(), vv.data(), B, threads);
      if (bias) {
        for (int64_t i = 0; i < B * H * D; ++i) qv[i] += at<float>(in, 12)[i % (H * D)];
        for (int64_t i = 0; i < B * KV * D; ++i) kv[i] += at<float>(in, 13)[i % (KV * D)];
        for (int64_t i = 0; i < B * KV * D; ++i) vv[i] += at<float>(in, 14)[i % (KV * D)];
      }
      if (qk_norm) {
        mlxgen::rms_norm(qv.data(), at<float>(in, nb_at), qv.data(), B * H, D, eps);
        mlxgen::rms_norm(kv.data(), at<float>(in, nb_at + 1), kv.data(), B * KV, D, eps);
      }
      mlxgen::rope_rows(qv.data(), B * H, D, at<float>(in, 11), rope_scale, offset, traditional);
      mlxgen::rope_rows(kv.data(), B * KV, D, at<float>(in, 11), rope_scale, offset, traditional);
      if (mscale != 1.0f) {  // after the rotation, as CpuRoPE scales the rope kernel's output
        for (auto& e : qv) e *= mscale;
        for (auto& e : kv) e *= mscale;
      }
      std::memcpy(qo, qv.data(), qv.size() * sizeof(float));
      store_as(kv.data(), ko, kv.size(), half);
      store_as(vv.data(), vo, vv.size(), half);
    };
  };
  auto prim = std::make_shared<CpuKernel>(cpu_stream(), "MlxgenDecodeQKV", std::move(fn));
  int b = static_cast<int>(B);
  return mx::array::make_arrays({{b, int(H), 1, int(D)}, {b, int(KV), 1, int(D)}, {b, int(KV), 1, int(D)}},
                                {mx::float32, kv_dtype, kv_dtype}, prim, arrays);
}

// arrays: x (B, 1, dim) the layer's input, q (B, H, 1, D) rotated, keys and values (B, KV, N, D)
// whole cache buffers (the first n rows attended), o (w, scales, biases), post-attention norm,
// gate, up, down (w, scales, biases). Returns the layer's output (B, 1, dim).
mx::array decode_out_op(const std::vector<mx::array>& arrays, std::vector<int> bits, std::vector<int> group_sizes,
                        int64_t n, float scale, float eps, int threads) {
  if (arrays.size() != 17 || bits.size() != 4 || group_sizes.size() != 4)
    bad("decode_out takes x, q, keys, values, o_proj, norm, gate, up, down, and 4 bits/group sizes.");
  const auto &x = arrays[0], &q = arrays[1], &keys = arrays[2], &values = arrays[3];
  if (x.ndim() != 3 || x.shape(1) != 1 || q.ndim() != 4 || keys.ndim() != 4 || values.shape() != keys.shape())
    bad("x must be (B, 1, dim), q (B, H, 1, D), keys and values (B, KV, N, D) alike.");
  int64_t B = x.shape(0), dim = x.shape(2), H = q.shape(1), D = q.shape(3), KV = keys.shape(1);
  if (q.shape(0) != B || keys.shape(0) != B || q.shape(2) != 1 || keys.shape(3) != D || H % KV)
    bad("q, keys and values must match x's batch and each other's heads and head_dim.");
  if (n < 1 || n > keys.shape(2)) bad("n must be between 1 and the cache's rows.");
  if (keys.dtype() != values.dtype() || (keys.dtype() != mx::float32 && keys.dtype() != mx::float16))
    bad("keys and values must both be float32 or both float16.");
  need_f32(x, B * dim, "x");
  need_f32(q, B * H * D, "q");
  Proj o = projection(arrays, 4, bits[0], group_sizes[0], dim, H * D, "o_proj");
  need_f32(arrays[7], dim, "post-attention norm");
  int64_t hidden = arrays[8].shape(0);
  Proj gate = projection(arrays, 8, bits[1], group_sizes[1], hidden, dim, "gate_proj");
  Proj up = projection(arrays, 11, bits[2], group_sizes[2], hidden, dim, "up_proj");
  Proj down = projection(arrays, 14, bits[3], group_sizes[3], dim, hidden, "down_proj");
  bool half = keys.dtype() == mx::float16;
  int64_t N = keys.shape(2);
  mlxgen::AttnShape s{B, H, KV, n, D, D, KV * N * D, N * D, D, KV * N * D, N * D, D, scale};
  Kernel fn = [=](const std::vector<mx::array>& in, float* out) -> Task {
    return [=, in = pointers(in)]() {
      std::vector<float> a(B * H * D), h(B * dim), t(B * dim), g(B * hidden), u(B * hidden);
      const float* qp = at<float>(in, 1);
      if (half)
        mlxgen::decode_attention(s, qp, at<_Float16>(in, 2), at<_Float16>(in, 3), a.data(), threads);
      else
        mlxgen::decode_attention(s, qp, at<float>(in, 2), at<float>(in, 3), a.data(), threads);
      o.run(in, a.data(), h.data(), B, threads);
      const float* x0 = at<float>(in, 0);
      for (int64_t i = 0; i < B * dim; ++i) h[i] += x0[i];
      mlxgen::rms_norm(h.data(), at<float>(in, 7), t.data(), B, dim, eps);
      gate.run(in, t.data(), g.data(), B, threads);
      up.run(in, t.data(), u.data(), B, threads);
      mlxgen::silu_mul(g.data(), u.data(), g.data(), B * hidden);
      down.run(in, g.data(), out, B, threads);
      for (int64_t i = 0; i < B * dim; ++i) out[i] += h[i];
    };
  };
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<CpuKernel>(cpu_stream(), "MlxgenDecodeOut", std::move(fn)), arrays);
}

}  // namespace

void add_decode_layer_op(nb::module_& m) {
  m.def("decode_qkv", &decode_qkv_op, nb::arg("arrays"), nb::arg("bits"), nb::arg("group_sizes"),
        nb::arg("n_heads"), nb::arg("n_kv_heads"), nb::arg("head_dim"), nb::arg("eps"), nb::arg("offset"),
        nb::arg("rope_scale"), nb::arg("traditional"), nb::arg("mscale"), nb::arg("bias"), nb::arg("qk_norm"), nb::arg("kv_dtype"),
        nb::arg("threads"));
  m.def("decode_out", &decode_out_op, nb::arg("arrays"), nb::arg("bits"), nb::arg("group_sizes"), nb::arg("n"),
        nb::arg("scale"), nb::arg("eps"), nb::arg("threads"));
}
