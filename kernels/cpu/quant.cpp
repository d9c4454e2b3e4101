// CPU kernels on affine-quantized weights in MLX's layout (mx.quantize, mode "affine"):
// w (n, k * bits / 32) uint32 holding each row's codes as one little-endian bit stream (value i at
// bits [i * bits, (i + 1) * bits) of the row, also for 3, 5 and 6 bits), and per group of
// `group_size` values a scale and a bias (n, k / group_size), float32, float16 or bfloat16:
// w[j, i] = code * scale + bias. Decode is memory-bound, so qmatvec streams the packed codes
// (bits per weight, plus 64 / group_size for float32 scale and bias, 32 / group_size for
// float16) instead of a float32 copy (32 bits).
// Built with -ffp-contract=off (CMakeLists.txt): dequantize rounds code * scale before adding
// the bias, exactly as mx.dequantize does.

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
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
constexpr int L = 16;  // values per vector: one AVX-512 register
#else
constexpr int L = 8;  // one AVX register, two SSE / NEON ones
#endif
typedef float qvf __attribute__((vector_size(L * 4)));
typedef int32_t qvi __attribute__((vector_size(L * 4)));
typedef uint32_t qvu __attribute__((vector_size(L * 4)));
typedef uint8_t qvb __attribute__((vector_size(L * 4)));  // the bytes of a qvu

enum class ScaleType { f32, f16, bf16 };

inline float scale_at(const void* p, ScaleType t, int64_t i) {
  switch (t) {
    case ScaleType::f32: return static_cast<const float*>(p)[i];
    case ScaleType::f16:
#if defined(__F16C__)
      return _cvtsh_ss(static_cast<const uint16_t*>(p)[i]);  // GCC may call libgcc for _Float16
#else
      return static_cast<float>(static_cast<const _Float16*>(p)[i]);
#endif
    default: {
      uint32_t u = static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16;
      float f;
      std::memcpy(&f, &u, 4);
      return f;
    }
  }
}

inline qvf qsplat(float v) { return v - qvf{}; }  // v - 0 == v always: folds to a broadcast

