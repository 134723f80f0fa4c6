// block_scale forward (base + Σ_t coefs[t, b(i)] · v_t[i]) and its coefficient gradient
// (Σ_{i∈b} g_i · v_{t,i} in float64).
//
// Both walk work items: pieces of at most kItem entries inside one block, built on the host from
// the offsets, so a CUDA block knows its block id and coefficients without a per-entry search and
// empty blocks cost nothing. The backward writes one float64 partial per (item, task) with a fixed
// in-block tree, then ordered_sums adds each block's items in item order.
#include <ATen/Dispatch.h>

#include "common.cuh"
#include "ops_cuda.h"

namespace fastmerge {
namespace cuda {
namespace {

constexpr int64_t kItem = 8192;

template <typename in_t>
__global__ void block_scale_fwd_kernel(Src base, const Src* __restrict__ vectors, int T,
                                       const typename AccOf<in_t>::type* __restrict__ coefs, int64_t B,
                                       const int64_t* __restrict__ items, int64_t nitems, in_t* __restrict__ out,
                                       int* flag) {
  using acc_t = typename AccOf<in_t>::type;
  bool bad = false;
  for (int64_t it = blockIdx.x; it < nitems; it += gridDim.x) {
    const int64_t blk = items[3 * it], i0 = items[3 * it + 1], i1 = items[3 * it + 2];
    for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
      acc_t acc = load_as<in_t, acc_t>(base, i);
      bad = bad || !finite(acc);
      for (int t = 0; t < T; ++t) {
        const acc_t v = load_as<in_t, acc_t>(vectors[t], i);
        bad = bad || !finite(v);
        acc = acc + coefs[int64_t(t) * B + blk] * v;
      }
      out[i] = static_cast<in_t>(acc);
    }
  }
  raise_flag(bad, flag);
}

template <typename in_t>
__global__ void block_scale_bwd_kernel(Src grad, const Src* __restrict__ vectors, int T,
                                       const int64_t* __restrict__ items, int64_t nitems,
                                       double* __restrict__ part /* [nitems][T] */, int* flag) {
  FM_SHARED(double, sh, kThreads);
  bool bad = false;
  for (int64_t it = blockIdx.x; it < nitems; it += gridDim.x) {
    const int64_t i0 = items[3 * it + 1], i1 = items[3 * it + 2];
    for (int t = 0; t < T; ++t) {
      double acc = 0.0;
      for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
        const double g = load_as<in_t, double>(grad, i);
        const double v = load_as<in_t, double>(vectors[t], i);
        bad = bad || !finite(v) || (t == 0 && !finite(g));
        acc = acc + g * v;
      }
      sh[threadIdx.x] = acc;
      __syncthreads();
      for (int w = kThreads / 2; w > 0; w >>= 1) {
        if (int(threadIdx.x) < w) sh[threadIdx.x] = sh[threadIdx.x] + sh[threadIdx.x + w];
        __syncthreads();
      }
      if (threadIdx.x == 0) part[it * T + t] = sh[0];
      __syncthreads();
    }
  }
  raise_flag(bad, flag);
}

struct Prepared {
  std::vector<int64_t> off;
  Items items;
  at::Tensor items_dev;
};

Prepared prepare(const at::Tensor& first, const char* first_name, const std::vector<at::Tensor>& vectors,
                 const at::Tensor& coefs, const at::Tensor& offsets) {
  check_input(first, first_name);
  check_tasks(first, first_name, vectors, "vectors");
  Prepared p;
  p.off = check_offsets(offsets, first.numel(), "blocks");
  const int64_t T = int64_t(vectors.size()), B = int64_t(p.off.size()) - 1;
  TORCH_CHECK_VALUE(coefs.dim() == 2 && coefs.size(0) == T && coefs.size(1) == B, "coefs has shape ",
                    coefs.sizes(), "; expected [T, B] = [", T, ", ", B, "]");
  p.items = make_items(p.off, kItem);
  p.items_dev = to_device_i64(p.items.table, first.device());
  return p;
}

}  // namespace

