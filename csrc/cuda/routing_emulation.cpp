// CPU emulation harness for the CUDA routing kernels (routing_kernels.cuh), for machines without a GPU.
//
// Not part of the built extension (setup.py compiles csrc/*.cpp and csrc/cuda/*.cu only):
// tests/test_cuda_kernel.py compiles it with torch.utils.cpp_extension.load and compares its results
// with the reference.  It compiles the very same kernel source as nvcc does, with the CUDA built-ins
// provided here:
//
//   * every thread of a block is a std::thread; __syncthreads() is a std::barrier over the block and
//     __shfl_xor_sync / __ballot_sync a per-warp exchange between two warp barriers, so a missing or
//     divergent barrier / shuffle deadlocks or reads stale data here as it would on the GPU;
//   * blocks run one after another (they are independent), with gridDim.x chosen by the caller so the
//     grid-stride loops over users are exercised;
//   * dynamic shared memory, the global scratch, the dS partials and the outputs are filled with NaN
//     before the launch, so a read of anything the kernel did not write shows up as a NaN result;
//   * max_smem is a parameter, so every staging plan (shared memory or global fallback for the
//     workspace, E, S and the dS accumulator) can be forced on small shapes.
//
// What it cannot show: GPU timing, warp-synchronous races the barriers here would hide (the kernels
// rely on none: every cross-thread exchange goes through __syncthreads or a full-warp shuffle), and
// --use_fast_math rounding.

#include <torch/extension.h>

#include <barrier>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

// ------------------------------------------------------------------ CUDA built-ins on the host

struct MkEmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};

struct MkEmuBlock {
  std::unique_ptr<std::barrier<>> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<double> shuffle_slots;
  unsigned char* smem = nullptr;
};

thread_local MkEmuDim3 threadIdx, blockIdx, blockDim, gridDim;
thread_local MkEmuBlock* mk_emu_block = nullptr;

inline void __syncthreads() { mk_emu_block->block_barrier->arrive_and_wait(); }

// Every lane of the warp must call it (full mask), as the kernels do.
template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask) {
  const unsigned tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  MkEmuBlock* b = mk_emu_block;
  b->shuffle_slots[tid] = static_cast<double>(v);  // exact for float and double
  b->warp_barriers[warp]->arrive_and_wait();
  const double r = b->shuffle_slots[(warp << 5) | (lane ^ static_cast<unsigned>(lane_mask))];
  b->warp_barriers[warp]->arrive_and_wait();
  return static_cast<T>(r);
}

// Every lane of the warp must call it (full mask), as the kernels do.
inline unsigned __ballot_sync(unsigned /*mask*/, int predicate) {
  const unsigned tid = threadIdx.x, warp = tid >> 5;
  MkEmuBlock* b = mk_emu_block;
  b->shuffle_slots[tid] = predicate ? 1.0 : 0.0;
  b->warp_barriers[warp]->arrive_and_wait();
  unsigned bits = 0;
  for (unsigned l = 0; l < 32; ++l) bits |= (b->shuffle_slots[(warp << 5) | l] != 0.0 ? 1u : 0u) << l;
  b->warp_barriers[warp]->arrive_and_wait();
  return bits;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }

struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define MK_DYNAMIC_SMEM(name) unsigned char* name = mk_emu_block->smem

#include "routing_kernels.cuh"

