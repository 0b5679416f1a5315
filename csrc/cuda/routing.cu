// Fused CUDA kernels for MIND's B2I dynamic routing (docs/ROUTING.md), registered under
// TORCH_LIBRARY_IMPL(mind_kernels, CUDA) for the schema of csrc/schema.cpp.
//
// Shapes: B users, L positions, K interests, D_in -> D_out.  E (B, L, D_in), S (D_out, D_in).
// All arithmetic is in acc_t (double for float64 inputs, float otherwise); half / bf16 are
// converted to float when loaded.
//
// Forward, per user (one thread block per user at a time; blocks grid-stride over users):
//
//     b = b0 (K, L)
//     repeat t = 1 .. r:
//         w      = coupling(b)                       (K, L)   softmax over interests or over positions
//         ebar_j = sum_i w_ij e_i                    (K, D_in)
//         z_j    = S ebar_j                          (K, D_out)     = sum_i w_ij u_i  (u_i = S e_i)
//         c_j    = squash(z_j) = a(|z_j|^2) z_j
//         if t < r:
//             v_j   = S^T c_j                        (K, D_in)
//             b_ij += s * (e_i . v_j)                (= s * (c_j . u_i), s = logit_scale, all i, padded ones too)
//     outputs: capsules c, coupling w (final), preactivation z (final)
//
// The reassociation (ROUTING.md allows it) never materialises u = S E (L x D_out), which would
// cost L*D_out*D_in multiply-adds per user; the per-iteration cost is 2*K*L*D_in + 2*K*D_out*D_in.
// When D_in < 2 D_out and r >= 2, the iterations t < r go through Q = S^T S (D_in, D_in; one small
// gram_kernel launch per call on the same stream) and never form z or c:
//         y_j = Q ebar_j,  |z_j|^2 = ebar_j . y_j,  v_j = a(|z_j|^2) y_j
// which is 2*K*L*D_in + K*D_in^2 per iteration (the same formulation as the CPU kernel).
//
// Memory: the user's E rows are read from global memory once and kept in shared memory (as acc_t)
// for all r iterations; S (converted to acc_t once on the host, it is small) is staged in shared
// memory once per block and reused for every user the block visits; logits, coupling and the
// K-sized intermediates live in a shared-memory workspace.  Row pitches of D_in + 1 make both the
// "lanes walk d" and the "lanes walk i (or o)" access patterns free of bank conflicts.  When a piece
// does not fit in shared memory (large L, D or K) it is read from global memory instead (E and S
// from contiguous acc_t copies, the workspace from a per-block global scratch), so every size is
// served by the same kernel; only the speed changes.
//
// Non-finite inputs (reference's contract): in "interests" mode masked rows take no part at all,
// so they are staged as zeros (forward) and skipped when forming ebar (backward); NaN/Inf padding
// then never reaches the outputs or dS.  In "behaviors" mode padding is in the softmax denominator
// and propagates, as in the reference.
//
// Register blocking: K is processed in chunks of 4 interests (KP = K rounded up to 4); each
// thread accumulates 4 interests at once and reads the interest-major operand as one 16-byte
// broadcast load, so one shared-memory load of E / S feeds 4 FMAs.  K-major scratch arrays are
// stored transposed ([x][KP]) for that reason; padding columns j in [K, KP) are zero and stay zero.
//
// Backward (detach_routing=True; the final w is a constant, z = w S E):
//
//     dz_j   = a(n2) G_j + 2 a'(n2) (z_j . G_j) z_j          (squash Jacobian, symmetric)
//     g_j    = S^T dz_j                                       (K, D_in)
//     dE_i   = sum_j w_ij g_j                                 (= S^T du_i, du_i = sum_j w_ij dz_j)
//     ebar_j = sum_i w_ij e_i
//     dS    += sum_j dz_j ebar_j^T                            (= sum_i du_i e_i^T)
//
// dE needs no E; ebar reads the user's E rows that carry weight once (staged in shared memory when
// they fit).  dS is accumulated per block (in shared memory, or in the block's global slice when it
// does not fit), written to a (num_blocks, D_out, D_in) acc_t buffer, and summed over blocks in a
// fixed order by one or two reduction passes: the result is deterministic (no atomics) for a given
// device (the number of blocks comes from the device's SM count and occupancy).
//
// Jagged batches (values (N, D_in) + offsets (B + 1), ROUTING.md "Jagged batches") run the same two
// kernels with FwdParams/BwdParams::offsets set: each user's n_u rows are read from (and dE written to)
// its rows of values, so memory traffic and the per-row work follow N = sum n_u (the softmax over
// behaviours still spans L_max positions, padding in the denominator); w is (N, K).
//
// The device code lives in routing_kernels.cuh so that routing_emulation.cpp can compile the same
// source for the CPU emulation tests (tests/test_cuda_kernel.py); this file holds the launchers.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "routing_kernels.cuh"

