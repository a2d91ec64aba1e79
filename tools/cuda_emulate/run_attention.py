"""Runs the emulated tensor-core attention kernels (attention_emu.py) on small random problems and
compares out, lse, dq, dk, dv with fastattn's float64 oracle (attention_reference /
attention_varlen_reference, autograd for the gradients). Also checks that every output element is
written exactly once and that no global read / write leaves its buffer.

    /work/main/.venv/bin/python tools/cuda_emulate/run_attention.py            # all cases (~ minutes)
    /work/main/.venv/bin/python tools/cuda_emulate/run_attention.py causal     # cases whose name matches
"""
import math
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import attention_emu as emu  # noqa: E402
import warp  # noqa: E402
from warp import GMem  # noqa: E402

from fastattn.ops.attention import (attention_reference, attention_varlen_reference,  # noqa: E402
                                    dropout_threshold)

TOL = 1e-9
ROUND_DTYPE = None  # --round fp16|bf16: ratios to the GPU tests' tolerance instead of raw errors


def set_round(name):
    global ROUND_DTYPE, TOL
    ROUND_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16}[name]
    emu.ROUND = lambda x: torch.from_numpy(np.asarray(x, dtype=np.float64)).to(ROUND_DTYPE).double().numpy()
    TOL = 1.0


def head_bucket(E, Ev):
    e = max(E, Ev)
    return 64 if e <= 64 else 128 if e <= 128 else 256


def strided(rng, shape, perm_pad):
    """A float64 array of `shape` (B, H, seq, D) stored in a bigger buffer: (B, seq, H, D + pad)
    when perm_pad > 0 (non-contiguous, row strides not multiples of 8 when pad is odd)."""
    B, H, N, Dd = shape
    if perm_pad == 0:
        buf = rng.standard_normal(shape)
        return buf, buf, buf.strides
    buf = rng.standard_normal((B, N, H, Dd + perm_pad))
    view = buf[..., :Dd].transpose(0, 2, 1, 3)
    return buf, view, view.strides


