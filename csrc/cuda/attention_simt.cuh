// SIMT kernels: one warp per query row (forward, dQ) or per key row (dK, dV), fp32 arithmetic.
// The fp32 path, and the fp16/bf16 fallback when a GPU has too little shared memory for the
// tensor-core kernels (head size 256 on a 99 KB-per-block part). Correct for every shape the
// contract allows, not fast: each (query, key) pair costs a warp reduction. A lane owns head-dim columns lane, lane+32, ... (up to 8 of them: head size <= 256).
#pragma once

#include "attention_common.cuh"

namespace fastattn {
namespace cuda_attn {

constexpr int kSimtWarps = 4, kSimtCols = 8;  // 4 rows per block; 8 * 32 = 256 columns

template <typename T>
__device__ __forceinline__ void load_row(float (&x)[kSimtCols], const T* row, int n, int lane) {
#pragma unroll
  for (int u = 0; u < kSimtCols; ++u) {
    const int c = lane + 32 * u;
    x[u] = c < n ? Dt<T>::to_float(row[c]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ float dot_row(const float (&x)[kSimtCols], const T* row, int n, int lane) {
  float acc = 0.f;
#pragma unroll
  for (int u = 0; u < kSimtCols; ++u) {
    const int c = lane + 32 * u;
    if (c < n) acc += x[u] * Dt<T>::to_float(row[c]);
  }
  return warp_sum(acc);
}

// This lane's part of a dot product of two register rows.
__device__ __forceinline__ float dot_regs(const float (&x)[kSimtCols], const float (&y)[kSimtCols]) {
  float acc = 0.f;
#pragma unroll
  for (int u = 0; u < kSimtCols; ++u) acc += x[u] * y[u];
  return acc;
}

template <typename T>
__global__ void __launch_bounds__(kSimtWarps * 32) attn_fwd_simt_kernel(const AttnParams p) {
  const int lane = threadIdx.x & 31;
  const int i = blockIdx.x * kSimtWarps + (threadIdx.x >> 5), h = blockIdx.y, b = blockIdx.z;
  const Seq sq = sequence_any(p, b);
  if (i >= sq.L) return;
  const int hk = h / p.group;
  const T* kg = static_cast<const T*>(p.k) + k_offset(p, sq, b, hk);
  const T* vg = static_cast<const T*>(p.v) + v_offset(p, sq, b, hk);
  float q[kSimtCols], acc[kSimtCols];
  load_row(q, static_cast<const T*>(p.q) + q_offset(p, sq, b, h) + i * p.q_sl, p.E, lane);
#pragma unroll
  for (int u = 0; u < kSimtCols; ++u) acc[u] = 0.f;
  const uint32_t rhash = p.has_dropout ? drop_row_hash(p, sq, b, h, i) : 0u;

  int j_lo, j_hi;
  key_range(p, sq, i, i, j_lo, j_hi);
  float m = -INFINITY, l = 0.f;  // running max (log2 units) and sum
  for (int j = j_lo; j < j_hi; ++j) {
    if (!visible(p, sq, i, j)) continue;
    float th;
    const float s = score_nat<T>(p, dot_row(q, kg + j * p.k_sl, p.E, lane), b, h, i, j, th);
    if (s == -INFINITY) continue;
    const float sl = s * kLog2e;
    const float m_new = fmaxf(m, sl);
    const float alpha = exp2f(m - m_new);
    const float pr = exp2f(sl - m_new);
    m = m_new;
    l = l * alpha + pr;
    const float pk = (p.has_dropout && !drop_keep(p, rhash, j)) ? 0.f : pr;
    const T* vrow = vg + j * p.v_sl;
#pragma unroll
    for (int u = 0; u < kSimtCols; ++u) {
      const int c = lane + 32 * u;
      acc[u] = acc[u] * alpha + (c < p.Ev ? pk * Dt<T>::to_float(vrow[c]) : 0.f);
    }
  }
  const float inv = l > 0.f ? p.drop_scale / l : 0.f;
  T* out = static_cast<T*>(p.out) + out_row(p, sq, b, h, i) * p.Ev;
#pragma unroll
  for (int u = 0; u < kSimtCols; ++u) {
    const int c = lane + 32 * u;
    if (c < p.Ev) out[c] = Dt<T>::from_float(acc[u] * inv);
  }
  if (lane == 0) p.lse[lse_row(p, sq, b, h, i)] = l > 0.f ? (m + log2f(l)) * kLn2 : INFINITY;
}

// Returns false when the entry contributes nothing (not visible, or zero probability).
template <typename T>
__device__ __forceinline__ bool simt_bwd_entry(const AttnParams& p, const Seq& sq, int b, int h, int i, int j, float dot,
                                               float lse_log2, float& prob, float& th) {
  if (!visible(p, sq, i, j)) return false;
  th = 0.f;
  const float s = score_nat<T>(p, dot, b, h, i, j, th);
  prob = exp2f(s * kLog2e - lse_log2);
  return prob != 0.f;
}

template <typename T>
__global__ void __launch_bounds__(kSimtWarps * 32) attn_bwd_dq_simt_kernel(const AttnParams p) {
  const int lane = threadIdx.x & 31;
  const int i = blockIdx.x * kSimtWarps + (threadIdx.x >> 5), h = blockIdx.y, b = blockIdx.z;
  const Seq sq = sequence_any(p, b);
  if (i >= sq.L) return;
  const int hk = h / p.group;
  const T* kg = static_cast<const T*>(p.k) + k_offset(p, sq, b, hk);
  const T* vg = static_cast<const T*>(p.v) + v_offset(p, sq, b, hk);
  const int64_t orow = out_row(p, sq, b, h, i), lrow = lse_row(p, sq, b, h, i);
  float q[kSimtCols], dO[kSimtCols], dq[kSimtCols];
  load_row(q, static_cast<const T*>(p.q) + q_offset(p, sq, b, h) + i * p.q_sl, p.E, lane);
  load_row(dO, static_cast<const T*>(p.dout) + orow * p.Ev, p.Ev, lane);
#pragma unroll
  for (int u = 0; u < kSimtCols; ++u) dq[u] = 0.f;
  const float lse_log2 = p.lse_in[lrow] * kLog2e, delta = p.delta[lrow];
  const uint32_t rhash = p.has_dropout ? drop_row_hash(p, sq, b, h, i) : 0u;

  int j_lo, j_hi;
  key_range(p, sq, i, i, j_lo, j_hi);
  for (int j = j_lo; j < j_hi; ++j) {
    const T* krow = kg + j * p.k_sl;
    float prob, th;
    if (!simt_bwd_entry<T>(p, sq, b, h, i, j, dot_row(q, krow, p.E, lane), lse_log2, prob, th)) continue;
    const float z = p.has_dropout ? (drop_keep(p, rhash, j) ? p.drop_scale : 0.f) : 1.f;
    float ds = prob * (dot_row(dO, vg + j * p.v_sl, p.Ev, lane) * z - delta);
    if (p.has_softcap) ds *= 1.f - th * th;
#pragma unroll
    for (int u = 0; u < kSimtCols; ++u) {
      const int c = lane + 32 * u;
      if (c < p.E) dq[u] += ds * Dt<T>::to_float(krow[c]);
    }
  }
  T* dst = static_cast<T*>(p.dq) + orow * p.E;
#pragma unroll
  for (int u = 0; u < kSimtCols; ++u) {
    const int c = lane + 32 * u;
    if (c < p.E) dst[c] = Dt<T>::from_float(dq[u] * p.scale);
  }
}

template <typename T>
__global__ void __launch_bounds__(kSimtWarps * 32) attn_bwd_dkdv_simt_kernel(const AttnParams p) {
  const int lane = threadIdx.x & 31;
  const int j = blockIdx.x * kSimtWarps + (threadIdx.x >> 5), hk = blockIdx.y, b = blockIdx.z;
  const Seq sq = sequence_any(p, b);
  if (j >= sq.S) return;
  float k[kSimtCols], v[kSimtCols], dk[kSimtCols], dv[kSimtCols], x[kSimtCols];
  load_row(k, static_cast<const T*>(p.k) + k_offset(p, sq, b, hk) + j * p.k_sl, p.E, lane);
  load_row(v, static_cast<const T*>(p.v) + v_offset(p, sq, b, hk) + j * p.v_sl, p.Ev, lane);
#pragma unroll
  for (int u = 0; u < kSimtCols; ++u) dk[u] = dv[u] = 0.f;

  int i_lo, i_hi;
  query_range(p, sq, j, j, i_lo, i_hi);
  for (int h = hk * p.group; h < (hk + 1) * p.group; ++h) {
    const T* qg = static_cast<const T*>(p.q) + q_offset(p, sq, b, h);
    const int64_t lrow = lse_row(p, sq, b, h, 0);
    for (int i = i_lo; i < i_hi; ++i) {
      const T* qrow = qg + i * p.q_sl;
      float prob, th;
      if (!simt_bwd_entry<T>(p, sq, b, h, i, j, dot_row(k, qrow, p.E, lane), p.lse_in[lrow + i] * kLog2e, prob, th))
        continue;
      const float z = p.has_dropout ? (drop_keep(p, drop_row_hash(p, sq, b, h, i), j) ? p.drop_scale : 0.f) : 1.f;
      load_row(x, static_cast<const T*>(p.dout) + out_row(p, sq, b, h, i) * p.Ev, p.Ev, lane);  // dO row
      float ds = prob * (warp_sum(dot_regs(x, v)) * z - p.delta[lrow + i]);
      if (p.has_softcap) ds *= 1.f - th * th;
      const float pz = prob * z;
#pragma unroll
      for (int u = 0; u < kSimtCols; ++u) dv[u] += pz * x[u];
#pragma unroll
      for (int u = 0; u < kSimtCols; ++u) {
        const int c = lane + 32 * u;
        if (c < p.E) dk[u] += ds * Dt<T>::to_float(qrow[c]);
      }
    }
  }
  T* dkr = static_cast<T*>(p.dk) + key_row(p, sq, b, hk, j) * p.E;
  T* dvr = static_cast<T*>(p.dv) + key_row(p, sq, b, hk, j) * p.Ev;
#pragma unroll
  for (int u = 0; u < kSimtCols; ++u) {
    const int c = lane + 32 * u;
    if (c < p.E) dkr[c] = Dt<T>::from_float(dk[u] * p.scale);
    if (c < p.Ev) dvr[c] = Dt<T>::from_float(dv[u]);
  }
}

}  // namespace cuda_attn
}  // namespace fastattn
