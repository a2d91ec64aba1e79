"""Fused attention in Triton: forward (online softmax) and backward (Δ preprocess, dK/dV, dQ).

Implements the native contract of :mod:`fastattn.ops.attention` (see its docstring): q ``(B, Hq, L, E)``,
k ``(B, Hkv, S, E)``, v ``(B, Hkv, S, Ev)``, GQA, an additive bias with arbitrary strides, the
window/causal rule, softcap, hash-based dropout, ``lse`` float32 with ``+inf`` for empty rows.

Blocking (the Triton fused-attention tutorial's, without its shortcuts):

* forward: one program per (query block of BLOCK_M rows, batch·query head). It walks the key
  blocks of BLOCK_N keys that the window/causal rule lets the block see (hidden blocks are never
  visited), keeping a running max ``m``, sum ``l`` and output ``acc`` in fp32 (online softmax);
  scores live in the log2 domain (``scale·log2(e)`` folded in) so ``exp2`` does the exponentials.
  Boundary rows/keys and padded head dims are masked loads, so any L, S, E, Ev work. Only edge
  tiles (crossing S or the window's edge) pay for masks: the tiles every row fully sees run a
  mask-free copy of the loop (the tutorial's split of causal work, generalised to windows).
* backward: ``Δ = rowsum(dO∘O)`` per row (preprocess); then one program per (key block, batch·KV
  head) recomputes ``P = exp2(s - lse)`` for every query head of its GQA group and every query
  block that sees the key block and accumulates dK, dV in registers (no atomics); and one program
  per (query block, batch·query head) accumulates dQ the same way over key blocks.

* packed variable-length batches (``triton_attention_varlen_fwd/bwd``, flash-attn's cu_seqlens
  convention): the same three kernels with ``VARLEN``; a program finds its sequence's first rows,
  lengths and diagonal from cu_seqlens (:func:`_sequence`), the grids run over (sequence·head,
  blocks of the longest sequence) and programs past their sequence's end exit at once. Packed
  tensors are (T, H, D): batch strides 0, the row stride is the token stride.
* decoding (L <= 16 query rows, long S, dense forward only): the split-KV kernel packs the query
  heads of a GQA group into one tile's rows (K/V read once per group), each program takes one
  chunk of keys and writes a partial (out, lse); a small kernel combines the chunks (flash-decoding).
  The backward is the dense one.

On a GPU the block sizes are autotuned; under ``TRITON_INTERPRET=1`` (CPU tensors, the tests here)
one small fixed config is used and every load is cast to fp32 (the interpreter has no bf16 math).
"""
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from fastattn.ops import attention as _attn_ops
from fastattn.triton._compat import NEEDS_FAKE, triton_op, tune_configs, wrap_triton

