// Exact TIES-Merging on the CPU. Included by kernels.h inside the per-instruction-set namespace,
// after the shared chunk loaders, vector types and work items.
#pragma once

// ---------------------------------------------------------------- TIES
//
// Exact trim thresholds without sorting. For each (task, segment) problem p a deterministic,
// stratified sample gives a guess c of the k-th smallest |tau| and a bracket [lo, hi] around it
// (problems small enough are solved exactly up front, then lo = c = thr > hi). One streaming pass
// then merges every position with the guessed thresholds (kept when |tau| >= c) and, per
// problem, counts the entries below lo and those equal to lo or hi, and collects the entries
// strictly inside (lo, hi) with their positions. The exact threshold is then the (k - below)-th
// smallest of {= lo} + candidates + {= hi}; only the positions of candidates that fall between
// the guess and the exact threshold were merged wrongly, and a fix-up recomputes just those with
// the shared scalar entry math (correcting the majority-sign tally too). Positions whose sign sum
// cancelled exactly are listed during the pass and finished once the majority sign is known.
//
// The scratch is bounded by constants, whatever the sizes: the sample has at most kMaxRuns runs
// per task, and the candidates of all problems share kCandBudget entries per thread (each problem
// gets an equal share, the cap). A bracket expected to hold more than the cap is first narrowed by
// histogram passes (ties_narrow: one read of the inputs each, cache-resident bins) to one bin that
// fits. A bracket that missed, that overflowed the cap during the pass, or with a tie at lo or hi
// on the wrong side of the guess (whose positions are not kept) is narrowed to its exact
// threshold, and the merge pass runs again.

constexpr int64_t kExactMax = 1 << 16;   // problems this small: exact selection before the pass
constexpr int64_t kRun = 64;             // sampled in runs of contiguous entries (a few cache lines)
constexpr int kSelBits = 12;             // histogram bins of the radix selections
constexpr size_t kCancelCap = 1 << 16;   // cancelled positions listed per thread before falling back
// Scratch of the threshold search, independent of the problem sizes: at most kMaxRuns sampled
// runs per task, kCandBudget bracket candidates (with positions) per thread over all problems,
// and kHistBudget histogram bins per thread.
constexpr int64_t kMaxRuns = 1 << 14;
constexpr int64_t kCandBudget = 1 << 23;
constexpr int64_t kHistBudget = 1 << 16;
constexpr int64_t kCandMin = 256;         // candidates per problem, whatever the budget
constexpr int64_t kHistMin = 64, kHistMax = 1 << 12;  // histogram bins per problem and pass (cache-resident)

template <typename acc_t>
struct TiesPlan {
  using bits_t = typename BitsOf<acc_t>::type;
  int T = 0;
  int64_t S = 0;
  const int64_t* off = nullptr;
  int mode = 0;
  acc_t lam = 0;
  bool has_w = false;
  std::vector<acc_t> w;
  std::vector<int64_t> k;       // per problem p = t * S + s
  std::vector<acc_t> lo, hi;    // bracket; an exact threshold thr is stored as lo = thr, hi = prev(thr)
  std::vector<acc_t> c;         // threshold the pass merges with (the guess, or the exact one)
  std::vector<char> bracket;    // 1 while the threshold is still bracketed
  std::vector<acc_t> thr;       // exact thresholds once known
  int64_t cap = 0;              // bracket candidates one thread may collect per problem
  std::vector<double> est;      // candidates the sampled bracket is expected to hold
  // In the pass at hand, per problem: 0 not classified, 1 candidates collected inside (lo, hi),
  // 2 entries inside [lo, hi] counted in a histogram (a narrowing pass).
  std::vector<char> active;
  std::vector<bits_t> lok, hik;  // key range of a narrowing pass, inclusive
  std::vector<int> hshift;       // bin = (key - lok) >> hshift
  std::vector<int64_t> hoff;     // first bin of the problem in the per-thread histogram
  int64_t hist_total = 0;
  int64_t hist_budget = kHistBudget;

  void size_for(int64_t NP) {  // every per-problem array, zeroed
    k.assign(NP, 0), lo.assign(NP, 0), hi.assign(NP, 0), c.assign(NP, 0), thr.assign(NP, 0);
    bracket.assign(NP, 0), active.assign(NP, 0), est.assign(NP, 0);
    lok.assign(NP, 0), hik.assign(NP, 0), hshift.assign(NP, 0), hoff.assign(NP, 0);
  }
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
  P.c[p] = thr;
  P.bracket[p] = 0;
}

template <typename acc_t>
inline typename BitsOf<acc_t>::type key_of(acc_t v) {  // order-preserving for v >= 0 (not NaN)
  typename BitsOf<acc_t>::type u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
}

template <typename acc_t>
inline acc_t from_key(typename BitsOf<acc_t>::type u) {
  acc_t v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

// Values of the given (ascending) 0-indexed ranks among the non-negative values v (reordered and
// shrunk in place): radix rounds of a 2^kSelBits-bin histogram over the key range, then
// selections among what is left.
template <typename acc_t>
void select_ranks(std::vector<acc_t>& v, int64_t* ranks, int nr, acc_t* res) {
  using bits_t = typename BitsOf<acc_t>::type;
  std::vector<uint32_t> hist(size_t(1) << kSelBits);
  std::vector<acc_t> next;
  bits_t kmin = 0, kmax = 0;  // key range of v, carried from the filtering of the round before
  if (v.size() > 4096) {
    kmin = kmax = key_of(v[0]);
    for (const acc_t x : v) {
      const bits_t u = key_of(x);
      kmin = u < kmin ? u : kmin;
      kmax = u > kmax ? u : kmax;
    }
  }
  while (true) {
    const size_t m = v.size();
    if (m <= 4096) {
      // selections in rank order, each over what lies above the one before (linear, not a sort)
      auto from = v.begin();
      for (int r = 0; r < nr; ++r) {
        const auto it = v.begin() + ranks[r];
        if (it >= from) {
          std::nth_element(from, it, v.end());
          from = it + 1;
        }
        res[r] = *it;
      }
      return;
    }
    if (kmin == kmax) {
      for (int r = 0; r < nr; ++r) res[r] = v[0];
      return;
    }
    int shift = 0;
    while (((kmax - kmin) >> shift) >= (bits_t(1) << kSelBits)) ++shift;
    std::fill(hist.begin(), hist.end(), 0u);
    for (const acc_t x : v) ++hist[size_t((key_of(x) - kmin) >> shift)];
    size_t b0 = 0, b1 = 0;
    int64_t cum = 0, base = 0;
    bool got0 = false;
    for (size_t b = 0; b < hist.size(); ++b) {
      const int64_t nx = cum + hist[b];
      if (!got0 && ranks[0] < nx) {
        b0 = b;
        base = cum;
        got0 = true;
      }
      if (ranks[nr - 1] < nx) {
        b1 = b;
        break;
      }
      cum = nx;
    }
    next.resize(m);
    size_t nn = 0;
    const bits_t lo_key = kmin + (bits_t(b0) << shift);  // keys of bins b0..b1
    const bits_t span = (bits_t(b1 - b0 + 1) << shift) - 1;
    bits_t nmin = std::numeric_limits<bits_t>::max(), nmax = 0;
    for (const acc_t x : v) {
      const bits_t u = key_of(x);
      const bool in = bits_t(u - lo_key) <= span;  // unsigned wrap sends keys below lo_key out
      next[nn] = x;
      nn += in;
      nmin = in && u < nmin ? u : nmin;
      nmax = in && u > nmax ? u : nmax;
    }
    next.resize(nn);
    kmin = nmin;
    kmax = nmax;
    if (next.size() == m) {  // no progress: plain selections
      for (int r = 0; r < nr; ++r) {
        std::nth_element(v.begin(), v.begin() + ranks[r], v.end());
        res[r] = v[size_t(ranks[r])];
      }
      return;
    }
    for (int r = 0; r < nr; ++r) ranks[r] -= base;
    v.swap(next);
  }
}

// Exact k-th smallest |tau| of a small problem (t, s), at most kExactMax entries, by gathering it;
// false if a non-finite value showed up.
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
    acc_t chk = 0;
    for (int64_t j = 0; j < m; ++j) {
      acc_t tau = xp[j] - bp[j];
      if (P.has_w) tau = tau * P.w[t];
      chk = chk + (tau - tau);
      buf[i + j] = std::fabs(tau);  // +0 for -0: the radix keys need it
    }
    ok = ok && chk == acc_t(0);
  }
  if (!ok) return false;
  int64_t r = k - 1;
  select_ranks(buf, &r, 1, thr);
  return true;
}

