"""Triton fused linear (fastattn/triton/linear.py) against a float64 plain-torch reference act(x @ w^T + b):
forward, pre-activation, every gradient of the backward op, autograd through the forward op, bad inputs.

Runs under TRITON_INTERPRET=1 on CPU tensors when there is no GPU (tests/conftest.py sets it before triton is
imported): small fp32 shapes. The `cuda` tests (fp16/bf16, bigger shapes, opcheck) run on a GPU only.
"""
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # also when run without conftest

triton = pytest.importorskip("triton")

from fastattn.triton import linear as tlin  # noqa: E402

pytestmark = pytest.mark.triton

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FWD = torch.ops.fastattn.triton_linear_fwd
BWD = torch.ops.fastattn.triton_linear_bwd
ACTS = {0: lambda z: z, 1: torch.relu, 2: F.gelu, 3: F.silu}

# (M, N, K): ones, odd sizes, non-multiples of the 16-wide interpreter blocks, more than one block each way.
SHAPES = [(1, 1, 1), (5, 7, 3), (17, 33, 19), (40, 16, 48), (3, 50, 2)]


def make(M, N, K, dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(DEV, dtype)
    w = (torch.randn(N, K, generator=g) / max(K, 1) ** 0.5).to(DEV, dtype)
    b = torch.randn(N, generator=g).to(DEV, dtype) if bias else None
    go = torch.randn(M, N, generator=g).to(DEV, dtype)
    return x, w, b, go


def reference(x, w, b, act, go):
    """float64 (pre, out, dx, dw, db) by autograd through plain torch."""
    x, w = x.double().requires_grad_(), w.double().requires_grad_()
    b = b.double().requires_grad_() if b is not None else None
    pre = x @ w.T + (b if b is not None else 0.0)
    out = ACTS[act](pre)
    grads = torch.autograd.grad(out, [x, w] + ([b] if b is not None else []), go.double())
    db = grads[2] if b is not None else go.double().new_zeros(0)
    return pre.detach(), out.detach(), grads[0], grads[1], db


def bwd_reference(go, x, w, saved, act):
    """float64 (dx, dw, db) from the kernel's own saved tensor: gz = go * act'(saved) (the same relu mask as
    the op, whatever rounding put near-zero pre-activations on either side)."""
    g = go.double()
    if act:
        z = saved.double().requires_grad_()
        (g,) = torch.autograd.grad(ACTS[act](z), z, g)
    return g @ w.double(), g.T @ x.double(), g.sum(0)


def saved_for(act, out, pre):
    return out if act == 1 else pre if act in (2, 3) else None


def close(a, ref, tol=1e-4):
    assert a.shape == ref.shape, (a.shape, ref.shape)
    if ref.numel():
        err = (a.double() - ref).abs().max().item()
        assert err <= tol * (1.0 + ref.abs().max().item()), err


@pytest.mark.parametrize("act", [0, 1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_op(shape, bias, act):
    x, w, b, go = make(*shape, bias=bias, seed=sum(shape) + act)
    pre_ref, out_ref, dx_ref, dw_ref, db_ref = reference(x, w, b, act, go)
    out, pre = FWD(x, w, b, act, True)
    close(out, out_ref)
    assert out.dtype == x.dtype and out.is_contiguous()
    if act in (2, 3):
        close(pre, pre_ref)
    else:
        assert pre.numel() == 0  # preact only for gelu / silu
    dx, dw, db = BWD(go, x, w, saved_for(act, out, pre), act, [True, True, bias])
    close(dx, dx_ref)
    close(dw, dw_ref)
    if bias:
        close(db, db_ref)
    else:
        assert db.numel() == 0


def test_float16_plumbing():
    """fp16 in, fp16 out, fp32 accumulation (the interpreter computes 16-bit tiles in fp32; its float->bf16
    cast truncates instead of rounding, so bf16 is checked on the GPU only)."""
    x, w, b, go = make(20, 33, 24, dtype=torch.float16, seed=2)
    out, pre = FWD(x, w, b, 3, True)
    assert out.dtype == pre.dtype == torch.float16
    _, out_ref, _, _, _ = reference(x, w, b, 3, go)
    close(out, out_ref, 2e-3)
    grads = BWD(go, x, w, pre, 3, [True, True, True])
    for g, ref in zip(grads, bwd_reference(go, x, w, pre, 3)):
        assert g.dtype == torch.float16
        close(g, ref, 5e-3)


def test_no_preact_unless_asked():
    x, w, b, _ = make(5, 6, 7)
    out, pre = FWD(x, w, b, 2, False)
    assert pre.numel() == 0
    close(out, reference(x, w, b, 2, torch.zeros(5, 6))[1])


@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False], [False, False, True],
                                  [False, True, True], [False, False, False]])