__all__ = ["triton_attention_fwd", "triton_attention_bwd", "triton_attention_varlen_fwd",
           "triton_attention_varlen_bwd"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634
_M32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# Small device helpers shared by the kernels.
# --------------------------------------------------------------------------------------------
@triton.jit
def _mix32(x):
    """lowbias32 on uint32 (wrapping multiplies): the hash of ``fastattn.ops.attention._mix32``."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _dropout_keep(seed, row0, offs_m, offs_n, thresh_signed):
    """Bool (BLOCK_M, BLOCK_N): ``mix(mix(mix(seed) ^ row) ^ j) >= threshold`` as unsigned 32-bit.

    row = ``row0 + i`` with ``row0 = (b*Hq + h)*L``, taken mod 2**32. The unsigned comparison is done
    on signed ints with the top bit flipped (order preserving), so no 64-bit promotion can creep in.
    """
    seed_h = _mix32(seed.to(tl.int64).to(tl.uint32))
    row = (row0 + offs_m.to(tl.int64)).to(tl.uint32)
    x = _mix32(seed_h ^ row)
    x = _mix32(x[:, None] ^ offs_n.to(tl.uint32)[None, :])
    return (x ^ 0x80000000).to(tl.int32, bitcast=True) >= thresh_signed


@triton.jit
def _tanh(x):
    # 1 - 2/(e^{2x} + 1): exact limits ±1 for large |x| (no NaN), fine precision for scores.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _scores(qk, bias_ptrs, offs_m, offs_n, L, S, scale, softcap, window_left, window_right, diag_offset,
            HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
            MASKED: tl.constexpr):
    """Raw ``q·k`` tile -> scores in the log2 domain, and tanh for softcap's grad.

    ``s = scale·qk``; softcap: ``s = c·tanh(s/c)``; ``+ bias``. On an edge tile (MASKED) keys past S or
    hidden by the window rule become -inf; an interior tile is visible everywhere by construction.
    """
    if HAS_SOFTCAP:
        t = _tanh(qk * (scale / softcap))
        s2 = t * (softcap * 1.4426950408889634)
    else:
        t = qk  # unused
        s2 = qk * (scale * 1.4426950408889634)
    if HAS_BIAS:
        if MASKED:
            bmask = (offs_m[:, None] < L) & (offs_n[None, :] < S)
        else:
            bmask = (offs_m[:, None] < L) & (offs_n[None, :] >= 0)
        s2 += tl.load(bias_ptrs, mask=bmask, other=0.0).to(tl.float32) * 1.4426950408889634
    if MASKED:
        visible = offs_n[None, :] < S
        if HAS_WL:
            visible = visible & (offs_n[None, :] >= offs_m[:, None] + (diag_offset - window_left))
        if HAS_WR:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + (diag_offset + window_right))
        s2 = tl.where(visible, s2, float("-inf"))
    return s2, t


@triton.jit
def _key_ranges(m0, S, window_left, window_right, diag_offset,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr):
    """Key blocks for the query rows [m0, m0+BLOCK_M): ``lo <= full_lo, full_hi <= hi``.

    Keys in [lo, hi) may be seen by some row (blocks outside are skipped); keys in [full_lo, full_hi)
    are seen by every row and are < S (those tiles need no mask). full_lo/full_hi are block aligned.
    """
    lo = m0 * 0  # tensors, not constants, so both branches have one type
    hi = m0 * 0 + S
    full_lo = m0 * 0
    full_hi = m0 * 0 + S
    if HAS_WL:  # row i sees j >= i + diag - left
        lo = tl.minimum(tl.maximum(m0 + diag_offset - window_left, 0), S)
        full_lo = tl.maximum(m0 + BLOCK_M - 1 + diag_offset - window_left, 0)
    if HAS_WR:  # row i sees j <= i + diag + right
        hi = tl.maximum(tl.minimum(m0 + BLOCK_M + diag_offset + window_right, S), 0)
        full_hi = tl.maximum(tl.minimum(m0 + diag_offset + window_right + 1, S), 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    full_lo = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_ranges(n0, L, S, window_left, window_right, diag_offset,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr):
    """Query blocks for the keys [n0, n0+BLOCK_N), as :func:`_key_ranges` (row i sees key j iff
    ``j - diag - right <= i <= j - diag + left``); [full_lo, full_hi) rows are < L and see every key,
    and a key block running past S has no interior."""
    lo = n0 * 0
    hi = n0 * 0 + L
    full_lo = n0 * 0
    full_hi = n0 * 0 + L
    if HAS_WR:
        lo = tl.minimum(tl.maximum(n0 - diag_offset - window_right, 0), L)
        full_lo = tl.maximum(n0 + BLOCK_N - 1 - diag_offset - window_right, 0)
    if HAS_WL:
        hi = tl.maximum(tl.minimum(n0 + BLOCK_N - diag_offset + window_left, L), 0)
        full_hi = tl.maximum(tl.minimum(n0 - diag_offset + window_left + 1, L), 0)
    if n0 + BLOCK_N > S:
        full_hi = full_hi * 0
    lo = (lo // BLOCK_M) * BLOCK_M
    full_lo = tl.cdiv(full_lo, BLOCK_M) * BLOCK_M
    full_hi = (full_hi // BLOCK_M) * BLOCK_M
    return lo, full_lo, full_hi, hi


# --------------------------------------------------------------------------------------------
# Where a program's sequence lives: dense batches and packed variable-length ones (VARLEN).
# --------------------------------------------------------------------------------------------
@triton.jit
def _block_and_head(VARLEN: tl.constexpr):
    """(block index, batch·head index) of this program. Varlen grids are (N·H, blocks), since N·H
    may pass the 65535 limit of grid dims 1 and 2; dense grids are (blocks, B·H)."""
    if VARLEN:
        block = tl.program_id(1)
        head = tl.program_id(0)
    else:
        block = tl.program_id(0)
        head = tl.program_id(1)
    return block, head


@triton.jit
def _sequence(CuQ, CuK, b, h, Hq, L, S, diag_offset, bottom_right, VARLEN: tl.constexpr):
    """(first query row, L, first key row, S, diag_offset, row0) of batch entry b, query head h.

    Dense: rows start at 0 and the batch index moves the pointers (stride ``sxb``); ``row0`` =
    ``(b*Hq + h)*L`` is the dropout hash's row base and the index of row 0 in (B, Hq, L) lse/Δ.
    Varlen (``L`` = Tq here, the ``sxb`` strides are 0): sequence b is rows ``cu_q[b]:cu_q[b+1]``
    against keys ``cu_k[b]:cu_k[b+1]``; ``row0 = h*Tq + cu_q[b]``, the same two roles in (Hq, Tq).
    """
    if VARLEN:
        q0 = tl.load(CuQ + b).to(tl.int64)
        k0 = tl.load(CuK + b).to(tl.int64)
        L_b = (tl.load(CuQ + b + 1) - q0).to(tl.int32)
        S_b = (tl.load(CuK + b + 1) - k0).to(tl.int32)
        diag_b = diag_offset + bottom_right * (S_b - L_b)
        row0 = h.to(tl.int64) * L + q0
    else:
        q0 = b.to(tl.int64) * 0
        k0 = q0
        L_b = L
        S_b = S
        diag_b = diag_offset
        row0 = (b * Hq + h).to(tl.int64) * L
    return q0, L_b, k0, S_b, diag_b, row0


# --------------------------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, bias_base, offs_m, n_start, n_end,
               sks, svs, sbl, sbs, L, S, E, Ev, scale, softcap, window_left, window_right, diag_offset,
               seed, row0, drop_thresh, keep_scale,
               E_PAD: tl.constexpr, EV_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Online softmax over the key tiles [n_start, n_end) (block aligned start).

    ``offs_m`` are the rows' query indices (for the masks and the dropout hash), ``row0`` their hash
    row base and ``bias_base`` their bias row pointers: scalars, or one per row (the decode kernel's
    tiles hold several query heads).
    """
    offs_e = tl.arange(0, E_PAD)
    offs_ev = tl.arange(0, EV_PAD)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            n_ok = offs_n[:, None] < S
        else:
            n_ok = offs_n[:, None] >= 0
        k = tl.load(k_base + offs_n[:, None] * sks + offs_e[None, :], mask=n_ok & (offs_e[None, :] < E), other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svs + offs_ev[None, :], mask=n_ok & (offs_ev[None, :] < Ev),
                    other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s2, _ = _scores(qk, bias_base + offs_m[:, None] * sbl + offs_n[None, :] * sbs, offs_m, offs_n, L, S,
                        scale, softcap, window_left, window_right, diag_offset,
                        HAS_BIAS, HAS_SOFTCAP, HAS_WL, HAS_WR, MASKED)
        # a row that has seen nothing yet keeps m = -inf; its exponentials are taken against 0.
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s2 - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, row0, offs_m, offs_n, drop_thresh)
            p = tl.where(keep, p * keep_scale, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_key_span(acc, l_i, m_i, q, k_base, v_base, bias_base, offs_m, n_first, n_last, lo, full_lo, full_hi, hi,
                  sks, svs, sbl, sbs, L, S, E, Ev, scale, softcap, window_left, window_right, diag_offset,
                  seed, row0, drop_thresh, keep_scale,
                  E_PAD: tl.constexpr, EV_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key tiles of [lo, hi) ∩ [n_first, n_last) (both block aligned; n_last may pass S): edge
    tiles before the interior [full_lo, full_hi), the interior without masks, edge tiles after it."""
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, bias_base, offs_m, tl.maximum(lo, n_first),
                               tl.minimum(tl.minimum(full_lo, hi), n_last),
                               sks, svs, sbl, sbs, L, S, E, Ev, scale, softcap, window_left, window_right,
                               diag_offset, seed, row0, drop_thresh, keep_scale, E_PAD, EV_PAD, HAS_BIAS,
                               HAS_SOFTCAP, HAS_WL, HAS_WR, HAS_DROPOUT, UPCAST, DOT_PRECISION, BLOCK_N, True)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, bias_base, offs_m, tl.maximum(full_lo, n_first),
                               tl.minimum(full_hi, n_last),
                               sks, svs, sbl, sbs, L, S, E, Ev, scale, softcap, window_left, window_right,
                               diag_offset, seed, row0, drop_thresh, keep_scale, E_PAD, EV_PAD, HAS_BIAS,
                               HAS_SOFTCAP, HAS_WL, HAS_WR, HAS_DROPOUT, UPCAST, DOT_PRECISION, BLOCK_N, False)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, bias_base, offs_m,
                               tl.maximum(tl.maximum(full_hi, full_lo), n_first), tl.minimum(hi, n_last),
                               sks, svs, sbl, sbs, L, S, E, Ev, scale, softcap, window_left, window_right,
                               diag_offset, seed, row0, drop_thresh, keep_scale, E_PAD, EV_PAD, HAS_BIAS,
                               HAS_SOFTCAP, HAS_WL, HAS_WR, HAS_DROPOUT, UPCAST, DOT_PRECISION, BLOCK_N, True)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seed", "drop_thresh"])
def _attn_fwd(Q, K, V, Bias, Out, Lse, CuQ, CuK,
              sqb, sqh, sql, skb, skh, sks, svb, svh, svs, sbb, sbh, sbl, sbs,
              sob, soh, sol, slb, slh, sll,
              Hq, Hkv, L, S, E, Ev, L_BUCKET, S_BUCKET,
              scale, softcap, window_left, window_right, diag_offset, bottom_right,
              seed, drop_thresh, keep_scale,
              E_PAD: tl.constexpr, EV_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, bh = _block_and_head(VARLEN)
    b = bh // Hq
    h = bh % Hq
    hk = h // (Hq // Hkv)
    q0, L, k0, S, diag_offset, row0 = _sequence(CuQ, CuK, b, h, Hq, L, S, diag_offset, bottom_right, VARLEN)
    m0 = pid_m * BLOCK_M
    if VARLEN:
        if m0 >= L:  # the grid is sized for the longest sequence
            return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, E_PAD)
    offs_ev = tl.arange(0, EV_PAD)

    q = tl.load(Q + b.to(tl.int64) * sqb + q0 * sql + h.to(tl.int64) * sqh + offs_m[:, None] * sql + offs_e[None, :],
                mask=(offs_m[:, None] < L) & (offs_e[None, :] < E), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * skb + k0 * sks + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + k0 * svs + hk.to(tl.int64) * svh
    bias_base = Bias + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, EV_PAD], tl.float32)
    lo, full_lo, full_hi, hi = _key_ranges(m0, S, window_left, window_right, diag_offset,
                                           BLOCK_M, BLOCK_N, HAS_WL, HAS_WR)
    acc, l_i, m_i = _fwd_key_span(acc, l_i, m_i, q, k_base, v_base, bias_base, offs_m, lo, hi,
                                  lo, full_lo, full_hi, hi, sks, svs, sbl, sbs, L, S, E, Ev, scale, softcap,
                                  window_left, window_right, diag_offset, seed, row0, drop_thresh, keep_scale,
                                  E_PAD, EV_PAD, HAS_BIAS, HAS_SOFTCAP, HAS_WL, HAS_WR, HAS_DROPOUT, UPCAST,
                                  DOT_PRECISION, BLOCK_N)

    empty = l_i == 0.0  # nothing visible: output 0, lse +inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    out_ptrs = Out + b.to(tl.int64) * sob + q0 * sol + h.to(tl.int64) * soh + offs_m[:, None] * sol + offs_ev[None, :]
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < L) & (offs_ev[None, :] < Ev))
    tl.store(Lse + b.to(tl.int64) * slb + q0 * sll + h.to(tl.int64) * slh + offs_m * sll, lse, mask=offs_m < L)


# --------------------------------------------------------------------------------------------
# Split-KV forward for decoding (L <= 16 query rows, long S), flash-decoding style.
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed", "drop_thresh"])
def _attn_fwd_decode(Q, K, V, Bias, OutPart, LsePart,
                     sqb, sqh, sql, skb, skh, sks, svb, svh, svs, sbb, sbh, sbl, sbs,
                     Hq, Hkv, L, S, E, Ev, CHUNK, NUM_CHUNKS,
                     scale, softcap, window_left, window_right, diag_offset,
                     seed, drop_thresh, keep_scale,
                     E_PAD: tl.constexpr, EV_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                     UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, L_POW2: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: one chunk of CHUNK keys of one (batch, KV head), for BLOCK_M packed rows.

    The M dimension packs the query heads that share the KV head: tile row r is query row
    ``r % L`` of head ``hk*group + r // L`` (rows past group*L repeat the last head and are not
    stored), so K/V are read once for the whole GQA group. Writes the chunk's normalised output
    and its lse (log2 units, -inf where the chunk shows a row nothing) to OutPart (B*Hq*L,
    NUM_CHUNKS, Ev) fp32 and LsePart (B*Hq*L, NUM_CHUNKS); _attn_decode_reduce combines them.
    """
    chunk = tl.program_id(0)
    bhk = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = bhk // Hkv
    hk = bhk % Hkv
    group = Hq // Hkv
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < group * L
    g = tl.minimum(r // L, group - 1)
    h = hk * group + g                    # each row's query head
    offs_m = r % L                        # each row's query index
    offs_e = tl.arange(0, E_PAD)
    offs_ev = tl.arange(0, EV_PAD)

    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64)[:, None] * sqh + offs_m[:, None] * sql + offs_e[None, :],
                mask=(offs_e[None, :] < E) & (offs_m[:, None] >= 0), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    bias_base = Bias + b.to(tl.int64) * sbb + h.to(tl.int64)[:, None] * sbh   # per row: (BLOCK_M, 1)
    row0 = (b * Hq + h).to(tl.int64) * L                                      # per row

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, EV_PAD], tl.float32)
    # every tile row has a query index in [0, L) ⊂ [0, L_POW2): the ranges of that row block
    lo, full_lo, full_hi, hi = _key_ranges(chunk * 0, S, window_left, window_right, diag_offset,
                                           L_POW2, BLOCK_N, HAS_WL, HAS_WR)
    n_first = chunk * CHUNK
    acc, l_i, m_i = _fwd_key_span(acc, l_i, m_i, q, k_base, v_base, bias_base, offs_m, n_first, n_first + CHUNK,
                                  lo, full_lo, full_hi, hi, sks, svs, sbl, sbs, L, S, E, Ev, scale, softcap,
                                  window_left, window_right, diag_offset, seed, row0, drop_thresh, keep_scale,
                                  E_PAD, EV_PAD, HAS_BIAS, HAS_SOFTCAP, HAS_WL, HAS_WR, HAS_DROPOUT, UPCAST,
                                  DOT_PRECISION, BLOCK_N)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    prow = ((b * Hq + h).to(tl.int64) * L + offs_m) * NUM_CHUNKS + chunk   # (row, chunk) of the partials
    tl.store(OutPart + prow[:, None] * Ev + offs_ev[None, :], out, mask=row_ok[:, None] & (offs_ev[None, :] < Ev))
    tl.store(LsePart + prow, lse2, mask=row_ok)


@triton.jit
def _attn_decode_reduce(OutPart, LsePart, Out, Lse, Hq, L, Ev, NUM_CHUNKS, sob, soh, sol,
                        EV_PAD: tl.constexpr, CHUNKS_PAD: tl.constexpr):
    """One program per query row: out = Σ_c w_c·out_c / Σ_c w_c with w_c = 2^(lse_c - max lse);
    a row no chunk showed anything (all -inf) gets out 0 and lse +inf."""
    row = tl.program_id(0).to(tl.int64)   # (b*Hq + h)*L + i
    bh = row // L
    i = row % L
    b = bh // Hq
    h = bh % Hq
    offs_c = tl.arange(0, CHUNKS_PAD)
    offs_ev = tl.arange(0, EV_PAD)
    c_ok = offs_c < NUM_CHUNKS
    lse_c = tl.load(LsePart + row * NUM_CHUNKS + offs_c, mask=c_ok, other=float("-inf"))
    m = tl.max(lse_c, 0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse_c - m_ref)   # 0 for empty chunks
    total = tl.sum(w, 0)
    o_c = tl.load(OutPart + (row * NUM_CHUNKS + offs_c)[:, None] * Ev + offs_ev[None, :],
                  mask=c_ok[:, None] & (offs_ev[None, :] < Ev), other=0.0)
    empty = total == 0.0
    out = tl.sum(o_c * w[:, None], 0) / tl.where(empty, 1.0, total)
    lse = tl.where(empty, float("inf"), (m_ref + tl.log2(tl.where(empty, 1.0, total))) * 0.6931471805599453)
    tl.store(Out + b * sob + h * soh + i * sol + offs_ev, out.to(Out.dtype.element_ty), mask=offs_ev < Ev)
    tl.store(Lse + row, lse)


# --------------------------------------------------------------------------------------------
# Backward: Δ = rowsum(dO∘O), then dK/dV per key block, then dQ per query block.
# --------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_delta(Out, DO, Delta, sob, soh, sol, sdb, sdh, sdl, Hq, L, Ev,
                    EV_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Δ (B, Hq, L) contiguous; a varlen batch runs it as B = 1, L = Tq (Δ then is (Hq, Tq))."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ev = tl.arange(0, EV_PAD)
    mask = (offs_m[:, None] < L) & (offs_ev[None, :] < Ev)
    o = tl.load(Out + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * sol + offs_ev[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + offs_m[:, None] * sdl + offs_ev[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * L + offs_m, tl.sum(o * do, 1), mask=offs_m < L)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, offs_n, m_start, m_end,
                sql, sdl, sll, sbl, sbs, L, S, E, Ev, scale, softcap, window_left, window_right, diag_offset,
                seed, row0, drop_thresh, keep_scale,
                E_PAD: tl.constexpr, EV_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, MASKED: tl.constexpr):
    """dK, dV contributions of the query tiles [m_start, m_end) of one query head."""
    offs_e = tl.arange(0, E_PAD)
    offs_ev = tl.arange(0, EV_PAD)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        if MASKED:
            row_ok = offs_m < L
        else:
            row_ok = offs_m >= 0
        q = tl.load(q_base + offs_m[:, None] * sql + offs_e[None, :],
                    mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdl + offs_ev[None, :],
                     mask=row_ok[:, None] & (offs_ev[None, :] < Ev), other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.load(lse_base + offs_m * sll, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)

        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s2, t = _scores(qk, bias_base + offs_m[:, None] * sbl + offs_n[None, :] * sbs, offs_m, offs_n, L, S,
                        scale, softcap, window_left, window_right, diag_offset,
                        HAS_BIAS, HAS_SOFTCAP, HAS_WL, HAS_WR, MASKED)
        p = tl.exp2(s2 - lse2[:, None])  # hidden keys and empty rows (lse = +inf) give 0
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, row0, offs_m, offs_n, drop_thresh)
            p_drop = tl.where(keep, p * keep_scale, 0.0)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        else:
            p_drop = p
        dv += tl.dot(tl.trans(p_drop.to(do.dtype)), do, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        ds = ds * scale
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["seed", "drop_thresh"])
def _attn_bwd_dkdv(Q, K, V, Bias, DO, Lse, Delta, DK, DV, CuQ, CuK,
                   sqb, sqh, sql, skb, skh, sks, svb, svh, svs, sbb, sbh, sbl, sbs,
                   sdb, sdh, sdl, slb, slh, sll, sdkb, sdkh, sdks, sdvb, sdvh, sdvs,
                   Hq, Hkv, L, S, E, Ev, L_BUCKET, S_BUCKET,
                   scale, softcap, window_left, window_right, diag_offset, bottom_right,
                   seed, drop_thresh, keep_scale,
                   E_PAD: tl.constexpr, EV_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n, bhk = _block_and_head(VARLEN)
    b = bhk // Hkv
    hk = bhk % Hkv
    group = Hq // Hkv
    L_arg = L  # Tq when VARLEN: the hash row base of each head below
    q0, L, k0, S, diag_offset, _ = _sequence(CuQ, CuK, b, hk * group, Hq, L, S, diag_offset, bottom_right, VARLEN)
    n0 = pid_n * BLOCK_N
    if VARLEN:
        if n0 >= S:  # the grid is sized for the longest sequence
            return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, E_PAD)
    offs_ev = tl.arange(0, EV_PAD)
    n_ok = offs_n[:, None] < S

    k = tl.load(K + b.to(tl.int64) * skb + k0 * sks + hk.to(tl.int64) * skh + offs_n[:, None] * sks + offs_e[None, :],
                mask=n_ok & (offs_e[None, :] < E), other=0.0)
    v = tl.load(V + b.to(tl.int64) * svb + k0 * svs + hk.to(tl.int64) * svh + offs_n[:, None] * svs
                + offs_ev[None, :], mask=n_ok & (offs_ev[None, :] < Ev), other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, E_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, EV_PAD], tl.float32)

    lo, full_lo, full_hi, hi = _query_ranges(n0, L, S, window_left, window_right, diag_offset,
                                             BLOCK_M, BLOCK_N, HAS_WL, HAS_WR)
    for g in range(0, group):  # the query heads sharing this KV head: summed here, no atomics
        h = hk * group + g
        q_base = Q + b.to(tl.int64) * sqb + q0 * sql + h.to(tl.int64) * sqh
        do_base = DO + b.to(tl.int64) * sdb + q0 * sdl + h.to(tl.int64) * sdh
        lse_base = Lse + b.to(tl.int64) * slb + q0 * sll + h.to(tl.int64) * slh
        bias_base = Bias + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
        if VARLEN:
            row0 = h.to(tl.int64) * L_arg + q0
        else:
            row0 = (b * Hq + h).to(tl.int64) * L
        delta_base = Delta + row0
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, offs_n,
                             lo, tl.minimum(full_lo, hi), sql, sdl, sll, sbl, sbs, L, S, E, Ev, scale, softcap,
                             window_left, window_right, diag_offset, seed, row0, drop_thresh, keep_scale,
                             E_PAD, EV_PAD, HAS_BIAS, HAS_SOFTCAP, HAS_WL, HAS_WR, HAS_DROPOUT, UPCAST,
                             DOT_PRECISION, BLOCK_M, True)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, offs_n,
                             full_lo, full_hi, sql, sdl, sll, sbl, sbs, L, S, E, Ev, scale, softcap,
                             window_left, window_right, diag_offset, seed, row0, drop_thresh, keep_scale,
                             E_PAD, EV_PAD, HAS_BIAS, HAS_SOFTCAP, HAS_WL, HAS_WR, HAS_DROPOUT, UPCAST,
                             DOT_PRECISION, BLOCK_M, False)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, offs_n,
                             tl.maximum(full_hi, full_lo), hi, sql, sdl, sll, sbl, sbs, L, S, E, Ev, scale,
                             softcap, window_left, window_right, diag_offset, seed, row0, drop_thresh,
                             keep_scale, E_PAD, EV_PAD, HAS_BIAS, HAS_SOFTCAP, HAS_WL, HAS_WR, HAS_DROPOUT,
                             UPCAST, DOT_PRECISION, BLOCK_M, True)

    dk_ptrs = DK + b.to(tl.int64) * sdkb + k0 * sdks + hk.to(tl.int64) * sdkh + offs_n[:, None] * sdks + offs_e[None, :]
    dv_ptrs = DV + b.to(tl.int64) * sdvb + k0 * sdvs + hk.to(tl.int64) * sdvh + offs_n[:, None] * sdvs + offs_ev[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=n_ok & (offs_e[None, :] < E))
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=n_ok & (offs_ev[None, :] < Ev))


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, bias_base, offs_m, n_start, n_end,
              sks, svs, sbl, sbs, L, S, E, Ev, scale, softcap, window_left, window_right, diag_offset,
              seed, row0, drop_thresh, keep_scale,
              E_PAD: tl.constexpr, EV_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """dQ contributions of the key tiles [n_start, n_end)."""
    offs_e = tl.arange(0, E_PAD)
    offs_ev = tl.arange(0, EV_PAD)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            n_ok = offs_n[:, None] < S
        else:
            n_ok = offs_n[:, None] >= 0
        k = tl.load(k_base + offs_n[:, None] * sks + offs_e[None, :], mask=n_ok & (offs_e[None, :] < E), other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svs + offs_ev[None, :], mask=n_ok & (offs_ev[None, :] < Ev),
                    other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s2, t = _scores(qk, bias_base + offs_m[:, None] * sbl + offs_n[None, :] * sbs, offs_m, offs_n, L, S,
                        scale, softcap, window_left, window_right, diag_offset,
                        HAS_BIAS, HAS_SOFTCAP, HAS_WL, HAS_WR, MASKED)
        p = tl.exp2(s2 - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, row0, offs_m, offs_n, drop_thresh)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        ds = ds * scale
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["seed", "drop_thresh"])
def _attn_bwd_dq(Q, K, V, Bias, DO, Lse, Delta, DQ, CuQ, CuK,
                 sqb, sqh, sql, skb, skh, sks, svb, svh, svs, sbb, sbh, sbl, sbs,
                 sdb, sdh, sdl, slb, slh, sll, sdqb, sdqh, sdql,
                 Hq, Hkv, L, S, E, Ev, L_BUCKET, S_BUCKET,
                 scale, softcap, window_left, window_right, diag_offset, bottom_right,
                 seed, drop_thresh, keep_scale,
                 E_PAD: tl.constexpr, EV_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                 UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, bh = _block_and_head(VARLEN)
    b = bh // Hq
    h = bh % Hq
    hk = h // (Hq // Hkv)
    q0, L, k0, S, diag_offset, row0 = _sequence(CuQ, CuK, b, h, Hq, L, S, diag_offset, bottom_right, VARLEN)
    m0 = pid_m * BLOCK_M
    if VARLEN:
        if m0 >= L:  # the grid is sized for the longest sequence
            return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, E_PAD)
    offs_ev = tl.arange(0, EV_PAD)
    row_ok = offs_m < L

    q = tl.load(Q + b.to(tl.int64) * sqb + q0 * sql + h.to(tl.int64) * sqh + offs_m[:, None] * sql + offs_e[None, :],
                mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdb + q0 * sdl + h.to(tl.int64) * sdh + offs_m[:, None] * sdl
                 + offs_ev[None, :], mask=row_ok[:, None] & (offs_ev[None, :] < Ev), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(Lse + b.to(tl.int64) * slb + q0 * sll + h.to(tl.int64) * slh + offs_m * sll,
                   mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + row0 + offs_m, mask=row_ok, other=0.0)
    k_base = K + b.to(tl.int64) * skb + k0 * sks + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + k0 * svs + hk.to(tl.int64) * svh
    bias_base = Bias + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
    dq = tl.zeros([BLOCK_M, E_PAD], tl.float32)

    lo, full_lo, full_hi, hi = _key_ranges(m0, S, window_left, window_right, diag_offset,
                                           BLOCK_M, BLOCK_N, HAS_WL, HAS_WR)
    dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, bias_base, offs_m, lo, tl.minimum(full_lo, hi),
                   sks, svs, sbl, sbs, L, S, E, Ev, scale, softcap, window_left, window_right, diag_offset,
                   seed, row0, drop_thresh, keep_scale, E_PAD, EV_PAD, HAS_BIAS, HAS_SOFTCAP, HAS_WL, HAS_WR,
                   HAS_DROPOUT, UPCAST, DOT_PRECISION, BLOCK_N, True)
    dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, bias_base, offs_m, full_lo, full_hi,
                   sks, svs, sbl, sbs, L, S, E, Ev, scale, softcap, window_left, window_right, diag_offset,
                   seed, row0, drop_thresh, keep_scale, E_PAD, EV_PAD, HAS_BIAS, HAS_SOFTCAP, HAS_WL, HAS_WR,
                   HAS_DROPOUT, UPCAST, DOT_PRECISION, BLOCK_N, False)
    dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, bias_base, offs_m, tl.maximum(full_hi, full_lo), hi,
                   sks, svs, sbl, sbs, L, S, E, Ev, scale, softcap, window_left, window_right, diag_offset,
                   seed, row0, drop_thresh, keep_scale, E_PAD, EV_PAD, HAS_BIAS, HAS_SOFTCAP, HAS_WL, HAS_WR,
                   HAS_DROPOUT, UPCAST, DOT_PRECISION, BLOCK_N, True)

    dq_ptrs = DQ + b.to(tl.int64) * sdqb + q0 * sdql + h.to(tl.int64) * sdqh + offs_m[:, None] * sdql + offs_e[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_e[None, :] < E))


