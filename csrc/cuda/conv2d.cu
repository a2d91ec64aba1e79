// 2-D convolution on CUDA: hand-written implicit GEMM (forward with a fused bias + activation
// epilogue, backward data, backward weight), a dedicated depthwise forward kernel, and the fused
// conv + bias + ReLU + max-pool forward (pooled output and argmax only) with its backward.
// Schemas and the contract: csrc/cpu/conv2d.cpp and fastattn/ops/conv2d.py.
//
// One GEMM kernel serves all three passes; a "problem" struct says how to gather the operand
// tiles from the tensors and where the result goes:
//   forward       M = N*P*Q pixels,  N = Kg channels, reduction (c, r, s)
//   grad input    M = N*H*W pixels,  N = Cg channels, reduction (k, r, s) over the taps that
//                 reach the pixel (stride divisibility checked per element)
//   grad weight   M = Kg channels,   N = Cg*R*S taps,  reduction over N*P*Q pixels, split into
//                 chunks (grid z) with one partial per chunk, summed in order by a second kernel
//                 (deterministic, no atomics)
// A block computes a 64 x 64 tile with 4 warps, staging 64 x 32 / 32 x 64 operand tiles through
// shared memory; fp16/bf16 forward tiles use tensor cores (WMMA 16x16x16, fp32 accumulate), fp32
// and the backward (whose gradient is fp32) use FMA tiles of 4 x 8 per thread. The accumulator
// tile goes through shared memory so the epilogue writes whole rows of pixels (coalesced NCHW).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <tuple>

#include "activation.cuh"

