// protofast C++ CPU kernels: PIP-Net presence scores and align loss without the softmax map (SEMANTICS.md §2).
//
// Operators (namespace protofast_cpu, added to the library that prototype_distances.cpp defines):
//
//   pipnet_forward(a[S,D,H,W], align)
//       -> (pooled[S,D], argmax[S,D] int64, align_loss[], lse[S,N], dot[S/2,N] (or [0] without align))
//   pipnet_backward(g_pooled[S,D], g_align[], a, lse, pooled, argmax, dot, align) -> grad_a[S,D,H,W]
//
// With N = H·W, z[b,d,n] = exp(a[b,d,n] − lse[b,n]) the channel softmax (never stored):
//   pooled[b,d] = max_n z[b,d,n], argmax first occurrence; a NaN z replaces the running max (PyTorch's
//     adaptive_max_pool2d rule, so the last NaN location wins);
//   dot[b,n] = Σ_d z[b,d,n]·z[B+b,d,n] (b < B),  align_loss = −mean_{b,n} log(dot + 1e-12).
// Backward (c = −g_align/(2·B·N), w = c/(dot + 1e-12), sp[b,n] = Σ_{d: argmax[b,d] = n} z[b,d,n]·g_pooled[b,d]):
//   grad[b,d,n] = z·(w·(z_other − dot) − sp) + [n = argmax[b,d]]·z·g_pooled[b,d]       (align)
//   grad[b,d,n] = z·(−sp) + [n = argmax[b,d]]·z·g_pooled[b,d]                           (presence only)
//
// Layout: a is NCHW, read in place. The softmax runs over the strided D axis, so each task takes a tile of
// kTile consecutive locations of one sample (or of the two views of one pair) and walks the D rows of that tile:
// every load is a contiguous run along H·W and every inner loop is vectorised across locations (the exp is a
// branch-free polynomial the compiler vectorises, accurate to ~1.5 ulp in float and ~1 ulp in double, and
// exactly 1 at 0 so that a saturated softmax gives exactly 1.0 like torch). The tile's exponentials are kept in a
// D×kTile buffer (L2-sized) and normalised in place. Tasks are samples (presence) or view pairs (align), split
// over threads with at::parallel_for; every sum runs in a fixed order, so results do not depend on the thread
// count. The caller (protofast/ops/pipnet.py) validates shapes and converts fp16/bf16 to fp32.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace protofast {
namespace {

constexpr int64_t kTile = 64;  // locations per tile: D×64 floats (196 KB at D = 768) stay in L2
constexpr double kEpsAlign = 1e-12;

// exp(x) vectorisable by the compiler: Cephes expf / exp (Padé) on a range-reduced argument.
inline float fast_exp(float x) {
  const float hi = 88.3762626647949f, lo = -87.3365447504f;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  float fx = std::nearbyint(xc * 1.44269504088896341f);
  float r = xc - fx * 0.693359375f - fx * -2.12194440e-4f;
  float y = 1.9875691500E-4f;
  y = y * r + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * r * r + r + 1.0f;
  int32_t e = (static_cast<int32_t>(fx) + 127) << 23;
  float out = y * __builtin_bit_cast(float, e);
  out = x < lo ? 0.0f : out;
  return x != x ? x : out;
}

inline double fast_exp(double x) {
  const double hi = 709.0, lo = -708.0;
  double xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  double fx = std::nearbyint(xc * 1.4426950408889634073599);
  double r = xc - fx * 6.93145751953125E-1;
  r = r - fx * 1.42860682030941723212E-6;
  double rr = r * r;
  double px = r * ((1.26177193074810590878E-4 * rr + 3.02994407707441961300E-2) * rr + 9.99999999999999999910E-1);
  double qx = ((3.00198505138664455042E-6 * rr + 2.52448340349684104192E-3) * rr + 2.27265548208155028766E-1) * rr +
              2.00000000000000000009E0;
  double y = 1.0 + 2.0 * (px / (qx - px));
  int64_t e = (static_cast<int64_t>(fx) + 1023) << 52;
  double out = y * __builtin_bit_cast(double, e);
  out = x < lo ? 0.0 : out;
  return x != x ? x : out;
}

// Softmax of one tile: x points at a[s, 0, n0], rows of stride N; writes z into buf[D×kTile] and lse[0..nt).
template <typename T>
void softmax_tile(const T* __restrict x, int64_t D, int64_t N, int64_t nt, T* __restrict buf, T* __restrict m,
                  T* __restrict sum, T* __restrict lse_out) {
  for (int64_t t = 0; t < nt; ++t) m[t] = x[t];
  for (int64_t d = 1; d < D; ++d) {
    const T* row = x + d * N;
    for (int64_t t = 0; t < nt; ++t) {
      T v = row[t];
      m[t] = (v > m[t] || v != v) ? v : m[t];  // NaN propagates
    }
  }
  for (int64_t t = 0; t < nt; ++t) sum[t] = T(0);
  for (int64_t d = 0; d < D; ++d) {
    const T* row = x + d * N;
    T* b = buf + d * kTile;
    for (int64_t t = 0; t < nt; ++t) {
      T e = fast_exp(row[t] - m[t]);
      b[t] = e;
      sum[t] += e;
    }
  }
  for (int64_t t = 0; t < nt; ++t) {
    lse_out[t] = m[t] + std::log(sum[t]);
    sum[t] = T(1) / sum[t];  // now the reciprocal
  }
  for (int64_t d = 0; d < D; ++d) {
    T* b = buf + d * kTile;
    for (int64_t t = 0; t < nt; ++t) b[t] *= sum[t];
  }
}

// Running max over locations of each channel's tile row (first occurrence; a NaN replaces, like max-pool).
template <typename T>
void update_max(const T* __restrict buf, int64_t D, int64_t nt, int64_t n0, T* __restrict best,
                int64_t* __restrict idx) {
  for (int64_t d = 0; d < D; ++d) {
    const T* b = buf + d * kTile;
    const T cur = best[d];
    int any = 0;
    for (int64_t t = 0; t < nt; ++t) any |= (b[t] > cur) | (b[t] != b[t]);
    if (!any) continue;
    T bv = cur;
    int64_t bi = idx[d];
    for (int64_t t = 0; t < nt; ++t) {
      T v = b[t];
      if (v > bv || v != v) {
        bv = v;
        bi = n0 + t;
      }
    }
    best[d] = bv;
    idx[d] = bi;
  }
}

// z = exp(a − lse) for one tile (the backward's recomputation).
template <typename T>
void recompute_tile(const T* __restrict x, const T* __restrict lse, int64_t D, int64_t N, int64_t nt,
                    T* __restrict buf) {
  for (int64_t d = 0; d < D; ++d) {
    const T* row = x + d * N;
    T* b = buf + d * kTile;
    for (int64_t t = 0; t < nt; ++t) b[t] = fast_exp(row[t] - lse[t]);
  }
}

// sp[t] = Σ_{d: argmax[d] = n0 + t} z[d, t]·g[d]
template <typename T>
void pooled_sums(const T* __restrict buf, const T* __restrict g, const int64_t* __restrict arg, int64_t D,
                 int64_t n0, int64_t nt, T* __restrict sp) {
  for (int64_t t = 0; t < nt; ++t) sp[t] = T(0);
  for (int64_t d = 0; d < D; ++d) {
    int64_t t = arg[d] - n0;
    if (t >= 0 && t < nt) sp[t] += buf[d * kTile + t] * g[d];
  }
}

template <typename T>
void add_pooled_grad(const T* __restrict buf, const T* __restrict g, const int64_t* __restrict arg, int64_t D,
                     int64_t N, int64_t n0, int64_t nt, T* __restrict grad) {
  for (int64_t d = 0; d < D; ++d) {
    int64_t t = arg[d] - n0;
    if (t >= 0 && t < nt) grad[d * N + t] += buf[d * kTile + t] * g[d];
  }
}

void check_features(const at::Tensor& a) {
  TORCH_CHECK(a.dim() == 4, "pipnet: features must be [S, D, H, W]");
  TORCH_CHECK(a.is_contiguous(), "pipnet: features must be contiguous");
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
              "pipnet: features must be float32 or float64");
  TORCH_CHECK(a.size(0) > 0 && a.size(1) > 0 && a.size(2) * a.size(3) > 0, "pipnet: features must be non-empty");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pipnet_forward(const at::Tensor& a,
                                                                                      bool align) {
  check_features(a);
  const int64_t S = a.size(0), D = a.size(1), N = a.size(2) * a.size(3);
  TORCH_CHECK(!align || S % 2 == 0, "pipnet_forward: align needs an even batch [2B]");
  const int64_t B = S / 2;
  auto opts = a.options();
  at::Tensor pooled = at::empty({S, D}, opts);
  at::Tensor argmax = at::empty({S, D}, opts.dtype(at::kLong));
  at::Tensor lse = at::empty({S, N}, opts);
  at::Tensor dot = align ? at::empty({B, N}, opts) : at::empty({0}, opts);
  at::Tensor loss = at::zeros({}, opts);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "pipnet_forward", [&] {
    using T = scalar_t;
    const T* A = a.data_ptr<T>();
    T* P = pooled.data_ptr<T>();
    int64_t* I = argmax.data_ptr<int64_t>();
    T* L = lse.data_ptr<T>();
    T* DOT = align ? dot.data_ptr<T>() : nullptr;
    const int64_t jobs = align ? B : S;
    const int views = align ? 2 : 1;
    at::parallel_for(0, jobs, 1, [&](int64_t j0, int64_t j1) {
      std::vector<T> buf(static_cast<size_t>(views * D * kTile));
      std::vector<T> m(kTile), sum(kTile);
      for (int64_t j = j0; j < j1; ++j) {
        for (int v = 0; v < views; ++v) {
          const int64_t s = j + v * B;
          for (int64_t d = 0; d < D; ++d) {
            P[s * D + d] = T(-1);  // z >= 0: the first location replaces it
            I[s * D + d] = 0;
          }
        }
        for (int64_t n0 = 0; n0 < N; n0 += kTile) {
          const int64_t nt = std::min(kTile, N - n0);
          for (int v = 0; v < views; ++v) {
            const int64_t s = j + v * B;
            T* b = buf.data() + v * D * kTile;
            softmax_tile<T>(A + s * D * N + n0, D, N, nt, b, m.data(), sum.data(), L + s * N + n0);
            update_max<T>(b, D, nt, n0, P + s * D, I + s * D);
          }
          if (align) {
            const T* z1 = buf.data();
            const T* z2 = buf.data() + D * kTile;
            T* out = DOT + j * N + n0;
            for (int64_t t = 0; t < nt; ++t) m[t] = T(0);
            for (int64_t d = 0; d < D; ++d)
              for (int64_t t = 0; t < nt; ++t) m[t] += z1[d * kTile + t] * z2[d * kTile + t];
            for (int64_t t = 0; t < nt; ++t) out[t] = m[t];
          }
        }
      }
    });
    if (align) {
      double acc = 0.0;  // fixed order, in double
      for (int64_t i = 0; i < B * N; ++i) acc += std::log(static_cast<double>(DOT[i]) + kEpsAlign);
      loss.fill_(static_cast<T>(-acc / static_cast<double>(B * N)));
    }
  });
  return {pooled, argmax, loss, lse, dot};
}

