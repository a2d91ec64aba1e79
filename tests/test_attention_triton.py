"""Triton attention (fastattn/triton/attention.py) against the float64 reference, forward and all grads.

Runs under TRITON_INTERPRET=1 on CPU tensors when there is no GPU (tests/conftest.py sets it before
triton is imported); shapes are small because the interpreter is slow. The `cuda` tests (larger
shapes, opcheck, torch.compile) run on a GPU only.
"""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # also when run without conftest

triton = pytest.importorskip("triton")

import fastattn  # noqa: E402
from fastattn.ops.attention import attention_reference, dropout_keep_mask  # noqa: E402
from fastattn.triton.attention import triton_attention_fwd  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INF = float("inf")


def _inputs(B, Hq, Hkv, L, S, E, Ev, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, E, generator=g).to(DEV, dtype)
    k = torch.randn(B, Hkv, S, E, generator=g).to(DEV, dtype)
    v = torch.randn(B, Hkv, S, Ev, generator=g).to(DEV, dtype)
    do = torch.randn(B, Hq, L, Ev, generator=g).to(DEV, dtype)
    return q, k, v, do


def _grads(fn, q, k, v, do):
    """fn(q, k, v) -> (out, lse); returns out, lse, dq, dk, dv."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return out, lse, dq, dk, dv


def _triton(q, k, v, do, bias=None, p=0.0, scale=None, wl=-1, wr=-1, diag=0, cap=0.0, seed=0):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _grads(lambda q, k, v: triton_attention_fwd(q, k, v, bias, p, scale, wl, wr, diag, cap, seed), q, k, v, do)


def _reference(q, k, v, do, bias=None, p=0.0, scale=None, wl=-1, wr=-1, diag=0, cap=0.0, seed=0, cdt=None):
    """float64 oracle (cdt=None), or plain PyTorch in q's own low precision (cdt=q.dtype)."""
    if cdt is None:
        q, k, v, do = (t.double() for t in (q, k, v, do))
        bias = None if bias is None else bias.double()
    return _grads(lambda q, k, v: attention_reference(q, k, v, bias, p, scale, wl, wr, diag, cap, seed,
                                                      compute_dtype=cdt), q, k, v, do)


NAMES = ("out", "lse", "dq", "dk", "dv")


def _assert_close(ours, ref, atol=5e-5, rtol=1e-4):
    for name, a, b in zip(NAMES, ours, ref):
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert torch.isfinite(a[torch.isfinite(b)]).all(), f"{name}: non-finite values"
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _check_fp32(q, k, v, do, **kw):
    ours = _triton(q, k, v, do, **kw)
    ref = _reference(q, k, v, do, **kw)
    _assert_close(ours, ref)
    assert ours[0].is_contiguous() and ours[0].dtype == q.dtype
    assert ours[1].dtype == torch.float32
    assert all(g.is_contiguous() for g in ours[2:])
    return ours, ref


# --------------------------------------------------------------------------------------------
# Shapes: odd lengths, L != S, head sizes, Ev != E, GQA / MQA.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,Hq,Hkv,L,S,E,Ev", [
    (1, 1, 1, 1, 1, 16, 16),
    (2, 2, 2, 7, 7, 16, 16),
    (1, 2, 2, 33, 33, 40, 40),
    (1, 1, 1, 7, 33, 64, 64),
    (1, 2, 2, 33, 7, 16, 24),   # L > S, Ev != E
    (1, 1, 1, 1, 33, 40, 16),   # one query row
    (1, 1, 1, 17, 20, 128, 128),
    (1, 4, 2, 7, 33, 16, 16),   # GQA
    (1, 4, 1, 33, 7, 40, 24),   # MQA
])
def test_shapes(B, Hq, Hkv, L, S, E, Ev):
    _check_fp32(*_inputs(B, Hq, Hkv, L, S, E, Ev))


