// Building blocks of the fused CPU routing kernels, shared by the padded (routing_cpu.cpp) and the
// jagged (routing_jagged_cpu.cpp) ops: vector helpers, the small row-major products, the coupling
// softmaxes, the per-user routing iterations (route_user), the cached forms of S, task sizes, scratch
// layouts and argument checks. The math is described at the top of routing_cpu.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>
#include <optional>
#include <type_traits>

#include "routing_math.h"

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define MK_X86_DISPATCH 1
#define MK_ALWAYS_INLINE inline __attribute__((always_inline))
#define MK_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define MK_X86_DISPATCH 0
#define MK_ALWAYS_INLINE inline
#define MK_TARGET_AVX2
#endif

namespace mind_kernels {
namespace detail {


// 32-byte vectors (8 floats / 4 doubles) through GCC's vector extensions: SSE pairs in the baseline
// build, one AVX register in the AVX2 build.
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(32)));
};

template <typename V, typename T>
MK_ALWAYS_INLINE V vload(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
MK_ALWAYS_INLINE void vstore(T* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// JB output rows of out[:, x0 : x0 + XB] += coef[JB x m] . rows[m x (x0 : x0 + XB)] (ACC), or = (not
// ACC: out is only written, never read), with the JB x XB block of out held in registers across the
// whole reduction over k.
template <int JB, int NV, bool ACC, typename T>
MK_ALWAYS_INLINE void gemm_block(T* __restrict__ out, int64_t ldo, const T* __restrict__ coef, int64_t ldc,
                                 const T* __restrict__ rows, int64_t ldr, int64_t m, int64_t x0) {
  using V = typename VecOf<T>::type;
  constexpr int W = sizeof(V) / sizeof(T);
  V acc[JB][NV];
  for (int jj = 0; jj < JB; ++jj)
    for (int v = 0; v < NV; ++v) acc[jj][v] = ACC ? vload<V>(out + jj * ldo + x0 + v * W) : V{};
  for (int64_t k = 0; k < m; ++k) {
    V r[NV];
    for (int v = 0; v < NV; ++v) r[v] = vload<V>(rows + k * ldr + x0 + v * W);
    for (int jj = 0; jj < JB; ++jj) {
      const T c = coef[jj * ldc + k];
      for (int v = 0; v < NV; ++v) acc[jj][v] += c * r[v];
    }
  }
  for (int jj = 0; jj < JB; ++jj)
    for (int v = 0; v < NV; ++v) vstore(out + jj * ldo + x0 + v * W, acc[jj][v]);
}

template <int JB, bool ACC, typename T>
MK_ALWAYS_INLINE void gemm_rows(T* __restrict__ out, int64_t ldo, const T* __restrict__ coef, int64_t ldc,
                                const T* __restrict__ rows, int64_t ldr, int64_t m, int64_t n) {
  constexpr int W = 32 / sizeof(T);
  int64_t x0 = 0;
  for (; x0 + 2 * W <= n; x0 += 2 * W) gemm_block<JB, 2, ACC>(out, ldo, coef, ldc, rows, ldr, m, x0);
  for (; x0 + W <= n; x0 += W) gemm_block<JB, 1, ACC>(out, ldo, coef, ldc, rows, ldr, m, x0);
  for (; x0 < n; ++x0)
    for (int jj = 0; jj < JB; ++jj) {
      T a = ACC ? out[jj * ldo + x0] : T(0);
      for (int64_t k = 0; k < m; ++k) a += coef[jj * ldc + k] * rows[k * ldr + x0];
      out[jj * ldo + x0] = a;
    }
}

// out (M x n, row stride ldo) += coef (M x m, row stride ldc) . rows (m x n, row stride ldr).
// Every small product of the op (K, L, D-sized) goes through here; the sum over k runs in order
// for every element, so results do not depend on threads.
template <bool ACC, typename T>
MK_ALWAYS_INLINE void gemm(T* __restrict__ out, int64_t ldo, const T* __restrict__ coef, int64_t ldc,
                           const T* __restrict__ rows, int64_t ldr, int64_t M, int64_t m, int64_t n) {
  int64_t j = 0;
  for (; j + 4 <= M; j += 4) gemm_rows<4, ACC>(out + j * ldo, ldo, coef + j * ldc, ldc, rows, ldr, m, n);
  for (; j < M; ++j) gemm_rows<1, ACC>(out + j * ldo, ldo, coef + j * ldc, ldc, rows, ldr, m, n);
}
template <typename T>
MK_ALWAYS_INLINE void gemm_acc(T* __restrict__ out, int64_t ldo, const T* __restrict__ coef, int64_t ldc,
                               const T* __restrict__ rows, int64_t ldr, int64_t M, int64_t m, int64_t n) {
  gemm<true>(out, ldo, coef, ldc, rows, ldr, M, m, n);
}
// out (M x n) = coef . rows: the same sums as fill_zero + gemm_acc (0 + x is x), without the pass that
// zeroes out first (dE alone is B L D_in values).
template <typename T>
MK_ALWAYS_INLINE void gemm_set(T* __restrict__ out, int64_t ldo, const T* __restrict__ coef, int64_t ldc,
                               const T* __restrict__ rows, int64_t ldr, int64_t M, int64_t m, int64_t n) {
  gemm<false>(out, ldo, coef, ldc, rows, ldr, M, m, n);
}

template <typename T>
MK_ALWAYS_INLINE void fill_zero(T* __restrict__ p, int64_t n) {
  for (int64_t x = 0; x < n; ++x) p[x] = T(0);
}

// Converts n values to another type (a plain copy when the types agree).
template <typename To, typename From>
MK_ALWAYS_INLINE void convert_row(To* __restrict__ dst, const From* __restrict__ src, int64_t n) {
  for (int64_t x = 0; x < n; ++x) dst[x] = static_cast<To>(src[x]);
}

// The user's rows as acc_t: E itself when no copy is needed, else `buf` holding the widened rows
// with the rows where skip[i * skip_stride] is true set to 0. Skipped rows carry zero weight, so
// zeroing them changes nothing for finite inputs and keeps a NaN/Inf there out of the products
// (0 * NaN = NaN): the reference's non-finite contract ignores padding in "interests" mode.
template <typename acc_t, typename scalar_t, typename pred_t>
MK_ALWAYS_INLINE const acc_t* user_rows(const scalar_t* Eu, acc_t* buf, int64_t L, int64_t D_in, bool any_skip,
                                        pred_t skip) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (!any_skip) return Eu;
  }
  for (int64_t i = 0; i < L; ++i) {
    if (any_skip && skip(i))
      fill_zero(buf + i * D_in, D_in);
    else
      convert_row(buf + i * D_in, Eu + i * D_in, D_in);
  }
  return buf;
}

