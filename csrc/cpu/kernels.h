// Fused CPU kernels. This file is compiled once per instruction set (DEFAULT, AVX2, AVX512): each
// wrapper translation unit defines CPU_CAPABILITY and CPU_CAPABILITY_<ISA>, so at::vec::Vectorized
// and everything below lands in a namespace of its own, and the op layer picks one at run time.
//
// Invariants (see entry_math.h): no fused multiply-add in anything compared bit for bit with the
// reference (the build passes -ffp-contract=off); sums over tasks in task order; every reduction is
// split into work items that do not depend on the thread count and combined in item order, or is an
// integer count (order-free). Inputs are 1-D strided views; chunks are converted to the accumulation
// type in small per-thread buffers, so no T x d temporary ever exists.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "fastmerge/entry_math.h"

namespace fastmerge {
namespace cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

constexpr int64_t kChunk = 512;      // elements converted per input at a time (fits L1 for T ~ 8-16)
constexpr int64_t kItem = 1 << 16;   // elements per work item (fixed: results never depend on threads)
constexpr int64_t kGrain = 1 << 15;  // parallel grain of the purely elementwise ops

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename T>
struct BitsOf;
template <>
struct BitsOf<float> {
  using type = uint32_t;
  static constexpr uint32_t defer = 0x7F80A5A5u, cancel = 0x7F80C3C3u;  // signaling NaNs
};
template <>
struct BitsOf<double> {
  using type = uint64_t;
  static constexpr uint64_t defer = 0x7FF0A5A5A5A5A5A5ull, cancel = 0x7FF0C3C3C3C3C3C3ull;
};
template <>
struct BitsOf<c10::BFloat16> {
  using type = uint16_t;
  static constexpr uint16_t defer = 0x7F85u, cancel = 0x7F8Cu;
};
template <>
struct BitsOf<c10::Half> {
  using type = uint16_t;
  static constexpr uint16_t defer = 0x7C05u, cancel = 0x7C0Cu;
};

#define FM_DISPATCH_DT(dt, ...)                 \
  switch (dt) {                                 \
    case DT::F32: {                             \
      using in_t = float;                       \
      return __VA_ARGS__();                     \
    }                                           \
    case DT::BF16: {                            \
      using in_t = c10::BFloat16;               \
      return __VA_ARGS__();                     \
    }                                           \
    case DT::F16: {                             \
      using in_t = c10::Half;                   \
      return __VA_ARGS__();                     \
    }                                           \
    default: {                                  \
      using in_t = double;                      \
      return __VA_ARGS__();                     \
    }                                           \
  }

// ---------------------------------------------------------------- loading and storing chunks

template <typename in_t, typename acc_t>
inline const acc_t* load_chunk(const Src& s, int64_t i, int64_t n, acc_t* buf) {
  const in_t* p = static_cast<const in_t*>(s.ptr);
  if (s.stride == 1) {
    if constexpr (std::is_same_v<in_t, acc_t>) {
      return p + i;
    } else if constexpr (std::is_same_v<in_t, c10::BFloat16>) {
      const uint16_t* q = reinterpret_cast<const uint16_t*>(p + i);
      uint32_t* d = reinterpret_cast<uint32_t*>(buf);
      for (int64_t j = 0; j < n; ++j) d[j] = uint32_t(q[j]) << 16;
      return buf;
    } else {
      at::vec::convert(p + i, buf, n);
      return buf;
    }
  }
  for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<acc_t>(p[(i + j) * s.stride]);
  return buf;
}

template <typename in_t, typename acc_t>
inline acc_t load_one(const Src& s, int64_t i) {
  return static_cast<acc_t>(static_cast<const in_t*>(s.ptr)[i * s.stride]);
}

inline uint16_t bf16_bits(float f) {  // round to nearest even, as c10::BFloat16
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : uint16_t(r);
}

template <typename out_t, typename acc_t>
inline out_t to_out(acc_t v) {
  if constexpr (std::is_same_v<out_t, c10::BFloat16>) {
    return c10::BFloat16(bf16_bits(v), c10::BFloat16::from_bits());
  } else {
    return static_cast<out_t>(v);
  }
}

template <typename out_t, typename acc_t>
inline void store_chunk(out_t* out, const acc_t* v, int64_t n) {
  if constexpr (std::is_same_v<out_t, acc_t>) {
    if (out != v) std::memcpy(out, v, n * sizeof(acc_t));
  } else if constexpr (std::is_same_v<out_t, c10::BFloat16>) {
    uint16_t* o = reinterpret_cast<uint16_t*>(out);
    const uint32_t* u = reinterpret_cast<const uint32_t*>(v);
    for (int64_t j = 0; j < n; ++j) {
      uint32_t r = (u[j] + 0x7FFFu + ((u[j] >> 16) & 1u)) >> 16;
      o[j] = (u[j] & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : uint16_t(r);
    }
  } else {
    at::vec::convert(v, out, n);
  }
}

template <typename V>
inline bool all_zero(const V& v) {
  return v.zero_mask() == (1 << V::size()) - 1;
}

template <typename V>
inline typename V::value_type lane_sum(const V& v) {  // fixed lane order
  alignas(64) typename V::value_type tmp[V::size()];
  v.store(tmp);
  typename V::value_type s = 0;
  for (int l = 0; l < V::size(); ++l) s += tmp[l];
  return s;
}

struct Item {
  int64_t seg, begin, end;
};

// Work items: each lies inside one segment and holds at most kItem elements; fixed by the
// offsets alone, so reductions over items are the same whatever the thread count.
inline std::vector<Item> make_items(const int64_t* off, int64_t S) {
  std::vector<Item> items;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t b = off[s]; b < off[s + 1]; b += kItem) items.push_back({s, b, std::min(off[s + 1], b + kItem)});
  return items;
}

// ---------------------------------------------------------------- uniform_average / task_arithmetic

template <typename in_t>
bool average_impl(const AvgArgs& a) {
  using acc_t = typename AccOf<in_t>::type;
  using V = Vectorized<acc_t>;
  std::vector<acc_t> w(a.T);
  acc_t wsum = acc_t(a.weights[0]);
  for (int t = 0; t < a.T; ++t) w[t] = acc_t(a.weights[t]);
  for (int t = 1; t < a.T; ++t) wsum = wsum + w[t];
  in_t* out = static_cast<in_t*>(a.out);
  std::atomic<bool> bad{false};
  at::parallel_for(0, a.n, kGrain, [&](int64_t b, int64_t e) {
    alignas(64) acc_t buf[kChunk];
    alignas(64) acc_t accb[kChunk];
    V chk(0);
    for (int64_t i = b; i < e; i += kChunk) {
      const int64_t n = std::min(kChunk, e - i);
      acc_t* acc = std::is_same_v<in_t, acc_t> ? reinterpret_cast<acc_t*>(out + i) : accb;
      const acc_t* x = load_chunk<in_t>(a.thetas[0], i, n, buf);
      const V w0(w[0]);
      for (int64_t j = 0; j < n; j += V::size()) {
        const int64_t c = std::min<int64_t>(V::size(), n - j);
        (V::loadu(x + j, c) * w0).store(acc + j, c);
      }
      for (int t = 1; t < a.T; ++t) {
        x = load_chunk<in_t>(a.thetas[t], i, n, buf);
        const V wt(w[t]);
        for (int64_t j = 0; j < n; j += V::size()) {
          const int64_t c = std::min<int64_t>(V::size(), n - j);
          (V::loadu(acc + j, c) + V::loadu(x + j, c) * wt).store(acc + j, c);
        }
      }
      const V ws(wsum);
      for (int64_t j = 0; j < n; j += V::size()) {
        const int64_t c = std::min<int64_t>(V::size(), n - j);
        V o = V::loadu(acc + j, c) / ws;
        chk = chk + (o - o);
        o.store(acc + j, c);
      }
      store_chunk(out + i, acc, n);
    }
    if (!all_zero(chk)) bad = true;
  });
  return bad;
}

template <typename in_t>
bool task_arith_impl(const TAArgs& a) {
  using acc_t = typename AccOf<in_t>::type;
  using V = Vectorized<acc_t>;
  std::vector<acc_t> lam(a.T);
  for (int t = 0; t < a.T; ++t) lam[t] = acc_t(a.lam[t]);
  in_t* out = static_cast<in_t*>(a.out);
  std::atomic<bool> bad{false};
  at::parallel_for(0, a.n, kGrain, [&](int64_t b, int64_t e) {
    alignas(64) acc_t bbuf[kChunk];
    alignas(64) acc_t buf[kChunk];
    alignas(64) acc_t accb[kChunk];
    V chk(0);
    for (int64_t i = b; i < e; i += kChunk) {
      const int64_t n = std::min(kChunk, e - i);
      acc_t* acc = std::is_same_v<in_t, acc_t> ? reinterpret_cast<acc_t*>(out + i) : accb;
      const acc_t* bp = load_chunk<in_t>(a.base, i, n, bbuf);
      if (acc != bp) std::memcpy(acc, bp, n * sizeof(acc_t));
      for (int t = 0; t < a.T; ++t) {
        const acc_t* x = load_chunk<in_t>(a.thetas[t], i, n, buf);
        const V lt(lam[t]);
        for (int64_t j = 0; j < n; j += V::size()) {
          const int64_t c = std::min<int64_t>(V::size(), n - j);
          const V bv = V::loadu(bp + j, c);
          (V::loadu(acc + j, c) + lt * (V::loadu(x + j, c) - bv)).store(acc + j, c);
        }
      }
      for (int64_t j = 0; j < n; j += V::size()) {
        const int64_t c = std::min<int64_t>(V::size(), n - j);
        const V o = V::loadu(acc + j, c);
        chk = chk + (o - o);
      }
      store_chunk(out + i, acc, n);
    }
    if (!all_zero(chk)) bad = true;
  });
  return bad;
}

// ---------------------------------------------------------------- task-vector Gram matrix

template <typename in_t>
bool gram_impl(const GramArgs& a) {
  using acc_t = typename AccOf<in_t>::type;
  using VD = Vectorized<double>;
  const int T = a.T;
  const int64_t zero_off[2] = {0, a.n};
  const std::vector<Item> items = make_items(zero_off, 1);
  const int64_t P2 = int64_t(T) * T;
  std::vector<double> part(items.size() * P2, 0.0);
  at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t ib, int64_t ie) {
    alignas(64) acc_t bbuf[kChunk];
    alignas(64) acc_t buf[kChunk];
    std::vector<double> tau(size_t(T) * kChunk + 8);  // kChunk doubles per task: L1/L2 resident
    for (int64_t it = ib; it < ie; ++it) {
      double* p = part.data() + it * P2;
      for (int64_t i = items[it].begin; i < items[it].end; i += kChunk) {
        const int64_t n = std::min(kChunk, items[it].end - i);
        const int64_t nvec = (n + VD::size() - 1) / VD::size() * VD::size();
        const acc_t* bp = load_chunk<in_t>(a.base, i, n, bbuf);
        for (int t = 0; t < T; ++t) {
          const acc_t* x = load_chunk<in_t>(a.thetas[t], i, n, buf);
          double* d = tau.data() + size_t(t) * kChunk;
          for (int64_t j = 0; j < n; ++j) d[j] = double(acc_t(x[j] - bp[j]));
          for (int64_t j = n; j < nvec; ++j) d[j] = 0.0;
        }
        // 4 x 4 tiles of task pairs: 8 loads feed 16 fused multiply-adds (the Gram matrix is
        // compared within a tolerance, so fused rounding is fine here).
        for (int ta0 = 0; ta0 < T; ta0 += 4) {
          for (int tb0 = ta0; tb0 < T; tb0 += 4) {
            const int na = std::min(4, T - ta0), nb = std::min(4, T - tb0);
            VD acc[4][4];
            for (int u = 0; u < 4; ++u)
              for (int v = 0; v < 4; ++v) acc[u][v] = VD(0);
            const double* rows[8];
            for (int u = 0; u < 4; ++u) {
              rows[u] = tau.data() + size_t(ta0 + std::min(u, na - 1)) * kChunk;
              rows[4 + u] = tau.data() + size_t(tb0 + std::min(u, nb - 1)) * kChunk;
            }
            for (int64_t j = 0; j < nvec; j += VD::size()) {
              const VD a0 = VD::loadu(rows[0] + j), a1 = VD::loadu(rows[1] + j);
              const VD a2 = VD::loadu(rows[2] + j), a3 = VD::loadu(rows[3] + j);
              const VD b0 = VD::loadu(rows[4] + j), b1 = VD::loadu(rows[5] + j);
              const VD b2 = VD::loadu(rows[6] + j), b3 = VD::loadu(rows[7] + j);
              acc[0][0] = at::vec::fmadd(a0, b0, acc[0][0]);
              acc[0][1] = at::vec::fmadd(a0, b1, acc[0][1]);
              acc[0][2] = at::vec::fmadd(a0, b2, acc[0][2]);
              acc[0][3] = at::vec::fmadd(a0, b3, acc[0][3]);
              acc[1][0] = at::vec::fmadd(a1, b0, acc[1][0]);
              acc[1][1] = at::vec::fmadd(a1, b1, acc[1][1]);
              acc[1][2] = at::vec::fmadd(a1, b2, acc[1][2]);
              acc[1][3] = at::vec::fmadd(a1, b3, acc[1][3]);
              acc[2][0] = at::vec::fmadd(a2, b0, acc[2][0]);
              acc[2][1] = at::vec::fmadd(a2, b1, acc[2][1]);
              acc[2][2] = at::vec::fmadd(a2, b2, acc[2][2]);
              acc[2][3] = at::vec::fmadd(a2, b3, acc[2][3]);
              acc[3][0] = at::vec::fmadd(a3, b0, acc[3][0]);
              acc[3][1] = at::vec::fmadd(a3, b1, acc[3][1]);
              acc[3][2] = at::vec::fmadd(a3, b2, acc[3][2]);
              acc[3][3] = at::vec::fmadd(a3, b3, acc[3][3]);
            }
            for (int u = 0; u < na; ++u)
              for (int v = 0; v < nb; ++v)
                if (tb0 + v >= ta0 + u) p[(ta0 + u) * T + tb0 + v] += lane_sum(acc[u][v]);
          }
        }
      }
    }
  });
  for (int ta = 0; ta < T; ++ta)
    for (int tb = ta; tb < T; ++tb) {
      double s = 0.0;
      for (size_t it = 0; it < items.size(); ++it) s += part[it * P2 + ta * T + tb];
      a.gram[ta * T + tb] = s;
      a.gram[tb * T + ta] = s;
    }
  for (int t = 0; t < T; ++t)
    if (!std::isfinite(a.gram[t * T + t])) return true;
  return false;
}

