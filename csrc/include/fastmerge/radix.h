// Order-preserving keys of magnitudes and their radix digits, shared by host and device code.
//
// For a float that is not NaN, |x| >= 0 and the IEEE-754 bit pattern of a non-negative float orders
// exactly like its value, so the k-th smallest |x| is the k-th smallest key (x's bits with the sign
// bit cleared, which also maps -0 onto +0 as torch.abs does). The radix selection of the TIES
// threshold walks these keys from the most significant digit down.
#pragma once

#include <cstdint>
#include <cstring>

#include "entry_math.h"

namespace fastmerge {

template <typename T>
struct MagKey;

template <>
struct MagKey<float> {
  using type = uint32_t;
  static constexpr int kBits = 32;
  static FM_HD uint32_t of(float x) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof(u));
    return u & 0x7fffffffu;
  }
  static FM_HD float value(uint64_t key) {
    const uint32_t u = uint32_t(key);
    float x;
    std::memcpy(&x, &u, sizeof(x));
    return x;
  }
};

template <>
struct MagKey<double> {
  using type = uint64_t;
  static constexpr int kBits = 64;
  static FM_HD uint64_t of(double x) {
    uint64_t u;
    std::memcpy(&u, &x, sizeof(u));
    return u & 0x7fffffffffffffffull;
  }
  static FM_HD double value(uint64_t key) {
    double x;
    std::memcpy(&x, &key, sizeof(x));
    return x;
  }
};

constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;

// Number of digit passes that cover every bit of the key.
template <typename T>
constexpr int radix_passes() {
  return MagKey<T>::kBits / kRadixBits;
}

// Shift of the digit examined by pass `pass` (0 = most significant digit).
template <typename T>
FM_HD int radix_shift(int pass) {
  return MagKey<T>::kBits - kRadixBits * (pass + 1);
}

// Whether `key` agrees with the prefix fixed by the passes before `pass` (every key does in pass 0).
template <typename T>
FM_HD bool radix_match(uint64_t key, uint64_t prefix, int pass) {
  if (pass == 0) return true;
  const int hi = radix_shift<T>(pass) + kRadixBits;  // < key width for pass >= 1
  return ((key ^ prefix) >> hi) == 0;
}

template <typename T>
FM_HD int radix_digit(uint64_t key, int pass) {
  return int((key >> radix_shift<T>(pass)) & uint64_t(kRadixBins - 1));
}

// One selection step: given the histogram of the current digit among the keys that match the
// prefix and the 1-indexed rank still sought among them, returns the digit holding that rank and
// turns `rank` into the rank inside that digit's bin.
template <typename C>
FM_HD int radix_pick(const C* hist, int64_t* rank) {
  int64_t cum = 0;
  for (int d = 0; d < kRadixBins; ++d) {
    const int64_t h = int64_t(hist[d]);
    if (*rank <= cum + h) {
      *rank -= cum;
      return d;
    }
    cum += h;
  }
  return kRadixBins - 1;  // unreachable when the rank is within the counted keys
}

// The trim rank as the TIES-Merging authors' code computes it: k = n - int(n * density), in doubles.
FM_HD int64_t ties_rank(int64_t n, double density) { return n - int64_t(double(n) * density); }

}  // namespace fastmerge
