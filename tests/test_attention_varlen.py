"""fastattn.attention_varlen (packed variable-length batches): the CPU kernel and the reference backend
against the float64 plain-PyTorch oracle (attention_varlen_reference), forward and all three gradients;
dropout's hash; equality with the dense op; opcheck, gradcheck; bad inputs.

The Triton and CUDA varlen kernels are tested with the GPU tests (tests/test_attention_triton.py,
tests/test_attention_cuda.py).
"""
import itertools
import math
import warnings

import pytest
import torch

import fastattn
from fastattn.ops.attention import attention_reference, attention_varlen_reference, varlen_dropout_keep_mask

NATIVE = hasattr(torch.ops.fastattn, "attention_varlen_fwd") and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fastattn::attention_varlen_fwd", "CPU")
needs_native = pytest.mark.skipif(not NATIVE, reason="the fastattn extension (CPU kernel) is not built")
BACKENDS = [pytest.param("cpu", marks=needs_native), "reference"]


def cu_of(lens):
    return torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)


def assert_close_fp(name, actual, expected, dtype):
    assert not torch.isnan(actual).any(), f"{name}: NaN"
    mag = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    atol, rtol = (1e-9 * mag, 1e-7) if dtype == torch.float64 else (3e-5 * mag, 1e-4)
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def assert_close_lowp(name, actual, expected, lowp, dtype):
    """flash-attn's rule: error at most 2x that of plain PyTorch in the same dtype, plus a little slack."""
    assert not torch.isnan(actual).any(), f"{name}: NaN"
    slack = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype] * max(1.0, expected.abs().max().item())
    err = (actual.double() - expected).abs().max().item()
    err_lowp = (lowp.double() - expected).abs().max().item()
    assert err <= 2 * err_lowp + slack, f"{name}: error {err:.3g} > 2 x plain PyTorch's {err_lowp:.3g} + {slack:.2g}"


def run_varlen(backend, lens_q, lens_k, Hq=2, Hkv=2, E=16, Ev=16, dtype=torch.float32, causal=False,
               align="bottom_right", window=(-1, -1), softcap=0.0, scale=None, dropout_p=0.0, seed=0, gen_seed=0):
    """One packed batch through ``backend``, held to the float64 oracle (forward, dq, dk, dv)."""
    g = torch.Generator().manual_seed(gen_seed)
    Tq, Tk = sum(lens_q), sum(lens_k)
    q64 = torch.randn(Tq, Hq, E, generator=g, dtype=torch.float64)
    k64 = torch.randn(Tk, Hkv, E, generator=g, dtype=torch.float64)
    v64 = torch.randn(Tk, Hkv, Ev, generator=g, dtype=torch.float64)
    go64 = torch.randn(Tq, Hq, Ev, generator=g, dtype=torch.float64)
    cu_q, cu_k = cu_of(lens_q), cu_of(lens_k)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q64, k64, v64))
    out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), dropout_p, causal, scale,
                                         window_size=window, causal_align=align, softcap=softcap, seed=seed,
                                         return_lse=True, backend=backend)
    assert out.shape == (Tq, Hq, Ev) and out.dtype == dtype
    assert lse.shape == (Tq, Hq) and not lse.requires_grad

    wl, wr = window
    if causal:
        wr = 0
    args = (dropout_p, scale, wl, wr, align == "bottom_right", softcap, seed)
    leaves = [t.detach().clone().requires_grad_() for t in (q64, k64, v64)]
    ref, ref_lse = attention_varlen_reference(*leaves, cu_q, cu_k, *args, compute_dtype=torch.float64)
    lowp = dtype in (torch.float16, torch.bfloat16)
    if lowp:
        low_leaves = [t.to(dtype).requires_grad_() for t in (q64, k64, v64)]
        low, _ = attention_varlen_reference(*low_leaves, cu_q, cu_k, *args, compute_dtype=dtype)
        assert_close_lowp("out", out, ref, low, dtype)
    else:
        assert_close_fp("out", out, ref, dtype)
    # lse: (total_q, Hq), -inf where a row sees nothing (the oracle's +inf)
    ref_lse = ref_lse.t()
    empty = torch.isposinf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty], atol=1e-2 if lowp else 1e-5, rtol=1e-4)

    ref.backward(go64)
    out.backward(go64.to(dtype))
    if lowp:
        low.backward(go64.to(dtype))
    for i, (name, ours) in enumerate((("dq", q), ("dk", k), ("dv", v))):
        assert ours.grad is not None and ours.grad.shape == leaves[i].shape, name
        if lowp:
            assert_close_lowp(name, ours.grad, leaves[i].grad, low_leaves[i].grad, dtype)
        else:
            assert_close_fp(name, ours.grad, leaves[i].grad, dtype)
    return out, (q.grad, k.grad, v.grad)


