// The checkpoint-merging kernels proper (see checkpoint_merge.cpp for the op layer and the invariants):
// key histograms, the fused merge pass, the sums of |delta| and the random stream. This header is
// compiled once per instruction set by the kernels_<ISA>.cpp wrappers (like kernels.h); everything in
// it has internal linkage, so each build keeps its own copy, and the op layer picks a table at run time.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "ckpt_types.h"
#include "pool.h"

namespace fastmerge {
namespace cpu {
namespace {
namespace ckpt {

using Inputs = CkptInputs;

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

// An entry is kept when double(stream_bits) < keep_prob * 2^24: for bits in [0, 2^24) that is
// bits < ceil(keep_prob * 2^24) (clamped to [0, 2^24]), an integer compare that needs no branch.
inline uint32_t stream_limit(double keep_prob) {
  const double lim = std::ceil(keep_prob * 16777216.0);
  return lim <= 0.0 ? 0u : lim >= 16777216.0 ? 16777216u : uint32_t(lim);
}


struct Rule {  // one model's keep rule; see checkpoint_merge.cpp
  int64_t lo_key, lo_a, lo_b, hi_key, hi_a, hi_b;
  bool keeps(uint32_t k, int64_t i) const {
    const int64_t key = int64_t(k);
    if (key < lo_key || key > hi_key) return false;
    if (key == lo_key && (i < lo_a || i > lo_b)) return false;
    if (key == hi_key && (i < hi_a || i > hi_b)) return false;
    return true;
  }
};

template <typename F>
void dispatch(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat: f(float()); break;
    case at::kBFloat16: f(c10::BFloat16()); break;
    case at::kHalf: f(c10::Half()); break;
    default: f(double()); break;
  }
}

template <typename in_t>
inline float delta_at(const Inputs& in, int t, int64_t i) {
  const float b = in.base ? to_f(static_cast<const in_t*>(in.base)[i]) : 0.0f;
  return to_f(static_cast<const in_t*>(in.th[t])[i]) - b;
}

// ------------------------------------------------------------------------- key histograms

constexpr int kBins = 1 << 16;
constexpr int kTop = 1 << 15;  // bins of the top 16 bits of a key (its sign bit is clear)

// Count buffers of the calling thread, all zero between calls: a pass counts into them, adds the bins
// it touched to its result and zeroes those again, so a call pays only for the bins its keys reach (the
// buffers are several MB; zeroing or faulting them in per call would cost more than the counting).
// Buffers over kKeptCounts entries (many models on many threads) are freed after the call.
constexpr size_t kKeptCounts = size_t(8) << 20;

std::vector<uint32_t>& clean_counts(int slot, size_t n) {
  thread_local std::vector<uint32_t> buffers[2];
  std::vector<uint32_t>& b = buffers[slot];
  if (b.size() < n) b.resize(n, 0u);
  return b;
}

// After a call: frees an oversized buffer, or zeroes it whole when the call stopped part-way.
void settle_counts(std::vector<uint32_t>& b, bool dirty) {
  if (b.size() > kKeptCounts)
    std::vector<uint32_t>().swap(b);
  else if (dirty)
    std::fill(b.begin(), b.end(), 0u);
}

constexpr int kKeyBlock = 256;  // keys formed at a time by the histogram loops

// The magnitude keys of deltas x[j] - b[j] (b may be null: no base), j < m; false if one is not finite.
template <typename in_t>
inline bool block_keys(const in_t* __restrict x, const in_t* __restrict b, int m, uint32_t* __restrict keys) {
  uint32_t nonfinite = 0;
  if (b) {
    for (int j = 0; j < m; ++j) {
      const float d = to_f(x[j]) - to_f(b[j]);
      uint32_t u;
      std::memcpy(&u, &d, 4);
      u &= 0x7fffffffu;
      nonfinite |= uint32_t(u >= 0x7f800000u);
      keys[j] = u;
    }
  } else {
    for (int j = 0; j < m; ++j) {
      const float d = to_f(x[j]) - 0.0f;
      uint32_t u;
      std::memcpy(&u, &d, 4);
      u &= 0x7fffffffu;
      nonfinite |= uint32_t(u >= 0x7f800000u);
      keys[j] = u;
    }
  }
  return nonfinite == 0;
}

// Histograms of magnitude keys, one row of kBins per request j, over model models[j]: with
// prefix[j] < 0 the top 16 bits of every key (the sign bit is clear, so rows use bins < 2^15), else the
// low 16 bits of the keys whose top 16 bits equal prefix[j]. Counts only, so the result does not
// depend on the thread count. A prefix of 2^15 or more (no key has it) leaves request j out of the pass.
// Returns false, having counted part, when a delta is not finite. With `where`, the second kind also records
// (low 16 bits << 40 | index) of each counted entry, per thread and request (ascending by index: pool.h).
template <typename in_t>
bool key_hist(const Inputs& in, const std::vector<int>& models, const std::vector<int64_t>& prefix, int64_t* out,
              std::vector<std::vector<uint64_t>>* where = nullptr) {
  const int J = int(models.size());
  const int nt = at::get_num_threads();
  std::vector<char> bad(nt, 0);
  if (where) where->assign(size_t(nt) * J, {});
  bool any_top = false, any_inner = false;
  for (int64_t p : prefix) (p < 0 ? any_top : any_inner) = true;
  // counts per thread and request: four copies of the top-16-bit bins, or the low-16-bit bins; and
  // the range of top-16-bit bins each thread and request reached
  std::vector<uint32_t>& quad = clean_counts(0, any_top ? size_t(nt) * J * 4 * kTop : 0);
  std::vector<uint32_t>& h = clean_counts(1, any_inner ? size_t(nt) * J * kBins : 0);
  std::vector<uint32_t> reach(size_t(nt) * J * 2);
  for (size_t x = 0; x < reach.size(); x += 2) reach[x] = kTop, reach[x + 1] = 0;
  pool_for(0, in.n, kChunk, [&](int64_t i0, int64_t i1) {
    const int tid = pool_thread_num();
    for (int j = 0; j < J; ++j) {
      const int t = models[j];
      const int64_t pre = prefix[j];
      if (pre >= kTop) continue;  // a prefix no key has (a model this pass leaves out)
      // Four copies of the top-16-bit histogram, one per entry mod 4: a run of equal bins (the usual
      // case, as magnitudes cluster) makes four independent increments instead of one chain through
      // memory. The keys of a block are formed first, in a loop the compiler vectorises.
      uint32_t* q = pre < 0 ? quad.data() + (size_t(tid) * J + j) * 4 * kTop : nullptr;
      uint32_t* hj = pre < 0 ? nullptr : h.data() + (size_t(tid) * J + j) * kBins;
      uint32_t* r = reach.data() + (size_t(tid) * J + j) * 2;
      const in_t* xt = static_cast<const in_t*>(in.th[t]);
      const in_t* xb = static_cast<const in_t*>(in.base);
      const uint32_t want = uint32_t(pre);
      for (int64_t c = i0; c < i1; c += kKeyBlock) {
        const int m = int(std::min<int64_t>(kKeyBlock, i1 - c));
        uint32_t keys[kKeyBlock];
        if (!block_keys(xt + c, xb ? xb + c : nullptr, m, keys)) {
          bad[tid] = 1;
          return;
        }
        if (q) {
          uint32_t kmin = UINT32_MAX, kmax = 0;
          for (int e = 0; e < m; ++e) kmin = std::min(kmin, keys[e]), kmax = std::max(kmax, keys[e]);
          r[0] = std::min(r[0], kmin >> 16);
          r[1] = std::max(r[1], kmax >> 16);
          int e = 0;
          for (; e + 4 <= m; e += 4) {
            ++q[keys[e] >> 16];
            ++q[kTop + (keys[e + 1] >> 16)];
            ++q[2 * kTop + (keys[e + 2] >> 16)];
            ++q[3 * kTop + (keys[e + 3] >> 16)];
          }
          for (; e < m; ++e) ++q[keys[e] >> 16];
          continue;
        }
        uint32_t any = 0;  // the prefix holds a small share of the keys: most blocks have none
        for (int e = 0; e < m; ++e) any |= uint32_t((keys[e] >> 16) == want);
        if (!any) continue;
        for (int e = 0; e < m; ++e) {
          const uint32_t k = keys[e];
          if ((k >> 16) == want) {
            ++hj[k & 0xffffu];
            if (where) (*where)[size_t(tid) * J + j].push_back(uint64_t(k & 0xffffu) << 40 | uint64_t(c + e));
          }
        }
      }
    }
  });
  bool failed = false;
  for (char b : bad) failed |= b != 0;
  if (!failed) {
    std::fill(out, out + size_t(J) * kBins, int64_t(0));
    for (int tid = 0; tid < nt && any_inner; ++tid)
      for (size_t x = 0; x < size_t(J) * kBins; ++x) {
        out[x] += h[size_t(tid) * J * kBins + x];
        h[size_t(tid) * J * kBins + x] = 0;
      }
    for (int tid = 0; tid < nt && any_top; ++tid)
      for (int j = 0; j < J; ++j) {
        const uint32_t* r = reach.data() + (size_t(tid) * J + j) * 2;
        for (int c = 0; c < 4; ++c) {
          uint32_t* q = quad.data() + ((size_t(tid) * J + j) * 4 + c) * kTop;
          for (uint32_t x = r[0]; x <= r[1] && x < uint32_t(kTop); ++x) {
            out[size_t(j) * kBins + x] += q[x];
            q[x] = 0;
          }
        }
      }
  }
  settle_counts(quad, failed);
  settle_counts(h, failed);
  return !failed;
}


// ------------------------------------------------------------------------- sampled key brackets

// The sample: one block of kSampleBlock entries in each group of about kSampleEvery blocks, at a
// position drawn from the group's number, so that it does not follow a periodic structure of the tensor.
// Given the length of the tensor's rows (`row` > 0, dividing the size), rows of at least a group split
// into a whole number of groups, so every row gives the same share of the sample: where rows differ in
// scale, a sample stratified by row holds the quantiles far better than groups that straddle rows.
constexpr int64_t kSampleBlock = 64;
constexpr int64_t kSampleEvery = 16;

// The sample's groups: their count, and where each starts and how long it is.
struct SampleGroups {
  int64_t count = 0, per_row = 0, row = 0, len = 0;
  SampleGroups(int64_t n, int64_t row_len) {
    const int64_t group = kSampleBlock * kSampleEvery;
    if (row_len >= group && n % row_len == 0) {
      row = row_len;
      per_row = std::max<int64_t>(1, (row_len + group / 2) / group);
      len = row_len / per_row;  // the last group of a row takes the remainder
      count = n / row_len * per_row;
    } else {
      count = n / group;
    }
  }
  // the first entry of group g's sampled block
  int64_t block(int64_t g) const {
    if (!per_row) return (g * kSampleEvery + int64_t(mix64(uint64_t(g)) % uint64_t(kSampleEvery))) * kSampleBlock;
    const int64_t r = g / per_row, i = g % per_row;
    const int64_t size = i == per_row - 1 ? row - i * len : len;
    return r * row + i * len + int64_t(mix64(uint64_t(g)) % uint64_t(size - kSampleBlock + 1));
  }
};

// The keys [first, last] around the key of ascending rank `rank` of model t, from the sample: the
// sample's keys at the ranks within `margin` standard deviations (plus 32) of where that rank falls in
// it. False when there is no bracket: a tensor too small to sample, a non-finite delta in the sample
// (the exact passes the caller falls back to name it), more than `limit` entries expected in the
// bracket, or a bracket of 2^24 keys or more (from 0 to a nonzero key, say).
template <typename in_t>
bool sampled_bracket(const Inputs& in, int t, int64_t rank, double margin, int64_t limit, int64_t row,
                     int64_t* first, int64_t* last) {
  const SampleGroups sg(in.n, row);
  const int64_t groups = sg.count, s = groups * kSampleBlock;
  if (s == 0) return false;
  std::vector<uint32_t> keys(static_cast<size_t>(s));
  const in_t* xt = static_cast<const in_t*>(in.th[t]);
  const in_t* xb = static_cast<const in_t*>(in.base);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t i0 = sg.block(g);
    if (!block_keys(xt + i0, xb ? xb + i0 : nullptr, int(kSampleBlock), keys.data() + g * kSampleBlock)) return false;
  }
  const double p = double(rank) / double(in.n);
  const double centre = p * double(s), spread = margin * std::sqrt(double(s) * p * (1.0 - p)) + 32.0;
  const int64_t lo = std::max<int64_t>(0, std::min<int64_t>(s - 1, int64_t(std::floor(centre - spread))));
  const int64_t hi = std::max<int64_t>(lo, std::min<int64_t>(s - 1, int64_t(std::ceil(centre + spread))));
  if (double(hi - lo + 1) * double(in.n) / double(s) > double(limit)) return false;
  // the sample's keys of ranks lo and hi: the bin of each in the histogram of the top 16 bits (a finite
  // key's are below 2^15), then the rank among the few keys of that bin
  std::vector<uint32_t> count(size_t(kTop), 0u), bin;
  for (uint32_t k : keys) ++count[k >> 16];
  const auto key_at = [&](int64_t r) {
    int64_t under = 0;
    uint32_t b = 0;
    while (under + count[b] <= r) under += count[b++];
    bin.clear();
    for (uint32_t k : keys)
      if ((k >> 16) == b) bin.push_back(k);
    std::nth_element(bin.begin(), bin.begin() + (r - under), bin.end());
    return int64_t(bin[size_t(r - under)]);
  };
  *first = key_at(lo);
  *last = key_at(hi);
  return *last - *first < (int64_t(1) << 24);  // a record holds the key's offset in 24 bits
}

// For each request j (model models[j], the ascending rank ranks[j] of its boundary): a bracket of keys
// from the sample, then one pass that counts, per thread, the keys above each bracket
// (above[thread * J + j]) and records the keys in it ((key - first) << 40 | index, ascending by index
// within each thread's list: pool.h). Where some request gets no bracket, first[j] = -1 for all and
// there is no pass (the caller falls back to the exact passes for the whole tensor anyway). Returns
// false when the pass meets a delta that is not finite.
template <typename in_t>
bool key_bracket(const Inputs& in, const std::vector<int>& models, const std::vector<int64_t>& ranks, double margin,
                 int64_t limit, int64_t row, int64_t* first, int64_t* last, int64_t* above,
                 std::vector<std::vector<uint64_t>>& where) {
  const int J = int(models.size());
  const int nt = at::get_num_threads();
  std::vector<char> bad(nt, 0);
  pool_for(0, J, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j)
      if (!sampled_bracket<in_t>(in, models[size_t(j)], ranks[size_t(j)], margin, limit, row, first + j, last + j))
        first[j] = -1;
  });
  where.resize(size_t(nt) * J);
  if (std::any_of(first, first + J, [](int64_t f) { return f < 0; })) {
    std::fill(first, first + J, int64_t(-1));
    return true;
  }
  for (auto& w : where) w.clear();
  std::fill(above, above + size_t(nt) * J, int64_t(0));
  const in_t* xb = static_cast<const in_t*>(in.base);
  pool_for(0, in.n, kChunk, [&](int64_t i0, int64_t i1) {
    const int tid = pool_thread_num();
    std::vector<int64_t> count(size_t(J), 0);
    // a block of entries at a time, every request over it, so the base's block is read from L1
    for (int64_t c = i0; c < i1; c += kKeyBlock) {
      const int m = int(std::min<int64_t>(kKeyBlock, i1 - c));
      for (int j = 0; j < J; ++j) {
        if (first[j] < 0) continue;
        const in_t* xt = static_cast<const in_t*>(in.th[models[size_t(j)]]);
        const uint32_t lo = uint32_t(first[j]), span = uint32_t(last[j] - first[j] + 1), top = uint32_t(last[j]);
        uint32_t keys[kKeyBlock];
        if (!block_keys(xt + c, xb ? xb + c : nullptr, m, keys)) {
          bad[tid] = 1;
          return;
        }
        uint32_t up = 0;
        for (int e = 0; e < m; ++e) up += uint32_t(keys[e] > top);
        count[size_t(j)] += up;
        // a bracket holds a few % of the keys: groups of 16 without one take only the vector test
        std::vector<uint64_t>& w = where[size_t(tid) * J + j];
        for (int g = 0; g < m; g += 16) {
          const int e1 = std::min(m, g + 16);
          uint32_t any = 0;
          for (int e = g; e < e1; ++e) any |= uint32_t(keys[e] - lo < span);
          if (!any) continue;
          for (int e = g; e < e1; ++e)
            if (keys[e] - lo < span) w.push_back(uint64_t(keys[e] - lo) << 40 | uint64_t(c + e));
        }
      }
    }
    for (int j = 0; j < J; ++j) above[size_t(tid) * J + j] += count[size_t(j)];
  });
  for (char b : bad)
    if (b) return false;
  return true;
}


