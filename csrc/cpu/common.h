// Types shared by the per-capability CPU kernels (kernels.h, compiled once per instruction set)
// and the capability-independent op layer (ops_cpu.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fastmerge {
namespace cpu {

enum class DT : int { F32 = 0, BF16 = 1, F16 = 2, F64 = 3 };

// A 1-D strided input: element i lives at ptr + i * stride (stride in elements).
struct Src {
  const void* ptr;
  int64_t stride;
};

struct AvgArgs {
  DT dt;
  int T;
  const Src* thetas;
  const double* weights;  // T weights
  int64_t n;
  void* out;  // contiguous, dtype dt
  bool prefetch = false;  // software prefetch in the streaming loop (see prefetch_spread)
};

struct TAArgs {
  DT dt;
  int T;
  Src base;
  const Src* thetas;
  const double* lam;  // T coefficients
  int64_t n;
  void* out;
  bool prefetch = false;  // software prefetch in the streaming loop (see prefetch_spread)
};

struct GramArgs {
  DT dt;
  int T;
  Src base;
  const Src* thetas;
  int64_t n;
  double* gram;  // T*T, row-major
};

struct BlockArgs {
  DT dt;
  int T;
  Src base;  // forward: base; backward: the incoming gradient
  const Src* vectors;
  const double* coefs;  // T*B row-major (forward only)
  const int64_t* offsets;  // B+1
  int64_t B;
  int64_t n;
  void* out;  // forward: output (dtype dt); backward: double grad_coefs[T*B]
  bool prefetch = false;  // software prefetch in the streaming loop (see prefetch_spread)
};

struct TiesArgs {
  DT dt;
  int T;
  Src base;
  const Src* thetas;
  const double* weights;  // T weights, or nullptr
  double density;
  double lam;
  int mode;  // MergeMode
  const int64_t* offsets;  // S+1 segment boundaries (S = 1 for scope "global")
  int64_t S;
  int64_t n;
  void* out;
  int strategy;  // 0 auto, 1 one pass + fix-up, 2 two passes; plus the kTies* test flags
  int64_t cand_budget;  // scratch budgets of the threshold search (0: the defaults)
  int64_t hist_budget;
};

// Test hooks of TiesArgs::strategy: no narrowing before the merge pass, so that its candidates
// overflow their caps; sampled brackets moved above (the threshold lies below them) or below it.
constexpr int kTiesLate = 4, kTiesMissLow = 8, kTiesMissHigh = 16;

struct TiesStats {
  std::string strategy;
  int64_t passes = 0;            // full streaming passes over the inputs
  int64_t exact_problems = 0;    // (task, segment) thresholds found exactly before the merge pass
  int64_t bracket_problems = 0;  // thresholds bracketed from a sample
  int64_t bracket_misses = 0;    // brackets that missed the threshold (or overflowed their cap)
  int64_t narrow_passes = 0;     // histogram passes that narrowed brackets (counted in passes too)
  int64_t candidates = 0;        // entries collected inside the brackets
  int64_t deferred = 0;          // positions finished by the fix-up
  int64_t cancelled = 0;         // positions whose sum cancelled exactly (majority sign used)
  int64_t sampled = 0;           // sampled entries
  double threshold_seconds = 0, narrow_seconds = 0, pass_seconds = 0, fixup_seconds = 0;
  std::vector<double> thresholds;  // T*S exact thresholds
};

// Every kernel returns true when it saw a non-finite value (input, or an overflow); the caller then
// locates the offending input and raises, or accepts an overflow of finite inputs.
struct CkptKernels;  // ckpt_types.h

struct Kernels {
  const char* name;
  bool (*uniform_average)(const AvgArgs&);
  bool (*task_arithmetic)(const TAArgs&);
  bool (*gram)(const GramArgs&);
  bool (*block_scale_fwd)(const BlockArgs&);
  bool (*block_scale_bwd)(const BlockArgs&);
  bool (*merge_ties)(const TiesArgs&, TiesStats*);
  const CkptKernels* ckpt;  // the checkpoint-merging kernels of the same build
};

// Large scratch blocks for the kernels, from the same cache as the outputs (2 MiB aligned and kept
// for the next call: a fresh block's first-touch page faults would cost more than filling it).
// Pages become resident only as the kernel writes them.
void* scratch_take(size_t bytes);
void scratch_give(void* p, size_t bytes);

const Kernels& kernels_DEFAULT();
const Kernels& kernels_AVX2();
const Kernels& kernels_AVX512();

}  // namespace cpu
}  // namespace fastmerge
