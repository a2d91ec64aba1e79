// Fused attention on the CPU: flash-style forward and backward, for dense (B, H, L, E) batches
// (attention_fwd/bwd) and packed variable-length batches (attention_varlen_fwd/bwd).
//
// The contract (layouts, window rule, softcap, dropout hash, empty rows) is the docstring of
// fastattn/ops/attention.py; every backend implements the same one.
//
// One core for both ops. A problem is a list of sequences (the dense op: B equal ones), each an
// L x S attention per head; `RowMap`s say where row i of head h of a sequence lives in each tensor,
// so the loops below never know which layout they read.
//
// Blocking. The scores of one (sequence, head) are cut into BLOCK_M query rows x BLOCK_N keys
// tiles; the L x S matrix never exists. Tile products (Q Kᵀ, P V, and the four of the backward) are
// BLAS sgemm_/dgemm_ calls on raw pointers (fp16/bf16 tiles are converted to fp32 in per-thread
// scratch first), except on AVX-512 CPUs, where every fp32 tile product runs on our own micro-kernel
// (gemm_avx512; FASTATTN_ATTN_GEMM=blas turns it off), and so do the softmax rows (masked vectors:
// short rows, S ~ 13, cost one vector, not a scalar loop); the other element-wise work on a tile
// (softcap, dropout, the score gradient) is in the FASTATTN_SIMD functions, compiled per ISA.
//
// Forward: one task = one query block of one (sequence, head): online softmax over its visible key
// blocks (running max m, sum l, accumulator rescaled by exp(m_old - m_new)); key blocks that the
// window/causal rule hides entirely are never visited. The query blocks of all sequences form one
// list, longest sequences first, so uneven lengths balance over the threads. With few query rows
// (decoding, L <= 16) a task is additionally one slice of the key blocks (split-KV) when the query
// blocks alone are too little work: each slice writes its partial (acc, m, l) and a reduce pass
// combines them. Tiles of <= 4 query rows replace the two GEMMs by prefetching streaming loops
// (memory-bound: K and V read once; on AVX-512, 16 keys a step for Q·Kᵀ).
// Backward: delta = rowsum(dO * O); P is recomputed from the saved lse. "fused" mode: one task =
// one (sequence, kv head), walking key blocks outer and (query head of the group, query block)
// inner, so dK/dV of a key block and dQ of the task's heads are owned by the task (no atomics; 5
// GEMMs a tile). "split" mode, when those tasks are too few or too uneven to keep the threads
// busy: pass 1 one task per key block computes dK/dV, pass 2 one task per query block computes dQ.
// Tasks are handed out dynamically, but each result is summed in a fixed order: deterministic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#include <utility>

#include "cpu/simd.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include "cpu/avx512_exp.h"
#define FASTATTN_AVX512_TILES 1  // the AVX-512 tile micro-kernel below (chosen at run time)
#endif

TORCH_LIBRARY_FRAGMENT(fastattn, m) {
  m.def(
      "attention_fwd(Tensor query, Tensor key, Tensor value, Tensor? attn_bias, float dropout_p, "
      "float scale, int window_left, int window_right, int diag_offset, float softcap, int seed) "
      "-> (Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor lse, "
      "Tensor? attn_bias, float dropout_p, float scale, int window_left, int window_right, "
      "int diag_offset, float softcap, int seed) -> (Tensor, Tensor, Tensor)");
  // Packed variable-length batches (flash-attn's cu_seqlens convention); contract in
  // fastattn/ops/attention.py.
  m.def(
      "attention_varlen_fwd(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float dropout_p, float scale, "
      "int window_left, int window_right, bool bottom_right, float softcap, int seed) -> (Tensor, Tensor)");
  m.def(
      "attention_varlen_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "float dropout_p, float scale, int window_left, int window_right, bool bottom_right, "
      "float softcap, int seed) -> (Tensor, Tensor, Tensor)");
}

#include "blas.h"

namespace fastattn {
namespace attn_cpu {

constexpr int64_t kFewRows = 4;  // tiles with at most this many query rows skip BLAS (decoding)

// ---------------------------------------------------------------------------------------------
// Row-major GEMMs on raw pointers. BLAS is column-major, and a row-major X is a column-major Xᵀ,
// so C = A·B is computed as Cᵀ = Bᵀ·Aᵀ (operands swapped).
// ---------------------------------------------------------------------------------------------
inline void blas(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void blas(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda,
                 const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// C[M×N] = alpha·A[M×K]·B[N×K]ᵀ + beta·C
template <typename T>
void gemm_abt(int M, int N, int K, T alpha, const T* A, int lda, const T* B, int ldb, T beta, T* C, int ldc) {
  if (M > 0 && N > 0) blas('T', 'N', N, M, K, alpha, B, ldb, A, lda, beta, C, ldc);
}
// C[M×N] = alpha·A[M×K]·B[K×N] + beta·C
template <typename T>
void gemm_ab(int M, int N, int K, T alpha, const T* A, int lda, const T* B, int ldb, T beta, T* C, int ldc) {
  if (M > 0 && N > 0) blas('N', 'N', N, M, K, alpha, B, ldb, A, lda, beta, C, ldc);
}
// C[M×N] = alpha·A[K×M]ᵀ·B[K×N] + beta·C
template <typename T>
void gemm_atb(int M, int N, int K, T alpha, const T* A, int lda, const T* B, int ldb, T beta, T* C, int ldc) {
  if (M > 0 && N > 0) blas('N', 'T', N, M, K, alpha, B, ldb, A, lda, beta, C, ldc);
}

// ---------------------------------------------------------------------------------------------
// The fp32 tile products on AVX-512 (our own micro-kernel). The BLAS this torch ships (MKL) runs
// its AVX2 code on non-Intel CPUs, and on small tiles its packing costs more than the product; with
// 512-bit FMAs and no packing the tile products go faster (the backward ~1.6x at L = 1024).
// C[M×N] = alpha·A[M×K]·B[K×N] (+ C when accumulate): blocks of 6 rows x 64 columns of C stay in 24
// zmm registers while k runs; each step broadcasts A[r][k] and multiplies it with the 64 floats of
// row k of B (masked loads/stores at the right edge). QKᵀ takes B = Kᵀ (transposed into scratch
// once per key block), P·V takes B = V as it is.
// ---------------------------------------------------------------------------------------------
#if defined(FASTATTN_AVX512_TILES)
// NV: the vectors of the 64 columns that lie inside C (1..4): narrow tiles (S ~ 13) skip the rest.
template <int MR, int NV>
__attribute__((target("avx512f,fma"))) inline void rows_x64_avx512(int K, float alpha, const float* A, int64_t a_rs,
                                                                    int64_t a_cs, const float* B, int ldb,
                                                                    bool accumulate, float* C, int ldc,
                                                                    const __mmask16* mask) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int k = 0; k < K; ++k) {
    const float* b = B + static_cast<int64_t>(k) * ldb;
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_maskz_loadu_ps(mask[v], b + 16 * v);
    const float* a_k = A + k * a_cs;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(a_k[r * a_rs]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a, bv[v], acc[r][v]);
    }
  }
  const __m512 al = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {  // masked: columns past the edge are neither read nor written
      float* c = C + static_cast<int64_t>(r) * ldc + 16 * v;
      __m512 x = _mm512_mul_ps(al, acc[r][v]);
      if (accumulate) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(mask[v], c));
      _mm512_mask_storeu_ps(c, mask[v], x);
    }
}

template <int NV>
__attribute__((target("avx512f,fma"))) void rows_block_avx512(int M, int K, float alpha, const float* A, int64_t a_rs,
                                                               int64_t a_cs, const float* B, int ldb, bool accumulate,
                                                               float* C, int ldc, const __mmask16* mask) {
  int i = 0;
  for (; i + 6 <= M; i += 6)
    rows_x64_avx512<6, NV>(K, alpha, A + i * a_rs, a_rs, a_cs, B, ldb, accumulate, C + static_cast<int64_t>(i) * ldc,
                           ldc, mask);
  for (; i < M; ++i)
    rows_x64_avx512<1, NV>(K, alpha, A + i * a_rs, a_rs, a_cs, B, ldb, accumulate, C + static_cast<int64_t>(i) * ldc,
                           ldc, mask);
}

// A is read as A[r·a_rs + k·a_cs]: (lda, 1) for A itself, (1, lda) for the transpose of a K x M matrix.
__attribute__((target("avx512f,fma"))) void gemm_avx512(int M, int N, int K, float alpha, const float* A, int64_t a_rs,
                                                        int64_t a_cs, const float* B, int ldb, bool accumulate, float* C,
                                                        int ldc) {
  for (int j = 0; j < N; j += 64) {
    __mmask16 mask[4];
    for (int v = 0; v < 4; ++v) {
      const int c = N - j - 16 * v;
      mask[v] = c >= 16 ? __mmask16(0xFFFF) : c <= 0 ? __mmask16(0) : __mmask16((1u << c) - 1);
    }
    const int nv = std::min(4, (N - j + 15) / 16);
    const float* b = B + j;
    float* c = C + j;
    switch (nv) {
      case 1: rows_block_avx512<1>(M, K, alpha, A, a_rs, a_cs, b, ldb, accumulate, c, ldc, mask); break;
      case 2: rows_block_avx512<2>(M, K, alpha, A, a_rs, a_cs, b, ldb, accumulate, c, ldc, mask); break;
      case 3: rows_block_avx512<3>(M, K, alpha, A, a_rs, a_cs, b, ldb, accumulate, c, ldc, mask); break;
      default: rows_block_avx512<4>(M, K, alpha, A, a_rs, a_cs, b, ldb, accumulate, c, ldc, mask); break;
    }
  }
}
void gemm_avx512(int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb, bool accumulate,
                 float* C, int ldc) {
  gemm_avx512(M, N, K, alpha, A, lda, 1, B, ldb, accumulate, C, ldc);
}

// Decoding (<= kFewRows query rows) on AVX-512: the two tile products as streaming loops over the
// keys, bound by reading K and V once. Both prefetch kDecodePrefetch keys ahead: the hardware
// prefetcher stops at 4 KiB pages, the software one keeps the stream going (measured: without it
// the decode ran ~25% below a plain read of K and V; with it, level with one).
constexpr int64_t kDecodePrefetch = 16;
inline void prefetch_floats(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(x + i);
}

// Q·Kᵀ: 16 keys a step, each key's E products summed into one vector of 16 lane sums, then the 16
// vectors reduced to one vector of 16 scores (a transpose-add tree, ~3 shuffles + adds a key
// instead of a full horizontal sum per key).
__attribute__((target("avx512f"))) inline __m512 sum_lanes_x16(__m512 v[16]) {
  __m512 w[8], x[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of keys 2i, 2i+1
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's partial sums of keys 4i..4i+3
    const __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
    x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // Fold the four 128-bit lanes: y0 = [x0(L0+L1), x0(L2+L3), x1(L0+L1), x1(L2+L3)], then whole sums.
  const __m512 y0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xDD));
  const __m512 y1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88), _mm512_shuffle_f32x4(x[2], x[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y0, y1, 0x88), _mm512_shuffle_f32x4(y0, y1, 0xDD));
}

