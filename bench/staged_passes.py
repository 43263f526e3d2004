"""Could F-SAM's optimizer step read as few bytes as one fused AdamW step (issue 16, item 1)?
A development prototype, not the backend: the float32, non-adaptive, double-buffered step
written twice as small C++ kernels (AVX2, OpenMP through ``at::parallel_for``, software
prefetch, non-temporal stores where the backend uses them), timed beside
``torch.optim.AdamW(fused=True)`` on 100 M parameters in 8 tensors, interleaved in one
process (medians of rounds):

- ``current``: the backend's two passes. Norm: g, m read. Perturb: g, m, w read; m written
  in place, w + e streamed into the spare buffer. 20 B read per parameter, 8 written.
- ``staged``: the norm pass also streams d and the new EMA into fresh buffers (the spare,
  and a second EMA buffer: the old EMA must survive a non-finite norm); perturb reads w and
  d and writes w + e over d. 16 B read, 12 written: AdamW's counts.
- ``in-place``: like the authors' code, the norm pass overwrites ``.grad`` with d and m with
  the new EMA; perturb reads w and d and streams w + e into the spare buffer.

    python bench/staged_passes.py [--params 100e6] [--tensors 8] [--rounds 7]

Needs a C++ compiler (compiled on first run, a minute or two, under the system temp dir).
"""

import argparse
import os
import statistics
import tempfile
import time

import torch
from torch.utils.cpp_extension import load_inline

SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <mutex>
constexpr int64_t kChunk = 1 << 15;
constexpr int64_t kAhead = 512;
#define PF(p) __builtin_prefetch(p)
#define LD(p) _mm256_loadu_ps(p)
using TV = std::vector<at::Tensor>;

template <class F>
void chunks(const TV& ts, F f) {
  std::vector<std::pair<int, int64_t>> cs;
  for (int t = 0; t < (int)ts.size(); ++t)
    for (int64_t b = 0; b < ts[t].numel(); b += kChunk) cs.push_back({t, b});
  at::parallel_for(0, cs.size(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const int t = cs[c].first;
      const int64_t b = cs[c].second;
      f(t, b, std::min(b + kChunk, ts[t].numel()));
    }
    _mm_sfence();
  });
}

inline void put(float* p, __m256 v, bool stream) {
  if (stream) _mm256_stream_ps(p, v); else _mm256_storeu_ps(p, v);
}

// sum (g - sigma m)^2; optionally d -> o1 and m * decay + g * (1 - decay) -> o2 (streamed
// when `stream`, else ordinary stores: the in-place variant passes o1 = g, o2 = m).
double norm(const TV& g, const TV& m, const TV& o1, const TV& o2, double sig, double dec,
            bool stream) {
  double tot = 0;
  std::mutex mu;
  const bool w1 = !o1.empty(), w2 = !o2.empty();
  chunks(g, [&](int t, int64_t b, int64_t e) {
    const float *G = g[t].data_ptr<float>(), *M = m[t].data_ptr<float>();
    float* O1 = w1 ? o1[t].data_ptr<float>() : nullptr;
    float* O2 = w2 ? o2[t].data_ptr<float>() : nullptr;
    __m256 a = _mm256_setzero_ps(), a2 = a, s = _mm256_set1_ps(sig), dc = _mm256_set1_ps(dec),
           gn = _mm256_set1_ps(1 - dec);
    for (int64_t i = b; i < e; i += 16) {
      PF(G + std::min(i + kAhead, e - 1));
      PF(M + std::min(i + kAhead, e - 1));
      __m256 g0 = LD(G + i), g1 = LD(G + i + 8), m0 = LD(M + i), m1 = LD(M + i + 8);
      __m256 d0 = _mm256_fnmadd_ps(m0, s, g0), d1 = _mm256_fnmadd_ps(m1, s, g1);
      a = _mm256_fmadd_ps(d0, d0, a);
      a2 = _mm256_fmadd_ps(d1, d1, a2);
      if (w1) { put(O1 + i, d0, stream); put(O1 + i + 8, d1, stream); }
      if (w2) {
        put(O2 + i, _mm256_fmadd_ps(g0, gn, _mm256_mul_ps(m0, dc)), stream);
        put(O2 + i + 8, _mm256_fmadd_ps(g1, gn, _mm256_mul_ps(m1, dc)), stream);
      }
    }
    a = _mm256_add_ps(a, a2);
    float l[8];
    _mm256_storeu_ps(l, a);
    double x = 0;
    for (int j = 0; j < 8; ++j) x += l[j];
    std::lock_guard<std::mutex> q(mu);
    tot += x;
  });
  return tot;
}

