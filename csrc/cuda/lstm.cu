// LSTM on CUDA: the CUDA kernels of fastattn::lstm_cell_fwd/bwd and lstm_layer_fwd/bwd
// (schemas and the contract: csrc/cpu/lstm.cpp, fastattn/ops/lstm.py).
//
// * GEMMs (input projection of all steps, the per-step recurrent product, the weight gradients
//   over all steps) go to cuBLAS through at::mm / at::addmm_out, in the input dtype (tensor cores
//   for fp16/bf16).
// * Hand-written: the fused pointwise gate kernels (forward: activate the 4 gates, update c, write
//   h, save the activations; backward: the gates' gradient and dc_prev in one pass), the small
//   glue kernels of the time loop (lengths masks, state carry), and a persistent forward kernel for
//   small hidden sizes: each block keeps W_hh (transposed, fp32) in shared memory for the whole
//   sequence and runs every step for its batch rows (rows are independent, so no grid-wide sync).
// * Math in fp32; the cell state and the saved workspace (gates, cells, hidden) are fp32.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

namespace fastattn {
namespace {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) { return (int)std::max<int64_t>(1, (n + kThreads - 1) / kThreads); }

__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + __expf(-x)); }
__device__ __forceinline__ float tanh_f(float x) { return tanhf(x); }
__device__ __forceinline__ bool row_active(const int64_t* len, int64_t t, int64_t b) { return !len || t < len[b]; }

// ---------------------------------------------------------------------------------------------
// Fused pointwise kernels: one thread per (batch row, hidden unit).
// ---------------------------------------------------------------------------------------------
// gpre: pre-activations (B, 4H). c_state: fp32 (B, H), updated. cells_t, hidden_t: fp32 saves (or
// null). act: fp32 activations (B, 4H). out: h (row stride ldo). h_state: running h (or null).
template <typename T>
__global__ void gates_fwd_kernel(const T* __restrict__ gpre, float* __restrict__ c_state, float* __restrict__ cells_t,
                                 float* __restrict__ act, T* __restrict__ out, int64_t ldo, T* __restrict__ h_state,
                                 float* __restrict__ hidden_t, const int64_t* __restrict__ len, int64_t t, int64_t B,
                                 int64_t H) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= B * H) return;
  const int64_t b = idx / H, u = idx % H;
  const T* g = gpre + b * 4 * H;
  float* a = act + b * 4 * H;
  if (row_active(len, t, b)) {
    const float i = sigmoid_f((float)g[u]), f = sigmoid_f((float)g[H + u]), gg = tanh_f((float)g[2 * H + u]),
                o = sigmoid_f((float)g[3 * H + u]);
    const float cn = f * c_state[idx] + i * gg;
    const float h = o * tanh_f(cn);
    a[u] = i, a[H + u] = f, a[2 * H + u] = gg, a[3 * H + u] = o;
    c_state[idx] = cn;
    if (cells_t) cells_t[idx] = cn;
    out[b * ldo + u] = (T)h;
    if (h_state) h_state[idx] = (T)h;
    if (hidden_t) hidden_t[idx] = h;
  } else {  // the row sits this step out: keep the state, output 0
    a[u] = a[H + u] = a[2 * H + u] = a[3 * H + u] = 0.f;
    if (cells_t) cells_t[idx] = c_state[idx];
    out[b * ldo + u] = (T)0.f;
    if (hidden_t) hidden_t[idx] = 0.f;
  }
}

// act, c_new, c_prev: fp32. dr: dL/d(o*tanh(c_new)). dc: fp32 dL/dc_new in, dL/dc_prev out.
template <typename T>
__global__ void gates_bwd_kernel(const float* __restrict__ act, const float* __restrict__ c_new,
                                 const float* __restrict__ c_prev, const T* __restrict__ dr, float* __restrict__ dc,
                                 T* __restrict__ dgates, const int64_t* __restrict__ len, int64_t t, int64_t B,
                                 int64_t H) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= B * H) return;
  const int64_t b = idx / H, u = idx % H;
  T* d = dgates + b * 4 * H;
  if (!row_active(len, t, b)) {
    d[u] = d[H + u] = d[2 * H + u] = d[3 * H + u] = (T)0.f;
    return;
  }
  const float* a = act + b * 4 * H;
  const float i = a[u], f = a[H + u], g = a[2 * H + u], o = a[3 * H + u];
  const float tc = tanh_f(c_new[idx]);
  const float drv = (float)dr[idx];
  const float dcn = dc[idx] + drv * o * (1.f - tc * tc);
  d[u] = (T)(dcn * g * i * (1.f - i));
  d[H + u] = (T)(dcn * c_prev[idx] * f * (1.f - f));
  d[2 * H + u] = (T)(dcn * i * (1.f - g * g));
  d[3 * H + u] = (T)(drv * tc * o * (1.f - o));
  dc[idx] = dcn * f;
}

