// 2-D convolution on the CPU: forward with a fused bias + activation epilogue, the fused
// conv -> ReLU -> max-pool of a CNN's first block, and the backward passes.
//
// Layout: NCHW inside (a channels_last input is made contiguous first; the Python op puts the
// result back in the input's memory format). float and double run natively; float16/bfloat16
// are widened to float, computed with float accumulation, and rounded once at the end.
//
// Two ways to compute a block of output rows of one (image, group):
//  * direct   (every conv but 1x1/stride 1/no padding): the input rows are copied once into a
//             zero-padded buffer (split by column phase for strides > 1), then one of three tiles:
//             - wide layers (>= 8 input, >= 2 vectors of output channels per group): 14 output
//               pixels x 2 vectors of output channels, input values broadcast from the buffer,
//               weights packed [Kg/32][C*R*S][32] (no im2col, no BLAS);
//             - depthwise: NR output rows x NC vectors of columns; each input-row vector load
//               feeds every output row of the tile that reads it (float 3x3/5x5/7x7 stride 1
//               or 2 on AVX-512: the same with the kernel, stride and tile fixed at compile
//               time, 4 rows x 4 vectors, no branches in the tile);
//             - otherwise (few channels, e.g. the RGB stem): 8 output channels x 2 vectors of
//               output columns (or x 2 rows for narrow maps) with broadcast weights.
//  * GEMM     (1x1, stride 1, no padding): the input is the (C x H*W) patch matrix, multiplied by
//             the group's (K x C) weight with fastattn::cpu::gemm (csrc/cpu/gemm.h).
// Either way the epilogue (bias, activation, pre-activation copy) runs on the tile while it is
// still in cache. Work is split over (image, group, block of output rows). Outputs of 16 MiB or
// more leave the fixed depthwise tiles by non-temporal stores (no read-for-ownership; tried on
// the few-channel tiles for the seed layer too: slower there, so not used).
//
// Backward: grad-input with stride 1 is itself a conv (of dY with the flipped, transposed weight)
// and runs on the direct kernels; depthwise with stride 2 (no dilation) has its own per-plane
// kernel (both column phases of a dX row as vector loops over dY, interleaved); other strides > 1
// without dilation split into sh*sw such convs, one per phase of the input rows/columns (each
// with the kernel taps of that phase), run in cache-sized units and interleaved into dX;
// otherwise it accumulates directly into a padded buffer (few channels) or is W^T * dY + col2im
// (wide). grad-weight of a wide 3x3 layer runs its own tiles
// (9 taps x 2 vectors of output channels over the pixels); other layers use a GEMM over the N*P*Q
// output pixels (im2col tiles + cpu::gemm), or, for depthwise-like layers, a vectorized per-output-
// channel reduction (float depthwise 3x3 stride 1/2 on AVX-512: a fixed 4-row tile with the 9 tap
// sums in registers, masked loads for a row's last vector, images outermost over blocks of 64
// channels so the planes stream in memory order; stride 2 splits each input row by column phase
// with two permutes per 32 columns). Reductions over images keep one partial sum per fixed chunk of images, added
// in chunk order (deterministic).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "activation.h"
#include "simd.h"

// The fixed-size depthwise kernels are built for AVX-512 (x86-64-v4) only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FASTATTN_NO_CLONES)
#define FASTATTN_DEPTHWISE_V4 1
#else
#define FASTATTN_DEPTHWISE_V4 0
#endif

#if defined(__x86_64__)
#include <immintrin.h>
#endif