inline int64_t ties_runs(int64_t n, int T) {  // sampled runs: balances sampling against the fix-up
  const double r = std::pow(0.02 * double(T) * double(n), 2.0 / 3.0) * (16.0 / double(kRun));
  return std::max<int64_t>(1, std::min<int64_t>({int64_t(r), n / (4 * kRun), kMaxRuns}));
}

inline int64_t ties_run_start(int64_t r, int64_t runs, int64_t n, int64_t L) {  // stratified, pseudo-random
  const int64_t s0 = (r * (n - L)) / runs, s1 = ((r + 1) * (n - L)) / runs;
  uint64_t h = uint64_t(r + 1) * 0x9E3779B97F4A7C15ull;
  h ^= h >> 31;
  h *= 0xBF58476D1CE4E5B9ull;
  h ^= h >> 29;
  return s0 + int64_t(h % uint64_t(s1 - s0 + 1));
}

// Half-width of a measured bracket, in standard errors of the sampled rank. A Gaussian tail bound
// puts every side of every bracketed problem at a miss probability of at most 1e-3 / (2 x problems),
// so that a call misses (and pays a second pass) about once in a thousand; the 1.3 covers the error
// of the measured spread (32 groups). Within [5, 8]: 5.1 for one problem, 5.7 for eight, 6.8 for 384.
inline double bracket_z(int64_t nbracketed) {
  const double p = 1e-3 / (2.0 * double(std::max<int64_t>(1, nbracketed)));
  const double z = 1.3 * std::sqrt(2.0 * std::log(1.0 / p));
  return std::min(8.0, std::max(5.0, z));
}

// Guess and bracket around the k-th smallest |tau| of every task of segment s, from runs of
// entries at stratified pseudo-random places (the same places for all tasks).
template <typename in_t, typename acc_t>
bool sample_brackets(const TiesArgs& a, TiesPlan<acc_t>& P, int64_t s, int64_t nbracketed, int64_t* nsampled) {
  const int T = P.T;
  const int64_t b0 = P.off[s], n = P.off[s + 1] - P.off[s];
  const int64_t L = std::min(kRun, n);
  const int64_t runs = ties_runs(n, T);
  const int64_t m = runs * L;
  std::vector<std::vector<acc_t>> samp(T, std::vector<acc_t>(size_t(m)));
  std::vector<const in_t*> raw(T + 1, nullptr);
  for (int t = 0; t < T; ++t)
    if (a.thetas[t].stride == 1) raw[t] = static_cast<const in_t*>(a.thetas[t].ptr);
  if (a.base.stride == 1) raw[T] = static_cast<const in_t*>(a.base.ptr);
  // Runs start on a cache-line boundary of the first task (one line per input instead of two).
  int64_t mis = 0;
  if (raw[0] && L == kRun && (reinterpret_cast<uintptr_t>(raw[0]) % sizeof(in_t)) == 0)
    mis = int64_t((reinterpret_cast<uintptr_t>(raw[0]) / sizeof(in_t)) % uint64_t(kRun));
  auto run_at = [&](int64_t r) {
    const int64_t st = b0 + ties_run_start(r, runs, n, L);
    const int64_t al = st - ((st + mis) % kRun);
    return L == kRun && al >= b0 ? al : st;
  };
  std::atomic<bool> bad{false};
  at::parallel_for(0, runs, 256, [&](int64_t rb, int64_t re) {
    alignas(64) acc_t bb[kRun];
    alignas(64) acc_t xb[kRun];
    acc_t chk = 0;
    constexpr int64_t kAhead = 8;
    for (int64_t r = rb; r < re; ++r) {
      if (r + kAhead < re) {
        const int64_t ps = run_at(r + kAhead);
        for (int t = 0; t <= T; ++t)
          if (raw[t])
            for (int64_t e = 0; e < L; e += int64_t(64 / sizeof(in_t))) __builtin_prefetch(raw[t] + ps + e);
      }
      const int64_t start = run_at(r);
      const acc_t* bp = load_chunk<in_t>(a.base, start, L, bb);
      for (int t = 0; t < T; ++t) {
        const acc_t* xp = load_chunk<in_t>(a.thetas[t], start, L, xb);
        acc_t* d = samp[t].data() + r * L;
        const acc_t w = P.w[t];
        for (int64_t j = 0; j < L; ++j) {
          acc_t tau = xp[j] - bp[j];
          if (P.has_w) tau = tau * w;
          chk = chk + (tau - tau);
          d[j] = std::fabs(tau);
        }
      }
    }
    if (chk != acc_t(0)) bad = true;
  });
  if (bad) return false;
  *nsampled += m * T;
  const double zmul = bracket_z(nbracketed);
  at::parallel_for(0, T, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const int64_t p = t * P.S + s, k = P.k[p];
      const double q = double(k) / double(n);
      // Half-width of the bracket in ranks of the sample: bracket_z standard errors of the sampled
      // rank, the error measured from the data (the spread of the fraction below a pilot guess across
      // kGroups interleaved groups of runs) and never below the independent-entries value; with
      // too few runs to measure, 5 standard errors with the variance inflated 4x for the
      // correlation inside a run.
      const double sd_iid = std::sqrt(double(m) * q * (1.0 - q));
      double h = 5.0 * 2.0 * sd_iid;
      constexpr int64_t kGroups = 32;
      if (runs >= 4 * kGroups) {
        const acc_t* sv = samp[t].data();
        std::vector<acc_t> pilot;
        pilot.reserve(size_t((runs / kGroups + 1) * L));
        for (int64_t r = 0; r < runs; r += kGroups) pilot.insert(pilot.end(), sv + r * L, sv + r * L + L);
        int64_t pr = std::llround(q * double(pilot.size()) - 0.5);
        pr = std::min(std::max<int64_t>(pr, 0), int64_t(pilot.size()) - 1);
        acc_t c0;
        select_ranks(pilot, &pr, 1, &c0);
        int64_t cnt[kGroups] = {}, mg[kGroups] = {};
        for (int64_t r = 0; r < runs; ++r) {
          int64_t cb = 0;
          for (int64_t j = 0; j < L; ++j) cb += sv[r * L + j] < c0;
          cnt[r % kGroups] += cb;
          mg[r % kGroups] += L;
        }
        double tot = 0, totm = 0;
        for (int64_t g = 0; g < kGroups; ++g) {
          tot += double(cnt[g]);
          totm += double(mg[g]);
        }
        const double pbar = tot / totm;
        double var = 0;
        for (int64_t g = 0; g < kGroups; ++g) {
          const double dv = double(cnt[g]) / double(mg[g]) - pbar;
          var += dv * dv;
        }
        var /= double(kGroups - 1);
        const double sd_meas = std::sqrt(var / double(kGroups)) * double(m);
        h = zmul * std::max(sd_meas, sd_iid);
      }
      h += double(L) + 2.0;
      const double center = q * double(m) - 0.5;
      int64_t rk[3] = {int64_t(std::floor(center - h)), int64_t(std::llround(center)),
                       int64_t(std::ceil(center + h))};
      const bool lo_open = rk[0] < 0, hi_open = rk[2] > m - 1;
      for (auto& x : rk) x = std::min(std::max<int64_t>(x, 0), m - 1);
      acc_t res[3];
      select_ranks(samp[t], rk, 3, res);
      P.lo[p] = lo_open ? acc_t(0) : res[0];
      P.c[p] = res[1];
      P.hi[p] = hi_open ? std::numeric_limits<acc_t>::infinity() : res[2];
      P.bracket[p] = 1;
      P.est[p] = double(rk[2] - rk[0] + 1) / double(m) * double(n);
    }
  });
  return true;
}

