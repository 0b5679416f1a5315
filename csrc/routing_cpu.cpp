// Fused CPU kernels of the B2I routing op (ROUTING.md): one pass per user, everything in cache.
//
// Forward, per user (E_u (L, D_in), S (D_out, D_in), logits b (K, L)), reassociated so each
// iteration works on D_in-sized vectors and touches S only K times:
//     w       = coupling(b)                            (K, L)
//     ebar_j  = sum_i w_ij e_i                          (K, D_in)
//     z_j     = S ebar_j  (= sum_i w_ij u_i)            (K, D_out)
//     c_j     = squash(z_j)
//     t < r:  h_j = S^T c_j (D_in);  b_ij += s * (e_i . h_j)  (= s * (c_j . u_i), s = logit_scale)
// When D_in < 2 D_out and r >= 2 (uses_gram in routing_math.h: shapes only), the iterations t < r
// go through the Gram matrix Q = S^T S (D_in, D_in) instead, and never form z:
//     y_j = Q ebar_j;  |z_j|^2 = ebar_j . y_j;  h_j = S^T c_j = a(|z_j|^2) y_j
// which costs K D_in^2 instead of 2 K D_in D_out per iteration (22% of the forward's FLOPs at
// L = 50, D = 64, K = 4, r = 3), for D_in^2 D_out once per S (cached per thread: weight_forms).
// Outputs: capsules c (E's dtype), the final w and z (accumulation dtype), which is all backward needs.
//
// Backward (detach_routing=True), per user, with G = dL/dc:
//     dz_j = squash'(z_j)^T G_j;  g_j = S^T dz_j (K, D_in);  dE_i = sum_j w_ij g_j  (= S^T du_i)
//     ebar_j = sum_i w_ij e_i;    dS += sum_j dz_j ebar_j^T                         (= sum_i du_i e_i^T)
// dS is reduced deterministically: users are split into chunks that depend on B only (never on the
// thread count), each chunk accumulates its own partial in a fixed user order, and the partials are
// summed in chunk order.
//
// Every inner loop is an "axpy over rows" with a contiguous inner axis, so it vectorises without a
// floating-point reduction; the per-user bodies are compiled twice (baseline x86-64 and AVX2+FMA)
// and the AVX2 copy is picked at run time where the CPU has it.
// The shared building blocks are in routing_cpu_blocks.h.

