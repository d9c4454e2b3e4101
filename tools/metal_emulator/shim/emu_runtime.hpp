// Emulation shim, part 2: runs a launch grid one threadgroup at a time; the threadgroup's
// threads are cooperative fibers on one OS thread, so barriers and simdgroup collectives are
// exact rendezvous points and every run is deterministic (see README.md).
#pragma once
#include "emu_types.hpp"

// x86-64: a six-register stack switch; elsewhere (or with MLXGEN_EMU_UCONTEXT) POSIX ucontext.
#if defined(__x86_64__) && !defined(MLXGEN_EMU_UCONTEXT)
#define MLXGEN_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

namespace mlxgen_emu {

using uint3 = vec<unsigned, 3>;

// The values MLX's generated signature can bind from [[attribute]] parameters.
struct thread_attrs {
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threads_per_threadgroup, dispatch_threads_per_threadgroup, threadgroups_per_grid;
  uint3 threads_per_grid, grid_size, grid_origin;
  unsigned thread_index_in_threadgroup, simdgroup_index_in_threadgroup, thread_index_in_simdgroup;
  unsigned simdgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup;
  unsigned thread_execution_width, threads_per_simdgroup;
};
using body_fn = void (*)(const thread_attrs&, void*);

constexpr unsigned kSimdWidth = 32;  // Apple GPUs: 32 threads per simdgroup
constexpr unsigned kMaxThreads = 1024;
constexpr unsigned kMaxTgRegions = 256;
constexpr size_t kStackSize = 256 * 1024;
constexpr uint64_t kCanary = 0x6d6c7867656e2121ull;

enum class fstate : unsigned char { runnable, wait_simd, wait_tg, done };
enum class op : unsigned char {
  sum, prod, max, min, shuffle, shuffle_xor, shuffle_up, shuffle_down, broadcast,
  broadcast_first, all, any, simd_barrier, tg_barrier
};

struct fiber {
  void* sp = nullptr;
  char* stack = nullptr;
#if !MLXGEN_EMU_ASM_SWITCH
  ucontext_t uc;
#endif
  fstate state = fstate::done;
  unsigned tid = 0, lane = 0, sg = 0;
  thread_attrs attrs{};
  op kind = op::sum;        // the collective this fiber waits in
  unsigned line = 0, arg = 0, size = 0;
  uint64_t seq = 0;         // collectives passed so far (all lanes must agree)
  alignas(16) unsigned char in[32], out[32];
};

struct launch_state {
  fiber fibers[kMaxThreads];
  unsigned n = 0;
  unsigned simd_arrived[kMaxThreads / kSimdWidth], simd_size[kMaxThreads / kSimdWidth];
  unsigned tg_arrived = 0;
  fiber* current = nullptr;
  void* sched_sp = nullptr;
#if !MLXGEN_EMU_ASM_SWITCH
  ucontext_t sched_uc;
#endif
  body_fn fn = nullptr;
  void* user = nullptr;
  bool aborted = false;
  void* tg_ptr[kMaxTgRegions];
  size_t tg_size[kMaxTgRegions];
  unsigned n_tg = 0;
};
inline launch_state& S() {
  static launch_state s;
  return s;
}

inline bool register_tg(void* p, size_t n) {
  auto& s = S();
  if (s.n_tg == kMaxTgRegions) fail("more than %u threadgroup arrays", kMaxTgRegions);
  std::memset(p, 0xff, n);
  s.tg_ptr[s.n_tg] = p;
  s.tg_size[s.n_tg++] = n;
  return true;
}

#if MLXGEN_EMU_ASM_SWITCH
// Minimal context switch: save callee-saved registers on the old stack, swap stack pointers.
extern "C" void mlxgen_emu_switch(void** from_sp, void* to_sp);
asm(R"(
.text
.p2align 4
.hidden mlxgen_emu_switch
.globl mlxgen_emu_switch
.type mlxgen_emu_switch,@function
mlxgen_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size mlxgen_emu_switch,.-mlxgen_emu_switch
)");
#endif

void fiber_main();

inline void to_scheduler(fiber& f) {
#if MLXGEN_EMU_ASM_SWITCH
  mlxgen_emu_switch(&f.sp, S().sched_sp);
#else
  swapcontext(&f.uc, &S().sched_uc);
#endif
}

inline void to_fiber(fiber& f) {
  auto& s = S();
  s.current = &f;
#if MLXGEN_EMU_ASM_SWITCH
  mlxgen_emu_switch(&s.sched_sp, f.sp);
#else
  swapcontext(&s.sched_uc, &f.uc);
#endif
}

inline void prepare(fiber& f) {
  if (!f.stack) f.stack = static_cast<char*>(std::malloc(kStackSize));
  std::memcpy(f.stack, &kCanary, sizeof kCanary);
#if MLXGEN_EMU_ASM_SWITCH
  // Initial frame popped by mlxgen_emu_switch: six callee-saved slots, then `ret` to fiber_main
  // with rsp = 8 mod 16 as after a call.
  void** top = reinterpret_cast<void**>(f.stack + kStackSize);
  *--top = nullptr;
  *--top = reinterpret_cast<void*>(&fiber_main);
  for (int i = 0; i < 6; i++) *--top = nullptr;
  f.sp = top;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack;
  f.uc.uc_stack.ss_size = kStackSize;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, fiber_main, 0);
#endif
}