// ---------------------------------------------------------------- block_scale forward / backward

template <typename in_t>
bool block_fwd_impl(const BlockArgs& a) {
  using acc_t = typename AccOf<in_t>::type;
  using V = Vectorized<acc_t>;
  const std::vector<Item> items = make_items(a.offsets, a.B);
  in_t* out = static_cast<in_t*>(a.out);
  std::atomic<bool> bad{false};
  at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t ib, int64_t ie) {
    alignas(64) acc_t bbuf[kChunk];
    alignas(64) acc_t buf[kChunk];
    alignas(64) acc_t accb[kChunk];
    V chk(0);
    for (int64_t it = ib; it < ie; ++it) {
      const int64_t blk = items[it].seg;
      for (int64_t i = items[it].begin; i < items[it].end; i += kChunk) {
        const int64_t n = std::min(kChunk, items[it].end - i);
        acc_t* acc = std::is_same_v<in_t, acc_t> ? reinterpret_cast<acc_t*>(out + i) : accb;
        const acc_t* bp = load_chunk<in_t>(a.base, i, n, bbuf);
        if (acc != bp) std::memcpy(acc, bp, n * sizeof(acc_t));
        for (int t = 0; t < a.T; ++t) {
          const acc_t* x = load_chunk<in_t>(a.vectors[t], i, n, buf);
          const V c(acc_t(a.coefs[t * a.B + blk]));
          for (int64_t j = 0; j < n; j += V::size()) {
            const int64_t m = std::min<int64_t>(V::size(), n - j);
            (V::loadu(acc + j, m) + c * V::loadu(x + j, m)).store(acc + j, m);
          }
        }
        for (int64_t j = 0; j < n; j += V::size()) {
          const int64_t m = std::min<int64_t>(V::size(), n - j);
          const V o = V::loadu(acc + j, m);
          chk = chk + (o - o);
        }
        store_chunk(out + i, acc, n);
      }
    }
    if (!all_zero(chk)) bad = true;
  });
  return bad;
}

