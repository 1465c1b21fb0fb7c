// protofast C++ CPU kernels: ProtoPNet's losses on [B, M] minimum distances (SEMANTICS.md §1.2–§1.4).
//
// Operators (namespace protofast_cpu, added to the library that prototype_distances.cpp defines):
//
//   log_similarity_forward(d, eps)              -> log((d + 1) / (d + eps))
//   log_similarity_backward(grad, d, eps)       -> grad · (1/(d + 1) − 1/(d + eps))
//   cluster_separation_forward(d[B,M], labels[B], identity[M,K], max_dist, exact)
//       -> (cluster, separation, avg_separation, cluster_index[B], separation_index[B], n_own[B], n_wrong[B])
//   cluster_separation_backward(g_cluster, g_separation, g_avg, labels, identity, cluster_index,
//                               separation_index, n_wrong, M) -> grad[B,M]
//   masked_l1_forward(Wc[K,M], identity[M,K])   -> Σ_{k,m} |Wc[k,m]| · (1 − I[m,k])
//   masked_l1_backward(grad, Wc, identity)      -> grad · sign(Wc) · (1 − Iᵀ)
//
// Cluster / separation, with T[b,m] = I[m, y_b] (the original builds this B×M mask; here it is read in place):
//   masked max (default, cfchen-duke/ProtoPNet):
//     cluster    = mean_b [max_dist − max_m ((max_dist − d[b,m]) · T[b,m])]
//     separation = mean_b [max_dist − max_m ((max_dist − d[b,m]) · (1 − T[b,m]))]
//   the products are formed exactly as the original forms them, so masked entries are zeros (or NaN for a NaN
//   distance) that compete in the max; first occurrence wins, a NaN wins and sticks (torch.max semantics).
//   exact: cluster = mean_b min_{m: T>0} d[b,m], separation = mean_b min_{m: T=0} d[b,m] (first occurrence).
//   avg_separation = mean_b [Σ_m d·(1 − T) / Σ_m (1 − T)].
// Backward: the derivative of max_dist − (max_dist − d)·T at the winner is T there (0 when a masked zero won),
//   grad[b,m] = g_avg/B · (1 − T)/n_wrong[b] + [m = cl_idx]·g_cluster/B·T + [m = sep_idx]·g_separation/B·(1 − T).
//
// Per-sample sums are reduced in double and in a fixed order, so results do not depend on the thread count.
// The caller (protofast/ops) validates shapes, label ranges and classes without prototypes.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/log.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace protofast {
namespace {

constexpr int64_t kElementwiseGrain = 1 << 15;  // elements per task: small tensors stay on one thread

// Running arg-max / arg-min with torch's rules: first occurrence on ties, the first NaN wins and sticks.
template <typename T>
inline bool replaces_max(T v, T best) {
  return !std::isnan(best) && (v > best || std::isnan(v));
}
template <typename T>
inline bool replaces_min(T v, T best) {
  return !std::isnan(best) && (v < best || std::isnan(v));
}

// First-occurrence arg-max of v[0..n−1] with torch.max's rules (ties: the first; a NaN wins, the first one).
// Vectorised without reassociating anything: each SIMD lane keeps the running maximum of its own subsequence
// and the index where it first reached it (strict ">", so the earliest index in the lane); the lanes are then
// merged by value and, among equal values, by the smallest index — exactly the first occurrence overall. The
// rare NaN case is resolved by a scalar scan for the first NaN.
template <typename T>
inline int64_t first_argmax(const T* __restrict__ v, int64_t n, T* best_out) {
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;  // index lanes as wide as the values
  constexpr int L = 64 / sizeof(T);
  typedef T V __attribute__((vector_size(64)));
  typedef I VI __attribute__((vector_size(64)));
  int64_t first = 0;
  T best = v[0];
  bool any_nan = false;
  int64_t i = 0;
  if (n >= 2 * L && n <= std::numeric_limits<int32_t>::max()) {
    V bv, x;
    VI bi, cur, nan{};
    std::memcpy(&bv, v, sizeof(V));
    for (int k = 0; k < L; ++k) cur[k] = k;
    bi = cur;
    nan = bv != bv;
    for (i = L; i + L <= n; i += L) {
      std::memcpy(&x, v + i, sizeof(V));
      cur += L;
      const VI gt = x > bv;
      bv = gt ? x : bv;
      bi = gt ? cur : bi;
      nan |= x != x;
    }
    best = bv[0], first = bi[0];
    for (int k = 0; k < L; ++k) {
      any_nan |= nan[k] != 0;
      if (bv[k] > best || (bv[k] == best && bi[k] < first)) best = bv[k], first = bi[k];
    }
  } else {
    i = 1;
    any_nan = v[0] != v[0];
  }
  for (; i < n; ++i) {  // tail (indices above every lane's): strict ">" keeps the first occurrence
    any_nan |= v[i] != v[i];
    if (v[i] > best) best = v[i], first = i;
  }
  if (any_nan)
    for (int64_t j = 0; j < n; ++j)
      if (v[j] != v[j]) {
        first = j;
        break;
      }
  *best_out = v[first];
  return first;
}

void check_dense(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// ------------------------------------------------------------------------------------------ log-similarity
at::Tensor log_similarity_forward(const at::Tensor& d_in, double eps) {
  at::Tensor d = d_in.contiguous();
  at::Tensor out = at::empty_like(d);
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "log_similarity_forward", [&] {
    const scalar_t* src = d.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const scalar_t e = static_cast<scalar_t>(eps);
    at::parallel_for(0, d.numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) dst[i] = (src[i] + scalar_t(1)) / (src[i] + e);
    });
  });
  return out.log_();  // ATen's vectorised log, in place
}

