// The activation loops of activation.h as standalone per-ISA clones (one copy for all kernels).
#include "activation.h"

namespace fastattn {
namespace act {

FASTATTN_SIMD void epilogue(float* y, float* pre, int64_t n, float bias, int64_t act) { epilogue_body(y, pre, n, bias, act); }
FASTATTN_SIMD void epilogue(double* y, double* pre, int64_t n, double bias, int64_t act) { epilogue_body(y, pre, n, bias, act); }
FASTATTN_SIMD void act_backward(const float* g, const float* s, float* gz, int64_t n, int64_t act) { act_backward_body(g, s, gz, n, act); }
FASTATTN_SIMD void act_backward(const double* g, const double* s, double* gz, int64_t n, int64_t act) { act_backward_body(g, s, gz, n, act); }

}  // namespace act
}  // namespace fastattn
