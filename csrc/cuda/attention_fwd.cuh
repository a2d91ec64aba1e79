// Forward kernel for fp16 / bf16 (flash-attention-2 style, tensor cores).
//
// Blocking: one thread block (8 warps) per (128-query tile, query head, batch). Each warp owns 16
// query rows; its scores S = Q K^T for a 64-key tile live in registers as 8 m16n8 accumulators,
// and so does its output O (16 x D, D/8 accumulators). Per key tile:
//   1. wait for K_j (cp.async), start loading V_j            (the V load overlaps step 2-3)
//   2. S = Q K_j^T with mma.sync (Q and K read from shared memory)
//   3. scale / softcap / bias / mask, online softmax in the log2 domain, dropout
//   4. wait for V_j, start loading K_{j+1}                   (the K load overlaps step 5)
//   5. O += P V_j: P's accumulators are re-packed as A fragments in registers, V_j is read with
//      ldmatrix.trans.
// Key tiles no query of the block can see (causal / window) are skipped.
//
// Varlen: blockIdx.z is the sequence (sequence()), query tiles past its end exit at once.
// Split-KV (decoding, few query tiles): blockIdx.x also picks a slice of the keys; the block writes
// its normalised partial output and lse, attn_fwd_split_reduce_kernel combines the slices.
#pragma once

#include "attention_common.cuh"

namespace fastattn {
namespace cuda_attn {

constexpr int kFwdBM = 128, kFwdBN = 64, kFwdThreads = 256;  // 8 warps x 16 query rows

template <int D>
constexpr int fwd_smem_bytes() {
  return (kFwdBM + 2 * kFwdBN) * (D + 8) * 2;
}

template <typename T, int D, bool VARLEN>
__global__ void __launch_bounds__(kFwdThreads) attn_fwd_mma_kernel(const AttnParams p) {
  constexpr int BM = kFwdBM, BN = kFwdBN, SROW = D + 8;
  constexpr int NT_S = BN / 8;  // score n-tiles per warp
  constexpr int NT_O = D / 8;   // output n-tiles per warp
  static_assert(BM == 16 * (kFwdThreads / 32), "one warp per 16 query rows");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sK = sQ + BM * SROW;
  uint16_t* sV = sK + BN * SROW;

  const int split = blockIdx.x % p.num_splits;
  const int m0 = (blockIdx.x / p.num_splits) * BM, h = blockIdx.y, b = blockIdx.z;
  const Seq sq = sequence<VARLEN>(p, b);
  if (m0 >= sq.L) return;  // varlen: the grid is sized for the longest sequence
  const int hk = h / p.group;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int row[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};  // this thread's query rows

  const uint16_t* qg = static_cast<const uint16_t*>(p.q) + q_offset(p, sq, b, h);
  const uint16_t* kg = static_cast<const uint16_t*>(p.k) + k_offset(p, sq, b, hk);
  const uint16_t* vg = static_cast<const uint16_t*>(p.v) + v_offset(p, sq, b, hk);

  int j_lo, j_hi;
  key_range(p, sq, m0, min(m0 + BM, sq.L) - 1, j_lo, j_hi);
  if (p.num_splits > 1) {  // this block's slice (block aligned, so no tile crosses two slices)
    j_lo = max(j_lo, split * p.split_keys);
    j_hi = max(j_lo, min(j_hi, (split + 1) * p.split_keys));
  }
  const int nb_begin = j_lo / BN;
  const int nb_end = j_hi > j_lo ? (j_hi + BN - 1) / BN : nb_begin;

  float o[NT_O][4];
#pragma unroll
  for (int nd = 0; nd < NT_O; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};  // running max, log2 units
  float l_run[2] = {0.f, 0.f};              // this thread's part of the running sum
  uint32_t rhash[2] = {0u, 0u};
  if (p.has_dropout) {
    rhash[0] = drop_row_hash(p, sq, b, h, row[0]);
    rhash[1] = drop_row_hash(p, sq, b, h, row[1]);
  }

  if (nb_begin < nb_end) {
    load_tile<BM, D, kFwdThreads>(sQ, qg, p.q_sl, m0, sq.L, p.E, p.vec_loads);
    load_tile<BN, D, kFwdThreads>(sK, kg, p.k_sl, nb_begin * BN, sq.S, p.E, p.vec_loads);
    cp_async_commit();
  }

  for (int nb = nb_begin; nb < nb_end; ++nb) {
    const int n0 = nb * BN;
    cp_async_wait_all();
    __syncthreads();  // Q, K_j landed; every warp is done with V_{j-1}
    load_tile<BN, D, kFwdThreads>(sV, vg, p.v_sl, n0, sq.S, p.Ev, p.vec_loads);
    cp_async_commit();

    float s[NT_S][4];
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
    warp_gemm_abt<T, NT_S, D>(s, sQ + warp * 16 * SROW, SROW, sK, SROW, lane);

    // Scores to log2 units, masked entries to -inf.
    if (!p.has_bias && !p.has_softcap && tile_fully_visible(p, sq, m0, BM, n0, BN)) {
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] *= p.scale_log2;
    } else {
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = row[e >> 1], j = n0 + nt * 8 + 2 * t + (e & 1);
          float th;
          s[nt][e] = visible(p, sq, i, j) ? score_nat<T>(p, s[nt][e], b, h, i, j, th) * kLog2e : -INFINITY;
        }
    }

