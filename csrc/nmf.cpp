// protofast C++ CPU kernels: batched NMF multiplicative updates for ProtoNMF (SEMANTICS.md §5.1).
//
// Operators (namespace protofast_cpu, added to the library that prototype_distances.cpp defines):
//
//   nmf_step(A[K,n,D], lengths[K], E[K,n,p]!, B[K,p,D]!, active[K], eps, update_basis, gram, a_sq[K], inner=1)
//       -> gram_sq [K] float64 (empty unless gram)
//     One multiplicative update of every active class, in place:
//       E ← E ⊙ (A Bᵀ) / (E B Bᵀ),  then  B ← B ⊙ (Eᵀ A) / (Eᵀ E B)   (denominator entries == 0 become eps)
//     in ONE streaming pass over A: for each row tile of a class, in chunks of 16 rows: A_i Bᵀ (p dots per row,
//     register blocks of 4 rows × ≤ 4 prototypes), the new E_i from B Bᵀ (p×p, computed once per class) for the
//     16 rows at once (one vector lane per row), and, while the chunk is in cache, its share of the tile's partial
//     Eᵀ A (p×D) and Eᵀ E (p×p); then per class the tiles' partials are summed in tile order and B is updated
//     once. Nothing n×D besides A is written or read.
//     With gram: ‖A‖² − 2⟨Eᵀ A, B⟩ + ⟨Eᵀ E, B Bᵀ⟩ of the new factors, in double (a_sq = ‖A‖² per class).
//     update_basis = false: B is fixed (nmf_encode), only E is updated.
//     inner > 1 (accelerated MU, Gillis & Glineur 2012): each row's E rule is applied `inner` times with its
//     A_i Bᵀ and B Bᵀ fixed, then the B rule `inner` times with Eᵀ A and Eᵀ E fixed; still one pass over A.
//   nmf_run(A, lengths, E!, B!, max_iter, tol, check_every, eps, update_basis, squared, gram, inner=1)
//       -> (n_iter, err)
//     The whole factorisation: each class runs its update loop with DFF's stopping rule on one thread (classes
//     in parallel), bitwise the same as calling nmf_step / nmf_residual update by update.
//   nmf_residual(A, lengths, E, B, active) -> [K] float64: ‖A_k − E_k B_k‖²_F of the active classes (0 for the
//     others), the residual streamed row by row (per row in 16 partial sums of the input dtype, then in double).
//   nmf_sq_norms(A, lengths) -> [K] float64: ‖A_k‖²_F.
//
// Work is split into (class, row tile) tasks run with at::parallel_for; the tiles have a fixed number of rows
// and partial sums are reduced in a fixed order, so a class's results are bitwise the same for any number of
// threads and whichever other classes are in the batch (the caller may run classes in cache-sized blocks).
// Rows ≥ lengths[k] (padding) are never read. The caller (protofast/ops/nmf.py) validates shapes, dtypes and
// values.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace protofast {
namespace {

constexpr int64_t kLanes = 16;          // independent accumulators of a dot product (vectorised, no reassociation)
constexpr int64_t kTileRows = 256;      // rows per task: fixed, so results never depend on K or the threads

struct Task {
  int64_t k, r0, r1;
};

// (class, row range) tasks over the active classes: tiles of kTileRows rows, so the reduction order of a class
// depends on its own length only (not on K, the other classes or the thread count).
// first[k] = index of class k's first task, count[k] = its number of tasks.
std::vector<Task> make_tasks(const int64_t* lengths, const bool* active, int64_t K, std::vector<int64_t>& first,
                             std::vector<int64_t>& count) {
  const int64_t tile = kTileRows;
  std::vector<Task> tasks;
  first.assign(K, 0);
  count.assign(K, 0);
  for (int64_t k = 0; k < K; ++k) {
    first[k] = static_cast<int64_t>(tasks.size());
    if (!active[k]) continue;
    const int64_t n = lengths[k];
    if (n == 0) {
      tasks.push_back({k, 0, 0});  // an empty class still gets its (zero) partial sums
    }
    for (int64_t r0 = 0; r0 < n; r0 += tile) tasks.push_back({k, r0, std::min(n, r0 + tile)});
    count[k] = static_cast<int64_t>(tasks.size()) - first[k];
  }
  return tasks;
}

// Σ_d a[d]·b[d] with kLanes independent partial sums (same order on every call).
template <typename T>
inline T dot(const T* __restrict__ a, const T* __restrict__ b, int64_t D) {
  T acc[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[d + l] * b[d + l];
  T s = 0;
  for (; d < D; ++d) s += a[d] * b[d];
  for (int64_t l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

template <typename T>
inline T guard(T v, T eps) {
  return v == T(0) ? eps : v;
}

constexpr int64_t kRows = 4;  // rows per register block: each B row and each Eᵀ A row is loaded once per 4 rows
constexpr int64_t kMaxRank = 64;
// The hot loops use explicit std::fma (one rounding per multiply-add; the build has -ffp-contract=off, so
// nothing is fused implicitly): the same results on every path that shares these helpers.
constexpr int64_t kCols = 4;  // B rows (prototypes) per register block of the dots and of the Eᵀ A update

constexpr int64_t kChunk = 16;  // rows whose E updates run together, vectorised across the rows

// Σ of kLanes partial sums by a fixed pairwise tree (vectorisable; the same order on every call).
template <typename T>
inline T lane_sum(const T* __restrict__ acc) {
  T t[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) t[l] = acc[l];
  for (int64_t w = kLanes / 2; w >= 1; w /= 2)
    for (int64_t l = 0; l < w; ++l) t[l] = t[l] + t[l + w];
  return t[0];
}

// kLanes partial sums of T (lane l sums the products of columns ≡ l mod kLanes), with the three operations the
// dots need. Generic: an array the compiler vectorises; float with AVX-512: one register (the same per-lane
// fused multiply-adds and the same lane_sum tree, so bitwise the same results; GCC otherwise reloads operands).
template <typename T>
struct Lanes {
  T v[kLanes];
  static Lanes zero() { return Lanes{}; }
  static Lanes load(const T* p) {
    Lanes x;
    for (int64_t l = 0; l < kLanes; ++l) x.v[l] = p[l];
    return x;
  }
  static Lanes splat(T c) {
    Lanes x;
    for (int64_t l = 0; l < kLanes; ++l) x.v[l] = c;
    return x;
  }
  void store(T* p) const {
    for (int64_t l = 0; l < kLanes; ++l) p[l] = v[l];
  }
  void fma(const Lanes& a, const Lanes& b) {
    for (int64_t l = 0; l < kLanes; ++l) v[l] = std::fma(a.v[l], b.v[l], v[l]);
  }
  // the multiplicative rule per lane: v ← v · num / den, a den exactly 0 replaced by eps
  void mu(const Lanes& num, const Lanes& den, T eps) {
    for (int64_t l = 0; l < kLanes; ++l) v[l] = v[l] * num.v[l] / (den.v[l] == T(0) ? eps : den.v[l]);
  }
  T sum() const { return lane_sum(v); }
};

#if defined(__AVX512F__)
static_assert(kLanes == 16, "one AVX-512 register holds 16 floats");
template <>
struct Lanes<float> {
  __m512 v;
  static Lanes zero() { return Lanes{_mm512_setzero_ps()}; }
  static Lanes load(const float* p) { return Lanes{_mm512_loadu_ps(p)}; }
  static Lanes splat(float c) { return Lanes{_mm512_set1_ps(c)}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void fma(const Lanes& a, const Lanes& b) { v = _mm512_fmadd_ps(a.v, b.v, v); }
  void mu(const Lanes& num, const Lanes& den, float eps) {
    const __mmask16 zero = _mm512_cmp_ps_mask(den.v, _mm512_setzero_ps(), _CMP_EQ_OQ);
    v = _mm512_div_ps(_mm512_mul_ps(v, num.v), _mm512_mask_blend_ps(zero, den.v, _mm512_set1_ps(eps)));
  }
  float sum() const {
    alignas(64) float t[kLanes];
    _mm512_store_ps(t, v);
    return lane_sum(t);
  }
};
#endif

// A_i Bᵀ for R rows × C B rows (j0 .. j0 + C − 1): R·C dots, each in kLanes accumulators, all in flight at once.
template <typename T, int64_t R, int64_t C>
inline void dots_block(const T* __restrict__ a, const T* __restrict__ Bk, int64_t j0, int64_t D,
                       T (*__restrict__ ab)[kMaxRank]) {
  Lanes<T> acc[R][C];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t jj = 0; jj < C; ++jj) acc[r][jj] = Lanes<T>::zero();
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    Lanes<T> av[R], bv[C];
    for (int64_t r = 0; r < R; ++r) av[r] = Lanes<T>::load(a + r * D + d);
    for (int64_t jj = 0; jj < C; ++jj) bv[jj] = Lanes<T>::load(Bk + (j0 + jj) * D + d);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t jj = 0; jj < C; ++jj) acc[r][jj].fma(av[r], bv[jj]);
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t jj = 0; jj < C; ++jj) {
      T s = 0;
      for (int64_t x = d; x < D; ++x) s += a[r * D + x] * Bk[(j0 + jj) * D + x];
      ab[r][j0 + jj] = s + acc[r][jj].sum();
    }
}

// A_i Bᵀ of R consecutive rows a[R][D] into ab[r][j], in blocks of kCols B rows and one block of the remaining
// 1–3; every (row, B row) dot is the same sequence of operations whatever the blocking.
template <typename T, int64_t R>
inline void row_dots(const T* __restrict__ a, const T* __restrict__ Bk, int64_t p, int64_t D,
                     T (*__restrict__ ab)[kMaxRank]) {
  int64_t j0 = 0;
  for (; j0 + kCols <= p; j0 += kCols) dots_block<T, R, kCols>(a, Bk, j0, D, ab);
  switch (p - j0) {
    case 3: dots_block<T, R, 3>(a, Bk, j0, D, ab); break;
    case 2: dots_block<T, R, 2>(a, Bk, j0, D, ab); break;
    case 1: dots_block<T, R, 1>(a, Bk, j0, D, ab); break;
    default: break;
  }
}

// Eᵀ A rows j0 .. j0 + C − 1 += Σ_r e_r ⊗ a_r over R rows (C rows of Eᵀ A per sweep over the R rows of A).
template <typename T, int64_t R, int64_t C>
inline void accumulate_block(const T* __restrict__ a, const T (*__restrict__ eT)[kChunk], int64_t i0, int64_t j0,
                             int64_t D, T* __restrict__ EA) {
  T c[C][R];
  for (int64_t jj = 0; jj < C; ++jj)
    for (int64_t r = 0; r < R; ++r) c[jj][r] = eT[j0 + jj][i0 + r];
  for (int64_t d = 0; d < D; ++d)
    for (int64_t jj = 0; jj < C; ++jj) {
      T v = EA[(j0 + jj) * D + d];
      for (int64_t r = 0; r < R; ++r) v = std::fma(c[jj][r], a[r * D + d], v);
      EA[(j0 + jj) * D + d] = v;
    }
}

// Eᵀ A += Σ_r e_r ⊗ a_r over R consecutive rows a[R][D] whose new E rows are eT[j][i0 + r] (each element: the
// same sequence whatever the blocking), and the upper triangle of Eᵀ E (l ≥ j).
template <typename T, int64_t R>
inline void accumulate_rows(const T* __restrict__ a, const T (*__restrict__ eT)[kChunk], int64_t i0, int64_t p,
                            int64_t D, T* __restrict__ EA, T* __restrict__ EE) {
  int64_t j = 0;
  for (; j + kCols <= p; j += kCols) accumulate_block<T, R, kCols>(a, eT, i0, j, D, EA);
  switch (p - j) {
    case 3: accumulate_block<T, R, 3>(a, eT, i0, j, D, EA); break;
    case 2: accumulate_block<T, R, 2>(a, eT, i0, j, D, EA); break;
    case 1: accumulate_block<T, R, 1>(a, eT, i0, j, D, EA); break;
    default: break;
  }
  for (int64_t jj = 0; jj < p; ++jj)
    for (int64_t l = jj; l < p; ++l) {
      T v = EE[jj * p + l];
      for (int64_t r = 0; r < R; ++r) v += eT[jj][i0 + r] * eT[l][i0 + r];
      EE[jj * p + l] = v;
    }
}

// E update of `rows` ≤ kChunk consecutive rows a[rows][D] (E rows e[rows][p], in place) and, when EA != nullptr,
// their contribution to Eᵀ A (p×D) and the upper triangle of Eᵀ E (p×p). The E rule runs `inner` times with the
// rows' A_i Bᵀ and B Bᵀ fixed (accelerated MU; inner = 1: Lee–Seung), vectorised across the chunk's rows (lanes
// past `rows` hold zeros and are never stored). Every row's arithmetic is the same whatever its place in a chunk.
template <typename T>
inline void update_chunk(const T* __restrict__ a, T* __restrict__ e, int64_t rows, const T* __restrict__ Bk,
                         const T* __restrict__ BBk, int64_t p, int64_t D, T eps, int64_t inner, T* __restrict__ EA,
                         T* __restrict__ EE) {
  alignas(64) T ab[kChunk][kMaxRank];
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) row_dots<T, kRows>(a + r * D, Bk, p, D, ab + r);
  for (; r < rows; ++r) row_dots<T, 1>(a + r * D, Bk, p, D, ab + r);
  static_assert(kChunk == kLanes, "one Lanes value holds the chunk's rows");
  alignas(64) T abT[kMaxRank][kChunk];
  alignas(64) T eT[kMaxRank][kChunk];
  for (int64_t j = 0; j < p; ++j)
    for (int64_t i = 0; i < kChunk; ++i) {
      abT[j][i] = i < rows ? ab[i][j] : T(0);
      eT[j][i] = i < rows ? e[i * p + j] : T(0);
    }
  {  // the E rule `inner` times, 16 rows per register (lane i = row i of the chunk)
    Lanes<T> ev[kMaxRank], abv[kMaxRank], nv[kMaxRank];
    for (int64_t j = 0; j < p; ++j) {
      ev[j] = Lanes<T>::load(eT[j]);
      abv[j] = Lanes<T>::load(abT[j]);
    }
    for (int64_t it = 0; it < inner; ++it) {
      // den_j = Σ_l e_l (B Bᵀ)_lj (fused multiply-adds in l order), then e_j ← e_j · (A Bᵀ)_j / den_j, all j from
      // the old e
      for (int64_t j = 0; j < p; ++j) {
        Lanes<T> den = Lanes<T>::zero();
        for (int64_t l = 0; l < p; ++l) den.fma(ev[l], Lanes<T>::splat(BBk[l * p + j]));
        nv[j] = ev[j];
        nv[j].mu(abv[j], den, eps);
      }
      for (int64_t j = 0; j < p; ++j) ev[j] = nv[j];
    }
    for (int64_t j = 0; j < p; ++j) ev[j].store(eT[j]);
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < p; ++j) e[i * p + j] = eT[j][i];
  if (EA == nullptr) return;
  r = 0;
  for (; r + kRows <= rows; r += kRows) accumulate_rows<T, kRows>(a + r * D, eT, r, p, D, EA, EE);
  for (; r < rows; ++r) accumulate_rows<T, 1>(a + r * D, eT, r, p, D, EA, EE);
}

// ---------------------------------------------------------------------------------- per-class building blocks
// B Bᵀ (p×p) of one class.
template <typename T>
void basis_gram(const T* Bk, int64_t p, int64_t D, T* BB) {
  for (int64_t i = 0; i < p; ++i)
    for (int64_t j = 0; j < p; ++j) BB[i * p + j] = dot(Bk + i * D, Bk + j * D, D);
}

// The streaming pass over rows r0..r1 of one class: E rows updated in place; with part != nullptr the tile's
// Eᵀ A (p×D) followed by Eᵀ E (p×p) are written there.
template <typename T>
void tile_update(const T* Ak, T* Ek, const T* Bk, const T* BB, int64_t r0, int64_t r1, int64_t p, int64_t D, T eps,
                 int64_t inner, T* part) {
  T* EA = part;
  T* EE = part ? part + p * D : nullptr;
  if (part) std::fill(part, part + p * D + p * p, T(0));
  for (int64_t i = r0; i < r1; i += kChunk)
    update_chunk(Ak + i * D, Ek + i * p, std::min(kChunk, r1 - i), Bk, BB, p, D, eps, inner, EA, EE);
  if (EE)  // Eᵀ E is symmetric: its lower triangle is the upper one
    for (int64_t j = 0; j < p; ++j)
      for (int64_t l = 0; l < j; ++l) EE[j * p + l] = EE[l * p + j];
}

// Sum a class's `count` tile partials (contiguous, in tile order), update B (unless fixed) and return the
// Gram-form squared error ‖A‖² − 2⟨Eᵀ A, B⟩ + ⟨Eᵀ E, B Bᵀ⟩ in double (when gram; else 0).
template <typename T>
double class_finish(const T* partials, int64_t count, T* Bk, int64_t p, int64_t D, T eps, int64_t inner,
                    bool update_basis, bool gram, double a_sq, T* sum, T* den) {
  const int64_t part = p * D + p * p;
  std::copy(partials, partials + part, sum);
  for (int64_t t = 1; t < count; ++t) {
    const T* src = partials + t * part;
    for (int64_t x = 0; x < part; ++x) sum[x] += src[x];
  }
  const T* EA = sum;
  const T* EE = sum + p * D;
  // `inner` times (accelerated MU; 1: Lee–Seung): den = (Eᵀ E) B, then B ← B ⊙ (Eᵀ A) / den
  for (int64_t it = 0; update_basis && it < inner; ++it) {
    std::fill(den, den + p * D, T(0));
    for (int64_t j = 0; j < p; ++j)
      for (int64_t l = 0; l < p; ++l) {
        const T c = EE[j * p + l];
        const T* src = Bk + l * D;
        T* dst = den + j * D;
        for (int64_t d = 0; d < D; ++d) dst[d] += c * src[d];
      }
    for (int64_t x = 0; x < p * D; ++x) Bk[x] = Bk[x] * EA[x] / guard(den[x], eps);
  }
  if (!gram) return 0.0;
  double cross = 0, quad = 0;
  for (int64_t x = 0; x < p * D; ++x) cross += static_cast<double>(EA[x]) * static_cast<double>(Bk[x]);
  for (int64_t i = 0; i < p; ++i)
    for (int64_t j = 0; j < p; ++j) {
      double b = 0;
      for (int64_t d = 0; d < D; ++d) b += static_cast<double>(Bk[i * D + d]) * static_cast<double>(Bk[j * D + d]);
      quad += static_cast<double>(EE[i * p + j]) * b;
    }
  return std::max(0.0, a_sq - 2 * cross + quad);
}

// ‖A − E B‖² over rows r0..r1 of one class: each row's squared residual in kLanes partial sums of T (D/16 terms
// each), then added in double.
// noipa: one compiled body (no inlining, no specialised clones) for nmf_residual and nmf_run, so both give
// bitwise the same error.
template <typename T>
__attribute__((noipa)) double tile_residual(const T* Ak, const T* Ek, const T* Bk, int64_t r0, int64_t r1,
                                           int64_t p, int64_t D) {
  double total = 0;
  for (int64_t i = r0; i < r1; ++i) {
    const T* a = Ak + i * D;
    const T* Ei = Ek + i * p;
    T acc[kLanes] = {};
    int64_t d = 0;
    // kGroup column blocks at a time: independent chains over j (the p FMAs of one block are dependent), then
    // the blocks' squares added to acc in column order, the same sequence as one block at a time
    constexpr int64_t kGroup = 4;
    for (; d + kGroup * kLanes <= D; d += kGroup * kLanes) {
      T r[kGroup][kLanes];
      for (int64_t g = 0; g < kGroup; ++g)
        for (int64_t l = 0; l < kLanes; ++l) r[g][l] = a[d + g * kLanes + l];
      for (int64_t j = 0; j < p; ++j) {
        const T ej = Ei[j];
        const T* b = Bk + j * D + d;
        for (int64_t g = 0; g < kGroup; ++g)
          for (int64_t l = 0; l < kLanes; ++l) r[g][l] = std::fma(-ej, b[g * kLanes + l], r[g][l]);
      }
      for (int64_t g = 0; g < kGroup; ++g)
        for (int64_t l = 0; l < kLanes; ++l) acc[l] = std::fma(r[g][l], r[g][l], acc[l]);
    }
    for (; d + kLanes <= D; d += kLanes) {
      T r[kLanes];
      for (int64_t l = 0; l < kLanes; ++l) r[l] = a[d + l];
      for (int64_t j = 0; j < p; ++j) {
        const T ej = Ei[j];
        const T* b = Bk + j * D + d;
        for (int64_t l = 0; l < kLanes; ++l) r[l] = std::fma(-ej, b[l], r[l]);
      }
      for (int64_t l = 0; l < kLanes; ++l) acc[l] = std::fma(r[l], r[l], acc[l]);
    }
    double s = 0;
    for (; d < D; ++d) {
      T r = a[d];
      for (int64_t j = 0; j < p; ++j) r -= Ei[j] * Bk[j * D + d];
      s += static_cast<double>(r) * static_cast<double>(r);
    }
    for (int64_t l = 0; l < kLanes; ++l) s += static_cast<double>(acc[l]);
    total += s;
  }
  return total;
}

inline int64_t n_tiles(int64_t n) { return n == 0 ? 1 : (n + kTileRows - 1) / kTileRows; }

// ---------------------------------------------------------------------------------- nmf_step: one update
template <typename T>
at::Tensor step_impl(const at::Tensor& A_t, const int64_t* lengths, at::Tensor& E_t, at::Tensor& B_t,
                     const bool* active, double eps_d, int64_t inner, bool update_basis, bool gram,
                     const at::Tensor& a_sq_t) {
  const int64_t K = A_t.size(0), n_max = A_t.size(1), D = A_t.size(2), p = B_t.size(1);
  const T eps = static_cast<T>(eps_d);
  const T* A = A_t.data_ptr<T>();
  T* E = E_t.data_ptr<T>();
  T* B = B_t.data_ptr<T>();

  std::vector<int64_t> first, count;
  const std::vector<Task> tasks = make_tasks(lengths, active, K, first, count);
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  const bool accumulate = update_basis || gram;

  std::vector<T> BB(static_cast<size_t>(K * p * p));
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      if (active[k]) basis_gram(B + k * p * D, p, D, BB.data() + k * p * p);
  });

  const int64_t part = p * D + p * p;
  std::vector<T> partial(accumulate ? static_cast<size_t>(n_tasks * part) : 0);
  at::parallel_for(0, n_tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Task task = tasks[t];
      tile_update(A + task.k * n_max * D, E + task.k * n_max * p, B + task.k * p * D, BB.data() + task.k * p * p,
                  task.r0, task.r1, p, D, eps, inner, accumulate ? partial.data() + t * part : nullptr);
    }
  });

  at::Tensor gram_sq = at::zeros({gram ? K : 0}, A_t.options().dtype(at::kDouble));
  if (!accumulate) return gram_sq;
  double* gsq = gram ? gram_sq.data_ptr<double>() : nullptr;
  const double* a_sq = gram ? a_sq_t.data_ptr<double>() : nullptr;
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    std::vector<T> sum(part), den(p * D);
    for (int64_t k = k0; k < k1; ++k) {
      if (!active[k]) continue;
      const double g = class_finish(partial.data() + first[k] * part, count[k], B + k * p * D, p, D, eps, inner,
                                    update_basis, gram, gram ? a_sq[k] : 0.0, sum.data(), den.data());
      if (gram) gsq[k] = g;
    }
  });
  return gram_sq;
}

