// Backward kernels for fp16 / bf16 (tensor cores, deterministic: no atomics).
//
//   delta = rowsum(dO * O)                                   attn_bwd_delta_kernel (any dtype)
//   P = exp(s - lse) recomputed, dP = dO V^T, dS = P * (dP*Z - delta)   (Z: dropout keep / (1-p))
//   dV = (P*Z)^T dO, dK = scale * dS^T Q                      attn_bwd_dkdv_kernel, per key tile
//   dQ = scale * dS K                                        attn_bwd_dq_kernel, per query tile
// (with softcap, dS also carries the tanh derivative 1 - tanh^2).
//
// Both main kernels use 8 warps and two phases per (64 x 64) tile pair:
//   phase A: each warp computes a 16 x 32 slab of S and dP with mma.sync (operands from shared
//            memory), applies the mask / softmax / dropout element-wise and writes its slab of P
//            and dS (16-bit) to shared memory;
//   phase B: each warp accumulates a 16 x D/2 slab of the gradient in registers from the P / dS
//            tile (A operand) and Q, dO or K (B operand, read with ldmatrix.trans).
// Going through shared memory for P and dS keeps the register accumulators at D/4 floats per
// thread per gradient (D = 256 fits without spilling).
#pragma once

#include "attention_common.cuh"

