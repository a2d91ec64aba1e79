"""Line-by-line Python transcription of the tensor-core attention kernels (csrc/cuda/attention_*.cuh)
over the emulated warp / block of warp.py. Names follow the CUDA code; comments cite its lines.

Each kernel is run block by block (a block's warps run one after the other inside one
__syncthreads() epoch, which is safe because warp.Smem flags any cross-thread access inside an
epoch as a race). Per-lane scalars are numpy arrays of shape (32,).
"""
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from warp import G, LANES, T, GMem, Smem, check, ld32, ldmatrix_x4, mma16816, shfl_xor, st32

INF = math.inf
# Deliberate bugs (run_attention.py --mutants) to show the emulator notices the classic mistakes.
MUT = set()
kLog2e = 1.4426950408889634
kLn2 = 0.6931471805599453
M32 = 0xFFFFFFFF


def mix32(x):
    x = np.asarray(x, dtype=np.uint64) & M32
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & M32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & M32
    x ^= x >> np.uint64(16)
    return x


# ------------------------------------------------------------------------------------------------
# AttnParams / Seq (attention_common.cuh) and the host-side make_params (attention.cu)
# ------------------------------------------------------------------------------------------------
@dataclass
class Params:
    q: GMem = None
    k: GMem = None
    v: GMem = None
    bias: Optional[GMem] = None
    q_sb: int = 0
    q_sh: int = 0
    q_sl: int = 0
    k_sb: int = 0
    k_sh: int = 0
    k_sl: int = 0
    v_sb: int = 0
    v_sh: int = 0
    v_sl: int = 0
    bias_sb: int = 0
    bias_sh: int = 0
    bias_sl: int = 0
    bias_ss: int = 0
    out: GMem = None
    lse: GMem = None
    dout: GMem = None
    lse_in: GMem = None
    delta: GMem = None
    dq: GMem = None
    dk: GMem = None
    dv: GMem = None
    B: int = 0
    Hq: int = 0
    Hkv: int = 0
    L: int = 0
    S: int = 0
    E: int = 0
    Ev: int = 0
    group: int = 1
    scale: float = 1.0
    scale_log2: float = 1.0
    softcap: float = 0.0
    inv_softcap: float = 0.0
    drop_scale: float = 1.0
    has_bias: bool = False
    has_softcap: bool = False
    has_dropout: bool = False
    vec_loads: bool = False
    drop_threshold: int = 0
    seed_hash: int = 0
    window_left: int = -1
    window_right: int = -1
    diag_offset: int = 0
    cu_q: Optional[np.ndarray] = None
    cu_k: Optional[np.ndarray] = None
    Tq: int = 0
    bottom_right: bool = False
    num_splits: int = 1
    split_keys: int = 0
    o_part: GMem = None
    lse_part: GMem = None


@dataclass
class Seq:
    L: int
    S: int
    diag_offset: int
    q_start: int
    k_start: int


def sequence(p, b, VARLEN):
    s = Seq(p.L, p.S, p.diag_offset, 0, 0)
    if VARLEN:
        q0, k0 = int(p.cu_q[b]), int(p.cu_k[b])
        s.q_start, s.k_start = q0, k0
        s.L = int(p.cu_q[b + 1]) - q0
        s.S = int(p.cu_k[b + 1]) - k0
        s.diag_offset = s.S - s.L if p.bottom_right else 0
    return s


def q_offset(p, sq, b, h):
    return b * p.q_sb + sq.q_start * p.q_sl + h * p.q_sh


def k_offset(p, sq, b, hk):
    return b * p.k_sb + sq.k_start * p.k_sl + hk * p.k_sh


def v_offset(p, sq, b, hk):
    return b * p.v_sb + sq.k_start * p.v_sl + hk * p.v_sh


def out_row(p, sq, b, h, i):
    return (sq.q_start + i) * p.Hq + h if p.cu_q is not None else (b * p.Hq + h) * p.L + i


def out_row_step(p):
    return p.Hq if p.cu_q is not None else 1


def lse_row(p, sq, b, h, i):
    return h * p.Tq + sq.q_start + i if p.cu_q is not None else (b * p.Hq + h) * p.L + i


def key_row(p, sq, b, hk, j):
    return (sq.k_start + j) * p.Hkv + hk if p.cu_q is not None else (b * p.Hkv + hk) * p.S + j


def visible(p, sq, i, j):
    i, j = np.asarray(i), np.asarray(j)
    ok = (i < sq.L) & (j < sq.S)
    d = j - i - sq.diag_offset
    if p.window_left >= 0:
        ok &= ~(d < -p.window_left)
    if p.window_right >= 0:
        ok &= ~(d > p.window_right)
    return ok


def key_range(p, sq, i0, i1):
    lo, hi = 0, sq.S
    if p.window_left >= 0:
        lo = max(lo, i0 + sq.diag_offset - p.window_left)
    if p.window_right >= 0:
        hi = min(hi, i1 + sq.diag_offset + p.window_right + (0 if "key_range_hi" in MUT else 1))
    lo = min(lo, sq.S)
    hi = max(hi, lo)
    return lo, hi


