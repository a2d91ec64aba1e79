// Fused multi-tensor SGD and Adam/AdamW steps on the CPU.
//
// One call updates every parameter of a list in one pass: each element of the parameter,
// its gradient and its optimizer state is read once and written once.
//
// Work split: all tensors are cut into fixed-size chunks (CHUNK elements) and the flat chunk
// list goes to at::parallel_for, so a list of many small tensors and a list of a few big
// ones both keep every thread busy. Inside a chunk the math runs over tiles of TILE elements
// in FASTATTN_SIMD loops (per-ISA clones): float16/bfloat16 tiles are converted to float32
// scratch first (all math in float32, one rounding back per element), float32/float64
// tensors are updated in place.
//
// Bit-exactness with torch.optim.*(foreach=False): every line below mirrors one tensor op of
// torch's `_single_tensor_sgd` / `_single_tensor_adam` in the same order and with the same
// roundings that ATen's CPU kernels use (measured, see tests/test_optim.py):
//   a.add(b, alpha=s)        -> fma(s, b, a)
//   a.mul_(s)                -> a * s                       (s rounded to the tensor's dtype)
//   a.lerp_(b, w)            -> |w| < 0.5 ? fma(w, b - a, a) : fma(-(b - a), 1 - w, b)
//   a.addcmul_(b, c, value=s)-> fma(s * b, c, a)
//   a.addcdiv_(b, c, value=s)-> a + (s * b) / c
//   a.sqrt()                 -> torch's CPU sqrt is MKL's vsSqrt, which is not the correctly rounded
//                               IEEE sqrt; with FASTATTN_OPTIM_SQRT=torch we call it too (bit-exact,
//                               slower), by default std::sqrt (1 ulp off in some elements)
// The file is compiled without floating-point contraction so that only the fma() calls fuse.
#pragma GCC optimize("fp-contract=off")

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/simd.h"

TORCH_LIBRARY_FRAGMENT(fastattn, m) {
  // params[i] -= lr * d_i with SGD's momentum / dampening / nesterov / weight decay; the
  // momentum buffer of tensor i is initialised from its gradient when new_buffers[i] is true
  // (torch's first step) and updated otherwise. momentum_buffers and new_buffers are empty when
  // momentum == 0. grads are unscaled in place when grad_scale is given (like torch's fused
  // optimizers); nothing changes when found_inf != 0. lr_tensor, when given, replaces lr.
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, "
      "bool[] new_buffers, float lr, float momentum, float dampening, float weight_decay, "
      "bool nesterov, bool maximize, Tensor? lr_tensor=None, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor(d!)[]? master_params=None) -> ()");
  // One Adam (decoupled_weight_decay=False) or AdamW (True) step; state_steps[i] (a 1-element
  // float tensor) is incremented first, then drives the bias corrections. max_exp_avg_sqs is
  // empty unless amsgrad. Unscaling, skipping and lr_tensor as for sgd_step_ (a skipped step
  // leaves state_steps unchanged too).
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, bool amsgrad, "
      "bool maximize, bool decoupled_weight_decay, Tensor? lr_tensor=None, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor(g!)[]? master_params=None) -> ()");
  // master_params (both ops): fp32 master weights of float16/bfloat16 params. When given (one per
  // param), the step reads master_params[i] instead of params[i], keeps the optimizer state
  // (momentum_buffers / exp_avgs / exp_avg_sqs / max_exp_avg_sqs) in float32, updates the master
  // in float32 and writes its rounded value to params[i] in the same pass; grads keep the
  // params' dtype.
}

namespace fastattn {
namespace optim_cpu {

constexpr int64_t CHUNK = 32768;  // elements per parallel work item
constexpr int64_t TILE = 1024;    // elements per inner tile (scratch buffers stay in L1)

struct Chunk {
  int64_t tensor, begin, end;
};

std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t)
    for (int64_t b = 0; b < numels[t]; b += CHUNK) chunks.push_back({t, b, std::min(numels[t], b + CHUNK)});
  return chunks;
}

