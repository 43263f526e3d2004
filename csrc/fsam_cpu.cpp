// Fused F-SAM passes for CPU tensors: the C++ twin of kernels/fsam.py.
//
// Three passes per step over a whole list of parameter tensors (see SEMANTICS.md):
//   norm_sq   direction d and the sum of (a * d)^2, writing nothing
//   perturb_  EMA update, then per tensor either
//               swap = 0: exact copy of w into `saved`, w <- w + e      (addresses stay), or
//               swap = 1: saved <- w + e, w untouched (the caller swaps the two storages:
//                         the double buffer, a third fewer bytes; bench/cpu_backend.py)
//   restore_  w <- saved (the exact-copy tensors; swapped ones are swapped back by the caller)
//   ema_      the EMA update alone: the cheap step of a perturbation schedule
//
// Arithmetic is float32 whatever the storage (float32, bfloat16, float16), rounded once on
// store, in the same operation order as the reference backend, so float32 results match it
// bit for bit except for the norm's summation order. The norm is deterministic and
// independent of the thread count: the element range is cut into fixed-size chunks whatever
// the number of threads, each chunk is summed by one thread in a fixed lane order, and the
// per-chunk partials are added in chunk order in double precision.
//
// Nothing here imports or knows about the Python front-end.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>
#include <torch/extension.h>  // pybind11 and its tensor casters: the direct bindings below
#include <torch/library.h>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#define FSAM_STREAM 1
#else
#define FSAM_STREAM 0
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

namespace fsam_cpu {
namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = fVec::size();
// One iteration handles two float vectors: a whole Vectorized<BFloat16 / Half>.
constexpr int64_t kStep = 2 * kLanes;
// Elements per work unit. Fixed (not derived from the thread count) so the norm's partial
// sums, and hence its rounding, are the same on any machine; large enough that the per-chunk
// overhead is noise, small enough that 2,000 tiny tensors and one huge one both balance.
constexpr int64_t kChunk = 1 << 15;

// Software prefetch this many elements ahead on every input stream of a pass (2 KB of
// float32). The hardware prefetcher alone leaves bandwidth unused with three or four streams
// per core: measured interleaved in one process on the 2-core Xeon, the double-buffered
// ResNet-18 step went 9.3 -> 8.3 ms (256, 1024 and 2048 elements gave the same 7-11%).
// The address is clamped to the tensor's last element (a pointer past it is not valid C++).
constexpr int64_t kPrefetch = 512;
#if defined(__GNUC__) || defined(__clang__)
#define FSAM_PREFETCH(p) __builtin_prefetch(p)
#else
#define FSAM_PREFETCH(p) ((void)0)
#endif

template <typename T>
inline void load2(const T* p, fVec& a, fVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = fVec::loadu(p);
    b = fVec::loadu(p + kLanes);
  } else {
    at::vec::load_to_float<T>(p, a, b);
  }
}

template <typename T>
inline void store2(T* p, const fVec& a, const fVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(p);
    b.store(p + kLanes);
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

// Stores of data that is not read again in this pass: the saved copy (read only at restore,
// after the second forward and backward), the spare buffer and the restored weights. A
// non-temporal store skips the read-for-ownership a normal store of an uncached line costs
// (write-allocate), which is a sixth to a third of a pass's traffic. Measured on the 2-core
// Xeon, interleaved in one process: the double-buffered perturb 7.9 -> 4.6 ms, the exact-copy
// step 12.1 -> 9.9 ms on the ResNet-18 list. Call fence() before the parallel region ends.
template <typename T>
inline void stream2(T* p, const fVec& a, const fVec& b) {
#if FSAM_STREAM
  if (reinterpret_cast<uintptr_t>(p) % 32 == 0) {
    if constexpr (std::is_same_v<T, float>) {
      _mm256_stream_ps(p, a);
      _mm256_stream_ps(p + kLanes, b);
    } else {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), at::vec::convert_from_float<T>(a, b));
    }
    return;
  }
#endif
  store2(p, a, b);
}

// An exact copy of kStep elements (their bits, not a round trip through float).
template <typename T>
inline void stream_copy(T* dst, const T* src) {
  constexpr int64_t kBytes = kStep * sizeof(T);
#if FSAM_STREAM
  if (reinterpret_cast<uintptr_t>(dst) % 32 == 0) {
    for (int64_t b = 0; b < kBytes; b += 32) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
          reinterpret_cast<const char*>(src) + b));
      _mm256_stream_si256(reinterpret_cast<__m256i*>(reinterpret_cast<char*>(dst) + b), v);
    }
    return;
  }
#endif
  std::memcpy(dst, src, kBytes);
}

// Non-temporal stores are weakly ordered: make them visible before another thread (or the
// caller, after the parallel region) reads the memory.
inline void fence() {
#if FSAM_STREAM
  _mm_sfence();
#endif
}

// Per-tensor settings, gathered once per call.
struct Spec {
  int64_t numel;
  void* w;
  const void* g;
  void* m;      // nullptr when sigma == 0 (no EMA)
  void* out;    // the saved copy, or w + e when swap
  float rho;
  bool adaptive;
  bool swap;
  float decay;  // m_new = m * decay + g * gain; (0, 1) on the official first sight
  float gain;
};

struct Chunk {
  int64_t spec;
  int64_t begin;
  int64_t end;
};

std::vector<Chunk> chunk_table(const std::vector<Spec>& specs) {
  std::vector<Chunk> chunks;
  for (const auto i : c10::irange(static_cast<int64_t>(specs.size()))) {
    for (int64_t b = 0; b < specs[i].numel; b += kChunk) {
      chunks.push_back({i, b, std::min(b + kChunk, specs[i].numel)});
    }
  }
  return chunks;
}

// Below this much work a pass runs on the calling thread: no fork-join. Work is counted as
// elements plus kItemCost per item (chunk or copy span): a pass over many tiny tensors costs
// per tensor, not only per element. Opening a parallel region costs microseconds on an idle
// machine, but when another process holds the second core the join waits for a scheduler
// time slice: a step of 62 tensors of 7 elements took 119-164 ms with 2 threads against
// 0.4 ms with one, and one norm pass over 2,000 tensors of 32 elements 15.9 ms against
// 0.8 ms. Measured on the 2-core EPYC (loaded by other jobs, 1 vs 2 threads, medians of 3x200
// calls), one float32 tensor: norm 13.4 vs 10.8 us at 64 Ki elements, 23.7 vs 14.9 us at
// 128 Ki, 40.9 vs 25.4 us at 256 Ki; perturb 20.9 vs 18.1, 38.2 vs 28.9, 64.0 vs 49.5 us.
// Two threads save at most ~15-25 us below 256 Ki elements and risk a whole time slice, so
// that is the line: a pass of under ~50 us of single-thread work runs serially. With 64 per
// tensor, the benchmark's 2,000 tiny tensors (65 k elements) run serially: on the loaded
// machine their step went from 42.7 ms (2 threads, a parallel region per pass) to ~1-2 ms.
constexpr int64_t kItemCost = 64;
constexpr int64_t kSerialWork = int64_t{1} << 18;

// Runs f(lo, hi) on contiguous runs of items [lo, hi), one run per thread, cut where the
// running total of `sizes` crosses an equal share. at::parallel_for would split by item
// count, and the chunk tables mix full chunks with the short tails of small tensors: on the
// ResNet-18 list one thread got 5.1 M elements and the other 6.1 M (balanced, the step's
// median went 8.15 -> 7.66, 7.10 -> 6.85 and 8.76 -> 8.44 ms in three interleaved runs).
// Which thread takes an item never changes what is computed for it, so results stay
// thread-count independent. `unit`: elements per size unit (1, or 1/element size for bytes).
template <typename F>
void balanced_for(const std::vector<int64_t>& sizes, int64_t unit_div, const F& f) {
  const int64_t n = static_cast<int64_t>(sizes.size());
  int64_t total = 0;
  for (const int64_t v : sizes) total += v;
  if (n == 0) return;
  if (total / unit_div + n * kItemCost < kSerialWork || at::get_num_threads() < 2 ||
      at::in_parallel_region()) {
    f(0, n);  // small: the calling thread, no parallel region
    return;
  }
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  std::vector<int64_t> cut(parts + 1, n);
  cut[0] = 0;
  int64_t run = 0, k = 1;
  for (int64_t i = 0; i < n && k < parts; ++i) {
    run += sizes[i];
    while (k < parts && run * parts >= total * k) cut[k++] = i + 1;
  }
  at::parallel_for(0, parts, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      if (cut[t] < cut[t + 1]) f(cut[t], cut[t + 1]);
    }
  });
}