inline int64_t entry(const CkptSpec& s, int64_t i) { return s.index ? s.index[i] : s.offset + i; }



// The magnitude key of a delta (its float32 bits, sign cleared), folding into the block's flags whether
// it is not finite and, where the caller asks, whether it sits on a boundary key (lo or hi) or falls in
// the deferred bin.
template <bool kEdge = true, bool kBin = true>
inline int32_t classify(float d, int32_t lo, int32_t hi, int32_t bin, uint32_t& nonfinite, uint32_t& edge,
                        uint32_t& inbin) {
  int32_t k;
  std::memcpy(&k, &d, 4);
  k &= 0x7fffffff;
  nonfinite |= uint32_t(k >= 0x7f800000);
  if constexpr (kEdge) edge |= uint32_t((k == lo) | (k == hi));
  if constexpr (kBin) inbin |= uint32_t((k >> 16) == bin);
  return k;
}

// The merge pass, a block of entries at a time: each model's deltas are formed, filtered by its keep
// rule and scaled in branch-free loops the compiler vectorises; only entries whose key equals a
// rule's boundary key (ties at the threshold) and the random stream take scalar code.
template <typename in_t, int kCons>
void merge_block(const Inputs& in, const CkptSpec& s, int64_t i0, int m, float* v, float* res, bool& bad) {
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
  // a model's filtered, scaled delta into what the consensus reads: the sum, or the count of signs
  const auto add = [&](int j, float y) {
    if constexpr (kCons != 2)
      sum[j] += y;
    else
      sgn[j] += int32_t(y > 0.0f) - int32_t(y < 0.0f);
  };
  uint32_t nonfinite = 0;
  for (int t = 0; t < T; ++t) {
    const in_t* x = static_cast<const in_t*>(in.th[t]) + i0;
    float* vt = v + size_t(t) * kBlock;
    const float sc = s.scale[t], w = s.weight[t];
    const Rule* r = s.rules ? reinterpret_cast<const Rule*>(s.rules) + t : nullptr;
    // keys are below 2^31, so the int32 bounds below are exact (clamped where a bound is absent);
    // without rules every finite key lies strictly between them
    int32_t lo = r ? int32_t(std::max<int64_t>(-1, std::min<int64_t>(r->lo_key, INT32_MAX))) : -1;
    int32_t hi = r ? int32_t(std::max<int64_t>(-1, std::min<int64_t>(r->hi_key, INT32_MAX))) : INT32_MAX;
    // the boundary keys whose entries the block must decide one by one (kNoKey: none). A boundary's
    // ties are kept for the indices [a, b] of its rule; a block that lies inside that range keeps all of
    // them (the strict bound widens by one key), one outside it keeps none (the strict bound drops
    // them). Only a block that straddles a or b, or a pass over listed indices, tests entries. In 16-bit
    // checkpoints the threshold's key can be shared by a few % of the entries, so without this nearly
    // every block took the per-entry test, which cost more than the rest of the pass.
    constexpr int32_t kNoKey = -2;
    int32_t elo = lo, ehi = hi;
    if (r && !s.index) {
      const int64_t first = s.offset + i0, last = first + m - 1;
      if (r->lo_a <= first && last <= r->lo_b) {
        if (lo >= 0 && lo < INT32_MAX) --lo;
        elo = kNoKey;
      } else if (last < r->lo_a || first > r->lo_b) {
        elo = kNoKey;
      }
      if (r->hi_a <= first && last <= r->hi_b) {
        if (hi >= 0 && hi < INT32_MAX) ++hi;
        ehi = kNoKey;
      } else if (last < r->hi_a || first > r->hi_b) {
        ehi = kNoKey;
      }
    }
    const int32_t bin = s.defer_bins ? int32_t(s.defer_bins[t]) : -1;
    uint32_t edge = 0, inbin = 0;
    int32_t keys[kBlock];  // kept for the boundary and the deferred bin, so they need not form the deltas again
    if (!s.streams) {
      // one loop forms, filters, scales and sums each delta; entries at a boundary key are dropped here
      // and added below (adding the +-0 they got leaves a sum unchanged, and it is never -0). The loop
      // is built per case so that each does only its own work: the boundary tests where there are rules,
      // the deferred bin's test where there is one, the sum or the sign count that the consensus reads.
      const auto pass = [&](auto with_rule, auto with_bin) {
        constexpr bool kRule = decltype(with_rule)::value, kBin = decltype(with_bin)::value;
        uint32_t nf = 0, ed = 0, ib = 0;
        for (int j = 0; j < m; ++j) {
          const float d = to_f(x[j]) - b[j];
          const int32_t k = classify<kRule, kBin>(d, elo, ehi, bin, nf, ed, ib);
          if constexpr (kRule || kBin) keys[j] = k;
          float y = d;
          if constexpr (kRule) y = (k > lo && k < hi) ? d : 0.0f;
          y = (y * sc) * w;
          vt[j] = y;
          add(j, y);
        }
        nonfinite |= nf;
        edge |= ed;
        inbin |= ib;
      };
      if (r && bin >= 0)
        pass(std::true_type{}, std::true_type{});
      else if (r)
        pass(std::true_type{}, std::false_type{});
      else if (bin >= 0)
        pass(std::false_type{}, std::true_type{});
      else
        pass(std::false_type{}, std::false_type{});
      if (edge && r) {  // entries at a boundary key: their index decides (see Rule)
        for (int j = 0; j < m; ++j) {
          const int64_t k = keys[j];
          if ((k == elo || k == ehi) && r->keeps(uint32_t(k), entry(s, i0 + j))) {
            const float y = ((to_f(x[j]) - b[j]) * sc) * w;
            vt[j] = y;
            add(j, y);
          }
        }
      }
    } else {
      // the random keep: filter first, then draw, then scale and sum
      for (int j = 0; j < m; ++j) {
        const float d = to_f(x[j]) - b[j];
        const int32_t k = classify(d, elo, ehi, bin, nonfinite, edge, inbin);
        keys[j] = k;
        vt[j] = (k > lo && k < hi) ? d : 0.0f;
      }
      if (edge && r)
        for (int j = 0; j < m; ++j) {
          const int64_t k = keys[j];
          if ((k == elo || k == ehi) && r->keeps(uint32_t(k), entry(s, i0 + j))) vt[j] = to_f(x[j]) - b[j];
        }
      // the draw decides by an integer compare without a branch: at a density of 0.5 a branch per
      // entry was mispredicted half the time
      const uint64_t key = s.streams[t];
      const uint32_t ulim = stream_limit(s.keep_prob[t]);
      if (!s.index) {
        const int64_t first = s.offset + i0;
        for (int j = 0; j < m; ++j) vt[j] = stream_bits(key, first + j) < ulim ? vt[j] : 0.0f;
      } else {
        for (int j = 0; j < m; ++j) vt[j] = stream_bits(key, s.index[i0 + j]) < ulim ? vt[j] : 0.0f;
      }
      for (int j = 0; j < m; ++j) {
        const float y = (vt[j] * sc) * w;
        vt[j] = y;
        add(j, y);
      }
    }
    if (inbin) {  // keys in the threshold's bin: counted and located for the exact threshold
      auto& where = (*s.defer_where)[size_t(pool_thread_num()) * T + t];
      // a bin holds well under 1 % of the entries: groups of 16 without one are passed over with a
      // vector test, and only the others take the scalar loop
      for (int j0 = 0; j0 < m; j0 += 16) {
        const int e = std::min(m, j0 + 16);
        uint32_t any = 0;
        for (int j = j0; j < e; ++j) any |= uint32_t((keys[j] >> 16) == bin);
        if (!any) continue;
        for (int j = j0; j < e; ++j) {
          const uint32_t k = uint32_t(keys[j]);
          if (int32_t(k >> 16) == bin) where.push_back(uint64_t(k & 0xffffu) << 40 | uint64_t(entry(s, i0 + j)));
        }
      }
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
void merge_impl(const Inputs& in, const CkptSpec& s, out_t* out, std::vector<char>& bad) {
  const int T = int(in.th.size());
  const int64_t n = s.scatter ? s.selected : in.n;
  pool_for(0, (n + kBlock - 1) / kBlock, 64, [&](int64_t b0, int64_t b1) {
    std::vector<float> v(size_t(T) * kBlock);
    float res[kBlock];
    bool flag = false;
    // scattered entries: each block's inputs are gathered into `buf` and merged from there
    std::vector<in_t> buf(s.scatter ? size_t(T + 1) * kBlock : 0);
    Inputs g{in.dt, nullptr, std::vector<const void*>(T), kBlock};
    CkptSpec local;
    if (s.scatter) {
      local = s;
      g.base = in.base ? buf.data() + size_t(T) * kBlock : nullptr;
      for (int t = 0; t < T; ++t) g.th[t] = buf.data() + size_t(t) * kBlock;
    }
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kBlock;
      const int m = int(std::min<int64_t>(kBlock, n - i0));
      const Inputs* src = &in;
      const CkptSpec* spec = &s;
      int64_t at = i0;
      if (s.scatter) {
        const int64_t* idx = s.index + i0;
        for (int t = 0; t < T; ++t) {
          const in_t* x = static_cast<const in_t*>(in.th[t]);
          in_t* dst = buf.data() + size_t(t) * kBlock;
          for (int j = 0; j < m; ++j) dst[j] = x[idx[j]];
        }
        if (in.base) {
          const in_t* x = static_cast<const in_t*>(in.base);
          in_t* dst = buf.data() + size_t(T) * kBlock;
          for (int j = 0; j < m; ++j) dst[j] = x[idx[j]];
        }
        local.index = idx;
        src = &g;
        spec = &local;
        at = 0;
      }
      switch (s.consensus) {
        case 0: merge_block<in_t, 0>(*src, *spec, at, m, v.data(), res, flag); break;
        case 1: merge_block<in_t, 1>(*src, *spec, at, m, v.data(), res, flag); break;
        default: merge_block<in_t, 2>(*src, *spec, at, m, v.data(), res, flag); break;
      }
      out_t staged[kBlock];  // scattered entries are converted here first
      out_t* __restrict o = s.scatter ? staged : out + i0;
      for (int j = 0; j < m; ++j) o[j] = out_t(res[j]);
      uint32_t overflow = 0;  // a finite input can still overflow in the sums or in the output dtype
      for (int j = 0; j < m; ++j) {
        const float f = to_f(o[j]);
        uint32_t u;
        std::memcpy(&u, &f, 4);
        overflow |= uint32_t((u & 0x7fffffffu) >= 0x7f800000u);
      }
      if (s.scatter)
        for (int j = 0; j < m; ++j) out[s.index[i0 + j]] = o[j];
      if (overflow) flag = true;
    }
    if (flag) bad[pool_thread_num()] = 1;
  });
}

// ------------------------------------------------------------------------- the table's entries

bool hist_entry(const CkptInputs& in, const std::vector<int>& models, const std::vector<int64_t>& prefix, int64_t* out,
                std::vector<std::vector<uint64_t>>* where) {
  bool ok = true;
  dispatch(in.dt, [&](auto z) { ok = key_hist<decltype(z)>(in, models, prefix, out, where); });
  return ok;
}

bool bracket_entry(const CkptInputs& in, const std::vector<int>& models, const std::vector<int64_t>& ranks,
                   double margin, int64_t limit, int64_t row, int64_t* first, int64_t* last, int64_t* above,
                   std::vector<std::vector<uint64_t>>& where) {
  bool ok = true;
  dispatch(in.dt, [&](auto z) {
    ok = key_bracket<decltype(z)>(in, models, ranks, margin, limit, row, first, last, above, where);
  });
  return ok;
}

bool merge_entry(const CkptInputs& in, const CkptSpec& s, void* out, at::ScalarType out_dtype) {
  const int T = int(in.th.size());
  const int nt = at::get_num_threads();
  if (s.defer_bins) s.defer_where->assign(size_t(nt) * T, {});
  std::vector<char> bad(nt, 0);
  dispatch(in.dt, [&](auto zi) {
    using in_t = decltype(zi);
    switch (out_dtype) {
      case at::kFloat: merge_impl<in_t>(in, s, static_cast<float*>(out), bad); break;
      case at::kBFloat16: merge_impl<in_t>(in, s, static_cast<c10::BFloat16*>(out), bad); break;
      case at::kHalf: merge_impl<in_t>(in, s, static_cast<c10::Half*>(out), bad); break;
      default: merge_impl<in_t>(in, s, static_cast<double*>(out), bad); break;
    }
  });
  if (s.defer_bins) {  // the bins' histograms, from the records (a bin holds few entries)
    int64_t* hp = s.defer_hist;
    std::fill(hp, hp + size_t(T) * 65536, int64_t(0));
    for (int tid = 0; tid < nt; ++tid)
      for (int t = 0; t < T; ++t)
        for (uint64_t rec : (*s.defer_where)[size_t(tid) * T + t]) ++hp[size_t(t) * 65536 + (rec >> 40)];
  }
  for (char b : bad)
    if (b) return false;
  return true;
}

bool abs_sums_entry(const CkptInputs& in, const CkptSpec& s, double* part) {
  const int T = int(in.th.size());
  const int64_t nchunks = (in.n + kChunk - 1) / kChunk;
  std::vector<char> bad(at::get_num_threads(), 0);
  dispatch(in.dt, [&](auto z) {
    using in_t = decltype(z);
    pool_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        for (int t = 0; t < T; ++t) {
          double all = 0.0, keep = 0.0;
          const Rule* r = s.rules ? reinterpret_cast<const Rule*>(s.rules) + t : nullptr;
          const uint64_t key = s.streams ? s.streams[t] : 0;
          const uint32_t ulim = s.streams ? stream_limit(s.keep_prob[t]) : 0;
          uint32_t nonfinite = 0;
          // branch-free keep tests (the random one is a coin flip); adding +0 for a dropped entry
          // leaves the sum as it was (it is never -0), so the sums are those of the branchy loop
          for (int64_t i = c * kChunk, e = std::min(in.n, (c + 1) * kChunk); i < e; ++i) {
            const float d = delta_at<in_t>(in, t, i);
            nonfinite |= uint32_t(!std::isfinite(d));
            const double a = std::fabs(double(d));
            all += a;
            bool k = true;
            if (r) k = r->keeps(key_of(d), entry(s, i));
            if (s.streams) k &= stream_bits(key, entry(s, i)) < ulim;
            keep += k ? a : 0.0;
          }
          if (nonfinite) bad[pool_thread_num()] = 1;
          part[(size_t(c) * T + t) * 2] = all;
          part[(size_t(c) * T + t) * 2 + 1] = keep;
        }
    });
  });
  for (char b : bad)
    if (b) return false;
  return true;
}