// Sizes and pointers of one call, shared by every user.
template <typename scalar_t, typename acc_t>
struct ForwardArgs {
  const scalar_t* E;        // (B, L, D_in)
  const acc_t* S;           // (D_out, D_in)
  const acc_t* St;          // (D_in, D_out), S transposed
  const acc_t* gram;        // (D_in, D_in) S^T S for the iterations t < r, or nullptr (use S)
  const acc_t* b0;          // (K, L) or (B, K, L)
  int64_t b0_user_stride;   // 0 when b0 is shared by every user
  const bool* mask;         // (B, L) or nullptr
  const bool* imask;        // (B, K) or nullptr
  scalar_t* capsules;       // (B, K, D_out)
  acc_t* coupling;          // (B, K, L)
  acc_t* preact;            // (B, K, D_out)
  int64_t L, D_in, D_out, K, r;
  bool over_behaviors;
  acc_t logit_scale;        // s in b_ij += s * (c_j . u_i); s = 1 gives the unscaled bits (1 * x == x)
};

// exp(x) for x <= 0 (softmax arguments x - peak), 8 lanes at a time: Cephes' expf polynomial
// (about 1 ulp). x below -87.3 (where expf goes subnormal) and -Inf give exactly 0; NaN stays NaN.
template <typename V>
MK_ALWAYS_INLINE V vexp_nonpos(V x) {
  typedef int I __attribute__((vector_size(sizeof(V))));
  const V lo = V{} - 87.3365478515625f, hi = V{} + 88.0f;
  const I under = x < lo;          // all-ones lanes where the result is 0 (never for NaN)
  x = x < lo ? lo : x;             // NaN compares false and stays NaN
  x = x > hi ? hi : x;
  const V fx = x * 1.44269504088896341f;
  const V n = (fx + 12582912.0f) - 12582912.0f;  // round to nearest
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const I ni = __builtin_convertvector(n, I);
  V two_n;
  const I bits = (ni + 127) << 23;
  __builtin_memcpy(&two_n, &bits, sizeof(V));
  const V y = p * two_n;
  V out;
  I yb;
  __builtin_memcpy(&yb, &y, sizeof(V));
  yb &= ~under;
  __builtin_memcpy(&out, &yb, sizeof(V));
  return out;
}

