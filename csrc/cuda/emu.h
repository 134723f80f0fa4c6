// A CPU emulator of the CUDA execution model, used to run the CUDA kernels of this directory on CPU
// tensors where no GPU exists (the fastmerge._C_cuda_emu extension, FASTMERGE_CUDA_EMULATE=1).
//
// The .cu files are compiled by the host compiler with FASTMERGE_CUDA_EMULATION defined; common.cuh
// then includes this header instead of the CUDA runtime. What it models:
//  - a launch runs the blocks of the grid one after another; the threads of a block are fibers
//    (ucontext), each with its own stack, sharing the block's __shared__ arrays;
//  - a fiber runs until it reaches __syncthreads() or a warp shuffle, or returns. A block barrier
//    opens when every thread that has not returned waits at one; a warp barrier (the two halves of
//    a shuffle) when every live lane of the warp waits at one. A state where neither can open (a
//    barrier that some threads never reach) is reported as an error, not a hang;
//  - atomics are plain read-modify-writes (fibers never interleave inside one);
//  - dynamic shared memory is filled with 0xff bytes (NaN for floats) before every block, so a read
//    of a slot no thread wrote shows up in the results;
//  - FASTMERGE_CUDA_EMULATE_ORDER=reverse runs the blocks, and the threads between two barriers, in
//    reverse order. Results that depend on the order of blocks or threads (a race, a missing
//    barrier, an order-dependent float reduction) then differ from the forward run.
// What it does not model: the memory model of real hardware (no reordering, every write is seen at
// once), warp-synchronous code without *_sync intrinsics, and speed.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// One copy per block: blocks run one after another on one OS thread, and fibers share statics.
#define __shared__ static thread_local

namespace fastmerge {
namespace emu {

struct Index {
  unsigned int x = 0, y = 0, z = 0;
};

constexpr int kWarp = 32;
constexpr size_t kStackBytes = size_t(64) << 10;
constexpr int kMaxThreads = 1024;

enum class Wait { kRun, kBlock, kWarp, kDone };

struct Fiber {
  ucontext_t ctx;
  Index tid;
  Wait wait = Wait::kRun;
};

// State of the launch running on this OS thread.
struct Runtime {
  ucontext_t main;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<unsigned char> dyn_smem;
  uint64_t lanes[kMaxThreads];  // values posted by a warp shuffle
  Fiber* cur = nullptr;
  Index block, grid_dim, block_dim;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;  // the first exception a thread of the running block threw
};

inline Runtime& rt() {
  static thread_local Runtime r;
  return r;
}

inline bool reverse_order() {
  const char* v = std::getenv("FASTMERGE_CUDA_EMULATE_ORDER");
  return v != nullptr && std::strcmp(v, "reverse") == 0;
}

inline void fiber_entry() {
  Runtime& r = rt();
  try {
    (*r.body)();
  } catch (...) {  // an exception must not unwind past the fiber's first frame: hand it to the launch
    if (!r.error) r.error = std::current_exception();
  }
  r.cur->wait = Wait::kDone;
  swapcontext(&r.cur->ctx, &r.main);  // never resumed
}

// Gives control back to the block scheduler until the barrier `w` opens.
inline void wait_at(Wait w) {
  Runtime& r = rt();
  Fiber* me = r.cur;
  me->wait = w;
  swapcontext(&me->ctx, &r.main);
  r.cur = me;
}

// Runs one block to completion: fibers run until they block; then a full warp barrier or the block
// barrier opens, and the runnable fibers go again.
inline void run_block(int nthreads, bool reverse) {
  Runtime& r = rt();
  if (int(r.stacks.size()) < nthreads) {
    r.stacks.resize(size_t(nthreads));
    r.fibers.resize(size_t(nthreads));
  }
  for (int i = 0; i < nthreads; ++i) {
    if (!r.stacks[size_t(i)]) r.stacks[size_t(i)].reset(new char[kStackBytes]);
    Fiber& f = r.fibers[size_t(i)];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = r.stacks[size_t(i)].get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &r.main;
    makecontext(&f.ctx, fiber_entry, 0);
    f.tid = Index{unsigned(i), 0, 0};
    f.wait = Wait::kRun;
  }
  for (;;) {
    for (int j = 0; j < nthreads; ++j) {
      Fiber& f = r.fibers[size_t(reverse ? nthreads - 1 - j : j)];
      if (f.wait != Wait::kRun) continue;
      r.cur = &f;
      swapcontext(&r.main, &f.ctx);
    }
    if (r.error) {  // the other threads of the block are abandoned where they wait
      std::exception_ptr e = r.error;
      r.error = nullptr;
      std::rethrow_exception(e);
    }
    int done = 0, at_block = 0;
    bool opened = false;
    for (int w0 = 0; w0 < nthreads; w0 += kWarp) {
      const int w1 = std::min(nthreads, w0 + kWarp);
      int live = 0, at_warp = 0;
      for (int i = w0; i < w1; ++i) {
        const Wait s = r.fibers[size_t(i)].wait;
        done += s == Wait::kDone;
        at_block += s == Wait::kBlock;
        live += s != Wait::kDone;
        at_warp += s == Wait::kWarp;
      }
      if (at_warp > 0 && at_warp == live) {
        for (int i = w0; i < w1; ++i)
          if (r.fibers[size_t(i)].wait == Wait::kWarp) r.fibers[size_t(i)].wait = Wait::kRun;
        opened = true;
      }
    }
    if (done == nthreads) return;
    if (opened) continue;
    if (at_block == nthreads - done) {
      for (int i = 0; i < nthreads; ++i)
        if (r.fibers[size_t(i)].wait == Wait::kBlock) r.fibers[size_t(i)].wait = Wait::kRun;
      continue;
    }
    throw std::runtime_error("emulated CUDA kernel deadlocked in block " + std::to_string(r.block.x) + ": " +
                             std::to_string(at_block) + " threads wait at __syncthreads() while " +
                             std::to_string(nthreads - done - at_block) +
                             " others wait at a warp shuffle; " + std::to_string(done) + " have returned");
  }
}

inline void run_grid(int64_t grid, int64_t block, size_t smem, const std::function<void()>& body) {
  if (grid < 1 || grid > int64_t(0x7fffffff))
    throw std::runtime_error("emulated CUDA launch: invalid grid size " + std::to_string(grid));
  if (block < 1 || block > kMaxThreads)
    throw std::runtime_error("emulated CUDA launch: invalid block size " + std::to_string(block));
  if (smem > size_t(227) << 10)
    throw std::runtime_error("emulated CUDA launch: " + std::to_string(smem) +
                             " bytes of dynamic shared memory exceed the 227 KiB of a block");
  Runtime& r = rt();
  if (r.body != nullptr) throw std::runtime_error("emulated CUDA launch from inside a kernel");
  r.body = &body;
  r.grid_dim = Index{unsigned(grid), 1, 1};
  r.block_dim = Index{unsigned(block), 1, 1};
  r.dyn_smem.resize(std::max<size_t>(smem, 16));
  const bool reverse = reverse_order();
  try {
    for (int64_t j = 0; j < grid; ++j) {
      r.block = Index{unsigned(reverse ? grid - 1 - j : j), 0, 0};
      std::fill(r.dyn_smem.begin(), r.dyn_smem.end(), static_cast<unsigned char>(0xff));
      run_block(int(block), reverse);
    }
  } catch (...) {
    r.body = nullptr;
    r.cur = nullptr;
    throw;
  }
  r.body = nullptr;
  r.cur = nullptr;
}

// FM_LAUNCH(grid, block, smem, stream, kernel)(args...): copies the arguments as a launch does and
// runs the grid before returning (the emulated stream is synchronous).
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  int64_t grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... a) const {
    std::tuple<std::decay_t<P>...> args(static_cast<P>(std::forward<A>(a))...);
    auto k = kernel;
    const std::function<void()> body = [&args, k]() { std::apply(k, args); };
    run_grid(grid, block, smem, body);
  }
};

