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

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

#include "pool.h"

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

inline uint16_t neg(uint16_t h) { return h ^ 0x8000; }

// numpy's float16 product -d * k (k a power of two): rounded once from float32.
inline uint16_t times(uint16_t h, float k) { return float_to_half(half_to_float(h) * k); }

// 32 codes < 32 (one byte each) -> 20 bytes of MLX's 5-bit little-endian stream.
inline void pack5(const uint8_t* q, uint8_t* out) {
  for (int w = 0; w < 4; ++w) {
    uint64_t v = 0;
    for (int k = 0; k < 8; ++k) v |= static_cast<uint64_t>(q[8 * w + k]) << (5 * k);
    std::memcpy(out + 5 * w, &v, 5);  // little-endian hosts only (x86-64, arm64)
  }
}

// One block: codes (elements * bits / 8 bytes), and fp16 scale/bias bits per group of 32.
void q4_0(const uint8_t* b, uint8_t* codes, uint16_t* s, uint16_t* z, int type) {
  const uint8_t* qs = b + (type == Q4_1 ? 4 : 2);
  for (int i = 0; i < 8; ++i) {  // element j in the low nibble of byte j, j + 16 in the high one
    codes[i] = (qs[2 * i] & 0x0f) | static_cast<uint8_t>(qs[2 * i + 1] << 4);
    codes[8 + i] = (qs[2 * i] >> 4) | (qs[2 * i + 1] & 0xf0);
  }
  s[0] = read16(b);
  z[0] = type == Q4_1 ? read16(b + 2) : times(neg(s[0]), 8.0f);
}

void q5_0(const uint8_t* b, uint8_t* codes, uint16_t* s, uint16_t* z, int type) {
  const bool one = type == Q5_1;
  uint32_t qh;
  std::memcpy(&qh, b + (one ? 4 : 2), 4);
  const uint8_t* qs = b + (one ? 8 : 6);
  uint8_t q[32];
  for (int j = 0; j < 16; ++j) {
    q[j] = (qs[j] & 0x0f) | (((qh >> j) & 1) << 4);
    q[j + 16] = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
  }
  pack5(q, codes);
  s[0] = read16(b);
  z[0] = one ? read16(b + 2) : times(neg(s[0]), 16.0f);
}

void q8_0(const uint8_t* b, uint8_t* codes, uint16_t* s, uint16_t* z, int) {
  for (int j = 0; j < 32; ++j) codes[j] = b[2 + j] ^ 0x80;  // int8 q -> q + 128
  s[0] = read16(b);
  z[0] = times(neg(s[0]), 128.0f);
}

// Q4_K/Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins; scale d*sc, bias -(dmin*m).
void k_scales(const uint8_t* b, uint16_t* s, uint16_t* z) {
  const float d = half_to_float(read16(b)), dmin = half_to_float(read16(b + 2));
  const uint8_t* p = b + 4;
  for (int j = 0; j < 8; ++j) {
    int sc = j < 4 ? p[j] & 63 : (p[j + 4] & 0x0f) | ((p[j - 4] >> 2) & 0x30);
    int m = j < 4 ? p[j + 4] & 63 : (p[j + 4] >> 4) | ((p[j] >> 2) & 0x30);
    s[j] = float_to_half(d * static_cast<float>(sc));
    z[j] = float_to_half(-(dmin * static_cast<float>(m)));
  }
}

void q4_k(const uint8_t* b, uint8_t* codes, uint16_t* s, uint16_t* z, int) {
  k_scales(b, s, z);
  const uint8_t* qs = b + 16;
  for (int c = 0; c < 4; ++c) {  // chunk c: sub-block 2c in the low nibbles, 2c + 1 in the high
    const uint8_t* q = qs + 32 * c;
    uint8_t* lo = codes + 32 * c;
    for (int i = 0; i < 16; ++i) {
      lo[i] = (q[2 * i] & 0x0f) | static_cast<uint8_t>(q[2 * i + 1] << 4);
      lo[16 + i] = (q[2 * i] >> 4) | (q[2 * i + 1] & 0xf0);
    }
  }
}

void q5_k(const uint8_t* b, uint8_t* codes, uint16_t* s, uint16_t* z, int) {
  k_scales(b, s, z);
  const uint8_t *qh = b + 16, *qs = b + 48;
  for (int j = 0; j < 8; ++j) {  // bit j of qh[l]: the fifth bit of element l of sub-block j
    const uint8_t* q = qs + 32 * (j / 2);
    const int shift = 4 * (j & 1);
    uint8_t v[32];
    for (int l = 0; l < 32; ++l) v[l] = ((q[l] >> shift) & 0x0f) | (((qh[l] >> j) & 1) << 4);
    pack5(v, codes + 20 * j);
  }
}