def test_output_mask(mask):
    x, w, b, go = make(9, 21, 18, seed=3)
    _, out_ref, dx_ref, dw_ref, db_ref = reference(x, w, b, 3, go)
    out, pre = FWD(x, w, b, 3, True)
    grads = BWD(go, x, w, pre, 3, mask)
    for g, ref, want in zip(grads, (dx_ref, dw_ref, db_ref), mask):
        if want:
            close(g, ref)
        else:
            assert g.numel() == 0


@pytest.mark.parametrize("shape", [(0, 5, 3), (4, 0, 3), (4, 5, 0), (0, 0, 0)])
@pytest.mark.parametrize("act", [0, 2])
def test_empty_dims(shape, act):
    """M, N or K may be 0: K == 0 gives act(bias) broadcast; a grad over an empty reduction is zeros."""
    M, N, K = shape
    x, w, b, go = make(M, N, K, seed=1)
    _, out_ref, dx_ref, dw_ref, db_ref = reference(x, w, b, act, go)
    out, pre = FWD(x, w, b, act, True)
    assert out.shape == (M, N)
    close(out, out_ref)
    if K == 0 and M and N:
        close(out, ACTS[act](b.double()).expand(M, N))
    dx, dw, db = BWD(go, x, w, saved_for(act, out, pre), act, [True, True, True])
    close(dx, dx_ref)
    close(dw, dw_ref)
    close(db, db_ref)


def test_strided_inputs():
    """x and w given as transposed / sliced views (the kernel reads through strides)."""
    x0, w0, b, go = make(23, 18, 29, seed=5)
    x = x0.T.contiguous().T           # column-major x
    w = torch.cat([w0, w0], 1)[:, ::2]  # non-unit column stride
    assert not x.is_contiguous() and not w.is_contiguous()
    _, out_ref, dx_ref, dw_ref, db_ref = reference(x0, w.contiguous(), b, 1, go)
    out, _ = FWD(x, w, b, 1, False)
    close(out, out_ref)
    dx, dw, db = BWD(go.T.contiguous().T, x, w, out, 1, [True, True, True])
    close(dx, dx_ref)
    close(dw, dw_ref)
    close(db, db_ref)


@pytest.mark.parametrize("act", [0, 1, 2, 3])
def test_autograd(act):
    x, w, b, go = make(13, 20, 17, seed=7 + act)
    _, out_ref, dx_ref, dw_ref, db_ref = reference(x, w, b, act, go)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    out, _ = FWD(xs, ws, bs, act, act in (2, 3))
    close(out, out_ref)
    dx, dw, db = torch.autograd.grad(out, (xs, ws, bs), go)
    close(dx, dx_ref)
    close(dw, dw_ref)
    close(db, db_ref)
    # only some inputs need a gradient: the others get None, the asked ones stay right
    ws2 = w.clone().requires_grad_()
    out2, _ = FWD(x, ws2, b, act, act in (2, 3))
    (dw2,) = torch.autograd.grad(out2, (ws2,), go)
    close(dw2, dw_ref)


def test_autograd_refusals():
    x, w, b, go = make(4, 5, 6)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    out, _ = FWD(xs, ws, b, 2, False)  # gelu without the pre-activation
    with pytest.raises(RuntimeError, match="save_preact=True"):
        torch.autograd.grad(out, (xs,), go)
    out, _ = FWD(xs, ws, b, 1, False)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(out, (xs,), go, create_graph=True)