#include "routing_cpu_blocks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace mind_kernels {
namespace {

using namespace detail;

template <typename scalar_t, typename acc_t>
MK_ALWAYS_INLINE void forward_user(const ForwardArgs<scalar_t, acc_t>& a, ForwardScratch<acc_t>& s, int64_t u) {
  const int64_t L = a.L, D_in = a.D_in, D_out = a.D_out, K = a.K;
  const bool* valid = a.mask ? a.mask + u * L : nullptr;
  const bool* active = a.imask ? a.imask + u * K : nullptr;
  const scalar_t* Eu = a.E + u * L * D_in;
  const acc_t* b0u = a.b0 + u * a.b0_user_stride;
  acc_t* w = a.coupling + u * K * L;  // the last iteration's w is the output

  if (a.over_behaviors) {
    // Padded positions sit in the softmax denominator: every position takes part in the logit update
    // and the softmax, but only valid ones carry weight. The softmax over positions and the update
    // are per position, so the positions are reordered valid first (order kept within each group):
    // the aggregation ebar = w e then runs over the n_valid first rows only. That skip is exact
    // (0 * x = 0) unless a padded row holds a NaN/Inf, which must reach the output through 0 * NaN
    // (the reference's non-finite contract): such a user aggregates over all L rows.
    // Logit rows have stride ld = L rounded up to kPad; the extra columns hold -inf (weight 0).
    int64_t n_valid = 0;
    bool prefix = true;
    if (valid) {
      for (int64_t i = 0; i < L; ++i)
        if (valid[i]) {
          prefix &= (n_valid == i);
          s.idx[n_valid++] = i;
        }
      if (!prefix) {
        int64_t k = n_valid;
        for (int64_t i = 0; i < L; ++i)
          if (!valid[i]) s.idx[k++] = i;
      }
    } else {
      n_valid = L;
    }
    const int64_t ld = round_up_pad(L);
    const acc_t* e;
    if (prefix) {
      e = user_rows(Eu, s.e, L, D_in, false, [](int64_t) { return false; });
      for (int64_t j = 0; j < K; ++j)
        for (int64_t i = 0; i < L; ++i) s.b[j * ld + i] = b0u[j * L + i];
    } else {
      for (int64_t k = 0; k < L; ++k) convert_row(s.e + k * D_in, Eu + s.idx[k] * D_in, D_in);
      e = s.e;
      for (int64_t j = 0; j < K; ++j)
        for (int64_t k = 0; k < L; ++k) s.b[j * ld + k] = b0u[j * L + s.idx[k]];
    }
    const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = 0; j < K; ++j)
      for (int64_t i = L; i < ld; ++i) s.b[j * ld + i] = neg_inf;
    // x - x is 0 for finite x and NaN for NaN/Inf (an AND over lanes: vectorises, no float reduction).
    int finite = 1;
    for (int64_t x = n_valid * D_in; x < L * D_in; ++x) finite &= (e[x] - e[x] == acc_t(0));
    const int64_t n_agg = finite ? n_valid : L;
    route_user(a, s, e, L, ld, n_valid, n_agg, active, s.w);
    for (int64_t j = 0; j < K; ++j)
      for (int64_t k = 0; k < L; ++k) w[j * L + (prefix ? k : s.idx[k])] = s.w[j * ld + k];
  } else {
    // "interests" mode: a masked position has w = 0 in every iteration and never influences a
    // valid one, so the routing runs on the valid positions only (their rows may hold anything,
    // even NaN, and are never read). w is scattered back with 0 at masked positions.
    int64_t n = 0;
    bool prefix = true;
    if (valid) {
      for (int64_t i = 0; i < L; ++i)
        if (valid[i]) {
          prefix &= (n == i);
          s.idx[n++] = i;
        }
    } else {
      n = L;
    }
    const int64_t ld = round_up_pad(n);
    const acc_t* e;
    if (prefix) {
      e = user_rows(Eu, s.e, n, D_in, false, [](int64_t) { return false; });
      for (int64_t j = 0; j < K; ++j)
        for (int64_t i = 0; i < n; ++i) s.b[j * ld + i] = b0u[j * L + i];
    } else {
      for (int64_t k = 0; k < n; ++k) convert_row(s.e + k * D_in, Eu + s.idx[k] * D_in, D_in);
      e = s.e;
      for (int64_t j = 0; j < K; ++j)
        for (int64_t k = 0; k < n; ++k) s.b[j * ld + k] = b0u[j * L + s.idx[k]];
    }
    for (int64_t j = 0; j < K; ++j)
      for (int64_t i = n; i < ld; ++i) s.b[j * ld + i] = acc_t(0);
    route_user(a, s, e, n, ld, n, n, active, s.w);
    if (n < L) fill_zero(w, K * L);
    for (int64_t j = 0; j < K; ++j)
      for (int64_t k = 0; k < n; ++k) w[j * L + (prefix ? k : s.idx[k])] = s.w[j * ld + k];
  }
  convert_row(a.preact + u * K * D_out, s.z, K * D_out);
  convert_row(a.capsules + u * K * D_out, s.c, K * D_out);
}

template <typename scalar_t, typename acc_t>
void forward_range_generic(const ForwardArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  ForwardScratch<acc_t> s(a.L, a.D_in, a.D_out, a.K, !std::is_same_v<scalar_t, acc_t>);
  for (int64_t u = begin; u < end; ++u) forward_user(a, s, u);
}

#if MK_X86_DISPATCH
template <typename scalar_t, typename acc_t>
MK_TARGET_AVX2 void forward_range_avx2(const ForwardArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  ForwardScratch<acc_t> s(a.L, a.D_in, a.D_out, a.K, !std::is_same_v<scalar_t, acc_t>);
  for (int64_t u = begin; u < end; ++u) forward_user(a, s, u);
}
#endif

template <typename scalar_t, typename acc_t>
void forward_range(const ForwardArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
#if MK_X86_DISPATCH
  if (cpu_has_avx2_fma()) return forward_range_avx2(a, begin, end);
#endif
  forward_range_generic(a, begin, end);
}

// ------------------------------------------------------------------------------------------ backward

template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  const acc_t* G;       // (B, K, D_out)
  const scalar_t* E;    // (B, L, D_in)
  const acc_t* S;       // (D_out, D_in)
  const acc_t* w;       // (B, K, L)
  const acc_t* z;       // (B, K, D_out)
  scalar_t* dE;         // (B, L, D_in)
  int64_t L, D_in, D_out, K;
};

