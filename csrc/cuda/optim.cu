// Fused multi-tensor SGD and Adam/AdamW steps on the GPU (schemas: csrc/cpu/optim.cpp).
//
// Multi-tensor apply, written out:
//   * every tensor is cut into chunks of kChunk elements; one thread block updates one chunk;
//   * a launch carries, by value in its kernel arguments (< 4 KB), the addresses of up to
//     kMaxTensors tensors of each list, their sizes (and Adam's step pointers), plus a
//     block -> (tensor, chunk) map for up to kMaxBlocks blocks;
//   * the host fills that struct tensor by tensor and launches whenever the tensor slots or the
//     block slots run out, carrying a half-done tensor over into the next launch.
// Inside a block each thread handles kILP consecutive elements per iteration, with one vector
// load/store per list when every address of the chunk is aligned to kILP elements.
//
// Master weights (master_params given): the lists carry one more address, the float32 master; the
// kernel (MASTER = true) reads the master instead of the float16/bfloat16 param, keeps the state in
// float32, and stores the updated master and its rounded value to the param in the same pass.
//
// found_inf, grad_scale and a tensor lr are read on the device (no host synchronisation): a
// found inf/NaN makes every block return before touching memory. Adam's steps are incremented by
// a small second kernel after all blocks have read them. Math in float32 with explicitly rounded
// intrinsics (so --use_fast_math cannot change it), in the order of torch's single-tensor step.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <type_traits>
#include <vector>

namespace fastattn {
namespace optim_cuda {

constexpr int kChunk = 65536;        // elements per block
constexpr int kThreads = 512;
constexpr int kILP = 4;              // elements per thread per iteration
constexpr int kMaxBlocks = 320;      // blocks per launch
template <int DEPTH>
struct MaxTensors {};                // tensor slots per launch, so that the struct stays < 4 KB
template <> struct MaxTensors<4> { static constexpr int value = 48; };  // SGD: param, grad, buffer, master
template <> struct MaxTensors<6> { static constexpr int value = 36; };  // Adam: + exp_avg, exp_avg_sq, max


template <int DEPTH>
struct TensorListArgs {
  static constexpr int kMaxTensors = MaxTensors<DEPTH>::value;
  void* addresses[DEPTH][kMaxTensors];
  int64_t sizes[kMaxTensors];
  float* steps[kMaxTensors];          // Adam: the tensor's step (read only here)
  unsigned char flags[kMaxTensors];   // SGD: the momentum buffer is new (first step)
  unsigned char block_to_tensor[kMaxBlocks];
  int block_to_chunk[kMaxBlocks];
};
static_assert(sizeof(TensorListArgs<4>) <= 3968, "kernel arguments must stay below 4 KB (with Hyper)");
static_assert(sizeof(TensorListArgs<6>) <= 3968, "kernel arguments must stay below 4 KB (with Hyper)");

// Scalars shared by every tensor of a call; pointers are device scalars or nullptr.
struct Hyper {
  float lr, momentum, one_minus_dampening, weight_decay;  // SGD
  double lr_d, beta1, beta2, eps, weight_decay_d;         // Adam
  const float* lr_ptr;
  const float* grad_scale;
  const float* found_inf;
  bool has_momentum, nesterov, maximize, l2_decay, decoupled_decay, amsgrad;
};

// ---------------------------------------------------------------------------------------------
// Per-element math (torch's op order; __f*_rn = one IEEE rounding each, no contraction).
// ---------------------------------------------------------------------------------------------
struct SgdScalars {
  float neg_lr, momentum, one_minus_dampening, weight_decay, grad_scale;
  bool new_buffer;
};

__device__ __forceinline__ void sgd_math(float& p, float& g, float& b, const SgdScalars& s, const Hyper& h) {
  if (h.grad_scale) g = __fdiv_rn(g, s.grad_scale);
  float d = h.maximize ? -g : g;
  if (s.weight_decay != 0.f) d = __fmaf_rn(s.weight_decay, p, d);               // grad.add(p, alpha=wd)
  if (h.has_momentum) {
    b = s.new_buffer ? d : __fmaf_rn(s.one_minus_dampening, d, __fmul_rn(b, s.momentum));
    d = h.nesterov ? __fmaf_rn(s.momentum, b, d) : b;
  }
  p = __fmaf_rn(s.neg_lr, d, p);                                                 // p.add_(d, alpha=-lr)
}

struct AdamScalars {
  float lerp_w, one_minus_lerp_w, beta2, one_minus_beta2, weight_decay, eps, grad_scale;
  float bias_correction2_sqrt, neg_step_size, decay;
};

__device__ __forceinline__ void adam_math(float& p, float& g, float& m, float& v, float& vmax,
                                          const AdamScalars& s, const Hyper& h) {
  if (h.grad_scale) g = __fdiv_rn(g, s.grad_scale);
  float d = h.maximize ? -g : g;
  if (h.l2_decay) d = __fmaf_rn(s.weight_decay, p, d);
  float diff = __fsub_rn(d, m);                                                  // m.lerp_(d, 1 - beta1)
  m = fabsf(s.lerp_w) < 0.5f ? __fmaf_rn(s.lerp_w, diff, m) : __fmaf_rn(-diff, s.one_minus_lerp_w, d);
  v = __fmaf_rn(__fmul_rn(s.one_minus_beta2, d), d, __fmul_rn(v, s.beta2));     // v.mul_(b2).addcmul_(d, d, 1-b2)
  float den = v;
  if (h.amsgrad) {
    vmax = (isnan(vmax) || vmax > v) ? vmax : v;                                 // torch.maximum (NaN wins)
    den = vmax;
  }
  den = __fadd_rn(__fdiv_rn(__fsqrt_rn(den), s.bias_correction2_sqrt), s.eps);
  if (h.decoupled_decay) p = __fmul_rn(p, s.decay);
  p = __fadd_rn(p, __fdiv_rn(__fmul_rn(s.neg_step_size, m), den));              // p.addcdiv_(m, den, -step)
}

// ---------------------------------------------------------------------------------------------
// Chunk loops: vector loads when aligned, else element by element.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct alignas(sizeof(T) * kILP) Pack {
  T v[kILP];
};

template <typename T>
__device__ __forceinline__ bool aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kILP) == 0;
}

