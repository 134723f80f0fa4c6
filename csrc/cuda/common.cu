// The fixed-order partial-sum kernel shared by gram and block_scale_backward.
#include "common.cuh"

namespace fastmerge {
namespace cuda {

namespace {

// One block per output; thread j adds rows j, j + kThreads, ... in order, then a fixed tree adds
// the kThreads partial sums. The order depends only on the number of rows.
__global__ void ordered_sums_kernel(const double* __restrict__ part, int64_t stride,
                                    const int64_t* __restrict__ row_begin, int64_t ngroups, int64_t ncol,
                                    double* __restrict__ out) {
  FM_SHARED(double, sh, kThreads);
  const int64_t nout = ngroups * ncol;
  for (int64_t o = blockIdx.x; o < nout; o += gridDim.x) {
    const int64_t col = o / ngroups, g = o % ngroups;
    const int64_t r0 = row_begin[g], r1 = row_begin[g + 1];
    double acc = 0.0;
    for (int64_t r = r0 + threadIdx.x; r < r1; r += kThreads) acc = acc + part[r * stride + col];
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (int w = kThreads / 2; w > 0; w >>= 1) {
      if (int(threadIdx.x) < w) sh[threadIdx.x] = sh[threadIdx.x] + sh[threadIdx.x + w];
      __syncthreads();
    }
    if (threadIdx.x == 0) out[col * ngroups + g] = sh[0];
    __syncthreads();  // sh is reused by the next output
  }
}

}  // namespace

void ordered_sums(const double* part, int64_t stride, const int64_t* row_begin_dev, int64_t ngroups, int64_t ncol,
                  double* out, Stream stream) {
  const int64_t nout = ngroups * ncol;
  if (nout == 0) return;
  FM_LAUNCH(grid_for(nout), kThreads, 0, stream, ordered_sums_kernel)(part, stride, row_begin_dev, ngroups, ncol, out);
  FM_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace fastmerge
