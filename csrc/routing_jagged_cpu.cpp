// Fused CPU kernels of the routing op on jagged batches (ROUTING.md, "Jagged batches"): histories as
// values (N, D_in) with offsets (B + 1) int64, user u's behaviours being values[offsets[u] : offsets[u+1]].
//
// The per-user math is the padded kernel's (routing_cpu.cpp, building blocks in routing_cpu_blocks.h);
// only the walk over users differs: user u's rows start at values + offsets[u] D_in and there are
// n_u = offsets[u+1] - offsets[u] of them, all real. So every product runs over n_u rows, never over
// L_max, and the cost follows N = sum_u n_u:
//
//   softmax_over="interests": positions past n_u have w = 0 in the padded op and never influence a
//     real one, so the routing runs over the n_u rows exactly as the padded kernel's compacted path.
//   softmax_over="behaviors": the padded op's padding sits in each interest's softmax denominator.
//     The padded op equal to a jagged call pads with zero rows, whose logits never move (u_i = S 0 = 0,
//     so b_ij += s (c_j . 0) leaves b0_ij as it is); the coupling therefore reads the L_max columns of
//     b (the first n_u updated, the rest b0), O(K L_max) exponentials per iteration, while the
//     products (the D-sized work) run over the n_u rows only.
//
// b0 is (K, L_max) or (B, K, L_max); user u reads its first n_u columns (all L_max in "behaviors").
// Outputs: capsules (B, K, D_out) in values' dtype; the final coupling w as (N, K) in the accumulation
// dtype (row offsets[u] + i holds behaviour i's weights in each interest, aligned with values), and the
// pre-activation z (B, K, D_out). Backward (detach_routing=True) needs values, S, w and z, and writes
// dvalues (N, D_in) and dS; dS is reduced in a fixed user chunking, as in the padded kernel.
#include "routing_cpu_blocks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

namespace mind_kernels {
namespace {

using namespace detail;

template <typename scalar_t, typename acc_t>
struct JaggedForwardArgs {
  ForwardArgs<scalar_t, acc_t> a;  // E = values (N, D_in), L = L_max, mask = nullptr, coupling (N, K)
  const int64_t* offsets;          // (B + 1)
};

template <typename scalar_t, typename acc_t>
MK_ALWAYS_INLINE void forward_user_jagged(const JaggedForwardArgs<scalar_t, acc_t>& ja, ForwardScratch<acc_t>& s,
                                          int64_t u) {
  const ForwardArgs<scalar_t, acc_t>& a = ja.a;
  const int64_t L = a.L, D_in = a.D_in, D_out = a.D_out, K = a.K;
  const int64_t off = ja.offsets[u], n = ja.offsets[u + 1] - off;
  const bool* active = a.imask ? a.imask + u * K : nullptr;
  const acc_t* b0u = a.b0 + u * a.b0_user_stride;
  const acc_t* e = user_rows(a.E + off * D_in, s.e, n, D_in, false, [](int64_t) { return false; });
  int64_t ld;
  if (a.over_behaviors) {
    // All L_max columns take part in the softmax: the first n get updated, the padding keeps b0.
    ld = round_up_pad(L);
    const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = 0; j < K; ++j) {
      for (int64_t i = 0; i < L; ++i) s.b[j * ld + i] = b0u[j * L + i];
      for (int64_t i = L; i < ld; ++i) s.b[j * ld + i] = neg_inf;  // outside the padded op: weight 0
    }
  } else {
    ld = round_up_pad(n);
    for (int64_t j = 0; j < K; ++j) {
      for (int64_t i = 0; i < n; ++i) s.b[j * ld + i] = b0u[j * L + i];
      for (int64_t i = n; i < ld; ++i) s.b[j * ld + i] = acc_t(0);  // finite pad: never read as weights
    }
  }
  route_user(a, s, e, n, ld, n, n, active, s.w);
  acc_t* w = a.coupling + off * K;  // (n, K), aligned with the user's rows of values
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < K; ++j) w[i * K + j] = s.w[j * ld + i];
  convert_row(a.preact + u * K * D_out, s.z, K * D_out);
  convert_row(a.capsules + u * K * D_out, s.c, K * D_out);
}

