// Fully connected layer on the CPU: out = act(x @ w^T + b), forward and backward, on the
// row-major GEMM of gemm.h with the bias and activation fused into its epilogue.
//
// float and double run natively; float16/bfloat16 are widened to float (ATen's vectorized,
// parallel conversion), computed with float accumulation, and rounded once at the end.
//
// Strides: gemm reads a matrix row-major with a leading dimension, or as the transpose of a
// row-major matrix. So an input whose rows (or columns) are unit-stride is passed as it is (a
// sliced or transposed view costs no copy); anything else (expanded, doubly strided) is made
// contiguous first. Outputs are contiguous.
//
// Backward (gz = grad_out * act'(saved), the gradient at the pre-activation):
//   grad_input  (M x K) = gz (M x N) @ W (N x K)
//   grad_weight (N x K) = gz^T @ X          (gemm's trans_a: no transposed copy)
//   grad_bias   (N)     = column sums of gz (fixed row chunks x column blocks, partial sums added
//                                            in chunk order: deterministic for any thread count)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "activation.h"
#include "gemm.h"
#include "simd.h"

TORCH_LIBRARY_FRAGMENT(fastattn, m) {
  // input (M, K), weight (N, K), bias (N,) or None; out (M, N) = act(input @ weight^T + bias).
  // activation: 0 none, 1 relu, 2 gelu (exact, erf), 3 silu (conv2d's codes).
  // save_preact: also return the pre-activation (input @ weight^T + bias), which backward needs
  // for gelu/silu; the second output is empty unless save_preact and activation is 2 or 3.
  m.def("linear_fwd(Tensor input, Tensor weight, Tensor? bias, int activation, bool save_preact) "
        "-> (Tensor out, Tensor preact)");
  // saved: the forward output for relu, the pre-activation for gelu/silu, None for no activation.
  // output_mask: which of (grad_input, grad_weight, grad_bias) to compute; the others are empty.
  m.def("linear_bwd(Tensor grad_out, Tensor input, Tensor weight, Tensor? saved, int activation, "
        "bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
}

namespace fastattn {
namespace linear_cpu {

using cpu::GemmEpilogue;
using cpu::gemm;

// ------------------------------------------------------------------------------------------
// Operands: how gemm reads a 2-D tensor without a copy.
// ------------------------------------------------------------------------------------------
// A (rows x cols) matrix as gemm sees it: row-major with leading dimension ld (trans = false),
// or the transpose of a row-major (cols x rows) matrix with leading dimension ld (trans = true).
template <typename T>
struct Mat {
  const T* data;
  bool trans;
  int64_t ld;
};

// Whether t can be read in place; fills (trans, ld). The stride of a size-1 dimension does not matter.
bool strided_view(const at::Tensor& t, bool& trans, int64_t& ld) {
  const int64_t r = t.size(0), c = t.size(1);
  if (r == 0 || c == 0) {  // nothing is read
    trans = false, ld = std::max<int64_t>(c, 1);
    return true;
  }
  const int64_t s0 = r <= 1 ? std::max<int64_t>(c, 1) : t.stride(0);
  const int64_t s1 = c <= 1 ? std::max<int64_t>(r, 1) : t.stride(1);
  if ((c <= 1 || s1 == 1) && s0 >= std::max<int64_t>(c, 1)) {
    trans = false, ld = s0;
    return true;
  }
  if ((r <= 1 || s0 == 1) && s1 >= std::max<int64_t>(r, 1)) {
    trans = true, ld = s1;
    return true;
  }
  return false;
}

// t in the compute dtype (float for 16-bit, else its own) and in a layout gemm reads.
at::Tensor compute_operand(const at::Tensor& t) {
  const bool low = t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
  at::Tensor c = low ? t.to(at::kFloat) : t;
  bool trans;
  int64_t ld;
  return strided_view(c, trans, ld) ? c : c.contiguous();
}

template <typename T>
Mat<T> mat(const at::Tensor& t) {  // t from compute_operand
  Mat<T> m{t.data_ptr<T>(), false, 1};
  bool ok = strided_view(t, m.trans, m.ld);
  TORCH_INTERNAL_ASSERT(ok);
  return m;
}

bool low_precision(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}
at::Tensor compute_tensor(const at::Tensor& t) {  // contiguous, float for 16-bit input
  return (low_precision(t) ? t.to(at::kFloat) : t).contiguous();
}
at::Tensor round_to(const at::Tensor& t, at::ScalarType st) { return t.scalar_type() == st ? t : t.to(st); }

// ------------------------------------------------------------------------------------------
// Checks (the Python op checks first, with friendlier messages; these guard direct calls).
// ------------------------------------------------------------------------------------------
void check_common(const char* op, const at::Tensor& x, const at::Tensor& w, int64_t activation) {
  TORCH_CHECK(x.dim() == 2, op, ": input must be 2-D (M, K), got ", x.dim(), "-D");
  TORCH_CHECK(w.dim() == 2, op, ": weight must be 2-D (N, K), got ", w.dim(), "-D");
  TORCH_CHECK(x.size(1) == w.size(1), op, ": input has ", x.size(1), " features but weight (", w.size(0), ", ",
              w.size(1), ") expects ", w.size(1));
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), op, " (cpu): input and weight must be CPU tensors");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), op, ": input and weight must have one dtype, got ",
              x.scalar_type(), " and ", w.scalar_type());
  auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
              " (cpu): dtype must be float32, float64, bfloat16 or float16, got ", st);
  TORCH_CHECK(activation >= 0 && activation <= 3, op, ": activation must be 0 (none), 1 (relu), 2 (gelu) or 3 (silu), got ",
              activation);
}