struct ScratchBlock {  // one block of the candidate storage of a pass, shared by its threads
  void* p = nullptr;
  size_t bytes = 0;
  explicit ScratchBlock(size_t b) : p(b ? scratch_take(b) : nullptr), bytes(b) {}
  ~ScratchBlock() {
    if (p) scratch_give(p, bytes);
  }
  ScratchBlock(const ScratchBlock&) = delete;
  ScratchBlock& operator=(const ScratchBlock&) = delete;
};

template <typename acc_t>
struct CandBuf {  // entries strictly inside a bracket: values and positions inside the segment
  acc_t* val = nullptr;  // cap entries each, in the pass's scratch block
  uint32_t* pos = nullptr;
  size_t n = 0, cap = 0;
};

template <typename acc_t>
struct PassAcc {  // per-thread results of one streaming pass
  std::vector<int64_t> below, eqlo, eqhi;  // per problem: |tau| < lo, == lo, == hi (!= lo)
  std::vector<CandBuf<acc_t>> cand;        // per problem
  std::vector<char> over;                  // per problem: more candidates than its cap
  std::vector<int64_t> hist;               // bins of the problems a narrowing pass counts
  std::shared_ptr<ScratchBlock> block;     // storage of the candidates
  std::vector<int64_t> cancel;             // positions whose sign sum cancelled exactly
  int64_t msum = 0;
  bool cancel_overflow = false, bad = false;
};

template <typename acc_t>
struct TiesTaskPar {  // per task, for the segment at hand
  acc_t lo, hi, c, w;
  int brk;   // classified in this pass
  int hist;  // counted in the histogram rather than collected
  typename BitsOf<acc_t>::type lok;
  int shift;
  int64_t hoff;
};

// Bit l set when lane l of the comparison mask is set.
template <int W, typename I>
inline uint32_t lane_mask(const I& in) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (sizeof(I) == 64 && W == 16) return _mm512_test_epi32_mask((__m512i)in, (__m512i)in);
  if constexpr (sizeof(I) == 64 && W == 8) return _mm512_test_epi64_mask((__m512i)in, (__m512i)in);
#endif
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (sizeof(I) == 32 && W == 8) return uint32_t(_mm256_movemask_ps((__m256)in));
  if constexpr (sizeof(I) == 32 && W == 4) return uint32_t(_mm256_movemask_pd((__m256d)in));
#endif
  uint32_t m = 0;  // lanes are all ones or zero: one bit of each, no branch
  for (int l = 0; l < W; ++l) m |= uint32_t(in[l] & 1) << l;
  return m;
}

