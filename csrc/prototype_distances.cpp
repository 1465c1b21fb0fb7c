// protofast C++ CPU kernels: prototype distances reduced over patches (ProtoPNet and family).
//
// Operators (namespace protofast_cpu; the Python side in protofast/_cpp.py builds and loads this file):
//
//   min_distances_forward(x[B,N,D], prototypes[M,D], cosine, channels_first) -> (values[B,M], argmin[B,M] int64)
//   min_distances_backward(grad_values[B,M], x, prototypes, values, argmin, cosine, channels_first)
//       -> (grad_x, grad_prototypes)
//   channels_first = true: x is [B,D,N] (an NCHW map viewed as [B,D,H·W], or unfold's [B,D·h·w,L]), no copy.
//
// Math (SEMANTICS.md §1.2, §1.4). b image, n patch, m prototype, d channel:
//   squared L2 (ProtoPNet):  S[b,n] = Σ_d x[b,n,d]²,  Q[m] = Σ_d p[m,d]²,  G[b,n,m] = Σ_d x[b,n,d]·p[m,d]
//                            dist[b,n,m] = relu(S[b,n] − 2·G[b,n,m] + Q[m])
//   cosine (inputs already unit-normalised by the caller): dist[b,n,m] = 1 − G[b,n,m]   (no clamp)
//   values[b,m] = min_n dist[b,n,m],  argmin[b,m] = first n attaining it (strict "<" while scanning n upwards);
//   the first NaN of a row wins and sticks (value NaN, argmin its index), exactly as torch.min(dim=...).
//
// Backward: the gradient of a min goes to its single argmin n* = argmin[b,m]; with the effective upstream
//   g = grad_values[b,m] if (cosine || values[b,m] > 0) else 0   (relu derivative is 0 at 0, and NaN > 0 is false)
//   squared L2: grad_x[b,n*] += 2g·(x[b,n*] − p[m]),  grad_p[m] += 2g·(p[m] − x[b,n*])
//   cosine:     grad_x[b,n*] += −g·p[m],              grad_p[m] += −g·x[b,n*]
// Both are O(B·M·D); nothing of size B×M×N or B×M×D is ever formed.
//
// Forward tiling (a fused GEMM whose epilogue is the min/argmin reduction over patches):
//   * the prototypes are packed once per call into zero-padded panels Pt[j][d][c] = p[j·NR + c][d]
//     (NR = 2 SIMD vectors of prototypes side by side: 32 floats or 16 doubles with AVX-512);
//   * the N patches of an image are split into balanced row blocks of at most kMaxRows rows (N = 49 → 5 blocks
//     of 10,10,10,10,9);
//   * the microkernel (distance_tile) computes an MR × NR tile of dot products in registers: for every channel
//     d it loads the NR prototype values Pt[j][d] and, for every patch row r, broadcasts x[r][d] and FMAs it
//     into the accumulators. Its epilogue turns the tile into distances and folds it into a running
//     min/argmin per prototype (vectorised over prototypes, so the reduction over patches is element-wise);
//   * work items are (image b, panel j) pairs in b-major order, handed to the threads in small chunks: an
//     image's patches stay in L1 while the panels stream from L2.
//
// Exact ties. Two identical patch vectors must get bitwise identical distances whichever row block or tile
// they fall in, so that "first occurrence" is honoured. Every dot product is therefore accumulated in the same
// order (sequential over d, one explicit FMA per step, from the same starting value) for every row and
// column; short panels are padded with zero prototypes instead of a separate tail loop; S and Q come from one
// function for every row; and the build uses -ffp-contract=off, so the compiler never fuses a multiply and an
// add in one instantiation and not in another.
//
// Backward: see "Backward" below (two passes, each bound by reading one D-row per (image, prototype) pair).
//
// Lean build: only ATen core headers and torch/library.h (no torch/extension.h, no pybind11).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace protofast {
namespace {

// ---------------------------------------------------------------------------------------------------------
// SIMD vectors via GCC/Clang vector extensions: portable C++, and AVX-512 (zmm FMAs) with -march=native on a
// machine that has it. Without AVX-512 there are 16 vector registers, so the tile has fewer rows.
// ---------------------------------------------------------------------------------------------------------
#if defined(__AVX512F__)
#define PF_VECTOR_BYTES 64
#ifndef PF_MAX_ROWS
#define PF_MAX_ROWS 12  // MR ≤ 12: 12×2 accumulators + 2 prototype vectors + temporaries ≤ 32 zmm
#endif
#else
#if defined(__AVX__)
#define PF_VECTOR_BYTES 32
#else
#define PF_VECTOR_BYTES 16
#endif
#ifndef PF_MAX_ROWS
#define PF_MAX_ROWS 6  // 6×2 accumulators + 2 prototype vectors ≤ 16 ymm / xmm
#endif
#endif
// Row-block height per dtype: float is the fast path; float64 (gradcheck, tests) gets a few small tiles only,
// which keeps the number of microkernel instantiations, and the compile time, down.
template <typename T>
constexpr int kMaxRows = std::is_same_v<T, float> ? PF_MAX_ROWS : 4;
constexpr int kPanelVectors = 2;  // NR = 2 vectors of prototypes per panel (32 floats / 16 doubles)

template <typename T>
struct Simd;

template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(PF_VECTOR_BYTES)));
  typedef int32_t I __attribute__((vector_size(PF_VECTOR_BYTES)));  // lane-matching integers (masks, argmin)
  typedef int32_t Index;
  static constexpr int kLanes = PF_VECTOR_BYTES / 4;
};