// s[r][j] = alpha · q_r·k_j for keys [0, n - n % 16) (the caller does the rest); E any size.
__attribute__((target("avx512f,fma"))) void scores_few_rows_avx512(float* s, int64_t ld, const float* q, int64_t ldq,
                                                                   int64_t rows, const float* k, int64_t ldk,
                                                                   int64_t n, int64_t E, float alpha) {
  const int64_t e_full = E / 16 * 16;
  const __mmask16 e_tail = static_cast<__mmask16>((1u << (E % 16)) - 1);
  const __m512 al = _mm512_set1_ps(alpha);
  for (int64_t j0 = 0; j0 + 16 <= n; j0 += 16) {
    const float* kb = k + j0 * ldk;
    if (j0 + kDecodePrefetch + 16 <= n)
      for (int j = 0; j < 16; ++j) prefetch_floats(kb + (kDecodePrefetch + j) * ldk, E);
    for (int64_t r = 0; r < rows; ++r) {
      const float* qr = q + r * ldq;
      __m512 acc[16];
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t e = 0; e < e_full; e += 16) {
        const __m512 qe = _mm512_loadu_ps(qr + e);
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(qe, _mm512_loadu_ps(kb + j * ldk + e), acc[j]);
      }
      if (e_tail) {
        const __m512 qe = _mm512_maskz_loadu_ps(e_tail, qr + e_full);
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j)
          acc[j] = _mm512_fmadd_ps(qe, _mm512_maskz_loadu_ps(e_tail, kb + j * ldk + e_full), acc[j]);
      }
      _mm512_storeu_ps(s + r * ld + j0, _mm512_mul_ps(al, sum_lanes_x16(acc)));
    }
  }
}

// acc[r][:] += Σ_j p[r][j] · v_j for R rows. Keys in chunks of 64 (in L1); per chunk, 64 output
// columns a pass (4 vectors a row, masked at the edge). With 1 or 2 rows the keys go in pairs into
// two sets of accumulators (two FMA chains a vector); with 3 or 4 the rows give enough chains.
template <int R>
__attribute__((target("avx512f,fma"))) void pv_rows_avx512(float* acc, int64_t ld_acc, const float* p, int64_t ld,
                                                            const float* v, int64_t ldv, int64_t n, int64_t Ev) {
  constexpr int KS = R <= 2 ? 2 : 1;  // keys a step = accumulator sets
  constexpr int64_t kChunk = 64;
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int64_t j1 = std::min(n, j0 + kChunk);
    for (int64_t c0 = 0; c0 < Ev; c0 += 64) {
      __mmask16 mask[4];
      for (int u = 0; u < 4; ++u) {
        const int64_t c = Ev - c0 - 16 * u;
        mask[u] = c >= 16 ? __mmask16(0xFFFF) : c <= 0 ? __mmask16(0) : __mmask16((1u << c) - 1);
      }
      __m512 a[KS][R][4];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
          a[0][r][u] = _mm512_maskz_loadu_ps(mask[u], acc + r * ld_acc + c0 + 16 * u);
          if constexpr (KS == 2) a[1][r][u] = _mm512_setzero_ps();
        }
      for (int64_t j = j0; j < j1; j += KS) {
        if (c0 == 0 && j + kDecodePrefetch + KS <= n)
          for (int set = 0; set < KS; ++set) prefetch_floats(v + (j + kDecodePrefetch + set) * ldv, Ev);
#pragma GCC unroll 2
        for (int set = 0; set < KS; ++set) {
          if (KS > 1 && j + set >= j1) break;
          const float* vj = v + (j + set) * ldv + c0;
          __m512 x[4];
#pragma GCC unroll 4
          for (int u = 0; u < 4; ++u) x[u] = _mm512_maskz_loadu_ps(mask[u], vj + 16 * u);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            const __m512 pj = _mm512_set1_ps(p[r * ld + j + set]);
#pragma GCC unroll 4
            for (int u = 0; u < 4; ++u) a[set][r][u] = _mm512_fmadd_ps(pj, x[u], a[set][r][u]);
          }
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
          __m512 x = a[0][r][u];
          if constexpr (KS == 2) x = _mm512_add_ps(x, a[1][r][u]);
          _mm512_mask_storeu_ps(acc + r * ld_acc + c0 + 16 * u, mask[u], x);
        }
    }
  }
}

void pv_few_rows_avx512(float* acc, int64_t ld_acc, const float* p, int64_t ld, int64_t rows, const float* v,
                        int64_t ldv, int64_t n, int64_t Ev) {
  switch (rows) {
    case 1: return pv_rows_avx512<1>(acc, ld_acc, p, ld, v, ldv, n, Ev);
    case 2: return pv_rows_avx512<2>(acc, ld_acc, p, ld, v, ldv, n, Ev);
    case 3: return pv_rows_avx512<3>(acc, ld_acc, p, ld, v, ldv, n, Ev);
    default: return pv_rows_avx512<4>(acc, ld_acc, p, ld, v, ldv, n, Ev);
  }
}

// Softmax rows on AVX-512: 16 scores a vector, the row's tail under a mask. The compiler's
// vectorized loops (online_softmax below) run their tail one element at a time, which is the whole
// row when rows are short (S ~ 13: most of a small problem's time went there).
using avx512::exp16;  // csrc/cpu/avx512_exp.h

inline __mmask16 first_lanes(int64_t count) {  // lanes [0, count) of a 16-lane vector (count >= 0)
  return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
}

// online_softmax (below) on AVX-512.
__attribute__((target("avx512f,fma"))) void online_softmax_avx512(float* s, int64_t ld, int64_t rows, int64_t n,
                                                                  float* m, float* l, float* alpha) {
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    float* x = s + r * ld;
    __m512 mx = _mm512_set1_ps(-inf);
    for (int64_t j = 0; j < n; j += 16)
      mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-inf), first_lanes(n - j), x + j));
    const float m_new = std::max(m[r], _mm512_reduce_max_ps(mx));
    const float base = m_new == -inf ? 0.0f : m_new;  // nothing visible yet: exp(-inf - 0) = 0
    const float a = m[r] == -inf ? 0.0f : simd::exp_f32(m[r] - m_new);
    const __m512 b = _mm512_set1_ps(base);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 k = first_lanes(n - j);
      const __m512 p = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), b)));
      _mm512_mask_storeu_ps(x + j, k, p);
      sum = _mm512_add_ps(sum, p);
    }
    l[r] = a * l[r] + _mm512_reduce_add_ps(sum);
    m[r] = m_new;
    alpha[r] = a;
  }
}

// probs_from_lse (below) on AVX-512.
__attribute__((target("avx512f,fma"))) void probs_from_lse_avx512(float* s, int64_t ld, int64_t rows, int64_t n,
                                                                  const float* lse) {
  for (int64_t r = 0; r < rows; ++r) {
    float* x = s + r * ld;
    if (lse[r] == std::numeric_limits<float>::infinity()) {
      std::fill(x, x + n, 0.0f);
      continue;
    }
    const __m512 b = _mm512_set1_ps(lse[r]);
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 k = first_lanes(n - j);
      _mm512_mask_storeu_ps(x + j, k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), b)));
    }
  }
}

// (fp64 tiles always take BLAS: this overload only lets the callers' fp32/fp64 code read alike.)
void gemm_avx512(int, int, int, double, const double*, int64_t, int64_t, const double*, int, bool, double*, int) {
  TORCH_CHECK(false, "attention: the AVX-512 tile products are fp32 only");
}

// Whether the forward uses it: an AVX-512 CPU, unless FASTATTN_ATTN_GEMM=blas (tests compare both).
bool use_avx512_tiles() {
  static const bool cpu_has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  const char* env = std::getenv("FASTATTN_ATTN_GEMM");
  return cpu_has && !(env && std::strcmp(env, "blas") == 0);
}
#else
bool use_avx512_tiles() { return false; }
void gemm_avx512(int, int, int, float, const float*, int, const float*, int, bool, float*, int) {}
void gemm_avx512(int, int, int, float, const float*, int64_t, int64_t, const float*, int, bool, float*, int) {}
void gemm_avx512(int, int, int, double, const double*, int64_t, int64_t, const double*, int, bool, double*, int) {}
void online_softmax_avx512(float*, int64_t, int64_t, int64_t, float*, float*, float*) {}
void probs_from_lse_avx512(float*, int64_t, int64_t, int64_t, const float*) {}
void scores_few_rows_avx512(float*, int64_t, const float*, int64_t, int64_t, const float*, int64_t, int64_t,
                            int64_t, float) {}
void pv_few_rows_avx512(float*, int64_t, const float*, int64_t, int64_t, const float*, int64_t, int64_t,
                        int64_t) {}
#endif

// ---------------------------------------------------------------------------------------------
// Element-wise tile work (vectorized per ISA). Tiles are `rows` x `n`, row stride `ld`.
// ---------------------------------------------------------------------------------------------
FASTATTN_INLINE uint32_t mix32(uint32_t x) {  // lowbias32, as _mix32 in attention.py
  x ^= x >> 16;
  x *= 0x7FEB352DU;
  x ^= x >> 15;
  x *= 0x846CA68BU;
  x ^= x >> 16;
  return x;
}

FASTATTN_INLINE float tanh_t(float x) {
  float e = simd::exp_f32(2.0f * x);  // +inf for large x: 1 - 0; 0 for very negative x: 1 - 2
  return 1.0f - 2.0f / (e + 1.0f);
}
FASTATTN_INLINE double tanh_t(double x) { return std::tanh(x); }

// s = cap·tanh(s / cap); t (if given) keeps tanh(s / cap) for the backward's chain rule.
template <typename T>
FASTATTN_INLINE void softcap_impl(T* s, T* t, int64_t ld, int64_t rows, int64_t n, T cap) {
  const T inv = T(1) / cap;
  for (int64_t r = 0; r < rows; ++r) {
    T* x = s + r * ld;
    if (t) {
      T* y = t + r * ld;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        T th = tanh_t(x[j] * inv);
        y[j] = th;
        x[j] = cap * th;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) x[j] = cap * tanh_t(x[j] * inv);
    }
  }
}
FASTATTN_SIMD void softcap_tile(float* s, float* t, int64_t ld, int64_t rows, int64_t n, float cap) {
  softcap_impl(s, t, ld, rows, n, cap);
}
void softcap_tile(double* s, double* t, int64_t ld, int64_t rows, int64_t n, double cap) {
  softcap_impl(s, t, ld, rows, n, cap);
}

