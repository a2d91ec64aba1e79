// Row-major GEMM for the CPU kernels, with an optional fused bias + activation epilogue:
//
//     C (M x N) = act(alpha * op(A) * op(B) + beta * C + bias[n])
//
// op(A) is A (M x K, leading dimension lda) or, when trans_a, the transpose of a stored K x M
// matrix; op(B) is B (K x N) or, when trans_b, the transpose of a stored N x K matrix (so a
// torch Linear is gemm(false, true, ...) with B = weight). The activation codes are activation.h's;
// when `pre` is given, the value before the activation is stored there too (leading dimension ldc).
//
// parallel = true splits the product over at::parallel_for's threads; pass false from inside a
// parallel region (each caller thread then runs its own product on one thread; inside a parallel
// region the product runs on the calling thread either way).
//
// Semantics as BLAS's: beta == 0 never reads C (it may hold NaN garbage); alpha == 0 or K == 0
// reads neither A nor B; leading dimensions may exceed the widths (sub-matrix views). `pre` must
// not overlap C. Safe to call from several threads at once.
//
// Kernels (gemm_kernel_name()): float on CPUs with AVX-512 runs gemm.cpp's packed, cache-blocked
// kernel (14 x 32 register tiles; about twice MKL's sgemm on AMD Zen 5, where MKL takes a slow
// path), with thin products (M or N <= 4, or <= 16 for x @ w^T-like ones) unpacked; it keeps
// per-thread packing buffers between calls (<= ~4 MB per calling thread, ~170 KB per worker). double, and float
// without AVX-512, call the BLAS that libtorch_cpu exports (sgemm_/dgemm_), then the epilogue.
#pragma once
#include <cstdint>

namespace fastattn {
namespace cpu {

template <typename T>
struct GemmEpilogue {
  const T* bias = nullptr;  // N values, added to every row
  int64_t act = 0;          // activation.h's codes
  T* pre = nullptr;         // optional M x N copy of the pre-activation (leading dimension ldc)
};

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc, const GemmEpilogue<T>& epilogue = GemmEpilogue<T>(),
          bool parallel = true);

extern template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                                 int64_t, float, float*, int64_t, const GemmEpilogue<float>&, bool);
extern template void gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t,
                                  const double*, int64_t, double, double*, int64_t, const GemmEpilogue<double>&,
                                  bool);

// Which kernel gemm<float> runs on this CPU (for build info and benchmark notes).
const char* gemm_kernel_name();

}  // namespace cpu
}  // namespace fastattn
