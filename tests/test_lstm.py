"""LSTM: every backend against torch.nn.LSTM / LSTMCell with the same weights (float64), fwd and all grads."""
import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastattn  # noqa: F401
from fastattn import _ext
from fastattn.nn.rnn import LSTM, LSTMCell
from fastattn.ops import lstm as L

HAS_GPU = torch.cuda.is_available()
needs_ext = pytest.mark.skipif(not _ext.available(), reason="the compiled extension is not built")
DT = torch.float64


def _triton_ok():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return HAS_GPU or __import__("os").environ.get("TRITON_INTERPRET") == "1"


CPU_BACKENDS = [pytest.param("cpu", marks=needs_ext), "reference"]


def _pair(*args, backend="cpu", **kw):
    """A torch.nn.LSTM and our LSTM with the same weights."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(*args, dtype=DT, **kw)
    ours = LSTM(*args, dtype=DT, backend=backend, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _grads(module, inputs, outputs):
    """d(sum of outputs * fixed random weights)/d(inputs + params)."""
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)
    params = list(module.parameters())
    return torch.autograd.grad(loss, list(inputs) + params)


def _close(a, b, tol=1e-10):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# --------------------------------------------------------------------------------------------
# Module vs torch.nn.LSTM
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("num_layers,bidirectional,proj,batch_first,bias",
                         [c for c in itertools.product([1, 2], [False, True], [0, 3], [False, True], [True, False])
                          if not (c[4] is False and c[3])])
def test_module_matches_torch(backend, num_layers, bidirectional, proj, batch_first, bias):
    ref, ours = _pair(5, 7, num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
                      proj_size=proj, backend=backend)
    D, P = 2 if bidirectional else 1, proj or 7
    T, B = 6, 3
    x = torch.randn((B, T, 5) if batch_first else (T, B, 5), dtype=DT, requires_grad=True)
    h0 = torch.randn(num_layers * D, B, P, dtype=DT, requires_grad=True)
    c0 = torch.randn(num_layers * D, B, 7, dtype=DT, requires_grad=True)
    o1, (h1, c1) = ref(x, (h0, c0))
    o2, (h2, c2) = ours(x, (h0, c0))
    for a, b in ((o1, o2), (h1, h2), (c1, c2)):
        _close(b, a)
    g1 = _grads(ref, (x, h0, c0), (o1, h1, c1))
    g2 = _grads(ours, (x, h0, c0), (o2, h2, c2))
    for a, b in zip(g1, g2):
        _close(b, a)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("T,B", [(1, 1), (1, 4), (5, 1)])
def test_module_edge_shapes(backend, T, B):
    ref, ours = _pair(4, 6, 2, bidirectional=True, backend=backend)
    x = torch.randn(T, B, 4, dtype=DT, requires_grad=True)
    o1, (h1, c1) = ref(x)
    o2, (h2, c2) = ours(x)  # hx=None: zeros
    for a, b in ((o1, o2), (h1, h2), (c1, c2)):
        _close(b, a)
    for a, b in zip(_grads(ref, (x,), (o1, h1, c1)), _grads(ours, (x,), (o2, h2, c2))):
        _close(b, a)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_module_unbatched(backend):
    ref, ours = _pair(4, 6, 2, bidirectional=True, proj_size=2, backend=backend)
    x = torch.randn(5, 4, dtype=DT, requires_grad=True)
    h0 = torch.randn(4, 2, dtype=DT)
    c0 = torch.randn(4, 6, dtype=DT)
    o1, (h1, c1) = ref(x, (h0, c0))
    o2, (h2, c2) = ours(x, (h0, c0))
    assert o2.shape == o1.shape and h2.shape == h1.shape
    for a, b in ((o1, o2), (h1, h2), (c1, c2)):
        _close(b, a)
    for a, b in zip(_grads(ref, (x,), (o1, h1, c1)), _grads(ours, (x,), (o2, h2, c2))):
        _close(b, a)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bidirectional,proj,num_layers", [(False, 0, 1), (True, 0, 2), (True, 3, 2)])
def test_module_packed(backend, enforce_sorted, bidirectional, proj, num_layers):
    ref, ours = _pair(5, 7, num_layers, bidirectional=bidirectional, proj_size=proj, backend=backend)
    lengths = [6, 4, 4, 1] if enforce_sorted else [2, 6, 1, 4]
    T, B, D, P = 6, 4, 2 if bidirectional else 1, proj or 7
    x = torch.randn(T, B, 5, dtype=DT, requires_grad=True)
    h0 = torch.randn(num_layers * D, B, P, dtype=DT, requires_grad=True)
    c0 = torch.randn(num_layers * D, B, 7, dtype=DT, requires_grad=True)
    outs = []
    for m in (ref, ours):
        packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
        out, (h, c) = m(packed, (h0, c0))
        assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
        padded, lens = pad_packed_sequence(out)
        assert lens.tolist() == lengths
        outs.append((padded, h, c, _grads(m, (x, h0, c0), (padded, h, c))))
    (o1, h1, c1, g1), (o2, h2, c2, g2) = outs
    for a, b in [(o1, o2), (h1, h2), (c1, c2)] + list(zip(g1, g2)):
        _close(b, a)


def test_state_dict_both_ways_and_isinstance():
    ref = torch.nn.LSTM(3, 4, 2, bidirectional=True, proj_size=2)
    ours = LSTM(3, 4, 2, bidirectional=True, proj_size=2)
    assert isinstance(ours, torch.nn.LSTM)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert "weight_hr_l1_reverse" in ours.state_dict()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)
    ref2 = torch.nn.LSTM(3, 4, 2, bidirectional=True, proj_size=2)
    ref2.load_state_dict(LSTM(3, 4, 2, bidirectional=True, proj_size=2).state_dict())
    cell = LSTMCell(3, 4, bias=False)
    assert list(cell.state_dict()) == list(torch.nn.LSTMCell(3, 4, bias=False).state_dict())


def test_dropout_between_layers():
    torch.manual_seed(0)
    m = LSTM(4, 8, 3, dropout=0.5, dtype=DT)
    ref = torch.nn.LSTM(4, 8, 3, dropout=0.5, dtype=DT)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(5, 2, 4, dtype=DT)
    m.eval(), ref.eval()
    _close(m(x)[0], ref(x)[0])
    m.train()
    a, b = m(x)[0], m(x)[0]
    assert not torch.allclose(a, b), "dropout must act in training"
    # the last layer's output is never dropped: no exact zeros from dropout on it
    assert (a != 0).all()


# --------------------------------------------------------------------------------------------
# Cell vs torch.nn.LSTMCell
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bias,batch,hx", [(True, 3, True), (False, 1, True), (True, None, True), (True, 2, False)])
def test_cell_matches_torch(backend, bias, batch, hx):
    torch.manual_seed(0)
    ref = torch.nn.LSTMCell(5, 9, bias=bias, dtype=DT)
    ours = LSTMCell(5, 9, bias=bias, dtype=DT, backend=backend)
    ours.load_state_dict(ref.state_dict())
    shape = (batch,) if batch is not None else ()
    x = torch.randn(shape + (5,), dtype=DT, requires_grad=True)
    h = torch.randn(shape + (9,), dtype=DT, requires_grad=True)
    c = torch.randn(shape + (9,), dtype=DT, requires_grad=True)
    state = (h, c) if hx else None
    h1, c1 = ref(x, state)
    h2, c2 = ours(x, state)
    _close(h2, h1)
    _close(c2, c1)
    inputs = (x, h, c) if hx else (x,)
    for a, b in zip(_grads(ref, inputs, (h1, c1)), _grads(ours, inputs, (h2, c2))):
        _close(b, a)


@needs_ext
def test_cell_only_h_used():
    """Backward with grad for h' only (c' unused: its grad is None)."""
    torch.manual_seed(0)
    ref = torch.nn.LSTMCell(3, 4, dtype=DT)
    ours = LSTMCell(3, 4, dtype=DT)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, dtype=DT, requires_grad=True)
    g1 = torch.autograd.grad(ref(x)[0].sum(), [x, ref.weight_hh])
    g2 = torch.autograd.grad(ours(x)[0].sum(), [x, ours.weight_hh])
    for a, b in zip(g1, g2):
        _close(b, a)


# --------------------------------------------------------------------------------------------
# Functional layer: lengths (packed semantics) against the reference loop
# --------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("proj", [0, 2])
def test_layer_lengths_vs_reference(reverse, proj):
    torch.manual_seed(0)
    T, B, I, H = 5, 4, 3, 4
    P = proj or H
    args = [torch.randn(T, B, I, dtype=DT), torch.randn(B, P, dtype=DT), torch.randn(B, H, dtype=DT),
            torch.randn(4 * H, I, dtype=DT), torch.randn(4 * H, P, dtype=DT), torch.randn(4 * H, dtype=DT),
            torch.randn(4 * H, dtype=DT), torch.randn(P, H, dtype=DT) if proj else None]
    args = [a.requires_grad_() if a is not None else None for a in args]
    lengths = torch.tensor([3, 5, 1, 4])
    x, h0, c0, *w = args
    o1, (h1, c1) = L.lstm(x, (h0, c0), *w, reverse=reverse, lengths=lengths, backend="reference")
    o2, (h2, c2) = L.lstm(x, (h0, c0), *w, reverse=reverse, lengths=lengths, backend="cpu")
    for a, b in ((o1, o2), (h1, h2), (c1, c2)):
        _close(b, a)
    assert (o2[4, 0] == 0).all() and (o2[1:, 2] == 0).all(), "padded steps output 0"
    leaves = [a for a in args if a is not None]
    gs = [torch.randn_like(o1), torch.randn_like(h1), torch.randn_like(c1)]
    g1 = torch.autograd.grad([o1, h1, c1], leaves, gs)
    g2 = torch.autograd.grad([o2, h2, c2], leaves, gs)
    for a, b in zip(g1, g2):
        _close(b, a)


# --------------------------------------------------------------------------------------------
# bf16 / fp32
# --------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision(dtype):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(16, 32, 2, bidirectional=True)  # fp32 ground truth
    ours = LSTM(16, 32, 2, bidirectional=True, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(12, 4, 16)
    o_ref = ref(x)[0]
    o = ours(x.to(dtype))[0]
    assert o.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(o, o_ref, atol=2e-5, rtol=1e-5)
    else:
        # flash-attn's rule: at most 2x the error of torch's own LSTM in the low dtype
        low = torch.nn.LSTM(16, 32, 2, bidirectional=True, dtype=dtype)
        low.load_state_dict(ref.state_dict())
        try:
            err_low = (low(x.to(dtype))[0].float() - o_ref).abs().max().item()
        except RuntimeError:  # no low-precision CPU LSTM in this torch
            err_low = 1e-2
        err = (o.float() - o_ref).abs().max().item()
        assert err <= max(2 * err_low, 1e-2), (err, err_low)
        # gradients flow in the low dtype
        x2 = x.to(dtype).requires_grad_()
        ours(x2)[0].float().sum().backward()
        assert x2.grad.dtype == dtype and torch.isfinite(x2.grad.float()).all()


# --------------------------------------------------------------------------------------------
# opcheck / gradcheck / double backward
# --------------------------------------------------------------------------------------------
def _layer_args(proj=0, lengths=False, bias=True, T=4, B=3, I=3, H=4, dtype=DT):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    P = proj or H
    return [r(T, B, I), r(B, P), r(B, H), r(4 * H, I), r(4 * H, P), r(4 * H) if bias else None,
            r(4 * H) if bias else None, r(P, H) if proj else None, False,
            torch.tensor([2, T, 1][:B]) if lengths else None]


@needs_ext
@pytest.mark.parametrize("proj,lengths,bias,reverse", [(0, False, True, False), (2, True, False, True),
                                                       (0, True, True, True)])
def test_opcheck_layer(proj, lengths, bias, reverse):
    args = _layer_args(proj, lengths, bias, dtype=torch.float32)
    args[8] = reverse
    for i in (0, 1, 2, 3, 4, 5, 6, 7):
        if args[i] is not None:
            args[i].requires_grad_()
    torch.library.opcheck(torch.ops.fastattn.lstm_layer_fwd.default, args)
    out = torch.ops.fastattn.lstm_layer_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    a = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
    bwd_args = [torch.randn_like(out[0]), torch.randn_like(out[1]), torch.randn_like(out[2]), a[0], a[1], a[2], a[3],
                a[4], a[7], out[0], out[3], out[4], out[5], reverse, a[9]]
    torch.library.opcheck(torch.ops.fastattn.lstm_layer_bwd.default, bwd_args)


@needs_ext
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_cell(bias):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    args = [r(3, 5), r(3, 4), r(3, 4), r(16, 5), r(16, 4), r(16) if bias else None, r(16) if bias else None]
    torch.library.opcheck(torch.ops.fastattn.lstm_cell_fwd.default, [a.requires_grad_() if a is not None else a
                                                                     for a in args])
    a = [t.detach() if t is not None else t for t in args]
    hy, cy, gates = torch.ops.fastattn.lstm_cell_fwd(*a)
    torch.library.opcheck(torch.ops.fastattn.lstm_cell_bwd.default,
                          [torch.randn_like(hy), torch.randn_like(cy), a[0], a[1], a[2], cy, a[3], a[4], gates])


@needs_ext
@pytest.mark.parametrize("proj,lengths,reverse", [(0, False, False), (2, True, True), (0, True, False)])
def test_gradcheck_layer(proj, lengths, reverse):
    args = _layer_args(proj, lengths, T=3, B=3, I=2, H=3)
    tensors = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args[:8]]

    def f(*ts):
        out, (h, c) = L.lstm(ts[0], (ts[1], ts[2]), *ts[3:8], reverse=reverse, lengths=args[9], backend="cpu")
        return out, h, c

    assert torch.autograd.gradcheck(f, tensors)


@needs_ext
def test_gradcheck_cell():
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(*s, generator=g, dtype=DT, requires_grad=True) for s in [(2, 3), (2, 4), (2, 4), (16, 3),
                                                                                (16, 4), (16,), (16,)]]
    assert torch.autograd.gradcheck(lambda x, h, c, *w: L.lstm_cell(x, (h, c), *w, backend="cpu"), ts)


@needs_ext
def test_double_backward_raises_clearly():
    m = LSTM(3, 4, dtype=DT)
    x = torch.randn(2, 2, 3, dtype=DT, requires_grad=True)
    (gx,) = torch.autograd.grad(m(x)[0].pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()
    cell = LSTMCell(3, 4, dtype=DT)
    (gx,) = torch.autograd.grad(cell(x[0])[0].pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------
def test_bad_inputs():
    m = LSTM(5, 7, 2)
    with pytest.raises(ValueError, match="input_size=5"):
        m(torch.randn(3, 2, 6))
    with pytest.raises(ValueError, match="h_0 of shape"):
        m(torch.randn(3, 2, 5), (torch.randn(1, 2, 7), torch.randn(2, 2, 7)))
    with pytest.raises(ValueError, match="c_0 of shape"):
        m(torch.randn(3, 2, 5), (torch.randn(2, 2, 7), torch.randn(2, 3, 7)))
    with pytest.raises(TypeError, match="dtype and device"):
        m(torch.randn(3, 2, 5), (torch.randn(2, 2, 7, dtype=DT), torch.randn(2, 2, 7)))
    with pytest.raises(ValueError, match="2-D .unbatched. or 3-D"):
        m(torch.randn(3, 2, 5, 1))
    w = [torch.randn(28, 5), torch.randn(28, 7)]
    with pytest.raises(ValueError, match="w_ih expects input_size 5"):
        L.lstm(torch.randn(3, 2, 4), None, *w)
    with pytest.raises(ValueError, match=r"hx\[0\] \(h0\) must have shape \(2, 7\)"):
        L.lstm(torch.randn(3, 2, 5), (torch.randn(2, 6), torch.randn(2, 7)), *w)
    with pytest.raises(TypeError, match="w_hh must have the input's dtype"):
        L.lstm(torch.randn(3, 2, 5), None, w[0], w[1].double())
    with pytest.raises(ValueError, match="must be on the input's device"):
        L.lstm(torch.randn(3, 2, 5), (torch.randn(2, 7, device="meta"), torch.randn(2, 7)), *w)
    with pytest.raises(ValueError, match="must be on the input's device"):  # (the thin paths too)
        L.lstm(torch.randn(3, 2, 5), (torch.randn(2, 7), torch.randn(2, 7)), w[0], w[1].to("meta"))
    with pytest.raises(ValueError, match="must be on the input's device"):
        L.lstm_cell(torch.randn(2, 5), (torch.randn(2, 7, device="meta"), torch.randn(2, 7)), *w)
    with pytest.raises(ValueError, match="w_hh must be"):
        L.lstm(torch.randn(3, 2, 5), None, w[0], torch.randn(28, 6))
    with pytest.raises(ValueError, match="lengths must lie in"):
        L.lstm(torch.randn(3, 2, 5), None, *w, lengths=[4, 1])
    with pytest.raises(TypeError, match="must be float16, bfloat16, float32 or float64"):
        L.lstm(torch.randn(3, 2, 5).int(), None, *w)
    with pytest.raises(ValueError, match="backend must be one of"):
        L.lstm(torch.randn(3, 2, 5), None, *w, backend="nope")
    with pytest.raises(NotImplementedError, match="cuda"):
        L.lstm(torch.randn(3, 2, 5), None, *w, backend="cuda")
    with pytest.raises(ValueError, match=r"hx\[1\] \(c\) must have shape"):
        L.lstm_cell(torch.randn(2, 5), (torch.randn(2, 7), torch.randn(2, 8)), *w)
    with pytest.raises(ValueError, match="b_ih must be"):
        L.lstm_cell(torch.randn(2, 5), (torch.randn(2, 7), torch.randn(2, 7)), *w, torch.randn(27))


@needs_ext
def test_native_op_checks():
    """TORCH_CHECK in the kernels: the second line of defence, for callers that skip the Python checks."""
    a = _layer_args(dtype=torch.float32)
    a[1] = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="h0 must have shape"):
        torch.ops.fastattn.lstm_layer_fwd(*a)
    a = _layer_args(lengths=True, dtype=torch.float32)
    a[9] = torch.tensor([0, 1, 1])
    with pytest.raises(RuntimeError, match="lengths must lie in"):
        torch.ops.fastattn.lstm_layer_fwd(*a)


# --------------------------------------------------------------------------------------------
# Triton (under TRITON_INTERPRET=1 without a GPU: small shapes)
# --------------------------------------------------------------------------------------------
triton_only = pytest.mark.skipif(not _triton_ok(), reason="triton not installed / not interpretable here")


@pytest.mark.triton
@triton_only
@pytest.mark.parametrize("bias", [True, False])
def test_triton_cell(triton_device, bias):
    torch.manual_seed(0)
    dtype = torch.float32
    ref = torch.nn.LSTMCell(5, 6, bias=bias, dtype=DT)
    x = torch.randn(3, 5, dtype=DT, requires_grad=True)
    h = torch.randn(3, 6, dtype=DT, requires_grad=True)
    c = torch.randn(3, 6, dtype=DT, requires_grad=True)
    h1, c1 = ref(x, (h, c))
    params = [p.detach().to(triton_device, dtype).requires_grad_() for p in ref.parameters()]
    ins = [t.detach().to(triton_device, dtype).requires_grad_() for t in (x, h, c)]
    w = params + [None] * (4 - len(params))
    h2, c2 = L.lstm_cell(ins[0], (ins[1], ins[2]), *w, backend="triton")
    torch.testing.assert_close(h2.double().cpu(), h1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c2.double().cpu(), c1, atol=1e-5, rtol=1e-5)
    gy = [torch.randn_like(h1), torch.randn_like(c1)]
    g1 = torch.autograd.grad([h1, c1], [x, h, c] + list(ref.parameters()), gy)
    g2 = torch.autograd.grad([h2, c2], ins + params, [g.to(triton_device, dtype) for g in gy])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b.double().cpu(), a, atol=1e-5, rtol=1e-5)


@pytest.mark.triton
@triton_only
def test_triton_module_packed_bidirectional(triton_device):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(3, 4, 2, bidirectional=True, proj_size=2)
    ours = LSTM(3, 4, 2, bidirectional=True, proj_size=2, backend="triton").to(triton_device)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 3, requires_grad=True)
    lengths = [4, 1, 3]
    o1, (h1, c1) = ref(pack_padded_sequence(x, lengths, enforce_sorted=False))
    x2 = x.detach().to(triton_device).requires_grad_()
    o2, (h2, c2) = ours(pack_padded_sequence(x2, lengths, enforce_sorted=False))
    torch.testing.assert_close(o2.data.cpu(), o1.data, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h2.cpu(), h1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c2.cpu(), c1, atol=1e-5, rtol=1e-5)
    (o1.data.sum() + h1.sum() + c1.sum()).backward()
    (o2.data.sum() + h2.sum() + c2.sum()).backward()
    torch.testing.assert_close(x2.grad.cpu(), x.grad, atol=1e-5, rtol=1e-5)
    for (n, p1), p2 in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p2.grad.cpu(), p1.grad, atol=1e-5, rtol=1e-5, msg=n)


# --------------------------------------------------------------------------------------------
# CUDA (run on a GPU machine)
# --------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("proj,packed", [(0, False), (3, True)])
def test_cuda_module_vs_torch(backend, dtype, proj, packed):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(8, 32, 2, bidirectional=True, proj_size=proj, dtype=DT)
    ours = LSTM(8, 32, 2, bidirectional=True, proj_size=proj, backend=backend).to("cuda", dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(7, 5, 8, dtype=DT, requires_grad=True)
    x2 = x.detach().to("cuda", dtype).requires_grad_()
    lengths = [7, 2, 5, 1, 7]
    if packed:
        o1, (h1, c1) = ref(pack_padded_sequence(x, lengths, enforce_sorted=False))
        o2, (h2, c2) = ours(pack_padded_sequence(x2, lengths, enforce_sorted=False))
        o1, o2 = o1.data, o2.data
    else:
        o1, (h1, c1) = ref(x)
        o2, (h2, c2) = ours(x2)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for a, b in ((o1, o2), (h1, h2), (c1, c2)):
        torch.testing.assert_close(b.double().cpu(), a, atol=tol, rtol=tol)
    (o1.sum() + h1.sum() + c1.sum()).backward()
    (o2.float().sum() + h2.float().sum() + c2.float().sum()).backward()
    torch.testing.assert_close(x2.grad.double().cpu(), x.grad, atol=5 * tol, rtol=5 * tol)
    for (n, p1), p2 in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p2.grad.double().cpu(), p1.grad, atol=5 * tol, rtol=5 * tol, msg=n)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_cell(backend):
    torch.manual_seed(0)
    ref = torch.nn.LSTMCell(50, 50, dtype=DT)
    ours = LSTMCell(50, 50, backend=backend).cuda()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(8, 50, dtype=DT, requires_grad=True)
    x2 = x.detach().float().cuda().requires_grad_()
    h1, c1 = ref(x)
    h2, c2 = ours(x2)
    torch.testing.assert_close(h2.double().cpu(), h1, atol=1e-5, rtol=1e-5)
    (h1.sum() + c1.sum()).backward()
    (h2.sum() + c2.sum()).backward()
    torch.testing.assert_close(x2.grad.double().cpu(), x.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
def test_cuda_opcheck():
    args = _layer_args(proj=2, lengths=True, dtype=torch.float32)
    args = [a.cuda() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    torch.library.opcheck(torch.ops.fastattn.lstm_layer_fwd.default, args)


@pytest.mark.triton
@triton_only
def test_triton_gates_bf16(triton_device):
    from fastattn.triton.lstm import lstm_gates_fwd
    torch.manual_seed(0)
    gates = torch.randn(3, 4 * 37) * 2
    c = torch.randn(3, 37)
    h, c_new, act = lstm_gates_fwd(gates.to(triton_device, torch.bfloat16), c.to(triton_device, torch.bfloat16))
    i, f, g, o = gates.to(torch.bfloat16).float().chunk(4, 1)
    c_ref = torch.sigmoid(f) * c.to(torch.bfloat16).float() + torch.sigmoid(i) * torch.tanh(g)
    h_ref = torch.sigmoid(o) * torch.tanh(c_ref)
    assert h.dtype == torch.bfloat16 and act.dtype == torch.float32
    torch.testing.assert_close(c_new.float().cpu(), c_ref, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(h.float().cpu(), h_ref, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(act[:, 37:74].cpu(), torch.sigmoid(f), atol=1e-5, rtol=1e-5)


@needs_ext
@pytest.mark.parametrize("T,B,I,H,proj", [(12, 5, 300, 32, 0), (20, 64, 40, 64, 24), (8, 3, 8, 50, 0),
                                           (6, 1, 20, 20, 0), (5, 7, 33, 17, 0), (3, 40, 16, 256, 0)])
def test_fp32_kernel_paths_packed(T, B, I, H, proj):
    """fp32 runs our AVX-512 GEMMs (where the CPU has them): K-blocking (input size 300 > 256), row
    blocks with a remainder (B=5, 3, 7, 1), the small weight-gradient kernel and the BLAS one (large T*B),
    narrow last panels of one or two 16-wide vectors (4H = 200 or 68 -> 8 or 20 columns; N = I = 8 or 20
    for grad_input; N = 20 or 50 for the recurrent gradient), the pointwise passes split over threads
    (40 x 4*256 gate values)."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, bidirectional=True, proj_size=proj, dtype=DT)
    ours = LSTM(I, H, bidirectional=True, proj_size=proj)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, dtype=DT)
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    o1, (h1, c1) = ref(pack_padded_sequence(x.requires_grad_(), lengths, enforce_sorted=False))
    x2 = x.detach().float().requires_grad_()
    o2, (h2, c2) = ours(pack_padded_sequence(x2, lengths, enforce_sorted=False))
    for a, b in ((o1.data, o2.data), (h1, h2), (c1, c2)):
        torch.testing.assert_close(b.double(), a, atol=2e-5, rtol=1e-4)
    (o1.data.sum() + h1.sum() + c1.sum()).backward()
    (o2.data.sum() + h2.sum() + c2.sum()).backward()
    torch.testing.assert_close(x2.grad.double(), x.grad, atol=1e-4, rtol=1e-4)
    for (n, p1), p2 in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p2.grad.double(), p1.grad, atol=2e-4, rtol=1e-4, msg=n)


