// Exact TIES-Merging on the GPU.
//
// Problems are the (task t, segment s) pairs, p = t * S + s; every problem of segment s has the
// same size n_s and trim rank k_s = n_s - int(n_s * density). The threshold of p is the k_s-th
// smallest |τ| of its entries, found by an MSD radix selection on the magnitude keys (radix.h):
//   - pass j histograms digit j of the keys that agree with the prefix chosen so far, per problem,
//     in shared memory per work item, then adds the bins into global [P, 256] counters with
//     integer atomics (exact, so the order does not matter);
//   - a small kernel per problem picks the digit holding the remaining rank, extends the prefix and
//     turns the rank into the rank inside that bin (radix_pick), clearing the counters;
// after 4 passes (float32 keys) or 8 (float64 keys) the prefix is the exact key of the threshold.
// Segments with k_s = 0 keep every entry and skip the selection.
//
// The fused merge pass then trims, elects and merges every entry with the shared entry math
// (entry_math.h). The elected sign of an entry whose trimmed sum is 0 is the majority sign, known
// only once the pass is over: the pass adds every sign(s_i) into an integer tally and lists the
// positions whose sum cancelled exactly although some trimmed entry is nonzero (where the majority
// matters); a small kernel rewrites those. If the list overflows its fixed capacity, a second full
// pass runs with the majority known instead. Scratch: O(T * S * 256) counters plus that list.
//
// The `strategy` argument (sampled bracket vs exact selection on the CPU) is accepted for
// signature compatibility; the CUDA backend always does the exact selection described here.
#include <ATen/Dispatch.h>

#include "common.cuh"
#include "fastmerge/entry_math.h"
#include "fastmerge/radix.h"
#include "ops_cuda.h"

namespace fastmerge {
namespace cuda {
namespace {

constexpr int64_t kItem = 8192;              // entries per work item (never crossing a segment)
constexpr int kMaxLocalT = 32;               // trimmed values kept per thread in local memory up to this T
constexpr int64_t kScratchBlocks = 256;      // grid of the merge kernels that keep them in global scratch
constexpr int64_t kCancelCap = int64_t(1) << 18;  // listed cancelled positions before the full-pass fallback

template <typename in_t, typename acc_t>
__device__ __forceinline__ acc_t tau_of(const Src& x, acc_t b, const double* w, int t, int64_t i) {
  acc_t tau = load_as<in_t, acc_t>(x, i) - b;
  if (w != nullptr) tau = tau * acc_t(w[t]);
  return tau;
}

template <typename in_t>
__global__ void ties_hist_kernel(Src base, const Src* __restrict__ thetas, const double* __restrict__ w, int T,
                                 int64_t S, const int64_t* __restrict__ items, int64_t nitems,
                                 const int64_t* __restrict__ seg_active, const int64_t* __restrict__ prefix,
                                 int pass, unsigned long long* __restrict__ hist) {
  using acc_t = typename AccOf<in_t>::type;
  using Key = MagKey<acc_t>;
  FM_SHARED(unsigned int, sh, kRadixBins);
  for (int64_t it = blockIdx.x; it < nitems; it += gridDim.x) {
    const int64_t seg = items[3 * it], i0 = items[3 * it + 1], i1 = items[3 * it + 2];
    if (!seg_active[seg]) continue;  // uniform over the block
    for (int t = 0; t < T; ++t) {
      const int64_t p = int64_t(t) * S + seg;
      const uint64_t pre = uint64_t(prefix[p]);
      for (int b = threadIdx.x; b < kRadixBins; b += blockDim.x) sh[b] = 0u;
      __syncthreads();
      for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
        const acc_t b = load_as<in_t, acc_t>(base, i);
        const uint64_t key = uint64_t(Key::of(tau_of<in_t, acc_t>(thetas[t], b, w, t, i)));
        if (radix_match<acc_t>(key, pre, pass)) atomicAdd(&sh[radix_digit<acc_t>(key, pass)], 1u);
      }
      __syncthreads();
      for (int b = threadIdx.x; b < kRadixBins; b += blockDim.x)
        if (sh[b] != 0u) atomicAdd(&hist[p * kRadixBins + b], (unsigned long long)sh[b]);
      __syncthreads();
    }
  }
}

template <typename acc_t>
__global__ void ties_select_kernel(int64_t P, int64_t S, const int64_t* __restrict__ seg_active, int pass,
                                   unsigned long long* __restrict__ hist, int64_t* __restrict__ prefix,
                                   int64_t* __restrict__ rank) {
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < P; p += int64_t(gridDim.x) * blockDim.x) {
    if (!seg_active[p % S]) continue;
    unsigned long long* h = hist + p * kRadixBins;
    int64_t r = rank[p];
    const int d = radix_pick(h, &r);
    prefix[p] = int64_t(uint64_t(prefix[p]) | (uint64_t(d) << radix_shift<acc_t>(pass)));
    rank[p] = r;
    for (int b = 0; b < kRadixBins; ++b) h[b] = 0ull;  // ready for the next pass
  }
}

template <typename acc_t>
__global__ void ties_thresholds_kernel(int64_t P, int64_t S, const int64_t* __restrict__ seg_active,
                                       const int64_t* __restrict__ prefix, acc_t* __restrict__ thr) {
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < P; p += int64_t(gridDim.x) * blockDim.x)
    thr[p] = seg_active[p % S] ? MagKey<acc_t>::value(uint64_t(prefix[p])) : acc_t(0);  // 0 keeps all
}