// One streaming pass. WRITE = false only classifies (the histogram passes); WRITE = true also merges
// and writes every position with the thresholds c. With `fin`, the majority sign is known and
// cancelled positions are finished in place.
template <bool WRITE, typename in_t>
void ties_pass(const TiesArgs& a, const TiesPlan<typename AccOf<in_t>::type>& P,
               std::vector<PassAcc<typename AccOf<in_t>::type>>& acc_by_thread, bool keep_pos, bool fin,
               typename AccOf<in_t>::type majority) {
  // One vector of positions at a time, all tasks in registers: the trimmed entries never go to
  // memory. Per position the pass keeps the task-order sums of the positive and of the negative
  // trimmed entries (and their counts and largest magnitudes); the elected sign then picks one
  // side, which is exactly the reference's "sum over tasks with the elected sign".
  using acc_t = typename AccOf<in_t>::type;
  using TV = SimdVec<acc_t>;
  using F = typename TV::F;
  using I = typename TV::I;
  using ilane = std::remove_reference_t<decltype(std::declval<I>()[0])>;
  constexpr int W = TV::W;
  const int T = a.T;
  const int64_t S = P.S;
  const std::vector<Item> items = make_items(P.off, S);
  in_t* out = static_cast<in_t*>(a.out);
  // The items are split into one contiguous slice per thread, each with its own results: a
  // segment then lies in one slice (or, at a slice boundary, in two), and only those slices need
  // room for its candidates.
  const int64_t nitems = int64_t(items.size());
  const int64_t nslices = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nitems));
  const int64_t per_slice = (nitems + nslices - 1) / nslices;
  std::vector<char> in_slice(size_t(nslices) * S, 0);  // segment s has positions in slice k
  for (int64_t it = 0; it < nitems; ++it) in_slice[(it / per_slice) * S + items[it].seg] = 1;
  acc_by_thread.clear();
  acc_by_thread.resize(nslices);
  for (auto& pa : acc_by_thread) {
    pa.below.assign(T * S, 0);
    pa.eqlo.assign(T * S, 0);
    pa.eqhi.assign(T * S, 0);
    pa.cand.resize(T * S);
    pa.over.assign(T * S, 0);
    pa.hist.assign(size_t(P.hist_total), 0);
  }
  {  // each slice's candidate arrays, in one scratch block reused from call to call
    const size_t per = sizeof(acc_t) + (keep_pos ? sizeof(uint32_t) : 0);
    // A slice holding any of a segment may take all the candidates the bracket is expected to hold
    // (with a margin), within the problem's cap; more than that counts as an overflow. A multiple
    // of 16 entries keeps every array aligned.
    auto share = [&](int64_t p, int64_t k) {
      if (!in_slice[k * S + p % S]) return size_t(0);
      const double want = std::min(P.est[p] * 1.25 + 4096.0, double(std::max<int64_t>(1, P.cap)));
      return (size_t(want) + 15) / 16 * 16;
    };
    size_t total = 0;
    for (int64_t p = 0; p < T * S; ++p)
      if (P.active[p] == 1)
        for (int64_t k = 0; k < nslices; ++k) total += share(p, k) * per;
    auto block = std::make_shared<ScratchBlock>(total);
    char* at = static_cast<char*>(block->p);
    for (int64_t p = 0; p < T * S; ++p) {
      if (P.active[p] != 1) continue;
      for (int64_t k = 0; k < nslices; ++k) {
        const size_t c = share(p, k);
        CandBuf<acc_t>& cb = acc_by_thread[k].cand[p];
        cb.cap = c;
        cb.val = reinterpret_cast<acc_t*>(at);
        at += c * sizeof(acc_t);
        if (keep_pos) {
          cb.pos = reinterpret_cast<uint32_t*>(at);
          at += c * sizeof(uint32_t);
        }
      }
    }
    for (auto& pa : acc_by_thread) pa.block = block;
  }
  std::vector<const in_t*> raw(T + 1, nullptr);  // contiguous inputs, fetched ahead
  for (int t = 0; t < T; ++t)
    if (a.thetas[t].stride == 1) raw[t] = static_cast<const in_t*>(a.thetas[t].ptr);
  if (a.base.stride == 1) raw[T] = static_cast<const in_t*>(a.base.ptr);
  at::parallel_for(0, nslices, 1, [&](int64_t kb, int64_t ke) {
   for (int64_t slice = kb; slice < ke; ++slice) {
    const int64_t ib = std::min(slice * per_slice, nitems), ie = std::min(ib + per_slice, nitems);
    PassAcc<acc_t>& R = acc_by_thread[slice];
    alignas(64) acc_t bb[kChunk];
    alignas(64) acc_t ob[kChunk];
    alignas(64) acc_t tailb[W];
    alignas(64) acc_t tailo[W];
    std::vector<acc_t> xbufs(size_t(T) * kChunk);
    std::vector<acc_t> tailx(size_t(T) * W);
    std::vector<const acc_t*> xs(T), txs(T);
    std::vector<I> lcnt(T);
    std::vector<TiesTaskPar<acc_t>> tpar(T);
    std::vector<acc_t> tr(T);
    I chk_all = I{};
    int64_t msum_all = 0;
    int64_t s = 0, segb = 0;

    // Per chunk, the vector loop stores one lane mask per vector and task for the entries inside a
    // bracket (no branch, no compaction: its state stays in registers), and appends the cancelled
    // positions; after the chunk, `flush` recomputes the few marked entries from the chunk, still
    // in cache, and hands them on.
    constexpr int64_t kLoc = kChunk + 2 * W;
    constexpr int64_t kBitWords = kChunk / 64 + 1;  // per task: one bit per position of the chunk
    std::vector<uint64_t> loc_bits(size_t(T) * kBitWords);
    std::vector<int64_t> lbelow(T);
    bool kbad_all = false;
    int64_t loc_n = 0;  // positions the masks of the last run cover
    std::vector<int32_t> loc_cancel(kLoc);
    int64_t loc_nc = 0;
    constexpr int64_t kSub = 128;  // positions per block of the task-by-task loops (a multiple of 64)
    std::vector<acc_t> trim_buf(size_t(T) * kSub);

    // nvec positions (a multiple of W) from chunk-local pointers; TAIL: one vector, nvalid real lanes.
    auto run = [&]<bool TAIL, int MODE>(const acc_t* bp, const acc_t* const* xv, int64_t pos0, int64_t nvec,
                                          int nvalid, acc_t* dst, int64_t pf_pos) {
      const int Tl = T;
      const bool hw = P.has_w;
      const TiesTaskPar<acc_t>* tp = tpar.data();
      I* lc = lcnt.data();
      int64_t* lb = lbelow.data();
      uint64_t* lbits = loc_bits.data();
      int32_t* lcan = loc_cancel.data();
      int64_t nc = 0;
      const F zero = F{}, one = F{} + acc_t(1), lamv = F{} + P.lam;
      const I absm = I{} + ilane(TV::kAbs);
      I iota;
      for (int l = 0; l < W; ++l) iota[l] = ilane(l);
      const I valid = TAIL ? I(iota < ilane(nvalid)) : I{} - 1;
      I chkv = I{};  // largest magnitude bits seen, per lane
      I msumv = I{};
      if constexpr (W < 8) {  // the masks are OR-ed into the bitsets below
        for (int t = 0; t < Tl; ++t)
          if (tp[t].brk) std::fill_n(lbits + t * kBitWords, (nvec + 63) / 64, uint64_t(0));
      }
#if defined(CPU_CAPABILITY_AVX512)
      constexpr bool kmask = std::is_same_v<acc_t, float> && W == 16;
      __mmask16 kbad = 0;
      const __mmask16 kvalid = TAIL ? __mmask16((1u << nvalid) - 1u) : __mmask16(0xFFFF);
#else
      constexpr bool kmask = false;
#endif
      // One vector of positions merged from its per-sign sums (both loop forms below).
      auto finish = [&](int64_t j, const F bv, const F sum, const F pp, const F nn, const I cp, const I cn) {
        const I gp = sum > zero, gn = sum < zero;
        F merged;
        if constexpr (MODE == kMergeMax) {
          merged = (F)(((I)pp & gp) | ((I)(zero - nn) & gn));  // the largest magnitude, elected sign
        } else if constexpr (MODE == kMergeMean) {
          const F num = gp ? pp : nn;
          const F den = __builtin_convertvector(gp ? cp : cn, F);
          const F qv = num / (den > one ? den : one);
          merged = (F)((I)qv & (gp | gn));
        } else {
          merged = (F)(((I)pp & gp) | ((I)nn & gn));
        }
        const F o = bv + lamv * merged;
        I cm = (sum == zero) & ((cp + cn) != 0);  // cancelled: the majority sign decides
        if constexpr (MODE == kMergeMax) cm |= (sum == zero) & ((I)bv == (I)(zero * -one));  // base -0
        if constexpr (TAIL) cm &= valid;
        msumv = msumv + gn - gp;
        if (simd_any(cm)) {
          for (int l = 0; l < W; ++l) {
            lcan[nc] = int32_t(j + l);
            nc += cm[l] != 0;
          }
        }
        std::memcpy(dst + j, &o, sizeof(F));
      };
      // Adds one task's trimmed entries to the per-sign sums, counts and largest magnitudes.
      auto add_trimmed = [&](const F trv, F& sum, F& pp, F& nn, I& cp, I& cn) {
        sum = sum + trv;
        const I ps = trv > zero, ng = trv < zero;
        if constexpr (MODE == kMergeMax) {
          const F a1 = (F)((I)trv & ps), a2 = (F)((I)(zero - trv) & ng);
          pp = pp > a1 ? pp : a1;
          nn = nn > a2 ? nn : a2;
        } else {
          pp = pp + (F)((I)trv & ps);
          nn = nn + (F)((I)trv & ng);
        }
        cp -= ps;
        cn -= ng;
      };
      if constexpr (!kmask) {
        // Task by task over a block of positions: each task's classification and trim walk its own
        // stream with the task's constants in registers and no branch; the trimmed entries go to a
        // small buffer, then summed per position in task order (the same arithmetic, in the same
        // order, as one vector of positions at a time over all tasks).
        acc_t* trb = trim_buf.data();
        for (int64_t sb = 0; sb < nvec; sb += kSub) {
          const int64_t se = std::min(nvec, sb + kSub);
          if (!TAIL && pf_pos >= 0) {  // the block's lines of the next chunk, every input
            constexpr int64_t kLine = 64 / int64_t(sizeof(in_t));
            for (int t = 0; t <= Tl; ++t)
              if (raw[t])
                for (int64_t e = (pf_pos + sb + kLine - 1) / kLine * kLine; e < pf_pos + se; e += kLine)
                  __builtin_prefetch(raw[t] + e);
          }
          for (int t = 0; t < Tl; ++t) {
            const TiesTaskPar<acc_t>& q = tp[t];
            const acc_t* x = xv[t];
            acc_t* tb = trb + t * kSub;  // position j at tb[j - sb]
            const F wv = F{} + q.w, cv = F{} + q.c;
            I bigv = chkv;
            if (q.brk) {
              const F lov = F{} + q.lo, hiv = F{} + q.hi;
              uint64_t* bw = lbits + t * kBitWords;
              I lcv = I{};
              for (int64_t j = sb; j < se; j += W) {
                F tau = simd_load<F>(x + j) - simd_load<F>(bp + j);
                if (hw) tau = tau * wv;
                const I ai = (I)tau & absm;
                bigv = bigv > ai ? bigv : ai;  // a NaN or infinity has the largest magnitude bits
                const F ab = (F)ai;
                I lt = ab < lov;
                I in = (ab <= hiv) & ~lt;
                if constexpr (TAIL) {
                  lt &= valid;
                  in &= valid;
                }
                lcv -= lt;
                const uint32_t m = lane_mask<W>(in);
                if constexpr (W >= 8) {
                  const auto mw = static_cast<std::conditional_t<W == 16, uint16_t, uint8_t>>(m);
                  std::memcpy(reinterpret_cast<char*>(bw) + j / 8, &mw, sizeof(mw));
                } else {
                  bw[j / 64] |= uint64_t(m) << (j % 64);
                }
                if constexpr (WRITE) {
                  I keep = ab >= cv;
                  if constexpr (TAIL) keep &= valid;
                  simd_store(tb + (j - sb), (F)((I)tau & keep));
                }
              }
              lc[t] += lcv;
            } else {
              for (int64_t j = sb; j < se; j += W) {
                F tau = simd_load<F>(x + j) - simd_load<F>(bp + j);
                if (hw) tau = tau * wv;
                const I ai = (I)tau & absm;
                bigv = bigv > ai ? bigv : ai;
                if constexpr (WRITE) {
                  I keep = (F)ai >= cv;
                  if constexpr (TAIL) keep &= valid;
                  simd_store(tb + (j - sb), (F)((I)tau & keep));
                }
              }
            }
            chkv = bigv;
          }
          if constexpr (WRITE) {
            for (int64_t j = sb; j < se; j += W) {
              F sum = zero, pp = zero, nn = zero;
              I cp = I{}, cn = I{};
              const acc_t* tj = trb + (j - sb);
              for (int t = 0; t < Tl; ++t) add_trimmed(simd_load<F>(tj + t * kSub), sum, pp, nn, cp, cn);
              finish(j, simd_load<F>(bp + j), sum, pp, nn, cp, cn);
            }
          }
        }
      }
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (kmask)
      for (int64_t j = 0; j < nvec; j += W) {
        if (!TAIL && pf_pos >= 0 && ((pf_pos + j) * int64_t(sizeof(in_t))) % 64 == 0) {
          for (int t = 0; t <= Tl; ++t)
            if (raw[t]) __builtin_prefetch(raw[t] + pf_pos + j);
        }
        const F bv = simd_load<F>(bp + j);
        F sum = zero, pp = zero, nn = zero;
        I cp = I{}, cn = I{};
        {
          // The same arithmetic with the comparisons kept in mask registers: masked adds and
          // compares instead of lane masks moved into vectors. In max mode the negative side
          // keeps its smallest entry, whose negation is the vector loop's largest magnitude.
          const __m512 b = (__m512)bv, z = _mm512_setzero_ps();
          const __m512i absk = (__m512i)absm, onei = _mm512_set1_epi32(1);
          __m512 sk = z, pk = z, nk = z;
          __m512i cpk = _mm512_setzero_si512(), cnk = cpk;
          for (int t = 0; t < Tl; ++t) {
            const TiesTaskPar<acc_t>& q = tp[t];
            __m512 tau = _mm512_sub_ps(_mm512_loadu_ps(xv[t] + j), b);
            if (hw) tau = _mm512_mul_ps(tau, _mm512_set1_ps(q.w));
            kbad |= _mm512_fpclass_ps_mask(tau, 0x99);  // NaN or infinity
            const __m512 ab = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(tau), absk));
            if (q.brk) {
              const __mmask16 klt = _mm512_mask_cmp_ps_mask(kvalid, ab, _mm512_set1_ps(q.lo), _CMP_LT_OQ);
              const __mmask16 kin = _mm512_mask_cmp_ps_mask(kvalid & __mmask16(~klt), ab, _mm512_set1_ps(q.hi),
                                                             _CMP_LE_OQ);
              lb[t] += __builtin_popcount(unsigned(klt));
              const uint16_t m16 = uint16_t(kin);
              std::memcpy(reinterpret_cast<char*>(lbits + t * kBitWords) + j / 8, &m16, sizeof(m16));
            }
            if constexpr (!WRITE) continue;
            const __mmask16 kk = _mm512_mask_cmp_ps_mask(kvalid, ab, _mm512_set1_ps(q.c), _CMP_GE_OQ);
            sk = _mm512_mask_add_ps(sk, kk, sk, tau);
            const __mmask16 kp = _mm512_mask_cmp_ps_mask(kk, tau, z, _CMP_GT_OQ);
            const __mmask16 kn = _mm512_mask_cmp_ps_mask(kk, tau, z, _CMP_LT_OQ);
            if constexpr (MODE == kMergeMax) {
              pk = _mm512_mask_max_ps(pk, kp, pk, tau);
              nk = _mm512_mask_min_ps(nk, kn, nk, tau);
            } else {
              pk = _mm512_mask_add_ps(pk, kp, pk, tau);
              nk = _mm512_mask_add_ps(nk, kn, nk, tau);
            }
            cpk = _mm512_mask_add_epi32(cpk, kp, cpk, onei);
            cnk = _mm512_mask_add_epi32(cnk, kn, cnk, onei);
          }
          sum = (F)sk;
          pp = (F)pk;
          nn = MODE == kMergeMax ? (F)_mm512_sub_ps(z, nk) : (F)nk;
          cp = (I)cpk;
          cn = (I)cnk;
        }
        if constexpr (WRITE) finish(j, bv, sum, pp, nn, cp, cn);
      }
#endif
      loc_nc = nc;
      loc_n = nvec;
      chk_all = chk_all > chkv ? chk_all : chkv;
#if defined(CPU_CAPABILITY_AVX512)
      kbad_all = kbad_all || kbad != 0;
#endif
      for (int l = 0; l < W; ++l) msum_all += int64_t(msumv[l]);
    };
    // Hands on what one chunk (or tail vector) left in the local arrays.
    auto flush = [&](const acc_t* bp, const acc_t* const* xv, int64_t pos0, acc_t* dst) {
      const uint32_t rel0 = uint32_t(pos0 - segb);
      for (int t = 0; t < T; ++t) {
        const TiesTaskPar<acc_t>& q = tpar[t];
        if (!q.brk) continue;
        const int64_t p = t * S + s;
        const uint64_t* bw = loc_bits.data() + t * kBitWords;
        const acc_t* xt = xv[t];
        CandBuf<acc_t>& cb = R.cand[p];
        int64_t* h = q.hist ? R.hist.data() + q.hoff : nullptr;
        for (int64_t wi = 0; wi * 64 < loc_n; ++wi) {
          uint64_t m = bw[wi];
          if (loc_n - wi * 64 < 64) m &= (uint64_t(1) << (loc_n - wi * 64)) - 1;  // bits of earlier chunks
          for (; m; m &= m - 1) {
            const int64_t idx = wi * 64 + __builtin_ctzll(m);
            acc_t tau = xt[idx] - bp[idx];  // exactly the vector loop's arithmetic
            if (P.has_w) tau = tau * q.w;
            const acc_t ab = std::fabs(tau);  // +0 for -0, like the vector loop's mask
            if (h) {
              ++h[size_t((key_of(ab) - q.lok) >> q.shift)];
            } else if (ab == q.lo) {
              ++R.eqlo[p];
            } else if (ab == q.hi) {
              ++R.eqhi[p];
            } else if (cb.n < cb.cap) {
              cb.val[cb.n] = ab;
              if (keep_pos) cb.pos[cb.n] = rel0 + uint32_t(idx);
              ++cb.n;
            } else {
              R.over[p] = 1;  // the problem's threshold is found again without candidates
            }
          }
        }
      }
      for (int64_t q = 0; q < loc_nc; ++q) {
        const int64_t j = loc_cancel[q];
        if (fin) {
          for (int t = 0; t < T; ++t) {
            acc_t tau = xv[t][j] - bp[j];
            if (P.has_w) tau = tau * P.w[t];
            tr[t] = ties_trim(tau, tpar[t].c);
          }
          dst[j] = ties_entry(tr.data(), T, majority, P.mode, bp[j], P.lam);
        } else if (R.cancel.size() < kCancelCap) {
          R.cancel.push_back(pos0 + j);
        } else {
          R.cancel_overflow = true;
        }
      }
      loc_nc = 0;
    };
    auto dispatch = [&]<bool TAIL>(const acc_t* bp, const acc_t* const* xv, int64_t pos0, int64_t nvec, int nvalid,
                                   acc_t* dst, int64_t pf_pos) {
      if (P.mode == kMergeMax)
        run.template operator()<TAIL, kMergeMax>(bp, xv, pos0, nvec, nvalid, dst, pf_pos);
      else if (P.mode == kMergeMean)
        run.template operator()<TAIL, kMergeMean>(bp, xv, pos0, nvec, nvalid, dst, pf_pos);
      else
        run.template operator()<TAIL, kMergeSum>(bp, xv, pos0, nvec, nvalid, dst, pf_pos);
    };

    for (int64_t it = ib; it < ie; ++it) {
      s = items[it].seg;
      segb = P.off[s];
      for (int t = 0; t < T; ++t) {
        const int64_t p = t * S + s;
        tpar[t] = {P.lo[p], P.hi[p], P.c[p], P.w[t], int(P.active[p] != 0), int(P.active[p] == 2),
                   P.lok[p], P.hshift[p], P.hoff[p]};
        lcnt[t] = I{};
        lbelow[t] = 0;
      }
      for (int64_t i = items[it].begin; i < items[it].end; i += kChunk) {
        const int64_t n = std::min(kChunk, items[it].end - i);
        const int64_t nv = n / W * W;
        const acc_t* bp = load_chunk<in_t>(a.base, i, n, bb);
        for (int t = 0; t < T; ++t) xs[t] = load_chunk<in_t>(a.thetas[t], i, n, xbufs.data() + size_t(t) * kChunk);
        acc_t* dst = ob;  // written out with non-temporal stores once the chunk is done
        // The next chunk of every contiguous input is fetched ahead: the hardware prefetchers
        // lose track of T + 1 interleaved streams.
        const int64_t pf_pos = i + 2 * kChunk <= items[it].end ? i + kChunk : -1;
        dispatch.template operator()<false>(bp, xs.data(), i, nv, W, dst, pf_pos);
        flush(bp, xs.data(), i, dst);
        if (nv < n) {
          const int m = int(n - nv);
          pad_tails<W>(bp, xs.data(), T, nv, m, tailb, tailx.data(), txs.data());
          dispatch.template operator()<true>(tailb, txs.data(), i + nv, W, m, tailo, -1);
          flush(tailb, txs.data(), i + nv, tailo);
          if constexpr (WRITE)
            for (int l = 0; l < m; ++l) dst[nv + l] = tailo[l];
        }
        if constexpr (WRITE) store_chunk(out + i, ob, n);
      }
      for (int t = 0; t < T; ++t) {
        int64_t c = lbelow[t];
        for (int l = 0; l < W; ++l) c += int64_t(lcnt[t][l]);
        R.below[t * S + s] += c;
      }
    }
    if constexpr (WRITE) stream_fence();
    R.msum += msum_all;
    if (kbad_all) R.bad = true;
    const ilane inf_bits = ilane(key_of(std::numeric_limits<acc_t>::infinity()));
    for (int l = 0; l < W; ++l)
      if (chk_all[l] >= inf_bits) R.bad = true;
   }
  });
}