TORCH_LIBRARY_FRAGMENT(fastattn, m) {
  // activation: 0 none, 1 relu, 2 gelu (exact, erf), 3 silu. padding: (top, bottom, left, right).
  // save_preact: also return the pre-activation (input + bias before the activation), which
  // backward needs for gelu/silu; otherwise the second output is empty.
  m.def("conv2d_fwd(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[4] padding, "
        "int[2] dilation, int groups, int activation, bool save_preact) -> (Tensor, Tensor)");
  // saved: the forward output for relu, the pre-activation for gelu/silu, None for no activation.
  // output_mask: which of (grad_input, grad_weight, grad_bias) to compute; the others are empty.
  m.def("conv2d_bwd(Tensor grad_out, Tensor input, Tensor weight, Tensor? saved, int[2] stride, "
        "int[4] padding, int[2] dilation, int groups, int activation, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)");
  // max_pool2d(relu(conv2d(...)), pool_kernel, pool_stride) without writing the conv output.
  // indices (int64, flat h*Q+w into the conv output plane, like max_pool2d_with_indices) are
  // returned when save_indices, else empty.
  m.def("conv2d_relu_maxpool2d_fwd(Tensor input, Tensor weight, Tensor? bias, int[2] stride, "
        "int[4] padding, int[2] dilation, int groups, int[2] pool_kernel, int[2] pool_stride, "
        "bool save_indices) -> (Tensor, Tensor)");
  m.def("conv2d_relu_maxpool2d_bwd(Tensor grad_out, Tensor input, Tensor weight, Tensor out, "
        "Tensor indices, int[2] stride, int[4] padding, int[2] dilation, int groups, "
        "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

#include "gemm.h"

namespace fastattn {
namespace conv2d_cpu {

using namespace act;  // activation codes, epilogue and act_backward (activation.h)

// Column-major GEMM (BLAS's convention): C (m x n) = alpha * op(A) (m x k) * op(B) (k x n) + beta * C.
// Runs fastattn::cpu::gemm (csrc/cpu/gemm.h; float on AVX-512 CPUs: its packed kernel, ~2x MKL's
// sgemm on AMD Zen 5) on the row-major transpose C^T (n x m) = op(B)^T op(A)^T. Inside a
// parallel region it runs on the calling thread.
template <typename T>
inline void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                 int64_t ldb, T beta, T* c, int64_t ldc) {
  cpu::gemm<T>(tb == 'T', ta == 'T', n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

// at::parallel_for grain: units with less than ~32K multiply-adds are batched, so tiny problems
// (gradcheck, unit tests) do not pay a thread team's start-up for each call.
inline int64_t grain(int64_t work_per_unit) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(work_per_unit, 1));
}

inline int64_t ceil_div(int64_t a, int64_t b) {  // b > 0, a any sign
  return a >= 0 ? (a + b - 1) / b : -((-a) / b);
}

// After non-temporal stores: make them visible before the data is handed to another thread.
inline void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// ------------------------------------------------------------------------------------------
// Problem geometry.
// ------------------------------------------------------------------------------------------
struct Geom {
  int64_t N, C, H, W, K, R, S, P, Q, G, Cg, Kg, CRS;
  int64_t sh, sw, pt, pb, pl, pr, dh, dw;
  bool direct;     // direct kernel, else (pointwise) GEMM
  bool pointwise;  // 1x1, stride 1, no padding: the input is its own patch matrix
  int64_t TM;      // output pixels per im2col tile
  bool stream_out;  // output too big to stay in cache: the fixed depthwise tiles use non-temporal stores
  bool keep_cached; // the output is read again right away: never streamed
};

constexpr int KB = 8;  // output channels per register tile of the direct kernel

Geom make_geom(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
               at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, "conv2d: input must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(w.dim() == 4, "conv2d: weight must be 4-D (K, C/groups, R, S), got ", w.dim(), "-D");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 4 && dilation.size() == 2,
              "conv2d: stride and dilation take 2 values, padding 4 (top, bottom, left, right)");
  TORCH_CHECK(groups >= 1, "conv2d: groups must be >= 1, got ", groups);
  Geom g{};
  g.N = x.size(0); g.C = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.K = w.size(0); g.R = w.size(2); g.S = w.size(3); g.G = groups;
  TORCH_CHECK(g.C == w.size(1) * groups, "conv2d: input has ", g.C, " channels but weight expects ",
              w.size(1), " x groups ", groups, " = ", w.size(1) * groups);
  TORCH_CHECK(g.K % groups == 0, "conv2d: out_channels ", g.K, " must be divisible by groups ", groups);
  g.sh = stride[0]; g.sw = stride[1]; g.dh = dilation[0]; g.dw = dilation[1];
  g.pt = padding[0]; g.pb = padding[1]; g.pl = padding[2]; g.pr = padding[3];
  TORCH_CHECK(g.sh > 0 && g.sw > 0, "conv2d: stride must be positive");
  TORCH_CHECK(g.dh > 0 && g.dw > 0, "conv2d: dilation must be positive");
  TORCH_CHECK(g.pt >= 0 && g.pb >= 0 && g.pl >= 0 && g.pr >= 0, "conv2d: padding must be >= 0");
  g.P = (g.H + g.pt + g.pb - g.dh * (g.R - 1) - 1) / g.sh + 1;
  g.Q = (g.W + g.pl + g.pr - g.dw * (g.S - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.H + g.pt + g.pb >= g.dh * (g.R - 1) + 1 && g.W + g.pl + g.pr >= g.dw * (g.S - 1) + 1,
              "conv2d: the (dilated) kernel is larger than the padded input");
  g.Cg = g.C / groups; g.Kg = g.K / groups; g.CRS = g.Cg * g.R * g.S;
  // The direct kernel runs everything but 1x1/stride 1/no padding, which is a plain GEMM.
  g.pointwise = g.R == 1 && g.S == 1 && g.sh == 1 && g.sw == 1 && g.pt == 0 && g.pb == 0 && g.pl == 0 && g.pr == 0;
  g.direct = !g.pointwise;
  int64_t tm = std::max<int64_t>(64, (int64_t(1) << 18) / std::max<int64_t>(g.CRS, 1));  // ~1 MB fp32 patches
  g.TM = std::min(g.P * g.Q, tm);
  return g;
}

// ------------------------------------------------------------------------------------------
// im2col / col2im on a tile of output pixels [m0, m0 + mlen) of one (image, group).
// x: the group's input channels [Cg][H][W]; col: [CRS][mlen].
// ------------------------------------------------------------------------------------------
// The output columns q of row p whose input column q*sw + off lies inside [0, W).
inline void valid_cols(int64_t off, int64_t sw, int64_t W, int64_t Q, int64_t& qlo, int64_t& qhi) {
  qlo = std::min(std::max<int64_t>(ceil_div(-off, sw), 0), Q);
  qhi = std::max(std::min<int64_t>(ceil_div(W - off, sw), Q), qlo);
}

template <typename T, bool kAdd>
FASTATTN_INLINE void im2col_body(const Geom& g, T* x, int64_t m0, int64_t mlen, T* col) {
  for (int64_t c = 0; c < g.Cg; ++c)
    for (int64_t r = 0; r < g.R; ++r)
      for (int64_t s = 0; s < g.S; ++s) {
        T* dst = col + ((c * g.R + r) * g.S + s) * mlen;
        const int64_t off = s * g.dw - g.pl;
        int64_t qlo, qhi;
        valid_cols(off, g.sw, g.W, g.Q, qlo, qhi);
        for (int64_t i = 0; i < mlen;) {
          const int64_t m = m0 + i, p = m / g.Q, q = m % g.Q, len = std::min(g.Q - q, mlen - i);
          const int64_t ih = p * g.sh - g.pt + r * g.dh;
          T* d = dst + i - q;  // d[q'] for q' in [q, q + len)
          if (ih < 0 || ih >= g.H) {
            if (!kAdd) std::fill(d + q, d + q + len, T(0));
          } else {
            T* xr = x + (c * g.H + ih) * g.W + off;  // xr[q'*sw] = input column q'*sw + off
            const int64_t a = std::max(q, qlo), b = std::min(q + len, qhi);
            if (!kAdd) {
              for (int64_t j = q; j < std::min(a, q + len); ++j) d[j] = T(0);
              for (int64_t j = std::max(b, q); j < q + len; ++j) d[j] = T(0);
            }
            const int64_t sw = g.sw;
            if (kAdd) {
#pragma omp simd
              for (int64_t j = a; j < b; ++j) xr[j * sw] += d[j];
            } else {
#pragma omp simd
              for (int64_t j = a; j < b; ++j) d[j] = xr[j * sw];
            }
          }
          i += len;
        }
      }
}
FASTATTN_SIMD void im2col(const Geom& g, const float* x, int64_t m0, int64_t n, float* col) { im2col_body<float, false>(g, const_cast<float*>(x), m0, n, col); }
FASTATTN_SIMD void im2col(const Geom& g, const double* x, int64_t m0, int64_t n, double* col) { im2col_body<double, false>(g, const_cast<double*>(x), m0, n, col); }
// x[...] += col (the adjoint of im2col).
FASTATTN_SIMD void col2im(const Geom& g, float* x, int64_t m0, int64_t n, const float* col) { im2col_body<float, true>(g, x, m0, n, const_cast<float*>(col)); }
FASTATTN_SIMD void col2im(const Geom& g, double* x, int64_t m0, int64_t n, const double* col) { im2col_body<double, true>(g, x, m0, n, const_cast<double*>(col)); }

// Direct forward: output rows [p0, p1) of one (image, group), all Kg channels.
//
// xp holds the input rows the block needs, zero-padded and split by column phase so that every
// tap reads whole contiguous vectors even for stride > 1: padded column j of a row lives at
// row[(j % sw) * WPs + j / sw], so output columns q..q+V of tap s read
// row[((s*dw) % sw) * WPs + (s*dw) / sw + q ...]. Layout [Cg][HR][sw * WPs], HR rows from input
// row p0*sh - pt.
//
// Register tile: KBt output channels x NV vectors of output columns, accumulated over (c, r, s)
// with one vector load per tap and vector and a broadcast weight per channel (GCC vector
// extensions; 512-bit vectors, lowered to two AVX2 or four SSE registers in the other clones).
// Wide groups (the RGB stem) use 8 channels x 1 vector, depthwise 1 channel x 4 vectors.
// wpack: the group's weight as [ceil(Kg/KB)][CRS][KB] (zero-padded channels).
// dst[k*ldk + (p-p0)*Q + q]; bias (or null) for the group's channels.
struct DirectLayout {
  int64_t HR, WPs, ld_row;   // rows, phase width, row pitch (= sw * WPs)
  std::vector<int64_t> tap;  // tap[s] = (s*dw % sw) * WPs + s*dw / sw: where tap s starts in a row
};

template <typename T>
DirectLayout direct_layout(const Geom& g, int64_t rows) {
  constexpr int QV = 64 / sizeof(T);
  // columns rounded up to whole tiles (the tile widths of direct_rows_body)
  const int64_t qt = g.Kg < 4 ? 4 * QV : (sizeof(T) == 4 && g.Q > 16) ? 2 * QV : QV;
  const int64_t qc = std::max<int64_t>(ceil_div(g.Q, qt) * qt, 16);  // >= a wide tile (14)
  DirectLayout l;
  l.HR = (rows - 1) * g.sh + (g.R - 1) * g.dh + 1;
  l.WPs = qc + ((g.S - 1) * g.dw) / g.sw + 1;
  l.ld_row = g.sw * l.WPs;
  l.tap.resize(g.S);
  for (int64_t s = 0; s < g.S; ++s) l.tap[s] = (s * g.dw % g.sw) * l.WPs + s * g.dw / g.sw;
  return l;
}

// One register tile: KBt channels x NR output rows x NC vectors of columns. xrow points at the
// tile's first row and column; the tile's rows are sh padded rows apart.
template <typename T, int KBt, int NR, int NC>
FASTATTN_INLINE void direct_tile(const Geom& g, const DirectLayout& l, const T* xrow, const T* w, T* out) {
  typedef T V __attribute__((vector_size(64)));
  constexpr int QV = 64 / sizeof(T), NV = NR * NC;
  V acc[KBt][NV];
#pragma GCC unroll 8
  for (int a = 0; a < KBt; ++a)
#pragma GCC unroll 4
    for (int b = 0; b < NV; ++b) acc[a][b] = V{};
  const int64_t row_step = g.sh * l.ld_row;
  const int64_t* tap = l.tap.data();
  for (int64_t c = 0; c < g.Cg; ++c)
    for (int64_t r = 0; r < g.R; ++r) {
      const T* row = xrow + (c * l.HR + r * g.dh) * l.ld_row;
      for (int64_t s = 0; s < g.S; ++s, w += KB) {
        const T* x = row + tap[s];
        V xv[NV];
#pragma GCC unroll 4
        for (int b = 0; b < NV; ++b) std::memcpy(&xv[b], x + (b / NC) * row_step + (b % NC) * QV, sizeof(V));
#pragma GCC unroll 8
        for (int a = 0; a < KBt; ++a) {
          const T wv = w[a];
#pragma GCC unroll 4
          for (int b = 0; b < NV; ++b) acc[a][b] += xv[b] * wv;
        }
      }
    }
#pragma GCC unroll 8
  for (int a = 0; a < KBt; ++a)
#pragma GCC unroll 4
    for (int b = 0; b < NV; ++b) std::memcpy(out + (a * NV + b) * QV, &acc[a][b], sizeof(V));
}

// Rows [p, p + NR) of channels [k0, k0 + kn): tiles along the columns, then the epilogue.
template <typename T, int KBt, int NR, int NC>
FASTATTN_INLINE void direct_row_block(const Geom& g, const DirectLayout& l, const T* xp, const T* w, int64_t k0,
                                      int64_t kn, int64_t p, int64_t p0, T* dst, int64_t ldk, T* pre, const T* bias,
                                      int64_t act) {
  constexpr int QV = 64 / sizeof(T), QT = NC * QV;
  alignas(64) T tile[KBt * NR * QT];
  const T* xrow = xp + (p - p0) * g.sh * l.ld_row;
  for (int64_t q0 = 0; q0 < g.Q; q0 += QT) {
    direct_tile<T, KBt, NR, NC>(g, l, xrow + q0, w, tile);
    const int64_t qn = std::min<int64_t>(QT, g.Q - q0);
    for (int64_t a = 0; a < kn; ++a)
      for (int i = 0; i < NR; ++i) {
        T* d = dst + (k0 + a) * ldk + (p + i - p0) * g.Q + q0;
        epilogue_copy_body(tile + (a * NR + i) * QT, d, pre ? pre + (d - dst) : (T*)nullptr, qn,
                           bias ? bias[k0 + a] : T(0), act);
      }
  }
}

// All rows and channels of the block. Tile shapes (512-bit vectors V):
//   Kg >= 4, Q > 16   8 channels x 2 V of one row   (16 accumulators)
//   Kg >= 4, Q <= 16  8 channels x 1 V of two rows  (narrow maps: no half-empty vectors)
//   Kg < 4 (depthwise) 1 channel x 4 V of one row
template <typename T, int KBt, int NR, int NC>
FASTATTN_INLINE void direct_rows_tiled(const Geom& g, const DirectLayout& l, const T* xp, const T* wpack,
                                       int64_t p0, int64_t p1, T* dst, int64_t ldk, T* pre, const T* bias,
                                       int64_t act) {
  for (int64_t k0 = 0; k0 < g.Kg; k0 += KBt) {
    const T* w = wpack + (k0 / KB) * g.CRS * KB + k0 % KB;
    const int64_t kn = std::min<int64_t>(KBt, g.Kg - k0);
    int64_t p = p0;
    for (; p + NR <= p1; p += NR) direct_row_block<T, KBt, NR, NC>(g, l, xp, w, k0, kn, p, p0, dst, ldk, pre, bias, act);
    for (; p < p1; ++p) direct_row_block<T, KBt, 1, NC>(g, l, xp, w, k0, kn, p, p0, dst, ldk, pre, bias, act);
  }
}

// Depthwise (one input channel per group, < 4 outputs each), e.g. 7x7: the general tile above
// reloads a vector per tap for every output row, and with one channel per tile it runs out of
// load slots (one load + one broadcast per FMA, most loads split across cache lines). Here a
// tile of NR output rows x NC vectors of columns walks the input rows it needs once: each
// (input row, tap) vector load feeds every output row of the tile whose kernel covers that input
// row (up to NR; which kernel row that is depends only on the row pair, so the test is per row,
// never per element). Loads per FMA drop from ~1 to ~(NC + NR) / (NR * NC) at full overlap.
// w: the channel's taps with stride KB (wpack + k); out: [NR][NC * QV].
template <typename T, int NR, int NC>
FASTATTN_INLINE void depthwise_tile(const Geom& g, const DirectLayout& l, const T* xrow, const T* w, T* out) {
  typedef T V __attribute__((vector_size(64)));
  constexpr int QV = 64 / sizeof(T);
  V acc[NR][NC];
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j)
#pragma GCC unroll 4
    for (int b = 0; b < NC; ++b) acc[j][b] = V{};
  const int64_t span = (NR - 1) * g.sh + (g.R - 1) * g.dh + 1;  // input rows the tile reads
  const int64_t* tap = l.tap.data();
  for (int64_t ii = 0; ii < span; ++ii) {
    // Kernel row of output row j that reads input row ii, or -1.
    int64_t wrow[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const int64_t d = ii - j * g.sh;
      wrow[j] = (d >= 0 && d % g.dh == 0 && d / g.dh < g.R) ? d / g.dh * g.S * KB : -1;
    }
    const T* row = xrow + ii * l.ld_row;
    for (int64_t s = 0; s < g.S; ++s) {
      V xv[NC];
#pragma GCC unroll 4
      for (int b = 0; b < NC; ++b) std::memcpy(&xv[b], row + tap[s] + b * QV, sizeof(V));
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) {
        if (wrow[j] < 0) continue;
        const T wv = w[wrow[j] + s * KB];
#pragma GCC unroll 4
        for (int b = 0; b < NC; ++b) acc[j][b] += xv[b] * wv;
      }
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j)
#pragma GCC unroll 4
    for (int b = 0; b < NC; ++b) std::memcpy(out + (j * NC + b) * QV, &acc[j][b], sizeof(V));
}

// Rows [p, p + NR) of output channel k: tiles along the columns, then the epilogue.
template <typename T, int NR, int NC>
FASTATTN_INLINE void depthwise_row_block(const Geom& g, const DirectLayout& l, const T* xp, const T* wk, int64_t k,
                                         int64_t p, int64_t p0, T* dst, int64_t ldk, T* pre, const T* bias,
                                         int64_t act) {
  constexpr int QT = NC * 64 / sizeof(T);
  alignas(64) T tile[NR * QT];
  const T* xrow = xp + (p - p0) * g.sh * l.ld_row;
  for (int64_t q0 = 0; q0 < g.Q; q0 += QT) {
    depthwise_tile<T, NR, NC>(g, l, xrow + q0, wk, tile);
    const int64_t qn = std::min<int64_t>(QT, g.Q - q0);
    for (int j = 0; j < NR; ++j) {
      T* d = dst + k * ldk + (p + j - p0) * g.Q + q0;
      epilogue_copy_body(tile + j * QT, d, pre ? pre + (d - dst) : (T*)nullptr, qn, bias ? bias[k] : T(0), act);
    }
  }
}

template <typename T, int NR, int NC>
FASTATTN_INLINE void depthwise_rows_tiled(const Geom& g, const DirectLayout& l, const T* xp, const T* wpack,
                                          int64_t p0, int64_t p1, T* dst, int64_t ldk, T* pre, const T* bias,
                                          int64_t act) {
  for (int64_t k = 0; k < g.Kg; ++k) {
    int64_t p = p0;
    for (; p + NR <= p1; p += NR)
      depthwise_row_block<T, NR, NC>(g, l, xp, wpack + k, k, p, p0, dst, ldk, pre, bias, act);
    for (; p < p1; ++p) depthwise_row_block<T, 1, NC>(g, l, xp, wpack + k, k, p, p0, dst, ldk, pre, bias, act);
  }
}

#if FASTATTN_DEPTHWISE_V4
// Depthwise with stride 1 or 2, no dilation and a square 3x3, 5x5 or 7x7 kernel (float; the
// common cases, MobileNet's downsampling layers included): the same row reuse as above, with the
// kernel size, the stride and the tile (4 rows x NC vectors) fixed at compile time. Stride 1:
// the tile's input rows go in three stretches: ramp-up (rows 0..2, read by output rows 0..ii),
// steady (every output row reads the input row) and ramp-down; stride 2: the 2 NR + R - 2 input
// rows fully unrolled (each feeds at most ceil(R / 2) output rows). Either way which output
// rows an input row feeds is known at compile time, without a test per row; taps are unrolled
// and every load is a displacement off one row pointer (tap s of vector b at row + s + 16 b for
// stride 1; with stride 2 the row is split by column phase, so tap s is at
// row + (s % 2) * wps + s / 2 + 16 b: still whole-vector loads).
//
// GCC, left alone, merges the loads of one weight from every input row into one value and keeps
// the kernel's weights live across the tile (spilling the accumulators), and folds each input
// load into every FMA that uses it; the empty asm statements below stop both.
typedef float VecF __attribute__((vector_size(64)));

// Input row ii of the tile into output rows [jlo, jhi] (kernel row ii - j * ST of output row j).
template <int S, int ST, int NR, int NC>
FASTATTN_INLINE void depthwise_fixed_row(VecF (&acc)[NR][NC], const float* row, int64_t wps, const float* w, int ii,
                                         int jlo, int jhi) {
  asm("" : "+r"(w));  // weights reloaded for each input row
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s) {
    VecF xv[NC];
#pragma GCC unroll 4
    for (int b = 0; b < NC; ++b) {
      std::memcpy(&xv[b], row + (s % ST) * wps + s / ST + b * 16, sizeof(VecF));
      asm("" : "+v"(xv[b]));  // one load per vector and tap, used by every output row
    }
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      if (j < jlo || j > jhi) continue;
      const float wv = w[((ii - j * ST) * S + s) * KB];
#pragma GCC unroll 4
      for (int b = 0; b < NC; ++b) acc[j][b] += xv[b] * wv;
    }
  }
}

// Output rows [0, NR) x NC vectors (stride ST) from the tile's (NR - 1) ST + R input rows (xrow:
// the first, at the tile's first column; wps: the column phase width for stride 2); w: the
// channel's taps with stride KB; out: [NR][NC * 16]. Not inlined: on its own the tile gets all 32
// registers (inlined into the loops below, next to the epilogue's code, GCC spilled
// accumulators: 160 -> 110 GFLOP/s on one core).
template <int R, int ST, int NR, int NC>
__attribute__((noinline, target("arch=x86-64-v4"))) void depthwise_fixed_tile(const float* xrow, int64_t ld_row,
                                                                             int64_t wps, const float* w, float* out) {
  VecF acc[NR][NC];
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j)
#pragma GCC unroll 4
    for (int b = 0; b < NC; ++b) acc[j][b] = VecF{};
  if constexpr (ST == 1) {
#pragma GCC unroll 8
    for (int ii = 0; ii < NR - 1; ++ii)  // ramp-up: output rows j <= ii (kernel row ii - j < R)
      depthwise_fixed_row<R, 1, NR, NC>(acc, xrow + ii * ld_row, wps, w, ii, std::max(0, ii - R + 1), ii);
    for (int ii = NR - 1; ii < R; ++ii)  // steady: all NR output rows
      depthwise_fixed_row<R, 1, NR, NC>(acc, xrow + ii * ld_row, wps, w, ii, 0, NR - 1);
    constexpr int down = R > NR - 1 ? R : NR - 1;
#pragma GCC unroll 8
    for (int ii = down; ii < NR + R - 1; ++ii)  // ramp-down: output rows j >= ii - R + 1
      depthwise_fixed_row<R, 1, NR, NC>(acc, xrow + ii * ld_row, wps, w, ii, ii - R + 1, std::min(ii, NR - 1));
  } else {
    // Input row ii feeds output rows j with 0 <= ii - j ST < R: j in [ceil((ii - R + 1) / ST), ii / ST].
#pragma GCC unroll 16
    for (int ii = 0; ii < (NR - 1) * ST + R; ++ii)
      depthwise_fixed_row<R, ST, NR, NC>(acc, xrow + ii * ld_row, wps, w, ii,
                                         std::max(0, (ii - R + ST) / ST), std::min(NR - 1, ii / ST));
  }
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j)
#pragma GCC unroll 4
    for (int b = 0; b < NC; ++b) std::memcpy(out + (j * NC + b) * 16, &acc[j][b], sizeof(VecF));
}