namespace fastattn {
namespace conv2d_cuda {

using namespace cuda_act;  // activation codes, activate, activate_grad (activation.cuh)

constexpr int BM = 64, BN = 64, BK = 32, THREADS = 128;
constexpr int LDA = BK + 8, LDB = BN + 8, LDC = BN + 4;  // padded smem pitches (WMMA needs % 8 == 0)

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

struct Geom {
  int64_t N, C, H, W, K, R, S, P, Q, G, Cg, Kg;
  int sh, sw, pt, pl, dh, dw;
};

// ---------------------------------------------------------------------------------------------
// Problems: operand gathers and result stores, all on fp32 values.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
struct FwdProblem {
  Geom g;
  const scalar_t* x; int64_t sxn, sxc, sxh, sxw;  // any strides (NCHW or channels_last)
  const scalar_t* w;                              // [K][Cg*R*S]
  const scalar_t* bias;                           // [K] or null
  scalar_t* out; scalar_t* pre;                   // [N][K][P][Q]; pre may be null
  int act;
  __device__ int64_t M() const { return g.N * g.P * g.Q; }
  __device__ int64_t Ncols() const { return g.Kg; }
  __device__ int64_t Kdim() const { return g.Cg * g.R * g.S; }
  __device__ float a(int grp, int64_t m, int64_t kk) const {
    const int64_t PQ = g.P * g.Q, n = m / PQ, pq = m % PQ, RS = g.R * g.S;
    const int64_t c = kk / RS, r = (kk % RS) / g.S, s = kk % g.S;
    const int64_t ih = (pq / g.Q) * g.sh - g.pt + r * g.dh, iw = (pq % g.Q) * g.sw - g.pl + s * g.dw;
    if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) return 0.f;
    return to_f(x[n * sxn + (grp * g.Cg + c) * sxc + ih * sxh + iw * sxw]);
  }
  __device__ float b(int grp, int64_t kk, int64_t col) const {
    return to_f(w[(grp * g.Kg + col) * Kdim() + kk]);
  }
  __device__ void store(int grp, int64_t m, int64_t col, float v) const {
    const int64_t PQ = g.P * g.Q, n = m / PQ, pq = m % PQ, k = grp * g.Kg + col;
    if (bias) v += to_f(bias[k]);
    const int64_t o = (n * g.K + k) * PQ + pq;
    if (pre) pre[o] = from_f<scalar_t>(v);
    out[o] = from_f<scalar_t>(activate(v, act));
  }
};

template <typename scalar_t>
struct BwdDataProblem {
  Geom g;
  const float* gz;     // [N][K][P][Q], gradient at the pre-activation
  const scalar_t* w;   // [K][Cg][R][S]
  scalar_t* dx;        // [N][C][H][W]
  __device__ int64_t M() const { return g.N * g.H * g.W; }
  __device__ int64_t Ncols() const { return g.Cg; }
  __device__ int64_t Kdim() const { return g.Kg * g.R * g.S; }
  __device__ float a(int grp, int64_t m, int64_t kk) const {
    const int64_t HW = g.H * g.W, n = m / HW, h = (m % HW) / g.W, x = m % g.W, RS = g.R * g.S;
    const int64_t k = kk / RS, r = (kk % RS) / g.S, s = kk % g.S;
    const int64_t ph = h + g.pt - r * g.dh, pw = x + g.pl - s * g.dw;  // = (p*sh, q*sw) if this tap reaches
    if (ph < 0 || pw < 0 || ph % g.sh != 0 || pw % g.sw != 0) return 0.f;
    const int64_t p = ph / g.sh, q = pw / g.sw;
    if (p >= g.P || q >= g.Q) return 0.f;
    return gz[((n * g.K + grp * g.Kg + k) * g.P + p) * g.Q + q];
  }
  __device__ float b(int grp, int64_t kk, int64_t col) const {
    const int64_t RS = g.R * g.S, k = kk / RS, rs = kk % RS;
    return to_f(w[((grp * g.Kg + k) * g.Cg + col) * RS + rs]);
  }
  __device__ void store(int grp, int64_t m, int64_t col, float v) const {
    const int64_t HW = g.H * g.W, n = m / HW;
    dx[(n * g.C + grp * g.Cg + col) * HW + m % HW] = from_f<scalar_t>(v);
  }
};

template <typename scalar_t>
struct BwdWeightProblem {
  Geom g;
  const float* gz;                                 // [N][K][P][Q]
  const scalar_t* x; int64_t sxn, sxc, sxh, sxw;
  float* partial;                                  // [splits][K][Cg*R*S]
  int splits;
  __device__ int64_t M() const { return g.Kg; }
  __device__ int64_t Ncols() const { return g.Cg * g.R * g.S; }
  __device__ int64_t Kdim() const { return g.N * g.P * g.Q; }
  __device__ float a(int grp, int64_t m, int64_t kk) const {
    const int64_t PQ = g.P * g.Q, n = kk / PQ;
    return gz[(n * g.K + grp * g.Kg + m) * PQ + kk % PQ];
  }
  __device__ float b(int grp, int64_t kk, int64_t col) const {
    const int64_t PQ = g.P * g.Q, n = kk / PQ, pq = kk % PQ, RS = g.R * g.S;
    const int64_t c = col / RS, r = (col % RS) / g.S, s = col % g.S;
    const int64_t ih = (pq / g.Q) * g.sh - g.pt + r * g.dh, iw = (pq % g.Q) * g.sw - g.pl + s * g.dw;
    if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) return 0.f;
    return to_f(x[n * sxn + (grp * g.Cg + c) * sxc + ih * sxh + iw * sxw]);
  }
  __device__ void store(int grp_split, int64_t m, int64_t col, float v) const {
    const int grp = grp_split % g.G, split = grp_split / g.G;
    partial[((int64_t)split * g.K + grp * g.Kg + m) * Ncols() + col] = v;
  }
};

// ---------------------------------------------------------------------------------------------
// The implicit-GEMM kernel. blockIdx.z = group (+ G * split for a split reduction).
// ---------------------------------------------------------------------------------------------
template <typename Problem, typename mma_t, bool kTensorCores>
__global__ void __launch_bounds__(THREADS) igemm_kernel(Problem prob, int splits) {
  __shared__ __align__(32) mma_t As[BM][LDA];   // A tile: pixels (or channels) x reduction
  __shared__ __align__(32) mma_t Bs[BK][LDB];   // B tile: reduction x columns
  __shared__ __align__(32) float Cs[BM][LDC];   // accumulators on their way to the epilogue
  const int tid = threadIdx.x;
  const int z = blockIdx.z;
  const int grp = z % prob.g.G, split = z / prob.g.G;
  const int64_t m0 = (int64_t)blockIdx.x * BM, n0 = (int64_t)blockIdx.y * BN;
  const int64_t M = prob.M(), NC = prob.Ncols(), KD = prob.Kdim();
  // This block's share of the reduction (all of it unless split).
  const int64_t chunk = ((KD + splits - 1) / splits + BK - 1) / BK * BK;
  const int64_t k_begin = split * chunk, k_end = min(KD, k_begin + chunk);

  const int warp = tid / 32;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> fc[2][2];
  float acc[4][8];
  if constexpr (kTensorCores) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(fc[i][j], 0.f);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
  }
  const int tm = (tid % 16) * 4, tn = (tid / 16) * 8;  // FMA tile of this thread

  for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
    // Gather: consecutive threads take consecutive rows of A (pixels: coalesced in NCHW) and
    // consecutive reduction indices of B.
    for (int e = tid; e < BM * BK; e += THREADS) {
      const int i = e % BM, kk = e / BM;
      const int64_t m = m0 + i, k = k0 + kk;
      As[i][kk] = from_f<mma_t>(m < M && k < k_end ? prob.a(grp, m, k) : 0.f);
    }
    for (int e = tid; e < BK * BN; e += THREADS) {
      const int kk = e % BK, j = e / BK;
      const int64_t k = k0 + kk, n = n0 + j;
      Bs[kk][j] = from_f<mma_t>(k < k_end && n < NC ? prob.b(grp, k, n) : 0.f);
    }
    __syncthreads();
    if constexpr (kTensorCores) {
      const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, mma_t, nvcuda::wmma::row_major> fa[2];
        nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, mma_t, nvcuda::wmma::row_major> fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) nvcuda::wmma::load_matrix_sync(fa[i], &As[wm + 16 * i][kk], LDA);
