// CPU kernels for the prefill's elementwise hot spots (mlxgen/backends/cpu/ext.py builds and loads this).
//
// MLX JIT-compiles its CPU kernels without -march (SSE2, no FMA) and runs exp at ~6-40 ns per
// element here; these loops are built for the host CPU and do one pass per row.

#include <nanobind/nanobind.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "kernels.h"
#include "pool.h"

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
  // Chunks of at least 1 Mi float32 weights (4 MB; quant.cpp's kMinChunk counts packed weights).
  mlxgen::parallel_for(n, ((1 << 20) + k - 1) / k, threads,
                       [&](int64_t j0, int64_t j1) { matvec_rows(x, w, y, m, k, j0, j1, n); });
}

// Reads `size` 64-bit words once per pass on up to `threads` pool threads; returns the median
// bytes per second of `passes` passes: the memory-read ceiling the streaming kernels are
// compared with (bench/qmatvec_kernels.py). The checksum keeps the compiler from dropping reads.
double read_bandwidth(int64_t size, int threads, int passes) {
  std::vector<uint64_t> buf(size);
  for (int64_t i = 0; i < size; ++i) buf[i] = static_cast<uint64_t>(i);  // touched before timing
  typedef uint64_t vu __attribute__((vector_size(64)));
  constexpr int64_t V = 8;  // words per vu
  std::vector<double> rates;
  std::atomic<uint64_t> sink{0};
  for (int p = 0; p < passes; ++p) {
    auto start = std::chrono::steady_clock::now();
    int64_t per = (size / threads + V * 4 - 1) / (V * 4) * (V * 4);
    mlxgen::pool().run(threads, threads, [&](int64_t t) {
      int64_t a = std::min(size, t * per), b = std::min(size, (t + 1) * per);
      vu s0 = {}, s1 = {}, s2 = {}, s3 = {};
      int64_t i = a;
      for (; i + 4 * V <= b; i += 4 * V) {
        vu v0, v1, v2, v3;
        std::memcpy(&v0, &buf[i], 64), std::memcpy(&v1, &buf[i + V], 64);
        std::memcpy(&v2, &buf[i + 2 * V], 64), std::memcpy(&v3, &buf[i + 3 * V], 64);
        s0 += v0, s1 += v1, s2 += v2, s3 += v3;
      }
      uint64_t t0 = 0;
      for (; i < b; ++i) t0 += buf[i];
      vu s = s0 + s1 + s2 + s3;
      for (int l = 0; l < V; ++l) t0 += s[l];
      sink.fetch_add(t0);
    });
    rates.push_back(size * 8.0 / std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(rates.begin(), rates.end());
  return sink.load() == 1 ? 0.0 : rates[rates.size() / 2];
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

// One query row per head against a cache of n keys (decode), GQA: the rep = H / KV query heads
// of a KV head share one pass over its keys and one over its values. The keys are split into
// ranges, one per thread; each range keeps its own running max, denominator and weighted sum of
// values, merged at the end (the split that lets two cores share one long cache).
// The cache's keys and values are float32 or float16 (half the bytes to read per step).
using mlxgen::AttnShape;
// W halves widened in one instruction (GCC's generic vector conversion goes element by element).
inline vf load(const _Float16* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__)  // (W == 8)
  return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vf v;
  for (int i = 0; i < W; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

template <typename KT>
inline float vdot(const float* a, const KT* b, int64_t d) {
  vf acc = splat(0.0f);
  int64_t i = 0;
  for (; i + W <= d; i += W) acc += load(a + i) * load(b + i);
  float t = 0.0f;
  for (int l = 0; l < W; ++l) t += acc[l];
  for (; i < d; ++i) t += a[i] * static_cast<float>(b[i]);
  return t;
}

template <typename KT>
inline void vaxpy(float* y, float a, const KT* x, int64_t d) {
  int64_t i = 0;
  vf va = splat(a);
  for (; i + W <= d; i += W) store(y + i, load(y + i) + va * load(x + i));
  for (; i < d; ++i) y[i] += a * static_cast<float>(x[i]);
}

// Keys j0 <= j < j1 for every (batch, head): stat[bh] = (max, denominator), acc[bh] = the
// unnormalised weighted sum of values, both relative to that max.
template <typename KT>
void attend_range(const AttnShape& s, const float* q, const KT* k, const KT* v, int64_t j0, int64_t j1,
                  float* stat, float* acc) {
  int64_t rep = s.H / s.KV, len = j1 - j0;
  std::vector<float> scores(rep * std::max<int64_t>(len, 1));
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t g = 0; g < s.KV; ++g) {
      const KT* kg = k + b * s.kb + g * s.kh;
      const KT* vg = v + b * s.vb + g * s.vh;
      const float* qg = q + (b * s.H + g * rep) * s.D;
      for (int64_t j = 0; j < len; ++j) {
        const KT* kj = kg + (j0 + j) * s.kn;
        for (int64_t r = 0; r < rep; ++r) scores[r * len + j] = vdot(qg + r * s.D, kj, s.D) * s.scale;
      }
      for (int64_t r = 0; r < rep; ++r) {
        int64_t bh = b * s.H + g * rep + r;
        float* sr = scores.data() + r * len;
        float m = -INFINITY;
        for (int64_t j = 0; j < len; ++j) m = std::max(m, sr[j]);
        softmax_numerators(sr, sr, 1, len, 1, -1);  // exp(score - max), in place
        float l = 0.0f;
        for (int64_t j = 0; j < len; ++j) l += sr[j];
        stat[2 * bh] = m, stat[2 * bh + 1] = l;
        std::fill(acc + bh * s.Dv, acc + (bh + 1) * s.Dv, 0.0f);
      }
      for (int64_t j = 0; j < len; ++j) {
        const KT* vj = vg + (j0 + j) * s.vn;
        for (int64_t r = 0; r < rep; ++r) vaxpy(acc + (b * s.H + g * rep + r) * s.Dv, scores[r * len + j], vj, s.Dv);
      }
    }
}

template <typename KT>
void decode_attention(const AttnShape& s, const float* q, const KT* k, const KT* v, float* out, int threads) {
  int64_t BH = s.B * s.H;
  // A thread per range only where the cache is large enough to amortise handing it over.
  int64_t t = std::clamp<int64_t>(s.n * s.KV * s.B * (s.D + s.Dv) / (1 << 16), 1, threads);
  t = std::min(t, s.n);
  std::vector<float> stat(t * BH * 2), acc(t * BH * s.Dv);
  int64_t per = (s.n + t - 1) / t;
  mlxgen::pool().run(t, static_cast<int>(t), [&](int64_t i) {
    attend_range(s, q, k, v, std::min(s.n, i * per), std::min(s.n, (i + 1) * per), stat.data() + i * BH * 2,
                 acc.data() + i * BH * s.Dv);
  });
  for (int64_t bh = 0; bh < BH; ++bh) {
    float m = -INFINITY, l = 0.0f;
    for (int64_t i = 0; i < t; ++i) m = std::max(m, stat[(i * BH + bh) * 2]);
    float* o = out + bh * s.Dv;
    std::fill(o, o + s.Dv, 0.0f);
    for (int64_t i = 0; i < t; ++i) {
      if (stat[(i * BH + bh) * 2 + 1] == 0.0f) continue;  // an empty range
      float w = std::exp(stat[(i * BH + bh) * 2] - m);
      l += w * stat[(i * BH + bh) * 2 + 1];
      vaxpy(o, w, acc.data() + (i * BH + bh) * s.Dv, s.Dv);
    }
    for (int64_t d = 0; d < s.Dv; ++d) o[d] /= l;
  }
}

// One MLX primitive for every kernel here (cpu_kernel.h): float32 inputs (row-contiguous at eval
// time unless the kernel takes strides), one float32 output.
#include "cpu_kernel.h"

mx::array checked(const mx::array& x, const char* what) {
  if (x.dtype() != mx::float32)
    throw std::invalid_argument(std::string(what) + ": mlxgen CPU kernels take float32 arrays.");
  return x;
}

mx::array make(const char* name, const mx::Shape& shape, std::vector<mx::array> inputs, Kernel fn,
               uint32_t strided = 0) {
  return mx::array(shape, mx::float32, std::make_shared<CpuKernel>(cpu_stream(), name, std::move(fn), strided),
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
  auto xs = checked(x, "rope");
  auto f = checked(inv_freq, "rope");
  int64_t B = xs.shape(0), H = xs.shape(1), L = xs.shape(2), D = xs.shape(3);
  return make("MlxgenRope", xs.shape(), {xs, f}, [=](auto& in, float* out) -> Task {
    auto& st = in[0].strides();
    return [=, a = in[0].template data<float>(), fr = in[1].template data<float>(),
            sb = st[0], sh = st[1], sl = st[2], sd = st[3]] {
      rope(a, out, B, H, L, D, sb, sh, sl, sd, dims, traditional, fr, scale, offset);
    };
  }, 1u);
}

mx::array decode_attention_op(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                              int threads) {
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4 || q.shape(2) != 1 || q.shape(0) != k.shape(0) ||
      v.shape(0) != k.shape(0) || k.shape(1) != v.shape(1) || k.shape(2) != v.shape(2) ||
      q.shape(3) != k.shape(3) || k.shape(1) < 1 || q.shape(1) % k.shape(1) || k.shape(2) < 1)
    throw std::invalid_argument("decode_attention needs q (B, H, 1, D), k (B, KV, n, D), v (B, KV, n, Dv), "
                                "n >= 1 and H a multiple of KV.");
  if (k.dtype() != v.dtype() || (k.dtype() != mx::float32 && k.dtype() != mx::float16))
    throw std::invalid_argument("decode_attention: k and v must both be float32 or both float16.");
  // The cache's views are read in place (strides at eval time); their rows must be contiguous.
  auto qc = checked(q, "decode_attention");
  bool half = k.dtype() == mx::float16;
  AttnShape s{q.shape(0), q.shape(1), k.shape(1), k.shape(2), q.shape(3), v.shape(3), 0, 0, 0, 0, 0, 0, scale};
  auto shape = q.shape();
  shape.back() = v.shape(3);
  return make("MlxgenDecodeAttention", shape, {qc, k, v}, [=](auto& in, float* out) -> Task {
    auto &ks = in[1].strides(), &vs = in[2].strides();
    AttnShape t = s;
    t.kb = ks[0], t.kh = ks[1], t.kn = ks[2], t.vb = vs[0], t.vh = vs[1], t.vn = vs[2];
    return [=, a = in[0].template data<float>(), b = in[1].template data<void>(), c = in[2].template data<void>(),
            kd = ks[3], vd = vs[3]] {
      if (kd == 1 && vd == 1) {
        if (half) return ::decode_attention(t, a, static_cast<const _Float16*>(b), static_cast<const _Float16*>(c), out, threads);
        return ::decode_attention(t, a, static_cast<const float*>(b), static_cast<const float*>(c), out, threads);
      }
      // Rows with a feature stride (never a cache's): gathered into contiguous float32 copies first.
      auto at = [half](const void* p, int64_t i) {
        return half ? static_cast<float>(static_cast<const _Float16*>(p)[i]) : static_cast<const float*>(p)[i];
      };
      AttnShape u = t;
      std::vector<float> kk(s.B * s.KV * s.n * s.D), vv(s.B * s.KV * s.n * s.Dv);
      for (int64_t r = 0; r < s.B * s.KV * s.n; ++r) {
        int64_t bb = r / (s.KV * s.n), g = r / s.n % s.KV, j = r % s.n;
        for (int64_t d = 0; d < s.D; ++d) kk[r * s.D + d] = at(b, bb * t.kb + g * t.kh + j * t.kn + d * kd);
        for (int64_t d = 0; d < s.Dv; ++d) vv[r * s.Dv + d] = at(c, bb * t.vb + g * t.vh + j * t.vn + d * vd);
      }
      u.kn = s.D, u.kh = s.n * s.D, u.kb = s.KV * s.n * s.D, u.vn = s.Dv, u.vh = s.n * s.Dv, u.vb = s.KV * s.n * s.Dv;
      ::decode_attention(u, a, kk.data(), vv.data(), out, threads);
    };
  }, 0b110u);
}

}  // namespace

namespace mlxgen {
void rms_norm(const float* x, const float* w, float* y, int64_t rows, int64_t d, float eps) {
  ::rms_norm(x, w, y, rows, d, eps);
}
void silu_mul(const float* g, const float* u, float* out, int64_t size) { ::silu_mul(g, u, out, size); }
void rope_rows(float* x, int64_t rows, int64_t D, const float* inv_freq, float scale, int64_t offset,
               bool traditional) {
  ::rope(x, x, 1, rows, 1, D, 0, D, D, 1, static_cast<int>(D), traditional, inv_freq, scale, offset);
}
template <typename KT>
void decode_attention(const AttnShape& s, const float* q, const KT* k, const KT* v, float* out, int threads) {
  ::decode_attention(s, q, k, v, out, threads);
}
template void decode_attention<float>(const AttnShape&, const float*, const float*, const float*, float*, int);
template void decode_attention<_Float16>(const AttnShape&, const float*, const _Float16*, const _Float16*, float*,
                                         int);
}  // namespace mlxgen

void add_quant_ops(nb::module_& m);  // quant.cpp: kernels on quantized weights
void add_decode_layer_op(nb::module_& m);  // decode_layer.cpp: a whole decoder layer for one token
void add_repack_op(nb::module_& m);  // repack.cpp: GGUF blocks into MLX's quantized layout

NB_MODULE(_mlxgen_cpu, m) {
  m.doc() = "mlxgen's CPU kernels (built for this machine by mlxgen/backends/cpu/ext.py).";
  m.def("softmax_numerators", &softmax_numerators_op, nb::arg("scores"), nb::arg("q_len"),
        nb::arg("first_visible"));
  m.def("silu_mul", &silu_mul_op, nb::arg("gate"), nb::arg("up"));
  m.def("matvec", &matvec_op, nb::arg("x"), nb::arg("weight"), nb::arg("threads"));
  m.def("rms_norm", &rms_norm_op, nb::arg("x"), nb::arg("weight"), nb::arg("eps"));
  m.def("rope", &rope_op, nb::arg("x"), nb::arg("dims"), nb::arg("traditional"), nb::arg("inv_freq"),
        nb::arg("scale"), nb::arg("offset"));
  m.def("read_bandwidth", &read_bandwidth, nb::arg("words"), nb::arg("threads"), nb::arg("passes"),
        nb::call_guard<nb::gil_scoped_release>(), "Median bytes/s of reading `words` 64-bit words on `threads` pool threads (a memory ceiling).");
  m.def("decode_attention", &decode_attention_op, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("scale"),
        nb::arg("threads"));
  add_quant_ops(m);
  add_decode_layer_op(m);
  add_repack_op(m);
}