template <typename scalar_t, typename acc_t>
void jagged_forward_range_generic(const JaggedForwardArgs<scalar_t, acc_t>& ja, int64_t begin, int64_t end) {
  ForwardScratch<acc_t> s(ja.a.L, ja.a.D_in, ja.a.D_out, ja.a.K, !std::is_same_v<scalar_t, acc_t>);
  for (int64_t u = begin; u < end; ++u) forward_user_jagged(ja, s, u);
}

#if MK_X86_DISPATCH
template <typename scalar_t, typename acc_t>
MK_TARGET_AVX2 void jagged_forward_range_avx2(const JaggedForwardArgs<scalar_t, acc_t>& ja, int64_t begin,
                                              int64_t end) {
  ForwardScratch<acc_t> s(ja.a.L, ja.a.D_in, ja.a.D_out, ja.a.K, !std::is_same_v<scalar_t, acc_t>);
  for (int64_t u = begin; u < end; ++u) forward_user_jagged(ja, s, u);
}
#endif

template <typename scalar_t, typename acc_t>
void jagged_forward_range(const JaggedForwardArgs<scalar_t, acc_t>& ja, int64_t begin, int64_t end) {
#if MK_X86_DISPATCH
  if (cpu_has_avx2_fma()) return jagged_forward_range_avx2(ja, begin, end);
#endif
  jagged_forward_range_generic(ja, begin, end);
}

// ------------------------------------------------------------------------------------------ backward

template <typename scalar_t, typename acc_t>
struct JaggedBackwardArgs {
  const acc_t* G;         // (B, K, D_out)
  const scalar_t* E;      // values (N, D_in)
  const int64_t* offsets; // (B + 1)
  const acc_t* S;         // (D_out, D_in)
  const acc_t* w;         // (N, K)
  const acc_t* z;         // (B, K, D_out)
  scalar_t* dE;           // (N, D_in)
  int64_t L, D_in, D_out, K;  // L = the longest history (scratch size)
};

// One user's dvalues rows, and its dS terms in slot `slot` of the group (as the padded backward_user).
template <typename scalar_t, typename acc_t>
MK_ALWAYS_INLINE void backward_user_jagged(const JaggedBackwardArgs<scalar_t, acc_t>& a, BackwardScratch<acc_t>& s,
                                           int64_t slot, int64_t u) {
  const int64_t D_in = a.D_in, D_out = a.D_out, K = a.K;
  const int64_t off = a.offsets[u], n = a.offsets[u + 1] - off;
  const int64_t ldt = K * kDsGroup;
  const acc_t* wt = a.w + off * K;  // (n, K): w^T of the user, as stored
  const acc_t* z = a.z + u * K * D_out;
  const acc_t* G = a.G + u * K * D_out;
  acc_t* dzt = s.dzt + slot * K;
  acc_t* ebar = s.ebar + slot * K * D_in;
  acc_t* wk = s.wt;  // (K, n): w of the user, rows over positions

  for (int64_t j = 0; j < K; ++j) {
    acc_t* dz = s.dz + j * D_out;
    squash_backward_row(z + j * D_out, G + j * D_out, dz, static_cast<int>(D_out));
    for (int64_t o = 0; o < D_out; ++o) dzt[o * ldt + j] = dz[o];
    for (int64_t i = 0; i < n; ++i) wk[j * n + i] = wt[i * K + j];
  }
  // Rows with no weight in any interest (every interest inactive) are zeroed for ebar, as in the
  // padded kernel, so a NaN/Inf there cannot reach dS through 0 * NaN.
  auto unused = [&](int64_t i) {
    for (int64_t j = 0; j < K; ++j)
      if (wt[i * K + j] != acc_t(0)) return false;
    return true;
  };
  bool any_unused = false;
  for (int64_t i = 0; i < n && !any_unused; ++i) any_unused = unused(i);
  const acc_t* e = user_rows(a.E + off * D_in, s.e, n, D_in, any_unused, unused);
  gemm_set(s.g, D_in, s.dz, D_out, a.S, D_in, K, D_out, D_in);  // g = dz S  (g_j = S^T dz_j)
  gemm_set(ebar, D_in, wk, n, e, D_in, K, n, D_in);             // ebar = w e
  scalar_t* dEu = a.dE + off * D_in;                            // dE = w^T g
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    gemm_set(dEu, D_in, wt, K, s.g, D_in, n, K, D_in);
  } else {
    gemm_set(s.de, D_in, wt, K, s.g, D_in, n, K, D_in);
    convert_row(dEu, s.de, n * D_in);
  }
}