// One user's dE rows; its dS terms dz_j (as columns slot K .. slot K + K - 1 of s.dzt) and ebar_j (rows
// of s.ebar) go to its slot of the group, which backward_users folds into dS_part.
template <typename scalar_t, typename acc_t>
MK_ALWAYS_INLINE void backward_user(const BackwardArgs<scalar_t, acc_t>& a, BackwardScratch<acc_t>& s,
                                    int64_t slot, int64_t u) {
  const int64_t L = a.L, D_in = a.D_in, D_out = a.D_out, K = a.K;
  const int64_t ldt = K * kDsGroup;
  const acc_t* w = a.w + u * K * L;
  const acc_t* z = a.z + u * K * D_out;
  const acc_t* G = a.G + u * K * D_out;
  acc_t* dzt = s.dzt + slot * K;
  acc_t* ebar = s.ebar + slot * K * D_in;

  for (int64_t j = 0; j < K; ++j) {
    acc_t* dz = s.dz + j * D_out;
    squash_backward_row(z + j * D_out, G + j * D_out, dz, static_cast<int>(D_out));
    for (int64_t o = 0; o < D_out; ++o) dzt[o * ldt + j] = dz[o];
    for (int64_t i = 0; i < L; ++i) s.wt[i * K + j] = w[j * L + i];
  }
  // Positions with no weight in any interest (masked ones) contribute nothing to ebar: zero their
  // rows so that a NaN/Inf in padding cannot reach dS through 0 * NaN.
  auto unused = [&](int64_t i) {
    for (int64_t j = 0; j < K; ++j)
      if (s.wt[i * K + j] != acc_t(0)) return false;
    return true;
  };
  bool any_unused = false;
  for (int64_t i = 0; i < L && !any_unused; ++i) any_unused = unused(i);
  const acc_t* e = user_rows(a.E + u * L * D_in, s.e, L, D_in, any_unused, unused);
  gemm_set(s.g, D_in, s.dz, D_out, a.S, D_in, K, D_out, D_in);  // g = dz S  (g_j = S^T dz_j)
  gemm_set(ebar, D_in, w, L, e, D_in, K, L, D_in);              // ebar = w e
  // dE = w^T g (masked i: w = 0 -> 0)
  scalar_t* dEu = a.dE + u * L * D_in;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    gemm_set(dEu, D_in, s.wt, K, s.g, D_in, L, K, D_in);
  } else {
    gemm_set(s.de, D_in, s.wt, K, s.g, D_in, L, K, D_in);
    convert_row(dEu, s.de, L * D_in);
  }
}

// Users begin .. end - 1 in order, in groups of kDsGroup: dS_part += sum over the group's users and
// interests of dz_j ebar_j^T (= sum_i du_i e_i^T), the terms summed in that fixed order.
template <typename scalar_t, typename acc_t>
MK_ALWAYS_INLINE void backward_users(const BackwardArgs<scalar_t, acc_t>& a, acc_t* dS_part, int64_t begin,
                                     int64_t end) {
  BackwardScratch<acc_t> s(a.L, a.D_in, a.D_out, a.K, !std::is_same_v<scalar_t, acc_t>);
  for (int64_t u0 = begin; u0 < end; u0 += kDsGroup) {
    const int64_t n = std::min(kDsGroup, end - u0);
    for (int64_t slot = 0; slot < n; ++slot) backward_user(a, s, slot, u0 + slot);
    gemm_acc(dS_part, a.D_in, s.dzt, a.K * kDsGroup, s.ebar, a.D_in, a.D_out, n * a.K, a.D_in);
  }
}

template <typename scalar_t, typename acc_t>
void backward_range_generic(const BackwardArgs<scalar_t, acc_t>& a, acc_t* dS_part, int64_t begin, int64_t end) {
  backward_users(a, dS_part, begin, end);
}

#if MK_X86_DISPATCH
template <typename scalar_t, typename acc_t>
MK_TARGET_AVX2 void backward_range_avx2(const BackwardArgs<scalar_t, acc_t>& a, acc_t* dS_part, int64_t begin,
                                        int64_t end) {
  backward_users(a, dS_part, begin, end);
}
#endif

template <typename scalar_t, typename acc_t>
void backward_range(const BackwardArgs<scalar_t, acc_t>& a, acc_t* dS_part, int64_t begin, int64_t end) {
#if MK_X86_DISPATCH
  if (cpu_has_avx2_fma()) return backward_range_avx2(a, dS_part, begin, end);
#endif
  backward_range_generic(a, dS_part, begin, end);
}

// ------------------------------------------------------------------------------------------ ops

