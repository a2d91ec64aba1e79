"""fastattn.optim (SGD, Adam, AdamW) and the fused step ops against torch.optim(foreach=False)."""
import copy
import itertools
import math
import os

import pytest
import torch

import fastattn  # noqa: F401
from fastattn import _ext
from fastattn.ops import optim as optim_ops
from fastattn.optim import SGD, Adam, AdamW

HAS_GPU = torch.cuda.is_available()
# torch's CPU sqrt is MKL's; our Adam calls it too under FASTATTN_OPTIM_SQRT=torch (bit-exact with
# torch), else the IEEE sqrt (1 ulp off in some elements, see test_adam_default_ieee_sqrt).
HAS_MKL = torch.backends.mkl.is_available()
HAS_CPU_KERNEL = _ext.has_kernel("adam_step_", "CPU")
needs_cpu_kernel = pytest.mark.skipif(not HAS_CPU_KERNEL, reason="the compiled CPU kernels are not loaded")
needs_triton = pytest.mark.skipif(
    not (HAS_GPU or os.environ.get("TRITON_INTERPRET") == "1"), reason="triton needs a GPU or TRITON_INTERPRET=1")

SHAPES = [(33, 17), (7,), (1,), (0,), (3, 0, 2), (70001,), (2, 3, 5)]
SMALL_SHAPES = [(33, 17), (7,), (1,), (0,), (130,)]

SGD_OPTIONS = [
    dict(zip(("momentum", "dampening", "nesterov", "weight_decay", "maximize"), v))
    for v in itertools.product((0.0, 0.9), (0.0, 0.3), (False, True), (0.0, 0.05), (False, True))
    if not (v[2] and (v[0] == 0 or v[1] != 0))
]
ADAM_OPTIONS = [
    dict(zip(("weight_decay", "amsgrad", "maximize", "betas"), v))
    for v in itertools.product((0.0, 0.05), (False, True), (False, True), ((0.9, 0.999), (0.3, 0.9)))
]


@pytest.fixture(autouse=True)
def torch_sqrt(monkeypatch):
    monkeypatch.setenv("FASTATTN_OPTIM_SQRT", "torch")


def _opt_id(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items())


def make_params(shapes, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float32).to(device=device, dtype=dtype).requires_grad_()
            for s in shapes]


