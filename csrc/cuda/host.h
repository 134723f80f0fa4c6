// Host-side helpers of the CUDA ops (defined in ops_cuda.cpp, compiled by the host compiler):
// strided input descriptors and their device tables, argument checks and non-finite reports with
// the CPU layer's messages, and the work items of the blocked kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace fastmerge {
namespace cuda {

// A 1-D strided input: element i lives at ptr + i * stride (stride in elements). Tables of these
// (one per task) live in device memory, so the task count is not bounded by the kernel parameters.
struct Src {
  const void* ptr;
  int64_t stride;
};

// ---------------------------------------------------------------- host helpers (ops_cuda.cpp)

// Device copies of small host tables, through pinned memory and the current stream (the caching
// host allocator keeps the staging buffer alive until the copy has run).
at::Tensor to_device_i64(const std::vector<int64_t>& v, const at::Device& dev);
at::Tensor to_device_f64(const std::vector<double>& v, const at::Device& dev);

// Device table of T Src descriptors for the given tensors.
at::Tensor src_table(const std::vector<at::Tensor>& xs, const at::Device& dev);
inline Src src_of(const at::Tensor& x) { return Src{x.data_ptr(), x.stride(0)}; }
inline const Src* src_ptr(const at::Tensor& table) { return reinterpret_cast<const Src*>(table.data_ptr<int64_t>()); }

// Argument checks, with the CPU layer's messages.
void check_input(const at::Tensor& x, const std::string& name);
void check_tasks(const at::Tensor& like, const char* like_name, const std::vector<at::Tensor>& xs,
                 const char* name);
std::vector<int64_t> check_offsets(const at::Tensor& offsets, int64_t numel, const char* name);

// Called after a kernel flagged a non-finite value. The op then returns at once, and the Python
// layer (which asks take_nonfinite() after every call) finds the first offending input and index
// and raises the ValueError there: no C++ exception crosses the dispatcher on this path.
void note_nonfinite();
bool take_nonfinite();

// Work items: pieces of at most `chunk` entries that never cross a block (segment) boundary, so a
// CUDA block handling one item knows its block id without any search. Laid out as int64 triples
// (block, begin, end) in order; item_begin[b] is the first item of block b (B + 1 entries).
struct Items {
  std::vector<int64_t> table;       // 3 * count
  std::vector<int64_t> item_begin;  // B + 1
  int64_t count = 0;
};
Items make_items(const std::vector<int64_t>& offsets, int64_t chunk);

// A zeroed device int flag.
inline at::Tensor new_flag(const at::Device& dev) {
  return at::zeros({1}, at::TensorOptions().device(dev).dtype(at::kInt));
}
inline bool flag_set(const at::Tensor& flag) { return flag.item<int>() != 0; }


}  // namespace cuda
}  // namespace fastmerge
