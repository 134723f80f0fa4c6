// Host-side argument checks shared by the CPU and CUDA op layers (same messages as the Python
// layer's fastmerge/_validate.py, for calls that reach the kernels directly, e.g. under torch.compile).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace fastmerge {

// Validated block / segment offsets as a contiguous int64 CPU tensor: 1-D, from 0 to numel,
// non-decreasing.
inline at::Tensor checked_offsets(const at::Tensor& offsets, int64_t numel, const char* name) {
  TORCH_CHECK_VALUE(offsets.dim() == 1, name, " must be a 1-D sequence of offsets, got shape ", offsets.sizes());
  TORCH_CHECK_VALUE(offsets.scalar_type() == at::kLong, name, " must hold int64 offsets, got dtype ",
                    offsets.scalar_type());
  at::Tensor off = offsets.to(at::kCPU).contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  const int64_t m = off.numel();
  TORCH_CHECK_VALUE(m >= 2, name, " must have at least two offsets (start 0 and end ", numel, ")");
  TORCH_CHECK_VALUE(o[0] == 0, name, " do not tile the buffer: the first offset is ", o[0], ", expected 0");
  TORCH_CHECK_VALUE(o[m - 1] == numel, name, " do not tile the buffer: the last offset is ", o[m - 1],
                    ", expected ", numel);
  for (int64_t b = 0; b + 1 < m; ++b)
    TORCH_CHECK_VALUE(o[b + 1] >= o[b], name, " do not tile the buffer: offsets decrease at block ", b, " (",
                      o[b], " -> ", o[b + 1], ")");
  return off;
}

}  // namespace fastmerge
