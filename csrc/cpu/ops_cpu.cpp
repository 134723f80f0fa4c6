// The capability-independent CPU op layer: argument checks, output allocation, choice of the
// instruction-set build, and turning a kernel's "saw a non-finite value" flag into a ValueError that
// names the input and the index. Bound to Python as fastmerge._C.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <sys/mman.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <atomic>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "checkpoint_merge.h"
#include "ckpt_types.h"
#include "common.h"
#include "fastmerge/checks.h"

namespace fastmerge {
namespace cpu {
namespace {

bool cpu_supports(const char* what) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (std::string(what) == "AVX512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
  if (std::string(what) == "AVX2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return std::string(what) == "DEFAULT";
#else
  return std::string(what) == "DEFAULT";
#endif
}

const Kernels* pick(const std::string& name) {
#ifdef FASTMERGE_HAVE_AVX512
  if (name == "AVX512" && cpu_supports("AVX512")) return &kernels_AVX512();
#endif
#ifdef FASTMERGE_HAVE_AVX2
  if (name == "AVX2" && cpu_supports("AVX2")) return &kernels_AVX2();
#endif
  if (name == "DEFAULT") return &kernels_DEFAULT();
  return nullptr;
}

const Kernels*& active() {
  static const Kernels* k = [] {
    const char* env = std::getenv("FASTMERGE_CPU_CAPABILITY");
    if (env && *env) {
      const Kernels* chosen = pick(env);
      TORCH_CHECK_VALUE(chosen != nullptr, "FASTMERGE_CPU_CAPABILITY=", env,
                        " is not one of DEFAULT, AVX2, AVX512 supported by this CPU");
      return chosen;
    }
    for (const char* c : {"AVX512", "AVX2", "DEFAULT"})
      if (const Kernels* chosen = pick(c)) return chosen;
    return &kernels_DEFAULT();
  }();
  return k;
}

const Kernels& K() { return *active(); }

thread_local TiesStats last_ties_stats;

DT dt_of(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return DT::F32;
    case at::kBFloat16:
      return DT::BF16;
    case at::kHalf:
      return DT::F16;
    case at::kDouble:
      return DT::F64;
    default:
      TORCH_CHECK_TYPE(false, name, " has dtype ", x.scalar_type(),
                       "; expected one of float32, bfloat16, float16, float64");
  }
}

void check_1d(const at::Tensor& x, const std::string& name) {
  TORCH_CHECK_VALUE(x.dim() == 1, name, " must be 1-D here (the Python layer flattens), got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(x.device().is_cpu(), name, " must be a CPU tensor for the cpu backend, got ", x.device());
}

std::vector<Src> task_srcs(const at::Tensor& like, const std::vector<at::Tensor>& xs, const char* name,
                           const char* like_name) {
  TORCH_CHECK_VALUE(!xs.empty(), name, " is empty: at least one task (T >= 1) is needed");
  std::vector<Src> out;
  for (size_t t = 0; t < xs.size(); ++t) {
    const std::string nm = std::string(name) + "[" + std::to_string(t) + "]";
    check_1d(xs[t], nm);
    TORCH_CHECK_VALUE(xs[t].numel() == like.numel(), "mismatched shapes: ", nm, " has ", xs[t].numel(),
                      " elements but ", like_name, " has ", like.numel());
    TORCH_CHECK_VALUE(xs[t].scalar_type() == like.scalar_type(), "mismatched dtypes: ", nm, " is ",
                      xs[t].scalar_type(), " but ", like_name, " is ", like.scalar_type());
    out.push_back({xs[t].data_ptr(), xs[t].stride(0)});
  }
  return out;
}

// Fresh 1-D outputs. Large ones are 2 MiB aligned, advised onto transparent huge pages, and their
// memory goes back to a small cache when the tensor dies: first-touch page faults cost more than the
// merge itself (measured here: 57 ms to write a fresh 40 MB output against 9 ms for the whole
// 8-task average into a reused one). FASTMERGE_OUTPUT_CACHE_MB sets the cache size (0 disables it).
constexpr size_t kHuge = size_t(2) << 20;

struct OutputCache {
  std::mutex m;
  std::multimap<size_t, void*> blocks;
  size_t cached = 0;
  size_t cap;
  OutputCache() {
    const char* env = std::getenv("FASTMERGE_OUTPUT_CACHE_MB");
    cap = (env && *env) ? size_t(std::strtoull(env, nullptr, 10)) << 20 : size_t(1024) << 20;
  }
  void* take(size_t size) {
    std::lock_guard<std::mutex> g(m);
    auto it = blocks.lower_bound(size);
    if (it == blocks.end() || it->first > size + size / 4) return nullptr;
    void* p = it->second;
    cached -= it->first;
    blocks.erase(it);
    return p;
  }
  void give(void* p, size_t size) {
    {
      std::lock_guard<std::mutex> g(m);
      if (cached + size <= cap) {
        blocks.emplace(size, p);
        cached += size;
        return;
      }
    }
    std::free(p);
  }
  size_t clear() {
    std::lock_guard<std::mutex> g(m);
    size_t n = cached;
    for (auto& kv : blocks) std::free(kv.second);
    blocks.clear();
    cached = 0;
    return n;
  }
};

OutputCache& output_cache() {
  static OutputCache* c = new OutputCache();  // never destroyed: tensors may outlive static teardown
  return *c;
}

// A cached block, or a fresh one; `huge`: advised onto transparent huge pages (outputs, written
// whole; the kernels' scratch is written sparsely, so it stays on small pages).
void* cached_block(size_t size, bool huge = true) {  // size: a multiple of kHuge
  void* p = output_cache().take(size);
  if (p == nullptr) {
    if (posix_memalign(&p, kHuge, size) != 0) return nullptr;
#ifdef MADV_HUGEPAGE
    if (huge) madvise(p, size, MADV_HUGEPAGE);
#endif
  }
  return p;
}

at::Tensor new_output(int64_t n, const at::TensorOptions& opt, const std::optional<at::Tensor>& out = std::nullopt) {
  if (out) {
    TORCH_CHECK_VALUE(out->dim() == 1 && out->numel() == n && out->is_contiguous() && out->device().is_cpu(),
                      "out must be a contiguous 1-D CPU tensor of ", n, " elements");
    TORCH_CHECK_VALUE(out->scalar_type() == c10::typeMetaToScalarType(opt.dtype()), "out has dtype ",
                      out->scalar_type(), "; expected ", c10::typeMetaToScalarType(opt.dtype()));
    return *out;
  }
  const size_t bytes = size_t(n) * c10::elementSize(c10::typeMetaToScalarType(opt.dtype()));
  if (bytes < 4 * kHuge) return at::empty({n}, opt);
  const size_t size = (bytes + kHuge - 1) / kHuge * kHuge;
  void* p = cached_block(size);
  if (p == nullptr) return at::empty({n}, opt);
  return at::from_blob(p, {n}, [size](void* q) { output_cache().give(q, size); }, opt);
}

int64_t empty_cache() { return int64_t(output_cache().clear()); }

Src src_of(const at::Tensor& x) { return {x.data_ptr(), x.stride(0)}; }

std::string fmt_value(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  std::ostringstream os;
  os << v;
  return os.str();
}

// Called only after a kernel flagged a non-finite value: find the first offending input (in the
// order given) and raise. Returns normally if every input is finite (an overflow of finite values).
void raise_nonfinite(const std::vector<std::pair<std::string, at::Tensor>>& named) {
  for (const auto& [name, x] : named) {
    at::Tensor bad = at::isfinite(x.reshape(-1)).logical_not();
    if (bad.any().item<bool>()) {
      const int64_t i = bad.nonzero().select(1, 0)[0].item<int64_t>();
      const double v = x.reshape(-1)[i].item<double>();
      TORCH_CHECK_VALUE(false, name, " contains a non-finite value (", fmt_value(v), ") at index ", i);
    }
  }
}

std::vector<std::pair<std::string, at::Tensor>> named_inputs(const at::Tensor* base, const char* base_name,
                                                             const std::vector<at::Tensor>& xs,
                                                             const char* name) {
  std::vector<std::pair<std::string, at::Tensor>> v;
  if (base) v.emplace_back(base_name, *base);
  for (size_t t = 0; t < xs.size(); ++t) v.emplace_back(std::string(name) + "[" + std::to_string(t) + "]", xs[t]);
  return v;
}

at::Tensor check_offsets(const at::Tensor& offsets, int64_t numel, const char* name) { return checked_offsets(offsets, numel, name); }

// Software prefetch in the streaming ops (average, task arithmetic, block_scale forward) helps on
// some processors and hurts on others (measured both ways on two AMD EPYC generations). Unless
// FASTMERGE_CPU_PREFETCH=on|off says, the first large calls alternate the two ways, and once each
// has run kTrials times the one with the lower best time per byte is kept for the process.
// Results never depend on it: prefetching only moves cache lines.
struct PrefetchTuner {
  static constexpr int64_t kMinBytes = int64_t(64) << 20;  // smaller calls are not timed
  static constexpr int kTrials = 3;
  std::mutex m;
  int forced = -1;  // 0 off, 1 on
  int chosen = -1;
  int runs[2] = {0, 0};
  double best[2] = {0, 0};  // seconds per byte
  PrefetchTuner() {
    const char* env = std::getenv("FASTMERGE_CPU_PREFETCH");
    const std::string v = env ? env : "";
    if (v == "on" || v == "1") forced = 1;
    if (v == "off" || v == "0") forced = 0;
  }
  int pick(int64_t bytes) {
    std::lock_guard<std::mutex> g(m);
    if (forced >= 0) return forced;
    if (chosen >= 0) return chosen;
    if (bytes < kMinBytes) return 0;
    return runs[1] < runs[0] ? 1 : 0;
  }
  void report(int mode, int64_t bytes, double secs) {
    std::lock_guard<std::mutex> g(m);
    if (forced >= 0 || chosen >= 0 || bytes < kMinBytes) return;
    const double r = secs / double(bytes);
    best[mode] = runs[mode] == 0 ? r : std::min(best[mode], r);
    if (++runs[mode] >= kTrials && runs[1 - mode] >= kTrials) chosen = best[1] < best[0] ? 1 : 0;
  }
};

PrefetchTuner& prefetch_tuner() {
  static PrefetchTuner t;
  return t;
}

// Runs a streaming kernel that reads and writes `bytes`, with the tuner's prefetch choice.
template <typename Args, typename Fn>
bool run_streaming(Args& a, int64_t bytes, Fn fn) {
  const int mode = prefetch_tuner().pick(bytes);
  a.prefetch = mode == 1;
  const auto t0 = std::chrono::steady_clock::now();
  const bool bad = fn(a);
  prefetch_tuner().report(mode, bytes, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return bad;
}

py::dict prefetch_state() {
  PrefetchTuner& t = prefetch_tuner();
  std::lock_guard<std::mutex> g(t.m);
  py::dict d;
  d["mode"] = t.forced == 1 ? "on" : t.forced == 0 ? "off" : "auto";
  d["chosen"] = t.forced >= 0 ? (t.forced ? "on" : "off") : t.chosen < 0 ? "tuning" : (t.chosen ? "on" : "off");
  d["runs_off"] = t.runs[0];
  d["runs_on"] = t.runs[1];
  d["best_ns_per_byte_off"] = t.best[0] * 1e9;
  d["best_ns_per_byte_on"] = t.best[1] * 1e9;
  return d;
}

at::Tensor uniform_average(const std::vector<at::Tensor>& thetas, const std::vector<double>& weights,
                           const std::optional<at::Tensor>& out_opt) {
  TORCH_CHECK_VALUE(!thetas.empty(), "thetas is empty: at least one task (T >= 1) is needed");
  const DT dt = dt_of(thetas[0], "thetas[0]");
  auto srcs = task_srcs(thetas[0], thetas, "thetas", "thetas[0]");
  TORCH_CHECK_VALUE(weights.size() == thetas.size(), "weights has ", weights.size(), " entries but there are ",
                    thetas.size(), " tasks");
  at::Tensor out = new_output(thetas[0].numel(), thetas[0].options(), out_opt);
  AvgArgs a{dt, int(thetas.size()), srcs.data(), weights.data(), out.numel(), out.data_ptr()};
  if (run_streaming(a, out.nbytes() * (a.T + 1), K().uniform_average))  // inputs read, output written
    raise_nonfinite(named_inputs(nullptr, "", thetas, "thetas"));
  return out;
}

at::Tensor task_arithmetic(const at::Tensor& base, const std::vector<at::Tensor>& thetas,
                           const std::vector<double>& lam, const std::optional<at::Tensor>& out_opt) {
  check_1d(base, "base");
  const DT dt = dt_of(base, "base");
  auto srcs = task_srcs(base, thetas, "thetas", "base");
  TORCH_CHECK_VALUE(lam.size() == thetas.size(), "lam has ", lam.size(), " entries but there are ", thetas.size(),
                    " tasks");
  at::Tensor out = new_output(base.numel(), base.options(), out_opt);
  TAArgs a{dt, int(thetas.size()), src_of(base), srcs.data(), lam.data(), out.numel(), out.data_ptr()};
  if (run_streaming(a, out.nbytes() * (a.T + 2), K().task_arithmetic))  // inputs read, output written
    raise_nonfinite(named_inputs(&base, "base", thetas, "thetas"));
  return out;
}

at::Tensor gram(const at::Tensor& base, const std::vector<at::Tensor>& thetas) {
  check_1d(base, "base");
  const DT dt = dt_of(base, "base");
  auto srcs = task_srcs(base, thetas, "thetas", "base");
  const int64_t T = int64_t(thetas.size());
  at::Tensor G = at::empty({T, T}, base.options().dtype(at::kDouble));
  GramArgs a{dt, int(T), src_of(base), srcs.data(), base.numel(), G.data_ptr<double>()};
  if (K().gram(a)) raise_nonfinite(named_inputs(&base, "base", thetas, "thetas"));
  return G;
}

std::vector<double> coef_vector(const at::Tensor& coefs, int64_t T, int64_t B) {
  TORCH_CHECK_VALUE(coefs.dim() == 2 && coefs.size(0) == T && coefs.size(1) == B, "coefs has shape ",
                    coefs.sizes(), "; expected [T, B] = [", T, ", ", B, "]");
  at::Tensor c = coefs.detach().to(at::kCPU, at::kDouble).contiguous();
  std::vector<double> v(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
  for (int64_t q = 0; q < int64_t(v.size()); ++q)
    TORCH_CHECK_VALUE(std::isfinite(v[q]), "coefs contains a non-finite value (", fmt_value(v[q]), ") at index ", q);
  return v;
}

at::Tensor block_scale(const at::Tensor& base, const std::vector<at::Tensor>& vectors, const at::Tensor& coefs,
                       const at::Tensor& offsets) {
  check_1d(base, "base");
  const DT dt = dt_of(base, "base");
  auto srcs = task_srcs(base, vectors, "vectors", "base");
  at::Tensor off = check_offsets(offsets, base.numel(), "blocks");
  const int64_t T = int64_t(vectors.size()), B = off.numel() - 1;
  std::vector<double> c = coef_vector(coefs, T, B);
  at::Tensor out = new_output(base.numel(), base.options());
  BlockArgs a{dt, int(T), src_of(base), srcs.data(), c.data(), off.data_ptr<int64_t>(), B, base.numel(),
              out.data_ptr()};
  if (run_streaming(a, out.nbytes() * (a.T + 2), K().block_scale_fwd))  // inputs read, output written
    raise_nonfinite(named_inputs(&base, "base", vectors, "vectors"));
  return out;
}

at::Tensor block_scale_backward(const at::Tensor& grad, const std::vector<at::Tensor>& vectors,
                                const at::Tensor& coefs, const at::Tensor& offsets) {
  check_1d(grad, "grad");
  const DT dt = dt_of(grad, "grad");
  auto srcs = task_srcs(grad, vectors, "vectors", "grad");
  at::Tensor off = check_offsets(offsets, grad.numel(), "blocks");
  const int64_t T = int64_t(vectors.size()), B = off.numel() - 1;
  at::Tensor gc = at::empty({T, B}, grad.options().dtype(at::kDouble));
  BlockArgs a{dt, int(T), src_of(grad), srcs.data(), nullptr, off.data_ptr<int64_t>(), B, grad.numel(),
              gc.data_ptr<double>()};
  if (K().block_scale_bwd(a)) raise_nonfinite(named_inputs(&grad, "grad", vectors, "vectors"));
  return gc;
}

at::Tensor merge_ties(const at::Tensor& base, const std::vector<at::Tensor>& thetas, double density, double lam,
                      int64_t mode, const at::Tensor& offsets, const std::optional<std::vector<double>>& weights,
                      int64_t strategy, int64_t cand_budget, int64_t hist_budget) {
  check_1d(base, "base");
  const DT dt = dt_of(base, "base");
  auto srcs = task_srcs(base, thetas, "thetas", "base");
  TORCH_CHECK_VALUE(density > 0.0 && density <= 1.0, "density must be in (0, 1], got ", density);
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "unknown merge mode ", mode);
  at::Tensor off = check_offsets(offsets, base.numel(), "layout");
  if (weights) {
    TORCH_CHECK_VALUE(weights->size() == thetas.size(), "weights has ", weights->size(),
                      " entries but there are ", thetas.size(), " tasks");
    for (size_t t = 0; t < weights->size(); ++t)
      TORCH_CHECK_VALUE((*weights)[t] > 0 && std::isfinite((*weights)[t]), "weights[", t, "] must be > 0, got ",
                        (*weights)[t]);
  }
  at::Tensor out = new_output(base.numel(), base.options());
  TiesArgs a{dt,
             int(thetas.size()),
             src_of(base),
             srcs.data(),
             weights ? weights->data() : nullptr,
             density,
             lam,
             int(mode),
             off.data_ptr<int64_t>(),
             off.numel() - 1,
             base.numel(),
             out.data_ptr(),
             int(strategy),
             cand_budget,
             hist_budget};
  TiesStats st;
  const bool bad = K().merge_ties(a, &st);
  last_ties_stats = st;
  if (bad) {
    raise_nonfinite(named_inputs(&base, "base", thetas, "thetas"));
    // Finite inputs whose weighted difference overflowed: the reference gives the same infinities.
    TORCH_CHECK_VALUE(false, "merge_ties: a task vector overflowed to infinity (finite inputs); "
                      "the merge is undefined there");
  }
  return out;
}

py::dict ties_last_stats() {
  const TiesStats& s = last_ties_stats;
  py::dict d;
  d["strategy"] = s.strategy;
  d["passes"] = s.passes;
  d["exact_problems"] = s.exact_problems;
  d["bracket_problems"] = s.bracket_problems;
  d["bracket_misses"] = s.bracket_misses;
  d["narrow_passes"] = s.narrow_passes;
  d["candidates"] = s.candidates;
  d["deferred"] = s.deferred;
  d["cancelled"] = s.cancelled;
  d["sampled"] = s.sampled;
  d["threshold_seconds"] = s.threshold_seconds;
  d["narrow_seconds"] = s.narrow_seconds;
  d["pass_seconds"] = s.pass_seconds;
  d["fixup_seconds"] = s.fixup_seconds;
  d["thresholds"] = s.thresholds;
  return d;
}

// STREAM-like probes of the memory bandwidth, threaded like the kernels: a read of every word
// (XOR-folded so nothing can be skipped) and a copy. The read takes each thread's range as
// `streams` equal parts in lockstep, a cache line of each in turn: one stream is the classic
// STREAM read, several interleaved streams are how the merge kernels read their T + 1 inputs (and
// on some processors they draw more bandwidth than one).
int64_t stream_read(const at::Tensor& x, int64_t streams) {
  TORCH_CHECK_VALUE(x.is_contiguous() && x.device().is_cpu(), "stream_read needs a contiguous CPU tensor");
  TORCH_CHECK_VALUE(streams >= 1 && streams <= 64, "stream_read: streams must be in [1, 64], got ", streams);
  const uint64_t* p = static_cast<const uint64_t*>(x.data_ptr());
  const int64_t n = int64_t(x.nbytes() / 8);
  std::atomic<uint64_t> folded{0};
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    uint64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int64_t len = (e - b) / streams / 8 * 8;  // words per stream, whole cache lines
    for (int64_t i = 0; i < len; i += 8)
      for (int64_t s = 0; s < streams; ++s) {
        const uint64_t* q = p + b + s * len + i;
        for (int l = 0; l < 8; ++l) acc[l] ^= q[l];
      }
    for (int64_t i = b + streams * len; i < e; ++i) acc[0] ^= p[i];
    uint64_t f = 0;
    for (int l = 0; l < 8; ++l) f ^= acc[l];
    folded ^= f;
  });
  return int64_t(folded.load());
}

void stream_copy(at::Tensor& dst, const at::Tensor& src) {
  TORCH_CHECK_VALUE(dst.is_contiguous() && src.is_contiguous() && dst.nbytes() == src.nbytes(),
                    "stream_copy needs two contiguous CPU tensors of equal size");
  char* d = static_cast<char*>(dst.data_ptr());
  const char* s = static_cast<const char*>(src.data_ptr());
  at::parallel_for(0, int64_t(src.nbytes()), 1 << 20,
                   [&](int64_t b, int64_t e) { std::memcpy(d + b, s + b, size_t(e - b)); });
}

std::string capability() { return K().name; }

void set_capability(const std::string& name) {
  const Kernels* k = pick(name);
  TORCH_CHECK_VALUE(k != nullptr, "CPU capability ", name, " is not one of DEFAULT, AVX2, AVX512 supported here");
  active() = k;
}

std::vector<std::string> capabilities() {
  std::vector<std::string> v;
  for (const char* c : {"DEFAULT", "AVX2", "AVX512"})
    if (pick(c)) v.emplace_back(c);
  return v;
}

}  // namespace

const CkptKernels& ckpt_kernels() { return *K().ckpt; }

void* scratch_take(size_t bytes) {
  void* p = cached_block((bytes + kHuge - 1) / kHuge * kHuge, false);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

void scratch_give(void* p, size_t bytes) { output_cache().give(p, (bytes + kHuge - 1) / kHuge * kHuge); }

}  // namespace cpu
}  // namespace fastmerge

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace C = fastmerge::cpu;
  m.doc() = "fastmerge fused CPU kernels (see fastmerge/_ops.py for the public ops)";
  m.def("uniform_average", &C::uniform_average, py::arg("thetas"), py::arg("weights"), py::arg("out") = py::none());
  m.def("task_arithmetic", &C::task_arithmetic, py::arg("base"), py::arg("thetas"), py::arg("lam"),
        py::arg("out") = py::none());
  m.def("gram", &C::gram, py::arg("base"), py::arg("thetas"));
  m.def("block_scale", &C::block_scale, py::arg("base"), py::arg("vectors"), py::arg("coefs"), py::arg("offsets"));
  m.def("block_scale_backward", &C::block_scale_backward, py::arg("grad"), py::arg("vectors"), py::arg("coefs"),
        py::arg("offsets"));
  m.def("merge_ties", &C::merge_ties, py::arg("base"), py::arg("thetas"), py::arg("density"), py::arg("lam"),
        py::arg("mode"), py::arg("offsets"), py::arg("weights"), py::arg("strategy") = 0,
        py::arg("cand_budget") = 0, py::arg("hist_budget") = 0);
  m.def("ckpt_merge", &C::ckpt_merge, py::arg("base"), py::arg("thetas"), py::arg("weights"), py::arg("rules"),
        py::arg("streams"), py::arg("keep_prob"), py::arg("scale"), py::arg("consensus"), py::arg("normalize"),
        py::arg("lam"), py::arg("guard_small_divisor"), py::arg("out_dtype"), py::arg("offset") = 0,
        py::arg("out") = py::none(), py::arg("index") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("ckpt_merge_deferred", &C::ckpt_merge_deferred, py::arg("base"), py::arg("thetas"), py::arg("weights"),
        py::arg("rules"), py::arg("streams"), py::arg("keep_prob"), py::arg("scale"), py::arg("consensus"),
        py::arg("normalize"), py::arg("lam"), py::arg("guard_small_divisor"), py::arg("out_dtype"), py::arg("offset"),
        py::arg("out"), py::arg("index"), py::arg("defer_bins"),
        py::call_guard<py::gil_scoped_release>());
  m.def("ckpt_merge_at", &C::ckpt_merge_at, py::arg("base"), py::arg("thetas"), py::arg("weights"), py::arg("rules"),
        py::arg("streams"), py::arg("keep_prob"), py::arg("scale"), py::arg("consensus"), py::arg("normalize"),
        py::arg("lam"), py::arg("guard_small_divisor"), py::arg("out"), py::arg("index"),
        py::call_guard<py::gil_scoped_release>());
  m.def("ckpt_abs_sums", &C::ckpt_abs_sums, py::arg("base"), py::arg("thetas"), py::arg("rules"), py::arg("streams"),
        py::arg("keep_prob"), py::arg("offset") = 0,
        py::call_guard<py::gil_scoped_release>());
  m.def("ckpt_key_hist", &C::ckpt_key_hist, py::arg("base"), py::arg("thetas"), py::arg("prefix"),
        py::arg("offset") = 0, py::arg("record") = false,
        py::call_guard<py::gil_scoped_release>());
  m.def("ckpt_key_bracket", &C::ckpt_key_bracket, py::arg("base"), py::arg("thetas"), py::arg("models"),
        py::arg("ranks"), py::arg("margin"), py::arg("record_limit"), py::arg("row") = 0,
        py::call_guard<py::gil_scoped_release>());
  m.def("ckpt_random_bits", &C::ckpt_random_bits, py::arg("key"), py::arg("start"), py::arg("n"),
        py::call_guard<py::gil_scoped_release>());
  m.def("ckpt_crc32c", &C::ckpt_crc32c, py::arg("bytes"), py::arg("crc") = 0, py::call_guard<py::gil_scoped_release>(),
        "CRC-32C of a uint8 tensor, chained from crc (releases the GIL)");
  m.def("empty_cache", &C::empty_cache, "Free the cached output blocks; returns the bytes freed");
  m.def("ties_last_stats", &C::ties_last_stats, "Diagnostics of the last merge_ties call on this thread");
  m.def("stream_read", &C::stream_read, "Read every byte of a buffer as `streams` interleaved streams per thread (bandwidth probe)",
        py::arg("x"), py::arg("streams") = 1);
  m.def("stream_copy", &C::stream_copy, "Copy src into dst (bandwidth probe)");
  m.def("prefetch_state", &C::prefetch_state, "Software-prefetch choice of the streaming ops and its timings");
  m.def("cpu_capability", &C::capability, "Instruction set of the kernels in use");
  m.def("set_cpu_capability", &C::set_capability, "Switch the kernels' instruction set (DEFAULT, AVX2, AVX512)");
  m.def("cpu_capabilities", &C::capabilities, "Instruction sets this CPU can run");
}