#pragma unroll
        for (int j = 0; j < 2; ++j) nvcuda::wmma::load_matrix_sync(fb[j], &Bs[kk][wn + 16 * j], LDB);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) nvcuda::wmma::mma_sync(fc[i][j], fa[i], fb[j], fc[i][j]);
      }
    } else {
#pragma unroll 8
      for (int kk = 0; kk < BK; ++kk) {
        float av[4], bv[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = to_f(As[tm + i][kk]);
#pragma unroll
        for (int j = 0; j < 8; ++j) bv[j] = to_f(Bs[kk][tn + j]);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
    }
    __syncthreads();
  }

  // Epilogue through shared memory.
  if constexpr (kTensorCores) {
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(&Cs[wm + 16 * i][wn + 16 * j], fc[i][j], LDC, nvcuda::wmma::mem_row_major);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) Cs[tm + i][tn + j] = acc[i][j];
  }
  __syncthreads();
  for (int e = tid; e < BM * BN; e += THREADS) {
    const int i = e % BM, j = e / BM;
    const int64_t m = m0 + i, n = n0 + j;
    if (m < M && n < NC) prob.store(z, m, n, Cs[i][j]);
  }
}

// Depthwise forward (one input channel per group, Kg outputs each): one thread per output pixel,
// the group's R*S weights in shared memory. Grid x = output plane n*K + k (N*K may exceed
// gridDim.y's 65535), grid y = blocks of pixels.
template <typename scalar_t>
__global__ void depthwise_fwd_kernel(Geom g, const scalar_t* __restrict__ x, int64_t sxn, int64_t sxc, int64_t sxh,
                                     int64_t sxw, const scalar_t* __restrict__ w, const scalar_t* __restrict__ bias,
                                     scalar_t* __restrict__ out, scalar_t* __restrict__ pre, int act) {
  extern __shared__ float wsh[];
  const int64_t plane = blockIdx.x;  // n * K + k
  const int64_t n = plane / g.K, k = plane % g.K, c = k / g.Kg;
  const int RS = g.R * g.S;
  for (int i = threadIdx.x; i < RS; i += blockDim.x) wsh[i] = to_f(w[k * RS + i]);
  __syncthreads();
  const int64_t pq = (int64_t)blockIdx.y * blockDim.x + threadIdx.x;
  if (pq >= g.P * g.Q) return;
  const int64_t p = pq / g.Q, q = pq % g.Q;
  const scalar_t* xc = x + n * sxn + c * sxc;
  float acc = bias ? to_f(bias[k]) : 0.f;
  for (int r = 0; r < g.R; ++r) {
    const int64_t ih = p * g.sh - g.pt + r * g.dh;
    if (ih < 0 || ih >= g.H) continue;
    for (int s = 0; s < g.S; ++s) {
      const int64_t iw = q * g.sw - g.pl + s * g.dw;
      if (iw >= 0 && iw < g.W) acc = fmaf(wsh[r * g.S + s], to_f(xc[ih * sxh + iw * sxw]), acc);
    }
  }
  const int64_t o = plane * g.P * g.Q + pq;
  if (pre) pre[o] = from_f<scalar_t>(acc);
  out[o] = from_f<scalar_t>(activate(acc, act));
}