at::Tensor pipnet_backward(const at::Tensor& g_pooled, const at::Tensor& g_align, const at::Tensor& a,
                           const at::Tensor& lse, const at::Tensor& pooled, const at::Tensor& argmax,
                           const at::Tensor& dot, bool align) {
  check_features(a);
  const int64_t S = a.size(0), D = a.size(1), N = a.size(2) * a.size(3);
  const int64_t B = S / 2;
  TORCH_CHECK(g_pooled.scalar_type() == a.scalar_type() && lse.scalar_type() == a.scalar_type(),
              "pipnet_backward: dtypes must match the features");
  TORCH_CHECK(g_pooled.is_contiguous() && lse.is_contiguous() && argmax.is_contiguous() && dot.is_contiguous(),
              "pipnet_backward: inputs must be contiguous");
  TORCH_CHECK(g_pooled.numel() == S * D && argmax.numel() == S * D && lse.numel() == S * N,
              "pipnet_backward: shape mismatch");
  TORCH_CHECK(!align || (S % 2 == 0 && dot.numel() == B * N), "pipnet_backward: dot must be [B, N]");
  at::Tensor grad = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "pipnet_backward", [&] {
    using T = scalar_t;
    const T* A = a.data_ptr<T>();
    const T* G = g_pooled.data_ptr<T>();
    const T* L = lse.data_ptr<T>();
    const int64_t* I = argmax.data_ptr<int64_t>();
    const T* DOT = align ? dot.data_ptr<T>() : nullptr;
    T* OUT = grad.data_ptr<T>();
    const T c = align ? static_cast<T>(-g_align.item<double>() / (2.0 * static_cast<double>(B * N))) : T(0);
    const int64_t jobs = align ? B : S;
    const int views = align ? 2 : 1;
    at::parallel_for(0, jobs, 1, [&](int64_t j0, int64_t j1) {
      std::vector<T> buf(static_cast<size_t>(views * D * kTile));
      std::vector<T> sp(2 * kTile), w(kTile), wd(kTile);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t n0 = 0; n0 < N; n0 += kTile) {
          const int64_t nt = std::min(kTile, N - n0);
          for (int v = 0; v < views; ++v) {
            const int64_t s = j + v * B;
            T* b = buf.data() + v * D * kTile;
            recompute_tile<T>(A + s * D * N + n0, L + s * N + n0, D, N, nt, b);
            pooled_sums<T>(b, G + s * D, I + s * D, D, n0, nt, sp.data() + v * kTile);
          }
          if (align) {
            const T* dt = DOT + j * N + n0;
            for (int64_t t = 0; t < nt; ++t) {
              w[t] = c / (dt[t] + static_cast<T>(kEpsAlign));
              wd[t] = w[t] * dt[t];
            }
            for (int v = 0; v < 2; ++v) {
              const int64_t s = j + v * B;
              const T* z = buf.data() + v * D * kTile;
              const T* zo = buf.data() + (1 - v) * D * kTile;
              const T* spv = sp.data() + v * kTile;
              T* out = OUT + s * D * N + n0;
              for (int64_t d = 0; d < D; ++d) {
                const T* zr = z + d * kTile;
                const T* zor = zo + d * kTile;
                T* o = out + d * N;
                for (int64_t t = 0; t < nt; ++t) o[t] = zr[t] * (w[t] * zor[t] - wd[t] - spv[t]);
              }
              add_pooled_grad<T>(z, G + s * D, I + s * D, D, N, n0, nt, out);
            }
          } else {
            const int64_t s = j;
            const T* z = buf.data();
            T* out = OUT + s * D * N + n0;
            for (int64_t d = 0; d < D; ++d) {
              const T* zr = z + d * kTile;
              T* o = out + d * N;
              for (int64_t t = 0; t < nt; ++t) o[t] = -zr[t] * sp[t];
            }
            add_pooled_grad<T>(z, G + s * D, I + s * D, D, N, n0, nt, out);
          }
        }
      }
    });
  });
  return grad;
}

}  // namespace
}  // namespace protofast

TORCH_LIBRARY_FRAGMENT(protofast_cpu, m) {
  m.def("pipnet_forward(Tensor features, bool align) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "pipnet_backward(Tensor grad_pooled, Tensor grad_align, Tensor features, Tensor lse, Tensor pooled, "
      "Tensor argmax, Tensor dot, bool align) -> Tensor");
}

TORCH_LIBRARY_IMPL(protofast_cpu, CPU, m) {
  m.impl("pipnet_forward", &protofast::pipnet_forward);
  m.impl("pipnet_backward", &protofast::pipnet_backward);
}
