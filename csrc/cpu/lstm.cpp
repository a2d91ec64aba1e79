// LSTM on the CPU: one cell step, and one whole layer (every time step of one direction, forward
// and backward through time) inside a single native call.
//
// Cell step: fp32 on AVX-512 up to batch 64 runs one fused kernel (fused_cell: both products read
// straight from torch's weight layout, batch rows x k-groups in a vector's lanes, the gate math in
// registers); else two GEMMs and a pointwise pass. Its autograd is a hand-written graph node
// (LstmCellBackward): at batch 8, hidden 50 a step is a few microseconds and per-call overhead is
// most of it.
//
// Gate order is torch's: the 4H rows of w_ih / w_hh are [i | f | g | o].
//   gates = x W_ih^T + b_ih + h W_hh^T + b_hh
//   i, f, o = sigmoid(.), g = tanh(.);  c' = f*c + i*g;  r = o*tanh(c');  h' = r W_hr^T (or r)
//
// Layout of the work (per layer call):
//   1. the input projection of all T steps: one GEMM  (T*B, I) x (I, 4H) into `gates`
//   2. per step: one GEMM h_{t-1} W_hh^T accumulated into gates[t], then one fused vectorized
//      pointwise pass that adds the biases, activates the gates in place (saved for backward),
//      updates c and writes h; with proj_size one more GEMM r_t W_hr^T
//   GEMMs on raw pointers (at hidden 50 the per-call overhead of at::mm would dominate): fp32 on
//   AVX-512 CPUs through our packed-weight micro-kernel (see WeightGemm), else BLAS sgemm_/dgemm_.
//   fp32 on AVX-512 from batch 16 (hidden >= 32, weights <= 6 MB, no projection) instead runs 1. and
//   2. as one fused step per time step (see fused_step): x_t W_ih^T + h_{t-1} W_hh^T for 16 hidden
//   units' four gates in registers, the gate math in the same kernel; same workspace out.
//   Without autograd (lstm_layer_infer) the fused step keeps no workspace (c double-buffered).
//   3. backward through time: per step one pointwise pass (dgates) and one GEMM dgates W_hh;
//      the weight gradients of all steps afterwards as single GEMMs over the T*B rows (small layers,
//      I + P <= 128: [W_ih | W_hh] as one operand, so dx_t comes per step with dh, and one weight-
//      gradient product gives both).
// Variable lengths (packed sequences): batch row b takes part in step t iff t < lengths[b]; a row
// that does not keeps its state (so the reverse direction starts each row at its own last step),
// and its output there is 0.
// bf16/fp16 run in fp32 (inputs converted once at entry, the saved workspace stays fp32);
// float64 runs in float64 (for gradcheck).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/simd.h"

TORCH_LIBRARY_FRAGMENT(fastattn, m) {
  // One step. gates: the activated gates (B, 4H), float32 (float64 for float64 input).
  m.def(
      "lstm_cell_fwd(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh) -> (Tensor hy, Tensor cy, Tensor gates)");
  // grad_bias is the gradient of b_ih and of b_hh alike (4H,).
  m.def(
      "lstm_cell_bwd(Tensor grad_hy, Tensor grad_cy, Tensor input, Tensor hx, Tensor cx, Tensor cy, "
      "Tensor w_ih, Tensor w_hh, Tensor gates) -> (Tensor grad_input, Tensor grad_hx, Tensor grad_cx, "
      "Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias)");
  // One layer, one direction. input (T, B, I), h0 (B, P), c0 (B, H), w_ih (4H, I), w_hh (4H, P),
  // w_hr (P, H) or None (then P = H), lengths: None or int64 (B,) on the CPU, 1 <= lengths[b] <= T.
  // output (T, B, P); workspace for backward: gates (T, B, 4H) activated, cells (T, B, H) c_t,
  // hidden (T, B, H) = o*tanh(c_t) before the projection ((0,) without w_hr); float32 workspace
  // (float64 for float64 input).
  m.def(
      "lstm_layer_fwd(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? w_hr, bool reverse, Tensor? lengths) -> (Tensor output, Tensor h_n, "
      "Tensor c_n, Tensor gates, Tensor cells, Tensor hidden)");
  // lstm_layer_fwd without the workspace, for when nothing will be differentiated (no_grad, or no
  // argument requires grad): the fused step then keeps only the state the next step reads.
  // CPU only; not differentiable.
  m.def(
      "lstm_layer_infer(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? w_hr, bool reverse, Tensor? lengths) -> (Tensor output, Tensor h_n, Tensor c_n)");
  // grad_w_hr is (0,) without w_hr.
  m.def(
      "lstm_layer_bwd(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, Tensor h0, "
      "Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor output, Tensor gates, Tensor cells, "
      "Tensor hidden, bool reverse, Tensor? lengths) -> (Tensor grad_input, Tensor grad_h0, "
      "Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias, Tensor grad_w_hr)");
  // Both directions of one bidirectional layer in one call (the *_reverse arguments: the reverse
  // direction's state and weights, as lstm_layer_fwd takes them). concurrent: each direction's time
  // loop on its own thread when at::get_num_threads() >= 2, else one after the other; the results
  // are those of two lstm_layer_fwd calls (reverse false, true) bit for bit either way.
  m.def(
      "lstm_bidir_layer_fwd(Tensor input, Tensor h0, Tensor c0, Tensor h0_reverse, Tensor c0_reverse, "
      "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor w_ih_reverse, "
      "Tensor w_hh_reverse, Tensor? b_ih_reverse, Tensor? b_hh_reverse, Tensor? w_hr_reverse, Tensor? lengths, "
      "bool concurrent) -> (Tensor output, Tensor h_n, Tensor c_n, Tensor output_reverse, Tensor h_n_reverse, "
      "Tensor c_n_reverse, Tensor gates, Tensor cells, Tensor hidden, Tensor gates_reverse, "
      "Tensor cells_reverse, Tensor hidden_reverse)");
  // lstm_bidir_layer_fwd without the workspace (two lstm_layer_infer calls). CPU only; not differentiable.
  m.def(
      "lstm_bidir_layer_infer(Tensor input, Tensor h0, Tensor c0, Tensor h0_reverse, Tensor c0_reverse, "
      "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor w_ih_reverse, "
      "Tensor w_hh_reverse, Tensor? b_ih_reverse, Tensor? b_hh_reverse, Tensor? w_hr_reverse, Tensor? lengths, "
      "bool concurrent) -> (Tensor output, Tensor h_n, Tensor c_n, Tensor output_reverse, Tensor h_n_reverse, "
      "Tensor c_n_reverse)");
  // Two lstm_layer_bwd calls; grad_input is the sum of both directions' (in the input's dtype).
  m.def(
      "lstm_bidir_layer_bwd(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor grad_output_reverse, "
      "Tensor grad_h_n_reverse, Tensor grad_c_n_reverse, Tensor input, Tensor h0, Tensor c0, Tensor h0_reverse, "
      "Tensor c0_reverse, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor w_ih_reverse, Tensor w_hh_reverse, "
      "Tensor? w_hr_reverse, Tensor output, Tensor gates, Tensor cells, Tensor hidden, Tensor output_reverse, "
      "Tensor gates_reverse, Tensor cells_reverse, Tensor hidden_reverse, Tensor? lengths, bool concurrent) -> "
      "(Tensor grad_input, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias, "
      "Tensor grad_w_hr, Tensor grad_h0_reverse, Tensor grad_c0_reverse, Tensor grad_w_ih_reverse, "
      "Tensor grad_w_hh_reverse, Tensor grad_bias_reverse, Tensor grad_w_hr_reverse)");
}

#include "blas.h"
#include "gemm.h"

namespace fastattn {
namespace {

// MKL opens an OpenMP region even for tiny products (a cell step at batch 8 is 8 x 200 x 50), and
// the thread wake-up costs more than the product: below ~1M multiply-adds BLAS runs on the calling
// thread. MKL_Set_Num_Threads_Local (the C entry; the lowercase names are
// the Fortran ones, which take a pointer) is looked up weakly (absent when torch's BLAS is not MKL).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
constexpr int64_t kParallelFmas = 1 << 20;

struct BlasOnCallingThread {
  bool set = false;
  int prev = 0;
  explicit BlasOnCallingThread(int64_t fmas) {
    if (fmas < kParallelFmas && MKL_Set_Num_Threads_Local) prev = MKL_Set_Num_Threads_Local(1), set = true;
  }
  ~BlasOnCallingThread() {
    if (set) MKL_Set_Num_Threads_Local(prev);  // 0: back to the global setting
  }
};

// ---------------------------------------------------------------------------------------------
// Row-major GEMM: C (M, N) = op(A) op(B) + beta * C, every matrix row-major with row stride ld:
// fastattn::cpu::gemm (csrc/cpu/gemm.h). float on AVX-512 CPUs runs its packed kernel (~2x MKL's
// sgemm on AMD Zen 5); double and older CPUs go to BLAS (MKL, kept on the calling thread below
// kParallelFmas).
// ---------------------------------------------------------------------------------------------
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
          int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  BlasOnCallingThread serial(M * N * K);
  cpu::gemm<T>(trans_a, trans_b, M, N, K, T(1), A, std::max<int64_t>(lda, 1), B, std::max<int64_t>(ldb, 1), beta, C,
               std::max<int64_t>(ldc, 1), cpu::GemmEpilogue<T>(), M * N * K >= kParallelFmas);
}

// ---------------------------------------------------------------------------------------------
// fp32 GEMM with a weight operand: C (M, N) (+)= A (M, K) op(W), AVX-512.
// MKL runs its generic AVX2 path on AMD CPUs (about half of what AVX-512 gives on Zen 4/5), so the
// LSTM's weight products (input projection, per-step recurrent product, projection, dx) use this
// small kernel when the CPU has AVX-512, and sgemm_ otherwise.
//   * op(W) is packed once per layer call into panels of 48 columns (K x 48, zero-padded), so a
//     panel (K*192 bytes) stays in L1/L2 while it meets every row block of A;
//   * micro-kernel: 8 rows x 48 columns of C in 24 zmm accumulators; per k three panel loads, 8
//     broadcasts of A and 24 FMAs;
//   * rows are taken in chunks of 128 (A's chunk stays in L2), K in blocks of 256 (a panel block,
//     48 KB, L1/L2; blocks of 128 measured ~2% slower at LSTM(256, 256)), panels split across threads.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kNV = 3, kNR = 16 * kNV, kMR = 8, kMChunk = 128, kKBlock = 256;

struct PackedW {
  at::Tensor buf;  // (panels, K, kNR)
  int64_t K = 0, N = 0, panels = 0;
};

// op(W) is W^T when trans_w (W is (N, K) row-major), else W (W is (K, N) row-major).
PackedW pack_weight(const float* W, bool trans_w, int64_t K, int64_t N) {
  PackedW p;
  p.K = K, p.N = N, p.panels = (N + kNR - 1) / kNR;
  p.buf = at::zeros({p.panels * K * kNR}, at::kFloat);
  float* dst = p.buf.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    float* d = dst + (n / kNR) * K * kNR + (n % kNR);
    for (int64_t k = 0; k < K; ++k) d[k * kNR] = trans_w ? W[n * K + k] : W[k * N + n];
  }
  return p;
}

bool cpu_has_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return yes;
#else
  return false;
#endif
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTATTN_HAVE_AVX512_GEMM 1
}  // namespace
}  // namespace fastattn
#include <immintrin.h>