// gz = grad_out * act'(saved), in fp32.
template <typename scalar_t>
__global__ void act_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ saved,
                                    float* __restrict__ gz, int64_t n, int act) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float gv = to_f(g[i]);
    gz[i] = act == kNone ? gv : gv * activate_grad(to_f(saved[i]), act);
  }
}

// grad_bias[k] = sum over (n, p, q) of gz: one block per channel, a fixed-order tree reduction.
template <typename scalar_t>
__global__ void bias_grad_kernel(const float* __restrict__ gz, scalar_t* __restrict__ db, int64_t N, int64_t K,
                                 int64_t PQ) {
  __shared__ float part[256];
  const int64_t k = blockIdx.x;
  float s = 0.f;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = threadIdx.x; i < PQ; i += blockDim.x) s += gz[(n * K + k) * PQ + i];
  part[threadIdx.x] = s;
  __syncthreads();
  for (int step = blockDim.x / 2; step > 0; step /= 2) {
    if (threadIdx.x < step) part[threadIdx.x] += part[threadIdx.x + step];
    __syncthreads();
  }
  if (threadIdx.x == 0) db[k] = from_f<scalar_t>(part[0]);
}

// dw[i] = sum over splits of partial[split][i], in split order.
template <typename scalar_t>
__global__ void sum_splits_kernel(const float* __restrict__ partial, scalar_t* __restrict__ dw, int64_t size,
                                  int splits) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= size) return;
  float s = 0.f;
  for (int j = 0; j < splits; ++j) s += partial[j * size + i];
  dw[i] = from_f<scalar_t>(s);
}

// Fused conv + bias + ReLU + max-pool forward (the CPU op's contract: no pool padding, floor
// mode, the first maximum in scan order wins, NaN propagates, indices flat h*Q + w into the conv
// plane). One thread per pooled pixel and KT output channels of one group: it computes the
// pool window's conv values one at a time (the pre-pool map is never written), reading each
// input value once for its KT channels; the weights of the block's channels are the same for
// every thread, so their loads are warp-wide broadcasts. Overlapping windows recompute shared
// conv values (pool stride < kernel is rare). Sized for the layers this op is for: a CNN's first
// blocks, few input channels.
constexpr int POOL_KT = 4, POOL_THREADS = 128;

template <typename scalar_t>
__global__ void __launch_bounds__(POOL_THREADS)
conv_relu_maxpool_fwd_kernel(Geom g, const scalar_t* __restrict__ x, int64_t sxn, int64_t sxc, int64_t sxh,
                             int64_t sxw, const scalar_t* __restrict__ w, const scalar_t* __restrict__ bias, int pkh,
                             int pkw, int psh, int psw, int64_t PH, int64_t PW, scalar_t* __restrict__ out,
                             int64_t* __restrict__ indices) {
  const int64_t kblocks = (g.Kg + POOL_KT - 1) / POOL_KT;
  const int64_t n = blockIdx.y / (g.G * kblocks), grp = (blockIdx.y / kblocks) % g.G;
  const int64_t k0 = grp * g.Kg + (blockIdx.y % kblocks) * POOL_KT;  // first output channel
  const int64_t k_end = (grp + 1) * g.Kg;
  const int kn = k_end - k0 < POOL_KT ? (int)(k_end - k0) : POOL_KT;
  const int64_t uv = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (uv >= PH * PW) return;
  const int64_t u = uv / PW, v = uv % PW;
  const int64_t CRS = g.Cg * g.R * g.S;
  const scalar_t* xg = x + n * sxn + grp * g.Cg * sxc;
  float bv[POOL_KT], best[POOL_KT];
  int64_t arg[POOL_KT];
#pragma unroll
  for (int a = 0; a < POOL_KT; ++a) {
    bv[a] = (bias && a < kn) ? to_f(bias[k0 + a]) : 0.f;
    best[a] = -INFINITY;
    arg[a] = (u * psh) * g.Q + v * psw;
  }
  for (int i = 0; i < pkh; ++i)
    for (int j = 0; j < pkw; ++j) {
      const int64_t p = u * psh + i, q = v * psw + j;  // conv output pixel
      float acc[POOL_KT];
#pragma unroll
      for (int a = 0; a < POOL_KT; ++a) acc[a] = 0.f;
      for (int64_t c = 0; c < g.Cg; ++c)
        for (int r = 0; r < g.R; ++r) {
          const int64_t ih = p * g.sh - g.pt + r * g.dh;
          if (ih < 0 || ih >= g.H) continue;
          for (int s = 0; s < g.S; ++s) {
            const int64_t iw = q * g.sw - g.pl + s * g.dw;
            if (iw < 0 || iw >= g.W) continue;
            const float xv = to_f(xg[c * sxc + ih * sxh + iw * sxw]);
            const int64_t tap = (c * g.R + r) * g.S + s;
#pragma unroll
            for (int a = 0; a < POOL_KT; ++a)
              if (a < kn) acc[a] = fmaf(to_f(w[(k0 + a) * CRS + tap]), xv, acc[a]);
          }
        }
#pragma unroll
      for (int a = 0; a < POOL_KT; ++a) {
        const float z = acc[a] + bv[a];
        const float val = z > 0.f ? z : 0.f;  // relu (as the CPU op: NaN -> 0)
        if (val > best[a] || isnan(val)) {
          best[a] = val;
          arg[a] = p * g.Q + q;
        }
      }
    }
#pragma unroll
  for (int a = 0; a < POOL_KT; ++a) {
    if (a >= kn) break;
    const int64_t o = ((n * g.K + k0 + a) * PH + u) * PW + v;
    out[o] = from_f<scalar_t>(best[a]);
    if (indices) indices[o] = arg[a];
  }
}