// a * b + c in one rounding where the CPU has FMA (this file is built with contraction off).
inline qvf fmadd(qvf a, qvf b, qvf c) {
#if defined(__AVX512F__)
  return _mm512_fmadd_ps(a, b, c);
#elif defined(__FMA__)
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}
inline qvf qload(const float* p) { qvf v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void qstore(float* p, qvf v) { std::memcpy(p, &v, sizeof(v)); }

// Lane i of an unpacked vector holds value i of L consecutive values, which start at bit B * i
// of the L * B / 8 bytes used: byte (B * i) / 8 and the next hold it whole (B <= 8). Byte k of
// the window vector is that byte pair zero-extended to 32 bits (index L * 4 picks a zero).
constexpr int window_index(int bits, int k) {
  int lane = k / 4, t = k % 4, byte = bits * lane / 8 + t, used = L * bits / 8;
  return t >= 2 || byte >= used ? L * 4 : byte;
}

template <int B, int... K>
inline qvu windows(qvb s, std::integer_sequence<int, K...>) {
  // One byte permute (vpermt2b with AVX-512 VBMI) from a full-width load: a narrower load
  // widened here goes through the stack.
  qvb b = __builtin_shufflevector(s, qvb{}, window_index(B, K)...);
  qvu u;
  std::memcpy(&u, &b, sizeof(u));
  return u;
}

template <int B>
constexpr qvu lane_shifts() {
  qvu v = {};
  for (int i = 0; i < L; ++i) v[i] = (B * i) % 8;
  return v;
}

#if defined(__AVX512VBMI__)
// The 16 bytes at p hold all L * B / 8 <= 12 bytes used (B <= 6): one 16-byte load and one
// zero-masking vpermb. A full-width load from p crossed a cache line at almost every block.
constexpr int64_t kRead = 16;

template <int B>
struct WindowIndex {  // byte k of the window vector, as window_index(); zeroed bytes read byte 0
  alignas(64) uint8_t v[64] = {};
  constexpr WindowIndex() {
    for (int k = 0; k < 64; ++k) v[k] = k % 4 < 2 ? B * (k / 4) / 8 + k % 4 : 0;
  }
};
template <int B>
inline constexpr WindowIndex<B> kWindowIndex{};

template <int B>
inline qvf unpack(const uint8_t* p) {
  __m512i s = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  __m512i w = _mm512_maskz_permutexvar_epi8(0x3333333333333333ull, _mm512_load_si512(kWindowIndex<B>.v), s);
  qvi q = (qvi)(((qvu)w >> lane_shifts<B>()) & ((1u << B) - 1));
  return __builtin_convertvector(q, qvf);
}
#else
constexpr int64_t kRead = L * 4;  // bytes unpack reads

// The L codes packed in the L * B / 8 bytes at p, as floats. Reads kRead bytes from p.
template <int B>
inline qvf unpack(const uint8_t* p) {
  qvb s;
  std::memcpy(&s, p, kRead);
  qvu u = windows<B>(s, std::make_integer_sequence<int, L * 4>{});
  qvi q = (qvi)((u >> lane_shifts<B>()) & ((1u << B) - 1));
  return __builtin_convertvector(q, qvf);
}
#endif

typedef uint8_t qvb8 __attribute__((vector_size(L)));

// Values per block for qmatvec's unpacking. 8-bit: L codes, one byte each, in order. 4-bit: the L
// low then the L high nibbles of L bytes, i.e. values 0, 2, .., 2L - 2 then 1, 3, .., 2L - 1 of
// the block (x is permuted to match): a zero-extending load and a mask or shift, no byte permute.
// Other widths: unpack()'s L values in order.
template <int B>
constexpr int kBlock = B == 4 ? 2 * L : L;

// The L bytes at p zero-extended to 32-bit lanes (GCC scalarizes the generic conversion).
inline qvi zext_bytes(const uint8_t* p) {
#if defined(__AVX512F__)
  return (qvi)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(__AVX2__)
  return (qvi)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#else
  qvb8 b;
  std::memcpy(&b, p, L);
  return __builtin_convertvector(b, qvi);
#endif
}

template <int B>
inline void unpack_block(const uint8_t* p, qvf* c) {
  if constexpr (B == 8 || B == 4) {
    qvi u = zext_bytes(p);
    if constexpr (B == 8) {
      c[0] = __builtin_convertvector(u, qvf);
    } else {
      c[0] = __builtin_convertvector(u & 15, qvf);
      c[1] = __builtin_convertvector(u >> 4, qvf);
    }
  } else {
    c[0] = unpack<B>(p);
  }
}

// x in the value order unpack_block gives (a copy for 4 bits, x itself otherwise).
template <int B>
const float* block_order(const float* x, int64_t size, std::vector<float>& buf) {
  if constexpr (B != 4) {
    return x;
  } else {
    buf.resize(size);
    for (int64_t b = 0; b < size; b += 2 * L)
      for (int i = 0; i < L; ++i) buf[b + i] = x[b + 2 * i], buf[b + L + i] = x[b + 2 * i + 1];
    return buf.data();
  }
}

// Weights and their dimensions, as one kernel call sees them.
struct QWeight {
  const uint8_t* w;
  const void* scales;
  const void* biases;
  ScaleType st;
  int64_t n, k, gs;
  const uint8_t* end;  // one past the packed codes: unpack reads kRead bytes, never past here
  const void* out_bias = nullptr;  // qmatvec's optional (n,) bias of the layer, added per output
  ScaleType out_bias_type = ScaleType::f32;
};

// A group's packed bytes, copied into `pad` when a kRead-byte read from its last vector would
// pass the end of the array (only the matrix's last few groups).
inline const uint8_t* group_bytes(const QWeight& q, const uint8_t* p, int64_t nbytes, uint8_t* pad) {
  if (p + nbytes + kRead <= q.end) return p;
  std::memcpy(pad, p, nbytes);
  return pad;
}

// G rounded up to whole vectors: per-row scale, bias and x-sum buffers are padded with zeros to
// this length, so the bias term is whole-vector work with no scalar tail.
inline int64_t padded(int64_t G) { return (G + L - 1) / L * L; }

// Row j's G scales (or biases) as float32 in buf (padded(G) floats, zeros past G).
inline const float* row_floats(const void* p, ScaleType st, int64_t j, int64_t G, float* buf) {
  // Converted 16 (AVX-512) or 8 (F16C) at a time: one at a time doubled qmatvec's time.
  int64_t g = 0;
  if (st == ScaleType::f32) {
    std::memcpy(buf, static_cast<const float*>(p) + j * G, G * 4);
    g = G;
  }
  const uint16_t* h = static_cast<const uint16_t*>(p) + j * G;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  for (; g < G; g += 16) {  // the last block's load is masked: never past the array's end
    __mmask16 in = G - g >= 16 ? 0xffff : static_cast<__mmask16>((1u << (G - g)) - 1);
    __m256i v = _mm256_maskz_loadu_epi16(in, h + g);
    __m512 f = st == ScaleType::f16 ? _mm512_cvtph_ps(v)
                                    : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
    _mm512_storeu_ps(buf + g, f);
  }
#elif defined(__F16C__) && defined(__AVX2__)
  for (; g + 8 <= G; g += 8) {
    __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(h + g));
    __m256 f = st == ScaleType::f16 ? _mm256_cvtph_ps(v)
                                    : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
    _mm256_storeu_ps(buf + g, f);
  }
#endif
  for (; g < G; ++g) buf[g] = scale_at(h, st, g);
  for (g = G; g < padded(G); ++g) buf[g] = 0.0f;
  return buf;
}