template <typename in_t>
bool block_bwd_impl(const BlockArgs& a) {
  using acc_t = typename AccOf<in_t>::type;
  using VD = Vectorized<double>;
  const int T = a.T;
  const std::vector<Item> items = make_items(a.offsets, a.B);
  std::vector<double> part(items.size() * T, 0.0);
  at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t ib, int64_t ie) {
    alignas(64) acc_t gbuf[kChunk];
    alignas(64) acc_t buf[kChunk];
    alignas(64) double gd[kChunk];
    alignas(64) double vd[kChunk];
    for (int64_t it = ib; it < ie; ++it) {
      for (int64_t i = items[it].begin; i < items[it].end; i += kChunk) {
        const int64_t n = std::min(kChunk, items[it].end - i);
        const acc_t* g = load_chunk<in_t>(a.base, i, n, gbuf);
        for (int64_t j = 0; j < n; ++j) gd[j] = double(g[j]);
        for (int t = 0; t < T; ++t) {
          const acc_t* x = load_chunk<in_t>(a.vectors[t], i, n, buf);
          for (int64_t j = 0; j < n; ++j) vd[j] = double(x[j]);
          VD s0(0), s1(0);
          int64_t j = 0;
          for (; j + 2 * VD::size() <= n; j += 2 * VD::size()) {
            s0 = at::vec::fmadd(VD::loadu(gd + j), VD::loadu(vd + j), s0);
            s1 = at::vec::fmadd(VD::loadu(gd + j + VD::size()), VD::loadu(vd + j + VD::size()), s1);
          }
          for (; j < n; j += VD::size()) {
            const int64_t m = std::min<int64_t>(VD::size(), n - j);
            s0 = at::vec::fmadd(VD::loadu(gd + j, m), VD::loadu(vd + j, m), s0);
          }
          part[it * T + t] += lane_sum(s0 + s1);
        }
      }
    }
  });
  double* gc = static_cast<double*>(a.out);
  std::fill(gc, gc + int64_t(T) * a.B, 0.0);
  for (size_t it = 0; it < items.size(); ++it)
    for (int t = 0; t < T; ++t) gc[t * a.B + items[it].seg] += part[it * T + t];
  for (int64_t q = 0; q < int64_t(T) * a.B; ++q)
    if (!std::isfinite(gc[q])) return true;
  return false;
}