#include "cpu/avx512_exp.h"
#include "cpu/avx512_transpose.h"
namespace fastattn {
namespace {

// C rows [0, MR) x columns [0, ncols) (+)= A (MR, K) x Bm (K, ncols <= kNR).
// A[r, k] at A[r * a_rs + k * a_ks]; Bm row k at Bm + k * b_ks (a packed panel: b_ks = kNR).
// NV: 16-wide column vectors used (1..kNV): a narrow panel (the last one of N = 50, or N = 8) runs
// only the vectors it needs instead of masked-off FMAs. MaskB: Bm's rows end at ncols (else they are
// 16*NV wide, zero-padded in a packed panel, and load without masks).
template <int MR, int NV, bool MaskB>
__attribute__((target("avx512f"))) void micro_kernel(const float* __restrict A, int64_t a_rs, int64_t a_ks,
                                                     const float* __restrict Bm, int64_t b_ks, int64_t K, float* C,
                                                     int64_t ldc, int64_t ncols, bool accumulate) {
  __mmask16 mask[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const int64_t left = ncols - 16 * v;
    mask[v] = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
  }
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = MaskB ? _mm512_maskz_loadu_ps(mask[v], Bm + k * b_ks + 16 * v) : _mm512_loadu_ps(Bm + k * b_ks + 16 * v);
    const float* a_k = A + k * a_ks;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(a_k[r * a_rs]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    float* c = C + r * ldc;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      __m512 x = acc[r][v];
      if (accumulate) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(mask[v], c + 16 * v));
      _mm512_mask_storeu_ps(c + 16 * v, mask[v], x);
    }
  }
}

using MicroKernel = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*, int64_t, int64_t,
                             bool);
template <int NV, bool MaskB>
constexpr MicroKernel kMicroKernelRow[kMR + 1] = {
    nullptr,
    micro_kernel<1, NV, MaskB>,
    micro_kernel<2, NV, MaskB>,
    micro_kernel<3, NV, MaskB>,
    micro_kernel<4, NV, MaskB>,
    micro_kernel<5, NV, MaskB>,
    micro_kernel<6, NV, MaskB>,
    micro_kernel<7, NV, MaskB>,
    micro_kernel<8, NV, MaskB>};

// The kernel for mr rows (1..kMR) and ncols columns (1..kNR); padded: B's rows are zero-padded to
// a multiple of 16 columns (a packed panel).
MicroKernel micro_kernel_for(int64_t mr, int64_t ncols, bool padded) {
  const int64_t nv = (ncols + 15) / 16;
  const bool mask_b = !padded && ncols != 16 * nv;
  if (nv == 3) return mask_b ? kMicroKernelRow<3, true>[mr] : kMicroKernelRow<3, false>[mr];
  if (nv == 2) return mask_b ? kMicroKernelRow<2, true>[mr] : kMicroKernelRow<2, false>[mr];
  return mask_b ? kMicroKernelRow<1, true>[mr] : kMicroKernelRow<1, false>[mr];
}

void gemm_packed(int64_t M, const float* A, int64_t lda, const PackedW& W, float* C, int64_t ldc, bool accumulate) {
  const float* panels = W.buf.const_data_ptr<float>();
  const int64_t K = W.K, N = W.N;
  auto run_panels = [&](int64_t p0, int64_t p1) {
    for (int64_t m0 = 0; m0 < M; m0 += kMChunk) {
      const int64_t m1 = std::min(M, m0 + kMChunk);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t ncols = std::min(kNR, N - p * kNR);
        for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {  // a k-block of the panel (kKBlock x kNR) stays in L1
          const int64_t kb = std::min(kKBlock, K - k0);
          const float* panel = panels + (p * K + k0) * kNR;
          for (int64_t m = m0; m < m1; m += kMR) {
            const int64_t mr = std::min(kMR, m1 - m);
            micro_kernel_for(mr, ncols, true)(A + m * lda + k0, lda, 1, panel, kNR, kb, C + m * ldc + p * kNR, ldc, ncols,
                              accumulate || k0 > 0);
          }
        }
      }
    }
  };
  // threads only for products of ~1M multiply-adds or more (a thread wake-up costs microseconds),
  // and then each thread gets a few hundred thousand
  const int64_t fmas_per_panel = M * K * kNR;
  const int64_t grain = std::max<int64_t>(1, 262144 / std::max<int64_t>(fmas_per_panel, 1));
  if (W.panels <= grain || M * K * N < kParallelFmas) run_panels(0, W.panels);
  else at::parallel_for(0, W.panels, grain, run_panels);
}

// C (R, Kc) = D^T Y for D (N, R), Y (N, Kc) row-major (a weight gradient summed over N = T*B rows),
// straight from D and Y (no packing): worth it while D and Y sit in L2; larger goes to BLAS.
bool small_weight_grad(int64_t N, int64_t R, int64_t Kc) {
  return cpu_has_avx512() && N * (R + Kc) * (int64_t)sizeof(float) <= (1 << 20);
}

void weight_grad_avx512(int64_t R, int64_t Kc, int64_t N, const float* D, const float* Y, float* C) {
  auto rows = [&](int64_t tile0, int64_t tile1) {
    for (int64_t r = tile0 * kMR; r < std::min(R, tile1 * kMR); r += kMR) {
      const int64_t mr = std::min(kMR, R - r);
      for (int64_t c = 0; c < Kc; c += kNR) {
        const int64_t nc = std::min(kNR, Kc - c);
        micro_kernel_for(mr, nc, false)(D + r, 1, R, Y + c, Kc, N, C + r * Kc + c, Kc, nc, false);
      }
    }
  };
  // row tiles split over threads from ~1M multiply-adds (grad_w_hh at the seed shape: 200 x 50 x 512)
  const int64_t tiles = (R + kMR - 1) / kMR;
  if (R * Kc * N < kParallelFmas) rows(0, tiles);
  else at::parallel_for(0, tiles, 1, rows);
}
#endif

// C (R, Kc) = D^T Y, D (N, R) and Y (N, Kc) row-major.
template <typename T>
void weight_grad(int64_t R, int64_t Kc, int64_t N, const T* D, const T* Y, T* C) {
#ifdef FASTATTN_HAVE_AVX512_GEMM
  if constexpr (std::is_same_v<T, float>) {
    if (small_weight_grad(N, R, Kc)) return weight_grad_avx512(R, Kc, N, D, Y, C);
  }
#endif
  gemm<T>(true, false, R, Kc, N, D, R, Y, Kc, T(0), C, Kc);
}

// C (M, N) = A (M, K) op(W) (+ C when accumulate) for many A with one W (a layer's weight products):
// op(W) is W^T (W is (N, K)) when trans_w, else W (W is (K, N)). Packed AVX-512 kernel for fp32 when
// the CPU has it and W is used enough to pay for packing, BLAS otherwise.
template <typename T>
struct WeightGemm {
  const T* W;
  bool trans_w;
  int64_t N, K;
  PackedW packed;

  WeightGemm(const T* W_, bool trans_w_, int64_t N_, int64_t K_, int64_t rows_total)
      : W(W_), trans_w(trans_w_), N(N_), K(K_) {
#ifdef FASTATTN_HAVE_AVX512_GEMM
    if constexpr (std::is_same_v<T, float>) {
      if (cpu_has_avx512() && N > 0 && K > 0 && rows_total >= 16) packed = pack_weight(W, trans_w, K, N);
    }
#endif
  }

  void run(int64_t M, const T* A, bool accumulate, T* C) const {
    if (M == 0) return;
#ifdef FASTATTN_HAVE_AVX512_GEMM
    if constexpr (std::is_same_v<T, float>) {
      if (packed.buf.defined()) {
        gemm_packed(M, A, K, packed, C, N, accumulate);
        return;
      }
    }
#endif
    gemm<T>(false, trans_w, M, N, K, A, K, W, trans_w ? K : N, accumulate ? T(1) : T(0), C, N);
  }
};

// ---------------------------------------------------------------------------------------------
// Fused pointwise passes (one batch row at a time; vectorized over the hidden units).
// ---------------------------------------------------------------------------------------------
template <typename T>
FASTATTN_INLINE T sigmoid(T x) {
  return T(1) / (T(1) + simd::exp_t<T>(-x));
}
template <typename T>
FASTATTN_INLINE T tanh_(T x) {  // 2 sigmoid(2x) - 1: exp_t vectorizes, std::tanh does not
  return T(2) / (T(1) + simd::exp_t<T>(T(-2) * x)) - T(1);
}

// gates: the 4H pre-activations in (plus bias, if given), the activations out. c_in -> c_out: the cell state (may be
// the same buffer); c_save: a second copy of c' (or null); r: o*tanh(c'); r2: a copy of r (or null).
template <typename T>
FASTATTN_SIMD void pointwise_fwd_row(T* __restrict gates, const T* __restrict bias, const T* c_in, T* c_out,
                                     T* c_save, T* __restrict r, T* __restrict r2, int64_t H) {
  if (bias) {  // the layer adds its biases here rather than in a pass over all T*B*4H gates
#pragma omp simd
    for (int64_t j = 0; j < 4 * H; ++j) gates[j] += bias[j];
  }
  T* gi = gates;
  T* gf = gates + H;
  T* gg = gates + 2 * H;
  T* go = gates + 3 * H;
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T i = sigmoid(gi[j]), f = sigmoid(gf[j]), g = tanh_(gg[j]), o = sigmoid(go[j]);
    const T cn = f * c_in[j] + i * g;
    const T h = o * tanh_(cn);
    gi[j] = i;
    gf[j] = f;
    gg[j] = g;
    go[j] = o;
    c_out[j] = cn;
    r[j] = h;
  }
  if (c_save) std::memcpy(c_save, c_out, H * sizeof(T));
  if (r2) std::memcpy(r2, r, H * sizeof(T));
}

// Gradients of one step. gates: the activations; c_new, c_prev: the cell after/before the step;
// dr: dL/d(o*tanh(c_new)); dc: dL/dc_new in, dL/dc_prev out; dgates: dL/d(pre-activations) out.
template <typename T>
FASTATTN_SIMD void pointwise_bwd_row(const T* __restrict gates, const T* __restrict c_new,
                                     const T* __restrict c_prev, const T* __restrict dr, T* __restrict dc,
                                     T* __restrict dgates, int64_t H) {
  const T* gi = gates;
  const T* gf = gates + H;
  const T* gg = gates + 2 * H;
  const T* go = gates + 3 * H;
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T i = gi[j], f = gf[j], g = gg[j], o = go[j];
    const T tc = tanh_(c_new[j]);
    const T dcn = dc[j] + dr[j] * o * (T(1) - tc * tc);
    dgates[j] = dcn * g * i * (T(1) - i);
    dgates[H + j] = dcn * c_prev[j] * f * (T(1) - f);
    dgates[2 * H + j] = dcn * i * (T(1) - g * g);
    dgates[3 * H + j] = dr[j] * tc * o * (T(1) - o);
    dc[j] = dcn * f;
  }
}

// rows[r] = b_ih + b_hh (either may be null) for each of the `rows` rows of width n.
template <typename T>
FASTATTN_SIMD void fill_bias(T* __restrict out, const T* __restrict b1, const T* __restrict b2, int64_t rows,
                             int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    T* o = out + r * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) o[j] = (b1 ? b1[j] : T(0)) + (b2 ? b2[j] : T(0));
  }
}

// out[j] = sum_r x[r, j]
template <typename T>
FASTATTN_SIMD void column_sums(const T* __restrict x, T* __restrict out, int64_t rows, int64_t n) {
  std::fill(out, out + n, T(0));
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] += row[j];
  }
}