// d[i] = src[i], whole 64-byte lines with non-temporal stores (no read-for-ownership).
__attribute__((target("arch=x86-64-v4"))) inline void stream_copy_v4(const float* src, float* d, int64_t n) {
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(d + i) & 63); ++i) d[i] = src[i];  // up to a cache line
  for (; i + 16 <= n; i += 16) _mm512_stream_ps(d + i, _mm512_loadu_ps(src + i));
  for (; i < n; ++i) d[i] = src[i];
}

// Rows [p0, p1) of every channel of the block. Tiles of NR rows; the last tile overlaps the one
// before it (recomputing a few rows) rather than running a narrower tile; fewer than NR rows in all
// run 1-row tiles. With g.stream_out (and no pre-activation), when one tile spans the row its NR
// output rows are one contiguous run, streamed out in one go (measured on the 56x56 layers, one
// core: 7x7 8.3 vs 8.9 ms, 3x3 5.6 vs 7.2 ms; 16-byte streaming stores gave the 7x7 gain back).
template <int R, int ST, int NR, int NC>
FASTATTN_INLINE void depthwise_fixed_rows(const Geom& g, const DirectLayout& l, const float* xp, const float* wpack,
                                          int64_t p0, int64_t p1, float* dst, int64_t ldk, float* pre,
                                          const float* bias, int64_t act) {
  constexpr int QT = NC * 16;
  alignas(64) float tile[NR * QT];
  alignas(64) float run[NR * QT];
  const bool stream = g.stream_out && !pre && g.Q <= QT;
  for (int64_t k = 0; k < g.Kg; ++k) {
    const float bk = bias ? bias[k] : 0.0f;
    for (int64_t p = p0; p < p1; p += NR) {
      const int nr = p1 - p0 >= NR ? NR : 1;
      const int64_t ps = nr == NR ? std::min(p, p1 - NR) : p;  // the last tile overlaps
      const float* xrow = xp + (ps - p0) * ST * l.ld_row;
      for (int64_t q0 = 0; q0 < g.Q; q0 += QT) {
        if (nr == NR) depthwise_fixed_tile<R, ST, NR, NC>(xrow + q0, l.ld_row, l.WPs, wpack + k, tile);
        else depthwise_fixed_tile<R, ST, 1, NC>(xrow + q0, l.ld_row, l.WPs, wpack + k, tile);
        const int64_t qn = std::min<int64_t>(QT, g.Q - q0);
        if (stream) {
          for (int j = 0; j < nr; ++j) epilogue_copy_body(tile + j * QT, run + j * g.Q, (float*)nullptr, g.Q, bk, act);
          stream_copy_v4(run, dst + k * ldk + (ps - p0) * g.Q, nr * g.Q);
          continue;
        }
        for (int j = 0; j < nr; ++j) {
          float* d = dst + k * ldk + (ps + j - p0) * g.Q + q0;
          epilogue_copy_body(tile + j * QT, d, pre ? pre + (d - dst) : (float*)nullptr, qn, bk, act);
        }
      }
      if (nr == 1) p += 1 - NR;
    }
  }
}

// The entry point for stride ST, compiled for AVX-512 only (the asm statements above pin 512-bit
// registers; other CPUs run the general depthwise tiles). The kernel size and tile width are
// picked at run time: 4 rows x 4 vectors when the output is wider than 32 columns, else 4 x 2.
// (One entry per stride: with both strides' tiles inlined into one function, stride 1 ran ~7%
// slower.)
template <int ST>
__attribute__((target("arch=x86-64-v4"))) void depthwise_fixed(const Geom& g, const DirectLayout& l, const float* xp,
                                                            const float* w, int64_t p0, int64_t p1, float* d,
                                                            int64_t ldk, float* pre, const float* b, int64_t act) {
  if (g.Q > 32) {
    if (g.R == 7) depthwise_fixed_rows<7, ST, 4, 4>(g, l, xp, w, p0, p1, d, ldk, pre, b, act);
    else if (g.R == 5) depthwise_fixed_rows<5, ST, 4, 4>(g, l, xp, w, p0, p1, d, ldk, pre, b, act);
    else depthwise_fixed_rows<3, ST, 4, 4>(g, l, xp, w, p0, p1, d, ldk, pre, b, act);
  } else {
    if (g.R == 7) depthwise_fixed_rows<7, ST, 4, 2>(g, l, xp, w, p0, p1, d, ldk, pre, b, act);
    else if (g.R == 5) depthwise_fixed_rows<5, ST, 4, 2>(g, l, xp, w, p0, p1, d, ldk, pre, b, act);
    else depthwise_fixed_rows<3, ST, 4, 2>(g, l, xp, w, p0, p1, d, ldk, pre, b, act);
  }
}
#endif  // FASTATTN_DEPTHWISE_V4

template <typename T>
bool use_depthwise_fixed(const Geom& g) {
#if FASTATTN_DEPTHWISE_V4
  static const bool avx512 = __builtin_cpu_supports("x86-64-v4");
  return avx512 && std::is_same_v<T, float> && g.Cg == 1 && g.Kg < 4 && g.sh == g.sw && g.sh <= 2 && g.dh == 1 &&
         g.dw == 1 && g.R == g.S && (g.R == 3 || g.R == 5 || g.R == 7) && g.Q > 16;
#else
  return false;
#endif
}

// Wide layers (>= 8 input and >= 2 vectors of output channels per group, e.g. ResNet's 3x3s):
// vectors along the output channels instead of the columns. A tile is NQ = 14 output pixels of
// one row x 2 vectors of channels (28 accumulators); per tap (c, r, s) it loads the 2 weight
// vectors (aligned, packed [ceil(Kg/KW)][CRS][KW], KW = 2 vectors) and broadcasts each of the 14
// input values from the padded row buffer (scalar loads never split a cache line): 16 loads per
// 28 FMAs, and a row of 14, 28 or 56 pixels splits into whole tiles (a shorter last tile
// overlaps the one before it and rewrites the same values). The accumulators come out pixel-major
// and are transposed through a small buffer into the NCHW rows by the epilogue.
template <typename T>
constexpr int wide_kw() { return 2 * 64 / sizeof(T); }  // output channels per tile
constexpr int WIDE_NQ = 14;                             // output pixels per tile

template <typename T>
bool use_wide(const Geom& g) {
  constexpr int KW = wide_kw<T>();
  // enough channels for the vectors, and at most 25% of them padding
  return g.direct && g.Cg >= 8 && g.Kg >= KW && ceil_div(g.Kg, KW) * KW * 4 <= g.Kg * 5;
}

template <typename T>
FASTATTN_INLINE void wide_tile(const Geom& g, const DirectLayout& l, const T* xrow, const T* w, T* out) {
  typedef T V __attribute__((vector_size(64)));
  constexpr int QV = 64 / sizeof(T), NQ = WIDE_NQ;
  V acc[NQ][2];
#pragma GCC unroll 14
  for (int q = 0; q < NQ; ++q) acc[q][0] = acc[q][1] = V{};
  const int64_t* tap = l.tap.data();
  for (int64_t c = 0; c < g.Cg; ++c)
    for (int64_t r = 0; r < g.R; ++r) {
      const T* row = xrow + (c * l.HR + r * g.dh) * l.ld_row;
      for (int64_t s = 0; s < g.S; ++s, w += 2 * QV) {
        const T* x = row + tap[s];
        asm("" : "+r"(x));  // keep x one base register: the 14 loads below use displacements off it
        V w0, w1;
        std::memcpy(&w0, w, sizeof(V));
        std::memcpy(&w1, w + QV, sizeof(V));
#pragma GCC unroll 14
        for (int q = 0; q < NQ; ++q) {
          const T xv = x[q];
          acc[q][0] += w0 * xv;
          acc[q][1] += w1 * xv;
        }
      }
    }
#pragma GCC unroll 14
  for (int q = 0; q < NQ; ++q) {
    std::memcpy(out + q * 2 * QV, &acc[q][0], sizeof(V));
    std::memcpy(out + q * 2 * QV + QV, &acc[q][1], sizeof(V));
  }
}

// Rows [p0, p1) of the group, all channels; wpack: [ceil(Kg/KW)][CRS][KW].
template <typename T>
FASTATTN_INLINE void wide_rows(const Geom& g, const DirectLayout& l, const T* xp, const T* wpack, int64_t p0,
                               int64_t p1, T* dst, int64_t ldk, T* pre, const T* bias, int64_t act) {
  constexpr int KW = wide_kw<T>(), NQ = WIDE_NQ;
  alignas(64) T tile[NQ * KW];
  T line[NQ];
  for (int64_t k0 = 0; k0 < g.Kg; k0 += KW) {
    const T* w = wpack + (k0 / KW) * g.CRS * KW;
    const int64_t kn = std::min<int64_t>(KW, g.Kg - k0);
    for (int64_t p = p0; p < p1; ++p) {
      const T* xrow = xp + (p - p0) * g.sh * l.ld_row;
      for (int64_t q0 = 0; q0 < g.Q; q0 += NQ) {
        const int64_t qs = g.Q >= NQ ? std::min<int64_t>(q0, g.Q - NQ) : 0;  // last tile: overlap
        wide_tile<T>(g, l, xrow + qs, w, tile);
        const int64_t qn = std::min<int64_t>(NQ, g.Q - qs);
        for (int64_t a = 0; a < kn; ++a) {
          for (int64_t q = 0; q < qn; ++q) line[q] = tile[q * KW + a];
          T* d = dst + (k0 + a) * ldk + (p - p0) * g.Q + qs;
          epilogue_copy_body(line, d, pre ? pre + (d - dst) : (T*)nullptr, qn, bias ? bias[k0 + a] : T(0), act);
        }
      }
    }
  }
}

template <typename T>
FASTATTN_INLINE void direct_rows_body(const Geom& g, const DirectLayout& l, const T* xp, const T* wpack, int64_t p0,
                                      int64_t p1, T* dst, int64_t ldk, T* pre, const T* bias, int64_t act) {
  constexpr int QV = 64 / sizeof(T);
  if (use_wide<T>(g)) {
    wide_rows<T>(g, l, xp, wpack, p0, p1, dst, ldk, pre, bias, act);
  } else if (g.Cg == 1 && g.Kg < 4) {  // depthwise: row-reusing tiles, as wide as the map needs
    if (g.Q > 2 * QV) depthwise_rows_tiled<T, 4, 4>(g, l, xp, wpack, p0, p1, dst, ldk, pre, bias, act);
    else if (g.Q > QV) depthwise_rows_tiled<T, 8, 2>(g, l, xp, wpack, p0, p1, dst, ldk, pre, bias, act);
    else depthwise_rows_tiled<T, 8, 1>(g, l, xp, wpack, p0, p1, dst, ldk, pre, bias, act);
  } else if (g.Kg < 4) direct_rows_tiled<T, 1, 1, 4>(g, l, xp, wpack, p0, p1, dst, ldk, pre, bias, act);
  else if (sizeof(T) == 8) direct_rows_tiled<T, 8, 1, 1>(g, l, xp, wpack, p0, p1, dst, ldk, pre, bias, act);
  else if (g.Q > 16) direct_rows_tiled<T, 8, 1, 2>(g, l, xp, wpack, p0, p1, dst, ldk, pre, bias, act);
  else direct_rows_tiled<T, 8, 2, 1>(g, l, xp, wpack, p0, p1, dst, ldk, pre, bias, act);
}
FASTATTN_SIMD void direct_rows(const Geom& g, const DirectLayout& l, const float* xp, const float* wp, int64_t p0,
                               int64_t p1, float* dst, int64_t ldk, float* pre, const float* b, int64_t act) {
  direct_rows_body(g, l, xp, wp, p0, p1, dst, ldk, pre, b, act);
}
FASTATTN_SIMD void direct_rows(const Geom& g, const DirectLayout& l, const double* xp, const double* wp, int64_t p0,
                               int64_t p1, double* dst, int64_t ldk, double* pre, const double* b, int64_t act) {
  direct_rows_body(g, l, xp, wp, p0, p1, dst, ldk, pre, b, act);
}

// d[i] = src[i * stride], i < n (stride 2, the common case, with a constant stride so that it
// vectorizes with shuffles instead of gathers).
template <typename T>
FASTATTN_INLINE void strided_copy_body(const T* src, int64_t stride, int64_t n, T* d) {
  if (stride == 2) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) d[i] = src[2 * i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) d[i] = src[i * stride];
  }
}
FASTATTN_SIMD void strided_copy(const float* s, int64_t stride, int64_t n, float* d) { strided_copy_body(s, stride, n, d); }
FASTATTN_SIMD void strided_copy(const double* s, int64_t stride, int64_t n, double* d) { strided_copy_body(s, stride, n, d); }