template <typename T>
void residual_impl(const at::Tensor& A_t, const int64_t* lengths, const at::Tensor& E_t, const at::Tensor& B_t,
                   const bool* active, double* out) {
  const int64_t K = A_t.size(0), n_max = A_t.size(1), D = A_t.size(2), p = B_t.size(1);
  const T* A = A_t.data_ptr<T>();
  const T* E = E_t.data_ptr<T>();
  const T* B = B_t.data_ptr<T>();
  std::vector<int64_t> first, count;
  const std::vector<Task> tasks = make_tasks(lengths, active, K, first, count);
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  std::vector<double> partial(n_tasks, 0.0);
  at::parallel_for(0, n_tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Task task = tasks[t];
      partial[t] = tile_residual(A + task.k * n_max * D, E + task.k * n_max * p, B + task.k * p * D, task.r0,
                                 task.r1, p, D);
    }
  });
  for (int64_t k = 0; k < K; ++k) {
    double s = 0;
    for (int64_t t = first[k]; t < first[k] + count[k]; ++t) s += partial[t];
    out[k] = active[k] ? s : 0.0;
  }
}

// ---------------------------------------------------------------------------------- nmf_run: whole loop per class
// Every class runs its whole update loop (DFF's stopping rule included) on one thread, classes in parallel:
// one parallel region for the whole factorisation (no per-update synchronisation) and each class's A stays in
// that core's cache across updates. The arithmetic is exactly nmf_step's + nmf_residual's (same tiles, same
// reduction order, the same double comparisons), so results are bitwise those of the step-by-step loop.
template <typename T>
void run_impl(const at::Tensor& A_t, const int64_t* lengths, at::Tensor& E_t, at::Tensor& B_t, int64_t max_iter,
              double tol, int64_t check_every, double eps_d, int64_t inner, bool update_basis, bool squared,
              bool gram, int64_t* n_iter_out, double* err_out) {
  const int64_t K = A_t.size(0), n_max = A_t.size(1), D = A_t.size(2), p = B_t.size(1);
  const T eps = static_cast<T>(eps_d);
  const T* A = A_t.data_ptr<T>();
  T* E = E_t.data_ptr<T>();
  T* B = B_t.data_ptr<T>();
  const int64_t part = p * D + p * p;
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    std::vector<T> BB(p * p), sum(part), den(p * D);
    std::vector<T> partial;
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t n = lengths[k], tiles = n_tiles(n);
      const T* Ak = A + k * n_max * D;
      T* Ek = E + k * n_max * p;
      T* Bk = B + k * p * D;
      partial.assign(static_cast<size_t>(tiles * part), T(0));
      auto residual = [&]() {
        double s = 0;
        for (int64_t t = 0; t < tiles; ++t)
          s += tile_residual(Ak, Ek, Bk, t * kTileRows, std::min(n, (t + 1) * kTileRows), p, D);
        return s;
      };
      auto to_err = [&](double sq) { return squared ? sq : std::sqrt(sq); };
      double a_sq = 0;
      if (gram) {
        for (int64_t x = 0; x < n * D; ++x) a_sq += static_cast<double>(Ak[x]) * Ak[x];
      }
      const double err0 = to_err(residual());
      double prev = err0;
      int64_t done = 0;
      for (int64_t t = 0; t < max_iter; ++t) {
        const bool check = tol > 0 && t % check_every == 0;
        const bool accumulate = update_basis || (gram && check);
        basis_gram(Bk, p, D, BB.data());
        for (int64_t tile = 0; tile < tiles; ++tile)
          tile_update(Ak, Ek, Bk, BB.data(), tile * kTileRows, std::min(n, (tile + 1) * kTileRows), p, D, eps,
                      inner, accumulate ? partial.data() + tile * part : nullptr);
        double g = 0;
        if (accumulate)
          g = class_finish(partial.data(), tiles, Bk, p, D, eps, inner, update_basis, gram && check, a_sq,
                           sum.data(), den.data());
        done = t + 1;
        if (check) {
          const double err = to_err(gram ? g : residual());
          if (err0 == 0 || (prev - err) / err0 < tol) break;
          prev = err;
        }
      }
      n_iter_out[k] = done;
      err_out[k] = to_err(residual());
    }
  });
}

