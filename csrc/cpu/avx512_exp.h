// exp on 16 floats for the CPU kernels' explicit AVX-512 paths (attention's softmax rows, the LSTM's
// fused gates). Include only where x86-64 intrinsics exist; callers are target("avx512f") functions
// chosen at run time.
#pragma once

#include <immintrin.h>

#include <cmath>

namespace fastattn {
namespace avx512 {

// simd::exp_f32's range reduction and polynomial, 16 lanes at once; 0 below -86 (not -87.34: near
// -87 the scaling step makes denormals, which cost a microcode assist each, and every masked (-inf)
// attention score went through there; e^-86 ~ 4e-38), +inf above 88.38, NaN stays NaN.
__attribute__((target("avx512f"), always_inline)) inline __m512 exp16(__m512 x) {
  const __m512 hi = _mm512_set1_ps(88.3762626647949f), lo = _mm512_set1_ps(-86.0f);
  const __m512 xc = _mm512_min_ps(hi, _mm512_max_ps(lo, x));  // max/min return x when it is NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  __m512 y = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
  y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), _mm512_setzero_ps());
  return _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, hi, _CMP_GT_OQ), _mm512_set1_ps(INFINITY));
}

}  // namespace avx512
}  // namespace fastattn