// One list's kILP elements at i (zeros past len) into float registers, and back.
template <typename T>
__device__ __forceinline__ void load(float (&r)[kILP], const T* ptr, int64_t i, int64_t len, bool vec) {
  if (vec) {
    Pack<T> pk = *reinterpret_cast<const Pack<T>*>(ptr + i);
#pragma unroll
    for (int k = 0; k < kILP; ++k) r[k] = static_cast<float>(pk.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kILP; ++k) r[k] = i + k < len ? static_cast<float>(ptr[i + k]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store(const float (&r)[kILP], T* ptr, int64_t i, int64_t len, bool vec) {
  if (vec) {
    Pack<T> pk;
#pragma unroll
    for (int k = 0; k < kILP; ++k) pk.v[k] = static_cast<T>(r[k]);
    *reinterpret_cast<Pack<T>*>(ptr + i) = pk;
  } else {
#pragma unroll
    for (int k = 0; k < kILP; ++k)
      if (i + k < len) ptr[i + k] = static_cast<T>(r[k]);
  }
}

// Vector loads/stores need every used address aligned to a whole pack.
template <typename T>
__device__ __forceinline__ bool pack_aligned(const T* p) {
  return p == nullptr || aligned<T>(p);
}

__device__ __forceinline__ bool skipped(const Hyper& h) { return h.found_inf != nullptr && *h.found_inf != 0.f; }

// T: the param's (and grad's) type; MASTER: float32 master and state (T is float16/bfloat16).
template <typename T, bool MASTER>
__global__ void __launch_bounds__(kThreads, 2) sgd_kernel(TensorListArgs<4> args, Hyper h) {
  using State = std::conditional_t<MASTER, float, T>;
  if (skipped(h)) return;
  const int t = args.block_to_tensor[blockIdx.x];
  const int64_t base = static_cast<int64_t>(args.block_to_chunk[blockIdx.x]) * kChunk;
  const int64_t len = min(static_cast<int64_t>(kChunk), args.sizes[t] - base);
  T* param = static_cast<T*>(args.addresses[0][t]) + base;
  T* grad = static_cast<T*>(args.addresses[1][t]) + base;
  State* buf = h.has_momentum ? static_cast<State*>(args.addresses[2][t]) + base : nullptr;
  float* master = MASTER ? static_cast<float*>(args.addresses[3][t]) + base : nullptr;
  SgdScalars s;
  s.neg_lr = -(h.lr_ptr ? *h.lr_ptr : h.lr);
  s.momentum = h.momentum;
  s.one_minus_dampening = h.one_minus_dampening;
  s.weight_decay = h.weight_decay;
  s.grad_scale = h.grad_scale ? *h.grad_scale : 1.f;
  s.new_buffer = args.flags[t] != 0;
  const bool vec = len % kILP == 0 && pack_aligned(param) && pack_aligned(grad) && pack_aligned(buf) &&
                   pack_aligned(master);
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * kILP; i < len; i += static_cast<int64_t>(blockDim.x) * kILP) {
    float p[kILP], g[kILP], b[kILP] = {};
    if (MASTER) load(p, master, i, len, vec); else load(p, param, i, len, vec);
    load(g, grad, i, len, vec);
    if (h.has_momentum && !s.new_buffer) load(b, buf, i, len, vec);
#pragma unroll
    for (int k = 0; k < kILP; ++k) sgd_math(p[k], g[k], b[k], s, h);
    store(p, param, i, len, vec);
    if (MASTER) store(p, master, i, len, vec);
    if (h.grad_scale) store(g, grad, i, len, vec);
    if (h.has_momentum) store(b, buf, i, len, vec);
  }
}

template <typename T, bool MASTER>
__global__ void __launch_bounds__(kThreads, 2) adam_kernel(TensorListArgs<6> args, Hyper h) {
  using State = std::conditional_t<MASTER, float, T>;
  if (skipped(h)) return;
  const int t = args.block_to_tensor[blockIdx.x];
  const int64_t base = static_cast<int64_t>(args.block_to_chunk[blockIdx.x]) * kChunk;
  const int64_t len = min(static_cast<int64_t>(kChunk), args.sizes[t] - base);
  T* param = static_cast<T*>(args.addresses[0][t]) + base;
  T* grad = static_cast<T*>(args.addresses[1][t]) + base;
  State* exp_avg = static_cast<State*>(args.addresses[2][t]) + base;
  State* exp_avg_sq = static_cast<State*>(args.addresses[3][t]) + base;
  State* max_exp_avg_sq = h.amsgrad ? static_cast<State*>(args.addresses[4][t]) + base : nullptr;
  float* master = MASTER ? static_cast<float*>(args.addresses[5][t]) + base : nullptr;
  // Scalars of this tensor's step, in double as torch computes them in Python.
  const double step = static_cast<double>(*args.steps[t]) + 1.0;
  const double lr = h.lr_ptr ? static_cast<double>(*h.lr_ptr) : h.lr_d;
  const double bias_correction1 = 1.0 - pow(h.beta1, step);
  const double bias_correction2 = 1.0 - pow(h.beta2, step);
  AdamScalars s;
  s.lerp_w = static_cast<float>(1.0 - h.beta1);
  s.one_minus_lerp_w = __fsub_rn(1.f, s.lerp_w);
  s.beta2 = static_cast<float>(h.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  s.weight_decay = static_cast<float>(h.weight_decay_d);
  s.eps = static_cast<float>(h.eps);
  s.grad_scale = h.grad_scale ? *h.grad_scale : 1.f;
  s.bias_correction2_sqrt = static_cast<float>(sqrt(bias_correction2));
  s.neg_step_size = static_cast<float>(-(lr / bias_correction1));
  s.decay = static_cast<float>(1.0 - lr * h.weight_decay_d);
  const bool vec = len % kILP == 0 && pack_aligned(param) && pack_aligned(grad) && pack_aligned(exp_avg) &&
                   pack_aligned(exp_avg_sq) && pack_aligned(max_exp_avg_sq) && pack_aligned(master);
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * kILP; i < len; i += static_cast<int64_t>(blockDim.x) * kILP) {
    float p[kILP], g[kILP], m[kILP], v[kILP], vmax[kILP] = {};
    if (MASTER) load(p, master, i, len, vec); else load(p, param, i, len, vec);
    load(g, grad, i, len, vec);
    load(m, exp_avg, i, len, vec);
    load(v, exp_avg_sq, i, len, vec);
    if (h.amsgrad) load(vmax, max_exp_avg_sq, i, len, vec);
#pragma unroll
    for (int k = 0; k < kILP; ++k) adam_math(p[k], g[k], m[k], v[k], vmax[k], s, h);
    store(p, param, i, len, vec);
    if (MASTER) store(p, master, i, len, vec);
    if (h.grad_scale) store(g, grad, i, len, vec);
    store(m, exp_avg, i, len, vec);
    store(v, exp_avg_sq, i, len, vec);
    if (h.amsgrad) store(vmax, max_exp_avg_sq, i, len, vec);
  }
}

// steps[i] += 1 unless the step was skipped; all step pointers of a call, kMaxSteps per launch.
constexpr int kMaxSteps = 480;
struct StepList {
  float* steps[kMaxSteps];
  int count;
};
__global__ void increment_steps_kernel(StepList list, const float* found_inf) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < list.count && (found_inf == nullptr || *found_inf == 0.f)) *list.steps[i] += 1.f;
}