inline void fiber_main() {
  auto& s = S();
  fiber& f = *s.current;
  try {
    s.fn(f.attrs, s.user);
  } catch (emu_error&) {
    s.aborted = true;
  } catch (...) {
    std::snprintf(error_text, sizeof error_text, "C++ exception in kernel");
    s.aborted = true;
  }
  f.state = fstate::done;
  to_scheduler(f);
  std::abort();  // a finished fiber is never resumed
}

// "thread 5 (simdgroup 0, lane 5) of threadgroup (1,0,0)", for error messages.
inline const char* where(const fiber& f) {
  static char buf[160];
  const uint3& g = f.attrs.threadgroup_position_in_grid;
  std::snprintf(buf, sizeof buf, "thread %u (simdgroup %u, lane %u) of threadgroup (%u,%u,%u)",
                f.tid, f.sg, f.lane, g.x, g.y, g.z);
  return buf;
}

// Nothing can run: some threads wait at a rendezvous others never reach.
inline void describe_deadlock() {
  auto& s = S();
  for (unsigned i = 0; i < s.n; i++) {
    const fiber& f = s.fibers[i];
    if (f.state == fstate::wait_tg) {
      std::snprintf(error_text, sizeof error_text,
                    "threadgroup_barrier at kernel line %u reached by %s but not by every thread "
                    "of the threadgroup (a thread returned early or took another branch); "
                    "barriers must be reached by all threads", f.line, where(f));
      return;
    }
    if (f.state == fstate::wait_simd) {
      std::snprintf(error_text, sizeof error_text,
                    "simdgroup operation at kernel line %u waits in %s for lanes that returned "
                    "or diverged; divergent simdgroups (inactive lanes) are not modeled by the "
                    "emulator", f.line, where(f));
      return;
    }
  }
  std::snprintf(error_text, sizeof error_text, "deadlock");
}

inline void run_threadgroup() {
  auto& s = S();
  for (unsigned i = 0; i < s.n_tg; i++) std::memset(s.tg_ptr[i], 0xff, s.tg_size[i]);
  s.tg_arrived = 0;
  for (unsigned g = 0; g < kMaxThreads / kSimdWidth; g++) s.simd_arrived[g] = 0;
  for (unsigned i = 0; i < s.n; i++) {
    s.fibers[i].state = fstate::runnable;
    s.fibers[i].seq = 0;
    prepare(s.fibers[i]);
  }
  // Alternate the visiting order each round so a missing barrier shows in one direction.
  for (unsigned round = 0;; round++) {
    bool ran = false, all_done = true;
    for (unsigned k = 0; k < s.n; k++) {
      fiber& f = s.fibers[round % 2 ? s.n - 1 - k : k];
      if (f.state == fstate::runnable) {
        to_fiber(f);
        ran = true;
        if (std::memcmp(f.stack, &kCanary, sizeof kCanary) != 0) {
          std::snprintf(error_text, sizeof error_text, "kernel thread stack overflow (%s)", where(f));
          s.aborted = true;
        }
        if (s.aborted) return;
      }
      all_done &= f.state == fstate::done;
    }
    if (all_done) return;
    if (!ran) {
      describe_deadlock();
      s.aborted = true;
      return;
    }
  }
}

