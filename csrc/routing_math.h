// Math shared by the CPU and CUDA routing kernels, as __host__ __device__ functions,
// so the CPU tests exercise the same formulas the GPU runs (ROUTING.md, "Forward" and "Gradients").
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MK_HD __host__ __device__ __forceinline__
#else
#define MK_HD inline
#endif

namespace mind_kernels {

#if !defined(__CUDACC__) && !defined(__HIPCC__)
// On the host, unqualified exp/sqrt of a float would otherwise resolve to the C double functions;
// these bring in the float overloads (device code gets them from the CUDA math headers).
using std::exp;
using std::sqrt;
#endif

// Whether the iterations t < r of the forward go through Q = S^T S (D_in, D_in): y_j = Q ebar_j,
// |z_j|^2 = ebar_j . y_j and S^T c_j = a(|z_j|^2) y_j, K D_in^2 multiply-adds per iteration instead of
// 2 K D_in D_out. The same rule for the CPU and CUDA kernels (and mind_kernels/triton/routing.py), a
// function of the shapes only, so a user's result never depends on the batch it came in.
// MIND_KERNELS_ROUTE_THROUGH_S=1 turns it off, for benchmarks that compare the two paths.
inline bool uses_gram(int64_t D_in, int64_t D_out, int64_t num_iters) {
  const char* through_s = std::getenv("MIND_KERNELS_ROUTE_THROUGH_S");
  if (through_s != nullptr && std::strcmp(through_s, "1") == 0) return false;
  return num_iters >= 2 && D_in < 2 * D_out;
}

// squash(z) = |z|^2 / (1 + |z|^2) * z / sqrt(|z|^2 + eps): 0 maps to 0, never NaN.
constexpr double kSquashEps = 1e-9;

// squash(z) = a(n2) * z with n2 = |z|^2 and a(n2) = n2 / ((1 + n2) sqrt(n2 + eps)).
template <typename acc_t>
MK_HD acc_t squash_scale(acc_t n2) {
  return n2 / ((acc_t(1) + n2) * sqrt(n2 + acc_t(kSquashEps)));
}

// a'(n2) = 1 / ((1 + n2)^2 s) - n2 / (2 (1 + n2) s^3), s = sqrt(n2 + eps).
// The Jacobian of squash is a I + 2 a'(n2) z z^T (symmetric), so dz = a G + 2 a'(n2) (z . G) z.
template <typename acc_t>
MK_HD acc_t squash_scale_derivative(acc_t n2) {
  const acc_t s = sqrt(n2 + acc_t(kSquashEps));
  const acc_t one_plus = acc_t(1) + n2;
  return acc_t(1) / (one_plus * one_plus * s) - n2 / (acc_t(2) * one_plus * s * s * s);
}

// w[k * w_stride] = softmax over the active k of x[k * x_stride], for k in [0, n).
// Inactive entries get 0; with no active entry every w is 0 (never NaN); a NaN/+Inf input gives NaN.
// `active` may be nullptr (all active).
template <typename acc_t, typename mask_t>
MK_HD void masked_softmax(const acc_t* x, int x_stride, const mask_t* active, int active_stride, acc_t* w,
                          int w_stride, int n) {
  acc_t peak = acc_t(0);
  bool any = false;
  for (int k = 0; k < n; ++k) {
    if (active && !active[k * active_stride]) continue;
    const acc_t v = x[k * x_stride];
    peak = any ? (v > peak ? v : peak) : v;
    any = true;
  }
  // Every active logit -inf: nothing to normalise over; avoid -inf - -inf (the reference gives w = 0).
  if (peak == -acc_t(INFINITY)) peak = acc_t(0);
  acc_t total = acc_t(0);
  for (int k = 0; k < n; ++k) {
    acc_t e = acc_t(0);
    if (!active || active[k * active_stride]) e = exp(x[k * x_stride] - peak);
    w[k * w_stride] = e;
    total += e;
  }
  // total == 0 only when nothing is active; a NaN total (NaN or +Inf logit) must propagate, not become 0.
  const acc_t inv = total == acc_t(0) ? acc_t(0) : acc_t(1) / total;
  for (int k = 0; k < n; ++k) w[k * w_stride] *= inv;
}

// One user's coupling weights w (K, L) from logits b (K, L), both row-major (ROUTING.md, "coupling").
// `valid` (L) and `active` (K) may be nullptr (all valid / all active).
//   over_behaviors = false (MIND): for each valid i, softmax over the active j; masked i -> 0 for all j.
//   over_behaviors = true (ComiRec): for each active j, softmax over all L positions (padding in the
//     denominator), then 0 at masked i; inactive j -> 0.
template <typename acc_t, typename mask_t>
MK_HD void user_coupling(const acc_t* b, const mask_t* valid, const mask_t* active, bool over_behaviors, acc_t* w,
                         int K, int L) {
  if (over_behaviors) {
    for (int j = 0; j < K; ++j) {
      acc_t* wj = w + j * L;
      if (active && !active[j]) {
        for (int i = 0; i < L; ++i) wj[i] = acc_t(0);
        continue;
      }
      masked_softmax(b + j * L, 1, static_cast<const mask_t*>(nullptr), 0, wj, 1, L);
      if (valid)
        for (int i = 0; i < L; ++i)
          if (!valid[i]) wj[i] = acc_t(0);
    }
  } else {
    for (int i = 0; i < L; ++i) {
      if (valid && !valid[i]) {
        for (int j = 0; j < K; ++j) w[j * L + i] = acc_t(0);
        continue;
      }
      masked_softmax(b + i, L, active, 1, w + i, L, K);
    }
  }
}

// dz = squash'(z)^T g for one interest (n values): dz = a g + 2 a'(n2) (z . g) z.
template <typename acc_t>
MK_HD void squash_backward_row(const acc_t* z, const acc_t* g, acc_t* dz, int n) {
  acc_t n2 = acc_t(0), zg = acc_t(0);
  for (int k = 0; k < n; ++k) {
    n2 += z[k] * z[k];
    zg += z[k] * g[k];
  }
  const acc_t a = squash_scale(n2);
  const acc_t coef = acc_t(2) * squash_scale_derivative(n2) * zg;
  for (int k = 0; k < n; ++k) dz[k] = a * g[k] + coef * z[k];
}

}  // namespace mind_kernels