def test_custom_scale_and_large_logits():
    q, k, v, do = _inputs(1, 2, 2, 33, 20, 16, 16)
    _check_fp32(q * 8, k * 8, v, do, scale=0.5)  # scores in the hundreds: the online max must hold


# --------------------------------------------------------------------------------------------
# Window / causal rule (block skipping) and softcap.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("L,S,wl,wr,diag", [
    (33, 33, -1, 0, 0),    # causal
    (20, 33, -1, 0, 0),    # causal top-left, L < S
    (33, 20, -1, 0, 0),    # causal top-left, L > S: rows past S see every key
    (20, 33, -1, 0, 13),   # causal bottom-right, L < S
    (33, 20, -1, 0, -13),  # causal bottom-right, L > S: the first 13 rows see nothing
    (33, 33, 4, 2, 0),     # sliding window
    (33, 40, 5, -1, 7),    # left-only window
    (40, 33, 0, 0, 0),     # the diagonal only
    (40, 40, 1, 1, 0),     # band of 3 whose edges fall on 16-block starts (block-range off-by-ones)
    (40, 40, 17, 1, 0),    # the same with a wider left edge
    (40, 40, 20, 14, 0),   # interior/edge tile split: edges one key off a block boundary
])
def test_window_causal(L, S, wl, wr, diag):
    (out, lse, dq, *_), _ = _check_fp32(*_inputs(1, 2, 1, L, S, 16, 16), wl=wl, wr=wr, diag=diag)
    if diag < 0:  # rows with nothing visible: output 0, lse +inf, no gradient
        assert torch.isposinf(lse[..., :-diag]).all()
        assert (out[..., :-diag, :] == 0).all() and (dq[..., :-diag, :] == 0).all()


@pytest.mark.parametrize("cap,wr", [(2.0, -1), (5.0, 0)])
def test_softcap(cap, wr):
    q, k, v, do = _inputs(1, 2, 2, 33, 20, 40, 40)
    _check_fp32(q * 2, k * 2, v, do, cap=cap, wr=wr)


# --------------------------------------------------------------------------------------------
# Bias / masks (direct op and through the public API), fully masked rows.
# --------------------------------------------------------------------------------------------
def test_bias_direct_strided():
    B, Hq, L, S = 2, 2, 33, 20
    q, k, v, do = _inputs(B, Hq, 1, L, S, 16, 16)
    full = torch.randn(B, Hq, L, S, device=DEV)
    _check_fp32(q, k, v, do, bias=full)
    # broadcast over batch and heads (stride 0), a transposed (non-contiguous) per-row bias
    per_key = torch.randn(S, device=DEV).expand(B, Hq, L, S)
    _check_fp32(q, k, v, do, bias=per_key)
    t = torch.randn(B, Hq, S, L, device=DEV).transpose(-1, -2)
    _check_fp32(q, k, v, do, bias=t, wr=0)


def test_fully_masked_rows_by_bias():
    B, Hq, L, S = 1, 2, 33, 20
    q, k, v, do = _inputs(B, Hq, Hq, L, S, 16, 16)
    bias = torch.zeros(B, Hq, L, S, device=DEV)
    bias[:, :, 3] = -INF
    bias[:, 1, 20:] = -INF
    bias[:, 0, :, 5] = -INF
    (out, lse, dq, dk, dv), _ = _check_fp32(q, k, v, do, bias=bias)
    for h, rows in ((0, [3]), (1, [3] + list(range(20, L)))):
        assert torch.isposinf(lse[0, h, rows]).all()
        assert (out[0, h, rows] == 0).all() and (dq[0, h, rows] == 0).all()
    assert (dk[0, 0, 5] == 0).all() and (dv[0, 0, 5] == 0).all()


def _api_grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out,) + torch.autograd.grad(out, (q, k, v), do)


def _api_check(fn, q, k, v, do, atol=5e-5):
    ours = _api_grads(lambda q, k, v: fn(q, k, v, "triton"), q, k, v, do)
    ref = _api_grads(lambda q, k, v: fn(q, k, v, "reference"), *(t.double() for t in (q, k, v, do)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kind", ["bool", "float", "bool_broadcast", "float_broadcast", "bool_empty_rows"])
def test_masks_public_api(kind):
    B, H, L, S = 2, 2, 17, 33
    q, k, v, do = _inputs(B, H, H, L, S, 16, 16)
    g = torch.Generator().manual_seed(1)
    if kind == "bool":
        mask = torch.rand(B, H, L, S, generator=g) > 0.3
    elif kind == "float":
        mask = torch.randn(B, H, L, S, generator=g)
    elif kind == "bool_broadcast":
        mask = torch.rand(B, 1, 1, S, generator=g) > 0.3  # key padding style
    elif kind == "float_broadcast":
        mask = torch.randn(L, S, generator=g)
    else:
        mask = torch.rand(L, S, generator=g) > 0.5
        mask[4] = False
        mask[11] = False
    mask = mask.to(DEV)
    _api_check(lambda q, k, v, be: fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=be),
               q, k, v, do)
    if kind == "bool_empty_rows":
        out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="triton")
        assert (out[:, :, [4, 11]] == 0).all()


def test_sdpa_matches_torch():
    """The drop-in against torch's own SDPA (float64 math), causal and GQA."""
    q, k, v, do = _inputs(2, 4, 2, 20, 20, 16, 16)
    _api_check(lambda q, k, v, be: fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                                          backend=be), q, k, v, do)
    ours = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, backend="triton")
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True,
                                                           enable_gqa=True)
    torch.testing.assert_close(ours.double(), ref, atol=5e-5, rtol=1e-4)


def test_attention_api_window_softcap_lse_and_layouts():
    # (B, L, H, E) storage seen as (B, H, L, E): non-contiguous q/k/v with stride-1 last dim
    B, H, L, S, E = 1, 2, 33, 20, 16
    g = torch.Generator().manual_seed(3)
    qs, ks, vs = (torch.randn(B, n, H, E, generator=g).to(DEV) for n in (L, S, S))
    do = torch.randn(B, H, L, E, generator=g).to(DEV)
    q, k, v = (t.transpose(1, 2) for t in (qs, ks, vs))

    def fn(q, k, v, be):
        return fastattn.attention(q, k, v, causal=True, causal_align="bottom_right", window_size=(6, -1),
                                  softcap=3.0, backend=be)
    _api_check(fn, q, k, v, do)
    out, lse = fastattn.attention(q, k, v, causal=True, causal_align="bottom_right", return_lse=True,
                                  backend="triton")
    _, ref_lse = fastattn.attention(q, k, v, causal=True, causal_align="bottom_right", return_lse=True,
                                    backend="reference")
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-5, rtol=1e-5)
    assert torch.isneginf(lse[..., : L - S]).all()  # bottom-right: the first L - S rows see nothing


# --------------------------------------------------------------------------------------------
# Dropout: the reference's hash, bit for bit.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p,kw", [(0.3, {}), (0.5, {"wl": 3, "wr": 0}), (0.1, {"cap": 4.0})])
def test_dropout_matches_reference(p, kw):
    q, k, v, do = _inputs(2, 4, 2, 33, 20, 16, 24)
    (out, *_), _ = _check_fp32(q, k, v, do, p=p, seed=1234567, **kw)
    # another seed drops other entries: the comparison above is not vacuous
    other = _triton(q, k, v, do, p=p, seed=7654321, **kw)[0]
    assert (other - out).abs().max() > 1e-2


def test_dropout_seed_wraps_like_reference():
    q, k, v, do = _inputs(1, 2, 2, 7, 20, 16, 16)
    for seed in (1, 2**31 - 1, 2**32 + 5, -3):
        _check_fp32(q, k, v, do, p=0.4, seed=seed)