// The sum of v's lanes, halving the vector each step (fewer dependent adds than lane by lane).
inline float hsum(qvf v) {
  typedef float qvf8 __attribute__((vector_size(32)));
  typedef float qvf4 __attribute__((vector_size(16)));
#ifdef __AVX512F__
  qvf8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  qvf8 h = v;
#endif
  qvf4 f = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (f[0] + f[2]) + (f[1] + f[3]);
}

// y[r, j] = sum_g scale[j, g] * (x[r, g] . codes[j, g]) + bias[j, g] * xsum[r, g] for M rows of x
// (row stride k, in block_order; xsum row stride padded(G)) and output rows j0 <= j < j1 (row
// stride n): the codes are unpacked once per row of w and used by all M rows of x.
template <int B, int GS, int M>
void qmatvec_rows(const QWeight& q, const float* x, const float* xsum, float* y, int64_t j0, int64_t j1) {
  constexpr int NB = kBlock<B>, NV = NB / L;
  const int64_t k = q.k, G = k / GS, Gp = padded(G), row_bytes = k * B / 8, gbytes = GS * B / 8;
  alignas(64) uint8_t pad[GS + kRead] = {};
  std::vector<float> sbuf(Gp), bbuf(Gp);
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* wj = q.w + j * row_bytes;
    const float* sc = row_floats(q.scales, q.st, j, G, sbuf.data());
    qvf acc[M] = {};
    for (int64_t g = 0; g < G; ++g) {
      // Only the generic unpack reads past a block; 4 and 8 bits read exactly their bytes.
      const uint8_t* p = (B == 4 || B == 8) ? wj + g * gbytes : group_bytes(q, wj + g * gbytes, gbytes, pad);
      __builtin_prefetch(wj + g * gbytes + 1024);  // ahead of the hardware prefetcher (bench/NOTES.md)
      qvf part[M] = {};
      for (int v = 0; v < GS; v += NB) {
        qvf c[NV];
        unpack_block<B>(p + v * B / 8, c);
        for (int t = 0; t < NV; ++t)
          for (int r = 0; r < M; ++r) part[r] = fmadd(qload(x + r * k + g * GS + v + t * L), c[t], part[r]);
      }
      qvf s = qsplat(sc[g]);
      for (int r = 0; r < M; ++r) acc[r] = fmadd(part[r], s, acc[r]);
    }
    const float* bi = row_floats(q.biases, q.st, j, G, bbuf.data());
    for (int64_t g = 0; g < Gp; g += L)  // the bias term, lane-wise into the same accumulators
      for (int r = 0; r < M; ++r) acc[r] = fmadd(qload(bi + g), qload(xsum + r * Gp + g), acc[r]);
    if (q.out_bias) {  // one float32 add, as MLX's `y + bias` rounds it (any bias dtype widens exactly)
      float add = scale_at(q.out_bias, q.out_bias_type, j);
      for (int r = 0; r < M; ++r) y[r * q.n + j] = hsum(acc[r]) + add;
    } else {
      for (int r = 0; r < M; ++r) y[r * q.n + j] = hsum(acc[r]);
    }
  }
}