// Run f(b) for every batch row, in parallel when the rows carry enough work to pay for threads.
template <typename F>
void for_rows(int64_t B, int64_t work_per_row, const F& f) {
  // threads from 32K gate values a step on (batch 32 at hidden 256: the pass is ~10% of a step's
  // time, and serial it left the second thread idle after each step's GEMM)
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(work_per_row, 1));
  if (B * work_per_row < 32768 || B <= grain) {
    for (int64_t b = 0; b < B; ++b) f(b);
  } else {
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) f(b);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Argument handling shared by the ops.
// ---------------------------------------------------------------------------------------------
at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The tensor in the compute type, contiguous (no copy, and no dispatcher call, when it already is:
// at hidden 50 a cell step is a few microseconds, and every dispatched no-op costs a fraction of one).
at::Tensor prep(const at::Tensor& t, at::ScalarType ct) {
  if (t.scalar_type() == ct && t.is_contiguous()) return t;
  return t.to(ct).contiguous();
}

// The result in the caller's dtype (no dispatcher call when it already has it).
at::Tensor as_type(const at::Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

void check_float(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu(), "fastattn lstm (cpu): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "fastattn lstm: ", name, " must have dtype ",
              like.scalar_type(), " like input, got ", t.scalar_type());
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, "fastattn lstm: ", name, " must have shape ", want, ", got ", t.sizes());
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------------------------------------
// Cell step.
// ---------------------------------------------------------------------------------------------
#ifdef FASTATTN_HAVE_AVX512_GEMM
bool use_fused_cell(bool is_float, int64_t B, int64_t I, int64_t H);
void fused_cell(int64_t B, int64_t I, int64_t H, const float* x, const float* h, const float* c, const float* w_ih,
                const float* w_hh, const float* bias, float* G, float* HY, float* CY);
#endif
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_fwd_cpu(const at::Tensor& input, const at::Tensor& hx,
                                                                 const at::Tensor& cx, const at::Tensor& w_ih,
                                                                 const at::Tensor& w_hh,
                                                                 const std::optional<at::Tensor>& b_ih_opt,
                                                                 const std::optional<at::Tensor>& b_hh_opt) {
  TORCH_CHECK(input.dim() == 2, "fastattn lstm_cell: input must be (batch, input_size), got ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "fastattn lstm_cell: input must be floating point, got ",
              input.scalar_type());
  const int64_t B = input.size(0), I = input.size(1), H = w_hh.size(-1);
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == 4 * H, "fastattn lstm_cell: w_hh must be (4*hidden, hidden), got ",
              w_hh.sizes());
  check_shape(w_ih, "w_ih", {4 * H, I});
  check_shape(hx, "hx", {B, H});
  check_shape(cx, "cx", {B, H});
  for (auto& [t, name] : {std::pair{hx, "hx"}, {cx, "cx"}, {w_ih, "w_ih"}, {w_hh, "w_hh"}}) check_float(t, name, input);
  check_float(input, "input", input);
  const auto ct = compute_type(input);
  at::Tensor b_ih, b_hh;
  if (b_ih_opt && b_ih_opt->defined()) { check_float(*b_ih_opt, "b_ih", input); check_shape(*b_ih_opt, "b_ih", {4 * H}); b_ih = prep(*b_ih_opt, ct); }
  if (b_hh_opt && b_hh_opt->defined()) { check_float(*b_hh_opt, "b_hh", input); check_shape(*b_hh_opt, "b_hh", {4 * H}); b_hh = prep(*b_hh_opt, ct); }
  auto x = prep(input, ct), h = prep(hx, ct), c = prep(cx, ct), wi = prep(w_ih, ct), wh = prep(w_hh, ct);
  auto gates = at::empty({B, 4 * H}, x.options());
  auto hy = at::empty({B, H}, x.options());
  auto cy = at::empty({B, H}, x.options());
#ifdef FASTATTN_HAVE_AVX512_GEMM
  if (use_fused_cell(ct == at::kFloat, B, I, H)) {
    thread_local std::vector<float> bias;  // b_ih + b_hh
    const bool has_bias = b_ih.defined() || b_hh.defined();
    if (has_bias) {
      if ((int64_t)bias.size() < 4 * H) bias.resize(4 * H);
      fill_bias<float>(bias.data(), ptr_or_null<float>(b_ih), ptr_or_null<float>(b_hh), 1, 4 * H);
    }
    fused_cell(B, I, H, x.const_data_ptr<float>(), h.const_data_ptr<float>(), c.const_data_ptr<float>(),
               wi.const_data_ptr<float>(), wh.const_data_ptr<float>(), has_bias ? bias.data() : nullptr,
               gates.data_ptr<float>(), hy.data_ptr<float>(), cy.data_ptr<float>());
    return {as_type(hy, input.scalar_type()), as_type(cy, input.scalar_type()), gates};
  }
#endif
  AT_DISPATCH_FLOATING_TYPES(ct, "lstm_cell_fwd", [&] {
    using T = scalar_t;
    T* G = gates.data_ptr<T>();
    fill_bias<T>(G, ptr_or_null<T>(b_ih), ptr_or_null<T>(b_hh), B, 4 * H);
    gemm<T>(false, true, B, 4 * H, I, x.const_data_ptr<T>(), I, wi.const_data_ptr<T>(), I, T(1), G, 4 * H);
    gemm<T>(false, true, B, 4 * H, H, h.const_data_ptr<T>(), H, wh.const_data_ptr<T>(), H, T(1), G, 4 * H);
    const T* C = c.const_data_ptr<T>();
    T* CY = cy.data_ptr<T>();
    T* HY = hy.data_ptr<T>();
    for_rows(B, 4 * H, [&](int64_t b) {
      pointwise_fwd_row<T>(G + b * 4 * H, nullptr, C + b * H, CY + b * H, nullptr, HY + b * H, nullptr, H);
    });
  });
  return {as_type(hy, input.scalar_type()), as_type(cy, input.scalar_type()), gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cell_bwd_cpu(
    const at::Tensor& grad_hy, const at::Tensor& grad_cy, const at::Tensor& input, const at::Tensor& hx,
    const at::Tensor& cx, const at::Tensor& cy, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& gates) {
  const int64_t B = input.size(0), I = input.size(1), H = w_hh.size(-1);
  check_shape(grad_hy, "grad_hy", {B, H});
  check_shape(grad_cy, "grad_cy", {B, H});
  check_shape(gates, "gates", {B, 4 * H});
  const auto ct = compute_type(input);
  TORCH_CHECK(gates.scalar_type() == ct, "fastattn lstm_cell_bwd: gates must be ", ct);
  auto x = prep(input, ct), h = prep(hx, ct), c0 = prep(cx, ct), c1 = prep(cy, ct), wi = prep(w_ih, ct),
       wh = prep(w_hh, ct), g = gates.contiguous(), dh = prep(grad_hy, ct);
  auto dc = prep(grad_cy, ct).clone();  // becomes grad_cx
  auto dgates = at::empty({B, 4 * H}, x.options());
  auto dx = at::empty({B, I}, x.options());
  auto dhx = at::empty({B, H}, x.options());
  auto dwi = at::empty({4 * H, I}, x.options());
  auto dwh = at::empty({4 * H, H}, x.options());
  auto db = at::empty({4 * H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "lstm_cell_bwd", [&] {
    using T = scalar_t;
    const T *G = g.const_data_ptr<T>(), *C1 = c1.const_data_ptr<T>(), *C0 = c0.const_data_ptr<T>(),
            *DH = dh.const_data_ptr<T>();
    T *DC = dc.data_ptr<T>(), *DG = dgates.data_ptr<T>();
    for_rows(B, 4 * H, [&](int64_t b) {
      pointwise_bwd_row<T>(G + b * 4 * H, C1 + b * H, C0 + b * H, DH + b * H, DC + b * H, DG + b * 4 * H, H);
    });
    gemm<T>(false, false, B, I, 4 * H, DG, 4 * H, wi.const_data_ptr<T>(), I, T(0), dx.data_ptr<T>(), I);
    gemm<T>(false, false, B, H, 4 * H, DG, 4 * H, wh.const_data_ptr<T>(), H, T(0), dhx.data_ptr<T>(), H);
    weight_grad<T>(4 * H, I, B, DG, x.const_data_ptr<T>(), dwi.data_ptr<T>());
    weight_grad<T>(4 * H, H, B, DG, h.const_data_ptr<T>(), dwh.data_ptr<T>());
    column_sums<T>(DG, db.data_ptr<T>(), B, 4 * H);
  });
  const auto dt = input.scalar_type();
  return {as_type(dx, dt), as_type(dhx, dt), as_type(dc, dt), as_type(dwi, dt), as_type(dwh, dt), as_type(db, dt)};
}

// ---------------------------------------------------------------------------------------------
// Whole layer.
// ---------------------------------------------------------------------------------------------
struct Layer {
  int64_t T, B, I, H, P;
  bool proj, reverse;
  const int64_t* len;  // null: every row runs all T steps
  bool active(int64_t t, int64_t b) const { return !len || t < len[b]; }
  int64_t time_of_step(int64_t s) const { return reverse ? T - 1 - s : s; }
};

at::Tensor check_lengths(const std::optional<at::Tensor>& lengths, int64_t T, int64_t B) {
  if (!lengths || !lengths->defined()) return at::Tensor();
  const auto& l = *lengths;
  TORCH_CHECK(l.device().is_cpu() && l.scalar_type() == at::kLong && l.dim() == 1 && l.size(0) == B,
              "fastattn lstm: lengths must be an int64 CPU tensor of shape (", B, "), got ", l.scalar_type(), " ",
              l.device(), " ", l.sizes());
  auto lc = l.contiguous();
  const int64_t* p = lc.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(p[b] >= 1 && p[b] <= T, "fastattn lstm: lengths must lie in [1, ", T, "], got ", p[b]);
  return lc;
}

#ifdef FASTATTN_HAVE_AVX512_GEMM
// ---------------------------------------------------------------------------------------------
// Fused step (fp32, AVX-512, no projection): the step's two products x_t W_ih^T + h_{t-1} W_hh^T
// and its gate math in one kernel: no input-projection pass over all T steps, no separate
// pointwise pass re-reading the gates.
//   * W_ih^T and W_hh^T are packed once per layer call into column tiles of 16 hidden units: tile u
//     is (K, 64), its columns [i | f | g | o] of units 16u..16u+15 (zero-padded past H). One
//     register block of 6 batch rows x 64 columns (24 zmm accumulators; per k 4 panel loads,
//     6 broadcasts, 24 FMAs) then holds all four gate pre-activations of 6 rows x 16 units;
//   * its epilogue adds the biases, applies the gate math and writes the activated gates (the
//     layout backward reads), c_t and h_t;
//   * a step's tiles are split over threads, tile by tile (a thread reads only its tiles' panels,
//     (I + H) * 256 bytes each); step t+1 needs all of h_t, so one at::parallel_for per step, and
//     h is double-buffered (h_{t-1} is read while h_t is written).
// ---------------------------------------------------------------------------------------------
constexpr int64_t kTileUnits = 16, kTileCols = 4 * kTileUnits, kFusedMR = 6, kFusedKBlock = 128;

struct GateTiles {
  at::Tensor buf;  // (tiles, K, kTileCols)
  int64_t K = 0, tiles = 0;
  const float* panel(int64_t u) const { return buf.const_data_ptr<float>() + u * K * kTileCols; }
};

using avx512::transpose16x16;  // avx512_transpose.h

// Tile u's gate q (16 full units) for k in [0, K): 16 x 16 blocks of W transposed in registers
// (the scalar copy of the ~2 MB of LSTM(256, 256)'s weights was ~2% of a forward call).
__attribute__((target("avx512f"))) void pack_gate_block(const float* W, int64_t K, float* d) {
  __m512 r[16], c[16];
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    const int64_t kk = std::min<int64_t>(16, K - k0);
    const __mmask16 m = kk == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << kk) - 1);
    for (int i = 0; i < 16; ++i) r[i] = _mm512_maskz_loadu_ps(m, W + i * K + k0);
    transpose16x16(r, c);
    for (int64_t j = 0; j < kk; ++j) _mm512_storeu_ps(d + (k0 + j) * kTileCols, c[j]);
  }
}