// One online-softmax step. On entry s holds the scores of one key block; on exit exp(s - m_new).
// m, l: running row max and sum (updated); alpha: the factor the row's accumulator must take.
template <typename T>
FASTATTN_INLINE void online_softmax_impl(T* s, int64_t ld, int64_t rows, int64_t n, T* m, T* l, T* alpha) {
  const T inf = std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    T* x = s + r * ld;
    T mx = -inf;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < n; ++j) mx = x[j] > mx ? x[j] : mx;
    const T m_new = std::max(m[r], mx);
    const T base = m_new == -inf ? T(0) : m_new;  // nothing visible yet: exp(-inf - 0) = 0
    const T a = m[r] == -inf ? T(0) : simd::exp_t<T>(m[r] - m_new);
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      T p = simd::exp_t<T>(x[j] - base);
      x[j] = p;
      sum += p;
    }
    l[r] = a * l[r] + sum;
    m[r] = m_new;
    alpha[r] = a;
  }
}
FASTATTN_SIMD void online_softmax(float* s, int64_t ld, int64_t rows, int64_t n, float* m, float* l, float* alpha) {
  online_softmax_impl(s, ld, rows, n, m, l, alpha);
}
void online_softmax(double* s, int64_t ld, int64_t rows, int64_t n, double* m, double* l, double* alpha) {
  online_softmax_impl(s, ld, rows, n, m, l, alpha);
}

// Few query rows (decoding): the tile products as streaming loops over the keys. There the work
// is bound by reading K and V once, and BLAS calls on 1..4-row operands cost more than the loop.
// s[r][j] = alpha * q_r · k_j
template <typename T>
FASTATTN_INLINE void prefetch_row(const T* row, int64_t n) {
  for (int64_t x = 0; x < n; x += 64 / sizeof(T)) __builtin_prefetch(row + x);
}
template <typename T>
FASTATTN_INLINE void scores_few_rows_impl(T* s, int64_t ld, const T* q, int64_t ldq, int64_t rows, const T* k,
                                          int64_t ldk, int64_t n, int64_t E, T alpha) {
  for (int64_t j = 0; j < n; ++j) {
    const T* kj = k + j * ldk;
    if (j + 16 < n) prefetch_row(kj + 16 * ldk, E);  // ~4 KiB ahead of the stream
    for (int64_t r = 0; r < rows; ++r) {
      // One 64-byte vector of partial sums, then a tree (the compiler's own reduction epilogue
      // adds the lanes one after another).
      constexpr int W = 64 / sizeof(T);
      const T* qr = q + r * ldq;
      T lane[W] = {};
      int64_t e = 0;
      for (; e + W <= E; e += W) {
#pragma omp simd
        for (int w = 0; w < W; ++w) lane[w] += qr[e + w] * kj[e + w];
      }
      T sum = 0;
      for (; e < E; ++e) sum += qr[e] * kj[e];
      for (int h = W / 2; h >= 1; h /= 2)
        for (int w = 0; w < h; ++w) lane[w] += lane[w + h];
      s[r * ld + j] = alpha * (sum + lane[0]);
    }
  }
}
FASTATTN_SIMD void scores_few_rows(float* s, int64_t ld, const float* q, int64_t ldq, int64_t rows, const float* k,
                                   int64_t ldk, int64_t n, int64_t E, float alpha) {
  scores_few_rows_impl(s, ld, q, ldq, rows, k, ldk, n, E, alpha);
}
void scores_few_rows(double* s, int64_t ld, const double* q, int64_t ldq, int64_t rows, const double* k,
                     int64_t ldk, int64_t n, int64_t E, double alpha) {
  scores_few_rows_impl(s, ld, q, ldq, rows, k, ldk, n, E, alpha);
}

// acc[r] += Σ_j p[r][j] · v_j, four keys a step (a short dependency chain through acc)
template <typename T>
FASTATTN_INLINE void pv_few_rows_impl(T* acc, int64_t ld_acc, const T* p, int64_t ld, int64_t rows, const T* v,
                                      int64_t ldv, int64_t n, int64_t Ev) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const T *v0 = v + j * ldv, *v1 = v0 + ldv, *v2 = v1 + ldv, *v3 = v2 + ldv;
    if (j + 20 <= n)
      for (int64_t ahead = 16; ahead < 20; ++ahead) prefetch_row(v0 + ahead * ldv, Ev);
    for (int64_t r = 0; r < rows; ++r) {
      const T* pr = p + r * ld + j;
      const T p0 = pr[0], p1 = pr[1], p2 = pr[2], p3 = pr[3];
      if (p0 == T(0) && p1 == T(0) && p2 == T(0) && p3 == T(0)) continue;  // masked or dropped
      T* a = acc + r * ld_acc;
#pragma omp simd
      for (int64_t c = 0; c < Ev; ++c) a[c] += (p0 * v0[c] + p1 * v1[c]) + (p2 * v2[c] + p3 * v3[c]);
    }
  }
  for (; j < n; ++j) {
    const T* vj = v + j * ldv;
    for (int64_t r = 0; r < rows; ++r) {
      const T pj = p[r * ld + j];
      T* a = acc + r * ld_acc;
#pragma omp simd
      for (int64_t c = 0; c < Ev; ++c) a[c] += pj * vj[c];
    }
  }
}
FASTATTN_SIMD void pv_few_rows(float* acc, int64_t ld_acc, const float* p, int64_t ld, int64_t rows, const float* v,
                               int64_t ldv, int64_t n, int64_t Ev) {
  pv_few_rows_impl(acc, ld_acc, p, ld, rows, v, ldv, n, Ev);
}
void pv_few_rows(double* acc, int64_t ld_acc, const double* p, int64_t ld, int64_t rows, const double* v,
                 int64_t ldv, int64_t n, int64_t Ev) {
  pv_few_rows_impl(acc, ld_acc, p, ld, rows, v, ldv, n, Ev);
}

// acc row r *= alpha[r] (skipped where alpha is 1)
template <typename T>
FASTATTN_INLINE void scale_rows_impl(T* acc, int64_t ld, int64_t rows, int64_t n, const T* alpha) {
  for (int64_t r = 0; r < rows; ++r) {
    const T a = alpha[r];
    if (a == T(1)) continue;
    T* x = acc + r * ld;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) x[j] *= a;
  }
}
FASTATTN_SIMD void scale_rows(float* acc, int64_t ld, int64_t rows, int64_t n, const float* alpha) {
  scale_rows_impl(acc, ld, rows, n, alpha);
}
void scale_rows(double* acc, int64_t ld, int64_t rows, int64_t n, const double* alpha) {
  scale_rows_impl(acc, ld, rows, n, alpha);
}

// Dropout multipliers of one tile: keep[r][j] = 1/(1-p) if entry (row_hash[r], j0 + j) is kept, else 0.
template <typename T>
FASTATTN_INLINE void dropout_keep_impl(T* keep, int64_t ld, int64_t rows, int64_t n, const uint32_t* row_hash,
                                       uint32_t j0, uint32_t threshold, T inv_keep) {
  for (int64_t r = 0; r < rows; ++r) {
    T* y = keep + r * ld;
    const uint32_t rh = row_hash[r];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      uint32_t h = mix32(rh ^ (j0 + static_cast<uint32_t>(j)));
      y[j] = h >= threshold ? inv_keep : T(0);
    }
  }
}
FASTATTN_SIMD void dropout_keep(float* keep, int64_t ld, int64_t rows, int64_t n, const uint32_t* row_hash,
                                uint32_t j0, uint32_t threshold, float inv_keep) {
  dropout_keep_impl(keep, ld, rows, n, row_hash, j0, threshold, inv_keep);
}
void dropout_keep(double* keep, int64_t ld, int64_t rows, int64_t n, const uint32_t* row_hash, uint32_t j0,
                  uint32_t threshold, double inv_keep) {
  dropout_keep_impl(keep, ld, rows, n, row_hash, j0, threshold, inv_keep);
}

// out = a ∘ b (element-wise)
template <typename T>
FASTATTN_INLINE void mul_tile_impl(T* out, const T* a, const T* b, int64_t ld, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[r * ld + j] = a[r * ld + j] * b[r * ld + j];
  }
}
FASTATTN_SIMD void mul_tile(float* out, const float* a, const float* b, int64_t ld, int64_t rows, int64_t n) {
  mul_tile_impl(out, a, b, ld, rows, n);
}
void mul_tile(double* out, const double* a, const double* b, int64_t ld, int64_t rows, int64_t n) {
  mul_tile_impl(out, a, b, ld, rows, n);
}

// Backward: s (scores) -> P = exp(s - lse); lse = +inf (an empty row) gives 0.
template <typename T>
FASTATTN_INLINE void probs_from_lse_impl(T* s, int64_t ld, int64_t rows, int64_t n, const T* lse) {
  for (int64_t r = 0; r < rows; ++r) {
    T* x = s + r * ld;
    const T b = lse[r];
    if (b == std::numeric_limits<T>::infinity()) {
      std::fill(x, x + n, T(0));
      continue;
    }
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) x[j] = simd::exp_t<T>(x[j] - b);
  }
}
FASTATTN_SIMD void probs_from_lse(float* s, int64_t ld, int64_t rows, int64_t n, const float* lse) {
  probs_from_lse_impl(s, ld, rows, n, lse);
}
void probs_from_lse(double* s, int64_t ld, int64_t rows, int64_t n, const double* lse) {
  probs_from_lse_impl(s, ld, rows, n, lse);
}

// Backward: dp (= dO·Vᵀ) becomes the gradient of the raw scores:
//   dS = P ∘ (dP ∘ keep − Δ), then ∘ (1 − t²) through the softcap.
template <typename T>
FASTATTN_INLINE void score_grad_impl(T* dp, const T* p, const T* keep, const T* t, int64_t ld, int64_t rows,
                                     int64_t n, const T* delta) {
  for (int64_t r = 0; r < rows; ++r) {
    T* g = dp + r * ld;
    const T* pr = p + r * ld;
    const T d = delta[r];
    if (keep) {
      const T* kr = keep + r * ld;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) g[j] = pr[j] * (g[j] * kr[j] - d);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) g[j] = pr[j] * (g[j] - d);
    }
    if (t) {
      const T* tr = t + r * ld;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) g[j] *= T(1) - tr[j] * tr[j];
    }
  }
}
FASTATTN_SIMD void score_grad(float* dp, const float* p, const float* keep, const float* t, int64_t ld, int64_t rows,
                              int64_t n, const float* delta) {
  score_grad_impl(dp, p, keep, t, ld, rows, n, delta);
}
void score_grad(double* dp, const double* p, const double* keep, const double* t, int64_t ld, int64_t rows,
                int64_t n, const double* delta) {
  score_grad_impl(dp, p, keep, t, ld, rows, n, delta);
}