def grads_for(step, params, none_every=3):
    """Deterministic gradients; param i gets no gradient on some steps (None grads are skipped)."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for i, p in enumerate(params):
        if none_every and (step + i) % none_every == 0 and i % 2 == 1:
            out.append(None)
        else:
            out.append(torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype))
    return out


def two_groups(params, **extra):
    return [{"params": params[::2]}, {"params": params[1::2], **extra}]


def run_steps(opt, params, steps, start=0, none_every=3):
    for s in range(start, start + steps):
        for p, g in zip(params, grads_for(s, params, none_every)):
            p.grad = None if g is None else g.clone()
        opt.step()


def assert_same(ours, theirs, exact=True, atol=0.0, rtol=0.0):
    if exact and not HAS_MKL:  # no MKL sqrt to match torch's with: 1-ulp differences
        exact, atol, rtol = False, 1e-5, 1e-5
    for a, b in zip(ours, theirs):
        if exact:
            assert torch.equal(a.detach(), b.detach()), (a.detach() - b.detach()).abs().max()
        else:
            torch.testing.assert_close(a.detach(), b.detach(), atol=atol, rtol=rtol)


def assert_same_state(ours, theirs, exact=True, atol=0.0, rtol=0.0):
    if exact and not HAS_MKL:
        exact, atol, rtol = False, 1e-5, 1e-5
    so, st = ours.state_dict(), theirs.state_dict()
    assert set(so["state"]) == set(st["state"])
    for k in so["state"]:
        assert set(so["state"][k]) == set(st["state"][k]), (so["state"][k].keys(), st["state"][k].keys())
        for name in so["state"][k]:
            a, b = so["state"][k][name], st["state"][k][name]
            if name == "step":
                assert float(a) == float(b)
            elif exact:
                assert torch.equal(a, b), name
            else:
                torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    skip = ("params", "foreach", "fused")  # the tests ask torch for its for-loop implementation
    go = [{k: v for k, v in g.items() if k not in skip} for g in so["param_groups"]]
    gt = [{k: v for k, v in g.items() if k not in skip} for g in st["param_groups"]]
    assert go == gt


def pair(torch_cls, ours_cls, shapes, kw, backend, dtype=torch.float32, extra_group=None):
    ref_params = make_params(shapes, dtype)
    our_params = make_params(shapes, dtype)
    extra_group = extra_group or {"lr": 0.03}
    ref = torch_cls(two_groups(ref_params, **extra_group), foreach=False, **kw)
    ours = ours_cls(two_groups(our_params, **extra_group), backend=backend, **kw)
    return ref_params, ref, our_params, ours


# --------------------------------------------------------------------------------------------
# Bit-exact against torch's for-loop implementation (CPU kernel and the reference backend).
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,kw", [("cpu", kw) for kw in SGD_OPTIONS] + [("reference", kw) for kw in SGD_OPTIONS[::5]],
                         ids=lambda x: _opt_id(x) if isinstance(x, dict) else x)
def test_sgd_matches_torch_bitwise(kw, backend):
    if backend == "cpu" and not HAS_CPU_KERNEL:
        pytest.skip("the compiled CPU kernels are not loaded")
    ref_p, ref, our_p, ours = pair(torch.optim.SGD, SGD, SHAPES, dict(lr=0.01, **kw), backend)
    run_steps(ref, ref_p, 8)
    run_steps(ours, our_p, 8)
    assert_same(our_p, ref_p)
    assert_same_state(ours, ref)


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
@pytest.mark.parametrize("backend,kw", [("cpu", kw) for kw in ADAM_OPTIONS] + [("reference", kw) for kw in ADAM_OPTIONS[::5]],
                         ids=lambda x: _opt_id(x) if isinstance(x, dict) else x)
def test_adam_matches_torch_bitwise(kw, cls, backend):
    if backend == "cpu" and not HAS_CPU_KERNEL:
        pytest.skip("the compiled CPU kernels are not loaded")
    torch_cls, our_cls = getattr(torch.optim, cls), {"Adam": Adam, "AdamW": AdamW}[cls]
    ref_p, ref, our_p, ours = pair(torch_cls, our_cls, SHAPES, dict(lr=0.01, eps=1e-6, **kw), backend,
                                   extra_group={"lr": 0.003, "betas": (0.8, 0.95)})
    run_steps(ref, ref_p, 8)
    run_steps(ours, our_p, 8)
    assert_same(our_p, ref_p)
    assert_same_state(ours, ref)


@needs_cpu_kernel
@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
@pytest.mark.parametrize("kw", ADAM_OPTIONS[::3], ids=_opt_id)
def test_adam_default_ieee_sqrt(kw, cls, monkeypatch):
    """Default: correctly rounded sqrt; within a few float32 ulps of torch after many steps."""
    monkeypatch.delenv("FASTATTN_OPTIM_SQRT")
    torch_cls, our_cls = getattr(torch.optim, cls), {"Adam": Adam, "AdamW": AdamW}[cls]
    ref_p, ref, our_p, ours = pair(torch_cls, our_cls, SHAPES, dict(lr=0.01, **kw), "cpu")
    run_steps(ref, ref_p, 20)
    run_steps(ours, our_p, 20)
    for a, b in zip(our_p, ref_p):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-6)
    assert_same_state(ours, ref, exact=False, atol=1e-7, rtol=1e-5)


@needs_cpu_kernel
@pytest.mark.parametrize("cls", ["SGD", "Adam", "AdamW"])
def test_float64_and_many_steps(cls):
    kw = dict(lr=0.01, momentum=0.9, nesterov=True) if cls == "SGD" else dict(lr=0.01, amsgrad=True)
    torch_cls, our_cls = getattr(torch.optim, cls), {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}[cls]
    for dtype in (torch.float64, torch.float32):
        ref_p, ref, our_p, ours = pair(torch_cls, our_cls, SHAPES[:3], kw, "cpu", dtype)
        run_steps(ref, ref_p, 60)
        run_steps(ours, our_p, 60)
        assert_same(our_p, ref_p)


@needs_cpu_kernel
@pytest.mark.parametrize("cls", ["SGD", "Adam", "AdamW"])
def test_tensor_lr(cls):
    kw = dict(momentum=0.9) if cls == "SGD" else dict(weight_decay=0.1)
    torch_cls, our_cls = getattr(torch.optim, cls), {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}[cls]
    ref_p, our_p = make_params(SHAPES), make_params(SHAPES)
    ref = torch_cls(ref_p, lr=torch.tensor(0.01), foreach=False, **kw)
    ours = our_cls(our_p, lr=torch.tensor(0.01), backend="cpu", **kw)
    run_steps(ref, ref_p, 6)
    run_steps(ours, our_p, 6)
    assert_same(our_p, ref_p)


@needs_cpu_kernel
@pytest.mark.parametrize("cls", ["SGD", "Adam"])
def test_non_contiguous_and_complex_params(cls):
    kw = dict(lr=0.01, momentum=0.9) if cls == "SGD" else dict(lr=0.01)
    torch_cls, our_cls = getattr(torch.optim, cls), {"SGD": SGD, "Adam": Adam}[cls]

    def params():
        g = torch.Generator().manual_seed(3)
        a = torch.randn(20, 30, generator=g).t().requires_grad_()  # transposed: not contiguous
        b = torch.randn(5, 4, dtype=torch.complex64, generator=g).requires_grad_()
        return [a, b]

    ref_p, our_p = params(), params()
    ref, ours = torch_cls(ref_p, foreach=False, **kw), our_cls(our_p, backend="cpu", **kw)
    for s in range(5):
        g = torch.Generator().manual_seed(s)
        for rp, op in zip(ref_p, our_p):
            grad = torch.randn(rp.shape, dtype=rp.dtype, generator=g)
            rp.grad, op.grad = grad.clone(), grad.clone()
        ref.step()
        ours.step()
    assert not our_p[0].is_contiguous()
    assert_same(our_p[:1], ref_p[:1])
    assert_same(our_p[1:], ref_p[1:], exact=False, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# float16 / bfloat16: fp32 math, one rounding per step; must beat (or match) torch's per-op rounding.
# --------------------------------------------------------------------------------------------
def _low_precision_errors(cls, kw, dtype, backend, shapes=SHAPES[:3], steps=10):
    torch_cls, our_cls = getattr(torch.optim, cls), {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}[cls]
    exact_p = make_params(shapes, torch.float32)
    low_p = make_params(shapes, dtype)
    our_p = make_params(shapes, dtype)
    exact = torch_cls(exact_p, foreach=False, **kw)
    low = torch_cls(low_p, foreach=False, **kw)
    ours = our_cls(our_p, backend=backend, **kw)
    for s in range(steps):
        gs = grads_for(s, exact_p, none_every=0)
        for ps in (exact_p, low_p, our_p):
            for p, g in zip(ps, gs):
                p.grad = g.to(p.dtype)  # same rounded gradient for everyone
        exact_p_grads = [p.grad.to(dtype).float() for p in exact_p]
        for p, g in zip(exact_p, exact_p_grads):
            p.grad = g
        exact.step()
        low.step()
        ours.step()
    err_ours = max((a.float() - b).abs().max().item() for a, b in zip(our_p, exact_p) if a.numel())
    err_torch = max((a.float() - b).abs().max().item() for a, b in zip(low_p, exact_p) if a.numel())
    return err_ours, err_torch


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls,kw", [("SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
                                    ("Adam", dict(lr=0.01, weight_decay=0.01, amsgrad=True)),
                                    ("AdamW", dict(lr=0.01))])
def test_low_precision_params(cls, kw, dtype):
    err_ours, err_torch = _low_precision_errors(cls, kw, dtype, "cpu")
    if math.isnan(err_torch):  # torch's float16 Adam: exp_avg_sq underflows, eps rounds to 0 -> 0/0
        assert err_ours < 0.02, err_ours
        return
    assert err_ours <= 2 * err_torch + 1e-6, (err_ours, err_torch)


# --------------------------------------------------------------------------------------------
# fp32 master weights (master_weights=True) for float16/bfloat16 params.
# --------------------------------------------------------------------------------------------
MASTER_CASES = [("SGD", dict(lr=1e-3, momentum=0.9, weight_decay=0.01)),
                ("SGD", dict(lr=1e-3, momentum=0.9, nesterov=True, maximize=True)),
                ("Adam", dict(lr=1e-3, weight_decay=0.01, amsgrad=True)),
                ("AdamW", dict(lr=1e-3, weight_decay=0.1))]
CLASSES = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}


def _drift_grads(step, params, dtype):
    """Gradients with a steady sign (0.5 + noise), rounded to dtype: small steps that all go one way."""
    g = torch.Generator().manual_seed(500 + step)
    return [(0.5 + 0.1 * torch.randn(p.shape, generator=g)).to(p.device, dtype) for p in params]


def _master_run(cls, kw, dtype, master_weights, backend, steps, shapes=((300, 7), (1,), (0,), (1000,)),
                device="cpu"):
    """N steps on `dtype` params, and torch's float32 run from the same start with the same rounded grads."""
    start = [p.detach().to(dtype) for p in make_params(shapes)]
    exact_p = [p.float().to(device).requires_grad_() for p in start]
    our_p = [p.to(device).requires_grad_() for p in start]
    exact = getattr(torch.optim, cls)(exact_p, foreach=False, **kw)
    ours = CLASSES[cls](our_p, backend=backend, master_weights=master_weights, **kw)
    for s in range(steps):
        for p, q, g in zip(exact_p, our_p, _drift_grads(s, exact_p, dtype)):
            p.grad, q.grad = g.float(), g.clone()
        exact.step()
        ours.step()
    return exact_p, our_p, ours


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls,kw", MASTER_CASES, ids=str)
def test_master_weights_track_float32_run(cls, kw, dtype):
    """With masters the low-precision params are torch's float32 run rounded (bit for bit on the CPU:
    the master *is* that run); without, most of the small steps are rounded away."""
    exact_p, our_p, ours = _master_run(cls, kw, dtype, True, "cpu", steps=30)
    for p, e in zip(our_p, exact_p):
        state = ours.state[p]
        assert state["master_param"].dtype == torch.float32 and p.dtype == dtype
        assert all(t.dtype == torch.float32 for k, t in state.items() if k not in ("step", "master_param"))
        assert_same([state["master_param"]], [e])
        assert torch.equal(p.detach(), e.detach().to(dtype))
    # the same run without master weights drifts away from the float32 run (what the masters fix)
    exact_p, low_p, _ = _master_run(cls, kw, dtype, False, "cpu", steps=30)
    mean_err = lambda ps: torch.cat([(a.float() - b).abs().flatten() for a, b in zip(ps, exact_p)]).mean().item()  # noqa: E731
    err_low, err_master = mean_err(low_p), mean_err(our_p)
    assert err_low > 5 * err_master, (err_low, err_master)


