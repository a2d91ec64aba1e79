"""fastattn attention: every backend present against a float64 plain-PyTorch oracle, forward and all
three gradients; torch's SDPA semantics; opcheck, gradcheck; backend choice; bad inputs.

Backends: "cpu" (C++ kernel), "reference" (plain math), "triton" (when fastattn.triton.attention
imports: on the GPU, or here under TRITON_INTERPRET=1 with small shapes), "cuda" (GPU only).
"""
import itertools
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import backend as fa_backend
from fastattn.ops.attention import attention_reference, dropout_keep_mask

HAS_GPU = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1" and not HAS_GPU
NATIVE = hasattr(torch.ops.fastattn, "attention_fwd") and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fastattn::attention_fwd", "CPU")
needs_native = pytest.mark.skipif(not NATIVE, reason="the fastattn extension (CPU kernel) is not built")

BACKENDS = [
    pytest.param("cpu", marks=needs_native),
    "reference",
    "triton",
    pytest.param("cuda", marks=pytest.mark.cuda),
]


def device_of(backend):
    if backend == "cuda" or (backend == "triton" and HAS_GPU):
        return torch.device("cuda")
    return torch.device("cpu")


def prepare(backend, work):
    """Skip what a backend cannot run here; ``work`` ~ L*S*heads says how heavy the case is."""
    if backend == "triton":
        pytest.importorskip("fastattn.triton.attention")
        if INTERPRET and work > 12_000:
            pytest.skip("too large for the Triton interpreter")
    if backend == "cuda" and not HAS_GPU:
        pytest.skip("needs a CUDA GPU")


def call(backend, *args, **kwargs):
    """fastattn.attention, skipping (not failing) when a non-CPU backend declares the input unsupported."""
    try:
        return fastattn.attention(*args, backend=backend, **kwargs)
    except NotImplementedError as e:
        if backend in ("triton", "cuda"):
            pytest.skip(f"{backend} declares this input unsupported: {e}")
        raise


