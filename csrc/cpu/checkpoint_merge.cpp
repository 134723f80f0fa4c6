// The op layer of the checkpoint-merging kernels (the kernels are in ckpt_kernels.h, one build per
// instruction set) for the methods (fastmerge/merge/methods.py): the generalised
// task-arithmetic family (linear, task arithmetic, TIES, breadcrumbs, DARE) as one pass per tensor,
// the histograms of |delta| from which fastmerge/merge/select.py finds each model's exact magnitude
// threshold, and the counter-based random stream of the random methods. Bound to Python through fastmerge._C (ops_cpu.cpp).
//
// Invariants:
// - a delta is float(theta) - float(base), rounded in float32 as the reference computes it;
// - a "keep rule" per model decides, from the magnitude key of the delta (its float32 bits with the
//   sign cleared, which orders like |delta|) and the entry's index, whether the entry survives
//   sparsification (rules are built by fastmerge/merge/select.py: ties at a boundary key are split by
//   index, as a stable sort would);
// - every reduction that produces a floating value runs over fixed chunks in a fixed order, so the
//   results do not depend on the thread count.
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "checkpoint_merge.h"
#include "ckpt_types.h"

namespace fastmerge {
namespace cpu {
namespace {

constexpr int64_t kChunk = 1 << 16;  // the fixed chunk of ckpt_abs_sums' partial sums (ckpt_kernels.h)

CkptInputs gather(const c10::optional<at::Tensor>& base, const std::vector<at::Tensor>& thetas) {
  TORCH_CHECK_VALUE(!thetas.empty(), "thetas is empty: at least one model is needed");
  CkptInputs in;
  in.dt = thetas[0].scalar_type();
  in.n = thetas[0].numel();
  TORCH_CHECK_VALUE(in.dt == at::kFloat || in.dt == at::kBFloat16 || in.dt == at::kHalf || in.dt == at::kDouble,
                    "checkpoint merge kernels take float32, bfloat16, float16 or float64 tensors, got ", in.dt);
  for (size_t t = 0; t < thetas.size(); ++t) {
    const auto& x = thetas[t];
    TORCH_CHECK_VALUE(x.device().is_cpu() && x.is_contiguous(), "thetas[", t, "] must be a contiguous CPU tensor");
    TORCH_CHECK_VALUE(x.scalar_type() == in.dt, "mismatched dtypes: thetas[", t, "] is ", x.scalar_type(), ", thetas[0] is ",
                      in.dt);
    TORCH_CHECK_VALUE(x.numel() == in.n, "mismatched sizes: thetas[", t, "] has ", x.numel(), " entries, thetas[0] ", in.n);
    in.th.push_back(x.data_ptr());
  }
  in.base = nullptr;
  if (base.has_value()) {
    const auto& b = *base;
    TORCH_CHECK_VALUE(b.device().is_cpu() && b.is_contiguous(), "base must be a contiguous CPU tensor");
    TORCH_CHECK_VALUE(b.scalar_type() == in.dt, "mismatched dtypes: base is ", b.scalar_type(), ", thetas ", in.dt);
    TORCH_CHECK_VALUE(b.numel() == in.n, "mismatched sizes: base has ", b.numel(), " entries, thetas ", in.n);
    in.base = b.data_ptr();
  }
  return in;
}

// Index and value of the first non-finite entry among the inputs (called after a kernel saw one).
[[noreturn]] void raise_nonfinite(const CkptInputs& in) {
  int which = 0;
  float value = 0.0f;
  const int64_t i = ckpt_kernels().first_nonfinite(in, &which, &value);
  if (i >= 0) {
    const std::string name = which < 0 ? std::string("base") : "thetas[" + std::to_string(which) + "]";
    TORCH_CHECK_VALUE(false, name, " contains a non-finite value (", value, ") at index ", i);
  }
  TORCH_CHECK_VALUE(false, "a delta overflowed to infinity (finite inputs): the merge is undefined there");
}

CkptSpec make_spec(int T, const c10::optional<at::Tensor>& rules, const c10::optional<at::Tensor>& streams,
                    const std::vector<double>& keep_prob, const std::vector<double>& scale,
                    const std::vector<double>& weight) {
  TORCH_CHECK_VALUE(T <= 64, "at most 64 models per merge, got ", T);
  CkptSpec s;
  if (rules.has_value()) {
    TORCH_CHECK_VALUE(rules->scalar_type() == at::kLong && rules->is_contiguous() && rules->numel() == 6 * T,
                      "rules must be a contiguous int64 [T, 6] tensor");
    s.rules = rules->data_ptr<int64_t>();
  }
  if (streams.has_value()) {
    TORCH_CHECK_VALUE(streams->scalar_type() == at::kLong && streams->is_contiguous() && streams->numel() == T,
                      "streams must be a contiguous int64 [T] tensor");
    TORCH_CHECK_VALUE(int(keep_prob.size()) == T, "one keep probability per model");
    s.streams = reinterpret_cast<const uint64_t*>(streams->data_ptr<int64_t>());
    s.keep_prob = keep_prob.data();
  }
  TORCH_CHECK_VALUE(int(scale.size()) == T && int(weight.size()) == T, "one scale and one weight per model");
  for (int t = 0; t < T; ++t) s.scale.push_back(float(scale[t])), s.weight.push_back(float(weight[t]));
  return s;
}

// The settings of the merge pass that combine the models' deltas into an entry (see CkptSpec).
void set_combine(CkptSpec& s, int64_t consensus, bool normalize, double lam, bool guard_small_divisor) {
  TORCH_CHECK_VALUE(0 <= consensus && consensus <= 2, "consensus must be 0 (none), 1 (sum) or 2 (count)");
  s.consensus = int(consensus);
  s.normalize = normalize;
  s.lam = lam;
  s.guard_small_divisor = guard_small_divisor;
}

void check_out_dtype(at::ScalarType dt, const char* what) {
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble, what,
                    " must be float32, bfloat16, float16 or float64, got ", dt);
}

constexpr uint64_t kIndex = (uint64_t(1) << 40) - 1;  // a record's index bits (the key above them)

// Into `all`: request t's records of the threads' lists ([threads * T]; `merged` is scratch). A thread
// claims the pieces of a loop in ascending order (pool.h), so each list ascends by index; merging them
// keeps the result ascending.
void records_by_index(const std::vector<std::vector<uint64_t>>& where, int T, int t, std::vector<uint64_t>& all,
                      std::vector<uint64_t>& merged) {
  const int nt = int(where.size()) / std::max(T, 1);
  all.clear();
  for (int tid = 0; tid < nt; ++tid) {
    const std::vector<uint64_t>& w = where[size_t(tid) * T + t];
    merged.resize(all.size() + w.size());
    std::merge(all.begin(), all.end(), w.begin(), w.end(), merged.begin(),
               [](uint64_t a, uint64_t b) { return (a & kIndex) < (b & kIndex); });
    all.swap(merged);
  }
}

// One int64 tensor per model of the records that the threads gathered ([threads * T] lists), in
// ascending index order, each record plus `add` (the chunk's offset), appended to `res`.
void append_records(const std::vector<std::vector<uint64_t>>& where, int T, int64_t add, std::vector<at::Tensor>& res) {
  std::vector<uint64_t> all, merged;
  for (int t = 0; t < T; ++t) {
    records_by_index(where, T, t, all, merged);
    at::Tensor out = at::empty({int64_t(all.size())}, at::kLong);
    int64_t* p = out.data_ptr<int64_t>();
    for (uint64_t x : all) *p++ = int64_t(x + uint64_t(add));
    res.push_back(out);
  }
}

// The ascending indices, each once, of the records in res[2..2+T) (one list per model, each ascending).
at::Tensor record_union(const std::vector<at::Tensor>& res, int T) {
  std::vector<int64_t> all, merged;
  for (int t = 0; t < T; ++t) {
    const at::Tensor& w = res[2 + t];
    const int64_t* p = w.data_ptr<int64_t>();
    std::vector<int64_t> idx(size_t(w.numel()));
    for (size_t j = 0; j < idx.size(); ++j) idx[j] = int64_t(uint64_t(p[j]) & kIndex);
    merged.resize(all.size() + idx.size());
    std::merge(all.begin(), all.end(), idx.begin(), idx.end(), merged.begin());
    all.swap(merged);
  }
  all.erase(std::unique(all.begin(), all.end()), all.end());
  at::Tensor u = at::empty({int64_t(all.size())}, at::kLong);
  if (!all.empty()) std::memcpy(u.data_ptr<int64_t>(), all.data(), all.size() * sizeof(int64_t));
  return u;
}

}  // namespace

at::Tensor ckpt_merge(const c10::optional<at::Tensor>& base, const std::vector<at::Tensor>& thetas,
                      const std::vector<double>& weights, const c10::optional<at::Tensor>& rules,
                      const c10::optional<at::Tensor>& streams, const std::vector<double>& keep_prob,
                      const std::vector<double>& scale, int64_t consensus, bool normalize, double lam,
                      bool guard_small_divisor, at::ScalarType out_dtype, int64_t offset,
                      const c10::optional<at::Tensor>& out_buf, const c10::optional<at::Tensor>& index) {
  return ckpt_merge_deferred(base, thetas, weights, rules, streams, keep_prob, scale, consensus, normalize, lam,
                             guard_small_divisor, out_dtype, offset, out_buf, index, {})[0];
}

std::vector<at::Tensor> ckpt_merge_deferred(
    const c10::optional<at::Tensor>& base, const std::vector<at::Tensor>& thetas, const std::vector<double>& weights,
    const c10::optional<at::Tensor>& rules, const c10::optional<at::Tensor>& streams,
    const std::vector<double>& keep_prob, const std::vector<double>& scale, int64_t consensus, bool normalize,
    double lam, bool guard_small_divisor, at::ScalarType out_dtype, int64_t offset,
    const c10::optional<at::Tensor>& out_buf, const c10::optional<at::Tensor>& index,
    const std::vector<int64_t>& defer_bins) {
  const CkptInputs in = gather(base, thetas);
  const int T = int(in.th.size());
  CkptSpec s = make_spec(T, rules, streams, keep_prob, scale, weights);
  TORCH_CHECK_VALUE(offset >= 0, "offset must be >= 0");
  s.offset = offset;
  if (index.has_value()) {
    TORCH_CHECK_VALUE(index->scalar_type() == at::kLong && index->is_contiguous() && index->numel() == in.n,
                      "index must be a contiguous int64 tensor with one entry per input entry");
    s.index = index->data_ptr<int64_t>();
  }
  at::Tensor h;
  std::vector<std::vector<uint64_t>> dwhere;
  if (!defer_bins.empty()) {
    TORCH_CHECK_VALUE(int(defer_bins.size()) == T && s.rules, "defer_bins: one bin per model, with rules");
    h = at::empty({T, 65536}, at::kLong);
    s.defer_bins = defer_bins.data();
    s.defer_hist = h.data_ptr<int64_t>();
    s.defer_where = &dwhere;
  }
  set_combine(s, consensus, normalize, lam, guard_small_divisor);
  check_out_dtype(out_dtype, "out_dtype");
  at::Tensor out;
  if (out_buf.has_value()) {
    out = *out_buf;
    TORCH_CHECK_VALUE(out.device().is_cpu() && out.is_contiguous() && out.numel() == in.n && out.scalar_type() == out_dtype,
                      "out must be a contiguous CPU tensor of ", in.n, " entries of ", out_dtype);
  } else {
    out = at::empty({in.n}, at::TensorOptions().dtype(out_dtype));
  }
  if (!ckpt_kernels().merge(in, s, out.data_ptr(), out_dtype)) raise_nonfinite(in);
  std::vector<at::Tensor> res{out};
  if (!defer_bins.empty()) {
    res.push_back(h);
    append_records(dwhere, T, 0, res);
    res.push_back(record_union(res, T));
  }
  return res;
}

at::Tensor ckpt_merge_at(const c10::optional<at::Tensor>& base, const std::vector<at::Tensor>& thetas,
                         const std::vector<double>& weights, const c10::optional<at::Tensor>& rules,
                         const c10::optional<at::Tensor>& streams, const std::vector<double>& keep_prob,
                         const std::vector<double>& scale, int64_t consensus, bool normalize, double lam,
                         bool guard_small_divisor, at::Tensor& out, const at::Tensor& index) {
  const CkptInputs in = gather(base, thetas);
  const int T = int(in.th.size());
  CkptSpec s = make_spec(T, rules, streams, keep_prob, scale, weights);
  TORCH_CHECK_VALUE(index.scalar_type() == at::kLong && index.dim() == 1 && index.is_contiguous(),
                    "index must be a contiguous 1-D int64 tensor");
  TORCH_CHECK_VALUE(out.device().is_cpu() && out.is_contiguous() && out.numel() == in.n,
                    "out must be a contiguous CPU tensor of ", in.n, " entries");
  const at::ScalarType out_dtype = out.scalar_type();
  check_out_dtype(out_dtype, "out");
  set_combine(s, consensus, normalize, lam, guard_small_divisor);
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t j = 0; j < index.numel(); ++j)
    TORCH_CHECK_VALUE(0 <= idx[j] && idx[j] < in.n, "index[", j, "] = ", idx[j], " is outside [0, ", in.n, ")");
  s.index = idx;
  s.scatter = true;
  s.selected = index.numel();
  if (!ckpt_kernels().merge(in, s, out.data_ptr(), out_dtype)) raise_nonfinite(in);
  return out;
}

