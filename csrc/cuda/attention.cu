// CUDA kernels of fastattn::attention_fwd / attention_bwd (the native contract is the docstring of
// fastattn/ops/attention.py). Host side: argument checks, the parameter block, kernel choice.
//
//   fp16 / bf16: tensor-core kernels (attention_fwd.cuh, attention_bwd.cuh), templated on the
//                dtype and a head-size bucket D in {64, 128, 256}; E and Ev <= D are zero-padded
//                inside the kernels, so any head size <= 256 runs.
//   fp32:        SIMT kernels (attention_simt.cuh), correct but slow; also the fp16/bf16 fallback
//                where the tensor-core kernels' shared memory does not fit the GPU.
// Instantiations: 2 dtypes x 3 buckets x 3 tensor-core kernels x {dense, varlen} + 3 dtypes x 4
// SIMT/delta kernels + 2 split-KV reduce kernels.
//
// Packed variable-length batches (attention_varlen_fwd/bwd) run the same kernels: the parameter
// block carries cu_seqlens, grid z is the sequence, and each block looks its sequence up
// (enter_sequence in attention_common.cuh: L, S, diag_offset and first rows from cu_seqlens[b],
// cu_seqlens[b+1]); tiles past a sequence's end exit at once.
// Decoding (L <= 16, few query tiles for the GPU): the tensor-core forward splits the keys over
// several blocks per query tile and a reduce kernel combines their partial (out, lse).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>

#include "attention_bwd.cuh"
#include "attention_common.cuh"
#include "attention_fwd.cuh"
#include "attention_simt.cuh"

#ifdef FASTATTN_CUDA_ATTN_STANDALONE
// Only for compiling this file alone; the schemas live in csrc/cpu/attention.cpp.
TORCH_LIBRARY_FRAGMENT(fastattn, m) {
  m.def(
      "attention_fwd(Tensor query, Tensor key, Tensor value, Tensor? attn_bias, float dropout_p, float scale, "
      "int window_left, int window_right, int diag_offset, float softcap, int seed) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor lse, "
      "Tensor? attn_bias, float dropout_p, float scale, int window_left, int window_right, int diag_offset, "
      "float softcap, int seed) -> (Tensor, Tensor, Tensor)");
  m.def(
      "attention_varlen_fwd(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float dropout_p, float scale, "
      "int window_left, int window_right, bool bottom_right, float softcap, int seed) -> (Tensor, Tensor)");
  m.def(
      "attention_varlen_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "float dropout_p, float scale, int window_left, int window_right, bool bottom_right, "
      "float softcap, int seed) -> (Tensor, Tensor, Tensor)");
}
#endif

