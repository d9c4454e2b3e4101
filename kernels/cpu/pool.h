// One persistent worker pool for every mlxgen CPU kernel (qmatvec, dequantize, matvec, decode
// attention): a decode step runs ~100 parallel kernels, and starting a std::thread for each cost
// more than the work in the small ones. Workers spin briefly after a job (the next kernel of the
// step usually follows within microseconds), then sleep on a condition variable.
//
// - One job at a time: a second caller (another MLX stream's thread) runs its tasks inline.
// - fork: the child has none of the parent's threads, so it drops the parent's pool (leaked, never
//   waited on) and starts its own on first use (pthread_atfork).
#pragma once

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
inline void pool_pause() { _mm_pause(); }
#elif defined(__aarch64__)
inline void pool_pause() { asm volatile("yield"); }
#else
inline void pool_pause() {}
#endif

namespace mlxgen {

class Pool {
 public:
  // Never destroyed (workers live as long as the process), so no shutdown path.
  explicit Pool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this, i] { work_loop(i); });
  }
  int workers() const { return static_cast<int>(threads_.size()); }

  // fn(t) for every t in [0, tasks), on the caller and up to threads - 1 workers; returns when
  // all are done. Tasks are claimed one at a time and the caller never waits for a worker that
  // has not joined (on a busy machine it may be descheduled): the caller then does the rest.
  void run(int64_t tasks, int threads, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> job(job_mutex_, std::try_to_lock);
    if (tasks <= 1 || threads <= 1 || threads_.empty() || !job.owns_lock()) {
      for (int64_t t = 0; t < tasks; ++t) fn(t);
      return;
    }
    fn_ = &fn;
    tasks_ = tasks;
    active_ = std::min<int>(threads - 1, workers());
    next_.store(0, std::memory_order_relaxed);
    ticket_.store(++gen_ << 32);  // seq_cst: publishes the job, ordered before reading sleeping_
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lk(sleep_mutex_);
      sleep_cv_.notify_all();
    }
    take_tasks();
    // Close the job to latecomers, then wait for the workers inside (running claimed tasks):
    // after that no worker reads this job's fields, which the next job rewrites.
    ticket_.fetch_or(kClosed);
    for (int spins = 0; (ticket_.load(std::memory_order_acquire) & kInside) != 0; ++spins) {
      if (spins < 128) pool_pause();
      else std::this_thread::yield();  // a worker was descheduled mid-task: let it run
    }
  }

 private:
  // ticket_: the job's generation (high 32 bits), a closed flag, and how many workers are in it.
  static constexpr uint64_t kClosed = 1ull << 31, kInside = kClosed - 1;

  void take_tasks() {
    for (int64_t t; (t = next_.fetch_add(1, std::memory_order_relaxed)) < tasks_;) (*fn_)(t);
  }

  void work_loop(int index) {
    uint64_t seen = 0;
    for (;;) {  // never returns
      uint64_t v = ticket_.load(std::memory_order_acquire);
      auto start = std::chrono::steady_clock::now();
      for (int spins = 0; (v >> 32) == seen; ++spins) {
        pool_pause();
        if ((spins & 255) == 255 && std::chrono::steady_clock::now() - start > kSpin) {
          std::unique_lock<std::mutex> lk(sleep_mutex_);
          sleeping_.fetch_add(1);
          sleep_cv_.wait(lk, [&] { return (ticket_.load() >> 32) != seen; });
          sleeping_.fetch_sub(1);
          start = std::chrono::steady_clock::now();
        }
        v = ticket_.load(std::memory_order_acquire);
      }
      seen = v >> 32;
      // Join only while the job is open and still this generation.
      while (!(v & kClosed) && (v >> 32) == seen) {
        if (ticket_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) {
          if (index < active_) take_tasks();
          ticket_.fetch_sub(1, std::memory_order_release);
          break;
        }
      }
    }
  }

  // How long an idle worker spins before sleeping: longer than the gaps between a decode
  // step's kernels, far shorter than a step (bench/NOTES.md, "worker pool").
  static constexpr std::chrono::microseconds kSpin{50};

  std::vector<std::thread> threads_;
  std::mutex job_mutex_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t tasks_ = 0;
  int active_ = 0;
  uint64_t gen_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int> sleeping_{0};
  std::mutex sleep_mutex_;
  std::condition_variable sleep_cv_;
};

// The process's pool: one per process, shared by both source files (an inline function's static
// is one object across translation units). Sized to the cores; created on first use.
inline Pool*& pool_slot() {
  static Pool* p = nullptr;
  return p;
}
inline std::mutex& pool_create_mutex() {
  static std::mutex m;
  return m;
}
inline void pool_forget_in_child() {
  pool_slot() = nullptr;  // the parent's workers do not exist here: never join or wait on them
  new (&pool_create_mutex()) std::mutex();  // it may have been held by another parent thread
}
inline Pool& pool() {
  std::lock_guard<std::mutex> lk(pool_create_mutex());
  Pool*& p = pool_slot();
  if (p == nullptr) {
    static bool registered = (pthread_atfork(nullptr, nullptr, pool_forget_in_child), true);
    (void)registered;
    int cores = static_cast<int>(std::thread::hardware_concurrency());
    p = new Pool(std::clamp(cores - 1, 0, 15));  // never deleted: workers live as long as the process
  }
  return *p;
}

// fn(j0, j1) over [0, n) split into chunks of at least `grain` items, on up to `threads` threads
// (the caller included). One thread when the whole range is a single chunk.
inline void parallel_for(int64_t n, int64_t grain, int threads, const std::function<void(int64_t, int64_t)>& fn) {
  grain = std::max<int64_t>(grain, 1);
  if (threads <= 1 || n <= grain) return fn(0, n);
  // A few chunks per thread: an unlucky thread (the machine is shared) holds up less.
  int64_t chunks = std::min<int64_t>((n + grain - 1) / grain, 4 * static_cast<int64_t>(threads));
  int64_t per = (n + chunks - 1) / chunks;
  chunks = (n + per - 1) / per;
  pool().run(chunks, threads, [&](int64_t c) { fn(c * per, std::min(n, (c + 1) * per)); });
}

}  // namespace mlxgen
