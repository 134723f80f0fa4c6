// Per-entry math shared by the CPU and CUDA kernels (host and device).
//
// Everything here is scalar and branch-light so that the CPU fix-up paths, the CPU tests and the
// CUDA kernels run the very same code. Invariants the kernels rely on:
//  - no fused multiply-add: sums and products round separately, as in the PyTorch reference;
//  - sums over tasks run in task order t = 0, 1, ...;
//  - for |x| of a non-NaN float, the raw bits order the same way as the values.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FM_HD __host__ __device__ __forceinline__
#else
#define FM_HD inline
#endif

namespace fastmerge {

enum MergeMode : int { kMergeMean = 0, kMergeSum = 1, kMergeMax = 2 };

template <typename T>
FM_HD T sign_of(T x) {
  return T(int(x > T(0)) - int(x < T(0)));
}

template <typename T>
FM_HD T abs_of(T x) {
  return x < T(0) ? -x : x;
}

// Order-preserving 32-bit key of a float: key(a) < key(b) iff a < b (non-NaN), -0 < +0.
FM_HD uint32_t float_order_key(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Trimmed task-vector entry: kept when |tau| >= thr (entries tied at the threshold are kept).
template <typename T>
FM_HD T ties_trim(T tau, T thr) {
  return abs_of(tau) >= thr ? tau : T(0);
}

// Elected sign before the majority rule: sign of the task-order sum of trimmed entries.
// `any_nonzero` tells whether some trimmed entry is nonzero (then a zero sum needs the majority).
template <typename T>
FM_HD T ties_sum(const T* trimmed, int ntask, bool* any_nonzero) {
  T s = T(0);
  bool nz = false;
  for (int t = 0; t < ntask; ++t) {
    s = s + trimmed[t];
    nz = nz || (trimmed[t] != T(0));
  }
  *any_nonzero = nz;
  return s;
}

// Disjoint merge of one entry over the tasks whose trimmed value has the elected sign gamma.
template <typename T>
FM_HD T ties_disjoint(const T* trimmed, int ntask, T gamma, int mode) {
  if (mode == kMergeMax) {
    T mx = T(0);
    for (int t = 0; t < ntask; ++t) {
      T v = trimmed[t] * gamma > T(0) ? abs_of(trimmed[t]) : T(0);
      mx = v > mx ? v : mx;
    }
    // mx * gamma even when mx == 0, as the reference computes it: with base == -0 the sign of
    // that zero decides the sign of the result (see ties_needs_majority)
    return mx * gamma;
  }
  T acc = T(0);
  T cnt = T(0);
  for (int t = 0; t < ntask; ++t) {
    bool sel = trimmed[t] * gamma > T(0);
    acc = acc + (sel ? trimmed[t] : T(0));
    cnt = cnt + (sel ? T(1) : T(0));
  }
  if (mode == kMergeSum) return acc;
  return acc / (cnt > T(1) ? cnt : T(1));
}

// Whether an entry's elected sign must wait for the majority sign of the whole vector: its
// task-order sum cancelled exactly while some kept entry is nonzero; or, with the max merge, nothing
// was kept and base is -0, where the reference adds lam * (0 * majority) and the sign of that zero
// decides between -0 and +0.
template <typename T>
FM_HD bool ties_needs_majority(T s, bool any_nonzero, int mode, T base) {
  if (s != T(0)) return false;
  if (any_nonzero) return true;
  return mode == kMergeMax && base == T(0) && (T(1) / base) < T(0);
}

// One whole TIES entry given the trimmed values and the majority sign (used where the sum is 0).
template <typename T>
FM_HD T ties_entry(const T* trimmed, int ntask, T majority, int mode, T base, T lam) {
  bool nz;
  T s = ties_sum(trimmed, ntask, &nz);
  T gamma = sign_of(s);
  if (gamma == T(0)) gamma = majority;
  T merged = ties_disjoint(trimmed, ntask, gamma, mode);
  return base + lam * merged;
}

}  // namespace fastmerge