// ---------------------------------------------------------------------------------------------
// Glue of the time loop.
// ---------------------------------------------------------------------------------------------
// h_state[b] = out_t[b] for the rows active at step t (after the projection GEMM).
template <typename T>
__global__ void carry_rows_kernel(const T* __restrict__ src, T* __restrict__ dst, const int64_t* __restrict__ len,
                                  int64_t t, int64_t B, int64_t P) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= B * P) return;
  if (row_active(len, t, idx / P)) dst[idx] = src[idx];
}

// dhtot = active ? dh + grad_out_t : 0
template <typename T>
__global__ void add_grad_kernel(const float* __restrict__ dh, const T* __restrict__ gout_t, T* __restrict__ dhtot,
                                const int64_t* __restrict__ len, int64_t t, int64_t B, int64_t P) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= B * P) return;
  dhtot[idx] = row_active(len, t, idx / P) ? (T)(dh[idx] + (float)gout_t[idx]) : (T)0.f;
}

// dh = active ? dh_new : dh (rows that sat the step out pass their gradient through)
template <typename T>
__global__ void take_grad_kernel(const T* __restrict__ dh_new, float* __restrict__ dh, const int64_t* __restrict__ len,
                                 int64_t t, int64_t B, int64_t P) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= B * P) return;
  if (row_active(len, t, idx / P)) dh[idx] = (float)dh_new[idx];
}

// hprev[t, b] = the h step t read: h0 at a row's first step, else the previous step's output.
template <typename T>
__global__ void hprev_kernel(const T* __restrict__ out, const T* __restrict__ h0, T* __restrict__ hprev,
                             const int64_t* __restrict__ len, int64_t Tn, int64_t B, int64_t P, bool reverse) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= Tn * B * P) return;
  const int64_t t = idx / (B * P), b = (idx / P) % B, j = idx % P;
  const int64_t tp = reverse ? t + 1 : t - 1;
  const bool first = tp < 0 || tp >= Tn || !row_active(len, tp, b);
  hprev[idx] = first ? h0[b * P + j] : out[(tp * B + b) * P + j];
}