// Coupling of "interests" mode over n positions that are all valid (the rows were compacted), row
// stride ld: for each i, w_ji = softmax over the active j of b_ji. Same arithmetic as
// masked_softmax (peak of the active logits, -inf peaks taken as 0, exp(x - peak), times 1 / total;
// 0 when nothing is active; NaN/+Inf propagates), with the exp vectorised over positions for float.
template <typename acc_t>
MK_ALWAYS_INLINE void coupling_over_interests(const acc_t* __restrict__ b, const bool* active, acc_t* __restrict__ w,
                                              int64_t K, int64_t n, int64_t ld) {
  int64_t i0 = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    using V = typename VecOf<float>::type;
    constexpr int W = 8;
    for (; i0 + W <= n; i0 += W) {
      V peak{}, total{};
      bool any = false;
      for (int64_t j = 0; j < K; ++j) {
        if (active && !active[j]) continue;
        const V v = vload<V>(b + j * ld + i0);
        peak = any ? (v > peak ? v : peak) : v;
        any = true;
      }
      peak = peak == (V{} - INFINITY) ? V{} : peak;  // every active logit -inf: w = 0, as the reference
      for (int64_t j = 0; j < K; ++j) {
        V e{};
        if (!active || active[j]) e = vexp_nonpos(vload<V>(b + j * ld + i0) - peak);
        vstore(w + j * ld + i0, e);
        total += e;
      }
      const V inv = total == V{} ? V{} : 1.0f / total;
      for (int64_t j = 0; j < K; ++j) vstore(w + j * ld + i0, vload<V>(w + j * ld + i0) * inv);
    }
  }
  for (int64_t i = i0; i < n; ++i)
    masked_softmax(b + i, static_cast<int>(ld), active, 1, w + i, static_cast<int>(ld), static_cast<int>(K));
}

// Coupling of "behaviors" mode over the ld columns of each logit row (row stride ld): for each active
// j, w_j = softmax over all columns of b_j, then w_ji = 0 for i >= n_valid (the positions were
// reordered so the valid ones come first; columns past the real positions hold -inf, which adds 0
// to the denominator). Inactive j get 0. As in the reference: a row whose peak is -inf (every logit
// -inf) gives 0, never NaN; a NaN/+Inf logit gives NaN for the whole row. float runs on whole
// vectors with vexp_nonpos (requires ld % 8 == 0).
template <typename acc_t>
MK_ALWAYS_INLINE void coupling_over_behaviors(const acc_t* __restrict__ b, const bool* active, acc_t* __restrict__ w,
                                              int64_t K, int64_t ld, int64_t n_valid) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < K; ++j) {
    const acc_t* bj = b + j * ld;
    acc_t* wj = w + j * ld;
    if ((active && !active[j]) || n_valid == 0) {
      fill_zero(wj, ld);
      continue;
    }
    if constexpr (std::is_same_v<acc_t, float>) {
      using V = typename VecOf<float>::type;
      constexpr int W = 8;
      // Peak: lane-wise max; a NaN lane poisons the total below whatever the peak is.
      V pk = vload<V>(bj);
      for (int64_t i = W; i < ld; i += W) {
        const V v = vload<V>(bj + i);
        pk = v > pk ? v : pk;
      }
      float peak = pk[0];
      for (int q = 1; q < W; ++q) peak = pk[q] > peak ? pk[q] : peak;
      if (peak == neg_inf) peak = 0.0f;
      V tot{};
      for (int64_t i = 0; i < ld; i += W) {
        const V e = vexp_nonpos(vload<V>(bj + i) - peak);
        vstore(wj + i, e);
        tot += e;
      }
      float total = 0.0f;
      for (int q = 0; q < W; ++q) total += tot[q];
      const float inv = total == 0.0f ? 0.0f : 1.0f / total;
      for (int64_t i = 0; i < ld; i += W) vstore(wj + i, vload<V>(wj + i) * inv);
    } else {
      acc_t peak = bj[0];
      for (int64_t i = 1; i < ld; ++i) peak = bj[i] > peak ? bj[i] : peak;
      if (peak == neg_inf) peak = acc_t(0);
      acc_t total = acc_t(0);
      for (int64_t i = 0; i < ld; ++i) {
        const acc_t e = exp(bj[i] - peak);
        wj[i] = e;
        total += e;
      }
      const acc_t inv = total == acc_t(0) ? acc_t(0) : acc_t(1) / total;
      for (int64_t i = 0; i < ld; ++i) wj[i] *= inv;
    }
    fill_zero(wj + n_valid, ld - n_valid);
  }
}