def query_range(p, sq, j0, j1):
    lo, hi = 0, sq.L
    if p.window_right >= 0:
        lo = max(lo, j0 - sq.diag_offset - p.window_right)
    if p.window_left >= 0:
        hi = min(hi, j1 - sq.diag_offset + p.window_left + 1)
    lo = min(lo, sq.L)
    hi = max(hi, lo)
    return lo, hi


def tile_fully_visible(p, sq, m0, bm, n0, bn):
    if m0 + bm > sq.L or n0 + bn > sq.S:
        return False
    dmin = n0 - (m0 + bm - 1) - sq.diag_offset
    dmax = (n0 + bn - 1) - m0 - sq.diag_offset
    if p.window_left >= 0 and dmin < -p.window_left:
        return False
    if p.window_right >= 0 and dmax > p.window_right:
        return False
    return True


def drop_row_hash(p, sq, b, h, i):
    return mix32(np.uint64(p.seed_hash) ^ (np.asarray(lse_row(p, sq, b, h, i), dtype=np.int64).astype(np.uint64) & M32))


def drop_keep(p, row_hash, j):
    return mix32(np.asarray(row_hash, dtype=np.uint64) ^ np.asarray(j, dtype=np.uint64)) >= p.drop_threshold


def tanh_accurate(x):
    with np.errstate(over="ignore"):
        e = np.exp(2.0 * np.abs(x))
    return np.copysign(1.0 - 2.0 / (e + 1.0), x)


def score_nat(p, dot, b, h, i, j, vis):
    """score_nat<T> for the lanes where `vis` (the kernels only call it for visible entries)."""
    s = dot * p.scale
    th = np.zeros_like(s)
    if p.has_softcap:
        th = tanh_accurate(s * p.inv_softcap)
        s = p.softcap * th
    if p.has_bias:
        idx = b * p.bias_sb + h * p.bias_sh + np.asarray(i) * p.bias_sl + np.asarray(j) * p.bias_ss
        bias = np.zeros_like(s)
        bias[vis] = p.bias.read(np.broadcast_to(idx, s.shape)[vis])
        s = s + bias
    return s, th


# Dt<T>::from_float / pack rounding: None keeps float64 (index checks); run_attention.py --round
# fp16|bf16 sets a round-to-nearest-even to that type to compare the kernels' rounding error with the
# GPU tests' tolerance.
ROUND = None


def rnd(x):
    return x if ROUND is None else ROUND(x)


def pack(lo, hi):
    """Dt<T>::pack: a 16-bit pair (low half = lo)."""
    return np.stack([rnd(lo), rnd(hi)], axis=-1)


# ------------------------------------------------------------------------------------------------
# attention_common.cuh: load_tile, warp_gemm_abt, ldm_trans_row, warp_gemm_ab
# ------------------------------------------------------------------------------------------------
COVERAGE = {}


def load_tile(sm, smem_base, ROWS, D, NTHREADS, g, goff, row_stride, row0, nrows, ncols, vec):
    """load_tile<ROWS, D, NTHREADS>(smem + smem_base, g + goff, ...). Checks: every slot of the tile's
    ROWS x D block is written exactly once, no global read outside [0, numel), cp.async 16-byte
    alignment of both sides (element offsets % 8; the host checked the base pointers)."""
    SROW = D + 8
    written = np.zeros(ROWS * SROW, int)
    if vec:
        CHUNKS = D // 8
        idx = np.arange(ROWS * CHUNKS)
        thr = idx % NTHREADS
        r, c = idx // CHUNKS, (idx % CHUNKS) * 8
        ok = (row0 + r < nrows) & (c < ncols)
        src = np.where(ok, goff + (row0 + r) * row_stride + c, goff)
        dst = smem_base + r * SROW + c
        check(dst % 8 == 0, "cp.async: shared destination not 16-byte aligned")
        check(src[ok] % 8 == 0, "cp.async: global source not 16-byte aligned")
        vals = np.zeros((idx.size, 8))
        if ok.any():
            vals[ok] = g.read(src[ok][:, None] + np.arange(8)[None, :])
        sm.cp_async(dst[:, None] + np.arange(8)[None, :], vals, np.repeat(thr, 8))
        np.add.at(written, (r * SROW + c)[:, None] + np.arange(8)[None, :], 1)
    else:
        idx = np.arange(ROWS * D)
        thr = idx % NTHREADS
        r, c = idx // D, idx % D
        ok = (row0 + r < nrows) & (c < ncols)
        x = np.zeros(idx.size)
        if ok.any():
            x[ok] = g.read(goff + (row0 + r[ok]) * row_stride + c[ok])
        sm.write(smem_base + r * SROW + c, x, thr)
        np.add.at(written, r * SROW + c, 1)
    w = written.reshape(ROWS, SROW)
    check((w[:, :D] == 1).all() and (w[:, D:] == 0).all(), "load_tile: tile not covered exactly once")
    COVERAGE["load_tile"] = COVERAGE.get("load_tile", 0) + 1