    // Online softmax; a quad of lanes (same g) holds one row.
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * rr], s[nt][2 * rr + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[rr], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: keep exp2 at 0
      const float alpha = exp2f(m_run[rr] - m_use);
      m_run[rr] = m_new;
      float rsum = 0.f;
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float pr = exp2f(s[nt][2 * rr + c] - m_use);
          rsum += pr;  // the normaliser counts dropped entries too
          if (p.has_dropout && !drop_keep(p, rhash[rr], n0 + nt * 8 + 2 * t + c)) pr = 0.f;
          s[nt][2 * rr + c] = pr;
        }
      l_run[rr] = l_run[rr] * alpha + rsum;
#pragma unroll
      for (int nd = 0; nd < NT_O; ++nd) {
        o[nd][2 * rr] *= alpha;
        o[nd][2 * rr + 1] *= alpha;
      }
    }

    cp_async_wait_all();
    __syncthreads();  // V_j landed; every warp is done with K_j
    if (nb + 1 < nb_end) {
      load_tile<BN, D, kFwdThreads>(sK, kg, p.k_sl, n0 + BN, sq.S, p.E, p.vec_loads);
      cp_async_commit();
    }

    // O += P V_j. The C fragments of n-tiles 2kk, 2kk+1 are exactly the A fragment of k-step kk.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t a[4] = {Dt<T>::pack(s[2 * kk][0], s[2 * kk][1]), Dt<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                             Dt<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             Dt<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, ldm_trans_row(sV, SROW, kk * 16, np * 16, lane));
        mma16816<T>(o[2 * np], a, bf[0], bf[1]);
        mma16816<T>(o[2 * np + 1], a, bf[2], bf[3]);
      }
    }
  }

  // Epilogue: O / l (times the dropout scale), lse = (m + log2 l) * ln 2; empty rows give 0, +inf.
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float l = l_run[rr];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int i = row[rr];
    if (i >= sq.L) continue;
    const float inv = l > 0.f ? p.drop_scale / l : 0.f;
    if (p.num_splits > 1) {  // partial result of this key slice, fp32; lse in log2 units, -inf if empty
      const int64_t prow = lse_row(p, sq, b, h, i) * p.num_splits + split;
      float* dst = p.o_part + prow * p.Ev;
#pragma unroll
      for (int nd = 0; nd < NT_O; ++nd)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int col = nd * 8 + 2 * t + c;
          if (col < p.Ev) dst[col] = o[nd][2 * rr + c] * inv;
        }
      if (t == 0) p.lse_part[prow] = l > 0.f ? m_run[rr] + log2f(l) : -INFINITY;
      continue;
    }
    T* dst = out + out_row(p, sq, b, h, i) * p.Ev;
#pragma unroll
    for (int nd = 0; nd < NT_O; ++nd)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = nd * 8 + 2 * t + c;
        if (col < p.Ev) dst[col] = Dt<T>::from_float(o[nd][2 * rr + c] * inv);
      }
    if (t == 0) p.lse[lse_row(p, sq, b, h, i)] = l > 0.f ? (m_run[rr] + log2f(l)) * kLn2 : INFINITY;
  }
}

// Combines the key slices of a split-KV forward: one warp per query row (dense (B, Hq, L) order):
// out = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse); no visible key in any slice
// (all -inf) gives out 0, lse +inf.
template <typename T>
__global__ void __launch_bounds__(256) attn_fwd_split_reduce_kernel(const AttnParams p, int64_t rows) {
  const int64_t r = (int64_t)blockIdx.x * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;
  const float* lse_s = p.lse_part + r * p.num_splits;
  float mx = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, lse_s[s]);
  const float m_use = mx == -INFINITY ? 0.f : mx;
  float total = 0.f;
  for (int s = 0; s < p.num_splits; ++s) total += exp2f(lse_s[s] - m_use);
  const float inv = total > 0.f ? 1.f / total : 0.f;
  T* dst = static_cast<T*>(p.out) + r * p.Ev;
  for (int c = lane; c < p.Ev; c += 32) {
    float acc = 0.f;
    for (int s = 0; s < p.num_splits; ++s) {
      const float w = exp2f(lse_s[s] - m_use);
      if (w > 0.f) acc += w * p.o_part[(r * p.num_splits + s) * p.Ev + c];
    }
    dst[c] = Dt<T>::from_float(acc * inv);
  }
  if (lane == 0) p.lse[r] = total > 0.f ? (m_use + log2f(total)) * kLn2 : INFINITY;
}

}  // namespace cuda_attn
}  // namespace fastattn
