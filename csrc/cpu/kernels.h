// Fused CPU kernels. This file is compiled once per instruction set (DEFAULT, AVX2, AVX512): each
// wrapper translation unit defines CPU_CAPABILITY and CPU_CAPABILITY_<ISA>, so everything below
// lands in a namespace of its own, and the op layer picks one at run time. The vector code is
// written with plain compiler vector types (SimdVec) one register wide for the build, so that the
// baseline build compiles to SSE2 on x86-64 and NEON on aarch64; x86 intrinsics appear only under
// the AVX2 / AVX-512 capability macros or behind __SSE2__ with a portable fallback.
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

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "ckpt_types.h"
#include "common.h"
#include "fastmerge/entry_math.h"

namespace fastmerge {
namespace cpu {
namespace CPU_CAPABILITY {

constexpr int64_t kChunk = 512;      // elements converted per input at a time (fits L1 for T ~ 8-16)
constexpr int64_t kItem = 1 << 16;   // elements per work item (fixed: results never depend on threads)
constexpr int64_t kGrain = 1 << 15;  // parallel grain of the purely elementwise ops
constexpr int64_t kPrefetch = 2 * kChunk;  // software prefetch distance, in elements
constexpr int64_t kSChunk = 512;  // streaming ops: elements per input and step
constexpr int64_t kGChunk = 512;  // Gram: positions per chunk (every input's chunk stays in L1 over the tile passes)

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

#if defined(CPU_CAPABILITY_AVX512)
constexpr int kSimdBytes = 64;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kSimdBytes = 32;
#else
constexpr int kSimdBytes = 16;
#endif

// Write a finished chunk to memory that will not be read again soon: non-temporal stores skip the
// read-for-ownership of the destination lines (one stream less of memory traffic). Callers end
// their parallel region with stream_fence().
inline void stream_copy_bytes(void* dst, const void* src, int64_t bytes) {
#if defined(__AVX512F__) || defined(__AVX__) || defined(__SSE2__)
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  constexpr int64_t W = kSimdBytes;  // one vector register per store
  int64_t k = 0;
  while (k < bytes && (reinterpret_cast<uintptr_t>(d + k) % W) != 0) {
    d[k] = s[k];
    ++k;
  }
  for (; k + W <= bytes; k += W) {
#if defined(__AVX512F__)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d + k), _mm512_loadu_si512(s + k));
#elif defined(__AVX__)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + k), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + k)));
#else
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + k), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k)));
#endif
  }
  if (k < bytes) std::memcpy(d + k, s + k, size_t(bytes - k));
#else
  std::memcpy(dst, src, size_t(bytes));
#endif
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

