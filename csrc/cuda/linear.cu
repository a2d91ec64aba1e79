// Fused linear on CUDA: out = act(x @ w^T + b) with the bias + activation in the GEMM's epilogue,
// and its backward. Hand-written (no cuBLAS / CUTLASS). Schemas and the contract: csrc/cpu/linear.cpp
// and fastattn/ops/linear.py (LINEAR_CONTRACT).
//
// One GEMM kernel, C (M x N, row-major) = act(A @ B + bias), reads A (M x K) and B (K x N) through a
// pointer and a (row, column) stride each, so the op's three products are the same kernel:
//   forward       out = act(x @ w^T + b)   A = x      B = w^T (w's strides swapped)
//   grad input    dx  = gz @ w             A = gz     B = w
//   grad weight   dw  = gz^T @ x           A = gz^T   B = x   (gz's strides swapped)
// where gz = grad_out * act'(saved) is formed while the A tile is loaded (saved: the forward output for
// relu, the pre-activation for gelu/silu), so it never goes to memory. grad_bias = gz.sum(0) is a
// column reduction: per row chunk a partial (fixed order), then the partials summed in order.
//
// Blocking: a block of 4 warps computes a 64 x 64 tile of C and walks K in steps of 32. Each step the
// block copies a 64 x 32 tile of A and a 32 x 64 tile of B into shared memory (A stored k-major,
// As[k][m]). Each thread reads 16-byte chunks along whichever direction of the operand is contiguous
// in memory (one vector load where the strides and alignment allow, scalar loads at the edges), so
// the global reads coalesce for any of the three stride patterns. The next step's tiles are read
// into registers while the current one is multiplied (register double buffering). fp16/bf16: each
// warp owns a 32 x 32 quarter as 2 x 2 WMMA 16x16x16 fragments with fp32 accumulators (tensor
// cores); fp32: each thread owns a 4 x 8 block of FMA accumulators (exact fp32, no TF32, matching
// the CPU). The accumulators go through shared memory so the epilogue (bias,
// pre-activation store, activation, one rounding to the output dtype) writes whole rows, coalesced.
// Blocks are ordered in groups of 8 row tiles (consecutive blocks share B's column tiles: L2 reuse).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "activation.cuh"
#include "attention_common.cuh"  // Dt<T>: to_float / from_float for float, __half, __nv_bfloat16

