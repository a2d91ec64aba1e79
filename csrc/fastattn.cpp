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
#ifdef _OPENMP
  m.def("openmp", [] { return true; });
#else
  m.def("openmp", [] { return false; });
#endif
}
#endif  // FASTATTN_NO_PYTHON