// ---------------------------------------------------------------------------------------------
// Host: multi-tensor apply.
// ---------------------------------------------------------------------------------------------
// Fills TensorListArgs<DEPTH> over the tensors `which` of `lists` and calls launch(args, blocks)
// whenever the struct is full. lists[d][i] may be undefined for an unused list d.
template <int DEPTH, typename Launch>
void multi_tensor_apply(const std::vector<at::TensorList>& lists, const std::vector<int64_t>& which,
                        const std::vector<float*>& steps, const std::vector<unsigned char>& flags,
                        const Launch& launch) {
  using Args = TensorListArgs<DEPTH>;
  Args args;
  int slot = 0, block = 0;
  auto fill_slot = [&](int s, int64_t t) {
    for (int d = 0; d < DEPTH; ++d)
      args.addresses[d][s] = static_cast<int64_t>(lists[d].size()) > t && lists[d][t].defined()
                                 ? lists[d][t].data_ptr() : nullptr;
    args.sizes[s] = lists[0][t].numel();
    args.steps[s] = steps.empty() ? nullptr : steps[t];
    args.flags[s] = flags.empty() ? 0 : flags[t];
  };
  for (int64_t t : which) {
    const int64_t n = lists[0][t].numel();
    if (n == 0) continue;
    fill_slot(slot, t);
    ++slot;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      args.block_to_tensor[block] = static_cast<unsigned char>(slot - 1);
      args.block_to_chunk[block] = static_cast<int>(c);
      ++block;
      const bool last_chunk = c == chunks - 1;
      if (block == kMaxBlocks || (slot == Args::kMaxTensors && last_chunk)) {
        launch(args, block);
        block = 0;
        if (last_chunk) {
          slot = 0;
        } else {  // the tensor goes on in the next launch, in slot 0
          fill_slot(0, t);
          slot = 1;
        }
      }
    }
  }
  if (block > 0) launch(args, block);
}

