// Data shared by the op layer of the checkpoint kernels (checkpoint_merge.cpp) and their
// per-instruction-set builds (ckpt_kernels.h). Plain data only: code here would be compiled with
// every build's flags and could reach a CPU without them.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <vector>

namespace fastmerge {
namespace cpu {

struct CkptInputs {
  at::ScalarType dt;
  const void* base;  // may be null (no base: linear)
  std::vector<const void*> th;  // one contiguous buffer per model, n entries each
  int64_t n;
};

// What the merge pass does (fastmerge/merge/reference.py is the formula).
struct CkptSpec {
  const int64_t* rules = nullptr;  // [T, 6] keep rules (see checkpoint_merge.cpp) or null (keep all)
  const uint64_t* streams = nullptr;  // [T] stream keys (random keep) or null
  const double* keep_prob = nullptr;  // [T]
  std::vector<float> scale;  // per model: rescale factor (1 = none)
  std::vector<float> weight;  // per model
  int consensus = 0;  // 0 none, 1 sum, 2 count
  bool normalize = false;
  double lam = 1.0;
  bool guard_small_divisor = true;  // |divisor| < 1e-8 -> 1 when there is no consensus
  int64_t offset = 0;  // index of the first entry within the whole tensor (rules and streams use it)
  const int64_t* index = nullptr;  // or each entry's own index (a gathered subset of a tensor)
  // With index: the inputs and the output are whole tensors, and the pass merges only their entries
  // index[0..selected), reading and writing each in place.
  bool scatter = false;
  int64_t selected = 0;
  // Deferred selection (ckpt_merge_deferred): per model the top-16-bit bin of its threshold, or -1;
  // out: per thread and model ([threads * T]) the records of the keys in that bin (low 16 bits << 40 |
  // index, ascending by index within each list), and their low 16 bits' histogram ([T][65536]).
  const int64_t* defer_bins = nullptr;
  int64_t* defer_hist = nullptr;
  std::vector<std::vector<uint64_t>>* defer_where = nullptr;
};

// One instruction-set build of the kernels. Each returns false when it met a non-finite delta or
// result (the op layer then finds and names it).
struct CkptKernels {
  const char* name;
  // Key histograms [models.size(), 65536] into `out` (see ckpt_kernels.h).
  bool (*key_hist)(const CkptInputs& in, const std::vector<int>& models, const std::vector<int64_t>& prefix,
                   int64_t* out, std::vector<std::vector<uint64_t>>* where);
  // The merge pass into `out` (n entries of out_dtype: float32, bfloat16, float16 or float64).
  bool (*merge)(const CkptInputs& in, const CkptSpec& spec, void* out, at::ScalarType out_dtype);
  // Per fixed chunk of 65536 entries and model: (sum |delta|, sum of the kept |delta|), [chunks][T][2].
  bool (*abs_sums)(const CkptInputs& in, const CkptSpec& spec, double* part);
  void (*random_bits)(int64_t key, int64_t start, int64_t n, int32_t* out);
  // The index of the first non-finite entry of the base (which = -1), else of thetas[which], with its
  // value; -1 when every input is finite.
  int64_t (*first_nonfinite)(const CkptInputs& in, int* which, float* value);
  // Sampled key brackets and the pass that counts the keys above them and records those in them
  // (see key_bracket in ckpt_kernels.h).
  bool (*key_bracket)(const CkptInputs& in, const std::vector<int>& models, const std::vector<int64_t>& ranks,
                      double margin, int64_t limit, int64_t row, int64_t* first, int64_t* last,
                      int64_t* above, std::vector<std::vector<uint64_t>>& where);
};

// The build in use (the one fastmerge._C.set_cpu_capability chose; ops_cpu.cpp).
const CkptKernels& ckpt_kernels();

const CkptKernels& ckpt_kernels_DEFAULT();
const CkptKernels& ckpt_kernels_AVX2();
const CkptKernels& ckpt_kernels_AVX512();

}  // namespace cpu
}  // namespace fastmerge
