// GGUF blocks -> MLX's affine quantized layout (groups of 32: packed uint32 codes, a scale and a
// bias per group), for a GGUF's first load. Byte for byte what mlxgen/loading/gguf.py
// (_repack_native: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and gguf_quants.py (Q4_K, Q5_K exact; Q6_K to 8
// bits on a lattice) compute in numpy, one pass over the blocks instead of a dozen array passes.
// Built with -ffp-contract=off (CMakeLists.txt): Q6_K's float32 operations must round one at a
// time, in numpy's order. fp16 conversions are bit manipulations with numpy's results (round to
// nearest even, overflow to inf, NaN payloads kept), not the FPU's (whose NaN handling differs).

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "mlx/array.h"
#include "pool.h"

namespace mx = mlx::core;

namespace nb = nanobind;

namespace {

// GGML type ids (ggml.h) handled here, with their block sizes.
enum Type : int { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

struct Layout {
  int elements, bytes, bits;
};

bool layout_of(int type, Layout& l) {
  switch (type) {
    case Q4_0: l = {32, 18, 4}; return true;
    case Q4_1: l = {32, 20, 4}; return true;
    case Q5_0: l = {32, 22, 5}; return true;
    case Q5_1: l = {32, 24, 5}; return true;
    case Q8_0: l = {32, 34, 8}; return true;
    case Q4_K: l = {256, 144, 4}; return true;
    case Q5_K: l = {256, 176, 5}; return true;
    case Q6_K: l = {256, 210, 8}; return true;
    default: return false;
  }
}

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact in float32
    float v = static_cast<float>(m) * 0x1p-24f;
    return float_of(bits_of(v) | sign);
  }
  if (e == 31) return float_of(sign | 0x7f800000u | (m << 13));  // inf, NaN with its payload
  return float_of(sign | ((e + 112) << 23) | (m << 13));
}

inline uint16_t float_to_half(float f) {
  uint32_t u = bits_of(f), a = u & 0x7fffffffu;
  uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000);
  if (a > 0x7f800000u) {  // NaN: the payload's top bits, never turned into inf
    uint16_t r = static_cast<uint16_t>(0x7c00u + ((a & 0x7fffffu) >> 13));
    return sign | (r == 0x7c00u ? 0x7c01u : r);
  }
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds (to even) past 65504: inf
  if (a < 0x38800000u) {  // below the smallest normal half: a subnormal (or zero)
    uint32_t e = a >> 23;
    if (e < 102) return sign;  // under 2^-25: rounds to zero
    uint32_t mant = (a & 0x7fffffu) | 0x800000u, shift = 126 - e;
    uint32_t r = mant >> shift, rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) ++r;
    return sign | static_cast<uint16_t>(r);
  }
  uint32_t r = (a - (112u << 23)) >> 13, rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1))) ++r;  // a carry into the exponent is right
  return sign | static_cast<uint16_t>(r);
}

inline uint16_t read16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline bool nan_half(uint16_t h) { return (h & 0x7fff) > 0x7c00; }

// n fp16 <-> float32 conversions, eight at a time by F16C where present. A group of eight with
// a NaN takes the bit manipulations: the hardware quiets NaNs, numpy keeps their payloads.
void to_half(const float* x, uint16_t* out, int64_t n) {
  int64_t i = 0;
#ifdef __F16C__
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0) {
      for (int j = 0; j < 8; ++j) out[i + j] = float_to_half(x[i + j]);
      continue;
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
  for (; i < n; ++i) out[i] = float_to_half(x[i]);
}

void to_float(const uint16_t* h, float* out, int64_t n) {
  int64_t i = 0;
#ifdef __F16C__
  for (; i + 8 <= n; i += 8) {
    bool nan = false;
    for (int j = 0; j < 8; ++j) nan |= nan_half(h[i + j]);
    if (nan) {
      for (int j = 0; j < 8; ++j) out[i + j] = half_to_float(h[i + j]);
      continue;
    }
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  }
#endif
  for (; i < n; ++i) out[i] = half_to_float(h[i]);
}

inline uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);  // little-endian hosts only (x86-64, arm64), as MLX's packing assumes
  return v;
}

constexpr uint64_t kNibbles = 0x0f0f0f0f0f0f0f0full, kLowBits = 0x0101010101010101ull;

// A word of 8 codes < 32 (code k in byte k) -> its 40-bit little-endian 5-bit stream, written:
// three halving steps (pairs in 16-bit lanes, quads in 32-bit lanes, then all eight).
inline void put5(uint64_t x, uint8_t* out) {
  x = (x & 0x00ff00ff00ff00ffull) | ((x & 0xff00ff00ff00ff00ull) >> 3);
  x = (x & 0x0000ffff0000ffffull) | ((x & 0xffff0000ffff0000ull) >> 6);
  x = (x & 0x00000000ffffffffull) | ((x & 0xffffffff00000000ull) >> 12);
  std::memcpy(out, &x, 5);
}

