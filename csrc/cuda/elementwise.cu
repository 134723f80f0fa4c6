// uniform_average and task_arithmetic: one grid-stride pass, every task of an entry summed in task
// order by one thread (no reduction across threads, so any launch gives the same bits).
#include <ATen/Dispatch.h>

#include "common.cuh"
#include "ops_cuda.h"

namespace fastmerge {
namespace cuda {
namespace {

template <typename in_t>
__global__ void average_kernel(const Src* __restrict__ thetas, const double* __restrict__ weights, int T,
                               int64_t n, in_t* __restrict__ out, int* flag) {
  using acc_t = typename AccOf<in_t>::type;
  // Σ w_t in task order, in the accumulation type, as the reference does.
  acc_t wsum = acc_t(weights[0]);
  for (int t = 1; t < T; ++t) wsum = wsum + acc_t(weights[t]);
  bool bad = false;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    acc_t x = load_as<in_t, acc_t>(thetas[0], i);
    bad = bad || !finite(x);
    acc_t acc = x * acc_t(weights[0]);
    for (int t = 1; t < T; ++t) {
      x = load_as<in_t, acc_t>(thetas[t], i);
      bad = bad || !finite(x);
      acc = acc + x * acc_t(weights[t]);
    }
    out[i] = static_cast<in_t>(acc / wsum);
  }
  raise_flag(bad, flag);
}

template <typename in_t>
__global__ void task_arith_kernel(Src base, const Src* __restrict__ thetas, const double* __restrict__ lam, int T,
                                  int64_t n, in_t* __restrict__ out, int* flag) {
  using acc_t = typename AccOf<in_t>::type;
  bool bad = false;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const acc_t b = load_as<in_t, acc_t>(base, i);
    bad = bad || !finite(b);
    acc_t acc = b;
    for (int t = 0; t < T; ++t) {
      const acc_t x = load_as<in_t, acc_t>(thetas[t], i);
      bad = bad || !finite(x);
      acc = acc + acc_t(lam[t]) * (x - b);
    }
    out[i] = static_cast<in_t>(acc);
  }
  raise_flag(bad, flag);
}

int64_t elementwise_grid(int64_t n) { return grid_for((n + kThreads - 1) / kThreads, int64_t(1) << 15); }

}  // namespace

at::Tensor uniform_average(const std::vector<at::Tensor>& thetas, const std::vector<double>& weights) {
  TORCH_CHECK_VALUE(!thetas.empty(), "thetas is empty: at least one task (T >= 1) is needed");
  check_input(thetas[0], "thetas[0]");
  check_tasks(thetas[0], "thetas[0]", thetas, "thetas");
  const int64_t T = int64_t(thetas.size());
  TORCH_CHECK_VALUE(int64_t(weights.size()) == T, "weights has ", weights.size(), " entries but there are ", T,
                    " tasks");
  double wtotal = 0;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK_VALUE(std::isfinite(weights[t]) && weights[t] >= 0, "weights[", t,
                      "] must be finite and >= 0, got ", weights[t]);
    wtotal += weights[t];
  }
  TORCH_CHECK_VALUE(wtotal > 0, "weights sum to zero");
  const at::Tensor& x0 = thetas[0];
  DeviceGuard guard(x0.device());
  const Stream stream = current_stream();
  const int64_t n = x0.numel();
  at::Tensor out = at::empty({n}, x0.options().memory_format(at::MemoryFormat::Contiguous));
  if (n == 0) return out;
  at::Tensor table = src_table(thetas, x0.device());
  at::Tensor w = to_device_f64(weights, x0.device());
  at::Tensor flag = new_flag(x0.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "fastmerge_cuda_uniform_average", [&] {
    FM_LAUNCH(elementwise_grid(n), kThreads, 0, stream, average_kernel<scalar_t>)(
        src_ptr(table), w.data_ptr<double>(), int(T), n, out.data_ptr<scalar_t>(), flag.data_ptr<int>());
    FM_LAUNCH_CHECK();
  });
  if (flag_set(flag)) note_nonfinite();
  return out;
}

at::Tensor task_arithmetic(const at::Tensor& base, const std::vector<at::Tensor>& thetas,
                           const std::vector<double>& lam) {
  check_input(base, "base");
  check_tasks(base, "base", thetas, "thetas");
  const int64_t T = int64_t(thetas.size());
  TORCH_CHECK_VALUE(int64_t(lam.size()) == T, "lam has ", lam.size(), " entries but there are ", T, " tasks");
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK_VALUE(std::isfinite(lam[t]), "lam[", t, "] is not finite (", lam[t], ")");
  DeviceGuard guard(base.device());
  const Stream stream = current_stream();
  const int64_t n = base.numel();
  at::Tensor out = at::empty({n}, base.options().memory_format(at::MemoryFormat::Contiguous));
  if (n == 0) return out;
  at::Tensor table = src_table(thetas, base.device());
  at::Tensor l = to_device_f64(lam, base.device());
  at::Tensor flag = new_flag(base.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "fastmerge_cuda_task_arithmetic", [&] {
    FM_LAUNCH(elementwise_grid(n), kThreads, 0, stream, task_arith_kernel<scalar_t>)(
        src_of(base), src_ptr(table), l.data_ptr<double>(), int(T), n, out.data_ptr<scalar_t>(),
        flag.data_ptr<int>());
    FM_LAUNCH_CHECK();
  });
  if (flag_set(flag)) note_nonfinite();
  return out;
}

}  // namespace cuda
}  // namespace fastmerge