// Fill the phase-split padded buffer (see above) from input rows [ih0, ih0 + HR): zeros, then
// each input row copied in (stride 1: one copy; stride sw > 1: per column phase ph, the padded
// columns j = j0, j0 + sw, ... (j0 the first >= pl in the phase) from input columns j - pl, one
// strided copy). (Writing each row once, zeroing only its margins, measured slower at stride 1:
// depthwise 3x3 @56 forward 5.9 -> 6.9 ms on one core.)
template <typename T>
void pad_rows(const Geom& g, const DirectLayout& l, const T* x, int64_t ih0, T* xp) {
  std::fill(xp, xp + g.Cg * l.HR * l.ld_row, T(0));
  const int64_t jend = g.pl + std::max<int64_t>(0, std::min(g.W, l.ld_row - g.pl));  // past the last column that fits
  for (int64_t c = 0; c < g.Cg; ++c)
    for (int64_t i = 0; i < l.HR; ++i) {
      const int64_t ih = ih0 + i;
      if (ih < 0 || ih >= g.H) continue;
      T* d = xp + (c * l.HR + i) * l.ld_row;
      const T* src = x + (c * g.H + ih) * g.W;
      if (g.sw == 1) {
        std::copy(src, src + (jend - g.pl), d + g.pl);
        continue;
      }
      for (int64_t ph = 0; ph < g.sw; ++ph) {
        const int64_t j0 = g.pl + ((ph - g.pl) % g.sw + g.sw) % g.sw;
        if (j0 < jend) strided_copy(src + (j0 - g.pl), g.sw, ceil_div(jend - j0, g.sw), d + ph * l.WPs + j0 / g.sw);
      }
    }
}

// The forward of one (image, group, rows [p0, p1)) into dst (see direct_rows), either way.
template <typename T>
struct Forward {
  const Geom& g;
  const T* x;      // [N][C][H][W]
  const T* w;      // [K][CRS]
  const T* wpack;  // direct: [G][ceil(Kg/KB)][CRS][KB]
  const T* bias;   // [K] or null
  int64_t act;

  void rows(int64_t n, int64_t grp, int64_t p0, int64_t p1, T* dst, int64_t ldk, T* pre,
            std::vector<T>& scratch) const {
    const T* xg = x + (n * g.C + grp * g.Cg) * g.H * g.W;
    const T* bg = bias ? bias + grp * g.Kg : nullptr;
    if (g.direct) {
      const DirectLayout l = direct_layout<T>(g, p1 - p0);
      scratch.resize(g.Cg * l.HR * l.ld_row);
      pad_rows(g, l, xg, p0 * g.sh - g.pt, scratch.data());
      const int64_t group_pack = use_wide<T>(g) ? ceil_div(g.Kg, wide_kw<T>()) * wide_kw<T>() : ceil_div(g.Kg, KB) * KB;
      const T* wg = wpack + grp * group_pack * g.CRS;
#if FASTATTN_DEPTHWISE_V4
      if constexpr (std::is_same_v<T, float>) {
        if (use_depthwise_fixed<T>(g)) {
          // The next group's input rows (likely this thread's next unit) start coming from
          // memory while this one computes: the copy above otherwise waits on every line.
          if (grp + 1 < g.G) {
            const int64_t ih0 = std::max<int64_t>(p0 * g.sh - g.pt, 0);
            const int64_t ih1 = std::min<int64_t>(g.H, ih0 + l.HR);
            const char* next = reinterpret_cast<const char*>(xg + g.Cg * g.H * g.W + ih0 * g.W);
            const int64_t bytes = (ih1 - ih0) * g.W * int64_t(sizeof(T));
            for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(next + i, 0, 3);
          }
          if (g.sh == 2) return depthwise_fixed<2>(g, l, scratch.data(), wg, p0, p1, dst, ldk, pre, bg, act);
          return depthwise_fixed<1>(g, l, scratch.data(), wg, p0, p1, dst, ldk, pre, bg, act);
        }
      }
#endif
      direct_rows(g, l, scratch.data(), wg, p0, p1, dst, ldk, pre, bg, act);
      return;
    }
    const T* wg = w + grp * g.Kg * g.CRS;
    const int64_t mbeg = p0 * g.Q, mend = p1 * g.Q;
    if (!g.pointwise) scratch.resize(g.CRS * std::min(g.TM, mend - mbeg));
    for (int64_t m0 = mbeg; m0 < mend; m0 += g.TM) {
      const int64_t mlen = std::min(g.TM, mend - m0);
      const T* col;
      int64_t ldcol;
      if (g.pointwise) {
        col = xg + m0;
        ldcol = g.H * g.W;
      } else {
        im2col(g, xg, m0, mlen, scratch.data());
        col = scratch.data();
        ldcol = mlen;
      }
      // out (Kg x mlen, row-major, ld ldk) = Wg (Kg x CRS) * col (CRS x mlen); column-major
      // that is out^T (mlen x Kg) = col^T (mlen x CRS) * Wg^T (CRS x Kg).
      T* d = dst + (m0 - mbeg);
      gemm('N', 'N', mlen, g.Kg, g.CRS, T(1), col, ldcol, wg, g.CRS, T(0), d, ldk);
      for (int64_t k = 0; k < g.Kg; ++k)
        epilogue(d + k * ldk, pre ? pre + (d - dst) + k * ldk : (T*)nullptr, mlen, bg ? bg[k] : T(0), act);
    }
  }
};

template <typename T>
std::vector<T> pack_weight(const Geom& g, const T* w) {
  if (use_wide<T>(g)) {  // [G][ceil(Kg/KW)][CRS][KW]
    constexpr int KW = wide_kw<T>();
    const int64_t nkw = ceil_div(g.Kg, KW);
    std::vector<T> wp(g.G * nkw * g.CRS * KW, T(0));
    for (int64_t grp = 0; grp < g.G; ++grp)
      for (int64_t k = 0; k < g.Kg; ++k)
        for (int64_t i = 0; i < g.CRS; ++i)
          wp[((grp * nkw + k / KW) * g.CRS + i) * KW + k % KW] = w[(grp * g.Kg + k) * g.CRS + i];
    return wp;
  }
  const int64_t nkb = (g.Kg + KB - 1) / KB;
  std::vector<T> wp(g.G * nkb * g.CRS * KB, T(0));
  for (int64_t grp = 0; grp < g.G; ++grp)
    for (int64_t k = 0; k < g.Kg; ++k)
      for (int64_t i = 0; i < g.CRS; ++i)
        wp[((grp * nkb + k / KB) * g.CRS + i) * KB + k % KB] = w[(grp * g.Kg + k) * g.CRS + i];
  return wp;
}

// Rows per unit of work: GEMM tiles of ~TM pixels; direct: enough units for all threads.
int64_t rows_per_unit(const Geom& g) {
  if (!g.direct) return std::max<int64_t>(1, std::min(g.P, g.TM / std::max<int64_t>(g.Q, 1)));
  const int64_t want = 4 * at::get_num_threads();
  const int64_t splits = std::min(g.P, ceil_div(want, g.N * g.G));
  int64_t rb = ceil_div(g.P, std::max<int64_t>(splits, 1));
  if (g.Cg >= 8) {  // wide: keep a unit's padded input rows (~Cg x rows x row pitch) within ~256 KB of L2
    const int64_t row_bytes = 4 * g.Cg * (g.Q * g.sw + g.S * g.dw + 16);
    const int64_t in_rows = std::max<int64_t>(1, (int64_t(256) << 10) / row_bytes);
    rb = std::min(rb, std::max<int64_t>(1, (in_rows - (g.R - 1) * g.dh) / g.sh));
  }
  return rb;
}

// A fresh output tensor. (An madvise(MADV_HUGEPAGE) on big outputs was tried and removed:
// measured on the seed layer's forward, 3 x 60 calls, 2 threads, glibc's default allocator: median
// 11-17 ms with the hint vs 24-31 ms without, but with it 2-9 calls in 60 took over 80 ms (max
// 110-134 ms; without it max 37-52 ms, none over 80), and with the heap reused it changed nothing.)
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts) { return at::empty(sizes, opts); }

bool low_precision(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}
at::Tensor compute_tensor(const at::Tensor& t) {  // contiguous, float for 16-bit input
  return (low_precision(t) ? t.to(at::kFloat) : t).contiguous();
}

void check_common(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "conv2d (cpu): input and weight must be CPU tensors");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "conv2d: input and weight must have one dtype, got ",
              x.scalar_type(), " and ", w.scalar_type());
  auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              "conv2d (cpu): dtype must be float32, float64, bfloat16 or float16, got ", st);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), "conv2d: bias must have shape (", w.size(0), ")");
    TORCH_CHECK(bias->scalar_type() == st && bias->device().is_cpu(), "conv2d: bias must match input's dtype and device");
  }
}

// ------------------------------------------------------------------------------------------
// Forward ops.
// ------------------------------------------------------------------------------------------
// Outputs at least this big are streamed past the cache where a kernel supports it.
constexpr int64_t kStreamBytes = int64_t(16) << 20;

template <typename T>
void forward_impl(const Geom& geom, const T* x, const T* w, const T* b, int64_t act, T* out, T* pre) {
  Geom g = geom;
  g.stream_out = !pre && !g.keep_cached && g.N * g.K * g.P * g.Q * int64_t(sizeof(T)) >= kStreamBytes;
  std::vector<T> wpack;
  if (g.direct) wpack = pack_weight(g, w);
  Forward<T> fw{g, x, w, wpack.data(), b, act};
  const int64_t rb = rows_per_unit(g), nrb = ceil_div(g.P, rb);
  at::parallel_for(0, g.N * g.G * nrb, grain(g.Kg * rb * g.Q * g.CRS), [&](int64_t begin, int64_t end) {
    std::vector<T> scratch;
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / (g.G * nrb), grp = (u / nrb) % g.G, p0 = (u % nrb) * rb;
      const int64_t p1 = std::min(g.P, p0 + rb);
      const int64_t off = ((n * g.K + grp * g.Kg) * g.P + p0) * g.Q;
      fw.rows(n, grp, p0, p1, out + off, g.P * g.Q, pre ? pre + off : nullptr, scratch);
    }
    if (g.stream_out) stream_fence();  // streamed stores visible before the thread reports done
  });
}

std::tuple<at::Tensor, at::Tensor> conv2d_fwd(const at::Tensor& input, const at::Tensor& weight,
                                              const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                              int64_t activation, bool save_preact) {
  check_common(input, weight, bias);
  TORCH_CHECK(activation >= 0 && activation <= 3, "conv2d: activation must be 0..3, got ", activation);
  Geom g = make_geom(input, weight, stride, padding, dilation, groups);
  at::Tensor x = compute_tensor(input), w = compute_tensor(weight);
  at::Tensor b = bias.has_value() && bias->defined() ? compute_tensor(*bias) : at::Tensor();
  at::Tensor out = empty_output({g.N, g.K, g.P, g.Q}, x.options());
  at::Tensor pre = save_preact ? empty_output({g.N, g.K, g.P, g.Q}, x.options()) : at::empty({0}, x.options());
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_fwd", [&] {
      forward_impl<scalar_t>(g, x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                             b.defined() ? b.data_ptr<scalar_t>() : nullptr, activation, out.data_ptr<scalar_t>(),
                             save_preact ? pre.data_ptr<scalar_t>() : nullptr);
    });
  }
  if (low_precision(input)) return {out.to(input.scalar_type()), pre.to(input.scalar_type())};
  return {out, pre};
}

// Pool output size (no padding, floor mode, like max_pool2d's defaults).
inline int64_t pool_out(int64_t n, int64_t k, int64_t s) { return n >= k ? (n - k) / s + 1 : 0; }

// One pooled row: out[v] = max over the window rows [0, kh) x columns [v*sw, v*sw + kw) of conv
// (rows of Q values; conv row 0 is absolute row row0). Like max_pool2d: the first maximum in scan
// order wins, NaN propagates; idx[v] = flat index h*Q + w of the winner.
template <typename T>
FASTATTN_INLINE void pool_row_body(const T* conv, int64_t Q, int64_t PW, int64_t kh, int64_t kw, int64_t sw,
                                   int64_t row0, T* out, int64_t* idx) {
  for (int64_t v = 0; v < PW; ++v) out[v] = -std::numeric_limits<T>::infinity();
  if (idx)
    for (int64_t v = 0; v < PW; ++v) idx[v] = row0 * Q + v * sw;
  for (int64_t i = 0; i < kh; ++i)
    for (int64_t j = 0; j < kw; ++j) {
      const T* src = conv + i * Q + j;
      const int64_t base = (row0 + i) * Q + j;
      if (idx) {
#pragma omp simd
        for (int64_t v = 0; v < PW; ++v) {
          const T val = src[v * sw];
          const bool take = val > out[v] || val != val;
          out[v] = take ? val : out[v];
          idx[v] = take ? base + v * sw : idx[v];
        }
      } else {
#pragma omp simd
        for (int64_t v = 0; v < PW; ++v) {
          const T val = src[v * sw];
          out[v] = (val > out[v] || val != val) ? val : out[v];
        }
      }
    }
}
FASTATTN_SIMD void pool_row(const float* c, int64_t Q, int64_t PW, int64_t kh, int64_t kw, int64_t sw, int64_t row0,
                            float* out, int64_t* idx) { pool_row_body(c, Q, PW, kh, kw, sw, row0, out, idx); }
FASTATTN_SIMD void pool_row(const double* c, int64_t Q, int64_t PW, int64_t kh, int64_t kw, int64_t sw, int64_t row0,
                            double* out, int64_t* idx) { pool_row_body(c, Q, PW, kh, kw, sw, row0, out, idx); }