// ---------------------------------------------------------------------------------------------
// Problem description shared by forward and backward, by the dense and the packed (varlen) op.
//
// Both ops are a list of sequences; one (sequence, head) is an L x S attention problem. Where row i
// of head h of a sequence lives in a tensor is a RowMap: element offset index·seq + h·head + i·row,
// where index is the sequence's batch index (dense (B, H, L, E) tensors) or its first packed row
// (varlen (total, H, E) tensors, where seq == row). The loops below reach every tensor through
// RowMaps, so one tiled core serves both layouts.
// ---------------------------------------------------------------------------------------------
struct RowMap {
  int64_t seq = 0, head = 0, row = 0;
  int64_t at(int64_t index, int64_t h, int64_t i) const { return index * seq + h * head + i * row; }
};

struct Seq {
  int64_t L, S, diag;  // query rows, keys, diagonal offset of the window rule
  int64_t qi, ki;      // index into the query-side / key-side RowMaps (batch index or first row)
};

struct Problem {
  int64_t Hq, Hkv, E, Ev, group;
  double scale, softcap, dropout_p;
  int64_t window_left, window_right;
  uint32_t seed_hash, threshold;
  std::vector<Seq> seqs;
  int64_t max_L = 0, max_S = 0;
  // q, k, v: the inputs; out: also grad_out (contiguous like out); stat: lse and delta (row stride 1),
  // and its offset is the row number the dropout hash takes; dq, dk, dv: the gradients (contiguous).
  RowMap q, k, v, out, stat, dq, dk, dv;
  RowMap bias;  // dense op only, plus the stride between keys
  bool own_gemm = false;  // fp32 tile products on our AVX-512 micro-kernels (use_avx512_tiles())
  int64_t bias_col = 0;
  bool has_bias = false;

  // Visible keys of query row i: [key_lo(i), key_hi(i)] (unclipped; may be empty).
  int64_t key_lo(const Seq& s, int64_t i) const { return window_left >= 0 ? i + s.diag - window_left : INT64_MIN / 4; }
  int64_t key_hi(const Seq& s, int64_t i) const { return window_right >= 0 ? i + s.diag + window_right : INT64_MAX / 4; }
  // Query rows that see key j: [query_lo(j), query_hi(j)].
  int64_t query_lo(const Seq& s, int64_t j) const {
    return window_right >= 0 ? j - s.diag - window_right : INT64_MIN / 4;
  }
  int64_t query_hi(const Seq& s, int64_t j) const {
    return window_left >= 0 ? j - s.diag + window_left : INT64_MAX / 4;
  }
  bool windowed() const { return window_left >= 0 || window_right >= 0; }
  // Does every (i, j) of rows [i0, i1) x keys [j0, j1) pass the window rule?
  bool all_visible(const Seq& s, int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    return j0 >= key_lo(s, i1 - 1) && j1 - 1 <= key_hi(s, i0);
  }
  // Keys [lo, hi] (clipped to the sequence) that rows [i0, i0 + rows) see; hi < lo when none.
  std::pair<int64_t, int64_t> key_range(const Seq& s, int64_t i0, int64_t rows) const {
    return {std::max<int64_t>(0, key_lo(s, i0)), std::min<int64_t>(s.S - 1, key_hi(s, i0 + rows - 1))};
  }
  // Number of visible (query, key) pairs of a sequence: the work it costs (used to balance tasks).
  int64_t visible_pairs(const Seq& s) const {
    if (!windowed()) return s.L * s.S;
    int64_t n = 0;
    for (int64_t i = 0; i < s.L; ++i) {
      auto [lo, hi] = key_range(s, i, 1);
      n += std::max<int64_t>(0, hi - lo + 1);
    }
    return n;
  }
  uint32_t row_hash(const Seq& s, int64_t h, int64_t i) const {
    return mix32(seed_hash ^ static_cast<uint32_t>(static_cast<uint64_t>(stat.at(s.qi, h, i))));
  }
};

// Rows [0, n) of a (n × width) matrix with row stride `stride`, as acc_t: the matrix itself when it
// already is acc_t with a BLAS-usable stride, else converted into `buf` (row stride `width`).
template <typename acc_t>
struct Tile {
  const acc_t* ptr;
  int ld;
};
// `buf` grows on first use: fp32 inputs with ordinary strides never need it.
template <typename scalar_t, typename acc_t>
Tile<acc_t> load_rows(const scalar_t* src, int64_t stride, int64_t n, int64_t width, std::vector<acc_t>& buf) {
  const int dense_ld = static_cast<int>(std::max<int64_t>(width, 1));
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (n == 1) return {src, dense_ld};
    if (stride >= width && stride >= 1 && stride <= INT32_MAX) return {src, static_cast<int>(stride)};
  }
  if (static_cast<int64_t>(buf.size()) < n * width) buf.resize(n * width);
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t* x = src + r * stride;
    acc_t* y = buf.data() + r * width;
    for (int64_t c = 0; c < width; ++c) y[c] = static_cast<acc_t>(x[c]);
  }
  return {buf.data(), dense_ld};
}

// s[r][j] += bias[r * s_row + j * s_col] (any strides, 0 included)
template <typename scalar_t, typename acc_t>
void add_bias(acc_t* s, int64_t ld, int64_t rows, int64_t n, const scalar_t* bias, int64_t s_row, int64_t s_col) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* x = s + r * ld;
    const scalar_t* b = bias + r * s_row;
    if (s_col == 1) {
      for (int64_t j = 0; j < n; ++j) x[j] += static_cast<acc_t>(b[j]);
    } else if (s_col == 0) {
      const acc_t v = static_cast<acc_t>(b[0]);
      for (int64_t j = 0; j < n; ++j) x[j] += v;
    } else {
      for (int64_t j = 0; j < n; ++j) x[j] += static_cast<acc_t>(b[j * s_col]);
    }
  }
}

// Scores outside the window of rows [i0, i0 + rows) x keys [j0, j0 + n) become -inf.
template <typename acc_t>
void mask_window(acc_t* s, int64_t ld, int64_t rows, int64_t n, int64_t i0, int64_t j0, const Problem& p,
                 const Seq& sq) {
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* x = s + r * ld;
    const int64_t lo = std::clamp<int64_t>(p.key_lo(sq, i0 + r) - j0, 0, n);      // first visible
    const int64_t hi = std::clamp<int64_t>(p.key_hi(sq, i0 + r) - j0 + 1, 0, n);  // one past the last
    for (int64_t j = 0; j < std::min(lo, n); ++j) x[j] = ninf;
    for (int64_t j = std::max(hi, lo); j < n; ++j) x[j] = ninf;
  }
}

// k_t[e][j] = k[j][e]: a key block transposed (E x n), the B operand of QKᵀ on the micro-kernel.
template <typename acc_t>
void transpose_keys(const acc_t* k, int ld, int64_t n, int64_t E, acc_t* k_t) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t e = 0; e < E; ++e) k_t[e * n + j] = k[j * ld + e];
}

// Scores of one tile of head h of sequence sq: s = scale·Q·Kᵀ, softcap (tanh kept in t if given),
// bias, window. Given k_t (the key block transposed, fp32), QKᵀ runs on the AVX-512 micro-kernel;
// forward and backward make the same choice, so the backward recomputes the forward's scores bit
// for bit (its probabilities exp(s - lse) need that when the logits are large).
template <typename scalar_t, typename acc_t>
void tile_scores(const Problem& p, const Seq& sq, acc_t* s, acc_t* t, int ld, int64_t rows, int64_t n, Tile<acc_t> q,
                 Tile<acc_t> k, const scalar_t* bias, int64_t h, int64_t i0, int64_t j0, const acc_t* k_t) {
  bool done = false;
  if (rows <= kFewRows) {
    int64_t j = 0;  // keys done by the AVX-512 loop (whole groups of 16)
    if constexpr (std::is_same_v<acc_t, float>) {
      if (p.own_gemm) {
        scores_few_rows_avx512(s, ld, q.ptr, q.ld, rows, k.ptr, k.ld, n, p.E, static_cast<float>(p.scale));
        j = n / 16 * 16;
      }
    }
    if (j < n)
      scores_few_rows(s + j, ld, q.ptr, q.ld, rows, k.ptr + j * k.ld, k.ld, n - j, p.E, static_cast<acc_t>(p.scale));
    done = true;
  }
  if constexpr (std::is_same_v<acc_t, float>) {
    if (!done && k_t) {
      gemm_avx512(static_cast<int>(rows), static_cast<int>(n), static_cast<int>(p.E), static_cast<float>(p.scale),
                  q.ptr, q.ld, k_t, static_cast<int>(n), false, s, ld);
      done = true;
    }
  }
  if (!done) gemm_abt<acc_t>(rows, n, p.E, static_cast<acc_t>(p.scale), q.ptr, q.ld, k.ptr, k.ld, acc_t(0), s, ld);
  if (p.softcap > 0) softcap_tile(s, t, ld, rows, n, static_cast<acc_t>(p.softcap));
  if (p.has_bias) add_bias(s, ld, rows, n, bias + p.bias.at(sq.qi, h, i0) + j0 * p.bias_col, p.bias.row, p.bias_col);
  if (p.windowed() && !p.all_visible(sq, i0, i0 + rows, j0, j0 + n)) mask_window(s, ld, rows, n, i0, j0, p, sq);
}

// Run tasks [0, ntasks) on the thread pool, handed out one at a time (uneven tasks balance; the
// callers list the costly ones first). make_worker() is called once per thread and returns a
// callable worker(task) owning its scratch.
template <typename MakeWorker>
void run_tasks(int64_t ntasks, const MakeWorker& make_worker) {
  if (ntasks <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t nthreads = std::min<int64_t>(at::get_num_threads(), ntasks);
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    auto worker = make_worker();
    for (int64_t task = next.fetch_add(1); task < ntasks; task = next.fetch_add(1)) worker(task);
  });
}

