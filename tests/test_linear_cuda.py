"""CUDA fused linear (csrc/cuda/linear.cu: fastattn::linear_fwd / linear_bwd on CUDA) against a float64
plain-torch reference act(x @ w^T + b): forward, pre-activation, every gradient, output_mask, odd and empty
shapes, strided inputs, opcheck, bad inputs. Every test needs a GPU and a build with the CUDA kernels.
"""
import pytest
import torch
import torch.nn.functional as F

from fastattn import _ext

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _has_cuda_linear() -> bool:
    return _ext.available() and hasattr(torch.ops.fastattn, "linear_fwd") and _ext.has_kernel("linear_fwd", "CUDA")


needs_kernels = pytest.mark.skipif(not (torch.cuda.is_available() and _has_cuda_linear()),
                                   reason="fastattn built without the CUDA linear kernels")
ACTS = {0: lambda z: z, 1: torch.relu, 2: F.gelu, 3: F.silu}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, N, K): ones, odd sizes, non-multiples of the 64 x 64 x 32 tiles, several tiles and groups of tiles,
# M > 512 (the split column sum), a long reduction.
SHAPES = [(1, 1, 1), (3, 5, 7), (65, 63, 33), (130, 200, 95), (1000, 48, 64), (64, 96, 3000), (600, 520, 260)]


def fwd(*args):
    return torch.ops.fastattn.linear_fwd(*args)


def bwd(*args):
    return torch.ops.fastattn.linear_bwd(*args)


def make(M, N, K, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).cuda().to(dtype)
    w = (torch.randn(N, K, generator=g) / max(K, 1) ** 0.5).cuda().to(dtype)
    b = torch.randn(N, generator=g).cuda().to(dtype) if bias else None
    go = torch.randn(M, N, generator=g).cuda().to(dtype)
    return x, w, b, go


def fwd_reference(x, w, b, act):
    pre = x.double() @ w.double().T + (b.double() if b is not None else 0.0)
    return pre, ACTS[act](pre)


def bwd_reference(go, x, w, saved, act):
    """float64 (dx, dw, db) with gz = go * act'(saved) from the op's own saved tensor (so a 16-bit
    pre-activation rounded across zero gives the same relu mask as the op)."""
    g = go.double()
    if act:
        z = saved.double().requires_grad_()
        (g,) = torch.autograd.grad(ACTS[act](z), z, g)
    return g @ w.double(), g.T @ x.double(), g.sum(0)


def fwd_tol(x, w, b, act, ref):
    """fp32: tight. 16-bit: twice the error of the same math in fp32 rounded once to the dtype, plus a floor."""
    if x.dtype == torch.float32:
        return 1e-4 * (1 + ref.abs().max().item())
    base = ACTS[act](x.float() @ w.float().T + (b.float() if b is not None else 0)).to(x.dtype)
    return 2 * (base.double() - ref).abs().max().item() + 1e-2 * (1 + ref.abs().max().item())


def grad_tol(dtype, ref):
    return (1e-4 if dtype == torch.float32 else 2e-2) * (1 + ref.abs().max().item())


def close(a, ref, tol):
    assert a.shape == ref.shape, (a.shape, ref.shape)
    if ref.numel():
        err = (a.double() - ref).abs().max().item()
        assert err <= tol, (err, tol)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(shape, dtype, bias):
    for act in (0, 1, 2, 3):
        x, w, b, go = make(*shape, dtype, seed=act, bias=bias)
        pre_ref, out_ref = fwd_reference(x, w, b, act)
        out, pre = fwd(x, w, b, act, True)
        assert out.dtype == dtype and out.is_contiguous()
        close(out, out_ref, fwd_tol(x, w, b, act, out_ref))
        if act in (2, 3):
            close(pre, pre_ref, fwd_tol(x, w, b, 0, pre_ref))
        else:
            assert pre.numel() == 0
        saved = out if act == 1 else pre if act else None
        dx_ref, dw_ref, db_ref = bwd_reference(go, x, w, saved, act)
        dx, dw, db = bwd(go, x, w, saved, act, [True, True, bias])
        close(dx, dx_ref, grad_tol(dtype, dx_ref))
        close(dw, dw_ref, grad_tol(dtype, dw_ref))
        if bias:
            close(db, db_ref, grad_tol(dtype, db_ref))
        else:
            assert db.numel() == 0


@needs_kernels
@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False], [False, False, True],
                                  [True, True, False], [False, False, False]])