// ------------------------------------------------------------------------------------------
// sqrt as torch's CPU kernel computes it (MKL VML when present, looked up once at run time).
// ------------------------------------------------------------------------------------------
using vml_sqrt_f32 = void (*)(const int* n, const float* a, float* r);
using vml_sqrt_f64 = void (*)(const int* n, const double* a, double* r);

struct VmlSqrt {
  vml_sqrt_f32 f32 = nullptr;
  vml_sqrt_f64 f64 = nullptr;
  VmlSqrt() {
    void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    if (lib == nullptr) return;
    f32 = reinterpret_cast<vml_sqrt_f32>(dlsym(lib, "VSSQRT_"));
    f64 = reinterpret_cast<vml_sqrt_f64>(dlsym(lib, "VDSQRT_"));
  }
};

const VmlSqrt& vml() {
  static VmlSqrt v;
  return v;
}

template <typename T>
FASTATTN_SIMD void sqrt_ieee(T* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = std::sqrt(x[i]);
}

// FASTATTN_OPTIM_SQRT=torch: Adam's sqrt through MKL as torch's CPU sqrt does, so float32 results
// are bit-identical to torch.optim.Adam(foreach=False); about 2x slower (MKL's high-accuracy sqrt
// costs as much as the rest of the step). Default: the correctly rounded sqrt (vsqrtps), which
// differs from MKL's by 1 ulp in some elements (as torch's own fused=True Adam does).
bool torch_sqrt_requested() {
  const char* mode = std::getenv("FASTATTN_OPTIM_SQRT");
  return mode != nullptr && std::string(mode) == "torch";
}

void sqrt_tile(float* x, int64_t n, bool like_torch) {
  int ni = static_cast<int>(n);
  if (like_torch && vml().f32) vml().f32(&ni, x, x); else sqrt_ieee(x, n);
}
void sqrt_tile(double* x, int64_t n, bool like_torch) {
  int ni = static_cast<int>(n);
  if (like_torch && vml().f64) vml().f64(&ni, x, x); else sqrt_ieee(x, n);
}

// ------------------------------------------------------------------------------------------
// float16 / bfloat16 <-> float32 tile conversion.
// ------------------------------------------------------------------------------------------
template <typename S>
FASTATTN_SIMD void load_tile(const S* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <typename S>
FASTATTN_SIMD void store_tile(const float* __restrict src, S* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(src[i]);
}

// ------------------------------------------------------------------------------------------
// SGD
// ------------------------------------------------------------------------------------------
template <typename T>
struct SgdArgs {
  T neg_lr, momentum, one_minus_dampening, weight_decay, inv_scale_div;  // inv_scale_div: grad / this
  bool has_momentum, nesterov, maximize, has_weight_decay, unscale, new_buffer;
};

// grad /= grad_scale, in place (torch's fused optimizers leave the gradients unscaled too). A
// separate pass keeps the update loops free of conditional stores, so they vectorize.
template <typename T>
FASTATTN_SIMD void unscale_tile(T* __restrict g, int64_t n, T scale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) g[i] = g[i] / scale;
}

// One tile: p, g, b are float32/float64 arrays of n elements (b unused without momentum).
template <typename T>
FASTATTN_SIMD void sgd_tile(T* __restrict p, const T* __restrict g, T* __restrict b, int64_t n, SgdArgs<T> a) {
  if (a.has_momentum && a.new_buffer) {  // first step: the buffer is the gradient (never read)
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      T gi = a.maximize ? -g[i] : g[i];
      gi = a.has_weight_decay ? std::fma(a.weight_decay, p[i], gi) : gi;
      b[i] = gi;                                                        // buf = grad.clone()
      T d = a.nesterov ? std::fma(a.momentum, gi, gi) : gi;
      p[i] = std::fma(a.neg_lr, d, p[i]);
    }
  } else if (a.has_momentum) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      T gi = a.maximize ? -g[i] : g[i];                                 // -grad
      gi = a.has_weight_decay ? std::fma(a.weight_decay, p[i], gi) : gi;  // grad.add(param, alpha=wd)
      T bi = std::fma(a.one_minus_dampening, gi, b[i] * a.momentum);   // buf.mul_(m).add_(g, alpha=1-d)
      b[i] = bi;
      T d = a.nesterov ? std::fma(a.momentum, bi, gi) : bi;             // grad.add(buf, alpha=m) or buf
      p[i] = std::fma(a.neg_lr, d, p[i]);                               // param.add_(d, alpha=-lr)
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      T gi = a.maximize ? -g[i] : g[i];
      gi = a.has_weight_decay ? std::fma(a.weight_decay, p[i], gi) : gi;
      p[i] = std::fma(a.neg_lr, gi, p[i]);
    }
  }
}