// The sequences, longest (most visible pairs) first; equal ones keep their order. Tasks are listed
// sequence by sequence in this order, so long sequences start first and short ones fill the gaps
// at the end, while within a sequence consecutive tasks share a head's K/V (kept in cache).
std::vector<int64_t> longest_first(const Problem& p) {
  const int64_t n = static_cast<int64_t>(p.seqs.size());
  std::vector<int64_t> order(n), cost(n);
  for (int64_t b = 0; b < n; ++b) {
    order[b] = b;
    cost[b] = p.visible_pairs(p.seqs[b]);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  return order;
}

// Tile sizes (fp32, AVX-512 Zen 4, measured). Forward: 128 x 256 score tiles (128 KiB, in L2
// between the GEMM that writes them, the softmax and the GEMM that reads them) under a window or
// causal mask, where finer tiles skip more; 256 x 512 without one (fewer K/V re-reads and BLAS
// packings). The backward holds three to five score-sized tiles, hence 64 x 256.
constexpr int64_t kFwdBlockM = 128, kFwdBlockN = 256;  // forward tile: query rows x keys
constexpr int64_t kBwdBlockM = 64, kBwdBlockN = 256;   // backward tile
constexpr int64_t kDecodeBlockN = 4096;                // forward key block for <= kFewRows query rows
constexpr int64_t kDecodeMaxRows = 16;                // L <= this: split the keys across tasks
inline int64_t round_up16(int64_t n) { return std::max<int64_t>(16, (n + 15) / 16 * 16); }

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
void forward_kernel(const Problem& p, const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* bias,
                    scalar_t* out, void* lse_out) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t E = p.E, Ev = p.Ev, nthreads = at::get_num_threads();
  acc_t* lse = static_cast<acc_t*>(lse_out);
  auto count_qblocks = [&](int64_t bm) {
    int64_t n = 0;
    for (const Seq& s : p.seqs) n += (s.L + bm - 1) / bm;
    return n * p.Hq;
  };
  // Query block: 256 rows (fewer K/V re-reads and BLAS packings) unless a window/causal mask makes
  // finer blocks skip more, or the blocks would be too few to feed the threads.
  int64_t BM = p.windowed() ? kFwdBlockM : 2 * kFwdBlockM;
  while (BM > 32 && count_qblocks(BM) < 4 * nthreads) BM /= 2;
  BM = std::max<int64_t>(1, std::min(BM, p.max_L));
  const int64_t n_qtasks = count_qblocks(BM);

  // Decoding (L <= 16): when the query blocks are too few to feed the threads, the keys are
  // sliced too (split-KV). With at most kFewRows rows, key blocks are long (K, then V, streamed
  // in long runs; few softmax rescales) unless they must be short to make enough slices.
  int64_t BN = p.windowed() ? kFwdBlockN : 2 * kFwdBlockN, n_split = 1;  // 256 x 512 tiles without a window
  if (p.max_L <= kDecodeMaxRows && n_qtasks > 0) {
    const int64_t splits = std::max<int64_t>(1, (8 * nthreads + n_qtasks - 1) / n_qtasks);
    if (p.max_L <= kFewRows) {
      const int64_t per_split = ((p.max_S + splits - 1) / splits + kFwdBlockN - 1) / kFwdBlockN * kFwdBlockN;
      BN = std::clamp(per_split, kFwdBlockN, kDecodeBlockN);
    }
    n_split = std::max<int64_t>(1, std::min((p.max_S + BN - 1) / BN, splits));
  }
  BN = std::min(BN, round_up16(p.max_S));  // short keys: per-thread scratch sized to them (same blocks)

  // Work items: every query block of every sequence with the key blocks it sees. A task is one
  // (query block, query head) x one key slice; listed by sequence (longest first), then head, then
  // query block.
  struct Item {
    int64_t seq, i0, rows, kb_begin, kb_end;
  };
  struct QTask {
    int64_t item, head;
  };
  std::vector<Item> items;
  std::vector<QTask> qtasks;
  for (int64_t b : longest_first(p)) {
    const Seq& sq = p.seqs[b];
    const int64_t first = static_cast<int64_t>(items.size());
    for (int64_t i0 = 0; i0 < sq.L; i0 += BM) {
      const int64_t rows = std::min(BM, sq.L - i0);
      auto [lo, hi] = p.key_range(sq, i0, rows);
      items.push_back({b, i0, rows, hi < lo ? 0 : lo / BN, hi < lo ? 0 : hi / BN + 1});
    }
    for (int64_t h = 0; h < p.Hq; ++h)
      for (int64_t it = first; it < static_cast<int64_t>(items.size()); ++it) qtasks.push_back({it, h});
  }
  const int64_t n_qtasks_listed = static_cast<int64_t>(qtasks.size()), ntasks = n_qtasks_listed * n_split;
  // Partial results of the slices (only with n_split > 1): acc (unnormalised), m, l per row.
  std::vector<acc_t> part_acc, part_m, part_l;
  if (n_split > 1) {
    part_acc.resize(ntasks * BM * Ev);
    part_m.resize(ntasks * BM);
    part_l.resize(ntasks * BM);
  }
  const bool dropout = p.dropout_p > 0;
  const acc_t inv_keep = static_cast<acc_t>(1.0 / (1.0 - p.dropout_p));

  struct Scratch {
    std::vector<acc_t> qbuf, kbuf, vbuf, s, keep, acc, m, l, alpha;
    std::vector<uint32_t> row_hash;
    std::vector<acc_t> k_t;  // Kᵀ of one key block (E x BN), for the AVX-512 tile products
  };
  const bool own_gemm = std::is_same_v<acc_t, float> && p.own_gemm;
  run_tasks(ntasks, [&]() {
    Scratch sc{{}, {}, {}, std::vector<acc_t>(BM * BN), std::vector<acc_t>(dropout ? BM * BN : 0), std::vector<acc_t>(BM * Ev),
               std::vector<acc_t>(BM), std::vector<acc_t>(BM), std::vector<acc_t>(BM), std::vector<uint32_t>(BM),
               std::vector<acc_t>(own_gemm ? E * BN : 0)};
    return [&, sc = std::move(sc)](int64_t task) mutable {
      const int64_t split = task % n_split, h = qtasks[task / n_split].head;
      const Item& it = items[qtasks[task / n_split].item];
      const Seq& sq = p.seqs[it.seq];
      const int64_t hk = h / p.group, i0 = it.i0, rows = it.rows;
      acc_t *s = sc.s.data(), *acc = sc.acc.data(), *m = sc.m.data(), *l = sc.l.data();

      // This task's slice of the item's key blocks.
      int64_t kb_begin = it.kb_begin, kb_end = it.kb_end;
      if (n_split > 1) {
        const int64_t per = (kb_end - kb_begin + n_split - 1) / n_split;
        kb_begin = std::min(it.kb_end, it.kb_begin + split * per);
        kb_end = std::min(it.kb_end, kb_begin + per);
      }

      const Tile<acc_t> qt = load_rows(q + p.q.at(sq.qi, h, i0), p.q.row, rows, E, sc.qbuf);
      std::fill(m, m + rows, -std::numeric_limits<acc_t>::infinity());
      std::fill(l, l + rows, acc_t(0));
      std::fill(acc, acc + rows * Ev, acc_t(0));
      if (dropout)
        for (int64_t r = 0; r < rows; ++r) sc.row_hash[r] = p.row_hash(sq, h, i0 + r);

      for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
        const int64_t j0 = kb * BN, n = std::min(BN, sq.S - j0);
        const Tile<acc_t> kt = load_rows(k + p.k.at(sq.ki, hk, j0), p.k.row, n, E, sc.kbuf);
        const Tile<acc_t> vt = load_rows(v + p.v.at(sq.ki, hk, j0), p.v.row, n, Ev, sc.vbuf);
        const bool transposed = own_gemm && rows > kFewRows;
        if (transposed) transpose_keys(kt.ptr, kt.ld, n, E, sc.k_t.data());
        tile_scores<scalar_t, acc_t>(p, sq, s, nullptr, BN, rows, n, qt, kt, bias, h, i0, j0,
                                     transposed ? sc.k_t.data() : nullptr);
        if constexpr (std::is_same_v<acc_t, float>) {
          if (own_gemm)
            online_softmax_avx512(s, BN, rows, n, m, l, sc.alpha.data());
          else
            online_softmax(s, BN, rows, n, m, l, sc.alpha.data());
        } else {
          online_softmax(s, BN, rows, n, m, l, sc.alpha.data());
        }
        scale_rows(acc, Ev, rows, Ev, sc.alpha.data());
        if (dropout) {
          dropout_keep(sc.keep.data(), BN, rows, n, sc.row_hash.data(), static_cast<uint32_t>(j0), p.threshold,
                       inv_keep);
          mul_tile(s, s, sc.keep.data(), BN, rows, n);
        }
        if (rows <= kFewRows) {
          if constexpr (std::is_same_v<acc_t, float>) {
            if (own_gemm) {
              pv_few_rows_avx512(acc, Ev, s, BN, rows, vt.ptr, vt.ld, n, Ev);
              continue;
            }
          }
          pv_few_rows(acc, Ev, s, BN, rows, vt.ptr, vt.ld, n, Ev);
        } else if constexpr (std::is_same_v<acc_t, float>) {
          if (own_gemm)
            gemm_avx512(rows, Ev, n, 1.0f, s, BN, vt.ptr, vt.ld, true, acc, Ev);
          else
            gemm_ab<acc_t>(rows, Ev, n, acc_t(1), s, BN, vt.ptr, vt.ld, acc_t(1), acc, Ev);
        } else {
          gemm_ab<acc_t>(rows, Ev, n, acc_t(1), s, BN, vt.ptr, vt.ld, acc_t(1), acc, Ev);
        }
      }

      if (n_split > 1) {
        std::copy(acc, acc + rows * Ev, part_acc.begin() + task * BM * Ev);
        std::copy(m, m + rows, part_m.begin() + task * BM);
        std::copy(l, l + rows, part_l.begin() + task * BM);
        return;
      }
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t inv_l = l[r] > 0 ? acc_t(1) / l[r] : acc_t(0);
        scalar_t* o = out + p.out.at(sq.qi, h, i0 + r);
        for (int64_t c = 0; c < Ev; ++c) o[c] = static_cast<scalar_t>(acc[r * Ev + c] * inv_l);
        lse[p.stat.at(sq.qi, h, i0 + r)] = l[r] > 0 ? m[r] + std::log(l[r]) : std::numeric_limits<acc_t>::infinity();
      }
    };
  });

  if (n_split == 1) return;
  // Combine the slices of each (item, head): m = max m_s, l = Σ l_s·e^{m_s - m}, out = Σ acc_s·e^{m_s - m} / l.
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, n_qtasks_listed, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> o(Ev);
    for (int64_t ih = begin; ih < end; ++ih) {
      const Item& it = items[qtasks[ih].item];
      const Seq& sq = p.seqs[it.seq];
      const int64_t h = qtasks[ih].head, task0 = ih * n_split;
      for (int64_t r = 0; r < it.rows; ++r) {
        scalar_t* dst = out + p.out.at(sq.qi, h, it.i0 + r);
        acc_t& lse_r = lse[p.stat.at(sq.qi, h, it.i0 + r)];
        acc_t mx = -inf;
        for (int64_t sp = 0; sp < n_split; ++sp) mx = std::max(mx, part_m[(task0 + sp) * BM + r]);
        if (mx == -inf) {
          for (int64_t c = 0; c < Ev; ++c) dst[c] = static_cast<scalar_t>(0);
          lse_r = inf;
          continue;
        }
        std::fill(o.begin(), o.end(), acc_t(0));
        acc_t sum = 0;
        for (int64_t sp = 0; sp < n_split; ++sp) {
          const int64_t t = task0 + sp;
          const acc_t ms = part_m[t * BM + r];
          if (ms == -inf) continue;
          const acc_t w = std::exp(ms - mx);
          sum += w * part_l[t * BM + r];
          const acc_t* a = part_acc.data() + (t * BM + r) * Ev;
          for (int64_t c = 0; c < Ev; ++c) o[c] += w * a[c];
        }
        for (int64_t c = 0; c < Ev; ++c) dst[c] = static_cast<scalar_t>(o[c] / sum);
        lse_r = mx + std::log(sum);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Backward work split: "fused" (one task per (sequence, kv head), longest first) when those
// tasks keep the threads busy, i.e. when a greedy schedule of them is within 25% of a perfect
// split; else "split" (two passes of finer tasks; ~40% more GEMM work, but balanced).
// FASTATTN_ATTN_BWD=fused|split forces one (tests use it).
bool use_fused_backward(const std::vector<int64_t>& costs_desc) {
  if (const char* env = std::getenv("FASTATTN_ATTN_BWD")) {
    if (std::strcmp(env, "fused") == 0) return true;
    if (std::strcmp(env, "split") == 0) return false;
  }
  const int64_t nt = std::max(1, at::get_num_threads());
  std::vector<double> load(nt, 0.0);
  double total = 0;
  for (int64_t c : costs_desc) {
    *std::min_element(load.begin(), load.end()) += static_cast<double>(c);
    total += static_cast<double>(c);
  }
  return *std::max_element(load.begin(), load.end()) <= 1.25 * total / nt;
}

template <typename scalar_t>
void backward_kernel(const Problem& p, const scalar_t* dout, const scalar_t* q, const scalar_t* k,
                     const scalar_t* v, const scalar_t* out, const void* lse_in, const scalar_t* bias,
                     scalar_t* dq, scalar_t* dk, scalar_t* dv, int64_t n_stat, int64_t n_dq) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  // Tiles no larger than the problem: the per-thread scratch (5+ tiles) is sized and zeroed per call.
  const int64_t BM = std::clamp<int64_t>(p.max_L, 1, kBwdBlockM), BN = std::min(kBwdBlockN, round_up16(p.max_S));
  const int64_t E = p.E, Ev = p.Ev, G = p.group, n_seq = static_cast<int64_t>(p.seqs.size());
  const acc_t* lse = static_cast<const acc_t*>(lse_in);
  const bool dropout = p.dropout_p > 0;
  const acc_t inv_keep = static_cast<acc_t>(1.0 / (1.0 - p.dropout_p));
  const acc_t scale = static_cast<acc_t>(p.scale);

  // delta = rowsum(dO ∘ O), laid out like lse.
  std::vector<acc_t> delta(n_stat);
  at::parallel_for(0, n_seq * p.Hq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t sh = begin; sh < end; ++sh) {
      const Seq& sq = p.seqs[sh / p.Hq];
      const int64_t h = sh % p.Hq;
      for (int64_t i = 0; i < sq.L; ++i) {
        const scalar_t *g = dout + p.out.at(sq.qi, h, i), *o = out + p.out.at(sq.qi, h, i);
        acc_t sum = 0;
        for (int64_t c = 0; c < Ev; ++c) sum += static_cast<acc_t>(g[c]) * static_cast<acc_t>(o[c]);
        delta[p.stat.at(sq.qi, h, i)] = sum;
      }
    }
  });

  // dQ accumulates over key blocks in acc_t, laid out like dq: the output itself when it is acc_t.
  std::vector<acc_t> dq_buf;
  acc_t* dq_acc;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    dq_acc = dq;
  } else {
    dq_buf.assign(n_dq, acc_t(0));
    dq_acc = dq_buf.data();
  }
  const int ld_dq = static_cast<int>(p.dq.row);

  // Per-thread scratch for one tile and the dK/dV accumulators of one key block.
  const bool own_gemm = std::is_same_v<acc_t, float> && p.own_gemm;  // QKᵀ as in the forward
  struct Scratch {
    std::vector<acc_t> qbuf, kbuf, vbuf, dobuf, s, t, keep, pd, dp, dk_acc, dv_acc, k_t, v_t;
    std::vector<uint32_t> row_hash;
  };
  auto make_scratch = [&]() {
    Scratch sc;
    if (own_gemm) {
      sc.k_t.resize(E * BN);
      sc.v_t.resize(Ev * BN);
    }
    sc.s.resize(BM * BN);
    sc.dp.resize(BM * BN);
    if (p.softcap > 0) sc.t.resize(BM * BN);
    if (dropout) {
      sc.keep.resize(BM * BN);
      sc.pd.resize(BM * BN);
    }
    sc.dk_acc.resize(BN * E);
    sc.dv_acc.resize(BN * Ev);
    sc.row_hash.resize(BM);
    return sc;
  };

  // One tile: query block (head h, rows [i0, i0+rows)) x key block (keys [j0, j0+n)) of sequence sq.
  // Adds its share to dk_acc/dv_acc (n × E / n × Ev) and dQ (rows × E) where those are wanted.
  auto tile = [&](Scratch& sc, const Seq& sq, int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t n,
                  Tile<acc_t> kt, Tile<acc_t> vt, bool want_dkdv, bool want_dq) {
    const int64_t row0 = p.stat.at(sq.qi, h, i0);  // lse and delta of the block's first row
    const Tile<acc_t> qt = load_rows(q + p.q.at(sq.qi, h, i0), p.q.row, rows, E, sc.qbuf);
    const Tile<acc_t> dot = load_rows(dout + p.out.at(sq.qi, h, i0), p.out.row, rows, Ev, sc.dobuf);
    acc_t* s = sc.s.data();
    acc_t* t = p.softcap > 0 ? sc.t.data() : nullptr;
    tile_scores<scalar_t, acc_t>(p, sq, s, t, BN, rows, n, qt, kt, bias, h, i0, j0,
                                 own_gemm && rows > kFewRows ? sc.k_t.data() : nullptr);
    if constexpr (std::is_same_v<acc_t, float>) {  // s is now P
      if (own_gemm)
        probs_from_lse_avx512(s, BN, rows, n, lse + row0);
      else
        probs_from_lse(s, BN, rows, n, lse + row0);
    } else {
      probs_from_lse(s, BN, rows, n, lse + row0);
    }
    const acc_t* keep = nullptr;
    const acc_t* pd = s;  // the probabilities after dropout
    if (dropout) {
      for (int64_t r = 0; r < rows; ++r) sc.row_hash[r] = p.row_hash(sq, h, i0 + r);
      dropout_keep(sc.keep.data(), BN, rows, n, sc.row_hash.data(), static_cast<uint32_t>(j0), p.threshold, inv_keep);
      mul_tile(sc.pd.data(), s, sc.keep.data(), BN, rows, n);
      keep = sc.keep.data();
      pd = sc.pd.data();
    }
    // The four products: BLAS, or (fp32 on AVX-512) the forward's micro-kernel, which reads a
    // transposed A through its strides (1, BN) and Vᵀ from the key block's transposed copy.
    acc_t* dp = sc.dp.data();  // dP = dO·Vᵀ, then dS in place
    acc_t* dq_rows = dq_acc + p.dq.at(sq.qi, h, i0);
    const int nn = static_cast<int>(n), r = static_cast<int>(rows), e = static_cast<int>(E), ev = static_cast<int>(Ev);
    if (own_gemm) {
      if (want_dkdv)  // dV += Pdᵀ·dO
        gemm_avx512(nn, ev, r, acc_t(1), pd, 1, BN, dot.ptr, dot.ld, true, sc.dv_acc.data(), ev);
      gemm_avx512(r, nn, ev, acc_t(1), dot.ptr, dot.ld, 1, sc.v_t.data(), nn, false, dp, static_cast<int>(BN));
    } else {
      if (want_dkdv)
        gemm_atb<acc_t>(n, Ev, rows, acc_t(1), pd, BN, dot.ptr, dot.ld, acc_t(1), sc.dv_acc.data(), Ev);
      gemm_abt<acc_t>(rows, n, Ev, acc_t(1), dot.ptr, dot.ld, vt.ptr, vt.ld, acc_t(0), dp, BN);
    }
    score_grad(dp, s, keep, t, BN, rows, n, delta.data() + row0);
    if (own_gemm) {
      if (want_dkdv)  // dK += scale·dSᵀ·Q
        gemm_avx512(nn, e, r, scale, dp, 1, BN, qt.ptr, qt.ld, true, sc.dk_acc.data(), e);
      if (want_dq)  // dQ += scale·dS·K
        gemm_avx512(r, e, nn, scale, dp, BN, 1, kt.ptr, kt.ld, true, dq_rows, ld_dq);
    } else {
      if (want_dkdv)
        gemm_atb<acc_t>(n, E, rows, scale, dp, BN, qt.ptr, qt.ld, acc_t(1), sc.dk_acc.data(), E);
      if (want_dq)
        gemm_ab<acc_t>(rows, E, n, scale, dp, BN, kt.ptr, kt.ld, acc_t(1), dq_rows, ld_dq);
    }
  };

  auto load_kv = [&](Scratch& sc, const Seq& sq, int64_t hk, int64_t j0, int64_t n) {
    Tile<acc_t> kt = load_rows(k + p.k.at(sq.ki, hk, j0), p.k.row, n, E, sc.kbuf);
    Tile<acc_t> vt = load_rows(v + p.v.at(sq.ki, hk, j0), p.v.row, n, Ev, sc.vbuf);
    if (own_gemm) {
      transpose_keys(kt.ptr, kt.ld, n, E, sc.k_t.data());
      transpose_keys(vt.ptr, vt.ld, n, Ev, sc.v_t.data());
    }
    return std::make_pair(kt, vt);
  };

  // dK/dV of key block kb of (sq, hk): all query heads of the group, all query blocks that see it.
  auto key_block = [&](Scratch& sc, const Seq& sq, int64_t hk, int64_t kb, bool want_dq) {
    const int64_t j0 = kb * BN, n = std::min(BN, sq.S - j0);
    std::fill(sc.dk_acc.begin(), sc.dk_acc.begin() + n * E, acc_t(0));
    std::fill(sc.dv_acc.begin(), sc.dv_acc.begin() + n * Ev, acc_t(0));
    const int64_t i_lo = std::max<int64_t>(0, p.query_lo(sq, j0));
    const int64_t i_hi = std::min<int64_t>(sq.L - 1, p.query_hi(sq, j0 + n - 1));
    if (i_lo <= i_hi) {
      auto [kt, vt] = load_kv(sc, sq, hk, j0, n);
      for (int64_t h = hk * G; h < (hk + 1) * G; ++h)
        for (int64_t qb = i_lo / BM; qb <= i_hi / BM; ++qb) {
          const int64_t i0 = qb * BM;
          tile(sc, sq, h, i0, std::min(BM, sq.L - i0), j0, n, kt, vt, true, want_dq);
        }
    }
    for (int64_t j = 0; j < n; ++j) {
      scalar_t* dk_dst = dk + p.dk.at(sq.ki, hk, j0 + j);
      scalar_t* dv_dst = dv + p.dv.at(sq.ki, hk, j0 + j);
      for (int64_t c = 0; c < E; ++c) dk_dst[c] = static_cast<scalar_t>(sc.dk_acc[j * E + c]);
      for (int64_t c = 0; c < Ev; ++c) dv_dst[c] = static_cast<scalar_t>(sc.dv_acc[j * Ev + c]);
    }
  };

  // Sequences without keys have no dK/dV to write and dQ 0 (already there); the others give the
  // fused tasks, one per (sequence, kv head), longest sequences first.
  struct SeqHead {
    int64_t seq, head, cost;
  };
  const std::vector<int64_t> order = longest_first(p);
  std::vector<SeqHead> pairs;
  for (int64_t b : order) {
    const Seq& sq = p.seqs[b];
    if (sq.S == 0) continue;
    const int64_t cost = p.visible_pairs(sq) * G + sq.S;  // + S: writing dK/dV
    for (int64_t hk = 0; hk < p.Hkv; ++hk) pairs.push_back({b, hk, cost});
  }
  std::vector<int64_t> costs;
  for (const SeqHead& x : pairs) costs.push_back(x.cost);

  if (use_fused_backward(costs)) {
    // One task per (sequence, kv head): owns dK/dV of its keys and dQ of its group's query heads.
    run_tasks(static_cast<int64_t>(pairs.size()), [&]() {
      return [&, sc = make_scratch()](int64_t task) mutable {
        const Seq& sq = p.seqs[pairs[task].seq];
        for (int64_t kb = 0; kb * BN < sq.S; ++kb) key_block(sc, sq, pairs[task].head, kb, true);
      };
    });
  } else {
    // Pass 1: dK/dV, one task per key block.
    struct Block {
      int64_t seq, head, start;  // start: first key (pass 1) or query row (pass 2)
    };
    std::vector<Block> blocks;
    for (const SeqHead& x : pairs)
      for (int64_t j0 = 0; j0 < p.seqs[x.seq].S; j0 += BN) blocks.push_back({x.seq, x.head, j0});
    run_tasks(static_cast<int64_t>(blocks.size()), [&]() {
      return [&, sc = make_scratch()](int64_t task) mutable {
        const Block& x = blocks[task];
        key_block(sc, p.seqs[x.seq], x.head, x.start / BN, false);
      };
    });
    // Pass 2: dQ, one task per query block.
    blocks.clear();
    for (int64_t b : order) {
      const Seq& sq = p.seqs[b];
      if (sq.S == 0) continue;
      for (int64_t h = 0; h < p.Hq; ++h)
        for (int64_t i0 = 0; i0 < sq.L; i0 += BM) {
          auto [lo, hi] = p.key_range(sq, i0, std::min(BM, sq.L - i0));
          if (hi >= lo) blocks.push_back({b, h, i0});
        }
    }
    run_tasks(static_cast<int64_t>(blocks.size()), [&]() {
      return [&, sc = make_scratch()](int64_t task) mutable {
        const Block& x = blocks[task];
        const Seq& sq = p.seqs[x.seq];
        const int64_t h = x.head, i0 = x.start, rows = std::min(BM, sq.L - i0);
        auto [lo, hi] = p.key_range(sq, i0, rows);
        for (int64_t kb = lo / BN; kb <= hi / BN; ++kb) {
          const int64_t j0 = kb * BN, n = std::min(BN, sq.S - j0);
          auto [kt, vt] = load_kv(sc, sq, h / G, j0, n);
          tile(sc, sq, h, i0, rows, j0, n, kt, vt, false, true);
        }
      };
    });
  }

  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    at::parallel_for(0, n_dq, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t x = begin; x < end; ++x) dq[x] = static_cast<scalar_t>(dq_acc[x]);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Argument checks and dispatch
