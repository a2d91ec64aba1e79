"""The hand-written CUDA attention kernels (csrc/cuda/attention*.cu*) against the float64 oracle.

Everything marked ``cuda`` needs a GPU (skipped elsewhere by tests/conftest.py). fp32 is held to a
tight tolerance; fp16/bf16 to flash-attn's rule: our error against the float64 oracle at most twice
that of plain PyTorch computing in the same low precision, plus a small atol.
"""
import math

import pytest
import torch

import fastattn
from fastattn import _ext
from fastattn.ops.attention import attention_reference, dropout_keep_mask

HAS_GPU = torch.cuda.is_available()


def _native_cuda_built() -> bool:
    return _ext.available() and _ext._C.compiled_with_cuda() and _ext.has_kernel("attention_fwd", "CUDA")


needs_kernels = pytest.mark.skipif(not (HAS_GPU and _native_cuda_built()),
                                   reason="needs a GPU and fastattn built with its CUDA kernels")


# --------------------------------------------------------------------------------------------
# Runs here (no GPU needed): the extension loads and registers what it should.
# --------------------------------------------------------------------------------------------
def test_extension_loads_and_registers_cuda_kernels():
    assert _ext.available(), f"fastattn._C failed to load: {_ext.LOAD_ERROR}"
    if _ext._C.compiled_with_cuda():
        for op in ("attention_fwd", "attention_bwd", "attention_varlen_fwd", "attention_varlen_bwd"):
            assert _ext.has_kernel(op, "CUDA"), f"fastattn::{op} has no CUDA kernel in a CUDA build"
        assert _ext._C.cuda_archs(), "a CUDA build must report its architectures"
    else:
        assert not _ext.has_kernel("attention_fwd", "CUDA")
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(NotImplementedError, match="cuda backend takes CUDA tensors"):
        fastattn.attention(q, q, q, backend="cuda")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _native_window(L, S, causal, align, window):
    """(window_left, window_right, diag_offset) exactly as fastattn.attention derives them."""
    wl, wr = window
    if causal:
        wr = 0 if wr < 0 else min(wr, 0)
    diag = (S - L) if align == "bottom_right" else 0
    return wl, wr, diag


def _bias_from_mask(mask, shape, dtype):
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    else:
        bias = mask.to(dtype)
    return bias.expand(shape)