def bias_of(mask, shape, dtype=torch.float64):
    """The additive bias the contract defines for a torch-style mask, broadcast to (B, H, L, S)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        b = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    else:
        b = mask.to(dtype)
    return b.expand(shape)


def assert_close_fp(name, actual, expected, dtype):
    """float32/float64: tight tolerances, scaled by the size of the expected values."""
    assert not torch.isnan(actual).any(), f"{name}: NaN"
    mag = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    if dtype == torch.float64:
        atol, rtol = 1e-9 * mag, 1e-7
    else:
        atol, rtol = 3e-5 * mag, 1e-4
    torch.testing.assert_close(actual.double().cpu(), expected.cpu(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def assert_close_lowp(name, actual, expected, lowp, dtype):
    """fp16/bf16 (flash-attn's rule): error vs the fp64 oracle at most 2x that of plain PyTorch
    computing in the same low precision, plus a small absolute slack."""
    assert not torch.isnan(actual).any(), f"{name}: NaN"
    # fp32 here only for huge logits: recomputing scores of size ~1e3 in fp32 in the backward costs
    # ~1e-4 relative (plain PyTorch saves its probabilities instead); a real bug is O(1) relative.
    rel = {torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(dtype, 3e-4)
    slack = rel * max(1.0, expected.abs().max().item())
    err = (actual.double().cpu() - expected.cpu()).abs().max().item()
    err_lowp = (lowp.double().cpu() - expected.cpu()).abs().max().item()
    assert err <= 2 * err_lowp + slack, f"{name}: error {err:.3g} > 2 x plain PyTorch's {err_lowp:.3g} + {slack:.2g}"


def run_case(backend, B, Hq, Hkv, L, S, E, Ev, dtype=torch.float32, mask=None, causal=False, align="top_left",
             window=(-1, -1), softcap=0.0, scale=None, dropout_p=0.0, seed=0, layout="bhle", grad=True, gen_seed=0, flash_rule=False):
    """Run one configuration through ``backend`` and hold it to the float64 oracle.

    fp16/bf16 (and fp32 with ``flash_rule``, for ill-conditioned cases such as huge logits) are held
    to flash-attn's rule: at most 2x the error of plain PyTorch computing in that dtype.
    """
    prepare(backend, L * S * Hq * B)
    dev = device_of(backend)
    g = torch.Generator().manual_seed(gen_seed)
    q64 = torch.randn(B, Hq, L, E, generator=g, dtype=torch.float64)
    k64 = torch.randn(B, Hkv, S, E, generator=g, dtype=torch.float64)
    v64 = torch.randn(B, Hkv, S, Ev, generator=g, dtype=torch.float64)
    go64 = torch.randn(B, Hq, L, Ev, generator=g, dtype=torch.float64)

    def make(t):
        t = t.to(dtype, copy=True)
        if layout == "blhe":  # (B, L, H, E) storage seen as (B, H, L, E): strided heads
            t = t.transpose(1, 2).contiguous().transpose(1, 2)
        return t.to(dev).requires_grad_(grad)

    q, k, v = make(q64), make(k64), make(v64)
    dmask = None if mask is None else mask.to(dev)
    out = call(backend, q, k, v, dmask, dropout_p, causal=causal, scale=scale, enable_gqa=Hq != Hkv,
               window_size=window, causal_align=align, softcap=softcap, seed=seed)
    assert out.shape == (B, Hq, L, Ev) and out.dtype == dtype and out.device.type == dev.type

    wl, wr = window
    if causal:
        wr = 0
    diag = S - L if align == "bottom_right" else 0
    sc = scale if scale is not None else 1.0 / math.sqrt(E)

    def oracle(cdt, qq, kk, vv):
        return attention_reference(qq, kk, vv, bias_of(mask, (B, Hq, L, S), cdt), dropout_p, sc, wl, wr, diag,
                                   softcap, seed, compute_dtype=cdt)[0]

    leaves = [t.detach().clone().requires_grad_(grad) for t in (q64, k64, v64)]
    ref = oracle(torch.float64, *leaves)
    lowp = dtype in (torch.float16, torch.bfloat16) or (flash_rule and dtype == torch.float32)
    if lowp:
        low_leaves = [t.to(dtype).requires_grad_(grad) for t in (q64, k64, v64)]
        low = oracle(dtype, *low_leaves)
        assert_close_lowp("out", out, ref, low, dtype)
    else:
        assert_close_fp("out", out, ref, dtype)
    if not grad:
        return out
    ref.backward(go64)
    out.backward(go64.to(dtype).to(dev))
    if lowp:
        low.backward(go64.to(dtype))
    for name, ours, leaf, i in (("dq", q, leaves[0], 0), ("dk", k, leaves[1], 1), ("dv", v, leaves[2], 2)):
        assert ours.grad is not None, f"{name} missing"
        assert ours.grad.shape == leaf.shape
        if lowp:
            assert_close_lowp(name, ours.grad, leaf.grad, low_leaves[i].grad, dtype)
        else:
            assert_close_fp(name, ours.grad, leaf.grad, dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Shapes, head sizes, dtypes
# ---------------------------------------------------------------------------------------------
SHAPES = [  # B, Hq, Hkv, L, S, E, Ev
    (1, 1, 1, 1, 1, 16, 16),
    (2, 3, 3, 7, 7, 32, 32),
    (1, 2, 2, 129, 129, 64, 64),
    (2, 2, 2, 7, 129, 40, 40),      # L < S, odd head size
    (1, 2, 2, 129, 7, 72, 72),      # L > S
    (1, 2, 2, 33, 65, 128, 64),     # value head size != query's
    (1, 1, 1, 17, 33, 256, 256),
    (1, 2, 2, 1, 300, 64, 96),      # one query row (decoding path)
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes_fp32(backend, shape):
    run_case(backend, *shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequence(backend):
    run_case(backend, 1, 2, 1, 1000, 1000, 16, 16, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("causal", [False, True])
def test_dtypes(backend, dtype, causal):
    run_case(backend, 2, 2, 2, 37, 70, 64, 64, dtype=dtype, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_layout(backend):
    """(B, L, H, E) storage viewed as (B, H, L, E): heads are not contiguous."""
    run_case(backend, 2, 3, 3, 20, 45, 32, 32, layout="blhe", causal=True)


# ---------------------------------------------------------------------------------------------
# Masks, causal, windows, softcap, GQA
# ---------------------------------------------------------------------------------------------
def _masks(B, H, L, S):
    g = torch.Generator().manual_seed(1)
    return {
        "bool_LS": torch.rand(L, S, generator=g) > 0.3,
        "float_LS": torch.randn(L, S, generator=g),
        "bool_B11S": torch.rand(B, 1, 1, S, generator=g) > 0.5,
        "float_1HLS": torch.randn(1, H, L, S, generator=g),
        "bool_BHLS": torch.rand(B, H, L, S, generator=g) > 0.5,
        "float_with_-inf_S": torch.where(torch.rand(S, generator=g) > 0.4, 0.0, float("-inf")),
        "float_L1": torch.randn(L, 1, generator=g),  # broadcast along the keys: bias stride 0 there
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(_masks(2, 3, 9, 21)))
def test_masks(backend, kind):
    B, H, L, S = 2, 3, 19, 41
    run_case(backend, B, H, H, L, S, 32, 32, mask=_masks(B, H, L, S)[kind])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,S", [(30, 30), (13, 50), (50, 13)])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_causal(backend, L, S, align):
    # bottom-right with L > S leaves the first L - S rows with nothing to see: output 0, grads 0.
    run_case(backend, 2, 2, 2, L, S, 32, 32, causal=True, align=align)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window,causal,align", [((8, 8), False, "top_left"), ((5, -1), False, "top_left"),
                                                 ((-1, 3), False, "bottom_right"), ((16, 0), True, "bottom_right"),
                                                 ((0, 0), False, "top_left")])
def test_sliding_window(backend, window, causal, align):
    run_case(backend, 1, 2, 2, 45, 77, 32, 32, window=window, causal=causal, align=align)


@needs_native
def test_window_long_block_skipping():
    """Windows narrower than a tile, long sequences: key blocks hidden entirely are skipped."""
    run_case("cpu", 1, 1, 1, 700, 900, 16, 16, window=(40, 10), align="bottom_right")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_softcap(backend, causal):
    run_case(backend, 2, 2, 2, 31, 47, 32, 32, softcap=2.0, scale=1.0, causal=causal, mask=torch.randn(31, 47))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (6, 1), (8, 4)])
def test_gqa(backend, Hq, Hkv):
    run_case(backend, 2, Hq, Hkv, 23, 37, 32, 24, causal=True, mask=torch.randn(2, Hq, 23, 37))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows(backend):
    B, H, L, S = 2, 2, 11, 19
    mask = torch.rand(B, H, L, S, generator=torch.Generator().manual_seed(3)) > 0.5
    mask[:, :, 3] = False
    mask[1, 0, 7] = False
    out = run_case(backend, B, H, H, L, S, 32, 32, mask=mask)
    assert (out[:, :, 3] == 0).all() and (out[1, 0, 7] == 0).all()
    # gradients of a fully masked query row are exactly 0
    q = torch.randn(B, H, L, 32, device=device_of(backend), requires_grad=True)
    k = torch.randn(B, H, S, 32, device=q.device, requires_grad=True)
    v = torch.randn(B, H, S, 32, device=q.device, requires_grad=True)
    call(backend, q, k, v, mask.to(q.device)).sum().backward()
    assert (q.grad[:, :, 3] == 0).all() and not torch.isnan(q.grad).any()
    assert not torch.isnan(k.grad).any() and not torch.isnan(v.grad).any()
    # everything masked: all zeros, no NaN
    none = torch.zeros(L, S, dtype=torch.bool, device=q.device)
    q.grad = k.grad = v.grad = None
    out = call(backend, q, k, v, none)
    out.sum().backward()
    assert (out == 0).all() and (q.grad == 0).all() and (k.grad == 0).all() and (v.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits(backend):
    # scale 100: fp32 rounding of q·k is amplified 100x, so fp32 is held to 2x plain PyTorch's fp32 error
    run_case(backend, 1, 2, 2, 33, 65, 32, 32, scale=100.0, flash_rule=True)
    run_case(backend, 1, 2, 2, 33, 65, 32, 32, scale=100.0, causal=True, dtype=torch.float64)


@needs_native
@pytest.mark.parametrize("mode", ["fused", "split"])
@pytest.mark.parametrize("case", ["gqa_causal", "window_mask_softcap", "dropout"])
def test_cpu_backward_modes(monkeypatch, mode, case):
    """Both ways the CPU backward splits its work (chosen by the thread count; forced here)."""
    monkeypatch.setenv("FASTATTN_ATTN_BWD", mode)
    if case == "gqa_causal":
        run_case("cpu", 1, 4, 2, 150, 260, 40, 24, causal=True, align="bottom_right")
    elif case == "window_mask_softcap":
        run_case("cpu", 2, 2, 1, 97, 203, 32, 32, window=(50, 7), softcap=3.0, mask=torch.randn(2, 1, 1, 203))
    else:
        run_case("cpu", 1, 2, 2, 70, 150, 32, 32, dropout_p=0.25, seed=11, causal=True)


@needs_native
@pytest.mark.parametrize("gemm", ["default", "blas"])
def test_cpu_forward_tile_products(monkeypatch, gemm):
    """The forward's fp32 tile products: the AVX-512 micro-kernel (default on AVX-512 CPUs) and BLAS
    (elsewhere; forced here), on edges that are not multiples of its 6 x 64 blocks."""
    if gemm == "blas":
        monkeypatch.setenv("FASTATTN_ATTN_GEMM", "blas")
    run_case("cpu", 1, 2, 2, 301, 517, 40, 72)
    run_case("cpu", 2, 3, 1, 77, 1031, 96, 130, causal=True, align="bottom_right")
    run_case("cpu", 1, 2, 2, 70, 150, 16, 8, dropout_p=0.25, seed=11, softcap=2.0, mask=torch.randn(70, 150))


@needs_native
@pytest.mark.parametrize("L", [1, 5, 16])
def test_cpu_split_kv_decoding(L):
    """Few query rows: the forward splits the keys across tasks and reduces the partial results."""
    run_case("cpu", 1, 1, 1, L, 1000, 64, 64)
    run_case("cpu", 2, 4, 1, L, 777, 32, 32, mask=torch.randn(1, 1, L, 777), window=(500, -1), align="bottom_right")
    run_case("cpu", 1, 1, 1, L, 2000, 16, 16, dropout_p=0.3, seed=5)


@needs_native
@pytest.mark.parametrize("gemm", ["default", "blas"])
@pytest.mark.parametrize("L", [1, 2, 3, 4])
def test_cpu_decode_streaming_loops(monkeypatch, gemm, L):
    """<= 4 query rows: the streaming Q·Kᵀ / P·V loops (AVX-512 ones by default: 16 keys a step,
    64 value columns a pass) on edges: keys not a multiple of 16, head sizes not multiples of 16,
    value heads wider than one 64-column pass, strided heads, causal and a mask."""
    if gemm == "blas":
        monkeypatch.setenv("FASTATTN_ATTN_GEMM", "blas")
    run_case("cpu", 1, 2, 2, L, 15, 8, 8)
    run_case("cpu", 2, 2, 1, L, 47, 24, 130, layout="blhe")
    run_case("cpu", 1, 3, 3, L, 100, 72, 64, causal=True, align="bottom_right", mask=torch.randn(L, 100))
    run_case("cpu", 1, 1, 1, L, 4100, 64, 64, grad=False)


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_and_statistics(backend, p):
    """With q = k = 0 every probability is 1/S; with v = identity, out * (1-p) * S is the keep mask."""
    prepare(backend, 4 * 64 * 96)
    dev = device_of(backend)
    B, H, L, S = 2, 2, 64, 96
    q = torch.zeros(B, H, L, 16, device=dev)
    k = torch.zeros(B, H, S, 16, device=dev)
    v = torch.eye(S, device=dev).expand(B, H, S, S)
    out = call(backend, q, k, v, None, p, seed=1234)
    kept = out.cpu().double() * (1 - p) * S
    expected = dropout_keep_mask(1234, B, H, L, S, p)
    assert torch.equal(kept.round() == 1, expected), "dropout mask differs from dropout_keep_mask"
    torch.testing.assert_close(kept, expected.double(), atol=1e-5, rtol=1e-5)
    frac = expected.double().mean().item()
    n = expected.numel()
    assert abs(frac - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), f"kept fraction {frac} vs {1 - p}"
    other = call(backend, q, k, v, None, p, seed=1235)
    assert not torch.equal(other, out), "another seed must drop other entries"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_dropout_forward_backward_consistency(backend, dtype):
    """Same seed: forward and every gradient equal the oracle's with that seed's mask."""
    run_case(backend, 2, 2, 1, 29, 53, 32, 32, dropout_p=0.3, seed=77, dtype=dtype, mask=torch.randn(29, 53))


# ---------------------------------------------------------------------------------------------
# Drop-in: fastattn.scaled_dot_product_attention vs torch's
# ---------------------------------------------------------------------------------------------
SDPA_CASES = {
    "rank2": dict(q=(9, 16), kv=(13, 16), mask=(9, 13)),
    "rank3": dict(q=(3, 9, 16), kv=(3, 13, 16), mask=(13,)),
    "rank4_causal": dict(q=(2, 3, 17, 32), kv=(2, 3, 11, 32), causal=True),
    "rank4_bool_B11S": dict(q=(2, 3, 17, 32), kv=(2, 3, 29, 32), mask=(2, 1, 1, 29), bool=True),
    "rank4_gqa": dict(q=(2, 4, 17, 32), kv=(2, 2, 29, 32), gqa=True, scale=0.3),
    "rank5_mask": dict(q=(2, 2, 3, 9, 16), kv=(2, 2, 3, 12, 16), mask=(2, 1, 3, 9, 12)),
    "value_head_size": dict(q=(2, 2, 9, 16), kv=(2, 2, 12, 16), ev=24, causal=True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_sdpa_matches_torch(backend, case):
    c = SDPA_CASES[case]
    prepare(backend, 4000)
    dev = device_of(backend)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(c["q"], generator=g, dtype=torch.float64)
    k = torch.randn(c["kv"], generator=g, dtype=torch.float64)
    vshape = c["kv"][:-1] + (c.get("ev", c["kv"][-1]),)
    v = torch.randn(vshape, generator=g, dtype=torch.float64)
    mask = None
    if "mask" in c:
        mask = torch.rand(c["mask"], generator=g) > 0.3 if c.get("bool") else torch.randn(c["mask"], generator=g,
                                                                                          dtype=torch.float64)
        if c.get("bool"):
            mask[..., 0] = True  # keep a key per row: torch's fully-masked-row output varies by kernel
    kw = dict(attn_mask=mask, is_causal=c.get("causal", False), scale=c.get("scale"), enable_gqa=c.get("gqa", False))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*leaves, **kw)
    go = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    expected.backward(go)
    ours_in = [t.float().to(dev).requires_grad_() for t in (q, k, v)]
    kw_dev = dict(kw, attn_mask=None if mask is None else (mask if mask.dtype == torch.bool else mask.float()).to(dev))
    try:
        out = fastattn.scaled_dot_product_attention(*ours_in, **kw_dev, backend=backend)
    except NotImplementedError as e:
        if backend in ("triton", "cuda"):
            pytest.skip(str(e))
        raise
    assert out.shape == expected.shape
    assert_close_fp("out", out, expected.detach(), torch.float32)
    out.backward(go.float().to(dev))
    for name, ours, leaf in zip(("dq", "dk", "dv"), ours_in, leaves):
        assert_close_fp(name, ours.grad, leaf.grad, torch.float32)


def test_sdpa_default_backend_on_cpu_is_native():
    if not NATIVE:
        pytest.skip("extension not built")
    q = torch.randn(2, 3, 10, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto must pick the cpu kernel without falling back
        out = fastattn.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, is_causal=True), atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# return_lse, determinism
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_return_lse(backend):
    prepare(backend, 2000)
    dev = device_of(backend)
    B, H, L, S, E = 2, 2, 13, 29, 32
    q, k, v = (torch.randn(B, H, n, E, device=dev) for n in (L, S, S))
    mask = torch.rand(L, S, device=dev) > 0.3
    mask[4] = False
    out, lse = call(backend, q, k, v, mask, return_lse=True)
    assert lse.shape == (B, H, L) and lse.dtype == torch.float32 and not lse.requires_grad
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(E)
    scores = scores.masked_fill(~mask, float("-inf"))
    expected = torch.logsumexp(scores, dim=-1)  # -inf for the empty row
    assert torch.isneginf(lse[:, :, 4]).all()
    torch.testing.assert_close(lse.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_double_backward_is_refused_not_wrong(backend):
    prepare(backend, 500)
    dev = device_of(backend)
    q, k, v = (torch.randn(1, 2, 9, 16, device=dev, requires_grad=True) for _ in range(3))
    out = fastattn.scaled_dot_product_attention(q, k, v, backend=backend)
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=False)
    assert gq.shape == q.shape  # first-order gradients work
    out = fastattn.scaled_dot_product_attention(q, k, v, backend=backend)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(out.square().sum(), q, create_graph=True)


@needs_native
def test_cpu_deterministic():
    q, k, v = (torch.randn(2, 4, n, 32, requires_grad=True) for n in (150, 300, 300))
    results = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        out = fastattn.attention(q, k, v, dropout_p=0.2, seed=3, causal=True, backend="cpu")
        out.backward(torch.ones_like(out))
        results.append([out.detach().clone(), q.grad.clone(), k.grad.clone(), v.grad.clone()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# opcheck, gradcheck (the CPU kernel)
# ---------------------------------------------------------------------------------------------
def _op_args(dtype=torch.float32, bias=False, dropout=0.0, softcap=0.0, window=(-1, -1), gqa=False):
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, L, S, E, Ev = 2, 4, 2 if gqa else 4, 9, 13, 16, 8
    q = torch.randn(B, Hq, L, E, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, S, E, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, S, Ev, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(1, 1, L, S, generator=g, dtype=dtype).expand(B, Hq, L, S) if bias else None
    return [q, k, v, b, dropout, 0.25, window[0], window[1], 0, softcap, 42]


OPCHECK_COMBOS = {
    "plain": dict(),
    "bias_dropout": dict(bias=True, dropout=0.2),
    "causal_softcap_gqa": dict(window=(-1, 0), softcap=4.0, gqa=True),
}


@needs_native
@pytest.mark.parametrize("combo", list(OPCHECK_COMBOS))
def test_opcheck(combo):
    args = _op_args(**OPCHECK_COMBOS[combo])
    with warnings.catch_warnings():
        # opcheck also differentiates attention_bwd itself, which has no autograd (no double backward)
        warnings.filterwarnings("ignore", message=".*attention_bwd: an autograd kernel was not registered")
        torch.library.opcheck(torch.ops.fastattn.attention_fwd.default, args)
        out, lse = torch.ops.fastattn.attention_fwd(*args)
        grad_out = torch.randn_like(out)
        bwd_args = [grad_out, args[0].detach(), args[1].detach(), args[2].detach(), out.detach(), lse] + args[3:]
        torch.library.opcheck(torch.ops.fastattn.attention_bwd.default, bwd_args)


@needs_native
@pytest.mark.parametrize("case", ["plain", "mask_causal", "gqa_softcap", "window_dropout"])
def test_gradcheck_cpu(case):
    g = torch.Generator().manual_seed(0)
    Hq, Hkv = (4, 2) if case == "gqa_softcap" else (2, 2)
    L, S, E = 5, 7, 4
    q = torch.randn(1, Hq, L, E, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, Hkv, S, E, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, Hkv, S, 3, generator=g, dtype=torch.float64, requires_grad=True)
    kw = dict(backend="cpu", enable_gqa=Hq != Hkv)
    if case == "mask_causal":
        kw.update(attn_mask=torch.randn(L, S, generator=g, dtype=torch.float64), causal=True)
    elif case == "gqa_softcap":
        kw.update(softcap=1.5, scale=1.0)
    elif case == "window_dropout":
        kw.update(window_size=(2, 1), dropout_p=0.3, seed=9, causal_align="bottom_right")
    assert torch.autograd.gradcheck(lambda a, b, c: fastattn.attention(a, b, c, **kw), (q, k, v))


# ---------------------------------------------------------------------------------------------
# Backend choice, bad inputs
# ---------------------------------------------------------------------------------------------
def test_explicit_backend_that_cannot_run_raises():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match="cuda backend takes CUDA tensors"):
        fastattn.scaled_dot_product_attention(q, q, q, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        fastattn.scaled_dot_product_attention(q, q, q, backend="tpu")


@needs_native
def test_explicit_cpu_with_differentiable_mask_raises():
    q = torch.randn(1, 2, 4, 8)
    mask = torch.randn(4, 4, requires_grad=True)
    with pytest.raises(NotImplementedError, match="requires grad"):
        fastattn.scaled_dot_product_attention(q, q, q, mask, backend="cpu")


@needs_native
def test_auto_falls_back_with_one_warning():
    """A float mask that requires grad: auto falls back to the reference (which differentiates it)."""
    fa_backend._warned.clear()
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fastattn.scaled_dot_product_attention(q, q, q, mask, backend="auto")
        fastattn.scaled_dot_product_attention(q, q, q, mask, backend="auto")
    ours = [w for w in caught if "falling back" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "reference" in str(ours[0].message) and "requires grad" in str(ours[0].message)
    out.sum().backward()
    assert mask.grad is not None and mask.grad.abs().sum() > 0


BAD_INPUTS = {
    "rank": (lambda: (torch.randn(8), torch.randn(8), torch.randn(8)), {}, ValueError, "must have shape"),
    "head_size": (lambda: (torch.randn(2, 4, 8), torch.randn(2, 4, 16), torch.randn(2, 4, 16)), {}, ValueError,
                  "same head size"),
    "dtype_mix": (lambda: (torch.randn(2, 4, 8), torch.randn(2, 4, 8, dtype=torch.float64), torch.randn(2, 4, 8)), {},
                  TypeError, "one dtype"),
    "int_dtype": (lambda: (torch.ones(2, 4, 8, dtype=torch.int32),) * 3, {}, TypeError, "float16, bfloat16"),
    "mask_shape": (lambda: (torch.randn(2, 4, 8),) * 3, dict(attn_mask=torch.ones(5, 4, dtype=torch.bool)), ValueError,
                   "does not broadcast"),
    "mask_dtype": (lambda: (torch.randn(2, 4, 8),) * 3, dict(attn_mask=torch.ones(4, 4, dtype=torch.int64)), TypeError,
                   "attn_mask must be bool or floating"),
    "enable_gqa_missing": (lambda: (torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)), {},
                           ValueError, "enable_gqa=True"),
    "gqa_not_divisible": (lambda: (torch.randn(1, 3, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)),
                          dict(enable_gqa=True), ValueError, "divisible"),
    "dropout_high": (lambda: (torch.randn(2, 4, 8),) * 3, dict(dropout_p=1.0), ValueError, "dropout_p must be in"),
    "dropout_negative": (lambda: (torch.randn(2, 4, 8),) * 3, dict(dropout_p=-0.1), ValueError, "dropout_p must be in"),
    "causal_with_mask": (lambda: (torch.randn(2, 4, 8),) * 3, dict(attn_mask=torch.ones(4, 4, dtype=torch.bool),
                                                                   is_causal=True), ValueError, "either attn_mask"),
    "kv_length": (lambda: (torch.randn(2, 4, 8), torch.randn(2, 5, 8), torch.randn(2, 6, 8)), {}, ValueError,
                  "same sequence length"),
    "batch_dims": (lambda: (torch.randn(2, 3, 4, 8), torch.randn(3, 3, 4, 8), torch.randn(3, 3, 4, 8)), {}, ValueError,
                   "same batch dims"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(case):
    make, kw, exc, match = BAD_INPUTS[case]
    with pytest.raises(exc, match=match):
        fastattn.scaled_dot_product_attention(*make(), **kw)


def test_bad_attention_options():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="causal_align"):
        fastattn.attention(q, q, q, causal=True, causal_align="middle")
    with pytest.raises(ValueError, match="window_size"):
        fastattn.attention(q, q, q, window_size=(-2, 0))
    with pytest.raises(ValueError, match="softcap"):
        fastattn.attention(q, q, q, softcap=-1.0)


@pytest.mark.cuda
def test_device_mix():
    with pytest.raises(ValueError, match="one device"):
        fastattn.scaled_dot_product_attention(torch.randn(2, 4, 8, device="cuda"), torch.randn(2, 4, 8),
                                              torch.randn(2, 4, 8))


@needs_native
def test_native_op_checks():
    """The C++ kernel checks its arguments too (a second line of defence), naming them."""
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="query must be 4-D"):
        torch.ops.fastattn.attention_fwd(q[0], q, q, None, 0.0, 1.0, -1, -1, 0, 0.0, 0)
    with pytest.raises(RuntimeError, match="key head size"):
        torch.ops.fastattn.attention_fwd(q, torch.randn(1, 2, 4, 4), q, None, 0.0, 1.0, -1, -1, 0, 0.0, 0)
    with pytest.raises(RuntimeError, match="query heads"):
        torch.ops.fastattn.attention_fwd(torch.randn(1, 3, 4, 8), q, q, None, 0.0, 1.0, -1, -1, 0, 0.0, 0)
    with pytest.raises(RuntimeError, match="attn_bias must be"):
        torch.ops.fastattn.attention_fwd(q, q, q, torch.zeros(4, 4), 0.0, 1.0, -1, -1, 0, 0.0, 0)
    with pytest.raises(RuntimeError, match="dropout_p"):
        torch.ops.fastattn.attention_fwd(q, q, q, None, 1.5, 1.0, -1, -1, 0, 0.0, 0)
    out, lse = torch.ops.fastattn.attention_fwd(q, q, q, None, 0.0, 1.0, -1, -1, 0, 0.0, 0)
    with pytest.raises(RuntimeError, match="lse must be"):
        torch.ops.fastattn.attention_bwd(out, q, q, q, out, lse.double(), None, 0.0, 1.0, -1, -1, 0, 0.0, 0)


# attention_varlen: tests/test_attention_varlen.py


# ---------------------------------------------------------------------------------------------
# Dropout with a drawn seed: torch.manual_seed reproducibility, torch.compile(fullgraph=True)
# ---------------------------------------------------------------------------------------------
def _drawn_seed_after(state_seed):
    """The seed attention draws right after torch.manual_seed(state_seed)."""
    torch.manual_seed(state_seed)
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))


def _dropout_inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 17, 16, generator=g, requires_grad=True) for _ in range(3)]


@needs_native
def test_drawn_seed_eager_matches_explicit_seed():
    """seed=None draws from torch's generator: forward and gradients equal those of that seed given explicitly."""
    q, k, v = _dropout_inputs()
    seed = _drawn_seed_after(7)
    torch.manual_seed(7)
    out = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3, backend="cpu")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref = fastattn.attention(q, k, v, dropout_p=0.3, seed=seed, backend="cpu")
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    assert torch.equal(out, ref)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)
    torch.manual_seed(8)
    assert not torch.equal(fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3, backend="cpu"), out)