// ---------------------------------------------------------------------------------------------
// Persistent forward for small hidden sizes (no projection): block = `rows` batch rows, all steps.
// Shared memory: W_hh^T fp32 (H, 4H) | h (rows, H) | gates (rows, 4H) | c (rows, H).
// Phase 1: thread per (row, gate unit) computes xproj + h W_hh^T (W^T rows are contiguous in the
// gate index, so neighbouring threads read neighbouring words; h[row, k] is a broadcast).
// Phase 2: thread per (row, hidden unit): the pointwise update. __syncthreads between phases.
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void persistent_fwd_kernel(const T* __restrict__ xproj, const T* __restrict__ h0,
                                      const float* __restrict__ c0, const T* __restrict__ w_hh,
                                      const int64_t* __restrict__ len, T* __restrict__ out, T* __restrict__ h_n,
                                      float* __restrict__ c_n, float* __restrict__ act, float* __restrict__ cells,
                                      int Tn, int B, int H, int rows, bool reverse) {
  extern __shared__ float smem[];
  const int G = 4 * H;
  float* wt = smem;             // (H, G)
  float* hs = wt + H * G;       // (rows, H)
  float* gs = hs + rows * H;    // (rows, G)
  float* cs = gs + rows * G;    // (rows, H)
  const int r0 = blockIdx.x * rows;
  const int nr = min(rows, B - r0);
  for (int i = threadIdx.x; i < G * H; i += blockDim.x) {
    const int j = i / H, k = i % H;  // w_hh[j, k] -> wt[k, j]
    wt[k * G + j] = (float)w_hh[i];
  }
  for (int i = threadIdx.x; i < nr * H; i += blockDim.x) {
    hs[i] = (float)h0[(int64_t)r0 * H + i];
    cs[i] = c0[(int64_t)r0 * H + i];
  }
  __syncthreads();
  for (int s = 0; s < Tn; ++s) {
    const int t = reverse ? Tn - 1 - s : s;
    for (int i = threadIdx.x; i < nr * G; i += blockDim.x) {
      const int r = i / G, j = i % G;
      const float* h = hs + r * H;
      float acc = (float)xproj[((int64_t)t * B + r0 + r) * G + j];
#pragma unroll 4
      for (int k = 0; k < H; ++k) acc += wt[k * G + j] * h[k];
      gs[i] = acc;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < nr * H; i += blockDim.x) {
      const int r = i / H, u = i % H, b = r0 + r;
      const int64_t row = (int64_t)t * B + b;
      float* a = act + row * G;
      if (row_active(len, t, b)) {
        const float* g = gs + r * G;
        const float ig = sigmoid_f(g[u]), fg = sigmoid_f(g[H + u]), gg = tanh_f(g[2 * H + u]),
                    og = sigmoid_f(g[3 * H + u]);
        const float cn = fg * cs[i] + ig * gg;
        const float h = og * tanh_f(cn);
        a[u] = ig, a[H + u] = fg, a[2 * H + u] = gg, a[3 * H + u] = og;
        cs[i] = cn;
        hs[i] = h;
        out[row * H + u] = (T)h;
      } else {
        a[u] = a[H + u] = a[2 * H + u] = a[3 * H + u] = 0.f;
        out[row * H + u] = (T)0.f;
      }
      cells[row * H + u] = cs[i];
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < nr * H; i += blockDim.x) {
    h_n[(int64_t)r0 * H + i] = (T)hs[i];
    c_n[(int64_t)r0 * H + i] = cs[i];
  }
}

constexpr int kPersistRows = 8;
constexpr int64_t kPersistSmemMax = 96 * 1024;

int64_t persistent_smem_bytes(int64_t H, int64_t rows) { return (H * 4 * H + rows * 6 * H) * (int64_t)sizeof(float); }

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------
at::Tensor lengths_on(const std::optional<at::Tensor>& lengths, const at::Tensor& like) {
  if (!lengths || !lengths->defined()) return at::Tensor();
  return lengths->to(like.device(), at::kLong).contiguous();
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}
const int64_t* len_ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<int64_t>() : nullptr; }

