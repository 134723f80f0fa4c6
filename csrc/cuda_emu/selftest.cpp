// Small kernels that check the emulator itself (emu.h), registered as
// torch.ops.fastmerge_cuda_emu.emulator_selftest(case) in the emulator build only:
//   0: warp-shuffle sums, then a shared-memory block sum behind __syncthreads, over 2 blocks of 256
//      threads: returns [2 * 9] int64 (8 warp sums and the block sum, per block);
//   1: one thread waits at a warp shuffle while the rest of its block waits at __syncthreads (the
//      emulator must report a deadlock);
//   2: a shuffle with a partial mask (unsupported: the exception must reach the caller);
//   3: returns the 64 floats of dynamic shared memory that no thread wrote (NaN bytes);
//   4: a kernel launched with a block of 1025 threads (too many);
//   5: thread 7 returns early while the others wait at __syncthreads (reported);
//   6: odd and even threads wait at two different __syncthreads calls (reported);
//   7: a shuffle reads a lane that has returned (reported);
//   8: block 0 fills a static shared array, block 1 reads it: returns block 1's view (NaN bytes);
//   9: a launch asking for 64 KiB of dynamic shared memory (more than the default 48 KiB).
#include <torch/library.h>

#include "common.cuh"

namespace fastmerge {
namespace cuda {
namespace {

__global__ void sums_kernel(int64_t* out) {
  FM_SHARED(int64_t, warp_sums, kThreads / 32);
  int64_t v = int64_t(blockIdx.x) * 1000 + threadIdx.x;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t total = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      out[blockIdx.x * 9 + w] = warp_sums[w];
      total += warp_sums[w];
    }
    out[blockIdx.x * 9 + 8] = total;
  }
}

__global__ void deadlock_kernel(int* out) {
  int v = int(threadIdx.x);
  if (threadIdx.x == 5)
    v = __shfl_down_sync(0xffffffffu, v, 1);
  else
    __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void partial_mask_kernel(int* out) { out[threadIdx.x] = __shfl_down_sync(0xffffu, int(threadIdx.x), 1); }

__global__ void unwritten_shared_kernel(float* out) {
  FM_DYNAMIC_SHARED(float, sh);
  out[threadIdx.x] = sh[threadIdx.x];
}

__global__ void early_return_kernel(int* out) {
  if (threadIdx.x == 7) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void split_barrier_kernel(int* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void returned_lane_kernel(int* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, int(threadIdx.x), 8);
}

__global__ void shared_per_block_kernel(float* out) {
  FM_SHARED(float, sh, 64);
  if (blockIdx.x == 0) sh[threadIdx.x] = 1.0f;
  __syncthreads();
  if (blockIdx.x == 1) out[threadIdx.x] = sh[threadIdx.x];
}

at::Tensor emulator_selftest(int64_t which) {
  const Stream stream = current_stream();
  at::Tensor sums = at::zeros({2 * 9}, at::TensorOptions().dtype(at::kLong));
  at::Tensor ints = at::zeros({kThreads}, at::TensorOptions().dtype(at::kInt));
  at::Tensor floats = at::zeros({64}, at::TensorOptions().dtype(at::kFloat));
  int* pi = ints.data_ptr<int>();
  float* pf = floats.data_ptr<float>();
  switch (which) {
    case 0: FM_LAUNCH(2, kThreads, 0, stream, sums_kernel)(sums.data_ptr<int64_t>()); return sums;
    case 1: FM_LAUNCH(1, kThreads, 0, stream, deadlock_kernel)(pi); return ints;
    case 2: FM_LAUNCH(1, 32, 0, stream, partial_mask_kernel)(pi); return ints;
    case 3: FM_LAUNCH(1, 64, 64 * sizeof(float), stream, unwritten_shared_kernel)(pf); return floats;
    case 4: FM_LAUNCH(1, 1025, 0, stream, deadlock_kernel)(pi); return ints;
    case 5: FM_LAUNCH(1, kThreads, 0, stream, early_return_kernel)(pi); return ints;
    case 6: FM_LAUNCH(1, kThreads, 0, stream, split_barrier_kernel)(pi); return ints;
    case 7: FM_LAUNCH(1, 32, 0, stream, returned_lane_kernel)(pi); return ints;
    case 8: FM_LAUNCH(2, 64, 0, stream, shared_per_block_kernel)(pf); return floats;
    case 9: FM_LAUNCH(1, 64, 64 << 10, stream, unwritten_shared_kernel)(pf); return floats;
  }
  TORCH_CHECK_VALUE(false, "emulator_selftest: unknown case ", which);
}

}  // namespace
}  // namespace cuda
}  // namespace fastmerge

// No tensor arguments, so a catch-all kernel (no dispatch key to choose one by).
TORCH_LIBRARY_FRAGMENT(fastmerge_cuda_emu, m) {
  m.def("emulator_selftest(int which) -> Tensor", &fastmerge::cuda::emulator_selftest);
}