// et (D_in, P) = e^T for e (n, D_in), with columns n .. P - 1 of et set to 0 (P = n rounded up to
// kPad). float goes through 8 x 8 blocks transposed in registers.
template <typename T>
MK_ALWAYS_INLINE void transpose_rows(T* __restrict__ et, int64_t P, const T* __restrict__ e, int64_t n, int64_t D_in) {
  int64_t d0 = 0;
  if constexpr (std::is_same_v<T, float>) {
    using V = typename VecOf<float>::type;
    typedef int I __attribute__((vector_size(32)));
    for (; d0 + 8 <= D_in; d0 += 8) {
      for (int64_t i0 = 0; i0 < P; i0 += 8) {
        V r[8];
        for (int q = 0; q < 8; ++q) r[q] = i0 + q < n ? vload<V>(e + (i0 + q) * D_in + d0) : V{};
        V t[8], u[8];
        for (int q = 0; q < 8; q += 2) {
          t[q] = __builtin_shuffle(r[q], r[q + 1], I{0, 8, 1, 9, 4, 12, 5, 13});
          t[q + 1] = __builtin_shuffle(r[q], r[q + 1], I{2, 10, 3, 11, 6, 14, 7, 15});
        }
        for (int q = 0; q < 8; q += 4) {
          u[q] = __builtin_shuffle(t[q], t[q + 2], I{0, 1, 8, 9, 4, 5, 12, 13});
          u[q + 1] = __builtin_shuffle(t[q], t[q + 2], I{2, 3, 10, 11, 6, 7, 14, 15});
          u[q + 2] = __builtin_shuffle(t[q + 1], t[q + 3], I{0, 1, 8, 9, 4, 5, 12, 13});
          u[q + 3] = __builtin_shuffle(t[q + 1], t[q + 3], I{2, 3, 10, 11, 6, 7, 14, 15});
        }
        for (int q = 0; q < 4; ++q) {
          vstore(et + (d0 + q) * P + i0, __builtin_shuffle(u[q], u[q + 4], I{0, 1, 2, 3, 8, 9, 10, 11}));
          vstore(et + (d0 + q + 4) * P + i0, __builtin_shuffle(u[q], u[q + 4], I{4, 5, 6, 7, 12, 13, 14, 15}));
        }
      }
    }
  }
  for (int64_t d = d0; d < D_in; ++d) {
    for (int64_t i = 0; i < n; ++i) et[d * P + i] = e[i * D_in + d];
    for (int64_t i = n; i < P; ++i) et[d * P + i] = T(0);
  }
}

// Per-thread scratch of the forward: a handful of (K, L)/(K, D) rows, reused across users. Rows over
// positions have room for L rounded up to a multiple of 8 (kPad), so the products over positions
// run on whole vectors.
constexpr int64_t kPad = 8;
MK_ALWAYS_INLINE int64_t round_up_pad(int64_t n) { return (n + kPad - 1) / kPad * kPad; }

template <typename acc_t>
struct ForwardScratch {
  std::vector<acc_t> buf;
  std::vector<int64_t> idx;
  acc_t *e, *et, *b, *bp, *w, *ebar, *z, *c, *h;
  ForwardScratch(int64_t L, int64_t D_in, int64_t D_out, int64_t K, bool convert_e)
      : buf(L * D_in + D_in * (L + kPad) + 3 * K * (L + kPad) + 2 * K * D_in + 2 * K * D_out), idx(L) {
    acc_t* p = buf.data();
    e = p; p += L * D_in;
    et = p; p += D_in * (L + kPad);
    b = p; p += K * (L + kPad);
    bp = p; p += K * (L + kPad);
    w = p; p += K * (L + kPad);
    ebar = p; p += K * D_in;
    z = p; p += K * D_out;
    c = p; p += K * D_out;
    h = p;
  }
};

