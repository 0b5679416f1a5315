// Fused CUDA kernels for MIND's B2I dynamic routing (shared/design/ROUTING.md), registered under
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
//             b_ij += e_i . v_j                      (= c_j . u_i, all i, padded ones too)
//     outputs: capsules c, coupling w (final), preactivation z (final)
//
// The reassociation (ROUTING.md allows it) never materialises u = S E (L x D_out), which would
// cost L*D_out*D_in multiply-adds per user; the per-iteration cost is 2*K*L*D_in + 2*K*D_out*D_in.
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
// dS is accumulated per block (in shared memory, or in the block's global slice when it does not
// fit), written to a (num_blocks, D_out, D_in) float buffer, and summed over blocks in a fixed
// order by a second kernel: the result is deterministic (no atomics) for a given device.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "routing_math.h"

namespace mind_kernels {
namespace {

constexpr int kChunk = 4;          // interests per register block
constexpr int kMaxThreads = 256;   // block size cap (launch bounds)

template <typename T>
using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ------------------------------------------------------------------ device helpers

template <typename T>
struct Vec4 {
  T v[4];
};

// 4 consecutive acc_t values; p must be 16-byte aligned (element offset a multiple of 4 from an
// aligned base, guaranteed by the layouts below).
__device__ __forceinline__ Vec4<float> load4(const float* p) {
  const float4 x = *reinterpret_cast<const float4*>(p);
  return {{x.x, x.y, x.z, x.w}};
}
__device__ __forceinline__ Vec4<double> load4(const double* p) {
  const double2 a = *reinterpret_cast<const double2*>(p);
  const double2 b = *reinterpret_cast<const double2*>(p + 2);
  return {{a.x, a.y, b.x, b.y}};
}
__device__ __forceinline__ void store4(float* p, const Vec4<float>& x) {
  *reinterpret_cast<float4*>(p) = make_float4(x.v[0], x.v[1], x.v[2], x.v[3]);
}
__device__ __forceinline__ void store4(double* p, const Vec4<double>& x) {
  *reinterpret_cast<double2*>(p) = make_double2(x.v[0], x.v[1]);
  *reinterpret_cast<double2*>(p + 2) = make_double2(x.v[2], x.v[3]);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const T o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  return v;
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t to_acc(scalar_t x) {
  return static_cast<acc_t>(x);
}

// out[x][j0 .. j0+3] = sum_{r < R} A[x * a_pitch + r * a_step] * Bt[r * KP + j0 .. j0+3]
// for the x and chunk of one work item: lanes walk x, Bt is read as a broadcast 16-byte load.
template <typename acc_t>
__device__ __forceinline__ Vec4<acc_t> chunk_dot(const acc_t* A, int a_step, const acc_t* Bt, int KP, int j0, int R) {
  Vec4<acc_t> acc = {{acc_t(0), acc_t(0), acc_t(0), acc_t(0)}};
#pragma unroll 4
  for (int r = 0; r < R; ++r) {
    const acc_t a = A[static_cast<int64_t>(r) * a_step];
    const Vec4<acc_t> b = load4(Bt + r * KP + j0);
    acc.v[0] += a * b.v[0];
    acc.v[1] += a * b.v[1];
    acc.v[2] += a * b.v[2];
    acc.v[3] += a * b.v[3];
  }
  return acc;
}

// ------------------------------------------------------------------ forward kernel

// Workspace layout of the forward kernel, in acc_t elements (every array a multiple of 4 long so
// every array starts 16-byte aligned):
//   bT    [L][KP]      logits b, position-major
//   wT    [L][KP]      coupling w
//   ebarT [D_in][KP]   ebar_j = sum_i w_ij e_i
//   vT    [D_in][KP]   v_j = S^T c_j
//   zT    [D_out][KP]  z_j = S ebar_j
//   scale [KP]         a(|z_j|^2)
//   flags              valid[L], active[K] as bytes, rounded up to 4 acc_t
struct FwdLayout {
  int64_t b, w, ebar, v, z, scale, flags, total;
};

inline int64_t round4(int64_t n) { return (n + 3) / 4 * 4; }

template <typename acc_t>
FwdLayout fwd_layout(int64_t L, int64_t D_in, int64_t D_out, int64_t K, int64_t KP) {
  FwdLayout l;
  l.b = 0;
  l.w = l.b + L * KP;
  l.ebar = l.w + L * KP;
  l.v = l.ebar + D_in * KP;
  l.z = l.v + D_in * KP;
  l.scale = l.z + D_out * KP;
  l.flags = l.scale + KP;
  const int64_t flag_elems = (L + K + static_cast<int64_t>(sizeof(acc_t)) - 1) / static_cast<int64_t>(sizeof(acc_t));
  l.total = l.flags + round4(flag_elems);
  return l;
}

template <typename scalar_t, typename acc_t>
struct FwdParams {
  const scalar_t* E;      // (B, L, D_in) contiguous, E's dtype: staged into shared memory
  const acc_t* E_acc;     // (B, L, D_in) contiguous acc_t copy: read directly when E is not staged
  const acc_t* S;         // (D_out, D_in) contiguous acc_t
  const acc_t* init;      // (K, L) per user, user stride init_stride (0 when broadcast)
  int64_t init_stride;
  const bool* mask;       // (B, L) or nullptr
  const bool* imask;      // (B, K) or nullptr
  scalar_t* capsules;     // (B, K, D_out)
  acc_t* coupling;        // (B, K, L)
  acc_t* preact;          // (B, K, D_out)
  acc_t* scratch;         // gridDim.x * ws_elems when the workspace is not in shared memory
  int64_t B;
  int L, D_in, D_out, K, KP, num_iters;
  bool over_behaviors;
  bool ws_smem, S_smem, E_smem;
  FwdLayout lay;
  int64_t S_elems;        // staged S size (D_out * (D_in + 1), rounded to 4)
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads) routing_forward_kernel(const FwdParams<scalar_t, acc_t> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);

  const int tid = threadIdx.x;
  const int T = blockDim.x;  // a multiple of 32
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int nwarps = T >> 5;
  const int L = p.L, D_in = p.D_in, D_out = p.D_out, K = p.K, KP = p.KP;
  const int n_chunks = KP / kChunk;

  // Carve shared memory: [workspace][S][E], each piece present only when staged.
  acc_t* next = smem;
  acc_t* ws;
  if (p.ws_smem) {
    ws = next;
    next += p.lay.total;
  } else {
    ws = p.scratch + static_cast<int64_t>(blockIdx.x) * p.lay.total;
  }
  const acc_t* Sp;
  int pS;
  if (p.S_smem) {
    acc_t* s = next;
    next += p.S_elems;
    for (int idx = tid; idx < D_out * D_in; idx += T) {
      const int o = idx / D_in;
      const int d = idx - o * D_in;
      s[o * (D_in + 1) + d] = p.S[idx];
    }
    Sp = s;
    pS = D_in + 1;
  } else {
    Sp = p.S;
    pS = D_in;
  }
  acc_t* Es = p.E_smem ? next : nullptr;
  const int pE = p.E_smem ? D_in + 1 : D_in;

  acc_t* bT = ws + p.lay.b;
  acc_t* wT = ws + p.lay.w;
  acc_t* ebarT = ws + p.lay.ebar;
  acc_t* vT = ws + p.lay.v;
  acc_t* zT = ws + p.lay.z;
  acc_t* scale = ws + p.lay.scale;
  unsigned char* valid = reinterpret_cast<unsigned char*>(ws + p.lay.flags);
  unsigned char* active = valid + L;

  // Zero the whole workspace once: padding columns j in [K, KP) are never written with non-zero
  // values afterwards, so the 4-wide chunks can read them unconditionally.
  for (int64_t idx = tid; idx < p.lay.total; idx += T) ws[idx] = acc_t(0);
  __syncthreads();

  const acc_t inf = std::numeric_limits<acc_t>::infinity();

  for (int64_t u = blockIdx.x; u < p.B; u += gridDim.x) {
    // ---- load this user's inputs
    const int64_t e_off = u * static_cast<int64_t>(L) * D_in;
    const acc_t* Ep;
    if (p.E_smem) {
      const scalar_t* Eu = p.E + e_off;
      for (int idx = tid; idx < L * D_in; idx += T) {
        const int i = idx / D_in;
        const int d = idx - i * D_in;
        Es[i * pE + d] = to_acc<acc_t>(Eu[idx]);
      }
      Ep = Es;
    } else {
      Ep = p.E_acc + e_off;
    }
    const acc_t* b0 = p.init + u * p.init_stride;
    for (int idx = tid; idx < K * L; idx += T) {
      const int j = idx / L;
      const int i = idx - j * L;
      bT[i * KP + j] = b0[idx];
    }
    for (int i = tid; i < L; i += T) valid[i] = p.mask ? (p.mask[u * L + i] ? 1 : 0) : 1;
    for (int j = tid; j < K; j += T) active[j] = p.imask ? (p.imask[u * K + j] ? 1 : 0) : 1;
    __syncthreads();

    for (int t = 1; t <= p.num_iters; ++t) {
      // ---- coupling w from logits b
      if (!p.over_behaviors) {
        // softmax over the active interests of each valid position; masked positions get 0
        for (int i = tid; i < L; i += T) {
          if (valid[i]) {
            masked_softmax<acc_t, unsigned char>(bT + i * KP, 1, active, 1, wT + i * KP, 1, K);
          } else {
            for (int j = 0; j < K; ++j) wT[i * KP + j] = acc_t(0);
          }
        }
      } else {
        // softmax over all L positions (padding in the denominator) per interest, one warp per
        // interest; then 0 at masked positions and for inactive interests.
        for (int j = warp; j < K; j += nwarps) {  // warp-uniform loop
          if (!active[j]) {
            for (int i = lane; i < L; i += 32) wT[i * KP + j] = acc_t(0);
            continue;
          }
          acc_t peak = -inf;
          for (int i = lane; i < L; i += 32) {
            const acc_t v = bT[i * KP + j];
            peak = v > peak ? v : peak;
          }
          peak = warp_max(peak);
          if (!(peak > -inf && peak < inf)) peak = acc_t(0);  // all -inf (or NaN): avoid inf - inf
          acc_t total = acc_t(0);
          for (int i = lane; i < L; i += 32) total += exp(bT[i * KP + j] - peak);
          total = warp_sum(total);
          const acc_t inv = total > acc_t(0) ? acc_t(1) / total : acc_t(0);
          for (int i = lane; i < L; i += 32)
            wT[i * KP + j] = valid[i] ? exp(bT[i * KP + j] - peak) * inv : acc_t(0);
        }
      }
      __syncthreads();

      // ---- ebar_j[d] = sum_i w_ij E[i][d]   (lanes walk d)
      for (int item = tid; item < n_chunks * D_in; item += T) {
        const int jc = item / D_in;
        const int d = item - jc * D_in;
        store4(ebarT + d * KP + jc * kChunk, chunk_dot(Ep + d, pE, wT, KP, jc * kChunk, L));
      }
      __syncthreads();

      // ---- z_j[o] = sum_d S[o][d] ebar_j[d]   (lanes walk o)
      for (int item = tid; item < n_chunks * D_out; item += T) {
        const int jc = item / D_out;
        const int o = item - jc * D_out;
        store4(zT + o * KP + jc * kChunk, chunk_dot(Sp + static_cast<int64_t>(o) * pS, 1, ebarT, KP, jc * kChunk, D_in));
      }
      __syncthreads();

      // ---- squash scale a(|z_j|^2), one warp per interest
      for (int j = warp; j < K; j += nwarps) {
        acc_t n2 = acc_t(0);
        for (int o = lane; o < D_out; o += 32) {
          const acc_t z = zT[o * KP + j];
          n2 += z * z;
        }
        n2 = warp_sum(n2);
        if (lane == 0) scale[j] = squash_scale<acc_t>(n2);
      }
      __syncthreads();

      if (t < p.num_iters) {
        // ---- v_j[d] = sum_o S[o][d] c_j[o],  c_j = scale_j z_j   (lanes walk d)
        for (int item = tid; item < n_chunks * D_in; item += T) {
          const int jc = item / D_in;
          const int d = item - jc * D_in;
          Vec4<acc_t> v = chunk_dot(Sp + d, pS, zT, KP, jc * kChunk, D_out);
          const Vec4<acc_t> sc = load4(scale + jc * kChunk);
#pragma unroll
          for (int q = 0; q < kChunk; ++q) v.v[q] *= sc.v[q];
          store4(vT + d * KP + jc * kChunk, v);
        }
        __syncthreads();

        // ---- b_ij += E[i] . v_j   (all positions; lanes walk i)
        for (int item = tid; item < n_chunks * L; item += T) {
          const int jc = item / L;
          const int i = item - jc * L;
          const Vec4<acc_t> db = chunk_dot(Ep + static_cast<int64_t>(i) * pE, 1, vT, KP, jc * kChunk, D_in);
          acc_t* bp = bT + i * KP + jc * kChunk;
          Vec4<acc_t> b = load4(bp);
#pragma unroll
          for (int q = 0; q < kChunk; ++q) b.v[q] += db.v[q];
          store4(bp, b);
        }
        __syncthreads();
      }
    }

    // ---- outputs (coalesced along the last axis)
    const int64_t kd_off = u * static_cast<int64_t>(K) * D_out;
    for (int idx = tid; idx < K * D_out; idx += T) {
      const int j = idx / D_out;
      const int o = idx - j * D_out;
      const acc_t z = zT[o * KP + j];
      p.preact[kd_off + idx] = z;
      p.capsules[kd_off + idx] = static_cast<scalar_t>(scale[j] * z);
    }
    const int64_t kl_off = u * static_cast<int64_t>(K) * L;
    for (int idx = tid; idx < K * L; idx += T) {
      const int j = idx / L;
      const int i = idx - j * L;
      p.coupling[kl_off + idx] = wT[i * KP + j];
    }
    __syncthreads();  // the next user overwrites the workspace and E
  }
}

// ------------------------------------------------------------------ backward kernels

// Workspace of the backward kernel, acc_t elements:
//   zT [D_out][KP], dzT [D_out][KP] (holds G, then dz), wT [L][KP], gT [D_in][KP],
//   ebarT [D_in][KP], coef [2][KP] (a(n2), 2 a'(n2) (z.G))
struct BwdLayout {
  int64_t z, dz, w, g, ebar, coef, total;
};

inline BwdLayout bwd_layout(int64_t L, int64_t D_in, int64_t D_out, int64_t KP) {
  BwdLayout l;
  l.z = 0;
  l.dz = l.z + D_out * KP;
  l.w = l.dz + D_out * KP;
  l.g = l.w + L * KP;
  l.ebar = l.g + D_in * KP;
  l.coef = l.ebar + D_in * KP;
  l.total = l.coef + 2 * KP;
  return l;
}

template <typename scalar_t, typename acc_t>
struct BwdParams {
  const acc_t* G;        // (B, K, D_out) grad of capsules, acc_t
  const scalar_t* E;     // (B, L, D_in)
  const acc_t* S;        // (D_out, D_in) acc_t
  const acc_t* w;        // (B, K, L)
  const acc_t* z;        // (B, K, D_out)
  scalar_t* dE;          // (B, L, D_in)
  acc_t* partial;        // (gridDim.x, D_out * D_in): each block's dS
  acc_t* scratch;        // gridDim.x * ws_elems when the workspace is not in shared memory
  int64_t B;
  int L, D_in, D_out, K, KP;
  bool ws_smem, dS_smem, S_smem;
  BwdLayout lay;
  int64_t dS_elems, S_elems;
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads) routing_backward_kernel(const BwdParams<scalar_t, acc_t> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);