// ---------------------------------------------------------------- TIES
//
// Exact trim thresholds without sorting: for each (task, segment) problem p, a deterministic sample
// brackets the k-th smallest |tau| in [lo, hi]. One streaming pass then keeps what is surely above
// hi, drops what is surely below lo, counts the entries below lo, collects the few entries inside
// the bracket and marks the positions that touch one (a signaling-NaN sentinel in the output). The
// exact threshold is then the (k - below)-th smallest candidate; a fix-up finishes the marked
// positions, and a second one the positions whose sign sum cancelled exactly (they need the
// majority sign, known only at the end). A bracket that missed falls back to an exact selection
// and a second pass. Problems small enough are solved exactly up front.

constexpr int64_t kExactMax = 1 << 20;  // problems this small: exact selection before the pass
constexpr int64_t kSampleMax = 1 << 20;  // at most this many sampled entries per problem
constexpr int64_t kRun = 16;             // sampled in runs of contiguous entries (one cache line)
constexpr int kHistBits = 19;            // histogram of the sample: top 19 bits below the sign bit

template <typename acc_t>
struct TiesPlan {
  int T = 0;
  int64_t S = 0;
  const int64_t* off = nullptr;
  int mode = 0;
  acc_t lam = 0;
  bool has_w = false;
  std::vector<acc_t> w;
  std::vector<int64_t> k;       // per problem p = t * S + s
  std::vector<acc_t> lo, hi;    // bracket; exact threshold thr is stored as lo = thr, hi = prev(thr)
  std::vector<char> bracket;    // 1 while the threshold is still bracketed
  std::vector<acc_t> thr;       // exact thresholds once known
};

template <typename acc_t>
inline acc_t prev_of(acc_t x) {
  return std::nextafter(x, -std::numeric_limits<acc_t>::infinity());
}

template <typename acc_t>
inline void set_exact(TiesPlan<acc_t>& P, int64_t p, acc_t thr) {
  P.thr[p] = thr;
  P.lo[p] = thr;
  P.hi[p] = prev_of(thr);
  P.bracket[p] = 0;
}

template <typename in_t, typename acc_t>
inline acc_t tau_at(const TiesArgs& a, const TiesPlan<acc_t>& P, int t, int64_t i, acc_t b) {
  acc_t tau = load_one<in_t, acc_t>(a.thetas[t], i) - b;
  return P.has_w ? tau * P.w[t] : tau;
}

// Exact k-th smallest |tau| of problem (t, s) by gathering it; false if a non-finite value showed up.
template <typename in_t, typename acc_t>
bool select_exact(const TiesArgs& a, const TiesPlan<acc_t>& P, int t, int64_t s, std::vector<acc_t>& buf,
                  acc_t* thr) {
  const int64_t b0 = P.off[s], n = P.off[s + 1] - P.off[s], k = P.k[t * P.S + s];
  buf.resize(n);
  alignas(64) acc_t bb[kChunk];
  alignas(64) acc_t xb[kChunk];
  bool ok = true;
  for (int64_t i = 0; i < n; i += kChunk) {
    const int64_t m = std::min(kChunk, n - i);
    const acc_t* bp = load_chunk<in_t>(a.base, b0 + i, m, bb);
    const acc_t* xp = load_chunk<in_t>(a.thetas[t], b0 + i, m, xb);
    for (int64_t j = 0; j < m; ++j) {
      acc_t tau = xp[j] - bp[j];
      if (P.has_w) tau = tau * P.w[t];
      ok = ok && std::isfinite(tau);
      buf[i + j] = abs_of(tau);
    }
  }
  if (!ok) return false;
  std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end());
  *thr = buf[k - 1];
  return true;
}