// Narrows the threshold of every problem in `todo` with histogram passes. Each pass reads the
// inputs once, counts per problem the entries below its key range [lok, hik] and bins those inside
// it; the bin holding the k-th smallest becomes the new range (a threshold below or above the range
// makes the rest of the key space the new range). A problem leaves `todo` once its range is one
// value, its exact threshold, or, with `allow_cand`, once the entries in range fit its candidate
// cap: it then gets a bracket whose open interval (lo, hi) is exactly that range and a guess inside
// it, for the merge pass to collect and fix up. The per-thread histograms share hist_budget bins,
// so the scratch does not grow with the problems' sizes. False if a non-finite value showed up.
template <typename in_t>
bool ties_narrow(const TiesArgs& a, TiesPlan<typename AccOf<in_t>::type>& P, std::vector<char>& todo,
                 bool allow_cand, TiesStats* st) {
  using acc_t = typename AccOf<in_t>::type;
  using bits_t = typename BitsOf<acc_t>::type;
  const int64_t NP = int64_t(todo.size());
  const bits_t kinf = key_of(std::numeric_limits<acc_t>::infinity());
  std::vector<PassAcc<acc_t>> R;
  std::vector<int64_t> h;
  while (true) {
    int64_t nt = 0;
    for (int64_t p = 0; p < NP; ++p) nt += todo[p];
    if (nt == 0) break;
    int64_t per = kHistMax;
    while (per > kHistMin && per * nt > P.hist_budget) per >>= 1;
    int64_t off = 0;
    for (int64_t p = 0; p < NP; ++p) {
      P.active[p] = todo[p] ? 2 : 0;
      if (!todo[p]) continue;
      const bits_t span = P.hik[p] - P.lok[p];
      int sh = 0;
      while ((span >> sh) >= bits_t(per)) ++sh;
      P.hshift[p] = sh;
      P.hoff[p] = off;
      off += int64_t(span >> sh) + 1;
      P.lo[p] = from_key<acc_t>(P.lok[p]);
      P.hi[p] = from_key<acc_t>(P.hik[p]);
    }
    P.hist_total = off;
    ties_pass<false, in_t>(a, P, R, false, false, acc_t(0));
    st->passes += 1;
    st->narrow_passes += 1;
    for (auto& r : R)
      if (r.bad) return false;
    for (int64_t p = 0; p < NP; ++p) {
      if (!todo[p]) continue;
      int64_t below = 0;
      for (auto& r : R) below += r.below[p];
      const int sh = P.hshift[p];
      const int64_t nb = int64_t((P.hik[p] - P.lok[p]) >> sh) + 1;
      h.assign(size_t(nb), 0);
      int64_t total = 0;
      for (auto& r : R)
        for (int64_t b = 0; b < nb; ++b) h[b] += r.hist[P.hoff[p] + b];
      for (int64_t b = 0; b < nb; ++b) total += h[b];
      const int64_t rank = P.k[p] - below;  // 1-indexed among the entries in range
      if (rank < 1) {
        st->bracket_misses += 1;
        P.hik[p] = P.lok[p] - 1;
        P.lok[p] = 0;
        continue;
      }
      if (rank > total) {
        st->bracket_misses += 1;
        P.lok[p] = P.hik[p] + 1;
        P.hik[p] = kinf;
        continue;
      }
      int64_t b = 0, cum = 0;
      while (cum + h[b] < rank) cum += h[b++];
      const bits_t nlo = P.lok[p] + (bits_t(b) << sh);
      const bits_t nhi = std::min<bits_t>(P.hik[p], nlo + ((bits_t(1) << sh) - 1));
      P.lok[p] = nlo;
      P.hik[p] = nhi;
      if (nlo == nhi) {
        set_exact(P, p, from_key<acc_t>(nlo));
        todo[p] = 0;
      } else if (allow_cand && h[b] <= P.cap) {
        P.lo[p] = nlo > 0 ? from_key<acc_t>(nlo - 1) : acc_t(-1);  // nothing equals a negative lo
        P.hi[p] = from_key<acc_t>(std::min<bits_t>(nhi + 1, kinf));
        P.c[p] = from_key<acc_t>(nlo);
        P.est[p] = double(h[b]);
        P.bracket[p] = 1;
        todo[p] = 0;
      }
    }
  }
  P.hist_total = 0;
  return true;
}