// All m rows of x in chunks of 8, 4, 2, 1 rows (one pass over w's rows j0..j1 per chunk).
template <int B, int GS>
void qmatvec_range(const QWeight& q, const float* x, const float* xsum, float* y, int64_t m,
                   int64_t j0, int64_t j1) {
  int64_t Gp = padded(q.k / GS);
  for (int64_t r = 0; r < m;) {
    const float *xr = x + r * q.k, *sr = xsum + r * Gp;
    float* yr = y + r * q.n;
    if (m - r >= 8) qmatvec_rows<B, GS, 8>(q, xr, sr, yr, j0, j1), r += 8;
    else if (m - r >= 4) qmatvec_rows<B, GS, 4>(q, xr, sr, yr, j0, j1), r += 4;
    else if (m - r >= 2) qmatvec_rows<B, GS, 2>(q, xr, sr, yr, j0, j1), r += 2;
    else qmatvec_rows<B, GS, 1>(q, xr, sr, yr, j0, j1), r += 1;
  }
}

// Interleaves a and b: a[0], b[0], a[1], b[1], ... (the low and high nibbles of L bytes).
template <int... I>
inline void store_interleaved(float* o, qvf a, qvf b, std::integer_sequence<int, I...>) {
  qstore(o, __builtin_shufflevector(a, b, (I % 2 ? L + I / 2 : I / 2)...));
  qstore(o + L, __builtin_shufflevector(a, b, (I % 2 ? L + (L + I) / 2 : (L + I) / 2)...));
}

template <int B>
void dequantize_range(const QWeight& q, float* out, int64_t j0, int64_t j1) {
  const int64_t k = q.k, gs = q.gs, G = k / gs, row_bytes = k * B / 8, gbytes = gs * B / 8;
  alignas(64) uint8_t pad[128 + kRead] = {};
  for (int64_t j = j0; j < j1; ++j) {
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* p = group_bytes(q, q.w + j * row_bytes + g * gbytes, gbytes, pad);
      qvf s = qsplat(scale_at(q.scales, q.st, j * G + g)), b = qsplat(scale_at(q.biases, q.st, j * G + g));
      float* o = out + j * k + g * gs;
      if constexpr (B == 4) {
        for (int64_t v = 0; v < gs; v += kBlock<B>) {
          qvf c[2];
          unpack_block<B>(p + v * B / 8, c);
          store_interleaved(o + v, c[0] * s + b, c[1] * s + b, std::make_integer_sequence<int, L>{});
        }
      } else if constexpr (B == 8) {
        for (int64_t v = 0; v < gs; v += L) {
          qvf c[1];
          unpack_block<B>(p + v, c);
          qstore(o + v, c[0] * s + b);
        }
      } else {
        for (int64_t v = 0; v < gs; v += L) qstore(o + v, unpack<B>(p + v * B / 8) * s + b);
      }
    }
  }
}

// Weights per chunk of rows: a matrix with fewer stays on the calling thread. Chosen on an idle
// machine, where splitting every projection won; under heavy oversubscription 1 Mi did better
// (bench/NOTES.md, "Issue 14: CPU quantized matvec toward the memory ceiling" and "Session 8").
constexpr int64_t kMinChunk = 1 << 16;

// fn(j0, j1) over the n output rows of a matrix of row length k, split over the worker pool.
void parallel_rows(int64_t n, int64_t k, int threads, const std::function<void(int64_t, int64_t)>& fn) {
  mlxgen::parallel_for(n, (kMinChunk + k - 1) / k, threads, fn);
}

template <int B, int GS>
void qmatvec_gs(const QWeight& q, const float* x, float* y, int64_t m, int threads) {
  int64_t G = q.k / GS, Gp = padded(G);
  std::vector<float> xsum(m * Gp, 0.0f);  // each group's sum of x, for the bias term
  for (int64_t r = 0; r < m; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + r * q.k + g * GS;
      qvf t = qload(xg);
      for (int v = L; v < GS; v += L) t += qload(xg + v);
      xsum[r * Gp + g] = hsum(t);
    }
  std::vector<float> buf;
  const float* xb = block_order<B>(x, m * q.k, buf);
  parallel_rows(q.n, q.k, threads,
                [&](int64_t j0, int64_t j1) { qmatvec_range<B, GS>(q, xb, xsum.data(), y, m, j0, j1); });
}