void check_common(const at::Tensor& A, const at::Tensor& lengths, const at::Tensor& E, const at::Tensor& B,
                  const at::Tensor& active) {
  TORCH_CHECK(A.dim() == 3 && A.is_contiguous(), "nmf: A must be a contiguous [K, n, D] tensor");
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble, "nmf: A must be float32 or float64");
  const int64_t K = A.size(0), n = A.size(1), D = A.size(2);
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == K && lengths.scalar_type() == at::kLong &&
                  lengths.is_contiguous(), "nmf: lengths must be a contiguous int64 [K] tensor");
  TORCH_CHECK(B.dim() == 3 && B.size(0) == K && B.size(2) == D && B.is_contiguous() &&
                  B.scalar_type() == A.scalar_type(), "nmf: B must be a contiguous [K, p, D] tensor of A's dtype");
  TORCH_CHECK(E.dim() == 3 && E.size(0) == K && E.size(1) == n && E.size(2) == B.size(1) && E.is_contiguous() &&
                  E.scalar_type() == A.scalar_type(), "nmf: E must be a contiguous [K, n, p] tensor of A's dtype");
  TORCH_CHECK(active.dim() == 1 && active.size(0) == K && active.scalar_type() == at::kBool &&
                  active.is_contiguous(), "nmf: active must be a contiguous bool [K] tensor");
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k) TORCH_CHECK(len[k] >= 0 && len[k] <= n, "nmf: lengths out of range");
}

}  // namespace

