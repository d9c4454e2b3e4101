// Emulation shim, part 3: the `metal::` API our kernels use — math, barriers, simdgroup
// collectives — and MSL's type names and address-space qualifiers. Anything not declared here
// is refused by the harness (mlxgen/emulation/scan.py) instead of being emulated wrongly.
#pragma once
#include "emu_runtime.hpp"

namespace mlxgen_emu {

// ---- simdgroup collectives: every lane of the simdgroup must arrive at the same call ----
template <class T>
T simd_collective(T x, op kind, unsigned arg, unsigned line);

template <class T>
void complete_simd(unsigned g) {
  auto& s = S();
  fiber* lanes = &s.fibers[g * kSimdWidth];
  unsigned n = s.simd_size[g];
  const fiber& a = lanes[0];
  for (unsigned l = 1; l < n; l++) {
    const fiber& b = lanes[l];
    if (b.kind != a.kind || b.line != a.line || b.seq != a.seq || b.size != a.size)
      fail("divergent simdgroup: lanes 0 and %u of %s reached different simdgroup operations "
           "(kernel lines %u and %u); divergence is not modeled", l, where(a), a.line, b.line);
  }
  T v[kSimdWidth];
  for (unsigned l = 0; l < n; l++) std::memcpy(&v[l], lanes[l].in, sizeof(T));
  auto put = [&](unsigned l, const T& r) { std::memcpy(lanes[l].out, &r, sizeof(T)); };
  auto uniform_arg = [&]() {
    for (unsigned l = 1; l < n; l++)
      if (lanes[l].arg != a.arg) fail("simd_broadcast lane differs across the simdgroup");
    if (a.arg >= n) fail("simd_broadcast from lane %u which does not exist", a.arg);
    return a.arg;
  };
  if constexpr (std::is_arithmetic_v<T> || is_float_v<T>) {
    if (a.kind == op::sum || a.kind == op::prod || a.kind == op::max || a.kind == op::min) {
      // Butterfly order (like a hardware reduction tree), identical result in every lane.
      T r[kSimdWidth];
      for (unsigned l = 0; l < n; l++) r[l] = v[l];
      unsigned w = 1;
      while (w < n) w <<= 1;
      for (unsigned off = w / 2; off > 0; off >>= 1)
        for (unsigned l = 0; l + off < n && l < off; l++) {
          T p = r[l], q = r[l + off];
          r[l] = a.kind == op::sum ? T(p + q) : a.kind == op::prod ? T(p * q)
               : a.kind == op::max ? (q > p ? q : p) : (q < p ? q : p);
        }
      for (unsigned l = 0; l < n; l++) put(l, r[0]);
    }
  }
  switch (a.kind) {
    case op::shuffle:
      for (unsigned l = 0; l < n; l++) {
        if (lanes[l].arg >= n) fail("simd_shuffle from lane %u which does not exist", lanes[l].arg);
        put(l, v[lanes[l].arg]);
      }
      break;
    case op::shuffle_xor:
      for (unsigned l = 0; l < n; l++) {
        unsigned src = l ^ lanes[l].arg;
        if (src >= n) fail("simd_shuffle_xor reaches lane %u which does not exist", src);
        put(l, v[src]);
      }
      break;
    case op::shuffle_up:  // lanes below `delta` keep their own value
      for (unsigned l = 0; l < n; l++) put(l, l >= lanes[l].arg ? v[l - lanes[l].arg] : v[l]);
      break;
    case op::shuffle_down:  // lanes whose source is past the end keep their own value
      for (unsigned l = 0; l < n; l++) put(l, l + lanes[l].arg < n ? v[l + lanes[l].arg] : v[l]);
      break;
    case op::broadcast: {
      unsigned src = uniform_arg();
      for (unsigned l = 0; l < n; l++) put(l, v[src]);
      break;
    }
    case op::broadcast_first:
      for (unsigned l = 0; l < n; l++) put(l, v[0]);
      break;
    case op::all:
    case op::any:
      if constexpr (std::is_same_v<T, bool>) {
        bool r = a.kind == op::all;
        for (unsigned l = 0; l < n; l++) r = a.kind == op::all ? (r && v[l]) : (r || v[l]);
        for (unsigned l = 0; l < n; l++) put(l, r);
      }
      break;
    default:
      break;
  }
  for (unsigned l = 0; l < n; l++) lanes[l].state = fstate::runnable;
}

template <class T>
T simd_collective(T x, op kind, unsigned arg, unsigned line) {
  static_assert(sizeof(T) <= 32 && std::is_trivially_copyable_v<T>, "unsupported simd operand");
  auto& s = S();
  fiber& f = self();
  std::memcpy(f.in, &x, sizeof(T));
  f.kind = kind;
  f.arg = arg;
  f.line = line;
  f.size = sizeof(T);
  f.state = fstate::wait_simd;
  if (++s.simd_arrived[f.sg] == s.simd_size[f.sg]) {
    s.simd_arrived[f.sg] = 0;
    complete_simd<T>(f.sg);
  } else {
    yield_wait(f);
  }
  f.seq++;
  T r;
  std::memcpy(&r, f.out, sizeof(T));
  return r;
}

inline void threadgroup_barrier_at(unsigned line) {
  auto& s = S();
  fiber& f = self();
  f.kind = op::tg_barrier;
  f.line = line;
  f.state = fstate::wait_tg;
  if (++s.tg_arrived == s.n) {
    s.tg_arrived = 0;
    for (unsigned i = 0; i < s.n; i++) {
      if (s.fibers[i].line != line)
        fail("threads of one threadgroup reached different threadgroup_barrier calls (kernel "
             "lines %u and %u)", line, s.fibers[i].line);
      s.fibers[i].state = fstate::runnable;
    }
  } else {
    yield_wait(f);
  }
}

// ---- math: templates over float/half/bfloat16 so C's double overloads never tie ----
namespace math {
#define MLXGEN_UNARY(name, expr)                                    \
  template <class T, std::enable_if_t<is_float_v<T>, int> = 0>      \
  T name(T x_) {                                                    \
    float x = static_cast<float>(x_);                               \
    return static_cast<T>(expr);                                    \
  }
MLXGEN_UNARY(exp, __builtin_expf(x))
MLXGEN_UNARY(exp2, __builtin_exp2f(x))
MLXGEN_UNARY(log, __builtin_logf(x))
MLXGEN_UNARY(log2, __builtin_log2f(x))
MLXGEN_UNARY(sqrt, __builtin_sqrtf(x))
MLXGEN_UNARY(rsqrt, 1.0f / __builtin_sqrtf(x))
MLXGEN_UNARY(sin, __builtin_sinf(x))
MLXGEN_UNARY(cos, __builtin_cosf(x))
MLXGEN_UNARY(tanh, __builtin_tanhf(x))
MLXGEN_UNARY(floor, __builtin_floorf(x))
MLXGEN_UNARY(ceil, __builtin_ceilf(x))
MLXGEN_UNARY(fabs, __builtin_fabsf(x))
#undef MLXGEN_UNARY

template <class T, std::enable_if_t<is_float_v<T> || std::is_integral_v<T>, int> = 0>
T abs(T x) { return x < T(0) ? T(-x) : x; }
template <class T, std::enable_if_t<is_float_v<T> || std::is_integral_v<T>, int> = 0>
T max(T a, T b) { return a < b ? b : a; }
template <class T, std::enable_if_t<is_float_v<T> || std::is_integral_v<T>, int> = 0>
T min(T a, T b) { return b < a ? b : a; }
template <class T, std::enable_if_t<is_float_v<T>, int> = 0>
T fmax(T a, T b) { return static_cast<T>(__builtin_fmaxf(float(a), float(b))); }
template <class T, std::enable_if_t<is_float_v<T>, int> = 0>
T fmin(T a, T b) { return static_cast<T>(__builtin_fminf(float(a), float(b))); }
template <class T, std::enable_if_t<is_float_v<T>, int> = 0>
T fma(T a, T b, T c) { return static_cast<T>(__builtin_fmaf(float(a), float(b), float(c))); }
template <class T, std::enable_if_t<is_float_v<T>, int> = 0>
T pow(T a, T b) { return static_cast<T>(__builtin_powf(float(a), float(b))); }
template <class T, std::enable_if_t<is_float_v<T> || std::is_integral_v<T>, int> = 0>
T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T>
T select(T a, T b, bool c) { return c ? b : a; }
template <class T, std::enable_if_t<is_float_v<T>, int> = 0>
bool isnan(T x) { return __builtin_isnan(float(x)); }
template <class T, std::enable_if_t<is_float_v<T>, int> = 0>
bool isinf(T x) { return __builtin_isinf(float(x)); }
// sincos(x, cosval): returns sin(x) and stores cos(x), as in MSL.
template <class T, std::enable_if_t<is_float_v<T>, int> = 0>
T sincos(T x, T& c) {
  c = static_cast<T>(__builtin_cosf(float(x)));
  return static_cast<T>(__builtin_sinf(float(x)));
}
template <class T, int N>
T dot(const vec<T, N>& a, const vec<T, N>& b) {
  T r = T(0);
  for (int i = 0; i < N; i++) r += a.v[i] * b.v[i];
  return r;
}
}  // namespace math
}  // namespace mlxgen_emu