std::vector<int64_t> chunk_sizes(const std::vector<Chunk>& chunks) {
  std::vector<int64_t> sizes;
  sizes.reserve(chunks.size());
  for (const Chunk& c : chunks) sizes.push_back(c.end - c.begin);
  return sizes;
}

// A pass's work units and their sizes: built per call by the ops, once per plan by Bound.
struct Table {
  std::vector<Chunk> chunks;
  std::vector<int64_t> sizes;
  explicit Table(const std::vector<Spec>& specs)
      : chunks(chunk_table(specs)), sizes(chunk_sizes(chunks)) {}
};

// ------------------------------------------------------------------ argument checks

void check_list(const char* what, at::TensorList ts, at::TensorList weights,
                const char* ref = "weights") {
  TORCH_CHECK(ts.size() == weights.size(), "fsam_fused: ", what, " has ", ts.size(),
              " tensors, ", ref, " has ", weights.size());
  for (const auto i : c10::irange(ts.size())) {
    const auto& t = ts[i];
    const auto& w = weights[i];
    TORCH_CHECK(t.device().is_cpu(), "fsam_fused: ", what, "[", i, "] is on ", t.device(),
                "; these kernels take CPU tensors");
    TORCH_CHECK(t.sizes() == w.sizes() && t.strides() == w.strides(), "fsam_fused: ", what,
                "[", i, "] has sizes ", t.sizes(), " and strides ", t.strides(),
                "; ", ref, "[", i, "] has ", w.sizes(), " and ", w.strides());
    TORCH_CHECK(t.is_non_overlapping_and_dense(), "fsam_fused: ", what, "[", i,
                "] must be dense (contiguous or channels_last)");
  }
}

void check_same_dtype(const char* what, at::TensorList ts) {
  for (const auto i : c10::irange(ts.size())) {
    TORCH_CHECK(ts[i].scalar_type() == ts[0].scalar_type(), "fsam_fused: ", what, "[", i,
                "] is ", ts[i].scalar_type(), ", ", what, "[0] is ", ts[0].scalar_type(),
                "; one call takes one dtype");
  }
}

void check_float_type(const char* what, at::ScalarType t) {
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, "fsam_fused: ", what,
              " must be float32, bfloat16 or float16, got ", t);
}

template <typename V>
void check_len(const char* what, const V& v, size_t n) {
  TORCH_CHECK(v.size() == n, "fsam_fused: ", what, " has ", v.size(), " entries for ", n,
              " tensors");
}

// The per-step values arrive as float32 tensors, not float arguments, so a compiled graph
// never specialises on them (values apart from structure): `rows` [n, 4] holds per tensor
// (rho, adaptive 0/1, EMA decay, EMA gain), `scalars` [2] holds (sigma, eps). They are read
// as float32, exactly the values the float arguments were cast to before. Checked every call,
// before any write: O(n) reads of one contiguous array.
constexpr int64_t kRho = 0, kAdaptive = 1, kDecay = 2, kGain = 3, kCols = 4;

void check_value_tensor(const char* what, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "fsam_fused: ", what, " must be a contiguous float32 CPU tensor, got ",
              t.scalar_type(), " ", t.sizes(), " on ", t.device());
  TORCH_CHECK(!t.requires_grad(), "fsam_fused: ", what, " must not require grad");
}

// The rows of n tensors, checked: every entry finite, rho >= 0, adaptive 0 or 1.
const float* checked_rows(const at::Tensor& rows, int64_t n) {
  check_value_tensor("rows", rows);
  TORCH_CHECK(rows.dim() == 2 && rows.size(0) == n && rows.size(1) == kCols,
              "fsam_fused: rows must have shape [", n, ", 4] (rho, adaptive, decay, gain per "
              "tensor), got ", rows.sizes());
  const float* r = rows.data_ptr<float>();
  static const char* const kName[kCols] = {"rho", "adaptive", "decay", "gain"};
  for (const auto i : c10::irange(n)) {
    for (const auto c : c10::irange(kCols)) {
      const float v = r[i * kCols + c];
      TORCH_CHECK(std::isfinite(v), "fsam_fused: ", kName[c], "[", i,
                  "] must be finite (in float32)", c == kRho ? " and >= 0" : "", ", got ", v,
                  " (rows[", i, ", ", c, "])");
    }
    TORCH_CHECK(r[i * kCols + kRho] >= 0.0f, "fsam_fused: rho[", i,
                "] must be finite (in float32) and >= 0, got ", r[i * kCols + kRho], " (rows[",
                i, ", 0])");
    const float a = r[i * kCols + kAdaptive];
    TORCH_CHECK(a == 0.0f || a == 1.0f, "fsam_fused: adaptive[", i, "] must be 0 or 1, got ", a,
                " (rows[", i, ", 1])");
  }
  return r;
}

// (sigma, eps), checked finite; eps > 0 is the perturb pass's own check.
std::pair<float, float> checked_scalars(const at::Tensor& scalars) {
  check_value_tensor("scalars", scalars);
  TORCH_CHECK(scalars.dim() == 1 && scalars.numel() == 2,
              "fsam_fused: scalars must have shape [2] (sigma, eps), got ", scalars.sizes());
  const float* p = scalars.data_ptr<float>();
  TORCH_CHECK(std::isfinite(p[0]), "fsam_fused: sigma must be finite (in float32), got ", p[0],
              " (scalars[0])");
  TORCH_CHECK(std::isfinite(p[1]), "fsam_fused: eps must be finite (in float32), got ", p[1],
              " (scalars[1])");
  return {p[0], p[1]};
}

// The tensors an op writes must not be written behind autograd's back.
void check_no_grad(const char* what, at::TensorList ts) {
  for (const auto i : c10::irange(ts.size())) {
    TORCH_CHECK(!ts[i].requires_grad(), "fsam_fused: ", what, "[", i,
                "] requires grad; the op writes it in place behind autograd's back (pass "
                "p.detach(), which shares the memory)");
  }
}

// One tensor argument of an op, for the overlap check.
struct Arg {
  const char* name;
  at::TensorList ts;
  bool written;
};