template <typename scalar_t, typename acc_t>
MK_ALWAYS_INLINE void backward_users_jagged(const JaggedBackwardArgs<scalar_t, acc_t>& a, acc_t* dS_part,
                                            int64_t begin, int64_t end) {
  BackwardScratch<acc_t> s(a.L, a.D_in, a.D_out, a.K, !std::is_same_v<scalar_t, acc_t>);
  for (int64_t u0 = begin; u0 < end; u0 += kDsGroup) {
    const int64_t n = std::min(kDsGroup, end - u0);
    for (int64_t slot = 0; slot < n; ++slot) backward_user_jagged(a, s, slot, u0 + slot);
    gemm_acc(dS_part, a.D_in, s.dzt, a.K * kDsGroup, s.ebar, a.D_in, a.D_out, n * a.K, a.D_in);
  }
}

template <typename scalar_t, typename acc_t>
void jagged_backward_range_generic(const JaggedBackwardArgs<scalar_t, acc_t>& a, acc_t* dS_part, int64_t begin,
                                   int64_t end) {
  backward_users_jagged(a, dS_part, begin, end);
}

#if MK_X86_DISPATCH
template <typename scalar_t, typename acc_t>
MK_TARGET_AVX2 void jagged_backward_range_avx2(const JaggedBackwardArgs<scalar_t, acc_t>& a, acc_t* dS_part,
                                               int64_t begin, int64_t end) {
  backward_users_jagged(a, dS_part, begin, end);
}
#endif

template <typename scalar_t, typename acc_t>
void jagged_backward_range(const JaggedBackwardArgs<scalar_t, acc_t>& a, acc_t* dS_part, int64_t begin, int64_t end) {
#if MK_X86_DISPATCH
  if (cpu_has_avx2_fma()) return jagged_backward_range_avx2(a, dS_part, begin, end);
#endif
  jagged_backward_range_generic(a, dS_part, begin, end);
}

// ------------------------------------------------------------------------------------------ checks

// values (N, D_in) floating and offsets (B + 1) int64 on the CPU, offsets[0] = 0, non-decreasing,
// offsets[B] = N. Returns the contiguous offsets and the longest history.
std::pair<at::Tensor, int64_t> check_jagged(const at::Tensor& values, const at::Tensor& offsets, const char* op) {
  check_cpu(values, op, "values");
  check_cpu(offsets, op, "offsets");
  TORCH_CHECK(values.dim() == 2, "mind_kernels::", op, ": `values` must be 2-D (N, D_in), got shape ",
              values.sizes());
  check_float_dtype(values, op, "values");
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1, "mind_kernels::", op,
              ": `offsets` must be 1-D (B + 1,), got shape ", offsets.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "mind_kernels::", op, ": `offsets` must be int64, got ",
              offsets.scalar_type());
  at::Tensor o = offsets.contiguous();
  const int64_t* p = o.const_data_ptr<int64_t>();
  const int64_t B = o.size(0) - 1, N = values.size(0);
  TORCH_CHECK(p[0] == 0, "mind_kernels::", op, ": `offsets` must start at 0, got offsets[0] = ", p[0]);
  int64_t longest = 0;
  for (int64_t u = 0; u < B; ++u) {
    TORCH_CHECK(p[u + 1] >= p[u], "mind_kernels::", op, ": `offsets` must be non-decreasing, got offsets[", u,
                "] = ", p[u], " > offsets[", u + 1, "] = ", p[u + 1]);
    longest = std::max(longest, p[u + 1] - p[u]);
  }
  TORCH_CHECK(p[B] == N, "mind_kernels::", op, ": `offsets` must end at N = values.size(0) = ", N,
              ", got offsets[", B, "] = ", p[B]);
  return {o, longest};
}

// ------------------------------------------------------------------------------------------ ops

