// The Fortran BLAS GEMMs that libtorch_cpu exports (MKL or OpenBLAS, which pick their own kernels
// for the running CPU). Column-major; the CPU kernels call them on raw tile pointers, where an
// at::mm per tile would cost more in dispatch than the product itself.
#pragma once

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
}