// Every tensor an op writes must not share a byte with any other tensor argument of the
// call (another written one, or one it reads: the kernels read and write in chunks, in
// parallel, with streaming stores, so any overlap gives an order-dependent result). Tensors
// that are only read may overlap each other. Each tensor is its byte range
// [data_ptr, data_ptr + span), the span covering every element (numel * element size for a
// dense tensor); the ranges are sorted by start and swept once: O(n log n).
// `args` lists the written ones first.
void check_no_overlap(std::initializer_list<Arg> args) {
  struct Range {
    uintptr_t begin;
    uintptr_t end;
    uint32_t arg;
    uint32_t index;
  };
  size_t total = 0;
  for (const Arg& a : args) total += a.ts.size();
  std::vector<Range> ranges;
  ranges.reserve(total);
  bool any_written = false;
  uint32_t ai = 0;
  for (const Arg& a : args) {
    for (const auto i : c10::irange(a.ts.size())) {
      const at::Tensor& t = a.ts[i];
      if (t.numel() == 0) continue;
      // Elements from the first to one past the last: numel when dense (all but sq here).
      int64_t span = t.numel();
      if (!t.is_non_overlapping_and_dense()) {
        span = 1;
        for (const auto d : c10::irange(t.dim())) {
          span += (t.size(d) - 1) * std::abs(t.stride(d));
        }
      }
      const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
      ranges.push_back({begin, begin + static_cast<uintptr_t>(span * t.element_size()), ai,
                        static_cast<uint32_t>(i)});
    }
    any_written = any_written || (a.written && !a.ts.empty());
    ++ai;
  }
  if (!any_written || ranges.size() < 2) return;
  // stable_sort (a merge sort): the allocator hands most lists out in nearly ascending
  // address order, which it sorts 2-3x faster than std::sort (8,000 ranges: ~50 us vs
  // ~130 us measured standalone).
  std::stable_sort(ranges.begin(), ranges.end(),
                   [](const Range& x, const Range& y) { return x.begin < y.begin; });
  const Arg* list = args.begin();
  // The range reaching furthest so far, and the written one reaching furthest. A range
  // overlaps an earlier one iff it starts before that one's end; a written range conflicts
  // with any earlier one, a read-only range only with an earlier written one.
  const Range* far = nullptr;
  const Range* far_written = nullptr;
  for (const Range& r : ranges) {
    const bool written = list[r.arg].written;
    const Range* hit = written ? far : far_written;
    if (hit != nullptr && hit->end > r.begin) {
      // Named in argument order (the written lists come first), whatever the addresses.
      const bool first = std::make_pair(hit->arg, hit->index) < std::make_pair(r.arg, r.index);
      const Range& a = first ? *hit : r;
      const Range& b = first ? r : *hit;
      TORCH_CHECK(false, "fsam_fused: ", list[a.arg].name, "[", a.index, "] overlaps ",
                  list[b.arg].name, "[", b.index, "] in memory; a tensor the op writes must "
                  "not share memory with any other tensor argument");
    }
    if (far == nullptr || r.end > far->end) far = &r;
    if (written && (far_written == nullptr || r.end > far_written->end)) far_written = &r;
  }
}

// Checks the lists, then gathers one Spec per tensor. `outs` may be empty (norm_sq).
std::vector<Spec> gather(at::TensorList weights, at::TensorList grads, at::TensorList emas,
                         at::TensorList outs, const char* out_name, const at::Tensor& rows,
                         at::IntArrayRef swap, const char* w_name = "weights") {
  const size_t n = weights.size();
  check_list(w_name, weights, weights, w_name);
  check_list("grads", grads, weights, w_name);
  check_same_dtype(w_name, weights);
  check_same_dtype("grads", grads);
  if (n > 0) {
    check_float_type(w_name, weights[0].scalar_type());
    TORCH_CHECK(grads[0].scalar_type() == weights[0].scalar_type(),
                "fsam_fused: grads must have the weights' dtype ", weights[0].scalar_type(),
                ", got ", grads[0].scalar_type());
  }
  if (!emas.empty()) {
    check_list("emas", emas, weights, w_name);
    check_same_dtype("emas", emas);
    check_float_type("emas", emas[0].scalar_type());
  }
  if (out_name != nullptr) {
    check_list(out_name, outs, weights);
    check_same_dtype(out_name, outs);
    if (n > 0) {
      TORCH_CHECK(outs[0].scalar_type() == weights[0].scalar_type(), "fsam_fused: ", out_name,
                  " must have the weights' dtype ", weights[0].scalar_type(), ", got ",
                  outs[0].scalar_type());
    }
  }
  if (out_name != nullptr) check_len("swap", swap, n);
  const float* r = checked_rows(rows, static_cast<int64_t>(n));

  std::vector<Spec> specs(n);
  for (const auto i : c10::irange(n)) {
    specs[i] = Spec{weights[i].numel(),
                    weights[i].data_ptr(),
                    grads[i].data_ptr(),
                    emas.empty() ? nullptr : emas[i].data_ptr(),
                    out_name != nullptr ? outs[i].data_ptr() : nullptr,
                    r[i * kCols + kRho],
                    r[i * kCols + kAdaptive] != 0.0f,
                    !swap.empty() && swap[i] != 0,
                    r[i * kCols + kDecay],
                    r[i * kCols + kGain]};
  }
  return specs;
}

// ------------------------------------------------------------------ the element math

// Direction and updated EMA of one element, in the reference's operation order.
struct Direction {
  float sigma;
  bool paper;
  bool has_ema;

  template <typename V>
  static inline V ema(const V& g, const V& m, const V& decay, const V& gain) {
    return m * decay + g * gain;
  }

  // d, given this element's EMA before (m) and after (m_new) the update.
  template <typename V>
  inline V operator()(const V& g, const V& m, const V& m_new, const V& sig) const {
    if (!has_ema) return g;
    // paper (Algorithm 1): the updated EMA; official: the EMA from before this step.
    return g - (paper ? m_new : m) * sig;
  }

  // d alone (the norm pass): the official order needs no EMA update at all.
  template <typename V>
  inline V operator()(const V& g, const V& m, const V& decay, const V& gain,
                      const V& sig) const {
    if (!has_ema) return g;
    return (*this)(g, m, paper ? ema(g, m, decay, gain) : m, sig);
  }
};

// `unscale`: every gradient is multiplied by `inv` (a GradScaler's 1/scale) right after its
// load, as the reference does; without it the arithmetic is the unscaled one, untouched.
template <typename W, typename M, bool kGradSq = false>
std::pair<double, double> norm_sq_impl(const std::vector<Spec>& specs, const Table& table,
                                       const Direction& dir, bool unscale, float inv) {
  // kGradSq: also sum (inv * g)^2, in the same order as a pass without EMA and |w| would (the
  // cheap step's first pass): bit for bit the statistic that pass gives, without its read.
  const auto& chunks = table.chunks;
  std::vector<double> partial(chunks.size(), 0.0), partial_g(kGradSq ? chunks.size() : 0, 0.0);
  balanced_for(table.sizes, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      const Spec& s = specs[ch.spec];
      const W* w = static_cast<const W*>(s.w);
      const W* g = static_cast<const W*>(s.g);
      const M* m = static_cast<const M*>(s.m);
      const fVec vdecay(s.decay), vgain(s.gain), vsig(dir.sigma), vinv(inv);
      fVec acc0(0.0f), acc1(0.0f), q0(0.0f), q1(0.0f);
      int64_t i = ch.begin;
      for (; i + kStep <= ch.end; i += kStep) {
        fVec g0, g1, m0(0.0f), m1(0.0f);
        const int64_t pf = std::min(i + kPrefetch, s.numel - 1);
        FSAM_PREFETCH(g + pf);
        if (dir.has_ema) FSAM_PREFETCH(m + pf);
        if (s.adaptive) FSAM_PREFETCH(w + pf);
        load2(g + i, g0, g1);
        if (unscale) {
          g0 = g0 * vinv;
          g1 = g1 * vinv;
        }
        if constexpr (kGradSq) {
          q0 = q0 + g0 * g0;
          q1 = q1 + g1 * g1;
        }
        if (dir.has_ema) load2(m + i, m0, m1);
        fVec d0 = dir(g0, m0, vdecay, vgain, vsig);
        fVec d1 = dir(g1, m1, vdecay, vgain, vsig);
        if (s.adaptive) {
          fVec w0, w1;
          load2(w + i, w0, w1);
          d0 = w0.abs() * d0;
          d1 = w1.abs() * d1;
        }
        acc0 = acc0 + d0 * d0;
        acc1 = acc1 + d1 * d1;
      }
      float lanes[2 * kLanes];
      acc0.store(lanes);
      acc1.store(lanes + kLanes);
      float tail = 0.0f, tail_g = 0.0f;
      for (; i < ch.end; ++i) {
        const float gi = unscale ? static_cast<float>(g[i]) * inv : static_cast<float>(g[i]);
        const float mi = dir.has_ema ? static_cast<float>(m[i]) : 0.0f;
        float d = dir(gi, mi, s.decay, s.gain, dir.sigma);
        if (s.adaptive) d = std::abs(static_cast<float>(w[i])) * d;
        tail += d * d;
        if constexpr (kGradSq) tail_g += gi * gi;
      }
      double sum = 0.0;
      for (const auto l : c10::irange(2 * kLanes)) sum += lanes[l];
      partial[c] = sum + tail;
      if constexpr (kGradSq) {
        q0.store(lanes);
        q1.store(lanes + kLanes);
        double sum_g = 0.0;
        for (const auto l : c10::irange(2 * kLanes)) sum_g += lanes[l];
        partial_g[c] = sum_g + tail_g;
      }
    }
  });
  double total = 0.0, total_g = 0.0;
  for (const double p : partial) total += p;  // chunk order: thread-count independent
  for (const double p : partial_g) total_g += p;
  return {total, total_g};
}