namespace {

using namespace mind_kernels::cuda_routing;

template <typename... Args>
void emulate_launch_2d(void (*kernel)(Args...), int64_t grid, int64_t grid_y, int threads, size_t smem_bytes,
                       std::type_identity_t<Args>... args) {
  TORCH_CHECK(threads % 32 == 0 && threads > 0, "emulation: block size must be a positive multiple of 32");
  for (int64_t by = 0; by < grid_y; ++by)
  for (int64_t blk = 0; blk < grid; ++blk) {
    MkEmuBlock block;
    block.block_barrier = std::make_unique<std::barrier<>>(threads);
    for (int w = 0; w < threads / 32; ++w) block.warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    block.shuffle_slots.assign(threads, 0.0);
    std::vector<float4> smem(smem_bytes / sizeof(float4) + 1);  // 16-byte aligned
    std::memset(smem.data(), 0xFF, smem.size() * sizeof(float4));  // NaN garbage
    block.smem = reinterpret_cast<unsigned char*>(smem.data());
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        threadIdx = {static_cast<unsigned>(t), 0, 0};
        blockIdx = {static_cast<unsigned>(blk), static_cast<unsigned>(by), 0};
        blockDim = {static_cast<unsigned>(threads), 1, 1};
        gridDim = {static_cast<unsigned>(grid), static_cast<unsigned>(grid_y), 1};
        mk_emu_block = &block;
        kernel(args...);
      });
    }
    for (auto& th : pool) th.join();
  }
}

template <typename... Args>
void emulate_launch(void (*kernel)(Args...), int64_t grid, int threads, size_t smem_bytes,
                    std::type_identity_t<Args>... args) {
  emulate_launch_2d(kernel, grid, 1, threads, smem_bytes, args...);
}

// Mirrors launch_reduce in routing.cu.
template <typename acc_t, typename out_t>
void emulate_reduce(const at::Tensor& partial, int64_t rows, int64_t n, out_t* out) {
  const int threads = 256;
  const int64_t blocks_x = std::min<int64_t>((n + threads - 1) / threads, 4096);
  if (rows <= kRowsPerSlice) {
    emulate_launch(&reduce_partials_kernel<acc_t, out_t>, blocks_x, threads, 0,
                   static_cast<const acc_t*>(partial.data_ptr<acc_t>()), rows, rows, n, out);
    return;
  }
  const int64_t slices = (rows + kRowsPerSlice - 1) / kRowsPerSlice;
  at::Tensor sums = at::full({slices, n}, std::numeric_limits<double>::quiet_NaN(), partial.options());
  emulate_launch_2d(&reduce_partials_kernel<acc_t, acc_t>, blocks_x, slices, threads, 0,
                    static_cast<const acc_t*>(partial.data_ptr<acc_t>()), rows, kRowsPerSlice, n,
                    sums.data_ptr<acc_t>());
  emulate_launch(&reduce_partials_kernel<acc_t, out_t>, blocks_x, threads, 0,
                 static_cast<const acc_t*>(sums.data_ptr<acc_t>()), slices, slices, n, out);
}

at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor nan_like_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), opts);
}

