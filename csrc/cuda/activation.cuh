// The fused epilogue activations of the CUDA kernels (conv2d, linear), on fp32 values; codes as in
// the ops' schemas: 0 none, 1 relu, 2 gelu (exact, erf), 3 silu.
#pragma once

namespace fastattn {
namespace cuda_act {

enum Activation : int { kNone = 0, kRelu = 1, kGelu = 2, kSilu = 3 };

__device__ __forceinline__ float activate(float z, int act) {
  switch (act) {
    case kRelu: return fmaxf(z, 0.f);
    case kGelu: return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
    case kSilu: return z / (1.f + __expf(-z));
    default: return z;
  }
}

// act'(z); z is the forward output for relu (out > 0 iff preact > 0), the pre-activation otherwise.
__device__ __forceinline__ float activate_grad(float z, int act) {
  switch (act) {
    case kRelu: return z > 0.f ? 1.f : 0.f;
    case kGelu: return 0.5f * (1.f + erff(z * 0.70710678118654752f)) + z * 0.39894228040143268f * __expf(-0.5f * z * z);
    case kSilu: { const float s = 1.f / (1.f + __expf(-z)); return s * (1.f + z * (1.f - s)); }
    default: return 1.f;
  }
}

}  // namespace cuda_act
}  // namespace fastattn