template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(PF_VECTOR_BYTES)));
  typedef int64_t I __attribute__((vector_size(PF_VECTOR_BYTES)));
  typedef int64_t Index;
  static constexpr int kLanes = PF_VECTOR_BYTES / 8;
};

// Unaligned loads/stores (memcpy compiles to one vmovups).
template <typename V, typename T>
inline V load(const T* ptr) {
  V v;
  std::memcpy(&v, ptr, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void store(T* ptr, const V& v) {
  std::memcpy(ptr, &v, sizeof(V));
}

// Broadcast a scalar to every lane: one vbroadcastss. (s − 0 is exactly s for every s, -0 and NaN included,
// so the compiler drops the subtraction; "V{} + s" would cost a real add, since 0 + (-0) = +0.)
template <typename V, typename T>
inline V splat(T s) {
  return s - V{};
}

// Explicit fused multiply-add, so that every rounding is spelled out in the source (the build uses
// -ffp-contract=off: the compiler never fuses a*b + c on its own, in one place and not in another).
//   fmadd(a, b, c) = a·b + c with one rounding where the CPU has FMA (two roundings otherwise, everywhere).
// relu(v) = v < 0 ? 0 : v, keeping NaN (vmaxps returns its second operand when either is NaN).
#if defined(__AVX512F__)
inline Simd<float>::V fmadd(Simd<float>::V a, Simd<float>::V b, Simd<float>::V c) {
  return (Simd<float>::V)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
}
inline Simd<double>::V fmadd(Simd<double>::V a, Simd<double>::V b, Simd<double>::V c) {
  return (Simd<double>::V)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
}
// (The all-ones masked form is a plain vmaxps; unlike _mm512_max_ps it does not trip GCC 12's
// -Wuninitialized on the intrinsic's internal _mm512_undefined_ps.)
inline Simd<float>::V relu(Simd<float>::V v) {
  return (Simd<float>::V)_mm512_mask_max_ps((__m512)v, __mmask16(0xFFFF), _mm512_setzero_ps(), (__m512)v);
}
inline Simd<double>::V relu(Simd<double>::V v) {
  return (Simd<double>::V)_mm512_mask_max_pd((__m512d)v, __mmask8(0xFF), _mm512_setzero_pd(), (__m512d)v);
}
#else
#if defined(__FMA__)
inline Simd<float>::V fmadd(Simd<float>::V a, Simd<float>::V b, Simd<float>::V c) {
  return (Simd<float>::V)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
}
inline Simd<double>::V fmadd(Simd<double>::V a, Simd<double>::V b, Simd<double>::V c) {
  return (Simd<double>::V)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
}
#else
template <typename V>
inline V fmadd(V a, V b, V c) {
  return a * b + c;
}
#endif
template <typename V>
inline V relu(V v) {
  return v < 0 ? V{} : v;
}
#endif

// Σ_d v[d]², computed the same way for every row (S) and every prototype (Q), so identical vectors give
// identical sums: two vector accumulators, then a fixed pairwise (tree) reduction over the lanes.
template <typename T>
T sum_squares(const T* v, int64_t D) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  V acc0 = {}, acc1 = {};
  int64_t d = 0;
  for (; d + 2 * L <= D; d += 2 * L) {
    const V a = load<V>(v + d), c = load<V>(v + d + L);
    acc0 += a * a;
    acc1 += c * c;
  }
  for (; d + L <= D; d += L) {
    const V a = load<V>(v + d);
    acc0 += a * a;
  }
  alignas(64) T lanes[L];
  store(lanes, acc0 + acc1);
  for (int width = L / 2; width >= 1; width /= 2)
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  T s = lanes[0];
  for (; d < D; ++d) s += v[d] * v[d];
  return s;
}

// ---------------------------------------------------------------------------------------------------------
// Forward microkernel: MR patch rows (n0 .. n0+MR−1) × NR prototype columns (one panel).
//
//   squared L2: acc[r][c] = −Q[c]/2 + Σ_d x[r][d]·Pt[d][c]   (from −Q/2, sequential over d, one FMA per d)
//               dist[r][c] = relu(S[r] − 2·acc[r][c])  = relu(S − 2G + Q)
//   cosine:     acc[r][c] = Σ_d x[r][d]·Pt[d][c]  (from 0),   dist[r][c] = 1 − acc[r][c]
//   then for r = 0..MR−1 in increasing n:  if dist < run_min, or dist is NaN while run_min is not (the first
//   NaN wins and sticks):  run_min = dist, run_arg = n0 + r.
// Starting the accumulator at −Q/2 (exact) folds "+ Q" into the dot product: one FMA per distance in the
// epilogue instead of three operations. The value differs from (S − 2G) + Q only by rounding, and it is the
// same instruction sequence for every row and column, so identical patches still tie exactly.
// ---------------------------------------------------------------------------------------------------------
template <typename T, int MR, bool kCosine, bool kChannelsFirst>
void distance_tile(const T* __restrict__ x, int64_t D, int64_t ldx, const T* __restrict__ panel,
                   const T* __restrict__ S,
                   const T* __restrict__ Q, T* __restrict__ run_min, typename Simd<T>::Index* __restrict__ run_arg,
                   typename Simd<T>::Index n0) {
  using V = typename Simd<T>::V;
  using I = typename Simd<T>::I;
  constexpr int L = Simd<T>::kLanes;
  constexpr int NV = kPanelVectors;
  constexpr int NR = NV * L;

  V acc[MR][NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const V init = kCosine ? V{} : load<V>(Q + v * L) * T(-0.5);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) acc[r][v] = init;
  }

  for (int64_t d = 0; d < D; ++d) {
    V pv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) pv[v] = load<V>(panel + d * NR + v * L);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      // broadcast x[r][d]: rows of ldx channels, or (channels first) channels of ldx patches
      const V xb = splat<V>(kChannelsFirst ? x[d * ldx + r] : x[r * ldx + d]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = fmadd(xb, pv[v], acc[r][v]);
    }
  }

  // Epilogue: distances, folded into the running min/argmin over patches (rows in increasing n).
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    V cur = load<V>(run_min + v * L);
    I arg = load<I>(run_arg + v * L);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      V dist;
      if (kCosine)
        dist = T(1) - acc[r][v];
      else
        dist = relu(fmadd(acc[r][v], splat<V>(T(-2)), splat<V>(S[r])));
      // take = !(dist >= cur) & (cur == cur): dist < cur, or dist NaN while cur is not NaN.
      const I take = ~(dist >= cur) & (cur == cur);
      cur = take ? dist : cur;
      arg = take ? splat<I>(static_cast<typename Simd<T>::Index>(n0 + r)) : arg;
    }
    store(run_min + v * L, cur);
    store(run_arg + v * L, arg);
  }
}

