// kiln's own parallel_for for the CPU ops: a work-claiming pool that never waits for a thread
// that has not started. OpenMP's fork-join (at::parallel_for) splits a range into one static
// piece per thread and joins at a barrier, so when another process holds a core, every op waits
// for the descheduled thread's piece (measured: two threads ran 6x slower than one under load).
// Here the range is cut into a few chunks per thread, the calling thread claims chunks like any
// worker, and the call returns once every chunk is done: a worker that is not running simply
// claims nothing, and a worker preempted mid-chunk holds up one small chunk, not half the op.
#pragma once

#include <cstdint>

namespace kiln::cpu {

using RangeFn = void (*)(const void* ctx, int64_t begin, int64_t end);

// Runs fn(ctx, b, e) over [begin, end) in chunks of at least `grain` (torch's thread count,
// at::get_num_threads, bounds the threads used). Chunks are independent: the result must not
// depend on which thread runs which chunk. Runs inline when the range is one chunk, on one
// thread, inside an OpenMP region, when another call holds the pool, or in a forked child.
// An exception thrown by fn is rethrown here (the first one) after every chunk has finished.
void parallel_for_impl(int64_t begin, int64_t end, int64_t grain, RangeFn fn, const void* ctx);

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  parallel_for_impl(
      begin, end, grain,
      [](const void* ctx, int64_t b, int64_t e) { (*static_cast<const F*>(ctx))(b, e); }, &f);
}

}  // namespace kiln::cpu