// The routing iterations of one user over n positions: rows e (n, D_in), logits s.b (K, n) with row
// stride ld, coupling w (K, n) with row stride ld (the last iteration's is left there), z and c the
// last pre-activation and capsules. valid == nullptr means every position is valid. In "interests"
// mode ld is n rounded up to kPad and the pad columns of s.b hold finite values (0): the coupling is
// then computed on whole vectors there too, and those columns are never read as weights.
template <typename scalar_t, typename acc_t>
MK_ALWAYS_INLINE void route_user(const ForwardArgs<scalar_t, acc_t>& a, ForwardScratch<acc_t>& s, const acc_t* e,
                                 int64_t n, int64_t ld, int64_t n_valid, int64_t n_agg, const bool* active,
                                 acc_t* w) {
  const int64_t D_in = a.D_in, D_out = a.D_out, K = a.K;
  const int64_t P = round_up_pad(n);  // row stride of e^T and of the logit increment, zero padded
  for (int64_t t = 1; t <= a.r; ++t) {
    if (a.over_behaviors)
      coupling_over_behaviors(s.b, active, w, K, ld, n_valid);
    else
      coupling_over_interests(s.b, active, w, K, ld, ld);
    // Inactive interests have w_j = 0, hence ebar_j = z_j = c_j = h_j = 0 and unchanged logits.
    gemm_set(s.ebar, D_in, w, ld, e, D_in, K, n_agg, D_in);  // ebar = w e (columns >= n_agg have w = 0)
    const bool through_gram = t < a.r && a.gram != nullptr;
    if (through_gram) {
      gemm_set(s.h, D_in, s.ebar, D_in, a.gram, D_in, K, D_in, D_in);  // y = ebar Q
      for (int64_t j = 0; j < K; ++j) {
        const acc_t* x = s.ebar + j * D_in;
        acc_t* h = s.h + j * D_in;
        acc_t n2 = acc_t(0);
        for (int64_t d = 0; d < D_in; ++d) n2 += x[d] * h[d];
        if (n2 < acc_t(0)) n2 = acc_t(0);  // rounding of a positive semi-definite form; NaN stays NaN
        const acc_t scale = squash_scale(n2);
        for (int64_t d = 0; d < D_in; ++d) h[d] *= scale;  // h = a(|z|^2) y = S^T c
      }
    } else {
      gemm_set(s.z, D_out, s.ebar, D_in, a.St, D_out, K, D_in, D_out);  // z = ebar S^T
      for (int64_t j = 0; j < K; ++j) {
        const acc_t* z = s.z + j * D_out;
        acc_t n2 = acc_t(0);
        for (int64_t o = 0; o < D_out; ++o) n2 += z[o] * z[o];
        const acc_t scale = squash_scale(n2);
        acc_t* c = s.c + j * D_out;
        for (int64_t o = 0; o < D_out; ++o) c[o] = scale * z[o];
      }
    }
    if (t < a.r) {
      if (t == 1) {
        // e^T (D_in, P), built after the first pass over e has brought the rows into cache: the
        // logit update b += h e^T is then a product with a contiguous inner axis over positions.
        transpose_rows(s.et, P, e, n, D_in);
      }
      if (!through_gram) {
        gemm_set(s.h, D_in, s.c, D_out, a.S, D_in, K, D_out, D_in);  // h = c S
      }
      gemm_set(s.bp, P, s.h, D_in, s.et, P, K, D_in, P);            // db = h e^T
      // b += s db, in both paths (through Q or S). x * 1 == x exactly, and a contracted fma(1, db, b)
      // rounds once like b + db, so s = 1 gives the bits of the unscaled update.
      const acc_t scale = a.logit_scale;
      for (int64_t j = 0; j < K; ++j)
        for (int64_t i = 0; i < n; ++i) s.b[j * ld + i] += scale * s.bp[j * P + i];
    }
  }
}

#if MK_X86_DISPATCH
inline bool cpu_has_avx2_fma() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}
#endif