// Trimmed values of entry i (segment seg) into tr[0..T); returns false if some τ is not finite.
template <typename in_t, typename acc_t>
__device__ __forceinline__ bool load_trimmed(const Src& base, const Src* thetas, const double* w, int T, int64_t S,
                                             int64_t seg, const acc_t* thr, int64_t i, acc_t* b_out, acc_t* tr) {
  const acc_t b = load_as<in_t, acc_t>(base, i);
  bool ok = true;
  for (int t = 0; t < T; ++t) {
    const acc_t tau = tau_of<in_t, acc_t>(thetas[t], b, w, t, i);
    ok = ok && finite(tau);
    tr[t] = ties_trim(tau, thr[int64_t(t) * S + seg]);
  }
  *b_out = b;
  return ok;
}

__device__ __forceinline__ int majority_of(const unsigned long long* tally) {
  const long long v = (long long)(*tally);
  return int(v > 0) - int(v < 0);
}

template <typename in_t, bool kLocal>
__global__ void ties_merge_kernel(Src base, const Src* __restrict__ thetas, const double* __restrict__ w, int T,
                                  int64_t S, const int64_t* __restrict__ items, int64_t nitems,
                                  const typename AccOf<in_t>::type* __restrict__ thr, double lam_d, int mode,
                                  in_t* __restrict__ out, typename AccOf<in_t>::type* __restrict__ scratch,
                                  bool majority_known, unsigned long long* tally, unsigned long long* count,
                                  int64_t* __restrict__ cancelled, int64_t cap, int* flag) {
  using acc_t = typename AccOf<in_t>::type;
  acc_t local[kLocal ? kMaxLocalT : 1];
  acc_t* tr = kLocal ? local : scratch + (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * T;
  const acc_t lam = acc_t(lam_d);
  const acc_t maj = majority_known ? acc_t(majority_of(tally)) : acc_t(0);
  long long my_tally = 0;
  bool bad = false;
  for (int64_t it = blockIdx.x; it < nitems; it += gridDim.x) {
    const int64_t seg = items[3 * it], i0 = items[3 * it + 1], i1 = items[3 * it + 2];
    for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
      acc_t b;
      bad = !load_trimmed<in_t, acc_t>(base, thetas, w, T, S, seg, thr, i, &b, tr) || bad;
      bool nz;
      const acc_t s = ties_sum(tr, T, &nz);
      acc_t gamma = sign_of(s);
      if (!majority_known) {
        my_tally += (long long)gamma;
        if (ties_needs_majority(s, nz, mode, b)) {  // finished once the majority is known
          const unsigned long long q = atomicAdd(count, 1ull);
          if (int64_t(q) < cap) {
            cancelled[2 * q] = i;
            cancelled[2 * q + 1] = seg;
          }
        }
      } else if (gamma == acc_t(0)) {
        gamma = maj;
      }
      const acc_t merged = ties_disjoint(tr, T, gamma, mode);
      out[i] = static_cast<in_t>(b + lam * merged);
    }
  }
  if (!majority_known) {
    // Warp sums of the signs, then one integer atomic per warp (exact in any order).
    for (int off = 16; off > 0; off >>= 1) my_tally += __shfl_down_sync(0xffffffffu, my_tally, off);
    if ((threadIdx.x & 31) == 0 && my_tally != 0) atomicAdd(tally, (unsigned long long)my_tally);
  }
  raise_flag(bad, flag);
}