// ---------------------------------------------------------------------------------------------
at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// q/k/v dtype and device, and the scalar arguments both ops share.
void check_common(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double dropout_p,
                  int64_t window_left, int64_t window_right, double softcap) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op,
              " (CPU kernel): query, key and value must be CPU tensors");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": query, key and value must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), op, ": query must be floating point, got ", q.scalar_type());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(softcap >= 0.0, op, ": softcap must be >= 0, got ", softcap);
  TORCH_CHECK(window_left >= -1 && window_right >= -1, op, ": window_left/window_right must be >= -1, got ",
              window_left, ", ", window_right);
}

Problem make_params(int64_t Hq, int64_t Hkv, int64_t E, int64_t Ev, double dropout_p, double scale,
                    int64_t window_left, int64_t window_right, double softcap, int64_t seed) {
  Problem p{};
  p.Hq = Hq; p.Hkv = Hkv; p.E = E; p.Ev = Ev; p.group = Hq / Hkv;
  p.scale = scale; p.softcap = softcap; p.dropout_p = dropout_p;
  p.window_left = window_left; p.window_right = window_right;
  p.own_gemm = use_avx512_tiles();
  p.seed_hash = mix32(static_cast<uint32_t>(static_cast<uint64_t>(seed)));
  p.threshold = static_cast<uint32_t>(std::min<uint64_t>(static_cast<uint64_t>(dropout_p * 4294967296.0), 0xFFFFFFFFull));
  return p;
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& bias, double dropout_p, double scale, int64_t window_left,
                     int64_t window_right, int64_t diag_offset, double softcap, int64_t seed) {
  TORCH_CHECK(q.dim() == 4, "attention: query must be 4-D (B, Hq, L, E), got ", q.dim(), "-D");
  TORCH_CHECK(k.dim() == 4, "attention: key must be 4-D (B, Hkv, S, E), got ", k.dim(), "-D");
  TORCH_CHECK(v.dim() == 4, "attention: value must be 4-D (B, Hkv, S, Ev), got ", v.dim(), "-D");
  check_common("attention", q, k, v, dropout_p, window_left, window_right, softcap);
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), E = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), Ev = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, "attention: key and value must have the query's batch size ", B,
              ", got ", k.size(0), " and ", v.size(0));
  TORCH_CHECK(k.size(3) == E, "attention: key head size ", k.size(3), " != query head size ", E);
  TORCH_CHECK(v.size(1) == Hkv && v.size(2) == S, "attention: value must be (B, ", Hkv, ", ", S, ", Ev), got ",
              v.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "attention: query heads (", Hq, ") must be a multiple of key heads (", Hkv,
              ")");
  Problem p = make_params(Hq, Hkv, E, Ev, dropout_p, scale, window_left, window_right, softcap, seed);
  for (int64_t b = 0; b < B; ++b) p.seqs.push_back({L, S, diag_offset, b, b});
  p.max_L = L;
  p.max_S = S;
  p.q = {q.stride(0), q.stride(1), q.stride(2)};
  p.k = {k.stride(0), k.stride(1), k.stride(2)};
  p.v = {v.stride(0), v.stride(1), v.stride(2)};
  p.out = {Hq * L * Ev, L * Ev, Ev};
  p.stat = {Hq * L, L, 1};
  p.dq = {Hq * L * E, L * E, E};
  p.dk = {Hkv * S * E, S * E, E};
  p.dv = {Hkv * S * Ev, S * Ev, Ev};
  p.has_bias = bias.has_value() && bias->defined();
  if (p.has_bias) {
    const at::Tensor& bt = *bias;
    TORCH_CHECK(bt.device().is_cpu(), "attention: attn_bias must be a CPU tensor");
    TORCH_CHECK(bt.scalar_type() == q.scalar_type(), "attention: attn_bias must have the query's dtype ",
                q.scalar_type(), ", got ", bt.scalar_type());
    TORCH_CHECK(bt.dim() == 4 && bt.size(0) == B && bt.size(1) == Hq && bt.size(2) == L && bt.size(3) == S,
                "attention: attn_bias must be (B, Hq, L, S) = (", B, ", ", Hq, ", ", L, ", ", S, "), got ", bt.sizes());
    p.bias = {bt.stride(0), bt.stride(1), bt.stride(2)};
    p.bias_col = bt.stride(3);
  }
  return p;
}

