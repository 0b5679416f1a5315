// Device code of the fused routing kernels (see routing.cu for the math and the design).
// Kept in a header so that the same source is compiled by nvcc for the GPU (routing.cu) and by a C++
// compiler for the CPU emulation harness (routing_emulation.cpp, used by tests/test_cuda_kernel.py),
// which runs every thread of a block as a host thread with real barriers: indexing, shared-memory
// layouts, synchronisation and the global-memory fallbacks are exercised on machines without a GPU.
// Everything here uses only CUDA built-ins the harness can provide (threadIdx, blockIdx, blockDim,
// gridDim, __syncthreads, __shfl_xor_sync, float4/double2) and no ATen.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "routing_math.h"

#ifndef MK_DYNAMIC_SMEM
// The harness defines it to a per-block host buffer.
#define MK_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace mind_kernels {
namespace cuda_routing {

constexpr int kChunk = 4;          // interests per register block
constexpr int kMaxThreads = 256;   // block size cap (launch bounds)
constexpr int kForwardMinBlocks = 4;  // resident forward blocks per SM the register budget must allow

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
//   rows               int rows[L + 1] (packed row -> position, count last), int row_of[L]
struct FwdLayout {
  int64_t b, w, ebar, v, z, scale, flags, rows, total;
};

inline int64_t round4(int64_t n) { return (n + 3) / 4 * 4; }

template <typename acc_t>
inline FwdLayout fwd_layout(int64_t L, int64_t D_in, int64_t D_out, int64_t K, int64_t KP) {
  FwdLayout l;
  l.b = 0;
  l.w = l.b + L * KP;
  l.ebar = l.w + L * KP;
  l.v = l.ebar + D_in * KP;
  l.z = l.v + D_in * KP;
  l.scale = l.z + D_out * KP;
  l.flags = l.scale + KP;
  const int64_t acc_size = static_cast<int64_t>(sizeof(acc_t));
  const int64_t flag_elems = (L + K + acc_size - 1) / acc_size;
  l.rows = l.flags + round4(flag_elems);
  const int64_t row_elems = ((2 * L + 1) * static_cast<int64_t>(sizeof(int)) + acc_size - 1) / acc_size;
  l.total = l.rows + round4(row_elems);
  return l;
}

template <typename scalar_t, typename acc_t>
struct FwdParams {
  const scalar_t* E;      // (B, L, D_in) contiguous, E's dtype: staged into shared memory
  const acc_t* E_acc;     // (B, L, D_in) contiguous acc_t copy, read directly when E is not staged
                          // (with masked rows zeroed in "interests" mode, like the staged copy)
  const acc_t* S;         // (D_out, D_in) contiguous acc_t
  const acc_t* Q;         // (D_in, D_in) S^T S from gram_kernel (bitwise symmetric), or nullptr: the
                          // iterations t < r then use S (see uses_gram)
  const acc_t* init;      // (K, L) per user, user stride init_stride (0 when broadcast)
  int64_t init_stride;
  const bool* mask;       // (B, L) or nullptr
  const bool* imask;      // (B, K) or nullptr
  scalar_t* capsules;     // (B, K, D_out)
  acc_t* coupling;        // (B, K, L)
  acc_t* preact;          // (B, K, D_out)
  acc_t* scratch;         // gridDim.x * ws_elems when the workspace is not in shared memory
  // Jagged batch (ROUTING.md, "Jagged batches"), or nullptr: (B + 1) offsets into E / E_acc, which are
  // then (N, D_in) rows (user u's n_u = offsets[u+1] - offsets[u] rows start at offsets[u]); L is L_max
  // (init's positions), mask is nullptr and coupling is (N, K). Only the n_u real rows are read; in
  // "behaviors" mode the positions n_u .. L - 1 stay in the softmax with zero rows (logits stay b0).
  const int64_t* offsets;
  int64_t B;
  int L, D_in, D_out, K, KP, num_iters;
  bool over_behaviors;
  acc_t logit_scale;      // s in b_ij += s * (c_j . u_i) (ROUTING.md); s = 1 gives the unscaled bits
  bool ws_smem, S_smem, E_smem;
  FwdLayout lay;
  int64_t S_elems;        // staged S size (D_out * (D_in + 1), rounded to 4)
};

// Q[a][b] = sum_o S[o][a] S[o][b] for S (D_out, D_in): one thread per element, grid-stride. Q[a][b]
// and Q[b][a] run the same products in the same order, so Q is exactly symmetric and the forward
// may read it by columns (coalesced) where the math asks for rows.
template <typename acc_t>
__global__ void gram_kernel(const acc_t* __restrict__ S, acc_t* __restrict__ Q, int D_in, int D_out) {
  const int64_t n = static_cast<int64_t>(D_in) * D_in;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int a = static_cast<int>(idx / D_in);
    const int b = static_cast<int>(idx - static_cast<int64_t>(a) * D_in);
    acc_t q = acc_t(0);
    for (int o = 0; o < D_out; ++o) q += S[static_cast<int64_t>(o) * D_in + a] * S[static_cast<int64_t>(o) * D_in + b];
    Q[idx] = q;
  }
}

