// protofast C++ CPU kernels: batched NMF multiplicative updates for ProtoNMF (SEMANTICS.md §5.1).
//
// Operators (namespace protofast_cpu, added to the library that prototype_distances.cpp defines):
//
//   nmf_step(A[K,n,D], lengths[K], E[K,n,p]!, B[K,p,D]!, active[K], eps, update_basis, gram, a_sq[K])
//       -> gram_sq [K] float64 (empty unless gram)
//     One multiplicative update of every active class, in place:
//       E ← E ⊙ (A Bᵀ) / (E B Bᵀ),  then  B ← B ⊙ (Eᵀ A) / (Eᵀ E B)   (denominator entries == 0 become eps)
//     in ONE streaming pass over A: for each row tile of a class, per row i: A_i Bᵀ (p dots), the new E_i from
//     B Bᵀ (p×p, computed once per class), and the tile's partial Eᵀ A (p×D) and Eᵀ E (p×p); then per class the
//     tiles' partials are summed in tile order and B is updated once. Nothing n×D besides A is written or read.
//     With gram: ‖A‖² − 2⟨Eᵀ A, B⟩ + ⟨Eᵀ E, B Bᵀ⟩ of the new factors, in double (a_sq = ‖A‖² per class).
//     update_basis = false: B is fixed (nmf_encode), only E is updated.
//   nmf_residual(A, lengths, E, B, active) -> [K] float64: ‖A_k − E_k B_k‖²_F of the active classes (0 for the
//     others), the residual streamed row by row (per row in 16 partial sums of the input dtype, then in double).
//   nmf_sq_norms(A, lengths) -> [K] float64: ‖A_k‖²_F.
//
// Work is split into (class, row tile) tasks run with at::parallel_for; the tiles have a fixed number of rows
// and partial sums are reduced in a fixed order, so a class's results are bitwise the same for any number of
// threads and whichever other classes are in the batch (the caller may run classes in cache-sized blocks). Rows ≥ lengths[k] (padding) are never read. The caller
// (protofast/ops/nmf.py) validates shapes, dtypes and values.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

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

constexpr int64_t kRows = 4;  // rows updated together: each B row and each Eᵀ A row is loaded once per 4 rows
constexpr int64_t kMaxRank = 64;

