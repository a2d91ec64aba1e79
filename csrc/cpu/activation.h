// The fused epilogue activations of the CPU kernels (conv2d, linear): codes 0 none, 1 relu,
// 2 gelu (exact, erf), 3 silu, as in the ops' schemas. Vectorizable float versions (no libm
// call, so `#pragma omp simd` loops vectorize); double uses libm, exact for gradcheck.
//
// The *_body templates are for inlining into a kernel's own FASTATTN_SIMD tile code; the plain
// functions declared at the end are the same loops as standalone per-ISA clones (activation.cpp).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "simd.h"

namespace fastattn {
namespace act {

enum Activation : int64_t { kNone = 0, kRelu = 1, kGelu = 2, kSilu = 3 };

// Abramowitz & Stegun 7.1.26: erf(a) = 1 - p(t) exp(-a^2), t = 1 / (1 + 0.3275911 a), a >= 0, |error| < 1.5e-7.
FASTATTN_INLINE float erf_poly(float a) {
  float t = 1.0f / (1.0f + 0.3275911f * a);
  return ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
}
FASTATTN_INLINE float erf_f32(float x) {
  float ax = std::fabs(x);
  float y = 1.0f - erf_poly(ax) * simd::exp_f32(-ax * ax);
  return x < 0 ? -y : y;
}
FASTATTN_INLINE float gelu(float z) { return 0.5f * z * (1.0f + erf_f32(z * 0.70710678118654752f)); }
FASTATTN_INLINE double gelu(double z) { return 0.5 * z * (1.0 + std::erf(z * 0.70710678118654752)); }
FASTATTN_INLINE float silu(float z) { return z / (1.0f + simd::exp_f32(-z)); }
FASTATTN_INLINE double silu(double z) { return z / (1.0 + std::exp(-z)); }
FASTATTN_INLINE float gelu_grad(float z) {
  // cdf(z) + z pdf(z); erf(z/sqrt2) needs exp(-z^2/2), which is the pdf's exp too: one exp, not two.
  float e = simd::exp_f32(-0.5f * z * z);
  float erf_abs = 1.0f - erf_poly(std::fabs(z) * 0.70710678118654752f) * e;
  return 0.5f * (1.0f + (z < 0 ? -erf_abs : erf_abs)) + z * 0.39894228040143268f * e;
}
FASTATTN_INLINE double gelu_grad(double z) {
  double cdf = 0.5 * (1.0 + std::erf(z * 0.70710678118654752));
  return cdf + z * 0.39894228040143268 * std::exp(-0.5 * z * z);
}
FASTATTN_INLINE float silu_grad(float z) {
  float s = 1.0f / (1.0f + simd::exp_f32(-z));
  return s * (1.0f + z * (1.0f - s));
}
FASTATTN_INLINE double silu_grad(double z) {
  double s = 1.0 / (1.0 + std::exp(-z));
  return s * (1.0 + z * (1.0 - s));
}

// y[i] = act(src[i] + bias) (and pre[i] = src[i] + bias): the epilogue fused with the copy out of a tile.
template <typename T>
FASTATTN_INLINE void epilogue_copy_body(const T* src, T* y, T* pre, int64_t n, T bias, int64_t act) {
  if (pre) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) pre[i] = src[i] + bias;
  }
  switch (act) {
    case kRelu:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) { T v = src[i] + bias; y[i] = v > T(0) ? v : T(0); }
      break;
    case kGelu:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) y[i] = gelu(src[i] + bias);
      break;
    case kSilu:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) y[i] = silu(src[i] + bias);
      break;
    default:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) y[i] = src[i] + bias;
  }
}
// y[i] = act(y[i] + bias), keeping y[i] + bias in pre[i] when pre is given: the copy in place (each
// element is read before it is written at the same index, so src == y is safe).
template <typename T>
FASTATTN_INLINE void epilogue_body(T* y, T* pre, int64_t n, T bias, int64_t act) {
  epilogue_copy_body<T>(y, y, pre, n, bias, act);
}

// gz[i] = g[i] * act'(saved[i]) (saved: output for relu, pre-activation for gelu/silu).
template <typename T>
FASTATTN_INLINE void act_backward_body(const T* g, const T* saved, T* gz, int64_t n, int64_t act) {
  switch (act) {
    case kRelu:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) gz[i] = saved[i] > T(0) ? g[i] : T(0);
      break;
    case kGelu:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) gz[i] = g[i] * gelu_grad(saved[i]);
      break;
    case kSilu:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) gz[i] = g[i] * silu_grad(saved[i]);
      break;
    default:
      std::copy(g, g + n, gz);
  }
}

// y[i] = act(y[i] + bias) (pre[i] = y[i] + bias when pre is given).
void epilogue(float* y, float* pre, int64_t n, float bias, int64_t act);
void epilogue(double* y, double* pre, int64_t n, double bias, int64_t act);
// gz[i] = g[i] * act'(saved[i]) (saved: the output for relu, the pre-activation for gelu/silu).
void act_backward(const float* g, const float* saved, float* gz, int64_t n, int64_t act);
void act_backward(const double* g, const double* saved, double* gz, int64_t n, int64_t act);

}  // namespace act
}  // namespace fastattn