# --------------------------------------------------------------------------------------------
# Launch configs: autotuned on a GPU, one small fixed config in the interpreter.
# --------------------------------------------------------------------------------------------
# The kernels take L_BUCKET/S_BUCKET (lengths rounded up to a power of two) only to key the tuning on
# them: one tuning per length bucket and feature set, not one per length. Triton adds the dtypes.
_KEY = ["E_PAD", "EV_PAD", "L_BUCKET", "S_BUCKET", "HAS_BIAS", "HAS_WL", "HAS_WR", "HAS_DROPOUT", "VARLEN"]


def _configs(shapes):
    return tune_configs([triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                         for bm, bn, w, st in shapes])


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head size: the bigger the head, the smaller the
# tiles (registers: an fp32 accumulator of BLOCK x head per program; shared memory: the staged K/V tiles).
# fp32 input (exact "ieee" dots) needs far more shared memory per tile: its own, smaller lists
# (checked by compiling for sm_80, 163 KiB; the autotuner skips a config that does not fit).
# forward: BLOCK_M query rows held, BLOCK_N keys streamed.
_FWD_SHAPES = {
    64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 4), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 4)],
    128: [(128, 64, 8, 3), (128, 32, 4, 3), (128, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 4)],
    256: [(64, 64, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 8, 2)],
    "fp32-64": [(64, 32, 4, 2), (64, 64, 4, 2), (32, 32, 4, 2)],
    "fp32-128": [(64, 32, 4, 2), (32, 32, 4, 2), (64, 32, 4, 1)],
    "fp32-256": [(32, 32, 4, 1), (16, 32, 4, 1)],
}
# dK/dV: BLOCK_N key rows held (dK, dV accumulators), BLOCK_M query rows streamed.
_DKDV_SHAPES = {
    64: [(32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2)],
    128: [(32, 128, 8, 2), (32, 64, 4, 2), (64, 64, 4, 2), (64, 128, 8, 2)],
    256: [(16, 64, 4, 2), (32, 64, 8, 2), (32, 32, 4, 2)],
    "fp32-64": [(32, 64, 4, 1), (32, 32, 4, 2), (16, 64, 4, 2)],
    "fp32-128": [(16, 32, 4, 2), (32, 32, 4, 1), (16, 64, 4, 1)],
    "fp32-256": [(16, 32, 4, 1), (16, 16, 4, 1)],
}
# dQ: BLOCK_M query rows held, BLOCK_N keys streamed.
_DQ_SHAPES = {
    64: [(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
    128: [(128, 32, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3)],
    256: [(64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
    "fp32-64": [(64, 32, 4, 2), (32, 32, 4, 2), (32, 64, 4, 1)],
    "fp32-128": [(32, 32, 4, 2), (64, 32, 4, 1), (16, 32, 4, 2)],
    "fp32-256": [(32, 32, 4, 1), (16, 32, 4, 1)],
}


def _head_class(e_pad: int, ev_pad: int, dtype: torch.dtype):
    d = max(e_pad, ev_pad)
    cls = 64 if d <= 64 else 128 if d <= 128 else 256
    return f"fp32-{cls}" if dtype == torch.float32 else cls


if _INTERPRET:
    def _kernel(kernel, shapes, meta, dtype):
        return kernel
    _FIXED = {"BLOCK_M": 16, "BLOCK_N": 16}
else:
    # one autotuner per (kernel, head-size class), each with its own short config list (no pruning
    # callbacks, which torch.compile would have to trace).
    _TUNED = {}

    def _kernel(kernel, shapes, meta, dtype):
        cls = _head_class(meta["E_PAD"], meta["EV_PAD"], dtype)
        key = (kernel, cls)
        if key not in _TUNED:
            _TUNED[key] = triton.autotune(_configs(shapes[cls]), key=_KEY)(kernel)
        return _TUNED[key]
    _FIXED = {}
_DELTA_BLOCK_M = 16 if _INTERPRET else 64


# --------------------------------------------------------------------------------------------
# Host side: argument preparation shared by forward and backward.
# --------------------------------------------------------------------------------------------
def _pad(n: int) -> int:
    """Head size padded to a power of two >= 16 (tl.arange and tl.dot need it); the pad is masked."""
    return max(16, triton.next_power_of_2(int(n)))


def _bucket(n: int) -> int:
    """Lengths rounded up to a power of two: the autotune key (one tuning per bucket, not per length)."""
    return triton.next_power_of_2(max(int(n), 1))


def _dropout_args(dropout_p: float, seed: int):
    """(seed, threshold as a top-bit-flipped int32, 1/(1-p)) for the kernels' keep test."""
    if dropout_p <= 0.0:
        return 0, 0, 1.0
    thresh = min(int(dropout_p * 4294967296.0), _M32)
    return int(seed), thresh - 2**31, 1.0 / (1.0 - dropout_p)


def _check(q: Tensor, k: Tensor, v: Tensor, attn_bias: Optional[Tensor]) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton attention: q must be float16, bfloat16 or float32, got {q.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"triton attention: q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("triton attention: q, k, v must be 4-D (B, H, L, E)")
    B, Hq, L, E = q.shape
    if k.shape[0] != B or v.shape[0] != B or k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2] or k.shape[3] != E:
        raise ValueError(f"triton attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "do not fit (B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev)")
    if k.shape[1] == 0 or Hq % k.shape[1] != 0:
        raise ValueError(f"triton attention: query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]})")
    if max(E, v.shape[3]) > 256:
        raise ValueError(f"triton attention: head size {max(E, v.shape[3])} > 256")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"triton attention: {name} must have a contiguous last dim (stride 1)")
    if attn_bias is not None and not attn_bias.is_floating_point():
        raise TypeError(f"triton attention: attn_bias must be a floating-point additive bias, got {attn_bias.dtype}")
    if attn_bias is not None and tuple(attn_bias.shape) != (B, Hq, L, k.shape[2]):
        raise ValueError(f"triton attention: attn_bias must have shape {(B, Hq, L, k.shape[2])}, "
                         f"got {tuple(attn_bias.shape)}")


def _check_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton attention_varlen: q must be float16, bfloat16 or float32, got {q.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"triton attention_varlen: q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("triton attention_varlen: q, k, v must be 3-D (total_tokens, heads, head_dim)")
    if k.shape[0] != v.shape[0] or k.shape[1] != v.shape[1] or k.shape[2] != q.shape[2]:
        raise ValueError(f"triton attention_varlen: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "do not fit (Tq, Hq, E), (Tk, Hkv, E), (Tk, Hkv, Ev)")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"triton attention_varlen: query heads ({q.shape[1]}) must be a multiple of key/value "
                         f"heads ({k.shape[1]})")
    if max(q.shape[2], v.shape[2]) > 256:
        raise ValueError(f"triton attention_varlen: head size {max(q.shape[2], v.shape[2])} > 256")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"triton attention_varlen: {name} must have a contiguous last dim (stride 1)")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if t.dtype != torch.int32 or t.dim() != 1 or not t.is_contiguous() or t.device != q.device:
            raise ValueError(f"triton attention_varlen: {name} must be a contiguous 1-D int32 tensor on q's device")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel() or cu_seqlens_q.numel() < 1:
        raise ValueError("triton attention_varlen: cu_seqlens_q and cu_seqlens_k must both have N + 1 >= 1 entries")


def _common(q, k, v, attn_bias, dropout_p, scale, window_left, window_right, diag_offset, softcap, seed,
            varlen=None):
    """Kernel arguments shared by the forward, dK/dV and dQ kernels: (strides of q, k, v, bias),
    scalars, meta-parameters. ``varlen = (max_seqlen_q, max_seqlen_k, bottom_right)`` for packed
    (T, H, E) tensors: their batch strides are 0, the row stride is the token stride, and L / S
    are the totals Tq / Tk (the kernels read each sequence's own from cu_seqlens)."""
    if varlen is None:
        B, Hq, L, E = q.shape
        Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
        strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2))
        buckets = (_bucket(L), _bucket(S))
        bottom_right = 0
    else:
        L, Hq, E = q.shape
        S, Hkv, Ev = k.shape[0], k.shape[1], v.shape[2]
        strides = (0, q.stride(1), q.stride(0), 0, k.stride(1), k.stride(0), 0, v.stride(1), v.stride(0))
        buckets = (_bucket(varlen[0]), _bucket(varlen[1]))
        bottom_right = int(bool(varlen[2]))
    bias_strides = attn_bias.stride() if attn_bias is not None else (0, 0, 0, 0)
    drop_seed, drop_thresh, keep_scale = _dropout_args(dropout_p, seed)
    strides = strides + tuple(bias_strides)
    scalars = (Hq, Hkv, L, S, E, Ev) + buckets + (float(scale), float(softcap), int(window_left),
                                                  int(window_right), int(diag_offset), bottom_right,
                                                  drop_seed, drop_thresh, keep_scale)
    meta = dict(E_PAD=_pad(E), EV_PAD=_pad(Ev), HAS_BIAS=attn_bias is not None, HAS_SOFTCAP=softcap > 0,
                HAS_WL=window_left >= 0, HAS_WR=window_right >= 0, HAS_DROPOUT=dropout_p > 0,
                UPCAST=_INTERPRET, DOT_PRECISION="ieee" if (q.dtype == torch.float32 or _INTERPRET) else "tf32",
                VARLEN=varlen is not None, **_FIXED)
    return strides, scalars, meta


def _rows3(t: Tensor):
    """(batch, head, row) strides of a (T, H, D) packed tensor seen as one batch entry."""
    return (0, t.stride(1), t.stride(0))


# --------------------------------------------------------------------------------------------
# Split-KV decoding plan.
# --------------------------------------------------------------------------------------------
# Keys per chunk forced by the tests (the interpreter never picks split-KV by itself); None: heuristic.
_decode_chunk_forced: Optional[int] = None
_DECODE_MAX_L = 16
_SM_COUNT = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _decode_plan(B: int, Hq: int, Hkv: int, L: int, S: int, meta: dict, dtype: torch.dtype, device: torch.device):
    """(BLOCK_M, BLOCK_N, chunk, num_chunks, m_tiles) for the split-KV forward, or None for the dense one.

    For L <= 16 query rows the dense kernel runs one program per (query block, batch, query head)
    and fills a 64-128-row tile with L rows. The split-KV kernel packs the GQA group's heads into the
    rows (K/V read once per group, not once per head) and cuts S into chunks so that about two
    programs per SM run even for a single sequence; chunks are >= 256 keys (fewer, larger chunks
    once the batch fills the GPU) so the reduce pass stays small.
    """
    if L > _DECODE_MAX_L or L == 0 or S == 0:
        return None
    group = Hq // Hkv
    rows = group * L
    if _INTERPRET:
        block_m, block_n = 16, 16
    else:
        small = max(meta["E_PAD"], meta["EV_PAD"]) <= 128 and dtype != torch.float32  # register budget
        block_m = min(64 if small else 32, max(16, triton.next_power_of_2(rows)))
        block_n = 64 if small else 32
    m_tiles = triton.cdiv(rows, block_m)
    if _decode_chunk_forced is not None:
        chunk = triton.cdiv(int(_decode_chunk_forced), block_n) * block_n
    elif _INTERPRET or device.type != "cuda" or S < 512:
        return None
    else:
        programs = B * Hkv * m_tiles
        want = max(1, triton.cdiv(2 * _sm_count(device), programs))
        chunk = max(256, triton.cdiv(triton.cdiv(S, want), block_n) * block_n)
    return block_m, block_n, chunk, triton.cdiv(S, chunk), m_tiles


def _fwd_decode(q, k, v, bias, out, lse, strides, scalars, meta, plan):
    """Split-KV forward: partial (out, lse) per key chunk, then the reduce pass into out, lse."""
    B, Hq, L, _ = q.shape
    Hkv, Ev = k.shape[1], v.shape[3]
    block_m, block_n, chunk, num_chunks, m_tiles = plan
    (Hq_, Hkv_, L_, S_, E_, Ev_, _lb, _sb, scale, softcap, wl, wr, diag, _br, seed, thresh, keep) = scalars
    out_part = torch.empty((B * Hq * L, num_chunks, Ev), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B * Hq * L, num_chunks), dtype=torch.float32, device=q.device)
    dmeta = {k_: meta[k_] for k_ in ("E_PAD", "EV_PAD", "HAS_BIAS", "HAS_SOFTCAP", "HAS_WL", "HAS_WR",
                                     "HAS_DROPOUT", "UPCAST", "DOT_PRECISION")}
    extra = {} if _INTERPRET else {"num_warps": 4, "num_stages": 2}
    wrap_triton(_attn_fwd_decode)[(num_chunks, B * Hkv, m_tiles)](
        q, k, v, bias, out_part, lse_part, *strides, Hq_, Hkv_, L_, S_, E_, Ev_, chunk, num_chunks,
        scale, softcap, wl, wr, diag, seed, thresh, keep, **dmeta, L_POW2=triton.next_power_of_2(L),
        BLOCK_M=block_m, BLOCK_N=block_n, **extra)
    wrap_triton(_attn_decode_reduce)[(B * Hq * L,)](
        out_part, lse_part, out, lse, Hq, L, Ev, num_chunks, out.stride(0), out.stride(1), out.stride(2),
        EV_PAD=meta["EV_PAD"], CHUNKS_PAD=max(2, triton.next_power_of_2(num_chunks)))


# --------------------------------------------------------------------------------------------
# The ops (triton_op + wrap_triton so torch.compile traces into the kernels).
# --------------------------------------------------------------------------------------------
def _define(name):
    return triton_op(name, mutates_args=())


@_define("fastattn::triton_attention_fwd")
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, attn_bias: Optional[Tensor], dropout_p: float, scale: float,
            window_left: int, window_right: int, diag_offset: int, softcap: float,
            seed: int) -> Tuple[Tensor, Tensor]:
    _check(q, k, v, attn_bias)
    B, Hq, L, _ = q.shape
    Ev = v.shape[3]
    out = torch.empty((B, Hq, L, Ev), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    if B * Hq * L == 0:
        return out, lse
    strides, scalars, meta = _common(q, k, v, attn_bias, dropout_p, scale, window_left, window_right,
                                     diag_offset, softcap, seed)
    bias = attn_bias if attn_bias is not None else q  # never read when HAS_BIAS is False
    plan = _decode_plan(B, Hq, k.shape[1], L, k.shape[2], meta, q.dtype, q.device)
    if plan is not None:
        _fwd_decode(q, k, v, bias, out, lse, strides, scalars, meta, plan)
        return out, lse

    def grid(m):
        return (triton.cdiv(L, m["BLOCK_M"]), B * Hq)
    kernel = _kernel(_attn_fwd, _FWD_SHAPES, meta, q.dtype)
    wrap_triton(kernel)[grid](q, k, v, bias, out, lse, q, q, *strides, *out.stride()[:3], *lse.stride(), *scalars, **meta)
    return out, lse


def _bwd_kernels(grad_out, q, k, v, out, lse, bias, delta, dq, dk, dv, cu_q, cu_k, strides, scalars, meta,
                 do_strides, lse_strides, dq_strides, dk_strides, dv_strides, grid_kv, grid_q):
    """The dK/dV and dQ launches shared by the dense and the varlen backward."""
    kernel = _kernel(_attn_bwd_dkdv, _DKDV_SHAPES, meta, q.dtype)
    wrap_triton(kernel)[grid_kv](q, k, v, bias, grad_out, lse, delta, dk, dv, cu_q, cu_k, *strides, *do_strides,
                           *lse_strides, *dk_strides, *dv_strides, *scalars, **meta)
    kernel = _kernel(_attn_bwd_dq, _DQ_SHAPES, meta, q.dtype)
    wrap_triton(kernel)[grid_q](q, k, v, bias, grad_out, lse, delta, dq, cu_q, cu_k, *strides, *do_strides,
                          *lse_strides, *dq_strides, *scalars, **meta)


@_define("fastattn::triton_attention_bwd")
def _bwd_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
            attn_bias: Optional[Tensor], dropout_p: float, scale: float, window_left: int, window_right: int,
            diag_offset: int, softcap: float, seed: int) -> Tuple[Tensor, Tensor, Tensor]:
    _check(q, k, v, attn_bias)
    B, Hq, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    dq = torch.empty((B, Hq, L, E), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, S, E), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, Hkv, S, Ev), dtype=v.dtype, device=q.device)
    if B * Hkv * S * L == 0 or Ev == 0 or E == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    if out.stride(-1) != 1:
        out = out.contiguous()
    strides, scalars, meta = _common(q, k, v, attn_bias, dropout_p, scale, window_left, window_right,
                                     diag_offset, softcap, seed)
    bias = attn_bias if attn_bias is not None else q
    do_strides = (grad_out.stride(0), grad_out.stride(1), grad_out.stride(2))
    lse_strides = (lse.stride(0), lse.stride(1), lse.stride(2))

    delta = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    wrap_triton(_attn_bwd_delta)[(triton.cdiv(L, _DELTA_BLOCK_M), B * Hq)](
        out, grad_out, delta, out.stride(0), out.stride(1), out.stride(2), *do_strides, Hq, L, Ev,
        EV_PAD=meta["EV_PAD"], BLOCK_M=_DELTA_BLOCK_M)

    def grid_kv(m):
        return (triton.cdiv(S, m["BLOCK_N"]), B * Hkv)

    def grid_q(m):
        return (triton.cdiv(L, m["BLOCK_M"]), B * Hq)
    _bwd_kernels(grad_out, q, k, v, out, lse, bias, delta, dq, dk, dv, q, q, strides, scalars, meta, do_strides,
                 lse_strides, dq.stride()[:3], dk.stride()[:3], dv.stride()[:3], grid_kv, grid_q)
    return dq, dk, dv


