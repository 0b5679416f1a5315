// Fused CPU kernel of the best-interest softmax cross-entropy's element-wise part
// (mind_kernels/losses.py has the math and the reference).
//
// Input: the score products s (B, K, C) = V_b,k . e_n (one mm, done by the caller), targets t (B,),
// an optional interest mask (B, K) and the number of real classes N <= C (columns N .. C-1 are the
// mm's padding and take no part). Per user b, in one pass over its K rows, all in cache:
//     best_n = max over active k of s_kn,  win_n = the lowest such k        (n < N)
//     loss_b = logsumexp_n best_n - best_t
//     g_kn   = grad_scale * (softmax_n(best)_n - [n == t]) * [k == win_n]  (0 for n >= N)
// g is d(grad_scale * sum_b loss_b)/ds, ready for the two backward products. The unfused path runs
// these steps as ~15 tensor ops over (B, K, C), each a trip through memory (several of them, like the
// broadcast compare and the bool -> float casts, far slower than a copy on the CPU); here each user's
// K x C block is read once and g written once.
//
// Vectorisation: the loops have a contiguous inner axis and no float reduction (the two reductions,
// max and sum, keep 8 partial lanes), and exp is a branch-free polynomial over GCC vector extensions,
// so they vectorise; the per-user body is compiled twice (baseline x86-64 and AVX2+FMA, picked at run
// time) as in the routing kernels. float64 runs a scalar path with std::exp (tests, gradcheck).