namespace mind_kernels {
namespace {

using namespace cuda_routing;

// ------------------------------------------------------------------ host side

// Opt into more than 48 KB of dynamic shared memory when needed, then size the grid by occupancy.
// (Device attributes are queried with cudaDeviceGetAttribute rather than ATen/cuda/CUDAContext.h,
// which would pull in cuSPARSE / cuBLAS headers the build does not otherwise need.)
int device_attribute(cudaDeviceAttr attr) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, c10::cuda::current_device()));
  return value;
}

template <typename Kernel>
int64_t grid_for(Kernel kernel, int threads, size_t smem_bytes, int64_t B, int max_blocks_per_sm) {
  const int num_sms = device_attribute(cudaDevAttrMultiProcessorCount);
  if (smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_bytes)));
  }
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem_bytes));
  per_sm = std::max(1, std::min(per_sm, max_blocks_per_sm));
  return std::max<int64_t>(1, std::min<int64_t>(B, static_cast<int64_t>(per_sm) * num_sms));
}

// dS = sum of the (rows, n) block partials, deterministically: one pass when there are few rows,
// else block partials -> per-slice sums (kRowsPerSlice rows each, many blocks) -> dS.
template <typename acc_t, typename out_t>
void launch_reduce(const at::Tensor& partial, int64_t rows, int64_t n, out_t* out, cudaStream_t stream) {
  const int threads = 256;
  const unsigned blocks_x = static_cast<unsigned>(std::min<int64_t>((n + threads - 1) / threads, 4096));
  if (rows <= kRowsPerSlice) {
    reduce_partials_kernel<acc_t, out_t><<<dim3(blocks_x, 1), threads, 0, stream>>>(partial.data_ptr<acc_t>(), rows,
                                                                                    rows, n, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t slices = (rows + kRowsPerSlice - 1) / kRowsPerSlice;
  at::Tensor sums = at::empty({slices, n}, partial.options());
  reduce_partials_kernel<acc_t, acc_t><<<dim3(blocks_x, static_cast<unsigned>(slices)), threads, 0, stream>>>(
      partial.data_ptr<acc_t>(), rows, kRowsPerSlice, n, sums.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  reduce_partials_kernel<acc_t, out_t><<<dim3(blocks_x, 1), threads, 0, stream>>>(sums.data_ptr<acc_t>(), slices,
                                                                                  slices, n, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_cuda(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), "mind_kernels (CUDA): `", name, "` must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == device, "mind_kernels (CUDA): `", name, "` is on ", t.device(), " but `behaviors` is on ",
              device);
}

void check_int32(int64_t v, const char* what) {
  TORCH_CHECK(v < std::numeric_limits<int32_t>::max(), "mind_kernels (CUDA): ", what, " = ", v,
              " is too large for the CUDA kernel (must be < 2^31)");
}

at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_forward_cuda(
    const at::Tensor& behaviors, const at::Tensor& weight, const at::Tensor& init_logits,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& interest_mask, int64_t num_iters,
    bool over_behaviors, double logit_scale) {
  TORCH_CHECK(behaviors.is_cuda(), "mind_kernels (CUDA): `behaviors` must be a CUDA tensor");
  const at::Device device = behaviors.device();
  check_cuda(weight, "weight", device);
  check_cuda(init_logits, "init_logits", device);
  TORCH_CHECK(behaviors.dim() == 3, "routing_forward: `behaviors` must be (B, L, D_in), got ", behaviors.sizes());
  const auto dtype = behaviors.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "routing_forward: `behaviors` must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == behaviors.size(2),
              "routing_forward: `weight` must be (D_out, D_in) with D_in = ", behaviors.size(2), ", got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == dtype || weight.scalar_type() == at::kFloat,
              "routing_forward: `weight` must have the dtype of `behaviors` or float32, got ", weight.scalar_type());
  const int64_t B = behaviors.size(0), L = behaviors.size(1), D_in = behaviors.size(2), D_out = weight.size(0);
  TORCH_CHECK(L >= 1 && D_in >= 1 && D_out >= 1, "routing_forward: need L, D_in, D_out >= 1, got L=", L,
              " D_in=", D_in, " D_out=", D_out);
  TORCH_CHECK(init_logits.dim() == 2 || init_logits.dim() == 3,
              "routing_forward: `init_logits` must be (K, L) or (B, K, L), got ", init_logits.sizes());
  TORCH_CHECK(init_logits.is_floating_point(), "routing_forward: `init_logits` must be floating point");
  const int64_t K = init_logits.size(-2);
  TORCH_CHECK(K >= 1 && init_logits.size(-1) == L, "routing_forward: `init_logits` must be (K >= 1, L = ", L,
              "), got ", init_logits.sizes());
  TORCH_CHECK(init_logits.dim() == 2 || init_logits.size(0) == B || init_logits.size(0) == 1,
              "routing_forward: `init_logits` has batch ", init_logits.size(0), " but `behaviors` has B = ", B);
  TORCH_CHECK(num_iters >= 1, "routing_forward: `num_iters` must be >= 1, got ", num_iters);
  TORCH_CHECK(std::isfinite(logit_scale) && logit_scale > 0,
              "routing_forward: `logit_scale` must be a finite float > 0, got ", logit_scale);
  check_int32(L * (D_in + 1), "L * (D_in + 1)");      // staged E rows (pitch D_in + 1)
  check_int32(D_out * (D_in + 1), "D_out * (D_in + 1)");  // staged S rows
  check_int32(K * std::max(L, std::max(D_in, D_out)) + 8, "K * max(L, D)");
  check_int32(num_iters, "num_iters");

  const c10::cuda::CUDAGuard guard(device);
  const auto acc = acc_scalar_type(dtype);

  at::Tensor mask_b, imask_b;
  if (mask.has_value() && mask->defined()) {
    check_cuda(*mask, "mask", device);
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == L, "routing_forward: `mask` must be (B, L) = (",
                B, ", ", L, "), got ", mask->sizes());
    mask_b = (mask->scalar_type() == at::kBool ? *mask : mask->ne(0)).contiguous();
  }
  if (interest_mask.has_value() && interest_mask->defined()) {
    check_cuda(*interest_mask, "interest_mask", device);
    TORCH_CHECK(interest_mask->dim() == 2 && interest_mask->size(0) == B && interest_mask->size(1) == K,
                "routing_forward: `interest_mask` must be (B, K) = (", B, ", ", K, "), got ", interest_mask->sizes());
    imask_b = (interest_mask->scalar_type() == at::kBool ? *interest_mask : interest_mask->ne(0)).contiguous();
  }

  auto capsules = at::empty({B, K, D_out}, behaviors.options());
  auto coupling = at::empty({B, K, L}, behaviors.options().dtype(acc));
  auto preact = at::empty({B, K, D_out}, behaviors.options().dtype(acc));
  if (B == 0) return {capsules, coupling, preact};

  const at::Tensor E = behaviors.contiguous();
  const at::Tensor S = weight.to(acc).contiguous();
  const at::Tensor b0 = init_logits.to(acc).contiguous();
  const int64_t init_stride = (b0.dim() == 3 && b0.size(0) == B && B > 1) ? K * L : 0;

  const int threads = forward_threads(L, D_in, D_out, K);
  const size_t max_smem = static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "routing_forward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    FwdParams<scalar_t, acc_t> p{};
    init_forward(p, B, L, D_in, D_out, K, num_iters, over_behaviors, logit_scale);
    check_int32(p.lay.total, "forward workspace size");
    const size_t smem_bytes = plan_forward_smem(p, max_smem);
    auto kernel = routing_forward_kernel<scalar_t, acc_t>;
    const int64_t grid = grid_for(kernel, threads, smem_bytes, B, 32);

    at::Tensor E_acc, scratch, gram;
    if (uses_gram(D_in, D_out, num_iters)) {
      gram = at::empty({D_in, D_in}, behaviors.options().dtype(acc));
      const int64_t gram_blocks = std::min<int64_t>((D_in * D_in + 255) / 256, 1024);
      gram_kernel<acc_t><<<static_cast<unsigned>(gram_blocks), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
          S.data_ptr<acc_t>(), gram.data_ptr<acc_t>(), static_cast<int>(D_in), static_cast<int>(D_out));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (!p.E_smem) {
      E_acc = E.to(acc).contiguous();
      if (!over_behaviors && mask_b.defined()) E_acc = E_acc.masked_fill(mask_b.logical_not().unsqueeze(-1), 0);
    }
    if (!p.ws_smem) scratch = at::empty({grid * p.lay.total}, behaviors.options().dtype(acc));

    p.E = E.data_ptr<scalar_t>();
    p.E_acc = p.E_smem ? nullptr : E_acc.data_ptr<acc_t>();
    p.S = S.data_ptr<acc_t>();
    p.Q = gram.defined() ? gram.data_ptr<acc_t>() : nullptr;
    p.init = b0.data_ptr<acc_t>();
    p.init_stride = init_stride;
    p.mask = mask_b.defined() ? mask_b.data_ptr<bool>() : nullptr;
    p.imask = imask_b.defined() ? imask_b.data_ptr<bool>() : nullptr;
    p.capsules = capsules.data_ptr<scalar_t>();
    p.coupling = coupling.data_ptr<acc_t>();
    p.preact = preact.data_ptr<acc_t>();
    p.scratch = p.ws_smem ? nullptr : scratch.data_ptr<acc_t>();

    kernel<<<static_cast<unsigned>(grid), threads, smem_bytes, c10::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {capsules, coupling, preact};
}

std::tuple<at::Tensor, at::Tensor> routing_backward_cuda(const at::Tensor& grad_capsules, const at::Tensor& behaviors,
                                                         const at::Tensor& weight, const at::Tensor& coupling,
                                                         const at::Tensor& preactivation) {
  TORCH_CHECK(behaviors.is_cuda(), "mind_kernels (CUDA): `behaviors` must be a CUDA tensor");
  const at::Device device = behaviors.device();
  check_cuda(grad_capsules, "grad_capsules", device);
  check_cuda(weight, "weight", device);
  check_cuda(coupling, "coupling", device);
  check_cuda(preactivation, "preactivation", device);
  TORCH_CHECK(behaviors.dim() == 3, "routing_backward: `behaviors` must be (B, L, D_in), got ", behaviors.sizes());
  const auto dtype = behaviors.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "routing_backward: `behaviors` must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == behaviors.size(2),
              "routing_backward: `weight` must be (D_out, D_in) with D_in = ", behaviors.size(2), ", got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == dtype || weight.scalar_type() == at::kFloat,
              "routing_backward: `weight` must have the dtype of `behaviors` or float32, got ", weight.scalar_type());
  const int64_t B = behaviors.size(0), L = behaviors.size(1), D_in = behaviors.size(2), D_out = weight.size(0);
  TORCH_CHECK(L >= 1 && D_in >= 1 && D_out >= 1, "routing_backward: need L, D_in, D_out >= 1");
  TORCH_CHECK(coupling.dim() == 3 && coupling.size(0) == B && coupling.size(2) == L && coupling.size(1) >= 1,
              "routing_backward: `coupling` must be (B, K, L) with B = ", B, ", L = ", L, ", got ", coupling.sizes());
  const int64_t K = coupling.size(1);
  TORCH_CHECK(preactivation.dim() == 3 && preactivation.size(0) == B && preactivation.size(1) == K &&
                  preactivation.size(2) == D_out,
              "routing_backward: `preactivation` must be (B, K, D_out) = (", B, ", ", K, ", ", D_out, "), got ",
              preactivation.sizes());
  TORCH_CHECK(grad_capsules.dim() == 3 && grad_capsules.size(0) == B && grad_capsules.size(1) == K &&
                  grad_capsules.size(2) == D_out,
              "routing_backward: `grad_capsules` must be (B, K, D_out) = (", B, ", ", K, ", ", D_out, "), got ",
              grad_capsules.sizes());
  check_int32(L * (D_in + 1), "L * (D_in + 1)");      // staged E rows (pitch D_in + 1)
  check_int32(D_out * (D_in + 1), "D_out * (D_in + 1)");  // staged S rows
  check_int32(K * std::max(L, std::max(D_in, D_out)) + 8, "K * max(L, D)");

  const c10::cuda::CUDAGuard guard(device);
  const auto acc = acc_scalar_type(dtype);
  auto grad_E = at::empty({B, L, D_in}, behaviors.options());
  if (B == 0) return {grad_E, at::zeros({D_out, D_in}, weight.options())};
  auto grad_S = at::empty({D_out, D_in}, weight.options());

  // Autograd may hand stride-0 (expanded) gradients: contiguous() materialises them.
  const at::Tensor E = behaviors.contiguous();
  const at::Tensor S = weight.to(acc).contiguous();
  const at::Tensor G = grad_capsules.to(acc).contiguous();
  const at::Tensor w = coupling.to(acc).contiguous();
  const at::Tensor z = preactivation.to(acc).contiguous();

  const int threads = kBackwardThreads;
  const size_t max_smem = static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
  const auto weight_dtype = weight.scalar_type();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "routing_backward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    BwdParams<scalar_t, acc_t> p{};
    init_backward(p, B, L, D_in, D_out, K);
    check_int32(p.lay.total, "backward workspace size");
    const size_t smem_bytes = plan_backward_smem(p, max_smem);
    auto kernel = routing_backward_kernel<scalar_t, acc_t>;
    // Few blocks per SM: each block writes a D_out x D_in partial that the reduction reads back.
    const int64_t grid = grid_for(kernel, threads, smem_bytes, B, 4);

    at::Tensor partial = at::empty({grid, D_out * D_in}, behaviors.options().dtype(acc));
    at::Tensor scratch;
    if (!p.ws_smem) scratch = at::empty({grid * p.lay.total}, behaviors.options().dtype(acc));

    p.G = G.data_ptr<acc_t>();
    p.E = E.data_ptr<scalar_t>();
    p.S = S.data_ptr<acc_t>();
    p.w = w.data_ptr<acc_t>();
    p.z = z.data_ptr<acc_t>();
    p.dE = grad_E.data_ptr<scalar_t>();
    p.partial = partial.data_ptr<acc_t>();
    p.scratch = p.ws_smem ? nullptr : scratch.data_ptr<acc_t>();

    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    kernel<<<static_cast<unsigned>(grid), threads, smem_bytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    if (weight_dtype == dtype) {
      launch_reduce<acc_t, scalar_t>(partial, grid, D_out * D_in, grad_S.data_ptr<scalar_t>(), stream);
    } else {  // weight is float32 while E is half / bf16
      launch_reduce<acc_t, float>(partial, grid, D_out * D_in, grad_S.data_ptr<float>(), stream);
    }
  });
  return {grad_E, grad_S};
}

