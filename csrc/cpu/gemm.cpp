// gemm.h on the BLAS that libtorch_cpu exports (sgemm_/dgemm_), then the epilogue row by row.
#include "gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>

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

}  // namespace

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc, const GemmEpilogue<T>& ep, bool parallel) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0 || alpha == T(0)) {  // BLAS may skip C entirely here; do the scaling ourselves
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
  } else {
    blas(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  if (!ep.bias && ep.act == act::kNone && !ep.pre) return;
  auto rows = [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      T* c = C + i * ldc;
      T* pre = ep.pre ? ep.pre + i * ldc : nullptr;
      if (ep.bias) {
        for (int64_t j = 0; j < N; ++j) c[j] += ep.bias[j];
      }
      act::epilogue(c, pre, N, T(0), ep.act);
    }
  };
  if (parallel) {
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / N), rows);
  } else {
    rows(0, M);
  }
}

template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t,
                          float, float*, int64_t, const GemmEpilogue<float>&, bool);
template void gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t, const double*,
                           int64_t, double, double*, int64_t, const GemmEpilogue<double>&, bool);

const char* gemm_kernel_name() { return "blas (sgemm_/dgemm_ of libtorch_cpu)"; }

}  // namespace cpu
}  // namespace fastattn
