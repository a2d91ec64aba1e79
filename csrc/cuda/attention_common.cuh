// Shared pieces of the CUDA attention kernels: the parameter block, the masking / window rule,
// the dropout hash, dtype helpers and thin wrappers around the PTX we use (mma.sync m16n8k16,
// ldmatrix, cp.async).
//
// Fragment layouts of mma.sync.m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"), with
// g = lane / 4 and t = lane % 4:
//   A (16x16, row major), 4 regs of 2 x 16-bit:  a0 = A[g][2t..2t+1]    a1 = A[g+8][2t..2t+1]
//                                                a2 = A[g][2t+8..2t+9]  a3 = A[g+8][2t+8..2t+9]
//   B (16x8, k x n),      2 regs of 2 x 16-bit:  b0 = B[2t..2t+1][g]    b1 = B[2t+8..2t+9][g]
//   C (16x8, fp32), 4 floats:  c0 = C[g][2t]  c1 = C[g][2t+1]  c2 = C[g+8][2t]  c3 = C[g+8][2t+1]
// The lower 16 bits of a register hold the element with the smaller k index.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace fastattn {
namespace cuda_attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Everything a kernel needs to know about one call. Strides are in elements.
struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  const void* bias;  // nullptr when there is none
  int64_t q_sb, q_sh, q_sl;
  int64_t k_sb, k_sh, k_sl;
  int64_t v_sb, v_sh, v_sl;
  int64_t bias_sb, bias_sh, bias_sl, bias_ss;
  // forward outputs: out (B, Hq, L, Ev) contiguous, lse (B, Hq, L)
  void* out;
  float* lse;
  // backward: dout and out contiguous (B, Hq, L, Ev); lse_in, delta (B, Hq, L);
  // dq, dk, dv contiguous, shaped like q, k, v
  const void* dout;
  const float* lse_in;
  float* delta;
  void* dq;
  void* dk;
  void* dv;
  int B, Hq, Hkv, L, S, E, Ev, group;  // group = Hq / Hkv
  float scale, scale_log2, softcap, inv_softcap, drop_scale;
  bool has_bias, has_softcap, has_dropout;
  bool vec_loads;  // every tile row is 16-byte aligned: cp.async in 16-byte chunks
  uint32_t drop_threshold, seed_hash;
  long long window_left, window_right, diag_offset;
  // Packed variable-length batches (cu_q != nullptr): q, k, v are (T, H, D) with batch strides 0;
  // out, dout, dq are (Tq, Hq, .), dk, dv (Tk, Hkv, .), lse and delta (Hq, Tq); blockIdx.z is the
  // sequence: sequence() gives a block its own L, S, diag_offset and first rows.
  const int* cu_q;
  const int* cu_k;
  int Tq;
  bool bottom_right;
  // Split-KV forward (num_splits > 1, dense only): block x = query tile * num_splits + split, the
  // split covering keys [split * split_keys, +split_keys) (a multiple of the key tile). Partial
  // results: o_part (B*Hq*L, num_splits, Ev) normalised, lse_part (B*Hq*L, num_splits) log2 units.
  int num_splits, split_keys;
  float* o_part;
  float* lse_part;
};

// ------------------------------------------------------------------------------------------
// Where a block's rows live: batch entry b of a dense call, or sequence b of a varlen one. The
// parameter block stays read-only (kernel parameters are read from constant memory); only these
// few per-block values live in registers.
// ------------------------------------------------------------------------------------------
struct Seq {
  int L, S;               // query rows and keys of this sequence
  long long diag_offset;  // the window rule's diagonal (varlen: S - L if bottom_right else 0)
  int64_t q_start, k_start;  // first query / key row in the packed tensors (0 when dense)
};