// Mirrors routing_forward_cuda's host code, with grid and max_smem chosen by the caller.
std::tuple<at::Tensor, at::Tensor, at::Tensor> emulate_forward(const at::Tensor& behaviors, const at::Tensor& weight,
                                                               const at::Tensor& init_logits,
                                                               const std::optional<at::Tensor>& mask,
                                                               const std::optional<at::Tensor>& interest_mask,
                                                               int64_t num_iters, bool over_behaviors,
                                                               double logit_scale, int64_t grid, int64_t max_smem) {
  const int64_t B = behaviors.size(0), L = behaviors.size(1), D_in = behaviors.size(2), D_out = weight.size(0);
  const int64_t K = init_logits.size(-2);
  const auto dtype = behaviors.scalar_type();
  const auto acc = acc_of(dtype);
  at::Tensor mask_b, imask_b;
  if (mask.has_value() && mask->defined()) mask_b = mask->ne(0).contiguous();
  if (interest_mask.has_value() && interest_mask->defined()) imask_b = interest_mask->ne(0).contiguous();
  auto capsules = nan_like_empty({B, K, D_out}, behaviors.options());
  auto coupling = nan_like_empty({B, K, L}, behaviors.options().dtype(acc));
  auto preact = nan_like_empty({B, K, D_out}, behaviors.options().dtype(acc));
  if (B == 0) return {capsules, coupling, preact};
  const at::Tensor E = behaviors.contiguous();
  const at::Tensor S = weight.to(acc).contiguous();
  const at::Tensor b0 = init_logits.to(acc).contiguous();
  const int64_t init_stride = (b0.dim() == 3 && b0.size(0) == B && B > 1) ? K * L : 0;
  const int threads = forward_threads(L, D_in, D_out, K);
  grid = std::max<int64_t>(1, std::min(grid, B));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "emulate_forward", [&] {
    using acc_t = acc_type_t<scalar_t>;
    FwdParams<scalar_t, acc_t> p{};
    init_forward(p, B, L, D_in, D_out, K, num_iters, over_behaviors, logit_scale);
    const size_t smem_bytes = plan_forward_smem(p, static_cast<size_t>(max_smem));
    at::Tensor E_acc, scratch, gram;
    if (mind_kernels::uses_gram(D_in, D_out, num_iters)) {
      gram = nan_like_empty({D_in, D_in}, behaviors.options().dtype(acc));
      // A small grid and block, so the grid-stride loop runs more than once on small shapes too.
      emulate_launch(&gram_kernel<acc_t>, 2, 32, 0, static_cast<const acc_t*>(S.data_ptr<acc_t>()),
                     gram.data_ptr<acc_t>(), static_cast<int>(D_in), static_cast<int>(D_out));
    }
    if (!p.E_smem) {
      E_acc = E.to(acc).contiguous();
      if (!over_behaviors && mask_b.defined()) E_acc = E_acc.masked_fill(mask_b.logical_not().unsqueeze(-1), 0);
    }
    if (!p.ws_smem) scratch = nan_like_empty({grid * p.lay.total}, behaviors.options().dtype(acc));
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
    emulate_launch(&routing_forward_kernel<scalar_t, acc_t>, grid, threads, smem_bytes, p);
  });
  return {capsules, coupling, preact};
}

// Mirrors routing_backward_cuda's host code.
std::tuple<at::Tensor, at::Tensor> emulate_backward(const at::Tensor& grad_capsules, const at::Tensor& behaviors,
                                                    const at::Tensor& weight, const at::Tensor& coupling,
                                                    const at::Tensor& preactivation, int64_t grid, int64_t max_smem) {
  const int64_t B = behaviors.size(0), L = behaviors.size(1), D_in = behaviors.size(2), D_out = weight.size(0);
  const int64_t K = coupling.size(1);
  const auto dtype = behaviors.scalar_type();
  const auto acc = acc_of(dtype);
  auto grad_E = nan_like_empty({B, L, D_in}, behaviors.options());
  if (B == 0) return {grad_E, at::zeros({D_out, D_in}, weight.options())};
  auto grad_S = nan_like_empty({D_out, D_in}, weight.options());
  const at::Tensor E = behaviors.contiguous();
  const at::Tensor S = weight.to(acc).contiguous();
  const at::Tensor G = grad_capsules.to(acc).contiguous();
  const at::Tensor w = coupling.to(acc).contiguous();
  const at::Tensor z = preactivation.to(acc).contiguous();
  grid = std::max<int64_t>(1, std::min(grid, B));
  const auto weight_dtype = weight.scalar_type();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "emulate_backward", [&] {
    using acc_t = acc_type_t<scalar_t>;
    BwdParams<scalar_t, acc_t> p{};
    init_backward(p, B, L, D_in, D_out, K);
    const size_t smem_bytes = plan_backward_smem(p, static_cast<size_t>(max_smem));
    at::Tensor partial = nan_like_empty({grid, D_out * D_in}, behaviors.options().dtype(acc));
    at::Tensor scratch;
    if (!p.ws_smem) scratch = nan_like_empty({grid * p.lay.total}, behaviors.options().dtype(acc));
    p.G = G.data_ptr<acc_t>();
    p.E = E.data_ptr<scalar_t>();
    p.S = S.data_ptr<acc_t>();
    p.w = w.data_ptr<acc_t>();
    p.z = z.data_ptr<acc_t>();
    p.dE = grad_E.data_ptr<scalar_t>();
    p.partial = partial.data_ptr<acc_t>();
    p.scratch = p.ws_smem ? nullptr : scratch.data_ptr<acc_t>();
    emulate_launch(&routing_backward_kernel<scalar_t, acc_t>, grid, kBackwardThreads, smem_bytes, p);
    if (weight_dtype == dtype) {
      emulate_reduce<acc_t, scalar_t>(partial, grid, D_out * D_in, grad_S.data_ptr<scalar_t>());
    } else {
      emulate_reduce<acc_t, float>(partial, grid, D_out * D_in, grad_S.data_ptr<float>());
    }
  });
  return {grad_E, grad_S};
}

