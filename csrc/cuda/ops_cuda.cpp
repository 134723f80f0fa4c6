// Registers the CUDA kernels as torch.ops.fastmerge_cuda.<name>, for the CUDA dispatch key only
// (a call with CPU tensors finds no kernel and raises). Loaded by `import fastmerge._C_cuda`.
//
// Built with FASTMERGE_CUDA_EMULATION (fastmerge._C_cuda_emu), the same kernels run in the CPU
// emulator of emu.h and register as torch.ops.fastmerge_cuda_emu.<name> for the CPU key instead:
// "device" memory is then CPU memory.
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <sstream>
#include <string>

#include "fastmerge/checks.h"
#include "host.h"
#include "ops_cuda.h"

namespace fastmerge {
namespace cuda {

namespace {

template <typename T>
at::Tensor upload(const std::vector<T>& v, at::ScalarType st, const at::Device& dev) {
  const int64_t n = std::max<int64_t>(1, int64_t(v.size()));  // never a zero-size allocation
#ifdef FASTMERGE_CUDA_EMULATION
  at::Tensor host = at::empty({n}, at::TensorOptions().dtype(st).device(dev));
  if (!v.empty()) std::memcpy(host.data_ptr(), v.data(), v.size() * sizeof(T));
  return host;
#else
  at::Tensor host = at::empty({n}, at::TensorOptions().dtype(st).pinned_memory(true));
  if (!v.empty()) std::memcpy(host.data_ptr(), v.data(), v.size() * sizeof(T));
  return host.to(dev, /*non_blocking=*/true);
#endif
}

}  // namespace

at::Tensor to_device_i64(const std::vector<int64_t>& v, const at::Device& dev) { return upload(v, at::kLong, dev); }
at::Tensor to_device_f64(const std::vector<double>& v, const at::Device& dev) { return upload(v, at::kDouble, dev); }

at::Tensor src_table(const std::vector<at::Tensor>& xs, const at::Device& dev) {
  static_assert(sizeof(Src) == 2 * sizeof(int64_t), "Src is packed as two int64 words");
  std::vector<int64_t> words;
  words.reserve(2 * xs.size());
  for (const auto& x : xs) {
    words.push_back(int64_t(reinterpret_cast<intptr_t>(x.data_ptr())));
    words.push_back(x.stride(0));
  }
  return to_device_i64(words, dev);
}

void check_input(const at::Tensor& x, const std::string& name) {
  TORCH_CHECK_VALUE(x.dim() == 1, name, " must be 1-D here (the Python layer flattens), got ", x.dim(), "-D");
#ifdef FASTMERGE_CUDA_EMULATION
  TORCH_CHECK_VALUE(x.is_cpu(), name, " must be a CPU tensor for the emulated cuda backend, got ", x.device());
#else
  TORCH_CHECK_VALUE(x.is_cuda(), name, " must be a CUDA tensor for the cuda backend, got ", x.device());
#endif
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble, name,
                   " has dtype ", st, "; expected one of float32, bfloat16, float16, float64");
}

void check_tasks(const at::Tensor& like, const char* like_name, const std::vector<at::Tensor>& xs,
                 const char* name) {
  TORCH_CHECK_VALUE(!xs.empty(), name, " is empty: at least one task (T >= 1) is needed");
  for (size_t t = 0; t < xs.size(); ++t) {
    const std::string nm = std::string(name) + "[" + std::to_string(t) + "]";
    TORCH_CHECK_VALUE(xs[t].dim() == 1, nm, " must be 1-D here (the Python layer flattens), got ", xs[t].dim(),
                      "-D");
    TORCH_CHECK_VALUE(xs[t].numel() == like.numel(), "mismatched shapes: ", nm, " has ", xs[t].numel(),
                      " elements but ", like_name, " has ", like.numel());
    TORCH_CHECK_VALUE(xs[t].scalar_type() == like.scalar_type(), "mismatched dtypes: ", nm, " is ",
                      xs[t].scalar_type(), " but ", like_name, " is ", like.scalar_type());
    TORCH_CHECK_VALUE(xs[t].device() == like.device(), "mismatched devices: ", nm, " is on ", xs[t].device(),
                      " but ", like_name, " is on ", like.device());
  }
}

std::vector<int64_t> check_offsets(const at::Tensor& offsets, int64_t numel, const char* name) {
  at::Tensor off = checked_offsets(offsets, numel, name);
  const int64_t* o = off.data_ptr<int64_t>();
  return std::vector<int64_t>(o, o + off.numel());
}

namespace {
thread_local bool g_nonfinite = false;  // set by the last op on this thread that met a NaN/Inf
}  // namespace

void note_nonfinite() { g_nonfinite = true; }

bool take_nonfinite() {
  const bool v = g_nonfinite;
  g_nonfinite = false;
  return v;
}

Items make_items(const std::vector<int64_t>& offsets, int64_t chunk) {
  Items it;
  const int64_t B = int64_t(offsets.size()) - 1;
  it.item_begin.resize(size_t(B + 1));
  for (int64_t b = 0; b < B; ++b) {
    it.item_begin[size_t(b)] = it.count;
    for (int64_t s = offsets[size_t(b)]; s < offsets[size_t(b + 1)]; s += chunk) {
      it.table.push_back(b);
      it.table.push_back(s);
      it.table.push_back(std::min(s + chunk, offsets[size_t(b + 1)]));
      ++it.count;
    }
  }
  it.item_begin[size_t(B)] = it.count;
  return it;
}

}  // namespace cuda
}  // namespace fastmerge