@needs_native
def test_drawn_seed_reference_backend_takes_the_seed_tensor():
    """The reference backend hashes the drawn seed tensor itself: the same mask as the kernel's."""
    q, k, v = _dropout_inputs()
    seed = _drawn_seed_after(3)
    torch.manual_seed(3)
    ref = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5, backend="reference")
    ours = fastattn.attention(q, k, v, dropout_p=0.5, seed=seed, backend="cpu")
    torch.testing.assert_close(ref, ours, atol=1e-5, rtol=1e-4)


@needs_native
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_dropout(compiler):
    """The dropout seed draw compiles without a graph break (fullgraph=True), forward and backward."""
    torch._dynamo.reset()
    q, k, v = _dropout_inputs()
    sdpa = torch.compile(lambda a, b, c: fastattn.scaled_dot_product_attention(a, b, c, dropout_p=0.1, backend="cpu"),
                         fullgraph=True, backend=compiler)
    torch.manual_seed(1)
    out = sdpa(q, k, v)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert out.shape == q.shape and not torch.isnan(out).any() and not torch.isnan(dq).any()
    torch.manual_seed(1)
    again = sdpa(q, k, v)
    torch.manual_seed(2)
    other = sdpa(q, k, v)
    assert torch.equal(out, again), "torch.manual_seed must make compiled dropout reproducible"
    assert not torch.equal(out, other), "another generator state must drop other entries"
    if compiler == "aot_eager":  # the draw is torch's own randint: the same seed as eager
        seed = _drawn_seed_after(1)
        ref = fastattn.attention(q, k, v, dropout_p=0.1, seed=seed, backend="cpu")
        assert torch.equal(out, ref)
        for ours, theirs in zip((dq, dk, dv), torch.autograd.grad(ref.sum(), (q, k, v))):
            torch.testing.assert_close(ours, theirs)
    # Whatever seed was drawn (inductor draws it with its own generator): with v = identity the output is
    # the dropped probabilities, so out != 0 is the mask used; forward and gradients must be the oracle's
    # with that mask.
    S = 17
    v_eye = torch.eye(S).expand(2, 3, S, S).clone().requires_grad_()
    out = sdpa(q, k, v_eye)
    keep = out.detach() != 0
    assert 0.8 < keep.double().mean().item() < 0.97
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v_eye), go)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v_eye)]
    ref, _ = attention_reference(*leaves, dropout_p=0.1, scale=0.25, keep=keep)
    ref_grads = torch.autograd.grad(ref, leaves, go.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours.double(), theirs, atol=1e-5, rtol=1e-4)


