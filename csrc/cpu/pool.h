// A parallel loop for the checkpoint kernels on threads that sleep between calls.
//
// at::parallel_for runs on OpenMP, whose idle workers spin for a while after every parallel region.
// A checkpoint merge calls its kernels once per tensor, with Python, the prefetching reads and the
// output writer running in between; on a machine with few cores the spinning workers take the cores
// those threads need. This pool's workers block on a condition variable instead: waking them costs a
// few microseconds per call, against kernels of milliseconds.
//
// The range is cut into contiguous pieces of at least `grain` (up to kPiecesPerThread per thread, at
// most at::get_num_threads() threads), which the threads claim in ascending order, so each thread sees
// its pieces in index order. pool_thread_num() plays the part of at::get_thread_num(). A call made
// from inside a running loop, or while another thread's loop runs, runs serially on the calling thread.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace fastmerge {
namespace cpu {

// The caller's piece number inside a pool loop (0 outside one).
int pool_thread_num();

// Runs task(ctx, k) for k in [0, tasks) on the pool (k = 0 on the calling thread) and returns when
// all are done; the first exception thrown by a task is rethrown here.
void pool_run(int tasks, void (*task)(void*, int), void* ctx);

// Pieces per thread in pool_for: small enough to even out the threads, large enough to stream.
constexpr int64_t kPiecesPerThread = 8;

template <typename F>
void pool_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  const int64_t range = end - begin;
  const int64_t g = std::max<int64_t>(1, grain);
  const int64_t most = (range + g - 1) / g;  // pieces of at least `grain`
  const int tasks = int(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), most)));
  // Each thread claims the next piece until none is left. With several pieces per thread, a thread
  // that the operating system sets aside (the writer or the prefetching reads need a core too) leaves
  // its share to the others instead of holding up the whole loop.
  const int64_t pieces = tasks == 1 ? 1 : std::min<int64_t>(most, int64_t(tasks) * kPiecesPerThread);
  const int64_t step = (range + pieces - 1) / pieces;
  struct Ctx {
    const F* f;
    int64_t begin, end, step, pieces;
    std::atomic<int64_t> next{0};
  } ctx{&f, begin, end, step, pieces};
  pool_run(
      tasks,
      [](void* p, int) {
        Ctx& c = *static_cast<Ctx*>(p);
        for (int64_t k = c.next.fetch_add(1); k < c.pieces; k = c.next.fetch_add(1)) {
          const int64_t a = c.begin + k * c.step;
          const int64_t b = std::min(c.end, a + c.step);
          if (a < b) (*c.f)(a, b);
        }
      },
      &ctx);
}

}  // namespace cpu
}  // namespace fastmerge