# Packed variable-length batches: the same kernels with VARLEN (see _sequence), grids over
# (sequence·head, blocks of the longest sequence); programs past their sequence's end exit at once.
@_define("fastattn::triton_attention_varlen_fwd")
def _varlen_fwd_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                   max_seqlen_k: int, dropout_p: float, scale: float, window_left: int, window_right: int,
                   bottom_right: bool, softcap: float, seed: int) -> Tuple[Tensor, Tensor]:
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k)
    Tq, Hq, _ = q.shape
    Ev = v.shape[2]
    N = cu_seqlens_q.numel() - 1
    out = torch.empty((Tq, Hq, Ev), dtype=q.dtype, device=q.device)
    lse = torch.empty((Hq, Tq), dtype=torch.float32, device=q.device)
    if Tq * Hq == 0 or N == 0 or max_seqlen_q <= 0:
        return out, lse
    strides, scalars, meta = _common(q, k, v, None, dropout_p, scale, window_left, window_right, 0, softcap, seed,
                                     varlen=(max_seqlen_q, max_seqlen_k, bottom_right))

    def grid(m):
        return (N * Hq, triton.cdiv(max_seqlen_q, m["BLOCK_M"]))
    kernel = _kernel(_attn_fwd, _FWD_SHAPES, meta, q.dtype)
    wrap_triton(kernel)[grid](q, k, v, q, out, lse, cu_seqlens_q, cu_seqlens_k, *strides, *_rows3(out),
                        0, lse.stride(0), lse.stride(1), *scalars, **meta)
    return out, lse