# ---------------------------------------------------------------------------------------------
# Against the oracle
# ---------------------------------------------------------------------------------------------
UNEVEN_Q = [3, 1, 0, 9, 37, 1, 2]
UNEVEN_K = [5, 4, 2, 9, 70, 0, 1]  # Lq != Lk; an empty query sequence; a query sequence without keys

CASES = {
    "uneven": dict(lens_q=UNEVEN_Q, lens_k=UNEVEN_K),
    "same_lengths": dict(lens_q=[17, 40, 1], lens_k=[17, 40, 1]),
    "long": dict(lens_q=[1000, 3, 130], lens_k=[1000, 300, 7], causal=True, E=16, Ev=8),
    "gqa": dict(lens_q=UNEVEN_Q, lens_k=UNEVEN_K, Hq=6, Hkv=2, Ev=24),
    "causal_bottom_right": dict(lens_q=[30, 13, 50, 4], lens_k=[30, 50, 13, 0], causal=True),
    "causal_top_left": dict(lens_q=[30, 13, 50, 4], lens_k=[30, 50, 13, 0], causal=True, align="top_left"),
    "window": dict(lens_q=[45, 2, 77], lens_k=[77, 9, 45], window=(8, 3)),
    "window_causal_gqa": dict(lens_q=[45, 2, 77], lens_k=[77, 9, 45], window=(16, 0), causal=True, Hq=4, Hkv=1),
    "softcap": dict(lens_q=[31, 5, 0, 20], lens_k=[47, 5, 3, 20], softcap=2.0, scale=1.0, causal=True),
    "dropout": dict(lens_q=[29, 1, 60, 0, 7], lens_k=[53, 8, 60, 4, 0], dropout_p=0.3, seed=77, Hq=4, Hkv=2),
    "dropout_causal_window": dict(lens_q=[40, 33], lens_k=[70, 20], dropout_p=0.2, seed=5, causal=True,
                                  window=(10, -1), align="top_left"),
    "head_sizes": dict(lens_q=[9, 20], lens_k=[12, 33], E=72, Ev=40),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_varlen_vs_oracle(backend, case):
    if backend == "reference" and case == "long":
        pytest.skip("the reference is the oracle's own code; the long case only exercises the kernel")
    run_varlen(backend, **CASES[case])


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_dtypes(dtype, causal):
    run_varlen("cpu", [37, 1, 0, 70], [70, 5, 9, 37], Hq=4, Hkv=2, E=64, Ev=64, dtype=dtype, causal=causal)


@needs_native
@pytest.mark.parametrize("mode", ["fused", "split"])
def test_varlen_cpu_backward_modes(monkeypatch, mode):
    """Both ways the CPU backward splits its work (chosen from the task costs; forced here)."""
    monkeypatch.setenv("FASTATTN_ATTN_BWD", mode)
    run_varlen("cpu", [300, 1, 0, 65, 129], [260, 3, 5, 0, 400], Hq=4, Hkv=2, E=32, Ev=24, causal=True)
    run_varlen("cpu", [70, 150], [150, 70], dropout_p=0.25, seed=11, window=(50, 7), softcap=3.0)


@needs_native
@pytest.mark.parametrize("L", [1, 3, 16])
def test_varlen_cpu_decoding(L):
    """Few query rows per sequence: the forward splits the keys across tasks and reduces the slices."""
    run_varlen("cpu", [L, L, 0, L], [1000, 37, 5, 0], Hq=4, Hkv=1, E=32, Ev=32)
    run_varlen("cpu", [L, L], [700, 2000], dropout_p=0.3, seed=5, window=(500, -1))


@needs_native
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_equals_dense_op(causal):
    """Equal lengths: the packed op gives the dense op's output, lse and gradients."""
    g = torch.Generator().manual_seed(3)
    B, H, Hkv, L, E = 3, 4, 2, 50, 32
    q = torch.randn(B, H, L, E, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, L, E, generator=g, requires_grad=True)
    v = torch.randn(B, Hkv, L, E, generator=g, requires_grad=True)
    out, lse = fastattn.attention(q, k, v, causal=causal, enable_gqa=True, return_lse=True, backend="cpu")
    out.backward(torch.ones_like(out))

    packed = [t.detach().transpose(1, 2).reshape(B * L, t.shape[1], E).requires_grad_() for t in (q, k, v)]
    cu = cu_of([L] * B)
    pout, plse = fastattn.attention_varlen(*packed, cu, cu, L, L, causal=causal, return_lse=True, backend="cpu")
    pout.backward(torch.ones_like(pout))
    unpack = lambda t: t.reshape(B, L, *t.shape[1:]).transpose(1, 2)  # noqa: E731
    torch.testing.assert_close(unpack(pout), out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(plse.reshape(B, L, H).transpose(1, 2), lse, atol=1e-6, rtol=1e-5)
    for ours, dense in zip(packed, (q, k, v)):
        torch.testing.assert_close(unpack(ours.grad), dense.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_strided_qkv_slices(backend):
    """q, k, v as slices of one packed (total, 3, H, E) projection: strided rows, no copies needed."""
    g = torch.Generator().manual_seed(4)
    lens = [12, 0, 40, 3]
    qkv = torch.randn(sum(lens), 3, 4, 32, generator=g, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.unbind(1)
    cu = cu_of(lens)
    out = fastattn.attention_varlen(q, k, v, cu, cu, causal=True, backend=backend)
    (grad,) = torch.autograd.grad(out.sum(), qkv)
    leaf = qkv.detach().clone().requires_grad_()
    ref, _ = attention_varlen_reference(*leaf.unbind(1), cu, cu, window_right=0)
    (ref_grad,) = torch.autograd.grad(ref.sum(), leaf)
    assert_close_fp("out", out, ref, torch.float64)
    assert_close_fp("dqkv", grad, ref_grad, torch.float64)


# ---------------------------------------------------------------------------------------------
# Empty sequences, dropout mask, determinism
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_empty_sequences(backend):
    """A query sequence without keys: output 0, lse -inf, zero gradients; empty batches work."""
    q = torch.randn(7, 2, 8, requires_grad=True)
    k = torch.randn(4, 2, 8, requires_grad=True)
    v = torch.randn(4, 2, 8, requires_grad=True)
    cu_q, cu_k = cu_of([3, 0, 4]), cu_of([0, 4, 0])  # rows 0:3 and 3:7 see no key at all
    out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, backend=backend)
    out.sum().backward()
    assert (out == 0).all() and torch.isneginf(lse).all()
    assert (q.grad == 0).all() and (k.grad == 0).all() and (v.grad == 0).all()
    # no tokens at all
    q0, k0 = torch.randn(0, 2, 8, requires_grad=True), torch.randn(0, 2, 8, requires_grad=True)
    out = fastattn.attention_varlen(q0, k0, k0, cu_of([0, 0]), cu_of([0, 0]), backend=backend)
    assert out.shape == (0, 2, 8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_varlen_dropout_mask(backend, p):
    """q = k = 0: every probability of sequence b is 1/S_b; with v = identity, out * (1-p) * S_b is
    the kept mask, which must be the contract's hash of row h*Tq + cu_seqlens_q[b] + i, column j."""
    lens_q, lens_k = [20, 0, 33, 7], [40, 6, 25, 64]
    Tq, Tk, H = sum(lens_q), sum(lens_k), 2
    q = torch.zeros(Tq, H, 8)
    k = torch.zeros(Tk, H, 8)
    cu_q, cu_k = cu_of(lens_q), cu_of(lens_k)
    v = torch.zeros(Tk, H, max(lens_k))
    for b in range(len(lens_k)):  # key j of each sequence carries the unit vector e_j
        v[int(cu_k[b]):int(cu_k[b + 1]), :, :lens_k[b]] = torch.eye(lens_k[b])[:, None, :]
    out = fastattn.attention_varlen(q, k, v, cu_q, cu_k, dropout_p=p, seed=1234, backend=backend)
    kept_all = []
    for b in range(len(lens_q)):
        L, S, q0 = lens_q[b], lens_k[b], int(cu_q[b])
        kept = out[q0:q0 + L, :, :S].transpose(0, 1)[None].double() * (1 - p) * S
        expected = varlen_dropout_keep_mask(1234, H, Tq, q0, L, S, p)
        assert torch.equal(kept.round() == 1, expected), f"sequence {b}: mask differs from the contract's hash"
        torch.testing.assert_close(kept, expected.double(), atol=1e-5, rtol=1e-5)
        kept_all.append(expected.flatten())
    frac = torch.cat(kept_all).double().mean().item()
    n = sum(x.numel() for x in kept_all)
    assert abs(frac - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), f"kept fraction {frac} vs {1 - p}"
    other = fastattn.attention_varlen(q, k, v, cu_q, cu_k, dropout_p=p, seed=1235, backend=backend)
    assert not torch.equal(other, out), "another seed must drop other entries"


@needs_native
def test_varlen_deterministic():
    lens = [150, 3, 300, 64]
    q, k, v = (torch.randn(sum(lens), 4, 32, requires_grad=True) for _ in range(3))
    cu = cu_of(lens)
    results = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        out = fastattn.attention_varlen(q, k, v, cu, cu, dropout_p=0.2, seed=3, causal=True, backend="cpu")
        out.backward(torch.ones_like(out))
        results.append([out.detach().clone(), q.grad.clone(), k.grad.clone(), v.grad.clone()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_native
def test_varlen_auto_picks_cpu_kernel_and_draws_seed():
    q = torch.randn(10, 2, 16)
    cu = cu_of([4, 6])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto must pick the cpu kernel without falling back
        out = fastattn.attention_varlen(q, q, q, cu, cu)
    torch.testing.assert_close(out, fastattn.attention_varlen(q, q, q, cu, cu, backend="reference"), atol=1e-6,
                               rtol=1e-5)
    torch.manual_seed(0)
    a = fastattn.attention_varlen(q, q, q, cu, cu, dropout_p=0.5)
    torch.manual_seed(0)
    b = fastattn.attention_varlen(q, q, q, cu, cu, dropout_p=0.5)
    assert torch.equal(a, b), "the drawn seed must follow torch.manual_seed"


def test_varlen_triton_without_kernel_says_why():
    tri = pytest.importorskip("fastattn.triton.attention")
    if hasattr(tri, "triton_attention_varlen_fwd"):
        pytest.skip("this build's Triton attention has a varlen kernel (tested with the Triton tests)")
    q = torch.randn(6, 2, 8)
    with pytest.raises(NotImplementedError, match="no varlen kernel"):
        fastattn.attention_varlen(q, q, q, cu_of([6]), cu_of([6]), backend="triton")


# ---------------------------------------------------------------------------------------------
# opcheck, gradcheck (the CPU kernel)
# ---------------------------------------------------------------------------------------------
def _op_args(dtype=torch.float32, dropout=0.0, softcap=0.0, window=(-1, -1), gqa=False, bottom_right=True):
    g = torch.Generator().manual_seed(0)
    lens_q, lens_k = [5, 0, 9, 1], [7, 3, 4, 0]
    Hq, Hkv = (4, 2) if gqa else (4, 4)
    q = torch.randn(sum(lens_q), Hq, 16, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lens_k), Hkv, 16, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lens_k), Hkv, 8, generator=g, dtype=dtype, requires_grad=True)
    return [q, k, v, cu_of(lens_q), cu_of(lens_k), max(lens_q), max(lens_k), dropout, 0.25, window[0], window[1],
            bottom_right, softcap, 42]


OPCHECK_COMBOS = {
    "plain": dict(),
    "dropout_gqa": dict(dropout=0.2, gqa=True),
    "causal_softcap_top_left": dict(window=(-1, 0), softcap=4.0, bottom_right=False),
}


@needs_native
@pytest.mark.parametrize("combo", list(OPCHECK_COMBOS))
def test_varlen_opcheck(combo):
    args = _op_args(**OPCHECK_COMBOS[combo])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*attention_varlen_bwd: an autograd kernel was not registered")
        torch.library.opcheck(torch.ops.fastattn.attention_varlen_fwd.default, args)
        out, lse = torch.ops.fastattn.attention_varlen_fwd(*args)
        bwd_args = [torch.randn_like(out), *(t.detach() for t in args[:3]), out.detach(), lse] + args[3:]
        torch.library.opcheck(torch.ops.fastattn.attention_varlen_bwd.default, bwd_args)


@needs_native
@pytest.mark.parametrize("case", ["plain", "causal_gqa_softcap", "window_dropout"])
def test_varlen_gradcheck_cpu(case):
    g = torch.Generator().manual_seed(0)
    Hq, Hkv = (4, 2) if case == "causal_gqa_softcap" else (2, 2)
    lens_q, lens_k = [3, 0, 5, 2], [4, 2, 6, 0]
    q = torch.randn(sum(lens_q), Hq, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(lens_k), Hkv, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(lens_k), Hkv, 3, generator=g, dtype=torch.float64, requires_grad=True)
    kw = dict(backend="cpu")
    if case == "causal_gqa_softcap":
        kw.update(causal=True, softcap=1.5, scale=1.0)
    elif case == "window_dropout":
        kw.update(window_size=(2, 1), dropout_p=0.3, seed=9, causal_align="top_left")
    cu_q, cu_k = cu_of(lens_q), cu_of(lens_k)
    assert torch.autograd.gradcheck(lambda a, b, c: fastattn.attention_varlen(a, b, c, cu_q, cu_k, **kw), (q, k, v))


@needs_native
def test_varlen_double_backward_refused():
    q = torch.randn(6, 2, 8, requires_grad=True)
    out = fastattn.attention_varlen(q, q, q, cu_of([2, 4]), cu_of([2, 4]), backend="cpu")
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(out.square().sum(), q, create_graph=True)


# ---------------------------------------------------------------------------------------------
# Bad inputs: clear errors from the Python op, and the C++ kernel's own checks
# ---------------------------------------------------------------------------------------------
def _bad(**over):
    q = torch.randn(6, 4, 8)
    kw = dict(query=q, key=torch.randn(6, 2, 8), value=torch.randn(6, 2, 8), cu_seqlens_q=cu_of([2, 4]),
              cu_seqlens_k=cu_of([3, 3]))
    kw.update(over)
    return kw


BAD = {
    "cu_float": (dict(cu_seqlens_q=torch.tensor([0.0, 2.0, 6.0])), ValueError, "cu_seqlens_q must be a 1-D int32/int64"),
    "cu_2d": (dict(cu_seqlens_k=torch.tensor([[0, 3, 6]], dtype=torch.int32)), ValueError,
              "cu_seqlens_k must be a 1-D"),
    "cu_short": (dict(cu_seqlens_q=torch.tensor([6], dtype=torch.int32)), ValueError, "batch\\+1 >= 2"),
    "cu_decreasing": (dict(cu_seqlens_q=torch.tensor([0, 4, 3, 6], dtype=torch.int32),
                           cu_seqlens_k=cu_of([2, 2, 2])), ValueError, "never decrease"),
    "cu_not_from_0": (dict(cu_seqlens_q=torch.tensor([1, 2, 6], dtype=torch.int32)), ValueError, "start at 0"),
    "cu_last_not_total": (dict(cu_seqlens_k=torch.tensor([0, 3, 5], dtype=torch.int32)), ValueError,
                          "end at the packed length 6"),
    "batch_mismatch": (dict(cu_seqlens_k=cu_of([1, 2, 3])), ValueError, "same batch"),
    "max_seqlen_q_small": (dict(max_seqlen_q=3), ValueError, "4 rows > max_seqlen_q=3"),
    "max_seqlen_k_small": (dict(max_seqlen_k=2), ValueError, "max_seqlen_k=2"),
    "heads": (dict(key=torch.randn(6, 3, 8), value=torch.randn(6, 3, 8)), ValueError, "multiple of key/value heads"),
    "kv_heads_differ": (dict(value=torch.randn(6, 1, 8)), ValueError, "key and value must have the same"),
    "head_size": (dict(key=torch.randn(6, 2, 4)), ValueError, "same head size"),
    "rank": (dict(query=torch.randn(1, 6, 4, 8)), ValueError, "packed \\(total, heads, head_dim\\)"),
    "dtype_mix": (dict(value=torch.randn(6, 2, 8, dtype=torch.float64)), TypeError, "one dtype"),
    "int_dtype": (dict(query=torch.ones(6, 4, 8, dtype=torch.int32)), TypeError, "float16, bfloat16"),
    "dropout": (dict(dropout_p=1.0), ValueError, "dropout_p must be in"),
    "window": (dict(window_size=(-3, 0)), ValueError, "window_size"),
    "align": (dict(causal=True, causal_align="center"), ValueError, "causal_align"),
    "softcap": (dict(softcap=-1.0), ValueError, "softcap must be"),
    "max_seqlen_type": (dict(max_seqlen_q=4.5), TypeError, "max_seqlen_q must be an int"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_varlen_bad_inputs(case):
    over, exc, match = BAD[case]
    with pytest.raises(exc, match=match):
        fastattn.attention_varlen(**_bad(**over))


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_offsets_as_int64_or_list(backend):
    kw = _bad()
    ref = fastattn.attention_varlen(**kw, backend=backend)
    as_long = fastattn.attention_varlen(**dict(kw, cu_seqlens_q=kw["cu_seqlens_q"].long()), backend=backend)
    as_list = fastattn.attention_varlen(**dict(kw, cu_seqlens_k=[0, 3, 6]), backend=backend)
    assert torch.equal(ref, as_long) and torch.equal(ref, as_list)


@needs_native
def test_varlen_native_op_checks():
    """The C++ kernel checks its arguments too (a second line of defence), naming them."""
    q = torch.randn(6, 2, 8)
    cu = cu_of([2, 4])
    op = torch.ops.fastattn.attention_varlen_fwd

    def call(**over):
        a = dict(q=q, k=q, v=q, cu_q=cu, cu_k=cu, mq=4, mk=4)
        a.update(over)
        return op(a["q"], a["k"], a["v"], a["cu_q"], a["cu_k"], a["mq"], a["mk"], 0.0, 1.0, -1, -1, True, 0.0, 0)

    with pytest.raises(RuntimeError, match="cu_seqlens_q must be int32"):
        call(cu_q=cu.long())
    with pytest.raises(RuntimeError, match="sequence 1 has 4 rows > max_seqlen_k=3"):
        call(mk=3)  # a sequence longer than max_seqlen is refused, not read out of bounds
    with pytest.raises(RuntimeError, match="must not decrease"):
        call(cu_k=torch.tensor([0, 4, 2, 6], dtype=torch.int32), cu_q=cu_of([2, 2, 2]))
    with pytest.raises(RuntimeError, match="must end at the packed length 6"):
        call(cu_k=torch.tensor([0, 2, 5], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="must start at 0"):
        call(cu_k=torch.tensor([1, 2, 6], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="must be 1-D"):
        call(cu_k=cu[None])
    with pytest.raises(RuntimeError, match="describe one batch"):
        call(cu_k=cu_of([2, 2, 2]))
    with pytest.raises(RuntimeError, match="query must be 3-D"):
        call(q=q[None])
    with pytest.raises(RuntimeError, match="multiple of key heads"):
        call(q=torch.randn(6, 3, 8))
    out, lse = call()
    with pytest.raises(RuntimeError, match="lse must be"):
        torch.ops.fastattn.attention_varlen_bwd(out, q, q, q, out, lse.t().contiguous(), cu, cu, 4, 4, 0.0, 1.0, -1,
                                                -1, True, 0.0, 0)


def test_reference_oracle_matches_dense_reference_per_sequence():
    """The varlen oracle is the dense oracle on each sequence (no dropout), which the dense tests check."""
    g = torch.Generator().manual_seed(1)
    lens_q, lens_k = [3, 8], [6, 2]
    q = torch.randn(11, 2, 4, generator=g, dtype=torch.float64)
    k = torch.randn(8, 1, 4, generator=g, dtype=torch.float64)
    out, lse = attention_varlen_reference(q, k, k, cu_of(lens_q), cu_of(lens_k), 0.0, 0.5, -1, 0, True)
    o1, l1 = attention_reference(q[3:].transpose(0, 1)[None], k[6:].transpose(0, 1)[None].expand(1, 2, 2, 4),
                                 k[6:].transpose(0, 1)[None].expand(1, 2, 2, 4), None, 0.0, 0.5, -1, 0, 2 - 8)
    torch.testing.assert_close(out[3:], o1[0].transpose(0, 1))
    torch.testing.assert_close(lse[:, 3:], l1[0])
    assert torch.isinf(lse[:, 3:9]).all()  # bottom-right causal with L > S: the first L - S rows see nothing


@needs_native
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(compiler):
    """attention_varlen traces under torch.compile(fullgraph=True) (no host read of cu_seqlens): forward,
    lse and the three gradients equal eager's; other offsets of the same batch size reuse the graph and
    are honoured (not baked in); bad offsets are still refused by the kernel's own checks."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    Tq, Tk, max_len = 20, 24, 12
    q = torch.randn(Tq, 4, 16, generator=g, requires_grad=True)
    k = torch.randn(Tk, 2, 16, generator=g, requires_grad=True)
    v = torch.randn(Tk, 2, 8, generator=g, requires_grad=True)
    go = torch.randn(Tq, 4, 8, generator=g)

    def f(q, k, v, cu_q, cu_k):
        return fastattn.attention_varlen(q, k, v, cu_q, cu_k, max_len, max_len, causal=True, window_size=(5, -1),
                                         softcap=3.0, return_lse=True, backend="cpu")

    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    for lens_q, lens_k in (([3, 0, 12, 5], [4, 2, 12, 6]), ([7, 7, 1, 5], [1, 11, 2, 10])):
        cu_q, cu_k = cu_of(lens_q), cu_of(lens_k)
        out, lse = compiled(q, k, v, cu_q, cu_k)
        ref, ref_lse = f(q, k, v, cu_q, cu_k)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse, atol=1e-6, rtol=1e-5)
        grads = torch.autograd.grad(out, (q, k, v), go)
        ref_grads = torch.autograd.grad(ref, (q, k, v), go)
        for ours, theirs in zip(grads, ref_grads):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="rows > max_seqlen_q=12"):
        compiled(q, k, v, cu_of([2, 2, 15, 1]), cu_of([4, 2, 12, 6]))
    with pytest.raises(RuntimeError, match="must not decrease"):
        compiled(q, k, v, torch.tensor([0, 5, 3, 12, 20], dtype=torch.int32), cu_of([4, 2, 12, 6]))

    no_max = torch.compile(lambda q, k, v, c: fastattn.attention_varlen(q, k, v, c, c, backend="cpu"), fullgraph=True,
                           backend=compiler)
    with pytest.raises(Exception, match="needs max_seqlen_q as an int"):
        no_max(q, q, q, cu_of([10, 10]))