template <typename in_t, bool kLocal>
__global__ void ties_fixup_kernel(Src base, const Src* __restrict__ thetas, const double* __restrict__ w, int T,
                                  int64_t S, const typename AccOf<in_t>::type* __restrict__ thr, double lam_d,
                                  int mode, in_t* __restrict__ out, typename AccOf<in_t>::type* __restrict__ scratch,
                                  const unsigned long long* tally, const int64_t* __restrict__ cancelled,
                                  int64_t m) {
  using acc_t = typename AccOf<in_t>::type;
  acc_t local[kLocal ? kMaxLocalT : 1];
  acc_t* tr = kLocal ? local : scratch + (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * T;
  const acc_t maj = acc_t(majority_of(tally));
  for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < m; q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = cancelled[2 * q], seg = cancelled[2 * q + 1];
    acc_t b;
    load_trimmed<in_t, acc_t>(base, thetas, w, T, S, seg, thr, i, &b, tr);
    out[i] = static_cast<in_t>(ties_entry(tr, T, maj, mode, b, acc_t(lam_d)));
  }
}

}  // namespace

at::Tensor merge_ties(const at::Tensor& base, const std::vector<at::Tensor>& thetas, double density, double lam,
                      int64_t mode, const at::Tensor& offsets, const c10::optional<std::vector<double>>& weights,
                      int64_t strategy) {
  (void)strategy;  // see the file comment: always the exact radix selection
  check_input(base, "base");
  check_tasks(base, "base", thetas, "thetas");
  TORCH_CHECK_VALUE(density > 0.0 && density <= 1.0, "density must be in (0, 1], got ", density);
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "unknown merge mode ", mode);
  TORCH_CHECK_VALUE(std::isfinite(lam), "lam[0] is not finite (", lam, ")");
  const int64_t T = int64_t(thetas.size()), n = base.numel();
  const std::vector<int64_t> off = check_offsets(offsets, n, "layout");
  if (weights) {
    TORCH_CHECK_VALUE(int64_t(weights->size()) == T, "weights has ", weights->size(), " entries but there are ", T,
                      " tasks");
    for (int64_t t = 0; t < T; ++t)
      TORCH_CHECK_VALUE((*weights)[size_t(t)] > 0 && std::isfinite((*weights)[size_t(t)]), "weights[", t,
                        "] must be > 0, got ", (*weights)[size_t(t)]);
  }
  DeviceGuard guard(base.device());
  const Stream stream = current_stream();
  const auto dev = base.device();
  at::Tensor out = at::empty({n}, base.options());
  if (n == 0) return out;

  const int64_t S = int64_t(off.size()) - 1, P = T * S;
  std::vector<int64_t> seg_active(static_cast<size_t>(S)), rank0(static_cast<size_t>(P));
  bool any_active = false;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t ns = off[size_t(s + 1)] - off[size_t(s)];
    const int64_t k = ties_rank(ns, density);
    seg_active[size_t(s)] = (ns > 0 && k > 0) ? 1 : 0;
    any_active = any_active || seg_active[size_t(s)];
    for (int64_t t = 0; t < T; ++t) rank0[size_t(t * S + s)] = k;
  }
  const Items items = make_items(off, kItem);
  at::Tensor items_dev = to_device_i64(items.table, dev);
  at::Tensor active_dev = to_device_i64(seg_active, dev);
  at::Tensor rank = to_device_i64(rank0, dev);
  at::Tensor prefix = at::zeros({P}, base.options().dtype(at::kLong));
  at::Tensor table = src_table(thetas, dev);
  at::Tensor w_dev;
  if (weights) w_dev = to_device_f64(*weights, dev);
  const double* w = weights ? w_dev.data_ptr<double>() : nullptr;
  // state: [0] non-finite flag (int), [1] cancelled count, [2] sign tally (two's complement)
  at::Tensor state = at::zeros({3}, base.options().dtype(at::kLong));
  int* flag = reinterpret_cast<int*>(state.data_ptr<int64_t>());
  auto* count = reinterpret_cast<unsigned long long*>(state.data_ptr<int64_t>() + 1);
  auto* tally = reinterpret_cast<unsigned long long*>(state.data_ptr<int64_t>() + 2);
  at::Tensor cancelled = at::empty({2 * kCancelCap}, base.options().dtype(at::kLong));
  const bool local = T <= kMaxLocalT;
  const int64_t merge_grid = local ? grid_for(items.count) : grid_for(items.count, kScratchBlocks);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "fastmerge_cuda_merge_ties", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    at::Tensor thr = at::empty({P}, base.options().dtype(base.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
    if (any_active) {
      at::Tensor hist = at::zeros({P, kRadixBins}, base.options().dtype(at::kLong));
      auto* h = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
      for (int pass = 0; pass < radix_passes<acc_t>(); ++pass) {
        FM_LAUNCH(grid_for(items.count), kThreads, 0, stream, ties_hist_kernel<scalar_t>)(
            src_of(base), src_ptr(table), w, int(T), S, items_dev.data_ptr<int64_t>(), items.count,
            active_dev.data_ptr<int64_t>(), prefix.data_ptr<int64_t>(), pass, h);
        FM_LAUNCH_CHECK();
        FM_LAUNCH(grid_for((P + kThreads - 1) / kThreads), kThreads, 0, stream, ties_select_kernel<acc_t>)(
            P, S, active_dev.data_ptr<int64_t>(), pass, h, prefix.data_ptr<int64_t>(), rank.data_ptr<int64_t>());
        FM_LAUNCH_CHECK();
      }
    }
    FM_LAUNCH(grid_for((P + kThreads - 1) / kThreads), kThreads, 0, stream, ties_thresholds_kernel<acc_t>)(
        P, S, active_dev.data_ptr<int64_t>(), prefix.data_ptr<int64_t>(), thr.data_ptr<acc_t>());
    FM_LAUNCH_CHECK();

    at::Tensor scratch;
    if (!local) scratch = at::empty({merge_grid * kThreads * T}, thr.options());
    acc_t* scr = local ? nullptr : scratch.data_ptr<acc_t>();
    auto launch_merge = [&](bool majority_known) {
      if (local)
        FM_LAUNCH(merge_grid, kThreads, 0, stream, ties_merge_kernel<scalar_t, true>)(
            src_of(base), src_ptr(table), w, int(T), S, items_dev.data_ptr<int64_t>(), items.count,
            thr.data_ptr<acc_t>(), lam, int(mode), out.data_ptr<scalar_t>(), scr, majority_known, tally, count,
            cancelled.data_ptr<int64_t>(), kCancelCap, flag);
      else
        FM_LAUNCH(merge_grid, kThreads, 0, stream, ties_merge_kernel<scalar_t, false>)(
            src_of(base), src_ptr(table), w, int(T), S, items_dev.data_ptr<int64_t>(), items.count,
            thr.data_ptr<acc_t>(), lam, int(mode), out.data_ptr<scalar_t>(), scr, majority_known, tally, count,
            cancelled.data_ptr<int64_t>(), kCancelCap, flag);
      FM_LAUNCH_CHECK();
    };
    launch_merge(false);

    // One small read: the non-finite flag and the number of cancelled positions.
    const at::Tensor st = state.slice(0, 0, 2).to(at::kCPU);
    const int64_t bad = st.data_ptr<int64_t>()[0], ncancel = st.data_ptr<int64_t>()[1];
    if (bad != 0) {  // a NaN/Inf input, or finite inputs whose weighted difference overflowed
      note_nonfinite();
      return;
    }
    if (ncancel > kCancelCap) {
      launch_merge(true);  // too many to list: redo the pass with the majority sign known
    } else if (ncancel > 0) {
      const int64_t g = local ? grid_for((ncancel + kThreads - 1) / kThreads) : std::min(merge_grid, grid_for((ncancel + kThreads - 1) / kThreads));
      if (local)
        FM_LAUNCH(g, kThreads, 0, stream, ties_fixup_kernel<scalar_t, true>)(
            src_of(base), src_ptr(table), w, int(T), S, thr.data_ptr<acc_t>(), lam, int(mode),
            out.data_ptr<scalar_t>(), scr, tally, cancelled.data_ptr<int64_t>(), ncancel);
      else
        FM_LAUNCH(g, kThreads, 0, stream, ties_fixup_kernel<scalar_t, false>)(
            src_of(base), src_ptr(table), w, int(T), S, thr.data_ptr<acc_t>(), lam, int(mode),
            out.data_ptr<scalar_t>(), scr, tally, cancelled.data_ptr<int64_t>(), ncancel);
      FM_LAUNCH_CHECK();
    }
  });
  return out;
}

}  // namespace cuda
}  // namespace fastmerge
