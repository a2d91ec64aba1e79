"""csrc/cpu/gemm.h (fastattn::cpu::gemm) through the test hook fastattn._C.gemm, against float64 torch.

    _C.gemm(a, b, c, trans_a, trans_b, alpha, beta, bias, act, with_pre, parallel) -> (c, pre)
    c (M, N) = act(alpha * op(a) @ op(b) + beta * c + bias), written in place; pre = the value before act.

float runs the AVX-512 packed kernel on CPUs that have it (MR x NR = 14 x 32 micro-tiles, K blocks of
256, row blocks of 168, column blocks of 1024; M or N <= 4 (16 for dots): unpacked), double BLAS; the
shapes below sit on both sides of each of those sizes, and the operands are sub-matrix views (leading
dimension > width).
"""
import math

import pytest
import torch

from fastattn import _C

MR, NR, KC, MC, NC = 14, 32, 256, 168, 1024
THIN = 4  # M or N <= THIN: the unpacked path (axpy or dot form)
THIN_DOTS = 16  # M or N <= THIN_DOTS with op(A)/op(B) both running along K (e.g. NT): the dot form

ACTS = {
    0: lambda z: z,
    1: torch.relu,
    2: lambda z: torch.nn.functional.gelu(z),  # exact erf gelu
    3: torch.nn.functional.silu,
}


def view(rows, cols, pad, dtype, fill=None):
    """A (rows, cols) view of a (rows, cols + pad) tensor: leading dimension cols + pad."""
    base = torch.randn(rows, cols + pad, dtype=torch.float64).to(dtype)
    if fill is not None:
        base[:, :cols] = fill
    return base, base[:, :cols]


def run_case(M, N, K, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, bias=False, act=0, with_pre=False,
             parallel=True, dtype=torch.float32, pad=3, c_fill=None):
    _, a = view(K, M, pad, dtype) if trans_a else view(M, K, pad, dtype)
    _, b = view(N, K, pad, dtype) if trans_b else view(K, N, pad, dtype)
    c_base, c = view(M, N, pad, dtype, fill=c_fill)
    c_base_before = c_base.clone()
    bias_t = torch.randn(N, dtype=torch.float64).to(dtype) if bias else None
    A = (a.t() if trans_a else a).double()
    B = (b.t() if trans_b else b).double()
    z = alpha * (A @ B)
    bound = abs(alpha) * (A.abs() @ B.abs())  # |alpha| |op(A)| |op(B)|: the scale of rounding errors
    if beta != 0.0:
        z = z + beta * c.double()
        bound = bound + abs(beta) * c.double().abs()
    if bias:
        z = z + bias_t.double()
        bound = bound + bias_t.double().abs()

    out, pre = _C.gemm(a, b, c, trans_a, trans_b, alpha, beta, bias_t, act, with_pre, parallel)

    assert out.data_ptr() == c.data_ptr()
    rtol = (1e-5 if dtype == torch.float32 else 1e-13) * math.sqrt(max(K, 1))
    tol = rtol * (bound + 1.0)
    if act == 2 and dtype == torch.float32:
        tol = tol + 1e-6 * z.abs()  # the float erf's own error (< 1.5e-7 absolute)
    if act == 3 and dtype == torch.float32:
        tol = tol + 1e-6 * z.abs()
    want = ACTS[act](z)
    err = (out.double() - want).abs()
    assert torch.isfinite(out).all()
    assert (err <= tol).all(), f"max err {err.max().item():.3g} at {divmod(err.argmax().item(), N)}"
    if with_pre:
        assert pre.shape == (M, N)
        assert ((pre.double() - z).abs() <= rtol * (bound + 1.0)).all()
    else:
        assert pre.numel() == 0
    # the padding columns of c (between N and the leading dimension) are never written
    assert torch.equal(c_base[:, N:], c_base_before[:, N:])


TRANS = [(False, False), (False, True), (True, False), (True, True)]