// W is (4H, K) row-major (torch's w_ih / w_hh, gates [i | f | g | o] along the rows).
GateTiles pack_gate_tiles(const float* W, int64_t H, int64_t K) {
  GateTiles p;
  p.K = K, p.tiles = (H + kTileUnits - 1) / kTileUnits;
  p.buf = at::empty({p.tiles * std::max<int64_t>(K, 1) * kTileCols}, at::kFloat);
  float* dst = p.buf.data_ptr<float>();
  // written in order (k outer): the 64 rows of W a tile reads stay in L1 while k runs along them;
  // tiles split over threads from 256K weights on
  auto pack_tiles = [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t j0 = u * kTileUnits, n = std::min(kTileUnits, H - j0);
      if (n == kTileUnits) {
        for (int64_t gate = 0; gate < 4; ++gate)
          pack_gate_block(W + (gate * H + j0) * K, K, dst + u * K * kTileCols + gate * kTileUnits);
        continue;
      }
      std::fill(dst + u * K * kTileCols, dst + (u + 1) * K * kTileCols, 0.f);
      for (int64_t k = 0; k < K; ++k) {
        float* d = dst + (u * K + k) * kTileCols;
        for (int64_t gate = 0; gate < 4; ++gate)
          for (int64_t jj = 0; jj < n; ++jj) d[gate * kTileUnits + jj] = W[(gate * H + j0 + jj) * K + k];
      }
    }
  };
  if (4 * H * K < (1 << 18)) pack_tiles(0, p.tiles);
  else at::parallel_for(0, p.tiles, 1, pack_tiles);
  return p;
}

// acc (MR x 4 vectors) += A (MR, K) x panel (K, 64); A's rows lda apart.
template <int MR>
__attribute__((target("avx512f"), always_inline)) inline void tile_accumulate(__m512 (&acc)[MR][4],
                                                                              const float* __restrict A, int64_t lda,
                                                                              const float* __restrict panel,
                                                                              int64_t K) {
  for (int64_t k = 0; k < K; ++k) {
    const float* p = panel + k * kTileCols;
    const __m512 b0 = _mm512_loadu_ps(p), b1 = _mm512_loadu_ps(p + 16), b2 = _mm512_loadu_ps(p + 32),
                 b3 = _mm512_loadu_ps(p + 48);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k]);
      acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(a, b2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(a, b3, acc[r][3]);
    }
  }
}

// pre (MR, 64) (+)= A (MR, K) x panel (K, 64); A's rows lda apart.
template <int MR>
__attribute__((target("avx512f"))) void tile_gemm(const float* A, int64_t lda, const float* panel, int64_t K,
                                                  float* __restrict pre, bool accumulate) {
  __m512 acc[MR][4];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v)
      acc[r][v] = accumulate ? _mm512_loadu_ps(pre + r * kTileCols + 16 * v) : _mm512_setzero_ps();
  tile_accumulate<MR>(acc, A, lda, panel, K);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(pre + r * kTileCols + 16 * v, acc[r][v]);
}

using TileGemm = void (*)(const float*, int64_t, const float*, int64_t, float*, bool);
constexpr TileGemm kTileGemm[kFusedMR + 1] = {nullptr,      tile_gemm<1>, tile_gemm<2>, tile_gemm<3>,
                                              tile_gemm<4>, tile_gemm<5>, tile_gemm<6>};

using avx512::exp16;  // csrc/cpu/avx512_exp.h
// 1 / (1 + e) for e in [0, exp(88)]: rcp14 and one Newton step (~1 ulp; a division costs more than
// the rest of a gate). e is kept finite by the callers' clamp (rcp14(inf) = 0 would turn NaN here).
__attribute__((target("avx512f"), always_inline)) inline __m512 one_over_1p(__m512 e) {
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), e);
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
}
__attribute__((target("avx512f"), always_inline)) inline __m512 sigmoid16(__m512 x) {  // 1 / (1 + exp(-x))
  const __m512 mx = _mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), x), _mm512_set1_ps(88.f));
  return one_over_1p(exp16(mx));
}
__attribute__((target("avx512f"), always_inline)) inline __m512 tanh16(__m512 x) {  // 2 sigmoid(2x) - 1
  const __m512 m2x = _mm512_min_ps(_mm512_mul_ps(_mm512_set1_ps(-2.f), x), _mm512_set1_ps(88.f));
  return _mm512_fmsub_ps(_mm512_set1_ps(2.f), one_over_1p(exp16(m2x)), _mm512_set1_ps(1.f));
}

// The epilogue of one tile: rows [0, B), units [j0, j0 + n) (n <= 16), one 16-wide vector per gate.
// pre: the (B, 64) pre-activations [i | f | g | o] without bias; bias: b_ih + b_hh (4H) or null;
// G: gates[t] (B, 4H), the activations out (null: not kept, inference); C: c_{t-1} (B, H) (c0 or the previous step's cells[]); Ct: cells[t];
// Ot: output[t]; h_prev: the state this step read, h_next: the one it writes (both (B, H)).
// A row past its length keeps its state; its gates and output are 0.
__attribute__((target("avx512f"))) void tile_epilogue(const float* __restrict pre, int64_t B, int64_t j0, int64_t n,
                                                      int64_t H, const float* __restrict bias, const Layer& L,
                                                      int64_t t, float* __restrict G, const float* __restrict C,
                                                      float* __restrict Ct, float* __restrict Ot,
                                                      const float* __restrict h_prev, float* __restrict h_next) {
  const __mmask16 m = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
  __m512 bv[4];
  for (int q = 0; q < 4; ++q) bv[q] = bias ? _mm512_maskz_loadu_ps(m, bias + q * H + j0) : _mm512_setzero_ps();
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t hb = b * H + j0;
    float* g = G ? G + b * 4 * H + j0 : nullptr;
    if (!L.active(t, b)) {
      if (g)
        for (int q = 0; q < 4; ++q) _mm512_mask_storeu_ps(g + q * H, m, zero);
      _mm512_mask_storeu_ps(Ct + hb, m, _mm512_maskz_loadu_ps(m, C + hb));  // C: c_{t-1}
      _mm512_mask_storeu_ps(Ot + hb, m, zero);
      _mm512_mask_storeu_ps(h_next + hb, m, _mm512_maskz_loadu_ps(m, h_prev + hb));
      continue;
    }
    const float* p = pre + b * kTileCols;
    const __m512 i = sigmoid16(_mm512_add_ps(_mm512_loadu_ps(p), bv[0]));
    const __m512 f = sigmoid16(_mm512_add_ps(_mm512_loadu_ps(p + 16), bv[1]));
    const __m512 gt = tanh16(_mm512_add_ps(_mm512_loadu_ps(p + 32), bv[2]));
    const __m512 o = sigmoid16(_mm512_add_ps(_mm512_loadu_ps(p + 48), bv[3]));
    const __m512 cn = _mm512_fmadd_ps(f, _mm512_maskz_loadu_ps(m, C + hb), _mm512_mul_ps(i, gt));
    const __m512 h = _mm512_mul_ps(o, tanh16(cn));
    if (g) {
      _mm512_mask_storeu_ps(g, m, i);
      _mm512_mask_storeu_ps(g + H, m, f);
      _mm512_mask_storeu_ps(g + 2 * H, m, gt);
      _mm512_mask_storeu_ps(g + 3 * H, m, o);
    }
    _mm512_mask_storeu_ps(Ct + hb, m, cn);
    _mm512_mask_storeu_ps(Ot + hb, m, h);
    _mm512_mask_storeu_ps(h_next + hb, m, h);
  }
}

// One step t of the layer (no projection, P = H). Xt: input[t] (B, I); the rest as in tile_epilogue.
void fused_step(const GateTiles& Wx, const GateTiles& Wh, const Layer& L, int64_t t, const float* Xt,
                const float* h_prev, float* h_next, const float* bias, float* Gt, const float* C, float* Ct, float* Ot) {
  const int64_t B = L.B, H = L.H, I = L.I;
  const int64_t blocks = (B + kFusedMR - 1) / kFusedMR;
  auto blk_rows = [&](int64_t blk) { return B / blocks + (blk < B % blocks ? 1 : 0); };
  auto run_tiles = [&](int64_t u0, int64_t u1) {
    std::vector<float> pre_buf(B * kTileCols);  // the tile's (B, 64) pre-activations
    float* pre = pre_buf.data();
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t j0 = u * kTileUnits, n = std::min(kTileUnits, H - j0);
      // K in blocks of kFusedKBlock (a 32 KB panel block stays in L1 while every row block meets it;
      // 64 and 256 measured within noise of 128), first over x_t's columns (I), then over h's (H);
      // rows in blocks of at most 6, as even as can be (32 = 6+6+5+5+5+5: no inefficient block of 2)
      bool first = true;
      for (int part = 0; part < 2; ++part) {
        const float* A = part == 0 ? Xt : h_prev;
        const int64_t K = part == 0 ? I : H;
        const float* panel = part == 0 ? Wx.panel(u) : Wh.panel(u);
        for (int64_t k0 = 0; k0 < K; k0 += kFusedKBlock, first = false) {
          const int64_t kb = std::min(kFusedKBlock, K - k0);
          for (int64_t blk = 0, b0 = 0; blk < blocks; b0 += blk_rows(blk), ++blk)
            kTileGemm[blk_rows(blk)](A + b0 * K + k0, K, panel + k0 * kTileCols, kb, pre + b0 * kTileCols, !first);
        }
      }
      if (first) std::fill(pre, pre + B * kTileCols, 0.f);  // I = H = 0
      tile_epilogue(pre, B, j0, n, H, bias, L, t, Gt, C, Ct, Ot, h_prev, h_next);
    }
  };
  if (B * 4 * H * (I + H) < kParallelFmas || Wh.tiles == 1) run_tiles(0, Wh.tiles);
  else at::parallel_for(0, Wh.tiles, 1, run_tiles);
}

// The whole layer through fused_step. X: input (T, B, I); Hs, Cs: h0/c0 in, h_n/c_n out (B, H);
// c_{t-1} is read from the previous step's cells[] (a row sitting a step out copies its state there);
// G: gates (T, B, 4H), CS: cells (T, B, H), O: output (T, B, H), all written. Inference (G and CS
// null): no workspace, c double-buffered like h (13 MB less written at LSTM(256, 256), batch 32, T 100).
void fused_recurrence(const Layer& L, const float* X, const float* w_ih, const float* w_hh, const float* bias,
                      float* Hs, float* Cs, float* G, float* CS, float* O) {
  const int64_t T = L.T, B = L.B, H = L.H, I = L.I;
  const GateTiles wx = pack_gate_tiles(w_ih, H, I), wh = pack_gate_tiles(w_hh, H, H);
  std::vector<float> h_other(B * H), c_other(CS ? 0 : B * H);
  float* hbuf[2] = {Hs, h_other.data()};
  float* cbuf[2] = {Cs, c_other.data()};
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = L.time_of_step(s);
    // c_{t-1}: c0, the previous step's cells[] (which holds every row's state), or the other c buffer
    const float* c_prev = !CS ? cbuf[s % 2] : s == 0 ? Cs : CS + L.time_of_step(s - 1) * B * H;
    float* c_next = CS ? CS + t * B * H : cbuf[(s + 1) % 2];
    fused_step(wx, wh, L, t, X + t * B * I, hbuf[s % 2], hbuf[(s + 1) % 2], bias, G ? G + t * B * 4 * H : nullptr,
               c_prev, c_next, O + t * B * H);
  }
  if (CS) std::memcpy(Cs, CS + L.time_of_step(T - 1) * B * H, B * H * sizeof(float));
  else if (T % 2) std::memcpy(Cs, cbuf[1], B * H * sizeof(float));
  if (T % 2) std::memcpy(Hs, hbuf[1], B * H * sizeof(float));
}