// VARLEN is a template flag of the tensor-core kernels: their dense instances keep L, S and the
// diagonal in the constant bank (a run-time choice here costs ~40 registers a thread and halves
// the occupancy of the 64-wide forward); the SIMT kernels decide at run time (sequence_any).
template <bool VARLEN>
__device__ __forceinline__ Seq sequence(const AttnParams& p, int b) {
  Seq s{p.L, p.S, p.diag_offset, 0, 0};
  if constexpr (VARLEN) {
    const int q0 = p.cu_q[b], k0 = p.cu_k[b];
    s.q_start = q0;
    s.k_start = k0;
    s.L = p.cu_q[b + 1] - q0;
    s.S = p.cu_k[b + 1] - k0;
    s.diag_offset = p.bottom_right ? (long long)s.S - s.L : 0;
  }
  return s;
}

__device__ __forceinline__ Seq sequence_any(const AttnParams& p, int b) {
  return p.cu_q != nullptr ? sequence<true>(p, b) : sequence<false>(p, b);
}

// Element offsets of row 0 of (batch b, head h) in q, k, v (rows then advance by q_sl, k_sl, v_sl).
__device__ __forceinline__ int64_t q_offset(const AttnParams& p, const Seq& sq, int b, int h) {
  return b * p.q_sb + sq.q_start * p.q_sl + h * p.q_sh;
}
__device__ __forceinline__ int64_t k_offset(const AttnParams& p, const Seq& sq, int b, int hk) {
  return b * p.k_sb + sq.k_start * p.k_sl + hk * p.k_sh;
}
__device__ __forceinline__ int64_t v_offset(const AttnParams& p, const Seq& sq, int b, int hk) {
  return b * p.v_sb + sq.k_start * p.v_sl + hk * p.v_sh;
}

// Row of query i of (b, h) in out / dout / dq (times Ev or E for the element offset), and the
// step between consecutive queries.
__device__ __forceinline__ int64_t out_row(const AttnParams& p, const Seq& sq, int b, int h, int i) {
  return p.cu_q != nullptr ? (sq.q_start + i) * p.Hq + h : ((int64_t)b * p.Hq + h) * p.L + i;
}
__device__ __forceinline__ int64_t out_row_step(const AttnParams& p) { return p.cu_q != nullptr ? p.Hq : 1; }

// Index of query i of (b, h) in lse / delta; also the dropout hash's row (the contract's
// (b*Hq + h)*L + i dense, h*Tq + cu_q[b] + i varlen).
__device__ __forceinline__ int64_t lse_row(const AttnParams& p, const Seq& sq, int b, int h, int i) {
  return p.cu_q != nullptr ? (int64_t)h * p.Tq + sq.q_start + i : ((int64_t)b * p.Hq + h) * p.L + i;
}

// Row of key j of (b, hk) in dk / dv.
__device__ __forceinline__ int64_t key_row(const AttnParams& p, const Seq& sq, int b, int hk, int j) {
  return p.cu_q != nullptr ? (sq.k_start + j) * p.Hkv + hk : ((int64_t)b * p.Hkv + hk) * p.S + j;
}

// ------------------------------------------------------------------------------------------
// Masking, window and dropout rules (the native contract in fastattn/ops/attention.py).
// ------------------------------------------------------------------------------------------
__device__ __forceinline__ bool visible(const AttnParams& p, const Seq& sq, int i, int j) {
  if (i >= sq.L || j >= sq.S) return false;
  const long long d = (long long)j - i - sq.diag_offset;
  if (p.window_left >= 0 && d < -p.window_left) return false;
  if (p.window_right >= 0 && d > p.window_right) return false;
  return true;
}

// Keys [lo, hi) that some query in [i0, i1] may see (hi == lo: none).
__device__ __forceinline__ void key_range(const AttnParams& p, const Seq& sq, int i0, int i1, int& lo, int& hi) {
  long long l = 0, h = sq.S;
  if (p.window_left >= 0) l = max(l, (long long)i0 + sq.diag_offset - p.window_left);
  if (p.window_right >= 0) h = min(h, (long long)i1 + sq.diag_offset + p.window_right + 1);
  l = min(l, (long long)sq.S);
  h = max(h, l);
  lo = (int)l;
  hi = (int)h;
}

