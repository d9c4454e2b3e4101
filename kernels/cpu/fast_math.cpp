// CPU kernels for the prefill's elementwise hot spots (mlxgen/backends/cpu/ext.py builds and loads this).
//
// MLX JIT-compiles its CPU kernels without -march (SSE2, no FMA) and runs exp at ~6-40 ns per
// element here; these loops are built for the host CPU and do one pass per row.

#include <nanobind/nanobind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;
namespace nb = nanobind;

namespace {

#ifdef __AVX512F__
constexpr int W = 16;  // floats per vector: one AVX-512 register (-march=native found it)
#else
constexpr int W = 8;  // floats per vector: one AVX register, two SSE ones
#endif
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

inline vf splat(float x) { return vf{} + x; }

// exp(x) for x in [-87, 88]: x = n ln2 + r, |r| <= ln2 / 2, e^r from Cephes' degree-6
// polynomial (~1 ulp), 2^n built in the exponent bits. Callers clamp below at -87.
inline vf vexp(vf x) {
  // Round to nearest by adding and subtracting 1.5 * 2^23 (valid for |x log2 e| < 2^22).
  vf n = (x * splat(1.44269504f) + splat(12582912.0f)) - splat(12582912.0f);
  vf r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// out[r, j] = exp(s[r, j] - max_j' s[r, j']) over the visible keys j <= first_visible + (r % q_len)
// (all keys when first_visible < 0), 0 beyond them. One row is read twice, written once.
void softmax_numerators(const float* s, float* out, int64_t rows, int64_t n, int64_t q_len,
                        int64_t first_visible) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = s + r * n;
    float* o = out + r * n;
    int64_t m = first_visible < 0 ? n : std::min<int64_t>(n, first_visible + r % q_len + 1);
    int64_t j = 0;
    vf vm = splat(-INFINITY);
    for (; j + W <= m; j += W) vm = vmax(vm, load(in + j));
    float mx_ = -INFINITY;
    for (int k = 0; k < W; ++k) mx_ = std::max(mx_, vm[k]);
    for (; j < m; ++j) mx_ = std::max(mx_, in[j]);
    if (mx_ == -INFINITY) mx_ = 0.0f;  // a fully masked row gives zeros, not NaN
    vf vmx = splat(mx_), lo = splat(-87.0f);
    for (j = 0; j + W <= m; j += W) {
      vf d = load(in + j) - vmx;  // below -87 (incl. -inf): 0, exp's float range ends there
      store(o + j, d < lo ? splat(0.0f) : vexp(vmax(lo, d)));  // vmax(lo, NaN) keeps NaN
    }
    for (; j < m; ++j) o[j] = in[j] - mx_ < -87.0f ? 0.0f : std::exp(in[j] - mx_);
    for (; j < n; ++j) o[j] = 0.0f;
  }
}

// silu(g) * u = g * u / (1 + exp(-g)), with exp's argument kept <= 0: for g < 0,
// sigmoid(g) = e / (1 + e) with e = exp(g).
void silu_mul(const float* g, const float* u, float* out, int64_t size) {
  int64_t i = 0;
  vf one = splat(1.0f), lo = splat(-87.0f);
  for (; i + W <= size; i += W) {
    vf x = load(g + i);
    vf neg_abs = x > 0 ? -x : x;
    vf e = vexp(vmax(lo, neg_abs));  // NaN stays NaN, as in MLX
    vf sig = (x > 0 ? one : e) / (one + e);
    store(out + i, x * sig * load(u + i));
  }
  for (; i < size; ++i) out[i] = g[i] * u[i] / (1.0f + std::exp(-g[i]));
}

// y = x @ w.T for a few rows x (m, k) and a row-major weight w (n, k): one streaming pass over w,
// split over threads by output column. MLX's CPU matmul sends m = 1 through a packing sgemm.
// 8-wide even with AVX-512: this loop streams memory, and 16-wide measured slower on Zen 5
// (Qwen's head, one thread: 21 vs 15 ms).
typedef float vf8 __attribute__((vector_size(32)));
inline vf8 load8(const float* p) { vf8 v; std::memcpy(&v, p, sizeof(v)); return v; }
void matvec_rows(const float* x, const float* w, float* y, int64_t m, int64_t k, int64_t n0,
                 int64_t n1, int64_t n) {
  for (int64_t j = n0; j < n1; ++j) {
    const float* wj = w + j * k;
    for (int64_t r = 0; r < m; ++r) {
      const float* xr = x + r * k;
      vf8 a0 = {}, a1 = {};
      int64_t i = 0;
      for (; i + 16 <= k; i += 16) {
        a0 += load8(wj + i) * load8(xr + i);
        a1 += load8(wj + i + 8) * load8(xr + i + 8);
      }
      for (; i + 8 <= k; i += 8) a0 += load8(wj + i) * load8(xr + i);
      a0 += a1;
      float acc = 0.0f;
      for (int t = 0; t < 8; ++t) acc += a0[t];
      for (; i < k; ++i) acc += wj[i] * xr[i];
      y[r * n + j] = acc;
    }
  }
}