std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_forward_cpu(const at::Tensor& behaviors,
                                                                     const at::Tensor& weight,
                                                                     const at::Tensor& init_logits,
                                                                     const std::optional<at::Tensor>& mask,
                                                                     const std::optional<at::Tensor>& interest_mask,
                                                                     int64_t num_iters, bool over_behaviors,
                                                                     double logit_scale) {
  constexpr const char* op = "routing_forward";
  check_cpu(behaviors, op, "behaviors");
  check_cpu(weight, op, "weight");
  check_cpu(init_logits, op, "init_logits");
  TORCH_CHECK(behaviors.dim() == 3, "mind_kernels::routing_forward: `behaviors` must be 3-D (B, L, D_in), got shape ",
              behaviors.sizes());
  check_float_dtype(behaviors, op, "behaviors");
  const int64_t B = behaviors.size(0), L = behaviors.size(1), D_in = behaviors.size(2);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == D_in,
              "mind_kernels::routing_forward: `weight` must be (D_out, D_in) with D_in = ", D_in, ", got shape ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == behaviors.scalar_type() || weight.scalar_type() == at::kFloat,
              "mind_kernels::routing_forward: `weight` must have the dtype of `behaviors` (", behaviors.scalar_type(),
              ") or float32, got ", weight.scalar_type());
  TORCH_CHECK(init_logits.dim() == 2 || init_logits.dim() == 3,
              "mind_kernels::routing_forward: `init_logits` must be (K, L) or (B, K, L), got shape ",
              init_logits.sizes());
  TORCH_CHECK(init_logits.is_floating_point(), "mind_kernels::routing_forward: `init_logits` must be floating, got ",
              init_logits.scalar_type());
  const int64_t D_out = weight.size(0), K = init_logits.size(-2);
  TORCH_CHECK(init_logits.size(-1) == L && (init_logits.dim() == 2 || init_logits.size(0) == B),
              "mind_kernels::routing_forward: `init_logits` must be (K, L) or (B, K, L) with B = ", B, ", L = ", L,
              ", got shape ", init_logits.sizes());
  TORCH_CHECK(num_iters >= 1, "mind_kernels::routing_forward: `num_iters` must be >= 1, got ", num_iters);
  TORCH_CHECK(std::isfinite(logit_scale) && logit_scale > 0,
              "mind_kernels::routing_forward: `logit_scale` must be a finite float > 0, got ", logit_scale);

  const auto acc = acc_type_of(behaviors.scalar_type());
  const at::Tensor E = behaviors.contiguous();
  const at::Tensor S = weight.to(acc).contiguous();
  const at::Tensor b0 = init_logits.to(acc).contiguous();
  const at::Tensor m = bool_mask(mask, B, L, "mask", "(B, L)");
  const at::Tensor im = bool_mask(interest_mask, B, K, "interest_mask", "(B, K)");

  at::Tensor capsules = at::empty({B, K, D_out}, behaviors.options());
  at::Tensor coupling = at::empty({B, K, L}, behaviors.options().dtype(acc));
  at::Tensor preact = at::empty({B, K, D_out}, behaviors.options().dtype(acc));
  if (B == 0 || K == 0) return {capsules, coupling, preact};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, E.scalar_type(), "mind_kernels_routing_forward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t* Sp = S.const_data_ptr<acc_t>();
    const bool through_q = uses_gram(D_in, D_out, num_iters);
    const WeightForms<acc_t>& forms = weight_forms(Sp, D_out, D_in, through_q);
    ForwardArgs<scalar_t, acc_t> a{E.const_data_ptr<scalar_t>(),
                                   Sp,
                                   forms.St.data(),
                                   through_q ? forms.Q.data() : nullptr,
                                   b0.const_data_ptr<acc_t>(),
                                   b0.dim() == 3 ? K * L : 0,
                                   m.defined() ? m.const_data_ptr<bool>() : nullptr,
                                   im.defined() ? im.const_data_ptr<bool>() : nullptr,
                                   capsules.mutable_data_ptr<scalar_t>(),
                                   coupling.mutable_data_ptr<acc_t>(),
                                   preact.mutable_data_ptr<acc_t>(),
                                   L, D_in, D_out, K, num_iters, over_behaviors,
                                   static_cast<acc_t>(logit_scale)};
    const int64_t flops = 4 * num_iters * K * (L + D_out) * D_in;
    at::parallel_for(0, B, forward_users_per_task(flops), [&](int64_t begin, int64_t end) { forward_range(a, begin, end); });
  });
  return {capsules, coupling, preact};
}