// Sequence offsets of a packed batch: int32 (N + 1,) CPU tensor, non-decreasing from 0 to total,
// no sequence longer than max_seqlen.
std::vector<int64_t> read_cu_seqlens(const char* name, const at::Tensor& cu, int64_t total, int64_t max_seqlen,
                                     const char* max_name) {
  TORCH_CHECK(cu.scalar_type() == at::kInt, "attention_varlen: ", name, " must be int32, got ", cu.scalar_type());
  TORCH_CHECK(cu.device().is_cpu(), "attention_varlen (CPU kernel): ", name, " must be a CPU tensor, got ",
              cu.device());
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 2, "attention_varlen: ", name,
              " must be 1-D with batch + 1 >= 2 entries, got shape ", cu.sizes());
  TORCH_CHECK(max_seqlen >= 0, "attention_varlen: ", max_name, " must be >= 0, got ", max_seqlen);
  const at::Tensor c = cu.contiguous();
  const int32_t* x = c.const_data_ptr<int32_t>();
  const int64_t n = c.numel();
  TORCH_CHECK(x[0] == 0, "attention_varlen: ", name, " must start at 0, got ", x[0]);
  std::vector<int64_t> out(n);
  for (int64_t i = 0; i < n; ++i) {
    out[i] = x[i];
    if (i > 0) {
      TORCH_CHECK(x[i] >= x[i - 1], "attention_varlen: ", name, " must not decrease, got ", x[i - 1], " then ", x[i],
                  " at ", i);
      TORCH_CHECK(x[i] - x[i - 1] <= max_seqlen, "attention_varlen: sequence ", i - 1, " has ", x[i] - x[i - 1],
                  " rows > ", max_name, "=", max_seqlen);
    }
  }
  TORCH_CHECK(out[n - 1] == total, "attention_varlen: ", name, " must end at the packed length ", total, ", got ",
              out[n - 1]);
  return out;
}