void matvec(const float* x, const float* w, float* y, int64_t m, int64_t k, int64_t n, int threads) {
  if (threads <= 1 || n * k < (1 << 20)) return matvec_rows(x, w, y, m, k, 0, n, n);
  std::vector<std::thread> pool;
  int64_t per = (n + threads - 1) / threads;
  for (int t = 1; t < threads; ++t)
    pool.emplace_back(matvec_rows, x, w, y, m, k, std::min(n, t * per), std::min(n, (t + 1) * per), n);
  matvec_rows(x, w, y, m, k, 0, std::min(n, per), n);
  for (auto& th : pool) th.join();
}

// RMSNorm of each row of x (rows, d): x / sqrt(mean(x^2) + eps) * weight, one read, one write.
void rms_norm(const float* x, const float* w, float* y, int64_t rows, int64_t d, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    float* yr = y + r * d;
    vf acc = splat(0.0f);
    int64_t i = 0;
    for (; i + W <= d; i += W) { vf v = load(xr + i); acc += v * v; }
    float ss = 0.0f;
    for (int t = 0; t < W; ++t) ss += acc[t];
    for (; i < d; ++i) ss += xr[i] * xr[i];
    vf inv = splat(1.0f / std::sqrt(ss / d + eps));
    for (i = 0; i + W <= d; i += W) store(yr + i, load(xr + i) * inv * load(w + i));
    for (; i < d; ++i) yr[i] = xr[i] * inv[0] * w[i];
  }
}

// RoPE of x (B, H, L, D) given as strides (last axis contiguous) into a contiguous output, as
// mx.fast.rope computes it: theta = (offset + l) * scale * inv_freq[i] in float32, the first
// `dims` features rotated (halves, or adjacent pairs when traditional), the rest copied.
void rope(const float* x, float* y, int64_t B, int64_t H, int64_t L, int64_t D,
          int64_t sb, int64_t sh, int64_t sl, int64_t sd, int dims, bool traditional, const float* inv_freq,
          float scale, int64_t offset) {
  int half = dims / 2;
  std::vector<float> cs(L * half), sn(L * half);
  for (int64_t l = 0; l < L; ++l) {
    float pos = static_cast<float>(offset + l) * scale;
    for (int i = 0; i < half; ++i) {
      float theta = pos * inv_freq[i];
      cs[l * half + i] = std::cos(theta);
      sn[l * half + i] = std::sin(theta);
    }
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t l = 0; l < L; ++l) {
        const float* xr = x + b * sb + h * sh + l * sl;
        float* yr = y + ((b * H + h) * L + l) * D;
        const float* c = cs.data() + l * half;
        const float* s = sn.data() + l * half;
        if (traditional) {
          for (int i = 0; i < half; ++i) {
            float a = xr[2 * i * sd], e = xr[(2 * i + 1) * sd];
            yr[2 * i] = a * c[i] - e * s[i];
            yr[2 * i + 1] = a * s[i] + e * c[i];
          }
        } else {
          for (int i = 0; i < half; ++i) {
            float a = xr[i * sd], e = xr[(i + half) * sd];
            yr[i] = a * c[i] - e * s[i];
            yr[i + half] = a * s[i] + e * c[i];
          }
        }
        for (int64_t i = dims; i < D; ++i) yr[i] = xr[i * sd];
      }
}

// One MLX primitive for every kernel here (cpu_kernel.h): float32 inputs (made contiguous unless
// the kernel takes strides), one float32 output.
#include "cpu_kernel.h"

mx::array checked(const mx::array& x, const char* what, bool contiguous = true) {
  if (x.dtype() != mx::float32)
    throw std::invalid_argument(std::string(what) + ": mlxgen CPU kernels take float32 arrays.");
  return contiguous ? mx::contiguous(x, false, cpu_stream()) : x;
}

mx::array make(const char* name, const mx::Shape& shape, std::vector<mx::array> inputs, Kernel fn) {
  return mx::array(shape, mx::float32, std::make_shared<CpuKernel>(cpu_stream(), name, std::move(fn)),
                   std::move(inputs));
}

