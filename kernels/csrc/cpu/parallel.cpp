// The work-claiming pool behind kiln::cpu::parallel_for (see parallel.h for why).
//
// One job at a time. Its chunks are claimed through one 64-bit word, `next_`:
// epoch (24 bits) | chunk count (20) | next chunk index (20). A claim is a compare-and-swap of
// that word, so a worker that read a job's parameters can only claim a chunk of that same job:
// the word only grows (index within a job, then epoch), so if it still holds the value the worker
// read before the parameters, the job has been current all along. `done_` counts finished
// chunks; the caller returns when it reaches the count, waiting only on chunks already claimed.
#include "parallel.h"

#include <ATen/Parallel.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace kiln::cpu {
namespace {

constexpr int kEpochShift = 40, kCountShift = 20;
constexpr uint64_t kField = (uint64_t{1} << 20) - 1;
// Chunks per thread: enough that a thread preempted mid-chunk holds up a small part of an op,
// few enough that claiming (one compare-and-swap) stays negligible beside a chunk.
constexpr int64_t kChunksPerThread = 4;

uint64_t epoch_of(uint64_t w) { return w >> kEpochShift; }
int64_t count_of(uint64_t w) { return static_cast<int64_t>((w >> kCountShift) & kField); }
int64_t index_of(uint64_t w) { return static_cast<int64_t>(w & kField); }

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// How long an idle worker polls for the next job before sleeping. Short: between two ops of a
// decode step the gap is tens of microseconds, and a longer spin takes a shared core from
// whoever else needs it. KILN_POOL_SPIN_US overrides it (0: always sleep).
int64_t spin_us() {
  static const int64_t us = [] {
    const char* s = std::getenv("KILN_POOL_SPIN_US");
    return s != nullptr && *s != '\0' ? std::max<int64_t>(0, std::atoll(s)) : int64_t{50};
  }();
  return us;
}

thread_local bool t_in_pool = false;  // a pool worker, or a caller inside a job
std::atomic<bool> g_forked{false};

class Pool {
 public:
  void run(int64_t begin, int64_t end, int64_t chunk, int64_t chunks, int threads, RangeFn fn,
           const void* ctx) {
    grow(threads - 1);
    error_ = nullptr;
    done_.store(0, std::memory_order_relaxed);
    fn_.store(fn, std::memory_order_relaxed);
    ctx_.store(ctx, std::memory_order_relaxed);
    begin_.store(begin, std::memory_order_relaxed);
    end_.store(end, std::memory_order_relaxed);
    chunk_.store(chunk, std::memory_order_relaxed);
    allowed_.store(threads - 1, std::memory_order_relaxed);
    epoch_ = (epoch_ + 1) & ((uint64_t{1} << 24) - 1);
    const uint64_t word = (epoch_ << kEpochShift) | (static_cast<uint64_t>(chunks) << kCountShift);
    next_.store(word, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lock(mu_); }
      cv_.notify_all();
    }
    work(epoch_);
    // Only chunks already claimed remain: poll briefly, then sleep until the last one is done.
    // Sleeping rather than spinning leaves this core idle, so the kernel can pull a worker that
    // another process preempted while it held a chunk over to this core, instead of waiting.
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us());
    while (done_.load(std::memory_order_acquire) < chunks &&
           std::chrono::steady_clock::now() < until) {
      for (int i = 0; i < 64; ++i) cpu_relax();
    }
    if (done_.load(std::memory_order_acquire) < chunks) {
      std::unique_lock<std::mutex> lock(mu_);
      caller_waiting_.store(true, std::memory_order_seq_cst);
      done_cv_.wait(lock, [&] { return done_.load(std::memory_order_seq_cst) >= chunks; });
      caller_waiting_.store(false, std::memory_order_relaxed);
    }
    if (error_) std::rethrow_exception(error_);
  }

 private:
  // Claims and runs chunks of job `epoch` until none is left.
  void work(uint64_t epoch) {
    for (;;) {
      uint64_t w = next_.load(std::memory_order_acquire);
      if (epoch_of(w) != epoch || index_of(w) >= count_of(w)) return;
      const RangeFn fn = fn_.load(std::memory_order_relaxed);
      const void* ctx = ctx_.load(std::memory_order_relaxed);
      const int64_t begin = begin_.load(std::memory_order_relaxed);
      const int64_t end = end_.load(std::memory_order_relaxed);
      const int64_t chunk = chunk_.load(std::memory_order_relaxed);
      if (!next_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel)) continue;
      const int64_t b = begin + index_of(w) * chunk;
      try {
        fn(ctx, b, std::min(end, b + chunk));
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mu_);
        if (!error_) error_ = std::current_exception();
      }
      if (done_.fetch_add(1, std::memory_order_seq_cst) + 1 == count_of(w) &&
          caller_waiting_.load(std::memory_order_seq_cst)) {
        { std::lock_guard<std::mutex> lock(mu_); }
        done_cv_.notify_one();
      }
    }
  }

  void grow(int workers) {
    while (static_cast<int>(spawned_) < workers) {
      const int index = spawned_++;
      std::thread([this, index] { loop(index); }).detach();  // the pool lives until exit
    }
  }

  void loop(int index) {
    t_in_pool = true;
    uint64_t seen = epoch_of(next_.load(std::memory_order_acquire));
    for (;;) {
      uint64_t epoch = epoch_of(next_.load(std::memory_order_acquire));
      if (epoch == seen) {
        // Poll for a while, then sleep until the next job is published.
        const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us());
        while (epoch == seen && std::chrono::steady_clock::now() < until) {
          for (int i = 0; i < 64; ++i) cpu_relax();
          epoch = epoch_of(next_.load(std::memory_order_acquire));
        }
        if (epoch == seen) {
          std::unique_lock<std::mutex> lock(mu_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          cv_.wait(lock, [&] {
            return epoch_of(next_.load(std::memory_order_seq_cst)) != seen;
          });
          sleepers_.fetch_sub(1, std::memory_order_relaxed);
          continue;
        }
      }
      seen = epoch;
      // Workers past this job's thread count sit it out (torch.set_num_threads lowered).
      if (index < allowed_.load(std::memory_order_relaxed)) work(epoch);
    }
  }

  std::atomic<uint64_t> next_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<RangeFn> fn_{nullptr};
  std::atomic<const void*> ctx_{nullptr};
  std::atomic<int64_t> begin_{0}, end_{0}, chunk_{1};
  std::atomic<int> allowed_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> caller_waiting_{false};
  uint64_t epoch_ = 0;  // the caller's (one caller at a time)
  int spawned_ = 0;     // likewise
  std::mutex mu_;
  std::condition_variable cv_;       // workers wait here for a job
  std::condition_variable done_cv_;  // the caller waits here for the last chunk
  std::mutex error_mu_;
  std::exception_ptr error_;
};