def elem_strides(a):
    return tuple(s // 8 for s in a.strides)


def fill_common(p, E, Ev, scale, wl, wr, diag, softcap, dropout_p, seed):
    p.E, p.Ev = E, Ev
    p.scale = scale
    p.scale_log2 = scale * 1.4426950408889634
    p.has_softcap = softcap > 0
    p.softcap = softcap
    p.inv_softcap = 1.0 / softcap if softcap > 0 else 0.0
    p.has_dropout = dropout_p > 0
    p.drop_scale = 1.0 / (1.0 - dropout_p)
    p.drop_threshold = min(int(dropout_p * 4294967296.0), 0xFFFFFFFF)
    assert p.drop_threshold == dropout_threshold(dropout_p) or dropout_p == 0
    p.seed_hash = int(emu.mix32(seed & 0xFFFFFFFF))
    p.window_left, p.window_right, p.diag_offset = wl, wr, diag


def vec_ok(E, Ev, arrays):
    # make_params: E, Ev % 8, every stride of dims 0..2 of size > 1 a multiple of 8 (base pointers
    # are 16-byte aligned in the emulator: offset 0)
    ok = E % 8 == 0 and Ev % 8 == 0
    for a in arrays:
        st = elem_strides(a)
        for d in range(3):
            if a.shape[d] > 1 and st[d] % 8 != 0:
                ok = False
    return ok


def _backward_and_compare(p, errs, D, STAGES, simt, varlen, nbatch, Hq, Hkv, L, S, ro, dout, q, k, v, tq, tk, tv):
    """Run the transcribed dK/dV and dQ kernels over every block (the launch grid), check that each
    gradient element is written exactly once, and add the errors against the oracle's grads to errs."""
    if STAGES is None:
        STAGES = 2 if D in (64, 128) else 1
    for b in range(nbatch):
        if simt:
            for hk in range(Hkv):
                for j in range(-(-S // emu.kSimtWarps) * emu.kSimtWarps):
                    emu.attn_bwd_dkdv_simt_warp(p, j, hk, b)
            for h in range(Hq):
                for i in range(-(-L // emu.kSimtWarps) * emu.kSimtWarps):
                    emu.attn_bwd_dq_simt_warp(p, i, h, b)
            continue
        for hk in range(Hkv):
            for bx in range(-(-S // emu.kBwdBN)):
                emu.attn_bwd_dkdv_block(p, D, STAGES, varlen, bx, hk, b)
        for h in range(Hq):
            for bx in range(-(-L // emu.kBwdBM)):
                emu.attn_bwd_dq_block(p, D, varlen, bx, h, b)
    for nm in ("dq", "dk", "dv", "delta"):
        wr_ = getattr(p, nm).writes
        assert (wr_ == 1).all(), "%s: elements written %s times" % (nm, np.unique(wr_))
    ro.backward(torch.from_numpy(dout))
    errs["dq"] = np.abs(p.dq.a.reshape(q.shape) - tq.grad.numpy()).max()
    errs["dk"] = np.abs(p.dk.a.reshape(k.shape) - tk.grad.numpy()).max()
    errs["dv"] = np.abs(p.dv.a.reshape(v.shape) - tv.grad.numpy()).max()
    return STAGES


def run_dense(name, B=1, Hq=2, Hkv=1, L=130, S=150, E=64, Ev=64, wl=-1, wr=-1, diag=0, softcap=0.0,
              dropout_p=0.0, bias=False, pad=0, split_keys=0, neg_inf_bias_rows=False, seed=1, STAGES=None,
              simt=False, q_scale=1.0):
    rng = np.random.default_rng(seed)
    qb, q, _ = strided(rng, (B, Hq, L, E), pad)
    kb, k, _ = strided(rng, (B, Hkv, S, E), pad)
    vb, v, _ = strided(rng, (B, Hkv, S, Ev), pad)
    qb *= q_scale
    if emu.ROUND is not None:  # inputs in the 16-bit dtype
        for buf in (qb, kb, vb):
            buf[...] = emu.ROUND(buf)
    scale = 1.0 / math.sqrt(E)
    p = emu.Params()
    p.q, p.k, p.v = GMem(qb, "q"), GMem(kb, "k"), GMem(vb, "v")
    p.q_sb, p.q_sh, p.q_sl = elem_strides(q)[:3]
    p.k_sb, p.k_sh, p.k_sl = elem_strides(k)[:3]
    p.v_sb, p.v_sh, p.v_sl = elem_strides(v)[:3]
    p.B, p.Hq, p.Hkv, p.L, p.S, p.group = B, Hq, Hkv, L, S, Hq // Hkv
    fill_common(p, E, Ev, scale, wl, wr, diag, softcap, dropout_p, seed)
    bias_t = None
    if bias:
        bb = rng.standard_normal((B, 1, L, S))  # broadcast over heads: stride 0
        bb = emu.rnd(bb)
        if neg_inf_bias_rows:
            bb[:, :, 1::7, :] = -np.inf  # some rows see nothing
        bias_v = np.broadcast_to(bb, (B, Hq, L, S))
        p.bias = GMem(bb, "bias")
        p.has_bias = True
        st = elem_strides(bb)
        p.bias_sb, p.bias_sh, p.bias_sl, p.bias_ss = st[0], 0, st[2], st[3]
        bias_t = torch.from_numpy(np.ascontiguousarray(bias_v))
    p.vec_loads = vec_ok(E, Ev, [q, k, v])
    D = head_bucket(E, Ev)

    # ---- forward (launch_fwd_mma + plan_splits with FASTATTN_CUDA_ATTN_SPLIT_KEYS) ----
    p.out = GMem(np.zeros(B * Hq * L * Ev), "out", out=True)
    p.lse = GMem(np.zeros(B * Hq * L), "lse", out=True)
    p.num_splits = 1
    if split_keys and L <= 16 and S > 0 and not simt:
        sk = -(-split_keys // emu.kFwdBN) * emu.kFwdBN
        splits = -(-S // sk)
        if splits >= 2:
            p.num_splits, p.split_keys = splits, sk
    if p.num_splits > 1:
        rows = B * Hq * L
        p.o_part = GMem(np.full(rows * p.num_splits * Ev, np.nan), "o_part", out=True)
        p.lse_part = GMem(np.full(rows * p.num_splits, np.nan), "lse_part", out=True)
    nbx = -(-L // emu.kFwdBM) * p.num_splits
    for b in range(B):
        for h in range(Hq):
            if simt:
                for i in range(-(-L // emu.kSimtWarps) * emu.kSimtWarps):
                    emu.attn_fwd_simt_warp(p, i, h, b)
                continue
            for bx in range(nbx):
                emu.attn_fwd_mma_block(p, D, False, bx, h, b)
    if p.num_splits > 1:
        assert (p.o_part.writes == 1).all() and (p.lse_part.writes == 1).all(), "split partials not written once"
        emu.attn_fwd_split_reduce(p, B * Hq * L)

    # ---- reference ----
    tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(x)).requires_grad_(True) for x in (q, k, v))
    ro, rl = attention_reference(tq, tk, tv, bias_t, dropout_p, scale, wl, wr, diag, softcap, seed)
    out = p.out.a.reshape(B, Hq, L, Ev)
    lse = p.lse.a.reshape(B, Hq, L)
    errs = {}
    assert (p.out.writes == 1).all(), "out: elements written %s times" % np.unique(p.out.writes)
    assert (p.lse.writes == 1).all(), "lse: elements written %s times" % np.unique(p.lse.writes)
    errs["out"] = np.abs(out - ro.detach().numpy()).max() if out.size else 0.0
    rl_n = rl.detach().numpy()
    assert np.array_equal(np.isinf(lse), np.isinf(rl_n)), "lse: +inf rows differ"
    fin = np.isfinite(rl_n)
    errs["lse"] = np.abs(lse[fin] - rl_n[fin]).max() if fin.any() else 0.0

    # ---- backward (run_bwd: delta, dK/dV, dQ) ----
    dout = emu.rnd(rng.standard_normal((B, Hq, L, Ev)))
    p.dout = GMem(dout, "dout")
    p.lse_in = GMem(lse, "lse_in")
    p.delta = GMem(np.zeros(B * Hq * L), "delta", out=True)
    p.dq = GMem(np.zeros(q.size), "dq", out=True)
    p.dk = GMem(np.zeros(k.size), "dk", out=True)
    p.dv = GMem(np.zeros(v.size), "dv", out=True)
    emu.attn_bwd_delta(p, p.dout, GMem(out, "out_c"), B * Hq * L, Ev)
    STAGES = _backward_and_compare(p, errs, D, STAGES, simt, False, B, Hq, Hkv, L, S, ro, dout, q, k, v, tq, tk, tv)
    if ROUND_DTYPE is not None:  # tests/test_attention_cuda.py's criterion: ours <= 2 x torch-dtype + atol
        lq, lk, lv = (torch.from_numpy(np.ascontiguousarray(x)).to(ROUND_DTYPE).requires_grad_(True) for x in (q, k, v))
        lo, _ = attention_reference(lq, lk, lv, None if bias_t is None else bias_t.to(ROUND_DTYPE), dropout_p, scale,
                                    wl, wr, diag, softcap, seed, compute_dtype=ROUND_DTYPE)
        lo.backward(torch.from_numpy(dout).to(ROUND_DTYPE))
        refs = {"out": ro.detach(), "dq": tq.grad, "dk": tk.grad, "dv": tv.grad}
        lows = {"out": lo.detach(), "dq": lq.grad, "dk": lk.grad, "dv": lv.grad}
        for nm, r in refs.items():
            theirs = (lows[nm].double() - r).abs().max().item()
            atol = 1e-3 * max(1.0, r.abs().max().item())
            errs[nm] = errs[nm] / (2 * theirs + atol)  # <= 1 passes the GPU test
        errs["lse"] = errs["lse"] / (2e-2 * max(1.0, np.abs(rl_n[fin]).max()))
    return errs, dict(D=D, vec=p.vec_loads, splits=p.num_splits, STAGES=STAGES, simt=simt)


def run_varlen(name, lens_q, lens_k, Hq=2, Hkv=1, E=64, Ev=64, wl=-1, wr=-1, bottom_right=True, softcap=0.0,
               dropout_p=0.0, seed=3, STAGES=None, simt=False):
    rng = np.random.default_rng(seed)
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int64)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int64)
    Tq, Tk = int(cu_q[-1]), int(cu_k[-1])
    q = rng.standard_normal((Tq, Hq, E))
    k = rng.standard_normal((Tk, Hkv, E))
    v = rng.standard_normal((Tk, Hkv, Ev))
    scale = 1.0 / math.sqrt(E)
    p = emu.Params()
    p.q, p.k, p.v = GMem(q, "q"), GMem(k, "k"), GMem(v, "v")
    # make_varlen_params: (T, H, D) seen as (1, H, T, D); batch strides 0
    p.q_sb, p.q_sh, p.q_sl = 0, elem_strides(q)[1], elem_strides(q)[0]
    p.k_sb, p.k_sh, p.k_sl = 0, elem_strides(k)[1], elem_strides(k)[0]
    p.v_sb, p.v_sh, p.v_sl = 0, elem_strides(v)[1], elem_strides(v)[0]
    N = len(lens_q)
    p.B, p.Hq, p.Hkv, p.L, p.S, p.group = N, Hq, Hkv, Tq, Tk, Hq // Hkv
    fill_common(p, E, Ev, scale, wl, wr, 0, softcap, dropout_p, seed)
    p.Tq, p.cu_q, p.cu_k, p.bottom_right = Tq, cu_q, cu_k, bottom_right
    p.vec_loads = E % 8 == 0 and Ev % 8 == 0 and (Hq * E) % 8 == 0 and (Hkv * E) % 8 == 0 and (Hkv * Ev) % 8 == 0
    D = head_bucket(E, Ev)
    max_L, max_S = max(lens_q), max(lens_k)
    p.out = GMem(np.zeros(Tq * Hq * Ev), "out", out=True)
    p.lse = GMem(np.zeros(Hq * Tq), "lse", out=True)
    for b in range(N):
        for h in range(Hq):
            if simt:
                for i in range(-(-max_L // emu.kSimtWarps) * emu.kSimtWarps):
                    emu.attn_fwd_simt_warp(p, i, h, b)
                continue
            for bx in range(-(-max_L // emu.kFwdBM)):
                emu.attn_fwd_mma_block(p, D, True, bx, h, b)
    tq, tk, tv = (torch.from_numpy(x).requires_grad_(True) for x in (q, k, v))
    ro, rl = attention_varlen_reference(tq, tk, tv, cu_q.tolist(), cu_k.tolist(), dropout_p, scale, wl, wr,
                                        bottom_right, softcap, seed)
    assert (p.out.writes == 1).all(), "out: elements written %s times" % np.unique(p.out.writes)
    assert (p.lse.writes == 1).all(), "lse: elements written %s times" % np.unique(p.lse.writes)
    out = p.out.a.reshape(Tq, Hq, Ev)
    lse = p.lse.a.reshape(Hq, Tq)
    errs = {"out": np.abs(out - ro.detach().numpy()).max()}
    rl_n = rl.detach().numpy()
    assert np.array_equal(np.isinf(lse), np.isinf(rl_n)), "lse: +inf rows differ"
    fin = np.isfinite(rl_n)
    errs["lse"] = np.abs(lse[fin] - rl_n[fin]).max() if fin.any() else 0.0

    dout = rng.standard_normal((Tq, Hq, Ev))
    p.dout = GMem(dout, "dout")
    p.lse_in = GMem(lse, "lse_in")
    p.delta = GMem(np.zeros(Hq * Tq), "delta", out=True)
    p.dq = GMem(np.zeros(q.size), "dq", out=True)
    p.dk = GMem(np.zeros(k.size), "dk", out=True)
    p.dv = GMem(np.zeros(v.size), "dv", out=True)
    emu.attn_bwd_delta(p, p.dout, GMem(out, "out_c"), Tq * Hq, Ev, varlen_heads=Hq)
    STAGES = _backward_and_compare(p, errs, D, STAGES, simt, True, N, Hq, Hkv, max_L, max_S, ro, dout, q, k, v, tq, tk,
                                   tv)
    return errs, dict(D=D, vec=p.vec_loads, STAGES=STAGES, simt=simt)


CASES = [
    ("plain_tails", run_dense, dict(L=130, S=150)),
    ("causal_topleft", run_dense, dict(L=140, S=140, wl=-1, wr=0, diag=0)),
    ("causal_tile_edge", run_dense, dict(L=65, S=130, wl=-1, wr=0, diag=0)),
    ("causal_bottomright_L<S", run_dense, dict(L=70, S=200, wl=-1, wr=0, diag=130)),
    ("window_gqa", run_dense, dict(Hq=4, Hkv=2, L=150, S=160, wl=20, wr=5, diag=3)),
    ("empty_rows_causal_L>S", run_dense, dict(L=150, S=40, wl=-1, wr=0, diag=-60)),
    ("strided_nonvec_E40_Ev72", run_dense, dict(L=90, S=75, E=40, Ev=72, pad=3)),
    ("strided_vec_E48_Ev24", run_dense, dict(L=70, S=80, E=48, Ev=24, pad=8)),
    ("bias_softcap_dropout", run_dense, dict(B=2, L=70, S=90, bias=True, softcap=2.0, dropout_p=0.3,
                                             neg_inf_bias_rows=True)),
    ("dkdv_stages1_d64", run_dense, dict(L=140, S=70, wl=-1, wr=0, diag=0, STAGES=1)),
    ("split_kv_decode", run_dense, dict(Hq=4, Hkv=2, L=3, S=700, split_keys=256, dropout_p=0.1)),
    ("split_kv_window", run_dense, dict(L=5, S=600, wl=100, wr=0, diag=595, split_keys=128)),
    ("d256", run_dense, dict(L=40, S=70, E=256, Ev=256, wl=-1, wr=0, diag=30)),
    ("d128_odd", run_dense, dict(L=20, S=33, E=97, Ev=100, pad=1)),
    ("simt_bias_softcap_dropout_gqa", run_dense, dict(B=2, Hq=4, Hkv=2, L=21, S=30, E=40, Ev=72, bias=True,
                                                      softcap=2.0, dropout_p=0.3, neg_inf_bias_rows=True, pad=3,
                                                      simt=True)),
    ("simt_window_d256", run_dense, dict(L=19, S=40, E=256, Ev=200, wl=5, wr=0, diag=10, simt=True)),
    ("simt_varlen", run_varlen, dict(lens_q=[5, 0, 20], lens_k=[9, 4, 33], Hq=4, Hkv=2, wl=-1, wr=0,
                                     dropout_p=0.2, simt=True)),
    ("varlen_causal", run_varlen, dict(lens_q=[5, 0, 135, 64], lens_k=[70, 20, 200, 64], wl=-1, wr=0)),
    ("varlen_topleft_window_dropout", run_varlen, dict(lens_q=[70, 3], lens_k=[65, 140], Hq=4, Hkv=2, wl=10, wr=30,
                                                       bottom_right=False, dropout_p=0.2, softcap=1.5)),
]


MUTANTS = {  # mutant -> a case that must catch it
    "a_order": "plain_tails", "ldm_kn_swap": "plain_tails", "quad_xor4": "causal_topleft",
    "repack": "plain_tails", "no_sync_v": "plain_tails", "epi_row": "plain_tails",
    "key_range_hi": "causal_tile_edge", "dkdv_half": "plain_tails", "dq_no_sync": "plain_tails",
}


def run_mutants():
    """Each deliberate bug must make its case fail (else the emulator could not see that bug)."""
    missed = 0
    for mut, case in MUTANTS.items():
        name, fn, kw = next(c for c in CASES if c[0] == case)
        emu.MUT.clear()
        emu.MUT.add(mut)
        try:
            errs, _ = fn(name, **kw)
            caught = max(errs.values()) >= TOL
            why = " ".join("%s=%.1e" % kv for kv in errs.items())
        except AssertionError as e:
            caught, why = True, "%s: %s" % (type(e).__name__, str(e)[:100])
        emu.MUT.clear()
        print("mutant %-14s on %-24s %s  (%s)" % (mut, case, "caught" if caught else "MISSED", why), flush=True)
        missed += not caught
    print("mutants missed:", missed)
    return 1 if missed else 0


def run_fuzz(n, seed=0):
    """Random shapes / windows / offsets around the tile edges (dense and varlen)."""
    rng = np.random.default_rng(seed)
    fails = 0
    for it in range(n):
        E = int(rng.choice([8, 16, 24, 40, 64, 72, 96, 128, 130 - 2, 200, 256]))
        Ev = int(rng.choice([E, 8, 64, 100, 128])) if rng.random() < 0.3 else E
        L = int(rng.choice([1, 2, 15, 16, 17, 63, 64, 65, 127, 128, 129, 150]))
        S = int(rng.choice([1, 7, 63, 64, 65, 128, 129, 191, 192, 260]))
        wl = int(rng.choice([-1, -1, 0, 1, 13, 64, 100]))
        wr = int(rng.choice([-1, -1, 0, 0, 5, 64]))
        diag = int(rng.choice([0, 0, S - L, 7, -20, 70]))
        kw = dict(L=L, S=S, E=E, Ev=Ev, wl=wl, wr=wr, diag=diag, seed=it,
                  Hq=int(rng.choice([1, 2, 4])), pad=int(rng.choice([0, 0, 1, 8])),
                  dropout_p=float(rng.choice([0.0, 0.0, 0.25])), softcap=float(rng.choice([0.0, 0.0, 3.0])),
                  bias=bool(rng.random() < 0.2), split_keys=int(rng.choice([0, 64, 128])) if L <= 16 else 0,
                  STAGES=int(rng.choice([1, 2])) if max(E, Ev) <= 128 else 1)
        kw["Hkv"] = int(rng.choice([1, kw["Hq"]]))
        name = "fuzz%d %s" % (it, kw)
        t0 = time.time()
        try:
            errs, info = run_dense(name, **kw)
            ok = max(errs.values()) < TOL
            msg = " ".join("%s=%.1e" % e for e in errs.items())
        except AssertionError as e:
            ok, msg = False, "%s: %s" % (type(e).__name__, e)
        print("%s %s %s %.1fs" % ("OK  " if ok else "FAIL", name, msg, time.time() - t0), flush=True)
        fails += not ok
    print("fuzz failures:", fails)
    return 1 if fails else 0


ROUND_CASES = [  # shapes like tests/test_attention_cuda.py's (dense)
    ("r_plain", dict(B=1, Hq=2, Hkv=2, L=129, S=100, E=64, Ev=64)),
    ("r_causal_dropout", dict(B=1, Hq=2, Hkv=1, L=129, S=100, E=64, Ev=64, wl=-1, wr=0, diag=0, dropout_p=0.1)),
    ("r_large_logits", dict(B=1, Hq=2, Hkv=2, L=129, S=129, E=64, Ev=64, q_scale=8.0)),
    ("r_softcap_bias", dict(B=1, Hq=2, Hkv=2, L=70, S=90, E=128, Ev=128, softcap=5.0, bias=True)),
    ("r_d256", dict(B=1, Hq=1, Hkv=1, L=40, S=70, E=256, Ev=256)),
]


def run_round(dtype_name):
    set_round(dtype_name)
    fails = 0
    for name, kw in ROUND_CASES:
        t0 = time.time()
        errs, info = run_dense(name, **kw)
        ok = max(errs.values()) <= 1.0
        print("%-20s %s %s  %s  %.1fs" % (name, dtype_name, "OK  " if ok else "FAIL",
                                          " ".join("%s=%.2f" % kv for kv in errs.items()), time.time() - t0),
              flush=True)
        fails += not ok
    print("(numbers: error / the GPU test's tolerance; <= 1 passes)  failures:", fails)
    return 1 if fails else 0


def main(argv):
    if len(argv) > 2 and argv[1] == "--round":
        return run_round(argv[2])
    if len(argv) > 1 and argv[1] == "--mutants":
        return run_mutants()
    if len(argv) > 1 and argv[1] == "--fuzz":
        return run_fuzz(int(argv[2]) if len(argv) > 2 else 20, int(argv[3]) if len(argv) > 3 else 0)
    sel = argv[1] if len(argv) > 1 else ""
    print("self test (mma / ldmatrix layouts vs numpy):", warp.self_test())
    fails = 0
    for name, fn, kw in CASES:
        if sel not in name:
            continue
        t0 = time.time()
        warp.MMA_COUNT[0] = 0
        try:
            errs, info = fn(name, **kw)
            worst = max(errs.values())
            ok = worst < TOL
            print("%-32s %s  %s  %s  mma=%d  %.1fs" % (name, "OK  " if ok else "FAIL", info,
                                                      " ".join("%s=%.1e" % kv for kv in errs.items()),
                                                      warp.MMA_COUNT[0], time.time() - t0), flush=True)
            fails += not ok
        except AssertionError as e:
            print("%-32s FAIL  %s: %s" % (name, type(e).__name__, e), flush=True)
            fails += 1
    print("worst shared-memory bank conflicts (n-way):", warp.BANK_WAYS)
    print("failures:", fails)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