namespace metal {
using namespace ::mlxgen_emu::math;
namespace fast {
using namespace ::mlxgen_emu::math;
}
namespace precise {
using namespace ::mlxgen_emu::math;
}

enum class mem_flags : unsigned { mem_none = 0, mem_device = 1, mem_threadgroup = 2 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(unsigned(a) | unsigned(b)); }

// The caller's line is recorded so divergent barriers and collectives can be reported.
inline void threadgroup_barrier(mem_flags, unsigned line = __builtin_LINE()) {
  ::mlxgen_emu::threadgroup_barrier_at(line);
}
inline void simdgroup_barrier(mem_flags, unsigned line = __builtin_LINE()) {
  ::mlxgen_emu::simd_collective<int>(0, ::mlxgen_emu::op::simd_barrier, 0, line);
}

#define MLXGEN_SIMD(name, kind, cond)                                                  \
  template <class T, std::enable_if_t<cond, int> = 0>                                 \
  T name(T x, unsigned line = __builtin_LINE()) {                                     \
    return ::mlxgen_emu::simd_collective<T>(x, ::mlxgen_emu::op::kind, 0, line);      \
  }
#define MLXGEN_ARITH (std::is_arithmetic_v<T> || ::mlxgen_emu::is_float_v<T>)
MLXGEN_SIMD(simd_sum, sum, MLXGEN_ARITH)
MLXGEN_SIMD(simd_product, prod, MLXGEN_ARITH)
MLXGEN_SIMD(simd_max, max, MLXGEN_ARITH)
MLXGEN_SIMD(simd_min, min, MLXGEN_ARITH)
MLXGEN_SIMD(simd_broadcast_first, broadcast_first, true)
#undef MLXGEN_SIMD
#undef MLXGEN_ARITH

#define MLXGEN_SIMD_ARG(name, kind)                                                    \
  template <class T>                                                                   \
  T name(T x, unsigned arg, unsigned line = __builtin_LINE()) {                        \
    return ::mlxgen_emu::simd_collective<T>(x, ::mlxgen_emu::op::kind, arg, line);     \
  }
MLXGEN_SIMD_ARG(simd_shuffle, shuffle)
MLXGEN_SIMD_ARG(simd_shuffle_xor, shuffle_xor)
MLXGEN_SIMD_ARG(simd_shuffle_up, shuffle_up)
MLXGEN_SIMD_ARG(simd_shuffle_down, shuffle_down)
MLXGEN_SIMD_ARG(simd_broadcast, broadcast)
#undef MLXGEN_SIMD_ARG

inline bool simd_all(bool x, unsigned line = __builtin_LINE()) {
  return ::mlxgen_emu::simd_collective<bool>(x, ::mlxgen_emu::op::all, 0, line);
}
inline bool simd_any(bool x, unsigned line = __builtin_LINE()) {
  return ::mlxgen_emu::simd_collective<bool>(x, ::mlxgen_emu::op::any, 0, line);
}
}  // namespace metal

// MSL names, as MLX's utils.h makes them visible to custom kernels (`using namespace metal`).
using namespace metal;
using half = _Float16;
using float16_t = _Float16;
using bfloat = ::mlxgen_emu::bfloat16_t;
using bfloat16_t = ::mlxgen_emu::bfloat16_t;
using uint = unsigned int;
using ushort = unsigned short;
using uchar = unsigned char;
#define MLXGEN_VEC_NAMES(T, name)                 \
  using name##2 = ::mlxgen_emu::vec<T, 2>;        \
  using name##3 = ::mlxgen_emu::vec<T, 3>;        \
  using name##4 = ::mlxgen_emu::vec<T, 4>;
MLXGEN_VEC_NAMES(float, float)
MLXGEN_VEC_NAMES(_Float16, half)
MLXGEN_VEC_NAMES(int, int)
MLXGEN_VEC_NAMES(unsigned, uint)
#undef MLXGEN_VEC_NAMES

// Address spaces: one CPU memory, so the qualifiers are no-ops. Device-pointer declarations and
// threadgroup arrays in kernel bodies are rewritten by the harness before these apply.
#define device
#define constant
#define thread
#define threadgroup