template <int B>
void qmatvec_bits(const QWeight& q, const float* x, float* y, int64_t m, int threads) {
  if (q.gs == 32) qmatvec_gs<B, 32>(q, x, y, m, threads);
  else if (q.gs == 64) qmatvec_gs<B, 64>(q, x, y, m, threads);
  else qmatvec_gs<B, 128>(q, x, y, m, threads);
}

void qmatvec(const QWeight& q, int bits, const float* x, float* y, int64_t m, int threads) {
  switch (bits) {
    case 2: return qmatvec_bits<2>(q, x, y, m, threads);
    case 3: return qmatvec_bits<3>(q, x, y, m, threads);
    case 4: return qmatvec_bits<4>(q, x, y, m, threads);
    case 5: return qmatvec_bits<5>(q, x, y, m, threads);
    case 6: return qmatvec_bits<6>(q, x, y, m, threads);
    default: return qmatvec_bits<8>(q, x, y, m, threads);
  }
}

template <int B>
void dequantize_bits(const QWeight& q, float* out, int threads) {
  parallel_rows(q.n, q.k, threads, [&](int64_t j0, int64_t j1) { dequantize_range<B>(q, out, j0, j1); });
}

void dequantize(const QWeight& q, int bits, float* out, int threads) {
  switch (bits) {
    case 2: return dequantize_bits<2>(q, out, threads);
    case 3: return dequantize_bits<3>(q, out, threads);
    case 4: return dequantize_bits<4>(q, out, threads);
    case 5: return dequantize_bits<5>(q, out, threads);
    case 6: return dequantize_bits<6>(q, out, threads);
    default: return dequantize_bits<8>(q, out, threads);
  }
}

#include "cpu_kernel.h"  // CpuKernel, cpu_stream()

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument(what); }

// Checks a quantized weight's arrays against each other, before anything is allocated or read.
// Returns k, the unpacked row length.
int64_t check_weight(const char* op, const mx::array& w, const mx::array& scales, const mx::array& biases,
                     int bits, int group_size) {
  std::string p = std::string(op) + ": ";
  if (bits != 2 && bits != 3 && bits != 4 && bits != 5 && bits != 6 && bits != 8)
    bad(p + "bits must be 2, 3, 4, 5, 6 or 8, got " + std::to_string(bits) + ".");
  if (group_size != 32 && group_size != 64 && group_size != 128)
    bad(p + "group_size must be 32, 64 or 128, got " + std::to_string(group_size) + ".");
  if (w.dtype() != mx::uint32 || w.ndim() != 2)
    bad(p + "w must be a 2-D uint32 array (mx.quantize's packed weight).");
  if (scales.dtype() != biases.dtype() ||
      (scales.dtype() != mx::float32 && scales.dtype() != mx::float16 && scales.dtype() != mx::bfloat16))
    bad(p + "scales and biases must share one dtype: float32, float16 or bfloat16.");
  int64_t n = w.shape(0), words = w.shape(1);
  if (words * 32 % bits) bad(p + "w's row of " + std::to_string(words) + " words does not hold whole " +
                             std::to_string(bits) + "-bit values.");
  int64_t k = words * 32 / bits;
  if (n < 1 || k < 1) bad(p + "w must have at least one row and one group of values.");
  if (k % group_size) bad(p + "w's rows hold " + std::to_string(k) + " values, not a multiple of group_size " +
                          std::to_string(group_size) + ".");
  mx::Shape want = {static_cast<int>(n), static_cast<int>(k / group_size)};
  if (scales.shape() != want || biases.shape() != want)
    bad(p + "scales and biases must have shape (" + std::to_string(n) + ", " + std::to_string(k / group_size) +
        ") for w of shape (" + std::to_string(n) + ", " + std::to_string(words) + ") at " + std::to_string(bits) +
        " bits, group_size " + std::to_string(group_size) + ".");
  return k;
}

ScaleType scale_type(const mx::array& s) {
  return s.dtype() == mx::float32 ? ScaleType::f32 : s.dtype() == mx::float16 ? ScaleType::f16 : ScaleType::bf16;
}