const float* device_scalar(const std::optional<at::Tensor>& t, const at::Device& device, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device() == device && t->scalar_type() == at::kFloat && t->numel() == 1,
              "fastattn optimizer step (CUDA): ", name, " must be a 1-element float32 tensor on ", device);
  return t->data_ptr<float>();
}

// A list that must match params (shape, device, contiguous) and have params' dtype, or float32 when
// float32_state (state and masters with master weights).
struct ListToCheck {
  at::TensorList list;
  const char* name;
  bool float32_state;
};

void check_lists(at::TensorList params, const std::vector<ListToCheck>& others) {
  TORCH_CHECK(!params.empty(), "fastattn optimizer step (CUDA): params is empty");
  const auto device = params[0].device();
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    TORCH_CHECK(p.device() == device, "fastattn optimizer step (CUDA): params[", i, "] is on ", p.device(),
                ", params[0] on ", device);
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kHalf || p.scalar_type() == at::kBFloat16,
                "fastattn optimizer step (CUDA): params[", i, "] must be float32, float16 or bfloat16, got ",
                p.scalar_type());
    TORCH_CHECK(p.is_contiguous(), "fastattn optimizer step (CUDA): params[", i, "] must be contiguous");
  }
  for (const auto& [list, name, float32_state] : others) {
    TORCH_CHECK(list.size() == params.size(), "fastattn optimizer step (CUDA): ", name, " has ", list.size(),
                " tensors, params has ", params.size());
    for (size_t i = 0; i < list.size(); ++i) {
      const auto& t = list[i];
      const auto dtype = float32_state ? at::kFloat : params[i].scalar_type();
      TORCH_CHECK(t.device() == device && t.scalar_type() == dtype && t.sizes() == params[i].sizes() &&
                      t.is_contiguous(),
                  "fastattn optimizer step (CUDA): ", name, "[", i, "] must be a contiguous ", dtype,
                  " tensor with params[", i, "]'s shape and device");
    }
  }
}