std::atomic<bool> g_busy{false};

Pool& pool() {
  // Never destroyed: its detached workers may still be polling when the process exits.
  static Pool* p = [] {
    // A forked child has none of the workers: it runs every call inline.
    pthread_atfork(nullptr, nullptr, [] { g_forked.store(true); });
    return new Pool();
  }();
  return *p;
}

}  // namespace

void parallel_for_impl(int64_t begin, int64_t end, int64_t grain, RangeFn fn, const void* ctx) {
  const int64_t range = end - begin;
  if (range <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  int64_t chunks = std::min<int64_t>((range + grain - 1) / grain, threads * kChunksPerThread);
  chunks = std::min<int64_t>(chunks, static_cast<int64_t>(kField));
  if (chunks <= 1 || threads <= 1 || t_in_pool || g_forked.load(std::memory_order_relaxed) ||
      g_busy.exchange(true, std::memory_order_acquire)) {
    fn(ctx, begin, end);
    return;
  }
  const int64_t chunk = (range + chunks - 1) / chunks;
  chunks = (range + chunk - 1) / chunk;
  t_in_pool = true;
  try {
    pool().run(begin, end, chunk, chunks, static_cast<int>(std::min<int64_t>(threads, chunks)),
               fn, ctx);
  } catch (...) {
    t_in_pool = false;
    g_busy.store(false, std::memory_order_release);
    throw;
  }
  t_in_pool = false;
  g_busy.store(false, std::memory_order_release);
}

}  // namespace kiln::cpu