// The minimum-blocks hint (4 x 256 threads: at most 64 registers) is what keeps ptxas from settling
// on 48 registers plus local-memory spills for float32 (bench/gpu_static.py reports both).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads, kForwardMinBlocks)
    routing_forward_kernel(const FwdParams<scalar_t, acc_t> p) {
  MK_DYNAMIC_SMEM(smem_raw);
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
  int* rows = reinterpret_cast<int*>(ws + p.lay.rows);  // rows[r] = position of routing row r; rows[L] = count
  int* row_of = rows + L + 1;                           // row_of[i] = r, or -1 for a dropped position
  // In "interests" mode masked positions take no part at all (w = 0, logits never read, E ignored by
  // the reference's non-finite contract), so when E is staged the block routes only the valid rows,
  // packed: every stage below then runs over Lc <= L rows (about half of L for typical padding),
  // and padded rows are never even loaded.  In "behaviors" mode padding is in the softmax
  // denominator, so all L rows stay (rows = identity).
  const bool pack = !p.over_behaviors && p.mask != nullptr && p.E_smem && p.offsets == nullptr;
  const bool jagged = p.offsets != nullptr;

  // Zero the whole workspace once: padding columns j in [K, KP) are never written with non-zero
  // values afterwards, so the 4-wide chunks can read them unconditionally.
  for (int64_t idx = tid; idx < p.lay.total; idx += T) ws[idx] = acc_t(0);
  __syncthreads();

  const acc_t inf = std::numeric_limits<acc_t>::infinity();

  for (int64_t u = blockIdx.x; u < p.B; u += gridDim.x) {
    // ---- row map: warp 0 packs the valid positions in order (ballot + popcount)
    if (pack) {
      if (warp == 0) {
        const bool* mu = p.mask + u * L;
        int count = 0;
        for (int base = 0; base < L; base += 32) {  // warp-uniform loop
          const int i = base + lane;
          const bool keep = i < L && mu[i];
          const unsigned ballot = __ballot_sync(0xffffffffu, keep);
          const int r = count + __popc(ballot & ((1u << lane) - 1u));
          if (i < L) row_of[i] = keep ? r : -1;
          if (keep) rows[r] = i;
          count += __popc(ballot);
        }
        if (lane == 0) rows[L] = count;
      }
      __syncthreads();
    }
    // Jagged: the user's n_u real rows start at row offsets[u]; "interests" mode routes them alone,
    // "behaviors" mode keeps all L positions in the softmax, the rows past n_u being zero.
    const int64_t row0 = jagged ? p.offsets[u] : 0;
    const int n_u = jagged ? static_cast<int>(p.offsets[u + 1] - row0) : L;
    const int Lc = jagged ? (p.over_behaviors ? L : n_u) : (pack ? rows[L] : L);  // routing rows of this user
    const int Le = jagged ? n_u : Lc;  // rows holding E: the others are zero and add nothing to any product

    // ---- load this user's inputs (row r of the routing is position rows[r] when packed)
    const int64_t e_off = jagged ? row0 * D_in : u * static_cast<int64_t>(L) * D_in;
    const acc_t* Ep;
    if (p.E_smem) {
      const scalar_t* Eu = p.E + e_off;
      for (int idx = tid; idx < Le * D_in; idx += T) {
        const int r = idx / D_in;
        const int d = idx - r * D_in;
        const int i = pack ? rows[r] : r;
        Es[r * pE + d] = to_acc<acc_t>(Eu[static_cast<int64_t>(i) * D_in + d]);
      }
      Ep = Es;
    } else {
      // acc_t copy from the host; in "interests" mode its masked rows are zeroed there, so NaN/Inf
      // padding cannot leak through 0 * NaN.
      Ep = p.E_acc + e_off;
    }
    const acc_t* b0 = p.init + u * p.init_stride;
    for (int idx = tid; idx < K * Lc; idx += T) {
      const int j = idx / Lc;
      const int r = idx - j * Lc;
      const int i = pack ? rows[r] : r;
      bT[r * KP + j] = b0[j * L + i];
    }
    for (int r = tid; r < Lc; r += T)
      valid[r] = jagged ? (r < n_u ? 1 : 0) : ((pack || !p.mask) ? 1 : (p.mask[u * L + r] ? 1 : 0));
    for (int j = tid; j < K; j += T) active[j] = p.imask ? (p.imask[u * K + j] ? 1 : 0) : 1;
    __syncthreads();

    for (int t = 1; t <= p.num_iters; ++t) {
      // ---- coupling w from logits b
      if (!p.over_behaviors) {
        // softmax over the active interests of each valid position; masked positions get 0
        for (int i = tid; i < Lc; i += T) {
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
            for (int i = lane; i < Lc; i += 32) wT[i * KP + j] = acc_t(0);
            continue;
          }
          acc_t peak = -inf;
          for (int i = lane; i < Lc; i += 32) {
            const acc_t v = bT[i * KP + j];
            peak = v > peak ? v : peak;
          }
          peak = warp_max(peak);
          // As the reference: only an all -inf row is special-cased (avoid -inf - -inf); a NaN / +Inf
          // logit poisons the total (exp(NaN) or exp(inf - inf)), so this interest's w is NaN.
          if (peak == -inf) peak = acc_t(0);
          acc_t total = acc_t(0);
          for (int i = lane; i < Lc; i += 32) total += exp(bT[i * KP + j] - peak);
          total = warp_sum(total);
          const acc_t inv = total == acc_t(0) ? acc_t(0) : acc_t(1) / total;
          for (int i = lane; i < Lc; i += 32)
            wT[i * KP + j] = valid[i] ? exp(bT[i * KP + j] - peak) * inv : acc_t(0);
        }
      }
      __syncthreads();

      // ---- ebar_j[d] = sum_i w_ij E[i][d]   (lanes walk d)
      for (int item = tid; item < n_chunks * D_in; item += T) {
        const int jc = item / D_in;
        const int d = item - jc * D_in;
        store4(ebarT + d * KP + jc * kChunk, chunk_dot(Ep + d, pE, wT, KP, jc * kChunk, Le));
      }
      __syncthreads();

      if (t < p.num_iters && p.Q != nullptr) {
        // ---- y_j[d] = sum_d' Q[d][d'] ebar_j[d'] into vT   (lanes walk d; Q read by columns, coalesced)
        for (int item = tid; item < n_chunks * D_in; item += T) {
          const int jc = item / D_in;
          const int d = item - jc * D_in;
          store4(vT + d * KP + jc * kChunk, chunk_dot(p.Q + d, D_in, ebarT, KP, jc * kChunk, D_in));
        }
        __syncthreads();

        // ---- |z_j|^2 = ebar_j . y_j, then v_j = a(|z_j|^2) y_j in place; one warp per interest
        for (int j = warp; j < K; j += nwarps) {
          acc_t n2 = acc_t(0);
          for (int d = lane; d < D_in; d += 32) n2 += ebarT[d * KP + j] * vT[d * KP + j];
          n2 = warp_sum(n2);
          if (n2 < acc_t(0)) n2 = acc_t(0);  // rounding of a positive semi-definite form; NaN stays NaN
          const acc_t a = squash_scale<acc_t>(n2);
          for (int d = lane; d < D_in; d += 32) vT[d * KP + j] *= a;
        }
        __syncthreads();
      } else {
        // ---- z_j[o] = sum_d S[o][d] ebar_j[d]   (lanes walk o)
        for (int item = tid; item < n_chunks * D_out; item += T) {
          const int jc = item / D_out;
          const int o = item - jc * D_out;
          store4(zT + o * KP + jc * kChunk,
                 chunk_dot(Sp + static_cast<int64_t>(o) * pS, 1, ebarT, KP, jc * kChunk, D_in));
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
        }
      }

      if (t < p.num_iters) {
        // ---- b_ij += s * (E[i] . v_j)   (all positions; lanes walk i). s = 1: 1 * x == x and a
        // contracted fma(1, x, b) rounds once like b + x, so the unscaled bits are kept.
        const acc_t ls = p.logit_scale;
        for (int item = tid; item < n_chunks * Le; item += T) {  // rows past Le are zero: db = 0
          const int jc = item / Le;
          const int i = item - jc * Le;
          const Vec4<acc_t> db = chunk_dot(Ep + static_cast<int64_t>(i) * pE, 1, vT, KP, jc * kChunk, D_in);
          acc_t* bp = bT + i * KP + jc * kChunk;
          Vec4<acc_t> b = load4(bp);
#pragma unroll
          for (int q = 0; q < kChunk; ++q) b.v[q] += ls * db.v[q];
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
    if (jagged) {
      for (int idx = tid; idx < n_u * K; idx += T) {  // (N, K) rows of the user, coalesced
        const int i = idx / K;
        const int j = idx - i * K;
        p.coupling[row0 * K + idx] = wT[i * KP + j];
      }
    } else {
      const int64_t kl_off = u * static_cast<int64_t>(K) * L;
      for (int idx = tid; idx < K * L; idx += T) {
        const int j = idx / L;
        const int i = idx - j * L;
        const int r = pack ? row_of[i] : i;
        p.coupling[kl_off + idx] = r >= 0 ? wT[r * KP + j] : acc_t(0);
      }
    }
    __syncthreads();  // the next user overwrites the workspace and E
  }
}

// ------------------------------------------------------------------ backward kernels

// Workspace of the backward kernel, acc_t elements:
//   zT [D_out][KP], dzT [D_out][KP] (holds G, then dz), wT [L][KP], gT [D_in][KP],
//   ebarT [D_in][KP], coef [2][KP] (a(n2), 2 a'(n2) (z.G)), rows: L bytes (row i has weight)
struct BwdLayout {
  int64_t z, dz, w, g, ebar, coef, rows, total;
};

template <typename acc_t>
inline BwdLayout bwd_layout(int64_t L, int64_t D_in, int64_t D_out, int64_t KP) {
  BwdLayout l;
  l.z = 0;
  l.dz = l.z + D_out * KP;
  l.w = l.dz + D_out * KP;
  l.g = l.w + L * KP;
  l.ebar = l.g + D_in * KP;
  l.coef = l.ebar + D_in * KP;
  l.rows = l.coef + 2 * KP;
  const int64_t row_elems = (L + static_cast<int64_t>(sizeof(acc_t)) - 1) / static_cast<int64_t>(sizeof(acc_t));
  l.total = l.rows + round4(row_elems);
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
  const int64_t* offsets;  // jagged batch: (B + 1), E and dE (N, D_in), w (N, K), L >= every n_u; or nullptr
  int64_t B;
  int L, D_in, D_out, K, KP;
  bool ws_smem, dS_smem, S_smem, E_smem;
  BwdLayout lay;
  int64_t dS_elems, S_elems;
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads) routing_backward_kernel(const BwdParams<scalar_t, acc_t> p) {
  MK_DYNAMIC_SMEM(smem_raw);
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
  // E rows with weight, staged (as acc_t, pitch D_in + 1) for the ebar pass when they fit.
  acc_t* Es = p.E_smem ? next : nullptr;
  const int pE = D_in + 1;

  acc_t* zT = ws + p.lay.z;
  acc_t* dzT = ws + p.lay.dz;
  acc_t* wT = ws + p.lay.w;
  acc_t* gT = ws + p.lay.g;
  acc_t* ebarT = ws + p.lay.ebar;
  acc_t* coefA = ws + p.lay.coef;
  acc_t* coefB = coefA + KP;
  unsigned char* has_weight = reinterpret_cast<unsigned char*>(ws + p.lay.rows);

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
    // Jagged: the user's n_u rows start at row offsets[u] of E, dE and w; only they are touched
    // (Lu rows below), the workspace rows past them are never read.
    const bool jagged = p.offsets != nullptr;
    const int64_t row0 = jagged ? p.offsets[u] : 0;
    const int Lu = jagged ? static_cast<int>(p.offsets[u + 1] - row0) : L;
    if (jagged) {
      for (int idx = tid; idx < Lu * K; idx += T) {
        const int i = idx / K;
        const int j = idx - i * K;
        wT[i * KP + j] = p.w[row0 * K + idx];
      }
    } else {
      const int64_t kl_off = u * static_cast<int64_t>(K) * L;
      for (int idx = tid; idx < K * L; idx += T) {
        const int j = idx / L;
        const int i = idx - j * L;
        wT[i * KP + j] = p.w[kl_off + idx];
      }
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
    // Rows with no weight (masked rows; every row of a user without active interests) add nothing
    // to ebar: they are neither loaded nor multiplied, which also keeps NaN/Inf padding out of dS in
    // "interests" mode (0 * NaN).  In "behaviors" mode a non-finite padded row already made this
    // user's w non-finite, so it is not skipped and propagates as the reference's does.
    for (int i = tid; i < Lu; i += T) {
      bool any = false;
      for (int j = 0; j < K; ++j) any = any || (wT[i * KP + j] != acc_t(0));
      has_weight[i] = any ? 1 : 0;
    }
    __syncthreads();

    // ---- dz_j = a G_j + 2 a' (z_j . G_j) z_j  (in place over G)
    for (int idx = tid; idx < K * D_out; idx += T) {
      const int o = idx / K;
      const int j = idx - o * K;
      dzT[o * KP + j] = coefA[j] * dzT[o * KP + j] + coefB[j] * zT[o * KP + j];
    }
    // ---- stage this user's E rows that carry weight (coalesced, many loads in flight)
    const int64_t e_off = jagged ? row0 * D_in : u * static_cast<int64_t>(L) * D_in;
    const scalar_t* Eu = p.E + e_off;
    if (p.E_smem) {
      for (int idx = tid; idx < Lu * D_in; idx += T) {
        const int i = idx / D_in;
        const int d = idx - i * D_in;
        Es[i * pE + d] = has_weight[i] ? to_acc<acc_t>(Eu[idx]) : acc_t(0);
      }
    }
    __syncthreads();

    // ---- g_j = S^T dz_j and ebar_j = sum_i w_ij e_i   (lanes walk d; E from shared memory, or
    //      straight from global memory, coalesced along d, when it does not fit)
    for (int item = tid; item < n_chunks * D_in; item += T) {
      const int jc = item / D_in;
      const int d = item - jc * D_in;
      const int j0 = jc * kChunk;
      store4(gT + d * KP + j0, chunk_dot(Sp + d, pS, dzT, KP, j0, D_out));
      if (p.E_smem) {
        store4(ebarT + d * KP + j0, chunk_dot(Es + d, pE, wT, KP, j0, Lu));
        continue;
      }
      Vec4<acc_t> eb = {{acc_t(0), acc_t(0), acc_t(0), acc_t(0)}};
#pragma unroll 4
      for (int i = 0; i < Lu; ++i) {
        if (!has_weight[i]) continue;
        const Vec4<acc_t> wv = load4(wT + i * KP + j0);
        const acc_t e = to_acc<acc_t>(Eu[static_cast<int64_t>(i) * D_in + d]);
#pragma unroll
        for (int q = 0; q < kChunk; ++q) eb.v[q] += wv.v[q] * e;
      }
      store4(ebarT + d * KP + j0, eb);
    }
    __syncthreads();

    // ---- dE_i[d] = sum_j w_ij g_j[d]   (coalesced writes along d; masked rows have w = 0)
    scalar_t* dEu = p.dE + e_off;
    for (int idx = tid; idx < Lu * D_in; idx += T) {
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

// out[y][idx] = sum of partial[r][idx] over the rows r of slice y = blockIdx.y (rows
// [y * rows_per_slice, min(rows, (y + 1) * rows_per_slice))), added in row order: deterministic.
// Run twice (block partials -> slice sums -> dS) so that many blocks share the reading and each
// thread keeps 8 independent loads in flight instead of one dependent load per row.
constexpr int kReduceUnroll = 8;

template <typename acc_t, typename out_t>
__global__ void reduce_partials_kernel(const acc_t* __restrict__ partial, int64_t rows, int64_t rows_per_slice,
                                       int64_t n, out_t* __restrict__ out) {
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_slice;
  const int64_t r1 = std::min(rows, r0 + rows_per_slice);
  out_t* out_y = out + static_cast<int64_t>(blockIdx.y) * n;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t s = acc_t(0);
    int64_t r = r0;
    for (; r + kReduceUnroll <= r1; r += kReduceUnroll) {
      acc_t v[kReduceUnroll];
#pragma unroll
      for (int q = 0; q < kReduceUnroll; ++q) v[q] = partial[(r + q) * n + idx];
#pragma unroll
      for (int q = 0; q < kReduceUnroll; ++q) s += v[q];
    }
    for (; r < r1; ++r) s += partial[r * n + idx];
    out_y[idx] = static_cast<out_t>(s);
  }
}

// Rows of block partials summed per slice in the first reduction pass.
constexpr int64_t kRowsPerSlice = 32;

// ------------------------------------------------------------------ host-side planning
// Shared by the CUDA launcher (routing.cu) and the emulation harness, so both run the same plans.

inline int64_t threads_for(int64_t work_items) {
  // One work item per thread where possible; at least 2 warps, at most kMaxThreads; a multiple of 32
  // (the per-interest warp loops use full-warp shuffles).
  const int64_t t = (work_items + 31) / 32 * 32;
  return std::max<int64_t>(64, std::min<int64_t>(kMaxThreads, t));
}

inline int64_t padded_interests(int64_t K) { return (K + kChunk - 1) / kChunk * kChunk; }

// Block size of the forward kernel: enough threads for the widest per-chunk stage and a warp per
// interest (up to 8) in the per-interest reductions.
inline int forward_threads(int64_t L, int64_t D_in, int64_t D_out, int64_t K) {
  const int64_t n_chunks = padded_interests(K) / kChunk;
  return static_cast<int>(
      threads_for(std::max({n_chunks * D_in, n_chunks * D_out, n_chunks * L, std::min<int64_t>(K, 8) * 32})));
}

constexpr int kBackwardThreads = kMaxThreads;

// Sizes and layout; pointers are the caller's.
template <typename scalar_t, typename acc_t>
inline void init_forward(FwdParams<scalar_t, acc_t>& p, int64_t B, int64_t L, int64_t D_in, int64_t D_out, int64_t K,
                         int64_t num_iters, bool over_behaviors, double logit_scale = 1.0) {
  const int64_t KP = padded_interests(K);
  p.B = B;
  p.L = static_cast<int>(L);
  p.D_in = static_cast<int>(D_in);
  p.D_out = static_cast<int>(D_out);
  p.K = static_cast<int>(K);
  p.KP = static_cast<int>(KP);
  p.num_iters = static_cast<int>(num_iters);
  p.over_behaviors = over_behaviors;
  p.logit_scale = static_cast<acc_t>(logit_scale);
  p.lay = fwd_layout<acc_t>(L, D_in, D_out, K, KP);
  p.S_elems = round4(D_out * (D_in + 1));
}

// Chooses what the forward kernel stages in shared memory: the first option (in priority order)
// whose pieces fit in max_smem bytes.  Sets p.ws_smem / S_smem / E_smem; returns the dynamic bytes.
template <typename scalar_t, typename acc_t>
inline size_t plan_forward_smem(FwdParams<scalar_t, acc_t>& p, size_t max_smem) {
  const int64_t E_elems = round4(static_cast<int64_t>(p.L) * (p.D_in + 1));
  const bool options[8][3] = {{true, true, true},   {true, true, false},  {true, false, true},
                              {true, false, false}, {false, true, true},  {false, true, false},
                              {false, false, true}, {false, false, false}};
  size_t bytes = 0;
  for (const auto& o : options) {
    const int64_t elems = (o[0] ? p.lay.total : 0) + (o[1] ? p.S_elems : 0) + (o[2] ? E_elems : 0);
    bytes = static_cast<size_t>(elems) * sizeof(acc_t);
    p.ws_smem = o[0];
    p.S_smem = o[1];
    p.E_smem = o[2];
    if (bytes <= max_smem) break;
  }
  return bytes;
}

template <typename scalar_t, typename acc_t>
inline void init_backward(BwdParams<scalar_t, acc_t>& p, int64_t B, int64_t L, int64_t D_in, int64_t D_out, int64_t K) {
  const int64_t KP = padded_interests(K);
  p.B = B;
  p.L = static_cast<int>(L);
  p.D_in = static_cast<int>(D_in);
  p.D_out = static_cast<int>(D_out);
  p.K = static_cast<int>(K);
  p.KP = static_cast<int>(KP);
  p.lay = bwd_layout<acc_t>(L, D_in, D_out, KP);
  p.dS_elems = round4(D_out * D_in);
  p.S_elems = round4(D_out * (D_in + 1));
}

// Same for the backward kernel: workspace, dS accumulator, S, E rows.
template <typename scalar_t, typename acc_t>
inline size_t plan_backward_smem(BwdParams<scalar_t, acc_t>& p, size_t max_smem) {
  const int64_t E_elems = round4(static_cast<int64_t>(p.L) * (p.D_in + 1));
  const bool options[9][4] = {{true, true, true, true},    {true, true, true, false},   {true, false, true, false},
                              {true, true, false, false},  {true, false, false, false}, {false, true, true, false},
                              {false, false, true, false}, {false, true, false, false}, {false, false, false, false}};
  size_t bytes = 0;
  for (const auto& o : options) {
    const int64_t elems =
        (o[0] ? p.lay.total : 0) + (o[1] ? p.dS_elems : 0) + (o[2] ? p.S_elems : 0) + (o[3] ? E_elems : 0);
    bytes = static_cast<size_t>(elems) * sizeof(acc_t);
    p.ws_smem = o[0];
    p.dS_smem = o[1];
    p.S_smem = o[2];
    p.E_smem = o[3];
    if (bytes <= max_smem) break;
  }
  return bytes;
}

}  // namespace cuda_routing
}  // namespace mind_kernels