// Per tensor: swap writes w + e into s.out and leaves w; otherwise s.out gets the exact copy
// and w gets w + e. The branch is per chunk and per element step, on a flag that is the same
// for a whole chunk: it costs nothing measurable against the memory traffic.
template <typename W, typename M>
void perturb_impl(const std::vector<Spec>& specs, const Table& table, const Direction& dir,
                  float norm_eps, bool unscale, float inv) {
  const auto& chunks = table.chunks;
  balanced_for(table.sizes, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      const Spec& s = specs[ch.spec];
      W* w = static_cast<W*>(s.w);
      const W* g = static_cast<const W*>(s.g);
      M* m = static_cast<M*>(s.m);
      W* out = static_cast<W*>(s.out);
      // The reference's scale: rho / (N + eps), in float32.
      const float scale = s.rho / norm_eps;
      const fVec vdecay(s.decay), vgain(s.gain), vsig(dir.sigma), vscale(scale), vinv(inv);
      int64_t i = ch.begin;
      for (; i + kStep <= ch.end; i += kStep) {
        fVec g0, g1, m0(0.0f), m1(0.0f), w0, w1;
        const int64_t pf = std::min(i + kPrefetch, s.numel - 1);
        FSAM_PREFETCH(g + pf);
        FSAM_PREFETCH(w + pf);
        if (dir.has_ema) FSAM_PREFETCH(m + pf);
        load2(g + i, g0, g1);
        if (unscale) {
          g0 = g0 * vinv;
          g1 = g1 * vinv;
        }
        if (dir.has_ema) load2(m + i, m0, m1);
        load2(w + i, w0, w1);
        const fVec n0 = Direction::ema(g0, m0, vdecay, vgain);
        const fVec n1 = Direction::ema(g1, m1, vdecay, vgain);
        const fVec d0 = dir(g0, m0, n0, vsig);
        const fVec d1 = dir(g1, m1, n1, vsig);
        if (dir.has_ema) store2(m + i, n0, n1);
        // e = (scale * a^2) * d, as the reference computes it (a^2 = 1 when not adaptive).
        const fVec e0 = (s.adaptive ? vscale * (w0 * w0) : vscale) * d0;
        const fVec e1 = (s.adaptive ? vscale * (w1 * w1) : vscale) * d1;
        if (s.swap) {
          stream2(out + i, w0 + e0, w1 + e1);
        } else {
          stream_copy(out + i, w + i);
          store2(w + i, w0 + e0, w1 + e1);
        }
      }
      for (; i < ch.end; ++i) {
        const float gi = unscale ? static_cast<float>(g[i]) * inv : static_cast<float>(g[i]);
        const float mi = dir.has_ema ? static_cast<float>(m[i]) : 0.0f;
        const float wi = static_cast<float>(w[i]);
        const float ni = Direction::ema(gi, mi, s.decay, s.gain);
        const float d = dir(gi, mi, ni, dir.sigma);
        if (dir.has_ema) m[i] = static_cast<M>(ni);
        const float e = (s.adaptive ? scale * (wi * wi) : scale) * d;
        if (s.swap) {
          out[i] = static_cast<W>(wi + e);
        } else {
          out[i] = w[i];
          w[i] = static_cast<W>(wi + e);
        }
      }
    }
    fence();
  });
}

// The cheap step's EMA pass (a step a perturbation schedule does not perturb):
// m <- m * decay + g * gain, in the reference's operation order, nothing else written.
template <typename W, typename M>
void ema_impl(const std::vector<Spec>& specs, const Table& table, bool unscale, float inv) {
  const auto& chunks = table.chunks;
  balanced_for(table.sizes, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      const Spec& s = specs[ch.spec];
      const W* g = static_cast<const W*>(s.g);
      M* m = static_cast<M*>(s.m);
      const fVec vdecay(s.decay), vgain(s.gain), vinv(inv);
      int64_t i = ch.begin;
      for (; i + kStep <= ch.end; i += kStep) {
        fVec g0, g1, m0, m1;
        const int64_t pf = std::min(i + kPrefetch, s.numel - 1);
        FSAM_PREFETCH(g + pf);
        FSAM_PREFETCH(m + pf);
        load2(g + i, g0, g1);
        if (unscale) {
          g0 = g0 * vinv;
          g1 = g1 * vinv;
        }
        load2(m + i, m0, m1);
        store2(m + i, Direction::ema(g0, m0, vdecay, vgain), Direction::ema(g1, m1, vdecay, vgain));
      }
      for (; i < ch.end; ++i) {
        const float gi = unscale ? static_cast<float>(g[i]) * inv : static_cast<float>(g[i]);
        m[i] = static_cast<M>(Direction::ema(gi, static_cast<float>(m[i]), s.decay, s.gain));
      }
    }
  });
}

// Dispatch on (weight dtype, EMA dtype); the EMA dtype is the weights' when there is none.
template <typename F>
void dispatch(at::ScalarType wt, at::ScalarType mt, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, wt, "fsam_fused_w", [&] {
    using W = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mt, "fsam_fused_m", [&] {
      using M = scalar_t;
      if constexpr (!std::is_same_v<W, double> && !std::is_same_v<M, double>) {
        f(W{}, M{});
      } else {
        TORCH_CHECK(false, "fsam_fused: float64 is not supported by the CPU kernels");
      }
    });
  });
}

at::ScalarType ema_type(at::TensorList weights, at::TensorList emas) {
  if (!emas.empty()) return emas[0].scalar_type();
  return weights.empty() ? at::kFloat : weights[0].scalar_type();
}

// A non-finite global norm (a non-finite gradient): the weights and the EMA keep their bits
// and every tensor's `saved` gets an exact copy of w, for either kind (swap or not), so the
// caller's restore is the identity.
void save_only(const std::vector<Spec>& specs, size_t elem) {
  for (const Spec& s : specs) std::memcpy(s.out, s.w, s.numel * elem);
}

// The optional 1/scale: a 1-element float32 CPU tensor.
float inv_scale_of(const c10::optional<at::Tensor>& inv) {
  if (!inv.has_value()) return 1.0f;
  const at::Tensor& t = *inv;
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.numel() == 1,
              "fsam_fused: inv_scale must be a 1-element float32 CPU tensor, got ",
              t.scalar_type(), " ", t.sizes(), " on ", t.device());
  return t.contiguous().data_ptr<float>()[0];
}

float global_norm(const at::Tensor& sq) {
  TORCH_CHECK(sq.device().is_cpu() && sq.scalar_type() == at::kFloat && sq.dim() == 1,
              "fsam_fused: sq must be a 1-D float32 CPU tensor, got ", sq.scalar_type(), " ",
              sq.sizes(), " on ", sq.device());
  const at::Tensor c = sq.contiguous();
  const float* p = c.data_ptr<float>();
  double total = 0.0;
  for (const auto i : c10::irange(c.numel())) total += p[i];
  // The reference takes sqrt of the float32 sum.
  return std::sqrt(static_cast<float>(total));
}