// The fused path: fp32 on AVX-512 without a projection. FASTATTN_LSTM_FUSED=0 turns it off,
// =1 on wherever it can run, =require: on, and an error where it cannot run (tests use it to be sure
// they run it). Unset: on where it measured faster than the GEMM + pointwise-pass step (one thread,
// T = 100; bench_lstm.py's "unfused" rows): batch >= 16 (at batch 1-8 the separate input projection, one
// GEMM over all T*B rows, beats reading W_ih every step), hidden >= 32, and W_ih + W_hh at most 6 MB
// (hidden 384 at input 384: fused 0.95x torch vs 0.91x; 512: even; 1024: the weights stream from
// memory twice per step, fused 0.94x vs 1.06x).
constexpr int64_t kFusedMinBatch = 16, kFusedMinHidden = 32, kFusedMaxWeightBytes = 6 << 20;

bool use_fused_step(bool is_float, bool proj, int64_t B, int64_t I, int64_t H) {
  const char* env = std::getenv("FASTATTN_LSTM_FUSED");
  const bool can = is_float && !proj && cpu_has_avx512() && H >= 1 && B >= 1;
  if (env && env[0] == 'r') {
    TORCH_CHECK(can, "fastattn lstm: FASTATTN_LSTM_FUSED=require, but the fused step needs float32, no proj_size "
                "and an AVX-512 CPU");
    return true;
  }
  if (!can) return false;
  if (env && env[0] == '0') return false;
  if (env && env[0] == '1') return true;
  return B >= kFusedMinBatch && H >= kFusedMinHidden && 4 * H * (I + H) * (int64_t)sizeof(float) <= kFusedMaxWeightBytes;
}

// ---------------------------------------------------------------------------------------------
// Fused cell step (fp32, AVX-512, small batch): x W_ih^T + h W_hh^T + biases and the gate math in
// one pass over the weights as torch stores them (no packing: at batch 8, hidden 50 the step is
// ~160K multiply-adds, ~1 us, and packing 80 KB of weights per call would cost more than that).
//   * a vector's 16 lanes hold 16/R batch rows x R consecutive k (R = 1, 2 or 4: at batch 8 R = 2,
//     so no lane idles): [x | h] is transposed into groups of R k's, XT[kg][b*R + p] = A[b, kg*R + p]
//     (zero past the batch and past K);
//   * a register block holds the four gates of 6 hidden units (24 zmm accumulators); per k-group one
//     load of XT[kg] and 24 FMAs, each with R weights W[n, kg*R .. kg*R+R) broadcast straight from
//     row n of w_ih / w_hh (24 rows read in k order, L1/L2-resident);
//   * then the R lanes of a row are summed (in-lane permutes), the biases added and the gate math runs
//     on those 24 vectors (lanes = batch rows), writing the activated gates, c' and h' transposed;
//     they are transposed back at the end (small: (B, 6H) values);
//   * more batch rows than fit a vector: chunks of 16/R rows, each a pass over the weights.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kCellLanes = 16, kCellUnits = 6;

// R weights W[0..R) as a vector repeating them (lane l gets W[l % R]).
template <int R>
__attribute__((target("avx512f"), always_inline)) inline __m512 bcast_group(const float* w) {
  if constexpr (R == 1) return _mm512_set1_ps(*w);
  if constexpr (R == 2) {
    double d;
    std::memcpy(&d, w, sizeof d);
    return _mm512_castpd_ps(_mm512_set1_pd(d));
  }
  if constexpr (R == 4) return _mm512_broadcast_f32x4(_mm_loadu_ps(w));
}

// acc[q][u] += sum over K of A[b, k] W[q*H + u, k] (W rows ld apart, starting at unit 0 of the block).
// AT: the (ceil(K/R), 16) transposed groups of A. The last group, when K is not a multiple of R,
// reads its weights through a zero-padded copy (never past a row's end, and 0 * garbage is no NaN).
template <int U, int R>
__attribute__((target("avx512f"), always_inline)) inline void cell_accumulate(__m512 (&acc)[4][U],
                                                                             const float* __restrict AT,
                                                                             const float* __restrict W, int64_t K,
                                                                             int64_t H) {
  // addresses: one pointer per gate (advancing R floats a group) plus one offset per unit, so the
  // 24 broadcasts address [gate pointer + unit offset] without spilling
  const float* wq[4] = {W, W + H * K, W + 2 * H * K, W + 3 * H * K};
  int64_t uoff[U];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) uoff[u] = u * K;
  const int64_t full = K / R;
  for (int64_t kg = 0; kg < full; ++kg) {
    const __m512 a = _mm512_loadu_ps(AT + kg * kCellLanes);
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) acc[q][u] = _mm512_fmadd_ps(bcast_group<R>(wq[q] + uoff[u]), a, acc[q][u]);
      wq[q] += R;
    }
  }
  if (const int64_t tail = K - full * R; tail > 0) {
    const __m512 a = _mm512_loadu_ps(AT + full * kCellLanes);
    for (int q = 0; q < 4; ++q)
      for (int u = 0; u < U; ++u) {
        float wt[4] = {0.f, 0.f, 0.f, 0.f};
        for (int64_t p = 0; p < tail; ++p) wt[p] = wq[q][uoff[u] + p];
        acc[q][u] = _mm512_fmadd_ps(bcast_group<R>(wt), a, acc[q][u]);
      }
  }
}

// Units [j0, j0 + U) for one chunk of batch rows. XT: x's groups (ceil(I/R), 16) then h's
// (ceil(H/R), 16); CT: c^T (H, 16) (each row's value in its R lanes); bias: b_ih + b_hh (4H) or null;
// GT (4H, 16), CYT, HYT (H, 16): outputs, transposed (a row's value in each of its R lanes).
template <int U, int R>
__attribute__((target("avx512f"))) void cell_units(const float* __restrict XT, int64_t I, int64_t H,
                                                   const float* __restrict w_ih, const float* __restrict w_hh,
                                                   const float* __restrict bias, int64_t j0,
                                                   const float* __restrict CT, float* __restrict GT,
                                                   float* __restrict CYT, float* __restrict HYT) {
  __m512 acc[4][U];
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q)
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) acc[q][u] = _mm512_setzero_ps();
  cell_accumulate<U, R>(acc, XT, w_ih + j0 * I, I, H);
  cell_accumulate<U, R>(acc, XT + (I + R - 1) / R * kCellLanes, w_hh + j0 * H, H, H);
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    const int64_t j = j0 + u;
    __m512 pre[4];
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      __m512 v = acc[q][u];
      if constexpr (R >= 2) v = _mm512_add_ps(v, _mm512_permute_ps(v, 0xB1));  // lanes 2m <-> 2m+1
      if constexpr (R >= 4) v = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4E));  // pairs within 4 lanes
      pre[q] = bias ? _mm512_add_ps(v, _mm512_set1_ps(bias[q * H + j])) : v;
    }
    const __m512 i = sigmoid16(pre[0]), f = sigmoid16(pre[1]), g = tanh16(pre[2]), o = sigmoid16(pre[3]);
    const __m512 cn = _mm512_fmadd_ps(f, _mm512_loadu_ps(CT + j * kCellLanes), _mm512_mul_ps(i, g));
    _mm512_storeu_ps(GT + j * kCellLanes, i);
    _mm512_storeu_ps(GT + (H + j) * kCellLanes, f);
    _mm512_storeu_ps(GT + (2 * H + j) * kCellLanes, g);
    _mm512_storeu_ps(GT + (3 * H + j) * kCellLanes, o);
    _mm512_storeu_ps(CYT + j * kCellLanes, cn);
    _mm512_storeu_ps(HYT + j * kCellLanes, _mm512_mul_ps(o, tanh16(cn)));
  }
}

using CellUnits = void (*)(const float*, int64_t, int64_t, const float*, const float*, const float*, int64_t,
                           const float*, float*, float*, float*);
template <int R>
constexpr CellUnits kCellUnitsFor[kCellUnits + 1] = {nullptr,          cell_units<1, R>, cell_units<2, R>,
                                                     cell_units<3, R>, cell_units<4, R>, cell_units<5, R>,
                                                     cell_units<6, R>};

// The fused cell runs fp32 (and bf16/fp16, converted at entry) on AVX-512 up to 64 batch rows while
// the step is under ~1M multiply-adds (beyond that the GEMM path's packed kernels / threads win).
// FASTATTN_LSTM_CELL_FUSED=0 turns it off, =1 forces it wherever it can run, =require: on, and an
// error where it cannot run (tests use it to be sure they run it).
bool use_fused_cell(bool is_float, int64_t B, int64_t I, int64_t H) {
  const char* e = std::getenv("FASTATTN_LSTM_CELL_FUSED");
  const bool can = is_float && cpu_has_avx512() && B >= 1 && H >= 1;
  if (e && e[0] == 'r') {
    TORCH_CHECK(can, "fastattn lstm_cell: FASTATTN_LSTM_CELL_FUSED=require, but the fused cell needs float32 "
                "(or bf16/fp16), batch >= 1 and an AVX-512 CPU");
    return true;
  }
  if (!can) return false;
  if (e && e[0] == '0') return false;
  if (e && e[0] == '1') return true;
  return B <= 64 && B * 4 * H * (I + H) < kParallelFmas;
}

// rows (<= 16/R) batch rows of x (rows, I), h, c (rows, H) into XT (x's then h's groups of R k's,
// zero past K and past the rows) and CT (H, 16) (each row's c in its R lanes, zero past the rows).
template <int R>
void cell_transpose_in(const float* x, const float* h, const float* c, int64_t rows, int64_t I, int64_t H, float* XT,
                       float* CT) {
  constexpr int64_t L = kCellLanes;
  const int64_t xg = (I + R - 1) / R, hg = (H + R - 1) / R;
  std::fill(XT, XT + (xg + hg) * L, 0.f);
  if (rows * R < L) std::fill(CT, CT + H * L, 0.f);
  for (int64_t b = 0; b < rows; ++b) {
    const float *xb = x + b * I, *hb = h + b * H, *cb = c + b * H;
    float* xt = XT + b * R;
    for (int64_t k = 0; k < I; ++k) xt[(k / R) * L + k % R] = xb[k];
    xt += xg * L;
    for (int64_t k = 0; k < H; ++k) xt[(k / R) * L + k % R] = hb[k];
    float* ct = CT + b * R;
    for (int64_t j = 0; j < H; ++j)
      for (int64_t p = 0; p < R; ++p) ct[j * L + p] = cb[j];
  }
}