Problem make_varlen_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                            const at::Tensor& cu_k, int64_t max_q, int64_t max_k, double dropout_p, double scale,
                            int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
                            int64_t seed) {
  TORCH_CHECK(q.dim() == 3, "attention_varlen: query must be 3-D (total_q, Hq, E), got ", q.dim(), "-D");
  TORCH_CHECK(k.dim() == 3, "attention_varlen: key must be 3-D (total_k, Hkv, E), got ", k.dim(), "-D");
  TORCH_CHECK(v.dim() == 3, "attention_varlen: value must be 3-D (total_k, Hkv, Ev), got ", v.dim(), "-D");
  check_common("attention_varlen", q, k, v, dropout_p, window_left, window_right, softcap);
  const int64_t Tq = q.size(0), Hq = q.size(1), E = q.size(2), Tk = k.size(0), Hkv = k.size(1), Ev = v.size(2);
  TORCH_CHECK(k.size(2) == E, "attention_varlen: key head size ", k.size(2), " != query head size ", E);
  TORCH_CHECK(v.size(0) == Tk && v.size(1) == Hkv, "attention_varlen: value must be (", Tk, ", ", Hkv,
              ", Ev) like key, got ", v.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "attention_varlen: query heads (", Hq,
              ") must be a multiple of key heads (", Hkv, ")");
  const std::vector<int64_t> oq = read_cu_seqlens("cu_seqlens_q", cu_q, Tq, max_q, "max_seqlen_q");
  const std::vector<int64_t> ok = read_cu_seqlens("cu_seqlens_k", cu_k, Tk, max_k, "max_seqlen_k");
  TORCH_CHECK(oq.size() == ok.size(), "attention_varlen: cu_seqlens_q and cu_seqlens_k must describe one batch, got ",
              oq.size() - 1, " and ", ok.size() - 1, " sequences");
  Problem p = make_params(Hq, Hkv, E, Ev, dropout_p, scale, window_left, window_right, softcap, seed);
  for (size_t b = 0; b + 1 < oq.size(); ++b) {
    const int64_t L = oq[b + 1] - oq[b], S = ok[b + 1] - ok[b];
    p.seqs.push_back({L, S, bottom_right ? S - L : 0, oq[b], ok[b]});
    p.max_L = std::max(p.max_L, L);
    p.max_S = std::max(p.max_S, S);
  }
  p.q = {q.stride(0), q.stride(1), q.stride(0)};
  p.k = {k.stride(0), k.stride(1), k.stride(0)};
  p.v = {v.stride(0), v.stride(1), v.stride(0)};
  p.out = {Hq * Ev, Ev, Hq * Ev};
  p.stat = {1, Tq, 1};
  p.dq = {Hq * E, E, Hq * E};
  p.dk = {Hkv * E, E, Hkv * E};
  p.dv = {Hkv * Ev, Ev, Hkv * Ev};
  return p;
}

at::ScalarType acc_dtype_of(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// One forward: out shaped out_shape, lse shaped lse_shape (both laid out as p's RowMaps say).
std::tuple<at::Tensor, at::Tensor> run_forward(const Problem& p, const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, const c10::optional<at::Tensor>& attn_bias,
                                               at::IntArrayRef out_shape, at::IntArrayRef lse_shape) {
  at::Tensor out = at::empty(out_shape, q.options());
  at::Tensor lse = at::empty(lse_shape, q.options().dtype(acc_dtype_of(q)));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_fwd_cpu", [&] {
    const scalar_t* bias = p.has_bias ? attn_bias->const_data_ptr<scalar_t>() : nullptr;
    forward_kernel<scalar_t>(p, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                             v.const_data_ptr<scalar_t>(), bias, out.mutable_data_ptr<scalar_t>(), lse.data_ptr());
  });
  return {out, lse};
}

// One backward: checks grad_out/out/lse against the forward's shapes, then the kernel.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(
    const char* op, const Problem& p, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& attn_bias,
    at::IntArrayRef out_shape, at::IntArrayRef lse_shape) {
  TORCH_CHECK(grad_out.sizes() == out_shape, op, ": grad_out must be ", out_shape, ", got ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == grad_out.sizes(), op, ": out must be shaped like grad_out ", grad_out.sizes(), ", got ",
              out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
              ": grad_out and out must have the query's dtype ", q.scalar_type());
  TORCH_CHECK(lse.sizes() == lse_shape, op, ": lse must be ", lse_shape, ", got ", lse.sizes());
  TORCH_CHECK(grad_out.device().is_cpu() && out.device().is_cpu() && lse.device().is_cpu(), op,
              " (CPU kernel): grad_out, out and lse must be CPU tensors");
  const auto acc_dtype = acc_dtype_of(q);
  TORCH_CHECK(lse.scalar_type() == acc_dtype, op, ": lse must be ", acc_dtype, ", got ", lse.scalar_type());
  const at::Tensor dO = grad_out.contiguous(), o = out.contiguous(), lse_c = lse.contiguous();

  // dq accumulates in place when it is acc_t, so it starts at 0 (rows that see no key stay 0).
  at::Tensor dq = q.scalar_type() == acc_dtype ? at::zeros(q.sizes(), q.options()) : at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (dq.numel() == 0 && dk.numel() == 0 && dv.numel() == 0) return {dq, dk, dv};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_bwd_cpu", [&] {
    const scalar_t* bias = p.has_bias ? attn_bias->const_data_ptr<scalar_t>() : nullptr;
    backward_kernel<scalar_t>(p, dO.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(),
                              k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(),
                              lse_c.const_data_ptr(), bias, dq.mutable_data_ptr<scalar_t>(),
                              dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(), lse.numel(),
                              dq.numel());
  });
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& query, const at::Tensor& key,
                                                     const at::Tensor& value, const c10::optional<at::Tensor>& attn_bias,
                                                     double dropout_p, double scale, int64_t window_left,
                                                     int64_t window_right, int64_t diag_offset, double softcap,
                                                     int64_t seed) {
  const at::Tensor q = last_dim_contiguous(query), k = last_dim_contiguous(key), v = last_dim_contiguous(value);
  const Problem p = make_problem(q, k, v, attn_bias, dropout_p, scale, window_left, window_right, diag_offset,
                                 softcap, seed);
  const int64_t B = q.size(0), L = q.size(2);
  return run_forward(p, q, k, v, attn_bias, {B, p.Hq, L, p.Ev}, {B, p.Hq, L});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& attn_bias, double dropout_p,
    double scale, int64_t window_left, int64_t window_right, int64_t diag_offset, double softcap, int64_t seed) {
  const at::Tensor q = last_dim_contiguous(query), k = last_dim_contiguous(key), v = last_dim_contiguous(value);
  const Problem p = make_problem(q, k, v, attn_bias, dropout_p, scale, window_left, window_right, diag_offset,
                                 softcap, seed);
  const int64_t B = q.size(0), L = q.size(2);
  return run_backward("attention_bwd", p, grad_out, q, k, v, out, lse, attn_bias, {B, p.Hq, L, p.Ev}, {B, p.Hq, L});
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap, int64_t seed) {
  const at::Tensor q = last_dim_contiguous(query), k = last_dim_contiguous(key), v = last_dim_contiguous(value);
  const Problem p = make_varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                        scale, window_left, window_right, bottom_right, softcap, seed);
  const int64_t Tq = q.size(0);
  return run_forward(p, q, k, v, c10::nullopt, {Tq, p.Hq, p.Ev}, {p.Hq, Tq});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p, double scale, int64_t window_left,
    int64_t window_right, bool bottom_right, double softcap, int64_t seed) {
  const at::Tensor q = last_dim_contiguous(query), k = last_dim_contiguous(key), v = last_dim_contiguous(value);
  const Problem p = make_varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                        scale, window_left, window_right, bottom_right, softcap, seed);
  const int64_t Tq = q.size(0);
  return run_backward("attention_varlen_bwd", p, grad_out, q, k, v, out, lse, c10::nullopt, {Tq, p.Hq, p.Ev},
                      {p.Hq, Tq});
}

// ---------------------------------------------------------------------------------------------
// Autograd of the dense op, in C++: the seq2seq model's calls (B128 H4 L13 E16) are ~100-300 µs of
// math, and torch.library's Python autograd wrapper cost tens of µs per call on top.
// Device-generic: it redispatches to the CPU or CUDA kernels of attention_fwd / attention_bwd.
// ---------------------------------------------------------------------------------------------
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct AttentionFunction : public torch::autograd::Function<AttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& bias, double dropout_p, double scale,
                               int64_t window_left, int64_t window_right, int64_t diag_offset, double softcap,
                               int64_t seed) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastattn::attention_fwd", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const std::optional<at::Tensor>&, double, double, int64_t, int64_t, int64_t, double,
                             int64_t)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = op.call(q, k, v, bias, dropout_p, scale, window_left, window_right, diag_offset, softcap, seed);
    ctx->save_for_backward({q, k, v, out, lse, bias ? *bias : at::Tensor()});
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["window_left"] = window_left;
    ctx->saved_data["window_right"] = window_right;
    ctx->saved_data["diag_offset"] = diag_offset;
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["seed"] = seed;
    ctx->mark_non_differentiable({lse});  // handed to users detached
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastattn::attention_bwd", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double, double,
                             int64_t, int64_t, int64_t, double, int64_t)>();
    auto s = ctx->get_saved_variables();
    const at::Tensor &q = s[0], &k = s[1], &v = s[2], &out = s[3], &lse = s[4];
    const at::Tensor grad_out = grads[0].defined() ? grads[0].contiguous() : at::zeros_like(out);
    // Differentiating this backward (create_graph=True) would treat attention_bwd as a constant and
    // give wrong second-order gradients: refuse, as the Python backends do.
    TORCH_CHECK_NOT_IMPLEMENTED(
        !(at::GradMode::is_enabled() &&
          (grad_out.requires_grad() || q.requires_grad() || k.requires_grad() || v.requires_grad())),
        "fastattn attention: double backward (create_graph=True) is not supported; use backend='reference' for "
        "higher-order gradients");
    std::optional<at::Tensor> bias;
    if (s[5].defined()) bias = s[5];
    auto& d = ctx->saved_data;
    auto [dq, dk, dv] = op.call(grad_out, q, k, v, out, lse, bias, d["dropout_p"].toDouble(), d["scale"].toDouble(),
                                d["window_left"].toInt(), d["window_right"].toInt(), d["diag_offset"].toInt(),
                                d["softcap"].toDouble(), d["seed"].toInt());
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> attention_fwd_autograd(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const std::optional<at::Tensor>& bias,
                                                          double dropout_p, double scale, int64_t window_left,
                                                          int64_t window_right, int64_t diag_offset, double softcap,
                                                          int64_t seed) {
  auto o = AttentionFunction::apply(q, k, v, bias, dropout_p, scale, window_left, window_right, diag_offset, softcap,
                                    seed);
  return {o[0], o[1]};
}

}  // namespace attn_cpu
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, Autograd, m) {
  m.impl("attention_fwd", &fastattn::attn_cpu::attention_fwd_autograd);
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("attention_fwd", &fastattn::attn_cpu::attention_fwd_cpu);
  m.impl("attention_bwd", &fastattn::attn_cpu::attention_bwd_cpu);
  m.impl("attention_varlen_fwd", &fastattn::attn_cpu::attention_varlen_fwd_cpu);
  m.impl("attention_varlen_bwd", &fastattn::attn_cpu::attention_varlen_bwd_cpu);
}