template <typename... P>
Launch<P...> launcher(int64_t grid, int64_t block, size_t smem, int /*stream: one, synchronous*/, void (*kernel)(P...)) {
  return Launch<P...>{kernel, grid, block, smem};
}

inline unsigned char* dynamic_shared() { return rt().dyn_smem.data(); }

}  // namespace emu
}  // namespace fastmerge

#define threadIdx (::fastmerge::emu::rt().cur->tid)
#define blockIdx (::fastmerge::emu::rt().block)
#define blockDim (::fastmerge::emu::rt().block_dim)
#define gridDim (::fastmerge::emu::rt().grid_dim)

inline void __syncthreads() { ::fastmerge::emu::wait_at(::fastmerge::emu::Wait::kBlock); }

// Atomics: fibers switch only at barriers, so a plain read-modify-write is atomic here.
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
  const unsigned int old = *p;
  *p = old + v;
  return old;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}
inline int atomicExch(int* p, int v) {
  const int old = *p;
  *p = v;
  return old;
}

// __shfl_down_sync over a full warp: every lane posts its value, waits for the warp, reads lane
// + delta (its own value past the warp's end), and waits again before the slots can be reused.
template <typename T>
inline T __shfl_down_sync(unsigned int mask, T v, unsigned int delta) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value, "shuffle of a wide type");
  using namespace ::fastmerge::emu;
  if (mask != 0xffffffffu) throw std::runtime_error("emulated __shfl_down_sync supports the full-warp mask only");
  Runtime& r = rt();
  const unsigned int me = r.cur->tid.x;
  uint64_t word = 0;
  std::memcpy(&word, &v, sizeof(T));
  r.lanes[me] = word;
  wait_at(Wait::kWarp);
  const unsigned int lane = me % kWarp, src = me + delta;
  T out = v;
  if (lane + delta < unsigned(kWarp) && src < r.block_dim.x) std::memcpy(&out, &r.lanes[src], sizeof(T));
  wait_at(Wait::kWarp);
  return out;
}