// Bracket [lo, hi] around the k-th smallest |tau| from evenly spaced runs of the problem.
template <typename in_t, typename acc_t>
bool sample_bracket(const TiesArgs& a, TiesPlan<acc_t>& P, int t, int64_t s, std::vector<acc_t>& buf,
                    int64_t* nsampled) {
  const int64_t b0 = P.off[s], n = P.off[s + 1] - P.off[s], p = t * P.S + s, k = P.k[p];
  const int64_t runs = std::max<int64_t>(1, std::min(kSampleMax, n / 8) / kRun);
  buf.clear();
  bool ok = true;
  for (int64_t r = 0; r < runs; ++r) {
    const int64_t start = b0 + (r * (n - kRun)) / std::max<int64_t>(runs - 1, 1);
    for (int64_t i = start; i < start + kRun; ++i) {
      const acc_t b = load_one<in_t, acc_t>(a.base, i);
      const acc_t tau = tau_at<in_t>(a, P, t, i, b);
      ok = ok && std::isfinite(tau);
      buf.push_back(abs_of(tau));
    }
  }
  if (!ok) return false;
  const int64_t m = int64_t(buf.size());
  *nsampled += m;
  const double q = double(k) / double(n);
  // 5 sigma of the sample quantile, inflated 4x in variance for the correlation inside a run.
  const double h = 5.0 * std::sqrt(4.0 * double(m) * q * (1.0 - q)) + double(kRun);
  const double center = q * double(m) - 1.0;
  const int64_t lo_rank = int64_t(std::floor(center - h));
  const int64_t hi_rank = int64_t(std::ceil(center + h));
  // Ranks from a histogram of the top bits of |tau| (order-preserving for non-negative floats):
  // linear time, and the bracket only widens to whole bins.
  using bits_t = typename BitsOf<acc_t>::type;
  constexpr int kShift = int(sizeof(bits_t) * 8) - 1 - kHistBits;
  std::vector<uint32_t> hist(size_t(1) << kHistBits, 0);
  for (const acc_t v : buf) {
    bits_t u;
    std::memcpy(&u, &v, sizeof(u));
    ++hist[size_t(u >> kShift)];
  }
  acc_t lo = 0, hi = std::numeric_limits<acc_t>::infinity();
  int64_t cum = 0;
  for (size_t bin = 0; bin < hist.size(); ++bin) {
    const int64_t next = cum + hist[bin];
    if (lo_rank >= 0 && cum <= lo_rank && lo_rank < next) {
      const bits_t u = bits_t(bin) << kShift;
      std::memcpy(&lo, &u, sizeof(u));
    }
    if (hi_rank < m && cum <= hi_rank && hi_rank < next) {
      const bits_t u = ((bits_t(bin) + 1) << kShift) - 1;
      std::memcpy(&hi, &u, sizeof(u));
      break;
    }
    cum = next;
  }
  P.lo[p] = lo;
  P.hi[p] = hi;
  P.bracket[p] = 1;
  return true;
}

template <typename acc_t>
struct PassAcc {  // per-thread results of one streaming pass
  std::vector<int64_t> below;
  std::vector<std::vector<acc_t>> cand;
  int64_t msum = 0, deferred = 0, cancelled = 0;
  bool bad = false;
};