// Queries [lo, hi) that may see some key in [j0, j1].
__device__ __forceinline__ void query_range(const AttnParams& p, const Seq& sq, int j0, int j1, int& lo, int& hi) {
  long long l = 0, h = sq.L;
  if (p.window_right >= 0) l = max(l, (long long)j0 - sq.diag_offset - p.window_right);
  if (p.window_left >= 0) h = min(h, (long long)j1 - sq.diag_offset + p.window_left + 1);
  l = min(l, (long long)sq.L);
  h = max(h, l);
  lo = (int)l;
  hi = (int)h;
}

// Whether every (query, key) of the tile [m0, m0+BM) x [n0, n0+BN) is in range and visible.
__device__ __forceinline__ bool tile_fully_visible(const AttnParams& p, const Seq& sq, int m0, int bm, int n0,
                                                   int bn) {
  if (m0 + bm > sq.L || n0 + bn > sq.S) return false;
  const long long dmin = (long long)n0 - (m0 + bm - 1) - sq.diag_offset;
  const long long dmax = (long long)(n0 + bn - 1) - m0 - sq.diag_offset;
  if (p.window_left >= 0 && dmin < -p.window_left) return false;
  if (p.window_right >= 0 && dmax > p.window_right) return false;
  return true;
}

// lowbias32 (Wellons), as _mix32 in fastattn/ops/attention.py.
__host__ __device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// hash(seed, row) with row = lse_row(b, h, i) taken mod 2^32.
__device__ __forceinline__ uint32_t drop_row_hash(const AttnParams& p, const Seq& sq, int b, int h, int i) {
  return mix32(p.seed_hash ^ (uint32_t)lse_row(p, sq, b, h, i));
}

__device__ __forceinline__ bool drop_keep(const AttnParams& p, uint32_t row_hash, int j) {
  return mix32(row_hash ^ (uint32_t)j) >= p.drop_threshold;
}

// ------------------------------------------------------------------------------------------
// dtype helpers
// ------------------------------------------------------------------------------------------
template <typename T> struct Dt;
template <> struct Dt<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};
template <> struct Dt<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};
template <> struct Dt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

template <typename T>
__device__ __forceinline__ float load_bias(const AttnParams& p, int b, int h, int i, int j) {
  const T* bias = static_cast<const T*>(p.bias);
  return Dt<T>::to_float(bias[b * p.bias_sb + h * p.bias_sh + i * p.bias_sl + j * p.bias_ss]);
}

// tanh from one exp and one division, absolute error ~1e-7. (Under --use_fast_math tanhf becomes
// tanh.approx.f32, relative error ~5e-4: too coarse for the fp32 path once multiplied by softcap.)
__device__ __forceinline__ float tanh_accurate(float x) {
  const float e = __expf(2.f * fabsf(x));  // +inf for large |x|: 2 / inf = 0, tanh = +-1
  return copysignf(1.f - 2.f / (e + 1.f), x);
}

// Score in natural units: scale * q.k, soft-capped, plus bias. `th` gets tanh(.) when soft-capped.
template <typename T>
__device__ __forceinline__ float score_nat(const AttnParams& p, float dot, int b, int h, int i, int j, float& th) {
  float s = dot * p.scale;
  if (p.has_softcap) {
    th = tanh_accurate(s * p.inv_softcap);
    s = p.softcap * th;
  }
  if (p.has_bias) s += load_bias<T>(p, b, h, i, j);
  return s;
}

// ------------------------------------------------------------------------------------------
// PTX wrappers
// ------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// Four 8x8 16-bit matrices, transposed on the way: lane l gives the address of row (l % 8) of
// matrix (l / 8); register r gets, from matrix r, elements [2t][g] and [2t+1][g].
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_ptr)));
}

__device__ __forceinline__ void cp_async_16(void* dst_smem, const void* src_gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst_smem)), "l"(src_gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ uint32_t ld32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }
__device__ __forceinline__ void st32(uint16_t* p, uint32_t v) { *reinterpret_cast<uint32_t*>(p) = v; }

