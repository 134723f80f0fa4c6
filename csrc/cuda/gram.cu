// Gram matrix of the task vectors τ_t = θ_t − base, in float64.
//
// Stage 1: the input is cut into fixed chunks of kGramChunk entries (independent of the device).
// A block owns a chunk; it walks it in tiles, staging τ of every task for the tile's entries in
// shared memory (each input entry is read once), then each thread adds the products of the pairs
// it owns over the tile's entries in order, into that chunk's partial sums in global memory.
// Stage 2 adds the chunks' partials in a fixed order (ordered_sums). Pairs are (s, u) with s <= u;
// the symmetric T x T matrix is filled at the end.
#include <ATen/Dispatch.h>

#include "common.cuh"
#include "ops_cuda.h"

namespace fastmerge {
namespace cuda {
namespace {

constexpr int64_t kGramChunk = 16384;
constexpr int64_t kGramTileBytes = 40 * 1024;  // shared memory for the τ tile

template <typename in_t>
__global__ void gram_partial_kernel(Src base, const Src* __restrict__ thetas, int T, int64_t n, int64_t nchunks,
                                    int tile, const int* __restrict__ pairs, int64_t npairs,
                                    double* __restrict__ part, int* flag) {
  using acc_t = typename AccOf<in_t>::type;
  FM_DYNAMIC_SHARED(acc_t, sh);  // [T][tile]
  FM_SHARED(double, red, kThreads);
  // Threads per pair; fixed by T alone, so the summation order never depends on the device.
  const int lanes = npairs >= kThreads ? 1 : int(kThreads / npairs);
  bool bad = false;
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
    double* pc = part + c * npairs;
    for (int64_t p = threadIdx.x; p < npairs; p += blockDim.x) pc[p] = 0.0;
    const int64_t c0 = c * kGramChunk, c1 = min(n, c0 + kGramChunk);
    for (int64_t t0 = c0; t0 < c1; t0 += tile) {
      const int m = int(min(int64_t(tile), c1 - t0));
      for (int j = threadIdx.x; j < m; j += blockDim.x) {
        const acc_t b = load_as<in_t, acc_t>(base, t0 + j);
        bad = bad || !finite(b);
        for (int t = 0; t < T; ++t) {
          const acc_t x = load_as<in_t, acc_t>(thetas[t], t0 + j);
          bad = bad || !finite(x);
          sh[int64_t(t) * tile + j] = x - b;
        }
      }
      __syncthreads();
      if (lanes == 1) {
        for (int64_t p = threadIdx.x; p < npairs; p += blockDim.x) {
          const acc_t* a = sh + int64_t(pairs[2 * p]) * tile;
          const acc_t* e = sh + int64_t(pairs[2 * p + 1]) * tile;
          double acc = pc[p];
          for (int j = 0; j < m; ++j) acc = acc + double(a[j]) * double(e[j]);
          pc[p] = acc;
        }
      } else {
        // Fewer pairs than threads: `lanes` threads share a pair, lane r taking entries r, r + lanes,
        // ...; the lanes' sums are then added to the chunk's partial in lane order.
        const int p = int(threadIdx.x % npairs), r = int(threadIdx.x / npairs);
        double acc = 0.0;
        if (r < lanes) {
          const acc_t* a = sh + int64_t(pairs[2 * p]) * tile;
          const acc_t* e = sh + int64_t(pairs[2 * p + 1]) * tile;
          for (int j = r; j < m; j += lanes) acc = acc + double(a[j]) * double(e[j]);
        }
        red[threadIdx.x] = acc;
        __syncthreads();
        if (int64_t(threadIdx.x) < npairs) {
          double s = pc[p];
          for (int q = 0; q < lanes; ++q) s = s + red[q * npairs + p];
          pc[p] = s;
        }
      }
      __syncthreads();
    }
  }
  raise_flag(bad, flag);
}

__global__ void fill_symmetric(const double* __restrict__ sums, const int* __restrict__ pairs, int64_t npairs,
                               int T, double* __restrict__ G) {
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < npairs; p += int64_t(gridDim.x) * blockDim.x) {
    const int s = pairs[2 * p], u = pairs[2 * p + 1];
    G[int64_t(s) * T + u] = sums[p];
    G[int64_t(u) * T + s] = sums[p];
  }
}

}  // namespace

at::Tensor gram(const at::Tensor& base, const std::vector<at::Tensor>& thetas) {
  check_input(base, "base");
  check_tasks(base, "base", thetas, "thetas");
  const int64_t T = int64_t(thetas.size());
  const int64_t elem = base.scalar_type() == at::kDouble ? 8 : 4;
  // The tile holds τ of all T tasks for `tile` entries; it depends only on T and the dtype.
  const int64_t tile = std::min<int64_t>(kThreads, kGramTileBytes / (T * elem));
  TORCH_CHECK_VALUE(tile >= 1, "gram: at most ", kGramTileBytes / elem, " tasks are supported, got ", T);
  DeviceGuard guard(base.device());
  const Stream stream = current_stream();
  const auto dev = base.device();
  const int64_t n = base.numel();
  at::Tensor G = at::zeros({T, T}, base.options().dtype(at::kDouble));
  if (n == 0) return G;

  const int64_t npairs = T * (T + 1) / 2;
  std::vector<int64_t> pair_words;  // packed as int32 pairs inside int64 words
  std::vector<int32_t> pr;
  pr.reserve(size_t(2 * npairs));
  for (int32_t s = 0; s < int32_t(T); ++s)
    for (int32_t u = s; u < int32_t(T); ++u) {
      pr.push_back(s);
      pr.push_back(u);
    }
  pair_words.resize((pr.size() + 1) / 2);
  std::memcpy(pair_words.data(), pr.data(), pr.size() * sizeof(int32_t));
  at::Tensor pairs = to_device_i64(pair_words, dev);
  const int* pairs_ptr = reinterpret_cast<const int*>(pairs.data_ptr<int64_t>());

  const int64_t nchunks = (n + kGramChunk - 1) / kGramChunk;
  at::Tensor part = at::empty({nchunks, npairs}, base.options().dtype(at::kDouble));
  at::Tensor rows = to_device_i64({0, nchunks}, dev);
  at::Tensor sums = at::empty({npairs}, base.options().dtype(at::kDouble));
  at::Tensor table = src_table(thetas, dev);
  at::Tensor flag = new_flag(dev);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "fastmerge_cuda_gram", [&] {
    const size_t smem = size_t(T * tile * elem);
    FM_LAUNCH(grid_for(nchunks), kThreads, smem, stream, gram_partial_kernel<scalar_t>)(
        src_of(base), src_ptr(table), int(T), n, nchunks, int(tile), pairs_ptr, npairs, part.data_ptr<double>(),
        flag.data_ptr<int>());
    FM_LAUNCH_CHECK();
  });
  ordered_sums(part.data_ptr<double>(), npairs, rows.data_ptr<int64_t>(), 1, npairs, sums.data_ptr<double>(),
               stream);
  FM_LAUNCH(grid_for((npairs + kThreads - 1) / kThreads), kThreads, 0, stream, fill_symmetric)(
      sums.data_ptr<double>(), pairs_ptr, npairs, int(T), G.data_ptr<double>());
  FM_LAUNCH_CHECK();
  if (flag_set(flag)) note_nonfinite();
  return G;
}

}  // namespace cuda
}  // namespace fastmerge