std::tuple<at::Tensor, at::Tensor> routing_backward_cpu(const at::Tensor& grad_capsules, const at::Tensor& behaviors,
                                                        const at::Tensor& weight, const at::Tensor& coupling,
                                                        const at::Tensor& preactivation) {
  constexpr const char* op = "routing_backward";
  check_cpu(grad_capsules, op, "grad_capsules");
  check_cpu(behaviors, op, "behaviors");
  check_cpu(weight, op, "weight");
  check_cpu(coupling, op, "coupling");
  check_cpu(preactivation, op, "preactivation");
  TORCH_CHECK(behaviors.dim() == 3, "mind_kernels::routing_backward: `behaviors` must be 3-D (B, L, D_in), got shape ",
              behaviors.sizes());
  check_float_dtype(behaviors, op, "behaviors");
  const int64_t B = behaviors.size(0), L = behaviors.size(1), D_in = behaviors.size(2);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == D_in,
              "mind_kernels::routing_backward: `weight` must be (D_out, D_in) with D_in = ", D_in, ", got shape ",
              weight.sizes());
  check_float_dtype(weight, op, "weight");
  const int64_t D_out = weight.size(0);
  TORCH_CHECK(coupling.dim() == 3 && coupling.size(0) == B && coupling.size(2) == L,
              "mind_kernels::routing_backward: `coupling` must be (B, K, L) with B = ", B, ", L = ", L,
              ", got shape ", coupling.sizes());
  const int64_t K = coupling.size(1);
  TORCH_CHECK(preactivation.dim() == 3 && preactivation.size(0) == B && preactivation.size(1) == K &&
                  preactivation.size(2) == D_out,
              "mind_kernels::routing_backward: `preactivation` must be (B, K, D_out) = (", B, ", ", K, ", ", D_out,
              "), got shape ", preactivation.sizes());
  TORCH_CHECK(grad_capsules.dim() == 3 && grad_capsules.size(0) == B && grad_capsules.size(1) == K &&
                  grad_capsules.size(2) == D_out,
              "mind_kernels::routing_backward: `grad_capsules` must be (B, K, D_out) = (", B, ", ", K, ", ", D_out,
              "), got shape ", grad_capsules.sizes());

  const auto acc = acc_type_of(behaviors.scalar_type());
  // Autograd may hand a stride-0 (expanded) gradient: make everything dense in the accumulation dtype.
  const at::Tensor G = grad_capsules.to(acc).contiguous();
  const at::Tensor E = behaviors.contiguous();
  const at::Tensor S = weight.to(acc).contiguous();
  const at::Tensor w = coupling.to(acc).contiguous();
  const at::Tensor z = preactivation.to(acc).contiguous();

  at::Tensor dE = at::empty({B, L, D_in}, behaviors.options());
  at::Tensor dS_acc;
  if (B == 0 || K == 0) {
    dE.zero_();
    return {dE, at::zeros({D_out, D_in}, weight.options())};
  }

  // Fixed chunking of users (a function of B and the sizes only): chunk c owns partial c of dS.
  const int64_t per_user = 8 * K * (L + D_out) * D_in;
  const int64_t max_chunks = std::clamp<int64_t>((int64_t(1) << 24) / std::max<int64_t>(1, D_out * D_in), 1, 64);
  const int64_t min_chunk = users_per_task(per_user);
  const int64_t chunk = std::max(min_chunk, at::divup(B, max_chunks));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, E.scalar_type(), "mind_kernels_routing_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    BackwardArgs<scalar_t, acc_t> a{G.const_data_ptr<acc_t>(), E.const_data_ptr<scalar_t>(), S.const_data_ptr<acc_t>(),
                                    w.const_data_ptr<acc_t>(), z.const_data_ptr<acc_t>(), dE.mutable_data_ptr<scalar_t>(),
                                    L, D_in, D_out, K};
    dS_acc = dS_over_user_chunks<acc_t>(B, chunk, D_out, D_in, weight.options().dtype(acc),
                                        [&](acc_t* part, int64_t b0, int64_t b1) { backward_range(a, part, b0, b1); });
  });
  at::Tensor dS = dS_acc.scalar_type() == weight.scalar_type() ? dS_acc : dS_acc.to(weight.scalar_type());
  return {dE, dS};
}

}  // namespace

TORCH_LIBRARY_IMPL(mind_kernels, CPU, m) {
  m.impl("routing_forward", &routing_forward_cpu);
  m.impl("routing_backward", &routing_backward_cpu);
}

}  // namespace mind_kernels