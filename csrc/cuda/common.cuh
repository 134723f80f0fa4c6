// Device helpers shared by the CUDA kernels: loads in the accumulation type, the non-finite flag,
// grid sizes and the fixed-order partial-sum kernel. The host-side helpers are in host.h.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "host.h"

namespace fastmerge {
namespace cuda {

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
  return isfinite(v);
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
                  int64_t ncol, double* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmerge
