// Calls fastattn's ops through the PyTorch dispatcher from plain C++ (no Python), as a libtorch
// user would, and checks them against plain ATen math.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <tuple>

static int failures = 0, passes = 0;

static void expect(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "PASS" : "FAIL", what);
  if (ok) ++passes; else ++failures;
}

int main() {
  auto& dispatcher = c10::Dispatcher::singleton();
  auto schema = dispatcher.findSchema({"fastattn::attention_fwd", ""});
  expect(schema.has_value(), "fastattn::attention_fwd is registered");
  if (!schema) return 1;
  auto op = schema->typed<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double,
      double, int64_t, int64_t, int64_t, double, int64_t)>();

  at::manual_seed(0);
  const int64_t B = 2, H = 3, L = 37, S = 45, E = 32;
  auto opts = at::TensorOptions().dtype(at::kDouble);
  auto q = at::randn({B, H, L, E}, opts), k = at::randn({B, H, S, E}, opts), v = at::randn({B, H, S, E}, opts);
  const double scale = 1.0 / std::sqrt(double(E));

  for (int causal = 0; causal < 2; ++causal) {
    auto [out, lse] = op.call(q, k, v, std::nullopt, 0.0, scale, -1, causal ? 0 : -1, 0, 0.0, 0);
    auto scores = at::matmul(q, k.transpose(-1, -2)) * scale;
    if (causal) {
      auto keep = at::ones({L, S}, at::kBool).tril();
      scores = scores.masked_fill(keep.logical_not(), -std::numeric_limits<double>::infinity());
    }
    auto ref = at::matmul(at::softmax(scores, -1), v);
    auto ref_lse = at::logsumexp(scores, -1);
    double err = (out - ref).abs().max().item<double>();
    double err_lse = (lse - ref_lse).abs().max().item<double>();
    std::printf("  causal=%d max|out-ref|=%.3g max|lse-ref|=%.3g\n", causal, err, err_lse);
    expect(err < 1e-10 && err_lse < 1e-10, causal ? "causal attention matches ATen math" : "attention matches ATen math");
  }
  std::printf("%d passed, %d failed\n", passes, failures);
  return failures ? 1 : 0;
}