@needs_cpu_kernel
@pytest.mark.parametrize("cls,kw", MASTER_CASES[::2], ids=str)
def test_master_weights_reference_backend_and_float32_params_unchanged(cls, kw):
    _, cpu_p, cpu_opt = _master_run(cls, kw, torch.bfloat16, True, "cpu", steps=5)
    _, ref_p, ref_opt = _master_run(cls, kw, torch.bfloat16, True, "reference", steps=5)
    assert_same(cpu_p, ref_p)
    assert_same([cpu_opt.state[p]["master_param"] for p in cpu_p], [ref_opt.state[p]["master_param"] for p in ref_p])
    # float32 params: master_weights changes nothing (no master, torch's result bit for bit)
    ref_p, ref, our_p, _ = pair(getattr(torch.optim, cls), CLASSES[cls], SHAPES[:3], kw, "cpu")
    ours = CLASSES[cls](two_groups(our_p, lr=0.03), backend="cpu", master_weights=True, **kw)
    run_steps(ref, ref_p, 5)
    run_steps(ours, our_p, 5)
    assert_same(our_p, ref_p)
    assert_same_state(ours, ref)


@needs_cpu_kernel
@pytest.mark.parametrize("cls,kw", MASTER_CASES[::2], ids=str)
def test_master_weights_state_dict_round_trip(cls, kw):
    _, our_p, ours = _master_run(cls, kw, torch.bfloat16, True, "cpu", steps=4)
    saved = copy.deepcopy(ours.state_dict())
    assert all(s["master_param"].dtype == torch.float32 for s in saved["state"].values())
    new_p = [p.detach().clone().requires_grad_() for p in our_p]
    loaded = CLASSES[cls](new_p, backend="cpu", master_weights=True, **kw)
    loaded.load_state_dict(saved)
    for p, q in zip(our_p, new_p):  # masters and state back in float32, not cast to bf16 as torch would
        for key, value in ours.state[p].items():
            assert loaded.state[q][key].dtype == value.dtype and torch.equal(loaded.state[q][key], value), key
    for s in range(4, 7):
        for p, q, g in zip(our_p, new_p, _drift_grads(s, our_p, torch.bfloat16)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        loaded.step()
    assert_same(new_p, our_p)
    assert_same([loaded.state[q]["master_param"] for q in new_p], [ours.state[p]["master_param"] for p in our_p])
    # torch's optimizers load it too (they cast the state to bf16 and ignore the master)
    torch_p = [p.detach().clone().requires_grad_() for p in our_p]
    getattr(torch.optim, cls)(torch_p, foreach=False, **kw).load_state_dict(copy.deepcopy(ours.state_dict()))


@needs_cpu_kernel
def test_master_weights_mixed_group_and_grad_scaler():
    """bf16 and float32 params in one group: the bf16 ones get masters, the float32 ones don't;
    grad_scale / found_inf work on the master path (grads unscaled in place, in bf16)."""
    p16 = torch.randn(50, generator=torch.Generator().manual_seed(1)).bfloat16().requires_grad_()
    p32 = torch.randn(40, generator=torch.Generator().manual_seed(2)).requires_grad_()
    opt = Adam([p16, p32], lr=0.01, backend="cpu", master_weights=True)
    p16.grad, p32.grad = torch.ones(50, dtype=torch.bfloat16) * 8, torch.ones(40) * 8
    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
    opt.step()
    assert "master_param" in opt.state[p16] and "master_param" not in opt.state[p32]
    assert torch.equal(p16.grad, torch.ones(50, dtype=torch.bfloat16))
    before = (p16.detach().clone(), opt.state[p16]["master_param"].clone())
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert torch.equal(p16, before[0]) and torch.equal(opt.state[p16]["master_param"], before[1])


def test_master_params_op_checks():
    p = [torch.zeros(3, dtype=torch.bfloat16)]
    g = [torch.zeros(3, dtype=torch.bfloat16)]
    with pytest.raises(TypeError, match=r"params\[0\] must be float16 or bfloat16 when master_params"):
        optim_ops.sgd_step_([torch.zeros(3)], [torch.zeros(3)], [], [], lr=0.1, master_params=[torch.zeros(3)])
    with pytest.raises(TypeError, match=r"master_params\[0\] has dtype torch.bfloat16, expected torch.float32"):
        optim_ops.sgd_step_(p, g, [], [], lr=0.1, master_params=[torch.zeros(3, dtype=torch.bfloat16)])
    with pytest.raises(TypeError, match=r"momentum_buffers\[0\] has dtype torch.bfloat16, expected torch.float32"):
        optim_ops.sgd_step_(p, g, [torch.zeros(3, dtype=torch.bfloat16)], [True], lr=0.1, momentum=0.9,
                            master_params=[torch.zeros(3)])
    with pytest.raises(ValueError, match=r"master_params\[0\] has shape \(4,\)"):
        optim_ops.adam_step_(p, g, [torch.zeros(3)], [torch.zeros(3)], [], [torch.tensor(0.0)], lr=0.1,
                             master_params=[torch.zeros(4)])


@needs_cpu_kernel
def test_master_params_native_checks_and_opcheck():
    p, g = [torch.zeros(3, dtype=torch.bfloat16)], [torch.zeros(3, dtype=torch.bfloat16)]
    with pytest.raises(RuntimeError, match=r"params\[0\] must be float16 or bfloat16, got Float"):
        torch.ops.fastattn.sgd_step_([torch.zeros(3)], [torch.zeros(3)], [], [], 0.1, 0.0, 0.0, 0.0, False, False,
                                     None, None, None, [torch.zeros(3)])
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] has dtype BFloat16, expected Float"):
        torch.ops.fastattn.adam_step_(p, g, [torch.zeros(3, dtype=torch.bfloat16)], [torch.zeros(3)], [],
                                      [torch.tensor(0.0)], 0.1, 0.9, 0.999, 1e-8, 0.0, False, False, False,
                                      None, None, None, [torch.zeros(3)])
    shapes = [(5, 3), (1,), (0,), (40000,)]
    for dtype in (torch.bfloat16, torch.float16):
        params, grads, m, v, vmax, steps = _adam_op_inputs(shapes, dtype, True)
        masters = [t.float() for t in params]
        m, v, vmax = ([t.float() for t in ts] for ts in (m, v, vmax))
        torch.library.opcheck(torch.ops.fastattn.adam_step_.default,
                              (params, grads, m, v, vmax, steps, 0.01, 0.9, 0.999, 1e-8, 0.1, True, False, True,
                               None, torch.tensor(4.0), torch.tensor(0.0), masters))
        torch.library.opcheck(torch.ops.fastattn.sgd_step_.default,
                              (params, grads, m, [True, False, False, True], 0.01, 0.9, 0.0, 0.01, True, False,
                               None, None, None, masters))