template <typename S, typename T>
void sgd_range(S* p, S* g, S* b, int64_t n, const SgdArgs<T>& a) {
  if constexpr (std::is_same_v<S, T>) {
    if (a.unscale) unscale_tile<T>(g, n, a.inv_scale_div);
    sgd_tile<T>(p, g, b, n, a);
  } else {
    float tp[TILE], tg[TILE], tb[TILE];
    for (int64_t s = 0; s < n; s += TILE) {
      int64_t m = std::min(TILE, n - s);
      load_tile(p + s, tp, m);
      load_tile(g + s, tg, m);
      if (a.has_momentum && !a.new_buffer) load_tile(b + s, tb, m);
      if (a.unscale) unscale_tile<float>(tg, m, a.inv_scale_div);
      sgd_tile<float>(tp, tg, tb, m, a);
      store_tile(tp, p + s, m);
      if (a.unscale) store_tile(tg, g + s, m);
      if (a.has_momentum) store_tile(tb, b + s, m);
    }
  }
}

// Master weights: the float32 master and buffer are updated in place, the float16/bfloat16
// gradient goes through a float32 tile, the rounded master is written to the param.
template <typename S>
void sgd_range_master(float* master, S* p, S* g, float* b, int64_t n, const SgdArgs<float>& a) {
  float tg[TILE];
  for (int64_t s = 0; s < n; s += TILE) {
    int64_t m = std::min(TILE, n - s);
    load_tile(g + s, tg, m);
    if (a.unscale) {
      unscale_tile<float>(tg, m, a.inv_scale_div);
      store_tile(tg, g + s, m);
    }
    sgd_tile<float>(master + s, tg, b ? b + s : nullptr, m, a);
    store_tile(master + s, p + s, m);
  }
}

// ------------------------------------------------------------------------------------------
// Adam / AdamW
// ------------------------------------------------------------------------------------------
template <typename T>
struct AdamArgs {
  T lerp_w, one_minus_lerp_w, beta2, one_minus_beta2, weight_decay, eps, inv_scale_div;  // grad / inv_scale_div
  T bias_correction2_sqrt, neg_step_size, decay;  // per tensor (depend on its step)
  bool amsgrad, maximize, l2_decay, decoupled_decay, unscale, torch_sqrt;
};

// Pass 1 over a tile: gradient, first and second moments; writes the value whose sqrt is the
// denominator (exp_avg_sq or max_exp_avg_sq) into `den`.
template <typename T>
FASTATTN_SIMD void adam_moments(const T* __restrict p, const T* __restrict g, T* __restrict m, T* __restrict v,
                                T* __restrict vmax, T* __restrict den, int64_t n, AdamArgs<T> a) {
  const bool low_weight = std::abs(a.lerp_w) < T(0.5);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    T gi = a.maximize ? -g[i] : g[i];
    gi = a.l2_decay ? std::fma(a.weight_decay, p[i], gi) : gi;  // grad.add(param, alpha=wd)
    T diff = gi - m[i];                                          // exp_avg.lerp_(grad, 1-beta1)
    T mi = low_weight ? std::fma(a.lerp_w, diff, m[i]) : std::fma(-diff, a.one_minus_lerp_w, gi);
    m[i] = mi;
    T vi = std::fma(a.one_minus_beta2 * gi, gi, v[i] * a.beta2);  // exp_avg_sq.mul_(b2).addcmul_(g, g, 1-b2)
    v[i] = vi;
    den[i] = vi;
  }
  if (a.amsgrad) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {  // torch.maximum: NaN wins
      T x = vmax[i], y = den[i];
      T mx = x > y ? x : y;
      mx = (x != x) ? x : mx;
      mx = (y != y) ? y : mx;
      vmax[i] = mx;
      den[i] = mx;
    }
  }
}

// Pass 2: the parameter update; den holds sqrt(v) (TAKE_SQRT = false: the sqrt came from MKL) or
// v (TAKE_SQRT = true: the IEEE sqrt is taken here).
template <typename T, bool TAKE_SQRT>
FASTATTN_SIMD void adam_update(T* __restrict p, const T* __restrict m, const T* __restrict den, int64_t n,
                               AdamArgs<T> a) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    T s = TAKE_SQRT ? std::sqrt(den[i]) : den[i];
    T d = s / a.bias_correction2_sqrt + a.eps;          // (sqrt(v) / bc2_sqrt).add_(eps)
    T pi = a.decoupled_decay ? p[i] * a.decay : p[i];  // param.mul_(1 - lr*wd)
    p[i] = pi + (a.neg_step_size * m[i]) / d;          // param.addcdiv_(m, d, value=-step_size)
  }
}

template <typename S, typename T>
void adam_range(S* p, S* g, S* m, S* v, S* vmax, int64_t n, const AdamArgs<T>& a) {
  T den[TILE];
  if constexpr (std::is_same_v<S, T>) {
    for (int64_t s = 0; s < n; s += TILE) {
      int64_t k = std::min(TILE, n - s);
      if (a.unscale) unscale_tile<T>(g + s, k, a.inv_scale_div);
      adam_moments<T>(p + s, g + s, m + s, v + s, a.amsgrad ? vmax + s : nullptr, den, k, a);
      if (a.torch_sqrt) {
        sqrt_tile(den, k, true);
        adam_update<T, false>(p + s, m + s, den, k, a);
      } else {
        adam_update<T, true>(p + s, m + s, den, k, a);
      }
    }
  } else {
    float tp[TILE], tg[TILE], tm[TILE], tv[TILE], tx[TILE];
    for (int64_t s = 0; s < n; s += TILE) {
      int64_t k = std::min(TILE, n - s);
      load_tile(p + s, tp, k);
      load_tile(g + s, tg, k);
      load_tile(m + s, tm, k);
      load_tile(v + s, tv, k);
      if (a.amsgrad) load_tile(vmax + s, tx, k);
      if (a.unscale) unscale_tile<float>(tg, k, a.inv_scale_div);
      adam_moments<float>(tp, tg, tm, tv, tx, den, k, a);
      if (a.torch_sqrt) {
        sqrt_tile(den, k, true);
        adam_update<float, false>(tp, tm, den, k, a);
      } else {
        adam_update<float, true>(tp, tm, den, k, a);
      }
      store_tile(tp, p + s, k);
      if (a.unscale) store_tile(tg, g + s, k);
      store_tile(tm, m + s, k);
      store_tile(tv, v + s, k);
      if (a.amsgrad) store_tile(tx, vmax + s, k);
    }
  }
}

template <typename S>
void adam_range_master(float* master, S* p, S* g, float* m, float* v, float* vmax, int64_t n,
                       const AdamArgs<float>& a) {
  float tg[TILE], den[TILE];
  for (int64_t s = 0; s < n; s += TILE) {
    int64_t k = std::min(TILE, n - s);
    load_tile(g + s, tg, k);
    if (a.unscale) {
      unscale_tile<float>(tg, k, a.inv_scale_div);
      store_tile(tg, g + s, k);
    }
    adam_moments<float>(master + s, tg, m + s, v + s, a.amsgrad ? vmax + s : nullptr, den, k, a);
    if (a.torch_sqrt) {
      sqrt_tile(den, k, true);
      adam_update<float, false>(master + s, m + s, den, k, a);
    } else {
      adam_update<float, true>(master + s, m + s, den, k, a);
    }
    store_tile(master + s, p + s, k);
  }
}