template <typename T, bool kCosine>
using TileFn = void (*)(const T*, int64_t, int64_t, const T*, const T*, const T*, T*, typename Simd<T>::Index*,
                        typename Simd<T>::Index);

template <typename T, bool kCosine, bool kChannelsFirst, int... MRs>
constexpr auto make_tile_table(std::integer_sequence<int, MRs...>) {
  return std::array<TileFn<T, kCosine>, sizeof...(MRs)>{&distance_tile<T, MRs + 1, kCosine, kChannelsFirst>...};
}

// Patch energies of one image stored channels first, xb[d][n]: S[n] = Σ_d xb[d][n]², accumulated over d in the
// same order (one multiply, one add) for every patch, so identical patches get identical energies.
template <typename T>
void column_sum_squares(const T* __restrict__ xb, int64_t N, int64_t D, T* __restrict__ S) {
  for (int64_t n = 0; n < N; ++n) S[n] = T(0);
  for (int64_t d = 0; d < D; ++d) {
    const T* row = xb + d * N;
    for (int64_t n = 0; n < N; ++n) S[n] += row[n] * row[n];
  }
}

// x is [B, N, D] (rows of channels) or, with kChannelsFirst, [B, D, N] (an NCHW map viewed as [B, D, H·W]:
// no transposed copy is needed; the microkernel broadcasts x[d][n0 + r] from consecutive addresses).
template <typename T, bool kCosine, bool kChannelsFirst>
void forward_kernel(const T* x, const T* p, int64_t B, int64_t N, int64_t M, int64_t D, T* values,
                    int64_t* argmin, T* packed, T* Qpad, T* S) {
  using Index = typename Simd<T>::Index;
  constexpr int L = Simd<T>::kLanes;
  constexpr int NR = kPanelVectors * L;
  const int64_t J = (M + NR - 1) / NR;  // number of prototype panels

  // Preparation, one parallel region: units [0, J) pack the prototypes into zero-padded panels
  // Pt[j][d][c] and compute Q (0 for padding columns); units [J, J + S_units) compute the patch energies S.
  constexpr int64_t kRowsPerUnit = 256;
  const int64_t S_units = kCosine ? 0 : (kChannelsFirst ? B : (B * N + kRowsPerUnit - 1) / kRowsPerUnit);
  at::parallel_for(0, J + S_units, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      if (u < J) {
        T* panel = packed + u * D * NR;
        for (int c = 0; c < NR; ++c) {
          const int64_t m = u * NR + c;
          if (m < M) {
            const T* pm = p + m * D;
            for (int64_t d = 0; d < D; ++d) panel[d * NR + c] = pm[d];
            if (!kCosine) Qpad[m] = sum_squares(pm, D);
          } else {
            for (int64_t d = 0; d < D; ++d) panel[d * NR + c] = T(0);
            if (!kCosine) Qpad[m] = T(0);
          }
        }
      } else if (kChannelsFirst) {
        const int64_t b = u - J;
        column_sum_squares(x + b * N * D, N, D, S + b * N);
      } else {
        const int64_t r0 = (u - J) * kRowsPerUnit, r1 = std::min(B * N, r0 + kRowsPerUnit);
        for (int64_t r = r0; r < r1; ++r) S[r] = sum_squares(x + r * D, D);
      }
    }
  });

  static constexpr auto tiles =
      make_tile_table<T, kCosine, kChannelsFirst>(std::make_integer_sequence<int, kMaxRows<T>>{});
  const int64_t ldx = kChannelsFirst ? N : D;
  const int64_t blocks = (N + kMaxRows<T> - 1) / kMaxRows<T>;  // balanced row blocks of ≤ kMaxRows patches
  const int64_t base_rows = N / blocks, extra_rows = N % blocks;

  // Work items (image b, panel j) in b-major order, handed out in chunks from a shared counter (dynamic
  // scheduling: a core slowed down by another process does not hold the others up). Every item is computed
  // the same way whichever thread takes it, so the results do not depend on the schedule.
  const int64_t items = B * J;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(8, items / (8 * std::max(1, at::get_num_threads()))));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    alignas(64) T run_min[NR];
    alignas(64) Index run_arg[NR];
    for (int64_t begin = next.fetch_add(chunk); begin < items; begin = next.fetch_add(chunk)) {
      const int64_t end = std::min(items, begin + chunk);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / J, j = item % J;
        for (int c = 0; c < NR; ++c) {
          run_min[c] = std::numeric_limits<T>::infinity();
          run_arg[c] = 0;
        }
        const T* xb = x + b * N * D;
        const T* Sb = kCosine ? nullptr : S + b * N;
        const T* panel = packed + j * D * NR;
        const T* Qj = Qpad + j * NR;
        int64_t n0 = 0;
        for (int64_t blk = 0; blk < blocks; ++blk) {
          const int64_t rows = base_rows + (blk < extra_rows ? 1 : 0);
          tiles[rows - 1](kChannelsFirst ? xb + n0 : xb + n0 * D, D, ldx, panel, kCosine ? nullptr : Sb + n0, Qj,
                          run_min, run_arg, static_cast<Index>(n0));
          n0 += rows;
        }
        const int64_t m0 = j * NR;
        const int64_t cols = std::min<int64_t>(NR, M - m0);
        T* vb = values + b * M + m0;
        int64_t* ab = argmin + b * M + m0;
        for (int64_t c = 0; c < cols; ++c) {
          vb[c] = run_min[c];
          ab[c] = static_cast<int64_t>(run_arg[c]);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------------------------------------

// Effective upstream coefficient for (b, m): squared L2 → 2g where the relu passes (values > 0; NaN > 0 is
// false), else 0; cosine → −g. Then grad_x[b,n*] += coef·(x − p) (L2) or coef·p (cosine), and
// grad_p[m] += coef·(p − x) (L2) or coef·x (cosine). Pairs whose coefficient is 0 are skipped: no work for
// sparse upstream gradients, and a clamped pair contributes an exact zero even when its rows hold inf.
template <typename T, bool kCosine>
inline T coefficient(T grad, T value) {
  if (kCosine) return -grad;
  return value > T(0) ? T(2) * grad : T(0);
}

// coef[i] = coefficient(grad[i], value[i]) for i < count, vectorised.
template <typename T, bool kCosine>
inline void coefficients(const T* __restrict__ grad, const T* __restrict__ value, int64_t count, T* __restrict__ coef) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  int64_t i = 0;
  for (; i + L <= count; i += L) {
    const V g = load<V>(grad + i);
    V c;
    if (kCosine) {
      c = -g;
    } else {
      const V v = load<V>(value + i);
      c = v > T(0) ? g + g : V{};
    }
    store(coef + i, c);
  }
  for (; i < count; ++i) coef[i] = coefficient<T, kCosine>(grad[i], value[i]);
}

#ifndef PF_PREFETCH_AHEAD
#define PF_PREFETCH_AHEAD 8
#endif
constexpr int kPrefetchAhead = PF_PREFETCH_AHEAD;  // rows prefetched ahead when gathering rows from L2

// The two gradients are computed in two passes, each a sum over the B·M (image, prototype) pairs of a
// coefficient times a D-row:
//   pass 1, grad_x, parallel over images b: per image, the prototypes are bucketed by their argmin patch
//     (linked lists threaded through the prototypes, increasing m), and each patch row sums its bucket in
//     registers, grad_x[b,n] = Σ_{m: argmin[b,m]=n} coef·(x[b,n] − p[m]), and is written once;
//   pass 2, grad_p, parallel over prototypes m: grad_p[m] = Σ_b coef·(p[m] − x[b, argmin[b,m]]) in registers,
//     over blocks of images whose patches fit in L2 (the block sums are added in increasing b).
// Every sum runs in an order fixed by the data alone (increasing m, increasing b), never by the number of
// threads or the schedule: the gradients are deterministic and need no atomics. Both passes read one D-row
// per pair from L2 (B·M·D·sizeof(T) bytes each); they are bound by that, not by arithmetic, so the rows are
// prefetched a few pairs ahead.

// Pass 1 for one image and the channels [d0, d0 + CH·L): for each patch n with a non-empty bucket,
//   grad_x[b,n] = Σ_{m in bucket n, increasing} coef[m]·(x[b,n] − p[m])      (cosine: coef[m]·p[m])
// with CH vector accumulators in registers. The buckets are chained into one list (next[tail[n]] = head of
// the next non-empty bucket), so the prototype rows, which sit in L2 in no particular order, can be
// prefetched kPrefetchAhead rows ahead across bucket boundaries.
template <typename T, int CH, bool kCosine>
void grad_x_buckets(const T* __restrict__ xb, const T* __restrict__ p, const T* __restrict__ coef,
                    const int32_t* __restrict__ next, const int32_t* __restrict__ head,
                    const int32_t* __restrict__ tail, int64_t N, int64_t D, int64_t d0, T* __restrict__ gxb) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  int64_t first = -1;
  for (int64_t n = 0; n < N && first < 0; ++n) first = head[n];
  int64_t ahead = first;
  for (int s = 0; s < kPrefetchAhead && ahead >= 0; ++s) ahead = next[ahead];
  for (int64_t n = 0; n < N; ++n) {
    if (head[n] < 0) continue;
    V acc[CH], bv[CH];
#pragma GCC unroll 16
    for (int k = 0; k < CH; ++k) {
      acc[k] = V{};
      if (!kCosine) bv[k] = load<V>(xb + n * D + d0 + k * L);
    }
    for (int64_t m = head[n];; m = next[m]) {
      if (ahead >= 0) {
        const char* row = reinterpret_cast<const char*>(p + ahead * D + d0);
#pragma GCC unroll 16
        for (int k = 0; k < CH * L * int(sizeof(T)); k += 64) __builtin_prefetch(row + k, 0, 3);
        ahead = next[ahead];
      }
      const T* pm = p + m * D + d0;
      const V c = splat<V>(coef[m]);
#pragma GCC unroll 16
      for (int k = 0; k < CH; ++k) {
        const V pv = load<V>(pm + k * L);
        acc[k] = fmadd(c, kCosine ? pv : bv[k] - pv, acc[k]);
      }
      if (m == tail[n]) break;
    }
#pragma GCC unroll 16
    for (int k = 0; k < CH; ++k) store(gxb + n * D + d0 + k * L, acc[k]);
  }
}