template <typename T>
void fused_pool_impl(const Geom& g, const T* x, const T* w, const T* b, int64_t kh, int64_t kw, int64_t sh,
                     int64_t sw, T* out, int64_t* idx) {
  std::vector<T> wpack;
  if (g.direct) wpack = pack_weight(g, w);
  Forward<T> fw{g, x, w, wpack.data(), b, kRelu};
  const int64_t PH = pool_out(g.P, kh, sh), PW = pool_out(g.Q, kw, sw);
  // Pooled rows per unit: ~one im2col tile of conv rows, or a share of the rows for the threads.
  const int64_t crows = g.direct ? std::min<int64_t>(rows_per_unit(g), 8) : rows_per_unit(g);
  const int64_t ub = std::max<int64_t>(1, std::min(PH, crows / sh));
  const int64_t nub = ceil_div(PH, ub);
  at::parallel_for(0, g.N * g.G * nub, grain(g.Kg * ub * sh * g.Q * g.CRS), [&](int64_t begin, int64_t end) {
    std::vector<T> scratch, conv;
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / (g.G * nub), grp = (u / nub) % g.G, u0 = (u % nub) * ub;
      const int64_t u1 = std::min(PH, u0 + ub);
      const int64_t p0 = u0 * sh, p1 = (u1 - 1) * sh + kh;  // conv rows the pooled rows need
      const int64_t ldk = (p1 - p0) * g.Q;
      conv.resize(g.Kg * ldk);
      fw.rows(n, grp, p0, p1, conv.data(), ldk, nullptr, scratch);
      for (int64_t k = 0; k < g.Kg; ++k) {
        const T* ck = conv.data() + k * ldk;
        const int64_t plane = (n * g.K + grp * g.Kg + k) * PH * PW;
        for (int64_t uu = u0; uu < u1; ++uu)
          pool_row(ck + (uu * sh - p0) * g.Q, g.Q, PW, kh, kw, sw, uu * sh, out + plane + uu * PW,
                   idx ? idx + plane + uu * PW : nullptr);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> conv2d_relu_maxpool2d_fwd(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, at::IntArrayRef pool_kernel,
    at::IntArrayRef pool_stride, bool save_indices) {
  check_common(input, weight, bias);
  Geom g = make_geom(input, weight, stride, padding, dilation, groups);
  TORCH_CHECK(pool_kernel.size() == 2 && pool_stride.size() == 2, "conv2d_relu_maxpool2d: pool_kernel and pool_stride take 2 values");
  const int64_t kh = pool_kernel[0], kw = pool_kernel[1], sh = pool_stride[0], sw = pool_stride[1];
  TORCH_CHECK(kh > 0 && kw > 0 && sh > 0 && sw > 0, "conv2d_relu_maxpool2d: pool kernel and stride must be positive");
  TORCH_CHECK(g.P >= kh && g.Q >= kw, "conv2d_relu_maxpool2d: the conv output (", g.P, "x", g.Q,
              ") is smaller than the pool kernel (", kh, "x", kw, ")");
  const int64_t PH = pool_out(g.P, kh, sh), PW = pool_out(g.Q, kw, sw);
  at::Tensor x = compute_tensor(input), w = compute_tensor(weight);
  at::Tensor b = bias.has_value() && bias->defined() ? compute_tensor(*bias) : at::Tensor();
  at::Tensor out = at::empty({g.N, g.K, PH, PW}, x.options());
  at::Tensor idx = save_indices ? at::empty({g.N, g.K, PH, PW}, x.options().dtype(at::kLong))
                                : at::empty({0}, x.options().dtype(at::kLong));
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_relu_maxpool2d_fwd", [&] {
      fused_pool_impl<scalar_t>(g, x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                b.defined() ? b.data_ptr<scalar_t>() : nullptr, kh, kw, sh, sw,
                                out.data_ptr<scalar_t>(), save_indices ? idx.data_ptr<int64_t>() : nullptr);
    });
  }
  if (low_precision(input)) out = out.to(input.scalar_type());
  return {out, idx};
}

// ------------------------------------------------------------------------------------------
// Backward.
// ------------------------------------------------------------------------------------------
// grad_input, direct: per (image, group) accumulate into a padded [Cg][Hp][Wp] buffer, where
// output pixel (p, q) and tap (r, s) touch padded position (p*sh + r*dh, q*sw + s*dw).
template <typename T>
FASTATTN_INLINE void direct_grad_input_body(const Geom& g, const T* gz, const T* wt /*[CRS][Kg]*/, T* dxp,
                                            int64_t Hp, int64_t Wp) {
  constexpr int QV = 64 / sizeof(T);
  const int64_t PQ = g.P * g.Q, sw = g.sw;
  for (int64_t p = 0; p < g.P; ++p)
    for (int64_t c = 0; c < g.Cg; ++c)
      for (int64_t r = 0; r < g.R; ++r) {
        T* row = dxp + (c * Hp + p * g.sh + r * g.dh) * Wp;
        for (int64_t s = 0; s < g.S; ++s) {
          const T* wv = wt + ((c * g.R + r) * g.S + s) * g.Kg;
          T* d = row + s * g.dw;
          for (int64_t q0 = 0; q0 < g.Q; q0 += QV) {
            const int64_t qn = std::min<int64_t>(QV, g.Q - q0);
            T acc[QV];
            for (int j = 0; j < qn; ++j) acc[j] = d[(q0 + j) * sw];
            for (int64_t k = 0; k < g.Kg; ++k) {
              const T* z = gz + k * PQ + p * g.Q + q0;
              const T wk = wv[k];
              if (qn == QV) {
#pragma omp simd
                for (int j = 0; j < QV; ++j) acc[j] += wk * z[j];
              } else {
                for (int j = 0; j < qn; ++j) acc[j] += wk * z[j];
              }
            }
            for (int j = 0; j < qn; ++j) d[(q0 + j) * sw] = acc[j];
          }
        }
      }
}
FASTATTN_SIMD void direct_grad_input(const Geom& g, const float* gz, const float* wt, float* dxp, int64_t Hp, int64_t Wp) { direct_grad_input_body(g, gz, wt, dxp, Hp, Wp); }
FASTATTN_SIMD void direct_grad_input(const Geom& g, const double* gz, const double* wt, double* dxp, int64_t Hp, int64_t Wp) { direct_grad_input_body(g, gz, wt, dxp, Hp, Wp); }

template <typename T>
void forward_impl(const Geom& g, const T* x, const T* w, const T* b, int64_t act, T* out, T* pre);

// With stride 1, grad-input is itself a convolution: of gz with the weight flipped in (r, s) and
// its channel axes swapped, padded by dilation*(kernel-1) - padding; run by the forward kernels.
template <typename T>
bool grad_input_as_conv(const Geom& g, const T* gz, const T* w, T* dx) {
  const int64_t eh = g.dh * (g.R - 1), ew = g.dw * (g.S - 1);
  if (g.sh != 1 || g.sw != 1 || g.pointwise || g.pt > eh || g.pb > eh || g.pl > ew || g.pr > ew) return false;
  Geom t = g;
  t.C = g.K; t.H = g.P; t.W = g.Q; t.K = g.C; t.P = g.H; t.Q = g.W; t.Cg = g.Kg; t.Kg = g.Cg;
  t.CRS = t.Cg * g.R * g.S;
  t.pt = eh - g.pt; t.pb = eh - g.pb; t.pl = ew - g.pl; t.pr = ew - g.pr;
  t.pointwise = false;
  t.direct = true;
  const int64_t RS = g.R * g.S;
  std::vector<T> wf(g.K * g.CRS);  // [G][Cg][Kg][R][S]
  for (int64_t grp = 0; grp < g.G; ++grp)
    for (int64_t c = 0; c < g.Cg; ++c)
      for (int64_t k = 0; k < g.Kg; ++k)
        for (int64_t r = 0; r < g.R; ++r)
          for (int64_t s = 0; s < g.S; ++s)
            wf[((grp * g.Cg + c) * g.Kg + k) * RS + r * g.S + s] =
                w[((grp * g.Kg + k) * g.Cg + c) * RS + (g.R - 1 - r) * g.S + (g.S - 1 - s)];
  forward_impl<T>(t, gz, wf.data(), nullptr, kNone, dx, nullptr);
  return true;
}

// With stride > 1 (no dilation), grad-input splits by phase: the input rows h with
// (h + pt) % sh == a only receive kernel rows r = a, a + sh, a + 2 sh, ... (Ra of them), and
// dx[row m*sh + a of the padded input] = sum_i gz[m - i] * w[a + i*sh]: a stride-1 conv of gz with
// that sub-kernel flipped, padded by Ra - 1 - m0 on top (m0: the phase's first row). The same
// for columns. Each of the sh*sw phases runs on the forward kernels (Forward::rows, the phase's
// own geometry and packed sub-kernel). Work goes in units of (image, group, row phase a, block of
// that phase's rows): the unit runs its sw column phases into small buffers and interleaves
// them into the dx rows at once, while they are in cache (stride 2: one pass that writes whole
// dx rows, two phase values per pair of columns). Not taken (false) if a phase has no taps
// (kernel smaller than the stride) or would need negative padding (padding > kernel - 1).
struct Phase {
  int64_t a, n, first, pad_lo, pad_hi, out;  // offset, taps, first output index, padding, outputs
};
inline bool make_phase(int64_t a, int64_t R, int64_t sh, int64_t pt, int64_t H, int64_t P, Phase& ph) {
  ph.a = a;
  ph.n = (R - a + sh - 1) / sh;                     // taps a, a + sh, ... < R
  ph.first = ceil_div(pt - a, sh);                  // first m with m*sh + a >= pt
  const int64_t last = (pt + H - 1 - a) >= 0 ? (pt + H - 1 - a) / sh : -1;  // last m with m*sh + a < pt + H
  ph.pad_lo = ph.n - 1 - ph.first;
  const int64_t rows = last - ph.first + 1;         // input rows h of this phase
  // Output rows of the stride-1 conv over gz's P rows: P + pad_lo + pad_hi - n + 1 >= rows.
  ph.pad_hi = std::max<int64_t>(0, rows - 1 + ph.n - P - ph.pad_lo);
  ph.out = std::max<int64_t>(rows, 0);
  return ph.n > 0 && ph.pad_lo >= 0;
}

// d[2 i] = s0[i], d[2 i + 1] = s1[i] for i < n (the two column phases of a stride-2 row).
template <typename T>
FASTATTN_INLINE void interleave2_body(const T* s0, const T* s1, int64_t n, T* d) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    d[2 * i] = s0[i];
    d[2 * i + 1] = s1[i];
  }
}
FASTATTN_SIMD void interleave2(const float* s0, const float* s1, int64_t n, float* d) { interleave2_body(s0, s1, n, d); }
FASTATTN_SIMD void interleave2(const double* s0, const double* s1, int64_t n, double* d) { interleave2_body(s0, s1, n, d); }

template <typename T>
bool grad_input_by_phases(const Geom& g, const T* gz, const T* w, T* dx) {
  if ((g.sh == 1 && g.sw == 1) || g.dh != 1 || g.dw != 1) return false;
  std::vector<Phase> rows(g.sh), cols(g.sw);
  for (int64_t a = 0; a < g.sh; ++a)
    if (!make_phase(a, g.R, g.sh, g.pt, g.H, g.P, rows[a])) return false;
  for (int64_t b = 0; b < g.sw; ++b)
    if (!make_phase(b, g.S, g.sw, g.pl, g.W, g.Q, cols[b])) return false;
  // The conv of each phase (a, b): of gz (K channels, P x Q) to C channels with the flipped sub-kernel.
  struct PhaseConv {
    Geom t;
    std::vector<T> wf, wpack;  // wf: [G][Cg][Kg][R'][S'] (taps flipped); wpack: its direct-kernel packing
  };
  std::vector<PhaseConv> conv(g.sh * g.sw);
  int64_t rb = std::numeric_limits<int64_t>::max();  // phase rows per unit
  for (int64_t a = 0; a < g.sh; ++a)
    for (int64_t b = 0; b < g.sw; ++b) {
      const Phase &pr = rows[a], &pc = cols[b];
      Geom& t = conv[a * g.sw + b].t;
      t = g;
      t.C = g.K; t.H = g.P; t.W = g.Q; t.K = g.C; t.Cg = g.Kg; t.Kg = g.Cg;
      t.R = pr.n; t.S = pc.n; t.CRS = t.Cg * t.R * t.S;
      t.sh = t.sw = 1;
      t.pt = pr.pad_lo; t.pb = pr.pad_hi; t.pl = pc.pad_lo; t.pr = pc.pad_hi;
      t.P = g.P + t.pt + t.pb - t.R + 1; t.Q = g.Q + t.pl + t.pr - t.S + 1;
      t.pointwise = t.R == 1 && t.S == 1 && t.pt == 0 && t.pb == 0 && t.pl == 0 && t.pr == 0;
      t.direct = !t.pointwise;
      t.TM = std::min(t.P * t.Q, std::max<int64_t>(64, (int64_t(1) << 18) / std::max<int64_t>(t.CRS, 1)));
      t.keep_cached = true;
      t.stream_out = false;
      std::vector<T>& wf = conv[a * g.sw + b].wf;
      wf.resize(t.K * t.CRS);
      for (int64_t grp = 0; grp < g.G; ++grp)
        for (int64_t c = 0; c < g.Cg; ++c)
          for (int64_t k = 0; k < g.Kg; ++k)
            for (int64_t i = 0; i < t.R; ++i)
              for (int64_t j = 0; j < t.S; ++j)
                wf[(((grp * g.Cg + c) * g.Kg + k) * t.R + i) * t.S + j] =
                    w[(((grp * g.Kg + k) * g.Cg + c) * g.R + pr.a + (t.R - 1 - i) * g.sh) * g.S + pc.a +
                      (t.S - 1 - j) * g.sw];
      if (t.direct) conv[a * g.sw + b].wpack = pack_weight(t, wf.data());
      if (pr.out > 0 && pc.out > 0) rb = std::min(rb, rows_per_unit(t));
    }
  if (rb == std::numeric_limits<int64_t>::max()) return true;  // no input pixel (cannot happen: H, W >= 1)
  int64_t nrb = 1;  // blocks of phase rows per (image, group): the most any row phase needs
  for (const Phase& pr : rows) nrb = std::max(nrb, ceil_div(pr.out, rb));
  // A unit covering whole planes (one block) writes a contiguous Cg x H x W run of dx: when dx is
  // too big to stay in cache and the run is small, the unit assembles it in a local buffer and
  // streams it out (no read-for-ownership of dx's lines; float on AVX-512).
  const int64_t run = g.Cg * g.H * g.W;
#if FASTATTN_DEPTHWISE_V4
  static const bool avx512 = __builtin_cpu_supports("x86-64-v4");
  const bool stream = avx512 && std::is_same_v<T, float> && nrb == 1 && run * int64_t(sizeof(T)) <= (int64_t(64) << 10) &&
                      g.N * g.C * g.H * g.W * int64_t(sizeof(T)) >= kStreamBytes;
#else
  const bool stream = false;
#endif
  at::parallel_for(0, g.N * g.G * nrb, grain(g.Cg * rb * g.Q * g.Kg * g.R * g.S), [&](int64_t begin, int64_t end) {
    std::vector<T> scratch, local(stream ? run : 0);
    std::vector<std::vector<T>> buf(g.sh * g.sw);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / (g.G * nrb), grp = u / nrb % g.G, m0 = (u % nrb) * rb;
      T* dxg = stream ? local.data() : dx + (n * g.C + grp * g.Cg) * g.H * g.W;  // [Cg][H][W]
      for (int64_t a = 0; a < g.sh; ++a) {
        const Phase& pr = rows[a];
        const int64_t m1 = std::min(pr.out, m0 + rb);
        if (m0 >= m1) continue;
        for (int64_t b = 0; b < g.sw; ++b) {  // phase (a, b)'s rows [m0, m1), channels of the group
          const PhaseConv& pcv = conv[a * g.sw + b];
          if (cols[b].out == 0) continue;
          std::vector<T>& bb = buf[a * g.sw + b];
          bb.resize(g.Cg * (m1 - m0) * pcv.t.Q);
          Forward<T> fw{pcv.t, gz, pcv.wf.data(), pcv.wpack.data(), nullptr, kNone};
          fw.rows(n, grp, m0, m1, bb.data(), (m1 - m0) * pcv.t.Q, nullptr, scratch);
        }
        // Row m of the phase is padded input row (first + m) sh + a, input row (first + m) sh + a - pt;
        // column j of column phase b is input column (first_b + j) sw + b - pl.
        for (int64_t c = 0; c < g.Cg; ++c)
          for (int64_t m = m0; m < m1; ++m) {
            T* dr = dxg + (c * g.H + (pr.first + m) * g.sh + pr.a - g.pt) * g.W;
            auto src = [&](int64_t b) {
              return buf[a * g.sw + b].data() + (c * (m1 - m0) + m - m0) * conv[a * g.sw + b].t.Q;
            };
            if (g.sw == 2 && cols[0].out > 0 && cols[1].out > 0) {
              // Padded column 2 u + b holds phase b's value u - first_b: pairs (2u, 2u + 1) for the u
              // both phases cover, in one pass; the (at most one per side) leftovers one by one.
              const Phase &c0 = cols[0], &c1 = cols[1];
              const T *s0 = src(0) - c0.first, *s1 = src(1) - c1.first;  // s_b[u]
              const int64_t e0 = c0.first + c0.out, e1 = c1.first + c1.out;
              const int64_t ulo = std::max(c0.first, c1.first), uhi = std::max(ulo, std::min(e0, e1));
              T* d = dr - g.pl;  // d[padded column]
              for (int64_t u = c0.first; u < std::min(ulo, e0); ++u) d[2 * u] = s0[u];
              for (int64_t u = std::max(uhi, c0.first); u < e0; ++u) d[2 * u] = s0[u];
              for (int64_t u = c1.first; u < std::min(ulo, e1); ++u) d[2 * u + 1] = s1[u];
              for (int64_t u = std::max(uhi, c1.first); u < e1; ++u) d[2 * u + 1] = s1[u];
              interleave2(s0 + ulo, s1 + ulo, uhi - ulo, d + 2 * ulo);
              continue;
            }
            for (int64_t b = 0; b < g.sw; ++b) {
              const Phase& pc = cols[b];
              if (pc.out == 0) continue;
              const T* sr = src(b);
              T* d = dr + pc.first * g.sw + pc.a - g.pl;
              for (int64_t j = 0; j < pc.out; ++j) d[j * g.sw] = sr[j];
            }
          }
      }
#if FASTATTN_DEPTHWISE_V4
      if constexpr (std::is_same_v<T, float>)
        if (stream) stream_copy_v4(local.data(), dx + (n * g.C + grp * g.Cg) * g.H * g.W, run);
#endif
    }
    if (stream) stream_fence();
  });
  return true;
}