// One streaming pass. WRITE = false only classifies (two-pass strategy); WRITE = true also merges
// and writes every position it can decide, marking the rest with sentinels.
template <bool WRITE, typename in_t>
void ties_pass(const TiesArgs& a, const TiesPlan<typename AccOf<in_t>::type>& P,
               std::vector<PassAcc<typename AccOf<in_t>::type>>& acc_by_thread) {
  // One vector of positions at a time, all tasks in registers: the trimmed entries never go to
  // memory. Per position the pass keeps the task-order sums of the positive and of the negative
  // trimmed entries (and their counts and largest magnitudes); the elected sign then picks one
  // side, which is exactly the reference's "sum over tasks with the elected sign".
  using acc_t = typename AccOf<in_t>::type;
  using V = Vectorized<acc_t>;
  using Bits = BitsOf<in_t>;
  using bits_t = typename Bits::type;
  constexpr int VS = V::size();
  const int T = a.T;
  const int64_t S = P.S;
  const int mode = P.mode;
  const std::vector<Item> items = make_items(P.off, S);
  in_t* out = static_cast<in_t*>(a.out);
  const int nthreads = at::get_num_threads();
  acc_by_thread.assign(nthreads, PassAcc<acc_t>());
  for (auto& pa : acc_by_thread) {
    pa.below.assign(T * S, 0);
    pa.cand.resize(T * S);
  }
  at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t ib, int64_t ie) {
    PassAcc<acc_t>& R = acc_by_thread[at::get_thread_num()];
    alignas(64) acc_t bb[kChunk];
    alignas(64) acc_t ob[kChunk];
    alignas(64) acc_t dflag[kChunk];
    alignas(64) acc_t cflag[kChunk];
    alignas(64) acc_t lanes[VS];
    alignas(64) acc_t ulanes[VS];
    std::vector<acc_t> xbufs(size_t(T) * kChunk);
    std::vector<const acc_t*> xs(T);
    std::vector<V> belowv(T);
    std::vector<acc_t> tr(T);
    const V zero(0), one(1), lamv(P.lam);
    V chk(0);
    for (int64_t it = ib; it < ie; ++it) {
      const int64_t s = items[it].seg;
      bool seg_bracket = false;
      for (int t = 0; t < T; ++t) seg_bracket = seg_bracket || P.bracket[t * S + s];
      const acc_t* lo = P.lo.data() + s;  // lo[t * S], hi[t * S]
      const acc_t* hi = P.hi.data() + s;
      for (int64_t i = items[it].begin; i < items[it].end; i += kChunk) {
        const int64_t n = std::min(kChunk, items[it].end - i);
        const int64_t nv = n / VS * VS;
        const acc_t* bp = load_chunk<in_t>(a.base, i, n, bb);
        for (int t = 0; t < T; ++t) {
          xs[t] = load_chunk<in_t>(a.thetas[t], i, n, xbufs.data() + size_t(t) * kChunk);
          belowv[t] = zero;
        }
        int64_t ndef = 0, ncan = 0, msum = 0;
        V msumv(0), ndefv(0), ncanv(0);
        for (int64_t j = 0; j < nv; j += VS) {
          const V bv = V::loadu(bp + j);
          V sv(0), pp(0), nn(0), cp(0), cn(0), dm(0);
          for (int t = 0; t < T; ++t) {
            V tau = V::loadu(xs[t] + j) - bv;
            if (P.has_w) tau = tau * V(P.w[t]);
            chk = chk + (tau - tau);
            const V ab = tau.abs();
            const V lov(lo[t * S]), hiv(hi[t * S]);
            belowv[t] = belowv[t] + ((ab < lov) & one);
            if (seg_bracket && P.bracket[t * S + s]) {
              const V unc = (ab >= lov) & (ab <= hiv);
              if (!all_zero(unc)) {
                ab.store(lanes);
                unc.store(ulanes);
                for (int l = 0; l < VS; ++l)
                  if (ulanes[l] != acc_t(0)) R.cand[t * S + s].push_back(lanes[l]);
                dm = dm | unc;
              }
            }
            if (!WRITE) continue;
            const V trv = (ab > hiv) & tau;  // trimmed entry (+0 when dropped)
            sv = sv + trv;
            const V pos = trv > zero, neg = trv < zero;
            if (mode == kMergeMax) {
              pp = at::vec::maximum(pp, pos & trv);
              nn = at::vec::maximum(nn, neg & (zero - trv));
            } else {
              pp = pp + (pos & trv);
              nn = nn + (neg & trv);
            }
            cp = cp + (pos & one);
            cn = cn + (neg & one);
          }
          if (!WRITE) continue;
          const V gpos = sv > zero, gneg = sv < zero;
          V merged;
          if (mode == kMergeMax) {
            merged = (gpos & pp) | (gneg & (zero - nn));  // the largest magnitude, elected sign
          } else if (mode == kMergeMean) {
            const V num = V::blendv(nn, pp, gpos), den = V::blendv(cn, cp, gpos);
            merged = (gpos | gneg) & (num / at::vec::maximum(den, one));
          } else {
            merged = (gpos & pp) | (gneg & nn);
          }
          V o = bv + lamv * merged;
          const V cm = V::blendv((sv == zero) & ((cp + cn) > zero), zero, dm);  // cancelled, not deferred
          msumv = msumv + V::blendv((gpos & one) - (gneg & one), zero, dm);
          ndefv = ndefv + (dm & one);
          ncanv = ncanv + (cm & one);
          o.store(ob + j);
          dm.store(dflag + j);
          cm.store(cflag + j);
        }
        if (WRITE) {
          ndef = int64_t(lane_sum(ndefv));
          ncan = int64_t(lane_sum(ncanv));
          msum = int64_t(lane_sum(msumv));
        }
        for (int t = 0; t < T; ++t) R.below[t * S + s] += int64_t(lane_sum(belowv[t]));
        for (int64_t j = nv; j < n; ++j) {  // tail: the shared scalar entry math
          bool deferred = false;
          for (int t = 0; t < T; ++t) {
            const int64_t p = t * S + s;
            acc_t tau = xs[t][j] - bp[j];
            if (P.has_w) tau = tau * P.w[t];
            if (!std::isfinite(tau)) R.bad = true;
            const acc_t ab = abs_of(tau);
            R.below[p] += ab < lo[t * S];
            if (P.bracket[p] && ab >= lo[t * S] && ab <= hi[t * S]) {
              R.cand[p].push_back(ab);
              deferred = true;
            }
            tr[t] = ab > hi[t * S] ? tau : acc_t(0);
          }
          if (!WRITE) continue;
          bool nz;
          const acc_t sum = ties_sum(tr.data(), T, &nz);
          acc_t d = 0, c = 0;
          if (deferred) {
            std::memset(&d, 0xFF, sizeof(d));
            ++ndef;
          } else if (sum == acc_t(0) && nz) {
            std::memset(&c, 0xFF, sizeof(c));
            ++ncan;
          } else {
            msum += int64_t(sign_of(sum));
          }
          ob[j] = ties_entry(tr.data(), T, acc_t(0), mode, bp[j], P.lam);
          dflag[j] = d;
          cflag[j] = c;
        }
        if (!WRITE) continue;
        R.msum += msum;
        R.deferred += ndef;
        R.cancelled += ncan;
        store_chunk(out + i, ob, n);
        if (ndef + ncan > 0) {  // mark the positions the fix-ups will finish (flags are all-ones or +0)
          bits_t* o = reinterpret_cast<bits_t*>(out + i);
          for (int64_t j = 0; j < n; ++j) {
            if (dflag[j] != acc_t(0) || std::isnan(dflag[j])) o[j] = Bits::defer;
            else if (cflag[j] != acc_t(0) || std::isnan(cflag[j])) o[j] = Bits::cancel;
          }
        }
      }
    }
    if (!all_zero(chk)) R.bad = true;
  });
}