at::Tensor ckpt_abs_sums(const c10::optional<at::Tensor>& base, const std::vector<at::Tensor>& thetas,
                         const c10::optional<at::Tensor>& rules, const c10::optional<at::Tensor>& streams,
                         const std::vector<double>& keep_prob, int64_t offset) {
  const CkptInputs in = gather(base, thetas);
  const int T = int(in.th.size());
  CkptSpec s = make_spec(T, rules, streams, keep_prob, std::vector<double>(T, 1.0), std::vector<double>(T, 1.0));
  s.offset = offset;
  const int64_t nchunks = (in.n + kChunk - 1) / kChunk;
  std::vector<double> part(size_t(nchunks) * T * 2, 0.0);
  if (!ckpt_kernels().abs_sums(in, s, part.data())) raise_nonfinite(in);
  at::Tensor res = at::zeros({T, 2}, at::kDouble);
  double* r = res.data_ptr<double>();
  for (int64_t c = 0; c < nchunks; ++c)
    for (int j = 0; j < 2 * T; ++j) r[j] += part[size_t(c) * T * 2 + j];
  return res;
}

std::vector<at::Tensor> ckpt_key_hist(const c10::optional<at::Tensor>& base, const std::vector<at::Tensor>& thetas,
                                      const std::vector<int64_t>& prefix, int64_t offset, bool record) {
  const CkptInputs in = gather(base, thetas);
  const int T = int(in.th.size());
  TORCH_CHECK_VALUE(int(prefix.size()) == T, "ckpt_key_hist: one prefix per model (-1: the top 16 bits)");
  TORCH_CHECK_VALUE(offset >= 0 && offset + in.n < (int64_t(1) << 40), "ckpt_key_hist: offset out of range");
  at::Tensor out = at::empty({T, 65536}, at::kLong);
  std::vector<int> models(T);
  for (int t = 0; t < T; ++t) models[t] = t;
  std::vector<std::vector<uint64_t>> where;
  if (!ckpt_kernels().key_hist(in, models, prefix, out.data_ptr<int64_t>(), record ? &where : nullptr))
    raise_nonfinite(in);
  std::vector<at::Tensor> res{out};
  if (record) append_records(where, T, offset, res);
  return res;
}