// grad-input of a depthwise conv (one input channel per group) with stride 2 and no dilation,
// e.g. MobileNet's downsampling 3x3: one plane of dx at a time, from the group's Kg planes of gz
// copied into a zero-bordered buffer gzp (so no tap needs a bounds test). Padded input row
// y = 2m + a receives kernel rows a + 2i from gz rows m - i, and padded column 2v + b kernel
// columns b + 2j from gz columns v - j: per dx row, the two column phases are accumulated as
// unit-stride vector loops over v (acc0: even padded columns, acc1: odd), interleaved into a
// line and copied into the row. Everything but the dx plane stays in L1.
struct DwS2Layout {
  int64_t RO, CO;  // zero rows above / columns left of gz in gzp (ceil(R/2) - 1, ceil(S/2) - 1)
  int64_t MH, VW;  // gz rows / columns the padded input reaches: m < MH, v < VW
  int64_t HZ, WZ;  // gzp plane size
  int64_t v0;      // first gz column of a dx row (padded column pl is 2 v0 + pl % 2)
};
inline DwS2Layout dw_s2_layout(const Geom& g) {
  DwS2Layout l;
  l.RO = (g.R + 1) / 2 - 1; l.CO = (g.S + 1) / 2 - 1;
  l.MH = (g.pt + g.H - 1) / 2 + 1; l.VW = (g.pl + g.W - 1) / 2 + 1;
  l.HZ = l.MH + l.RO; l.WZ = l.VW + l.CO;
  l.v0 = g.pl / 2;
  return l;
}

template <typename T>
FASTATTN_INLINE void dw_s2_grad_input_plane_body(const Geom& g, const DwS2Layout& l, const T* gz, const T* w, T* gzp,
                                                 T* acc, T* dx) {
  const int64_t PQ = g.P * g.Q, RS = g.R * g.S, nv = l.VW - l.v0;
  std::fill(gzp, gzp + g.Kg * l.HZ * l.WZ, T(0));
  for (int64_t k = 0; k < g.Kg; ++k)
    for (int64_t m = 0; m < std::min(g.P, l.MH); ++m)
      std::copy(gz + k * PQ + m * g.Q, gz + k * PQ + m * g.Q + std::min(g.Q, l.VW),
                gzp + (k * l.HZ + m + l.RO) * l.WZ + l.CO);
  T* acc0 = acc;
  T* acc1 = acc + nv;
  T* line = acc + 2 * nv;  // padded columns [2 v0, 2 VW)
  for (int64_t h = 0; h < g.H; ++h) {
    const int64_t y = h + g.pt, a = y & 1, m = y >> 1;
    for (int64_t t = 0; t < 2 * nv; ++t) acc[t] = T(0);
    for (int64_t k = 0; k < g.Kg; ++k)
      for (int64_t r = a; r < g.R; r += 2) {
        const T* zr = gzp + (k * l.HZ + m - (r - a) / 2 + l.RO) * l.WZ + l.CO + l.v0;  // zr[t] = gz[m - i][v0 + t]
        const T* wr = w + k * RS + r * g.S;
        for (int64_t s = 0; s < g.S; ++s) {
          const T ws = wr[s];
          const T* z = zr - s / 2;  // column v - j, j = s / 2
          T* ac = (s & 1) ? acc1 : acc0;
#pragma omp simd
          for (int64_t t = 0; t < nv; ++t) ac[t] += ws * z[t];
        }
      }
    interleave2_body(acc0, acc1, nv, line);
    std::copy(line + g.pl % 2, line + g.pl % 2 + g.W, dx + h * g.W);
  }
}
FASTATTN_SIMD void dw_s2_grad_input_plane(const Geom& g, const DwS2Layout& l, const float* gz, const float* w,
                                          float* gzp, float* acc, float* dx) {
  dw_s2_grad_input_plane_body(g, l, gz, w, gzp, acc, dx);
}
FASTATTN_SIMD void dw_s2_grad_input_plane(const Geom& g, const DwS2Layout& l, const double* gz, const double* w,
                                          double* gzp, double* acc, double* dx) {
  dw_s2_grad_input_plane_body(g, l, gz, w, gzp, acc, dx);
}

template <typename T>
bool depthwise_s2_grad_input(const Geom& g, const T* gz, const T* w, T* dx) {
  if (g.Cg != 1 || g.sh != 2 || g.sw != 2 || g.dh != 1 || g.dw != 1) return false;
  const DwS2Layout l = dw_s2_layout(g);
  // dx planes that are too big for the cache: written to a local plane, streamed out (float, AVX-512).
  const int64_t HW = g.H * g.W;
#if FASTATTN_DEPTHWISE_V4
  static const bool avx512 = __builtin_cpu_supports("x86-64-v4");
  const bool stream = avx512 && std::is_same_v<T, float> && g.N * g.C * HW * int64_t(sizeof(T)) >= kStreamBytes;
#else
  const bool stream = false;
#endif
  at::parallel_for(0, g.N * g.C, grain(g.Kg * HW * g.R * g.S / 4), [&](int64_t begin, int64_t end) {
    std::vector<T> gzp(g.Kg * l.HZ * l.WZ), acc(4 * (l.VW - l.v0) + 1), local(stream ? HW : 0);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / g.C, c = plane % g.C;  // group c: output channels c Kg ... c Kg + Kg - 1
      T* d = stream ? local.data() : dx + plane * HW;
      dw_s2_grad_input_plane(g, l, gz + (n * g.K + c * g.Kg) * g.P * g.Q, w + c * g.Kg * g.R * g.S, gzp.data(),
                             acc.data(), d);
#if FASTATTN_DEPTHWISE_V4
      if constexpr (std::is_same_v<T, float>)
        if (stream) stream_copy_v4(local.data(), dx + plane * HW, HW);
#endif
    }
    if (stream) stream_fence();
  });
  return true;
}

template <typename T>
void grad_input_impl(const Geom& g, const T* gz, const T* w, T* dx) {
  if (grad_input_as_conv(g, gz, w, dx)) return;
  if (depthwise_s2_grad_input(g, gz, w, dx)) return;
  if (grad_input_by_phases(g, gz, w, dx)) return;
  const int64_t PQ = g.P * g.Q, HW = g.H * g.W;
  const bool few = g.Cg <= 4;  // few input channels per group: accumulate directly, else W^T * dY + col2im
  std::vector<T> wt;
  if (few) {  // [G][CRS][Kg]
    wt.resize(g.G * g.CRS * g.Kg);
    for (int64_t grp = 0; grp < g.G; ++grp)
      for (int64_t k = 0; k < g.Kg; ++k)
        for (int64_t i = 0; i < g.CRS; ++i) wt[(grp * g.CRS + i) * g.Kg + k] = w[(grp * g.Kg + k) * g.CRS + i];
  }
  at::parallel_for(0, g.N * g.G, grain(g.Kg * PQ * g.CRS), [&](int64_t begin, int64_t end) {
    std::vector<T> scratch;
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / g.G, grp = u % g.G;
      const T* gzg = gz + (n * g.K + grp * g.Kg) * PQ;
      T* dxg = dx + (n * g.C + grp * g.Cg) * HW;
      if (few) {
        const int64_t Hp = (g.P - 1) * g.sh + (g.R - 1) * g.dh + 1, Wp = (g.Q - 1) * g.sw + (g.S - 1) * g.dw + 1;
        scratch.assign(g.Cg * Hp * Wp, T(0));
        direct_grad_input(g, gzg, wt.data() + grp * g.CRS * g.Kg, scratch.data(), Hp, Wp);
        for (int64_t c = 0; c < g.Cg; ++c)
          for (int64_t h = 0; h < g.H; ++h)
            for (int64_t x = 0; x < g.W; ++x) {
              const int64_t hp = h + g.pt, xp = x + g.pl;
              dxg[(c * g.H + h) * g.W + x] = (hp < Hp && xp < Wp) ? scratch[(c * Hp + hp) * Wp + xp] : T(0);
            }
        continue;
      }
      const T* wg = w + grp * g.Kg * g.CRS;
      if (g.pointwise) {  // dx (Cg x HW) = Wg^T (Cg x Kg) * gz (Kg x HW)
        gemm('N', 'T', HW, g.Cg, g.Kg, T(1), gzg, PQ, wg, g.CRS, T(0), dxg, HW);
        continue;
      }
      std::fill(dxg, dxg + g.Cg * HW, T(0));
      scratch.resize(g.CRS * std::min(g.TM, PQ));
      for (int64_t m0 = 0; m0 < PQ; m0 += g.TM) {
        const int64_t mlen = std::min(g.TM, PQ - m0);
        // dcol (CRS x mlen) = Wg^T * gz[:, m0:m0+mlen]; column-major: dcol^T = gz^T * Wg.
        gemm('N', 'T', mlen, g.CRS, g.Kg, T(1), gzg + m0, PQ, wg, g.CRS, T(0), scratch.data(), mlen);
        col2im(g, dxg, m0, mlen, scratch.data());
      }
    }
  });
}

