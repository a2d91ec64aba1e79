// Portable SIMD for the CPU kernels: per-ISA clones with runtime dispatch.
//
// A function marked FASTATTN_SIMD is compiled three times by GCC/Clang (x86-64-v4 = AVX-512,
// x86-64-v3 = AVX2+FMA, and the baseline); the loader picks the best one for the running CPU
// (an ifunc), so the wheel never dies with an illegal instruction on a CPU without AVX-512.
// Inside such a function write plain loops over raw pointers (with `#pragma omp simd`) and
// call the FASTATTN_INLINE helpers below; the compiler vectorizes them for each clone.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(FASTATTN_NO_CLONES)
#define FASTATTN_SIMD __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTATTN_SIMD
#endif
#define FASTATTN_INLINE inline __attribute__((always_inline))

namespace fastattn {
namespace simd {

// exp(x) for float, vectorizable (no libm call), ~2 ulp on [-86, 88]; exactly 0 below -86 (so exp(-inf)
// == 0, which masked scores rely on; and the clamped input never makes a denormal intermediate, whose
// microcode assists made masked rows slow) and +inf above 88.7.
FASTATTN_INLINE float exp_f32(float x) {
  const float hi = 88.3762626647949f, lo = -86.0f;
  float xc = x > hi ? hi : (x < lo ? lo : x);
  // exp(x) = 2^n * exp(r), r = x - n ln2, |r| <= ln2/2
  float n = std::nearbyint(xc * 1.44269504088896341f);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float y = p * scale;
  y = x < lo ? 0.0f : y;
  y = x > hi ? INFINITY : y;
  return y;
}

FASTATTN_INLINE double exp_f64(double x) { return std::exp(x); }

template <typename T>
FASTATTN_INLINE T exp_t(T x);
template <>
FASTATTN_INLINE float exp_t<float>(float x) { return exp_f32(x); }
template <>
FASTATTN_INLINE double exp_t<double>(double x) { return exp_f64(x); }

// The ISA the FASTATTN_SIMD clones run with on this CPU: "avx512", "avx2" or "baseline".
inline const char* runtime_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(FASTATTN_NO_CLONES)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "avx512 (x86-64-v4 clone)";
  if (__builtin_cpu_supports("x86-64-v3")) return "avx2 (x86-64-v3 clone)";
  return "baseline (x86-64 clone)";
#else
  return "baseline (no clones on this architecture)";
#endif
}

}  // namespace simd
}  // namespace fastattn