// byte b -> a word whose byte k holds bit k of b at bit 4 (eight fifth bits at once)
struct FifthBits {
  uint64_t at[256];
  constexpr FifthBits() : at() {
    for (int b = 0; b < 256; ++b)
      for (int k = 0; k < 8; ++k) at[b] |= static_cast<uint64_t>((b >> k) & 1) << (8 * k + 4);
  }
};
constexpr FifthBits kFifth;

// Per-thread scratch for one row: fp16 scale and bias bits per group, and float32 work space.
struct Scratch {
  std::vector<uint16_t> s, z;
  std::vector<float> f, g;
  explicit Scratch(int64_t groups) : s(groups), z(groups), f(groups), g(groups) {}
};

// Q4_0/Q4_1/Q5_0/Q5_1/Q8_0: one group per block; scale d, bias m (Q4_1/Q5_1) or numpy's
// float16 product -d * 2^(bits-1), rounded once from float32.
template <int T>
void native_row(const uint8_t* src, int64_t blocks, uint8_t* codes, Scratch& w) {
  constexpr int bytes = T == Q4_0 ? 18 : T == Q4_1 ? 20 : T == Q5_0 ? 22 : T == Q5_1 ? 24 : 34;
  constexpr int code_bytes = T == Q8_0 ? 32 : T == Q4_0 || T == Q4_1 ? 16 : 20;
  constexpr bool has_min = T == Q4_1 || T == Q5_1;
  for (int64_t k = 0; k < blocks; ++k) {
    const uint8_t* b = src + k * bytes;
    uint8_t* out = codes + k * code_bytes;
    w.s[k] = read16(b);
    if (has_min) w.z[k] = read16(b + 2);
    if constexpr (T == Q8_0) {
      for (int j = 0; j < 32; ++j) out[j] = b[2 + j] ^ 0x80;  // int8 q -> q + 128
    } else if constexpr (T == Q4_0 || T == Q4_1) {
      const uint8_t* qs = b + (has_min ? 4 : 2);  // element j low nibble of byte j, j + 16 high
      for (int i = 0; i < 8; ++i) {
        out[i] = (qs[2 * i] & 0x0f) | static_cast<uint8_t>(qs[2 * i + 1] << 4);
        out[8 + i] = (qs[2 * i] >> 4) | (qs[2 * i + 1] & 0xf0);
      }
    } else {  // Q5: elements 8w..8w+7, low nibbles (w < 2) or high ones; the fifth bit of
      // element j is bit j of the little-endian qh
      const uint8_t *qh = b + (has_min ? 4 : 2), *qs = b + (has_min ? 8 : 6);
      for (int w = 0; w < 4; ++w) {
        uint64_t nib = (load64(qs + 8 * (w & 1)) >> (w < 2 ? 0 : 4)) & kNibbles;
        put5(nib | kFifth.at[qh[w]], out + 5 * w);
      }
    }
  }
  if (!has_min) {
    constexpr float k = T == Q8_0 ? 128.0f : T == Q5_0 ? 16.0f : 8.0f;
    // -d negated in its bits: the compiler may fold -x * k into x * -k, which differs on a NaN
    for (int64_t i = 0; i < blocks; ++i) w.z[i] = w.s[i] ^ 0x8000;
    to_float(w.z.data(), w.f.data(), blocks);
    for (int64_t i = 0; i < blocks; ++i) w.f[i] = w.f[i] * k;
    to_half(w.f.data(), w.z.data(), blocks);
  }
}