// grad_weight, direct (few channels per group and few outputs per group, e.g. depthwise): output
// channel k sums gz[n,k,p,q] * x[n,c,p*sh-pt+r*dh,q*sw-pl+s*dw] over n, p, q. Each image's input
// plane goes through the forward's phase-split padded buffer, so every tap reads whole vectors;
// one vector accumulator per tap, summed across lanes at the end.
template <typename T>
FASTATTN_INLINE void direct_grad_weight_body(const Geom& g, const DirectLayout& l, const T* x, const T* gz, int64_t k,
                                             T* dwk, T* xp, T* accbuf) {
  typedef T V __attribute__((vector_size(64)));
  constexpr int QV = 64 / sizeof(T);
  const int64_t grp = k / g.Kg, PQ = g.P * g.Q, qfull = g.Q / QV * QV;
  V* acc = reinterpret_cast<V*>(accbuf);  // [CRS] vectors, 64-byte aligned
  T* tail = accbuf + g.CRS * QV;          // [CRS] scalars for the last partial vector of each row
  for (int64_t i = 0; i < g.CRS; ++i) { acc[i] = V{}; tail[i] = T(0); }
  for (int64_t n = 0; n < g.N; ++n) {
    pad_rows(g, l, x + (n * g.C + grp * g.Cg) * g.H * g.W, -g.pt, xp);
    for (int64_t p = 0; p < g.P; ++p) {
      const T* z = gz + (n * g.K + k) * PQ + p * g.Q;
      for (int64_t c = 0; c < g.Cg; ++c)
        for (int64_t r = 0; r < g.R; ++r) {
          const T* row = xp + (c * l.HR + p * g.sh + r * g.dh) * l.ld_row;
          V* a = acc + (c * g.R + r) * g.S;
          T* ta = tail + (c * g.R + r) * g.S;
          for (int64_t s = 0; s < g.S; ++s) {
            const T* xs = row + l.tap[s];
            V sum = a[s];
            for (int64_t q0 = 0; q0 < qfull; q0 += QV) {
              V zv, xv;
              std::memcpy(&zv, z + q0, sizeof(V));
              std::memcpy(&xv, xs + q0, sizeof(V));
              sum += zv * xv;
            }
            a[s] = sum;
            T ts = T(0);
            for (int64_t q = qfull; q < g.Q; ++q) ts += z[q] * xs[q];
            ta[s] += ts;
          }
        }
    }
  }
  for (int64_t i = 0; i < g.CRS; ++i) {
    T v = tail[i];
    for (int j = 0; j < QV; ++j) v += acc[i][j];
    dwk[i] = v;
  }
}
FASTATTN_SIMD void direct_grad_weight(const Geom& g, const DirectLayout& l, const float* x, const float* gz, int64_t k,
                                      float* dwk, float* xp, float* acc) {
  direct_grad_weight_body(g, l, x, gz, k, dwk, xp, acc);
}
FASTATTN_SIMD void direct_grad_weight(const Geom& g, const DirectLayout& l, const double* x, const double* gz,
                                      int64_t k, double* dwk, double* xp, double* acc) {
  direct_grad_weight_body(g, l, x, gz, k, dwk, xp, acc);
}

#if FASTATTN_DEPTHWISE_V4
// grad_weight of a float depthwise 3x3 conv (one input channel and fewer than KB outputs per
// group: the planes are padded once per output channel) with stride 1 or 2, no dilation, on AVX-512: the
// 9 taps' sums stay in 9 vector registers over a whole (image, channel) plane. The plane goes
// through a phase-split padded buffer only as wide as the output (masked loads read exactly the
// Q valid lanes of a row's last vector, so neither a scalar tail nor wide zero margins). A block
// of NR output rows loads each dY vector once and each input vector once: input row ii of the
// block (column phase s % ST, offset s / ST for tap s) feeds output row j through kernel row
// ii - j ST, all known at compile time.
// One vector of columns (q0, lanes m: all 16 but in a row's last vector) of an NR-row block.
template <int ST, int NR>
inline __attribute__((always_inline, target("arch=x86-64-v4"))) void dw_gw3_vec(__m512 (&acc)[9], const float* xrow,
                                                                               int64_t ld_row, int64_t wps,
                                                                               const float* z, int64_t Q, __mmask16 m) {
  __m512 zv[NR];
#pragma GCC unroll 4
  for (int j = 0; j < NR; ++j) zv[j] = _mm512_maskz_loadu_ps(m, z + j * Q);
#pragma GCC unroll 16
  for (int ii = 0; ii < (NR - 1) * ST + 3; ++ii) {
    const float* row = xrow + ii * ld_row;
#pragma GCC unroll 3
    for (int s = 0; s < 3; ++s) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, row + (s % ST) * wps + s / ST);
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) {
        const int r = ii - j * ST;
        if (r >= 0 && r < 3) acc[r * 3 + s] = _mm512_fmadd_ps(zv[j], xv, acc[r * 3 + s]);
      }
    }
  }
}

template <int ST, int NR>
inline __attribute__((always_inline, target("arch=x86-64-v4"))) void dw_gw3_block(__m512 (&acc)[9], const float* xrow,
                                                                                 int64_t ld_row, int64_t wps,
                                                                                 const float* z, int64_t Q) {
  int64_t q0 = 0;
  for (; q0 + 16 <= Q; q0 += 16) dw_gw3_vec<ST, NR>(acc, xrow + q0, ld_row, wps, z + q0, Q, __mmask16(0xFFFF));
  if (q0 < Q) dw_gw3_vec<ST, NR>(acc, xrow + q0, ld_row, wps, z + q0, Q, __mmask16((1u << (Q - q0)) - 1));
}

// One plane: xp the padded buffer (P rows of output need (P - 1) ST + 3 rows), z the plane's dY
// [P][Q]; sums[9] += the plane's 9 tap sums (as vectors).
template <int ST>
__attribute__((noinline, target("arch=x86-64-v4"))) void dw_gw3_plane(const float* xp, int64_t ld_row, int64_t wps,
                                                                     const float* z, int64_t P, int64_t Q,
                                                                     float* sums) {
  constexpr int NR = 4;
  __m512 acc[9];
#pragma GCC unroll 9
  for (int i = 0; i < 9; ++i) acc[i] = _mm512_load_ps(sums + 16 * i);
  int64_t p = 0;
  for (; p + NR <= P; p += NR) dw_gw3_block<ST, NR>(acc, xp + p * ST * ld_row, ld_row, wps, z + p * Q, Q);
  for (; p < P; ++p) dw_gw3_block<ST, 1>(acc, xp + p * ST * ld_row, ld_row, wps, z + p * Q, Q);
#pragma GCC unroll 9
  for (int i = 0; i < 9; ++i) _mm512_store_ps(sums + 16 * i, acc[i]);
}

// pad_rows for stride 2 (one channel, rows from -pt): each input row splits into its two column
// phases in registers, 32 columns per step (two loads, two permutes, two stores; pad_rows' strided
// copy took ~3/4 of this grad-weight's time at MobileNet's 56x56). Input column 2m + e goes to
// padded column 2m + e + pl: phase (e + pl) % 2, index m + (e + pl) / 2.
__attribute__((target("arch=x86-64-v4"))) void dw_gw3_pad_s2(const Geom& g, const DirectLayout& l, const float* x,
                                                            float* xp) {
  std::fill(xp, xp + l.HR * l.ld_row, 0.0f);
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const int64_t offe = g.pl / 2, offo = (g.pl + 1) / 2;
  const int64_t ne = std::min((g.W + 1) / 2, l.WPs - offe), no = std::min(g.W / 2, l.WPs - offo);
  auto lanes = [](int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1); };
  for (int64_t i = 0; i < l.HR; ++i) {
    const int64_t ih = i - g.pt;
    if (ih < 0 || ih >= g.H) continue;
    const float* src = x + ih * g.W;
    float* row = xp + i * l.ld_row;
    float* pe = row + (g.pl % 2) * l.WPs + offe;
    float* po = row + ((g.pl + 1) % 2) * l.WPs + offo;
    for (int64_t m0 = 0; m0 < ne; m0 += 16) {
      const int64_t left = g.W - 2 * m0;
      const __m512 a = _mm512_maskz_loadu_ps(lanes(left), src + 2 * m0);
      const __m512 b = _mm512_maskz_loadu_ps(lanes(left - 16), src + 2 * m0 + 16);
      _mm512_mask_storeu_ps(pe + m0, lanes(ne - m0), _mm512_permutex2var_ps(a, even, b));
      _mm512_mask_storeu_ps(po + m0, lanes(no - m0), _mm512_permutex2var_ps(a, odd, b));
    }
  }
}

bool use_dw_gw3(const Geom& g) {
  static const bool avx512 = __builtin_cpu_supports("x86-64-v4");
  return avx512 && g.Cg == 1 && g.Kg < KB && g.R == 3 && g.S == 3 && g.sh == g.sw && g.sh <= 2 && g.dh == 1 &&
         g.dw == 1;
}

// Channels [k0, k1) over every image: image-major, so the input and dY planes are read in memory
// order (each channel's sums still add the images in order: deterministic); dw[k0 * 9 ...] the
// result. sums: [k1 - k0][9][16], 64-byte aligned.
void dw_gw3_channels(const Geom& g, const DirectLayout& l, const float* x, const float* gz, int64_t k0, int64_t k1,
                     float* dw, float* xp, float* sums) {
  const int64_t PQ = g.P * g.Q, HW = g.H * g.W;
  std::fill(sums, sums + (k1 - k0) * 9 * 16, 0.0f);
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t k = k0; k < k1; ++k) {
      const float* xn = x + (n * g.C + k / g.Kg) * HW;
      const float* z = gz + (n * g.K + k) * PQ;
      // The next unit's planes start coming from memory while this one computes (the hardware
      // prefetcher stops at each page; measured stride 2: 9.3 -> 7.5 ms on one core).
      const int64_t kn = k + 1 < k1 ? k + 1 : k0, nn = k + 1 < k1 ? n : n + 1;
      if (nn < g.N) {
        const char* xnext = reinterpret_cast<const char*>(x + (nn * g.C + kn / g.Kg) * HW);
        const char* znext = reinterpret_cast<const char*>(gz + (nn * g.K + kn) * PQ);
        for (int64_t i = 0; i < HW * int64_t(sizeof(float)); i += 64) __builtin_prefetch(xnext + i, 0, 3);
        for (int64_t i = 0; i < PQ * int64_t(sizeof(float)); i += 64) __builtin_prefetch(znext + i, 0, 3);
      }
      if (g.sh == 2) dw_gw3_pad_s2(g, l, xn, xp);
      else pad_rows(g, l, xn, -g.pt, xp);
      float* sk = sums + (k - k0) * 9 * 16;
      if (g.sh == 2) dw_gw3_plane<2>(xp, l.ld_row, l.WPs, z, g.P, g.Q, sk);
      else dw_gw3_plane<1>(xp, l.ld_row, l.WPs, z, g.P, g.Q, sk);
    }
  for (int64_t i = 0; i < (k1 - k0) * 9; ++i) {
    float v = 0.0f;
    for (int j = 0; j < 16; ++j) v += sums[16 * i + j];
    dw[k0 * 9 + i] = v;
  }
}
#endif  // FASTATTN_DEPTHWISE_V4

// grad_weight of a wide 3x3 layer (Kg a multiple of KW = 2 vectors, >= 8 input channels): the
// forward's channel-vector tile turned around. dW[k][c][r][s] = sum over pixels (n, p, q) of
// gz[n][k][p][q] * x[n][c][p*sh + r*dh - pt][q*sw + s*dw - pl]. A tile is KW output channels x the
// 9 taps of one input channel (18 accumulators); per output pixel it loads the 2 vectors of gz
// (gz's row transposed once to [Q][KW] per block of channels) and broadcasts the 9 input values
// from the forward's padded rows: 11 loads per 18 FMAs, no im2col, no BLAS. The accumulators live
// in a per-chunk partial dW ([Cg][Kg/KW][9][KW]) between bands of output rows (loaded and stored
// once per ~192 pixels). Images go in a fixed number of chunks, summed in chunk order (deterministic).
template <typename T>
bool use_wide_grad_weight(const Geom& g) {
  return g.R == 3 && g.S == 3 && g.Cg >= 8 && g.Kg % wide_kw<T>() == 0;
}

// Output rows [pa, pb): acc over their pixels for each input channel c and block of KW channels.
// gzt: gz of those rows as [Kg/KW][(pb - pa) * Q][KW]; dwp: the partial dW.
// Channel blocks [kb0, kb1) only (gzt holds all Kg/KW blocks).
template <typename T>
FASTATTN_INLINE void wide_grad_weight_rows_body(const Geom& g, const DirectLayout& l, const T* xp, const T* gzt,
                                                int64_t pa, int64_t pb, int64_t kb0, int64_t kb1, T* dwp) {
  typedef T V __attribute__((vector_size(64)));
  constexpr int QV = 64 / sizeof(T), KW = 2 * QV;
  const int64_t nkw = g.Kg / KW, t0 = l.tap[0], t1 = l.tap[1], t2 = l.tap[2], npix = (pb - pa) * g.Q;
  for (int64_t kb = kb0; kb < kb1; ++kb)  // the block's gz (<= ~24 KB) stays in L1 for every channel
    for (int64_t c = 0; c < g.Cg; ++c) {
      T* d = dwp + (c * nkw + kb) * 9 * KW;
      const T* z = gzt + kb * npix * KW;
      V acc[9][2];
#pragma GCC unroll 9
      for (int t = 0; t < 9; ++t) {
        std::memcpy(&acc[t][0], d + t * KW, sizeof(V));
        std::memcpy(&acc[t][1], d + t * KW + QV, sizeof(V));
      }
      for (int64_t p = pa; p < pb; ++p, z += g.Q * KW) {
        const T* row0 = xp + (c * l.HR + p * g.sh) * l.ld_row;
        const T* row1 = row0 + g.dh * l.ld_row;
        const T* row2 = row1 + g.dh * l.ld_row;
        const T* x[9] = {row0 + t0, row0 + t1, row0 + t2, row1 + t0, row1 + t1,
                         row1 + t2, row2 + t0, row2 + t1, row2 + t2};
        for (int64_t q = 0; q < g.Q; ++q) {
          V z0, z1;
          std::memcpy(&z0, z + q * KW, sizeof(V));
          std::memcpy(&z1, z + q * KW + QV, sizeof(V));
#pragma GCC unroll 9
          for (int t = 0; t < 9; ++t) {
            const T xv = x[t][q];
            acc[t][0] += z0 * xv;
            acc[t][1] += z1 * xv;
          }
        }
      }
#pragma GCC unroll 9
      for (int t = 0; t < 9; ++t) {
        std::memcpy(d + t * KW, &acc[t][0], sizeof(V));
        std::memcpy(d + t * KW + QV, &acc[t][1], sizeof(V));
      }
    }
}
FASTATTN_SIMD void wide_grad_weight_rows(const Geom& g, const DirectLayout& l, const float* xp, const float* gzt,
                                         int64_t pa, int64_t pb, int64_t kb0, int64_t kb1, float* dwp) {
  wide_grad_weight_rows_body(g, l, xp, gzt, pa, pb, kb0, kb1, dwp);
}
FASTATTN_SIMD void wide_grad_weight_rows(const Geom& g, const DirectLayout& l, const double* xp, const double* gzt,
                                         int64_t pa, int64_t pb, int64_t kb0, int64_t kb1, double* dwp) {
  wide_grad_weight_rows_body(g, l, xp, gzt, pa, pb, kb0, kb1, dwp);
}