// With master weights every param is float16/bfloat16 and has a float32 master.
void check_master(at::TensorList params, const std::optional<at::TensorList>& master_params) {
  if (!master_params.has_value()) return;
  check_lists(params, {{*master_params, "master_params", true}});
  for (size_t i = 0; i < params.size(); ++i)
    TORCH_CHECK(params[i].scalar_type() == at::kHalf || params[i].scalar_type() == at::kBFloat16,
                "fastattn optimizer step (CUDA): with master_params, params[", i,
                "] must be float16 or bfloat16, got ", params[i].scalar_type());
}

// float32, float16, bfloat16 (float64 stays on the CPU): three instantiations per kernel.
#define FASTATTN_DISPATCH_PARAM_TYPES(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
// Master weights: float16, bfloat16 params (two more instantiations per kernel).
#define FASTATTN_DISPATCH_MASTER_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Indices of params grouped by dtype (one kernel instantiation per dtype).
std::map<at::ScalarType, std::vector<int64_t>> by_dtype(at::TensorList params) {
  std::map<at::ScalarType, std::vector<int64_t>> groups;
  for (size_t i = 0; i < params.size(); ++i) groups[params[i].scalar_type()].push_back(static_cast<int64_t>(i));
  return groups;
}

void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   const c10::List<bool>& new_buffers, double lr, double momentum, double dampening,
                   double weight_decay, bool nesterov, bool maximize, const std::optional<at::Tensor>& lr_tensor,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                   std::optional<at::TensorList> master_params) {
  if (params.empty()) return;
  const bool has_momentum = momentum != 0.0;
  const bool master = master_params.has_value();
  std::vector<ListToCheck> others = {{grads, "grads", false}};
  if (has_momentum) others.push_back({momentum_buffers, "momentum_buffers", master});
  check_lists(params, others);
  check_master(params, master_params);
  TORCH_CHECK(!has_momentum || new_buffers.size() == params.size(), "fastattn.sgd_step_: new_buffers has ",
              new_buffers.size(), " entries, params has ", params.size());
  const auto device = params[0].device();
  c10::cuda::CUDAGuard guard(device);
  Hyper h{};
  h.lr = static_cast<float>(lr);
  h.momentum = static_cast<float>(momentum);
  h.one_minus_dampening = static_cast<float>(1.0 - dampening);
  h.weight_decay = static_cast<float>(weight_decay);
  h.lr_ptr = device_scalar(lr_tensor, device, "lr_tensor");
  h.grad_scale = device_scalar(grad_scale, device, "grad_scale");
  h.found_inf = device_scalar(found_inf, device, "found_inf");
  h.has_momentum = has_momentum;
  h.nesterov = nesterov;
  h.maximize = maximize;
  std::vector<unsigned char> flags(params.size(), 0);
  for (size_t i = 0; has_momentum && i < params.size(); ++i) flags[i] = new_buffers.get(i) ? 1 : 0;
  auto stream = at::cuda::getCurrentCUDAStream();
  const std::vector<at::TensorList> lists = {params, grads, momentum_buffers,
                                              master ? *master_params : at::TensorList()};
  // A plain pair, not a structured binding: lambdas may capture those only from C++20 (nvcc warns, older
  // host compilers refuse).
  for (const auto& group : by_dtype(params)) {
    const auto dtype = group.first;
    const auto& which = group.second;
    if (master) {
      FASTATTN_DISPATCH_MASTER_TYPES(dtype, "sgd_step_cuda", [&] {
        multi_tensor_apply<4>(lists, which, {}, flags, [&](const TensorListArgs<4>& args, int blocks) {
          sgd_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(args, h);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    } else {
      FASTATTN_DISPATCH_PARAM_TYPES(dtype, "sgd_step_cuda", [&] {
        multi_tensor_apply<4>(lists, which, {}, flags, [&](const TensorListArgs<4>& args, int blocks) {
          sgd_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(args, h);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    }
  }
}

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr, double beta1,
                    double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                    bool decoupled_weight_decay, const std::optional<at::Tensor>& lr_tensor,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    std::optional<at::TensorList> master_params) {
  if (params.empty()) return;
  const bool master = master_params.has_value();
  std::vector<ListToCheck> others = {
      {grads, "grads", false}, {exp_avgs, "exp_avgs", master}, {exp_avg_sqs, "exp_avg_sqs", master}};
  if (amsgrad) others.push_back({max_exp_avg_sqs, "max_exp_avg_sqs", master});
  check_lists(params, others);
  check_master(params, master_params);
  const auto device = params[0].device();
  TORCH_CHECK(state_steps.size() == params.size(), "fastattn.adam_step_: state_steps has ", state_steps.size(),
              " tensors, params has ", params.size());
  std::vector<float*> steps;
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const auto& s = state_steps[i];
    TORCH_CHECK(s.device() == device && s.scalar_type() == at::kFloat && s.numel() == 1,
                "fastattn.adam_step_ (CUDA): state_steps[", i, "] must be a 1-element float32 tensor on ", device);
    steps.push_back(s.data_ptr<float>());
  }
  c10::cuda::CUDAGuard guard(device);
  Hyper h{};
  h.lr_d = lr;
  h.beta1 = beta1;
  h.beta2 = beta2;
  h.eps = eps;
  h.weight_decay_d = weight_decay;
  h.lr_ptr = device_scalar(lr_tensor, device, "lr_tensor");
  h.grad_scale = device_scalar(grad_scale, device, "grad_scale");
  h.found_inf = device_scalar(found_inf, device, "found_inf");
  h.maximize = maximize;
  h.amsgrad = amsgrad;
  h.l2_decay = weight_decay != 0.0 && !decoupled_weight_decay;
  h.decoupled_decay = weight_decay != 0.0 && decoupled_weight_decay;
  auto stream = at::cuda::getCurrentCUDAStream();
  const std::vector<at::TensorList> lists = {params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                              master ? *master_params : at::TensorList()};
  // A plain pair, not a structured binding: lambdas may capture those only from C++20 (nvcc warns, older
  // host compilers refuse).
  for (const auto& group : by_dtype(params)) {
    const auto dtype = group.first;
    const auto& which = group.second;
    if (master) {
      FASTATTN_DISPATCH_MASTER_TYPES(dtype, "adam_step_cuda", [&] {
        multi_tensor_apply<6>(lists, which, steps, {}, [&](const TensorListArgs<6>& args, int blocks) {
          adam_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(args, h);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    } else {
      FASTATTN_DISPATCH_PARAM_TYPES(dtype, "adam_step_cuda", [&] {
        multi_tensor_apply<6>(lists, which, steps, {}, [&](const TensorListArgs<6>& args, int blocks) {
          adam_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(args, h);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    }
  }
  // Every block has read its step: count this one (unless found_inf says it was skipped).
  for (size_t start = 0; start < steps.size(); start += kMaxSteps) {
    StepList list;
    list.count = static_cast<int>(std::min(steps.size() - start, static_cast<size_t>(kMaxSteps)));
    for (int i = 0; i < list.count; ++i) list.steps[i] = steps[start + i];
    increment_steps_kernel<<<(list.count + 127) / 128, 128, 0, stream>>>(list, h.found_inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace optim_cuda
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("sgd_step_", &fastattn::optim_cuda::sgd_step_cuda);
  m.impl("adam_step_", &fastattn::optim_cuda::adam_step_cuda);
}