inline int64_t seg_of(const int64_t* off, int64_t S, int64_t i) {
  return int64_t(std::upper_bound(off, off + S + 1, i) - off) - 1;
}

// Recompute the listed positions with the exact thresholds. With `old_c`, also the sign-tally
// correction against the thresholds the pass used and the positions that now cancel; otherwise
// (cancelled positions) the given majority sign decides a zero sum.
template <typename in_t>
void ties_fixup(const TiesArgs& a, const TiesPlan<typename AccOf<in_t>::type>& P, const std::vector<int64_t>& pos,
                const std::vector<typename AccOf<in_t>::type>* old_c, typename AccOf<in_t>::type majority,
                int64_t* dmsum, std::vector<int64_t>* now_cancel) {
  using acc_t = typename AccOf<in_t>::type;
  const int T = a.T;
  const int64_t S = P.S;
  in_t* out = static_cast<in_t*>(a.out);
  const int nthreads = at::get_num_threads();
  std::vector<std::vector<int64_t>> canc(nthreads);
  std::vector<int64_t> dm(nthreads, 0);
  at::parallel_for(0, int64_t(pos.size()), 2048, [&](int64_t qb, int64_t qe) {
    const int tid = at::get_thread_num();
    std::vector<acc_t> tro(T), trn(T);
    // The positions are ascending and scattered: one input at a time is gathered for a block of
    // them (independent loads walking each input's pages in order), then the block is finished.
    constexpr int64_t kBlk = 2048;
    std::vector<acc_t> g(size_t(T + 1) * kBlk);
    for (int64_t q0 = qb; q0 < qe; q0 += kBlk) {
      const int64_t nb = std::min(kBlk, qe - q0);
      const int64_t* pq = pos.data() + q0;
      for (int t = 0; t <= T; ++t) {
        const Src& src = t < T ? a.thetas[t] : a.base;
        acc_t* gd = g.data() + size_t(t) * kBlk;
        for (int64_t u = 0; u < nb; ++u) gd[u] = load_one<in_t, acc_t>(src, pq[u]);
      }
      for (int64_t u = 0; u < nb; ++u) {
        const int64_t i = pq[u];
        const int64_t s = S == 1 ? 0 : seg_of(P.off, S, i);
        const acc_t b = g[size_t(T) * kBlk + u];
        for (int t = 0; t < T; ++t) {
          acc_t tau = g[size_t(t) * kBlk + u] - b;
          if (P.has_w) tau = tau * P.w[t];
          trn[t] = ties_trim(tau, P.thr[t * S + s]);
          if (old_c) tro[t] = ties_trim(tau, (*old_c)[t * S + s]);
        }
        if (old_c) {
          bool nzo, nzn;
          const acc_t so = ties_sum(tro.data(), T, &nzo), sn = ties_sum(trn.data(), T, &nzn);
          dm[tid] += int64_t(sign_of(sn)) - int64_t(sign_of(so));
          if (ties_needs_majority(sn, nzn, P.mode, b)) canc[tid].push_back(i);
        }
        out[i] = to_out<in_t>(ties_entry(trn.data(), T, majority, P.mode, b, P.lam));
      }
    }
  });
  if (dmsum) {
    *dmsum = 0;
    for (int64_t d : dm) *dmsum += d;
  }
  if (now_cancel)
    for (auto& v : canc) now_cancel->insert(now_cancel->end(), v.begin(), v.end());
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
  P.size_for(NP);
  if (a.hist_budget > 0) P.hist_budget = a.hist_budget;
  const int64_t cand_budget = a.cand_budget > 0 ? a.cand_budget : kCandBudget;
  bool big_seg = false;  // positions inside a segment must fit 32 bits for the one-pass strategy
  for (int64_t s = 0; s < S; ++s) big_seg = big_seg || a.offsets[s + 1] - a.offsets[s] > int64_t(UINT32_MAX);
  for (int t = 0; t < T; ++t)
    for (int64_t s = 0; s < S; ++s) {
      const int64_t n = a.offsets[s + 1] - a.offsets[s];
      // k = n - int(n * density), in double precision like the authors' Python code
      P.k[t * S + s] = n - int64_t(double(n) * a.density);
    }

  // 1. thresholds: exact for small problems, a sampled guess and bracket for the others
  auto t0 = clock::now();
  std::atomic<bool> bad{false};
  std::atomic<int64_t> nexact{0}, nbracket{0}, nsampled{0};
  std::vector<char> seg_sampled(S, 0);
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
        if (t == 0) seg_sampled[s] = 1;  // k depends on n only: every task of s is bracketed
        ++nbracket;
      }
    }
  });
  for (int64_t s = 0; s < S && !bad; ++s) {
    int64_t ns = 0;
    if (seg_sampled[s] && !sample_brackets<in_t>(a, P, s, nbracket, &ns)) bad = true;
    nsampled += ns;
  }
  if (bad) return true;
  st->exact_problems = nexact;
  st->bracket_problems = nbracket;
  st->sampled = nsampled;
  int strategy = (a.strategy & 3) == 2 || big_seg ? 2 : 1;
  const bool late = (a.strategy & kTiesLate) != 0;
  if (a.strategy & (kTiesMissLow | kTiesMissHigh)) {  // test hooks: move the brackets off the threshold
    for (int64_t p = 0; p < NP; ++p) {
      if (!P.bracket[p]) continue;
      const acc_t g = std::max(P.c[p], std::numeric_limits<acc_t>::min());
      P.lo[p] = (a.strategy & kTiesMissLow) ? g * acc_t(2) : g / acc_t(4);
      P.hi[p] = P.lo[p] * acc_t(2);
      P.c[p] = P.lo[p] * acc_t(1.5);
    }
  }
  if (nbracket == 0) strategy = 1;
  st->strategy = strategy == 1 ? "one-pass" : "two-pass";
  st->threshold_seconds = secs(t0);

  // The candidate cap: the budget shared by the bracketed problems.
  using bits_t = typename BitsOf<acc_t>::type;
  const bits_t kinf = key_of(std::numeric_limits<acc_t>::infinity());
  // The budget is per thread: a segment's candidates take room in the one or two slices (one per
  // thread) that hold it, so the problems share the budget of all the threads.
  P.cap = std::max<int64_t>(kCandMin, cand_budget * std::max(1, at::get_num_threads()) / std::max<int64_t>(1, nbracket));

  // 2. brackets too wide for their cap (or, two-pass, all of them) are narrowed first by
  // histogram passes: to the exact threshold (two-pass), or until the bracket fits the cap.
  t0 = clock::now();
  {
    std::vector<char> todo(NP, 0);
    int64_t ntodo = 0;
    for (int64_t p = 0; p < NP; ++p) {
      if (!P.bracket[p] || (strategy == 1 && (late || P.est[p] <= 0.75 * double(P.cap)))) continue;
      todo[p] = 1;
      ++ntodo;
      P.lok[p] = key_of(P.lo[p]);
      P.hik[p] = key_of(P.hi[p]);
    }
    if (ntodo > 0 && !ties_narrow<in_t>(a, P, todo, strategy == 1, st)) return true;
  }
  st->narrow_seconds = secs(t0);

  std::vector<PassAcc<acc_t>> R;
  const std::vector<acc_t> used_c = P.c;  // the thresholds the merge pass merges with
  std::vector<int64_t> wrong;             // positions merged with a wrong guess
  bool repass = false;
  // Exact thresholds from the counts and candidates, and the wrongly merged positions. A problem
  // whose bracket missed or whose candidates overflowed their cap is narrowed to its exact
  // threshold; then, as when ties at lo or hi sit on the wrong side of the guess (their positions
  // are not kept), `repass` is set.
  auto resolve = [&]() -> bool {
    int64_t ncand_total = 0;
    for (int64_t p = 0; p < NP; ++p)
      if (P.bracket[p])
        for (auto& r : R) ncand_total += int64_t(r.cand[p].n);
    st->candidates += ncand_total;
    std::vector<char> missed(NP, 0), need(NP, 0);
    std::vector<acc_t> thr_of(NP, 0);
    std::vector<std::vector<int64_t>> wrong_of(NP);  // per problem, ascending
    at::parallel_for(0, NP, 1, [&](int64_t pb, int64_t pe) {
      std::vector<acc_t> buf;
      for (int64_t p = pb; p < pe; ++p) {
        if (!P.bracket[p]) continue;
        int64_t below = 0, elo = 0, ehi = 0;
        size_t nc = 0;
        bool over = false;
        for (auto& r : R) {
          below += r.below[p];
          elo += r.eqlo[p];
          ehi += r.eqhi[p];
          nc += r.cand[p].n;
          over = over || r.over[p];
        }
        const acc_t lo = P.lo[p], hi = P.hi[p];
        const int64_t rank = P.k[p] - below;  // 1-indexed rank among the entries >= lo
        acc_t thr = 0;
        if (rank < 1) {  // below the bracket
          missed[p] = 1;
          P.lok[p] = 0;
          P.hik[p] = key_of(lo) - 1;
        } else if (rank <= elo) {
          thr = lo;
        } else if (over) {  // inside the bracket, candidates not all kept
          missed[p] = 1;
          P.lok[p] = key_of(lo);
          P.hik[p] = key_of(hi);
        } else if (rank <= elo + int64_t(nc)) {
          buf.clear();
          buf.reserve(nc);
          for (auto& r : R) buf.insert(buf.end(), r.cand[p].val, r.cand[p].val + r.cand[p].n);
          int64_t r0 = rank - elo - 1;
          select_ranks(buf, &r0, 1, &thr);
        } else if (rank <= elo + int64_t(nc) + ehi && hi != lo) {
          thr = hi;
        } else {  // above the bracket
          missed[p] = 1;
          P.lok[p] = key_of(hi) + 1;
          P.hik[p] = kinf;
        }
        if (missed[p]) continue;
        thr_of[p] = thr;
        const acc_t c = used_c[p];
        if ((elo > 0 && (lo >= c) != (lo >= thr)) || (ehi > 0 && (hi >= c) != (hi >= thr))) need[p] = 1;
        if (over) need[p] = 1;  // exact, but the wrongly merged positions are not all known
        if (!need[p] && c != thr) {
          // Positions merged with the wrong side of the threshold. Each thread's list is in
          // position order; the lists are sorted here if the threads' ranges were not.
          std::vector<int64_t>& wl = wrong_of[p];
          const int64_t segb = a.offsets[p % S];
          for (auto& r : R) {
            const auto& cv = r.cand[p].val;
            const auto& cp = r.cand[p].pos;
            for (size_t q = 0; q < r.cand[p].n; ++q)
              if ((cv[q] >= c) != (cv[q] >= thr)) wl.push_back(segb + int64_t(cp[q]));
          }
          if (!std::is_sorted(wl.begin(), wl.end())) std::sort(wl.begin(), wl.end());
        }
      }
    });
    for (auto& r : R) r.cand.clear();
    for (int64_t p = 0; p < NP; ++p) {
      st->bracket_misses += missed[p];
      if (missed[p] || need[p]) repass = true;
      if (P.bracket[p] && !missed[p]) set_exact(P, p, thr_of[p]);
    }
    if (repass) return ties_narrow<in_t>(a, P, missed, false, st);
    // Segments are disjoint and ascending: merge the tasks' lists of each segment and append.
    std::vector<int64_t> segl, tmp;
    for (int64_t s = 0; s < S; ++s) {
      segl.clear();
      for (int t = 0; t < T; ++t) {
        const std::vector<int64_t>& wl = wrong_of[t * S + s];
        if (wl.empty()) continue;
        tmp.resize(segl.size() + wl.size());
        std::merge(segl.begin(), segl.end(), wl.begin(), wl.end(), tmp.begin());
        segl.swap(tmp);
      }
      segl.erase(std::unique(segl.begin(), segl.end()), segl.end());
      wrong.insert(wrong.end(), segl.begin(), segl.end());
    }
    return true;
  };

  t0 = clock::now();
  int64_t msum = 0;
  std::vector<int64_t> cancel;
  bool overflow = false;
  auto gather = [&]() {
    msum = 0;
    cancel.clear();
    overflow = false;
    for (auto& r : R) {
      msum += r.msum;
      cancel.insert(cancel.end(), r.cancel.begin(), r.cancel.end());
      overflow = overflow || r.cancel_overflow;
      if (r.bad) bad = true;
    }
  };
  // 3. the merge pass: with the exact thresholds (two-pass, or every problem exact already), or
  // with the guesses, collecting the bracket candidates for the exact thresholds and the fix-up
  int64_t nbr = 0;
  for (int64_t p = 0; p < NP; ++p) {
    P.active[p] = P.bracket[p];
    nbr += P.bracket[p];
  }
  ties_pass<true, in_t>(a, P, R, nbr > 0, false, acc_t(0));
  st->passes += 1;
  gather();
  if (bad) return true;
  if (nbr > 0) {
    if (!resolve()) return true;
    if (repass) {  // thresholds all exact now
      wrong.clear();
      std::fill(P.active.begin(), P.active.end(), 0);
      ties_pass<true, in_t>(a, P, R, false, false, acc_t(0));
      st->passes += 1;
      gather();
    }
  }
  if (bad) return true;
  st->pass_seconds = secs(t0);
  t0 = clock::now();
  st->deferred = int64_t(wrong.size());
  if (!wrong.empty()) {
    int64_t dm = 0;
    ties_fixup<in_t>(a, P, wrong, &used_c, acc_t(0), &dm, &cancel);
    msum += dm;
  }
  std::sort(cancel.begin(), cancel.end());
  cancel.erase(std::unique(cancel.begin(), cancel.end()), cancel.end());
  st->cancelled = int64_t(cancel.size());
  if (!cancel.empty() || overflow) {
    const acc_t majority = acc_t(int(msum > 0) - int(msum < 0));
    if (overflow) {
      std::fill(P.active.begin(), P.active.end(), 0);
      ties_pass<true, in_t>(a, P, R, false, true, majority);
      st->passes += 1;
    } else {
      ties_fixup<in_t>(a, P, cancel, nullptr, majority, nullptr, nullptr);
    }
  }
  st->fixup_seconds = secs(t0);
  st->thresholds.assign(P.thr.begin(), P.thr.end());
  return false;
}