// St (D_in, D_out) = S^T for D_out a multiple of kPad, through the register transposes.
template <typename T>
void transpose_weight_generic(T* St, const T* S, int64_t D_out, int64_t D_in) {
  transpose_rows(St, D_out, S, D_out, D_in);
}
#if MK_X86_DISPATCH
template <typename T>
MK_TARGET_AVX2 void transpose_weight_avx2(T* St, const T* S, int64_t D_out, int64_t D_in) {
  transpose_rows(St, D_out, S, D_out, D_in);
}
#endif
template <typename T>
void transpose_weight(T* St, const T* S, int64_t D_out, int64_t D_in) {
#if MK_X86_DISPATCH
  if (cpu_has_avx2_fma()) return transpose_weight_avx2(St, S, D_out, D_in);
#endif
  transpose_weight_generic(St, S, D_out, D_in);
}

// Q (D_in, D_in) = S^T S = St S for St (D_in, D_out) with row stride D_out.
template <typename T>
void gram_generic(T* Q, const T* St, const T* S, int64_t D_out, int64_t D_in) {
  gemm_set(Q, D_in, St, D_out, S, D_in, D_in, D_out, D_in);
}
#if MK_X86_DISPATCH
template <typename T>
MK_TARGET_AVX2 void gram_avx2(T* Q, const T* St, const T* S, int64_t D_out, int64_t D_in) {
  gemm_set(Q, D_in, St, D_out, S, D_in, D_in, D_out, D_in);
}
#endif

// The forms of S the forward reads besides S itself: St = S^T (D_in, D_out), and Q = S^T S (D_in, D_in)
// when the call goes through Q. Cached per thread, keyed by the exact contents and shape of S: online
// serving calls with the same S again and again, and comparing S (a memcmp that stops at the first
// difference) costs far less than transposing it or the D_in^2 D_out product. A hit returns the very
// bits a miss computes, so results never depend on the cache. Valid until this thread's next call.
template <typename acc_t>
struct WeightForms {
  int64_t D_out = -1, D_in = -1;  // -1: nothing valid cached
  std::vector<acc_t> S, St, Q;    // Q empty until a call needs it
};

template <typename acc_t>
const WeightForms<acc_t>& weight_forms(const acc_t* S, int64_t D_out, int64_t D_in, bool need_q) {
  static thread_local WeightForms<acc_t> cached;
  const size_t bytes = static_cast<size_t>(D_out * D_in) * sizeof(acc_t);
  const bool hit = cached.D_out == D_out && cached.D_in == D_in && std::memcmp(cached.S.data(), S, bytes) == 0;
  if (!hit) {
    cached.D_out = -1;  // invalid until St is complete
    cached.S.assign(S, S + D_out * D_in);
    cached.St.resize(D_in * round_up_pad(D_out));
    if (D_out % kPad == 0) {
      transpose_weight(cached.St.data(), S, D_out, D_in);
    } else {
      for (int64_t o = 0; o < D_out; ++o)
        for (int64_t d = 0; d < D_in; ++d) cached.St[d * D_out + o] = S[o * D_in + d];
    }
    cached.Q.clear();
    cached.D_out = D_out;
    cached.D_in = D_in;
  }
  if (need_q && cached.Q.empty()) {
    cached.Q.resize(D_in * D_in);
#if MK_X86_DISPATCH
    if (cpu_has_avx2_fma())
      gram_avx2(cached.Q.data(), cached.St.data(), S, D_out, D_in);
    else
#endif
      gram_generic(cached.Q.data(), cached.St.data(), S, D_out, D_in);
  }
  return cached;
}

// Users per task so that a task carries enough work to be worth a thread (~8 MFLOP, a few hundred
// microseconds); small batches (online serving: B = 1, 16 at L = 50, D = 64) run on the calling
// thread. Measured on a shared 2-core machine: an OpenMP fork for ~100 us of work cost 2-5x more
// than it saved once the cores were contended (the idle worker spins, competing with the caller).
inline int64_t users_per_task(int64_t flops_per_user) {
  constexpr int64_t kMinTaskFlops = int64_t(8) << 20;
  return std::max<int64_t>(1, kMinTaskFlops / std::max<int64_t>(1, flops_per_user));
}