// E update of R consecutive rows a[R][D] (E rows e[R][p], in place) and, when EA != nullptr, their contribution
// to Eᵀ A (p×D) and Eᵀ E (p×p). Every row's arithmetic is the same sequence as for R = 1 (bitwise equal results).
template <typename T, int64_t R>
inline void update_rows(const T* __restrict__ a, T* __restrict__ e, const T* __restrict__ Bk,
                        const T* __restrict__ BBk, int64_t p, int64_t D, T eps, T* __restrict__ EA,
                        T* __restrict__ EE) {
  T ab[R][kMaxRank];
  T en[R][kMaxRank];
  for (int64_t j = 0; j < p; ++j) {  // A_i Bᵀ: R dot products per B row, kLanes accumulators each
    const T* b = Bk + j * D;
    T acc[R][kLanes] = {};
    int64_t d = 0;
    for (; d + kLanes <= D; d += kLanes)
      for (int64_t r = 0; r < R; ++r)
        for (int64_t l = 0; l < kLanes; ++l) acc[r][l] += a[r * D + d + l] * b[d + l];
    for (int64_t r = 0; r < R; ++r) {
      T s = 0;
      for (int64_t x = d; x < D; ++x) s += a[r * D + x] * b[x];
      for (int64_t l = 0; l < kLanes; ++l) s += acc[r][l];
      ab[r][j] = s;
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    T* Ei = e + r * p;
    for (int64_t j = 0; j < p; ++j) {
      T den = 0;
      for (int64_t l = 0; l < p; ++l) den += Ei[l] * BBk[l * p + j];
      en[r][j] = Ei[j] * ab[r][j] / guard(den, eps);
    }
    for (int64_t j = 0; j < p; ++j) Ei[j] = en[r][j];
  }
  if (EA == nullptr) return;
  for (int64_t j = 0; j < p; ++j) {
    T* row = EA + j * D;
    for (int64_t d = 0; d < D; ++d) {
      T v = row[d];
      for (int64_t r = 0; r < R; ++r) v += en[r][j] * a[r * D + d];
      row[d] = v;
    }
    for (int64_t r = 0; r < R; ++r)
      for (int64_t l = 0; l < p; ++l) EE[j * p + l] += en[r][j] * en[r][l];
  }
}

template <typename T>
at::Tensor step_impl(const at::Tensor& A_t, const int64_t* lengths, at::Tensor& E_t, at::Tensor& B_t,
                     const bool* active, double eps_d, bool update_basis, bool gram, const at::Tensor& a_sq_t) {
  const int64_t K = A_t.size(0), n_max = A_t.size(1), D = A_t.size(2), p = B_t.size(1);
  const T eps = static_cast<T>(eps_d);
  const T* A = A_t.data_ptr<T>();
  T* E = E_t.data_ptr<T>();
  T* B = B_t.data_ptr<T>();

  std::vector<int64_t> first, count;
  const std::vector<Task> tasks = make_tasks(lengths, active, K, first, count);
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  const bool accumulate = update_basis || gram;

  // B Bᵀ per active class (p×p)
  std::vector<T> BB(static_cast<size_t>(K * p * p));
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      if (!active[k]) continue;
      const T* Bk = B + k * p * D;
      for (int64_t i = 0; i < p; ++i)
        for (int64_t j = 0; j < p; ++j) BB[(k * p + i) * p + j] = dot(Bk + i * D, Bk + j * D, D);
    }
  });

  // the streaming pass: E update of each row and the tile's partial Eᵀ A, Eᵀ E
  const int64_t part = p * D + p * p;
  std::vector<T> partial(accumulate ? static_cast<size_t>(n_tasks * part) : 0);
  at::parallel_for(0, n_tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Task task = tasks[t];
      const T* Bk = B + task.k * p * D;
      const T* BBk = BB.data() + task.k * p * p;
      T* EA = accumulate ? partial.data() + t * part : nullptr;
      T* EE = accumulate ? EA + p * D : nullptr;
      if (accumulate) std::fill(EA, EA + part, T(0));
      int64_t i = task.r0;
      for (; i + kRows <= task.r1; i += kRows)
        update_rows<T, kRows>(A + (task.k * n_max + i) * D, E + (task.k * n_max + i) * p, Bk, BBk, p, D, eps, EA, EE);
      for (; i < task.r1; ++i)
        update_rows<T, 1>(A + (task.k * n_max + i) * D, E + (task.k * n_max + i) * p, Bk, BBk, p, D, eps, EA, EE);
    }
  });

  at::Tensor gram_sq = gram ? at::zeros({K}, A_t.options().dtype(at::kDouble)) : at::empty({0}, A_t.options().dtype(at::kDouble));
  if (!accumulate) return gram_sq;
  double* gsq = gram ? gram_sq.data_ptr<double>() : nullptr;
  const double* a_sq = gram ? a_sq_t.data_ptr<double>() : nullptr;

  // per class: sum the tiles' partials in tile order, update B, and the Gram-form error
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    std::vector<T> sum(part), den(p * D), bb(p * p);
    for (int64_t k = k0; k < k1; ++k) {
      if (!active[k]) continue;
      std::copy(partial.begin() + first[k] * part, partial.begin() + (first[k] + 1) * part, sum.begin());
      for (int64_t t = first[k] + 1; t < first[k] + count[k]; ++t) {
        const T* src = partial.data() + t * part;
        for (int64_t x = 0; x < part; ++x) sum[x] += src[x];
      }
      const T* EA = sum.data();
      const T* EE = sum.data() + p * D;
      T* Bk = B + k * p * D;
      if (update_basis) {
        // den = (Eᵀ E) B, then B ← B ⊙ (Eᵀ A) / den
        std::fill(den.begin(), den.end(), T(0));
        for (int64_t j = 0; j < p; ++j)
          for (int64_t l = 0; l < p; ++l) {
            const T c = EE[j * p + l];
            const T* src = Bk + l * D;
            T* dst = den.data() + j * D;
            for (int64_t d = 0; d < D; ++d) dst[d] += c * src[d];
          }
        for (int64_t x = 0; x < p * D; ++x) Bk[x] = Bk[x] * EA[x] / guard(den[x], eps);
      }
      if (gram) {
        double cross = 0, quad = 0;
        for (int64_t x = 0; x < p * D; ++x) cross += static_cast<double>(EA[x]) * static_cast<double>(Bk[x]);
        for (int64_t i = 0; i < p; ++i)
          for (int64_t j = 0; j < p; ++j) {
            double b = 0;
            for (int64_t d = 0; d < D; ++d) b += static_cast<double>(Bk[i * D + d]) * static_cast<double>(Bk[j * D + d]);
            quad += static_cast<double>(EE[i * p + j]) * b;
          }
        gsq[k] = std::max(0.0, a_sq[k] - 2 * cross + quad);
      }
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
      const T* Bk = B + task.k * p * D;
      double total = 0;
      for (int64_t i = task.r0; i < task.r1; ++i) {
        const T* a = A + (task.k * n_max + i) * D;
        const T* Ei = E + (task.k * n_max + i) * p;
        // the row's squared residual in kLanes partial sums of T (D/16 terms each), then added in double
        T acc[kLanes] = {};
        int64_t d = 0;
        for (; d + kLanes <= D; d += kLanes) {
          T r[kLanes];
          for (int64_t l = 0; l < kLanes; ++l) r[l] = a[d + l];
          for (int64_t j = 0; j < p; ++j) {
            const T ej = Ei[j];
            const T* b = Bk + j * D + d;
            for (int64_t l = 0; l < kLanes; ++l) r[l] -= ej * b[l];
          }
          for (int64_t l = 0; l < kLanes; ++l) acc[l] += r[l] * r[l];
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
      partial[t] = total;
    }
  });
  for (int64_t k = 0; k < K; ++k) {
    double s = 0;
    for (int64_t t = first[k]; t < first[k] + count[k]; ++t) s += partial[t];
    out[k] = active[k] ? s : 0.0;
  }
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
                    const at::Tensor& active, double eps, bool update_basis, bool gram, const at::Tensor& a_sq) {
  check_common(A, lengths, E, B, active);
  TORCH_CHECK(B.size(1) <= kMaxRank, "nmf_step: rank must be <= ", kMaxRank, " for the C++ kernel");
  if (gram)
    TORCH_CHECK(a_sq.dim() == 1 && a_sq.size(0) == A.size(0) && a_sq.scalar_type() == at::kDouble &&
                    a_sq.is_contiguous(), "nmf_step: a_sq must be a contiguous float64 [K] tensor");
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "nmf_step", [&] {
    out = step_impl<scalar_t>(A, lengths.data_ptr<int64_t>(), E, B, active.data_ptr<bool>(), eps, update_basis,
                              gram, a_sq);
  });
  return out;
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
      "bool gram, Tensor a_sq) -> Tensor");
  m.def("nmf_residual(Tensor A, Tensor lengths, Tensor E, Tensor B, Tensor active) -> Tensor");
  m.def("nmf_sq_norms(Tensor A, Tensor lengths) -> Tensor");
}

TORCH_LIBRARY_IMPL(protofast_cpu, CPU, m) {
  m.impl("nmf_step", &protofast::nmf_step);
  m.impl("nmf_residual", &protofast::nmf_residual);
  m.impl("nmf_sq_norms", &protofast::nmf_sq_norms);
}
