// Emulation shim, part 1: the MSL value types our kernels use, as plain C++ (see README.md).
// half is _Float16, bfloat16_t a bit-exact struct, vectors have .x/.y/.z/.w (no swizzles).
#pragma once
#if defined(__APPLE__) && !defined(_XOPEN_SOURCE)
#define _XOPEN_SOURCE 700  // macOS only declares the ucontext routines under it
#endif
// Only C headers and <type_traits>: the shim is compiled with every kernel, so it stays light.
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace mlxgen_emu {

// A kernel fault: the message is formatted into `error_text` and the fiber unwinds.
struct emu_error {};
inline char error_text[2048];
[[noreturn]] inline void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(error_text, sizeof error_text, fmt, ap);
  va_end(ap);
  throw emu_error{};
}

// bfloat16: the top 16 bits of a float; float -> bf16 rounds to nearest even, like Metal.
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = uint16_t((u >> 16) | 0x40u);  // quiet NaN, sign kept
    } else {
      bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  template <class U, std::enable_if_t<std::is_arithmetic_v<U>, int> = 0>
  bfloat16_t(U v) : bfloat16_t(static_cast<float>(v)) {}
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

template <class T>
inline constexpr bool is_float_v =
    std::is_same_v<T, float> || std::is_same_v<T, _Float16> || std::is_same_v<T, bfloat16_t>;

// MSL vector: N components; storage aliases .x/.y/.z/.w with an array (GCC union punning).
template <class T, int N>
struct vec_storage;
template <class T>
struct vec_storage<T, 2> {
  union { T v[2]; struct { T x, y; }; };
};
template <class T>
struct vec_storage<T, 3> {
  union { T v[3]; struct { T x, y, z; }; };
};
template <class T>
struct vec_storage<T, 4> {
  union { T v[4]; struct { T x, y, z, w; }; };
};

template <class T, int N>
struct vec : vec_storage<T, N> {
  using vec_storage<T, N>::v;
  vec() = default;
  vec(T s) {
    for (int i = 0; i < N; i++) v[i] = s;
  }
  template <class... A, std::enable_if_t<sizeof...(A) == N, int> = 0>
  vec(A... a) {
    T tmp[N] = {static_cast<T>(a)...};
    for (int i = 0; i < N; i++) v[i] = tmp[i];
  }
  template <class U>
  explicit vec(const vec<U, N>& o) {
    for (int i = 0; i < N; i++) v[i] = static_cast<T>(o.v[i]);
  }
  template <class I>
  T& operator[](I i) {
    check(i);
    return v[i];
  }
  template <class I>
  const T& operator[](I i) const {
    check(i);
    return v[i];
  }
  template <class I>
  static void check(I i) {
    if (i < 0 || i >= N) fail("vector component index %lld out of range", (long long)i);
  }
};

#define MLXGEN_VEC_OP(op)                                                  \
  template <class T, int N>                                                \
  vec<T, N> operator op(vec<T, N> a, const vec<T, N>& b) {                 \
    for (int i = 0; i < N; i++) a.v[i] = a.v[i] op b.v[i];                 \
    return a;                                                              \
  }                                                                        \
  template <class T, int N, class S, std::enable_if_t<std::is_arithmetic_v<S>, int> = 0> \
  vec<T, N> operator op(vec<T, N> a, S s) {                                \
    for (int i = 0; i < N; i++) a.v[i] = a.v[i] op static_cast<T>(s);      \
    return a;                                                              \
  }                                                                        \
  template <class T, int N, class S, std::enable_if_t<std::is_arithmetic_v<S>, int> = 0> \
  vec<T, N> operator op(S s, vec<T, N> a) {                                \
    for (int i = 0; i < N; i++) a.v[i] = static_cast<T>(s) op a.v[i];      \
    return a;                                                              \
  }                                                                        \
  template <class T, int N, class B>                                       \
  vec<T, N>& operator op##=(vec<T, N>& a, const B& b) {                    \
    a = a op b;                                                            \
    return a;                                                              \
  }
MLXGEN_VEC_OP(+)
MLXGEN_VEC_OP(-)
MLXGEN_VEC_OP(*)
MLXGEN_VEC_OP(/)
#undef MLXGEN_VEC_OP

template <class T, int N>
vec<T, N> operator-(vec<T, N> a) {
  for (int i = 0; i < N; i++) a.v[i] = -a.v[i];
  return a;
}

// A device/constant buffer pointer: every dereference is bounds-checked against the buffer.
template <class T>
struct ptr {
  T* base;
  int64_t count;
  int64_t off;
  const char* name;

  template <class U = T, std::enable_if_t<std::is_const_v<U>, int> = 0>
  ptr(const ptr<std::remove_const_t<T>>& o) : base(o.base), count(o.count), off(o.off), name(o.name) {}
  ptr(T* b, int64_t n, int64_t o, const char* nm) : base(b), count(n), off(o), name(nm) {}

  T& at(int64_t i) const {
    if (i < 0 || i >= count)
      fail("out-of-bounds access to buffer `%s`: element %lld of %lld", name, (long long)i,
           (long long)count);
    return base[i];
  }
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  T& operator[](I i) const { return at(off + int64_t(i)); }
  T& operator*() const { return at(off); }
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  ptr operator+(I i) const { return ptr(base, count, off + int64_t(i), name); }
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  ptr operator-(I i) const { return ptr(base, count, off - int64_t(i), name); }
  template <class I>
  ptr& operator+=(I i) { off += int64_t(i); return *this; }
  template <class I>
  ptr& operator-=(I i) { off -= int64_t(i); return *this; }
  ptr& operator++() { ++off; return *this; }
  ptr& operator--() { --off; return *this; }
  int64_t operator-(const ptr& o) const { return off - o.off; }
};
template <class T, class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
ptr<T> operator+(I i, const ptr<T>& p) { return p + i; }

// Threadgroup memory: one static object per declaration (one threadgroup runs at a time),
// bounds-checked, and poisoned (all bits set: NaN for floats) before every threadgroup.
template <class T, long... Ns>
struct tg_array;
template <class T, long N>
struct tg_array<T, N> {
  T data[N];
  template <class I>
  T& operator[](I i) {
    if (int64_t(i) < 0 || int64_t(i) >= N)
      fail("out-of-bounds threadgroup array index %lld of %ld", (long long)i, N);
    return data[i];
  }
  operator T*() { return data; }
};
template <class T, long N, long... Rest>
struct tg_array<T, N, Rest...> {
  tg_array<T, Rest...> data[N];
  template <class I>
  tg_array<T, Rest...>& operator[](I i) {
    if (int64_t(i) < 0 || int64_t(i) >= N)
      fail("out-of-bounds threadgroup array index %lld of %ld", (long long)i, N);
    return data[i];
  }
};

}  // namespace mlxgen_emu