mx::array softmax_numerators_op(const mx::array& scores, int64_t q_len, int64_t first_visible) {
  if (scores.ndim() < 2 || q_len < 1)
    throw std::invalid_argument("softmax_numerators needs (..., rows, keys) scores and q_len >= 1.");
  auto x = checked(scores, "softmax_numerators");
  int64_t n = x.shape(-1), rows = x.size() / n;
  return make("MlxgenSoftmaxNumerators", x.shape(), {x}, [=](auto& in, float* out) -> Task {
    return [=, s = in[0].template data<float>()] { softmax_numerators(s, out, rows, n, q_len, first_visible); };
  });
}

mx::array silu_mul_op(const mx::array& gate, const mx::array& up) {
  if (gate.shape() != up.shape()) throw std::invalid_argument("silu_mul needs equal shapes.");
  auto g = checked(gate, "silu_mul"), u = checked(up, "silu_mul");
  int64_t size = g.size();
  return make("MlxgenSiluMul", g.shape(), {g, u}, [=](auto& in, float* out) -> Task {
    return [=, a = in[0].template data<float>(), b = in[1].template data<float>()] { silu_mul(a, b, out, size); };
  });
}

mx::array matvec_op(const mx::array& x, const mx::array& weight, int threads) {
  if (weight.ndim() != 2 || x.ndim() < 1 || x.shape(-1) != weight.shape(1))
    throw std::invalid_argument("matvec needs x (..., k) and weight (n, k).");
  auto xc = checked(x, "matvec"), w = checked(weight, "matvec");
  int64_t k = w.shape(1), n = w.shape(0), m = xc.size() / k;
  auto shape = xc.shape();
  shape.back() = static_cast<int>(n);
  return make("MlxgenMatvec", shape, {xc, w}, [=](auto& in, float* out) -> Task {
    return [=, a = in[0].template data<float>(), b = in[1].template data<float>()] { matvec(a, b, out, m, k, n, threads); };
  });
}

mx::array rms_norm_op(const mx::array& x, const mx::array& weight, float eps) {
  if (weight.ndim() != 1 || x.ndim() < 1 || x.shape(-1) != weight.shape(0))
    throw std::invalid_argument("rms_norm needs x (..., d) and weight (d,).");
  auto xc = checked(x, "rms_norm"), w = checked(weight, "rms_norm");
  int64_t d = w.shape(0), rows = xc.size() / d;
  return make("MlxgenRmsNorm", xc.shape(), {xc, w}, [=](auto& in, float* out) -> Task {
    return [=, a = in[0].template data<float>(), b = in[1].template data<float>()] { rms_norm(a, b, out, rows, d, eps); };
  });
}

mx::array rope_op(const mx::array& x, int dims, bool traditional, const mx::array& inv_freq,
                  float scale, int64_t offset) {
  if (x.ndim() != 4 || dims <= 0 || dims % 2 || dims > x.shape(3) ||
      inv_freq.ndim() != 1 || inv_freq.shape(0) != dims / 2)
    throw std::invalid_argument("rope needs x (B, H, L, D), even dims <= D and dims / 2 inverse frequencies.");
  // Read in place whatever the layout (e.g. the transposed projection): strides at eval time.
  auto xs = checked(x, "rope", false);
  auto f = checked(inv_freq, "rope");
  int64_t B = xs.shape(0), H = xs.shape(1), L = xs.shape(2), D = xs.shape(3);
  return make("MlxgenRope", xs.shape(), {xs, f}, [=](auto& in, float* out) -> Task {
    auto& st = in[0].strides();
    return [=, a = in[0].template data<float>(), fr = in[1].template data<float>(),
            sb = st[0], sh = st[1], sl = st[2], sd = st[3]] {
      rope(a, out, B, H, L, D, sb, sh, sl, sd, dims, traditional, fr, scale, offset);
    };
  });
}

}  // namespace

void add_quant_ops(nb::module_& m);  // quant.cpp: kernels on quantized weights

NB_MODULE(_mlxgen_cpu, m) {
  m.doc() = "mlxgen's CPU kernels (built for this machine by mlxgen/backends/cpu/ext.py).";
  m.def("softmax_numerators", &softmax_numerators_op, nb::arg("scores"), nb::arg("q_len"),
        nb::arg("first_visible"));
  m.def("silu_mul", &silu_mul_op, nb::arg("gate"), nb::arg("up"));
  m.def("matvec", &matvec_op, nb::arg("x"), nb::arg("weight"), nb::arg("threads"));
  m.def("rms_norm", &rms_norm_op, nb::arg("x"), nb::arg("weight"), nb::arg("eps"));
  m.def("rope", &rope_op, nb::arg("x"), nb::arg("dims"), nb::arg("traditional"), nb::arg("inv_freq"),
        nb::arg("scale"), nb::arg("offset"));
  add_quant_ops(m);
}