// Backward of the pool and relu: each pooled pixel whose output is > 0 (relu passed it) adds its
// gradient to gz at its argmax (gz zeroed first). The op's schema has no pool kernel/stride, so
// this scatters like the CPU op rather than gathering. Windows that do not overlap (pool stride >=
// kernel, the usual 2x2/2) never send two values to one pixel: exact and deterministic; with
// overlapping windows a pixel that is the max of several windows gets their sum in any order.
template <typename scalar_t>
__global__ void maxpool_relu_bwd_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                                        const int64_t* __restrict__ indices, float* __restrict__ gz, int64_t total,
                                        int64_t PHW, int64_t PQ) {
  for (int64_t o = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; o < total; o += (int64_t)gridDim.x * blockDim.x)
    if (to_f(out[o]) > 0.f && indices[o] >= 0 && indices[o] < PQ) atomicAdd(gz + (o / PHW) * PQ + indices[o], to_f(grad_out[o]));
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------
Geom make_geom(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
               at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4, "conv2d (cuda): input and weight must be 4-D");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 4 && dilation.size() == 2,
              "conv2d (cuda): stride and dilation take 2 values, padding 4 (top, bottom, left, right)");
  TORCH_CHECK(groups >= 1 && x.size(1) == w.size(1) * groups && w.size(0) % groups == 0,
              "conv2d (cuda): channels do not match: input ", x.size(1), ", weight ", w.sizes(), ", groups ", groups);
  Geom g;
  g.N = x.size(0); g.C = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.K = w.size(0); g.R = w.size(2); g.S = w.size(3); g.G = groups; g.Cg = g.C / groups; g.Kg = g.K / groups;
  g.sh = (int)stride[0]; g.sw = (int)stride[1]; g.dh = (int)dilation[0]; g.dw = (int)dilation[1];
  g.pt = (int)padding[0]; g.pl = (int)padding[2];
  TORCH_CHECK(g.sh > 0 && g.sw > 0 && g.dh > 0 && g.dw > 0 && padding[0] >= 0 && padding[1] >= 0 &&
                  padding[2] >= 0 && padding[3] >= 0, "conv2d (cuda): bad stride/padding/dilation");
  g.P = (g.H + padding[0] + padding[1] - g.dh * (g.R - 1) - 1) / g.sh + 1;
  g.Q = (g.W + padding[2] + padding[3] - g.dw * (g.S - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.P > 0 && g.Q > 0, "conv2d (cuda): the (dilated) kernel is larger than the padded input");
  TORCH_CHECK(g.G <= 65535, "conv2d (cuda): at most 65535 groups (grid z), got ", g.G);
  return g;
}