@_define("fastattn::triton_attention_varlen_bwd")
def _varlen_bwd_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                   dropout_p: float, scale: float, window_left: int, window_right: int, bottom_right: bool,
                   softcap: float, seed: int) -> Tuple[Tensor, Tensor, Tensor]:
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k)
    Tq, Hq, E = q.shape
    Tk, Hkv, Ev = k.shape[0], k.shape[1], v.shape[2]
    N = cu_seqlens_q.numel() - 1
    # every row belongs to a sequence (cu_seqlens run from 0 to T), so the kernels write every element
    dq = torch.empty((Tq, Hq, E), dtype=q.dtype, device=q.device)
    dk = torch.empty((Tk, Hkv, E), dtype=k.dtype, device=q.device)
    dv = torch.empty((Tk, Hkv, Ev), dtype=v.dtype, device=q.device)
    if Tq * Hq == 0 or Tk * Hkv == 0 or N == 0 or E == 0 or Ev == 0 or max_seqlen_q <= 0 or max_seqlen_k <= 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    if out.stride(-1) != 1:
        out = out.contiguous()
    strides, scalars, meta = _common(q, k, v, None, dropout_p, scale, window_left, window_right, 0, softcap, seed,
                                     varlen=(max_seqlen_q, max_seqlen_k, bottom_right))
    do_strides = _rows3(grad_out)
    lse_strides = (0, lse.stride(0), lse.stride(1))

    delta = torch.empty((Hq, Tq), dtype=torch.float32, device=q.device)  # indexed like lse: h*Tq + row
    wrap_triton(_attn_bwd_delta)[(triton.cdiv(Tq, _DELTA_BLOCK_M), Hq)](
        out, grad_out, delta, *_rows3(out), *do_strides, Hq, Tq, Ev, EV_PAD=meta["EV_PAD"], BLOCK_M=_DELTA_BLOCK_M)

    def grid_kv(m):
        return (N * Hkv, triton.cdiv(max_seqlen_k, m["BLOCK_N"]))

    def grid_q(m):
        return (N * Hq, triton.cdiv(max_seqlen_q, m["BLOCK_M"]))
    _bwd_kernels(grad_out, q, k, v, out, lse, q, delta, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, strides, scalars,
                 meta, do_strides, lse_strides, _rows3(dq), _rows3(dk), _rows3(dv), grid_kv, grid_q)
    return dq, dk, dv