at::Tensor block_scale(const at::Tensor& base, const std::vector<at::Tensor>& vectors, const at::Tensor& coefs,
                       const at::Tensor& offsets) {
  DeviceGuard guard(base.device());
  Prepared p = prepare(base, "base", vectors, coefs, offsets);
  TORCH_CHECK_VALUE(coefs.device() == base.device(), "mismatched devices: coefs is on ", coefs.device(),
                    " but base is on ", base.device());
  const auto cst = coefs.scalar_type();
  TORCH_CHECK_TYPE(cst == at::kFloat || cst == at::kBFloat16 || cst == at::kHalf || cst == at::kDouble,
                   "coefs has dtype ", cst, "; expected one of float32, bfloat16, float16, float64");
  const Stream stream = current_stream();
  const int64_t T = int64_t(vectors.size()), B = int64_t(p.off.size()) - 1, n = base.numel();
  // coefs[t].to(acc_t), as the reference rounds them: a dtype conversion of the small [T, B] table.
  const auto acc_type = base.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor c = coefs.detach().to(acc_type).contiguous();
  at::Tensor out = at::empty({n}, base.options());
  at::Tensor flag = new_flag(base.device());
  at::Tensor table = src_table(vectors, base.device());
  if (p.items.count > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "fastmerge_cuda_block_scale", [&] {
      using acc_t = typename AccOf<scalar_t>::type;
      FM_LAUNCH(grid_for(p.items.count), kThreads, 0, stream, block_scale_fwd_kernel<scalar_t>)(
          src_of(base), src_ptr(table), int(T), c.data_ptr<acc_t>(), B, p.items_dev.data_ptr<int64_t>(),
          p.items.count, out.data_ptr<scalar_t>(), flag.data_ptr<int>());
      FM_LAUNCH_CHECK();
    });
  }
  const bool coefs_finite = at::isfinite(coefs).all().item<bool>();
  if (flag_set(flag) || !coefs_finite) note_nonfinite();
  return out;
}

at::Tensor block_scale_backward(const at::Tensor& grad, const std::vector<at::Tensor>& vectors,
                                const at::Tensor& coefs, const at::Tensor& offsets) {
  DeviceGuard guard(grad.device());
  Prepared p = prepare(grad, "grad", vectors, coefs, offsets);
  const Stream stream = current_stream();
  const int64_t T = int64_t(vectors.size()), B = int64_t(p.off.size()) - 1;
  at::Tensor gc = at::empty({T, B}, grad.options().dtype(at::kDouble));
  if (T * B == 0) return gc;
  at::Tensor part = at::empty({std::max<int64_t>(1, p.items.count), T}, grad.options().dtype(at::kDouble));
  at::Tensor flag = new_flag(grad.device());
  at::Tensor table = src_table(vectors, grad.device());
  at::Tensor item_begin = to_device_i64(p.items.item_begin, grad.device());
  if (p.items.count > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "fastmerge_cuda_block_scale_bwd",
                                    [&] {
                                      FM_LAUNCH(grid_for(p.items.count), kThreads, 0, stream, block_scale_bwd_kernel<scalar_t>)(
                                              src_of(grad), src_ptr(table), int(T),
                                              p.items_dev.data_ptr<int64_t>(), p.items.count,
                                              part.data_ptr<double>(), flag.data_ptr<int>());
                                      FM_LAUNCH_CHECK();
                                    });
  }
  // gc[t, b] = Σ over block b's items, in item order (an empty block sums nothing: 0).
  ordered_sums(part.data_ptr<double>(), T, item_begin.data_ptr<int64_t>(), B, T, gc.data_ptr<double>(), stream);
  if (flag_set(flag)) note_nonfinite();
  return gc;
}

}  // namespace cuda
}  // namespace fastmerge