// An optional 1-element float32 output (found, grad_sq), checked; as a list (empty when
// absent) for the overlap check.
at::TensorList checked_out(const char* what, const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return {};
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->numel() == 1 &&
                  t->is_contiguous(),
              "fsam_fused: ", what, " must be a 1-element contiguous float32 CPU tensor, got ",
              t->scalar_type(), " ", t->sizes(), " on ", t->device());
  TORCH_CHECK(!t->requires_grad(), "fsam_fused: ", what, " must not require grad");
  return at::TensorList(*t);
}

// ------------------------------------------------------------------ the ops

// `grad_sq` (optional, a 1-element contiguous float32 CPU tensor): also gets sum (inv * g)^2,
// from the same read of g (a perturbation schedule's statistic).
at::Tensor norm_sq(at::TensorList weights, at::TensorList grads, at::TensorList emas,
                   const at::Tensor& rows, const at::Tensor& scalars, bool paper,
                   const c10::optional<at::Tensor>& inv_scale,
                   const c10::optional<at::Tensor>& grad_sq) {
  const auto specs = gather(weights, grads, emas, {}, nullptr, rows, {});
  const Direction dir{checked_scalars(scalars).first, paper, !emas.empty()};
  const float inv = inv_scale_of(inv_scale);
  const at::TensorList out = checked_out("grad_sq", grad_sq);
  if (!out.empty()) {  // (the pass without it writes nothing: nothing to overlap)
    check_no_overlap({{"grad_sq", out, true}, {"weights", weights, false},
                      {"grads", grads, false}, {"emas", emas, false}});
  }
  std::pair<double, double> total{0.0, 0.0};
  if (!specs.empty()) {
    dispatch(weights[0].scalar_type(), ema_type(weights, emas), [&](auto w, auto m) {
      using Wt = decltype(w);
      using Mt = decltype(m);
      const Table table(specs);
      total = grad_sq.has_value()
                  ? norm_sq_impl<Wt, Mt, true>(specs, table, dir, inv_scale.has_value(), inv)
                  : norm_sq_impl<Wt, Mt>(specs, table, dir, inv_scale.has_value(), inv);
    });
  }
  if (grad_sq.has_value()) grad_sq->data_ptr<float>()[0] = static_cast<float>(total.second);
  return at::full({1}, static_cast<float>(total.first), at::TensorOptions().dtype(at::kFloat));
}

void perturb_(at::TensorList weights, at::TensorList grads, at::TensorList emas,
              at::TensorList saved, const at::Tensor& sq, const at::Tensor& rows,
              const at::Tensor& scalars, at::IntArrayRef swap, bool paper,
              const c10::optional<at::Tensor>& inv_scale,
              const c10::optional<at::Tensor>& found) {
  // Every check runs before anything is written; the values of rows and scalars are copied
  // out here, so no later write can change them.
  const auto specs = gather(weights, grads, emas, saved, "saved", rows, swap);
  const auto [sigma, eps] = checked_scalars(scalars);
  const Direction dir{sigma, paper, !emas.empty()};
  // eps > 0 keeps rho / (N + eps) finite and positive: with eps = 0 a zero gradient gives
  // 0 * (rho / 0) = NaN in every weight, and eps < 0 can flip or blow up the step.
  TORCH_CHECK(eps > 0.0f, "fsam_fused: eps must be > 0 (in float32), got ", eps,
              " (scalars[1])");
  const float norm = global_norm(sq);  // reads sq only
  const float norm_eps = norm + eps;
  const float inv = inv_scale_of(inv_scale);
  const at::TensorList found_list = checked_out("found", found);
  check_no_grad("weights", weights);
  check_no_grad("emas", emas);
  check_no_grad("saved", saved);
  check_no_overlap({{"weights", weights, true}, {"emas", emas, true}, {"saved", saved, true},
                    {"found", found_list, true}, {"grads", grads, false}, {"sq", sq, false}});
  const bool ok = std::isfinite(norm);
  if (found.has_value()) found->data_ptr<float>()[0] = ok ? 0.0f : 1.0f;
  if (specs.empty()) return;
  if (!ok) {
    save_only(specs, weights[0].element_size());
    return;
  }
  dispatch(weights[0].scalar_type(), ema_type(weights, emas), [&](auto w, auto m) {
    perturb_impl<decltype(w), decltype(m)>(specs, Table(specs), dir, norm_eps,
                                           inv_scale.has_value(), inv);
  });
}

// The cheap step (fsam_fused.schedules): the EMA update alone, skipped (EMA bits kept) when
// the sum of `sq` (the gradients' squared norm, from norm_sq without EMA) is not finite.
void ema_(at::TensorList emas, at::TensorList grads, const at::Tensor& rows, const at::Tensor& sq,
          const c10::optional<at::Tensor>& inv_scale, const c10::optional<at::Tensor>& found) {
  TORCH_CHECK(!emas.empty() || grads.empty(), "fsam_fused: ema_ needs one EMA per gradient");
  // (the gradients stand in for the weights: an EMA has its gradient's sizes and strides)
  const auto specs = gather(grads, grads, emas, {}, nullptr, rows, {}, "grads");
  const float norm = global_norm(sq);
  const float inv = inv_scale_of(inv_scale);
  const at::TensorList found_list = checked_out("found", found);
  check_no_grad("emas", emas);
  check_no_overlap({{"emas", emas, true}, {"found", found_list, true}, {"grads", grads, false},
                    {"sq", sq, false}});
  const bool ok = std::isfinite(norm);
  if (found.has_value()) found->data_ptr<float>()[0] = ok ? 0.0f : 1.0f;
  if (specs.empty() || !ok) return;
  dispatch(grads[0].scalar_type(), emas[0].scalar_type(), [&](auto w, auto m) {
    ema_impl<decltype(w), decltype(m)>(specs, Table(specs), inv_scale.has_value(), inv);
  });
}

// A byte range restore_ copies with streaming stores, one work unit.
struct Span {
  char* dst;
  const char* src;
  int64_t bytes;
};

void add_spans(std::vector<Span>& spans, char* dst, const char* src, int64_t n) {
  constexpr int64_t kBytes = kChunk * 4;
  for (int64_t b = 0; b < n; b += kBytes) spans.push_back({dst + b, src + b, std::min(kBytes, n - b)});
}

void copy_spans(const std::vector<Span>& spans) {
  std::vector<int64_t> span_bytes;
  span_bytes.reserve(spans.size());
  for (const Span& sp : spans) span_bytes.push_back(sp.bytes);
  balanced_for(span_bytes, 4, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      char* dst = spans[i].dst;
      const char* src = spans[i].src;
      int64_t n = spans[i].bytes;
      // Whole runs as streaming copies (tensors start 64-byte aligned, so this is all but
      // a tail), the rest with memcpy.
      constexpr int64_t kRun = kStep * sizeof(float);
      const int64_t body = (reinterpret_cast<uintptr_t>(dst) % 32 == 0) ? n / kRun * kRun : 0;
      for (int64_t b = 0; b < body; b += kRun) {
        FSAM_PREFETCH(src + std::min<int64_t>(b + kPrefetch * sizeof(float), n - 1));
        stream_copy(reinterpret_cast<float*>(dst + b), reinterpret_cast<const float*>(src + b));
      }
      std::memcpy(dst + body, src + body, n - body);
    }
    fence();
  });
}

void restore_(at::TensorList weights, at::TensorList saved) {
  check_list("weights", weights, weights);
  check_list("saved", saved, weights);
  for (const auto i : c10::irange(weights.size())) {
    TORCH_CHECK(saved[i].scalar_type() == weights[i].scalar_type(), "fsam_fused: saved[", i,
                "] is ", saved[i].scalar_type(), ", weights[", i, "] is ",
                weights[i].scalar_type());
  }
  check_no_grad("weights", weights);
  check_no_overlap({{"weights", weights, true}, {"saved", saved, false}});
  std::vector<Span> spans;
  for (const auto i : c10::irange(weights.size())) {
    add_spans(spans, static_cast<char*>(weights[i].data_ptr()),
              static_cast<const char*>(saved[i].data_ptr()),
              weights[i].numel() * weights[i].element_size());
  }
  copy_spans(spans);
}