@needs_native
def test_drawn_seed_ops_opcheck():
    q, k, v = (t.detach().requires_grad_() for t in _dropout_inputs())
    seed = torch.tensor(5, dtype=torch.int64)
    args = [q, k, v, None, 0.2, 0.25, -1, 0, 0, 0.0, seed, "cpu"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*an autograd kernel was not registered")
        torch.library.opcheck(torch.ops.fastattn.attention_fwd_drawn_seed.default, args)
        out, lse = torch.ops.fastattn.attention_fwd_drawn_seed(*args)
        bwd = [torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None, 0.2, 0.25, -1, 0, 0,
               0.0, seed, "cpu"]
        torch.library.opcheck(torch.ops.fastattn.attention_bwd_drawn_seed.default, bwd)


# ---------------------------------------------------------------------------------------------
# Masks of rank >= 5: the bias stays a stride-0 view where the mask broadcasts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_shape,materialised", [
    ((1, 1, 1, 1, 12), 12),            # broadcast over every batch dim: a view of the mask
    ((2, 3, 1, 1, 12), 2 * 3 * 12),    # batch dims merge into one stride: a view
    ((2, 1, 1, 9, 12), 2 * 3 * 9 * 12),  # varies along batch dim 0 only: batch dims materialised, heads not
    ((2, 1, 4, 1, 1), 2 * 3 * 4),
])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_rank5_mask_bias_is_broadcast_view(mask_shape, materialised, kind):
    from fastattn.ops.attention import _mask_to_bias
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, 9, 16, generator=g)
    k = torch.randn(2, 3, 4, 12, 16, generator=g)
    mask = torch.rand(mask_shape, generator=g) > 0.3 if kind == "bool" else torch.randn(mask_shape, generator=g)
    target = tuple(q.shape[:-1]) + (12,)
    bias = _mask_to_bias(mask, q.reshape(6, 4, 9, 16), target)
    assert bias.shape == (6, 4, 9, 12)
    assert bias.untyped_storage().nbytes() <= materialised * bias.element_size(), "bias materialised beyond the mask"
    expected = bias_of(mask, target, torch.float32).reshape(6, 4, 9, 12)
    assert torch.equal(bias, expected)
    # and attention with it matches torch's
    kw = dict(attn_mask=mask)
    torch.testing.assert_close(fastattn.scaled_dot_product_attention(q, k, k, **kw, backend="reference"),
                               F.scaled_dot_product_attention(q, k, k, **kw), atol=2e-5, rtol=1e-4)
    if NATIVE:
        torch.testing.assert_close(fastattn.scaled_dot_product_attention(q, k, k, **kw, backend="cpu"),
                                   F.scaled_dot_product_attention(q, k, k, **kw), atol=2e-5, rtol=1e-4)