// The forward's grain: tasks of at least ~2 MFLOP (~50 us), so B = 16 at L = 50, D = 64 splits over
// two threads. Measured on the shared 2-core machine (load ~2.5): B = 16 took 0.104 ms on one thread
// and 0.067 ms on two, end to end through b2i_routing; B = 1 stays on the calling thread.
inline int64_t forward_users_per_task(int64_t flops_per_user) {
  constexpr int64_t kMinTaskFlops = int64_t(2) << 20;
  return std::max<int64_t>(1, kMinTaskFlops / std::max<int64_t>(1, flops_per_user));
}

// Users whose dS terms are gathered before one product updates the partial: dS_part += dzt ebar with
// K * kDsGroup inner terms instead of K, so the (D_out, D_in) partial is loaded and stored once per
// group rather than once per user (at K = 4 that load/store cost as much as the product).
constexpr int64_t kDsGroup = 8;

template <typename acc_t>
struct BackwardScratch {
  std::vector<acc_t> buf;
  acc_t *e, *dz, *dzt, *g, *ebar, *wt, *de;  // dzt (D_out, K kDsGroup), ebar (K kDsGroup, D_in): a group
  BackwardScratch(int64_t L, int64_t D_in, int64_t D_out, int64_t K, bool convert_e)
      : buf(L * D_in + (convert_e ? L * D_in : 0) + K * D_out + kDsGroup * K * D_out + K * D_in +
            kDsGroup * K * D_in + L * K) {
    acc_t* p = buf.data();
    e = p; p += L * D_in;
    de = nullptr;
    if (convert_e) { de = p; p += L * D_in; }
    dz = p; p += K * D_out;
    dzt = p; p += D_out * K * kDsGroup;
    g = p; p += K * D_in;
    ebar = p; p += K * kDsGroup * D_in;
    wt = p;
  }
};

inline at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "mind_kernels::", op, ": `", name, "` must be a CPU tensor, got ", t.device());
}

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16 || d == at::kDouble, "mind_kernels::", op,
              ": `", name, "` must be float32, float16, bfloat16 or float64, got ", d);
}

// A (B, n) mask as contiguous bool, or an undefined tensor for None.
inline at::Tensor bool_mask(const std::optional<at::Tensor>& m, int64_t B, int64_t n, const char* name, const char* dims,
                            const char* op = "routing_forward") {
  if (!m.has_value() || !m->defined()) return at::Tensor();
  check_cpu(*m, op, name);
  TORCH_CHECK(m->dim() == 2 && m->size(0) == B && m->size(1) == n, "mind_kernels::", op, ": `", name,
              "` must be ", dims, " = (", B, ", ", n, "), got shape ", m->sizes());
  TORCH_CHECK(!m->is_floating_point() && !m->is_complex(), "mind_kernels::", op, ": `", name,
              "` must be bool or integer 0/1, got ", m->scalar_type());
  at::Tensor b = m->scalar_type() == at::kBool ? *m : m->ne(0);
  return b.contiguous();
}

// dS (D_out, D_in) in acc_t, summed over users cut into chunks of `chunk`: range(part, b0, b1) adds
// users [b0, b1)'s contribution into its own zeroed (D_out x D_in) part, the chunks run in parallel, and
// the parts are summed in chunk order, (((p0 + p1) + p2) + ...), so dS does not depend on scheduling.
template <typename acc_t, typename Range>
inline at::Tensor dS_over_user_chunks(int64_t B, int64_t chunk, int64_t D_out, int64_t D_in,
                                      const at::TensorOptions& options, Range&& range) {
  const int64_t n_chunks = at::divup(B, chunk);
  const int64_t n = D_out * D_in;
  std::vector<acc_t> parts(n_chunks * n, acc_t(0));
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) range(parts.data() + c * n, c * chunk, std::min(B, (c + 1) * chunk));
  });
  at::Tensor dS = at::empty({D_out, D_in}, options);
  acc_t* out = dS.mutable_data_ptr<acc_t>();
  at::parallel_for(0, n, 4096, [&](int64_t x0, int64_t x1) {
    for (int64_t x = x0; x < x1; ++x) {
      acc_t t = parts[x];
      for (int64_t c = 1; c < n_chunks; ++c) t += parts[c * n + x];
      out[x] = t;
    }
  });
  return dS;
}

}  // namespace detail
}  // namespace mind_kernels