// Pass 2 for one prototype m, the images of one block and the channels [d0, d0 + CH·L):
//   out[d0:] (=, or += when !first) Σ_{i < count} coef[i·stride]·(p[m] − x[row[i·stride]])   (cosine: coef·x)
// summed in increasing image order with CH vector accumulators in registers; the patch rows are prefetched
// kPrefetchAhead images ahead.
template <typename T, int CH, bool kCosine>
inline void grad_p_rows(const T* __restrict__ pm, const T* __restrict__ x, const int64_t* __restrict__ row,
                        const T* __restrict__ coef, int64_t stride, int64_t count, int64_t D, int64_t d0, bool first,
                        T* __restrict__ out) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  V acc[CH], pv[CH];
#pragma GCC unroll 16
  for (int k = 0; k < CH; ++k) {
    acc[k] = V{};
    if (!kCosine) pv[k] = load<V>(pm + d0 + k * L);
  }
  for (int64_t i = 0; i < count; ++i) {
    if (i + kPrefetchAhead < count) {
      const char* ahead = reinterpret_cast<const char*>(x + row[(i + kPrefetchAhead) * stride] * D + d0);
#pragma GCC unroll 16
      for (int k = 0; k < CH * L * int(sizeof(T)); k += 64) __builtin_prefetch(ahead + k, 0, 3);
    }
    const T cs = coef[i * stride];
    if (cs == T(0)) continue;
    const T* xr = x + row[i * stride] * D + d0;
    const V c = splat<V>(cs);
#pragma GCC unroll 16
    for (int k = 0; k < CH; ++k) {
      const V xv = load<V>(xr + k * L);
      acc[k] = fmadd(c, kCosine ? xv : pv[k] - xv, acc[k]);
    }
  }