# --------------------------------------------------------------------------------------------
# state_dict in torch's format, both ways, and training continues identically.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu_kernel), "reference"])
@pytest.mark.parametrize("cls,kw", [("SGD", dict(lr=0.01, momentum=0.9, nesterov=True)),
                                    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
                                    ("AdamW", dict(lr=0.01))])
def test_state_dict_round_trips(cls, kw, backend):
    torch_cls, our_cls = getattr(torch.optim, cls), {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}[cls]
    # torch -> ours
    ref_p = make_params(SHAPES)
    ref = torch_cls(two_groups(ref_p, lr=0.02), foreach=False, **kw)
    run_steps(ref, ref_p, 4)
    saved = copy.deepcopy(ref.state_dict())
    our_p = [p.detach().clone().requires_grad_() for p in ref_p]
    ours = our_cls(two_groups(our_p, lr=0.5), backend=backend, **kw)
    ours.load_state_dict(saved)
    assert ours.param_groups[1]["lr"] == 0.02
    run_steps(ref, ref_p, 4, start=4)
    run_steps(ours, our_p, 4, start=4)
    assert_same(our_p, ref_p)
    assert_same_state(ours, ref)
    # ours -> torch
    saved = copy.deepcopy(ours.state_dict())
    back_p = [p.detach().clone().requires_grad_() for p in our_p]
    back = torch_cls(two_groups(back_p, lr=0.5), foreach=False, **kw)
    back.load_state_dict(saved)
    run_steps(back, back_p, 3, start=8)
    run_steps(ours, our_p, 3, start=8)
    assert_same(our_p, back_p)


# --------------------------------------------------------------------------------------------
# Argument errors: torch's types and messages.
# --------------------------------------------------------------------------------------------
BAD_ARGS = [
    ("SGD", dict(lr=-0.1), "Invalid learning rate"),
    ("SGD", dict(lr=0.1, momentum=-0.5), "Invalid momentum value"),
    ("SGD", dict(lr=0.1, weight_decay=-1.0), "Invalid weight_decay value"),
    ("SGD", dict(lr=0.1, nesterov=True), "Nesterov momentum requires a momentum and zero dampening"),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "Nesterov momentum requires"),
    ("SGD", dict(lr=torch.tensor([0.1, 0.2])), "Tensor lr must be 1-element"),
    ("Adam", dict(lr=-1e-3), "Invalid learning rate"),
    ("Adam", dict(eps=-1.0), "Invalid epsilon value"),
    ("Adam", dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0"),
    ("Adam", dict(betas=(-0.1, 0.999)), "Invalid beta parameter at index 0"),
    ("Adam", dict(betas=(0.9, 1.5)), "Invalid beta parameter at index 1"),
    ("Adam", dict(weight_decay=-0.1), "Invalid weight_decay value"),
    ("Adam", dict(betas=(0.9, torch.tensor(0.99))), "betas must be either both floats or both Tensors"),
    ("AdamW", dict(lr=-1.0), "Invalid learning rate"),
    ("AdamW", dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1"),
]


@pytest.mark.parametrize("cls,kw,msg", BAD_ARGS)
def test_bad_arguments_raise_torchs_errors(cls, kw, msg):
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match=msg) as theirs:
        getattr(torch.optim, cls)(p, **kw)
    with pytest.raises(ValueError, match=msg) as ours:
        {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}[cls](p, **kw)
    assert str(ours.value) == str(theirs.value)


