// The checkpoint-merging kernels of checkpoint_merge.cpp (see there), bound in ops_cpu.cpp.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace fastmerge {
namespace cpu {

// Per model, the keep rule [lo_key, lo_a, lo_b, hi_key, hi_a, hi_b] (int64 [T, 6]) that keeps the
// entries of ranks [rank_lo, rank_hi) in the ascending order of |theta - base|, ties ordered by index
// (or by descending index where ties_by_high_index).
at::Tensor ckpt_select(const c10::optional<at::Tensor>& base, const std::vector<at::Tensor>& thetas,
                       const std::vector<int64_t>& rank_lo, const std::vector<int64_t>& rank_hi,
                       const std::vector<bool>& ties_by_high_index);

// One fused pass of the generalised task-arithmetic merge (see fastmerge/merge/reference.py) over
// entries [offset, offset + n) of a tensor (the inputs are those entries; rules and the random stream
// see whole-tensor indices), into `out` when given.
at::Tensor ckpt_merge(const c10::optional<at::Tensor>& base, const std::vector<at::Tensor>& thetas,
                      const std::vector<double>& weights, const c10::optional<at::Tensor>& rules,
                      const c10::optional<at::Tensor>& streams, const std::vector<double>& keep_prob,
                      const std::vector<double>& scale, int64_t consensus, bool normalize, double lam,
                      bool guard_small_divisor, at::ScalarType out_dtype, int64_t offset,
                      const c10::optional<at::Tensor>& out);

// Per model, sum |delta| over all entries and over the kept ones (float64 [T, 2]).
at::Tensor ckpt_abs_sums(const c10::optional<at::Tensor>& base, const std::vector<at::Tensor>& thetas,
                         const c10::optional<at::Tensor>& rules, const c10::optional<at::Tensor>& streams,
                         const std::vector<double>& keep_prob, int64_t offset);

// Per model, a histogram (int64 [T, 65536]) of the magnitude keys of its deltas: prefix -1: their
// top 16 bits; else the low 16 bits of the keys whose top 16 bits equal the prefix. Summed over
// tensors (or processes), two calls give the exact k-th largest |delta| over a whole model.
at::Tensor ckpt_key_hist(const c10::optional<at::Tensor>& base, const std::vector<at::Tensor>& thetas,
                         const std::vector<int64_t>& prefix);

// Entries [start, start + n) of the counter-based stream `key`: 24 random bits each (int32).
at::Tensor ckpt_random_bits(int64_t key, int64_t start, int64_t n);

}  // namespace cpu
}  // namespace fastmerge