// Q6_K -> 8-bit codes on a lattice (gguf_quants._q6k has the reasoning): per group of 32 the
// larger-|scale| sub-block sets the step; rint(ratio * (q - 32) + offset), clipped to 0..255.
void q6_k(const uint8_t* b, uint8_t* codes, uint16_t* s, uint16_t* z, int) {
  const uint8_t *ql = b, *qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = half_to_float(read16(b + 208));
  uint8_t q[256];
  for (int h = 0; h < 2; ++h) {
    for (int k = 0; k < 128; ++k) {
      uint8_t low = k < 64 ? ql[64 * h + k] & 0x0f : ql[64 * h + k - 64] >> 4;
      uint8_t high = (qh[32 * h + k % 32] >> (2 * (k / 32))) & 3;
      q[128 * h + k] = low | static_cast<uint8_t>(high << 4);
    }
  }
  for (int g = 0; g < 8; ++g) {
    const int s0 = sc[2 * g], s1 = sc[2 * g + 1];
    const int big = std::abs(s1) > std::abs(s0) ? s1 : s0;
    const bool clash = s0 == -s1 && big != 0;
    const float per_step = clash ? 255.0f / 64.0f : 4.0f, offset = clash ? 127.5f : 128.0f;
    const float den = static_cast<float>(big == 0 ? 1 : big);
    const float ratio[2] = {per_step * static_cast<float>(s0) / den, per_step * static_cast<float>(s1) / den};
    for (int i = 0; i < 32; ++i) {
      float x = static_cast<float>(q[32 * g + i]) - 32.0f;
      x = x * ratio[i / 16];
      x = x + offset;
      x = std::rint(x);
      x = x < 0.0f ? 0.0f : (x > 255.0f ? 255.0f : x);
      codes[32 * g + i] = static_cast<uint8_t>(x);
    }
    s[g] = float_to_half(d * static_cast<float>(big) / per_step);
    z[g] = float_to_half(-offset * half_to_float(s[g]));
  }
}

using BlockFn = void (*)(const uint8_t*, uint8_t*, uint16_t*, uint16_t*, int);

BlockFn block_fn(int type) {
  switch (type) {
    case Q4_0: case Q4_1: return q4_0;
    case Q5_0: case Q5_1: return q5_0;
    case Q8_0: return q8_0;
    case Q4_K: return q4_k;
    case Q5_K: return q5_k;
    default: return q6_k;
  }
}

inline bool finite(uint16_t h) { return (h & 0x7c00) != 0x7c00; }

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
  const int64_t code_bytes = static_cast<int64_t>(l.elements) * l.bits / 8;
  if (codes.shape(0) != rows || codes.shape(1) * 4 != blocks * code_bytes || scales.shape(0) != rows ||
      scales.shape(1) != groups || biases.shape(0) != rows || biases.shape(1) != groups)
    throw std::invalid_argument("repack_blocks: output shapes do not match the blocks");
  const bool wide = is_float(scales, 32);
  if (!(wide ? is_float(biases, 32) : is_float(scales, 16) && is_float(biases, 16)))
    throw std::invalid_argument("repack_blocks: scales and biases must be both float16 or both float32");

  const BlockFn fn = block_fn(type);
  const uint8_t* in = raw.data();
  auto* out = reinterpret_cast<uint8_t*>(codes.data());
  void *sp = scales.data(), *bp = biases.data();
  std::atomic<bool> scales_ok{true}, biases_ok{true};
  const int per_block = l.elements / 32;
  {
    nb::gil_scoped_release release;
    // Rows of about 64 KB of blocks per task: large enough to amortize a task, small enough to
    // share an embedding's rows over the cores evenly.
    int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(row_bytes, 1));
    int n_threads = threads > 0 ? threads : static_cast<int>(std::thread::hardware_concurrency());
    mlxgen::parallel_for(rows, grain, n_threads, [&](int64_t r0, int64_t r1) {
      bool s_ok = true, z_ok = true;
      uint16_t s[8], z[8];
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* src = in + r * row_bytes;
        uint8_t* dst = out + r * blocks * code_bytes;
        for (int64_t k = 0; k < blocks; ++k) {
          fn(src + k * l.bytes, dst + k * code_bytes, s, z, type);
          const int64_t at = r * groups + k * per_block;
          for (int g = 0; g < per_block; ++g) {
            s_ok &= finite(s[g]);
            z_ok &= finite(z[g]);
          }
          if (wide) {
            for (int g = 0; g < per_block; ++g) {
              static_cast<float*>(sp)[at + g] = half_to_float(s[g]);
              static_cast<float*>(bp)[at + g] = half_to_float(z[g]);
            }
          } else {
            std::memcpy(static_cast<uint16_t*>(sp) + at, s, 2 * per_block);
            std::memcpy(static_cast<uint16_t*>(bp) + at, z, 2 * per_block);
          }
        }
      }
      if (!s_ok) scales_ok.store(false, std::memory_order_relaxed);
      if (!z_ok) biases_ok.store(false, std::memory_order_relaxed);
    });
  }
  return {scales_ok.load(), biases_ok.load()};
}

}  // namespace

// Called from fast_math.cpp's module definition.
void add_repack_op(nb::module_& m) {
  m.def("repack_blocks", &repack_blocks, nb::arg("raw"), nb::arg("qtype"), nb::arg("codes"), nb::arg("scales"),
        nb::arg("biases"), nb::arg("threads") = 0,
        "GGUF blocks (rows, row_bytes) uint8 -> MLX codes, fp16 scales and biases (float16 or float32 "
        "arrays), written in place; returns (scales finite, biases finite).");
}