# --------------------------------------------------------------------------------------------
# The fused recurrent step (fp32, AVX-512, no projection): FASTATTN_LSTM_FUSED=require runs it
# (an error where it cannot run), =0 the GEMM + pointwise-pass path; the fused step must match both
# torch (float64) and the other path.
# --------------------------------------------------------------------------------------------
def _has_avx512():
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


needs_fused = pytest.mark.skipif(not (_ext.available() and _has_avx512()), reason="needs the extension and AVX-512")


def _run_fp32(ours, x, lengths, mode, monkeypatch):
    monkeypatch.setenv("FASTATTN_LSTM_FUSED", mode)
    ours.zero_grad()
    x = x.detach().clone().requires_grad_()
    inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if lengths is not None else x
    o, (h, c) = ours(inp)
    o = o.data if lengths is not None else o
    g = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=g)).sum() for t in (o, h, c))
    loss.backward()
    return [o.detach(), h.detach(), c.detach(), x.grad] + [p.grad.clone() for p in ours.parameters()]


@needs_fused
@pytest.mark.parametrize("T,B,I,H,bidirectional,packed,bias", [
    (5, 32, 20, 256, False, False, True),   # the benchmark's tile shape (16 full tiles, 5 row blocks of 6 + 2)
    (4, 1, 8, 17, True, False, True),       # batch 1; hidden not a multiple of 16 (a tile of 1 unit)
    (6, 7, 9, 40, True, True, True),        # odd batch (a row block of 6 + 1), 40 = 2 tiles + 8, packed
    (5, 13, 5, 16, False, True, False),     # exactly one tile, uneven lengths, no bias
    (3, 6, 3, 1, True, False, True),        # hidden 1
    (7, 9, 12, 33, False, True, True),      # 2 tiles + 1 unit, packed
])
def test_fused_step_matches_torch_and_other_path(T, B, I, H, bidirectional, packed, bias, monkeypatch):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, bidirectional=bidirectional, bias=bias, dtype=DT)
    ours = LSTM(I, H, bidirectional=bidirectional, bias=bias)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I)
    lengths = None
    if packed:
        lengths = torch.randint(1, T + 1, (B,))
        lengths[0] = T
        lengths[-1] = 1
    fused = _run_fp32(ours, x, lengths, "require", monkeypatch)
    other = _run_fp32(ours, x, lengths, "0", monkeypatch)
    for a, b in zip(fused, other):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # float64 torch, the same loss
    ref.zero_grad()
    xd = x.double().requires_grad_()
    inp = pack_padded_sequence(xd, lengths, enforce_sorted=False) if packed else xd
    o, (h, c) = ref(inp)
    o = o.data if packed else o
    g = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=g).double()).sum() for t in (o, h, c))
    loss.backward()
    want = [o.detach(), h.detach(), c.detach(), xd.grad] + [p.grad for p in ref.parameters()]
    for a, b in zip(fused, want):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


@needs_fused
@pytest.mark.parametrize("reverse", [False, True])
def test_fused_step_layer_op_lengths(reverse, monkeypatch):
    """The layer op itself: workspace (activated gates, cells) and outputs equal the other path's,
    with rows that sit steps out (reverse: rows start at their own last step)."""
    torch.manual_seed(0)
    T, B, I, H = 6, 5, 7, 24
    x, h0, c0 = torch.randn(T, B, I), torch.randn(B, H), torch.randn(B, H)
    w_ih, w_hh, b_ih, b_hh = torch.randn(4 * H, I), torch.randn(4 * H, H), torch.randn(4 * H), torch.randn(4 * H)
    lengths = torch.tensor([6, 1, 3, 6, 2])
    outs = {}
    for mode in ("require", "0"):
        monkeypatch.setenv("FASTATTN_LSTM_FUSED", mode)
        outs[mode] = torch.ops.fastattn.lstm_layer_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, reverse, lengths)
    for a, b in zip(outs["require"], outs["0"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    out = outs["require"][0]
    assert (out[1:, 1] == 0).all() and (out[0, 1] != 0).any()  # length 1: only step 0 runs, either direction


@needs_fused
def test_fused_step_refuses_what_it_cannot_run(monkeypatch):
    """proj_size and float64 fall back to the other path with FASTATTN_LSTM_FUSED=1 (and match torch);
    =require says clearly why it cannot run."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5)
    ref = torch.nn.LSTM(5, 20, proj_size=7, dtype=DT)
    ours = LSTM(5, 20, proj_size=7)
    ours.load_state_dict(ref.state_dict())
    monkeypatch.setenv("FASTATTN_LSTM_FUSED", "1")
    o, (h, c) = ours(x)
    o1, (h1, c1) = ref(x.double())
    torch.testing.assert_close(o.double(), o1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c.double(), c1, atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("FASTATTN_LSTM_FUSED", "require")
    with pytest.raises(RuntimeError, match="FASTATTN_LSTM_FUSED=require"):
        ours(x)
    ours64 = LSTM(5, 20, dtype=DT)
    with pytest.raises(RuntimeError, match="FASTATTN_LSTM_FUSED=require"):
        ours64(x.double())


@needs_fused
def test_fused_step_saturated_gates(monkeypatch):
    """Pre-activations far outside [-88, 88] (the fused epilogue clamps before exp and uses a reciprocal
    estimate + Newton step): gates saturate to 0/1 exactly like torch's, no NaN."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(8, 20, dtype=DT)
    ours = LSTM(8, 20)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 8) * 1e3
    monkeypatch.setenv("FASTATTN_LSTM_FUSED", "require")
    with torch.no_grad():
        o, (h, c) = ours(x)
        o1, (h1, c1) = ref(x.double())
    assert torch.isfinite(o).all() and torch.isfinite(c).all()
    torch.testing.assert_close(o.double(), o1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c.double(), c1, atol=1e-4, rtol=1e-5)


@needs_fused
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_step_low_precision(dtype, monkeypatch):
    """bf16/fp16 inputs run in fp32 (converted once at entry), so they take the fused step too: it
    must give what the other path gives on the same converted inputs."""
    torch.manual_seed(0)
    ours = LSTM(12, 40, bidirectional=True).to(dtype)
    x = torch.randn(6, 20, 12, dtype=dtype)
    outs = {}
    for mode in ("require", "0"):
        monkeypatch.setenv("FASTATTN_LSTM_FUSED", mode)
        with torch.no_grad():
            o, (h, c) = ours(x)
        outs[mode] = (o.float(), h.float(), c.float())
    for a, b in zip(outs["require"], outs["0"]):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


# --------------------------------------------------------------------------------------------
# The fused fp32 cell step (AVX-512, small batch: batch rows x k-groups in a vector's lanes)
# and the cell's hand-written autograd node
# --------------------------------------------------------------------------------------------
def _cell_pair(I, H, bias, seed=0):
    torch.manual_seed(seed)
    ref = torch.nn.LSTMCell(I, H, bias=bias, dtype=DT)
    ours = LSTMCell(I, H, bias=bias)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@needs_fused
@pytest.mark.parametrize("B,I,H,bias", [(1, 50, 50, True), (3, 5, 7, False), (8, 50, 50, True), (17, 9, 129, True),
                                        (33, 3, 50, True), (64, 16, 20, False), (8, 50, 1, True), (5, 1, 13, True),
                                        (12, 7, 6, True)])
def test_fused_cell_matches_torch(B, I, H, bias, monkeypatch):
    """fp32 fused cell vs torch.nn.LSTMCell in float64 (same weights), forward and every gradient
    (through the autograd node), and vs our GEMM path in fp32. Batches 1-4 / 5-8 / 9+ take the 4 / 2 /
    1 k's-per-row lane layouts, > 16 rows several chunks; odd I and H leave partial k-groups and
    partial unit blocks."""
    ref, ours = _cell_pair(I, H, bias)
    x, h, c = (torch.randn(B, n) for n in (I, H, H))
    xs, hs, cs = (t.clone().requires_grad_() for t in (x, h, c))
    monkeypatch.setenv("FASTATTN_LSTM_CELL_FUSED", "require")
    h2, c2 = ours(xs, (hs, cs))
    xr, hr, cr = (t.double().requires_grad_() for t in (x, h, c))
    h1, c1 = ref(xr, (hr, cr))
    torch.testing.assert_close(h2.double(), h1, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(c2.double(), c1, atol=2e-6, rtol=1e-5)
    wh_, wc_ = torch.randn(B, H, dtype=DT), torch.randn(B, H, dtype=DT)  # the loss: sum(h*wh + c*wc)
    g1 = torch.autograd.grad((h1 * wh_ + c1 * wc_).sum(), [xr, hr, cr] + list(ref.parameters()))
    g2 = torch.autograd.grad((h2 * wh_.float() + c2 * wc_.float()).sum(), [xs, hs, cs] + list(ours.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b.double(), a, atol=5e-5, rtol=1e-4)
    monkeypatch.setenv("FASTATTN_LSTM_CELL_FUSED", "0")
    with torch.no_grad():
        h3, c3 = ours(x, (h, c))
    torch.testing.assert_close(h2.detach(), h3, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(c2.detach(), c3, atol=2e-6, rtol=1e-5)


@needs_fused
def test_fused_cell_gates_workspace_and_saturation(monkeypatch):
    """The op's gates output (the backward's workspace) from the fused cell equals the GEMM path's;
    pre-activations far outside [-88, 88] saturate like torch's, no NaN."""
    ref, ours = _cell_pair(6, 11, True)
    x, h, c = torch.randn(7, 6) * 1e3, torch.randn(7, 11) * 1e3, torch.randn(7, 11)
    w = [p.detach() for p in (ours.weight_ih, ours.weight_hh, ours.bias_ih, ours.bias_hh)]
    monkeypatch.setenv("FASTATTN_LSTM_CELL_FUSED", "require")
    hy, cy, gates = torch.ops.fastattn.lstm_cell_fwd(x, h, c, *w)
    monkeypatch.setenv("FASTATTN_LSTM_CELL_FUSED", "0")
    hy0, cy0, gates0 = torch.ops.fastattn.lstm_cell_fwd(x, h, c, *w)
    assert torch.isfinite(hy).all() and torch.isfinite(cy).all() and torch.isfinite(gates).all()
    torch.testing.assert_close(gates, gates0, atol=1e-6, rtol=1e-5)
    h1, c1 = ref(x.double(), (h.double(), c.double()))
    torch.testing.assert_close(hy.double(), h1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cy.double(), c1, atol=1e-5, rtol=1e-5)


@needs_fused
def test_fused_cell_refuses_what_it_cannot_run(monkeypatch):
    monkeypatch.setenv("FASTATTN_LSTM_CELL_FUSED", "require")
    x, h, c = torch.randn(2, 3, dtype=DT), torch.randn(2, 4, dtype=DT), torch.randn(2, 4, dtype=DT)
    with pytest.raises(RuntimeError, match="FASTATTN_LSTM_CELL_FUSED=require"):
        torch.ops.fastattn.lstm_cell_fwd(x, h, c, torch.randn(16, 3, dtype=DT), torch.randn(16, 4, dtype=DT), None, None)


@needs_ext
def test_cell_autograd_node():
    """The cell's autograd node: gradients only for what requires grad (an absent bias gets none), a
    second backward without retain_graph and a saved tensor changed in place are refused, retain_graph
    gives the same gradients twice, no node under no_grad."""
    torch.manual_seed(0)
    ref = torch.nn.LSTMCell(4, 5, bias=False, dtype=DT)
    ours = LSTMCell(4, 5, bias=False, dtype=DT)
    ours.load_state_dict(ref.state_dict())
    x, h, c = torch.randn(3, 4, dtype=DT), torch.randn(3, 5, dtype=DT), torch.randn(3, 5, dtype=DT)
    h2, c2 = ours(x, (h, c))
    assert h2.grad_fn.name() == "LstmCellBackward" and c2.grad_fn is h2.grad_fn
    g2 = torch.autograd.grad((h2 * 2 + c2).sum(), [ours.weight_ih, ours.weight_hh], retain_graph=True)
    g2b = torch.autograd.grad((h2 * 2 + c2).sum(), [ours.weight_ih, ours.weight_hh])
    h1, c1 = ref(x, (h, c))
    g1 = torch.autograd.grad((h1 * 2 + c1).sum(), [ref.weight_ih, ref.weight_hh])
    for a, b, b2 in zip(g1, g2, g2b):
        _close(b, a)
        _close(b2, b, tol=0)
    loss = ours(x, (h, c))[0].sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
    h2, c2 = ours(x, (h, c))
    c2.add_(1)
    with pytest.raises(RuntimeError, match="inplace"):
        h2.sum().backward()
    with torch.no_grad():
        h2, c2 = ours(x, (h, c))
    assert h2.grad_fn is None and not h2.requires_grad and not c2.requires_grad
    x.requires_grad_()
    ours.requires_grad_(False)
    h2, _ = ours(x, (h, c))
    (gx,) = torch.autograd.grad(h2.sum(), x)
    (gx1,) = torch.autograd.grad(ref(x, (h, c))[0].sum(), x)
    _close(gx, gx1)


# --------------------------------------------------------------------------------------------
# lstm_layer_infer: the layer forward without the backward's workspace
# --------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("fused", ["0", "1"])
@pytest.mark.parametrize("T,B,I,H,proj,lengths,bias,reverse", [
    (4, 3, 3, 4, 0, False, True, False), (4, 3, 3, 4, 2, True, False, True), (7, 3, 5, 20, 0, True, True, True),
    (6, 20, 9, 33, 0, False, True, False), (5, 17, 4, 16, 0, False, False, True)])
def test_layer_infer_matches_layer_fwd(fused, T, B, I, H, proj, lengths, bias, reverse, monkeypatch):
    """lstm_layer_infer gives lstm_layer_fwd's (output, h_n, c_n) exactly (same kernels, the fused step
    with c double-buffered instead of kept per step), fused step on and off, odd/even T, lengths."""
    monkeypatch.setenv("FASTATTN_LSTM_FUSED", fused)
    args = _layer_args(proj, lengths, bias, T=T, B=B, I=I, H=H, dtype=torch.float32)
    args[8] = reverse
    if lengths:
        args[9] = torch.randint(1, T + 1, (B,))
    full = torch.ops.fastattn.lstm_layer_fwd(*args)
    inf = torch.ops.fastattn.lstm_layer_infer(*args)
    assert len(inf) == 3
    for a, b in zip(full[:3], inf):
        torch.testing.assert_close(b, a, atol=0, rtol=0)
    if lengths and not proj:
        ref = L.lstm_layer_reference(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                       for a in args])
        for a, b in zip(ref, inf):
            torch.testing.assert_close(b.double(), a, atol=1e-5, rtol=1e-5)


@needs_ext
@pytest.mark.parametrize("proj,lengths", [(0, False), (2, True)])
def test_opcheck_layer_infer(proj, lengths):
    args = _layer_args(proj, lengths, True, dtype=torch.float32)
    torch.library.opcheck(torch.ops.fastattn.lstm_layer_infer.default, args)
    args = _layer_args(proj, lengths, True, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastattn.lstm_layer_infer.default, args)


@needs_ext
def test_lstm_uses_infer_only_without_grad(monkeypatch):
    """lstm() takes lstm_layer_infer under no_grad or when nothing requires grad, lstm_layer_fwd (with the
    workspace backward needs) otherwise; both give torch's result."""
    calls = []
    real = L._layer_infer_raw
    monkeypatch.setattr(L, "_layer_infer_raw", lambda *a: calls.append(1) or real(*a))
    ref, ours = _pair(3, 5)
    x = torch.randn(4, 2, 3, dtype=DT)
    with torch.no_grad():
        o, _ = ours(x)
    assert len(calls) == 1
    _close(o, ref(x)[0].detach())
    ours.requires_grad_(False)
    o, _ = ours(x)  # grad mode on, nothing requires grad
    assert len(calls) == 2 and not o.requires_grad
    ours.requires_grad_(True)
    o, _ = ours(x)
    assert len(calls) == 2 and o.requires_grad
    o, _ = ours(x.requires_grad_(), None)
    assert len(calls) == 2
    g1 = torch.autograd.grad(o.sum(), x)
    g2 = torch.autograd.grad(ref(x)[0].sum(), x)
    _close(g1[0], g2[0])
    # the full path (lengths) takes it too
    packed = pack_padded_sequence(torch.randn(4, 2, 3, dtype=DT), [4, 2])
    with torch.no_grad():
        o, (h, c) = ours(packed)
        o1, (h1, c1) = ref(packed)
    assert len(calls) == 3
    _close(o.data, o1.data)
    _close(c, c1)


@needs_ext
def test_cell_forward_ad_refused():
    """Dual tensors (forward-mode AD) are refused with a clear error, not silently differentiated as 0."""
    import torch.autograd.forward_ad as fwAD
    cell = LSTMCell(3, 4, dtype=DT)
    x, h, c = torch.randn(2, 3, dtype=DT), torch.randn(2, 4, dtype=DT), torch.randn(2, 4, dtype=DT)
    with fwAD.dual_level():
        xd = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            cell(xd, (h, c))


@needs_ext
@pytest.mark.parametrize("I,H,proj", [(8, 50, 0), (100, 40, 0), (100, 40, 12), (3, 130, 0)])
def test_layer_backward_cat_and_split_paths(I, H, proj):
    """The layer backward runs [W_ih | W_hh] as one operand while I + P <= 128 and the two products
    apart above: both against torch in float64 (every gradient, reverse direction, lengths)."""
    ref, ours = _pair(I, H, bidirectional=True, proj_size=proj)
    x = torch.randn(5, 3, I, dtype=DT)
    packed = pack_padded_sequence(x, [5, 3, 2], enforce_sorted=False)
    o1, (h1, c1) = ref(packed)
    o2, (h2, c2) = ours(packed)
    _close(o2.data, o1.data)
    for a, b in zip(_grads(ref, (), (o1.data, h1, c1)), _grads(ours, (), (o2.data, h2, c2))):
        _close(b, a)


# --------------------------------------------------------------------------------------------
# Bidirectional layers: both directions in one call, side by side on two threads
# (lstm_bidir_layer_fwd / _infer / _bwd), bit for bit what the two one-direction calls give.
# --------------------------------------------------------------------------------------------
needs_bidir = pytest.mark.skipif(not (_ext.available() and hasattr(torch.ops.fastattn, "lstm_bidir_layer_fwd")),
                                 reason="the compiled extension has no lstm_bidir_layer_fwd")


def _bidir_run(m, x, lengths, mode, monkeypatch, grad=True):
    """Outputs, h_n, c_n and every gradient (input and parameters) with FASTATTN_LSTM_BIDIR=mode; the
    other path is made to fail, so each mode is known to run the path it names."""
    monkeypatch.setenv("FASTATTN_LSTM_BIDIR", mode)
    with monkeypatch.context() as mp:
        if mode == "concurrent":
            mp.setattr(L, "lstm", lambda *a, **k: pytest.fail("one-direction path ran"))
        else:
            mp.setattr(L, "lstm_bidir", lambda *a, **k: pytest.fail("bidirectional op ran"))
        x = x.detach().clone().requires_grad_(grad)
        inp = pack_padded_sequence(x, lengths, batch_first=m.batch_first, enforce_sorted=False) \
            if lengths is not None else x
        m.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grad):
            o, (h, c) = m(inp)
        o = o.data if lengths is not None else o
        if not grad:
            return [o, h, c]
        gen = torch.Generator().manual_seed(1)
        loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in (o, h, c))
        loss.backward()
        return [o, h, c, x.grad] + [p.grad for p in m.parameters()]


def _bidir_cases():
    # (T, B, I, H, proj, layers, batch_first, packed, bias, dtype)
    return [
        (6, 5, 7, 9, 0, 2, False, True, True, torch.float64),
        (6, 5, 7, 9, 3, 2, True, True, True, torch.float64),
        (5, 4, 6, 8, 0, 2, True, False, False, torch.float32),
        (7, 6, 5, 10, 4, 2, False, True, True, torch.float32),
        (9, 32, 40, 48, 0, 2, False, True, True, torch.float32),   # fused step (fp32, AVX-512, batch >= 16)
        (5, 17, 130, 24, 0, 1, True, False, True, torch.float32),  # split backward (I + P > 128)
        (4, 3, 5, 6, 0, 1, False, False, True, torch.float64),     # one layer, plain
    ]


@needs_bidir
@pytest.mark.parametrize("T,B,I,H,proj,layers,batch_first,packed,bias,dtype", _bidir_cases())
@pytest.mark.parametrize("grad", [True, False])
def test_bidir_concurrent_equals_sequential_bitwise(T, B, I, H, proj, layers, batch_first, packed, bias, dtype, grad,
                                                    monkeypatch):
    if torch.get_num_threads() < 2:
        pytest.skip("needs 2 threads for the directions to run concurrently")
    torch.manual_seed(0)
    m = LSTM(I, H, layers, bias=bias, batch_first=batch_first, bidirectional=True, proj_size=proj, dtype=dtype)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=dtype)
    lengths = None
    if packed:
        lengths = torch.randint(1, T + 1, (B,))
        lengths[0], lengths[-1] = T, 1
    seq = _bidir_run(m, x, lengths, "sequential", monkeypatch, grad)
    con = _bidir_run(m, x, lengths, "concurrent", monkeypatch, grad)
    assert len(seq) == len(con)
    for i, (a, b) in enumerate(zip(seq, con)):
        assert a is not None and b is not None, i
        assert torch.equal(a, b), (i, (a - b).abs().max())
    if grad and dtype == torch.float64 and layers == 2:  # and the shared answer is torch's
        ref = torch.nn.LSTM(I, H, layers, bias=bias, batch_first=batch_first, bidirectional=True, proj_size=proj,
                            dtype=dtype)
        ref.load_state_dict(m.state_dict())
        want = _bidir_run(ref, x, lengths, "sequential", monkeypatch)
        for a, b in zip(con, want):
            _close(a, b)