at::Tensor log_similarity_backward(const at::Tensor& grad_in, const at::Tensor& d_in, double eps) {
  at::Tensor d = d_in.contiguous();
  at::Tensor grad = grad_in.contiguous();
  TORCH_CHECK(grad.sizes() == d.sizes(), "log_similarity_backward: grad and distances differ in shape");
  at::Tensor out = at::empty_like(d);
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "log_similarity_backward", [&] {
    const scalar_t* src = d.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const scalar_t e = static_cast<scalar_t>(eps);
    at::parallel_for(0, d.numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        dst[i] = g[i] * (scalar_t(1) / (src[i] + scalar_t(1)) - scalar_t(1) / (src[i] + e));
    });
  });
  return out;
}

// ------------------------------------------------------------------------------------------ cluster / separation
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cluster_separation_forward(const at::Tensor& d, const at::Tensor& labels, const at::Tensor& identity,
                           double max_dist, bool exact) {
  check_dense(d, "min_distances", 2);
  check_dense(labels, "labels", 1);
  check_dense(identity, "identity", 2);
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64");
  TORCH_CHECK(identity.scalar_type() == d.scalar_type(), "identity must have the distances' dtype");
  const int64_t B = d.size(0), M = d.size(1), K = identity.size(1);
  TORCH_CHECK(labels.size(0) == B && identity.size(0) == M, "cluster_separation_forward: shape mismatch");

  at::Tensor cl_idx = at::empty({B}, labels.options());
  at::Tensor sep_idx = at::empty({B}, labels.options());
  at::Tensor n_own = at::empty({B}, d.options());
  at::Tensor n_wrong = at::empty({B}, d.options());
  at::Tensor cluster = at::empty({}, d.options());
  at::Tensor separation = at::empty({}, d.options());
  at::Tensor avg_separation = at::empty({}, d.options());

  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "cluster_separation_forward", [&] {
    const scalar_t* dist = d.data_ptr<scalar_t>();
    const scalar_t* I = identity.data_ptr<scalar_t>();
    const int64_t* y = labels.data_ptr<int64_t>();
    int64_t* cl_i = cl_idx.data_ptr<int64_t>();
    int64_t* sep_i = sep_idx.data_ptr<int64_t>();
    scalar_t* own = n_own.data_ptr<scalar_t>();
    scalar_t* wrong = n_wrong.data_ptr<scalar_t>();
    const scalar_t md = static_cast<scalar_t>(max_dist);
    std::vector<double> cl_val(B), sep_val(B), avg_val(B);

    // Per block of samples, the mask rows T[b, :] = I[:, y_b] are gathered into a per-thread buffer, walking
    // the identity in blocks of rows that stay in L1 (a column gather straight from I touches a new cache line
    // per element); the buffer is reused across calls (no page faults). Then one pass per sample over d[b, :]
    // with m running upwards (first occurrence).
    const int64_t grain = std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(M, 1));
    constexpr int64_t kRows = 32;
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      thread_local std::vector<scalar_t> mask;
      if (static_cast<int64_t>(mask.size()) < (b1 - b0) * M) mask.resize((b1 - b0) * M);
      scalar_t* Tm = mask.data();
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        const int64_t m1 = std::min(M, m0 + kRows);
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t m = m0; m < m1; ++m) Tm[(b - b0) * M + m] = I[m * K + y[b]];
      }
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* trow = Tm + (b - b0) * M;
        const scalar_t* row = dist + b * M;
        scalar_t cl_best = 0, sep_best = 0;
        int64_t cl_arg = -1, sep_arg = -1;
        if (exact) {
          for (int64_t m = 0; m < M; ++m) {
            const scalar_t v = row[m];
            if (trow[m] > 0) {
              if (cl_arg < 0 || replaces_min(v, cl_best)) cl_best = v, cl_arg = m;
            } else {
              if (sep_arg < 0 || replaces_min(v, sep_best)) sep_best = v, sep_arg = m;
            }
          }
        } else {
          // the original's products (max_dist − d)·T and (max_dist − d)·(1 − T), formed exactly as it forms them
          thread_local std::vector<scalar_t> products;
          if (static_cast<int64_t>(products.size()) < 2 * M) products.resize(2 * M);
          scalar_t* __restrict__ clst = products.data();
          scalar_t* __restrict__ sep = clst + M;
          for (int64_t m = 0; m < M; ++m) {
            clst[m] = (md - row[m]) * trow[m];
            sep[m] = (md - row[m]) * (scalar_t(1) - trow[m]);
          }
          cl_arg = first_argmax<scalar_t>(clst, M, &cl_best);
          sep_arg = first_argmax<scalar_t>(sep, M, &sep_best);
        }
        // Σ_m d·(1 − T) and Σ_m (1 − T) in double, four interleaved partial sums (no long dependency chain)
        double ws[4] = {0, 0, 0, 0}, wc[4] = {0, 0, 0, 0};
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)
          for (int k = 0; k < 4; ++k) {
            const scalar_t not_t = scalar_t(1) - trow[m + k];
            ws[k] += static_cast<double>(row[m + k] * not_t);
            wc[k] += static_cast<double>(not_t);
          }
        for (; m < M; ++m) {
          const scalar_t not_t = scalar_t(1) - trow[m];
          ws[0] += static_cast<double>(row[m] * not_t);
          wc[0] += static_cast<double>(not_t);
        }
        const double wrong_sum = (ws[0] + ws[1]) + (ws[2] + ws[3]);
        const double wrong_cnt = (wc[0] + wc[1]) + (wc[2] + wc[3]);
        int64_t own_cnt = 0;
        for (int64_t i = 0; i < M; ++i) own_cnt += trow[i] > 0;
        // an exact min over an empty set (a class without prototypes) is left to the caller's check
        cl_i[b] = cl_arg < 0 ? 0 : cl_arg;
        sep_i[b] = sep_arg < 0 ? 0 : sep_arg;
        cl_val[b] = exact ? static_cast<double>(cl_best) : static_cast<double>(md - cl_best);
        sep_val[b] = exact ? static_cast<double>(sep_best) : static_cast<double>(md - sep_best);
        avg_val[b] = wrong_sum / wrong_cnt;
        own[b] = static_cast<scalar_t>(own_cnt);
        wrong[b] = static_cast<scalar_t>(wrong_cnt);
      }
    });
    double c = 0, s = 0, a = 0;
    for (int64_t b = 0; b < B; ++b) c += cl_val[b], s += sep_val[b], a += avg_val[b];
    cluster.fill_(c / B);
    separation.fill_(s / B);
    avg_separation.fill_(a / B);
  });
  return {cluster, separation, avg_separation, cl_idx, sep_idx, n_own, n_wrong};
}

