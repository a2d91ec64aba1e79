// The fastattn extension: the op library and the `fastattn._C` Python module.
//
// Op schemas are the single source of truth for every backend. Each op family defines its
// schemas in a TORCH_LIBRARY_FRAGMENT at the top of its CPU file (csrc/cpu/<op>.cpp, always
// compiled), next to its CPU kernels; csrc/cuda/<op>.cu adds the CUDA kernels for the same names.
// This file opens the library and exposes build information through pybind11.
#include <torch/library.h>
#include <torch/version.h>
#ifndef FASTATTN_NO_PYTHON  // the CMake library for libtorch users has no Python module
#include <torch/extension.h>
#endif

#include <string>

#include "cpu/gemm.h"
#include "cpu/simd.h"

#ifndef FASTATTN_VERSION
#define FASTATTN_VERSION "unknown"
#endif
#ifndef FASTATTN_CUDA_ARCHS
#define FASTATTN_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(fastattn, m) {
  // Ops are defined in fragments next to their kernels (see above).
}

namespace {

bool compiled_with_cuda() {
#ifdef FASTATTN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
         std::to_string(__GNUC_PATCHLEVEL__);
#else
  return "unknown";
#endif
}

#ifndef FASTATTN_NO_PYTHON
// Test / benchmark hook for csrc/cpu/gemm.h: c (M, N) = act(alpha op(a) op(b) + beta c + bias) in place,
// on 2-D CPU float/double tensors with unit column stride (row strides are the leading dimensions).
std::tuple<at::Tensor, at::Tensor> gemm_hook(const at::Tensor& a, const at::Tensor& b, at::Tensor c, bool trans_a,
                                             bool trans_b, double alpha, double beta,
                                             const c10::optional<at::Tensor>& bias, int64_t act, bool with_pre,
                                             bool parallel) {
  const bool has_bias = bias.has_value() && bias->defined();
  for (const at::Tensor* t : {&a, &b, (const at::Tensor*)&c}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 2, "gemm: a, b, c must be 2-D CPU tensors");
    TORCH_CHECK(t->scalar_type() == c.scalar_type() && (c.scalar_type() == at::kFloat || c.scalar_type() == at::kDouble),
                "gemm: a, b, c must all be float32 or all float64");
    TORCH_CHECK(t->size(1) <= 1 || t->stride(1) == 1, "gemm: a, b, c need unit column stride (row-major rows)");
  }
  const int64_t M = c.size(0), N = c.size(1), K = trans_a ? a.size(0) : a.size(1);
  TORCH_CHECK((trans_a ? a.size(1) : a.size(0)) == M, "gemm: op(a) must have c's row count ", M);
  TORCH_CHECK((trans_b ? b.size(1) : b.size(0)) == K && (trans_b ? b.size(0) : b.size(1)) == N,
              "gemm: op(b) must be (", K, ", ", N, ")");
  TORCH_CHECK(!has_bias || (bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() &&
                            bias->scalar_type() == c.scalar_type()),
              "gemm: bias must be a contiguous (N,) tensor of c's dtype");
  TORCH_CHECK(act >= 0 && act <= 3, "gemm: act must be 0 (none), 1 (relu), 2 (gelu) or 3 (silu)");
  auto ld = [](const at::Tensor& t) { return std::max<int64_t>({t.stride(0), t.size(1), 1}); };
  at::Tensor pre_buf = with_pre ? at::empty({M, ld(c)}, c.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "gemm_hook", [&] {
    fastattn::cpu::GemmEpilogue<scalar_t> ep;
    ep.bias = has_bias ? bias->data_ptr<scalar_t>() : nullptr;
    ep.act = act;
    ep.pre = with_pre ? pre_buf.data_ptr<scalar_t>() : nullptr;
    fastattn::cpu::gemm<scalar_t>(trans_a, trans_b, M, N, K, (scalar_t)alpha, a.data_ptr<scalar_t>(), ld(a),
                                  b.data_ptr<scalar_t>(), ld(b), (scalar_t)beta, c.data_ptr<scalar_t>(), ld(c), ep,
                                  parallel);
  });
  return {c, with_pre ? pre_buf.narrow(1, 0, N) : at::empty({0}, c.options())};
}
#endif

}  // namespace

#ifndef FASTATTN_NO_PYTHON
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastattn native kernels (CPU, and CUDA when compiled)";
  m.def("version", [] { return std::string(FASTATTN_VERSION); });
  m.def("compiled_with_cuda", &compiled_with_cuda, "whether the CUDA kernels were compiled in");
  m.def("cuda_archs", [] { return std::string(FASTATTN_CUDA_ARCHS); },
        "the CUDA architectures the kernels were compiled for, ';'-separated");
  m.def("torch_version", [] { return std::string(TORCH_VERSION); }, "the torch the extension was built against");
  m.def("compiler", &compiler);
  m.def("cpu_isa", [] { return std::string(fastattn::simd::runtime_isa()); },
        "the ISA clone the CPU kernels run with on this machine");
  m.def("gemm_kernel", [] { return std::string(fastattn::cpu::gemm_kernel_name()); },
        "which kernel fastattn's CPU float GEMM (csrc/cpu/gemm.h) runs on this machine");
  m.def("gemm", &gemm_hook, "test/benchmark hook for csrc/cpu/gemm.h (not API): gemm(a, b, c, trans_a, trans_b, "
        "alpha, beta, bias, act, with_pre, parallel=True) -> (c, pre); c is written in place",
        py::arg("a"), py::arg("b"), py::arg("c"), py::arg("trans_a"), py::arg("trans_b"), py::arg("alpha"),
        py::arg("beta"), py::arg("bias"), py::arg("act"), py::arg("with_pre"), py::arg("parallel") = true);
#ifdef _OPENMP
  m.def("openmp", [] { return true; });
#else
  m.def("openmp", [] { return false; });
#endif
}
#endif  // FASTATTN_NO_PYTHON