std::vector<at::Tensor> ckpt_key_bracket(const c10::optional<at::Tensor>& base, const std::vector<at::Tensor>& thetas,
                                         const std::vector<int64_t>& models, const std::vector<int64_t>& ranks,
                                         double margin, int64_t record_limit, int64_t row) {
  const CkptInputs in = gather(base, thetas);
  const int T = int(in.th.size());
  const int J = int(models.size());
  TORCH_CHECK_VALUE(int(ranks.size()) == J, "ckpt_key_bracket: one rank per request");
  TORCH_CHECK_VALUE(std::isfinite(margin) && margin >= 0 && record_limit >= 0,
                    "ckpt_key_bracket: margin (finite) and record_limit must be >= 0");
  TORCH_CHECK_VALUE(in.n < (int64_t(1) << 40), "ckpt_key_bracket: a tensor of under 2^40 entries");
  TORCH_CHECK_VALUE(row >= 0, "ckpt_key_bracket: row must be >= 0 (0: no rows), got ", row);
  std::vector<int> mods(J);
  for (int j = 0; j < J; ++j) {
    TORCH_CHECK_VALUE(0 <= models[j] && models[j] < T, "ckpt_key_bracket: models[", j, "] = ", models[j],
                      " is not one of the ", T, " models");
    TORCH_CHECK_VALUE(0 <= ranks[j] && ranks[j] < in.n, "ckpt_key_bracket: ranks[", j, "] = ", ranks[j],
                      " is outside [0, ", in.n, ")");
    mods[j] = int(models[j]);
  }
  const int nt = at::get_num_threads();
  std::vector<int64_t> first(J, -1), last(J, -1), above(size_t(nt) * J, 0);
  std::vector<std::vector<uint64_t>> where;
  if (!ckpt_kernels().key_bracket(in, mods, ranks, margin, record_limit / std::max(J, 1), row, first.data(), last.data(),
                                  above.data(), where))
    raise_nonfinite(in);
  at::Tensor info = at::empty({J, 3}, at::kLong);
  int64_t* ip = info.data_ptr<int64_t>();
  std::vector<at::Tensor> res{info};
  std::vector<uint64_t> recs, merged;
  std::vector<uint32_t> keys;
  for (int j = 0; j < J; ++j) {
    int64_t* it = ip + 3 * j;
    it[0] = -1, it[1] = 0, it[2] = 0;
    at::Tensor pos = at::empty({0}, at::kLong);
    int64_t up = 0;
    recs.clear();
    if (first[j] >= 0) {
      records_by_index(where, J, j, recs, merged);
      for (int tid = 0; tid < nt; ++tid) up += above[size_t(tid) * J + j];
    }
    const int64_t inside = int64_t(recs.size()), below = in.n - up - inside;
    if (first[j] >= 0 && below <= ranks[j] && ranks[j] < below + inside) {
      keys.resize(recs.size());
      for (size_t x = 0; x < recs.size(); ++x) keys[x] = uint32_t(recs[x] >> 40);
      std::nth_element(keys.begin(), keys.begin() + (ranks[j] - below), keys.end());
      const uint32_t key = keys[size_t(ranks[j] - below)];
      int64_t less = 0, equal = 0;
      for (uint64_t r : recs) {
        const uint32_t k = uint32_t(r >> 40);
        less += k < key;
        equal += k == key;
      }
      it[0] = first[j] + int64_t(key), it[1] = below + less, it[2] = equal;
      if (it[0] != 0) {  // ties at a zero key are never split (they change nothing): no positions
        pos = at::empty({equal}, at::kLong);
        int64_t* pp = pos.data_ptr<int64_t>();
        for (uint64_t r : recs)
          if (uint32_t(r >> 40) == key) *pp++ = int64_t(r & kIndex);
      }
    }
    res.push_back(pos);
  }
  return res;
}