at::Tensor cluster_separation_backward(const at::Tensor& g_cluster, const at::Tensor& g_separation,
                                       const at::Tensor& g_avg, const at::Tensor& labels,
                                       const at::Tensor& identity, const at::Tensor& cl_idx,
                                       const at::Tensor& sep_idx, const at::Tensor& n_wrong, int64_t M) {
  check_dense(labels, "labels", 1);
  check_dense(identity, "identity", 2);
  check_dense(cl_idx, "cluster_index", 1);
  check_dense(sep_idx, "separation_index", 1);
  check_dense(n_wrong, "n_wrong", 1);
  const int64_t B = labels.size(0), K = identity.size(1);
  TORCH_CHECK(identity.size(0) == M, "cluster_separation_backward: identity must be [M, K]");
  at::Tensor grad = at::empty({B, M}, identity.options());
  AT_DISPATCH_FLOATING_TYPES(identity.scalar_type(), "cluster_separation_backward", [&] {
    const scalar_t* I = identity.data_ptr<scalar_t>();
    const int64_t* y = labels.data_ptr<int64_t>();
    const int64_t* cl_i = cl_idx.data_ptr<int64_t>();
    const int64_t* sep_i = sep_idx.data_ptr<int64_t>();
    const scalar_t* wrong = n_wrong.data_ptr<scalar_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    const scalar_t gc = g_cluster.item<scalar_t>() / B;
    const scalar_t gs = g_separation.item<scalar_t>() / B;
    const scalar_t ga = g_avg.item<scalar_t>() / B;
    const int64_t grain = std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(M, 1));
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t scale = ga / wrong[b];
        scalar_t* row = out + b * M;
        const scalar_t* Icol = I + y[b];
        for (int64_t m = 0; m < M; ++m) row[m] = scale * (scalar_t(1) - Icol[m * K]);
        row[cl_i[b]] += gc * Icol[cl_i[b] * K];
        row[sep_i[b]] += gs * (scalar_t(1) - Icol[sep_i[b] * K]);
      }
    });
  });
  return grad;
}