template <typename out_t, typename acc_t>
inline void store_chunk(out_t* out, const acc_t* v, int64_t n) {
  if constexpr (std::is_same_v<out_t, acc_t>) {
    if (out != v) stream_copy_bytes(out, v, n * int64_t(sizeof(acc_t)));
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

// Loads chunk [i, i + n) of every task into per-task buffers of kSChunk elements; xs[t] then
// points at task t's values in the accumulation type.
template <typename in_t, typename acc_t>
inline void load_tasks(const Src* srcs, int T, int64_t i, int64_t n, acc_t* bufs, const acc_t** xs) {
  for (int t = 0; t < T; ++t) xs[t] = load_chunk<in_t>(srcs[t], i, n, bufs + size_t(t) * kSChunk);
}

// The streaming ops' software prefetch, spread over the vector loop: at each position `pos` that
// starts a cache line, the line kPrefetch elements ahead of it in every contiguous input. Whether
// it pays depends on the processor (the op layer times both ways on the first large calls and keeps
// the faster); a burst of a whole chunk's lines at once measured slower than none on some.
template <typename in_t>
inline void prefetch_spread(const Src* srcs, int T, const Src* base, int64_t pos, int64_t end) {
  const int64_t ahead = pos + kPrefetch;
  if (ahead >= end || (pos * int64_t(sizeof(in_t))) % 64 != 0) return;
  for (int t = 0; t < T; ++t)
    if (srcs[t].stride == 1) __builtin_prefetch(static_cast<const in_t*>(srcs[t].ptr) + ahead, 0, 0);
  if (base && base->stride == 1) __builtin_prefetch(static_cast<const in_t*>(base->ptr) + ahead, 0, 0);
}

template <typename V>
inline bool all_zero(const V& v) {
  return v.zero_mask() == (1 << V::size()) - 1;
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

// Plain compiler vector types (one register per ISA build): comparisons give all-ones / zero lanes.
template <typename acc_t>
struct SimdVec;
template <>
struct SimdVec<float> {
  typedef float F __attribute__((vector_size(kSimdBytes)));
  typedef int32_t I __attribute__((vector_size(kSimdBytes)));
  static constexpr int W = kSimdBytes / 4;
  static constexpr int32_t kAbs = 0x7FFFFFFF;
};
template <>
struct SimdVec<double> {
  typedef double F __attribute__((vector_size(kSimdBytes)));
  typedef int64_t I __attribute__((vector_size(kSimdBytes)));
  static constexpr int W = kSimdBytes / 8;
  static constexpr int64_t kAbs = 0x7FFFFFFFFFFFFFFFll;
};

template <typename I>
inline bool simd_any(I m) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_test_epi32_mask((__m512i)m, (__m512i)m) != 0;
#elif defined(CPU_CAPABILITY_AVX2)
  return !_mm256_testz_si256((__m256i)m, (__m256i)m);
#elif defined(__SSE2__)
  return _mm_movemask_epi8((__m128i)m) != 0;
#else
  bool r = false;
  for (size_t l = 0; l < sizeof(I) / sizeof(m[0]); ++l) r = r || m[l] != 0;
  return r;
#endif
}

template <typename V, typename S>
inline V simd_load(const S* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename S>
inline void simd_store(S* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// ---------------------------------------------------------------- uniform_average / task_arithmetic

template <typename in_t>
bool average_impl(const AvgArgs& a) {
  // Plain compiler vectors (one register of the build's width: SSE2 / NEON in the baseline build),
  // all tasks of one vector of positions in registers, in task order; the tail in scalars, with
  // the same operations.
  using acc_t = typename AccOf<in_t>::type;
  using F = typename SimdVec<acc_t>::F;
  constexpr int W = SimdVec<acc_t>::W;
  std::vector<acc_t> w(a.T);
  acc_t wsum = acc_t(a.weights[0]);
  for (int t = 0; t < a.T; ++t) w[t] = acc_t(a.weights[t]);
  for (int t = 1; t < a.T; ++t) wsum = wsum + w[t];
  in_t* out = static_cast<in_t*>(a.out);
  std::atomic<bool> bad{false};
  at::parallel_for(0, a.n, kGrain, [&](int64_t b, int64_t e) {
    std::vector<acc_t> bufs(size_t(a.T) * kSChunk);
    std::vector<const acc_t*> xs(a.T);
    alignas(64) acc_t accb[kSChunk];
    const int T = a.T;
    const acc_t* wp = w.data();
    const F ws = F{} + wsum;
    F chk = F{};
    acc_t chks = 0;
    for (int64_t i = b; i < e; i += kSChunk) {
      const int64_t n = std::min(kSChunk, e - i);
      const int64_t nv = n / W * W;
      load_tasks<in_t>(a.thetas, T, i, n, bufs.data(), xs.data());
      const acc_t* const* x = xs.data();
      for (int64_t j = 0; j < nv; j += W) {
        if (a.prefetch) prefetch_spread<in_t>(a.thetas, T, nullptr, i + j, e);
        F acc = simd_load<F>(x[0] + j) * wp[0];
        for (int t = 1; t < T; ++t) acc = acc + simd_load<F>(x[t] + j) * wp[t];
        acc = acc / ws;
        chk = chk + (acc - acc);
        simd_store(accb + j, acc);
      }
      for (int64_t j = nv; j < n; ++j) {
        acc_t acc = x[0][j] * wp[0];
        for (int t = 1; t < T; ++t) acc = acc + x[t][j] * wp[t];
        acc = acc / wsum;
        chks = chks + (acc - acc);
        accb[j] = acc;
      }
      store_chunk(out + i, accb, n);
    }
    stream_fence();
    for (int l = 0; l < W; ++l) chks = chks + chk[l];
    if (chks != acc_t(0)) bad = true;
  });
  return bad;
}

template <typename in_t>
bool task_arith_impl(const TAArgs& a) {
  using acc_t = typename AccOf<in_t>::type;
  using F = typename SimdVec<acc_t>::F;
  constexpr int W = SimdVec<acc_t>::W;
  std::vector<acc_t> lam(a.T);
  for (int t = 0; t < a.T; ++t) lam[t] = acc_t(a.lam[t]);
  in_t* out = static_cast<in_t*>(a.out);
  std::atomic<bool> bad{false};
  at::parallel_for(0, a.n, kGrain, [&](int64_t b, int64_t e) {
    std::vector<acc_t> bufs(size_t(a.T + 1) * kSChunk);
    std::vector<const acc_t*> xs(a.T);
    alignas(64) acc_t accb[kSChunk];
    const int T = a.T;
    const acc_t* lp = lam.data();
    F chk = F{};
    acc_t chks = 0;
    for (int64_t i = b; i < e; i += kSChunk) {
      const int64_t n = std::min(kSChunk, e - i);
      const int64_t nv = n / W * W;
      const acc_t* bp = load_chunk<in_t>(a.base, i, n, bufs.data() + size_t(T) * kSChunk);
      load_tasks<in_t>(a.thetas, T, i, n, bufs.data(), xs.data());
      const acc_t* const* x = xs.data();
      for (int64_t j = 0; j < nv; j += W) {  // all tasks in registers, in task order
        if (a.prefetch) prefetch_spread<in_t>(a.thetas, T, &a.base, i + j, e);
        const F bv = simd_load<F>(bp + j);
        F acc = bv;
        for (int t = 0; t < T; ++t) acc = acc + lp[t] * (simd_load<F>(x[t] + j) - bv);
        chk = chk + (acc - acc);
        simd_store(accb + j, acc);
      }
      for (int64_t j = nv; j < n; ++j) {
        acc_t acc = bp[j];
        for (int t = 0; t < T; ++t) acc = acc + lp[t] * (x[t][j] - bp[j]);
        chks = chks + (acc - acc);
        accb[j] = acc;
      }
      store_chunk(out + i, accb, n);
    }
    stream_fence();
    for (int l = 0; l < W; ++l) chks = chks + chk[l];
    if (chks != acc_t(0)) bad = true;
  });
  return bad;
}

// ---------------------------------------------------------------- task-vector Gram matrix

// Half a register of floats, widened to one register of doubles (the generic conversion is split
// into narrower instructions by the compiler).
typedef float HalfF __attribute__((vector_size(kSimdBytes / 2)));
inline typename SimdVec<double>::F widen(HalfF h) {
  using D = typename SimdVec<double>::F;
#if defined(CPU_CAPABILITY_AVX512)
  return (D)_mm512_cvtps_pd((__m256)h);
#elif defined(CPU_CAPABILITY_AVX2)
  return (D)_mm256_cvtps_pd((__m128)h);
#else
  return __builtin_convertvector(h, D);
#endif
}

// Converts W consecutive accumulation-type values to one vector of doubles.
template <typename acc_t>
inline typename SimdVec<double>::F load_as_double(const acc_t* p) {
  using D = typename SimdVec<double>::F;
  if constexpr (std::is_same_v<acc_t, double>) {
    return simd_load<D>(p);
  } else {
    return widen(simd_load<HalfF>(p));
  }
}

// c + a * b. Fused only where `exact` (the product is exact in double, e.g. of two float-valued
// doubles): then the fused form rounds exactly like the separate multiply and add.
template <bool exact, typename F>
inline F madd(F c, F a, F b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (exact) return (F)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (exact) return (F)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#endif
  return c + a * b;
}

// The cache lines of a chunk of every contiguous input, prefetched one per step() from inside a
// compute loop: a burst of prefetches per chunk would leave the memory idle while the chunk computes.
// A small value type: copy it into a local around a hot loop so that its state stays in registers.
struct LineFeed {
  const char* const* streams = nullptr;
  size_t ns = 0, s = 0;
  int64_t elt = 0, begin = 0, stop = 0, at = 0;
  int64_t lines = 0, ticks = 1, credit = 0;
  // Lines of elements [i, i + n) of every stream (nothing when n <= 0), spread over `ticks` calls.
  void start(int64_t i, int64_t n, int64_t nticks) {
    s = n > 0 ? 0 : ns;
    at = begin = i * elt;
    stop = (i + n) * elt;
    lines = n > 0 ? int64_t(ns) * ((stop - begin + 63) / 64) : 0;
    ticks = std::max<int64_t>(nticks, 1);
    credit = 0;
  }
  void step() {
    if (s < ns) {
      // prefetcht1: on the Zen 4 host of the README, the non-temporal hint (and prefetcht0) left
      // the Gram and block_scale backward passes 20-30 % slower
      __builtin_prefetch(streams[s] + at, 0, 2);
      at += 64;
      if (at >= stop) {
        at = begin;
        ++s;
      }
    }
  }
  void tick() {
    for (credit += lines; credit >= ticks; credit -= ticks) step();
  }
  void drain() {
    while (s < ns) step();
  }
};

// The last m (< W) positions of a chunk, from offset `from`, of the base and of T inputs, copied
// zero-padded to one vector each (tb; T consecutive vectors from tx, listed in txs): the tail of a
// vector loop runs as one more full vector.
template <int W, typename acc_t>
inline void pad_tails(const acc_t* bp, const acc_t* const* xs, int T, int64_t from, int64_t m, acc_t* tb,
                      acc_t* tx, const acc_t** txs) {
  for (int l = 0; l < W; ++l) tb[l] = l < m ? bp[from + l] : acc_t(0);
  for (int t = 0; t < T; ++t) {
    acc_t* d = tx + size_t(t) * W;
    for (int l = 0; l < W; ++l) d[l] = l < m ? xs[t][from + l] : acc_t(0);
    txs[t] = d;
  }
}

// The contiguous inputs among base and the T others, for a LineFeed.
inline std::vector<const char*> feed_streams(const Src& base, const Src* others, int T) {
  std::vector<const char*> v;
  if (base.stride == 1) v.push_back(static_cast<const char*>(base.ptr));
  for (int t = 0; t < T; ++t)
    if (others[t].stride == 1) v.push_back(static_cast<const char*>(others[t].ptr));
  return v;
}

// One task vector entry as a double: tau = theta - base rounded in acc_t (as the reference does in
// the input's precision), then widened exactly.
template <bool exact, typename acc_t>
inline typename SimdVec<double>::F gram_tau(const acc_t* x, const acc_t* b) {
  using F = typename SimdVec<double>::F;
  if constexpr (exact) {
    return widen(simd_load<HalfF>(x) - simd_load<HalfF>(b));
  } else {
    return simd_load<F>(x) - simd_load<F>(b);
  }
}

// c_u += a_u * b for the four rows u of one tile column.
template <bool exact, typename F>
inline void madd_col(F& c0, F& c1, F& c2, F& c3, const F& a0, const F& a1, const F& a2, const F& a3, const F& b) {
  c0 = madd<exact>(c0, a0, b); c1 = madd<exact>(c1, a1, b);
  c2 = madd<exact>(c2, a2, b); c3 = madd<exact>(c3, a3, b);
}

// The 10 upper pairs of a diagonal tile: c_uv += a_u * a_v for u <= v.
template <bool exact, typename F>
inline void gram_diag_madds(F& c00, F& c01, F& c02, F& c03, F& c11, F& c12, F& c13, F& c22, F& c23, F& c33,
                            const F& a0, const F& a1, const F& a2, const F& a3) {
  c00 = madd<exact>(c00, a0, a0); c01 = madd<exact>(c01, a0, a1);
  c02 = madd<exact>(c02, a0, a2); c03 = madd<exact>(c03, a0, a3);
  c11 = madd<exact>(c11, a1, a1); c12 = madd<exact>(c12, a1, a2);
  c13 = madd<exact>(c13, a1, a3); c22 = madd<exact>(c22, a2, a2);
  c23 = madd<exact>(c23, a2, a3); c33 = madd<exact>(c33, a3, a3);
}

// What one tile loop accumulates: the diagonal tile of row block xa (its 10 upper pairs), the
// off-diagonal tile xa x xb (16 pairs), or both in one loop. The pair needs 26 accumulators and
// 5 operands in registers, so it is used only with AVX-512's 32: the four row operands are then
// formed once for both tiles, and a T = 8 Gram forms 12 task vector entries per position instead
// of the 16 of three separate tiles.
enum GramTileKind { kGramDiag, kGramOff, kGramPair };
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kGramPairTiles = true;
#else
constexpr bool kGramPairTiles = false;
#endif

// One tile loop over nvec positions (a multiple of W) of one chunk. Diagonal accumulators live in
// acc (the 4 x 4 layout's upper slots), off-diagonal ones in acc (kGramOff) or acc2 (kGramPair);
// they are plain vector locals so that they stay in registers (at::vec arrays end up on the
// stack). The task vector entries are formed from the chunk's inputs as they are needed (a
// subtraction and a widening per operand) rather than stored to a buffer first: the buffer's
// stores and reloads cost more than the conversions, which overlap with the multiply-adds. Each
// column operand is used by its four multiply-adds as soon as it is formed. Every accumulator sees
// the same products in the same order whatever the kind, so pairing changes no bit of the result.
template <bool exact, int KIND, typename acc_t>
inline void gram_tile(typename SimdVec<double>::F* acc, typename SimdVec<double>::F* acc2, const acc_t* bp,
                      const acc_t* const* xa, const acc_t* const* xb, int64_t nvec, LineFeed& feed) {
  using F = typename SimdVec<double>::F;
  constexpr int W = SimdVec<double>::W;
  constexpr bool kDiag = KIND != kGramOff, kOff = KIND != kGramDiag;
  F* dacc = acc;
  F* oacc = KIND == kGramPair ? acc2 : acc;
  F d00{}, d01{}, d02{}, d03{}, d11{}, d12{}, d13{}, d22{}, d23{}, d33{};
  F c00{}, c01{}, c02{}, c03{}, c10{}, c11{}, c12{}, c13{}, c20{}, c21{}, c22{}, c23{}, c30{}, c31{}, c32{}, c33{};
  if constexpr (kDiag) {
    d00 = dacc[0], d01 = dacc[1], d02 = dacc[2], d03 = dacc[3], d11 = dacc[5], d12 = dacc[6], d13 = dacc[7];
    d22 = dacc[10], d23 = dacc[11], d33 = dacc[15];
  }
  if constexpr (kOff) {
    c00 = oacc[0], c01 = oacc[1], c02 = oacc[2], c03 = oacc[3], c10 = oacc[4], c11 = oacc[5], c12 = oacc[6];
    c13 = oacc[7], c20 = oacc[8], c21 = oacc[9], c22 = oacc[10], c23 = oacc[11], c30 = oacc[12];
    c31 = oacc[13], c32 = oacc[14], c33 = oacc[15];
  }
  const acc_t *x0 = xa[0], *x1 = xa[1], *x2 = xa[2], *x3 = xa[3];
  const acc_t *y0 = xb[0], *y1 = xb[1], *y2 = xb[2], *y3 = xb[3];
  LineFeed f = feed;
  for (int64_t j = 0; j < nvec; j += W) {
    f.tick();
    const F a0 = gram_tau<exact>(x0 + j, bp + j), a1 = gram_tau<exact>(x1 + j, bp + j);
    const F a2 = gram_tau<exact>(x2 + j, bp + j), a3 = gram_tau<exact>(x3 + j, bp + j);
    if constexpr (kDiag) gram_diag_madds<exact>(d00, d01, d02, d03, d11, d12, d13, d22, d23, d33, a0, a1, a2, a3);
    if constexpr (kOff) {
      F b = gram_tau<exact>(y0 + j, bp + j);
      madd_col<exact>(c00, c10, c20, c30, a0, a1, a2, a3, b);
      b = gram_tau<exact>(y1 + j, bp + j);
      madd_col<exact>(c01, c11, c21, c31, a0, a1, a2, a3, b);
      b = gram_tau<exact>(y2 + j, bp + j);
      madd_col<exact>(c02, c12, c22, c32, a0, a1, a2, a3, b);
      b = gram_tau<exact>(y3 + j, bp + j);
      madd_col<exact>(c03, c13, c23, c33, a0, a1, a2, a3, b);
    }
  }
  feed = f;
  if constexpr (kDiag) {
    dacc[0] = d00; dacc[1] = d01; dacc[2] = d02; dacc[3] = d03; dacc[5] = d11; dacc[6] = d12; dacc[7] = d13;
    dacc[10] = d22; dacc[11] = d23; dacc[15] = d33;
  }
  if constexpr (kOff) {
    oacc[0] = c00; oacc[1] = c01; oacc[2] = c02; oacc[3] = c03; oacc[4] = c10; oacc[5] = c11; oacc[6] = c12;
    oacc[7] = c13; oacc[8] = c20; oacc[9] = c21; oacc[10] = c22; oacc[11] = c23; oacc[12] = c30; oacc[13] = c31;
    oacc[14] = c32; oacc[15] = c33;
  }
}

// Half of an off-diagonal tile, columns v0 and v0 + 1: 8 accumulators, 4 row operands and one
// column operand fit AVX2's 16 registers (the full 4 x 4 tile's 21 would spill to the stack on
// every multiply-add). The row operands are formed twice per tile instead of once; each
// accumulator still sees the same products in the same order, so no bit of the result changes.
template <bool exact, typename acc_t>
inline void gram_tile_half(typename SimdVec<double>::F* acc, int v0, const acc_t* bp, const acc_t* const* xa,
                           const acc_t* const* xb, int64_t nvec, LineFeed& feed) {
  using F = typename SimdVec<double>::F;
  constexpr int W = SimdVec<double>::W;
  F c00 = acc[v0], c01 = acc[v0 + 1], c10 = acc[4 + v0], c11 = acc[5 + v0];
  F c20 = acc[8 + v0], c21 = acc[9 + v0], c30 = acc[12 + v0], c31 = acc[13 + v0];
  const acc_t *x0 = xa[0], *x1 = xa[1], *x2 = xa[2], *x3 = xa[3];
  const acc_t *y0 = xb[v0], *y1 = xb[v0 + 1];
  LineFeed f = feed;
  for (int64_t j = 0; j < nvec; j += W) {
    f.tick();
    const F a0 = gram_tau<exact>(x0 + j, bp + j), a1 = gram_tau<exact>(x1 + j, bp + j);
    const F a2 = gram_tau<exact>(x2 + j, bp + j), a3 = gram_tau<exact>(x3 + j, bp + j);
    F b = gram_tau<exact>(y0 + j, bp + j);
    madd_col<exact>(c00, c10, c20, c30, a0, a1, a2, a3, b);
    b = gram_tau<exact>(y1 + j, bp + j);
    madd_col<exact>(c01, c11, c21, c31, a0, a1, a2, a3, b);
  }
  feed = f;
  acc[v0] = c00; acc[v0 + 1] = c01; acc[4 + v0] = c10; acc[5 + v0] = c11;
  acc[8 + v0] = c20; acc[9 + v0] = c21; acc[12 + v0] = c30; acc[13 + v0] = c31;
}

// Off-diagonal tiles as two halves where the registers are too few for a whole one.
constexpr bool kGramHalfOff = SimdVec<double>::W < 8;

template <typename in_t>
bool gram_impl(const GramArgs& a) {
  using acc_t = typename AccOf<in_t>::type;
  using F = typename SimdVec<double>::F;
  constexpr int W = SimdVec<double>::W;
  constexpr bool exact = !std::is_same_v<acc_t, double>;
  const int T = a.T;
  const int nt = (T + 3) / 4;  // row / column blocks of 4 tasks
  const int64_t zero_off[2] = {0, a.n};
  const std::vector<Item> items = make_items(zero_off, 1);
  const int64_t P2 = int64_t(T) * T;
  std::vector<double> part(items.size() * P2, 0.0);
  at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t ib, int64_t ie) {
    // chunk buffers for inputs that are strided or not in acc_t; the last partial vector of a
    // chunk goes through zero-padded copies (a zero entry adds nothing to any dot product)
    alignas(64) acc_t bbuf[kGChunk];
    alignas(64) acc_t tailb[W];
    std::vector<acc_t> xbufs(size_t(T) * kGChunk), tailx(size_t(T) * W);
    std::vector<const acc_t*> xs(T), txs(T);
    // 16 vector accumulators per 4 x 4 tile, kept over a whole work item and reduced once at its end
    std::vector<F> accs(size_t(nt) * nt * 16);
    const std::vector<const char*> streams = feed_streams(a.base, a.thetas, T);
    LineFeed feed{streams.data(), streams.size(), streams.size(), int64_t(sizeof(in_t))};
    // All tiles over nvec positions of the chunk whose inputs are bp and x[0..T).
    // a full row block followed by another block runs its diagonal tile and the next one as a pair
    auto paired = [&](int ra) { return kGramPairTiles && 4 * ra + 4 <= T && ra + 1 < nt; };
    int loops = 0;  // tile loops per chunk, over which the feed spreads its prefetches
    const int per_off = kGramHalfOff ? 2 : 1;  // loops of an off-diagonal (or partial diagonal) tile
    for (int ra = 0; ra < nt; ++ra)
      loops += paired(ra) ? nt - ra - 1 : (4 * ra + 4 <= T ? 1 : per_off) + (nt - ra - 1) * per_off;
    auto tiles = [&](const acc_t* bp, const acc_t* const* x, int64_t nvec) {
      for (int ra = 0; ra < nt; ++ra) {
        for (int rb = ra; rb < nt; ++rb) {
          // a block of fewer than 4 tasks repeats its last one; those accumulators are not read
          const acc_t* rows[8];
          for (int u = 0; u < 4; ++u) {
            rows[u] = x[std::min(4 * ra + u, T - 1)];
            rows[4 + u] = x[std::min(4 * rb + u, T - 1)];
          }
          F* acc = accs.data() + size_t(ra * nt + rb) * 16;
          if (rb == ra && paired(ra)) {
            for (int u = 0; u < 4; ++u) rows[4 + u] = x[std::min(4 * (ra + 1) + u, T - 1)];
            gram_tile<exact, kGramPair>(acc, acc + 16, bp, rows, rows + 4, nvec, feed);
            ++rb;
          } else if (ra == rb && 4 * ra + 4 <= T) {
            gram_tile<exact, kGramDiag>(acc, nullptr, bp, rows, rows + 4, nvec, feed);
          } else if (kGramHalfOff) {
            gram_tile_half<exact>(acc, 0, bp, rows, rows + 4, nvec, feed);
            gram_tile_half<exact>(acc, 2, bp, rows, rows + 4, nvec, feed);
          } else {
            gram_tile<exact, kGramOff>(acc, nullptr, bp, rows, rows + 4, nvec, feed);
          }
        }
      }
    };
    for (int64_t it = ib; it < ie; ++it) {
      const int64_t end = items[it].end;
      std::fill(accs.begin(), accs.end(), F{});
      for (int64_t i = items[it].begin; i < end; i += kGChunk) {
        const int64_t n = std::min(kGChunk, end - i);
        const int64_t nv = n / W * W;
        feed.drain();
        // items are contiguous, so the feed runs on into the next one
        feed.start(i + kPrefetch, std::min(kGChunk, a.n - i - kPrefetch), loops * (nv / W));
        const acc_t* bp = load_chunk<in_t>(a.base, i, n, bbuf);
        for (int t = 0; t < T; ++t) xs[t] = load_chunk<in_t>(a.thetas[t], i, n, xbufs.data() + size_t(t) * kGChunk);
        tiles(bp, xs.data(), nv);
        if (nv < n) {
          pad_tails<W>(bp, xs.data(), T, nv, n - nv, tailb, tailx.data(), txs.data());
          tiles(tailb, txs.data(), W);
        }
      }
      feed.drain();
      double* p = part.data() + it * P2;
      for (int ra = 0; ra < nt; ++ra)
        for (int rb = ra; rb < nt; ++rb)
          for (int u = 0; u < 4 && 4 * ra + u < T; ++u)
            for (int v = 0; v < 4 && 4 * rb + v < T; ++v)
              if (4 * rb + v >= 4 * ra + u) {
                const F& c = accs[size_t(ra * nt + rb) * 16 + u * 4 + v];
                double sum = 0.0;  // fixed lane order
                for (int l = 0; l < W; ++l) sum += c[l];
                p[(4 * ra + u) * T + 4 * rb + v] = sum;
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
  using F = typename SimdVec<acc_t>::F;
  constexpr int W = SimdVec<acc_t>::W;
  const std::vector<Item> items = make_items(a.offsets, a.B);
  in_t* out = static_cast<in_t*>(a.out);
  std::atomic<bool> bad{false};
  at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t ib, int64_t ie) {
    std::vector<acc_t> bufs(size_t(a.T + 1) * kSChunk);
    std::vector<const acc_t*> xs(a.T);
    std::vector<acc_t> c(a.T);
    alignas(64) acc_t accb[kSChunk];
    const int T = a.T;
    const acc_t* cp = c.data();
    F chk = F{};
    acc_t chks = 0;
    for (int64_t it = ib; it < ie; ++it) {
      const int64_t blk = items[it].seg, end = items[it].end;
      for (int t = 0; t < T; ++t) c[t] = acc_t(a.coefs[t * a.B + blk]);
      for (int64_t i = items[it].begin; i < end; i += kSChunk) {
        const int64_t n = std::min(kSChunk, end - i);
        const int64_t nv = n / W * W;
        const acc_t* bp = load_chunk<in_t>(a.base, i, n, bufs.data() + size_t(T) * kSChunk);
        load_tasks<in_t>(a.vectors, T, i, n, bufs.data(), xs.data());
        const acc_t* const* x = xs.data();
        for (int64_t j = 0; j < nv; j += W) {  // all tasks in registers, in task order
          if (a.prefetch) prefetch_spread<in_t>(a.vectors, T, &a.base, i + j, end);
          F acc = simd_load<F>(bp + j);
          for (int t = 0; t < T; ++t) acc = acc + cp[t] * simd_load<F>(x[t] + j);
          chk = chk + (acc - acc);
          simd_store(accb + j, acc);
        }
        for (int64_t j = nv; j < n; ++j) {
          acc_t acc = bp[j];
          for (int t = 0; t < T; ++t) acc = acc + cp[t] * x[t][j];
          chks = chks + (acc - acc);
          accb[j] = acc;
        }
        store_chunk(out + i, accb, n);
      }
    }
    stream_fence();
    for (int l = 0; l < W; ++l) chks = chks + chk[l];
    if (chks != acc_t(0)) bad = true;
  });
  return bad;
}

// acc[k] += g . x_k over one chunk of n values, for K tasks at once: every vector of g feeds K
// multiply-adds held in registers. The last partial vector is zero-padded.
template <int K, bool exact, typename acc_t>
inline void dot_group(const acc_t* g, const acc_t* const* xs, int64_t n, typename SimdVec<double>::F* acc,
                      LineFeed& feed) {
  using D = typename SimdVec<double>::F;
  constexpr int W = SimdVec<double>::W;
  LineFeed f = feed;
  D s[K];
  const acc_t* x[K];
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) s[k] = acc[k], x[k] = xs[k];
  const int64_t nv = n / W * W;
  for (int64_t j = 0; j < nv; j += W) {
    f.tick();
    const D gd = load_as_double(g + j);
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) s[k] = madd<exact>(s[k], gd, load_as_double(x[k] + j));
  }
  if (nv < n) {
    alignas(64) acc_t tg[W], tx[K * W];
    const acc_t* txs[K];
    pad_tails<W>(g, x, K, nv, n - nv, tg, tx, txs);
    const D gd = load_as_double(tg);
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) s[k] = madd<exact>(s[k], gd, load_as_double(txs[k]));
  }
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) acc[k] = s[k];
  feed = f;
}