void random_bits_entry(int64_t key, int64_t start, int64_t n, int32_t* o) {
  pool_for(0, n, kChunk, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) o[i] = int32_t(stream_bits(uint64_t(key), start + i));
  });
}

int64_t nonfinite_entry(const CkptInputs& in, int* which, float* value) {
  int64_t found = -1;
  dispatch(in.dt, [&](auto z) {
    using in_t = decltype(z);
    for (int t = -1; t < int(in.th.size()) && found < 0; ++t) {
      const in_t* x = static_cast<const in_t*>(t < 0 ? in.base : in.th[t]);
      for (int64_t i = 0; x && i < in.n; ++i)
        if (!std::isfinite(to_f(x[i]))) {
          found = i, *which = t, *value = to_f(x[i]);
          break;
        }
    }
  });
  return found;
}

}  // namespace ckpt
}  // namespace

const CkptKernels& FM_CAT(ckpt_kernels_, CPU_CAPABILITY)() {
  static const CkptKernels table{FM_STR(CPU_CAPABILITY), &ckpt::hist_entry,        &ckpt::merge_entry,
                                 &ckpt::abs_sums_entry,   &ckpt::random_bits_entry, &ckpt::nonfinite_entry,
                                 &ckpt::bracket_entry};
  return table;
}

}  // namespace cpu
}  // namespace fastmerge