std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_jagged_forward_cpu(
    const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& weight, const at::Tensor& init_logits,
    const std::optional<at::Tensor>& interest_mask, int64_t num_iters, bool over_behaviors, double logit_scale) {
  constexpr const char* op = "routing_jagged_forward";
  auto [offs, longest] = check_jagged(values, offsets, op);
  check_cpu(weight, op, "weight");
  check_cpu(init_logits, op, "init_logits");
  const int64_t B = offs.size(0) - 1, N = values.size(0), D_in = values.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == D_in, "mind_kernels::", op,
              ": `weight` must be (D_out, D_in) with D_in = ", D_in, ", got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == values.scalar_type() || weight.scalar_type() == at::kFloat,
              "mind_kernels::", op, ": `weight` must have the dtype of `values` (", values.scalar_type(),
              ") or float32, got ", weight.scalar_type());
  TORCH_CHECK(init_logits.dim() == 2 || init_logits.dim() == 3, "mind_kernels::", op,
              ": `init_logits` must be (K, L_max) or (B, K, L_max), got shape ", init_logits.sizes());
  TORCH_CHECK(init_logits.is_floating_point(), "mind_kernels::", op, ": `init_logits` must be floating, got ",
              init_logits.scalar_type());
  const int64_t D_out = weight.size(0), K = init_logits.size(-2), L = init_logits.size(-1);
  TORCH_CHECK(init_logits.dim() == 2 || init_logits.size(0) == B, "mind_kernels::", op,
              ": `init_logits` must be (K, L_max) or (B, K, L_max) with B = ", B, ", got shape ", init_logits.sizes());
  TORCH_CHECK(L >= 1 && longest <= L, "mind_kernels::", op, ": a history of ", longest,
              " behaviours is longer than L_max = ", L, " of `init_logits` ", init_logits.sizes());
  TORCH_CHECK(num_iters >= 1, "mind_kernels::", op, ": `num_iters` must be >= 1, got ", num_iters);
  TORCH_CHECK(std::isfinite(logit_scale) && logit_scale > 0, "mind_kernels::", op,
              ": `logit_scale` must be a finite float > 0, got ", logit_scale);

  const auto acc = acc_type_of(values.scalar_type());
  const at::Tensor E = values.contiguous();
  const at::Tensor S = weight.to(acc).contiguous();
  const at::Tensor b0 = init_logits.to(acc).contiguous();
  const at::Tensor im = bool_mask(interest_mask, B, K, "interest_mask", "(B, K)", op);

  at::Tensor capsules = at::empty({B, K, D_out}, values.options());
  at::Tensor coupling = at::empty({N, K}, values.options().dtype(acc));
  at::Tensor preact = at::empty({B, K, D_out}, values.options().dtype(acc));
  if (B == 0 || K == 0) return {capsules, coupling, preact};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, E.scalar_type(), "mind_kernels_routing_jagged_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t* Sp = S.const_data_ptr<acc_t>();
    const bool through_q = uses_gram(D_in, D_out, num_iters);
    const WeightForms<acc_t>& forms = weight_forms(Sp, D_out, D_in, through_q);
    JaggedForwardArgs<scalar_t, acc_t> ja{{E.const_data_ptr<scalar_t>(),
                                           Sp,
                                           forms.St.data(),
                                           through_q ? forms.Q.data() : nullptr,
                                           b0.const_data_ptr<acc_t>(),
                                           b0.dim() == 3 ? K * L : 0,
                                           nullptr,
                                           im.defined() ? im.const_data_ptr<bool>() : nullptr,
                                           capsules.mutable_data_ptr<scalar_t>(),
                                           coupling.mutable_data_ptr<acc_t>(),
                                           preact.mutable_data_ptr<acc_t>(),
                                           L, D_in, D_out, K, num_iters, over_behaviors,
                                           static_cast<acc_t>(logit_scale)},
                                          offs.const_data_ptr<int64_t>()};
    // Work per user at the mean history length (the grain only decides how many users a task takes).
    const int64_t mean_n = std::max<int64_t>(1, N / B);
    const int64_t flops = 4 * num_iters * K * (mean_n + D_out) * D_in;
    at::parallel_for(0, B, forward_users_per_task(flops),
                     [&](int64_t begin, int64_t end) { jagged_forward_range(ja, begin, end); });
  });
  return {capsules, coupling, preact};
}