at::Tensor input_projection(const at::Tensor& x2d, const at::Tensor& w_ih, const std::optional<at::Tensor>& b_ih,
                            const std::optional<at::Tensor>& b_hh) {
  auto xp = at::mm(x2d, w_ih.t());
  if (b_ih && b_ih->defined()) xp.add_(*b_ih);
  if (b_hh && b_hh->defined()) xp.add_(*b_hh);
  return xp;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_fwd_cuda(const at::Tensor& input, const at::Tensor& hx,
                                                                  const at::Tensor& cx, const at::Tensor& w_ih,
                                                                  const at::Tensor& w_hh,
                                                                  const std::optional<at::Tensor>& b_ih,
                                                                  const std::optional<at::Tensor>& b_hh) {
  c10::cuda::CUDAGuard guard(input.device());
  TORCH_CHECK(input.dim() == 2 && hx.dim() == 2, "fastattn lstm_cell (cuda): input and hx must be 2-D");
  TORCH_CHECK(input.scalar_type() != at::kDouble, "fastattn lstm_cell (cuda): float64 is not supported");
  const int64_t B = input.size(0), H = hx.size(1);
  auto gpre = input_projection(input, w_ih, b_ih, b_hh);
  gpre.addmm_(hx, w_hh.t());
  auto c = cx.to(at::kFloat).contiguous().clone();
  auto act = at::empty({B, 4 * H}, input.options().dtype(at::kFloat));
  auto hy = at::empty({B, H}, input.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstm_cell_fwd_cuda", [&] {
    gates_fwd_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, stream>>>(
        gpre.data_ptr<scalar_t>(), c.data_ptr<float>(), nullptr, act.data_ptr<float>(), hy.data_ptr<scalar_t>(), H,
        nullptr, nullptr, nullptr, 0, B, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {hy, c.to(input.scalar_type()), act};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cell_bwd_cuda(
    const at::Tensor& grad_hy, const at::Tensor& grad_cy, const at::Tensor& input, const at::Tensor& hx,
    const at::Tensor& cx, const at::Tensor& cy, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& gates) {
  c10::cuda::CUDAGuard guard(input.device());
  const int64_t B = input.size(0), H = hx.size(1);
  auto dc = grad_cy.to(at::kFloat).contiguous().clone();
  auto c_new = cy.to(at::kFloat).contiguous(), c_prev = cx.to(at::kFloat).contiguous();
  auto dh = grad_hy.contiguous();
  auto act = gates.contiguous();
  auto dgates = at::empty({B, 4 * H}, input.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstm_cell_bwd_cuda", [&] {
    gates_bwd_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, stream>>>(
        act.data_ptr<float>(), c_new.data_ptr<float>(), c_prev.data_ptr<float>(), dh.data_ptr<scalar_t>(),
        dc.data_ptr<float>(), dgates.data_ptr<scalar_t>(), nullptr, 0, B, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  auto db = dgates.sum(0, /*keepdim=*/false, at::kFloat).to(input.scalar_type());
  return {at::mm(dgates, w_ih), at::mm(dgates, w_hh), dc.to(input.scalar_type()), at::mm(dgates.t(), input),
          at::mm(dgates.t(), hx), db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd_cuda(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr_opt, bool reverse, const std::optional<at::Tensor>& lengths) {
  c10::cuda::CUDAGuard guard(input.device());
  TORCH_CHECK(input.dim() == 3, "fastattn lstm (cuda): input must be (seq_len, batch, input_size)");
  TORCH_CHECK(input.scalar_type() != at::kDouble, "fastattn lstm (cuda): float64 is not supported");
  const bool proj = w_hr_opt && w_hr_opt->defined();
  const int64_t Tn = input.size(0), B = input.size(1), I = input.size(2), H = w_ih.size(0) / 4;
  const int64_t P = proj ? w_hr_opt->size(0) : H;
  TORCH_CHECK(w_hh.size(0) == 4 * H && w_hh.size(1) == P && h0.size(-1) == P && c0.size(-1) == H,
              "fastattn lstm (cuda): weight / state shapes do not match");
  auto len = lengths_on(lengths, input);
  auto fopts = input.options().dtype(at::kFloat);
  auto xp = input_projection(input.reshape({Tn * B, I}), w_ih, b_ih, b_hh).view({Tn, B, 4 * H});
  auto out = at::empty({Tn, B, P}, input.options());
  auto act = at::empty({Tn, B, 4 * H}, fopts);
  auto cells = at::empty({Tn, B, H}, fopts);
  auto hidden = proj ? at::empty({Tn, B, H}, fopts) : at::empty({0}, fopts);
  auto h = h0.contiguous().clone();
  auto c = c0.to(at::kFloat).contiguous().clone();
  auto stream = at::cuda::getCurrentCUDAStream();

  const int64_t smem = persistent_smem_bytes(H, kPersistRows);
  if (!proj && smem <= kPersistSmemMax) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstm_persistent_fwd", [&] {
      auto kernel = persistent_fwd_kernel<scalar_t>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
      auto wh = w_hh.contiguous();
      auto h_n = at::empty({B, H}, input.options());
      const int grid = (int)((B + kPersistRows - 1) / kPersistRows);
      kernel<<<grid, kThreads, smem, stream>>>(xp.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), c0.to(at::kFloat).contiguous().data_ptr<float>(),
                                               wh.data_ptr<scalar_t>(), len_ptr(len), out.data_ptr<scalar_t>(),
                                               h_n.data_ptr<scalar_t>(), c.data_ptr<float>(), act.data_ptr<float>(),
                                               cells.data_ptr<float>(), (int)Tn, (int)B, (int)H, kPersistRows, reverse);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      h = h_n;
    });
    return {out, h, c.to(input.scalar_type()), act, cells, hidden};
  }

  auto gpre = at::empty({B, 4 * H}, input.options());
  auto r = proj ? at::empty({B, H}, input.options()) : at::Tensor();
  auto w_hh_t = w_hh.t();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstm_layer_fwd_cuda", [&] {
    for (int64_t s = 0; s < Tn; ++s) {
      const int64_t t = reverse ? Tn - 1 - s : s;
      at::addmm_out(gpre, xp[t], h, w_hh_t);
      auto out_t = out[t];
      gates_fwd_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, stream>>>(
          gpre.data_ptr<scalar_t>(), c.data_ptr<float>(), cells[t].data_ptr<float>(), act[t].data_ptr<float>(),
          proj ? r.data_ptr<scalar_t>() : out_t.data_ptr<scalar_t>(), H, proj ? nullptr : h.data_ptr<scalar_t>(),
          proj ? hidden[t].data_ptr<float>() : nullptr, len_ptr(len), t, B, H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (proj) {  // inactive rows have r = 0, so their output stays 0
        at::mm_out(out_t, r, w_hr_opt->t());
        carry_rows_kernel<scalar_t><<<blocks_for(B * P), kThreads, 0, stream>>>(
            out_t.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), len_ptr(len), t, B, P);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  return {out, h, c.to(input.scalar_type()), act, cells, hidden};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd_cuda(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& input,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr_opt, const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells, const at::Tensor& hidden, bool reverse, const std::optional<at::Tensor>& lengths) {
  c10::cuda::CUDAGuard guard(input.device());
  const bool proj = w_hr_opt && w_hr_opt->defined();
  const int64_t Tn = input.size(0), B = input.size(1), I = input.size(2), H = w_ih.size(0) / 4;
  const int64_t P = proj ? w_hr_opt->size(0) : H;
  auto len = lengths_on(lengths, input);
  auto opts = input.options();
  auto gout = grad_output.contiguous(), act = gates.contiguous(), cs = cells.contiguous();
  auto c_init = c0.to(at::kFloat).contiguous();
  auto dh = grad_h_n.to(at::kFloat).contiguous().clone();
  auto dc = grad_c_n.to(at::kFloat).contiguous().clone();
  auto dgates = at::empty({Tn, B, 4 * H}, opts);
  auto dhtot = at::empty({Tn, B, P}, opts);
  auto dr = proj ? at::empty({B, H}, opts) : at::Tensor();
  auto dh_new = at::empty({B, P}, opts);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstm_layer_bwd_cuda", [&] {
    for (int64_t s = Tn - 1; s >= 0; --s) {
      const int64_t t = reverse ? Tn - 1 - s : s;
      const int64_t tp = reverse ? t + 1 : t - 1;
      auto dhtot_t = dhtot[t];
      add_grad_kernel<scalar_t><<<blocks_for(B * P), kThreads, 0, stream>>>(
          dh.data_ptr<float>(), gout[t].data_ptr<scalar_t>(), dhtot_t.data_ptr<scalar_t>(), len_ptr(len), t, B, P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (proj) at::mm_out(dr, dhtot_t, *w_hr_opt);
      const float* c_prev = s == 0 ? c_init.data_ptr<float>() : cs[tp].data_ptr<float>();
      gates_bwd_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, stream>>>(
          act[t].data_ptr<float>(), cs[t].data_ptr<float>(), c_prev,
          proj ? dr.data_ptr<scalar_t>() : dhtot_t.data_ptr<scalar_t>(), dc.data_ptr<float>(),
          dgates[t].data_ptr<scalar_t>(), len_ptr(len), t, B, H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::mm_out(dh_new, dgates[t], w_hh);
      take_grad_kernel<scalar_t><<<blocks_for(B * P), kThreads, 0, stream>>>(
          dh_new.data_ptr<scalar_t>(), dh.data_ptr<float>(), len_ptr(len), t, B, P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  auto hprev = at::empty({Tn, B, P}, opts);
  auto out = output.contiguous(), h_init = h0.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstm_hprev", [&] {
    hprev_kernel<scalar_t><<<blocks_for(Tn * B * P), kThreads, 0, stream>>>(
        out.data_ptr<scalar_t>(), h_init.data_ptr<scalar_t>(), hprev.data_ptr<scalar_t>(), len_ptr(len), Tn, B, P,
        reverse);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  auto dg2 = dgates.view({Tn * B, 4 * H});
  auto dx = at::mm(dg2, w_ih).view({Tn, B, I});
  auto dwi = at::mm(dg2.t(), input.reshape({Tn * B, I}));
  auto dwh = at::mm(dg2.t(), hprev.view({Tn * B, P}));
  auto db = dg2.sum(0, false, at::kFloat).to(input.scalar_type());
  auto dwr = proj ? at::mm(dhtot.view({Tn * B, P}).t(), hidden.reshape({Tn * B, H}).to(input.scalar_type()))
                  : at::empty({0}, opts);
  const auto dt = input.scalar_type();
  return {dx, dh.to(dt), dc.to(dt), dwi, dwh, db, dwr};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("lstm_cell_fwd", &fastattn::lstm_cell_fwd_cuda);
  m.impl("lstm_cell_bwd", &fastattn::lstm_cell_bwd_cuda);
  m.impl("lstm_layer_fwd", &fastattn::lstm_layer_fwd_cuda);
  m.impl("lstm_layer_bwd", &fastattn::lstm_layer_bwd_cuda);
}