template <typename T>
void wide_grad_weight_impl(const Geom& g, const T* x, const T* gz, T* dw) {
  constexpr int KW = wide_kw<T>();
  const int64_t PQ = g.P * g.Q, nkw = g.Kg / KW, part_size = g.Cg * g.Kg * 9;
  const DirectLayout l = direct_layout<T>(g, g.P);
  // Rows per band: ~192 pixels, so one block of KW channels of the band's gz fits in L1 (24 KB fp32).
  const int64_t band = std::max<int64_t>(1, std::min<int64_t>(g.P, 192 / g.Q));
  const int64_t nchunk = std::min<int64_t>(g.N, 8);
  // Few (chunk, group) units (small batches): also split the channel blocks between threads.
  const int64_t ksplit = nchunk * g.G >= 2 * at::get_num_threads() ? 1 : nkw;
  std::vector<T> part(nchunk * g.G * part_size, T(0));  // [chunk][G][Cg][Kg/KW][9][KW]
  at::parallel_for(0, nchunk * g.G * ksplit, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> xp(g.Cg * l.HR * l.ld_row), gzt(g.Kg * band * g.Q);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t u = item / ksplit, ch = u / g.G, grp = u % g.G;
      const int64_t kb0 = (item % ksplit) * nkw / ksplit, kb1 = (item % ksplit + 1) * nkw / ksplit;
      T* dwp = part.data() + u * part_size;
      for (int64_t n = ch * g.N / nchunk; n < (ch + 1) * g.N / nchunk; ++n) {
        pad_rows(g, l, x + (n * g.C + grp * g.Cg) * g.H * g.W, -g.pt, xp.data());
        const T* gzg = gz + (n * g.K + grp * g.Kg) * PQ;
        for (int64_t pa = 0; pa < g.P; pa += band) {
          const int64_t pb = std::min(g.P, pa + band), npix = (pb - pa) * g.Q;
          for (int64_t k = kb0 * KW; k < kb1 * KW; ++k) {  // gz rows [pa, pb) -> [Kg/KW][npix][KW]
            const T* src = gzg + k * PQ + pa * g.Q;
            T* dst = gzt.data() + (k / KW) * npix * KW + k % KW;
            for (int64_t i = 0; i < npix; ++i) dst[i * KW] = src[i];
          }
          wide_grad_weight_rows(g, l, xp.data(), gzt.data(), pa, pb, kb0, kb1, dwp);
        }
      }
    }
  });
  at::parallel_for(0, g.G * g.Kg, 1, [&](int64_t begin, int64_t end) {
    for (int64_t gk = begin; gk < end; ++gk) {
      const int64_t grp = gk / g.Kg, k = gk % g.Kg;
      for (int64_t c = 0; c < g.Cg; ++c)
        for (int t = 0; t < 9; ++t) {
          const int64_t i = ((c * nkw + k / KW) * 9 + t) * KW + k % KW;
          T s = T(0);
          for (int64_t ch = 0; ch < nchunk; ++ch) s += part[(ch * g.G + grp) * part_size + i];
          dw[(gk * g.Cg + c) * 9 + t] = s;
        }
    }
  });
}

template <typename T>
void grad_weight_impl(const Geom& g, const T* x, const T* gz, T* dw) {
  const int64_t PQ = g.P * g.Q, HW = g.H * g.W;
  if (use_wide_grad_weight<T>(g)) return wide_grad_weight_impl(g, x, gz, dw);
#if FASTATTN_DEPTHWISE_V4
  if constexpr (std::is_same_v<T, float>) {
    if (use_dw_gw3(g)) {
      // Tight layout: WPs = Q + 2 / sw + 1 columns per phase (taps read q + s / sw < WPs).
      DirectLayout l;
      l.HR = (g.P - 1) * g.sh + 3;
      l.WPs = g.Q + 2 / g.sw + 1;
      l.ld_row = g.sw * l.WPs;
      at::parallel_for(0, g.K, grain(g.N * PQ * 9), [&](int64_t begin, int64_t end) {
        constexpr int64_t KC = 64;  // channels per pass over the images (their sums: 36 KB)
        std::vector<float> xp(l.HR * l.ld_row), sums(KC * 9 * 16 + 16);
        float* sums_aligned =
            reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(sums.data()) + 63) & ~uintptr_t(63));
        for (int64_t k0 = begin; k0 < end; k0 += KC)
          dw_gw3_channels(g, l, x, gz, k0, std::min(end, k0 + KC), dw, xp.data(), sums_aligned);
      });
      return;
    }
  }
#endif
  if (g.Cg <= 4 && g.Kg < KB) {
    const DirectLayout l = direct_layout<T>(g, g.P);
    at::parallel_for(0, g.K, grain(g.N * PQ * g.CRS), [&](int64_t begin, int64_t end) {
      std::vector<T> xp(g.Cg * l.HR * l.ld_row);
      std::vector<T> acc(g.CRS * (64 / sizeof(T) + 1) + 64 / sizeof(T));
      T* acc_aligned = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(acc.data()) + 63) & ~uintptr_t(63));
      for (int64_t k = begin; k < end; ++k) direct_grad_weight(g, l, x, gz, k, dw + k * g.CRS, xp.data(), acc_aligned);
    });
    return;
  }
  // A fixed split of the images into chunks, one partial dW each, summed in chunk order: the
  // result does not depend on which thread ran which chunk.
  const int64_t nchunk = std::min<int64_t>(g.N, 8), wsize = g.K * g.CRS;
  std::vector<T> part(nchunk * wsize, T(0));
  at::parallel_for(0, nchunk, grain(g.N / nchunk * g.G * g.Kg * PQ * g.CRS), [&](int64_t begin, int64_t end) {
    std::vector<T> col;
    for (int64_t ch = begin; ch < end; ++ch) {
      T* dwp = part.data() + ch * wsize;
      for (int64_t n = ch * g.N / nchunk; n < (ch + 1) * g.N / nchunk; ++n)
        for (int64_t grp = 0; grp < g.G; ++grp) {
          const T* xg = x + (n * g.C + grp * g.Cg) * HW;
          const T* gzg = gz + (n * g.K + grp * g.Kg) * PQ;
          for (int64_t m0 = 0; m0 < PQ; m0 += g.TM) {
            const int64_t mlen = std::min(g.TM, PQ - m0);
            const T* c;
            int64_t ldc;
            if (g.pointwise) {
              c = xg + m0;
              ldc = HW;
            } else {
              col.resize(g.CRS * mlen);
              im2col(g, xg, m0, mlen, col.data());
              c = col.data();
              ldc = mlen;
            }
            // dWg (Kg x CRS) += gz (Kg x mlen) * col^T; column-major: dWg^T += col * gz^T.
            gemm('T', 'N', g.CRS, g.Kg, mlen, T(1), c, ldc, gzg + m0, PQ, T(1), dwp + grp * g.Kg * g.CRS, g.CRS);
          }
        }
    }
  });
  at::parallel_for(0, wsize, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T s = part[i];
      for (int64_t ch = 1; ch < nchunk; ++ch) s += part[ch * wsize + i];
      dw[i] = s;
    }
  });
}

template <typename T>
void grad_bias_impl(const Geom& g, const T* gz, T* db) {
  const int64_t PQ = g.P * g.Q;
  at::parallel_for(0, g.K, grain(g.N * PQ), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      T s = T(0);
      for (int64_t n = 0; n < g.N; ++n) {
        const T* z = gz + (n * g.K + k) * PQ;
        T t = T(0);
#pragma omp simd reduction(+ : t)
        for (int64_t i = 0; i < PQ; ++i) t += z[i];
        s += t;
      }
      db[k] = s;
    }
  });
}

// The three gradients from grad_z (the gradient at the pre-activation), all in the compute dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_from_gz(const Geom& g, const at::Tensor& input,
                                                                const at::Tensor& weight, const at::Tensor& gz,
                                                                at::IntArrayRef mask_arr) {
  const bool want_x = mask_arr[0], want_w = mask_arr[1], want_b = mask_arr[2];
  at::Tensor x = want_w ? compute_tensor(input) : at::Tensor();
  at::Tensor w = want_x ? compute_tensor(weight) : at::Tensor();
  auto opts = gz.options();
  at::Tensor dx = want_x ? empty_output({g.N, g.C, g.H, g.W}, opts) : at::empty({0}, opts);
  at::Tensor dw = want_w ? at::empty({g.K, g.Cg, g.R, g.S}, opts) : at::empty({0}, opts);
  at::Tensor db = want_b ? at::empty({g.K}, opts) : at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES(gz.scalar_type(), "conv2d_bwd", [&] {
    const scalar_t* z = gz.data_ptr<scalar_t>();
    if (want_x && dx.numel() > 0) {
      if (gz.numel() > 0) grad_input_impl<scalar_t>(g, z, w.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>());
      else dx.zero_();
    }
    if (want_w && dw.numel() > 0) {
      if (gz.numel() > 0) grad_weight_impl<scalar_t>(g, x.data_ptr<scalar_t>(), z, dw.data_ptr<scalar_t>());
      else dw.zero_();
    }
    if (want_b && db.numel() > 0) grad_bias_impl<scalar_t>(g, z, db.data_ptr<scalar_t>());
  });
  auto st = input.scalar_type();
  if (low_precision(input)) {
    if (want_x) dx = dx.to(st);
    if (want_w) dw = dw.to(st);
    if (want_b) db = db.to(st);
  }
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_bwd(const at::Tensor& grad_out, const at::Tensor& input,
                                                          const at::Tensor& weight, const c10::optional<at::Tensor>& saved,
                                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                                          at::IntArrayRef dilation, int64_t groups, int64_t activation,
                                                          std::array<bool, 3> output_mask) {
  check_common(input, weight, c10::nullopt);
  Geom g = make_geom(input, weight, stride, padding, dilation, groups);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == g.N && grad_out.size(1) == g.K && grad_out.size(2) == g.P &&
                  grad_out.size(3) == g.Q,
              "conv2d_bwd: grad_out must have shape (", g.N, ", ", g.K, ", ", g.P, ", ", g.Q, ")");
  at::Tensor go = compute_tensor(grad_out);
  at::Tensor gz = go;
  if (activation != kNone) {
    TORCH_CHECK(saved.has_value() && saved->defined() && saved->sizes() == grad_out.sizes(),
                "conv2d_bwd: an activation needs the saved output (relu) or pre-activation (gelu, silu)");
    at::Tensor sv = compute_tensor(*saved);
    gz = at::empty_like(go);
    AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "conv2d_act_bwd", [&] {
      const scalar_t* gp = go.data_ptr<scalar_t>();
      const scalar_t* sp = sv.data_ptr<scalar_t>();
      scalar_t* zp = gz.data_ptr<scalar_t>();
      at::parallel_for(0, go.numel(), 16384, [&](int64_t b, int64_t e) {
        act_backward(gp + b, sp + b, zp + b, e - b, activation);
      });
    });
  }
  std::array<int64_t, 3> mask{output_mask[0], output_mask[1], output_mask[2]};
  return backward_from_gz(g, input, weight, gz, mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_maxpool2d_bwd(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& out,
    const at::Tensor& indices, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, std::array<bool, 3> output_mask) {
  check_common(input, weight, c10::nullopt);
  Geom g = make_geom(input, weight, stride, padding, dilation, groups);
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.sizes() == grad_out.sizes() && out.sizes() == grad_out.sizes(),
              "conv2d_relu_maxpool2d_bwd: needs the forward's pooled output and indices (forward with save_indices=True)");
  at::Tensor go = compute_tensor(grad_out), o = compute_tensor(out), idx = indices.contiguous();
  // Scatter the pooled gradient to the argmax pixels; relu passes it where the max was > 0.
  at::Tensor gz = at::zeros({g.N, g.K, g.P, g.Q}, go.options());
  const int64_t PHW = grad_out.size(2) * grad_out.size(3), PQ = g.P * g.Q;
  AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "conv2d_relu_maxpool2d_bwd", [&] {
    const scalar_t* gp = go.data_ptr<scalar_t>();
    const scalar_t* op = o.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    scalar_t* zp = gz.data_ptr<scalar_t>();
    at::parallel_for(0, g.N * g.K, grain(PHW), [&](int64_t b, int64_t e) {
      for (int64_t plane = b; plane < e; ++plane)
        for (int64_t i = plane * PHW; i < (plane + 1) * PHW; ++i)
          if (op[i] > scalar_t(0)) zp[plane * PQ + ip[i]] += gp[i];
    });
  });
  std::array<int64_t, 3> mask{output_mask[0], output_mask[1], output_mask[2]};
  return backward_from_gz(g, input, weight, gz, mask);
}

}  // namespace conv2d_cpu
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("conv2d_fwd", &fastattn::conv2d_cpu::conv2d_fwd);
  m.impl("conv2d_bwd", &fastattn::conv2d_cpu::conv2d_bwd);
  m.impl("conv2d_relu_maxpool2d_fwd", &fastattn::conv2d_cpu::conv2d_relu_maxpool2d_fwd);
  m.impl("conv2d_relu_maxpool2d_bwd", &fastattn::conv2d_cpu::conv2d_relu_maxpool2d_bwd);
}