// The backend's perturb: g, m, w read; m written in place, w + scale * d streamed to out.
void perturb(const TV& w, const TV& g, const TV& m, const TV& out, double sig, double dec,
             double scale) {
  chunks(w, [&](int t, int64_t b, int64_t e) {
    const float *G = g[t].data_ptr<float>(), *W = w[t].data_ptr<float>();
    float *M = m[t].data_ptr<float>(), *O = out[t].data_ptr<float>();
    __m256 s = _mm256_set1_ps(sig), dc = _mm256_set1_ps(dec), gn = _mm256_set1_ps(1 - dec),
           sc = _mm256_set1_ps(scale);
    for (int64_t i = b; i < e; i += 16) {
      PF(G + std::min(i + kAhead, e - 1));
      PF(M + std::min(i + kAhead, e - 1));
      PF(W + std::min(i + kAhead, e - 1));
      for (int k = 0; k < 16; k += 8) {
        __m256 gg = LD(G + i + k), mm = LD(M + i + k), ww = LD(W + i + k);
        __m256 d = _mm256_fnmadd_ps(mm, s, gg);
        _mm256_storeu_ps(M + i + k, _mm256_fmadd_ps(gg, gn, _mm256_mul_ps(mm, dc)));
        _mm256_stream_ps(O + i + k, _mm256_fmadd_ps(d, sc, ww));
      }
    }
  });
}

// w + scale * d into out (streamed when `stream`; out may be d itself).
void apply(const TV& w, const TV& d, const TV& out, double scale, bool stream) {
  chunks(w, [&](int t, int64_t b, int64_t e) {
    const float *W = w[t].data_ptr<float>(), *D = d[t].data_ptr<float>();
    float* O = out[t].data_ptr<float>();
    __m256 sc = _mm256_set1_ps(scale);
    for (int64_t i = b; i < e; i += 16) {
      PF(W + std::min(i + kAhead, e - 1));
      PF(D + std::min(i + kAhead, e - 1));
      put(O + i, _mm256_fmadd_ps(LD(D + i), sc, LD(W + i)), stream);
      put(O + i + 8, _mm256_fmadd_ps(LD(D + i + 8), sc, LD(W + i + 8)), stream);
    }
  });
}
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args(argv)
    build = os.path.join(tempfile.gettempdir(), f"fsam_staged_{os.getuid()}")
    os.makedirs(build, exist_ok=True)
    ext = load_inline(
        "fsam_staged_passes",
        SRC,
        functions=["norm", "perturb", "apply"],
        extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=build,
    )
    n = int(a.params) // a.tensors
    gen = torch.Generator().manual_seed(0)

    def lst(scale=1.0):
        return [torch.randn(n, generator=gen) * scale for _ in range(a.tensors)]

    w, g, m, spare, m2 = lst(), lst(1e-3), lst(1e-3), lst(), lst()
    qs = [torch.nn.Parameter(torch.randn(n, generator=gen)) for _ in range(a.tensors)]
    for q in qs:
        q.grad = torch.randn(n, generator=gen) * 1e-3
    adam = torch.optim.AdamW(qs, lr=1e-6, fused=True)
    none = []

    def scale(sq):
        return 0.05 / (sq**0.5 + 1e-12)

    def current():
        ext.perturb(w, g, m, spare, 1.0, 0.9, scale(ext.norm(g, m, none, none, 1.0, 0.9, False)))

    def staged():
        ext.apply(w, spare, spare, scale(ext.norm(g, m, spare, m2, 1.0, 0.9, True)), False)

    def in_place():
        ext.apply(w, g, spare, scale(ext.norm(g, m, g, m, 1.0, 0.9, False)), True)

    cases = {
        "current (20 B read, 8 written)": current,
        "staged (16 B read, 12 written)": staged,
        "in-place, .grad <- d (16, 12)": in_place,
        "AdamW(fused) (16, 12)": adam.step,
    }
    for f in cases.values():
        f()
    times = {k: [] for k in cases}
    for _ in range(a.rounds):
        for k, f in cases.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    adam_ms = med["AdamW(fused) (16, 12)"]
    total = n * a.tensors
    print(f"{a.tensors} tensors, {total:,} float32 parameters, {torch.get_num_threads()} threads")
    for k, v in med.items():
        print(f"{k:32s} {v * 1e3:8.2f} ms  x AdamW {v / adam_ms:.3f}")


if __name__ == "__main__":
    main()