QWeight weight_view(const std::vector<mx::array>& in, ScaleType st, int64_t k, int group_size) {
  const auto& w = in[0];
  auto base = static_cast<const uint8_t*>(w.data<void>());
  return {base, in[1].data<void>(), in[2].data<void>(), st, w.shape(0), k, group_size, base + w.nbytes()};
}

mx::array qmatvec_op(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
                     int bits, int group_size, int threads, const std::optional<mx::array>& bias) {
  int64_t k = check_weight("qmatvec", w, scales, biases, bits, group_size);
  if (x.dtype() != mx::float32) bad("qmatvec: x must be float32.");
  if (x.ndim() < 1 || x.shape(-1) != k)
    bad("qmatvec: x's last dimension must be the weight's row length " + std::to_string(k) + ".");
  int64_t n = w.shape(0), m = k ? x.size() / k : 0;
  if (bias && (bias->ndim() != 1 || bias->shape(0) != n))
    bad("qmatvec: bias must have shape (" + std::to_string(n) + ",), one value per row of w.");
  if (bias && bias->dtype() != mx::float32 && bias->dtype() != mx::float16 && bias->dtype() != mx::bfloat16)
    bad("qmatvec: bias must be float32, float16 or bfloat16.");
  auto s = cpu_stream();
  auto shape = x.shape();
  shape.back() = static_cast<int>(n);
  ScaleType st = scale_type(scales), bt = bias ? scale_type(*bias) : ScaleType::f32;
  // CpuKernel makes the inputs dense at eval, where they rarely need it (no graph node per input).
  // The layer's bias rides along as a fifth input: no Broadcast + Add nodes per projection.
  std::vector<mx::array> inputs = {x, w, scales, biases};
  if (bias) inputs.push_back(*bias);
  Kernel fn = [=](const std::vector<mx::array>& in, float* out) -> Task {
    QWeight q = weight_view({in[1], in[2], in[3]}, st, k, group_size);
    if (in.size() > 4) q.out_bias = in[4].data<void>(), q.out_bias_type = bt;
    return [=, xp = in[0].data<float>()] { qmatvec(q, bits, xp, out, m, threads); };
  };
  return mx::array(shape, mx::float32, std::make_shared<CpuKernel>(s, "MlxgenQuantMatvec", std::move(fn)),
                   std::move(inputs));
}

mx::array dequantize_op(const mx::array& w, const mx::array& scales, const mx::array& biases, int bits,
                        int group_size, int threads) {
  int64_t k = check_weight("dequantize", w, scales, biases, bits, group_size);
  auto s = cpu_stream();
  const auto &wc = w, &sc = scales, &bc = biases;  // made dense at eval by CpuKernel
  ScaleType st = scale_type(scales);
  Kernel fn = [=](const std::vector<mx::array>& in, float* out) -> Task {
    return [=, q = weight_view(in, st, k, group_size)] { dequantize(q, bits, out, threads); };
  };
  return mx::array({w.shape(0), static_cast<int>(k)}, mx::float32,
                   std::make_shared<CpuKernel>(s, "MlxgenDequantize", std::move(fn)), {wc, sc, bc});
}

}  // namespace

void mlxgen::qmatvec(const void* w, const void* scales, const void* biases, int scale_dtype, int64_t n, int64_t k,
                     int group_size, int bits, const float* x, float* y, int64_t m, int threads) {
  auto base = static_cast<const uint8_t*>(w);
  QWeight q{base, scales, biases, static_cast<ScaleType>(scale_dtype), n, k, group_size, base + n * k * bits / 8};
  ::qmatvec(q, bits, x, y, m, threads);
}

// Called from fast_math.cpp's module definition.
void add_quant_ops(nb::module_& m) {
  m.def("qmatvec", &qmatvec_op, nb::arg("x"), nb::arg("w"), nb::arg("scales"), nb::arg("biases"),
        nb::arg("bits"), nb::arg("group_size"), nb::arg("threads"), nb::arg("bias") = nb::none());
  m.def("dequantize", &dequantize_op, nb::arg("w"), nb::arg("scales"), nb::arg("biases"), nb::arg("bits"),
        nb::arg("group_size"), nb::arg("threads"));
}