@needs_bidir
def test_bidir_one_thread_and_env(monkeypatch):
    torch.manual_seed(0)
    m = LSTM(4, 5, bidirectional=True, dtype=DT)
    x = torch.randn(3, 2, 4, dtype=DT)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.delenv("FASTATTN_LSTM_BIDIR", raising=False)
        assert L.bidir_mode() == "sequential"
        one = _bidir_run(m, x, None, "concurrent", monkeypatch)  # the op itself runs them one after the other
    finally:
        torch.set_num_threads(prev)
    two = _bidir_run(m, x, None, "sequential", monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    monkeypatch.delenv("FASTATTN_LSTM_BIDIR", raising=False)
    if prev >= 2:
        assert L.bidir_mode(32) == "concurrent"
        assert L.bidir_mode(128) == "sequential"  # measured slower there (see fastattn/ops/lstm.py)
    monkeypatch.setenv("FASTATTN_LSTM_BIDIR", "concurrent")
    assert L.bidir_mode(128) == "concurrent"
    monkeypatch.setenv("FASTATTN_LSTM_BIDIR", "both")
    with pytest.raises(ValueError, match="FASTATTN_LSTM_BIDIR"):
        m(x)
    monkeypatch.setenv("FASTATTN_LSTM_BIDIR", "concurrent")
    with pytest.raises(RuntimeError, match="w_hh"):  # the native check of each direction still fires
        torch.ops.fastattn.lstm_bidir_layer_fwd(x, x[0, :, :5].new_zeros(2, 5), x.new_zeros(2, 5),
                                                x.new_zeros(2, 5), x.new_zeros(2, 5), m.weight_ih_l0.detach(),
                                                m.weight_hh_l0.detach(), None, None, None, m.weight_ih_l0.detach(),
                                                m.weight_ih_l0.detach(), None, None, None, None, True)


@needs_bidir
@pytest.mark.parametrize("proj,lengths,bias,concurrent", [(0, False, True, True), (2, True, False, True),
                                                          (0, True, True, False)])
def test_opcheck_bidir(proj, lengths, bias, concurrent):
    f = _layer_args(proj, lengths, bias, dtype=torch.float32)
    torch.manual_seed(3)
    r = [torch.randn_like(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in f]
    # input, h0, c0, h0_r, c0_r, w_ih, w_hh, b_ih, b_hh, w_hr, (reverse's five), lengths, concurrent
    args = [f[0], f[1], f[2], r[1], r[2], *f[3:8], *r[3:8], f[9], concurrent]
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a.requires_grad_()
    torch.library.opcheck(torch.ops.fastattn.lstm_bidir_layer_fwd.default, args)
    a = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
    torch.library.opcheck(torch.ops.fastattn.lstm_bidir_layer_infer.default, a)
    out = torch.ops.fastattn.lstm_bidir_layer_fwd(*a)
    grads = [torch.randn_like(t) for t in out[:6]]
    bwd_args = [*grads, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[9], a[10], a[11], a[14],
                out[0], out[6], out[7], out[8], out[3], out[9], out[10], out[11], a[15], concurrent]
    torch.library.opcheck(torch.ops.fastattn.lstm_bidir_layer_bwd.default, bwd_args)
    # and each direction is the one-direction op's, bit for bit
    fwd = torch.ops.fastattn.lstm_layer_fwd(a[0], a[1], a[2], *a[5:10], False, a[15])
    rev = torch.ops.fastattn.lstm_layer_fwd(a[0], a[3], a[4], *a[10:15], True, a[15])
    for x, y in zip(out, list(fwd[:3]) + list(rev[:3]) + list(fwd[3:]) + list(rev[3:])):
        assert torch.equal(x, y)
