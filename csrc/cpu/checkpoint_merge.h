// The checkpoint-merging kernels of checkpoint_merge.cpp (see there), bound in ops_cpu.cpp.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace fastmerge {
namespace cpu {

// One fused pass of the generalised task-arithmetic merge (see fastmerge/merge/reference.py) over
// entries [offset, offset + n) of a tensor (the inputs are those entries; rules and the random stream
// see whole-tensor indices; with `index`, entry j is entry index[j] of the tensor), into `out` when given.
at::Tensor ckpt_merge(const c10::optional<at::Tensor>& base, const std::vector<at::Tensor>& thetas,
                      const std::vector<double>& weights, const c10::optional<at::Tensor>& rules,
                      const c10::optional<at::Tensor>& streams, const std::vector<double>& keep_prob,
                      const std::vector<double>& scale, int64_t consensus, bool normalize, double lam,
                      bool guard_small_divisor, at::ScalarType out_dtype, int64_t offset,
                      const c10::optional<at::Tensor>& out, const c10::optional<at::Tensor>& index);

// The same pass, which also counts, for each model t with defer_bins[t] >= 0, the low 16 bits of the
// keys in that top-16-bit bin and records where they are: returns [out, hist int64 [T, 65536], then one
// int64 tensor per model of (low 16 bits << 40 | index), ascending by index, then the ascending union of
// those indices]. fastmerge/merge/select.py uses it to find the exact threshold in the merge pass
// itself and re-merge the few entries of the bins afterwards (ckpt_merge_at).
std::vector<at::Tensor> ckpt_merge_deferred(
    const c10::optional<at::Tensor>& base, const std::vector<at::Tensor>& thetas, const std::vector<double>& weights,
    const c10::optional<at::Tensor>& rules, const c10::optional<at::Tensor>& streams,
    const std::vector<double>& keep_prob, const std::vector<double>& scale, int64_t consensus, bool normalize,
    double lam, bool guard_small_divisor, at::ScalarType out_dtype, int64_t offset,
    const c10::optional<at::Tensor>& out, const c10::optional<at::Tensor>& index,
    const std::vector<int64_t>& defer_bins);

// The merge pass over entries index[0..k) only, of whole input tensors, written in place into the
// whole-tensor output `out` (whose dtype is the output dtype); other entries of `out` are left as they
// are. Returns out.
at::Tensor ckpt_merge_at(const c10::optional<at::Tensor>& base, const std::vector<at::Tensor>& thetas,
                         const std::vector<double>& weights, const c10::optional<at::Tensor>& rules,
                         const c10::optional<at::Tensor>& streams, const std::vector<double>& keep_prob,
                         const std::vector<double>& scale, int64_t consensus, bool normalize, double lam,
                         bool guard_small_divisor, at::Tensor& out, const at::Tensor& index);

// Per model, sum |delta| over all entries and over the kept ones (float64 [T, 2]).
at::Tensor ckpt_abs_sums(const c10::optional<at::Tensor>& base, const std::vector<at::Tensor>& thetas,
                         const c10::optional<at::Tensor>& rules, const c10::optional<at::Tensor>& streams,
                         const std::vector<double>& keep_prob, int64_t offset);

// Per model, a histogram (int64 [T, 65536]) of the magnitude keys of its deltas: prefix -1: their
// top 16 bits; else the low 16 bits of the keys whose top 16 bits equal the prefix. Summed over
// chunks, tensors or processes, two calls give the exact k-th largest |delta|. With `record`, one more
// int64 tensor per model lists (low 16 bits << 40 | offset + index) of the entries counted under a prefix.
std::vector<at::Tensor> ckpt_key_hist(const c10::optional<at::Tensor>& base, const std::vector<at::Tensor>& thetas,
                                      const std::vector<int64_t>& prefix, int64_t offset, bool record);

// The exact boundary keys of magnitude ranks in about one pass, for whole tensors: for each request j, a
// bracket of keys around the key of ascending rank ranks[j] of model models[j] is estimated from a
// sample (about 1/16 of the entries, the ranks within `margin` standard deviations, plus 32, of that rank),
// then one pass counts the keys above each bracket and records the keys in it, from which the key of the
// rank follows. Returns [int64 [J, 3]: (the key, the count of keys below it, the count equal to it), or
// (-1, 0, 0) where the bracket missed the rank, and for every request where some request got no
// bracket (a tensor too small to sample, a non-finite delta in the sample, more than record_limit
// entries expected in the brackets); then per request the ascending indices of the entries whose key
// equals it (none for a zero key, whose ties are never split)].
// fastmerge/merge/select.py falls back to the exact histograms on a miss.
// `row`: the length of the tensor's rows (0: none), by which the sample is stratified where it is at
// least a sample group (1024 entries) and divides the size.
std::vector<at::Tensor> ckpt_key_bracket(const c10::optional<at::Tensor>& base, const std::vector<at::Tensor>& thetas,
                                         const std::vector<int64_t>& models, const std::vector<int64_t>& ranks,
                                         double margin, int64_t record_limit, int64_t row = 0);

// Entries [start, start + n) of the counter-based stream `key`: 24 random bits each (int32).
at::Tensor ckpt_random_bits(int64_t key, int64_t start, int64_t n);
int64_t ckpt_crc32c(const at::Tensor& bytes, int64_t crc);

}  // namespace cpu
}  // namespace fastmerge
