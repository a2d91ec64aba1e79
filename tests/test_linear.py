"""fastattn.linear / nn.Linear against a float64 plain-torch oracle ``act(x @ w.T + b)``.

The cpu and reference backends, forward and all three gradients, every activation, with and
without bias, 1-D / 2-D / 3-D inputs, sizes 1, odd sizes and empty dimensions, non-contiguous
views, float32 / float64 / bfloat16 / float16; the native ops pass opcheck and gradcheck; the
backward's output_mask; bad inputs raise clear errors; backend='auto'; the module's state_dict
round trip with torch.nn.Linear; torch.compile(fullgraph=True).
(The Triton and CUDA backends are tested in test_linear_triton.py / test_linear_cuda.py.)
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import _ext, backend as fa_backend
from fastattn.nn import Linear
from fastattn.ops import linear as linear_ops
from fastattn.ops.linear import linear, linear_reference

HAS_NATIVE = _ext.available() and hasattr(torch.ops.fastattn, "linear_fwd")
needs_native = pytest.mark.skipif(not HAS_NATIVE, reason="the compiled extension is not built")
CPU_BACKENDS = ["cpu", "reference"] if HAS_NATIVE else ["reference"]
ACTS = [None, "relu", "gelu", "silu"]
CODE = {None: 0, "relu": 1, "gelu": 2, "silu": 3}
TORCH_ACT = {None: lambda z: z, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def oracle(x, w, b, activation=None):
    """act(x @ w.T + b) in float64, differentiable."""
    z = x.double() @ w.double().t()
    if b is not None:
        z = z + b.double()
    return TORCH_ACT[activation](z)


def leaves(*ts):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]


def grads(out, inputs, g):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, g)


def make(in_shape, N, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = in_shape[-1]
    x = torch.randn(*in_shape, generator=g, dtype=torch.float64)
    w = torch.randn(N, K, generator=g, dtype=torch.float64) / math.sqrt(max(K, 1))
    b = torch.randn(N, generator=g, dtype=torch.float64) if bias else None
    return x.to(dtype), w.to(dtype), (b.to(dtype) if bias else None)


def check_against_oracle(x, w, b, act, backend, atol, rtol, grad_atol=None):
    """Forward and the gradients of every input that takes one, vs the float64 oracle."""
    xs, ws, bs = leaves(x, w, b)
    out = linear(xs, ws, bs, activation=act, backend=backend)
    xr, wr, br = leaves(x.double(), w.double(), b.double() if b is not None else None)
    ref = oracle(xr, wr, br, act)
    assert out.shape == ref.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    gout = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    ours = grads(out, [xs, ws, bs], gout.to(x.dtype))
    theirs = grads(ref, [xr, wr, br], gout)
    for name, u, v in zip(("grad_input", "grad_weight", "grad_bias"), ours, theirs):
        assert u.shape == v.shape and u.dtype == x.dtype, name
        torch.testing.assert_close(u.double(), v, atol=grad_atol or atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# (input shape, out_features)
SHAPES = [
    ((5,), 3),              # 1-D input
    ((7, 13), 9),
    ((2, 3, 11), 6),        # 3-D input
    ((1, 1), 1),            # M = N = K = 1
    ((1, 17), 1),           # M = N = 1
    ((33, 1), 5),           # K = 1
    ((7, 129), 1000),       # odd sizes, N > K
    ((129, 7), 130),
    ((1000, 7), 3),         # many rows: several chunks of the column sums
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0])) + f"-{s[1]}")
def test_matches_oracle_float64(backend, bias, shape):
    x, w, b = make(*shape, bias=bias)
    for act in ACTS:
        check_against_oracle(x, w, b, act, backend, atol=1e-10, rtol=1e-10)


@needs_native
@pytest.mark.parametrize("shape", [((9, 37), 23), ((3, 5, 64), 129), ((1000, 129), 7), ((4, 300), 200)],
                         ids=str)
def test_float32(shape):
    x, w, b = make(*shape, dtype=torch.float32, seed=1)
    for act in ACTS:
        check_against_oracle(x, w, b, act, "cpu", atol=2e-5, rtol=1e-5, grad_atol=2e-4)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    """Error vs the float64 oracle at most 2x that of torch computing in float32 and rounding once to
    ``dtype`` (+ a little slack), for the output and every gradient; results in ``dtype``."""
    for in_shape, N in (((37, 64), 48), ((2, 5, 129), 33), ((3,), 5)):
        x, w, b = make(in_shape, N, seed=3)
        xl, wl, bl = (t.to(dtype) for t in (x, w, b))
        for act in ACTS:
            xs, ws, bs = leaves(xl, wl, bl)
            out = linear(xs, ws, bs, activation=act, backend="cpu")
            assert out.dtype == dtype
            xr, wr, br = leaves(xl.double(), wl.double(), bl.double())  # the oracle on the rounded inputs
            ref = oracle(xr, wr, br, act)
            xf, wf, bf = leaves(xl.float(), wl.float(), bl.float())
            base = TORCH_ACT[act](F.linear(xf, wf, bf))
            gout = torch.randn(ref.shape, dtype=torch.float64).to(dtype)
            pairs = [(out, base.to(dtype), ref)]
            pairs += list(zip(grads(out, [xs, ws, bs], gout), [t.to(dtype) for t in grads(base, [xf, wf, bf], gout.float())],
                              grads(ref, [xr, wr, br], gout.double())))
            for i, (u, v, r) in enumerate(pairs):
                assert u.dtype == dtype, i
                err = (u.double() - r).abs().max().item()
                base_err = (v.double() - r).abs().max().item()
                assert err <= 2 * base_err + 1e-3 * (r.abs().max().item() + 1), (act, i, err, base_err)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("in_shape,N", [((4, 0), 3), ((0, 5), 3), ((4, 5), 0), ((0, 0), 0), ((2, 0, 5), 3)], ids=str)
def test_empty_dims(backend, in_shape, N):
    """K == 0: out = act(bias) (or zeros), grad_weight (N, 0); M == 0: empty out, zero grad_weight/bias."""
    for bias in (True, False):
        x, w, b = make(in_shape, N, bias=bias)
        for act in ACTS:
            check_against_oracle(x, w, b, act, backend, atol=1e-12, rtol=1e-12)
    if in_shape == (4, 0):
        x, w, b = make(in_shape, N)
        torch.testing.assert_close(linear(x, w, b, activation="silu", backend=backend), F.silu(b).expand(4, N))


def noncontiguous_inputs(dtype):
    """(name, x, w) with non-contiguous views of input and weight."""
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return [
        ("x transposed", r(19, 11).t(), r(7, 19)),                 # columns unit-stride
        ("x row slice", r(11, 40)[:, 3:22], r(7, 19)),             # rows unit-stride, ld 40
        ("x every other column", r(11, 38)[:, ::2], r(7, 19)),     # neither: copied
        ("x every other row", r(22, 19)[::2], r(7, 19)),
        ("x 3-D permuted", r(19, 3, 4).permute(1, 2, 0), r(7, 19)),
        ("x expanded", r(1, 19).expand(11, 19), r(7, 19)),         # stride 0
        ("w transposed", r(11, 19), r(19, 7).t()),
        ("w sliced, x transposed", r(19, 11).t(), r(7, 30)[:, 5:24]),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_noncontiguous(backend, dtype):
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    gen = torch.Generator().manual_seed(8)
    for name, x, w in noncontiguous_inputs(dtype):
        assert not x.is_contiguous() or not w.is_contiguous(), name
        b = torch.randn(w.shape[0], generator=gen, dtype=dtype)
        for act in ("gelu", None):
            xs, ws, bs = x.detach().requires_grad_(True), w.detach().requires_grad_(True), b.clone().requires_grad_(True)
            out = linear(xs, ws, bs, activation=act, backend=backend)
            ref = oracle(x, w, b, act)
            torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
            gout = torch.randn(ref.shape, dtype=torch.float64)
            xr, wr, br = leaves(x.double(), w.double(), b.double())
            for u, v in zip(grads(out, [xs, ws, bs], gout.to(dtype)), grads(oracle(xr, wr, br, act), [xr, wr, br], gout)):
                torch.testing.assert_close(u.double(), v, atol=tol * 10, rtol=tol, msg=lambda m: f"{name}: {m}")


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_noncontiguous_low_precision(dtype):
    """16-bit views (widened to float keeping their strides where ATen does) equal the contiguous call
    up to the summation order."""
    gen = torch.Generator().manual_seed(8)
    for name, x, w in noncontiguous_inputs(dtype):
        b = torch.randn(w.shape[0], generator=gen, dtype=dtype)
        xs, ws, bs = leaves(x, w, b)
        xc, wc, bc = leaves(x.contiguous(), w.contiguous(), b)
        out = linear(xs, ws, bs, activation="relu", backend="cpu")
        ref = linear(xc, wc, bc, activation="relu", backend="cpu")
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2, msg=lambda m: f"{name}: {m}")
        g = torch.randn(ref.shape, dtype=dtype)
        for u, v in zip(grads(out, [xs, ws, bs], g), grads(ref, [xc, wc, bc], g)):
            assert u.dtype == dtype
            torch.testing.assert_close(u, v, atol=5e-2, rtol=2e-2, msg=lambda m: f"{name}: {m}")


@needs_native
def test_native_backward_strided_grad_out():
    """linear_bwd reads grad_out in place when it can: transposed, row-sliced, expanded (copied)."""
    x, w, _ = make((9, 6), 5)
    g = torch.Generator().manual_seed(2)
    cases = [torch.randn(5, 9, generator=g, dtype=torch.float64).t(),
             torch.randn(9, 8, generator=g, dtype=torch.float64)[:, 2:7],
             torch.randn(1, 5, generator=g, dtype=torch.float64).expand(9, 5)]
    for go in cases:
        dx, dw, db = torch.ops.fastattn.linear_bwd(go, x, w, None, 0, [True, True, True])
        torch.testing.assert_close(dx, go @ w, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(dw, go.t() @ x, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(db, go.sum(0), atol=1e-12, rtol=1e-12)


@needs_native
@pytest.mark.parametrize("act", ACTS)
def test_native_ops_contract(act):
    """preact only when asked and activation is gelu/silu; every output_mask subset; saved as the contract says."""
    x, w, b = make((13, 10), 7, dtype=torch.float32, seed=7)
    code = CODE[act]
    out, pre = torch.ops.fastattn.linear_fwd(x, w, b, code, False)
    assert pre.numel() == 0 and out.shape == (13, 7) and out.is_contiguous()
    out2, pre2 = torch.ops.fastattn.linear_fwd(x, w, b, code, True)
    assert torch.equal(out, out2)
    if code in (2, 3):
        torch.testing.assert_close(pre2.double(), oracle(x, w, b), atol=1e-5, rtol=1e-5)
    else:
        assert pre2.numel() == 0
    saved = out if code == 1 else pre2 if code in (2, 3) else None
    gout = torch.randn(13, 7)
    full = torch.ops.fastattn.linear_bwd(gout, x, w, saved, code, [True, True, True])
    xr, wr, br = leaves(x.double(), w.double(), b.double())
    for u, v in zip(full, grads(oracle(xr, wr, br, act), [xr, wr, br], gout.double())):
        torch.testing.assert_close(u.double(), v, atol=1e-4, rtol=1e-5)
    for mask in ([a, bb, c] for a in (False, True) for bb in (False, True) for c in (False, True)):
        part = torch.ops.fastattn.linear_bwd(gout, x, w, saved, code, mask)
        for m, p, f in zip(mask, part, full):
            if m:
                assert torch.equal(p, f), mask
            else:
                assert p.numel() == 0, mask


# ---------------------------------------------------------------------------------------------
# opcheck, gradcheck, determinism, double backward.
# ---------------------------------------------------------------------------------------------
@needs_native
def test_opcheck():
    x, w, b = make((6, 5), 4, dtype=torch.float32)
    xg, wg, bg = leaves(x, w, b)
    for args, act, save in (((xg, wg, bg), 0, False), ((xg, wg, None), 1, False), ((xg, wg, bg), 2, True),
                            ((x, w, b), 3, False), ((xg, wg, bg), 3, True)):
        torch.library.opcheck(torch.ops.fastattn.linear_fwd.default, (*args, act, save))
    torch.library.opcheck(torch.ops.fastattn.linear_fwd.default, (x.t().contiguous().t(), w, b, 0, False))
    out, pre = torch.ops.fastattn.linear_fwd(x, w, b, 2, True)
    gout = torch.randn_like(out)
    for mask in ([True, True, True], [True, False, False], [False, True, True], [False, False, True]):
        torch.library.opcheck(torch.ops.fastattn.linear_bwd.default, (gout, x, w, pre, 2, mask))
    torch.library.opcheck(torch.ops.fastattn.linear_bwd.default, (gout, x, w, None, 0, [True, True, True]))


@needs_native
@pytest.mark.parametrize("act", ACTS)
def test_gradcheck(act):
    g = torch.Generator().manual_seed(11)
    for in_shape, N in (((4, 5), 3), ((2, 3, 4), 2), ((5,), 3)):
        x = torch.randn(*in_shape, generator=g, dtype=torch.float64)
        w = torch.randn(N, in_shape[-1], generator=g, dtype=torch.float64)
        b = torch.randn(N, generator=g, dtype=torch.float64)
        if act == "relu":  # keep the pre-activations away from relu's kink
            z = x @ w.t() + b
            b = b + torch.where(z.abs() < 0.1, 0.3, 0.0).reshape(-1, N).amax(0)
            assert ((x @ w.t() + b).abs() > 1e-3).all()
        fn = lambda x, w, b: linear(x, w, b, activation=act, backend="cpu")  # noqa: E731
        assert torch.autograd.gradcheck(fn, leaves(x, w, b), eps=1e-6, atol=1e-6)
    fn = lambda x, w: linear(x, w, activation=act, backend="cpu")  # noqa: E731  (no bias)
    x, w = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, generator=g, dtype=torch.float64)
    assert ((x @ w.t()).abs() > 1e-3).all()
    assert torch.autograd.gradcheck(fn, leaves(x, w), eps=1e-6, atol=1e-6)


@needs_native
def test_grad_bias_deterministic_across_threads():
    """grad_bias sums fixed row chunks in a fixed order: the same bits for any thread count."""
    x, w, _ = make((3000, 16), 300, dtype=torch.float32)
    gout = torch.randn(3000, 300)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, max(2, threads), 3):
            torch.set_num_threads(n)
            runs.append(torch.ops.fastattn.linear_bwd(gout, x, w, None, 0, [False, False, True])[2])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    torch.testing.assert_close(runs[0].double(), gout.double().sum(0), atol=1e-3, rtol=1e-5)


@needs_native
def test_double_backward_is_refused_not_wrong():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(linear(x, w, activation="silu", backend="cpu").square().sum(), x)
    assert gx.shape == x.shape
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(linear(x, w, activation="silu", backend="cpu").square().sum(), x, create_graph=True)


@needs_native
def test_backward_without_preact_raises():
    x = torch.randn(3, 4, requires_grad=True)
    out, _ = torch.ops.fastattn.linear_fwd(x, torch.randn(5, 4), None, 2, False)
    with pytest.raises(RuntimeError, match="save_preact=True"):
        out.sum().backward()


def test_reference_is_plain_math():
    x, w, b = make((6, 7), 5)
    torch.testing.assert_close(linear_reference(x, w, b, 2), F.gelu(F.linear(x, w, b)), atol=1e-12, rtol=1e-12)
    xh, wh, bh = (t.to(torch.bfloat16) for t in (x, w, b))
    assert torch.equal(linear_reference(xh, wh, bh, 1), F.relu(F.linear(xh.float(), wh.float(), bh.float())).bfloat16())


# ---------------------------------------------------------------------------------------------
# Bad inputs, backend choice.
# ---------------------------------------------------------------------------------------------
def test_bad_inputs():
    x, w, b = torch.randn(4, 5), torch.randn(3, 5), torch.randn(3)
    with pytest.raises(ValueError, match=r"input has 6 features .* expects in_features = 5"):
        linear(torch.randn(4, 6), w)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        linear(x, torch.randn(5))
    with pytest.raises(ValueError, match="input must have at least 1 dimension"):
        linear(torch.tensor(1.0), w)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        linear(x, w, torch.randn(4))
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        linear(x, w, torch.randn(1, 3))
    with pytest.raises(TypeError, match="input and weight must have one dtype"):
        linear(x, w.double())
    with pytest.raises(TypeError, match="bias must have input's dtype"):
        linear(x, w, b.double())
    with pytest.raises(TypeError, match="input must be float16, bfloat16, float32 or float64"):
        linear(x.int(), w.int())
    with pytest.raises(TypeError, match="weight must be a Tensor"):
        linear(x, [[1.0] * 5])
    with pytest.raises(TypeError, match="bias must be a Tensor or None"):
        linear(x, w, 1.0)
    with pytest.raises(ValueError, match="activation must be one of"):
        linear(x, w, activation="tanh")
    with pytest.raises(ValueError, match="backend must be one of"):
        linear(x, w, backend="mkl")
    with pytest.raises(NotImplementedError, match="cuda backend takes CUDA tensors"):
        linear(x, w, backend="cuda")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="input and weight must be on one device"):
            linear(x, w.cuda())
        with pytest.raises(ValueError, match="bias must be on input's device"):
            linear(x, w, b.cuda())
    else:
        with pytest.raises(ValueError, match="input and weight must be on one device"):
            linear(x, w.to("meta"))
        with pytest.raises(ValueError, match="bias must be on input's device"):
            linear(x, w, b.to("meta"))


@needs_native
def test_native_checks():
    x, w = torch.randn(4, 5), torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="input has 6 features but weight"):
        torch.ops.fastattn.linear_fwd(torch.randn(4, 6), w, None, 0, False)
    with pytest.raises(RuntimeError, match="input must be 2-D"):
        torch.ops.fastattn.linear_fwd(torch.randn(2, 4, 5), w, None, 0, False)
    with pytest.raises(RuntimeError, match="activation must be 0"):
        torch.ops.fastattn.linear_fwd(x, w, None, 4, False)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(3\)"):
        torch.ops.fastattn.linear_fwd(x, w, torch.randn(2), 0, False)
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.fastattn.linear_fwd(x, w.double(), None, 0, False)
    with pytest.raises(RuntimeError, match="an activation needs saved"):
        torch.ops.fastattn.linear_bwd(torch.randn(4, 3), x, w, None, 1, [True, True, False])
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \(4, 3\)"):
        torch.ops.fastattn.linear_bwd(torch.randn(4, 2), x, w, None, 0, [True, True, False])


@needs_native
def test_auto_picks_cpu_without_warning():
    x, w, b = make((6, 8), 5, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fastattn.linear(x, w, b, activation="gelu")
        out64 = fastattn.linear(x.double(), w.double(), b.double())  # float64 is a cpu dtype
    assert torch.equal(out, linear(x, w, b, activation="gelu", backend="cpu"))
    torch.testing.assert_close(out64, oracle(x, w, b), atol=1e-12, rtol=1e-12)


def test_auto_falls_back_with_one_warning(monkeypatch):
    """Without a CPU kernel for linear_fwd, auto takes the reference (one warning naming the reason);
    an explicit backend='cpu' raises instead."""
    real = _ext.has_kernel
    monkeypatch.setattr(_ext, "has_kernel", lambda op, key: False if op == "linear_fwd" else real(op, key))
    monkeypatch.setattr(linear_ops, "_SELECTED", {})  # forget the choices of earlier calls
    fa_backend._warned.clear()
    x, w, b = make((6, 8), 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            out = fastattn.linear(x, w, b, activation="relu", backend="auto")
    msgs = [str(m.message) for m in caught if "falling back" in str(m.message)]
    assert len(msgs) == 1, msgs
    assert "fastattn.linear" in msgs[0] and "'reference'" in msgs[0] and "no CPU kernel" in msgs[0]
    torch.testing.assert_close(out, oracle(x, w, b, "relu"), atol=1e-12, rtol=1e-12)
    with pytest.raises(NotImplementedError, match="(?s)backend='cpu' cannot run this input.*no CPU kernel"):
        fastattn.linear(x, w, b, backend="cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_float64_falls_back_to_reference():
    fa_backend._warned.clear()
    x, w, b = (t.cuda() for t in make((6, 8), 5))
    with pytest.warns(UserWarning, match="(?s)falling back to the 'reference'.*float64"):
        out = fastattn.linear(x, w, b, activation="gelu")
    torch.testing.assert_close(out.cpu(), oracle(*(t.cpu() for t in (x, w, b)), "gelu"), atol=1e-12, rtol=1e-12)
    with pytest.raises(NotImplementedError, match="float64 input"):
        fastattn.linear(x, w, b, backend="cuda")


# ---------------------------------------------------------------------------------------------
# The module.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_module_matches_torch_and_state_dict_round_trip(bias):
    kwargs = dict(in_features=37, out_features=19, bias=bias, dtype=torch.float64)
    torch.manual_seed(1)
    ours = Linear(**kwargs)
    torch.manual_seed(1)
    theirs = torch.nn.Linear(**kwargs)
    # same init (reset_parameters like torch's) and the same parameter names
    names = ["weight", "bias"] if bias else ["weight"]
    assert list(ours.state_dict()) == list(theirs.state_dict()) == names
    for name in names:
        assert torch.equal(getattr(ours, name), getattr(theirs, name))
    assert isinstance(ours, torch.nn.Linear) and repr(ours) == repr(theirs)
    x = torch.randn(2, 5, 37, dtype=torch.float64)
    # torch -> ours
    theirs2 = torch.nn.Linear(**kwargs)
    ours.load_state_dict(theirs2.state_dict())
    torch.testing.assert_close(ours(x), theirs2(x), atol=1e-12, rtol=1e-12)
    # ours -> torch, forward and gradients, unbatched input too
    ours2 = Linear(**kwargs)
    theirs.load_state_dict(ours2.state_dict())
    xo, xt = leaves(x, x)
    yo, yt = ours2(xo), theirs(xt)
    torch.testing.assert_close(yo, yt, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(yt)
    ps_o = [xo] + [getattr(ours2, n) for n in names]
    ps_t = [xt] + [getattr(theirs, n) for n in names]
    for u, v in zip(grads(yo, ps_o, g), grads(yt, ps_t, g)):
        torch.testing.assert_close(u, v, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ours2(x[0, 0]), theirs(x[0, 0]), atol=1e-12, rtol=1e-12)


def test_module_activation_backend_and_repr():
    m = Linear(6, 4, activation="gelu", backend="reference", dtype=torch.float64)
    assert "activation='gelu'" in repr(m) and m.in_features == 6 and m.out_features == 4
    ref = torch.nn.Linear(6, 4, dtype=torch.float64)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(m(x), F.gelu(ref(x)), atol=1e-12, rtol=1e-12)
    assert Linear(3, 2, device="meta").weight.device.type == "meta"
    with pytest.raises(ValueError, match="activation must be one of"):
        Linear(3, 2, activation="elu")


# ---------------------------------------------------------------------------------------------
# torch.compile: the fake kernels let the op trace into one graph, forward and backward.
# ---------------------------------------------------------------------------------------------
@needs_native
def test_compile_fullgraph():
    torch._dynamo.reset()
    x, w, b = make((2, 7, 12), 9, dtype=torch.float32, seed=4)

    def f(x, w, b):
        return fastattn.linear(x, w, b, activation="silu", backend="cpu") * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xs, ws, bs = leaves(x, w, b)
    xr, wr, br = leaves(x, w, b)
    out, ref = compiled(xs, ws, bs), f(xr, wr, br)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(ref)
    for u, v in zip(grads(out, [xs, ws, bs], g), grads(ref, [xr, wr, br], g)):
        torch.testing.assert_close(u, v, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x[0], w, b), f(x[0], w, b), atol=1e-6, rtol=1e-6)