#include "routing_cpu_blocks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace mind_kernels {
namespace {

using namespace detail;

using F8 = VecOf<float>::type;
typedef int32_t I8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

// exp(x) for x <= 0 (softmax terms x = best - max): Cephes' expf polynomial after the reduction
// x = n ln2 + r, |r| <= ln2 / 2; relative error ~2e-7. x < -87 (2^n below the normal range) gives 0;
// NaN never reaches it (a row with a NaN score is handled apart).
MK_ALWAYS_INLINE F8 exp_nonpositive(F8 x) {
  const F8 lo = F8{} - 87.0f;
  const I8 keep = x >= lo;
  x = x < lo ? lo : x;
  const F8 magic = F8{} + 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  F8 n = (x * 1.44269504088896341f + magic) - magic;
  F8 r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  F8 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const I8 bits = (__builtin_convertvector(n, I8) + 127) << 23;
  F8 scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  const I8 out = (I8)(p * scale) & keep;
  F8 res;
  __builtin_memcpy(&res, &out, sizeof(res));
  return res;
}

// Conversions written as plain bit operations so the loops around them vectorise (c10's bf16
// constructor branches on NaN per element); round to nearest even, NaN stays a (quiet) NaN.
template <typename acc_t, typename T>
MK_ALWAYS_INLINE acc_t to_acc(T x) {
  return static_cast<acc_t>(x);
}
template <>
MK_ALWAYS_INLINE float to_acc<float, c10::BFloat16>(c10::BFloat16 x) {
  const uint32_t u = uint32_t(x.x) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}
template <typename T, typename acc_t>
MK_ALWAYS_INLINE T from_acc(acc_t f) {
  return static_cast<T>(f);
}
template <>
MK_ALWAYS_INLINE c10::BFloat16 from_acc<c10::BFloat16, float>(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(f != f ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

template <typename scalar_t, typename acc_t>
struct CeArgs {
  const scalar_t* s;       // (B, K, C)
  const int64_t* targets;  // (B,)
  const bool* active;      // (B, K) or nullptr
  acc_t* loss;             // (B,)
  scalar_t* g;             // (B, K, C)
  int64_t K, C, N;
  acc_t grad_scale;
  std::atomic<int64_t>* bad_target;  // first user whose target is outside [0, N), or -1
  std::atomic<int64_t>* no_interest;  // first user without an active interest, or -1
};

inline void note_first(std::atomic<int64_t>* slot, int64_t b) {
  int64_t cur = slot->load();
  while ((cur < 0 || b < cur) && !slot->compare_exchange_weak(cur, b)) {
  }
}

// best/win over the active interests; returns false if the user has none.
template <typename scalar_t, typename acc_t>
MK_ALWAYS_INLINE bool best_of_user(const CeArgs<scalar_t, acc_t>& a, int64_t b, acc_t* best, int32_t* win,
                                   int64_t Cp) {
  const int64_t K = a.K, C = a.C, N = a.N;
  const scalar_t* s = a.s + b * K * C;
  const bool* act = a.active ? a.active + b * K : nullptr;
  bool any = false;
  for (int64_t k = 0; k < K; ++k) {
    if (act && !act[k]) continue;
    const scalar_t* sk = s + k * C;
    if (!any) {
      for (int64_t n = 0; n < N; ++n) {
        best[n] = to_acc<acc_t>(sk[n]);
        win[n] = static_cast<int32_t>(k);
      }
      any = true;
      continue;
    }
    const int32_t kk = static_cast<int32_t>(k);
    for (int64_t n = 0; n < N; ++n) {
      const acc_t v = to_acc<acc_t>(sk[n]);
      // strict > keeps the lowest k on ties; a NaN score takes over (and stays: nothing beats NaN),
      // so a NaN reaches the loss as with amax.
      const bool take = (v > best[n]) | (v != v);
      best[n] = take ? v : best[n];
      win[n] = take ? kk : win[n];
    }
  }
  for (int64_t n = N; n < Cp; ++n) {
    best[n] = -std::numeric_limits<acc_t>::infinity();
    win[n] = 0;
  }
  return any;
}

template <typename scalar_t, typename acc_t>
MK_ALWAYS_INLINE void ce_user(const CeArgs<scalar_t, acc_t>& a, int64_t b, acc_t* best, acc_t* prob, int32_t* win,
                              int64_t Cp) {
  const int64_t K = a.K, C = a.C, N = a.N;
  scalar_t* g = a.g + b * K * C;
  const int64_t t = a.targets[b];
  const bool target_ok = t >= 0 && t < N;
  if (!target_ok) note_first(a.bad_target, b);
  if (!best_of_user(a, b, best, win, Cp)) {
    note_first(a.no_interest, b);
    for (int64_t i = 0; i < K * C; ++i) g[i] = scalar_t(0);
    a.loss[b] = std::numeric_limits<acc_t>::quiet_NaN();
    return;
  }
  if (!target_ok) {
    for (int64_t i = 0; i < K * C; ++i) g[i] = scalar_t(0);
    a.loss[b] = std::numeric_limits<acc_t>::quiet_NaN();
    return;
  }
  // max over the N real classes, 8 partial lanes
  acc_t lane[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lane[l] = -std::numeric_limits<acc_t>::infinity();
  for (int64_t n0 = 0; n0 < Cp; n0 += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      const acc_t v = best[n0 + l];
      lane[l] = (v > lane[l]) | (v != v) ? v : lane[l];  // a NaN sticks (nothing compares above it)
    }
  acc_t m = lane[0];
  for (int64_t l = 1; l < kLanes; ++l) m = (lane[l] > m) | (lane[l] != lane[l]) ? lane[l] : m;
  if (!std::isfinite(m)) {  // a NaN or infinite score: the loss and the gradient are NaN, as unfused
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < C; ++n) g[k * C + n] = n < N ? scalar_t(NAN) : scalar_t(0);
    a.loss[b] = std::numeric_limits<acc_t>::quiet_NaN();
    return;
  }
  // prob = exp(best - m) (0 on the padding columns: best = -inf there)
  if constexpr (std::is_same_v<acc_t, float>) {
    for (int64_t n0 = 0; n0 < Cp; n0 += kLanes) {
      F8 x = vload<F8>(best + n0) - m;
      vstore(prob + n0, exp_nonpositive(x));
    }
  } else {
    for (int64_t n = 0; n < Cp; ++n) prob[n] = std::exp(best[n] - m);
  }
  for (int64_t l = 0; l < kLanes; ++l) lane[l] = 0;
  for (int64_t n0 = 0; n0 < Cp; n0 += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += prob[n0 + l];
  acc_t sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) sum += lane[l];
  a.loss[b] = m + std::log(sum) - best[t];
  const acc_t scale = a.grad_scale / sum;
  for (int64_t n = 0; n < N; ++n) prob[n] *= scale;
  prob[t] -= a.grad_scale;
  for (int64_t k = 0; k < K; ++k) {
    scalar_t* gk = g + k * C;
    const int32_t kk = static_cast<int32_t>(k);
    for (int64_t n = 0; n < N; ++n) gk[n] = from_acc<scalar_t>(win[n] == kk ? prob[n] : acc_t(0));
    for (int64_t n = N; n < C; ++n) gk[n] = scalar_t(0);
  }
}

template <typename scalar_t, typename acc_t>
MK_ALWAYS_INLINE void ce_range_body(const CeArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  const int64_t Cp = at::divup(a.N, kLanes) * kLanes;
  std::vector<acc_t> best(Cp), prob(Cp);
  std::vector<int32_t> win(Cp);  // int32, as wide as the float lanes: no packing in the blends
  for (int64_t b = begin; b < end; ++b) ce_user(a, b, best.data(), prob.data(), win.data(), Cp);
}

template <typename scalar_t, typename acc_t>
void ce_range_base(const CeArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  ce_range_body(a, begin, end);
}

#if MK_X86_DISPATCH
template <typename scalar_t, typename acc_t>
MK_TARGET_AVX2 void ce_range_avx2(const CeArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  ce_range_body(a, begin, end);
}
#endif

template <typename scalar_t, typename acc_t>
void ce_range(const CeArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
#if MK_X86_DISPATCH
  if (cpu_has_avx2_fma()) return ce_range_avx2(a, begin, end);
#endif
  ce_range_base(a, begin, end);
}

std::tuple<at::Tensor, at::Tensor> best_interest_ce_cpu(const at::Tensor& scores, const at::Tensor& targets,
                                                        const std::optional<at::Tensor>& interest_mask,
                                                        int64_t num_classes, double grad_scale) {
  constexpr const char* op = "mind_kernels::best_interest_ce";
  TORCH_CHECK(scores.dim() == 3, op, ": `scores` must be (B, K, C), got shape ", scores.sizes());
  const int64_t B = scores.size(0), K = scores.size(1), C = scores.size(2);
  TORCH_CHECK(K >= 1, op, ": K must be >= 1, got ", K);
  TORCH_CHECK(num_classes >= 1 && num_classes <= C, op, ": num_classes must be in 1..C = ", C, ", got ",
              num_classes);
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == B && targets.scalar_type() == at::kLong, op,
              ": `targets` must be int64 of shape (", B, ",), got ", targets.scalar_type(), " ", targets.sizes());
  const at::Tensor s = scores.contiguous();
  const at::Tensor t = targets.contiguous();
  at::Tensor act;
  if (interest_mask.has_value()) {
    TORCH_CHECK(interest_mask->dim() == 2 && interest_mask->size(0) == B && interest_mask->size(1) == K, op,
                ": `interest_mask` must be (B, K) = (", B, ", ", K, "), got ", interest_mask->sizes());
    act = interest_mask->to(at::kBool).contiguous();
  }
  const auto acc = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({B}, scores.options().dtype(acc));
  at::Tensor g = at::empty({B, K, C}, scores.options());
  std::atomic<int64_t> bad_target{-1}, no_interest{-1};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "mind_kernels_best_interest_ce_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    CeArgs<scalar_t, acc_t> a{s.const_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(),
                              act.defined() ? act.const_data_ptr<bool>() : nullptr, loss.mutable_data_ptr<acc_t>(),
                              g.mutable_data_ptr<scalar_t>(), K, C, num_classes, static_cast<acc_t>(grad_scale),
                              &bad_target, &no_interest};
    // ~2 K C element operations per user: a task of >= 64k of them
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, K * C));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) { ce_range(a, begin, end); });
  });
  TORCH_CHECK(bad_target.load() < 0, op, ": targets[", bad_target.load(), "] = ",
              bad_target.load() >= 0 ? t[bad_target.load()].item<int64_t>() : 0, " is outside the ", num_classes,
              " classes [0, ", num_classes, ")");
  TORCH_CHECK(no_interest.load() < 0, op, ": user ", no_interest.load(),
              " has no active interest in `interest_mask` (every user needs at least one)");
  return {loss, g};
}

}  // namespace

TORCH_LIBRARY_IMPL(mind_kernels, CPU, m) { m.impl("best_interest_ce", &best_interest_ce_cpu); }

}  // namespace mind_kernels