#pragma GCC unroll 16
  for (int k = 0; k < CH; ++k) store(out + d0 + k * L, first ? acc[k] : load<V>(out + d0 + k * L) + acc[k]);
}

// The whole row: chunks of 8 vectors (D = 128 floats in one pass), single vectors, then a scalar tail of D.
template <typename T, bool kCosine>
void grad_p_row(const T* pm, const T* x, const int64_t* row, const T* coef, int64_t stride, int64_t count,
                int64_t D, bool first, T* out) {
  constexpr int L = Simd<T>::kLanes;
  int64_t d0 = 0;
  for (; d0 + 8 * L <= D; d0 += 8 * L) grad_p_rows<T, 8, kCosine>(pm, x, row, coef, stride, count, D, d0, first, out);
  for (; d0 + L <= D; d0 += L) grad_p_rows<T, 1, kCosine>(pm, x, row, coef, stride, count, D, d0, first, out);
  for (; d0 < D; ++d0) {
    T acc = 0;
    for (int64_t i = 0; i < count; ++i) {
      const T c = coef[i * stride];
      if (c == T(0)) continue;
      const T xv = x[row[i * stride] * D + d0];
      acc += c * (kCosine ? xv : pm[d0] - xv);
    }
    out[d0] = first ? acc : out[d0] + acc;
  }
}