def test_unsupported_switches_and_backend_name():
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(RuntimeError, match="differentiable"):
        Adam(p, differentiable=True)
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        SGD(p, fused=True, foreach=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        AdamW(p, backend="gpu")
    Adam(p, fused=True, capturable=True)  # accepted: our step is always fused
    SGD(p, foreach=True)


def test_sparse_gradients_as_torch():
    def run(cls, **kw):
        emb = torch.nn.Embedding(10, 3, sparse=True)
        with torch.no_grad():
            emb.weight.copy_(torch.arange(30.0).view(10, 3) / 7)
        opt = cls(emb.parameters(), lr=0.1, **kw)
        for s in range(3):
            emb(torch.tensor([1, 4, 4, s])).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
        return emb.weight.detach()

    for kw in (dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True, maximize=True)):
        assert torch.equal(run(SGD, **kw), run(torch.optim.SGD, foreach=False, **kw))
    with pytest.raises(RuntimeError, match=r"add\(sparse, dense\) is not supported"):  # as torch
        run(torch.optim.SGD, weight_decay=0.1, foreach=False)
    with pytest.raises(RuntimeError, match=r"add\(sparse, dense\) is not supported"):
        run(SGD, weight_decay=0.1)
    for cls in (Adam, AdamW):
        with pytest.raises(RuntimeError, match="Adam does not support sparse gradients"):
            run(cls)


# --------------------------------------------------------------------------------------------
# torch.amp.GradScaler: unscale inside the kernel, skip the whole step on inf/NaN.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu_kernel), "reference"])
@pytest.mark.parametrize("cls,kw", [("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", dict(lr=0.01, amsgrad=True)),
                                    ("AdamW", dict(lr=0.01))])
@pytest.mark.parametrize("explicit_unscale", [False, True])
def test_grad_scaler(cls, kw, backend, explicit_unscale):
    torch_cls, our_cls = getattr(torch.optim, cls), {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}[cls]

    def train(make_opt):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
        opt = make_opt(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        scales = []
        for s in range(6):
            x = torch.randn(8, 5, generator=torch.Generator().manual_seed(s))
            loss = model(x).pow(2).mean()
            if s == 2:
                loss = loss * float("inf")  # this step must be skipped
            scaler.scale(loss).backward()
            if explicit_unscale:
                scaler.unscale_(opt)
            before = [p.detach().clone() for p in model.parameters()]
            scaler.step(opt)
            if s == 2:
                assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
            scaler.update()
            scales.append(scaler.get_scale())
            opt.zero_grad()
        return [p.detach() for p in model.parameters()], opt, scales

    ref_p, ref, ref_scales = train(lambda ps: torch_cls(ps, foreach=False, **kw))
    our_p, ours, our_scales = train(lambda ps: our_cls(ps, backend=backend, **kw))
    assert ref_scales == our_scales and ref_scales[2] == 2.0 ** 9
    assert_same(our_p, ref_p)
    assert_same_state(ours, ref)


# --------------------------------------------------------------------------------------------
# The ops themselves.
# --------------------------------------------------------------------------------------------
def _adam_op_inputs(shapes, dtype=torch.float32, amsgrad=True, device="cpu"):
    g = torch.Generator().manual_seed(7)
    mk = lambda: [torch.randn(s, generator=g).to(device, dtype) for s in shapes]  # noqa: E731
    params, grads, m = mk(), mk(), mk()
    v = [t.abs() for t in mk()]
    vmax = [t.abs() for t in mk()] if amsgrad else []
    steps = [torch.tensor(float(i + 1), device=device) for i in range(len(shapes))]
    return params, grads, m, v, vmax, steps


@needs_cpu_kernel
def test_opcheck_native_ops():
    shapes = [(5, 3), (1,), (0,), (40000,)]
    for dtype in (torch.float32, torch.bfloat16):
        for amsgrad in (False, True):
            params, grads, m, v, vmax, steps = _adam_op_inputs(shapes, dtype, amsgrad)
            torch.library.opcheck(torch.ops.fastattn.adam_step_.default,
                                  (params, grads, m, v, vmax, steps, 0.01, 0.9, 0.999, 1e-8, 0.1, amsgrad, True,
                                   False, None, torch.tensor(4.0), torch.tensor(0.0)))
        params, grads, bufs, _, _, _ = _adam_op_inputs(shapes, dtype)
        torch.library.opcheck(torch.ops.fastattn.sgd_step_.default,
                              (params, grads, bufs, [True, False, False, True], 0.01, 0.9, 0.0, 0.01, True, False,
                               torch.tensor(0.02), None, None))
        torch.library.opcheck(torch.ops.fastattn.sgd_step_.default,
                              (params, grads, [], [], 0.01, 0.0, 0.0, 0.0, False, False, None, None, None))


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu_kernel), "reference"])
def test_op_found_inf_skips_and_grad_scale_unscales(backend):
    params, grads, m, v, vmax, steps = _adam_op_inputs(SHAPES)
    before = [t.clone() for t in params + grads + m + v + vmax + steps]
    optim_ops.adam_step_(params, grads, m, v, vmax, steps, lr=0.1, amsgrad=True, grad_scale=torch.tensor(8.0),
                         found_inf=torch.tensor(1.0), backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(before, params + grads + m + v + vmax + steps))
    optim_ops.adam_step_(params, grads, m, v, vmax, steps, lr=0.1, amsgrad=True, grad_scale=torch.tensor(8.0),
                         found_inf=torch.tensor(0.0), backend=backend)
    assert all(torch.equal(g, b / 8) for g, b in zip(grads, before[len(params):2 * len(params)]))
    assert [float(s) for s in steps] == [float(s) + 1 for s in before[-len(steps):]]
    assert not torch.equal(params[0], before[0])


@needs_cpu_kernel
def test_op_mixed_dtypes_in_one_call_match_reference():
    shapes = [(300,), (17, 3), (1,)]
    lists = []
    for backend in ("cpu", "reference"):
        ps, gs, ms, vs, xs, ss = [], [], [], [], [], []
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            p, g, m, v, x, s = _adam_op_inputs(shapes, dtype)
            ps += p; gs += g; ms += m; vs += v; xs += x; ss += s  # noqa: E702
        optim_ops.adam_step_(ps, gs, ms, vs, xs, ss, lr=0.01, amsgrad=True, weight_decay=0.1, backend=backend)
        lists.append(ps + ms + vs + xs)
    for a, b in zip(*lists):
        if a.dtype == torch.bfloat16:  # one rounding (ours) vs one per op (reference)
            torch.testing.assert_close(a, b, atol=0.05, rtol=0.02)
        else:
            assert torch.equal(a, b)