// Q4_K/Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins; scale d*sc, bias -(dmin*m).
template <int T>
void k_row(const uint8_t* src, int64_t blocks, uint8_t* codes, Scratch& w) {
  constexpr int bytes = T == Q4_K ? 144 : 176, code_bytes = T == Q4_K ? 128 : 160;
  for (int64_t k = 0; k < blocks; ++k) {
    const uint8_t* b = src + k * bytes;
    uint8_t* out = codes + k * code_bytes;
    const float d = half_to_float(read16(b)), dmin = half_to_float(read16(b + 2));
    const uint8_t* p = b + 4;
    for (int j = 0; j < 8; ++j) {
      int sc = j < 4 ? p[j] & 63 : (p[j + 4] & 0x0f) | ((p[j - 4] >> 2) & 0x30);
      int m = j < 4 ? p[j + 4] & 63 : (p[j + 4] >> 4) | ((p[j] >> 2) & 0x30);
      w.f[8 * k + j] = d * static_cast<float>(sc);
      w.g[8 * k + j] = float_of(bits_of(dmin * static_cast<float>(m)) ^ 0x80000000u);  // numpy's -(a*b), NaN too
    }
    if constexpr (T == Q4_K) {
      const uint8_t* qs = b + 16;
      for (int c = 0; c < 4; ++c) {  // chunk c: sub-block 2c in the low nibbles, 2c + 1 high
        const uint8_t* q = qs + 32 * c;
        uint8_t* lo = out + 32 * c;
        for (int i = 0; i < 16; ++i) {
          lo[i] = (q[2 * i] & 0x0f) | static_cast<uint8_t>(q[2 * i + 1] << 4);
          lo[16 + i] = (q[2 * i] >> 4) | (q[2 * i + 1] & 0xf0);
        }
      }
    } else {
      const uint8_t *qh = b + 16, *qs = b + 48;
      for (int j = 0; j < 8; ++j) {  // bit j of qh[l]: the fifth bit of element l of sub-block j
        const uint8_t* q = qs + 32 * (j / 2);
        const int shift = 4 * (j & 1);
        for (int w = 0; w < 4; ++w) {
          uint64_t nib = (load64(q + 8 * w) >> shift) & kNibbles;
          uint64_t fifth = ((load64(qh + 8 * w) >> j) & kLowBits) << 4;
          put5(nib | fifth, out + 20 * j + 5 * w);
        }
      }
    }
  }
  to_half(w.f.data(), w.s.data(), 8 * blocks);
  to_half(w.g.data(), w.z.data(), 8 * blocks);
}

// Q6_K -> 8-bit codes on a lattice (gguf_quants._q6k has the reasoning): per group of 32 the
// larger-|scale| sub-block sets the step; rint(ratio * (q - 32) + offset), clipped to 0..255.
void q6k_row(const uint8_t* src, int64_t blocks, uint8_t* codes, Scratch& w) {
  for (int64_t k = 0; k < blocks; ++k) {
    const uint8_t* b = src + k * 210;
    uint8_t* out = codes + k * 256;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = half_to_float(read16(b + 208));
    uint8_t q[256];  // the 6-bit codes: low nibbles from ql, two high bits from qh
    for (int h = 0; h < 2; ++h) {
      const uint8_t *l = b + 64 * h, *hh = b + 128 + 32 * h;
      uint8_t* o = q + 128 * h;
      for (int i = 0; i < 32; ++i) {
        o[i] = (l[i] & 0x0f) | ((hh[i] & 3) << 4);
        o[32 + i] = (l[32 + i] & 0x0f) | (((hh[i] >> 2) & 3) << 4);
        o[64 + i] = (l[i] >> 4) | (((hh[i] >> 4) & 3) << 4);
        o[96 + i] = (l[32 + i] >> 4) | (((hh[i] >> 6) & 3) << 4);
      }
    }
    for (int g = 0; g < 8; ++g) {
      const int s0 = sc[2 * g], s1 = sc[2 * g + 1];
      const int big = std::abs(s1) > std::abs(s0) ? s1 : s0;
      const bool clash = s0 == -s1 && big != 0;
      const float per_step = clash ? 255.0f / 64.0f : 4.0f, offset = clash ? 127.5f : 128.0f;
      const float den = static_cast<float>(big == 0 ? 1 : big);
      for (int half = 0; half < 2; ++half) {
        const float ratio = per_step * static_cast<float>(half ? s1 : s0) / den;
        const uint8_t* in = q + 32 * g + 16 * half;
        uint8_t* o = out + 32 * g + 16 * half;
        for (int i = 0; i < 16; ++i) {
          float x = static_cast<float>(in[i]) - 32.0f;
          x = x * ratio;
          x = x + offset;
          const int v = static_cast<int>(std::rint(x));  // integral: numpy's clip, on integers
          o[i] = static_cast<uint8_t>(std::min(std::max(v, 0), 255));
        }
      }
      w.f[8 * k + g] = d * static_cast<float>(big) / per_step;
      w.g[8 * k + g] = -offset;
    }
  }
  const int64_t n = 8 * blocks;
  to_half(w.f.data(), w.s.data(), n);
  to_float(w.s.data(), w.f.data(), n);  // the bias is -offset times the fp16 scale
  for (int64_t i = 0; i < n; ++i) w.f[i] = w.g[i] * w.f[i];
  to_half(w.f.data(), w.z.data(), n);
}

using RowFn = void (*)(const uint8_t*, int64_t, uint8_t*, Scratch&);

RowFn row_fn(int type) {
  switch (type) {
    case Q4_0: return native_row<Q4_0>;
    case Q4_1: return native_row<Q4_1>;
    case Q5_0: return native_row<Q5_0>;
    case Q5_1: return native_row<Q5_1>;
    case Q8_0: return native_row<Q8_0>;
    case Q4_K: return k_row<Q4_K>;
    case Q5_K: return k_row<Q5_K>;
    default: return q6k_row;
  }
}