template <typename in_t>
bool block_bwd_impl(const BlockArgs& a) {
  // dL/dcoefs[t, b] = sum over block b of g_i * v_{t,i}, in float64: per work item and task, one
  // vector accumulator (tasks in groups of up to 8 kept in registers), summed in a fixed lane order.
  using acc_t = typename AccOf<in_t>::type;
  using D = typename SimdVec<double>::F;
  constexpr int W = SimdVec<double>::W;
  constexpr bool exact = !std::is_same_v<acc_t, double>;
  const int T = a.T;
  const std::vector<Item> items = make_items(a.offsets, a.B);
  std::vector<double> part(items.size() * T, 0.0);
  at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t ib, int64_t ie) {
    std::vector<acc_t> bufs(size_t(T + 1) * kSChunk);
    std::vector<const acc_t*> xs(T);
    std::vector<D> acc(T);
    const std::vector<const char*> streams = feed_streams(a.base, a.vectors, T);
    LineFeed feed{streams.data(), streams.size(), streams.size(), int64_t(sizeof(in_t))};
    for (int64_t it = ib; it < ie; ++it) {
      const int64_t end = items[it].end;
      std::fill(acc.begin(), acc.end(), D{});
      for (int64_t i = items[it].begin; i < end; i += kSChunk) {
        const int64_t n = std::min(kSChunk, end - i);
        feed.drain();
        // items are contiguous, so the feed runs on into the next one
        feed.start(i + kPrefetch, std::min(kSChunk, a.n - i - kPrefetch), (T + 7) / 8 * (n / W));
        const acc_t* g = load_chunk<in_t>(a.base, i, n, bufs.data() + size_t(T) * kSChunk);
        for (int t = 0; t < T; ++t) xs[t] = load_chunk<in_t>(a.vectors[t], i, n, bufs.data() + size_t(t) * kSChunk);
        for (int t0 = 0; t0 < T; t0 += 8) {
          const acc_t* const* x = xs.data() + t0;
          D* c = acc.data() + t0;
          switch (std::min(8, T - t0)) {
            case 1: dot_group<1, exact>(g, x, n, c, feed); break;
            case 2: dot_group<2, exact>(g, x, n, c, feed); break;
            case 3: dot_group<3, exact>(g, x, n, c, feed); break;
            case 4: dot_group<4, exact>(g, x, n, c, feed); break;
            case 5: dot_group<5, exact>(g, x, n, c, feed); break;
            case 6: dot_group<6, exact>(g, x, n, c, feed); break;
            case 7: dot_group<7, exact>(g, x, n, c, feed); break;
            default: dot_group<8, exact>(g, x, n, c, feed); break;
          }
        }
      }
      feed.drain();
      for (int t = 0; t < T; ++t) {
        double sum = 0.0;  // fixed lane order
        for (int l = 0; l < W; ++l) sum += acc[t][l];
        part[it * T + t] = sum;
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

#include "ties.h"

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
                             &K::block_scale_fwd, &K::block_scale_bwd, &K::merge_ties,
                             &FM_CAT(ckpt_kernels_, CPU_CAPABILITY)()};
  return table;
}
}  // namespace cpu
}  // namespace fastmerge