def _make_mask(kind, B, Hq, L, S, device, gen):
    if kind is None:
        return None
    if kind == "bool":  # (B, Hq, L, S), ~30% masked, one fully masked row per head
        m = torch.rand(B, Hq, L, S, device=device, generator=gen) > 0.3
        m[:, :, L // 2, :] = False
        return m
    if kind == "float":  # (B, Hq, L, S) additive, with some -inf
        m = torch.randn(B, Hq, L, S, device=device, generator=gen)
        m[torch.rand(B, Hq, L, S, device=device, generator=gen) < 0.1] = float("-inf")
        return m
    if kind == "bcast":  # (L, S) float, broadcast over batch and heads (stride-0 bias)
        return torch.randn(L, S, device=device, generator=gen)
    if kind == "bcast_bool":  # (B, 1, 1, S) key padding
        m = torch.ones(B, 1, 1, S, dtype=torch.bool, device=device)
        m[..., S - max(1, S // 3):] = False
        return m
    raise ValueError(kind)


def _max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def _run(B, Hq, Hkv, L, S, E, Ev, dtype, mask=None, causal=False, align="top_left", window=(-1, -1),
         softcap=0.0, dropout=0.0, seed=1234, grads=True, scale=None, noncontig=False, q_scale=1.0,
         device="cuda", backend="cuda", _corrupt=False):
    """Ours (backend='cuda') vs attention_reference in float64 (and in `dtype` for fp16/bf16)."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(B * 1000003 + L * 1009 + S * 31 + E)
    if noncontig:  # (B, L, H, E) memory viewed as (B, H, L, E): arbitrary strides, last dim contiguous
        q = torch.randn(B, L, Hq, E, device=dev, generator=gen).to(dtype).transpose(1, 2)
        k = torch.randn(B, S, Hkv, E, device=dev, generator=gen).to(dtype).transpose(1, 2)
        v = torch.randn(B, S, Hkv, Ev, device=dev, generator=gen).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, L, E, device=dev, generator=gen).to(dtype)
        k = torch.randn(B, Hkv, S, E, device=dev, generator=gen).to(dtype)
        v = torch.randn(B, Hkv, S, Ev, device=dev, generator=gen).to(dtype)
    if q_scale != 1.0:
        q = (q.float() * q_scale).to(dtype)
    attn_mask = _make_mask(mask, B, Hq, L, S, dev, gen)
    dout = torch.randn(B, Hq, L, Ev, device=dev, generator=gen).to(dtype)
    for t in (q, k, v):
        t.requires_grad_(grads)

    out, lse = fastattn.attention(q, k, v, attn_mask, dropout_p=dropout, causal=causal, scale=scale,
                                  enable_gqa=Hq != Hkv, window_size=window, causal_align=align,
                                  softcap=softcap, return_lse=True, seed=seed, backend=backend)
    assert out.dtype == dtype and out.shape == (B, Hq, L, Ev) and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, L)

    wl, wr, diag = _native_window(L, S, causal, align, window)
    sc = scale if scale is not None else 1.0 / math.sqrt(E)
    if _corrupt:  # harness self-check only: pretend the kernel used another scale
        sc = sc * 1.5

    def reference(cdt):
        qq, kk, vv = (t.detach().to(cdt if cdt == torch.float64 else dtype).requires_grad_(grads) for t in (q, k, v))
        bias = _bias_from_mask(attn_mask, (B, Hq, L, S), qq.dtype)
        o, l = attention_reference(qq, kk, vv, bias, dropout, sc, wl, wr, diag, softcap, seed,
                                   compute_dtype=cdt)
        gq = gk = gv = None
        if grads:
            gq, gk, gv = torch.autograd.grad(o, (qq, kk, vv), dout.to(o.dtype))
        return o, l, gq, gk, gv

    ref = reference(torch.float64)
    results = [out, None, None, None]
    if grads:
        results[1:] = torch.autograd.grad(out, (q, k, v), dout)
        for g, t in zip(results[1:], (q, k, v)):
            assert g.shape == t.shape and g.dtype == dtype
    names = ("out", "grad_q", "grad_k", "grad_v")
    refs = (ref[0], ref[2], ref[3], ref[4])

    # lse: +inf (native) is turned into -inf by the API for empty rows.
    ref_lse = torch.where(torch.isposinf(ref[1]), torch.full_like(ref[1], float("-inf")), ref[1])
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "empty rows differ"
    fin = torch.isfinite(ref_lse)
    lse_tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert _max_err(lse[fin], ref_lse[fin]) <= lse_tol * max(1.0, ref_lse[fin].abs().max().item() if fin.any() else 1)

    if dtype == torch.float32:
        for name, x, r in zip(names, results, refs):
            if x is None:
                continue
            tol = 2e-5 + 1e-4 * max(1.0, r.abs().max().item())
            assert _max_err(x, r) <= tol, f"{name}: max err {_max_err(x, r):.3g} > {tol:.3g}"
    else:
        low = reference(dtype)
        lows = (low[0], low[2], low[3], low[4])
        for name, x, r, lo in zip(names, results, refs, lows):
            if x is None:
                continue
            atol = 1e-3 * max(1.0, r.abs().max().item())
            ours, theirs = _max_err(x, r), _max_err(lo, r)
            assert ours <= 2 * theirs + atol, f"{name}: ours {ours:.3g} > 2 x torch-{dtype} {theirs:.3g} + {atol:.1g}"
    return out, lse, results, refs


def test_harness_self_check():
    """The comparison harness itself, run here on CPU with the reference backend as 'ours'."""
    for dtype in (torch.float32, torch.bfloat16):
        _run(1, 2, 1, 7, 9, 16, 8, dtype, mask="bool", causal=True, device="cpu", backend="reference")
        _run(1, 2, 2, 5, 12, 8, 8, dtype, mask="bcast", dropout=0.3, softcap=5.0, noncontig=True,
             device="cpu", backend="reference")
    # and it catches a wrong answer: a kernel that forgets the scale
    with pytest.raises(AssertionError):
        _run(1, 1, 1, 6, 6, 16, 16, torch.float32, scale=0.5, device="cpu", backend="reference",
             q_scale=1.0, _corrupt=True)


# --------------------------------------------------------------------------------------------
# Compute-sanitizer friendly smoke test (make gpu-check runs `-k cuda_smoke` under memcheck).
# --------------------------------------------------------------------------------------------
@pytest.mark.cuda
@needs_kernels
def test_cuda_smoke():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        _run(1, 2, 1, 7, 9, 16, 8, dtype, mask="bool", causal=True)
        _run(1, 2, 2, 5, 70, 40, 40, dtype, mask="bcast", dropout=0.3, softcap=5.0)
        _run(2, 1, 1, 65, 3, 8, 24, dtype, window=(2, 1), noncontig=True)


# --------------------------------------------------------------------------------------------
# Shapes: odd lengths, L != S, head sizes, Ev != E; every dtype.
# --------------------------------------------------------------------------------------------
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SHAPES = [  # B, Hq, Hkv, L, S, E, Ev
    (1, 1, 1, 1, 1, 32, 32),
    (2, 3, 3, 7, 7, 40, 40),
    (1, 2, 2, 129, 129, 64, 64),
    (1, 2, 2, 129, 1000, 96, 96),
    (1, 1, 1, 1000, 129, 128, 128),
    (1, 2, 2, 1000, 1000, 64, 64),
    (1, 1, 1, 129, 200, 256, 256),
    (1, 2, 2, 100, 77, 64, 32),     # Ev < E
    (1, 1, 1, 66, 130, 40, 200),    # Ev > E, different buckets
    (2, 2, 2, 33, 17, 20, 12),      # head sizes not multiples of 8: scalar loads
]


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes(shape, dtype):
    _run(*shape, dtype)


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noncontiguous_inputs(dtype):
    _run(2, 4, 2, 129, 150, 64, 64, dtype, noncontig=True)


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["bool", "float", "bcast", "bcast_bool"])
def test_masks(mask, dtype):
    _run(2, 2, 2, 129, 200, 64, 64, dtype, mask=mask)


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L,S", [(129, 129), (100, 300), (300, 100), (1, 1000)])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_causal(align, L, S, dtype):
    out, lse, _, _ = _run(1, 2, 2, L, S, 64, 64, dtype, causal=True, align=align)
    if align == "bottom_right" and L > S:  # the first L - S queries see nothing
        assert torch.all(out[:, :, : L - S] == 0)
        assert torch.all(torch.isneginf(lse[:, :, : L - S]))


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [(16, 0), (0, 0), (5, 40), (-1, 3), (70, -1)])
def test_window(window, dtype):
    _run(1, 2, 2, 200, 260, 64, 64, dtype, window=window, align="bottom_right")


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softcap(dtype):
    _run(1, 2, 2, 129, 140, 64, 64, dtype, softcap=10.0, q_scale=4.0)
    _run(1, 1, 1, 70, 70, 128, 128, dtype, softcap=2.0, mask="float", causal=True)


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Hq,Hkv", [(6, 2), (4, 1), (8, 8)])
def test_gqa(Hq, Hkv, dtype):
    _run(2, Hq, Hkv, 77, 129, 64, 64, dtype, causal=True)


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows(dtype):
    out, lse, results, _ = _run(1, 2, 2, 70, 90, 64, 64, dtype, mask="bool")
    dq = results[1]
    assert torch.all(out[:, :, 35] == 0) and torch.all(torch.isneginf(lse[:, :, 35]))
    assert torch.all(dq[:, :, 35] == 0)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in results[1:])
    # S == 0 is allowed too: nothing to attend to anywhere.
    q = torch.randn(1, 1, 5, 32, device="cuda", dtype=dtype)
    kv = torch.randn(1, 1, 0, 32, device="cuda", dtype=dtype)
    o = fastattn.attention(q, kv, kv, backend="cuda")
    assert o.shape == (1, 1, 5, 32) and torch.all(o == 0)


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_logits(dtype):
    _run(1, 2, 2, 129, 129, 64, 64, dtype, q_scale=10.0 if dtype == torch.float32 else 8.0)


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_matches_reference(p, dtype):
    _run(2, 4, 2, 129, 100, 64, 64, dtype, dropout=p, seed=77, causal=True)


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_mask_is_the_reference_mask(dtype):
    """q = 0 makes P uniform and v = identity reads P out: kept entries are exactly the nonzeros."""
    B, H, L, S, p, seed = 2, 3, 70, 130, 0.4, 2024
    q = torch.zeros(B, H, L, 32, device="cuda", dtype=dtype)
    k = torch.randn(B, H, S, 32, device="cuda", dtype=dtype)
    v = torch.eye(S, device="cuda", dtype=dtype).expand(B, H, S, S)
    out = fastattn.attention(q, k, v, dropout_p=p, seed=seed, backend="cuda")
    keep = dropout_keep_mask(seed, B, H, L, S, p, device="cuda")
    assert torch.equal(out != 0, keep)
    torch.testing.assert_close(out[keep].float(), torch.full_like(out[keep].float(), 1.0 / (S * (1 - p))),
                               rtol=1e-2, atol=0)
    # same seed, same result; another seed, another mask
    assert torch.equal(out, fastattn.attention(q, k, v, dropout_p=p, seed=seed, backend="cuda"))
    assert not torch.equal(out, fastattn.attention(q, k, v, dropout_p=p, seed=seed + 1, backend="cuda"))


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_simt_fallback_for_half_types(dtype, monkeypatch):
    """The SIMT kernels that fp16/bf16 fall back to where shared memory is short (forced here)."""
    monkeypatch.setenv("FASTATTN_CUDA_ATTN_SIMT", "1")
    _run(1, 4, 2, 129, 70, 256, 200, dtype, mask="float", causal=True, align="bottom_right")
    _run(2, 2, 2, 33, 65, 40, 40, dtype, dropout=0.2, softcap=3.0, window=(8, 8))


@pytest.mark.cuda
@needs_kernels
def test_deterministic_backward():
    args = [torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3)]
    dout = torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.float16)
    g1 = torch.autograd.grad(fastattn.attention(*args, causal=True, backend="cuda"), args, dout)
    g2 = torch.autograd.grad(fastattn.attention(*args, causal=True, backend="cuda"), args, dout)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_opcheck(dtype):
    dev = "cuda"
    q = torch.randn(1, 4, 33, 64, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(1, 2, 40, 64, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(1, 2, 40, 32, device=dev, dtype=dtype, requires_grad=True)
    bias = torch.randn(1, 1, 33, 40, device=dev, dtype=dtype).expand(1, 4, 33, 40)
    fwd_args = (q, k, v, bias, 0.1, 0.125, -1, 0, 7, 0.0, 5)
    torch.library.opcheck(torch.ops.fastattn.attention_fwd.default, fwd_args)
    out, lse = torch.ops.fastattn.attention_fwd(*fwd_args)
    dout = torch.randn_like(out)
    bwd_args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, bias, 0.1, 0.125, -1, 0, 7, 0.0, 5)
    torch.library.opcheck(torch.ops.fastattn.attention_bwd.default, bwd_args)


@pytest.mark.cuda
@needs_kernels
def test_bad_inputs_raise_clear_errors():
    q = torch.randn(1, 1, 8, 300, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="head sizes up to 256"):
        torch.ops.fastattn.attention_fwd(q, q, q, None, 0.0, 1.0, -1, -1, 0, 0.0, 0)
    q = torch.randn(1, 1, 8, 16, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="key has dtype"):
        torch.ops.fastattn.attention_fwd(q, q.float(), q, None, 0.0, 1.0, -1, -1, 0, 0.0, 0)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        torch.ops.fastattn.attention_fwd(q, q.cpu(), q, None, 0.0, 1.0, -1, -1, 0, 0.0, 0)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        torch.ops.fastattn.attention_fwd(q.double(), q.double(), q.double(), None, 0.0, 1.0, -1, -1, 0, 0.0, 0)
    strided = torch.randn(1, 1, 8, 32, device="cuda", dtype=torch.float16)[..., ::2]
    with pytest.raises(RuntimeError, match="contiguous in its last dim"):
        torch.ops.fastattn.attention_fwd(strided, strided, strided, None, 0.0, 1.0, -1, -1, 0, 0.0, 0)
    bias = torch.zeros(1, 1, 8, 9, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="attn_bias must have shape"):
        torch.ops.fastattn.attention_fwd(q, q, q, bias, 0.0, 1.0, -1, -1, 0, 0.0, 0)


# --------------------------------------------------------------------------------------------
# Split-KV decoding (L <= 16): the tensor-core forward cuts the keys into slices and a reduce
# kernel combines them. FASTATTN_CUDA_ATTN_SPLIT_KEYS forces small slices (several of them, some
# wholly hidden by the causal/window rule); the last case is chosen by the heuristic itself.
# --------------------------------------------------------------------------------------------
@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,Hq,Hkv,L,S,E,kw", [
    (2, 8, 2, 1, 1000, 128, {}),
    (1, 4, 4, 16, 777, 64, {"causal": True, "align": "bottom_right"}),
    (1, 4, 1, 5, 700, 64, {"window": (100, 0), "causal": True, "align": "bottom_right"}),  # early slices hidden
    (2, 4, 2, 12, 300, 256, {"causal": True}),      # top-left causal: rows see only the first slice
    (1, 2, 2, 3, 500, 64, {"dropout": 0.2, "softcap": 5.0, "mask": "bool"}),
    (1, 2, 1, 8, 300, 96, {"mask": "bcast_bool"}),  # padded keys: the last slice fully masked
])
def test_split_kv_decode(dtype, B, Hq, Hkv, L, S, E, kw, monkeypatch):
    monkeypatch.setenv("FASTATTN_CUDA_ATTN_SPLIT_KEYS", "64")
    _run(B, Hq, Hkv, L, S, E, E, dtype, **kw)


@pytest.mark.cuda
@needs_kernels
def test_split_kv_decode_heuristic_and_dense_agree(monkeypatch):
    q = torch.randn(1, 2, 1, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(1, 2, 8192, 64, device="cuda", dtype=torch.float16)
    v = torch.randn(1, 2, 8192, 64, device="cuda", dtype=torch.float16)
    args = (None, 0.0, 0.125, -1, -1, 0, 0.0, 0)
    out_split, lse_split = torch.ops.fastattn.attention_fwd(q, k, v, *args)  # 2 query tiles: splits
    q16 = torch.randn(1, 2, 32, 64, device="cuda", dtype=torch.float16)
    q16[:, :, :1] = q
    out_dense, lse_dense = torch.ops.fastattn.attention_fwd(q16, k, v, *args)  # L = 32: never split
    torch.testing.assert_close(out_split, out_dense[:, :, :1], atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(lse_split, lse_dense[:, :, :1], atol=1e-4, rtol=1e-5)
    _run(1, 2, 2, 1, 8192, 64, 64, torch.float16)


# --------------------------------------------------------------------------------------------
# Packed variable-length batches: attention_varlen_fwd/bwd against a float64 loop over sequences
# (the varlen contract: local indices, bottom_right -> diag = Sb - Lb, dropout row h*Tq + cu_q[b] + i).
# --------------------------------------------------------------------------------------------
def _varlen_reference(q, k, v, cu_q, cu_k, p, scale, wl, wr, bottom_right, cap, seed):
    """The oracle, computing in q's dtype (offsets as lists: it loops over the sequences on the host)."""
    from fastattn.ops.attention import attention_varlen_reference
    out, lse = attention_varlen_reference(q, k, v, cu_q.tolist(), cu_k.tolist(), p, scale, wl, wr, bottom_right,
                                          cap, seed, compute_dtype=q.dtype)
    return out, lse


def _run_varlen(lens_q, lens_k, Hq, Hkv, E, Ev, dtype, p=0.0, wl=-1, wr=-1, bottom_right=False, cap=0.0, seed=5):
    gen = torch.Generator(device="cuda").manual_seed(sum(lens_q) * 31 + sum(lens_k))
    Tq, Tk = sum(lens_q), sum(lens_k)
    q = torch.randn(Tq, Hq, E, device="cuda", generator=gen).to(dtype)
    k = torch.randn(Tk, Hkv, E, device="cuda", generator=gen).to(dtype)
    v = torch.randn(Tk, Hkv, Ev, device="cuda", generator=gen).to(dtype)
    dout = torch.randn(Tq, Hq, Ev, device="cuda", generator=gen).to(dtype)
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    scale = 1.0 / math.sqrt(E)
    params = (cu_q, cu_k, max(lens_q), max(lens_k), p, scale, wl, wr, bottom_right, cap, seed)
    out, lse = torch.ops.fastattn.attention_varlen_fwd(q, k, v, *params)
    assert out.shape == (Tq, Hq, Ev) and out.dtype == dtype and lse.shape == (Hq, Tq) and lse.dtype == torch.float32
    dq, dk, dv = torch.ops.fastattn.attention_varlen_bwd(dout, q, k, v, out, lse, *params)

    def reference(cdt):
        qq, kk, vv = (t.detach().to(cdt).requires_grad_() for t in (q, k, v))
        o, l = _varlen_reference(qq, kk, vv, cu_q, cu_k, p, scale, wl, wr, bottom_right, cap, seed)
        grads = torch.autograd.grad(o, (qq, kk, vv), dout.to(cdt), allow_unused=True)
        grads = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (qq, kk, vv)))
        return (o, l) + grads

    ref = reference(torch.float64)
    assert torch.equal(torch.isposinf(lse), torch.isposinf(ref[1])), "empty rows differ"
    fin = torch.isfinite(ref[1])
    assert _max_err(lse[fin], ref[1][fin]) <= (1e-4 if dtype == torch.float32 else 2e-2) * max(
        1.0, ref[1][fin].abs().max().item() if fin.any() else 1.0)
    names = ("out", "grad_q", "grad_k", "grad_v")
    ours = (out, dq, dk, dv)
    refs = (ref[0], ref[2], ref[3], ref[4])
    if dtype == torch.float32:
        for name, x, r in zip(names, ours, refs):
            tol = 2e-5 + 1e-4 * max(1.0, r.abs().max().item())
            assert _max_err(x, r) <= tol, f"{name}: max err {_max_err(x, r):.3g} > {tol:.3g}"
    else:
        low = reference(dtype)  # plain PyTorch computing in the same low precision
        lows = (low[0], low[2], low[3], low[4])
        for name, x, r, lo in zip(names, ours, refs, lows):
            atol = 1e-3 * max(1.0, r.abs().max().item())
            assert _max_err(x, r) <= 2 * _max_err(lo, r) + atol, f"{name}: {_max_err(x, r):.3g} vs {_max_err(lo, r):.3g}"
    return out, lse, (dq, dk, dv)


VARLEN_CASES = [
    ([100, 0, 1, 257], [130, 7, 0, 300], 4, 2, 64, 64, {}),                 # empty sequence, one row, no keys
    ([65, 200, 3], [65, 129, 300], 4, 4, 128, 128, {"wr": 0, "bottom_right": True}),
    ([200, 64], [100, 128], 2, 1, 64, 32, {"wr": 0, "bottom_right": True}),  # L > S: empty rows
    ([130, 70], [150, 70], 4, 2, 96, 96, {"wr": 0}),                        # top-left causal
    ([300, 17], [300, 40], 2, 2, 64, 64, {"wl": 30, "wr": 5, "cap": 4.0}),
    ([90, 160], [90, 160], 4, 1, 256, 256, {"p": 0.25, "seed": 9, "wr": 0, "bottom_right": True}),
]


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"{len(c[0])}seq")
def test_varlen(case, dtype):
    lens_q, lens_k, Hq, Hkv, E, Ev, kw = case
    _run_varlen(lens_q, lens_k, Hq, Hkv, E, Ev, dtype, **kw)