// ------------------------------------------------------------------------------------------
// Tiles in shared memory (16-bit types): ROWS x D elements at a row stride of D + 8 (the 16-byte
// pad makes the 8 rows an ldmatrix or a quad of lanes reads fall into distinct banks).
// Rows >= nrows and columns >= ncols are zero-filled, so E, Ev < D and partial tiles are exact.
// ------------------------------------------------------------------------------------------
template <int ROWS, int D, int NTHREADS>
__device__ __forceinline__ void load_tile(uint16_t* smem, const uint16_t* g, int64_t row_stride, int row0,
                                          int nrows, int ncols, bool vec) {
  constexpr int SROW = D + 8;
  if (vec) {  // row_stride, ncols multiples of 8 and g 16-byte aligned (checked by the host)
    constexpr int CHUNKS = D / 8;
    for (int idx = threadIdx.x; idx < ROWS * CHUNKS; idx += NTHREADS) {
      const int r = idx / CHUNKS, c = (idx % CHUNKS) * 8;
      const bool ok = (row0 + r < nrows) && (c < ncols);
      const uint16_t* src = ok ? g + (int64_t)(row0 + r) * row_stride + c : g;
      cp_async_16(smem + r * SROW + c, src, ok ? 16 : 0);
    }
  } else {
    for (int idx = threadIdx.x; idx < ROWS * D; idx += NTHREADS) {
      const int r = idx / D, c = idx % D;
      uint16_t x = 0;
      if (row0 + r < nrows && c < ncols) x = g[(int64_t)(row0 + r) * row_stride + c];
      smem[r * SROW + c] = x;
    }
  }
}

// acc[NT] (16 x 8*NT) += R[16 x D] * C[8*NT x D]^T, both row major in shared memory (k contiguous).
template <typename T, int NT, int D>
__device__ __forceinline__ void warp_gemm_abt(float (&acc)[NT][4], const uint16_t* R, int r_stride,
                                              const uint16_t* C, int c_stride, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const uint16_t* r = R + g * r_stride + ks * 16 + 2 * t;
    const uint32_t a[4] = {ld32(r), ld32(r + 8 * r_stride), ld32(r + 8), ld32(r + 8 * r_stride + 8)};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const uint16_t* c = C + (nt * 8 + g) * c_stride + ks * 16 + 2 * t;
      mma16816<T>(acc[nt], a, ld32(c), ld32(c + 8));
    }
  }
}

// Address this lane hands to ldmatrix_x4_trans to read B fragments of a row-major [k][n] tile:
// matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15) from (k0, n0), so
// r[0], r[1] are b0, b1 of n-tile n0 and r[2], r[3] those of n-tile n0 + 8.
__device__ __forceinline__ const uint16_t* ldm_trans_row(const uint16_t* B, int stride, int k0, int n0, int lane) {
  return B + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * stride + n0 + (lane >> 4) * 8;
}

// acc[2*NP] (16 x 16*NP) += A[16 x KD] * B[KD x 16*NP]; A row major (k contiguous), B row major
// [k][n] (n contiguous), both in shared memory.
template <typename T, int NP, int KD>
__device__ __forceinline__ void warp_gemm_ab(float (&acc)[2 * NP][4], const uint16_t* A, int a_stride,
                                             const uint16_t* B, int b_stride, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int kk = 0; kk < KD / 16; ++kk) {
    const uint16_t* r = A + g * a_stride + kk * 16 + 2 * t;
    const uint32_t a[4] = {ld32(r), ld32(r + 8 * a_stride), ld32(r + 8), ld32(r + 8 * a_stride + 8)};
#pragma unroll
    for (int np = 0; np < NP; ++np) {
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, ldm_trans_row(B, b_stride, kk * 16, np * 16, lane));
      mma16816<T>(acc[2 * np], a, bf[0], bf[1]);
      mma16816<T>(acc[2 * np + 1], a, bf[2], bf[3]);
    }
  }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

}  // namespace cuda_attn
}  // namespace fastattn