// ------------------------------------------------------------------ Bound: a plan's ops

// The three passes (and the cheap step's two) of one plan bucket, with what the plan fixes
// checked and built once instead of per call: the weights, EMAs and saved copies (their
// counts, dtypes, sizes, strides, density, no-grad, mutual non-overlap), the work tables
// and the restore spans. Per call it still checks what a call can change: every gradient
// (count, CPU, dtype, sizes and strides equal to its weight's, no byte shared with a tensor
// the pass writes: O(log n) each against the written ranges sorted once), the values in
// `rows`/`scalars` (finite, rho >= 0, adaptive 0/1, eps > 0), `sq`, `inv_scale`, `found`;
// all before the first write, as the ops do. An EMA changed in place since (another
// storage, layout, dtype: fresh()) sends the call to the ops. Eager calls only (the direct
// bindings): torch.compile and opcheck use the ops.
class Bound {
 public:
  Bound(std::vector<at::Tensor> weights, std::vector<at::Tensor> emas,
        std::vector<at::Tensor> saved, std::vector<int64_t> swap, bool paper, at::Tensor rows,
        at::Tensor scalars)
      : w_(std::move(weights)),
        m_(std::move(emas)),
        s_(std::move(saved)),
        swap_(std::move(swap)),
        paper_(paper),
        rows_(std::move(rows)),
        scalars_(std::move(scalars)),
        table_(gather(w_, w_, m_, s_, "saved", rows_, swap_)) {
    checked_scalars(scalars_);
    check_no_grad("weights", w_);
    check_no_grad("emas", m_);
    check_no_grad("saved", s_);
    check_no_overlap({{"weights", w_, true}, {"emas", m_, true}, {"saved", s_, true}});
    wt_ = w_.empty() ? at::kFloat : w_[0].scalar_type();
    mt_ = ema_type(w_, m_);
    for (const auto* list : {&w_, &m_, &s_}) {
      for (const at::Tensor& t : *list) {
        if (t.numel() == 0) continue;
        const auto b = reinterpret_cast<uintptr_t>(t.data_ptr());
        written_.push_back({b, b + static_cast<uintptr_t>(t.numel() * t.element_size())});
      }
    }
    std::sort(written_.begin(), written_.end());
    for (const at::Tensor& m : m_) m_ptrs_.push_back(m.data_ptr());
    for (const auto i : c10::irange(w_.size())) {
      if (swap_[i] == 0) copied_.push_back(static_cast<int64_t>(i));
    }
  }

  int64_t size() const { return static_cast<int64_t>(w_.size()); }

  // False if an EMA is no longer as bound: the EMAs are the optimizer state's own tensors,
  // which a user can change in place between steps without a new plan (`m.data = x`,
  // `m.resize_(n)`, `m.requires_grad_()`), and the table, the written ranges and the dtype
  // were taken from them. accepts() then answers None (the engine rebuilds the plan, whose
  // checks refuse or convert the EMA) and the passes do nothing (the caller takes the ops,
  // which check everything). (The weights are aliases no one else holds. A spare buffer is
  // the parameter's storage during the second pass; one freed or moved there changes the
  // parameter's address, and the restore then drops the plan, and this Bound with it.)
  bool fresh() const {
    for (const auto i : c10::irange(m_.size())) {
      const at::Tensor& m = m_[i];
      if (m.data_ptr() != m_ptrs_[i] || m.scalar_type() != mt_ || m.requires_grad() ||
          m.sizes() != w_[i].sizes() || m.strides() != w_[i].strides()) {
        return false;
      }
    }
    return true;
  }

  // True if the passes take these gradients (None, a wrong layout or an overlap: false).
  // Raises nothing: the engine's per-step test of a step's gradients (Bucket.take_grads),
  // the same checks the passes make again before their first write.
  bool accepts(const std::vector<c10::optional<at::Tensor>>& g) const {
    if (g.size() != w_.size()) return false;
    const auto python = c10::DispatchKeySet(c10::DispatchKey::Python);
    for (const auto i : c10::irange(g.size())) {
      if (!g[i].has_value() || g[i]->key_set().has_any(python) || refusal(*g[i], i) != nullptr) {
        return false;
      }
    }
    return true;
  }
  const std::vector<at::Tensor>& weights() const { return w_; }
  const std::vector<at::Tensor>& emas() const { return m_; }
  const std::vector<at::Tensor>& saved() const { return s_; }
  const std::vector<int64_t>& swap() const { return swap_; }
  bool paper() const { return paper_; }
  const at::Tensor& rows() const { return rows_; }
  const at::Tensor& scalars() const { return scalars_; }

  at::Tensor norm_sq(const std::vector<at::Tensor>& g, const c10::optional<at::Tensor>& inv) {
    auto specs = this->specs(g, true);
    const Direction dir{checked_scalars(scalars_).first, paper_, !m_.empty()};
    return sum_of(specs, dir, inv);
  }

  // sum (inv * g)^2: norm_sq with no EMA and no |w| (the cheap step's first pass).
  at::Tensor grad_sq(const std::vector<at::Tensor>& g, const c10::optional<at::Tensor>& inv) {
    auto specs = this->specs(g, false);
    checked_scalars(scalars_);
    return sum_of(specs, Direction{0.0f, false, false}, inv);
  }

  void perturb_(const std::vector<at::Tensor>& g, const at::Tensor& sq,
                const c10::optional<at::Tensor>& inv_scale,
                const c10::optional<at::Tensor>& found) {
    auto specs = this->specs(g, true);
    const auto [sigma, eps] = checked_scalars(scalars_);
    TORCH_CHECK(eps > 0.0f, "fsam_fused: eps must be > 0 (in float32), got ", eps,
                " (scalars[1])");
    const float norm = global_norm(sq);
    const float inv = inv_scale_of(inv_scale);
    check_found(found, g);
    const bool ok = std::isfinite(norm);
    if (found.has_value()) found->data_ptr<float>()[0] = ok ? 0.0f : 1.0f;
    if (specs.empty()) return;
    if (!ok) {
      save_only(specs, w_[0].element_size());
      return;
    }
    const Direction dir{sigma, paper_, !m_.empty()};
    dispatch(wt_, mt_, [&](auto w, auto m) {
      perturb_impl<decltype(w), decltype(m)>(specs, table_, dir, norm + eps,
                                             inv_scale.has_value(), inv);
    });
  }

  void ema_(const std::vector<at::Tensor>& g, const at::Tensor& sq,
            const c10::optional<at::Tensor>& inv_scale, const c10::optional<at::Tensor>& found) {
    TORCH_CHECK(!m_.empty() || w_.empty(), "fsam_fused: ema_ needs one EMA per gradient");
    auto specs = this->specs(g, true);
    const float norm = global_norm(sq);
    const float inv = inv_scale_of(inv_scale);
    check_found(found, g);
    const bool ok = std::isfinite(norm);
    if (found.has_value()) found->data_ptr<float>()[0] = ok ? 0.0f : 1.0f;
    if (specs.empty() || !ok) return;
    dispatch(wt_, mt_, [&](auto w, auto m) {
      ema_impl<decltype(w), decltype(m)>(specs, table_, inv_scale.has_value(), inv);
    });
  }

  // w <- saved for the exact-copy tensors (the swapped ones are swapped back by the caller).
  void restore_() {
    std::vector<Span> spans;
    for (const int64_t i : copied_) {
      add_spans(spans, static_cast<char*>(w_[i].data_ptr()),
                static_cast<const char*>(s_[i].data_ptr()), w_[i].numel() * w_[i].element_size());
    }
    copy_spans(spans);
  }