template <typename Problem, typename mma_t, bool kTC>
void launch_igemm(const Problem& prob, int64_t M, int64_t NC, int z, int splits, cudaStream_t stream) {
  dim3 grid((unsigned)((M + BM - 1) / BM), (unsigned)((NC + BN - 1) / BN), (unsigned)z);
  igemm_kernel<Problem, mma_t, kTC><<<grid, THREADS, 0, stream>>>(prob, splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t> struct MmaType { using type = float; static constexpr bool tc = false; };
template <> struct MmaType<__half> { using type = __half; static constexpr bool tc = true; };
template <> struct MmaType<__nv_bfloat16> { using type = __nv_bfloat16; static constexpr bool tc = true; };

template <typename F>
void dispatch(at::ScalarType st, const char* name, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, name, " (cuda): dtype must be float32, float16 or bfloat16, got ", st);
  }
}

template <typename T> T* ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

std::tuple<at::Tensor, at::Tensor> conv2d_fwd(const at::Tensor& input, const at::Tensor& weight,
                                              const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                              int64_t activation, bool save_preact) {
  TORCH_CHECK(input.is_cuda() && weight.is_cuda(), "conv2d (cuda): input and weight must be CUDA tensors");
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), "conv2d (cuda): input and weight dtypes differ");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) TORCH_CHECK(bias->is_cuda() && bias->scalar_type() == input.scalar_type() && bias->numel() == weight.size(0),
                            "conv2d (cuda): bias must be a (K,) CUDA tensor of input's dtype");
  c10::cuda::CUDAGuard guard(input.device());
  Geom g = make_geom(input, weight, stride, padding, dilation, groups);
  at::Tensor w = weight.contiguous();
  at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({g.N, g.K, g.P, g.Q}, input.options());
  at::Tensor pre = at::empty({save_preact ? g.N * g.K * g.P * g.Q : 0}, input.options());
  if (out.numel() == 0) return {out, save_preact ? pre.view_as(out) : pre};
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(input.scalar_type(), "conv2d_fwd", [&](auto tag) {
    using T = decltype(tag);
    const T* bp = has_bias ? ptr<T>(b) : nullptr;
    T* pp = save_preact ? ptr<T>(pre) : nullptr;
    if (g.Cg == 1) {
      TORCH_CHECK((g.P * g.Q + 255) / 256 <= 65535, "conv2d (cuda): output plane too large (", g.P, "x", g.Q, ")");
      dim3 grid((unsigned)(g.N * g.K), (unsigned)((g.P * g.Q + 255) / 256));
      depthwise_fwd_kernel<T><<<grid, 256, g.R * g.S * sizeof(float), stream>>>(
          g, ptr<T>(input), input.stride(0), input.stride(1), input.stride(2), input.stride(3), ptr<T>(w), bp,
          ptr<T>(out), pp, (int)activation);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    FwdProblem<T> prob{g, ptr<T>(input), input.stride(0), input.stride(1), input.stride(2), input.stride(3),
                       ptr<T>(w), bp, ptr<T>(out), pp, (int)activation};
    launch_igemm<FwdProblem<T>, typename MmaType<T>::type, MmaType<T>::tc>(prob, g.N * g.P * g.Q, g.Kg, (int)g.G, 1,
                                                                           stream);
  });
  return {out, save_preact ? pre.view_as(out) : pre};
}

