// Device helpers shared by the CUDA kernels: loads in the accumulation type, the non-finite flag,
// grid sizes and the fixed-order partial-sum kernel. The host-side helpers are in host.h.
//
// The kernels launch through FM_LAUNCH and take their stream and device guard from here, so that
// the same sources also build for the CPU emulator of the CUDA execution model (emu.h), with
// FASTMERGE_CUDA_EMULATION defined and the host compiler instead of nvcc.
#pragma once

#include <ATen/ATen.h>

#ifdef FASTMERGE_CUDA_EMULATION
#include "emu.h"
#else
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "host.h"

namespace fastmerge {
namespace cuda {

#ifdef FASTMERGE_CUDA_EMULATION
using Stream = int;  // the emulated stream runs every launch at once, in order
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
inline Stream current_stream() { return 0; }
using std::max;
using std::min;
// FM_LAUNCH(grid, block, dynamic shared bytes, stream, kernel)(arguments...)
#define FM_LAUNCH(grid, block, smem, stream, ...) ::fastmerge::emu::launcher(grid, block, smem, stream, &__VA_ARGS__)
#define FM_LAUNCH_CHECK() ((void)0)
#define FM_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::fastmerge::emu::dynamic_shared())
// FM_SHARED(type, name, n): a block's shared array of n elements.
#define FM_SHARED(type, name, n)                           \
  static thread_local ::fastmerge::emu::SharedSlot name##_slot; \
  type* name = name##_slot.get<type>(n)
#else
using Stream = cudaStream_t;
using DeviceGuard = c10::cuda::CUDAGuard;
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#define FM_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define FM_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define FM_DYNAMIC_SHARED(type, name) \
  extern __shared__ __align__(16) unsigned char name##_raw[]; \
  type* name = reinterpret_cast<type*>(name##_raw)
#define FM_SHARED(type, name, n) __shared__ type name[n]
#endif

constexpr int kThreads = 256;  // threads per block of every kernel here (the reductions rely on it)

template <typename in_t>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename in_t, typename acc_t>
__device__ __forceinline__ acc_t load_as(const Src& s, int64_t i) {
  return static_cast<acc_t>(static_cast<const in_t*>(s.ptr)[i * s.stride]);
}

template <typename acc_t>
__device__ __forceinline__ bool finite(acc_t v) {
#ifdef FASTMERGE_CUDA_EMULATION
  return std::isfinite(v);
#else
  return isfinite(v);
#endif
}

// Flags a non-finite value seen by this thread, once per thread.
__device__ __forceinline__ void raise_flag(bool bad, int* flag) {
  if (bad) atomicExch(flag, 1);
}

// Grid size for grid-stride loops over `work` units; any value gives the same results.
inline int64_t grid_for(int64_t work, int64_t cap = int64_t(1) << 16) {
  return std::max<int64_t>(1, std::min<int64_t>(work, cap));
}

// out[col * ngroups + g] = sum over rows r in [row_begin[g], row_begin[g + 1]) of part[r * stride + col],
// added in a fixed order that depends only on the row count (never on the grid or the device).
void ordered_sums(const double* part, int64_t stride, const int64_t* row_begin_dev, int64_t ngroups,
                  int64_t ncol, double* out, Stream stream);

}  // namespace cuda
}  // namespace fastmerge