// x (B, I), h, c (B, H), weights (4H, I) / (4H, H), bias (4H) or null -> G (B, 4H) activated, HY, CY (B, H).
void fused_cell(int64_t B, int64_t I, int64_t H, const float* x, const float* h, const float* c, const float* w_ih,
                const float* w_hh, const float* bias, float* G, float* HY, float* CY) {
  constexpr int64_t L = kCellLanes;
  const int64_t xt_rows = I + H + 2;  // enough k-groups for any R
  // scratch kept per thread (a fresh malloc of this size per call cost ~0.3 us, its lock and consolidation)
  thread_local std::vector<float> buf;
  if ((int64_t)buf.size() < L * (xt_rows + 7 * H)) buf.resize(L * (xt_rows + 7 * H));
  float *XT = buf.data(), *CT = XT + xt_rows * L, *GT = CT + H * L, *CYT = GT + 4 * H * L, *HYT = CYT + H * L;
  for (int64_t b0 = 0; b0 < B;) {
    // R k's per row in a vector's lanes: as many as leave no batch row out of this chunk
    const int64_t left = B - b0, R = left <= 4 ? 4 : left <= 8 ? 2 : 1, rows = std::min(left, L / R);
    if (R == 4) cell_transpose_in<4>(x + b0 * I, h + b0 * H, c + b0 * H, rows, I, H, XT, CT);
    else if (R == 2) cell_transpose_in<2>(x + b0 * I, h + b0 * H, c + b0 * H, rows, I, H, XT, CT);
    else cell_transpose_in<1>(x + b0 * I, h + b0 * H, c + b0 * H, rows, I, H, XT, CT);
    for (int64_t j0 = 0; j0 < H; j0 += kCellUnits) {
      const int64_t u = std::min(kCellUnits, H - j0);
      const CellUnits f = R == 4 ? kCellUnitsFor<4>[u] : R == 2 ? kCellUnitsFor<2>[u] : kCellUnitsFor<1>[u];
      f(XT, I, H, w_ih, w_hh, bias, j0, CT, GT, CYT, HYT);
    }
    for (int64_t b = 0; b < rows; ++b) {
      float *gb = G + (b0 + b) * 4 * H, *hb = HY + (b0 + b) * H, *cb = CY + (b0 + b) * H;
      const int64_t lane = b * R;
      for (int64_t n = 0; n < 4 * H; ++n) gb[n] = GT[n * L + lane];
      for (int64_t j = 0; j < H; ++j) hb[j] = HYT[j * L + lane], cb[j] = CYT[j * L + lane];
    }
    b0 += rows;
  }
}

// pointwise_bwd_row for fp32 with AVX-512 intrinsics: every unit in 16-wide vectors, the last one
// masked (at hidden 50 the generic loop ran 48 units vectorized and 2 with scalar exps, and the
// pass was ~15% of the seed layer's backward).
__attribute__((target("avx512f"))) void pointwise_bwd_row_avx512(const float* __restrict gates,
                                                                 const float* __restrict c_new,
                                                                 const float* __restrict c_prev,
                                                                 const float* __restrict dr, float* __restrict dc,
                                                                 float* __restrict dgates, int64_t H) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t j = 0; j < H; j += 16) {
    const __mmask16 m = H - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (H - j)) - 1);
    const __m512 i = _mm512_maskz_loadu_ps(m, gates + j), f = _mm512_maskz_loadu_ps(m, gates + H + j),
                 g = _mm512_maskz_loadu_ps(m, gates + 2 * H + j), o = _mm512_maskz_loadu_ps(m, gates + 3 * H + j);
    const __m512 tc = tanh16(_mm512_maskz_loadu_ps(m, c_new + j));
    const __m512 drj = _mm512_maskz_loadu_ps(m, dr + j);
    const __m512 dcn = _mm512_fmadd_ps(_mm512_mul_ps(drj, o), _mm512_fnmadd_ps(tc, tc, one), _mm512_maskz_loadu_ps(m, dc + j));
    _mm512_mask_storeu_ps(dgates + j, m, _mm512_mul_ps(_mm512_mul_ps(dcn, g), _mm512_mul_ps(i, _mm512_sub_ps(one, i))));
    _mm512_mask_storeu_ps(dgates + H + j, m,
                          _mm512_mul_ps(_mm512_mul_ps(dcn, _mm512_maskz_loadu_ps(m, c_prev + j)),
                                        _mm512_mul_ps(f, _mm512_sub_ps(one, f))));
    _mm512_mask_storeu_ps(dgates + 2 * H + j, m, _mm512_mul_ps(_mm512_mul_ps(dcn, i), _mm512_fnmadd_ps(g, g, one)));
    _mm512_mask_storeu_ps(dgates + 3 * H + j, m,
                          _mm512_mul_ps(_mm512_mul_ps(drj, tc), _mm512_mul_ps(o, _mm512_sub_ps(one, o))));
    _mm512_mask_storeu_ps(dc + j, m, _mm512_mul_ps(dcn, f));
  }
}
#endif

// pointwise_bwd_row, through the AVX-512 kernel for fp32 where the CPU has it.
template <typename T>
void pointwise_bwd_step(const T* gates, const T* c_new, const T* c_prev, const T* dr, T* dc, T* dgates, int64_t H) {
#ifdef FASTATTN_HAVE_AVX512_GEMM
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx512()) return pointwise_bwd_row_avx512(gates, c_new, c_prev, dr, dc, dgates, H);
  }
#endif
  pointwise_bwd_row<T>(gates, c_new, c_prev, dr, dc, dgates, H);
}

// The layer's forward; workspace false (lstm_layer_infer): the gates / cells / hidden workspace that
// only backward reads is not kept where the step can do without it (the fused step), and comes back
// undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_forward(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih_opt, const std::optional<at::Tensor>& b_hh_opt,
    const std::optional<at::Tensor>& w_hr_opt, bool reverse, const std::optional<at::Tensor>& lengths, bool workspace) {
  TORCH_CHECK(input.dim() == 3, "fastattn lstm: input must be (seq_len, batch, input_size), got ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "fastattn lstm: input must be floating point, got ",
              input.scalar_type());
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % 4 == 0, "fastattn lstm: w_ih must be (4*hidden, input_size), got ",
              w_ih.sizes());
  const bool proj = w_hr_opt && w_hr_opt->defined();
  Layer L{input.size(0), input.size(1), input.size(2), w_ih.size(0) / 4, 0, proj, reverse, nullptr};
  L.P = proj ? w_hr_opt->size(0) : L.H;
  const int64_t T = L.T, B = L.B, I = L.I, H = L.H, P = L.P;
  TORCH_CHECK(T >= 1, "fastattn lstm: input must have at least one time step");
  check_shape(w_ih, "w_ih", {4 * H, I});
  check_shape(w_hh, "w_hh", {4 * H, P});
  check_shape(h0, "h0", {B, P});
  check_shape(c0, "c0", {B, H});
  check_float(input, "input", input);
  for (auto& [t, name] : {std::pair{h0, "h0"}, {c0, "c0"}, {w_ih, "w_ih"}, {w_hh, "w_hh"}}) check_float(t, name, input);
  const auto ct = compute_type(input);
  at::Tensor b_ih, b_hh, w_hr;
  if (b_ih_opt && b_ih_opt->defined()) { check_float(*b_ih_opt, "b_ih", input); check_shape(*b_ih_opt, "b_ih", {4 * H}); b_ih = prep(*b_ih_opt, ct); }
  if (b_hh_opt && b_hh_opt->defined()) { check_float(*b_hh_opt, "b_hh", input); check_shape(*b_hh_opt, "b_hh", {4 * H}); b_hh = prep(*b_hh_opt, ct); }
  if (proj) { check_float(*w_hr_opt, "w_hr", input); check_shape(*w_hr_opt, "w_hr", {P, H}); w_hr = prep(*w_hr_opt, ct); }
  auto len = check_lengths(lengths, T, B);
  L.len = len.defined() ? len.const_data_ptr<int64_t>() : nullptr;

  auto x = prep(input, ct), wi = prep(w_ih, ct), wh = prep(w_hh, ct);
  auto h = prep(h0, ct).clone(), c = prep(c0, ct).clone();  // the running state
  auto opts = x.options();
  auto out = at::empty({T, B, P}, opts);
#ifdef FASTATTN_HAVE_AVX512_GEMM
  const bool fused = use_fused_step(ct == at::kFloat, proj, B, I, H);
#else
  const bool fused = false;