namespace fastattn {
namespace cuda_attn {

constexpr int kBwdBM = 64, kBwdBN = 64, kBwdThreads = 256;

// dK/dV double-buffers its Q/dO tiles (STAGES = 2: the next tile loads while this one computes)
// where shared memory allows (the host picks; D = 256 would need ~217 KB, so it runs STAGES = 1).
template <int D, int STAGES>
constexpr int dkdv_smem_bytes() {
  // K, V; Q, dO per stage; (P*Z)^T and dS^T (64 x 72); lse, delta per stage
  return (2 + 2 * STAGES) * 64 * (D + 8) * 2 + 2 * 64 * (64 + 8) * 2 + 2 * STAGES * 64 * 4;
}

template <int D>
constexpr int dq_smem_bytes() {
  // Q, dO, K, V; dS (64 x 72); lse, delta
  return 4 * 64 * (D + 8) * 2 + 64 * (64 + 8) * 2 + 2 * 64 * 4;
}

// delta = rowsum(dO * O) for the contiguous dO, O of `rows` rows of Ev. One warp per row. Dense
// (B*Hq*L rows): delta[row]. Varlen (varlen_heads = Hq; rows t*Hq + h of (Tq, Hq, Ev)): delta is
// (Hq, Tq) like lse, delta[h*Tq + t].
template <typename T>
__global__ void __launch_bounds__(256) attn_bwd_delta_kernel(const T* __restrict__ dout, const T* __restrict__ out,
                                                             float* __restrict__ delta, int64_t rows, int Ev,
                                                             int varlen_heads = 0) {
  const int64_t r = (int64_t)blockIdx.x * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;
  float acc = 0.f;
  for (int c = lane; c < Ev; c += 32) acc += Dt<T>::to_float(dout[r * Ev + c]) * Dt<T>::to_float(out[r * Ev + c]);
  acc = warp_sum(acc);
  const int64_t dst = varlen_heads > 0 ? (r % varlen_heads) * (rows / varlen_heads) + r / varlen_heads : r;
  if (lane == 0) delta[dst] = acc;
}

// One score entry of backward: p_drop = P*Z (for dV) and ds = dL/d(q.k) / scale.
template <typename T>
__device__ __forceinline__ void bwd_entry(const AttnParams& p, const Seq& sq, int b, int h, int i, int j,
                                          uint32_t rhash, float dot,
                                          float dp, float lse_log2, float delta, float& p_drop, float& ds) {
  if (!visible(p, sq, i, j)) {
    p_drop = 0.f;
    ds = 0.f;
    return;
  }
  float th = 0.f;
  const float s = score_nat<T>(p, dot, b, h, i, j, th);
  const float prob = exp2f(s * kLog2e - lse_log2);  // 0 for -inf scores and empty rows (lse = +inf)
  float z = 1.f;
  if (p.has_dropout) z = drop_keep(p, rhash, j) ? p.drop_scale : 0.f;
  p_drop = prob * z;
  float d = prob * (dp * z - delta);
  if (p.has_softcap) d *= 1.f - th * th;
  ds = d;
}

// dK, dV for one 64-key tile of one KV head, over every query tile (and every query head of the
// GQA group) that can see it.
template <typename T, int D, int STAGES, bool VARLEN>
__global__ void __launch_bounds__(kBwdThreads) attn_bwd_dkdv_kernel(const AttnParams p) {
  constexpr int BM = kBwdBM, BN = kBwdBN, SROW = D + 8, PROW = BM + 8;
  constexpr int NP = D / 32;  // phase B: 16 x D/2 per warp = NP pairs of n-tiles
  static_assert(kBwdThreads == 256 && BM == 64 && BN == 64, "the warp layout below assumes 8 warps, 64 x 64 tiles");
  static_assert(STAGES == 1 || STAGES == 2, "one or two Q/dO buffers");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sK = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sV = sK + BN * SROW;
  uint16_t* sQbuf = sV + BN * SROW;            // [STAGES][BM * SROW]
  uint16_t* sdObuf = sQbuf + STAGES * BM * SROW;  // [STAGES][BM * SROW]
  uint16_t* sPt = sdObuf + STAGES * BM * SROW;  // (P*Z)^T: [key][query]
  uint16_t* sdSt = sPt + BN * PROW;             // dS^T:    [key][query]
  float* sLseBuf = reinterpret_cast<float*>(sdSt + BN * PROW);  // [STAGES][BM], log2 units
  float* sDeltaBuf = sLseBuf + STAGES * BM;                       // [STAGES][BM]

  const int n0 = blockIdx.x * BN, hk = blockIdx.y, b = blockIdx.z;
  const Seq sq = sequence<VARLEN>(p, b);
  if (n0 >= sq.S) return;  // varlen: the grid is sized for the longest sequence
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int kr = warp & 3;     // key rows kr*16 .. +15 (both phases)
  const int half = warp >> 2;  // phase A: queries half*32 .. +31; phase B: columns half*D/2 ..

  const uint16_t* kg = static_cast<const uint16_t*>(p.k) + k_offset(p, sq, b, hk);
  const uint16_t* vg = static_cast<const uint16_t*>(p.v) + v_offset(p, sq, b, hk);
  load_tile<BN, D, kBwdThreads>(sK, kg, p.k_sl, n0, sq.S, p.E, p.vec_loads);
  load_tile<BN, D, kBwdThreads>(sV, vg, p.v_sl, n0, sq.S, p.Ev, p.vec_loads);
  cp_async_commit();

  float dk[2 * NP][4], dv[2 * NP][4];
#pragma unroll
  for (int n = 0; n < 2 * NP; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;

  // The work list: (query head h of the GQA group, query tile mb) pairs, tile index
  // it = (h - hk*group) * n_mb + (mb - mb_begin).
  int i_lo, i_hi;
  query_range(p, sq, n0, min(n0 + BN, sq.S) - 1, i_lo, i_hi);
  const int mb_begin = i_lo / BM;
  const int n_mb = i_hi > i_lo ? (i_hi + BM - 1) / BM - mb_begin : 0;
  const int n_tiles = n_mb * p.group;

  // Start loading work tile `it` (Q, dO through cp.async; lse, delta with plain stores) into `stage`.
  auto load_work = [&](int it, int stage) {
    const int h = hk * p.group + it / n_mb;
    const int m0 = (mb_begin + it % n_mb) * BM;
    const int64_t lrow = lse_row(p, sq, b, h, 0);
    const uint16_t* qg = static_cast<const uint16_t*>(p.q) + q_offset(p, sq, b, h);
    const uint16_t* dog = static_cast<const uint16_t*>(p.dout) + out_row(p, sq, b, h, 0) * p.Ev;
    load_tile<BM, D, kBwdThreads>(sQbuf + stage * BM * SROW, qg, p.q_sl, m0, sq.L, p.E, p.vec_loads);
    load_tile<BM, D, kBwdThreads>(sdObuf + stage * BM * SROW, dog, out_row_step(p) * p.Ev, m0, sq.L, p.Ev,
                                  p.vec_loads);
    cp_async_commit();
    for (int r = threadIdx.x; r < BM; r += kBwdThreads) {
      const int i = m0 + r;
      sLseBuf[stage * BM + r] = i < sq.L ? p.lse_in[lrow + i] * kLog2e : INFINITY;
      sDeltaBuf[stage * BM + r] = i < sq.L ? p.delta[lrow + i] : 0.f;
    }
  };

  if (STAGES == 2 && n_tiles > 0) load_work(0, 0);
  for (int it = 0; it < n_tiles; ++it) {
    const int stage = STAGES == 2 ? (it & 1) : 0;
    if (STAGES == 2) {
      cp_async_wait_all();
      __syncthreads();  // tile `it` landed; every warp is done with tile it-1 (its buffer, P, dS)
      if (it + 1 < n_tiles) load_work(it + 1, stage ^ 1);  // overlaps this tile's compute
    } else {
      __syncthreads();  // every warp is done with the previous Q, dO, P, dS tiles
      load_work(it, 0);
      cp_async_wait_all();
      __syncthreads();
    }
    const int h = hk * p.group + it / n_mb;
    const int m0 = (mb_begin + it % n_mb) * BM;
    const uint16_t* sQ = sQbuf + stage * BM * SROW;
    const uint16_t* sdO = sdObuf + stage * BM * SROW;
    const float* sLse = sLseBuf + stage * BM;
    const float* sDelta = sDeltaBuf + stage * BM;

    // Phase A: S^T and dP^T for keys kr*16.., queries half*32.. (16 x 32 per warp).
    float s[4][4], dp[4][4];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
    warp_gemm_abt<T, 4, D>(s, sK + kr * 16 * SROW, SROW, sQ + half * 32 * SROW, SROW, lane);
    warp_gemm_abt<T, 4, D>(dp, sV + kr * 16 * SROW, SROW, sdO + half * 32 * SROW, SROW, lane);
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int jl = kr * 16 + g + rr * 8;
        float pd[2], ds[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int il = half * 32 + nt * 8 + 2 * t + c;
          const int i = m0 + il;
          const uint32_t rh = p.has_dropout ? drop_row_hash(p, sq, b, h, i) : 0u;
          bwd_entry<T>(p, sq, b, h, i, n0 + jl, rh, s[nt][2 * rr + c], dp[nt][2 * rr + c], sLse[il], sDelta[il], pd[c],
                       ds[c]);
        }
        const int off = jl * PROW + half * 32 + nt * 8 + 2 * t;
        st32(sPt + off, Dt<T>::pack(pd[0], pd[1]));
        st32(sdSt + off, Dt<T>::pack(ds[0], ds[1]));
      }
    __syncthreads();

    // Phase B: dV += (P*Z)^T dO, dK += dS^T Q for keys kr*16.., columns half*D/2...
    warp_gemm_ab<T, NP, BM>(dv, sPt + kr * 16 * PROW, PROW, sdO + half * (D / 2), SROW, lane);
    warp_gemm_ab<T, NP, BM>(dk, sdSt + kr * 16 * PROW, PROW, sQ + half * (D / 2), SROW, lane);
  }
  cp_async_wait_all();  // (the K/V load when no query tile ran)

#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int j = n0 + kr * 16 + g + rr * 8;
    if (j >= sq.S) continue;
    T* dkg = static_cast<T*>(p.dk) + key_row(p, sq, b, hk, j) * p.E;
    T* dvg = static_cast<T*>(p.dv) + key_row(p, sq, b, hk, j) * p.Ev;
#pragma unroll
    for (int n = 0; n < 2 * NP; ++n)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = half * (D / 2) + n * 8 + 2 * t + c;
        if (col < p.E) dkg[col] = Dt<T>::from_float(dk[n][2 * rr + c] * p.scale);
        if (col < p.Ev) dvg[col] = Dt<T>::from_float(dv[n][2 * rr + c]);
      }
  }
}

