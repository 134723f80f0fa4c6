// A CPU emulator of the CUDA execution model, used to run the CUDA kernels of this directory on CPU
// tensors where no GPU exists (the fastmerge._C_cuda_emu extension, FASTMERGE_CUDA_EMULATE=1).
//
// The .cu files are compiled by the host compiler with FASTMERGE_CUDA_EMULATION defined; common.cuh
// then includes this header instead of the CUDA runtime. What it models:
//  - a launch runs the blocks of the grid one after another; the threads of a block are fibers
//    (ucontext), each with its own stack (guard page below it), sharing the block's shared memory;
//  - a fiber runs until it reaches __syncthreads() or a warp shuffle, or returns. A block barrier
//    opens when every thread of the block waits at the same __syncthreads() call; a warp barrier
//    (the two halves of a shuffle) when every lane of the warp waits at the same shuffle call.
//    Threads waiting at different barriers, a barrier some threads never reach because they have
//    returned, and a shuffle that reads a returned lane are reported as errors, not hangs;
//  - atomics are plain read-modify-writes (fibers never interleave inside one);
//  - shared memory (FM_SHARED arrays and dynamic shared memory) is filled with 0xff bytes (NaN for
//    floats) before every block, so a read of a slot no thread of the block wrote shows up in the
//    results; a launch whose static plus dynamic shared memory exceeds 48 KiB is refused, as a
//    launch without a raised attribute limit is on the GPU;
//  - FASTMERGE_CUDA_EMULATE_ORDER=reverse runs the blocks, and the threads between two barriers, in
//    reverse order. Results that depend on the order of blocks or threads (a race, a missing
//    barrier, an order-dependent float reduction) then differ from the forward run.
// What it does not model: the memory model of real hardware (no reordering, every write is seen at
// once), bounds of global memory, warp-synchronous code without *_sync intrinsics, and speed.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

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