// A (rows x cols) tensor of the same dtype and device as x.
void check_matrix(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, int64_t rows,
                  int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", name, " must have shape (", rows,
              ", ", cols, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device(), op, ": ", name,
              " must match input's dtype and device");
}

// ------------------------------------------------------------------------------------------
// Forward.
// ------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> linear_fwd(const at::Tensor& input, const at::Tensor& weight,
                                              const c10::optional<at::Tensor>& bias, int64_t activation,
                                              bool save_preact) {
  check_common("linear_fwd", input, weight, activation);
  const int64_t M = input.size(0), K = input.size(1), N = weight.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "linear_fwd: bias must have shape (", N, "), got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type() && bias->device().is_cpu(),
                "linear_fwd: bias must match input's dtype and device");
  }
  const bool keep_pre = save_preact && (activation == act::kGelu || activation == act::kSilu);
  at::Tensor x = compute_operand(input), w = compute_operand(weight);
  at::Tensor b = has_bias ? compute_tensor(*bias) : at::Tensor();
  at::Tensor out = at::empty({M, N}, x.options());
  at::Tensor pre = keep_pre ? at::empty({M, N}, x.options()) : at::empty({0}, x.options());
  if (M > 0 && N > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_fwd", [&] {
      Mat<scalar_t> A = mat<scalar_t>(x), B = mat<scalar_t>(w);
      GemmEpilogue<scalar_t> ep;
      ep.bias = has_bias ? b.data_ptr<scalar_t>() : nullptr;
      ep.act = activation;
      ep.pre = keep_pre ? pre.data_ptr<scalar_t>() : nullptr;
      // op(B) must be W^T (K x N): W row-major is the transpose of a stored N x K matrix.
      gemm<scalar_t>(A.trans, !B.trans, M, N, K, scalar_t(1), A.data, A.ld, B.data, B.ld, scalar_t(0),
                     out.data_ptr<scalar_t>(), N, ep);
    });
  }
  const auto st = input.scalar_type();
  return {round_to(out, st), round_to(pre, st)};
}

// ------------------------------------------------------------------------------------------
// Backward.
// ------------------------------------------------------------------------------------------
// db[j] = sum_i gz[i * ld + j]. Rows are cut into fixed chunks (not per thread), each chunk's
// column block summed with vector adds across the row, chunks added in order: the result does
// not depend on the thread count.
template <typename T>
FASTATTN_INLINE void column_sum_body(const T* gz, int64_t ld, int64_t r0, int64_t r1, int64_t c0, int64_t c1, T* acc) {
  const int64_t n = c1 - c0;
  for (int64_t j = 0; j < n; ++j) acc[j] = T(0);
  for (int64_t i = r0; i < r1; ++i) {
    const T* row = gz + i * ld + c0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) acc[j] += row[j];
  }
}
FASTATTN_SIMD void column_sum(const float* gz, int64_t ld, int64_t r0, int64_t r1, int64_t c0, int64_t c1, float* acc) {
  column_sum_body(gz, ld, r0, r1, c0, c1, acc);
}
FASTATTN_SIMD void column_sum(const double* gz, int64_t ld, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                              double* acc) {
  column_sum_body(gz, ld, r0, r1, c0, c1, acc);
}