namespace fastattn {
namespace cuda_attn {
namespace {

using at::Tensor;

void check_qkv(const Tensor& q, const Tensor& k, const Tensor& v) {
  for (const auto& [name, x] : {std::pair<const char*, const Tensor*>{"query", &q}, {"key", &k}, {"value", &v}}) {
    TORCH_CHECK(x->is_cuda(), "attention (cuda): ", name, " must be a CUDA tensor, got device ", x->device());
    TORCH_CHECK(x->dim() == 4, "attention (cuda): ", name, " must be 4-D (B, H, seq, head_dim), got ", x->dim(),
                "-D");
    TORCH_CHECK(x->scalar_type() == at::kHalf || x->scalar_type() == at::kBFloat16 || x->scalar_type() == at::kFloat,
                "attention (cuda): ", name, " must be float16, bfloat16 or float32, got ", x->scalar_type());
    TORCH_CHECK(x->stride(3) == 1 || x->size(3) <= 1, "attention (cuda): ", name,
                " must be contiguous in its last dim (stride 1), got stride ", x->stride(3));
    TORCH_CHECK(x->device() == q.device(), "attention (cuda): ", name, " is on ", x->device(), " but query on ",
                q.device());
    TORCH_CHECK(x->scalar_type() == q.scalar_type(), "attention (cuda): ", name, " has dtype ", x->scalar_type(),
                " but query ", q.scalar_type());
  }
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "attention (cuda): query, key, value batch sizes ",
              q.size(0), ", ", k.size(0), ", ", v.size(0), " differ");
  TORCH_CHECK(v.size(1) == k.size(1), "attention (cuda): key has ", k.size(1), " heads, value ", v.size(1));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "attention (cuda): query heads (", q.size(1),
              ") must be a multiple of key/value heads (", k.size(1), ")");
  TORCH_CHECK(k.size(3) == q.size(3), "attention (cuda): query head size ", q.size(3), " != key head size ",
              k.size(3));
  TORCH_CHECK(v.size(2) == k.size(2), "attention (cuda): key length ", k.size(2), " != value length ", v.size(2));
  TORCH_CHECK(q.size(3) <= 256 && v.size(3) <= 256, "attention (cuda): head sizes up to 256 are supported, got query ",
              q.size(3), " and value ", v.size(3));
  const int64_t big = std::numeric_limits<int>::max();
  TORCH_CHECK(q.size(2) < big && k.size(2) < big, "attention (cuda): sequence lengths must be < 2^31");
  TORCH_CHECK(q.size(0) <= 65535 && q.size(1) <= 65535, "attention (cuda): batch and head counts must be <= 65535");
}

bool aligned16(const Tensor& x) { return reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0; }

AttnParams make_params(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& attn_bias,
                       double dropout_p, double scale, int64_t window_left, int64_t window_right, int64_t diag_offset,
                       double softcap, int64_t seed) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "attention (cuda): dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(softcap >= 0.0, "attention (cuda): softcap must be >= 0, got ", softcap);
  AttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sl = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sl = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sl = v.stride(2);
  p.B = (int)q.size(0), p.Hq = (int)q.size(1), p.L = (int)q.size(2), p.E = (int)q.size(3);
  p.Hkv = (int)k.size(1), p.S = (int)k.size(2), p.Ev = (int)v.size(3);
  p.group = p.Hq / p.Hkv;
  if (attn_bias.has_value() && attn_bias->defined()) {
    const Tensor& bias = *attn_bias;
    TORCH_CHECK(bias.device() == q.device(), "attention (cuda): attn_bias is on ", bias.device(), " but query on ",
                q.device());
    TORCH_CHECK(bias.scalar_type() == q.scalar_type(), "attention (cuda): attn_bias must have query's dtype ",
                q.scalar_type(), ", got ", bias.scalar_type());
    TORCH_CHECK(bias.dim() == 4 && bias.size(0) == p.B && bias.size(1) == p.Hq && bias.size(2) == p.L &&
                    bias.size(3) == p.S,
                "attention (cuda): attn_bias must have shape (B, Hq, L, S) = (", p.B, ", ", p.Hq, ", ", p.L, ", ", p.S,
                "), got ", bias.sizes());
    p.has_bias = true;
    p.bias = bias.data_ptr();
    p.bias_sb = bias.stride(0), p.bias_sh = bias.stride(1), p.bias_sl = bias.stride(2), p.bias_ss = bias.stride(3);
  }
  p.scale = (float)scale;
  p.scale_log2 = (float)(scale * 1.4426950408889634);
  p.has_softcap = softcap > 0.0;
  p.softcap = (float)softcap;
  p.inv_softcap = p.has_softcap ? (float)(1.0 / softcap) : 0.f;
  p.has_dropout = dropout_p > 0.0;
  p.drop_scale = (float)(1.0 / (1.0 - dropout_p));
  // dropout_threshold() in attention.py: min(int(p * 2**32), 2**32 - 1)
  p.drop_threshold = (uint32_t)std::min<uint64_t>((uint64_t)(dropout_p * 4294967296.0), 0xFFFFFFFFull);
  p.seed_hash = mix32((uint32_t)(seed & 0xFFFFFFFF));
  p.window_left = (long long)window_left;
  p.window_right = (long long)window_right;
  p.diag_offset = (long long)diag_offset;
  // cp.async moves 16-byte chunks: every row start must be 16-byte aligned (strides of size-1
  // dims never move the pointer, so they do not count).
  auto strides8 = [](const Tensor& x) {
    for (int d = 0; d < 3; ++d)
      if (x.size(d) > 1 && x.stride(d) % 8 != 0) return false;
    return true;
  };
  p.vec_loads = p.E % 8 == 0 && p.Ev % 8 == 0 && strides8(q) && strides8(k) && strides8(v) && aligned16(q) &&
                aligned16(k) && aligned16(v);
  p.num_splits = 1;
  return p;
}