def test_bad_inputs():
    x, w, b, go = make(4, 5, 6)
    with pytest.raises(ValueError, match="disagree on K"):
        FWD(x, w[:, :5], b, 0, False)
    with pytest.raises(ValueError, match="2-D"):
        FWD(x[None], w, b, 0, False)
    with pytest.raises(TypeError, match="weight dtype"):
        FWD(x, w.double(), b, 0, False)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        FWD(x.double(), w.double(), None, 0, False)
    with pytest.raises(ValueError, match="bias must be"):
        FWD(x, w, b[:3], 0, False)
    with pytest.raises(ValueError, match="activation must be"):
        FWD(x, w, b, 4, False)
    with pytest.raises(ValueError, match="needs saved"):
        BWD(go, x, w, None, 2, [True, True, True])
    with pytest.raises(ValueError, match="grad_out must be"):
        BWD(go[:, :4], x, w, None, 0, [True, True, True])


def test_api_triton_backend():
    """fastattn.linear(..., backend='triton'), once fastattn/ops/linear.py is there: leading dims, grads."""
    lin = pytest.importorskip("fastattn.ops.linear")
    x, w, b, go = make(2 * 7, 9, 11, seed=11)
    x3, go3 = x.reshape(2, 7, 11), go.reshape(2, 7, 9)
    _, out_ref, dx_ref, dw_ref, db_ref = reference(x, w, b, 2, go)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x3, w, b))
    out = lin.linear(xs, ws, bs, activation="gelu", backend="triton")
    assert out.shape == (2, 7, 9)
    close(out.reshape(14, 9), out_ref)
    dx, dw, db = torch.autograd.grad(out, (xs, ws, bs), go3)
    close(dx.reshape(14, 11), dx_ref)
    close(dw, dw_ref)
    close(db, db_ref)


# ---------------------------------------------------------------------------------------------
# GPU only: 16-bit (tensor cores), autotuned configs, bigger shapes, opcheck.
# ---------------------------------------------------------------------------------------------
def _tol16(x, w, b, act, ref):
    """The error of the same math done in fp32 and rounded to x's dtype, doubled, plus a floor."""
    base = ACTS[act](x.float() @ w.float().T + (b.float() if b is not None else 0)).to(x.dtype)
    return 2 * (base.double() - ref).abs().max().item() + 1e-2 * (1 + ref.abs().max().item())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1), (77, 130, 67), (512, 384, 256), (5000, 96, 40), (64, 4096, 1000)])
def test_gpu_dtypes(shape, dtype):
    for act in (0, 1, 2, 3):
        x, w, b, go = make(*shape, dtype=dtype, seed=act)
        pre_ref, out_ref, dx_ref, dw_ref, db_ref = reference(x, w, b, act, go)
        out, pre = FWD(x, w, b, act, True)
        if dtype == torch.float32:
            tol_out, tol_grad = 1e-4, 1e-4
        else:
            tol_out = _tol16(x, w, b, act, out_ref) / (1 + out_ref.abs().max().item())
            tol_grad = 3e-2
        close(out, out_ref, tol_out)
        if act in (2, 3):
            close(pre, pre_ref, tol_out)
        saved = saved_for(act, out, pre)
        dx_ref, dw_ref, db_ref = bwd_reference(go, x, w, saved, act)
        dx, dw, db = BWD(go, x, w, saved, act, [True, True, True])
        close(dx, dx_ref, tol_grad)
        close(dw, dw_ref, tol_grad)
        close(db, db_ref, tol_grad)  # M = 5000: the split column sum


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_opcheck():
    x, w, b, go = make(33, 47, 29)
    torch.library.opcheck(FWD.default, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 2, True))
    out, pre = FWD(x.detach(), w.detach(), b.detach(), 2, True)
    torch.library.opcheck(BWD.default, (go, x.detach(), w.detach(), pre, 2, [True, True, True]))