def test_dropout_statistics():
    """With v = 1 the output row sum is the kept fraction rescaled: mean 1 over many rows."""
    B, H, L, S, p = 1, 2, 64, 64, 0.25
    q = torch.zeros(B, H, L, 16, device=DEV)  # uniform probabilities 1/S
    k = torch.zeros(B, H, S, 16, device=DEV)
    v = torch.ones(B, H, S, 16, device=DEV)
    out, _ = triton_attention_fwd(q, k, v, None, p, 0.25, -1, -1, 0, 0.0, 99)
    keep = dropout_keep_mask(99, B, H, L, S, p, DEV)
    expected = keep.double().sum(-1) / S / (1 - p)
    torch.testing.assert_close(out[..., 0].double(), expected, atol=1e-5, rtol=1e-5)
    assert abs(keep.double().mean().item() - (1 - p)) < 0.02


# --------------------------------------------------------------------------------------------
# Low precision: error at most 2x plain PyTorch's in the same precision (flash-attn's rule).
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"wr": 0, "p": 0.2, "seed": 5}, {"bias": True}])
def test_low_precision(dtype, kw):
    q, k, v, do = _inputs(1, 4, 2, 33, 20, 40, 40, dtype=dtype)
    kw = dict(kw)  # the parametrized dict is shared between cases
    if kw.pop("bias", False):  # a bias in the input dtype, with -inf entries, broadcast over heads
        bias = torch.randn(1, 1, 33, 20, device=DEV).masked_fill(torch.rand(33, 20, device=DEV) < 0.2, -INF)
        kw = dict(kw, bias=bias.to(dtype).expand(1, 4, 33, 20))
    ours = _triton(q, k, v, do, **kw)
    ref = _reference(q, k, v, do, **kw)
    low = _reference(q, k, v, do, cdt=dtype, **kw)
    floor = 1e-3 if dtype == torch.float16 else 8e-3
    for name, a, b, c in zip(NAMES, ours, ref, low):
        assert a.dtype == (torch.float32 if name == "lse" else dtype)
        err = (a.double() - b).abs().max().item()
        err_torch = (c.double() - b).abs().max().item()
        assert err <= 2 * err_torch + floor, f"{name}: {err} vs torch {err_torch}"


# --------------------------------------------------------------------------------------------
# Edges and errors.
# --------------------------------------------------------------------------------------------
def test_no_keys():
    q, k, v, do = _inputs(1, 2, 2, 5, 0, 16, 16)
    out, lse, dq, dk, dv = _triton(q, k, v, do)
    assert (out == 0).all() and torch.isposinf(lse).all() and (dq == 0).all()
    assert dk.shape == k.shape and dv.shape == v.shape


def test_bad_inputs():
    q, k, v, _ = _inputs(1, 2, 2, 5, 5, 16, 16)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        triton_attention_fwd(q.double(), k.double(), v.double(), None, 0.0, 1.0, -1, -1, 0, 0.0, 0)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        triton_attention_fwd(q[:, :1].expand(1, 3, 5, 16), k, v, None, 0.0, 1.0, -1, -1, 0, 0.0, 0)
    with pytest.raises(ValueError, match="attn_bias must have shape"):
        triton_attention_fwd(q, k, v, torch.zeros(5, 5, device=DEV), 0.0, 1.0, -1, -1, 0, 0.0, 0)
    with pytest.raises(ValueError, match="head size 320 > 256"):
        big = torch.zeros(1, 1, 2, 320, device=DEV)
        triton_attention_fwd(big, big, big, None, 0.0, 1.0, -1, -1, 0, 0.0, 0)
    with pytest.raises(NotImplementedError, match="float64"):
        fastattn.scaled_dot_product_attention(q.double(), k.double(), v.double(), backend="triton")