  const int tid = threadIdx.x;
  const int T = blockDim.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int nwarps = T >> 5;
  const int L = p.L, D_in = p.D_in, D_out = p.D_out, K = p.K, KP = p.KP;
  const int n_chunks = KP / kChunk;
  const int DD = D_out * D_in;

  acc_t* next = smem;
  acc_t* ws;
  if (p.ws_smem) {
    ws = next;
    next += p.lay.total;
  } else {
    ws = p.scratch + static_cast<int64_t>(blockIdx.x) * p.lay.total;
  }
  // dS accumulator: thread tid owns the entries idx = tid (mod T), in shared memory or directly in
  // this block's slice of the partial buffer; no other thread touches them, so no sync is needed.
  acc_t* dS_acc;
  acc_t* my_partial = p.partial + static_cast<int64_t>(blockIdx.x) * DD;
  if (p.dS_smem) {
    dS_acc = next;
    next += p.dS_elems;
  } else {
    dS_acc = my_partial;
  }
  for (int idx = tid; idx < DD; idx += T) dS_acc[idx] = acc_t(0);
  const acc_t* Sp;
  int pS;
  if (p.S_smem) {
    acc_t* s = next;
    next += p.S_elems;
    for (int idx = tid; idx < DD; idx += T) {
      const int o = idx / D_in;
      const int d = idx - o * D_in;
      s[o * (D_in + 1) + d] = p.S[idx];
    }
    Sp = s;
    pS = D_in + 1;
  } else {
    Sp = p.S;
    pS = D_in;
  }