def test_op_bad_inputs():
    p = [torch.zeros(3)]
    with pytest.raises(ValueError, match=r"grads has 0 tensors, params has 1"):
        optim_ops.sgd_step_(p, [], [], [], lr=0.1)
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype torch.float64"):
        optim_ops.sgd_step_(p, [torch.zeros(3, dtype=torch.float64)], [], [], lr=0.1)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(4,\)"):
        optim_ops.sgd_step_(p, [torch.zeros(4)], [], [], lr=0.1)
    with pytest.raises(TypeError, match=r"params\[0\] must be float16, bfloat16, float32 or float64"):
        optim_ops.sgd_step_([torch.zeros(3, dtype=torch.int32)], [torch.zeros(3, dtype=torch.int32)], [], [], lr=1.0)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        optim_ops.sgd_step_(p, [torch.zeros(3)], [], [], lr=-1.0)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        optim_ops.adam_step_(p, [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], [], [torch.tensor(0.0)],
                             lr=0.1, beta2=1.0)
    with pytest.raises(ValueError, match="grad_scale must have exactly one element"):
        optim_ops.sgd_step_(p, [torch.zeros(3)], [], [], lr=0.1, grad_scale=torch.ones(2))
    with pytest.raises(ValueError, match="state_steps has 0 tensors"):
        optim_ops.adam_step_(p, [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], [], [], lr=0.1)
    with pytest.raises(NotImplementedError, match="backend='cuda' cannot run this input"):
        optim_ops.sgd_step_(p, [torch.zeros(3)], [], [], lr=0.1, backend="cuda")


@needs_cpu_kernel
def test_native_op_checks_in_cpp():
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape"):
        torch.ops.fastattn.sgd_step_([torch.zeros(3)], [torch.zeros(4)], [], [], 0.1, 0.0, 0.0, 0.0, False, False)
    with pytest.raises(RuntimeError, match="state_steps has 0 tensors"):
        torch.ops.fastattn.adam_step_([torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], [], [],
                                      0.1, 0.9, 0.999, 1e-8, 0.0, False, False, False)


# --------------------------------------------------------------------------------------------
# Triton (interpreter on CPU here, the GPU when there is one): tight tolerance.
# --------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.9, dampening=0.3, weight_decay=0.1, maximize=True),
                                dict(momentum=0.9, nesterov=True)], ids=_opt_id)
def test_triton_sgd(kw, triton_device):
    ref_p, ref = [p.to(triton_device).detach().requires_grad_() for p in make_params(SMALL_SHAPES)], None
    our_p = [p.detach().clone().requires_grad_() for p in ref_p]
    ref = torch.optim.SGD(two_groups(ref_p, lr=0.03), lr=0.01, foreach=False, **kw)
    ours = SGD(two_groups(our_p, lr=0.03), lr=0.01, backend="triton", **kw)
    run_steps(ref, ref_p, 4)
    run_steps(ours, our_p, 4)
    assert_same(our_p, ref_p, exact=False, atol=1e-6, rtol=1e-5)
    assert_same_state(ours, ref, exact=False, atol=1e-6, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("cls,kw", [("Adam", dict()), ("Adam", dict(weight_decay=0.1, amsgrad=True, maximize=True)),
                                    ("AdamW", dict(amsgrad=True, betas=(0.3, 0.9)))], ids=str)
def test_triton_adam(cls, kw, triton_device):
    torch_cls, our_cls = getattr(torch.optim, cls), {"Adam": Adam, "AdamW": AdamW}[cls]
    ref_p = [p.to(triton_device).detach().requires_grad_() for p in make_params(SMALL_SHAPES)]
    our_p = [p.detach().clone().requires_grad_() for p in ref_p]
    ref = torch_cls(two_groups(ref_p, lr=0.03), lr=0.01, foreach=False, **kw)
    ours = our_cls(two_groups(our_p, lr=0.03), lr=0.01, backend="triton", **kw)
    run_steps(ref, ref_p, 4)
    run_steps(ours, our_p, 4)
    assert_same(our_p, ref_p, exact=False, atol=1e-5, rtol=1e-5)
    assert_same_state(ours, ref, exact=False, atol=1e-5, rtol=1e-5)


@needs_triton
def test_triton_amp_args_and_bf16(triton_device):
    params, grads, m, v, vmax, steps = _adam_op_inputs(SMALL_SHAPES, torch.bfloat16, device=triton_device)
    ref = [[t.clone() for t in ts] for ts in (params, grads, m, v, vmax, steps)]
    before = [t.clone() for t in params]
    optim_ops.adam_step_(params, grads, m, v, vmax, steps, lr=0.1, amsgrad=True, found_inf=torch.tensor(1.0),
                         backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    kw = dict(lr=0.1, amsgrad=True, weight_decay=0.1, grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0))
    optim_ops.adam_step_(params, grads, m, v, vmax, steps, backend="triton", **kw)
    optim_ops.adam_step_(*ref, backend="reference", **kw)
    for a, b in zip(params + grads + m + v + vmax + steps, sum(ref, [])):
        torch.testing.assert_close(a.float(), b.float(), atol=0.02, rtol=0.02)
    sp, sg, sb, _, _, _ = _adam_op_inputs(SMALL_SHAPES, torch.float16, device=triton_device)
    rp, rg, rb = [t.clone() for t in sp], [t.clone() for t in sg], [t.clone() for t in sb]
    new = [True, False, True, False, False]
    optim_ops.sgd_step_(sp, sg, sb, new, lr=0.1, momentum=0.9, grad_scale=torch.tensor(2.0), backend="triton")
    optim_ops.sgd_step_(rp, rg, rb, new, lr=0.1, momentum=0.9, grad_scale=torch.tensor(2.0), backend="reference")
    for a, b in zip(sp + sg + sb, rp + rg + rb):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-3, rtol=2e-3)