at::Tensor ckpt_random_bits(int64_t key, int64_t start, int64_t n) {
  at::Tensor out = at::empty({n}, at::kInt);
  ckpt_kernels().random_bits(key, start, n, out.data_ptr<int32_t>());
  return out;
}

// ------------------------------------------------------------------------------- CRC-32C

// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78, the checksum of iSCSI and ext4) of an output
// tensor's bytes, for the record that --resume checks. Streaming: the CRC of a buffer cut anywhere
// equals the CRC of the pieces chained. SSE4.2's crc32 instruction does 8 bytes per step where the CPU
// has it, in three lanes at a time; elsewhere a table does a byte per step.
namespace {

uint32_t crc32c_table(uint32_t crc, const uint8_t* p, int64_t n) {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
      t[i] = c;
    }
    return t;
  }();
  for (int64_t i = 0; i < n; ++i) crc = table[(crc ^ p[i]) & 0xFFu] ^ (crc >> 8);
  return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) uint32_t crc32c_one_lane(uint32_t crc, const uint8_t* p, int64_t n) {
  uint64_t c = crc;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    c = __builtin_ia32_crc32di(c, w);
  }
  uint32_t c32 = uint32_t(c);
  for (; i < n; ++i) c32 = __builtin_ia32_crc32qi(c32, p[i]);
  return c32;
}