if NEEDS_FAKE:  # the same fake kernels as the native ops (same contract)
    _fwd_op.register_fake(_attn_ops._fwd_fake)
    _bwd_op.register_fake(_attn_ops._bwd_fake)
    _varlen_fwd_op.register_fake(_attn_ops._varlen_fwd_fake)
    _varlen_bwd_op.register_fake(_attn_ops._varlen_bwd_fake)

# The same autograd as the native ops (saves the inputs, out and lse; refuses double backward).
_setup_context, _backward = _attn_ops.make_attention_autograd(_bwd_op)
_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_varlen_setup_context, _varlen_backward = _attn_ops.make_attention_varlen_autograd(_varlen_bwd_op)
_varlen_fwd_op.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


def triton_attention_fwd(q: Tensor, k: Tensor, v: Tensor, attn_bias: Optional[Tensor], dropout_p: float,
                         scale: float, window_left: int, window_right: int, diag_offset: int, softcap: float,
                         seed: int) -> Tuple[Tensor, Tensor]:
    """``fastattn::triton_attention_fwd``: (out, lse) by the native contract; differentiable in q, k, v."""
    return _fwd_op(q, k, v, attn_bias, float(dropout_p), float(scale), int(window_left), int(window_right),
                   int(diag_offset), float(softcap), int(seed))