// Launch `grid` threads (MLX passes thread counts, like dispatchThreads) in `tg`-sized groups.
inline int launch(const unsigned* grid, const unsigned* tg, bool uniform_only, body_fn fn,
                  void* user, char* err, int errlen) {
  auto& s = S();
  s.fn = fn;
  s.user = user;
  s.aborted = false;
  error_text[0] = 0;
  auto report = [&]() {
    std::snprintf(err, size_t(errlen), "%s", error_text);
    return 1;
  };
  unsigned groups[3];
  for (int a = 0; a < 3; a++) {
    if (grid[a] == 0 || tg[a] == 0) {
      std::snprintf(error_text, sizeof error_text, "grid and threadgroup sizes must be positive");
      return report();
    }
    if (uniform_only && grid[a] % tg[a] != 0) {
      std::snprintf(error_text, sizeof error_text,
                    "grid (%u) is not a multiple of the threadgroup (%u) on axis %d: non-uniform "
                    "threadgroups are only modeled for kernels that use no threadgroup-level "
                    "attributes, barriers, simdgroup functions or threadgroup memory",
                    grid[a], tg[a], a);
      return report();
    }
    groups[a] = (grid[a] + tg[a] - 1) / tg[a];
  }
  unsigned tg_size = tg[0] * tg[1] * tg[2];
  if (tg_size > kMaxThreads) {
    std::snprintf(error_text, sizeof error_text, "threadgroup of %u threads exceeds %u", tg_size,
                  kMaxThreads);
    return report();
  }
  for (unsigned gz = 0; gz < groups[2]; gz++)
    for (unsigned gy = 0; gy < groups[1]; gy++)
      for (unsigned gx = 0; gx < groups[0]; gx++) {
        unsigned g[3] = {gx, gy, gz}, dims[3];
        for (int a = 0; a < 3; a++) dims[a] = tg[a] < grid[a] - g[a] * tg[a] ? tg[a] : grid[a] - g[a] * tg[a];
        s.n = dims[0] * dims[1] * dims[2];
        unsigned nsg = (s.n + kSimdWidth - 1) / kSimdWidth;
        for (unsigned i = 0; i < nsg; i++) s.simd_size[i] = kSimdWidth;
        s.simd_size[nsg - 1] = s.n - (nsg - 1) * kSimdWidth;
        for (unsigned t = 0; t < s.n; t++) {
          fiber& f = s.fibers[t];
          unsigned tx = t % dims[0], ty = (t / dims[0]) % dims[1], tz = t / (dims[0] * dims[1]);
          f.tid = t;
          f.sg = t / kSimdWidth;
          f.lane = t % kSimdWidth;
          thread_attrs& at = f.attrs;
          at.thread_position_in_threadgroup = uint3(tx, ty, tz);
          at.threadgroup_position_in_grid = uint3(gx, gy, gz);
          at.thread_position_in_grid = uint3(gx * tg[0] + tx, gy * tg[1] + ty, gz * tg[2] + tz);
          at.threads_per_threadgroup = uint3(dims[0], dims[1], dims[2]);
          at.dispatch_threads_per_threadgroup = uint3(tg[0], tg[1], tg[2]);
          at.threadgroups_per_grid = uint3(groups[0], groups[1], groups[2]);
          at.threads_per_grid = at.grid_size = uint3(grid[0], grid[1], grid[2]);
          at.grid_origin = uint3(0u, 0u, 0u);
          at.thread_index_in_threadgroup = t;
          at.simdgroup_index_in_threadgroup = f.sg;
          at.thread_index_in_simdgroup = f.lane;
          at.simdgroups_per_threadgroup = nsg;
          at.dispatch_simdgroups_per_threadgroup = (tg_size + kSimdWidth - 1) / kSimdWidth;
          at.thread_execution_width = at.threads_per_simdgroup = kSimdWidth;
        }
        run_threadgroup();
        if (s.aborted) return report();
      }
  return 0;
}

inline fiber& self() { return *S().current; }

// Block the calling fiber until its scheduler resumes it.
inline void yield_wait(fiber& f) { to_scheduler(f); }

}  // namespace mlxgen_emu