// Finish the positions marked with `mark`: recompute them with the exact thresholds. With
// `resolve_sum` (deferred positions), zero sums that need the majority are re-marked as cancelled
// and the sign contributions are returned; otherwise (cancelled positions) `majority` is used.
template <typename in_t>
void ties_fixup(const TiesArgs& a, const TiesPlan<typename AccOf<in_t>::type>& P,
                typename BitsOf<in_t>::type mark, bool resolve_sum, typename AccOf<in_t>::type majority,
                int64_t* msum_out, int64_t* recancel_out) {
  using acc_t = typename AccOf<in_t>::type;
  using Bits = BitsOf<in_t>;
  using bits_t = typename Bits::type;
  const int T = a.T;
  const std::vector<Item> items = make_items(P.off, P.S);
  bits_t* ob = static_cast<bits_t*>(a.out);
  in_t* out = static_cast<in_t*>(a.out);
  std::atomic<int64_t> msum{0}, recancel{0};
  at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t ib, int64_t ie) {
    std::vector<acc_t> tr(T);
    int64_t ms = 0, rc = 0;
    for (int64_t it = ib; it < ie; ++it) {
      const int64_t s = items[it].seg;
      for (int64_t i = items[it].begin; i < items[it].end; ++i) {
        if ((i & 63) == 0 && i + 64 <= items[it].end) {  // skip unmarked blocks with a vector compare
          int hit = 0;
          for (int l = 0; l < 64; ++l) hit |= ob[i + l] == mark;
          if (!hit) {
            i += 63;
            continue;
          }
        }
        if (ob[i] != mark) continue;
        const acc_t b = load_one<in_t, acc_t>(a.base, i);
        for (int t = 0; t < T; ++t) tr[t] = ties_trim(tau_at<in_t>(a, P, t, i, b), P.thr[t * P.S + s]);
        if (resolve_sum) {
          bool nz;
          const acc_t sum = ties_sum(tr.data(), T, &nz);
          if (sum == acc_t(0) && nz) {
            ob[i] = Bits::cancel;
            ++rc;
            continue;
          }
          ms += int64_t(sign_of(sum));
        }
        out[i] = to_out<in_t>(ties_entry(tr.data(), T, majority, P.mode, b, P.lam));
      }
    }
    msum += ms;
    recancel += rc;
  });
  *msum_out = msum;
  *recancel_out = recancel;
}