def triton_attention_bwd(grad_out, q, k, v, out, lse, attn_bias, dropout_p, scale, window_left, window_right,
                         diag_offset, softcap, seed) -> Tuple[Tensor, Tensor, Tensor]:
    """``fastattn::triton_attention_bwd``: (dq, dk, dv), contiguous."""
    return _bwd_op(grad_out, q, k, v, out, lse, attn_bias, float(dropout_p), float(scale), int(window_left),
                   int(window_right), int(diag_offset), float(softcap), int(seed))


def triton_attention_varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, scale: float,
                                window_left: int, window_right: int, bottom_right: bool, softcap: float,
                                seed: int) -> Tuple[Tensor, Tensor]:
    """``fastattn::triton_attention_varlen_fwd``: (out (Tq, Hq, Ev), lse (Hq, Tq)) by the varlen contract;
    differentiable in q, k, v."""
    return _varlen_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                          float(dropout_p), float(scale), int(window_left), int(window_right), bool(bottom_right),
                          float(softcap), int(seed))


def triton_attention_varlen_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                max_seqlen_k, dropout_p, scale, window_left, window_right, bottom_right, softcap,
                                seed) -> Tuple[Tensor, Tensor, Tensor]:
    """``fastattn::triton_attention_varlen_bwd``: (dq, dk, dv), contiguous, shaped like q, k, v."""
    return _varlen_bwd_op(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                          int(max_seqlen_k), float(dropout_p), float(scale), int(window_left), int(window_right),
                          bool(bottom_right), float(softcap), int(seed))