class _LaunchCounter:
    """Stands in for a Triton kernel in fastattn.triton.optim and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


MANY_SHAPES = [(0,), (1,), (700,), (3, 0), (1,), (129,), (2049,), (5, 7), (1,), (0,), (513,)]


@needs_triton
@pytest.mark.parametrize("cls,kw", [("SGD", dict(momentum=0.9, weight_decay=0.1)),
                                    ("SGD", dict(momentum=0.9, nesterov=True, maximize=True)),
                                    ("SGD", dict()),
                                    ("Adam", dict(weight_decay=0.1, amsgrad=True)),
                                    ("AdamW", dict(betas=(0.3, 0.9), maximize=True))], ids=str)
def test_triton_multi_tensor_launch(cls, kw, triton_device, monkeypatch):
    """Many tensors of mixed sizes (empty, 1-element, several chunks each): one launch per step, equal
    to torch."""
    from fastattn.triton import optim as triton_optim
    monkeypatch.setattr(triton_optim, "CHUNK", 512)  # several chunks per tensor, several blocks per chunk
    monkeypatch.setattr(triton_optim, "BLOCK", 128)
    kernel = "_sgd_kernel" if cls == "SGD" else "_adam_kernel"
    counter = _LaunchCounter(getattr(triton_optim, kernel))
    monkeypatch.setattr(triton_optim, kernel, counter)
    ref_p = [p.to(triton_device).detach().requires_grad_() for p in make_params(MANY_SHAPES)]
    our_p = [p.detach().clone().requires_grad_() for p in ref_p]
    ref = getattr(torch.optim, cls)(ref_p, lr=0.01, foreach=False, **kw)
    ours = CLASSES[cls](our_p, lr=0.01, backend="triton", **kw)
    run_steps(ref, ref_p, 3, none_every=0)
    run_steps(ours, our_p, 3, none_every=0)
    assert counter.launches == 3
    assert_same(our_p, ref_p, exact=False, atol=1e-6, rtol=1e-5)
    assert_same_state(ours, ref, exact=False, atol=1e-6, rtol=1e-5)


@needs_triton
@needs_cpu_kernel
def test_triton_mixed_dtypes_one_launch_per_dtype(triton_device, monkeypatch):
    from fastattn.triton import optim as triton_optim
    monkeypatch.setattr(triton_optim, "CHUNK", 256)
    counter = _LaunchCounter(triton_optim._adam_kernel)
    monkeypatch.setattr(triton_optim, "_adam_kernel", counter)
    shapes = [(300,), (1,), (0,), (17, 3)]
    results = []
    for backend in ("triton", "cpu"):
        ps, gs, ms, vs, xs, ss = [], [], [], [], [], []
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            p, g, m, v, x, s = _adam_op_inputs(shapes, dtype, device=triton_device if backend == "triton" else "cpu")
            ps += p; gs += g; ms += m; vs += v; xs += x; ss += s  # noqa: E702
        optim_ops.adam_step_(ps, gs, ms, vs, xs, ss, lr=0.01, amsgrad=True, weight_decay=0.1, backend=backend)
        results.append([t.cpu() for t in ps + ms + vs + xs + ss])
    assert counter.launches == 3
    for a, b in zip(*results):  # float32 math in both; one rounding per element to the storage dtype
        tol = {torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[a.dtype]
        torch.testing.assert_close(a, b, atol=1e-6, rtol=tol)


@needs_triton
@needs_cpu_kernel
@pytest.mark.parametrize("cls,kw", MASTER_CASES, ids=str)
def test_triton_master_weights(cls, kw, triton_device):
    """Triton's master-weight step against the CPU kernel's; the bf16 param is its master rounded to
    nearest (checks the kernel's hand-written bf16 rounding: the interpreter's cast truncates)."""
    _, cpu_p, cpu_opt = _master_run(cls, kw, torch.bfloat16, True, "cpu", steps=4, shapes=MANY_SHAPES[:7])
    _, tri_p, tri_opt = _master_run(cls, kw, torch.bfloat16, True, "triton", steps=4, shapes=MANY_SHAPES[:7],
                                    device=triton_device)
    for p, q in zip(tri_p, cpu_p):
        master = tri_opt.state[p]["master_param"]
        assert master.dtype == torch.float32
        assert torch.equal(p.detach(), master.to(torch.bfloat16))
        torch.testing.assert_close(master.cpu(), cpu_opt.state[q]["master_param"], atol=1e-6, rtol=1e-6)
        for key, value in cpu_opt.state[q].items():
            torch.testing.assert_close(tri_opt.state[p][key].cpu(), value, atol=1e-6, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("op", ["adam", "sgd"])
def test_triton_master_params_op_with_amp_args(op, triton_device):
    """The op level: master params with grad_scale / found_inf / lr_tensor, Triton against the reference."""
    runs = []
    for backend in ("triton", "reference"):
        params, grads, m, v, vmax, steps = _adam_op_inputs(MANY_SHAPES[:6], torch.bfloat16, device=triton_device)
        masters = [t.float() + 1e-3 for t in params]  # masters carry more than the params' bits
        m, v, vmax = ([t.float() for t in ts] for ts in (m, v, vmax))
        dev = dict(device=triton_device)
        for found in (1.0, 0.0):  # a skipped step, then a real one
            amp = dict(grad_scale=torch.tensor(4.0, **dev), found_inf=torch.tensor(found, **dev),
                       lr_tensor=torch.tensor(0.05, **dev), master_params=masters, backend=backend)
            if op == "adam":
                optim_ops.adam_step_(params, grads, m, v, vmax, steps, lr=0.1, amsgrad=True, weight_decay=0.1,
                                     decoupled_weight_decay=True, **amp)
            else:
                optim_ops.sgd_step_(params, grads, m, [True] * len(params), lr=0.1, momentum=0.9, nesterov=True,
                                    weight_decay=0.1, **amp)
        runs.append([t.cpu() for t in params + grads + masters + m + v + vmax + steps])
    for a, b in zip(*runs):  # float32 masters and state tight; bf16 params and grads within an ulp
        rtol = 1e-5 if a.dtype == torch.float32 else 2 ** -8
        torch.testing.assert_close(a.float(), b.float(), atol=1e-6, rtol=rtol)


# --------------------------------------------------------------------------------------------
# CUDA (run on a GPU machine).
# --------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("cls,kw", [("SGD", dict(momentum=0.9, nesterov=True, weight_decay=0.1)),
                                    ("SGD", dict(maximize=True)),
                                    ("Adam", dict(weight_decay=0.1, amsgrad=True)),
                                    ("AdamW", dict(maximize=True, betas=(0.3, 0.9)))], ids=str)
def test_cuda_matches_torch(cls, kw):
    torch_cls, our_cls = getattr(torch.optim, cls), {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}[cls]
    shapes = SHAPES + [(3, 1000, 513)] + [(i + 1,) for i in range(300)]  # more tensors than one launch holds
    ref_p = [p.cuda().detach().requires_grad_() for p in make_params(shapes)]
    our_p = [p.detach().clone().requires_grad_() for p in ref_p]
    ref = torch_cls(two_groups(ref_p, lr=0.03), lr=0.01, foreach=False, **kw)
    ours = our_cls(two_groups(our_p, lr=0.03), lr=0.01, backend="cuda", **kw)
    for s in range(20):  # every step, not just the end
        run_steps(ref, ref_p, 1, start=s)
        run_steps(ours, our_p, 1, start=s)
        assert_same(our_p, ref_p, exact=False, atol=1e-5, rtol=1e-5)
    assert_same_state(ours, ref, exact=False, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls,kw", MASTER_CASES, ids=str)
def test_cuda_master_weights_track_float32_run(cls, kw, dtype, backend):
    """GPU master-weight steps: the masters follow torch's float32 run (same rounded grads) step by
    step, the params are the masters rounded, and the run without masters drifts away."""
    shapes = [(300, 7), (1,), (0,), (1000,), (3, 1000, 513)] + [(i + 1,) for i in range(100)]
    start = [p.detach().to(dtype) for p in make_params(shapes)]
    exact_p = [p.float().cuda().requires_grad_() for p in start]
    our_p = [p.cuda().requires_grad_() for p in start]
    low_p = [p.cuda().requires_grad_() for p in start]
    exact = getattr(torch.optim, cls)(exact_p, foreach=False, **kw)
    ours = CLASSES[cls](our_p, backend=backend, master_weights=True, **kw)
    low = CLASSES[cls](low_p, backend=backend, **kw)
    for s in range(30):
        for p, q, r, g in zip(exact_p, our_p, low_p, _drift_grads(s, exact_p, dtype)):
            p.grad, q.grad, r.grad = g.float(), g.clone(), g.clone()
        exact.step()
        ours.step()
        low.step()
        for p, q in zip(exact_p, our_p):
            master = ours.state[q]["master_param"]
            torch.testing.assert_close(master, p.detach(), atol=1e-5, rtol=1e-5)
            assert torch.equal(q.detach(), master.to(dtype))
    mean_err = lambda ps: torch.cat([(a.float() - b).abs().flatten() for a, b in zip(ps, exact_p)]).mean().item()  # noqa: E731
    assert mean_err(low_p) > 5 * mean_err(our_p)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision_and_amp(dtype):
    params, grads, m, v, vmax, steps = _adam_op_inputs(SHAPES, dtype, device="cuda")
    ref = [[t.clone() for t in ts] for ts in (params, grads, m, v, vmax, steps)]
    before = [t.clone() for t in params]
    optim_ops.adam_step_(params, grads, m, v, vmax, steps, lr=0.1, amsgrad=True,
                         found_inf=torch.tensor(1.0, device="cuda"), backend="cuda")
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    kw = dict(lr=0.1, amsgrad=True, weight_decay=0.1, lr_tensor=torch.tensor(0.05, device="cuda"),
              grad_scale=torch.tensor(4.0, device="cuda"), found_inf=torch.tensor(0.0, device="cuda"))
    optim_ops.adam_step_(params, grads, m, v, vmax, steps, backend="cuda", **kw)
    optim_ops.adam_step_(*ref, backend="reference", **kw)
    for a, b in zip(params + grads + m + v + vmax + steps, sum(ref, [])):
        torch.testing.assert_close(a.float(), b.float(), atol=0.02, rtol=0.02)
    sp, sg, sb, _, _, _ = _adam_op_inputs(SHAPES, dtype, device="cuda")
    rp, rg, rb = [t.clone() for t in sp], [t.clone() for t in sg], [t.clone() for t in sb]
    new = [i % 2 == 0 for i in range(len(SHAPES))]
    optim_ops.sgd_step_(sp, sg, sb, new, lr=0.1, momentum=0.9, grad_scale=torch.tensor(2.0, device="cuda"),
                        backend="cuda")
    optim_ops.sgd_step_(rp, rg, rb, new, lr=0.1, momentum=0.9, grad_scale=torch.tensor(2.0, device="cuda"),
                        backend="reference")
    for a, b in zip(sp + sg + sb, rp + rg + rb):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_cuda_opcheck_and_grad_scaler():
    params, grads, m, v, vmax, steps = _adam_op_inputs([(5, 3), (1,), (0,), (40000,)], device="cuda")
    torch.library.opcheck(torch.ops.fastattn.adam_step_.default,
                          (params, grads, m, v, vmax, steps, 0.01, 0.9, 0.999, 1e-8, 0.1, True, False, True,
                           None, torch.tensor(2.0, device="cuda"), torch.tensor(0.0, device="cuda")))
    params, grads, m, v, vmax, steps = _adam_op_inputs([(5, 3), (1,), (0,), (40000,)], torch.bfloat16, device="cuda")
    masters = [t.float() for t in params]
    m, v, vmax = ([t.float() for t in ts] for ts in (m, v, vmax))
    torch.library.opcheck(torch.ops.fastattn.adam_step_.default,
                          (params, grads, m, v, vmax, steps, 0.01, 0.9, 0.999, 1e-8, 0.1, True, False, True,
                           None, torch.tensor(2.0, device="cuda"), torch.tensor(0.0, device="cuda"), masters))
    torch.library.opcheck(torch.ops.fastattn.sgd_step_.default,
                          (params, grads, m, [True, False, False, True], 0.01, 0.9, 0.0, 0.01, True, False,
                           None, None, None, masters))
    for cls, torch_cls in ((Adam, torch.optim.Adam), (SGD, torch.optim.SGD)):
        def train(make_opt):
            torch.manual_seed(0)
            model = torch.nn.Linear(16, 4).cuda()
            opt = make_opt(model.parameters())
            scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 8)
            for s in range(4):
                loss = model(torch.randn(8, 16, device="cuda")).pow(2).mean() * (float("inf") if s == 1 else 1.0)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
            return [p.detach() for p in model.parameters()]
        theirs = train(lambda ps: torch_cls(ps, lr=0.01, foreach=False))
        ours = train(lambda ps: cls(ps, lr=0.01, backend="cuda"))
        assert_same(ours, theirs, exact=False, atol=1e-6, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_triton_opcheck_on_gpu():
    from fastattn.triton import optim as triton_optim  # noqa: F401  (registers the ops)
    params, grads, m, v, vmax, steps = _adam_op_inputs([(5, 3), (1,), (40000,)], device="cuda")
    torch.library.opcheck(torch.ops.fastattn.adam_step_triton.default,
                          (params, grads, m, v, vmax, steps, 0.01, 0.9, 0.999, 1e-8, 0.1, True, False, True,
                           None, torch.tensor(2.0, device="cuda"), torch.tensor(0.0, device="cuda"), []))
    params, grads, bufs, _, _, _ = _adam_op_inputs([(5, 3), (1,), (40000,)], device="cuda")
    torch.library.opcheck(torch.ops.fastattn.sgd_step_triton.default,
                          (params, grads, bufs, [True, False, True], 0.01, 0.9, 0.0, 0.01, True, False,
                           None, None, None, []))