// The three gradients from gz (fp32, contiguous [N][K][P][Q]: the gradient at the pre-activation).
std::tuple<at::Tensor, at::Tensor, at::Tensor> grads_from_gz(const Geom& g, const at::Tensor& gz, const at::Tensor& input,
                                                             const at::Tensor& weight, std::array<bool, 3> output_mask,
                                                             cudaStream_t stream) {
  at::Tensor w = weight.contiguous();
  auto opts = input.options();
  at::Tensor dx = output_mask[0] ? at::empty({g.N, g.C, g.H, g.W}, opts) : at::empty({0}, opts);
  at::Tensor dw = output_mask[1] ? at::empty(weight.sizes(), opts) : at::empty({0}, opts);
  at::Tensor db = output_mask[2] ? at::empty({g.K}, opts) : at::empty({0}, opts);
  dispatch(input.scalar_type(), "conv2d_bwd", [&](auto tag) {
    using T = decltype(tag);
    if (output_mask[0] && dx.numel() > 0) {
      BwdDataProblem<T> prob{g, ptr<float>(gz), ptr<T>(w), ptr<T>(dx)};
      launch_igemm<BwdDataProblem<T>, float, false>(prob, g.N * g.H * g.W, g.Cg, (int)g.G, 1, stream);
    }
    if (output_mask[1] && dw.numel() > 0) {
      const int64_t red = g.N * g.P * g.Q, wsize = g.K * g.Cg * g.R * g.S;
      int splits = (int)std::max<int64_t>(1, std::min<int64_t>(64, red / (BK * 32)));
      while (splits > 1 && (int64_t)splits * wsize > (int64_t(1) << 25)) splits /= 2;
      splits = (int)std::min<int64_t>(splits, std::max<int64_t>(1, 65535 / g.G));  // grid z = G * splits <= 65535
      at::Tensor partial = at::empty({splits * wsize}, opts.dtype(at::kFloat));
      BwdWeightProblem<T> prob{g, ptr<float>(gz), ptr<T>(input), input.stride(0), input.stride(1), input.stride(2),
                               input.stride(3), ptr<float>(partial), splits};
      launch_igemm<BwdWeightProblem<T>, float, false>(prob, g.Kg, g.Cg * g.R * g.S, (int)(g.G * splits), splits, stream);
      sum_splits_kernel<T><<<(unsigned)((wsize + 255) / 256), 256, 0, stream>>>(ptr<float>(partial), ptr<T>(dw), wsize,
                                                                                splits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (output_mask[2]) {
      bias_grad_kernel<T><<<(unsigned)g.K, 256, 0, stream>>>(ptr<float>(gz), ptr<T>(db), g.N, g.K, g.P * g.Q);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (output_mask[0] && dx.numel() > 0 && gz.numel() == 0) dx.zero_();
  if (output_mask[1] && dw.numel() > 0 && gz.numel() == 0) dw.zero_();
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_bwd(const at::Tensor& grad_out, const at::Tensor& input,
                                                          const at::Tensor& weight, const c10::optional<at::Tensor>& saved,
                                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                                          at::IntArrayRef dilation, int64_t groups, int64_t activation,
                                                          std::array<bool, 3> output_mask) {
  TORCH_CHECK(grad_out.is_cuda() && input.is_cuda() && weight.is_cuda(), "conv2d_bwd (cuda): CUDA tensors expected");
  c10::cuda::CUDAGuard guard(input.device());
  Geom g = make_geom(input, weight, stride, padding, dilation, groups);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == g.N && grad_out.size(1) == g.K && grad_out.size(2) == g.P &&
                  grad_out.size(3) == g.Q, "conv2d_bwd (cuda): grad_out has the wrong shape");
  const bool has_saved = saved.has_value() && saved->defined();
  TORCH_CHECK(activation == kNone || (has_saved && saved->sizes() == grad_out.sizes()),
              "conv2d_bwd (cuda): an activation needs the saved output (relu) or pre-activation (gelu, silu)");
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor go = grad_out.contiguous();
  at::Tensor sv = has_saved ? saved->contiguous() : go;
  at::Tensor gz = at::empty(go.sizes(), go.options().dtype(at::kFloat));
  const int64_t n = go.numel();
  dispatch(input.scalar_type(), "conv2d_bwd", [&](auto tag) {
    using T = decltype(tag);
    if (n > 0) {
      const int blocks = (int)std::min<int64_t>((n + 255) / 256, 65535);
      act_backward_kernel<T><<<blocks, 256, 0, stream>>>(ptr<T>(go), ptr<T>(sv), ptr<float>(gz), n, (int)activation);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return grads_from_gz(g, gz, input, weight, output_mask, stream);
}

inline int64_t pool_out(int64_t n, int64_t k, int64_t s) { return n >= k ? (n - k) / s + 1 : 0; }

std::tuple<at::Tensor, at::Tensor> conv2d_relu_maxpool2d_fwd(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, at::IntArrayRef pool_kernel,
    at::IntArrayRef pool_stride, bool save_indices) {
  TORCH_CHECK(input.is_cuda() && weight.is_cuda(), "conv2d_relu_maxpool2d (cuda): input and weight must be CUDA tensors");
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), "conv2d_relu_maxpool2d (cuda): input and weight dtypes differ");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) TORCH_CHECK(bias->is_cuda() && bias->scalar_type() == input.scalar_type() && bias->numel() == weight.size(0),
                            "conv2d_relu_maxpool2d (cuda): bias must be a (K,) CUDA tensor of input's dtype");
  TORCH_CHECK(pool_kernel.size() == 2 && pool_stride.size() == 2,
              "conv2d_relu_maxpool2d (cuda): pool_kernel and pool_stride take 2 values");
  const int64_t pkh = pool_kernel[0], pkw = pool_kernel[1], psh = pool_stride[0], psw = pool_stride[1];
  TORCH_CHECK(pkh > 0 && pkw > 0 && psh > 0 && psw > 0, "conv2d_relu_maxpool2d (cuda): pool kernel and stride must be positive");
  c10::cuda::CUDAGuard guard(input.device());
  Geom g = make_geom(input, weight, stride, padding, dilation, groups);
  TORCH_CHECK(g.P >= pkh && g.Q >= pkw, "conv2d_relu_maxpool2d (cuda): the conv output (", g.P, "x", g.Q,
              ") is smaller than the pool kernel (", pkh, "x", pkw, ")");
  const int64_t PH = pool_out(g.P, pkh, psh), PW = pool_out(g.Q, pkw, psw);
  at::Tensor w = weight.contiguous();
  at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({g.N, g.K, PH, PW}, input.options());
  at::Tensor idx = at::empty(save_indices ? at::IntArrayRef({g.N, g.K, PH, PW}) : at::IntArrayRef({0}),
                             input.options().dtype(at::kLong));
  if (out.numel() == 0) return {out, idx};
  const int64_t kblocks = (g.Kg + POOL_KT - 1) / POOL_KT;
  TORCH_CHECK(g.N * g.G * kblocks <= 65535, "conv2d_relu_maxpool2d (cuda): too many images x channel blocks (",
              g.N * g.G * kblocks, " > 65535)");
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(input.scalar_type(), "conv2d_relu_maxpool2d_fwd", [&](auto tag) {
    using T = decltype(tag);
    dim3 grid((unsigned)((PH * PW + POOL_THREADS - 1) / POOL_THREADS), (unsigned)(g.N * g.G * kblocks));
    conv_relu_maxpool_fwd_kernel<T><<<grid, POOL_THREADS, 0, stream>>>(
        g, ptr<T>(input), input.stride(0), input.stride(1), input.stride(2), input.stride(3), ptr<T>(w),
        has_bias ? ptr<T>(b) : nullptr, (int)pkh, (int)pkw, (int)psh, (int)psw, PH, PW, ptr<T>(out),
        save_indices ? idx.data_ptr<int64_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, idx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_maxpool2d_bwd(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& out,
    const at::Tensor& indices, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, std::array<bool, 3> output_mask) {
  TORCH_CHECK(grad_out.is_cuda() && input.is_cuda() && weight.is_cuda() && out.is_cuda() && indices.is_cuda(),
              "conv2d_relu_maxpool2d_bwd (cuda): CUDA tensors expected");
  c10::cuda::CUDAGuard guard(input.device());
  Geom g = make_geom(input, weight, stride, padding, dilation, groups);
  TORCH_CHECK(indices.scalar_type() == at::kLong && grad_out.dim() == 4 && indices.sizes() == grad_out.sizes() &&
                  out.sizes() == grad_out.sizes() && grad_out.size(0) == g.N && grad_out.size(1) == g.K,
              "conv2d_relu_maxpool2d_bwd (cuda): needs the forward's pooled output and indices (forward with save_indices=True)");
  const int64_t PHW = grad_out.size(2) * grad_out.size(3), total = grad_out.numel();
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor go = grad_out.contiguous(), o = out.contiguous(), idx = indices.contiguous();
  at::Tensor gz = at::zeros({g.N, g.K, g.P, g.Q}, go.options().dtype(at::kFloat));
  if (total > 0) {
    dispatch(input.scalar_type(), "conv2d_relu_maxpool2d_bwd", [&](auto tag) {
      using T = decltype(tag);
      const int blocks = (int)std::min<int64_t>((total + 255) / 256, 65535);
      maxpool_relu_bwd_kernel<T><<<blocks, 256, 0, stream>>>(ptr<T>(go), ptr<T>(o), idx.data_ptr<int64_t>(),
                                                              ptr<float>(gz), total, PHW, g.P * g.Q);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return grads_from_gz(g, gz, input, weight, output_mask, stream);
}

}  // namespace conv2d_cuda
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("conv2d_fwd", &fastattn::conv2d_cuda::conv2d_fwd);
  m.impl("conv2d_bwd", &fastattn::conv2d_cuda::conv2d_bwd);
  m.impl("conv2d_relu_maxpool2d_fwd", &fastattn::conv2d_cuda::conv2d_relu_maxpool2d_fwd);
  m.impl("conv2d_relu_maxpool2d_bwd", &fastattn::conv2d_cuda::conv2d_relu_maxpool2d_bwd);
}