template <typename T>
void grad_bias_impl(const T* gz, int64_t ld, int64_t M, int64_t N, T* db) {
  constexpr int64_t kRows = 512;  // rows per chunk (fixed: the sum order never depends on threads)
  constexpr int64_t kCols = 256;  // columns per block: the partial row stays in L1
  const int64_t nrc = std::max<int64_t>(1, (M + kRows - 1) / kRows), ncb = (N + kCols - 1) / kCols;
  std::vector<T> partial(nrc * N);
  at::parallel_for(0, nrc * ncb, std::max<int64_t>(1, 32768 / (kRows * kCols)), [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t rc = u / ncb, cb = u % ncb;
      const int64_t c0 = cb * kCols, c1 = std::min(N, c0 + kCols);
      column_sum(gz, ld, rc * kRows, std::min(M, (rc + 1) * kRows), c0, c1, partial.data() + rc * N + c0);
    }
  });
  for (int64_t j = 0; j < N; ++j) db[j] = partial[j];
  for (int64_t rc = 1; rc < nrc; ++rc) {
    const T* p = partial.data() + rc * N;
    for (int64_t j = 0; j < N; ++j) db[j] += p[j];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd(const at::Tensor& grad_out, const at::Tensor& input,
                                                          const at::Tensor& weight, const c10::optional<at::Tensor>& saved,
                                                          int64_t activation, std::array<bool, 3> output_mask) {
  check_common("linear_bwd", input, weight, activation);
  const int64_t M = input.size(0), K = input.size(1), N = weight.size(0);
  check_matrix("linear_bwd", "grad_out", grad_out, input, M, N);
  const bool want_x = output_mask[0], want_w = output_mask[1], want_b = output_mask[2];

  // gz: the gradient at the pre-activation, in the compute dtype.
  at::Tensor gz;
  if (activation == act::kNone) {
    gz = compute_operand(grad_out);
  } else {
    TORCH_CHECK(saved.has_value() && saved->defined() && saved->numel() == M * N,
                "linear_bwd: an activation needs saved = the forward output (relu) or the pre-activation (gelu, silu) "
                "of shape (", M, ", ", N, ")");
    check_matrix("linear_bwd", "saved", *saved, input, M, N);
    at::Tensor go = compute_tensor(grad_out), sv = compute_tensor(*saved);
    gz = at::empty({M, N}, go.options());
    AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "linear_act_bwd", [&] {
      const scalar_t* gp = go.data_ptr<scalar_t>();
      const scalar_t* sp = sv.data_ptr<scalar_t>();
      scalar_t* zp = gz.data_ptr<scalar_t>();
      at::parallel_for(0, M * N, 16384, [&](int64_t b, int64_t e) {
        act::act_backward(gp + b, sp + b, zp + b, e - b, activation);
      });
    });
  }

  at::Tensor x = want_w ? compute_operand(input) : at::Tensor();
  at::Tensor w = want_x ? compute_operand(weight) : at::Tensor();
  auto opts = gz.options();
  at::Tensor dx = want_x ? at::empty({M, K}, opts) : at::empty({0}, opts);
  at::Tensor dw = want_w ? at::empty({N, K}, opts) : at::empty({0}, opts);
  at::Tensor db = want_b ? at::empty({N}, opts) : at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES(gz.scalar_type(), "linear_bwd", [&] {
    using T = scalar_t;
    Mat<T> Z = mat<T>(gz);
    // grad_input (M x K) = gz (M x N) @ W (N x K); N == 0 gives zeros (gemm with an empty sum).
    if (want_x && M > 0 && K > 0) {
      Mat<T> W = mat<T>(w);
      gemm<T>(Z.trans, W.trans, M, K, N, T(1), Z.data, Z.ld, W.data, W.ld, T(0), dx.data_ptr<T>(), K);
    }
    // grad_weight (N x K) = gz^T (N x M) @ X (M x K): gz read transposed in place; M == 0 gives zeros.
    if (want_w && N > 0 && K > 0) {
      Mat<T> X = mat<T>(x);
      gemm<T>(!Z.trans, X.trans, N, K, M, T(1), Z.data, Z.ld, X.data, X.ld, T(0), dw.data_ptr<T>(), K);
    }
    if (want_b && N > 0) {
      if (M == 0) {
        db.zero_();
      } else if (Z.trans) {  // a column-major grad_out (rare): sum its contiguous copy
        at::Tensor zc = gz.contiguous();
        grad_bias_impl<T>(zc.data_ptr<T>(), N, M, N, db.data_ptr<T>());
      } else {
        grad_bias_impl<T>(Z.data, Z.ld, M, N, db.data_ptr<T>());
      }
    }
  });
  const auto st = input.scalar_type();
  return {round_to(dx, st), round_to(dw, st), round_to(db, st)};
}

