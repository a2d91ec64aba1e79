// gemm.h's row-major GEMM with the fused bias + activation epilogue.
//
// float on a CPU with AVX-512: a packed, cache-blocked GEMM (BLIS's loop nest) written here, about
// twice MKL's sgemm on the AMD Zen 5 it was tuned on (MKL takes a slow path on AMD CPUs); thin
// products (M or N <= 4, GEMV-like, or <= 16 when both operands run along K) unpacked.
// double, and float without AVX-512: the BLAS that libtorch_cpu exports (sgemm_/dgemm_), then the
// epilogue row by row.
#include "gemm.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <memory>

#include "activation.h"
#include "blas.h"

namespace fastattn {
namespace cpu {
namespace {

// Row-major C = alpha*op(A)*op(B) + beta*C is column-major C^T = alpha*op(B)^T*op(A)^T + beta*C^T.
void blas(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  char ca = tb ? 'T' : 'N', cb = ta ? 'T' : 'N';
  int m = (int)N, n = (int)M, k = (int)K, la = (int)ldb, lb = (int)lda, lc = (int)ldc;
  sgemm_(&ca, &cb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
}
void blas(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
          const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  char ca = tb ? 'T' : 'N', cb = ta ? 'T' : 'N';
  int m = (int)N, n = (int)M, k = (int)K, la = (int)ldb, lb = (int)lda, lc = (int)ldc;
  dgemm_(&ca, &cb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
}

template <typename T>
bool has_epilogue(const GemmEpilogue<T>& ep) {
  return ep.bias || ep.act != act::kNone || ep.pre;
}

// C rows [r0, r1) = act(C + bias), pre = C + bias (the BLAS path's epilogue, after the product).
template <typename T>
void epilogue_rows(int64_t r0, int64_t r1, int64_t N, T* C, int64_t ldc, const GemmEpilogue<T>& ep) {
  for (int64_t i = r0; i < r1; ++i) {
    T* c = C + i * ldc;
    if (ep.bias) {
      for (int64_t j = 0; j < N; ++j) c[j] += ep.bias[j];
    }
    act::epilogue(c, ep.pre ? ep.pre + i * ldc : nullptr, N, T(0), ep.act);
  }
}

template <typename T>
void gemm_blas(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
               const T* B, int64_t ldb, T beta, T* C, int64_t ldc, const GemmEpilogue<T>& ep, bool parallel) {
  constexpr int64_t kMax = 2147483647;  // BLAS takes int sizes
  TORCH_CHECK(M <= kMax && N <= kMax && K <= kMax && lda <= kMax && ldb <= kMax && ldc <= kMax,
              "fastattn gemm: a dimension is too large for BLAS");
  blas(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  if (!has_epilogue(ep)) return;
  auto rows = [&](int64_t r0, int64_t r1) { epilogue_rows(r0, r1, N, C, ldc, ep); };
  if (parallel) {
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / N), rows);
  } else {
    rows(0, M);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace fastattn

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTATTN_HAVE_AVX512_GEMM 1
#include <immintrin.h>

#include "avx512_transpose.h"

namespace fastattn {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// The AVX-512 float GEMM (BLIS's loop nest). C is cut into MR x NR micro-tiles, each computed by
// one micro-kernel call per K block, entirely in registers:
//
//   for jc in N step NC:
//     for each group of K blocks (KC each; all of K while the packed B stays <= 4 MB):
//       [threads pack op(B)[group, jc:jc+NC] into KC x NR panels, shared by all threads]
//       parallel over units = (row block of <= MC rows) x (column chunk of NR panels):
//         for pc in the group's K blocks:
//           pack op(A)[rows, pc:pc+KC] into MR x KC panels        (per thread, stays in L2)
//           for each NR panel of the chunk:   B panel (KC x NR, 32 KB) stays in L1 ...
//             for each MR panel of the rows:  ... while the A panels stream from L2 through it
//               C tile (MR x NR) = alpha * A panel x B panel + (first K block ? beta * C : C)
//               last K block: + bias in registers, then the activation (and the pre-activation
//               copy) from an L1 scratch tile into C
//
// Micro-kernel 14 x 32: 28 zmm accumulators + 2 B vectors + 1 broadcast A value = 31 of the 32
// zmm registers. Per k: 2 vector loads, 14 broadcasts, 28 FMAs (14 cycles on Zen 5's two 512-bit
// FMA pipes; the 16 loads fit its load ports). 28 independent accumulators cover the FMA latency
// (4 cycles x 2 pipes = 8 needed). NR = 32 divides the Transformer widths (128, 384, 512, ...).
//
// Blocking for Zen 5 (48 KB L1D, 1 MB L2 per core):
//   KC = 256: a B panel is 256 x 32 x 4 B = 32 KB (L1) and an A panel 14 x 256 x 4 B = 14 KB;
//   MC = 168 (12 A panels): the packed A block is 168 KB, in L2 next to the B block's panels;
//   NC = 1024: a K block of packed B is <= 1 MB (L2/L3); packed B is shared by the threads.
// (KC 192 / 256 / 384 and MC 168 / 336 measured within 3% of each other on one core, ~240-275
// GF/s at M = 4096 and 1024^3: the micro-kernel runs near the FMA pipes' peak either way.)
// Threads: two passes per group (pack B, then the units); most calls have one group.
// Packing absorbs trans_a / trans_b and the leading dimensions, and zero-pads the edges (rows past
// M, columns past N), so every tile runs the same kernel; the stores to C are masked at the edges.
// ---------------------------------------------------------------------------------------------
constexpr int kMR = 14, kNV = 2, kNR = 16 * kNV;
constexpr int64_t kKC = 256, kMC = 12 * kMR, kNC = 1024;
// packed B of several K blocks at once, up to this size (L3): one pass of the threads per group
constexpr int64_t kBPackBytes = int64_t(4) << 20;
// below this many multiply-adds one thread does the product (a thread wake-up costs microseconds)
constexpr int64_t kParallelFmas = int64_t(1) << 18;

bool cpu_has_avx512() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return yes;
}

__attribute__((target("avx512f"))) inline __mmask16 first_n(int64_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

using avx512::transpose16x16;  // avx512_transpose.h

// dst[k * width + i] = src[i * ld + k] for i < rows (<= 16), k < kc; lanes i >= rows are zero.
// Only the first `width` lanes (mask `keep`) of each transposed column are stored.
__attribute__((target("avx512f"))) void pack_transposed(const float* src, int64_t ld, int64_t rows, int64_t kc,
                                                       float* dst, int64_t width, __mmask16 keep) {
  __m512 r[16], c[16];
  for (int64_t k0 = 0; k0 < kc; k0 += 16) {
    const __mmask16 m = first_n(kc - k0);
    for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_maskz_loadu_ps(m, src + i * ld + k0) : _mm512_setzero_ps();
    transpose16x16(r, c);
    const int64_t kk = std::min<int64_t>(16, kc - k0);
    for (int64_t j = 0; j < kk; ++j) _mm512_mask_storeu_ps(dst + (k0 + j) * width, keep, c[j]);
  }
}

// dst[k * width + i] = src[k * ld + i] for i < cols, zero for cols <= i < width (a multiple of 16).
__attribute__((target("avx512f"))) void pack_copied(const float* src, int64_t ld, int64_t cols, int64_t kc,
                                                   float* dst, int64_t width) {
  for (int64_t k = 0; k < kc; ++k)
    for (int64_t v = 0; v < width; v += 16)
      _mm512_storeu_ps(dst + k * width + v, _mm512_maskz_loadu_ps(first_n(cols - v), src + k * ld + v));
}

// A panel: dst (kc x kMR, k-major) = op(A)[m0 : m0+mr, k0 : k0+kc], rows past mr zero.
__attribute__((target("avx512f"))) void pack_a_panel(bool trans_a, const float* A, int64_t lda, int64_t m0,
                                                    int64_t mr, int64_t k0, int64_t kc, float* dst) {
  if (trans_a) {  // op(A)[m, k] = A[k, m]: each k is mr consecutive floats
    const __mmask16 m = first_n(mr), keep = first_n(kMR);
    for (int64_t k = 0; k < kc; ++k)
      _mm512_mask_storeu_ps(dst + k * kMR, keep, _mm512_maskz_loadu_ps(m, A + (k0 + k) * lda + m0));
  } else {  // op(A)[m, k] = A[m, k]: 16 x 16 transposes of the rows
    pack_transposed(A + m0 * lda + k0, lda, mr, kc, dst, kMR, first_n(kMR));
  }
}

// B panel: dst (kc x kNR, k-major) = op(B)[k0 : k0+kc, n0 : n0+nr], columns past nr zero.
__attribute__((target("avx512f"))) void pack_b_panel(bool trans_b, const float* B, int64_t ldb, int64_t k0,
                                                    int64_t kc, int64_t n0, int64_t nr, float* dst) {
  if (trans_b) {  // op(B)[k, n] = B[n, k]: 16 columns at a time, transposed
    for (int64_t v = 0; v < kNR; v += 16)
      pack_transposed(B + (n0 + v) * ldb + k0, ldb, std::min<int64_t>(16, nr - v), kc, dst + v, kNR, 0xFFFF);
  } else {
    pack_copied(B + k0 * ldb + n0, ldb, nr, kc, dst, kNR);
  }
}

// C tile (mr x nr <= kMR x kNR) = alpha * a_panel x b_panel + (load_c ? beta * C : 0) (+ bias[0:nr]).
// With `tile` the result goes there instead (kMR x kNR, row stride kNR, 64-byte aligned), whole
// vectors: the epilogue reads it back at once, which a masked store to C would stall (AMD CPUs
// do not forward masked stores to loads).
__attribute__((target("avx512f"))) void micro_kernel(int64_t kc, const float* __restrict a, const float* __restrict b,
                                                    float* c, int64_t ldc, int64_t mr, int64_t nr, float alpha,
                                                    float beta, bool load_c, const float* bias, float* tile) {
  __m512 acc[kMR][kNV];
#pragma GCC unroll 16
  for (int r = 0; r < kMR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k, a += kMR, b += kNR) {
    __m512 bv[kNV];
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) bv[v] = _mm512_loadu_ps(b + 16 * v);
#pragma GCC unroll 16
    for (int r = 0; r < kMR; ++r) {
      const __m512 ar = _mm512_set1_ps(a[r]);
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) acc[r][v] = _mm512_fmadd_ps(ar, bv[v], acc[r][v]);
    }
  }
  __mmask16 mask[kNV];
  __m512 bias_v[kNV];
#pragma GCC unroll 4
  for (int v = 0; v < kNV; ++v) {
    mask[v] = first_n(nr - 16 * v);
    bias_v[v] = bias ? _mm512_maskz_loadu_ps(mask[v], bias + 16 * v) : _mm512_setzero_ps();
  }
  const __m512 alpha_v = _mm512_set1_ps(alpha), beta_v = _mm512_set1_ps(beta);
#pragma GCC unroll 16
  for (int r = 0; r < kMR; ++r) {
    if (r >= mr) break;
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) {
      float* cp = c + r * ldc + 16 * v;
      __m512 x = _mm512_fmadd_ps(acc[r][v], alpha_v, bias_v[v]);
      if (load_c) x = _mm512_fmadd_ps(beta_v, _mm512_maskz_loadu_ps(mask[v], cp), x);
      if (tile) _mm512_store_ps(tile + r * kNR + 16 * v, x);
      else _mm512_mask_storeu_ps(cp, mask[v], x);
    }
  }
}

// The epilogue of a finished tile: C rows = act(tile rows), pre rows = tile rows (nr columns).
__attribute__((target("avx512f"))) void epilogue_tile(const float* tile, float* c, float* pre, int64_t ldc, int64_t mr,
                                                     int64_t nr, int64_t act) {
  for (int64_t r = 0; r < mr; ++r)
    act::epilogue_copy_body(tile + r * kNR, c + r * ldc, pre ? pre + r * ldc : nullptr, nr, 0.0f, act);
}

// Aligned scratch that grows and is kept per thread (packed blocks: no allocation per call).
struct Scratch {
  std::unique_ptr<float, decltype(&std::free)> buf{nullptr, &std::free};
  int64_t size = 0;
  float* get(int64_t n) {
    if (n > size) {
      buf.reset(static_cast<float*>(std::aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64)));
      TORCH_CHECK(buf, "fastattn gemm: out of memory for a ", n * sizeof(float), "-byte packing buffer");
      size = n;
    }
    return buf.get();
  }
};

// ---------------------------------------------------------------------------------------------
// Thin products (M or N <= kThin, or <= kThinDots when the dot form applies): packing would cost
// as much as the product (a GEMV reads each element of the big operand once), so they run unpacked,
// over the side that is contiguous. With t(i, j) the thin side (i < mt), P (mt x K), Q (K x nt):
//   Q rows contiguous (q_js == 1):  acc[i][:] += P(i, k) * Q[k, :]   for k   (axpy, Q read once)
//   Q columns contiguous (q_ks == 1): t(i, j) = dot(P[i, :], Q[:, j]), 4 x 4 blocks of dots in
//                                     registers (P rows copied first; a Linear's x @ w^T at M <= 16)
// thin N is the thin M of C^T = op(B)^T op(A)^T. The epilogue follows on C's rows.
// kThinDots = 16: at K = N = 256..1024 the dots ran 160-190 GF/s on one Zen 5 core from M = 8 on,
// the packed kernel 90-120 at M = 8..16 (packing B costs about what the product does) and the same
// as the dots from M = 24.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kThin = 4, kThinDots = 16;

// d[i][j] = dot(p + i * K, q[j]) over K, i, j < 4: 16 accumulators, per 16 k 8 loads and 16 FMAs.
__attribute__((target("avx512f"))) void dot_4x4(const float* p, int64_t K, const float* const (&q)[4],
                                               float (&d)[4][4]) {
  __m512 acc[4][4];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = first_n(K - k);
    __m512 pv[4];
    for (int i = 0; i < 4; ++i) pv[i] = _mm512_maskz_loadu_ps(m, p + i * K + k);
    for (int j = 0; j < 4; ++j) {
      const __m512 qv = _mm512_maskz_loadu_ps(m, q[j] + k);
      for (int i = 0; i < 4; ++i) acc[i][j] = _mm512_fmadd_ps(pv[i], qv, acc[i][j]);
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) d[i][j] = _mm512_reduce_add_ps(acc[i][j]);
}

// t(i, j) at T[i * t_is + j * t_js] = alpha * P Q + beta * t (beta == 0: t is not read), for j in [j0, j1).
__attribute__((target("avx512f"))) void thin_product(int64_t mt, int64_t j0, int64_t j1, int64_t K, float alpha,
                                                    const float* P, int64_t p_is, int64_t p_ks, const float* Q,
                                                    int64_t q_ks, int64_t q_js, float beta, float* T, int64_t t_is,
                                                    int64_t t_js, float* scratch) {
  const int64_t nj = j1 - j0;
  auto finish = [&](int64_t i, int64_t j, float v) {
    float* t = T + i * t_is + j * t_js;
    *t = beta == 0.0f ? alpha * v : alpha * v + beta * *t;
  };
  if (q_js == 1) {
    for (int64_t i = 0; i < mt; ++i) {
      float* acc = scratch + i * nj;
      std::fill(acc, acc + nj, 0.0f);
    }
    for (int64_t k = 0; k < K; ++k) {
      const float* q = Q + k * q_ks + j0;
      for (int64_t i = 0; i < mt; ++i) {
        const float p = P[i * p_is + k * p_ks];
        float* acc = scratch + i * nj;
#pragma omp simd
        for (int64_t j = 0; j < nj; ++j) acc[j] += p * q[j];
      }
    }
    for (int64_t i = 0; i < mt; ++i)
      for (int64_t j = 0; j < nj; ++j) finish(i, j0 + j, scratch[i * nj + j]);
  } else {
    // P's rows copied contiguous, padded with zero rows to a multiple of 4; then 4 x 4 blocks of dots
    const int64_t mt4 = (mt + 3) / 4 * 4;
    for (int64_t i = 0; i < mt4; ++i)
      for (int64_t k = 0; k < K; ++k) scratch[i * K + k] = i < mt ? P[i * p_is + k * p_ks] : 0.0f;
    float d[4][4];
    for (int64_t i = 0; i < mt; i += 4) {
      for (int64_t j = j0; j < j1; j += 4) {
        const float* q[4];
        for (int jj = 0; jj < 4; ++jj) q[jj] = Q + std::min(j + jj, j1 - 1) * q_js;  // past j1: a repeat
        dot_4x4(scratch + i * K, K, q, d);
        for (int64_t ii = i; ii < std::min(mt, i + 4); ++ii)
          for (int64_t jj = j; jj < std::min(j1, j + 4); ++jj) finish(ii, jj, d[ii - i][jj - j]);
      }
    }
  }
}

void gemm_thin(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
               const float* B, int64_t ldb, float beta, float* C, int64_t ldc, const GemmEpilogue<float>& ep,
               bool parallel) {
  // the thin side's rows are C's rows (M <= N) or columns (C^T = op(B)^T op(A)^T)
  const bool rows = M <= N;
  const int64_t mt = rows ? M : N, nt = rows ? N : M;
  const float* P = rows ? A : B;
  const int64_t p_is = rows ? (trans_a ? 1 : lda) : (trans_b ? ldb : 1);
  const int64_t p_ks = rows ? (trans_a ? lda : 1) : (trans_b ? 1 : ldb);
  const float* Q = rows ? B : A;
  const int64_t q_ks = rows ? (trans_b ? 1 : ldb) : (trans_a ? lda : 1);
  const int64_t q_js = rows ? (trans_b ? ldb : 1) : (trans_a ? 1 : lda);
  const int64_t t_is = rows ? ldc : 1, t_js = rows ? 1 : ldc;
  // j in blocks of 64K: the axpy form streams long runs of Q rows (shorter runs measured slower at
  // M = 1, N = 32000) into accumulators that stay in L2 (<= 4 x 256 KB)
  constexpr int64_t kJBlock = 65536;
  auto run = [&](int64_t j0, int64_t j1) {
    static thread_local Scratch scratch;
    float* buf = scratch.get((mt + 3) / 4 * 4 * std::max(K, std::min(kJBlock, j1 - j0)));
    for (int64_t jb = j0; jb < j1; jb += kJBlock)
      thin_product(mt, jb, std::min(j1, jb + kJBlock), K, alpha, P, p_is, p_ks, Q, q_ks, q_js, beta, C, t_is, t_js,
                   buf);
  };
  const bool threads = parallel && at::get_num_threads() > 1 && !at::in_parallel_region() &&
                       M * N * K >= kParallelFmas;
  if (threads) at::parallel_for(0, nt, 256, run);
  else run(0, nt);
  if (has_epilogue(ep)) {
    auto ep_rows = [&](int64_t r0, int64_t r1) { epilogue_rows<float>(r0, r1, N, C, ldc, ep); };
    if (threads) at::parallel_for(0, M, std::max<int64_t>(1, 16384 / N), ep_rows);
    else ep_rows(0, M);
  }
}

void gemm_avx512(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                 int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc,
                 const GemmEpilogue<float>& ep, bool parallel) {
  const bool threads = parallel && at::get_num_threads() > 1 && !at::in_parallel_region() &&
                       M * N * K >= kParallelFmas;
  const int64_t nthreads = threads ? at::get_num_threads() : 1;
  const bool epilogue = has_epilogue(ep);
  const int64_t tiles = (M + kMR - 1) / kMR;

  // Work units: (row block) x (column chunk). Row blocks are runs of <= kMC / kMR tiles, as many as a
  // multiple of the threads; small M (one row block) splits the columns instead so all threads work.
  int64_t row_blocks = (tiles + kMC / kMR - 1) / (kMC / kMR);
  if (row_blocks >= nthreads) row_blocks = std::min(tiles, (row_blocks + nthreads - 1) / nthreads * nthreads);

  for (int64_t jc = 0; jc < N; jc += kNC) {
    const int64_t nc = std::min(kNC, N - jc), panels = (nc + kNR - 1) / kNR;
    const int64_t col_chunks = std::min(panels, std::max<int64_t>(1, (nthreads + row_blocks - 1) / row_blocks));
    const int64_t units = row_blocks * col_chunks;
    // K blocks are packed in groups of up to kBPackBytes (often all of K), one pass of the threads per
    // group: a thread wake-up per K block would cost ~10% at K = 4096, M = N = 128..384.
    const int64_t block_bytes = panels * kKC * kNR * (int64_t)sizeof(float);
    const int64_t group_k = std::max<int64_t>(1, kBPackBytes / block_bytes) * kKC;
    static thread_local Scratch b_scratch;
    float* bpack = b_scratch.get(((std::min(group_k, K) + kKC - 1) / kKC) * panels * kKC * kNR);

    for (int64_t kg = 0; kg < K; kg += group_k) {
      const int64_t kg_end = std::min(K, kg + group_k), blocks = (kg_end - kg + kKC - 1) / kKC;
      // B panel p of K block q: bpack + (q * panels + p) * kKC * kNR. The threads pack runs of panels
      // (all K blocks of each), the same runs their column chunks read when M is small: in the
      // packing thread's own L2.
      auto pack_b = [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t p = i / blocks, q = i % blocks, pc = kg + q * kKC;
          pack_b_panel(trans_b, B, ldb, pc, std::min(kKC, K - pc), jc + p * kNR, std::min<int64_t>(kNR, nc - p * kNR),
                       bpack + (q * panels + p) * kKC * kNR);
        }
      };
      if (threads) at::parallel_for(0, blocks * panels, 1, pack_b);
      else pack_b(0, blocks * panels);

      auto run_units = [&](int64_t u0, int64_t u1) {
        static thread_local Scratch a_scratch;
        float* apack = a_scratch.get(kMC * kKC);
        alignas(64) float tile[kMR * kNR];
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t rb = u / col_chunks, cb = u % col_chunks;
          const int64_t m0 = (rb * tiles / row_blocks) * kMR, m1 = std::min(M, ((rb + 1) * tiles / row_blocks) * kMR);
          const int64_t p0 = cb * panels / col_chunks, p1 = (cb + 1) * panels / col_chunks;
          for (int64_t q = 0; q < blocks; ++q) {
            const int64_t pc = kg + q * kKC, kc = std::min(kKC, K - pc);
            const bool first = pc == 0, last = pc + kc == K;
            for (int64_t m = m0; m < m1; m += kMR)
              pack_a_panel(trans_a, A, lda, m, std::min<int64_t>(kMR, m1 - m), pc, kc, apack + (m - m0) * kc);
            for (int64_t p = p0; p < p1; ++p) {
              const int64_t n = jc + p * kNR, nr = std::min<int64_t>(kNR, nc - p * kNR);
              const float* bp = bpack + (q * panels + p) * kKC * kNR;
              for (int64_t m = m0; m < m1; m += kMR) {
                const int64_t mr = std::min<int64_t>(kMR, m1 - m);
                float* c = C + m * ldc + n;
                const bool fuse = last && epilogue;  // the epilogue on this tile, through `tile`
                micro_kernel(kc, apack + (m - m0) * kc, bp, c, ldc, mr, nr, alpha, first ? beta : 1.0f,
                             !first || beta != 0.0f, fuse && ep.bias ? ep.bias + n : nullptr, fuse ? tile : nullptr);
                if (fuse) epilogue_tile(tile, c, ep.pre ? ep.pre + m * ldc + n : nullptr, ldc, mr, nr, ep.act);
              }
            }
          }
        }
      };
      if (threads) at::parallel_for(0, units, 1, run_units);
      else run_units(0, units);
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace fastattn
#endif  // AVX-512 GEMM

namespace fastattn {
namespace cpu {

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc, const GemmEpilogue<T>& ep, bool parallel) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0 || alpha == T(0)) {  // no product: C = beta * C (never reading C when beta == 0), then the epilogue
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    if (has_epilogue(ep)) epilogue_rows<T>(0, M, N, C, ldc, ep);
    return;
  }
#ifdef FASTATTN_HAVE_AVX512_GEMM
  if constexpr (std::is_same_v<T, float>) {
    const bool dots = M <= N ? trans_b : !trans_a;  // the thin side's partner is contiguous in k
    if (cpu_has_avx512() && (std::min(M, N) <= kThin || (dots && std::min(M, N) <= kThinDots)))
      return gemm_thin(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, ep, parallel);
    if (cpu_has_avx512())
      return gemm_avx512(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, ep, parallel);
  }
#endif
  gemm_blas<T>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, ep, parallel);
}

template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t,
                          float, float*, int64_t, const GemmEpilogue<float>&, bool);
template void gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t, const double*,
                           int64_t, double, double*, int64_t, const GemmEpilogue<double>&, bool);

const char* gemm_kernel_name() {
#ifdef FASTATTN_HAVE_AVX512_GEMM
  if (cpu_has_avx512()) return "avx512 packed 14x32 (KC 256, MC 168, NC 1024); thin M or N: unpacked";
#endif
  return "blas (sgemm_/dgemm_ of libtorch_cpu)";
}

}  // namespace cpu
}  // namespace fastattn