@pytest.mark.cuda
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_varlen_simt_fallback(dtype, monkeypatch):
    monkeypatch.setenv("FASTATTN_CUDA_ATTN_SIMT", "1")
    _run_varlen([33, 0, 70], [40, 5, 70], 4, 2, 40, 40, dtype, p=0.2, wr=0, bottom_right=True)


@pytest.mark.cuda
@needs_kernels
def test_varlen_matches_dense_per_sequence():
    """Each sequence of the packed batch = the dense op on that sequence alone (no dropout)."""
    lens_q, lens_k = [37, 128, 1], [90, 128, 300]
    out, lse, _ = _run_varlen(lens_q, lens_k, 4, 2, 64, 64, torch.float16, wr=0, bottom_right=True)
    gen = torch.Generator(device="cuda").manual_seed(sum(lens_q) * 31 + sum(lens_k))
    q = torch.randn(sum(lens_q), 4, 64, device="cuda", generator=gen).half()
    k = torch.randn(sum(lens_k), 2, 64, device="cuda", generator=gen).half()
    v = torch.randn(sum(lens_k), 2, 64, device="cuda", generator=gen).half()
    q0 = k0 = 0
    for Lb, Sb in zip(lens_q, lens_k):
        o, l = torch.ops.fastattn.attention_fwd(q[q0:q0 + Lb].transpose(0, 1)[None], k[k0:k0 + Sb].transpose(0, 1)[None],
                                                v[k0:k0 + Sb].transpose(0, 1)[None], None, 0.0, 0.125, -1, 0, Sb - Lb,
                                                0.0, 0)
        torch.testing.assert_close(out[q0:q0 + Lb], o[0].transpose(0, 1), atol=2e-3, rtol=1e-2)
        torch.testing.assert_close(lse[:, q0:q0 + Lb], l[0], atol=1e-4, rtol=1e-5)
        q0, k0 = q0 + Lb, k0 + Sb