  acc_t* zT = ws + p.lay.z;
  acc_t* dzT = ws + p.lay.dz;
  acc_t* wT = ws + p.lay.w;
  acc_t* gT = ws + p.lay.g;
  acc_t* ebarT = ws + p.lay.ebar;
  acc_t* coefA = ws + p.lay.coef;
  acc_t* coefB = coefA + KP;

  for (int64_t idx = tid; idx < p.lay.total; idx += T) ws[idx] = acc_t(0);
  __syncthreads();

  for (int64_t u = blockIdx.x; u < p.B; u += gridDim.x) {
    // ---- load z, G (into dzT) and w, transposed to interest-minor
    const int64_t kd_off = u * static_cast<int64_t>(K) * D_out;
    for (int idx = tid; idx < K * D_out; idx += T) {
      const int j = idx / D_out;
      const int o = idx - j * D_out;
      zT[o * KP + j] = p.z[kd_off + idx];
      dzT[o * KP + j] = p.G[kd_off + idx];
    }
    const int64_t kl_off = u * static_cast<int64_t>(K) * L;
    for (int idx = tid; idx < K * L; idx += T) {
      const int j = idx / L;
      const int i = idx - j * L;
      wT[i * KP + j] = p.w[kl_off + idx];
    }
    __syncthreads();

    // ---- per interest: n2 = |z|^2, zg = z . G  ->  a(n2), 2 a'(n2) zg
    for (int j = warp; j < K; j += nwarps) {
      acc_t n2 = acc_t(0), zg = acc_t(0);
      for (int o = lane; o < D_out; o += 32) {
        const acc_t z = zT[o * KP + j];
        n2 += z * z;
        zg += z * dzT[o * KP + j];
      }
      n2 = warp_sum(n2);
      zg = warp_sum(zg);
      if (lane == 0) {
        coefA[j] = squash_scale<acc_t>(n2);
        coefB[j] = acc_t(2) * squash_scale_derivative<acc_t>(n2) * zg;
      }
    }
    __syncthreads();

    // ---- dz_j = a G_j + 2 a' (z_j . G_j) z_j  (in place over G)
    for (int idx = tid; idx < K * D_out; idx += T) {
      const int o = idx / K;
      const int j = idx - o * K;
      dzT[o * KP + j] = coefA[j] * dzT[o * KP + j] + coefB[j] * zT[o * KP + j];
    }
    __syncthreads();

    // ---- g_j = S^T dz_j and ebar_j = sum_i w_ij e_i   (lanes walk d; E read straight from global,
    //      coalesced along d, once per chunk of 4 interests)
    const scalar_t* Eu = p.E + u * static_cast<int64_t>(L) * D_in;
    for (int item = tid; item < n_chunks * D_in; item += T) {
      const int jc = item / D_in;
      const int d = item - jc * D_in;
      const int j0 = jc * kChunk;
      store4(gT + d * KP + j0, chunk_dot(Sp + d, pS, dzT, KP, j0, D_out));
      Vec4<acc_t> eb = {{acc_t(0), acc_t(0), acc_t(0), acc_t(0)}};
#pragma unroll 4
      for (int i = 0; i < L; ++i) {
        const acc_t e = to_acc<acc_t>(Eu[static_cast<int64_t>(i) * D_in + d]);
        const Vec4<acc_t> wv = load4(wT + i * KP + j0);
#pragma unroll
        for (int q = 0; q < kChunk; ++q) eb.v[q] += wv.v[q] * e;
      }
      store4(ebarT + d * KP + j0, eb);
    }
    __syncthreads();

    // ---- dE_i[d] = sum_j w_ij g_j[d]   (coalesced writes along d; masked rows have w = 0)
    scalar_t* dEu = p.dE + u * static_cast<int64_t>(L) * D_in;
    for (int idx = tid; idx < L * D_in; idx += T) {
      const int i = idx / D_in;
      const int d = idx - i * D_in;
      acc_t s = acc_t(0);
      for (int jc = 0; jc < n_chunks; ++jc) {
        const Vec4<acc_t> wv = load4(wT + i * KP + jc * kChunk);
        const Vec4<acc_t> gv = load4(gT + d * KP + jc * kChunk);
#pragma unroll
        for (int q = 0; q < kChunk; ++q) s += wv.v[q] * gv.v[q];
      }
      dEu[idx] = static_cast<scalar_t>(s);
    }
    // ---- dS[o][d] += sum_j dz_j[o] ebar_j[d]   (owner-thread accumulation, fixed order)
    for (int idx = tid; idx < DD; idx += T) {
      const int o = idx / D_in;
      const int d = idx - o * D_in;
      acc_t s = acc_t(0);
      for (int jc = 0; jc < n_chunks; ++jc) {
        const Vec4<acc_t> dz = load4(dzT + o * KP + jc * kChunk);
        const Vec4<acc_t> eb = load4(ebarT + d * KP + jc * kChunk);
#pragma unroll
        for (int q = 0; q < kChunk; ++q) s += dz.v[q] * eb.v[q];
      }
      dS_acc[idx] += s;
    }
    __syncthreads();  // the next user overwrites the workspace
  }