// ------------------------------------------------------------------ jagged batches

// values (N, D_in) + offsets (B + 1) int64 (ROUTING.md, "Jagged batches"): the same kernels with
// p.offsets set (only each user's n_u rows are read and written; see FwdParams). The offsets' values
// (offsets[0] = 0, non-decreasing, offsets[B] = N, every n_u <= L_max) are checked by the Python API
// (mind_kernels.validation.check_jagged_inputs) on the host; checking them here would cost a device
// synchronisation per call, so the op trusts them.
void check_jagged_cuda(const at::Tensor& values, const at::Tensor& offsets, const char* op) {
  TORCH_CHECK(values.is_cuda(), "mind_kernels (CUDA): `values` must be a CUDA tensor");
  check_cuda(offsets, "offsets", values.device());
  TORCH_CHECK(values.dim() == 2, op, ": `values` must be (N, D_in), got ", values.sizes());
  const auto dtype = values.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble, op,
              ": `values` must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1 && offsets.scalar_type() == at::kLong, op,
              ": `offsets` must be a 1-D (B + 1,) int64 tensor, got ", offsets.sizes(), " ", offsets.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routing_jagged_forward_cuda(
    const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& weight, const at::Tensor& init_logits,
    const std::optional<at::Tensor>& interest_mask, int64_t num_iters, bool over_behaviors, double logit_scale) {
  constexpr const char* op = "routing_jagged_forward";
  check_jagged_cuda(values, offsets, op);
  const at::Device device = values.device();
  check_cuda(weight, "weight", device);
  check_cuda(init_logits, "init_logits", device);
  const auto dtype = values.scalar_type();
  const int64_t N = values.size(0), D_in = values.size(1), B = offsets.size(0) - 1;
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == D_in && weight.size(0) >= 1, op,
              ": `weight` must be (D_out, D_in) with D_in = ", D_in, ", got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == dtype || weight.scalar_type() == at::kFloat, op,
              ": `weight` must have the dtype of `values` or float32, got ", weight.scalar_type());
  TORCH_CHECK((init_logits.dim() == 2 || (init_logits.dim() == 3 && init_logits.size(0) == B)) &&
                  init_logits.is_floating_point(),
              op, ": `init_logits` must be floating (K, L_max) or (B, K, L_max), got ", init_logits.sizes());
  const int64_t D_out = weight.size(0), K = init_logits.size(-2), L = init_logits.size(-1);
  TORCH_CHECK(K >= 1 && L >= 1 && D_in >= 1, op, ": need K, L_max, D_in >= 1, got K=", K, " L_max=", L,
              " D_in=", D_in);
  TORCH_CHECK(num_iters >= 1, op, ": `num_iters` must be >= 1, got ", num_iters);
  TORCH_CHECK(std::isfinite(logit_scale) && logit_scale > 0, op, ": `logit_scale` must be a finite float > 0, got ",
              logit_scale);
  check_int32(L * (D_in + 1), "L_max * (D_in + 1)");
  check_int32(D_out * (D_in + 1), "D_out * (D_in + 1)");
  check_int32(K * std::max(L, std::max(D_in, D_out)) + 8, "K * max(L_max, D)");
  check_int32(num_iters, "num_iters");

  const c10::cuda::CUDAGuard guard(device);
  const auto acc = acc_scalar_type(dtype);
  at::Tensor imask_b;
  if (interest_mask.has_value() && interest_mask->defined()) {
    check_cuda(*interest_mask, "interest_mask", device);
    TORCH_CHECK(interest_mask->dim() == 2 && interest_mask->size(0) == B && interest_mask->size(1) == K, op,
                ": `interest_mask` must be (B, K) = (", B, ", ", K, "), got ", interest_mask->sizes());
    imask_b = (interest_mask->scalar_type() == at::kBool ? *interest_mask : interest_mask->ne(0)).contiguous();
  }
  auto capsules = at::empty({B, K, D_out}, values.options());
  auto coupling = at::empty({N, K}, values.options().dtype(acc));
  auto preact = at::empty({B, K, D_out}, values.options().dtype(acc));
  if (B == 0) return {capsules, coupling, preact};

  const at::Tensor E = values.contiguous();
  const at::Tensor offs = offsets.contiguous();
  const at::Tensor S = weight.to(acc).contiguous();
  const at::Tensor b0 = init_logits.to(acc).contiguous();
  const int64_t init_stride = b0.dim() == 3 ? K * L : 0;
  const int threads = forward_threads(L, D_in, D_out, K);
  const size_t max_smem = static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "routing_jagged_forward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    FwdParams<scalar_t, acc_t> p{};
    init_forward(p, B, L, D_in, D_out, K, num_iters, over_behaviors, logit_scale);
    check_int32(p.lay.total, "forward workspace size");
    const size_t smem_bytes = plan_forward_smem(p, max_smem);
    auto kernel = routing_forward_kernel<scalar_t, acc_t>;
    const int64_t grid = grid_for(kernel, threads, smem_bytes, B, 32);
    at::Tensor E_acc, scratch, gram;
    if (uses_gram(D_in, D_out, num_iters)) {
      gram = at::empty({D_in, D_in}, values.options().dtype(acc));
      const int64_t gram_blocks = std::min<int64_t>((D_in * D_in + 255) / 256, 1024);
      gram_kernel<acc_t><<<static_cast<unsigned>(gram_blocks), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
          S.data_ptr<acc_t>(), gram.data_ptr<acc_t>(), static_cast<int>(D_in), static_cast<int>(D_out));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (!p.E_smem) E_acc = E.to(acc).contiguous();  // every row is real: nothing to zero
    if (!p.ws_smem) scratch = at::empty({grid * p.lay.total}, values.options().dtype(acc));
    p.E = E.data_ptr<scalar_t>();
    p.E_acc = p.E_smem ? nullptr : E_acc.data_ptr<acc_t>();
    p.S = S.data_ptr<acc_t>();
    p.Q = gram.defined() ? gram.data_ptr<acc_t>() : nullptr;
    p.init = b0.data_ptr<acc_t>();
    p.init_stride = init_stride;
    p.mask = nullptr;
    p.imask = imask_b.defined() ? imask_b.data_ptr<bool>() : nullptr;
    p.capsules = capsules.data_ptr<scalar_t>();
    p.coupling = coupling.data_ptr<acc_t>();
    p.preact = preact.data_ptr<acc_t>();
    p.scratch = p.ws_smem ? nullptr : scratch.data_ptr<acc_t>();
    p.offsets = offs.data_ptr<int64_t>();
    kernel<<<static_cast<unsigned>(grid), threads, smem_bytes, c10::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {capsules, coupling, preact};
}