// ------------------------------------------------------------------------------------------
// Host side: checks, scalars, chunk list, dispatch.
// ------------------------------------------------------------------------------------------
// other[i] has params[i]'s shape and device, and its dtype (or `dtype` when given: float32 state
// and masters of float16/bfloat16 params).
void check_list(const at::TensorList& params, const at::TensorList& other, const char* name,
                std::optional<at::ScalarType> dtype = std::nullopt) {
  TORCH_CHECK(other.size() == params.size(), "fastattn optimizer step: ", name, " has ", other.size(),
              " tensors, params has ", params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    const auto& t = other[i];
    TORCH_CHECK(t.device() == p.device(), "fastattn optimizer step: ", name, "[", i, "] is on ", t.device(),
                ", params[", i, "] on ", p.device());
    const at::ScalarType want = dtype.value_or(p.scalar_type());
    TORCH_CHECK(t.scalar_type() == want, "fastattn optimizer step: ", name, "[", i, "] has dtype ",
                t.scalar_type(), ", expected ", want);
    TORCH_CHECK(t.sizes() == p.sizes(), "fastattn optimizer step: ", name, "[", i, "] has shape ", t.sizes(),
                ", expected params[", i, "]'s ", p.sizes());
    TORCH_CHECK(t.is_contiguous(), "fastattn optimizer step: ", name, "[", i, "] must be contiguous");
  }
}

void check_params(const at::TensorList& params) {
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    TORCH_CHECK(p.device().is_cpu(), "fastattn optimizer step (CPU): params[", i, "] is on ", p.device());
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble || p.scalar_type() == at::kHalf ||
                    p.scalar_type() == at::kBFloat16,
                "fastattn optimizer step: params[", i, "] must be float32, float64, float16 or bfloat16, got ",
                p.scalar_type());
    TORCH_CHECK(p.is_contiguous(), "fastattn optimizer step: params[", i, "] must be contiguous");
  }
}

double scalar_value(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1, "fastattn optimizer step: ", name, " must have one element, got ", t.numel());
  return t.item<double>();
}

// True when found_inf says the step must be skipped.
bool skip_step(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && scalar_value(*found_inf, "found_inf") != 0.0;
}

// With master weights every param is float16/bfloat16 and its master and state are float32.
void check_master(const at::TensorList& params, const at::TensorList& masters) {
  check_list(params, masters, "master_params", at::kFloat);
  for (size_t i = 0; i < params.size(); ++i)
    TORCH_CHECK(params[i].scalar_type() == at::kHalf || params[i].scalar_type() == at::kBFloat16,
                "fastattn optimizer step: with master_params, params[", i, "] must be float16 or bfloat16, got ",
                params[i].scalar_type());
}

std::vector<int64_t> numels_of(const at::TensorList& params) {
  std::vector<int64_t> n;
  for (const auto& p : params) n.push_back(p.numel());
  return n;
}

// Chunks in parallel; a call with little work in all runs on the calling thread (waking the
// thread pool costs more than updating a few thousand elements).
template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, const F& f) {
  int64_t total = 0;
  for (const auto& c : chunks) total += c.end - c.begin;
  if (total < 2 * CHUNK) {
    for (const auto& c : chunks) f(c);
    return;
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) f(chunks[c]);
  });
}