@pytest.mark.cuda
@needs_kernels
def test_varlen_deterministic_and_opcheck():
    q = torch.randn(150, 4, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(170, 2, 64, device="cuda", dtype=torch.float16)
    v = torch.randn(170, 2, 64, device="cuda", dtype=torch.float16)
    cu_q = torch.tensor([0, 50, 150], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 70, 170], dtype=torch.int32, device="cuda")
    params = (cu_q, cu_k, 100, 100, 0.1, 0.125, -1, 0, True, 0.0, 3)
    # (the fake kernels and autograd are registered by fastattn.ops.attention; schema checked here)
    torch.library.opcheck(torch.ops.fastattn.attention_varlen_fwd.default, (q, k, v) + params,
                          test_utils=("test_schema",))
    out, lse = torch.ops.fastattn.attention_varlen_fwd(q, k, v, *params)
    dout = torch.randn_like(out)
    g1 = torch.ops.fastattn.attention_varlen_bwd(dout, q, k, v, out, lse, *params)
    g2 = torch.ops.fastattn.attention_varlen_bwd(dout, q, k, v, out, lse, *params)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.fastattn.attention_varlen_fwd(q, k, v, cu_q.long(), cu_k, *params[2:])
    with pytest.raises(RuntimeError, match="3-D"):
        torch.ops.fastattn.attention_varlen_fwd(q[None], k, v, *params)