std::tuple<at::Tensor, at::Tensor> routing_jagged_backward_cuda(const at::Tensor& grad_capsules,
                                                                const at::Tensor& values, const at::Tensor& offsets,
                                                                const at::Tensor& weight, const at::Tensor& coupling,
                                                                const at::Tensor& preactivation, int64_t max_len) {
  constexpr const char* op = "routing_jagged_backward";
  check_jagged_cuda(values, offsets, op);
  const at::Device device = values.device();
  check_cuda(grad_capsules, "grad_capsules", device);
  check_cuda(weight, "weight", device);
  check_cuda(coupling, "coupling", device);
  check_cuda(preactivation, "preactivation", device);
  const auto dtype = values.scalar_type();
  const int64_t N = values.size(0), D_in = values.size(1), B = offsets.size(0) - 1;
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == D_in && weight.size(0) >= 1, op,
              ": `weight` must be (D_out, D_in) with D_in = ", D_in, ", got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == dtype || weight.scalar_type() == at::kFloat, op,
              ": `weight` must have the dtype of `values` or float32, got ", weight.scalar_type());
  const int64_t D_out = weight.size(0);
  TORCH_CHECK(coupling.dim() == 2 && coupling.size(0) == N && coupling.size(1) >= 1, op,
              ": `coupling` must be (N, K) with N = ", N, ", got ", coupling.sizes());
  const int64_t K = coupling.size(1);
  TORCH_CHECK(preactivation.dim() == 3 && preactivation.size(0) == B && preactivation.size(1) == K &&
                  preactivation.size(2) == D_out,
              op, ": `preactivation` must be (B, K, D_out) = (", B, ", ", K, ", ", D_out, "), got ",
              preactivation.sizes());
  TORCH_CHECK(grad_capsules.dim() == 3 && grad_capsules.size(0) == B && grad_capsules.size(1) == K &&
                  grad_capsules.size(2) == D_out,
              op, ": `grad_capsules` must be (B, K, D_out) = (", B, ", ", K, ", ", D_out, "), got ",
              grad_capsules.sizes());

  const c10::cuda::CUDAGuard guard(device);
  const auto acc = acc_scalar_type(dtype);
  auto grad_V = at::empty({N, D_in}, values.options());
  if (B == 0 || N == 0) return {grad_V, at::zeros({D_out, D_in}, weight.options())};
  auto grad_S = at::empty({D_out, D_in}, weight.options());
  // The workspace holds max_len rows, the forward's L_max (every n_u <= L_max, validated by the API).
  const at::Tensor offs = offsets.contiguous();
  TORCH_CHECK(max_len >= 1, op, ": `max_len` must be >= 1, got ", max_len);
  const int64_t L = max_len;
  check_int32(L * (D_in + 1), "L * (D_in + 1)");
  check_int32(D_out * (D_in + 1), "D_out * (D_in + 1)");
  check_int32(K * std::max(L, std::max(D_in, D_out)) + 8, "K * max(L, D)");

  const at::Tensor E = values.contiguous();
  const at::Tensor S = weight.to(acc).contiguous();
  const at::Tensor G = grad_capsules.to(acc).contiguous();
  const at::Tensor w = coupling.to(acc).contiguous();
  const at::Tensor z = preactivation.to(acc).contiguous();
  const int threads = kBackwardThreads;
  const size_t max_smem = static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
  const auto weight_dtype = weight.scalar_type();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "routing_jagged_backward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    BwdParams<scalar_t, acc_t> p{};
    init_backward(p, B, L, D_in, D_out, K);
    check_int32(p.lay.total, "backward workspace size");
    const size_t smem_bytes = plan_backward_smem(p, max_smem);
    auto kernel = routing_backward_kernel<scalar_t, acc_t>;
    const int64_t grid = grid_for(kernel, threads, smem_bytes, B, 4);
    at::Tensor partial = at::empty({grid, D_out * D_in}, values.options().dtype(acc));
    at::Tensor scratch;
    if (!p.ws_smem) scratch = at::empty({grid * p.lay.total}, values.options().dtype(acc));
    p.G = G.data_ptr<acc_t>();
    p.E = E.data_ptr<scalar_t>();
    p.S = S.data_ptr<acc_t>();
    p.w = w.data_ptr<acc_t>();
    p.z = z.data_ptr<acc_t>();
    p.dE = grad_V.data_ptr<scalar_t>();
    p.partial = partial.data_ptr<acc_t>();
    p.scratch = p.ws_smem ? nullptr : scratch.data_ptr<acc_t>();
    p.offsets = offs.data_ptr<int64_t>();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    kernel<<<static_cast<unsigned>(grid), threads, smem_bytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (weight_dtype == dtype) {
      launch_reduce<acc_t, scalar_t>(partial, grid, D_out * D_in, grad_S.data_ptr<scalar_t>(), stream);
    } else {
      launch_reduce<acc_t, float>(partial, grid, D_out * D_in, grad_S.data_ptr<float>(), stream);
    }
  });
  return {grad_V, grad_S};
}

}  // namespace
}  // namespace mind_kernels

TORCH_LIBRARY_IMPL(mind_kernels, CUDA, m) {
  m.impl("routing_forward", &mind_kernels::routing_forward_cuda);
  m.impl("routing_backward", &mind_kernels::routing_backward_cuda);
  m.impl("routing_jagged_forward", &mind_kernels::routing_jagged_forward_cuda);
  m.impl("routing_jagged_backward", &mind_kernels::routing_jagged_backward_cuda);
}