template <typename in_t>
bool ties_impl(const TiesArgs& a, TiesStats* st) {
  using acc_t = typename AccOf<in_t>::type;
  using clock = std::chrono::steady_clock;
  auto secs = [](clock::time_point t0) { return std::chrono::duration<double>(clock::now() - t0).count(); };
  const int T = a.T;
  const int64_t S = a.S, NP = int64_t(T) * S;
  TiesPlan<acc_t> P;
  P.T = T;
  P.S = S;
  P.off = a.offsets;
  P.mode = a.mode;
  P.lam = acc_t(a.lam);
  P.has_w = a.weights != nullptr;
  P.w.assign(T, acc_t(1));
  if (P.has_w)
    for (int t = 0; t < T; ++t) P.w[t] = acc_t(a.weights[t]);
  P.k.resize(NP);
  P.lo.assign(NP, 0);
  P.hi.assign(NP, 0);
  P.bracket.assign(NP, 0);
  P.thr.assign(NP, 0);
  for (int t = 0; t < T; ++t)
    for (int64_t s = 0; s < S; ++s) {
      const int64_t n = a.offsets[s + 1] - a.offsets[s];
      // k = n - int(n * density), in double precision like the authors' Python code
      P.k[t * S + s] = n - int64_t(double(n) * a.density);
    }

  // 1. thresholds: exact for small problems, a sampled bracket for the others
  auto t0 = clock::now();
  std::atomic<bool> bad{false};
  std::atomic<int64_t> nexact{0}, nbracket{0}, nsampled{0};
  at::parallel_for(0, NP, 1, [&](int64_t pb, int64_t pe) {
    std::vector<acc_t> buf;
    for (int64_t p = pb; p < pe; ++p) {
      const int t = int(p / S);
      const int64_t s = p % S, n = a.offsets[s + 1] - a.offsets[s];
      if (n == 0 || P.k[p] == 0) {
        set_exact(P, p, acc_t(0));  // keep everything
        ++nexact;
      } else if (n <= kExactMax) {
        acc_t thr;
        if (!select_exact<in_t>(a, P, t, s, buf, &thr)) bad = true;
        set_exact(P, p, thr);
        ++nexact;
      } else {
        int64_t ns = 0;
        if (!sample_bracket<in_t>(a, P, t, s, buf, &ns)) bad = true;
        nsampled += ns;
        ++nbracket;
      }
    }
  });
  if (bad) return true;
  st->exact_problems = nexact;
  st->bracket_problems = nbracket;
  st->sampled = nsampled;

  // Strategy: one pass + fix-up when few positions are expected to touch a bracket.
  double keep_frac = 1.0;  // expected share of positions touching no bracket
  {
    std::vector<double> seg_keep(S, 1.0);
    for (int64_t p = 0; p < NP; ++p) {
      if (!P.bracket[p]) continue;
      const int64_t s = p % S, n = a.offsets[s + 1] - a.offsets[s];
      const int64_t m = std::max<int64_t>(1, std::min(kSampleMax, n / 8) / kRun) * kRun;
      const double q = double(P.k[p]) / double(n);
      const double width = (10.0 * std::sqrt(4.0 * double(m) * q * (1.0 - q)) + 2.0 * kRun) / double(m);
      seg_keep[s] *= std::max(0.0, 1.0 - width);
    }
    double tot = 0;
    for (int64_t s = 0; s < S; ++s) tot += double(a.offsets[s + 1] - a.offsets[s]) * seg_keep[s];
    keep_frac = a.n > 0 ? tot / double(a.n) : 1.0;
  }
  int strategy = a.strategy;
  if (strategy == 0) strategy = (1.0 - keep_frac) <= 0.08 ? 1 : 2;
  if (nbracket == 0) strategy = 1;
  st->strategy = strategy == 1 ? "one-pass" : "two-pass";
  st->threshold_seconds = secs(t0);

  std::vector<PassAcc<acc_t>> R;
  auto resolve = [&]() -> bool {  // exact thresholds from the collected candidates
    std::vector<int64_t> miss;
    int64_t ncand_total = 0;
    for (int64_t p = 0; p < NP; ++p)
      if (P.bracket[p])
        for (auto& r : R) ncand_total += int64_t(r.cand[p].size());
    st->candidates += ncand_total;
    std::atomic<bool> rbad{false};
    std::vector<char> missed(NP, 0);
    at::parallel_for(0, NP, 1, [&](int64_t pb, int64_t pe) {
      std::vector<acc_t> buf;
      for (int64_t p = pb; p < pe; ++p) {
        if (!P.bracket[p]) continue;
        int64_t below = 0;
        size_t nc = 0;
        for (auto& r : R) {
          below += r.below[p];
          nc += r.cand[p].size();
        }
        const int64_t rank = P.k[p] - below;  // 1-indexed rank inside the bracket
        if (rank >= 1 && rank <= int64_t(nc)) {
          buf.clear();
          buf.reserve(nc);
          for (auto& r : R) buf.insert(buf.end(), r.cand[p].begin(), r.cand[p].end());
          std::nth_element(buf.begin(), buf.begin() + (rank - 1), buf.end());
          set_exact(P, p, buf[rank - 1]);
        } else {
          acc_t thr;
          if (!select_exact<in_t>(a, P, int(p / S), p % S, buf, &thr)) rbad = true;
          set_exact(P, p, thr);
          missed[p] = 1;
        }
      }
    });
    for (int64_t p = 0; p < NP; ++p) st->bracket_misses += missed[p];
    for (auto& r : R) r.cand.clear();
    return !rbad;
  };

  t0 = clock::now();
  int64_t msum = 0, ncancel = 0, ndefer = 0;
  auto gather = [&]() {
    msum = ncancel = ndefer = 0;
    for (auto& r : R) {
      msum += r.msum;
      ncancel += r.cancelled;
      ndefer += r.deferred;
      if (r.bad) bad = true;
    }
  };
  if (strategy == 2) {
    ties_pass<false, in_t>(a, P, R);
    st->passes += 1;
    gather();
    if (bad) return true;
    if (!resolve()) return true;
    ties_pass<true, in_t>(a, P, R);
    st->passes += 1;
    gather();
  } else {
    ties_pass<true, in_t>(a, P, R);
    st->passes += 1;
    gather();
    if (bad) return true;
    if (nbracket > 0) {
      const int64_t misses_before = st->bracket_misses;
      if (!resolve()) return true;
      if (st->bracket_misses > misses_before) {  // a bracket missed: redo the pass, all exact now
        ties_pass<true, in_t>(a, P, R);
        st->passes += 1;
        gather();
        ndefer = 0;
      }
    }
  }
  if (bad) return true;
  st->pass_seconds = secs(t0);
  t0 = clock::now();
  st->deferred = ndefer;
  if (ndefer > 0) {
    int64_t ms = 0, rc = 0;
    ties_fixup<in_t>(a, P, BitsOf<in_t>::defer, true, acc_t(0), &ms, &rc);
    msum += ms;
    ncancel += rc;
  }
  st->cancelled = ncancel;
  if (ncancel > 0) {
    int64_t ms = 0, rc = 0;
    const acc_t majority = acc_t(int(msum > 0) - int(msum < 0));
    ties_fixup<in_t>(a, P, BitsOf<in_t>::cancel, false, majority, &ms, &rc);
  }
  st->fixup_seconds = secs(t0);
  st->thresholds.assign(P.thr.begin(), P.thr.end());
  return false;
}

// ---------------------------------------------------------------- entry points

inline bool uniform_average(const AvgArgs& a) { FM_DISPATCH_DT(a.dt, [&] { return average_impl<in_t>(a); }) }
inline bool task_arithmetic(const TAArgs& a) { FM_DISPATCH_DT(a.dt, [&] { return task_arith_impl<in_t>(a); }) }
inline bool gram(const GramArgs& a) { FM_DISPATCH_DT(a.dt, [&] { return gram_impl<in_t>(a); }) }
inline bool block_scale_fwd(const BlockArgs& a) { FM_DISPATCH_DT(a.dt, [&] { return block_fwd_impl<in_t>(a); }) }
inline bool block_scale_bwd(const BlockArgs& a) { FM_DISPATCH_DT(a.dt, [&] { return block_bwd_impl<in_t>(a); }) }
inline bool merge_ties(const TiesArgs& a, TiesStats* st) {
  FM_DISPATCH_DT(a.dt, [&] { return ties_impl<in_t>(a, st); })
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastmerge

#define FM_STR2(x) #x
#define FM_STR(x) FM_STR2(x)
#define FM_CAT2(a, b) a##b
#define FM_CAT(a, b) FM_CAT2(a, b)

namespace fastmerge {
namespace cpu {
const Kernels& FM_CAT(kernels_, CPU_CAPABILITY)() {
  namespace K = ::fastmerge::cpu::CPU_CAPABILITY;
  static const Kernels table{FM_STR(CPU_CAPABILITY), &K::uniform_average, &K::task_arithmetic, &K::gram,
                             &K::block_scale_fwd, &K::block_scale_bwd, &K::merge_ties};
  return table;
}
}  // namespace cpu
}  // namespace fastmerge