# (M, N, K): every edge of the blocking, 1 and 2, and large primes
EDGE_SHAPES = [
    (1, 1, 1),
    (2, 2, 2),
    (MR - 1, NR - 1, 3),
    (MR + 1, NR + 1, 16),
    (MR, NR, KC),
    (3, 5, KC - 1),
    (5, 17, KC + 1),
    (MC - 1, NR + 1, 17),
    (MC + 1, 2 * NR - 1, 33),
    (1, 1031, 7),
    (1031, 3, 5),
    (7, NC + 1, 9),
    (29, 41, 1031),
    (THIN, 300, 40),
    (300, THIN, 40),
    (THIN + 1, 300, 40),
    (300, THIN + 1, 40),
    (2, 65536 + 7, 3),  # the thin path's column blocks
    (THIN_DOTS, 200, 33),
    (THIN_DOTS + 1, 200, 33),
    (200, THIN_DOTS, 33),
    (7, 9, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("trans", TRANS, ids=["NN", "NT", "TN", "TT"])
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes(shape, trans, dtype):
    M, N, K = shape
    run_case(M, N, K, *trans, dtype=dtype, pad=0 if M % 2 else 5, c_fill=float("nan"))


# big enough to be split over the threads: by row blocks (M large) or by column chunks (M small)
@pytest.mark.parametrize("parallel", [True, False], ids=["par", "serial"])
@pytest.mark.parametrize("trans", TRANS, ids=["NN", "NT", "TN", "TT"])
@pytest.mark.parametrize("shape", [(3, 2000, 100), (2000, 3, 100), (12, 3000, 64), (8, 256, 256), (64, 300, 129), (400, 70, 300), (2 * MC + 5, 2 * NR + 3, KC + 7)],
                         ids=lambda s: "x".join(map(str, s)))
def test_parallel(shape, trans, parallel):
    run_case(*shape, *trans, alpha=0.75, beta=1.0, parallel=parallel, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (-0.5, 0.0), (1.0, 1.0), (2.0, -0.25), (0.0, 0.5), (0.0, 0.0)])
def test_alpha_beta(alpha, beta, dtype):
    # K > KC: beta applies on the first K block only, the later blocks accumulate
    run_case(33, 70, 2 * KC + 3, False, True, alpha=alpha, beta=beta, dtype=dtype,
             c_fill=float("nan") if beta == 0.0 else None)


def test_beta_zero_ignores_nan_and_inf():
    run_case(MR + 3, NR + 5, 40, c_fill=float("nan"))
    run_case(MR + 3, NR + 5, 40, c_fill=float("inf"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("act", [0, 1, 2, 3], ids=["none", "relu", "gelu", "silu"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("with_pre", [False, True], ids=["nopre", "pre"])
def test_epilogue(act, bias, with_pre, dtype):
    # several K blocks (the epilogue must come after the last one) and edge tiles in M and N
    run_case(MR * 3 + 2, NR * 2 + 7, KC + 40, False, True, bias=bias, act=act, with_pre=with_pre, dtype=dtype)
    run_case(5, 9, 3, True, False, alpha=0.5, beta=1.0, bias=bias, act=act, with_pre=with_pre, dtype=dtype)
    # the thin (unpacked) path: M <= THIN, N <= THIN
    run_case(2, 40, 17, False, False, bias=bias, act=act, with_pre=with_pre, dtype=dtype)
    run_case(40, 3, 17, True, True, beta=1.0, bias=bias, act=act, with_pre=with_pre, dtype=dtype)


@pytest.mark.parametrize("act", [0, 2])
def test_epilogue_parallel(act):
    run_case(300, 200, 100, False, True, beta=0.5, bias=True, act=act, with_pre=True, parallel=True)
    run_case(16, 512, 200, False, False, bias=True, act=act, with_pre=True, parallel=True)


def test_k_zero():
    # no product: C = beta * C (+ bias, activation)
    run_case(5, 7, 0, beta=0.0, bias=True, act=1, c_fill=float("nan"))
    run_case(5, 7, 0, beta=2.0, bias=True, act=3, with_pre=True)


def test_kernel_name():
    name = _C.gemm_kernel()
    assert "avx512" in name or "blas" in name
    if _C.cpu_isa() == "avx512":
        assert name.startswith("avx512 packed")


def test_bad_inputs():
    a, b, c = torch.randn(4, 5), torch.randn(5, 6), torch.empty(4, 6)
    with pytest.raises(RuntimeError, match="op\\(b\\) must be"):
        _C.gemm(a, torch.randn(4, 6), c, False, False, 1.0, 0.0, None, 0, False)
    with pytest.raises(RuntimeError, match="row count"):
        _C.gemm(a, b, torch.empty(3, 6), False, False, 1.0, 0.0, None, 0, False)
    with pytest.raises(RuntimeError, match="float32 or all float64"):
        _C.gemm(a.double(), b, c, False, False, 1.0, 0.0, None, 0, False)
    with pytest.raises(RuntimeError, match="unit column stride"):
        _C.gemm(torch.randn(5, 4).t(), b, c, False, False, 1.0, 0.0, None, 0, False)
    with pytest.raises(RuntimeError, match="bias must be"):
        _C.gemm(a, b, c, False, False, 1.0, 0.0, torch.randn(5), 0, False)
    with pytest.raises(RuntimeError, match="act must be"):
        _C.gemm(a, b, c, False, False, 1.0, 0.0, None, 7, False)
    with pytest.raises(RuntimeError, match="2-D CPU"):
        _C.gemm(a[0], b, c, False, False, 1.0, 0.0, None, 0, False)


def test_random_sweep():
    # random shapes / options around the block sizes (seeded: reproducible)
    g = torch.Generator().manual_seed(1234)
    sizes = [1, 2, 3, MR - 1, MR, MR + 1, NR - 1, NR, NR + 1, 47, 100, KC - 1, KC + 1, MC - 1, MC + 1, 311]

    def pick():
        return sizes[int(torch.randint(len(sizes), (1,), generator=g))]

    for _ in range(40):
        M, N, K = pick(), pick(), pick()
        flags = torch.randint(2, (5,), generator=g).tolist()
        run_case(M, N, K, bool(flags[0]), bool(flags[1]), alpha=1.5, beta=0.5 if flags[2] else 0.0,
                 bias=bool(flags[3]), act=int(torch.randint(4, (1,), generator=g)), with_pre=bool(flags[4]),
                 pad=int(torch.randint(3, (1,), generator=g)) * 7)