// ------------------------------------------------------------------------------------------ masked l1
// Wc is [K, M] and the identity [M, K]: walk blocks of kL1Block prototypes so that the identity block stays in
// L1 while the rows of Wc are read contiguously.
constexpr int64_t kL1Block = 64;

at::Tensor masked_l1_forward(const at::Tensor& weight, const at::Tensor& identity) {
  check_dense(weight, "last_layer_weight", 2);
  check_dense(identity, "identity", 2);
  const int64_t K = weight.size(0), M = weight.size(1);
  TORCH_CHECK(identity.size(0) == M && identity.size(1) == K, "masked_l1_forward: identity must be [M, K]");
  at::Tensor out = at::empty({}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "masked_l1_forward", [&] {
    const scalar_t* W = weight.data_ptr<scalar_t>();
    const scalar_t* I = identity.data_ptr<scalar_t>();
    const int64_t blocks = (M + kL1Block - 1) / kL1Block;
    std::vector<double> partial(blocks, 0.0);
    at::parallel_for(0, blocks, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t m0 = j * kL1Block, m1 = std::min(M, m0 + kL1Block);
        double acc = 0.0;
        for (int64_t k = 0; k < K; ++k)
          for (int64_t m = m0; m < m1; ++m) acc += std::abs(W[k * M + m]) * (scalar_t(1) - I[m * K + k]);
        partial[j] = acc;
      }
    });
    double total = 0.0;
    for (double p : partial) total += p;
    out.fill_(total);
  });
  return out;
}

at::Tensor masked_l1_backward(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& identity) {
  check_dense(weight, "last_layer_weight", 2);
  check_dense(identity, "identity", 2);
  const int64_t K = weight.size(0), M = weight.size(1);
  TORCH_CHECK(identity.size(0) == M && identity.size(1) == K, "masked_l1_backward: identity must be [M, K]");
  at::Tensor out = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "masked_l1_backward", [&] {
    const scalar_t* W = weight.data_ptr<scalar_t>();
    const scalar_t* I = identity.data_ptr<scalar_t>();
    scalar_t* G = out.data_ptr<scalar_t>();
    const scalar_t g = grad.item<scalar_t>();
    const int64_t blocks = (M + kL1Block - 1) / kL1Block;
    at::parallel_for(0, blocks, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t m0 = j * kL1Block, m1 = std::min(M, m0 + kL1Block);
        for (int64_t k = 0; k < K; ++k)
          for (int64_t m = m0; m < m1; ++m) {
            const scalar_t w = W[k * M + m];
            const scalar_t sign = w > 0 ? scalar_t(1) : (w < 0 ? scalar_t(-1) : scalar_t(0));
            G[k * M + m] = g * sign * (scalar_t(1) - I[m * K + k]);
          }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace protofast

TORCH_LIBRARY_FRAGMENT(protofast_cpu, m) {
  m.def("log_similarity_forward(Tensor distances, float eps) -> Tensor");
  m.def("log_similarity_backward(Tensor grad, Tensor distances, float eps) -> Tensor");
  m.def(
      "cluster_separation_forward(Tensor min_distances, Tensor labels, Tensor identity, float max_dist, bool exact)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cluster_separation_backward(Tensor g_cluster, Tensor g_separation, Tensor g_avg, Tensor labels, "
      "Tensor identity, Tensor cluster_index, Tensor separation_index, Tensor n_wrong, int M) -> Tensor");
  m.def("masked_l1_forward(Tensor weight, Tensor identity) -> Tensor");
  m.def("masked_l1_backward(Tensor grad, Tensor weight, Tensor identity) -> Tensor");
}

TORCH_LIBRARY_IMPL(protofast_cpu, CPU, m) {
  m.impl("log_similarity_forward", &protofast::log_similarity_forward);
  m.impl("log_similarity_backward", &protofast::log_similarity_backward);
  m.impl("cluster_separation_forward", &protofast::cluster_separation_forward);
  m.impl("cluster_separation_backward", &protofast::cluster_separation_backward);
  m.impl("masked_l1_forward", &protofast::masked_l1_forward);
  m.impl("masked_l1_backward", &protofast::masked_l1_backward);
}