int head_bucket(const AttnParams& p) {
  const int e = std::max(p.E, p.Ev);
  return e <= 64 ? 64 : e <= 128 ? 128 : 256;
}

// Whether a tensor-core kernel's shared memory fits this GPU. Per block: forward 36 / 68 / 132 KB
// and backward up to 73 / 121 (or 87) / 151 KB for head-size buckets 64 / 128 / 256, so A100 and
// H100 run everything, 99 KB parts fall back to SIMT for 256. FASTATTN_CUDA_ATTN_SIMT=1 forces the
// SIMT kernels (tests use it to cover the fallback on any GPU).
bool mma_fits(int bytes) {
  const char* force = std::getenv("FASTATTN_CUDA_ATTN_SIMT");
  if (force != nullptr && force[0] == '1') return false;
  return bytes <= (int)at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
}

template <typename Kernel>
void allow_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Grids are sized by max_L / max_S: p.L / p.S when dense, the longest sequence's when varlen.
template <typename T>
void launch_fwd_simt(const AttnParams& p, int max_L, cudaStream_t stream) {
  attn_fwd_simt_kernel<T><<<dim3(ceil_div(max_L, kSimtWarps), p.Hq, p.B), kSimtWarps * 32, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_bwd_simt(const AttnParams& p, int max_L, int max_S, cudaStream_t stream) {
  attn_bwd_dkdv_simt_kernel<T><<<dim3(ceil_div(max_S, kSimtWarps), p.Hkv, p.B), kSimtWarps * 32, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  attn_bwd_dq_simt_kernel<T><<<dim3(ceil_div(max_L, kSimtWarps), p.Hq, p.B), kSimtWarps * 32, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Split-KV plan for the tensor-core forward (dense only): when L <= 16 and the query tiles fill
// less than one wave of the GPU, each tile's keys are cut into slices of split_keys (a multiple of
// the key tile, >= 256 keys) so that about two blocks per SM run. FASTATTN_CUDA_ATTN_SPLIT_KEYS=n
// forces slices of n keys (rounded up to the key tile) whenever L <= 16 (the tests use it).
void plan_splits(AttnParams& p) {
  p.num_splits = 1;
  if (p.cu_q != nullptr || p.L > 16 || p.S == 0) return;
  const int64_t blocks = (int64_t)ceil_div(p.L, kFwdBM) * p.Hq * p.B;  // B * Hq alone may pass 2^31
  int split_keys = 0;
  const char* force = std::getenv("FASTATTN_CUDA_ATTN_SPLIT_KEYS");
  if (force != nullptr && std::atoi(force) > 0) {
    split_keys = std::atoi(force);
  } else {
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    if (blocks >= sms || p.S < 512) return;
    split_keys = std::max(256, ceil_div(p.S, ceil_div(2 * sms, (int)blocks)));  // blocks < sms here
  }
  split_keys = ceil_div(split_keys, kFwdBN) * kFwdBN;
  const int splits = ceil_div(p.S, split_keys);
  if (splits < 2) return;
  p.num_splits = splits;
  p.split_keys = split_keys;
}

template <typename T, int D>
void launch_fwd_mma(const AttnParams& p_in, int max_L, cudaStream_t stream) {
  constexpr int smem = fwd_smem_bytes<D>();
  if (!mma_fits(smem)) return launch_fwd_simt<T>(p_in, max_L, stream);
  AttnParams p = p_in;
  plan_splits(p);
  at::Tensor o_part, lse_part;  // kept alive until both kernels are queued (stream order frees them after)
  if (p.num_splits > 1) {
    const int64_t rows = (int64_t)p.B * p.Hq * p.L;
    const auto f32 = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, at::cuda::current_device());
    o_part = at::empty({rows, p.num_splits, p.Ev}, f32);
    lse_part = at::empty({rows, p.num_splits}, f32);
    p.o_part = o_part.data_ptr<float>();
    p.lse_part = lse_part.data_ptr<float>();
  }
  auto kernel = p.cu_q != nullptr ? attn_fwd_mma_kernel<T, D, true> : attn_fwd_mma_kernel<T, D, false>;
  allow_smem(kernel, smem);
  kernel<<<dim3(ceil_div(max_L, kFwdBM) * p.num_splits, p.Hq, p.B), kFwdThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.num_splits > 1) {
    const int64_t rows = (int64_t)p.B * p.Hq * p.L;
    attn_fwd_split_reduce_kernel<T><<<(unsigned)((rows + 7) / 8), 256, 0, stream>>>(p, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int D, int STAGES>
void launch_dkdv(const AttnParams& p, int max_S, cudaStream_t stream) {
  constexpr int smem = dkdv_smem_bytes<D, STAGES>();
  auto kernel = p.cu_q != nullptr ? attn_bwd_dkdv_kernel<T, D, STAGES, true> : attn_bwd_dkdv_kernel<T, D, STAGES, false>;
  allow_smem(kernel, smem);
  kernel<<<dim3(ceil_div(max_S, kBwdBN), p.Hkv, p.B), kBwdThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Backward with the tensor-core kernels: dK/dV with a double-buffered Q/dO pipeline where it
// fits (D = 64 always, D = 128 on A100/H100-class parts), then dQ.
template <typename T, int D>
void launch_bwd_mma(const AttnParams& p, int max_L, int max_S, cudaStream_t stream) {
  constexpr int dq_smem = dq_smem_bytes<D>();
  if (!mma_fits(std::max(dkdv_smem_bytes<D, 1>(), dq_smem))) return launch_bwd_simt<T>(p, max_L, max_S, stream);
  if constexpr (D == 64) {
    launch_dkdv<T, D, 2>(p, max_S, stream);
  } else if constexpr (D == 128) {
    if (mma_fits(dkdv_smem_bytes<D, 2>())) {
      launch_dkdv<T, D, 2>(p, max_S, stream);
    } else {
      launch_dkdv<T, D, 1>(p, max_S, stream);
    }
  } else {
    launch_dkdv<T, D, 1>(p, max_S, stream);
  }
  auto dq = p.cu_q != nullptr ? attn_bwd_dq_kernel<T, D, true> : attn_bwd_dq_kernel<T, D, false>;
  allow_smem(dq, dq_smem);
  dq<<<dim3(ceil_div(max_L, kBwdBM), p.Hq, p.B), kBwdThreads, dq_smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void dispatch_fwd_mma(const AttnParams& p, int max_L, cudaStream_t stream) {
  switch (head_bucket(p)) {
    case 64: return launch_fwd_mma<T, 64>(p, max_L, stream);
    case 128: return launch_fwd_mma<T, 128>(p, max_L, stream);
    default: return launch_fwd_mma<T, 256>(p, max_L, stream);
  }
}

template <typename T>
void dispatch_bwd_mma(const AttnParams& p, int max_L, int max_S, cudaStream_t stream) {
  switch (head_bucket(p)) {
    case 64: return launch_bwd_mma<T, 64>(p, max_L, max_S, stream);
    case 128: return launch_bwd_mma<T, 128>(p, max_L, max_S, stream);
    default: return launch_bwd_mma<T, 256>(p, max_L, max_S, stream);
  }
}

// Forward / backward launches shared by the dense and the varlen ops (p fully filled in).
void run_fwd(const AttnParams& p, at::ScalarType dtype, int max_L, cudaStream_t stream) {
  switch (dtype) {
    case at::kHalf: dispatch_fwd_mma<__half>(p, max_L, stream); break;
    case at::kBFloat16: dispatch_fwd_mma<__nv_bfloat16>(p, max_L, stream); break;
    default: launch_fwd_simt<float>(p, max_L, stream);
  }
}

// delta = rowsum(dO * O) over `rows` contiguous rows (varlen_heads: see attn_bwd_delta_kernel),
// then dK/dV and dQ.
void run_bwd(const AttnParams& p, at::ScalarType dtype, const Tensor& out_c, int64_t rows, int varlen_heads,
             int max_L, int max_S, cudaStream_t stream) {
  const unsigned delta_blocks = (unsigned)((rows + 7) / 8);
  switch (dtype) {
    case at::kHalf:
      attn_bwd_delta_kernel<__half><<<delta_blocks, 256, 0, stream>>>(
          static_cast<const __half*>(p.dout), static_cast<const __half*>(out_c.data_ptr()), p.delta, rows, p.Ev,
          varlen_heads);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dispatch_bwd_mma<__half>(p, max_L, max_S, stream);
      break;
    case at::kBFloat16:
      attn_bwd_delta_kernel<__nv_bfloat16><<<delta_blocks, 256, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(p.dout), static_cast<const __nv_bfloat16*>(out_c.data_ptr()), p.delta,
          rows, p.Ev, varlen_heads);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dispatch_bwd_mma<__nv_bfloat16>(p, max_L, max_S, stream);
      break;
    default:
      attn_bwd_delta_kernel<float><<<delta_blocks, 256, 0, stream>>>(
          static_cast<const float*>(p.dout), static_cast<const float*>(out_c.data_ptr()), p.delta, rows, p.Ev,
          varlen_heads);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch_bwd_simt<float>(p, max_L, max_S, stream);
  }
}

std::tuple<Tensor, Tensor> attention_fwd_cuda(const Tensor& query, const Tensor& key, const Tensor& value,
                                              const std::optional<Tensor>& attn_bias, double dropout_p, double scale,
                                              int64_t window_left, int64_t window_right, int64_t diag_offset,
                                              double softcap, int64_t seed) {
  check_qkv(query, key, value);
  const c10::cuda::CUDAGuard guard(query.device());
  AttnParams p = make_params(query, key, value, attn_bias, dropout_p, scale, window_left, window_right, diag_offset,
                             softcap, seed);
  Tensor out = at::empty({p.B, p.Hq, p.L, p.Ev}, query.options());
  Tensor lse = at::empty({p.B, p.Hq, p.L}, query.options().dtype(at::kFloat));
  if (lse.numel() == 0) return {out, lse};
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  run_fwd(p, query.scalar_type(), p.L, at::cuda::getCurrentCUDAStream());
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd_cuda(const Tensor& grad_out, const Tensor& query, const Tensor& key,
                                                      const Tensor& value, const Tensor& out, const Tensor& lse,
                                                      const std::optional<Tensor>& attn_bias, double dropout_p,
                                                      double scale, int64_t window_left, int64_t window_right,
                                                      int64_t diag_offset, double softcap, int64_t seed) {
  check_qkv(query, key, value);
  const c10::cuda::CUDAGuard guard(query.device());
  AttnParams p = make_params(query, key, value, attn_bias, dropout_p, scale, window_left, window_right, diag_offset,
                             softcap, seed);
  const std::vector<int64_t> out_shape{p.B, p.Hq, p.L, p.Ev};
  for (const auto& [name, x] : {std::pair<const char*, const Tensor*>{"grad_out", &grad_out}, {"out", &out}}) {
    TORCH_CHECK(x->device() == query.device(), "attention_bwd (cuda): ", name, " is on ", x->device(),
                " but query on ", query.device());
    TORCH_CHECK(x->scalar_type() == query.scalar_type(), "attention_bwd (cuda): ", name, " must have query's dtype ",
                query.scalar_type(), ", got ", x->scalar_type());
    TORCH_CHECK(x->sizes() == at::IntArrayRef(out_shape), "attention_bwd (cuda): ", name,
                " must have shape (B, Hq, L, Ev) = ", at::IntArrayRef(out_shape), ", got ", x->sizes());
  }
  TORCH_CHECK(lse.device() == query.device() && lse.scalar_type() == at::kFloat &&
                  lse.sizes() == at::IntArrayRef({p.B, p.Hq, p.L}),
              "attention_bwd (cuda): lse must be float32 of shape (B, Hq, L) on query's device, got ",
              lse.scalar_type(), " ", lse.sizes(), " on ", lse.device());

  if ((int64_t)p.B * p.Hq * p.L == 0 || (int64_t)p.B * p.Hkv * p.S == 0) {  // nothing to attend: zero grads
    return {at::zeros_like(query, at::MemoryFormat::Contiguous), at::zeros_like(key, at::MemoryFormat::Contiguous),
            at::zeros_like(value, at::MemoryFormat::Contiguous)};
  }
  // Every element is written by the kernels below.
  Tensor dq = at::empty_like(query, at::MemoryFormat::Contiguous);
  Tensor dk = at::empty_like(key, at::MemoryFormat::Contiguous);
  Tensor dv = at::empty_like(value, at::MemoryFormat::Contiguous);

  const Tensor dout_c = grad_out.contiguous();
  const Tensor out_c = out.contiguous();
  const Tensor lse_c = lse.contiguous();
  Tensor delta = at::empty({p.B, p.Hq, p.L}, query.options().dtype(at::kFloat));
  p.dout = dout_c.data_ptr();
  p.lse_in = lse_c.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.vec_loads = p.vec_loads && aligned16(dout_c);  // dO tiles go through cp.async too (row stride Ev)

  run_bwd(p, query.scalar_type(), out_c, (int64_t)p.B * p.Hq * p.L, 0, p.L, p.S, at::cuda::getCurrentCUDAStream());
  return {dq, dk, dv};
}

// ---------------------------------------------------------------------------------------------
// Packed variable-length batches: q (Tq, Hq, E), k (Tk, Hkv, E), v (Tk, Hkv, Ev), cu_seqlens int32.
// ---------------------------------------------------------------------------------------------
void check_varlen(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q, const Tensor& cu_k,
                  int64_t max_seqlen_q, int64_t max_seqlen_k) {
  for (const auto& [name, x] : {std::pair<const char*, const Tensor*>{"query", &q}, {"key", &k}, {"value", &v}}) {
    TORCH_CHECK(x->dim() == 3, "attention_varlen (cuda): ", name, " must be 3-D (total_tokens, heads, head_dim), got ",
                x->dim(), "-D");
  }
  for (const auto& [name, x] :
       {std::pair<const char*, const Tensor*>{"cu_seqlens_q", &cu_q}, {"cu_seqlens_k", &cu_k}}) {
    TORCH_CHECK(x->device() == q.device(), "attention_varlen (cuda): ", name, " is on ", x->device(),
                " but query on ", q.device());
    TORCH_CHECK(x->scalar_type() == at::kInt && x->dim() == 1 && x->is_contiguous(), "attention_varlen (cuda): ",
                name, " must be a contiguous 1-D int32 tensor, got ", x->scalar_type(), " of shape ", x->sizes());
  }
  TORCH_CHECK(cu_q.numel() >= 1 && cu_q.numel() == cu_k.numel(), "attention_varlen (cuda): cu_seqlens_q and "
              "cu_seqlens_k must both have N + 1 >= 1 entries, got ", cu_q.numel(), " and ", cu_k.numel());
  TORCH_CHECK(cu_q.numel() - 1 <= 65535, "attention_varlen (cuda): at most 65535 sequences, got ", cu_q.numel() - 1);
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0 && max_seqlen_q < std::numeric_limits<int>::max() &&
                  max_seqlen_k < std::numeric_limits<int>::max(),
              "attention_varlen (cuda): max_seqlen_q / max_seqlen_k out of range: ", max_seqlen_q, ", ", max_seqlen_k);
  // (Tq, H, E) seen as the (1, H, Tq, E) batch the dense checks expect
  check_qkv(q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2), v.unsqueeze(0).transpose(1, 2));
}

AttnParams make_varlen_params(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q,
                              const Tensor& cu_k, double dropout_p, double scale, int64_t window_left,
                              int64_t window_right, bool bottom_right, double softcap, int64_t seed) {
  AttnParams p = make_params(q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2),
                             v.unsqueeze(0).transpose(1, 2), std::nullopt, dropout_p, scale, window_left,
                             window_right, 0, softcap, seed);
  p.q_sb = p.k_sb = p.v_sb = 0;  // sequences are found by their first row, not a batch stride
  p.B = (int)(cu_q.numel() - 1);
  p.Tq = (int)q.size(0);
  p.cu_q = cu_q.data_ptr<int>();
  p.cu_k = cu_k.data_ptr<int>();
  p.bottom_right = bottom_right;
  return p;
}

std::tuple<Tensor, Tensor> attention_varlen_fwd_cuda(const Tensor& query, const Tensor& key, const Tensor& value,
                                                     const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                     int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p,
                                                     double scale, int64_t window_left, int64_t window_right,
                                                     bool bottom_right, double softcap, int64_t seed) {
  check_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const c10::cuda::CUDAGuard guard(query.device());
  AttnParams p = make_varlen_params(query, key, value, cu_seqlens_q, cu_seqlens_k, dropout_p, scale, window_left,
                                    window_right, bottom_right, softcap, seed);
  Tensor out = at::empty({query.size(0), p.Hq, p.Ev}, query.options());
  Tensor lse = at::empty({p.Hq, query.size(0)}, query.options().dtype(at::kFloat));
  if (lse.numel() == 0 || p.B == 0 || max_seqlen_q == 0) return {out, lse};
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  run_fwd(p, query.scalar_type(), (int)max_seqlen_q, at::cuda::getCurrentCUDAStream());
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_varlen_bwd_cuda(
    const Tensor& grad_out, const Tensor& query, const Tensor& key, const Tensor& value, const Tensor& out,
    const Tensor& lse, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double dropout_p, double scale, int64_t window_left, int64_t window_right,
    bool bottom_right, double softcap, int64_t seed) {
  check_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const c10::cuda::CUDAGuard guard(query.device());
  AttnParams p = make_varlen_params(query, key, value, cu_seqlens_q, cu_seqlens_k, dropout_p, scale, window_left,
                                    window_right, bottom_right, softcap, seed);
  const int64_t Tq = query.size(0), Tk = key.size(0);
  const std::vector<int64_t> out_shape{Tq, p.Hq, p.Ev};
  for (const auto& [name, x] : {std::pair<const char*, const Tensor*>{"grad_out", &grad_out}, {"out", &out}}) {
    TORCH_CHECK(x->device() == query.device(), "attention_varlen_bwd (cuda): ", name, " is on ", x->device(),
                " but query on ", query.device());
    TORCH_CHECK(x->scalar_type() == query.scalar_type(), "attention_varlen_bwd (cuda): ", name,
                " must have query's dtype ", query.scalar_type(), ", got ", x->scalar_type());
    TORCH_CHECK(x->sizes() == at::IntArrayRef(out_shape), "attention_varlen_bwd (cuda): ", name,
                " must have shape (Tq, Hq, Ev) = ", at::IntArrayRef(out_shape), ", got ", x->sizes());
  }
  TORCH_CHECK(lse.device() == query.device() && lse.scalar_type() == at::kFloat &&
                  lse.sizes() == at::IntArrayRef({p.Hq, Tq}),
              "attention_varlen_bwd (cuda): lse must be float32 of shape (Hq, Tq) on query's device, got ",
              lse.scalar_type(), " ", lse.sizes(), " on ", lse.device());
  if (Tq * p.Hq == 0 || Tk * p.Hkv == 0 || p.B == 0 || max_seqlen_q == 0 || max_seqlen_k == 0) {
    return {at::zeros_like(query, at::MemoryFormat::Contiguous), at::zeros_like(key, at::MemoryFormat::Contiguous),
            at::zeros_like(value, at::MemoryFormat::Contiguous)};
  }
  // cu_seqlens run from 0 to Tq / Tk: every row belongs to a sequence and is written by the kernels.
  Tensor dq = at::empty_like(query, at::MemoryFormat::Contiguous);
  Tensor dk = at::empty_like(key, at::MemoryFormat::Contiguous);
  Tensor dv = at::empty_like(value, at::MemoryFormat::Contiguous);
  const Tensor dout_c = grad_out.contiguous();
  const Tensor out_c = out.contiguous();
  const Tensor lse_c = lse.contiguous();
  Tensor delta = at::empty({p.Hq, Tq}, query.options().dtype(at::kFloat));
  p.dout = dout_c.data_ptr();
  p.lse_in = lse_c.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.vec_loads = p.vec_loads && aligned16(dout_c);
  run_bwd(p, query.scalar_type(), out_c, Tq * p.Hq, p.Hq, (int)max_seqlen_q, (int)max_seqlen_k,
          at::cuda::getCurrentCUDAStream());
  return {dq, dk, dv};
}

}  // namespace
}  // namespace cuda_attn
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("attention_fwd", &fastattn::cuda_attn::attention_fwd_cuda);
  m.impl("attention_bwd", &fastattn::cuda_attn::attention_bwd_cuda);
  m.impl("attention_varlen_fwd", &fastattn::cuda_attn::attention_varlen_fwd_cuda);
  m.impl("attention_varlen_bwd", &fastattn::cuda_attn::attention_varlen_bwd_cuda);
}
