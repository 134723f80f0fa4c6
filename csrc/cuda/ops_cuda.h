// Entry points of the CUDA kernels (each defined in its own .cu file), registered for the CUDA
// dispatch key as torch.ops.fastmerge_cuda.<name> by ops_cuda.cpp. Arguments mirror the CPU
// extension's: flat 1-D tensors (any strides), a list of T task tensors (a [T, d] input arrives as
// T row views), validated int64 CPU offsets [B + 1] for blocks and TIES segments.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <vector>

namespace fastmerge {
namespace cuda {

at::Tensor uniform_average(const std::vector<at::Tensor>& thetas, const std::vector<double>& weights);
at::Tensor task_arithmetic(const at::Tensor& base, const std::vector<at::Tensor>& thetas,
                           const std::vector<double>& lam);
// T x T Gram matrix of the task vectors, float64.
at::Tensor gram(const at::Tensor& base, const std::vector<at::Tensor>& thetas);
at::Tensor block_scale(const at::Tensor& base, const std::vector<at::Tensor>& vectors, const at::Tensor& coefs,
                       const at::Tensor& offsets);
// dL/dcoefs [T, B] in float64.
at::Tensor block_scale_backward(const at::Tensor& grad, const std::vector<at::Tensor>& vectors,
                                const at::Tensor& coefs, const at::Tensor& offsets);
// mode: 0 mean, 1 sum, 2 max. offsets: [0, d] for scope global, the tensor boundaries for scope
// tensor. strategy: 0 auto, 1 one-pass (sampled bracket), 2 two-pass (exact selection first).
at::Tensor merge_ties(const at::Tensor& base, const std::vector<at::Tensor>& thetas, double density, double lam,
                      int64_t mode, const at::Tensor& offsets, const c10::optional<std::vector<double>>& weights,
                      int64_t strategy);

}  // namespace cuda
}  // namespace fastmerge