 private:
  // Why the passes would refuse gradient `t` for weight `i` (nullptr: they take it): a
  // layout other than the weight's, or bytes shared with a tensor the passes write (found
  // by binary search in the written ranges sorted once).
  const char* refusal(const at::Tensor& t, size_t i) const {
    const at::Tensor& w = w_[i];
    if (!(t.defined() && t.device().is_cpu() && t.scalar_type() == wt_ &&
          t.sizes() == w.sizes() && t.strides() == w.strides())) {
      return "layout";
    }
    if (t.numel() > 0) {
      const auto b = reinterpret_cast<uintptr_t>(t.data_ptr());
      const uintptr_t e = b + static_cast<uintptr_t>(t.numel() * t.element_size());
      // The last written range starting before this one ends must end before it starts.
      auto it = std::lower_bound(written_.begin(), written_.end(), std::make_pair(e, e));
      if (it != written_.begin() && std::prev(it)->second > b) return "overlap";
    }
    return nullptr;
  }

  // This call's specs: the gradients checked (see the class comment), the values read.
  std::vector<Spec> specs(const std::vector<at::Tensor>& g, bool full) const {
    const size_t n = w_.size();
    TORCH_CHECK(g.size() == n, "fsam_fused: grads has ", g.size(), " tensors, weights has ", n);
    const float* r = checked_rows(rows_, static_cast<int64_t>(n));
    std::vector<Spec> specs(n);
    for (const auto i : c10::irange(n)) {
      const at::Tensor& t = g[i];
      const at::Tensor& w = w_[i];
      if (const char* why = refusal(t, i)) {
        TORCH_CHECK(why[0] != 'l', "fsam_fused: grads[", i, "] must be a CPU ", wt_,
                    " tensor of sizes ", w.sizes(), " and strides ", w.strides(),
                    " (its weight's), got ", t.defined() ? t.toString() : std::string("None"),
                    " ", t.sizes(), " ", t.strides());
        TORCH_CHECK(false, "fsam_fused: grads[", i, "] overlaps a weight, EMA or saved copy in "
                    "memory; a tensor the op writes must not share memory with any other "
                    "tensor argument");
      }
      specs[i] = Spec{w.numel(),
                      w.data_ptr(),
                      t.data_ptr(),
                      m_.empty() ? nullptr : m_[i].data_ptr(),
                      s_.empty() ? nullptr : s_[i].data_ptr(),
                      r[i * kCols + kRho],
                      full && r[i * kCols + kAdaptive] != 0.0f,
                      swap_[i] != 0,
                      r[i * kCols + kDecay],
                      r[i * kCols + kGain]};
      if (!full) specs[i].m = nullptr;
    }
    return specs;
  }

  at::Tensor sum_of(const std::vector<Spec>& specs, const Direction& dir,
                    const c10::optional<at::Tensor>& inv_scale) const {
    const float inv = inv_scale_of(inv_scale);
    double total = 0.0;
    if (!specs.empty()) {
      dispatch(wt_, dir.has_ema ? mt_ : wt_, [&](auto w, auto m) {
        total = norm_sq_impl<decltype(w), decltype(m)>(specs, table_, dir,
                                                       inv_scale.has_value(), inv)
                    .first;
      });
    }
    return at::full({1}, static_cast<float>(total), at::TensorOptions().dtype(at::kFloat));
  }

  // `found` as the ops check it, and apart from every tensor the passes write (binary search)
  // or read (the gradients, whose layouts `specs` checked first): it is written before the
  // first read.
  void check_found(const c10::optional<at::Tensor>& found, const std::vector<at::Tensor>& g) const {
    if (checked_out("found", found).empty()) return;
    const auto b = reinterpret_cast<uintptr_t>(found->data_ptr());
    const uintptr_t e = b + sizeof(float);
    auto it = std::lower_bound(written_.begin(), written_.end(), std::make_pair(e, e));
    bool apart = it == written_.begin() || std::prev(it)->second <= b;
    for (const at::Tensor& t : g) {
      const auto tb = reinterpret_cast<uintptr_t>(t.data_ptr());
      apart = apart && (t.numel() == 0 || tb >= e ||
                        tb + static_cast<uintptr_t>(t.numel() * t.element_size()) <= b);
    }
    TORCH_CHECK(apart, "fsam_fused: found overlaps a weight, EMA, saved copy or gradient in "
                "memory; a tensor the op writes must not share memory with any other tensor "
                "argument");
  }

  std::vector<at::Tensor> w_, m_, s_;
  std::vector<int64_t> swap_;
  bool paper_;
  at::Tensor rows_, scalars_;
  Table table_;
  at::ScalarType wt_ = at::kFloat, mt_ = at::kFloat;
  std::vector<std::pair<uintptr_t, uintptr_t>> written_;  // sorted, pairwise disjoint
  std::vector<const void*> m_ptrs_;  // the EMAs' addresses when bound (see fresh())
  std::vector<int64_t> copied_;
};

}  // namespace

TORCH_LIBRARY(fsam_fused, m) {
  // Values (rho, adaptive, decay, gain per tensor; sigma, eps) are tensors, not floats: a
  // compiled graph must not specialise on them (see checked_rows).
  m.def("norm_sq(Tensor[] weights, Tensor[] grads, Tensor[] emas, Tensor rows, "
        "Tensor scalars, bool paper, Tensor? inv_scale=None, Tensor(a!)? grad_sq=None) -> Tensor");
  m.def("perturb_(Tensor(a!)[] weights, Tensor[] grads, Tensor(b!)[] emas, "
        "Tensor(c!)[] saved, Tensor sq, Tensor rows, Tensor scalars, int[] swap, bool paper, "
        "Tensor? inv_scale=None, Tensor(d!)? found=None) -> ()");
  m.def("restore_(Tensor(a!)[] weights, Tensor[] saved) -> ()");
  m.def("ema_(Tensor(a!)[] emas, Tensor[] grads, Tensor rows, Tensor sq, "
        "Tensor? inv_scale=None, Tensor(b!)? found=None) -> ()");
}

TORCH_LIBRARY_IMPL(fsam_fused, CPU, m) {
  m.impl("norm_sq", &norm_sq);
  m.impl("perturb_", &perturb_);
  m.impl("restore_", &restore_);
  m.impl("ema_", &ema_);
}

}  // namespace fsam_cpu

// Direct bindings of the same ops, for eager calls. A call through torch.ops (or an unboxed
// call through the dispatcher: the custom op's autograd and ADInplaceOrView fallbacks are
// boxed) converts every tensor of every list to an IValue and back: in a perf profile of
// 10,000 tensors of 64 elements most of the per-tensor time was IValue boxing, refcounts and
// the fallbacks' bookkeeping. These take the lists through pybind11's casters and call the
// CPU kernels themselves when nothing else could want the call: no Python dispatch mode is
// active and no tensor is a Python subclass (FakeTensor, a tracing subclass); otherwise they
// take the dispatcher's path. Neither path bumps version counters (the dispatcher's does not
// for these ops; a test holds the two to the same bits and versions).
// torch.compile and opcheck call torch.ops.fsam_fused.* (see fsam_fused/ops/cpp.py).
namespace fsam_cpu_py {
namespace py = pybind11;
using TV = std::vector<at::Tensor>;
using OptT = std::optional<at::Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

bool plain(std::initializer_list<const TV*> lists, std::initializer_list<const at::Tensor*> ts) {
  if (c10::impl::tls_local_dispatch_key_set().included_.has(c10::DispatchKey::Python) ||
      c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::PythonTLSSnapshot)) {
    return false;
  }
  const auto python = c10::DispatchKeySet(c10::DispatchKey::Python);
  for (const TV* l : lists) {
    for (const at::Tensor& t : *l) {
      if (t.defined() && t.key_set().has_any(python)) return false;
    }
  }
  for (const at::Tensor* t : ts) {
    if (t != nullptr && t->defined() && t->key_set().has_any(python)) return false;
  }
  return true;
}

// The message alone, as torch.ops gives it (c10::Error::what() appends a C++ backtrace).
template <typename F>
auto guarded(const F& f) -> decltype(f()) {
  try {
    return f();
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.what_without_backtrace());
  }
}