at::Tensor nmf_step(const at::Tensor& A, const at::Tensor& lengths, at::Tensor E, at::Tensor B,
                    const at::Tensor& active, double eps, bool update_basis, bool gram, const at::Tensor& a_sq,
                    int64_t inner) {
  check_common(A, lengths, E, B, active);
  TORCH_CHECK(inner >= 1, "nmf_step: inner must be >= 1");
  TORCH_CHECK(B.size(1) <= kMaxRank, "nmf_step: rank must be <= ", kMaxRank, " for the C++ kernel");
  if (gram)
    TORCH_CHECK(a_sq.dim() == 1 && a_sq.size(0) == A.size(0) && a_sq.scalar_type() == at::kDouble &&
                    a_sq.is_contiguous(), "nmf_step: a_sq must be a contiguous float64 [K] tensor");
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "nmf_step", [&] {
    out = step_impl<scalar_t>(A, lengths.data_ptr<int64_t>(), E, B, active.data_ptr<bool>(), eps, inner,
                              update_basis, gram, a_sq);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> nmf_run(const at::Tensor& A, const at::Tensor& lengths, at::Tensor E, at::Tensor B,
                                           int64_t max_iter, double tol, int64_t check_every, double eps,
                                           bool update_basis, bool squared, bool gram, int64_t inner) {
  at::Tensor active = at::empty({A.size(0)}, A.options().dtype(at::kBool));
  std::fill(active.data_ptr<bool>(), active.data_ptr<bool>() + A.size(0), true);
  check_common(A, lengths, E, B, active);
  TORCH_CHECK(B.size(1) <= kMaxRank, "nmf_run: rank must be <= ", kMaxRank, " for the C++ kernel");
  TORCH_CHECK(max_iter >= 0 && check_every >= 1 && inner >= 1,
              "nmf_run: max_iter >= 0, check_every >= 1 and inner >= 1");
  at::Tensor n_iter = at::zeros({A.size(0)}, A.options().dtype(at::kLong));
  at::Tensor err = at::zeros({A.size(0)}, A.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "nmf_run", [&] {
    run_impl<scalar_t>(A, lengths.data_ptr<int64_t>(), E, B, max_iter, tol, check_every, eps, inner, update_basis,
                       squared, gram, n_iter.data_ptr<int64_t>(), err.data_ptr<double>());
  });
  return {n_iter, err};
}

at::Tensor nmf_residual(const at::Tensor& A, const at::Tensor& lengths, const at::Tensor& E, const at::Tensor& B,
                        const at::Tensor& active) {
  check_common(A, lengths, E, B, active);
  at::Tensor out = at::zeros({A.size(0)}, A.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "nmf_residual", [&] {
    residual_impl<scalar_t>(A, lengths.data_ptr<int64_t>(), E, B, active.data_ptr<bool>(), out.data_ptr<double>());
  });
  return out;
}

at::Tensor nmf_sq_norms(const at::Tensor& A, const at::Tensor& lengths) {
  TORCH_CHECK(A.dim() == 3 && A.is_contiguous(), "nmf_sq_norms: A must be a contiguous [K, n, D] tensor");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == A.size(0) && lengths.scalar_type() == at::kLong &&
                  lengths.is_contiguous(), "nmf_sq_norms: lengths must be a contiguous int64 [K] tensor");
  const int64_t K = A.size(0), n = A.size(1), D = A.size(2);
  at::Tensor out = at::zeros({K}, A.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  const int64_t* len = lengths.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "nmf_sq_norms", [&] {
    const scalar_t* a = A.data_ptr<scalar_t>();
    at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        double s = 0;
        const scalar_t* row = a + k * n * D;
        for (int64_t x = 0; x < std::min(len[k], n) * D; ++x) s += static_cast<double>(row[x]) * row[x];
        o[k] = s;
      }
    });
  });
  return out;
}

}  // namespace protofast

TORCH_LIBRARY_FRAGMENT(protofast_cpu, m) {
  m.def(
      "nmf_step(Tensor A, Tensor lengths, Tensor(a!) E, Tensor(b!) B, Tensor active, float eps, bool update_basis, "
      "bool gram, Tensor a_sq, int inner=1) -> Tensor");
  m.def(
      "nmf_run(Tensor A, Tensor lengths, Tensor(a!) E, Tensor(b!) B, int max_iter, float tol, int check_every, "
      "float eps, bool update_basis, bool squared, bool gram, int inner=1) -> (Tensor, Tensor)");
  m.def("nmf_residual(Tensor A, Tensor lengths, Tensor E, Tensor B, Tensor active) -> Tensor");
  m.def("nmf_sq_norms(Tensor A, Tensor lengths) -> Tensor");
}

TORCH_LIBRARY_IMPL(protofast_cpu, CPU, m) {
  m.impl("nmf_step", &protofast::nmf_step);
  m.impl("nmf_run", &protofast::nmf_run);
  m.impl("nmf_residual", &protofast::nmf_residual);
  m.impl("nmf_sq_norms", &protofast::nmf_sq_norms);
}