namespace fastattn {
namespace linear_cuda {

using cuda_attn::Dt;

using namespace cuda_act;  // activation codes, activate, activate_grad (activation.cuh)

constexpr int BM = 64, BN = 64, BK = 32, THREADS = 128, GROUP_M = 8;
constexpr int LDA = BM + 8, LDB = BN + 8, LDC = BN + 4;  // padded smem pitches (WMMA: multiples of 8 / 4)

// C = act(A @ B + bias); strides in elements. saved != nullptr: A is grad_out and the product uses
// A * act'(saved) (saved laid out as A). pre != nullptr: the pre-activation is stored there too.
template <typename T>
struct GemmArgs {
  const T* a; const T* saved; int64_t sam, sak;  // A[m][k] = a[m * sam + k * sak]
  const T* b; int64_t sbk, sbn;                  // B[k][n] = b[k * sbk + n * sbn]
  const T* bias;                                 // [N] or null
  T* c; T* pre; int64_t ldc;                     // C[m][n] = c[m * ldc + n]
  int64_t M, N, K;
  int act, grad_act;
  bool a_vec, b_vec;  // 16-byte loads allowed (set by the host: see vec_ok)
};

// How a thread reads its share of a ROWS x COLS operand tile: in chunks of VEC elements (16 bytes)
// along the operand's contiguous direction (along_cols: the columns are contiguous, else the rows),
// consecutive threads taking consecutive chunks, so a warp reads whole 16-byte-aligned runs. A
// chunk is one vector load when the operand allows it (vec) and the chunk is inside the matrix,
// else VEC scalar loads with bounds checks (edges, odd strides); the tile is the same either way.
template <typename T, int ROWS, int COLS>
struct Chunks {
  static constexpr int VEC = 16 / sizeof(T);
  static constexpr int PER_THREAD = ROWS * COLS / VEC / THREADS;
  static_assert(PER_THREAD * VEC * THREADS == ROWS * COLS && ROWS % VEC == 0 && COLS % VEC == 0, "tile shape");
  // First element (r, c) of this thread's chunk q; element v of the chunk is (r, c + v) or (r + v, c).
  static __device__ __forceinline__ void start(int q, bool along_cols, int& r, int& c) {
    const int e = threadIdx.x + q * THREADS;
    if (along_cols) { r = e / (COLS / VEC); c = e % (COLS / VEC) * VEC; }
    else { c = e / (ROWS / VEC); r = e % (ROWS / VEC) * VEC; }
  }
};

// reg = the tile at (r0, c0) of an nrows x ncols matrix X[r][c] = x[r * rs + c * cs], times act'(saved)
// elementwise when saved != nullptr (rounded once to T), zeros outside the matrix.
template <typename T, int ROWS, int COLS>
__device__ __forceinline__ void load_tile(const T* x, const T* saved, int grad_act, int64_t rs, int64_t cs,
                                          int64_t r0, int64_t c0, int64_t nrows, int64_t ncols, bool along_cols,
                                          bool vec, T (&reg)[Chunks<T, ROWS, COLS>::PER_THREAD * (16 / sizeof(T))]) {
  using C = Chunks<T, ROWS, COLS>;
  constexpr int VEC = C::VEC;
#pragma unroll
  for (int q = 0; q < C::PER_THREAD; ++q) {
    int r, c;
    C::start(q, along_cols, r, c);
    const int64_t gr = r0 + r, gc = c0 + c;
    T* out = reg + q * VEC;
    const bool inside = along_cols ? (gr < nrows && gc + VEC <= ncols) : (gc < ncols && gr + VEC <= nrows);
    if (vec && inside) {
      const int64_t off = gr * rs + gc * cs;
      const uint4 xv = *reinterpret_cast<const uint4*>(x + off);
      const T* xe = reinterpret_cast<const T*>(&xv);
      if (saved) {
        const uint4 sv = *reinterpret_cast<const uint4*>(saved + off);
        const T* se = reinterpret_cast<const T*>(&sv);
#pragma unroll
        for (int v = 0; v < VEC; ++v)
          out[v] = Dt<T>::from_float(Dt<T>::to_float(xe[v]) * activate_grad(Dt<T>::to_float(se[v]), grad_act));
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) out[v] = xe[v];
      }
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const int64_t rr = along_cols ? gr : gr + v, cc = along_cols ? gc + v : gc;
        float val = 0.f;
        if (rr < nrows && cc < ncols) {
          const int64_t off = rr * rs + cc * cs;
          val = Dt<T>::to_float(x[off]);
          if (saved) val *= activate_grad(Dt<T>::to_float(saved[off]), grad_act);
        }
        out[v] = Dt<T>::from_float(val);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) linear_gemm_kernel(const GemmArgs<T> p) {
  constexpr bool kTensorCores = !std::is_same<T, float>::value;
  __shared__ __align__(32) T As[BK][LDA];       // A tile, k-major: As[k][m]
  __shared__ __align__(32) T Bs[BK][LDB];       // B tile: Bs[k][n]
  __shared__ __align__(32) float Cs[BM][LDC];   // accumulators on their way to the epilogue
  const int tid = threadIdx.x, warp = tid / 32;

  // Grouped block order: GROUP_M row tiles per group, walked down the rows first.
  const int64_t tiles_m = (p.M + BM - 1) / BM, tiles_n = (p.N + BN - 1) / BN;
  const int64_t per_group = GROUP_M * tiles_n, pid = blockIdx.x;
  const int64_t first_m = pid / per_group * GROUP_M;
  const int64_t group_rows = min(tiles_m - first_m, (int64_t)GROUP_M);
  const int64_t m0 = (first_m + (pid % per_group) % group_rows) * BM;
  const int64_t n0 = (pid % per_group) / group_rows * BN;

  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> fc[2][2];
  float acc[4][8];
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;   // this warp's quarter (tensor cores)
  const int tm = (tid % 16) * 4, tn = (tid / 16) * 8;     // this thread's 4 x 8 block (FMA)
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

  using CA = Chunks<T, BM, BK>;  // A tile: rows m, columns k
  using CB = Chunks<T, BK, BN>;  // B tile: rows k, columns n
  constexpr int VEC = CA::VEC;
  const bool a_along_k = p.sak == 1, b_along_n = p.sbn == 1;
  T ra[CA::PER_THREAD * VEC], rb[CB::PER_THREAD * VEC];
  auto load_next = [&](int64_t k0) {
    load_tile<T, BM, BK>(p.a, p.saved, p.grad_act, p.sam, p.sak, m0, k0, p.M, p.K, a_along_k, p.a_vec, ra);
    load_tile<T, BK, BN>(p.b, nullptr, 0, p.sbk, p.sbn, k0, n0, p.K, p.N, b_along_n, p.b_vec, rb);
  };
  if (p.K > 0) load_next(0);
  for (int64_t k0 = 0; k0 < p.K; k0 += BK) {
    __syncthreads();  // the previous step is done with As / Bs
#pragma unroll
    for (int q = 0; q < CA::PER_THREAD; ++q) {
      int i, kk;
      CA::start(q, a_along_k, i, kk);
#pragma unroll
      for (int v = 0; v < VEC; ++v) As[a_along_k ? kk + v : kk][a_along_k ? i : i + v] = ra[q * VEC + v];
    }
#pragma unroll
    for (int q = 0; q < CB::PER_THREAD; ++q) {
      int kk, j;
      CB::start(q, b_along_n, kk, j);
#pragma unroll
      for (int v = 0; v < VEC; ++v) Bs[b_along_n ? kk : kk + v][b_along_n ? j + v : j] = rb[q * VEC + v];
    }
    __syncthreads();
    if (k0 + BK < p.K) load_next(k0 + BK);  // in flight while we multiply

    if constexpr (kTensorCores) {
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        // As is k-major, i.e. A's 16 x 16 block is column-major at &As[kk][m] with pitch LDA.
        nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::col_major> fa[2];
        nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::row_major> fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) nvcuda::wmma::load_matrix_sync(fa[i], &As[kk][wm + 16 * i], LDA);
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
        for (int i = 0; i < 4; ++i) av[i] = Dt<T>::to_float(As[kk][tm + i]);
#pragma unroll
        for (int j = 0; j < 8; ++j) bv[j] = Dt<T>::to_float(Bs[kk][tn + j]);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
    }
  }

  // Epilogue through shared memory: row-contiguous stores of act(acc + bias).
  if constexpr (kTensorCores) {
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
    const int i = e / BN, j = e % BN;
    const int64_t m = m0 + i, n = n0 + j;
    if (m >= p.M || n >= p.N) continue;
    float v = Cs[i][j];
    if (p.bias) v += Dt<T>::to_float(p.bias[n]);
    const int64_t o = m * p.ldc + n;
    if (p.pre) p.pre[o] = Dt<T>::from_float(v);
    p.c[o] = Dt<T>::from_float(activate(v, p.act));
  }
}

// grad_bias, pass 1: partial[split][n] = sum of g[m][n] * act'(saved[m][n]) over the split's rows
// (g, saved contiguous (M, N)). Block = 32 columns x 8 row lanes; each lane sums its rows in order,
// then the 8 lane sums are added in order: deterministic.
constexpr int CS_COLS = 32, CS_ROWS = 8;

template <typename T>
__global__ void __launch_bounds__(CS_COLS * CS_ROWS)
colsum_partial_kernel(const T* __restrict__ g, const T* __restrict__ saved, float* __restrict__ partial, int64_t M,
                      int64_t N, int64_t rows_per_split, int act) {
  __shared__ float lane_sum[CS_ROWS][CS_COLS + 1];
  const int tx = threadIdx.x % CS_COLS, ty = threadIdx.x / CS_COLS;
  const int64_t n = (int64_t)blockIdx.x * CS_COLS + tx;
  const int64_t row0 = (int64_t)blockIdx.y * rows_per_split, row_end = min(M, row0 + rows_per_split);
  float s = 0.f;
  if (n < N) {
    for (int64_t m = row0 + ty; m < row_end; m += CS_ROWS) {
      const int64_t off = m * N + n;
      float v = Dt<T>::to_float(g[off]);
      if (saved) v *= activate_grad(Dt<T>::to_float(saved[off]), act);
      s += v;
    }
  }
  lane_sum[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && n < N) {
    float t = 0.f;
#pragma unroll
    for (int r = 0; r < CS_ROWS; ++r) t += lane_sum[r][tx];
    partial[(int64_t)blockIdx.y * N + n] = t;
  }
}

// grad_bias, pass 2: db[n] = sum over splits of partial[split][n], in split order.
template <typename T>
__global__ void colsum_finish_kernel(const float* __restrict__ partial, int splits, int64_t N, T* __restrict__ db) {
  const int64_t n = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  float s = 0.f;
  for (int j = 0; j < splits; ++j) s += partial[(int64_t)j * N + n];
  db[n] = Dt<T>::from_float(s);
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------
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

// 16-byte chunk loads of an operand X[r][c] = x[r * rs + c * cs] (and of saved, laid out alike): its
// contiguous direction (the one the kernel reads along: the columns when cs == 1) has stride 1, the
// other stride is a multiple of the chunk, and the pointers are 16-byte aligned.
template <typename T>
bool vec_ok(const T* x, const T* saved, int64_t rs, int64_t cs) {
  constexpr int64_t VEC = 16 / sizeof(T);
  const bool along_cols = cs == 1;
  const int64_t unit = along_cols ? cs : rs, other = along_cols ? rs : cs;
  auto aligned = [](const void* q) { return q == nullptr || reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  return unit == 1 && other % VEC == 0 && aligned(x) && aligned(saved);
}

template <typename T>
void launch_gemm(GemmArgs<T> p, cudaStream_t stream) {
  p.a_vec = vec_ok(p.a, p.saved, p.sam, p.sak);
  p.b_vec = vec_ok<T>(p.b, nullptr, p.sbk, p.sbn);
  const int64_t blocks = ((p.M + BM - 1) / BM) * ((p.N + BN - 1) / BN);
  TORCH_CHECK(blocks <= INT32_MAX, "linear (cuda): too many output tiles (", blocks, ")");
  linear_gemm_kernel<T><<<(unsigned)blocks, THREADS, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// db (N,) = (g * act'(saved)).sum(0); saved may be null (no activation).
template <typename T>
void launch_colsum(const T* g, const T* saved, T* db, int64_t M, int64_t N, int act, const at::Tensor& like,
                   cudaStream_t stream) {
  // Enough row chunks to fill the GPU when N is small; each chunk at least 512 rows.
  const int splits = (int)std::max<int64_t>(1, std::min<int64_t>(64, M / 512));
  const int64_t rows = std::max<int64_t>(1, (M + splits - 1) / splits);
  at::Tensor partial = at::empty({splits, N}, like.options().dtype(at::kFloat));
  dim3 grid((unsigned)((N + CS_COLS - 1) / CS_COLS), (unsigned)splits);
  colsum_partial_kernel<T><<<grid, CS_COLS * CS_ROWS, 0, stream>>>(g, saved, ptr<float>(partial), M, N, rows, act);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  colsum_finish_kernel<T><<<(unsigned)((N + 255) / 256), 256, 0, stream>>>(ptr<float>(partial), splits, N, db);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_common(const char* where, const at::Tensor& input, const at::Tensor& weight, int64_t activation) {
  TORCH_CHECK(input.is_cuda() && weight.is_cuda(), where, ": input and weight must be CUDA tensors, got ",
              input.device(), " and ", weight.device());
  TORCH_CHECK(input.device() == weight.device(), where, ": input and weight are on different devices (",
              input.device(), ", ", weight.device(), ")");
  TORCH_CHECK(input.dim() == 2 && weight.dim() == 2, where, ": input must be 2-D (M, K) and weight 2-D (N, K), got ",
              input.sizes(), " and ", weight.sizes());
  TORCH_CHECK(input.size(1) == weight.size(1), where, ": input (M, K) = ", input.sizes(), " and weight (N, K) = ",
              weight.sizes(), " disagree on K");
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), where, ": input dtype ", input.scalar_type(),
              " and weight dtype ", weight.scalar_type(), " differ");
  TORCH_CHECK(activation >= kNone && activation <= kSilu, where,
              ": activation must be 0 (none), 1 (relu), 2 (gelu) or 3 (silu), got ", activation);
}

std::tuple<at::Tensor, at::Tensor> linear_fwd(const at::Tensor& input, const at::Tensor& weight,
                                              const c10::optional<at::Tensor>& bias, int64_t activation,
                                              bool save_preact) {
  check_common("linear_fwd (cuda)", input, weight, activation);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->device() == input.device() && bias->scalar_type() == input.scalar_type() && bias->dim() == 1 &&
                    bias->size(0) == weight.size(0),
                "linear_fwd (cuda): bias must be a (", weight.size(0), ",) tensor of dtype ", input.scalar_type(),
                " on ", input.device(), ", got ", bias->sizes(), " ", bias->scalar_type(), " on ", bias->device());
  c10::cuda::CUDAGuard guard(input.device());
  const int64_t M = input.size(0), K = input.size(1), N = weight.size(0);
  const bool keep_pre = save_preact && (activation == kGelu || activation == kSilu);
  at::Tensor out = at::empty({M, N}, input.options());
  at::Tensor pre = keep_pre ? at::empty({M, N}, input.options()) : at::empty({0}, input.options());
  if (M == 0 || N == 0) return {out, pre};
  at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(input.scalar_type(), "linear_fwd", [&](auto tag) {
    using T = decltype(tag);
    // B = w^T: B[k][n] = w[n][k]. K == 0: no reduction step, out = act(bias) (or act(0)).
    GemmArgs<T> p{ptr<T>(input), nullptr, input.stride(0), input.stride(1),
                  ptr<T>(weight), weight.stride(1), weight.stride(0),
                  has_bias ? ptr<T>(b) : nullptr,
                  ptr<T>(out), keep_pre ? ptr<T>(pre) : nullptr, N,
                  M, N, K, (int)activation, kNone, false, false};
    launch_gemm(p, stream);
  });
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd(const at::Tensor& grad_out, const at::Tensor& input,
                                                          const at::Tensor& weight,
                                                          const c10::optional<at::Tensor>& saved, int64_t activation,
                                                          std::array<bool, 3> output_mask) {
  check_common("linear_bwd (cuda)", input, weight, activation);
  const int64_t M = input.size(0), K = input.size(1), N = weight.size(0);
  TORCH_CHECK(grad_out.device() == input.device() && grad_out.scalar_type() == input.scalar_type() &&
                  grad_out.dim() == 2 && grad_out.size(0) == M && grad_out.size(1) == N,
              "linear_bwd (cuda): grad_out must be (M, N) = (", M, ", ", N, ") of dtype ", input.scalar_type(), " on ",
              input.device(), ", got ", grad_out.sizes(), " ", grad_out.scalar_type(), " on ", grad_out.device());
  const bool has_saved = saved.has_value() && saved->defined();
  TORCH_CHECK(activation == kNone ||
                  (has_saved && saved->device() == input.device() && saved->scalar_type() == input.scalar_type() &&
                   saved->dim() == 2 && saved->size(0) == M && saved->size(1) == N),
              "linear_bwd (cuda): activation ", activation, " needs saved = the forward output (relu) or the "
              "pre-activation (gelu, silu; forward with save_preact=True), an (M, N) = (", M, ", ", N,
              ") tensor of the input's dtype on its device");
  c10::cuda::CUDAGuard guard(input.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  auto opts = input.options();
  at::Tensor go = grad_out.contiguous();
  at::Tensor sv = activation != kNone ? saved->contiguous() : at::Tensor();
  at::Tensor dx = output_mask[0] ? at::empty({M, K}, opts) : at::empty({0}, opts);
  at::Tensor dw = output_mask[1] ? at::empty({N, K}, opts) : at::empty({0}, opts);
  at::Tensor db = output_mask[2] ? at::empty({N}, opts) : at::empty({0}, opts);
  dispatch(input.scalar_type(), "linear_bwd", [&](auto tag) {
    using T = decltype(tag);
    const T* g = ptr<T>(go);
    const T* s = activation != kNone ? ptr<T>(sv) : nullptr;
    const int act = (int)activation;
    if (output_mask[0] && M > 0 && K > 0) {  // dx = gz @ w, reduction over N (N == 0: zeros)
      GemmArgs<T> p{g, s, N, 1, ptr<T>(weight), weight.stride(0), weight.stride(1), nullptr,
                    ptr<T>(dx), nullptr, K, M, K, N, kNone, act, false, false};
      launch_gemm(p, stream);
    }
    if (output_mask[1] && N > 0 && K > 0) {  // dw = gz^T @ x, reduction over M (M == 0: zeros)
      GemmArgs<T> p{g, s, 1, N, ptr<T>(input), input.stride(0), input.stride(1), nullptr,
                    ptr<T>(dw), nullptr, K, N, K, M, kNone, act, false, false};
      launch_gemm(p, stream);
    }
    if (output_mask[2] && N > 0) launch_colsum<T>(g, s, ptr<T>(db), M, N, act, go, stream);
  });
  return {dx, dw, db};
}

}  // namespace linear_cuda
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("linear_fwd", &fastattn::linear_cuda::linear_fwd);
  m.impl("linear_bwd", &fastattn::linear_cuda::linear_bwd);
}