// ------------------------------------------------------------------------------------------
// Autograd of linear_fwd, in C++: a model calls this op for every projection, and torch.library's
// Python autograd wrapper cost ~10-20 µs per call on top (a third of a small layer's time).
// Device-generic: it redispatches to the CPU or CUDA kernels of linear_fwd / linear_bwd.
// ------------------------------------------------------------------------------------------
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct LinearFunction : public torch::autograd::Function<LinearFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                               const c10::optional<at::Tensor>& b, int64_t activation, bool save_preact) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastattn::linear_fwd", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const c10::optional<at::Tensor>&, int64_t, bool)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, pre] = op.call(x, w, b, activation, save_preact);
    // act' needs the output for relu, the pre-activation for gelu/silu, nothing without an activation.
    at::Tensor saved = activation == act::kRelu ? out : (activation == act::kNone ? at::Tensor() : pre);
    ctx->save_for_backward({x, w, saved});
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["has_bias"] = b.has_value() && b->defined();
    ctx->mark_non_differentiable({pre});  // an internal of the backward, not a result to differentiate
    return {out, pre};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastattn::linear_bwd", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const c10::optional<at::Tensor>&, int64_t, std::array<bool, 3>)>();
    auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &w = s[1], &saved = s[2];
    const int64_t activation = ctx->saved_data["activation"].toInt();
    const at::Tensor grad_out = grads[0].defined() ? grads[0].contiguous()
                                                   : at::zeros_symint({x.sym_size(0), w.sym_size(0)}, x.options());
    // Differentiating this backward (create_graph=True) would treat linear_bwd as a constant and give
    // wrong second-order gradients: refuse, as the Python backends do.
    TORCH_CHECK_NOT_IMPLEMENTED(
        !(at::GradMode::is_enabled() && (grad_out.requires_grad() || x.requires_grad() || w.requires_grad())),
        "fastattn linear: double backward (create_graph=True) is not supported; use backend='reference' for "
        "higher-order gradients");
    TORCH_CHECK(activation == act::kNone || activation == act::kRelu || saved.sym_numel() == grad_out.sym_numel(),
                "fastattn linear: backward through gelu/silu needs the forward run with save_preact=True");
    std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)};
    c10::optional<at::Tensor> sv;
    if (saved.defined()) sv = saved;
    auto [dx, dw, db] = op.call(grad_out, x, w, sv, activation, mask);
    return {mask[0] ? dx : at::Tensor(), mask[1] ? dw : at::Tensor(), mask[2] ? db : at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> linear_fwd_autograd(const at::Tensor& x, const at::Tensor& w,
                                                       const c10::optional<at::Tensor>& b, int64_t activation,
                                                       bool save_preact) {
  auto o = LinearFunction::apply(x, w, b, activation, save_preact);
  return {o[0], o[1]};
}

}  // namespace linear_cpu
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, Autograd, m) {
  m.impl("linear_fwd", &fastattn::linear_cpu::linear_fwd_autograd);
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("linear_fwd", &fastattn::linear_cpu::linear_fwd);
  m.impl("linear_bwd", &fastattn::linear_cpu::linear_bwd);
}
