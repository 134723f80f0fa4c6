// Fused CPU kernels of the checkpoint-merging methods (fastmerge/merge/methods.py): the generalised
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
#include <array>
#include <cstring>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <climits>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "checkpoint_merge.h"

namespace fastmerge {
namespace cpu {
namespace {

constexpr int64_t kChunk = 1 << 16;  // fixed reduction chunk (thread-count independent results)
constexpr int kBlock = 512;  // entries per block of the vectorised loops (the T deltas of a block stay in L1/L2)

inline float to_f(float x) { return x; }
inline float to_f(c10::BFloat16 x) { return float(x); }
inline float to_f(c10::Half x) { return float(x); }
inline float to_f(double x) { return float(x); }

inline uint32_t key_of(float d) {
  uint32_t u;
  std::memcpy(&u, &d, sizeof(u));
  return u & 0x7fffffffu;
}

inline uint64_t mix64(uint64_t z) {
  z ^= z >> 30;
  z *= 0xBF58476D1CE4E5B9ull;
  z ^= z >> 27;
  z *= 0x94D049BB133111EBull;
  z ^= z >> 31;
  return z;
}

// 24 random bits of entry i of the stream `key` (see fastmerge/merge/rng.py for the reference).
inline uint32_t stream_bits(uint64_t key, int64_t i) {
  return uint32_t(mix64(key + uint64_t(i) * 0x9E3779B97F4A7C15ull) >> 40);
}

struct Rule {  // one model's keep rule; see the file comment
  int64_t lo_key, lo_a, lo_b, hi_key, hi_a, hi_b;
  bool keeps(uint32_t k, int64_t i) const {
    const int64_t key = int64_t(k);
    if (key < lo_key || key > hi_key) return false;
    if (key == lo_key && (i < lo_a || i > lo_b)) return false;
    if (key == hi_key && (i < hi_a || i > hi_b)) return false;
    return true;
  }
};

struct Inputs {
  at::ScalarType dt;
  const void* base;  // may be null (no base: linear)
  std::vector<const void*> th;
  int64_t n;
};

Inputs gather(const c10::optional<at::Tensor>& base, const std::vector<at::Tensor>& thetas) {
  TORCH_CHECK_VALUE(!thetas.empty(), "thetas is empty: at least one model is needed");
  Inputs in;
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

template <typename F>
void dispatch(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat: f(float()); break;
    case at::kBFloat16: f(c10::BFloat16()); break;
    case at::kHalf: f(c10::Half()); break;
    default: f(double()); break;
  }
}

// Index and value of the first non-finite entry among the inputs (called after a kernel saw one).
[[noreturn]] void raise_nonfinite(const Inputs& in) {
  dispatch(in.dt, [&](auto z) {
    using in_t = decltype(z);
    auto scan = [&](const void* p, const std::string& name) {
      const in_t* x = static_cast<const in_t*>(p);
      for (int64_t i = 0; i < in.n; ++i) {
        const float v = to_f(x[i]);
        if (!std::isfinite(v)) TORCH_CHECK_VALUE(false, name, " contains a non-finite value (", v, ") at index ", i);
      }
    };
    if (in.base) scan(in.base, "base");
    for (size_t t = 0; t < in.th.size(); ++t) scan(in.th[t], "thetas[" + std::to_string(t) + "]");
  });
  TORCH_CHECK_VALUE(false, "a delta overflowed to infinity (finite inputs): the merge is undefined there");
}

template <typename in_t>
inline float delta_at(const Inputs& in, int t, int64_t i) {
  const float b = in.base ? to_f(static_cast<const in_t*>(in.base)[i]) : 0.0f;
  return to_f(static_cast<const in_t*>(in.th[t])[i]) - b;
}

// ------------------------------------------------------------------------- key histograms

constexpr int kBins = 1 << 16;
constexpr int kTop = 1 << 15;  // bins of the top 16 bits of a key (its sign bit is clear)

// Histograms of magnitude keys, one row of kBins per request j, over model models[j]: with
// prefix[j] < 0 the top 16 bits of every key (the sign bit is clear, so rows use bins < 2^15), else the
// low 16 bits of the keys whose top 16 bits equal prefix[j]. Counts only, so the result does not
// depend on the thread count. A non-finite delta raises. With `where`, the second kind also records
// (low 16 bits << 40 | index) of each counted entry, per thread and request (in no fixed order).
template <typename in_t>
void key_hist(const Inputs& in, const std::vector<int>& models, const std::vector<int64_t>& prefix, int64_t* out,
              std::vector<std::vector<uint64_t>>* where = nullptr) {
  const int J = int(models.size());
  const int nt = at::get_num_threads();
  std::vector<char> bad(nt, 0);
  if (where) where->assign(size_t(nt) * J, {});
  bool any_top = false, any_inner = false;
  for (int64_t p : prefix) (p < 0 ? any_top : any_inner) = true;
  // counts per thread and request: four copies of the top-16-bit bins, or the low-16-bit bins
  std::vector<uint32_t> quad(any_top ? size_t(nt) * J * 4 * kTop : 0, 0);
  std::vector<uint32_t> h(any_inner ? size_t(nt) * J * kBins : 0, 0);
  at::parallel_for(0, in.n, kChunk, [&](int64_t i0, int64_t i1) {
    const int tid = at::get_thread_num();
    for (int j = 0; j < J; ++j) {
      const int t = models[j];
      const int64_t pre = prefix[j];
      if (pre < 0) {
        // four copies of the histogram, one per entry mod 4: a run of equal bins (the usual case, as
        // magnitudes cluster) makes four independent increments instead of one chain through memory
        uint32_t* q = quad.data() + (size_t(tid) * J + j) * 4 * kTop;
        int64_t i = i0;
        uint32_t nonfinite = 0;
        for (; i + 4 <= i1; i += 4) {
          const uint32_t k0 = key_of(delta_at<in_t>(in, t, i)), k1 = key_of(delta_at<in_t>(in, t, i + 1));
          const uint32_t k2 = key_of(delta_at<in_t>(in, t, i + 2)), k3 = key_of(delta_at<in_t>(in, t, i + 3));
          nonfinite |= uint32_t(k0 >= 0x7f800000u) | uint32_t(k1 >= 0x7f800000u) | uint32_t(k2 >= 0x7f800000u) |
                       uint32_t(k3 >= 0x7f800000u);
          if (nonfinite) break;
          ++q[k0 >> 16];
          ++q[kTop + (k1 >> 16)];
          ++q[2 * kTop + (k2 >> 16)];
          ++q[3 * kTop + (k3 >> 16)];
        }
        for (; i < i1; ++i) {
          const uint32_t k = key_of(delta_at<in_t>(in, t, i));
          if (k >= 0x7f800000u) {
            bad[tid] = 1;
            return;
          }
          ++q[k >> 16];
        }
        continue;
      }
      uint32_t* hj = h.data() + (size_t(tid) * J + j) * kBins;
      for (int64_t i = i0; i < i1; ++i) {
        const uint32_t k = key_of(delta_at<in_t>(in, t, i));
        if (k >= 0x7f800000u) {
          bad[tid] = 1;
          return;
        }
        if (int64_t(k >> 16) == pre) {
          ++hj[k & 0xffffu];
          if (where) (*where)[size_t(tid) * J + j].push_back(uint64_t(k & 0xffffu) << 40 | uint64_t(i));
        }
      }
    }
  });
  for (char b : bad)
    if (b) raise_nonfinite(in);
  std::fill(out, out + size_t(J) * kBins, int64_t(0));
  for (int tid = 0; tid < nt && any_inner; ++tid)
    for (size_t x = 0; x < size_t(J) * kBins; ++x) out[x] += h[size_t(tid) * J * kBins + x];
  for (int tid = 0; tid < nt && any_top; ++tid)
    for (int j = 0; j < J; ++j)
      for (int c = 0; c < 4; ++c)
        for (int x = 0; x < kTop; ++x) out[size_t(j) * kBins + x] += quad[((size_t(tid) * J + j) * 4 + c) * kTop + x];
}

}  // namespace

namespace {

struct MergeSpec {
  const int64_t* rules = nullptr;  // [T, 6] or null (keep all)
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
  // Deferred selection (see ckpt_merge_deferred): per model the top-16-bit bin of its threshold, or -1;
  // per thread and model a histogram of the low 16 bits of the keys in that bin and their positions.
  const int64_t* defer_bins = nullptr;
  std::vector<uint32_t>* defer_hist = nullptr;  // [threads][T][65536]
  std::vector<std::vector<uint64_t>>* defer_where = nullptr;  // [threads * T]: low 16 bits << 40 | index
  int64_t entry(int64_t i) const { return index ? index[i] : offset + i; }
};

template <typename in_t>
inline bool kept(const Inputs& in, const MergeSpec& s, int t, int64_t i, float d) {
  if (s.rules && !reinterpret_cast<const Rule*>(s.rules)[t].keeps(key_of(d), s.entry(i))) return false;
  if (s.streams && !(double(stream_bits(s.streams[t], s.entry(i))) < s.keep_prob[t] * 16777216.0)) return false;
  return true;
}


// The merge pass, a block of entries at a time: each model's deltas are formed, filtered by its keep
// rule and scaled in branch-free loops the compiler vectorises; only entries whose key equals a
// rule's boundary key (ties at the threshold) and the random stream take scalar code.
template <typename in_t, int kCons>
void merge_block(const Inputs& in, const MergeSpec& s, int64_t i0, int m, float* v, float* res, bool& bad) {
  const int T = int(in.th.size());
  float b[kBlock], sum[kBlock];
  int32_t sgn[kBlock];
  if (in.base) {
    const in_t* pb = static_cast<const in_t*>(in.base) + i0;
    for (int j = 0; j < m; ++j) b[j] = to_f(pb[j]);
  } else {
    for (int j = 0; j < m; ++j) b[j] = 0.0f;
  }
  for (int j = 0; j < m; ++j) sum[j] = 0.0f, sgn[j] = 0;
  uint32_t nonfinite = 0;
  for (int t = 0; t < T; ++t) {
    const in_t* x = static_cast<const in_t*>(in.th[t]) + i0;
    float* vt = v + size_t(t) * kBlock;
    for (int j = 0; j < m; ++j) {
      const float d = to_f(x[j]) - b[j];
      uint32_t u;
      std::memcpy(&u, &d, 4);
      nonfinite |= uint32_t((u & 0x7fffffffu) >= 0x7f800000u);
      vt[j] = d;
    }
    if (s.rules) {
      const Rule& r = reinterpret_cast<const Rule*>(s.rules)[t];
      // keys are below 2^31, so the int32 bounds below are exact (clamped where a bound is absent)
      const int32_t lo = int32_t(std::max<int64_t>(-1, std::min<int64_t>(r.lo_key, INT32_MAX)));
      const int32_t hi = int32_t(std::max<int64_t>(-1, std::min<int64_t>(r.hi_key, INT32_MAX)));
      const int32_t bin = s.defer_bins ? int32_t(s.defer_bins[t]) : -1;
      uint32_t edge = 0, inbin = 0;
      int32_t keys[kBlock];  // kept for the deferred bin below, so it need not form the deltas again
      for (int j = 0; j < m; ++j) {
        int32_t k;
        std::memcpy(&k, &vt[j], 4);
        k &= 0x7fffffff;
        keys[j] = k;
        edge |= uint32_t((k == lo) | (k == hi));
        inbin |= uint32_t((k >> 16) == bin);
        vt[j] = (k > lo && k < hi) ? vt[j] : 0.0f;
      }
      if (edge) {  // entries at a boundary key: their index decides (see Rule)
        const float* xb = b;
        for (int j = 0; j < m; ++j) {
          const float d = to_f(x[j]) - xb[j];
          const int64_t k = int64_t(key_of(d));
          if ((k == r.lo_key || k == r.hi_key) && r.keeps(uint32_t(k), s.entry(i0 + j))) vt[j] = d;
        }
      }
      if (inbin) {  // keys in the threshold's bin: counted and located for the exact threshold
        const int tid = at::get_thread_num();
        uint32_t* h = s.defer_hist->data() + (size_t(tid) * T + t) * 65536;
        auto& where = (*s.defer_where)[size_t(tid) * T + t];
        // a bin holds well under 1 % of the entries: groups of 16 without one are passed over with a
        // vector test, and only the others take the scalar loop
        for (int j0 = 0; j0 < m; j0 += 16) {
          const int e = std::min(m, j0 + 16);
          uint32_t any = 0;
          for (int j = j0; j < e; ++j) any |= uint32_t((keys[j] >> 16) == bin);
          if (!any) continue;
          for (int j = j0; j < e; ++j) {
            const uint32_t k = uint32_t(keys[j]);
            if (int32_t(k >> 16) == bin) {
              ++h[k & 0xffffu];
              where.push_back(uint64_t(k & 0xffffu) << 40 | uint64_t(s.entry(i0 + j)));
            }
          }
        }
      }
    }
    if (s.streams) {
      const uint64_t key = s.streams[t];
      const double lim = s.keep_prob[t] * 16777216.0;
      for (int j = 0; j < m; ++j)
        if (!(double(stream_bits(key, s.entry(i0 + j))) < lim)) vt[j] = 0.0f;
    }
    const float sc = s.scale[t], w = s.weight[t];
    for (int j = 0; j < m; ++j) {
      const float y = (vt[j] * sc) * w;
      vt[j] = y;
      sum[j] += y;
      sgn[j] += int32_t(y > 0.0f) - int32_t(y < 0.0f);
    }
  }
  if (nonfinite) bad = true;
  const float lam = float(s.lam);
  if (kCons == 0) {
    float wsum = 0.0f;
    for (int t = 0; t < T; ++t) wsum += s.weight[t];
    if (s.guard_small_divisor && std::fabs(wsum) < 1e-8f) wsum = 1.0f;
    if (s.normalize)
      for (int j = 0; j < m; ++j) sum[j] = sum[j] / wsum;
    if (lam != 1.0f)
      for (int j = 0; j < m; ++j) sum[j] = sum[j] * lam;
    for (int j = 0; j < m; ++j) res[j] = b[j] + sum[j];
    return;
  }
  float mixed[kBlock], div[kBlock], maj[kBlock];
  for (int j = 0; j < m; ++j) {
    maj[j] = (kCons == 1 ? sum[j] >= 0.0f : sgn[j] >= 0) ? 1.0f : -1.0f;
    mixed[j] = 0.0f;
    div[j] = 0.0f;
  }
  for (int t = 0; t < T; ++t) {
    const float* vt = v + size_t(t) * kBlock;
    uint32_t uw;
    std::memcpy(&uw, &s.weight[t], 4);
    for (int j = 0; j < m; ++j) {
      // sign(y) == maj, in integer ops so the loop stays branch-free: y and maj have the same sign bit
      // and y is not +-0; the others add +0, which leaves every sum unchanged
      uint32_t uy, um;
      std::memcpy(&uy, &vt[j], 4);
      std::memcpy(&um, &maj[j], 4);
      const uint32_t keep = 0u - ((((uy ^ um) >> 31) ^ 1u) & uint32_t((uy & 0x7fffffffu) != 0));
      const uint32_t ym = uy & keep, wm = uw & keep;
      float yk, wk;
      std::memcpy(&yk, &ym, 4);
      std::memcpy(&wk, &wm, 4);
      mixed[j] += yk;
      div[j] += wk;
    }
  }
  for (int j = 0; j < m; ++j) div[j] = div[j] == 0.0f ? 1.0f : div[j];
  if (s.normalize)
    for (int j = 0; j < m; ++j) mixed[j] = mixed[j] / div[j];
  if (lam != 1.0f)
    for (int j = 0; j < m; ++j) mixed[j] = mixed[j] * lam;
  for (int j = 0; j < m; ++j) res[j] = b[j] + mixed[j];
}

template <typename in_t, typename out_t>
void merge_impl(const Inputs& in, const MergeSpec& s, out_t* out, std::vector<char>& bad) {
  const int T = int(in.th.size());
  at::parallel_for(0, (in.n + kBlock - 1) / kBlock, 64, [&](int64_t b0, int64_t b1) {
    std::vector<float> v(size_t(T) * kBlock);
    float res[kBlock];
    bool flag = false;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kBlock;
      const int m = int(std::min<int64_t>(kBlock, in.n - i0));
      switch (s.consensus) {
        case 0: merge_block<in_t, 0>(in, s, i0, m, v.data(), res, flag); break;
        case 1: merge_block<in_t, 1>(in, s, i0, m, v.data(), res, flag); break;
        default: merge_block<in_t, 2>(in, s, i0, m, v.data(), res, flag); break;
      }
      uint32_t overflow = 0;  // a finite input can still overflow in the sums or in the output dtype
      for (int j = 0; j < m; ++j) {
        const out_t o = out_t(res[j]);
        out[i0 + j] = o;
        overflow |= uint32_t(!std::isfinite(to_f(o)));
      }
      if (overflow) flag = true;
    }
    if (flag) bad[at::get_thread_num()] = 1;
  });
}

MergeSpec make_spec(int T, const c10::optional<at::Tensor>& rules, const c10::optional<at::Tensor>& streams,
                    const std::vector<double>& keep_prob, const std::vector<double>& scale,
                    const std::vector<double>& weight) {
  TORCH_CHECK_VALUE(T <= 64, "at most 64 models per merge, got ", T);
  MergeSpec s;
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

// One int64 tensor per model of the records that the threads gathered ([threads * T] lists), each
// record plus `add` (the chunk's offset), appended to `res`.
void append_records(const std::vector<std::vector<uint64_t>>& where, int T, int64_t add, std::vector<at::Tensor>& res) {
  const int nt = int(where.size()) / std::max(T, 1);
  for (int t = 0; t < T; ++t) {
    size_t total = 0;
    for (int tid = 0; tid < nt; ++tid) total += where[size_t(tid) * T + t].size();
    at::Tensor w = at::empty({int64_t(total)}, at::kLong);
    int64_t* p = w.data_ptr<int64_t>();
    for (int tid = 0; tid < nt; ++tid)
      for (uint64_t x : where[size_t(tid) * T + t]) *p++ = int64_t(x + uint64_t(add));
    res.push_back(w);
  }
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
  const Inputs in = gather(base, thetas);
  const int T = int(in.th.size());
  MergeSpec s = make_spec(T, rules, streams, keep_prob, scale, weights);
  TORCH_CHECK_VALUE(offset >= 0, "offset must be >= 0");
  s.offset = offset;
  if (index.has_value()) {
    TORCH_CHECK_VALUE(index->scalar_type() == at::kLong && index->is_contiguous() && index->numel() == in.n,
                      "index must be a contiguous int64 tensor with one entry per input entry");
    s.index = index->data_ptr<int64_t>();
  }
  const int nt = at::get_num_threads();
  std::vector<uint32_t> dhist;
  std::vector<std::vector<uint64_t>> dwhere;
  if (!defer_bins.empty()) {
    TORCH_CHECK_VALUE(int(defer_bins.size()) == T && s.rules, "defer_bins: one bin per model, with rules");
    s.defer_bins = defer_bins.data();
    dhist.assign(size_t(nt) * T * 65536, 0);
    dwhere.assign(size_t(nt) * T, {});
    s.defer_hist = &dhist;
    s.defer_where = &dwhere;
  }
  TORCH_CHECK_VALUE(0 <= consensus && consensus <= 2, "consensus must be 0 (none), 1 (sum) or 2 (count)");
  s.consensus = int(consensus);
  s.normalize = normalize;
  s.lam = lam;
  s.guard_small_divisor = guard_small_divisor;
  at::Tensor out;
  if (out_buf.has_value()) {
    out = *out_buf;
    TORCH_CHECK_VALUE(out.device().is_cpu() && out.is_contiguous() && out.numel() == in.n && out.scalar_type() == out_dtype,
                      "out must be a contiguous CPU tensor of ", in.n, " entries of ", out_dtype);
  } else {
    out = at::empty({in.n}, at::TensorOptions().dtype(out_dtype));
  }
  std::vector<char> bad(at::get_num_threads(), 0);
  dispatch(in.dt, [&](auto zi) {
    using in_t = decltype(zi);
    switch (out_dtype) {
      case at::kFloat: merge_impl<in_t>(in, s, out.data_ptr<float>(), bad); break;
      case at::kBFloat16: merge_impl<in_t>(in, s, out.data_ptr<c10::BFloat16>(), bad); break;
      case at::kHalf: merge_impl<in_t>(in, s, out.data_ptr<c10::Half>(), bad); break;
      case at::kDouble: merge_impl<in_t>(in, s, out.data_ptr<double>(), bad); break;
      default: TORCH_CHECK_VALUE(false, "out_dtype must be float32, bfloat16, float16 or float64, got ", out_dtype);
    }
  });
  for (char b : bad)
    if (b) raise_nonfinite(in);
  std::vector<at::Tensor> res{out};
  if (!defer_bins.empty()) {
    at::Tensor h = at::zeros({T, 65536}, at::kLong);
    int64_t* hp = h.data_ptr<int64_t>();
    for (int tid = 0; tid < nt; ++tid)
      for (size_t x = 0; x < size_t(T) * 65536; ++x) hp[x] += dhist[size_t(tid) * T * 65536 + x];
    res.push_back(h);
    append_records(dwhere, T, 0, res);
  }
  return res;
}

at::Tensor ckpt_abs_sums(const c10::optional<at::Tensor>& base, const std::vector<at::Tensor>& thetas,
                         const c10::optional<at::Tensor>& rules, const c10::optional<at::Tensor>& streams,
                         const std::vector<double>& keep_prob, int64_t offset) {
  const Inputs in = gather(base, thetas);
  const int T = int(in.th.size());
  MergeSpec s = make_spec(T, rules, streams, keep_prob, std::vector<double>(T, 1.0), std::vector<double>(T, 1.0));
  s.offset = offset;
  const int64_t nchunks = (in.n + kChunk - 1) / kChunk;
  std::vector<double> part(size_t(nchunks) * T * 2, 0.0);
  std::vector<char> bad(at::get_num_threads(), 0);
  dispatch(in.dt, [&](auto z) {
    using in_t = decltype(z);
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        for (int t = 0; t < T; ++t) {
          double all = 0.0, keep = 0.0;
          for (int64_t i = c * kChunk, e = std::min(in.n, (c + 1) * kChunk); i < e; ++i) {
            const float d = delta_at<in_t>(in, t, i);
            if (!std::isfinite(d)) bad[at::get_thread_num()] = 1;
            const double a = std::fabs(double(d));
            all += a;
            if (kept<in_t>(in, s, t, i, d)) keep += a;
          }
          part[(size_t(c) * T + t) * 2] = all;
          part[(size_t(c) * T + t) * 2 + 1] = keep;
        }
    });
  });
  for (char b : bad)
    if (b) raise_nonfinite(in);
  at::Tensor res = at::zeros({T, 2}, at::kDouble);
  double* r = res.data_ptr<double>();
  for (int64_t c = 0; c < nchunks; ++c)
    for (int j = 0; j < 2 * T; ++j) r[j] += part[size_t(c) * T * 2 + j];
  return res;
}

std::vector<at::Tensor> ckpt_key_hist(const c10::optional<at::Tensor>& base, const std::vector<at::Tensor>& thetas,
                                      const std::vector<int64_t>& prefix, int64_t offset, bool record) {
  const Inputs in = gather(base, thetas);
  const int T = int(in.th.size());
  TORCH_CHECK_VALUE(int(prefix.size()) == T, "ckpt_key_hist: one prefix per model (-1: the top 16 bits)");
  TORCH_CHECK_VALUE(offset >= 0 && offset + in.n < (int64_t(1) << 40), "ckpt_key_hist: offset out of range");
  at::Tensor out = at::empty({T, kBins}, at::kLong);
  std::vector<int> models(T);
  for (int t = 0; t < T; ++t) models[t] = t;
  std::vector<std::vector<uint64_t>> where;
  dispatch(in.dt, [&](auto z) {
    key_hist<decltype(z)>(in, models, prefix, out.data_ptr<int64_t>(), record ? &where : nullptr);
  });
  std::vector<at::Tensor> res{out};
  if (record) append_records(where, T, offset, res);
  return res;
}

at::Tensor ckpt_random_bits(int64_t key, int64_t start, int64_t n) {
  at::Tensor out = at::empty({n}, at::kInt);
  int32_t* o = out.data_ptr<int32_t>();
  at::parallel_for(0, n, kChunk, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) o[i] = int32_t(stream_bits(uint64_t(key), start + i));
  });
  return out;
}

// ------------------------------------------------------------------------------- CRC-32C

// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78, the checksum of iSCSI and ext4) of an output
// tensor's bytes, for the record that --resume checks. Streaming: the CRC of a buffer cut anywhere
// equals the CRC of the pieces chained. SSE4.2's crc32 instruction does 8 bytes per step where the CPU
// has it (about 3x zlib's CRC-32 here); elsewhere a table does a byte per step.
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
__attribute__((target("sse4.2"))) uint32_t crc32c_sse42(uint32_t crc, const uint8_t* p, int64_t n) {
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