inline bool all_finite(const uint16_t* h, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= (h[i] & 0x7c00) != 0x7c00;
  return ok;
}

using Bytes = nb::ndarray<const uint8_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using Words = nb::ndarray<uint32_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using Floats = nb::ndarray<nb::ndim<2>, nb::c_contig, nb::device::cpu>;

bool is_float(const Floats& a, int bits) {
  return a.dtype() == nb::dlpack::dtype{static_cast<uint8_t>(nb::dlpack::dtype_code::Float),
                                        static_cast<uint8_t>(bits), 1};
}

// Returns (every scale finite, every bias finite): the callers' fp16-overflow fallbacks.
std::pair<bool, bool> repack_blocks(Bytes raw, int type, Words codes, Floats scales, Floats biases,
                                    int threads) {
  Layout l;
  if (!layout_of(type, l)) throw std::invalid_argument("repack_blocks: unsupported GGML type " + std::to_string(type));
  const int64_t rows = raw.shape(0), row_bytes = raw.shape(1);
  if (row_bytes % l.bytes) throw std::invalid_argument("repack_blocks: a row is not a whole number of blocks");
  const int64_t blocks = row_bytes / l.bytes, groups = blocks * l.elements / 32;
  const int64_t code_bytes = blocks * l.elements * l.bits / 8;  // per row
  if (codes.shape(0) != rows || codes.shape(1) * 4 != code_bytes || scales.shape(0) != rows ||
      scales.shape(1) != groups || biases.shape(0) != rows || biases.shape(1) != groups)
    throw std::invalid_argument("repack_blocks: output shapes do not match the blocks");
  const bool wide = is_float(scales, 32);
  if (!(wide ? is_float(biases, 32) : is_float(scales, 16) && is_float(biases, 16)))
    throw std::invalid_argument("repack_blocks: scales and biases must be both float16 or both float32");

  const RowFn fn = row_fn(type);
  const uint8_t* in = raw.data();
  auto* out = reinterpret_cast<uint8_t*>(codes.data());
  void *sp = scales.data(), *bp = biases.data();
  std::atomic<bool> scales_ok{true}, biases_ok{true};
  {
    nb::gil_scoped_release release;
    // Rows of about 64 KB of blocks per task: large enough to amortize a task, small enough to
    // share an embedding's rows over the cores evenly.
    int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(row_bytes, 1));
    int n_threads = threads > 0 ? threads : static_cast<int>(std::thread::hardware_concurrency());
    mlxgen::parallel_for(rows, grain, n_threads, [&](int64_t r0, int64_t r1) {
      Scratch w(groups);
      bool s_ok = true, z_ok = true;
      for (int64_t r = r0; r < r1; ++r) {
        fn(in + r * row_bytes, blocks, out + r * code_bytes, w);
        s_ok &= all_finite(w.s.data(), groups);
        z_ok &= all_finite(w.z.data(), groups);
        if (wide) {
          to_float(w.s.data(), static_cast<float*>(sp) + r * groups, groups);
          to_float(w.z.data(), static_cast<float*>(bp) + r * groups, groups);
        } else {
          std::memcpy(static_cast<uint16_t*>(sp) + r * groups, w.s.data(), 2 * groups);
          std::memcpy(static_cast<uint16_t*>(bp) + r * groups, w.z.data(), 2 * groups);
        }
      }
      if (!s_ok) scales_ok.store(false, std::memory_order_relaxed);
      if (!z_ok) biases_ok.store(false, std::memory_order_relaxed);
    });
  }
  return {scales_ok.load(), biases_ok.load()};
}

// An MLX array with uninitialized memory, for repack_blocks to fill: no zero-fill pass, and its
// pages are first touched by the repack's threads.
mx::array empty(const std::vector<int>& shape, mx::Dtype dtype) {
  size_t bytes = dtype.size();
  for (int n : shape) {
    if (n < 0) throw std::invalid_argument("empty: negative dimension");
    bytes *= static_cast<size_t>(n);
  }
  return mx::array(mx::allocator::malloc(bytes), mx::Shape(shape.begin(), shape.end()), dtype);
}

}  // namespace

// Called from fast_math.cpp's module definition.
void add_repack_op(nb::module_& m) {
  m.def("repack_blocks", &repack_blocks, nb::arg("raw"), nb::arg("qtype"), nb::arg("codes"), nb::arg("scales"),
        nb::arg("biases"), nb::arg("threads") = 0,
        "GGUF blocks (rows, row_bytes) uint8 -> MLX codes, fp16 scales and biases (float16 or float32 "
        "arrays), written in place; returns (scales finite, biases finite).");
  m.def("empty", &empty, nb::arg("shape"), nb::arg("dtype"),
        "An evaluated MLX array whose memory is not initialized (every byte to be written by the caller).");
}