// Mirrors routing_jagged_forward_cuda's host code: values (N, D_in) + offsets (B + 1) int64.
std::tuple<at::Tensor, at::Tensor, at::Tensor> emulate_jagged_forward(
    const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& weight, const at::Tensor& init_logits,
    const std::optional<at::Tensor>& interest_mask, int64_t num_iters, bool over_behaviors, double logit_scale,
    int64_t grid, int64_t max_smem) {
  const int64_t N = values.size(0), D_in = values.size(1), B = offsets.size(0) - 1, D_out = weight.size(0);
  const int64_t K = init_logits.size(-2), L = init_logits.size(-1);
  const auto dtype = values.scalar_type();
  const auto acc = acc_of(dtype);
  at::Tensor imask_b;
  if (interest_mask.has_value() && interest_mask->defined()) imask_b = interest_mask->ne(0).contiguous();
  auto capsules = nan_like_empty({B, K, D_out}, values.options());
  auto coupling = nan_like_empty({N, K}, values.options().dtype(acc));
  auto preact = nan_like_empty({B, K, D_out}, values.options().dtype(acc));
  if (B == 0) return {capsules, coupling, preact};
  const at::Tensor E = values.contiguous();
  const at::Tensor offs = offsets.contiguous();
  const at::Tensor S = weight.to(acc).contiguous();
  const at::Tensor b0 = init_logits.to(acc).contiguous();
  const int64_t init_stride = b0.dim() == 3 ? K * L : 0;
  const int threads = forward_threads(L, D_in, D_out, K);
  grid = std::max<int64_t>(1, std::min(grid, B));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "emulate_jagged_forward", [&] {
    using acc_t = acc_type_t<scalar_t>;
    FwdParams<scalar_t, acc_t> p{};
    init_forward(p, B, L, D_in, D_out, K, num_iters, over_behaviors, logit_scale);
    const size_t smem_bytes = plan_forward_smem(p, static_cast<size_t>(max_smem));
    at::Tensor E_acc, scratch, gram;
    if (mind_kernels::uses_gram(D_in, D_out, num_iters)) {
      gram = nan_like_empty({D_in, D_in}, values.options().dtype(acc));
      emulate_launch(&gram_kernel<acc_t>, 2, 32, 0, static_cast<const acc_t*>(S.data_ptr<acc_t>()),
                     gram.data_ptr<acc_t>(), static_cast<int>(D_in), static_cast<int>(D_out));
    }
    if (!p.E_smem) E_acc = E.to(acc).contiguous();
    if (!p.ws_smem) scratch = nan_like_empty({grid * p.lay.total}, values.options().dtype(acc));
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
    emulate_launch(&routing_forward_kernel<scalar_t, acc_t>, grid, threads, smem_bytes, p);
  });
  return {capsules, coupling, preact};
}