void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  const c10::List<bool>& new_buffers, double lr, double momentum, double dampening,
                  double weight_decay, bool nesterov, bool maximize, const std::optional<at::Tensor>& lr_tensor,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                  std::optional<at::TensorList> master_params) {
  check_params(params);
  check_list(params, grads, "grads");
  const bool master = master_params.has_value();
  if (master) check_master(params, *master_params);
  const auto state_dtype = master ? std::optional<at::ScalarType>(at::kFloat) : std::nullopt;
  const bool has_momentum = momentum != 0.0;
  if (has_momentum) {
    check_list(params, momentum_buffers, "momentum_buffers", state_dtype);
    TORCH_CHECK(new_buffers.size() == params.size(), "fastattn.sgd_step_: new_buffers has ", new_buffers.size(),
                " entries, params has ", params.size());
  }
  if (skip_step(found_inf)) return;
  if (lr_tensor.has_value()) lr = scalar_value(*lr_tensor, "lr_tensor");
  std::vector<char> is_new(params.size(), 0);
  for (size_t i = 0; has_momentum && i < params.size(); ++i) is_new[i] = new_buffers.get(i);
  const double scale = grad_scale.has_value() ? scalar_value(*grad_scale, "grad_scale") : 1.0;

  auto args_for = [&](auto zero, bool new_buffer) {
    using T = decltype(zero);
    SgdArgs<T> a;
    a.neg_lr = static_cast<T>(-lr);
    a.momentum = static_cast<T>(momentum);
    a.one_minus_dampening = static_cast<T>(1.0 - dampening);
    a.weight_decay = static_cast<T>(weight_decay);
    a.inv_scale_div = static_cast<T>(static_cast<float>(scale));
    a.has_momentum = has_momentum;
    a.nesterov = nesterov;
    a.maximize = maximize;
    a.has_weight_decay = weight_decay != 0.0;
    a.unscale = grad_scale.has_value();
    a.new_buffer = new_buffer;
    return a;
  };
  for_each_chunk(make_chunks(numels_of(params)), [&](const Chunk& c) {
    const at::Tensor& p = params[c.tensor];
    const bool new_buffer = has_momentum && is_new[c.tensor];
    const int64_t n = c.end - c.begin;
    if (master) {
      AT_DISPATCH_REDUCED_FLOATING_TYPES(p.scalar_type(), "sgd_step_master", [&] {
        float* bp = has_momentum ? momentum_buffers[c.tensor].data_ptr<float>() + c.begin : nullptr;
        sgd_range_master<scalar_t>((*master_params)[c.tensor].data_ptr<float>() + c.begin,
                                   p.data_ptr<scalar_t>() + c.begin, grads[c.tensor].data_ptr<scalar_t>() + c.begin,
                                   bp, n, args_for(0.0f, new_buffer));
      });
      return;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "sgd_step_", [&] {
      using T = at::opmath_type<scalar_t>;
      scalar_t* bp = has_momentum ? momentum_buffers[c.tensor].data_ptr<scalar_t>() + c.begin : nullptr;
      sgd_range<scalar_t, T>(p.data_ptr<scalar_t>() + c.begin, grads[c.tensor].data_ptr<scalar_t>() + c.begin, bp,
                             n, args_for(T(0), new_buffer));
    });
  });
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr, double beta1,
                   double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                   bool decoupled_weight_decay, const std::optional<at::Tensor>& lr_tensor,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                   std::optional<at::TensorList> master_params) {
  check_params(params);
  check_list(params, grads, "grads");
  const bool master = master_params.has_value();
  if (master) check_master(params, *master_params);
  const auto state_dtype = master ? std::optional<at::ScalarType>(at::kFloat) : std::nullopt;
  check_list(params, exp_avgs, "exp_avgs", state_dtype);
  check_list(params, exp_avg_sqs, "exp_avg_sqs", state_dtype);
  if (amsgrad) check_list(params, max_exp_avg_sqs, "max_exp_avg_sqs", state_dtype);
  TORCH_CHECK(state_steps.size() == params.size(), "fastattn.adam_step_: state_steps has ", state_steps.size(),
              " tensors, params has ", params.size());
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const auto& s = state_steps[i];
    TORCH_CHECK(s.device().is_cpu() && s.numel() == 1 &&
                    (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
                "fastattn.adam_step_: state_steps[", i, "] must be a 1-element float32/float64 CPU tensor");
  }
  if (skip_step(found_inf)) return;
  const double scale = grad_scale.has_value() ? scalar_value(*grad_scale, "grad_scale") : 1.0;
  const bool tensor_lr = lr_tensor.has_value();
  const bool torch_sqrt = torch_sqrt_requested();
  if (tensor_lr) lr = scalar_value(*lr_tensor, "lr_tensor");

  // Per tensor: step += 1, then the scalars torch derives from it in Python (double) math.
  struct PerTensor {
    double bc2_sqrt, neg_step_size, decay;
  };
  std::vector<PerTensor> per(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& st = state_steps[i];
    double step;
    if (st.scalar_type() == at::kFloat) {
      float* s = st.data_ptr<float>();
      *s += 1.0f;
      step = *s;
    } else {
      double* s = st.data_ptr<double>();
      *s += 1.0;
      step = *s;
    }
    const double bc1 = 1.0 - std::pow(beta1, step);
    const double bc2 = 1.0 - std::pow(beta2, step);
    PerTensor& t = per[i];
    t.bc2_sqrt = std::pow(bc2, 0.5);  // Python's `bias_correction2 ** 0.5`
    if (tensor_lr) {                   // torch computes these as float32 tensor ops
      t.neg_step_size = -static_cast<double>(static_cast<float>(lr) / static_cast<float>(bc1));
      t.decay = static_cast<float>(1.0f - static_cast<float>(static_cast<float>(lr) * static_cast<float>(weight_decay)));
    } else {
      t.neg_step_size = -(lr / bc1);
      t.decay = 1.0 - lr * weight_decay;
    }
  }

  auto args_for = [&](auto zero, const PerTensor& t) {
    using T = decltype(zero);
    AdamArgs<T> a;
    a.lerp_w = static_cast<T>(1.0 - beta1);
    a.one_minus_lerp_w = T(1) - a.lerp_w;
    a.beta2 = static_cast<T>(beta2);
    a.one_minus_beta2 = static_cast<T>(1.0 - beta2);
    a.weight_decay = static_cast<T>(weight_decay);
    a.eps = static_cast<T>(eps);
    a.inv_scale_div = static_cast<T>(static_cast<float>(scale));
    a.bias_correction2_sqrt = static_cast<T>(t.bc2_sqrt);
    a.neg_step_size = static_cast<T>(t.neg_step_size);
    a.decay = static_cast<T>(t.decay);
    a.amsgrad = amsgrad;
    a.maximize = maximize;
    a.l2_decay = weight_decay != 0.0 && !decoupled_weight_decay;
    a.decoupled_decay = weight_decay != 0.0 && decoupled_weight_decay;
    a.unscale = grad_scale.has_value();
    a.torch_sqrt = torch_sqrt;
    return a;
  };
  for_each_chunk(make_chunks(numels_of(params)), [&](const Chunk& c) {
    const at::Tensor& p = params[c.tensor];
    const int64_t b = c.begin, n = c.end - c.begin;
    if (master) {
      AT_DISPATCH_REDUCED_FLOATING_TYPES(p.scalar_type(), "adam_step_master", [&] {
        float* vmax = amsgrad ? max_exp_avg_sqs[c.tensor].data_ptr<float>() + b : nullptr;
        adam_range_master<scalar_t>((*master_params)[c.tensor].data_ptr<float>() + b, p.data_ptr<scalar_t>() + b,
                                    grads[c.tensor].data_ptr<scalar_t>() + b,
                                    exp_avgs[c.tensor].data_ptr<float>() + b,
                                    exp_avg_sqs[c.tensor].data_ptr<float>() + b, vmax, n,
                                    args_for(0.0f, per[c.tensor]));
      });
      return;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "adam_step_", [&] {
      using T = at::opmath_type<scalar_t>;
      scalar_t* vmax = amsgrad ? max_exp_avg_sqs[c.tensor].data_ptr<scalar_t>() + b : nullptr;
      adam_range<scalar_t, T>(p.data_ptr<scalar_t>() + b, grads[c.tensor].data_ptr<scalar_t>() + b,
                              exp_avgs[c.tensor].data_ptr<scalar_t>() + b,
                              exp_avg_sqs[c.tensor].data_ptr<scalar_t>() + b, vmax, n,
                              args_for(T(0), per[c.tensor]));
    });
  });
}

}  // namespace optim_cpu
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("sgd_step_", &fastattn::optim_cpu::sgd_step_cpu);
  m.impl("adam_step_", &fastattn::optim_cpu::adam_step_cpu);
}
