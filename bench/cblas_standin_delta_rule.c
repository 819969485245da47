/* A plain, slow but complete stand-in for the three CBLAS calls hla_lib makes (sgemm, dgemm,
 * sgemv), built as libopenblas.so.0 for the device machine, which has no OpenBLAS package: the
 * CUDA tests' CPU references then run through it (correct results, naive loops). Never shipped.
 * bench/carry_delta_rule.sh builds it. */
#include <stddef.h>

enum { RowMajor = 101, ColMajor = 102, NoTrans = 111 };

#define GEMM(NAME, T)                                                                                  \
  void NAME(int order, int ta, int tb, int M, int N, int K, T alpha, const T* A, int lda, const T* B, \
            int ldb, T beta, T* C, int ldc) {                                                          \
    if (order == ColMajor) { /* C^T = op(B)^T op(A)^T in row-major terms */                            \
      NAME(RowMajor, tb, ta, N, M, K, alpha, B, ldb, A, lda, beta, C, ldc);                            \
      return;                                                                                          \
    }                                                                                                  \
    for (int i = 0; i < M; ++i)                                                                        \
      for (int j = 0; j < N; ++j) {                                                                    \
        T acc = 0;                                                                                     \
        for (int k = 0; k < K; ++k) {                                                                  \
          const T a = ta == NoTrans ? A[(size_t)i * lda + k] : A[(size_t)k * lda + i];                 \
          const T b = tb == NoTrans ? B[(size_t)k * ldb + j] : B[(size_t)j * ldb + k];                 \
          acc += a * b;                                                                                \
        }                                                                                              \
        T* c = &C[(size_t)i * ldc + j];                                                                \
        *c = beta == 0 ? alpha * acc : alpha * acc + beta * *c;                                        \
      }                                                                                                \
  }
GEMM(cblas_sgemm, float)
GEMM(cblas_dgemm, double)

void cblas_sgemv(int order, int trans, int M, int N, float alpha, const float* A, int lda, const float* X,
                 int incX, float beta, float* Y, int incY) {
  /* y = alpha op(A) x + beta y; A is M x N in `order`. */
  const int t = (order == RowMajor) == (trans == NoTrans); /* 1: rows of op(A) are contiguous */
  const int rows = trans == NoTrans ? M : N, cols = trans == NoTrans ? N : M;
  for (int i = 0; i < rows; ++i) {
    float acc = 0;
    for (int k = 0; k < cols; ++k) acc += (t ? A[(size_t)i * lda + k] : A[(size_t)k * lda + i]) * X[(size_t)k * incX];
    float* y = &Y[(size_t)i * incY];
    *y = beta == 0 ? alpha * acc : alpha * acc + beta * *y;
  }
}