def test_output_mask(mask):
    x, w, b, go = make(70, 90, 40, torch.float32, seed=2)
    out, pre = fwd(x, w, b, 3, True)
    refs = bwd_reference(go, x, w, pre, 3)
    for g, ref, want in zip(bwd(go, x, w, pre, 3, mask), refs, mask):
        if want:
            close(g, ref, grad_tol(torch.float32, ref))
        else:
            assert g.numel() == 0


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 5, 3), (4, 0, 3), (4, 5, 0), (0, 0, 0), (100, 70, 0)])
def test_empty_dims(shape, dtype):
    """M, N or K may be 0: K == 0 gives act(bias) broadcast; a gradient over an empty reduction is zeros."""
    x, w, b, go = make(*shape, dtype, seed=4)
    out, pre = fwd(x, w, b, 2, True)
    assert out.shape == shape[:2] and pre.shape == shape[:2]
    close(out, fwd_reference(x, w, b, 2)[1], 1e-2)
    dx, dw, db = bwd(go, x, w, pre, 2, [True, True, True])
    for g, ref in zip((dx, dw, db), bwd_reference(go, x, w, pre, 2)):
        close(g, ref, 1e-2 * (1 + (ref.abs().max().item() if ref.numel() else 0)))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs(dtype):
    """x column-major, w with a column stride of 2, grad_out transposed: read through strides."""
    x0, w0, b, go0 = make(77, 45, 66, dtype, seed=6)
    x = x0.T.contiguous().T
    w = torch.cat([w0, w0], 1)[:, ::2]
    go = go0.T.contiguous().T
    out, _ = fwd(x, w, b, 1, False)
    close(out, fwd_reference(x0, w0, b, 1)[1], fwd_tol(x0, w0, b, 1, fwd_reference(x0, w0, b, 1)[1]))
    for g, ref in zip(bwd(go, x, w, out, 1, [True, True, True]), bwd_reference(go0, x0, w0, out, 1)):
        close(g, ref, grad_tol(dtype, ref))


@needs_kernels
def test_large_values_and_long_reduction():
    """fp32 is exact fp32 (no TF32): a K = 4096 product of fp32 values close to the float64 result."""
    x, w, b, _ = make(128, 128, 4096, torch.float32, seed=8)
    out, _ = fwd(x, w, b, 0, False)
    ref = fwd_reference(x, w, b, 0)[1]
    assert (out.double() - ref).abs().max().item() < 2e-5 * (1 + ref.abs().max().item())


@needs_kernels
def test_opcheck():
    x, w, b, go = make(33, 47, 29, torch.float32)
    torch.library.opcheck(torch.ops.fastattn.linear_fwd.default, (x, w, b, 2, True))
    torch.library.opcheck(torch.ops.fastattn.linear_fwd.default, (x, w, None, 1, False))
    out, pre = fwd(x, w, b, 2, True)
    torch.library.opcheck(torch.ops.fastattn.linear_bwd.default, (go, x, w, pre, 2, [True, True, True]))
    torch.library.opcheck(torch.ops.fastattn.linear_bwd.default, (go, x, w, None, 0, [False, True, False]))


@needs_kernels
def test_bad_inputs():
    x, w, b, go = make(4, 5, 6, torch.float32)
    with pytest.raises(RuntimeError, match="disagree on K"):
        fwd(x, w[:, :5], b, 0, False)
    with pytest.raises(RuntimeError, match="dtype"):
        fwd(x, w.half(), b, 0, False)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        fwd(x.double(), w.double(), None, 0, False)
    with pytest.raises(RuntimeError, match="bias must be"):
        fwd(x, w, b[:3], 0, False)
    with pytest.raises(RuntimeError, match="activation must be"):
        fwd(x, w, b, 5, False)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        fwd(x, w.cpu(), b, 0, False)
    with pytest.raises(RuntimeError, match="needs saved"):
        bwd(go, x, w, None, 3, [True, True, True])
    with pytest.raises(RuntimeError, match="grad_out must be"):
        bwd(go[:3], x, w, None, 0, [True, True, True])


@needs_kernels
def test_api_cuda_backend():
    """fastattn.linear(..., backend='cuda') with leading dims and autograd, once fastattn/ops/linear.py is there."""
    lin = pytest.importorskip("fastattn.ops.linear")
    x, w, b, go = make(2 * 50, 30, 70, torch.float32, seed=9)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x.reshape(2, 50, 70), w, b))
    out = lin.linear(xs, ws, bs, activation="silu", backend="cuda")
    pre_ref, out_ref = fwd_reference(x, w, b, 3)
    close(out.reshape(100, 30), out_ref, 1e-4 * (1 + out_ref.abs().max().item()))
    grads = torch.autograd.grad(out, (xs, ws, bs), go.reshape(2, 50, 30))
    for g, ref in zip((grads[0].reshape(100, 70), grads[1], grads[2]), bwd_reference(go, x, w, pre_ref, 3)):
        close(g, ref, 1e-4 * (1 + ref.abs().max().item()))


# Compute-sanitizer friendly smoke test (make gpu-check runs `-k cuda_smoke` under memcheck): every kernel and
# load path once on small odd shapes (edge tiles, vector and scalar chunks, the split column sum).
@needs_kernels
def test_cuda_smoke_linear():
    for dtype in DTYPES:
        for (M, N, K), strided in [((67, 45, 40), False), ((67, 45, 40), True), ((1100, 17, 9), False)]:
            x, w, b, go = make(M, N, K, dtype, seed=M)
            if strided:
                x, w, go = x.T.contiguous().T, torch.cat([w, w], 1)[:, ::2], go.T.contiguous().T
            out, pre = fwd(x, w, b, 2, True)
            dx, dw, db = bwd(go, x, w, pre, 2, [True, True, True])
            torch.cuda.synchronize()
            for g, ref in zip((dx, dw, db), bwd_reference(go, x, w, pre, 2)):
                close(g, ref, grad_tol(dtype, ref))