// The crc32 instruction takes 3 cycles and can start one per cycle, so three independent lanes of
// kLane bytes run about 3x faster than one chain. A lane's CRC register after more bytes is a linear
// function of the register before (what kLane zero bytes do to it), which a table per byte of the
// register applies: the three lanes' registers are then combined into the one a single chain would hold.
constexpr int64_t kLane = 8192;

struct CrcShift {  // what `bytes` zero bytes do to a CRC register, one table per byte of it
  std::array<std::array<uint32_t, 256>, 4> t;
  uint32_t operator()(uint32_t c) const {
    return t[0][c & 0xFFu] ^ t[1][(c >> 8) & 0xFFu] ^ t[2][(c >> 16) & 0xFFu] ^ t[3][c >> 24];
  }
};

__attribute__((target("sse4.2"))) CrcShift crc_shift(int64_t bytes) {
  CrcShift s;
  for (int i = 0; i < 4; ++i)
    for (uint32_t b = 0; b < 256; ++b) {
      uint64_t c = uint64_t(b) << (8 * i);
      for (int64_t k = 0; k < bytes; k += 8) c = __builtin_ia32_crc32di(c, 0);
      s.t[size_t(i)][b] = uint32_t(c);
    }
  return s;
}

__attribute__((target("sse4.2"))) uint32_t crc32c_sse42(uint32_t crc, const uint8_t* p, int64_t n) {
  if (n >= 3 * kLane) {
    static const CrcShift one = crc_shift(kLane), two = crc_shift(2 * kLane);
    for (; n >= 3 * kLane; p += 3 * kLane, n -= 3 * kLane) {
      uint64_t a = crc, b = 0, c = 0;
      for (int64_t i = 0; i < kLane; i += 8) {
        uint64_t wa, wb, wc;
        std::memcpy(&wa, p + i, 8);
        std::memcpy(&wb, p + kLane + i, 8);
        std::memcpy(&wc, p + 2 * kLane + i, 8);
        a = __builtin_ia32_crc32di(a, wa);
        b = __builtin_ia32_crc32di(b, wb);
        c = __builtin_ia32_crc32di(c, wc);
      }
      crc = two(uint32_t(a)) ^ one(uint32_t(b)) ^ uint32_t(c);
    }
  }
  return crc32c_one_lane(crc, p, n);
}
#endif

}  // namespace

int64_t ckpt_crc32c(const at::Tensor& bytes, int64_t crc) {
  TORCH_CHECK_VALUE(bytes.device().is_cpu() && bytes.is_contiguous() && bytes.scalar_type() == at::kByte,
                    "ckpt_crc32c: a contiguous uint8 CPU tensor");
  const uint8_t* p = bytes.data_ptr<uint8_t>();
  const int64_t n = bytes.numel();
  uint32_t c = ~uint32_t(crc);
#if defined(__x86_64__)
  static const bool hw = __builtin_cpu_supports("sse4.2");
  c = hw ? crc32c_sse42(c, p, n) : crc32c_table(c, p, n);
#else
  c = crc32c_table(c, p, n);
#endif
  return int64_t(~c);
}

}  // namespace cpu
}  // namespace fastmerge