#endif
  at::Tensor gates, cells, hidden;
  if (workspace || !fused) {
    gates = at::empty({T, B, 4 * H}, opts);
    cells = at::empty({T, B, H}, opts);
    hidden = proj ? at::empty({T, B, H}, opts) : at::empty({0}, opts);
  }

  AT_DISPATCH_FLOATING_TYPES(ct, "lstm_layer_fwd", [&] {
    using T_ = scalar_t;
    T_ *G = gates.defined() ? gates.data_ptr<T_>() : nullptr, *O = out.data_ptr<T_>(),
       *CS = cells.defined() ? cells.data_ptr<T_>() : nullptr, *R = proj ? hidden.data_ptr<T_>() : nullptr,
       *Hs = h.data_ptr<T_>(), *Cs = c.data_ptr<T_>();
    const T_ *WH = wh.const_data_ptr<T_>(), *WR = proj ? w_hr.const_data_ptr<T_>() : nullptr;
    std::vector<T_> bias_sum(4 * H);
    const bool has_bias = b_ih.defined() || b_hh.defined();
    if (has_bias) fill_bias<T_>(bias_sum.data(), ptr_or_null<T_>(b_ih), ptr_or_null<T_>(b_hh), 1, 4 * H);
    const T_* BS = has_bias ? bias_sum.data() : nullptr;
#ifdef FASTATTN_HAVE_AVX512_GEMM
    if (fused) {  // T_ is float here
      auto f = [](auto* p) { return reinterpret_cast<float*>(const_cast<T_*>(p)); };
      fused_recurrence(L, f(x.const_data_ptr<T_>()), f(wi.const_data_ptr<T_>()), f(WH), f(BS), f(Hs), f(Cs), f(G), f(CS), f(O));
      return;
    }
#endif
    // 1. the input projection of every step (the biases join in the pointwise pass)
    gemm<T_>(false, true, T * B, 4 * H, I, x.const_data_ptr<T_>(), I, wi.const_data_ptr<T_>(), I, T_(0), G, 4 * H);
    // 2. the recurrence
    const WeightGemm<T_> hh(WH, /*trans_w=*/true, 4 * H, P, T * B);  // gates += h W_hh^T
    const WeightGemm<T_> hr(WR, /*trans_w=*/true, P, H, proj ? T * B : 0);  // out = r W_hr^T
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = L.time_of_step(s);
      T_* Gt = G + t * B * 4 * H;
      T_* Ot = O + t * B * P;
      T_* Ct = CS + t * B * H;
      T_* Rt = proj ? R + t * B * H : nullptr;
      hh.run(B, Hs, true, Gt);
      for_rows(B, 4 * H, [&](int64_t b) {
        if (L.active(t, b)) {
          // without a projection h goes straight to the output and the running state
          pointwise_fwd_row<T_>(Gt + b * 4 * H, BS, Cs + b * H, Cs + b * H, Ct + b * H, proj ? Rt + b * H : Ot + b * P,
                                proj ? nullptr : Hs + b * P, H);
        } else {  // finished (or, in reverse, not yet started): keep the state, output 0
          std::memcpy(Ct + b * H, Cs + b * H, H * sizeof(T_));
          std::fill(Gt + b * 4 * H, Gt + (b + 1) * 4 * H, T_(0));
          std::fill(Ot + b * P, Ot + (b + 1) * P, T_(0));
          if (proj) std::fill(Rt + b * H, Rt + (b + 1) * H, T_(0));
        }
      });
      if (proj) {  // h = r W_hr^T; rows that sat this step out have r = 0, so their output stays 0
        hr.run(B, Rt, false, Ot);
        for (int64_t b = 0; b < B; ++b)
          if (L.active(t, b)) std::memcpy(Hs + b * P, Ot + b * P, P * sizeof(T_));
      }
    }
  });
  const auto dt = input.scalar_type();
  return {as_type(out, dt), as_type(h, dt), as_type(c, dt), gates, cells, hidden};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd_cpu(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse, const std::optional<at::Tensor>& lengths) {
  return layer_forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, lengths, /*workspace=*/true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_infer_cpu(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse, const std::optional<at::Tensor>& lengths) {
  auto r = layer_forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, lengths, /*workspace=*/false);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& input,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr_opt, const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells, const at::Tensor& hidden, bool reverse, const std::optional<at::Tensor>& lengths) {
  TORCH_CHECK(input.dim() == 3, "fastattn lstm_layer_bwd: input must be (seq_len, batch, input_size)");
  const bool proj = w_hr_opt && w_hr_opt->defined();
  Layer L{input.size(0), input.size(1), input.size(2), w_ih.size(0) / 4, 0, proj, reverse, nullptr};
  L.P = proj ? w_hr_opt->size(0) : L.H;
  const int64_t T = L.T, B = L.B, I = L.I, H = L.H, P = L.P;
  check_shape(grad_output, "grad_output", {T, B, P});
  check_shape(grad_h_n, "grad_h_n", {B, P});
  check_shape(grad_c_n, "grad_c_n", {B, H});
  check_shape(output, "output", {T, B, P});
  check_shape(gates, "gates", {T, B, 4 * H});
  check_shape(cells, "cells", {T, B, H});
  if (proj) check_shape(hidden, "hidden", {T, B, H});
  const auto ct = compute_type(input);
  TORCH_CHECK(gates.scalar_type() == ct && cells.scalar_type() == ct, "fastattn lstm_layer_bwd: workspace must be ", ct);
  auto len = check_lengths(lengths, T, B);
  L.len = len.defined() ? len.const_data_ptr<int64_t>() : nullptr;

  auto x = prep(input, ct), hinit = prep(h0, ct), cinit = prep(c0, ct), wi = prep(w_ih, ct), wh = prep(w_hh, ct),
       go = prep(grad_output, ct), out = prep(output, ct), g = gates.contiguous(), cs = cells.contiguous();
  at::Tensor wr, r;
  if (proj) { wr = prep(*w_hr_opt, ct); r = hidden.contiguous(); }
  auto opts = x.options();
  auto dh = prep(grad_h_n, ct).clone(), dc = prep(grad_c_n, ct).clone();  // become grad_h0, grad_c0
  auto dgates = at::empty({T, B, 4 * H}, opts);
  auto dhtot = at::empty({T, B, P}, opts);       // dL/dh_t of each step (output grad + recurrent grad)
  auto dr = proj ? at::empty({B, H}, opts) : at::Tensor();
  auto dh_new = at::empty({B, P}, opts);
  // Small layers (I + P <= 128: the seed's 8 + 50) run the input and recurrent products as one
  // ("cat"): per step [dx_t | dh] = dgates_t [W_ih | W_hh], and [grad_w_ih | grad_w_hh] =
  // dgates^T [x | h_prev] over all steps: 58 columns fill 4 vectors where 8 and 50 took 1 + 4, half
  // empty. Larger layers keep dx as one GEMM over all steps (weights read once, not per step).
  const bool cat = I + P <= 128;
  // the h each step read (for grad_w_hh), after x's columns in cat mode
  auto hprev = at::empty({T, B, cat ? I + P : P}, opts);
  auto w_cat = cat ? at::cat({wi, wh}, 1) : at::Tensor();
  auto dxh = cat ? at::empty({B, I + P}, opts) : at::Tensor();
  auto dx = at::empty({T, B, I}, opts);
  auto dwi = at::empty({4 * H, I}, opts);
  auto dwh = at::empty({4 * H, P}, opts);
  auto db = at::empty({4 * H}, opts);
  auto dwr = proj ? at::empty({P, H}, opts) : at::empty({0}, opts);

  AT_DISPATCH_FLOATING_TYPES(ct, "lstm_layer_bwd", [&] {
    using T_ = scalar_t;
    const T_ *G = g.const_data_ptr<T_>(), *CS = cs.const_data_ptr<T_>(), *C0 = cinit.const_data_ptr<T_>(),
             *H0 = hinit.const_data_ptr<T_>(), *GO = go.const_data_ptr<T_>(), *O = out.const_data_ptr<T_>(),
             *WH = wh.const_data_ptr<T_>(), *WR = proj ? wr.const_data_ptr<T_>() : nullptr;
    T_ *DG = dgates.data_ptr<T_>(), *DHT = dhtot.data_ptr<T_>(), *DH = dh.data_ptr<T_>(), *DC = dc.data_ptr<T_>(),
       *DR = proj ? dr.data_ptr<T_>() : nullptr, *DHN = dh_new.data_ptr<T_>();
    const int64_t ldhp = cat ? I + P : P;  // hprev's row stride
    T_* HP = hprev.data_ptr<T_>() + (cat ? I : 0);
    const T_* X = x.const_data_ptr<T_>();
    T_* DX = dx.data_ptr<T_>();
    const WeightGemm<T_> hh(cat ? w_cat.const_data_ptr<T_>() : WH, /*trans_w=*/false, cat ? I + P : P, 4 * H,
                            T * B);  // dh = dgates W_hh, or [dx_t | dh] = dgates [W_ih | W_hh]
    const WeightGemm<T_> hr(WR, /*trans_w=*/false, H, P, proj ? T * B : 0);     // dr = dh W_hr
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t t = L.time_of_step(s);
      const bool first = s == 0;
      const int64_t tp = reverse ? t + 1 : t - 1;  // the step before, in processing order
      T_* DHTt = DHT + t * B * P;
      T_* DGt = DG + t * B * 4 * H;
      // dL/dh_t = the output's grad + what the later steps sent back
      for (int64_t b = 0; b < B; ++b) {
        T_* d = DHTt + b * P;
        if (L.active(t, b)) {
          const T_* a = DH + b * P;
          const T_* o = GO + (t * B + b) * P;
          for (int64_t j = 0; j < P; ++j) d[j] = a[j] + o[j];
        } else {
          std::fill(d, d + P, T_(0));
        }
      }
      if (proj) hr.run(B, DHTt, false, DR);
      const T_* dr_t = proj ? DR : DHTt;
      const int64_t ldr = proj ? H : P;
      for_rows(B, 4 * H, [&](int64_t b) {
        if (L.active(t, b)) {
          const T_* cprev = first ? C0 + b * H : CS + (tp * B + b) * H;
          pointwise_bwd_step<T_>(G + (t * B + b) * 4 * H, CS + (t * B + b) * H, cprev, dr_t + b * ldr, DC + b * H,
                                 DGt + b * 4 * H, H);
        } else {
          std::fill(DGt + b * 4 * H, DGt + (b + 1) * 4 * H, T_(0));
        }
        // the h this step read: h0 at a row's first step, else the previous step's output (and x_t before it)
        T_* hp = HP + (t * B + b) * ldhp;
        if (cat) std::memcpy(hp - I, X + (t * B + b) * I, I * sizeof(T_));
        if (first || !L.active(tp, b)) std::memcpy(hp, H0 + b * P, P * sizeof(T_));
        else std::memcpy(hp, O + (tp * B + b) * P, P * sizeof(T_));
      });
      if (cat) {
        T_* DXH = dxh.data_ptr<T_>();
        hh.run(B, DGt, false, DXH);
        for (int64_t b = 0; b < B; ++b) {
          std::memcpy(DX + (t * B + b) * I, DXH + b * (I + P), I * sizeof(T_));  // 0 where the row sat out
          if (L.active(t, b)) std::memcpy(DH + b * P, DXH + b * (I + P) + I, P * sizeof(T_));
        }
      } else {
        hh.run(B, DGt, false, DHN);
        for (int64_t b = 0; b < B; ++b)
          if (L.active(t, b)) std::memcpy(DH + b * P, DHN + b * P, P * sizeof(T_));
      }
    }
    // 3. weight gradients over all steps at once
    const int64_t N = T * B;
    if (cat) {
      std::vector<T_> dw(4 * H * (I + P));  // [grad_w_ih | grad_w_hh]
      weight_grad<T_>(4 * H, I + P, N, DG, hprev.const_data_ptr<T_>(), dw.data());
      T_ *DWI = dwi.data_ptr<T_>(), *DWH = dwh.data_ptr<T_>();
      for (int64_t n = 0; n < 4 * H; ++n) {
        std::memcpy(DWI + n * I, dw.data() + n * (I + P), I * sizeof(T_));
        std::memcpy(DWH + n * P, dw.data() + n * (I + P) + I, P * sizeof(T_));
      }
    } else {
      gemm<T_>(false, false, N, I, 4 * H, DG, 4 * H, wi.const_data_ptr<T_>(), I, T_(0), DX, I);
      weight_grad<T_>(4 * H, I, N, DG, X, dwi.data_ptr<T_>());
      weight_grad<T_>(4 * H, P, N, DG, HP, dwh.data_ptr<T_>());
    }
    column_sums<T_>(DG, db.data_ptr<T_>(), N, 4 * H);
    if (proj) weight_grad<T_>(P, H, N, DHT, r.const_data_ptr<T_>(), dwr.data_ptr<T_>());
  });
  const auto dt = input.scalar_type();
  return {as_type(dx, dt), as_type(dh, dt), as_type(dc, dt), as_type(dwi, dt), as_type(dwh, dt), as_type(db, dt),
          as_type(dwr, dt)};
}

// ---------------------------------------------------------------------------------------------
// Autograd of the cell step, in C++, as a hand-written graph node (what torch's generated autograd
// code does): a cell step at hidden 50 is a ~5 us call, torch.library's Python autograd wrapper cost
// several times that, and torch::autograd::Function's bookkeeping (input metadata, output wrapping)
// ~2 us of it. Device-generic: the node redispatches to the CPU or CUDA kernels of lstm_cell_fwd /
// lstm_cell_bwd.
// ---------------------------------------------------------------------------------------------
using torch::autograd::AutogradContext;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The graph's node pointer: std::shared_ptr<Node> in older torch, c10::intrusive_ptr<Node> in newer.
using NodePtr = decltype(torch::autograd::Edge::function);
template <typename N>
NodePtr make_node() {
  if constexpr (std::is_constructible_v<NodePtr, std::shared_ptr<N>>) return NodePtr(std::make_shared<N>());
  else return c10::make_intrusive<N>();
}

using CellFwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using CellBwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

const c10::TypedOperatorHandle<CellFwdOut(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const std::optional<at::Tensor>&,
                                          const std::optional<at::Tensor>&)>&
cell_fwd_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastattn::lstm_cell_fwd", "")
                       .typed<CellFwdOut(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&)>();
  return op;
}

// Gradients of (hy, cy) in; of (input, hx, cx, w_ih, w_hh, b_ih, b_hh) out. An absent bias is no edge of
// the node (should_compute_output false) and gets no gradient.
struct LstmCellBackward : public torch::autograd::Node {
  SavedVariable input, hx, cx, cy, w_ih, w_hh, gates;

  std::string name() const override { return "LstmCellBackward"; }

  void release_variables() override {
    for (SavedVariable* v : {&input, &hx, &cx, &cy, &w_ih, &w_hh, &gates}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    // Dispatched normally under create_graph: lstm_cell_bwd's own autograd (Python) raises a clear error
    // on double backward; without it that kernel has nothing to do and is skipped.
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastattn::lstm_cell_bwd", "")
                         .typed<CellBwdOut(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&)>();
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!at::GradMode::is_enabled()) below.emplace();
    const auto c1 = cy.unpack();  // unpack() refuses a second backward (released) or a tensor changed in place
    auto grad_hy = grads[0].defined() ? grads[0] : at::zeros_like(c1);
    auto grad_cy = grads[1].defined() ? grads[1] : at::zeros_like(c1);
    auto [dx, dh, dc, dwi, dwh, db] =
        op.call(grad_hy, grad_cy, input.unpack(), hx.unpack(), cx.unpack(), c1, w_ih.unpack(), w_hh.unpack(),
                gates.unpack());
    variable_list out{dx, dh, dc, dwi, dwh, db, db};
    for (size_t i = 0; i < out.size(); ++i)
      if (!should_compute_output(i)) out[i] = at::Tensor();
    return out;
  }
};