// dQ for one 64-query tile of one query head, over every key tile it can see. V_{j+1} loads
// (cp.async) during phase B of tile j; K_j only once phase B of tile j-1 is done with its buffer.
template <typename T, int D, bool VARLEN>
__global__ void __launch_bounds__(kBwdThreads) attn_bwd_dq_kernel(const AttnParams p) {
  constexpr int BM = kBwdBM, BN = kBwdBN, SROW = D + 8, PROW = BN + 8;
  constexpr int NP = D / 32;
  static_assert(kBwdThreads == 256 && BM == 64 && BN == 64, "the warp layout below assumes 8 warps, 64 x 64 tiles");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sdO = sQ + BM * SROW;
  uint16_t* sK = sdO + BM * SROW;
  uint16_t* sV = sK + BN * SROW;
  uint16_t* sdS = sV + BN * SROW;  // [query][key]
  float* sLse = reinterpret_cast<float*>(sdS + BM * PROW);
  float* sDelta = sLse + BM;

  const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const Seq sq = sequence<VARLEN>(p, b);
  if (m0 >= sq.L) return;  // varlen: the grid is sized for the longest sequence
  const int hk = h / p.group;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int qr = warp & 3;     // query rows qr*16 .. +15 (both phases)
  const int half = warp >> 2;  // phase A: keys half*32 .. +31; phase B: columns half*D/2 ..

  const int64_t lrow = lse_row(p, sq, b, h, 0);
  const int64_t do_stride = out_row_step(p) * p.Ev;
  const uint16_t* qg = static_cast<const uint16_t*>(p.q) + q_offset(p, sq, b, h);
  const uint16_t* dog = static_cast<const uint16_t*>(p.dout) + out_row(p, sq, b, h, 0) * p.Ev;
  const uint16_t* kg = static_cast<const uint16_t*>(p.k) + k_offset(p, sq, b, hk);
  const uint16_t* vg = static_cast<const uint16_t*>(p.v) + v_offset(p, sq, b, hk);

  float dq[2 * NP][4];
#pragma unroll
  for (int n = 0; n < 2 * NP; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;

  int j_lo, j_hi;
  key_range(p, sq, m0, min(m0 + BM, sq.L) - 1, j_lo, j_hi);
  const int nb_begin = j_lo / BN;
  const int nb_end = j_hi > j_lo ? (j_hi + BN - 1) / BN : nb_begin;

  const int irow[2] = {m0 + qr * 16 + g, m0 + qr * 16 + g + 8};
  uint32_t rhash[2] = {0u, 0u};
  if (p.has_dropout) {
    rhash[0] = drop_row_hash(p, sq, b, h, irow[0]);
    rhash[1] = drop_row_hash(p, sq, b, h, irow[1]);
  }

  if (nb_begin < nb_end) {
    load_tile<BM, D, kBwdThreads>(sQ, qg, p.q_sl, m0, sq.L, p.E, p.vec_loads);
    load_tile<BM, D, kBwdThreads>(sdO, dog, do_stride, m0, sq.L, p.Ev, p.vec_loads);
    load_tile<BN, D, kBwdThreads>(sV, vg, p.v_sl, nb_begin * BN, sq.S, p.Ev, p.vec_loads);
    cp_async_commit();
    for (int r = threadIdx.x; r < BM; r += kBwdThreads) {
      const int i = m0 + r;
      sLse[r] = i < sq.L ? p.lse_in[lrow + i] * kLog2e : INFINITY;
      sDelta[r] = i < sq.L ? p.delta[lrow + i] : 0.f;
    }
  }

  for (int nb = nb_begin; nb < nb_end; ++nb) {
    const int n0 = nb * BN;
    __syncthreads();  // every warp is done with the previous K, dS tiles
    load_tile<BN, D, kBwdThreads>(sK, kg, p.k_sl, n0, sq.S, p.E, p.vec_loads);
    cp_async_commit();
    cp_async_wait_all();  // K_j, and V_j issued during the previous phase B
    __syncthreads();

    // Phase A: S and dP for queries qr*16.., keys half*32.. (16 x 32 per warp).
    float s[4][4], dp[4][4];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
    warp_gemm_abt<T, 4, D>(s, sQ + qr * 16 * SROW, SROW, sK + half * 32 * SROW, SROW, lane);
    warp_gemm_abt<T, 4, D>(dp, sdO + qr * 16 * SROW, SROW, sV + half * 32 * SROW, SROW, lane);
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int il = qr * 16 + g + rr * 8;
        float pd[2], ds[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int j = n0 + half * 32 + nt * 8 + 2 * t + c;
          bwd_entry<T>(p, sq, b, h, irow[rr], j, rhash[rr], s[nt][2 * rr + c], dp[nt][2 * rr + c], sLse[il], sDelta[il],
                       pd[c], ds[c]);
        }
        st32(sdS + il * PROW + half * 32 + nt * 8 + 2 * t, Dt<T>::pack(ds[0], ds[1]));
      }
    __syncthreads();
    if (nb + 1 < nb_end) {  // V is free until the next phase A: load V_{j+1} while phase B runs
      load_tile<BN, D, kBwdThreads>(sV, vg, p.v_sl, n0 + BN, sq.S, p.Ev, p.vec_loads);
      cp_async_commit();
    }

    // Phase B: dQ += dS K for queries qr*16.., columns half*D/2...
    warp_gemm_ab<T, NP, BN>(dq, sdS + qr * 16 * PROW, PROW, sK + half * (D / 2), SROW, lane);
  }

#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int i = irow[rr];
    if (i >= sq.L) continue;
    T* dqg = static_cast<T*>(p.dq) + out_row(p, sq, b, h, i) * p.E;
#pragma unroll
    for (int n = 0; n < 2 * NP; ++n)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = half * (D / 2) + n * 8 + 2 * t + c;
        if (col < p.E) dqg[col] = Dt<T>::from_float(dq[n][2 * rr + c] * p.scale);
      }
  }
}

}  // namespace cuda_attn
}  // namespace fastattn