// A plan's parameters and the addresses it recorded for them: the engine's per-step test that
// each parameter is still where and as the plan put it (p.data not reassigned or re-viewed)
// and has a gradient, one C++ loop instead of Python passes over the list (about 0.2 us a
// tensor less at 10,000 tensors). It holds the parameters themselves (their TensorImpl: a
// `p.data = x` is seen), and only plain ones (the caller checks: a subclass may have no
// storage to point at).
class Watch {
 public:
  Watch(TV params, std::vector<int64_t> ptrs) : params_(std::move(params)), ptrs_(std::move(ptrs)) {
    TORCH_CHECK(params_.size() == ptrs_.size(), "fsam_fused: Watch needs one address per tensor");
    for (const at::Tensor& p : params_) {
      sizes_.push_back(p.sizes().vec());
      strides_.push_back(p.strides().vec());
    }
  }

  bool unmoved() const {
    for (const auto i : c10::irange(params_.size())) {
      if (reinterpret_cast<int64_t>(params_[i].data_ptr()) != ptrs_[i]) return false;
    }
    return true;
  }

  // Each parameter's .grad if every one is unmoved, in its planned sizes and strides, and has
  // one; None otherwise. (A re-view at the same address, p.data = p.data.t() of a square
  // weight, needs a new plan: the passes walk memory in the planned layout.)
  py::object grads() const {
    py::list out(params_.size());
    for (const auto i : c10::irange(params_.size())) {  // (one pass over the parameters)
      const at::Tensor& p = params_[i];
      if (reinterpret_cast<int64_t>(p.data_ptr()) != ptrs_[i] ||
          p.sizes() != at::IntArrayRef(sizes_[i]) || p.strides() != at::IntArrayRef(strides_[i])) {
        return py::none();
      }
      const at::Tensor& g = p.grad();
      if (!g.defined()) return py::none();
      out[i] = py::cast(g);  // the gradient's own Python object, as `p.grad` gives it
    }
    return out;
  }

 private:
  TV params_;
  std::vector<int64_t> ptrs_;
  std::vector<std::vector<int64_t>> sizes_, strides_;  // as planned
};

}  // namespace fsam_cpu_py

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace fsam_cpu_py;
  m.def(
      "norm_sq",
      [](const TV& w, const TV& g, const TV& e, const at::Tensor& rows, const at::Tensor& scalars,
         bool paper, const OptT& inv, const OptT& gsq) {
        py::gil_scoped_release no_gil;
        return guarded([&] {
          if (plain({&w, &g, &e},
                    {&rows, &scalars, inv ? &*inv : nullptr, gsq ? &*gsq : nullptr})) {
            return fsam_cpu::norm_sq(w, g, e, rows, scalars, paper, inv, gsq);
          }
          static const auto op = handle<decltype(fsam_cpu::norm_sq)>("fsam_fused::norm_sq");
          return op.call(w, g, e, rows, scalars, paper, inv, gsq);
        });
      },
      py::arg("w"), py::arg("g"), py::arg("e"), py::arg("rows"), py::arg("scalars"),
      py::arg("paper"), py::arg("inv") = py::none(), py::arg("gsq") = py::none());
  m.def("perturb_", [](const TV& w, const TV& g, const TV& e, const TV& saved,
                       const at::Tensor& sq, const at::Tensor& rows, const at::Tensor& scalars,
                       const std::vector<int64_t>& swap, bool paper, const OptT& inv,
                       const OptT& found) {
    py::gil_scoped_release no_gil;
    guarded([&] {
      if (plain({&w, &g, &e, &saved},
                {&sq, &rows, &scalars, inv ? &*inv : nullptr, found ? &*found : nullptr})) {
        fsam_cpu::perturb_(w, g, e, saved, sq, rows, scalars, swap, paper, inv, found);
        return;
      }
      static const auto op = handle<decltype(fsam_cpu::perturb_)>("fsam_fused::perturb_");
      op.call(w, g, e, saved, sq, rows, scalars, swap, paper, inv, found);
    });
  });
  m.def("restore_", [](const TV& w, const TV& saved) {
    py::gil_scoped_release no_gil;
    guarded([&] {
      if (plain({&w, &saved}, {})) {
        fsam_cpu::restore_(w, saved);
        return;
      }
      static const auto op = handle<decltype(fsam_cpu::restore_)>("fsam_fused::restore_");
      op.call(w, saved);
    });
  });
  // A plan bucket's ops (fsam_cpu::Bound). Each call returns None, doing nothing, when a
  // gradient or an optional tensor is not a plain tensor (a subclass, under a Python
  // dispatch mode) or an EMA changed since it was bound (Bound::fresh): the caller then
  // takes the ops' path, through the dispatcher.
  py::class_<Watch>(m, "Watch")
      .def(py::init<TV, std::vector<int64_t>>())
      .def("unmoved", &Watch::unmoved)
      .def("grads", &Watch::grads);
  using fsam_cpu::Bound;
  py::class_<Bound>(m, "Bound")
      .def(py::init<TV, TV, TV, std::vector<int64_t>, bool, at::Tensor, at::Tensor>())
      .def("__len__", &Bound::size)
      .def("accepts",
           [](const Bound& b, const std::vector<c10::optional<at::Tensor>>& g) -> py::object {
             if (!b.fresh()) return py::none();  // (the plan no longer fits: rebuild it)
             return py::bool_(b.accepts(g));
           })
      .def("norm_sq",
           [](Bound& b, const TV& g, const OptT& inv) -> py::object {
             at::Tensor out;
             {
               py::gil_scoped_release no_gil;  // (no Python object is touched inside)
               if (plain({&g}, {inv ? &*inv : nullptr}) && b.fresh()) {
                 out = guarded([&] { return b.norm_sq(g, inv); });
               }
             }
             return out.defined() ? py::cast(out) : py::none();
           })
      .def("grad_sq",
           [](Bound& b, const TV& g, const OptT& inv) -> py::object {
             at::Tensor out;
             {
               py::gil_scoped_release no_gil;  // (no Python object is touched inside)
               if (plain({&g}, {inv ? &*inv : nullptr}) && b.fresh()) {
                 out = guarded([&] { return b.grad_sq(g, inv); });
               }
             }
             return out.defined() ? py::cast(out) : py::none();
           })
      .def("perturb_",
           [](Bound& b, const TV& g, const at::Tensor& sq, const OptT& inv, const OptT& found) {
             py::gil_scoped_release no_gil;
             if (!plain({&g}, {&sq, inv ? &*inv : nullptr, found ? &*found : nullptr}) ||
                 !b.fresh()) {
               return false;
             }
             guarded([&] { b.perturb_(g, sq, inv, found); });
             return true;
           })
      .def("ema_",
           [](Bound& b, const TV& g, const at::Tensor& sq, const OptT& inv, const OptT& found) {
             py::gil_scoped_release no_gil;
             if (!plain({&g}, {&sq, inv ? &*inv : nullptr, found ? &*found : nullptr}) ||
                 !b.fresh()) {
               return false;
             }
             guarded([&] { b.ema_(g, sq, inv, found); });
             return true;
           })
      .def("restore_", [](Bound& b) {
        py::gil_scoped_release no_gil;
        guarded([&] { b.restore_(); });
      });
  m.def("ema_", [](const TV& e, const TV& g, const at::Tensor& rows, const at::Tensor& sq,
                   const OptT& inv, const OptT& found) {
    py::gil_scoped_release no_gil;
    guarded([&] {
      if (plain({&e, &g}, {&rows, &sq, inv ? &*inv : nullptr, found ? &*found : nullptr})) {
        fsam_cpu::ema_(e, g, rows, sq, inv, found);
        return;
      }
      static const auto op = handle<decltype(fsam_cpu::ema_)>("fsam_fused::ema_");
      op.call(e, g, rows, sq, inv, found);
    });
  });
}