CellFwdOut lstm_cell_fwd_autograd(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
                                  const at::Tensor& w_ih, const at::Tensor& w_hh,
                                  const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  // dual tensors (forward-mode AD): refused rather than their tangents dropped
  auto fw = [](const at::Tensor& t) { return torch::autograd::isFwGradDefined(t); };
  TORCH_CHECK(!(fw(input) || fw(hx) || fw(cx) || fw(w_ih) || fw(w_hh) || (b_ih && fw(*b_ih)) || (b_hh && fw(*b_hh))),
              "fastattn lstm_cell: forward-mode AD is not supported; use backend='reference'");
  auto needs_grad = [](const at::Tensor& t) { return t.requires_grad(); };
  auto opt_needs_grad = [](const std::optional<at::Tensor>& t) { return t && t->defined() && t->requires_grad(); };
  const bool record = at::GradMode::is_enabled() &&
                      (needs_grad(input) || needs_grad(hx) || needs_grad(cx) || needs_grad(w_ih) || needs_grad(w_hh) ||
                       opt_needs_grad(b_ih) || opt_needs_grad(b_hh));
  CellFwdOut out;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = cell_fwd_op().call(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
  }
  if (!record) return out;  // no_grad, or nothing requires grad: no node
  auto& [hy, cy, gates] = out;
  NodePtr node = make_node<LstmCellBackward>();
  auto* n = static_cast<LstmCellBackward*>(node.get());
  n->set_next_edges(torch::autograd::collect_next_edges(input, hx, cx, w_ih, w_hh, b_ih, b_hh));
  n->input = SavedVariable(input, false);
  n->hx = SavedVariable(hx, false);
  n->cx = SavedVariable(cx, false);
  n->w_ih = SavedVariable(w_ih, false);
  n->w_hh = SavedVariable(w_hh, false);
  n->gates = SavedVariable(gates, false);  // no history: a workspace, not differentiable
  torch::autograd::set_history(hy, node);  // output 0
  torch::autograd::set_history(cy, node);  // output 1
  // saved without its history (the node itself: a cycle), sharing cy's version counter
  n->cy = SavedVariable(cy.detach(), false);
  return out;
}

// The layer's autograd, in C++ too: at the seed shape (batch 64, 8 steps, hidden 50) a layer call is
// ~100 microseconds of math, and torch.library's Python autograd wrapper cost a good part of that.
using LayerFwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LayerBwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct LstmLayerFunction : public torch::autograd::Function<LstmLayerFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& h0,
                               const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                               const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                               const std::optional<at::Tensor>& w_hr, bool reverse,
                               const std::optional<at::Tensor>& lengths) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastattn::lstm_layer_fwd", "")
                         .typed<LayerFwdOut(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const std::optional<at::Tensor>&,
                                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool,
                                            const std::optional<at::Tensor>&)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, h_n, c_n, gates, cells, hidden] = op.call(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, lengths);
    const bool proj = w_hr && w_hr->defined(), has_len = lengths && lengths->defined();
    ctx->save_for_backward({input, h0, c0, w_ih, w_hh, proj ? *w_hr : at::Tensor(), out, gates, cells, hidden,
                            has_len ? *lengths : at::Tensor()});
    ctx->saved_data["flags"] = (int64_t)(b_ih && b_ih->defined() ? 1 : 0) | (b_hh && b_hh->defined() ? 2 : 0) |
                               (proj ? 4 : 0) | (has_len ? 8 : 0) | (reverse ? 16 : 0);
    ctx->mark_non_differentiable({gates, cells, hidden});
    return {out, h_n, c_n, gates, cells, hidden};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Dispatched normally under create_graph: lstm_layer_bwd's own autograd (Python) raises a clear error
    // on double backward.
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastattn::lstm_layer_bwd", "")
                         .typed<LayerBwdOut(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&, bool,
                                            const std::optional<at::Tensor>&)>();
    // Without create_graph the backward op's own autograd kernel (a Python one, which only raises on
    // double backward) has nothing to do: skip it.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!at::GradMode::is_enabled()) below.emplace();
    auto s = ctx->get_saved_variables();
    const int64_t flags = ctx->saved_data["flags"].toInt();
    const auto &out = s[6], &h0 = s[1], &c0 = s[2];
    auto zeros_if_none = [](const at::Tensor& g, const at::Tensor& like) {
      return g.defined() ? g : at::zeros_like(like, at::MemoryFormat::Contiguous);
    };
    std::optional<at::Tensor> w_hr, lengths;
    if (flags & 4) w_hr = s[5];
    if (flags & 8) lengths = s[10];
    auto [dx, dh0, dc0, dwi, dwh, db, dwr] =
        op.call(zeros_if_none(grads[0], out), zeros_if_none(grads[1], h0), zeros_if_none(grads[2], c0), s[0], h0, c0,
                s[3], s[4], w_hr, out, s[7], s[8], s[9], (flags & 16) != 0, lengths);
    return {dx,
            dh0,
            dc0,
            dwi,
            dwh,
            (flags & 1) ? db : at::Tensor(),
            (flags & 2) ? db : at::Tensor(),
            (flags & 4) ? dwr : at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

LayerFwdOut lstm_layer_fwd_autograd(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                                    const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
                                    bool reverse, const std::optional<at::Tensor>& lengths) {
  auto o = LstmLayerFunction::apply(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, lengths);
  return {o[0], o[1], o[2], o[3], o[4], o[5]};
}

// ---------------------------------------------------------------------------------------------
// Bidirectional layer: both directions in one call. concurrent: the two directions' whole time
// loops run side by side, one thread each (at::parallel_for over 2 tasks): a step's GEMM at batch
// 32, hidden 256 splits poorly over threads (a barrier per step), two independent recurrences do
// not. Inside the parallel region every inner at::parallel_for and every BLAS call runs on its
// calling thread. The threads of the one-direction path only split rows / weight panels / tiles of
// a product, never a sum, so each direction does the same arithmetic per element as
// lstm_layer_fwd / lstm_layer_bwd: the same results bit for bit (tests/test_lstm.py checks it).
// ---------------------------------------------------------------------------------------------
using Opt = std::optional<at::Tensor>;

template <typename F>
void both_directions(bool concurrent, const F& run_direction) {
  if (!concurrent || at::get_num_threads() < 2 || at::in_parallel_region()) {
    run_direction(0);
    run_direction(1);
    return;
  }
  // the caller's thread-local state (dispatch keys excluded below autograd, grad mode) on both threads
  const at::ThreadLocalState tls;
  at::parallel_for(0, 2, 1, [&](int64_t d0, int64_t d1) {
    at::ThreadLocalStateGuard guard(tls);
    for (int64_t d = d0; d < d1; ++d) run_direction(d);
  });
}

using LayerOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

std::array<LayerOut, 2> bidir_forward(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                                      const at::Tensor& h0_r, const at::Tensor& c0_r, const at::Tensor& w_ih,
                                      const at::Tensor& w_hh, const Opt& b_ih, const Opt& b_hh, const Opt& w_hr,
                                      const at::Tensor& w_ih_r, const at::Tensor& w_hh_r, const Opt& b_ih_r,
                                      const Opt& b_hh_r, const Opt& w_hr_r, const Opt& lengths, bool concurrent,
                                      bool workspace) {
  std::array<LayerOut, 2> r;
  both_directions(concurrent, [&](int64_t d) {
    r[d] = d == 0 ? layer_forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, false, lengths, workspace)
                  : layer_forward(input, h0_r, c0_r, w_ih_r, w_hh_r, b_ih_r, b_hh_r, w_hr_r, true, lengths, workspace);
  });
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor>
lstm_bidir_layer_fwd_cpu(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& h0_r,
                         const at::Tensor& c0_r, const at::Tensor& w_ih, const at::Tensor& w_hh, const Opt& b_ih,
                         const Opt& b_hh, const Opt& w_hr, const at::Tensor& w_ih_r, const at::Tensor& w_hh_r,
                         const Opt& b_ih_r, const Opt& b_hh_r, const Opt& w_hr_r, const Opt& lengths, bool concurrent) {
  auto r = bidir_forward(input, h0, c0, h0_r, c0_r, w_ih, w_hh, b_ih, b_hh, w_hr, w_ih_r, w_hh_r, b_ih_r, b_hh_r,
                         w_hr_r, lengths, concurrent, /*workspace=*/true);
  auto& [o, h, c, g, cs, hid] = r[0];
  auto& [o_r, h_r, c_r, g_r, cs_r, hid_r] = r[1];
  return {o, h, c, o_r, h_r, c_r, g, cs, hid, g_r, cs_r, hid_r};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_bidir_layer_infer_cpu(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& h0_r, const at::Tensor& c0_r,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const Opt& b_ih, const Opt& b_hh, const Opt& w_hr,
    const at::Tensor& w_ih_r, const at::Tensor& w_hh_r, const Opt& b_ih_r, const Opt& b_hh_r, const Opt& w_hr_r,
    const Opt& lengths, bool concurrent) {
  auto r = bidir_forward(input, h0, c0, h0_r, c0_r, w_ih, w_hh, b_ih, b_hh, w_hr, w_ih_r, w_hh_r, b_ih_r, b_hh_r,
                         w_hr_r, lengths, concurrent, /*workspace=*/false);
  return {std::get<0>(r[0]), std::get<1>(r[0]), std::get<2>(r[0]), std::get<0>(r[1]), std::get<1>(r[1]),
          std::get<2>(r[1])};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_bidir_layer_bwd_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                         const at::Tensor& grad_output_r, const at::Tensor& grad_h_n_r, const at::Tensor& grad_c_n_r,
                         const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& h0_r,
                         const at::Tensor& c0_r, const at::Tensor& w_ih, const at::Tensor& w_hh, const Opt& w_hr,
                         const at::Tensor& w_ih_r, const at::Tensor& w_hh_r, const Opt& w_hr_r,
                         const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells,
                         const at::Tensor& hidden, const at::Tensor& output_r, const at::Tensor& gates_r,
                         const at::Tensor& cells_r, const at::Tensor& hidden_r, const Opt& lengths, bool concurrent) {
  using BwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  std::array<BwdOut, 2> r;
  both_directions(concurrent, [&](int64_t d) {
    r[d] = d == 0 ? lstm_layer_bwd_cpu(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, w_hr, output, gates,
                                       cells, hidden, false, lengths)
                  : lstm_layer_bwd_cpu(grad_output_r, grad_h_n_r, grad_c_n_r, input, h0_r, c0_r, w_ih_r, w_hh_r,
                                       w_hr_r, output_r, gates_r, cells_r, hidden_r, true, lengths);
  });
  auto& [dx, dh, dc, dwi, dwh, db, dwr] = r[0];
  auto& [dx_r, dh_r, dc_r, dwi_r, dwh_r, db_r, dwr_r] = r[1];
  // what autograd does with the two directions' grad_input (each already in the input's dtype)
  return {dx + dx_r, dh, dc, dwi, dwh, db, dwr, dh_r, dc_r, dwi_r, dwh_r, db_r, dwr_r};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, Autograd, m) {
  m.impl("lstm_cell_fwd", &fastattn::lstm_cell_fwd_autograd);
  m.impl("lstm_layer_fwd", &fastattn::lstm_layer_fwd_autograd);
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("lstm_cell_fwd", &fastattn::lstm_cell_fwd_cpu);
  m.impl("lstm_cell_bwd", &fastattn::lstm_cell_bwd_cpu);
  m.impl("lstm_layer_fwd", &fastattn::lstm_layer_fwd_cpu);
  m.impl("lstm_layer_infer", &fastattn::lstm_layer_infer_cpu);
  m.impl("lstm_layer_bwd", &fastattn::lstm_layer_bwd_cpu);
  m.impl("lstm_bidir_layer_fwd", &fastattn::lstm_bidir_layer_fwd_cpu);
  m.impl("lstm_bidir_layer_infer", &fastattn::lstm_bidir_layer_infer_cpu);
  m.impl("lstm_bidir_layer_bwd", &fastattn::lstm_bidir_layer_bwd_cpu);
}