namespace fastmerge {
namespace emu {

struct Index {
  unsigned int x = 0, y = 0, z = 0;
};

constexpr int kWarp = 32;
constexpr size_t kStackBytes = size_t(256) << 10;  // reserved per fiber; pages are committed on use
constexpr int kMaxThreads = 1024;
constexpr size_t kMaxSharedBytes = size_t(48) << 10;

enum class Wait { kRun, kBlock, kWarp, kDone };

struct Fiber {
  ucontext_t ctx;
  Index tid;
  Wait wait = Wait::kRun;
  int line = 0;  // source line of the barrier it waits at
};

// A fiber stack from mmap, with an inaccessible guard page below it: an overflow faults at once
// instead of corrupting memory.
class Stack {
 public:
  Stack() {
    page_ = size_t(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, kStackBytes + page_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("emulated CUDA: cannot map a thread stack");
    mprotect(p, page_, PROT_NONE);
    base_ = static_cast<char*>(p);
  }
  ~Stack() { munmap(base_, kStackBytes + page_); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  char* top() const { return base_ + page_; }

 private:
  char* base_ = nullptr;
  size_t page_ = 0;
};

// State of the launch running on this OS thread.
struct Runtime {
  ucontext_t main;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<Stack>> stacks;
  std::vector<unsigned char> dyn_smem;
  uint64_t block_epoch = 0;    // advances at every block: FM_SHARED arrays are refilled once per block
  size_t static_smem = 0;      // bytes of FM_SHARED arrays in the running block
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

// Gives control back to the block scheduler until the barrier `w` (at source line `line`) opens.
inline void wait_at(Wait w, int line) {
  Runtime& r = rt();
  Fiber* me = r.cur;
  me->wait = w;
  me->line = line;
  swapcontext(&me->ctx, &r.main);
  r.cur = me;
}

// Opens a barrier: the fibers of [begin, end) that wait at `w` run again. They must all wait at the
// same call; `who` and `call` name the threads and the barrier in the error.
inline void release(int begin, int end, Wait w, const std::string& who, const char* call) {
  Runtime& r = rt();
  int line = -1;
  for (int i = begin; i < end; ++i) {
    Fiber& f = r.fibers[size_t(i)];
    if (f.wait != w) continue;
    if (line < 0) line = f.line;
    if (f.line != line)
      throw std::runtime_error("emulated CUDA kernel: " + who + " wait at different " + call + " calls (lines " +
                               std::to_string(line) + " and " + std::to_string(f.line) + ")");
    f.wait = Wait::kRun;
  }
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
    if (!r.stacks[size_t(i)]) r.stacks[size_t(i)].reset(new Stack());
    Fiber& f = r.fibers[size_t(i)];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = r.stacks[size_t(i)]->top();
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
      int at_warp = 0, warp_done = 0;
      for (int i = w0; i < w1; ++i) {
        const Wait st = r.fibers[size_t(i)].wait;
        warp_done += st == Wait::kDone;
        at_block += st == Wait::kBlock;
        at_warp += st == Wait::kWarp;
      }
      done += warp_done;
      if (at_warp > 0 && at_warp + warp_done == w1 - w0) {
        release(w0, w1, Wait::kWarp,
                "lanes of warp " + std::to_string(w0 / kWarp) + " in block " + std::to_string(r.block.x), "shuffle");
        opened = true;
      }
    }
    if (done == nthreads) return;
    if (opened) continue;
    if (at_block == nthreads) {
      release(0, nthreads, Wait::kBlock, "threads of block " + std::to_string(r.block.x), "__syncthreads()");
      continue;
    }
    if (done > 0 && at_block == nthreads - done)
      throw std::runtime_error("emulated CUDA kernel: in block " + std::to_string(r.block.x) + ", " +
                               std::to_string(done) + " threads returned while " + std::to_string(at_block) +
                               " wait at __syncthreads() (a barrier every thread must reach)");
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
  if (smem > kMaxSharedBytes)
    throw std::runtime_error("emulated CUDA launch: " + std::to_string(smem) +
                             " bytes of dynamic shared memory exceed the 48 KiB a launch gets by default");
  Runtime& r = rt();
  if (r.body != nullptr) throw std::runtime_error("emulated CUDA launch from inside a kernel");
  struct Running {  // the launch's state is cleared however the launch ends
    Runtime& r;
    ~Running() {
      r.body = nullptr;
      r.cur = nullptr;
    }
  } running{r};
  r.body = &body;
  r.grid_dim = Index{unsigned(grid), 1, 1};
  r.block_dim = Index{unsigned(block), 1, 1};
  const bool reverse = reverse_order();
  for (int64_t j = 0; j < grid; ++j) {
    r.block = Index{unsigned(reverse ? grid - 1 - j : j), 0, 0};
    ++r.block_epoch;
    r.static_smem = 0;
    r.dyn_smem.assign(smem, static_cast<unsigned char>(0xff));
    run_block(int(block), reverse);
  }
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

// Storage of one FM_SHARED array: the first thread of a block to reach the declaration refills it
// with 0xff bytes and counts it against the block's shared memory.
struct SharedSlot {
  std::vector<std::max_align_t> words;
  uint64_t epoch = 0;
  template <typename T>
  T* get(size_t n) {
    Runtime& r = rt();
    if (epoch != r.block_epoch) {
      const size_t bytes = n * sizeof(T);
      r.static_smem += bytes;
      if (r.static_smem + r.dyn_smem.size() > kMaxSharedBytes)
        throw std::runtime_error("emulated CUDA kernel: " + std::to_string(r.static_smem) + " bytes of static and " +
                                 std::to_string(r.dyn_smem.size()) +
                                 " of dynamic shared memory exceed the 48 KiB a launch gets by default");
      words.resize((bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t) + 1);
      std::memset(words.data(), 0xff, words.size() * sizeof(std::max_align_t));
      epoch = r.block_epoch;
    }
    return reinterpret_cast<T*>(words.data());
  }
};

}  // namespace emu
}  // namespace fastmerge

#define threadIdx (::fastmerge::emu::rt().cur->tid)
#define blockIdx (::fastmerge::emu::rt().block)
#define blockDim (::fastmerge::emu::rt().block_dim)
#define gridDim (::fastmerge::emu::rt().grid_dim)

inline void __syncthreads(int line = __builtin_LINE()) {
  ::fastmerge::emu::wait_at(::fastmerge::emu::Wait::kBlock, line);
}

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
inline T __shfl_down_sync(unsigned int mask, T v, unsigned int delta, int line = __builtin_LINE()) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value, "shuffle of a wide type");
  using namespace ::fastmerge::emu;
  if (mask != 0xffffffffu) throw std::runtime_error("emulated __shfl_down_sync supports the full-warp mask only");
  Runtime& r = rt();
  const unsigned int me = r.cur->tid.x;
  uint64_t word = 0;
  std::memcpy(&word, &v, sizeof(T));
  r.lanes[me] = word;
  wait_at(Wait::kWarp, line);
  const unsigned int lane = me % kWarp, src = me + delta;
  T out = v;
  if (lane + delta < unsigned(kWarp)) {
    if (src >= r.block_dim.x || r.fibers[src].wait == Wait::kDone)
      throw std::runtime_error("emulated __shfl_down_sync: lane " + std::to_string(me) + " reads thread " +
                               std::to_string(src) + ", which " +
                               (src >= r.block_dim.x ? "does not exist" : "has returned") + " (line " +
                               std::to_string(line) + ")");
    std::memcpy(&out, &r.lanes[src], sizeof(T));
  }
  wait_at(Wait::kWarp, line);
  return out;
}