std::tuple<at::Tensor, at::Tensor> routing_jagged_backward_cpu(const at::Tensor& grad_capsules,
                                                               const at::Tensor& values, const at::Tensor& offsets,
                                                               const at::Tensor& weight, const at::Tensor& coupling,
                                                               const at::Tensor& preactivation, int64_t max_len) {
  constexpr const char* op = "routing_jagged_backward";
  auto [offs, longest] = check_jagged(values, offsets, op);
  TORCH_CHECK(longest <= max_len, "mind_kernels::", op, ": a history of ", longest,
              " behaviours is longer than max_len = ", max_len);
  check_cpu(grad_capsules, op, "grad_capsules");
  check_cpu(weight, op, "weight");
  check_cpu(coupling, op, "coupling");
  check_cpu(preactivation, op, "preactivation");
  const int64_t B = offs.size(0) - 1, N = values.size(0), D_in = values.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == D_in, "mind_kernels::", op,
              ": `weight` must be (D_out, D_in) with D_in = ", D_in, ", got shape ", weight.sizes());
  check_float_dtype(weight, op, "weight");
  const int64_t D_out = weight.size(0);
  TORCH_CHECK(coupling.dim() == 2 && coupling.size(0) == N, "mind_kernels::", op,
              ": `coupling` must be (N, K) with N = ", N, ", got shape ", coupling.sizes());
  const int64_t K = coupling.size(1);
  TORCH_CHECK(preactivation.dim() == 3 && preactivation.size(0) == B && preactivation.size(1) == K &&
                  preactivation.size(2) == D_out,
              "mind_kernels::", op, ": `preactivation` must be (B, K, D_out) = (", B, ", ", K, ", ", D_out,
              "), got shape ", preactivation.sizes());
  TORCH_CHECK(grad_capsules.dim() == 3 && grad_capsules.size(0) == B && grad_capsules.size(1) == K &&
                  grad_capsules.size(2) == D_out,
              "mind_kernels::", op, ": `grad_capsules` must be (B, K, D_out) = (", B, ", ", K, ", ", D_out,
              "), got shape ", grad_capsules.sizes());

  const auto acc = acc_type_of(values.scalar_type());
  const at::Tensor G = grad_capsules.to(acc).contiguous();  // autograd may hand a stride-0 gradient
  const at::Tensor E = values.contiguous();
  const at::Tensor S = weight.to(acc).contiguous();
  const at::Tensor w = coupling.to(acc).contiguous();
  const at::Tensor z = preactivation.to(acc).contiguous();

  at::Tensor dE = at::empty({N, D_in}, values.options());
  if (B == 0 || K == 0 || N == 0) {
    dE.zero_();
    return {dE, at::zeros({D_out, D_in}, weight.options())};
  }

  // Fixed chunking of users (a function of B, N and the sizes only): chunk c owns partial c of dS.
  const int64_t mean_n = std::max<int64_t>(1, N / B);
  const int64_t per_user = 8 * K * (mean_n + D_out) * D_in;
  const int64_t max_chunks = std::clamp<int64_t>((int64_t(1) << 24) / std::max<int64_t>(1, D_out * D_in), 1, 64);
  const int64_t chunk = std::max(users_per_task(per_user), at::divup(B, max_chunks));
  at::Tensor dS_acc;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, E.scalar_type(), "mind_kernels_routing_jagged_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    JaggedBackwardArgs<scalar_t, acc_t> a{G.const_data_ptr<acc_t>(), E.const_data_ptr<scalar_t>(),
                                          offs.const_data_ptr<int64_t>(), S.const_data_ptr<acc_t>(),
                                          w.const_data_ptr<acc_t>(), z.const_data_ptr<acc_t>(),
                                          dE.mutable_data_ptr<scalar_t>(), std::max<int64_t>(1, longest),
                                          D_in, D_out, K};
    dS_acc = dS_over_user_chunks<acc_t>(
        B, chunk, D_out, D_in, weight.options().dtype(acc),
        [&](acc_t* part, int64_t b0, int64_t b1) { jagged_backward_range(a, part, b0, b1); });
  });
  at::Tensor dS = dS_acc.scalar_type() == weight.scalar_type() ? dS_acc : dS_acc.to(weight.scalar_type());
  return {dE, dS};
}

}  // namespace

TORCH_LIBRARY_IMPL(mind_kernels, CPU, m) {
  m.impl("routing_jagged_forward", &routing_jagged_forward_cpu);
  m.impl("routing_jagged_backward", &routing_jagged_backward_cpu);
}

}  // namespace mind_kernels