// Mirrors routing_jagged_backward_cuda's host code.
std::tuple<at::Tensor, at::Tensor> emulate_jagged_backward(const at::Tensor& grad_capsules, const at::Tensor& values,
                                                           const at::Tensor& offsets, const at::Tensor& weight,
                                                           const at::Tensor& coupling,
                                                           const at::Tensor& preactivation, int64_t max_len,
                                                           int64_t grid, int64_t max_smem) {
  const int64_t N = values.size(0), D_in = values.size(1), B = offsets.size(0) - 1, D_out = weight.size(0);
  const int64_t K = coupling.size(1), L = max_len;
  const auto dtype = values.scalar_type();
  const auto acc = acc_of(dtype);
  auto grad_V = nan_like_empty({N, D_in}, values.options());
  if (B == 0 || N == 0) return {grad_V, at::zeros({D_out, D_in}, weight.options())};
  auto grad_S = nan_like_empty({D_out, D_in}, weight.options());
  const at::Tensor E = values.contiguous();
  const at::Tensor offs = offsets.contiguous();
  const at::Tensor S = weight.to(acc).contiguous();
  const at::Tensor G = grad_capsules.to(acc).contiguous();
  const at::Tensor w = coupling.to(acc).contiguous();
  const at::Tensor z = preactivation.to(acc).contiguous();
  grid = std::max<int64_t>(1, std::min(grid, B));
  const auto weight_dtype = weight.scalar_type();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "emulate_jagged_backward", [&] {
    using acc_t = acc_type_t<scalar_t>;
    BwdParams<scalar_t, acc_t> p{};
    init_backward(p, B, L, D_in, D_out, K);
    const size_t smem_bytes = plan_backward_smem(p, static_cast<size_t>(max_smem));
    at::Tensor partial = nan_like_empty({grid, D_out * D_in}, values.options().dtype(acc));
    at::Tensor scratch;
    if (!p.ws_smem) scratch = nan_like_empty({grid * p.lay.total}, values.options().dtype(acc));
    p.G = G.data_ptr<acc_t>();
    p.E = E.data_ptr<scalar_t>();
    p.S = S.data_ptr<acc_t>();
    p.w = w.data_ptr<acc_t>();
    p.z = z.data_ptr<acc_t>();
    p.dE = grad_V.data_ptr<scalar_t>();
    p.partial = partial.data_ptr<acc_t>();
    p.scratch = p.ws_smem ? nullptr : scratch.data_ptr<acc_t>();
    p.offsets = offs.data_ptr<int64_t>();
    emulate_launch(&routing_backward_kernel<scalar_t, acc_t>, grid, kBackwardThreads, smem_bytes, p);
    if (weight_dtype == dtype) {
      emulate_reduce<acc_t, scalar_t>(partial, grid, D_out * D_in, grad_S.data_ptr<scalar_t>());
    } else {
      emulate_reduce<acc_t, float>(partial, grid, D_out * D_in, grad_S.data_ptr<float>());
    }
  });
  return {grad_V, grad_S};
}

// Staging plan for a shape and budget, for the tests to assert which path they exercise:
// (fwd workspace, fwd S, fwd E, bwd workspace, bwd dS accumulator, bwd S, bwd E) in shared memory?
template <typename acc_t>
std::vector<bool> staging_plan_t(int64_t L, int64_t D_in, int64_t D_out, int64_t K, int64_t max_smem) {
  FwdParams<acc_t, acc_t> f{};
  init_forward(f, 1, L, D_in, D_out, K, 1, false);
  plan_forward_smem(f, static_cast<size_t>(max_smem));
  BwdParams<acc_t, acc_t> b{};
  init_backward(b, 1, L, D_in, D_out, K);
  plan_backward_smem(b, static_cast<size_t>(max_smem));
  return {f.ws_smem, f.S_smem, f.E_smem, b.ws_smem, b.dS_smem, b.S_smem, b.E_smem};
}

std::vector<bool> staging_plan(int64_t L, int64_t D_in, int64_t D_out, int64_t K, int64_t max_smem, bool float64) {
  return float64 ? staging_plan_t<double>(L, D_in, D_out, K, max_smem)
                 : staging_plan_t<float>(L, D_in, D_out, K, max_smem);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &emulate_forward, "routing_forward_kernel emulated on the CPU");
  m.def("backward", &emulate_backward, "routing_backward_kernel + reduce_partials_kernel emulated on the CPU");
  m.def("jagged_forward", &emulate_jagged_forward, "routing_forward_kernel on a jagged batch, emulated");
  m.def("jagged_backward", &emulate_jagged_backward, "routing_backward_kernel on a jagged batch, emulated");
  m.def("staging_plan", &staging_plan, "which pieces the kernels stage in shared memory for a budget");
}