# --------------------------------------------------------------------------------------------
# GPU only: larger shapes, opcheck, torch.compile.
# --------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("L,S,E,kw", [
    (1000, 1000, 64, {"wr": 0}),
    (129, 1000, 128, {}),
    (1000, 129, 256, {"wl": 64, "wr": 0}),
    (512, 512, 96, {"p": 0.1, "seed": 3, "cap": 30.0}),
])
def test_cuda_large(dtype, L, S, E, kw):
    q, k, v, do = _inputs(2, 8, 2, L, S, E, E, dtype=dtype)
    ours = _triton(q, k, v, do, **kw)
    ref = _reference(q, k, v, do, **kw)
    if dtype == torch.float32:
        _assert_close(ours, ref, atol=2e-4, rtol=1e-3)
        return
    low = _reference(q, k, v, do, cdt=dtype, **kw)
    for name, a, b, c in zip(NAMES, ours, ref, low):
        err = (a.double() - b).abs()[torch.isfinite(b)].max().item()
        err_torch = (c.double() - b).abs()[torch.isfinite(b)].max().item()
        assert err <= 2 * err_torch + 1e-3, f"{name}: {err} vs torch {err_torch}"


@pytest.mark.cuda
@pytest.mark.parametrize("with_bias", [False, True])
def test_cuda_opcheck(with_bias):
    q, k, v, do = _inputs(2, 4, 2, 65, 70, 64, 32, dtype=torch.float16)
    bias = torch.randn(2, 4, 65, 70, device=DEV, dtype=torch.float16) if with_bias else None
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    args = (q, k, v, bias, 0.0, 0.125, -1, 0, 5, 0.0, 0)
    torch.library.opcheck(torch.ops.fastattn.triton_attention_fwd.default, args)
    out, lse = torch.ops.fastattn.triton_attention_fwd(*args)
    bwd_args = (do, q.detach(), k.detach(), v.detach(), out.detach(), lse, bias, 0.0, 0.125, -1, 0, 5, 0.0, 0)
    torch.library.opcheck(torch.ops.fastattn.triton_attention_bwd.default, bwd_args)


@pytest.mark.cuda
def test_cuda_compile_fullgraph():
    q, k, v, do = _inputs(2, 4, 2, 100, 130, 64, 64, dtype=torch.float16)

    def f(q, k, v):
        out, lse = triton_attention_fwd(q, k, v, None, 0.0, 0.125, -1, 0, 30, 0.0, 0)
        return out * 2

    compiled = torch.compile(f, fullgraph=True)
    ours = _api_grads(compiled, q, k, v, do)
    eager = _api_grads(f, q, k, v, do)
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# Packed variable-length batches (triton_attention_varlen_fwd/bwd) against a float64 loop over
# the sequences with the varlen contract's dropout hash (row = h*Tq + cu_seqlens_q[b] + i).
# --------------------------------------------------------------------------------------------
from fastattn.ops.attention import attention_varlen_reference  # noqa: E402
from fastattn.triton.attention import triton_attention_varlen_bwd, triton_attention_varlen_fwd  # noqa: E402


def _varlen_ref_fwd(q, k, v, cu_q, cu_k, p, scale, wl, wr, bottom_right, cap, seed):
    """The oracle in q's dtype; differentiable; (out (Tq,Hq,Ev), lse (Hq,Tq))."""
    return attention_varlen_reference(q, k, v, cu_q, cu_k, p, scale, wl, wr, bottom_right, cap, seed,
                                      compute_dtype=q.dtype)