def warp_gemm_abt(sm, acc, NT, D, R, r_stride, C, c_stride, thr):
    """acc (32, NT, 4) += R[16 x D] * C[8NT x D]^T (both row major in smem)."""
    acc = acc.copy()
    for ks in range(D // 16):
        r = R + G * r_stride + ks * 16 + 2 * T
        a = np.stack([ld32(sm, r, thr), ld32(sm, r + 8 * r_stride, thr), ld32(sm, r + 8, thr),
                      ld32(sm, r + 8 * r_stride + 8, thr)], axis=1)
        if "a_order" in MUT:  # a1 <-> a2 (rows g+8 vs columns +8)
            a = a[:, [0, 2, 1, 3]]
        for nt in range(NT):
            c = C + (nt * 8 + G) * c_stride + ks * 16 + 2 * T
            acc[:, nt] = mma16816(acc[:, nt], a, ld32(sm, c, thr), ld32(sm, c + 8, thr))
    return acc


def ldm_trans_row(B, stride, k0, n0, lane):
    if "ldm_kn_swap" in MUT:  # matrices 1 and 2 swapped
        return B + (k0 + (lane & 7) + (lane >> 4) * 8) * stride + n0 + ((lane >> 3) & 1) * 8
    return B + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * stride + n0 + (lane >> 4) * 8


def warp_gemm_ab(sm, acc, NP, KD, A, a_stride, B, b_stride, thr):
    """acc (32, 2NP, 4) += A[16 x KD] * B[KD x 16NP] (A row major, B row major [k][n])."""
    acc = acc.copy()
    for kk in range(KD // 16):
        r = A + G * a_stride + kk * 16 + 2 * T
        a = np.stack([ld32(sm, r, thr), ld32(sm, r + 8 * a_stride, thr), ld32(sm, r + 8, thr),
                      ld32(sm, r + 8 * a_stride + 8, thr)], axis=1)
        for np_ in range(NP):
            bf = ldmatrix_x4(sm, ldm_trans_row(B, b_stride, kk * 16, np_ * 16, LANES), thr, trans=True)
            acc[:, 2 * np_] = mma16816(acc[:, 2 * np_], a, bf[:, 0], bf[:, 1])
            acc[:, 2 * np_ + 1] = mma16816(acc[:, 2 * np_ + 1], a, bf[:, 2], bf[:, 3])
    return acc


# ------------------------------------------------------------------------------------------------
# attention_fwd.cuh
# ------------------------------------------------------------------------------------------------
kFwdBM, kFwdBN, kFwdThreads = 128, 64, 256


def fwd_smem_bytes(D):
    return (kFwdBM + 2 * kFwdBN) * (D + 8) * 2


def attn_fwd_mma_block(p, D, VARLEN, bx, h, b):
    BM, BN, SROW = kFwdBM, kFwdBN, D + 8
    NT_S, NT_O = BN // 8, D // 8
    sm = Smem(fwd_smem_bytes(D), "fwd smem")
    sQ = 0
    sK = sQ + BM * SROW
    sV = sK + BN * SROW

    split = bx % p.num_splits
    m0 = (bx // p.num_splits) * BM
    sq = sequence(p, b, VARLEN)
    if m0 >= sq.L:
        return
    hk = h // p.group
    NW = kFwdThreads // 32
    row = [(m0 + w * 16 + G, m0 + w * 16 + G + 8) for w in range(NW)]
    thr = [w * 32 + LANES for w in range(NW)]
    qg, kg, vg = q_offset(p, sq, b, h), k_offset(p, sq, b, hk), v_offset(p, sq, b, hk)

    j_lo, j_hi = key_range(p, sq, m0, min(m0 + BM, sq.L) - 1)
    if p.num_splits > 1:
        j_lo = max(j_lo, split * p.split_keys)
        j_hi = max(j_lo, min(j_hi, (split + 1) * p.split_keys))
    nb_begin = j_lo // BN
    nb_end = (j_hi + BN - 1) // BN if j_hi > j_lo else nb_begin

    o = [np.zeros((32, NT_O, 4)) for _ in range(NW)]
    m_run = [np.full((32, 2), -INF) for _ in range(NW)]
    l_run = [np.zeros((32, 2)) for _ in range(NW)]
    rhash = [np.zeros((32, 2), np.uint64) for _ in range(NW)]
    if p.has_dropout:
        for w in range(NW):
            rhash[w][:, 0] = drop_row_hash(p, sq, b, h, row[w][0])
            rhash[w][:, 1] = drop_row_hash(p, sq, b, h, row[w][1])

    if nb_begin < nb_end:
        load_tile(sm, sQ, BM, D, kFwdThreads, p.q, qg, p.q_sl, m0, sq.L, p.E, p.vec_loads)
        load_tile(sm, sK, BN, D, kFwdThreads, p.k, kg, p.k_sl, nb_begin * BN, sq.S, p.E, p.vec_loads)

    s_regs = [None] * NW
    for nb in range(nb_begin, nb_end):
        n0 = nb * BN
        sm.wait_all()
        if "no_sync_v" not in MUT:
            sm.syncthreads()
        load_tile(sm, sV, BN, D, kFwdThreads, p.v, vg, p.v_sl, n0, sq.S, p.Ev, p.vec_loads)
        for w in range(NW):
            s = np.zeros((32, NT_S, 4))
            s = warp_gemm_abt(sm, s, NT_S, D, sQ + w * 16 * SROW, SROW, sK, SROW, thr[w])
            if not p.has_bias and not p.has_softcap and tile_fully_visible(p, sq, m0, BM, n0, BN):
                s = s * p.scale_log2
            else:
                for nt in range(NT_S):
                    for e in range(4):
                        i = row[w][e >> 1]
                        j = n0 + nt * 8 + 2 * T + (e & 1)
                        vis = visible(p, sq, i, j)
                        sc, _ = score_nat(p, s[:, nt, e], b, h, i, j, vis)
                        s[:, nt, e] = np.where(vis, sc * kLog2e, -INF)
            # online softmax; a quad (same g) holds one row
            for rr in range(2):
                mx = np.full(32, -INF)
                for nt in range(NT_S):
                    mx = np.maximum(mx, np.maximum(s[:, nt, 2 * rr], s[:, nt, 2 * rr + 1]))
                mx = np.maximum(mx, shfl_xor(mx, 1))
                mx = np.maximum(mx, shfl_xor(mx, 4 if "quad_xor4" in MUT else 2))
                m_new = np.maximum(m_run[w][:, rr], mx)
                m_use = np.where(m_new == -INF, 0.0, m_new)
                alpha = np.exp2(m_run[w][:, rr] - m_use)
                m_run[w][:, rr] = m_new
                rsum = np.zeros(32)
                for nt in range(NT_S):
                    for c in range(2):
                        pr = np.exp2(s[:, nt, 2 * rr + c] - m_use)
                        rsum += pr
                        if p.has_dropout:
                            pr = np.where(drop_keep(p, rhash[w][:, rr], n0 + nt * 8 + 2 * T + c), pr, 0.0)
                        s[:, nt, 2 * rr + c] = pr
                l_run[w][:, rr] = l_run[w][:, rr] * alpha + rsum
                o[w][:, :, 2 * rr] *= alpha[:, None]
                o[w][:, :, 2 * rr + 1] *= alpha[:, None]
            s_regs[w] = s
        sm.wait_all()
        sm.syncthreads()
        if nb + 1 < nb_end:
            load_tile(sm, sK, BN, D, kFwdThreads, p.k, kg, p.k_sl, n0 + BN, sq.S, p.E, p.vec_loads)
        for w in range(NW):
            s = s_regs[w]
            for kk in range(BN // 16):
                a = np.stack([pack(s[:, 2 * kk, 0], s[:, 2 * kk, 1]), pack(s[:, 2 * kk, 2], s[:, 2 * kk, 3]),
                              pack(s[:, 2 * kk + 1, 0], s[:, 2 * kk + 1, 1]),
                              pack(s[:, 2 * kk + 1, 2], s[:, 2 * kk + 1, 3])], axis=1)
                if "repack" in MUT:  # C fragments of n-tiles 2kk, 2kk+1 taken as a0,a1 / a2,a3 (wrong)
                    a = a[:, [0, 2, 1, 3]]
                for np_ in range(D // 16):
                    bf = ldmatrix_x4(sm, ldm_trans_row(sV, SROW, kk * 16, np_ * 16, LANES), thr[w], trans=True)
                    o[w][:, 2 * np_] = mma16816(o[w][:, 2 * np_], a, bf[:, 0], bf[:, 1])
                    o[w][:, 2 * np_ + 1] = mma16816(o[w][:, 2 * np_ + 1], a, bf[:, 2], bf[:, 3])
    sm.wait_all()

    # epilogue
    for w in range(NW):
        for rr in range(2):
            l = l_run[w][:, rr].copy()
            l = l + shfl_xor(l, 1)
            l = l + shfl_xor(l, 2)
            i = row[w][0 if "epi_row" in MUT else rr]
            live = i < sq.L
            with np.errstate(divide="ignore"):
                inv = np.where(l > 0, p.drop_scale / np.where(l > 0, l, 1.0), 0.0)
                lg = np.log2(np.where(l > 0, l, 1.0))
            if p.num_splits > 1:
                prow = lse_row(p, sq, b, h, i) * p.num_splits + split
                for nd in range(NT_O):
                    for c in range(2):
                        col = nd * 8 + 2 * T + c
                        wr = live & (col < p.Ev)
                        p.o_part.write((prow * p.Ev + col)[wr], (o[w][:, nd, 2 * rr + c] * inv)[wr])
                wr = live & (T == 0)
                p.lse_part.write(prow[wr], np.where(l > 0, m_run[w][:, rr] + lg, -INF)[wr])
                continue
            orow = out_row(p, sq, b, h, i)
            for nd in range(NT_O):
                for c in range(2):
                    col = nd * 8 + 2 * T + c
                    wr = live & (col < p.Ev)
                    p.out.write((orow * p.Ev + col)[wr], rnd(o[w][:, nd, 2 * rr + c] * inv)[wr])
            wr = live & (T == 0)
            p.lse.write(lse_row(p, sq, b, h, i)[wr], np.where(l > 0, (m_run[w][:, rr] + lg) * kLn2, INF)[wr])


def attn_fwd_split_reduce(p, rows):
    """attn_fwd_split_reduce_kernel: one warp per row (written per row, lanes over columns)."""
    for r in range(rows):
        lse_s = p.lse_part.read(r * p.num_splits + np.arange(p.num_splits))
        mx = lse_s.max()
        m_use = 0.0 if mx == -INF else mx
        total = np.exp2(lse_s - m_use).sum()
        inv = 1.0 / total if total > 0 else 0.0
        cols = np.arange(p.Ev)
        acc = np.zeros(p.Ev)
        for s in range(p.num_splits):
            wgt = np.exp2(lse_s[s] - m_use)
            if wgt > 0:
                acc += wgt * p.o_part.read((r * p.num_splits + s) * p.Ev + cols)
        p.out.write(r * p.Ev + cols, rnd(acc * inv))
        p.lse.write([r], (m_use + math.log2(total)) * kLn2 if total > 0 else INF)


# ------------------------------------------------------------------------------------------------
# attention_bwd.cuh
# ------------------------------------------------------------------------------------------------
kBwdBM, kBwdBN, kBwdThreads = 64, 64, 256


def dkdv_smem_bytes(D, STAGES):
    return (2 + 2 * STAGES) * 64 * (D + 8) * 2 + 2 * 64 * (64 + 8) * 2 + 2 * STAGES * 64 * 4


def dq_smem_bytes(D):
    return 4 * 64 * (D + 8) * 2 + 64 * (64 + 8) * 2 + 2 * 64 * 4


def attn_bwd_delta(p, dout, out, rows, Ev, varlen_heads=0):
    for r in range(rows):
        cols = np.arange(Ev)
        acc = float((dout.read(r * Ev + cols) * out.read(r * Ev + cols)).sum())
        dst = (r % varlen_heads) * (rows // varlen_heads) + r // varlen_heads if varlen_heads > 0 else r
        p.delta.write([dst], acc)


def bwd_entry(p, sq, b, h, i, j, rhash, dot, dp, lse_log2, delta):
    vis = visible(p, sq, i, j)
    s, th = score_nat(p, dot, b, h, i, j, vis)
    with np.errstate(invalid="ignore"):
        prob = np.exp2(s * kLog2e - lse_log2)
    z = np.ones(32)
    if p.has_dropout:
        z = np.where(drop_keep(p, rhash, j), p.drop_scale, 0.0)
    p_drop = prob * z
    d = prob * (dp * z - delta)
    if p.has_softcap:
        d = d * (1.0 - th * th)
    return np.where(vis, p_drop, 0.0), np.where(vis, d, 0.0)


class F32View:
    """fp32 arrays carved out of the 16-bit smem (two slots per float, as the CUDA code does)."""

    def __init__(self, sm, base_slot):
        check(base_slot % 2 == 0, "float array in smem not 4-byte aligned")
        self.sm, self.base = sm, base_slot

    def write(self, i, val, thr):
        # keep the value in the first slot, mark the second as written too
        self.sm.write(self.base + 2 * i, val, thr)
        self.sm.write(self.base + 2 * i + 1, 0.0, thr)

    def read(self, i, thr):
        v = self.sm.read(self.base + 2 * np.asarray(i), thr)
        self.sm.read(self.base + 2 * np.asarray(i) + 1, thr)
        return v


def attn_bwd_dkdv_block(p, D, STAGES, VARLEN, bx, hk, b):
    BM, BN, SROW, PROW = kBwdBM, kBwdBN, D + 8, kBwdBM + 8
    NP = D // 32
    NTH = kBwdThreads
    sm = Smem(dkdv_smem_bytes(D, STAGES), "dkdv smem")
    sK = 0
    sV = sK + BN * SROW
    sQbuf = sV + BN * SROW
    sdObuf = sQbuf + STAGES * BM * SROW
    sPt = sdObuf + STAGES * BM * SROW
    sdSt = sPt + BN * PROW
    sLseBuf = F32View(sm, sdSt + BN * PROW)
    sDeltaBuf = F32View(sm, sdSt + BN * PROW + 2 * STAGES * BM)

    n0 = bx * BN
    sq = sequence(p, b, VARLEN)
    if n0 >= sq.S:
        return
    NW = NTH // 32
    thr = [w * 32 + LANES for w in range(NW)]
    kg, vg = k_offset(p, sq, b, hk), v_offset(p, sq, b, hk)
    load_tile(sm, sK, BN, D, NTH, p.k, kg, p.k_sl, n0, sq.S, p.E, p.vec_loads)
    load_tile(sm, sV, BN, D, NTH, p.v, vg, p.v_sl, n0, sq.S, p.Ev, p.vec_loads)

    dk = [np.zeros((32, 2 * NP, 4)) for _ in range(NW)]
    dv = [np.zeros((32, 2 * NP, 4)) for _ in range(NW)]
    i_lo, i_hi = query_range(p, sq, n0, min(n0 + BN, sq.S) - 1)
    mb_begin = i_lo // BM
    n_mb = (i_hi + BM - 1) // BM - mb_begin if i_hi > i_lo else 0
    n_tiles = n_mb * p.group

    def load_work(it, stage):
        h = hk * p.group + it // n_mb
        m0 = (mb_begin + it % n_mb) * BM
        lrow = lse_row(p, sq, b, h, 0)
        qg = q_offset(p, sq, b, h)
        dog = out_row(p, sq, b, h, 0) * p.Ev
        load_tile(sm, sQbuf + stage * BM * SROW, BM, D, NTH, p.q, qg, p.q_sl, m0, sq.L, p.E, p.vec_loads)
        load_tile(sm, sdObuf + stage * BM * SROW, BM, D, NTH, p.dout, dog, out_row_step(p) * p.Ev, m0, sq.L, p.Ev,
                  p.vec_loads)
        for r in range(0, BM):  # r = threadIdx.x < BM
            i = m0 + r
            sLseBuf.write(stage * BM + r, p.lse_in.read(lrow + i) * kLog2e if i < sq.L else INF, r)
            sDeltaBuf.write(stage * BM + r, p.delta.read(lrow + i) if i < sq.L else 0.0, r)

    if STAGES == 2 and n_tiles > 0:
        load_work(0, 0)
    for it in range(n_tiles):
        stage = (it & 1) if STAGES == 2 else 0
        if STAGES == 2:
            sm.wait_all()
            sm.syncthreads()
            if it + 1 < n_tiles:
                load_work(it + 1, stage ^ 1)
        else:
            sm.syncthreads()
            load_work(it, 0)
            sm.wait_all()
            sm.syncthreads()
        h = hk * p.group + it // n_mb
        m0 = (mb_begin + it % n_mb) * BM
        sQ = sQbuf + stage * BM * SROW
        sdO = sdObuf + stage * BM * SROW
        for w in range(NW):
            kr, half = w & 3, w >> 2
            s = warp_gemm_abt(sm, np.zeros((32, 4, 4)), 4, D, sK + kr * 16 * SROW, SROW, sQ + half * 32 * SROW, SROW,
                              thr[w])
            dp = warp_gemm_abt(sm, np.zeros((32, 4, 4)), 4, D, sV + kr * 16 * SROW, SROW, sdO + half * 32 * SROW,
                               SROW, thr[w])
            for nt in range(4):
                for rr in range(2):
                    jl = kr * 16 + G + rr * 8
                    pd, ds = [None, None], [None, None]
                    for c in range(2):
                        il = half * 32 + nt * 8 + 2 * T + c
                        i = m0 + il
                        rh = drop_row_hash(p, sq, b, h, i) if p.has_dropout else np.zeros(32, np.uint64)
                        pd[c], ds[c] = bwd_entry(p, sq, b, h, i, n0 + jl, rh, s[:, nt, 2 * rr + c],
                                                 dp[:, nt, 2 * rr + c],
                                                 sLseBuf.read(stage * BM + il, thr[w]),
                                                 sDeltaBuf.read(stage * BM + il, thr[w]))
                    off = jl * PROW + half * 32 + nt * 8 + 2 * T
                    if "dkdv_half" in MUT:  # forgets the warp's query half
                        off = jl * PROW + nt * 8 + 2 * T
                    st32(sm, sPt + off, pack(pd[0], pd[1]), thr[w])
                    st32(sm, sdSt + off, pack(ds[0], ds[1]), thr[w])
        sm.syncthreads()
        for w in range(NW):
            kr, half = w & 3, w >> 2
            dv[w] = warp_gemm_ab(sm, dv[w], NP, BM, sPt + kr * 16 * PROW, PROW, sdO + half * (D // 2), SROW, thr[w])
            dk[w] = warp_gemm_ab(sm, dk[w], NP, BM, sdSt + kr * 16 * PROW, PROW, sQ + half * (D // 2), SROW, thr[w])
    sm.wait_all()

    for w in range(NW):
        kr, half = w & 3, w >> 2
        for rr in range(2):
            j = n0 + kr * 16 + G + rr * 8
            live = j < sq.S
            krow = key_row(p, sq, b, hk, j)
            for n in range(2 * NP):
                for c in range(2):
                    col = half * (D // 2) + n * 8 + 2 * T + c
                    wk = live & (col < p.E)
                    wv = live & (col < p.Ev)
                    p.dk.write((krow * p.E + col)[wk], rnd(dk[w][:, n, 2 * rr + c] * p.scale)[wk])
                    p.dv.write((krow * p.Ev + col)[wv], rnd(dv[w][:, n, 2 * rr + c])[wv])
    check(sm.max_slot < sm.n, "smem overflow")


def attn_bwd_dq_block(p, D, VARLEN, bx, h, b):
    BM, BN, SROW, PROW = kBwdBM, kBwdBN, D + 8, kBwdBN + 8
    NP = D // 32
    NTH = kBwdThreads
    sm = Smem(dq_smem_bytes(D), "dq smem")
    sQ = 0
    sdO = sQ + BM * SROW
    sK = sdO + BM * SROW
    sV = sK + BN * SROW
    sdS = sV + BN * SROW
    sLse = F32View(sm, sdS + BM * PROW)
    sDelta = F32View(sm, sdS + BM * PROW + 2 * BM)

    m0 = bx * BM
    sq = sequence(p, b, VARLEN)
    if m0 >= sq.L:
        return
    hk = h // p.group
    NW = NTH // 32
    thr = [w * 32 + LANES for w in range(NW)]
    lrow = lse_row(p, sq, b, h, 0)
    do_stride = out_row_step(p) * p.Ev
    qg, dog = q_offset(p, sq, b, h), out_row(p, sq, b, h, 0) * p.Ev
    kg, vg = k_offset(p, sq, b, hk), v_offset(p, sq, b, hk)
    dq = [np.zeros((32, 2 * NP, 4)) for _ in range(NW)]
    j_lo, j_hi = key_range(p, sq, m0, min(m0 + BM, sq.L) - 1)
    nb_begin = j_lo // BN
    nb_end = (j_hi + BN - 1) // BN if j_hi > j_lo else nb_begin
    irow = [(m0 + (w & 3) * 16 + G, m0 + (w & 3) * 16 + G + 8) for w in range(NW)]
    rhash = [np.zeros((32, 2), np.uint64) for _ in range(NW)]
    if p.has_dropout:
        for w in range(NW):
            rhash[w][:, 0] = drop_row_hash(p, sq, b, h, irow[w][0])
            rhash[w][:, 1] = drop_row_hash(p, sq, b, h, irow[w][1])

    if nb_begin < nb_end:
        load_tile(sm, sQ, BM, D, NTH, p.q, qg, p.q_sl, m0, sq.L, p.E, p.vec_loads)
        load_tile(sm, sdO, BM, D, NTH, p.dout, dog, do_stride, m0, sq.L, p.Ev, p.vec_loads)
        load_tile(sm, sV, BN, D, NTH, p.v, vg, p.v_sl, nb_begin * BN, sq.S, p.Ev, p.vec_loads)
        for r in range(BM):
            i = m0 + r
            sLse.write(r, p.lse_in.read(lrow + i) * kLog2e if i < sq.L else INF, r)
            sDelta.write(r, p.delta.read(lrow + i) if i < sq.L else 0.0, r)

    for nb in range(nb_begin, nb_end):
        n0 = nb * BN
        sm.syncthreads()
        load_tile(sm, sK, BN, D, NTH, p.k, kg, p.k_sl, n0, sq.S, p.E, p.vec_loads)
        sm.wait_all()
        sm.syncthreads()
        for w in range(NW):
            qr, half = w & 3, w >> 2
            s = warp_gemm_abt(sm, np.zeros((32, 4, 4)), 4, D, sQ + qr * 16 * SROW, SROW, sK + half * 32 * SROW, SROW,
                              thr[w])
            dp = warp_gemm_abt(sm, np.zeros((32, 4, 4)), 4, D, sdO + qr * 16 * SROW, SROW, sV + half * 32 * SROW,
                               SROW, thr[w])
            for nt in range(4):
                for rr in range(2):
                    il = qr * 16 + G + rr * 8
                    ds = [None, None]
                    for c in range(2):
                        j = n0 + half * 32 + nt * 8 + 2 * T + c
                        _, ds[c] = bwd_entry(p, sq, b, h, irow[w][rr], j, rhash[w][:, rr], s[:, nt, 2 * rr + c],
                                             dp[:, nt, 2 * rr + c], sLse.read(il, thr[w]), sDelta.read(il, thr[w]))
                    st32(sm, sdS + il * PROW + half * 32 + nt * 8 + 2 * T, pack(ds[0], ds[1]), thr[w])
        if "dq_no_sync" not in MUT:
            sm.syncthreads()
        if nb + 1 < nb_end:
            load_tile(sm, sV, BN, D, NTH, p.v, vg, p.v_sl, n0 + BN, sq.S, p.Ev, p.vec_loads)
        for w in range(NW):
            qr, half = w & 3, w >> 2
            dq[w] = warp_gemm_ab(sm, dq[w], NP, BN, sdS + qr * 16 * PROW, PROW, sK + half * (D // 2), SROW, thr[w])
    sm.wait_all()

    for w in range(NW):
        half = w >> 2
        for rr in range(2):
            i = irow[w][rr]
            live = i < sq.L
            orow = out_row(p, sq, b, h, i)
            for n in range(2 * NP):
                for c in range(2):
                    col = half * (D // 2) + n * 8 + 2 * T + c
                    wr = live & (col < p.E)
                    p.dq.write((orow * p.E + col)[wr], rnd(dq[w][:, n, 2 * rr + c] * p.scale)[wr])


# ------------------------------------------------------------------------------------------------
# attention_simt.cuh (fp32 path and the fp16/bf16 fallback): one warp per query (key) row; lane l
# owns head-dim columns l, l + 32, ... (kSimtCols = 8 of them).
# ------------------------------------------------------------------------------------------------
kSimtWarps, kSimtCols = 4, 8
UCOLS = LANES[:, None] + 32 * np.arange(kSimtCols)[None, :]  # (32, 8) column of (lane, u)


def sequence_any(p, b):
    return sequence(p, b, p.cu_q is not None)


def load_row(g, off, n):
    x = np.zeros((32, kSimtCols))
    m = UCOLS < n
    x[m] = g.read(off + UCOLS[m])
    return x


def dot_row(x, g, off, n):
    m = UCOLS < n
    y = np.zeros((32, kSimtCols))
    y[m] = g.read(off + UCOLS[m])
    return float((x * y).sum())  # per-lane partial sums, then warp_sum: the same total


def attn_fwd_simt_warp(p, i, h, b):
    sq = sequence_any(p, b)
    if i >= sq.L:
        return
    hk = h // p.group
    kg, vg = k_offset(p, sq, b, hk), v_offset(p, sq, b, hk)
    q = load_row(p.q, q_offset(p, sq, b, h) + i * p.q_sl, p.E)
    acc = np.zeros((32, kSimtCols))
    rhash = drop_row_hash(p, sq, b, h, i) if p.has_dropout else 0
    j_lo, j_hi = key_range(p, sq, i, i)
    m, l = -INF, 0.0
    for j in range(j_lo, j_hi):
        if not visible(p, sq, i, j):
            continue
        s, _ = score_nat(p, np.array([dot_row(q, p.k, kg + j * p.k_sl, p.E)]), b, h, i, j, np.array([True]))
        s = float(s[0])
        if s == -INF:
            continue
        sl = s * kLog2e
        m_new = max(m, sl)
        alpha = 2.0 ** (m - m_new)
        pr = 2.0 ** (sl - m_new)
        m = m_new
        l = l * alpha + pr
        pk = 0.0 if (p.has_dropout and not drop_keep(p, rhash, j)) else pr
        vrow = np.zeros((32, kSimtCols))
        msk = UCOLS < p.Ev
        vrow[msk] = p.v.read(vg + j * p.v_sl + UCOLS[msk])
        acc = acc * alpha + np.where(msk, pk * vrow, 0.0)
    inv = p.drop_scale / l if l > 0 else 0.0
    orow = out_row(p, sq, b, h, i)
    msk = UCOLS < p.Ev
    p.out.write(orow * p.Ev + UCOLS[msk], (acc * inv)[msk])
    p.lse.write([lse_row(p, sq, b, h, i)], (m + math.log2(l)) * kLn2 if l > 0 else INF)


def simt_bwd_entry(p, sq, b, h, i, j, dot, lse_log2):
    if not visible(p, sq, i, j):
        return False, 0.0, 0.0
    s, th = score_nat(p, np.array([dot]), b, h, i, j, np.array([True]))
    prob = 2.0 ** (float(s[0]) * kLog2e - lse_log2)
    return prob != 0.0, prob, float(th[0])


def attn_bwd_dq_simt_warp(p, i, h, b):
    sq = sequence_any(p, b)
    if i >= sq.L:
        return
    hk = h // p.group
    kg, vg = k_offset(p, sq, b, hk), v_offset(p, sq, b, hk)
    orow, lrow = out_row(p, sq, b, h, i), lse_row(p, sq, b, h, i)
    q = load_row(p.q, q_offset(p, sq, b, h) + i * p.q_sl, p.E)
    dO = load_row(p.dout, orow * p.Ev, p.Ev)
    dq = np.zeros((32, kSimtCols))
    lse_log2, delta = float(p.lse_in.read(lrow)) * kLog2e, float(p.delta.read(lrow))
    rhash = drop_row_hash(p, sq, b, h, i) if p.has_dropout else 0
    j_lo, j_hi = key_range(p, sq, i, i)
    for j in range(j_lo, j_hi):
        krow = kg + j * p.k_sl
        ok, prob, th = simt_bwd_entry(p, sq, b, h, i, j, dot_row(q, p.k, krow, p.E), lse_log2)
        if not ok:
            continue
        z = (p.drop_scale if drop_keep(p, rhash, j) else 0.0) if p.has_dropout else 1.0
        ds = prob * (dot_row(dO, p.v, vg + j * p.v_sl, p.Ev) * z - delta)
        if p.has_softcap:
            ds *= 1.0 - th * th
        msk = UCOLS < p.E
        kr = np.zeros((32, kSimtCols))
        kr[msk] = p.k.read(krow + UCOLS[msk])
        dq += np.where(msk, ds * kr, 0.0)
    msk = UCOLS < p.E
    p.dq.write(orow * p.E + UCOLS[msk], (dq * p.scale)[msk])


def attn_bwd_dkdv_simt_warp(p, j, hk, b):
    sq = sequence_any(p, b)
    if j >= sq.S:
        return
    k = load_row(p.k, k_offset(p, sq, b, hk) + j * p.k_sl, p.E)
    v = load_row(p.v, v_offset(p, sq, b, hk) + j * p.v_sl, p.Ev)
    dk = np.zeros((32, kSimtCols))
    dv = np.zeros((32, kSimtCols))
    i_lo, i_hi = query_range(p, sq, j, j)
    for h in range(hk * p.group, (hk + 1) * p.group):
        qg = q_offset(p, sq, b, h)
        lrow = lse_row(p, sq, b, h, 0)
        for i in range(i_lo, i_hi):
            qrow = qg + i * p.q_sl
            ok, prob, th = simt_bwd_entry(p, sq, b, h, i, j, dot_row(k, p.q, qrow, p.E),
                                          float(p.lse_in.read(lrow + i)) * kLog2e)
            if not ok:
                continue
            z = (p.drop_scale if drop_keep(p, drop_row_hash(p, sq, b, h, i), j) else 0.0) if p.has_dropout else 1.0
            x = load_row(p.dout, out_row(p, sq, b, h, i) * p.Ev, p.Ev)
            ds = prob * (float((x * v).sum()) * z - float(p.delta.read(lrow + i)))
            if p.has_softcap:
                ds *= 1.0 - th * th
            dv += prob * z * x
            msk = UCOLS < p.E
            qr = np.zeros((32, kSimtCols))
            qr[msk] = p.q.read(qrow + UCOLS[msk])
            dk += np.where(msk, ds * qr, 0.0)
    krow = key_row(p, sq, b, hk, j)
    mk, mv = UCOLS < p.E, UCOLS < p.Ev
    p.dk.write(krow * p.E + UCOLS[mk], (dk * p.scale)[mk])
    p.dv.write(krow * p.Ev + UCOLS[mv], dv[mv])