  if (p.dS_smem) {
    for (int idx = tid; idx < DD; idx += T) my_partial[idx] = dS_acc[idx];
  }
}

// dS[idx] = sum over blocks, in block order (deterministic), cast to S's dtype.
template <typename acc_t, typename out_t>
__global__ void reduce_partials_kernel(const acc_t* __restrict__ partial, int64_t num_blocks, int64_t n,
                                       out_t* __restrict__ out) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t s = acc_t(0);
    for (int64_t b = 0; b < num_blocks; ++b) s += partial[b * n + idx];
    out[idx] = static_cast<out_t>(s);
  }
}

// ------------------------------------------------------------------ host side

int64_t threads_for(int64_t work_items) {
  // One work item per thread where possible; at least 2 warps, at most kMaxThreads.
  const int64_t t = (work_items + 31) / 32 * 32;
  return std::max<int64_t>(64, std::min<int64_t>(kMaxThreads, t));
}

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
    bool over_behaviors) {
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
  check_int32(L * D_in, "L * D_in");
  check_int32(D_out * D_in, "D_out * D_in");
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

  const int64_t KP = (K + kChunk - 1) / kChunk * kChunk;
  const int64_t n_chunks = KP / kChunk;
  const int threads = static_cast<int>(
      threads_for(std::max({n_chunks * D_in, n_chunks * D_out, n_chunks * L, std::min<int64_t>(K, 8) * 32})));
  const size_t max_smem = static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "routing_forward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    FwdParams<scalar_t, acc_t> p{};
    p.lay = fwd_layout<acc_t>(L, D_in, D_out, K, KP);
    p.S_elems = round4(D_out * (D_in + 1));
    const int64_t E_elems = round4(L * (D_in + 1));
    check_int32(p.lay.total, "forward workspace size");

    // First layout (in priority order) whose staged pieces fit in shared memory.
    const bool options[8][3] = {{1, 1, 1}, {1, 1, 0}, {1, 0, 1}, {1, 0, 0}, {0, 1, 1}, {0, 1, 0}, {0, 0, 1}, {0, 0, 0}};
    size_t smem_bytes = 0;
    for (const auto& o : options) {
      const int64_t elems = (o[0] ? p.lay.total : 0) + (o[1] ? p.S_elems : 0) + (o[2] ? E_elems : 0);
      smem_bytes = static_cast<size_t>(elems) * sizeof(acc_t);
      p.ws_smem = o[0];
      p.S_smem = o[1];
      p.E_smem = o[2];
      if (smem_bytes <= max_smem) break;
    }
    auto kernel = routing_forward_kernel<scalar_t, acc_t>;
    const int64_t grid = grid_for(kernel, threads, smem_bytes, B, 32);

    at::Tensor E_acc, scratch;
    if (!p.E_smem) E_acc = E.to(acc).contiguous();
    if (!p.ws_smem) scratch = at::empty({grid * p.lay.total}, behaviors.options().dtype(acc));

    p.E = E.data_ptr<scalar_t>();
    p.E_acc = p.E_smem ? nullptr : E_acc.data_ptr<acc_t>();
    p.S = S.data_ptr<acc_t>();
    p.init = b0.data_ptr<acc_t>();
    p.init_stride = init_stride;
    p.mask = mask_b.defined() ? mask_b.data_ptr<bool>() : nullptr;
    p.imask = imask_b.defined() ? imask_b.data_ptr<bool>() : nullptr;
    p.capsules = capsules.data_ptr<scalar_t>();
    p.coupling = coupling.data_ptr<acc_t>();
    p.preact = preact.data_ptr<acc_t>();
    p.scratch = p.ws_smem ? nullptr : scratch.data_ptr<acc_t>();
    p.B = B;
    p.L = static_cast<int>(L);
    p.D_in = static_cast<int>(D_in);
    p.D_out = static_cast<int>(D_out);
    p.K = static_cast<int>(K);
    p.KP = static_cast<int>(KP);
    p.num_iters = static_cast<int>(num_iters);
    p.over_behaviors = over_behaviors;

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
  check_int32(L * D_in, "L * D_in");
  check_int32(D_out * D_in, "D_out * D_in");
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

  const int64_t KP = (K + kChunk - 1) / kChunk * kChunk;
  const int threads = kMaxThreads;
  const size_t max_smem = static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
  const auto weight_dtype = weight.scalar_type();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "routing_backward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    BwdParams<scalar_t, acc_t> p{};
    p.lay = bwd_layout(L, D_in, D_out, KP);
    p.dS_elems = round4(D_out * D_in);
    p.S_elems = round4(D_out * (D_in + 1));
    check_int32(p.lay.total, "backward workspace size");

    const bool options[8][3] = {{1, 1, 1}, {1, 0, 1}, {1, 1, 0}, {1, 0, 0}, {0, 1, 1}, {0, 0, 1}, {0, 1, 0}, {0, 0, 0}};
    size_t smem_bytes = 0;
    for (const auto& o : options) {
      const int64_t elems = (o[0] ? p.lay.total : 0) + (o[1] ? p.dS_elems : 0) + (o[2] ? p.S_elems : 0);
      smem_bytes = static_cast<size_t>(elems) * sizeof(acc_t);
      p.ws_smem = o[0];
      p.dS_smem = o[1];
      p.S_smem = o[2];
      if (smem_bytes <= max_smem) break;
    }
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
    p.B = B;
    p.L = static_cast<int>(L);
    p.D_in = static_cast<int>(D_in);
    p.D_out = static_cast<int>(D_out);
    p.K = static_cast<int>(K);
    p.KP = static_cast<int>(KP);

    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    kernel<<<static_cast<unsigned>(grid), threads, smem_bytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const int64_t n = D_out * D_in;
    const int rthreads = 256;
    const int64_t rblocks = std::min<int64_t>((n + rthreads - 1) / rthreads, 4096);
    if (weight_dtype == dtype) {
      reduce_partials_kernel<acc_t, scalar_t><<<static_cast<unsigned>(rblocks), rthreads, 0, stream>>>(
          partial.data_ptr<acc_t>(), grid, n, grad_S.data_ptr<scalar_t>());
    } else {  // weight is float32 while E is half / bf16
      reduce_partials_kernel<acc_t, float><<<static_cast<unsigned>(rblocks), rthreads, 0, stream>>>(
          partial.data_ptr<acc_t>(), grid, n, grad_S.data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_E, grad_S};
}

}  // namespace
}  // namespace mind_kernels

TORCH_LIBRARY_IMPL(mind_kernels, CUDA, m) {
  m.impl("routing_forward", &mind_kernels::routing_forward_cuda);
  m.impl("routing_backward", &mind_kernels::routing_backward_cuda);
}