def _varlen_inputs(lens_q, lens_k, Hq, Hkv, E, Ev, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    Tq, Tk = sum(lens_q), sum(lens_k)
    q = torch.randn(Tq, Hq, E, generator=g).to(DEV, dtype)
    k = torch.randn(Tk, Hkv, E, generator=g).to(DEV, dtype)
    v = torch.randn(Tk, Hkv, Ev, generator=g).to(DEV, dtype)
    do = torch.randn(Tq, Hq, Ev, generator=g).to(DEV, dtype)
    cu = [torch.tensor([0] + list(torch.tensor(x).cumsum(0).tolist()), dtype=torch.int32, device=DEV)
          for x in (lens_q, lens_k)]
    return q, k, v, do, cu[0], cu[1]


def _varlen_check(lens_q, lens_k, Hq=2, Hkv=1, E=16, Ev=16, p=0.0, wl=-1, wr=-1, br=False, cap=0.0, seed=0,
                  atol=5e-5):
    q, k, v, do, cu_q, cu_k = _varlen_inputs(lens_q, lens_k, Hq, Hkv, E, Ev)
    scale = 1.0 / math.sqrt(E)
    args = (cu_q, cu_k, max(lens_q), max(lens_k), p, scale, wl, wr, br, cap, seed)
    ours = _grads(lambda q, k, v: triton_attention_varlen_fwd(q, k, v, *args), q, k, v, do)
    ref = _grads(lambda q, k, v: _varlen_ref_fwd(q, k, v, cu_q.cpu(), cu_k.cpu(), p, scale, wl, wr, br, cap, seed),
                 *(t.double() for t in (q, k, v)), do.double())
    _assert_close(ours, ref, atol=atol)
    out, lse, dq, dk, dv = ours
    assert out.shape == (q.shape[0], Hq, Ev) and lse.shape == (Hq, q.shape[0]) and lse.dtype == torch.float32
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    return ours, (q, k, v, do, cu_q, cu_k, args)


@pytest.mark.parametrize("lens_q,lens_k,kw", [
    ([5, 0, 1, 19], [7, 3, 0, 21], {}),                          # empty sequences, one row, no keys
    ([3, 17, 1], [20, 17, 9], {"Hq": 4, "Hkv": 2, "Ev": 24}),    # GQA, Ev != E, L < S
    ([9, 18], [4, 18], {"wr": 0, "br": True}),                   # causal bottom-right, L > S: empty rows
    ([9, 18, 2], [20, 7, 5], {"wr": 0, "br": False}),            # causal top-left
    ([20, 6], [20, 17], {"wl": 3, "wr": 2, "br": True, "cap": 3.0}),  # window + softcap
    ([7, 13], [15, 13], {"p": 0.3, "seed": 77, "wr": 0, "br": True}),  # dropout: the varlen hash row
])
def test_varlen(lens_q, lens_k, kw):
    _varlen_check(lens_q, lens_k, **kw)


def test_varlen_empty_rows_and_dropout_row_index():
    (out, lse, dq, dk, dv), (q, k, v, do, cu_q, cu_k, args) = _varlen_check([9, 18], [4, 18], wr=0, br=True)
    assert torch.isposinf(lse[:, :5]).all() and (out[:5] == 0).all() and (dq[:5] == 0).all()
    # the hash row is the packed row: the second sequence alone (its rows now start at 0) drops others
    (o2, *_), _ = _varlen_check([7, 13], [15, 13], p=0.5, seed=3)
    q, k, v, do, cu_q, cu_k = _varlen_inputs([7, 13], [15, 13], 2, 1, 16, 16)
    alone, _ = triton_attention_varlen_fwd(q[7:], k[15:], v[15:], cu_q[1:] - 7, cu_k[1:] - 15, 13, 13, 0.5, 0.25,
                                           -1, -1, False, 0.0, 3)
    assert (alone - o2[7:]).abs().max() > 1e-2


def test_varlen_bwd_op_direct_and_errors():
    q, k, v, do, cu_q, cu_k = _varlen_inputs([4, 6], [5, 6], 2, 2, 16, 16)
    out, lse = triton_attention_varlen_fwd(q, k, v, cu_q, cu_k, 6, 6, 0.0, 0.25, -1, 0, True, 0.0, 0)
    grads = triton_attention_varlen_bwd(do, q, k, v, out, lse, cu_q, cu_k, 6, 6, 0.0, 0.25, -1, 0, True, 0.0, 0)
    ref = _grads(lambda q, k, v: _varlen_ref_fwd(q, k, v, cu_q, cu_k, 0.0, 0.25, -1, 0, True, 0.0, 0),
                 *(t.double() for t in (q, k, v)), do.double())
    _assert_close((out, lse) + tuple(grads), ref)
    with pytest.raises(ValueError, match="int32"):
        triton_attention_varlen_fwd(q, k, v, cu_q.long(), cu_k, 6, 6, 0.0, 0.25, -1, -1, False, 0.0, 0)
    with pytest.raises(ValueError, match="3-D"):
        triton_attention_varlen_fwd(q[None], k, v, cu_q, cu_k, 6, 6, 0.0, 0.25, -1, -1, False, 0.0, 0)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        triton_attention_varlen_fwd(q[:, :1].expand(10, 3, 16), k, v, cu_q, cu_k, 6, 6, 0.0, 0.25, -1, -1, False,
                                    0.0, 0)


def test_varlen_low_precision():
    q, k, v, do, cu_q, cu_k = _varlen_inputs([5, 12], [9, 12], 4, 2, 40, 40, dtype=torch.float16)
    args = (cu_q, cu_k, 12, 12, 0.0, 1 / math.sqrt(40), -1, 0, True, 0.0, 0)
    ours = _grads(lambda q, k, v: triton_attention_varlen_fwd(q, k, v, *args), q, k, v, do)
    ref = _grads(lambda q, k, v: _varlen_ref_fwd(q, k, v, cu_q, cu_k, *args[4:]), *(t.double() for t in (q, k, v)),
                 do.double())
    for name, a, b in zip(NAMES, ours, ref):
        assert a.dtype == (torch.float32 if name == "lse" else torch.float16)
        finite = torch.isfinite(b)
        assert (a.double()[finite] - b[finite]).abs().max() < 5e-3, name


# --------------------------------------------------------------------------------------------
# Split-KV decoding (L <= 16): forced small chunks so several chunks and the reduce really run.
# --------------------------------------------------------------------------------------------
@pytest.fixture
def force_decode_chunk(monkeypatch):
    import fastattn.triton.attention as ta

    def force(n):
        monkeypatch.setattr(ta, "_decode_chunk_forced", n)
    return force


@pytest.mark.parametrize("B,Hq,Hkv,L,S,kw", [
    (2, 4, 2, 1, 70, {}),                                  # GQA packed rows, 5 chunks, ragged last
    (1, 3, 1, 5, 64, {"Ev": 24, "cap": 3.0}),              # MQA: 15 rows of 3 heads in one tile
    (1, 2, 2, 4, 70, {"wr": 0, "diag": 66}),               # causal bottom-right decode
    (1, 2, 1, 3, 64, {"wl": 5, "wr": 0, "diag": 61}),      # sliding window: early chunks invisible
    (1, 2, 1, 6, 40, {"wr": 0, "diag": -3}),               # rows that see nothing at all: lse +inf
    (1, 4, 2, 2, 48, {"p": 0.3, "seed": 11, "bias": True}),  # dropout hash and bias per packed row
])
def test_split_kv_decode(force_decode_chunk, B, Hq, Hkv, L, S, kw):
    kw = dict(kw)
    Ev = kw.pop("Ev", 16)
    q, k, v, do = _inputs(B, Hq, Hkv, L, S, 16, Ev)
    if kw.pop("bias", False):
        g = torch.Generator().manual_seed(4)
        kw["bias"] = torch.randn(B, Hq, L, S, generator=g).to(DEV).masked_fill(torch.rand(L, S, generator=g) < 0.2,
                                                                                -INF)
    import fastattn.triton.attention as ta
    plan = ta._decode_plan(B, Hq, Hkv, L, S, {"E_PAD": 16, "EV_PAD": 16}, q.dtype, q.device)
    assert plan is None  # not chosen by itself in the interpreter
    force_decode_chunk(16)
    plan = ta._decode_plan(B, Hq, Hkv, L, S, {"E_PAD": 16, "EV_PAD": 16}, q.dtype, q.device)
    assert plan is not None and plan[3] >= 3  # several chunks
    (out, lse, *_), _ = _check_fp32(q, k, v, do, **kw)
    if kw.get("diag", 0) < 0:
        assert torch.isposinf(lse[..., :3]).all() and (out[..., :3, :] == 0).all()


# --------------------------------------------------------------------------------------------
# GPU only: varlen and split-KV decoding at real sizes, opcheck / torch.compile of the varlen op.
# --------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kw", [{}, {"wr": 0, "br": True}, {"wl": 64, "wr": 0, "p": 0.1, "seed": 2, "cap": 20.0}])
def test_cuda_varlen(dtype, kw):
    lens_q, lens_k = [300, 0, 1, 513], [310, 5, 0, 600]
    q, k, v, do, cu_q, cu_k = _varlen_inputs(lens_q, lens_k, 8, 2, 128, 128, dtype=dtype)
    kw = dict(kw)
    args = (cu_q, cu_k, 513, 600, kw.get("p", 0.0), 1 / math.sqrt(128), kw.get("wl", -1), kw.get("wr", -1),
            kw.get("br", False), kw.get("cap", 0.0), kw.get("seed", 0))
    ours = _grads(lambda q, k, v: triton_attention_varlen_fwd(q, k, v, *args), q, k, v, do)
    ref = _grads(lambda q, k, v: _varlen_ref_fwd(q, k, v, cu_q.cpu(), cu_k.cpu(), *args[4:]),
                 *(t.double() for t in (q, k, v)), do.double())
    low = _grads(lambda q, k, v: _varlen_ref_fwd(q, k, v, cu_q.cpu(), cu_k.cpu(), *args[4:]), q, k, v, do)
    for name, a, b, c in zip(NAMES, ours, ref, low):
        fin = torch.isfinite(b)
        err = (a.double() - b).abs()[fin].max().item()
        if dtype == torch.float32:
            assert err <= 2e-4 * max(1.0, b[fin].abs().max().item()), f"{name}: {err}"
        else:
            err_torch = (c.double() - b).abs()[fin].max().item()
            assert err <= 2 * err_torch + 1e-3, f"{name}: {err} vs torch {err_torch}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("B,Hq,Hkv,L,S,kw", [
    (1, 32, 8, 1, 8192, {}),
    (4, 8, 1, 16, 3000, {"wr": 0, "diag": 2984}),
    (2, 4, 4, 4, 5000, {"wl": 700, "wr": 0, "diag": 4996, "p": 0.1, "seed": 1}),
])
def test_cuda_split_kv_decode(dtype, B, Hq, Hkv, L, S, kw):
    import fastattn.triton.attention as ta
    q, k, v, do = _inputs(B, Hq, Hkv, L, S, 128, 128, dtype=dtype)
    assert ta._decode_plan(B, Hq, Hkv, L, S, {"E_PAD": 128, "EV_PAD": 128}, dtype, q.device) is not None
    ours = _triton(q, k, v, do, **kw)
    ref = _reference(q, k, v, do, **kw)
    tol = 2e-4 if dtype == torch.float32 else 2e-3
    for name, a, b in zip(NAMES, ours, ref):
        fin = torch.isfinite(b)
        assert (a.double() - b).abs()[fin].max().item() <= tol * max(1.0, b[fin].abs().max().item()), name


@pytest.mark.cuda
def test_cuda_varlen_opcheck_and_compile():
    q, k, v, do, cu_q, cu_k = _varlen_inputs([65, 3, 100], [70, 50, 100], 4, 2, 64, 64, dtype=torch.float16)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu_q, cu_k, 100, 100, 0.0, 0.125, -1, 0,
            True, 0.0, 0)
    torch.library.opcheck(torch.ops.fastattn.triton_attention_varlen_fwd.default, args)

    def f(q, k, v):
        return triton_attention_varlen_fwd(q, k, v, *args[3:])[0] * 2

    compiled = torch.compile(f, fullgraph=True)
    ours = _api_grads(compiled, q, k, v, do)
    eager = _api_grads(f, q, k, v, do)
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