// x is [B, N, D] (patch rows); grad_x is written [B, N, D], or [B, D, N] with kGradChannelsFirst (each image's
// rows are then assembled in a per-thread buffer and transposed out while they are in L1).
template <typename T, bool kCosine, bool kGradChannelsFirst>
void backward_kernel(const T* grad_values, const T* x, const T* p, const T* values, const int64_t* argmin,
                     const int64_t B, const int64_t N, const int64_t M, const int64_t D, T* grad_x, T* grad_p) {
  // grad_x: parallel over images, sequential over prototypes. Per image, thread the prototypes with a nonzero
  // coefficient into one linked list per argmin patch (a bucket, in increasing m); each patch row then sums its
  // bucket in registers and is written once (grad_x_buckets).
  at::parallel_for(0, B, 1, [=](int64_t b0, int64_t b1) {
    std::vector<T> coef_buf(M);
    std::vector<int32_t> next_buf(M), head_buf(N), tail_buf(N);
    std::vector<T> rows_buf(kGradChannelsFirst ? N * D : 0);
    T* __restrict__ coef = coef_buf.data();
    int32_t* __restrict__ next = next_buf.data();
    int32_t* __restrict__ head = head_buf.data();
    int32_t* __restrict__ tail = tail_buf.data();
    constexpr int L = Simd<T>::kLanes;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t* __restrict__ ab = argmin + b * M;
      coefficients<T, kCosine>(grad_values + b * M, values + b * M, M, coef);
      std::fill(head, head + N, -1);
      bool in_range = true;  // (a vectorised check first, the message only when it fails)
      for (int64_t m = 0; m < M; ++m) in_range &= (ab[m] >= 0) & (ab[m] < N);
      if (!in_range)
        for (int64_t m = 0; m < M; ++m)
          TORCH_CHECK(ab[m] >= 0 && ab[m] < N, "min_distances_backward: argmin[", b, ", ", m, "] = ", ab[m],
                      " is out of range [0, ", N, ")");
      for (int64_t m = M - 1; m >= 0; --m) {  // pushing at the head, in decreasing m, leaves lists in increasing m
        const int64_t n = ab[m];
        if (coef[m] == T(0)) continue;
        if (head[n] < 0) tail[n] = static_cast<int32_t>(m);
        next[m] = head[n];
        head[n] = static_cast<int32_t>(m);
      }
      // Chain the buckets: the tail of each non-empty bucket points to the head of the next one.
      int64_t last = -1;
      for (int64_t n = 0; n < N; ++n) {
        if (head[n] < 0) continue;
        if (last >= 0) next[tail[last]] = head[n];
        last = n;
      }
      const T* xb = x + b * N * D;
      T* gxb = kGradChannelsFirst ? rows_buf.data() : grad_x + b * N * D;
      for (int64_t n = 0; n < N; ++n)
        if (head[n] < 0) std::fill(gxb + n * D, gxb + (n + 1) * D, T(0));
      int64_t d0 = 0;
      for (; d0 + 8 * L <= D; d0 += 8 * L) grad_x_buckets<T, 8, kCosine>(xb, p, coef, next, head, tail, N, D, d0, gxb);
      for (; d0 + L <= D; d0 += L) grad_x_buckets<T, 1, kCosine>(xb, p, coef, next, head, tail, N, D, d0, gxb);
      for (; d0 < D; ++d0) {  // scalar tail of D
        for (int64_t n = 0; n < N; ++n) {
          if (head[n] < 0) continue;
          T acc = 0;
          for (int64_t m = head[n];; m = next[m]) {
            acc += coef[m] * (kCosine ? p[m * D + d0] : xb[n * D + d0] - p[m * D + d0]);
            if (m == tail[n]) break;
          }
          gxb[n * D + d0] = acc;
        }
      }
      if (kGradChannelsFirst) {  // rows [N, D] -> grad_x[b] as [D, N]
        T* out = grad_x + b * N * D;
        for (int64_t d = 0; d < D; ++d)
          for (int64_t n = 0; n < N; ++n) out[d * N + n] = gxb[n * D + d];
      }
    }
  });

  // grad_p: parallel over prototypes, sequential over images (deterministic, no atomics). The images are
  // taken in blocks whose patches fit in L2 (rows are gathered from them in no particular order); for each
  // block, a group of kGroup consecutive prototypes first gathers, image by image, its coefficients and
  // argmin patch rows (reading grad_values, values and argmin along rows, vectorised), then each prototype
  // sums over the block's images and adds that to what the earlier blocks left in grad_p.
  constexpr int64_t kGroup = 16;
  const int64_t block = std::max<int64_t>(1, (int64_t(512) << 10) / (N * D * int64_t(sizeof(T))));
  at::parallel_for(0, (M + kGroup - 1) / kGroup, 1, [=](int64_t g0, int64_t g1) {
    std::vector<T> coef_buf(block * kGroup);
    std::vector<int64_t> row_buf(block * kGroup);
    T* __restrict__ coef = coef_buf.data();
    int64_t* __restrict__ row = row_buf.data();
    for (int64_t b0 = 0; b0 < B; b0 += block) {
      const int64_t bcount = std::min(block, B - b0);
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t m0 = g * kGroup, mcount = std::min(kGroup, M - m0);
        for (int64_t i = 0; i < bcount; ++i) {
          const int64_t b = b0 + i;
          coefficients<T, kCosine>(grad_values + b * M + m0, values + b * M + m0, mcount, coef + i * kGroup);
          const int64_t* ab = argmin + b * M + m0;  // range-checked by the grad_x pass above
          for (int64_t j = 0; j < mcount; ++j) row[i * kGroup + j] = b * N + ab[j];
        }
        for (int64_t j = 0; j < mcount; ++j) {
          const int64_t m = m0 + j;
          grad_p_row<T, kCosine>(p + m * D, x, row + j, coef + j, kGroup, bcount, D, b0 == 0, grad_p + m * D);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Operator entry points.
// ---------------------------------------------------------------------------------------------------------

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& prototypes) {
  TORCH_CHECK(x.dim() == 3, op, ": x must have shape [B, N, D], got ", x.sizes());
  TORCH_CHECK(prototypes.dim() == 2, op, ": prototypes must have shape [M, D], got ", prototypes.sizes());
  TORCH_CHECK(x.size(2) == prototypes.size(1), op, ": channel mismatch, x has D = ", x.size(2),
              " but prototypes have D = ", prototypes.size(1));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(prototypes.scalar_type() == x.scalar_type(), op, ": prototypes dtype ", prototypes.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && prototypes.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(x.size(1) >= 1, op, ": need at least one patch (N >= 1)");
  TORCH_CHECK(x.size(2) >= 1, op, ": need at least one channel (D >= 1)");
  TORCH_CHECK(x.size(1) <= std::numeric_limits<int32_t>::max() &&
                  prototypes.size(0) <= std::numeric_limits<int32_t>::max(),
              op, ": too many patches or prototypes (at most 2^31 - 1)");
}

// channels_first: x is [B, D, N] (e.g. an NCHW map viewed as [B, D, H·W]) instead of [B, N, D].
std::tuple<at::Tensor, at::Tensor> min_distances_forward(const at::Tensor& x_in, const at::Tensor& prototypes_in,
                                                         bool cosine, bool channels_first) {
  check_inputs("min_distances_forward", channels_first ? x_in.transpose(1, 2) : x_in, prototypes_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor prototypes = prototypes_in.contiguous();
  const int64_t B = x.size(0), M = prototypes.size(0);
  const int64_t N = channels_first ? x.size(2) : x.size(1), D = channels_first ? x.size(1) : x.size(2);

  at::Tensor values = at::empty({B, M}, x.options());
  at::Tensor argmin = at::empty({B, M}, x.options().dtype(at::kLong));
  if (B == 0 || M == 0) return {values, argmin};

  const bool is_float = x.scalar_type() == at::kFloat;
  const int64_t NR = kPanelVectors * (is_float ? Simd<float>::kLanes : Simd<double>::kLanes);
  const int64_t J = (M + NR - 1) / NR;
  at::Tensor packed = at::empty({J * D * NR}, x.options());
  at::Tensor Qpad = at::empty({J * NR}, x.options());
  at::Tensor S = at::empty({cosine ? 1 : B * N}, x.options());

#define PF_FORWARD(T, COS, CF)                                                                                   \
  forward_kernel<T, COS, CF>(x.const_data_ptr<T>(), prototypes.const_data_ptr<T>(), B, N, M, D,                 \
                             values.mutable_data_ptr<T>(), argmin.mutable_data_ptr<int64_t>(),                    \
                             packed.mutable_data_ptr<T>(), Qpad.mutable_data_ptr<T>(), S.mutable_data_ptr<T>())
#define PF_FORWARD_LAYOUT(T, COS)            \
  if (channels_first) PF_FORWARD(T, COS, true); \
  else PF_FORWARD(T, COS, false)
  if (is_float) {
    if (cosine) { PF_FORWARD_LAYOUT(float, true); } else { PF_FORWARD_LAYOUT(float, false); }
  } else {
    if (cosine) { PF_FORWARD_LAYOUT(double, true); } else { PF_FORWARD_LAYOUT(double, false); }
  }
#undef PF_FORWARD_LAYOUT
#undef PF_FORWARD
  return {values, argmin};
}

// [B, D, N] -> [B, N, D], one image at a time (an image is a few tens of KB: its transpose stays in L1; a generic
// strided copy of the whole tensor is several times slower).
at::Tensor transpose_images(const at::Tensor& x_in) {
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), D = x.size(1), N = x.size(2);
  at::Tensor out = at::empty({B, N, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "transpose_images", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* in = src + b * D * N;
        scalar_t* o = dst + b * N * D;
        for (int64_t n = 0; n < N; ++n)
          for (int64_t d = 0; d < D; ++d) o[n * D + d] = in[d * N + n];
      }
    });
  });
  return out;
}

// channels_first: x is [B, D, N] and grad_x is returned in that layout. The passes below read patch rows, so x
// is transposed once here ([B, N, D], one copy); the forward, which dominates, reads the channels-first map as is.
std::tuple<at::Tensor, at::Tensor> min_distances_backward_rows(const at::Tensor& grad_values_in,
                                                               const at::Tensor& x_in, const at::Tensor& prototypes_in,
                                                               const at::Tensor& values_in,
                                                               const at::Tensor& argmin_in, bool cosine,
                                                               bool grad_channels_first);

std::tuple<at::Tensor, at::Tensor> min_distances_backward(const at::Tensor& grad_values, const at::Tensor& x,
                                                          const at::Tensor& prototypes, const at::Tensor& values,
                                                          const at::Tensor& argmin, bool cosine, bool channels_first) {
  if (!channels_first) return min_distances_backward_rows(grad_values, x, prototypes, values, argmin, cosine, false);
  return min_distances_backward_rows(grad_values, transpose_images(x), prototypes, values, argmin, cosine, true);
}

std::tuple<at::Tensor, at::Tensor> min_distances_backward_rows(const at::Tensor& grad_values_in,
                                                               const at::Tensor& x_in, const at::Tensor& prototypes_in,
                                                               const at::Tensor& values_in,
                                                               const at::Tensor& argmin_in, bool cosine,
                                                               bool grad_channels_first) {
  const char* op = "min_distances_backward";
  check_inputs(op, x_in, prototypes_in);
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2), M = prototypes_in.size(0);
  TORCH_CHECK(grad_values_in.dim() == 2 && grad_values_in.size(0) == B && grad_values_in.size(1) == M, op,
              ": grad_values must have shape [", B, ", ", M, "], got ", grad_values_in.sizes());
  TORCH_CHECK(values_in.dim() == 2 && values_in.size(0) == B && values_in.size(1) == M, op,
              ": values must have shape [", B, ", ", M, "], got ", values_in.sizes());
  TORCH_CHECK(argmin_in.dim() == 2 && argmin_in.size(0) == B && argmin_in.size(1) == M, op,
              ": argmin must have shape [", B, ", ", M, "], got ", argmin_in.sizes());
  TORCH_CHECK(grad_values_in.scalar_type() == x_in.scalar_type() && values_in.scalar_type() == x_in.scalar_type(),
              op, ": grad_values and values must have the dtype of x (", x_in.scalar_type(), ")");
  TORCH_CHECK(argmin_in.scalar_type() == at::kLong, op, ": argmin must be int64, got ", argmin_in.scalar_type());

  const at::Tensor x = x_in.contiguous();
  const at::Tensor prototypes = prototypes_in.contiguous();
  const at::Tensor grad_values = grad_values_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  const at::Tensor argmin = argmin_in.contiguous();

  at::Tensor grad_x = grad_channels_first ? at::empty({B, D, N}, x.options()) : at::empty({B, N, D}, x.options());
  at::Tensor grad_p = at::empty({M, D}, x.options());
  if (B == 0 || M == 0) {
    grad_x.zero_();
    grad_p.zero_();
    return {grad_x, grad_p};
  }

#define PF_BACKWARD(T, COS, CF)                                                                                  \
  backward_kernel<T, COS, CF>(grad_values.const_data_ptr<T>(), x.const_data_ptr<T>(),                           \
                              prototypes.const_data_ptr<T>(), values.const_data_ptr<T>(),                          \
                              argmin.const_data_ptr<int64_t>(), B, N, M, D, grad_x.mutable_data_ptr<T>(),          \
                              grad_p.mutable_data_ptr<T>())
#define PF_BACKWARD_LAYOUT(T, COS)                 \
  if (grad_channels_first) PF_BACKWARD(T, COS, true); \
  else PF_BACKWARD(T, COS, false)
  if (x.scalar_type() == at::kFloat) {
    if (cosine) { PF_BACKWARD_LAYOUT(float, true); } else { PF_BACKWARD_LAYOUT(float, false); }
  } else {
    if (cosine) { PF_BACKWARD_LAYOUT(double, true); } else { PF_BACKWARD_LAYOUT(double, false); }
  }
#undef PF_BACKWARD_LAYOUT
#undef PF_BACKWARD
  return {grad_x, grad_p};
}

}  // namespace
}  // namespace protofast

TORCH_LIBRARY(protofast_cpu, m) {
  m.def(
      "min_distances_forward(Tensor x, Tensor prototypes, bool cosine, bool channels_first=False) -> "
      "(Tensor values, Tensor argmin)");
  m.def(
      "min_distances_backward(Tensor grad_values, Tensor x, Tensor prototypes, Tensor values, Tensor argmin, "
      "bool cosine, bool channels_first=False) -> (Tensor grad_x, Tensor grad_prototypes)");
}

TORCH_LIBRARY_IMPL(protofast_cpu, CPU, m) {
  m.impl("min_distances_forward", &protofast::min_distances_forward);
  m.impl("min_distances_backward", &protofast::min_distances_backward);
}