namespace {

void define_ops(torch::Library& m) {
  m.def("uniform_average(Tensor[] thetas, float[] weights) -> Tensor");
  m.def("task_arithmetic(Tensor base, Tensor[] thetas, float[] lam) -> Tensor");
  m.def("gram(Tensor base, Tensor[] thetas) -> Tensor");
  m.def("block_scale(Tensor base, Tensor[] vectors, Tensor coefs, Tensor offsets) -> Tensor");
  m.def("block_scale_backward(Tensor grad, Tensor[] vectors, Tensor coefs, Tensor offsets) -> Tensor");
  m.def(
      "merge_ties(Tensor base, Tensor[] thetas, float density, float lam, int mode, Tensor offsets, "
      "float[]? weights, int strategy) -> Tensor");
}

void impl_ops(torch::Library& m) {
  namespace C = fastmerge::cuda;
  m.impl("uniform_average", &C::uniform_average);
  m.impl("task_arithmetic", &C::task_arithmetic);
  m.impl("gram", &C::gram);
  m.impl("block_scale", &C::block_scale);
  m.impl("block_scale_backward", &C::block_scale_backward);
  m.impl("merge_ties", &C::merge_ties);
}

}  // namespace

#ifdef FASTMERGE_CUDA_EMULATION
TORCH_LIBRARY(fastmerge_cuda_emu, m) { define_ops(m); }
TORCH_LIBRARY_IMPL(fastmerge_cuda_emu, CPU, m) { impl_ops(m); }
#else
TORCH_LIBRARY(fastmerge_cuda, m) { define_ops(m); }
TORCH_LIBRARY_IMPL(fastmerge_cuda, CUDA, m) { impl_ops(m); }
#endif

// setup.py passes -DFASTMERGE_CUDA_ARCHS=80,90 (no quotes, so no shell quoting in the build files).
#define FM_STR_ARGS(...) #__VA_ARGS__
#define FM_STR(...) FM_STR_ARGS(__VA_ARGS__)

namespace {
std::string built_archs() {
#ifdef FASTMERGE_CUDA_ARCHS
  std::string s = FM_STR(FASTMERGE_CUDA_ARCHS);
#else
  std::string s = "unknown";
#endif
  for (char& c : s)
    if (c == ',') c = ';';  // the FASTMERGE_CUDA_ARCHS spelling: "80;90"
  return s;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef FASTMERGE_CUDA_EMULATION
  m.doc() = "fastmerge CUDA kernels in the CPU emulator; the ops live in torch.ops.fastmerge_cuda_emu";
#else
  m.doc() = "fastmerge CUDA kernels; the ops live in torch.ops.fastmerge_cuda (registered on import)";
#endif
  m.def("built_archs", &built_archs, "CUDA architectures this extension was compiled for, e.g. \"80;90\"");
  m.def("take_nonfinite", &fastmerge::cuda::take_nonfinite,
        "Whether the last op on this thread met a NaN/Inf (and clear that note)");
}
