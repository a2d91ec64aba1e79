"""fastattn.conv2d / conv2d_relu_maxpool2d / nn.Conv2d against torch.nn.functional.conv2d.

Every backend present is held to torch in float64 (fp32 for Triton), forward and every
gradient; the native ops pass opcheck and gradcheck; bad inputs raise clear errors.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from fastattn import _ext
from fastattn.nn.conv import Conv2d, Conv2dReLUMaxPool2d
from fastattn.ops.conv2d import conv2d, conv2d_reference, conv2d_relu_maxpool2d

HAS_NATIVE = _ext.available() and hasattr(torch.ops.fastattn, "conv2d_fwd")
needs_native = pytest.mark.skipif(not HAS_NATIVE, reason="the compiled extension is not built")
CPU_BACKENDS = ["cpu", "reference"] if HAS_NATIVE else ["reference"]

ACT = {None: lambda z: z, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def torch_conv(x, w, b, stride=1, padding=0, dilation=1, groups=1, activation=None):
    return ACT[activation](F.conv2d(x, w, b, stride, padding, dilation, groups))


def leaves(*ts):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]


def grads(out, inputs, g):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, g)


def assert_close_all(a, b, atol, rtol=0.0):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        torch.testing.assert_close(u, v, atol=atol, rtol=rtol, msg=lambda m: f"tensor {i}: {m}")


# (N, C, H, W, K, kernel, stride, padding, dilation, groups, bias)
SHAPES = [
    (2, 3, 9, 11, 8, 3, 1, 1, 1, 1, True),             # the seed layer's shape, small
    (1, 3, 8, 8, 4, 3, 1, "same", 1, 1, True),         # batch 1
    (2, 5, 7, 6, 6, 2, 1, "same", 1, 1, True),         # 'same' with an even kernel: asymmetric
    (2, 4, 9, 8, 4, (4, 2), 1, "same", (1, 2), 1, False),  # even kernel, dilated, 'same'
    (2, 6, 10, 9, 6, 3, 2, 1, 1, 6, True),             # depthwise, stride 2
    (2, 4, 11, 9, 8, 3, 1, 2, 2, 4, True),             # depthwise, channel multiplier 2, dilation
    (2, 8, 9, 9, 8, 7, 1, 3, 1, 8, True),              # depthwise 7x7
    (2, 12, 7, 9, 10, 3, (2, 1), (0, 2), 1, 2, True),   # wide grouped (im2col path), tuple args
    (3, 16, 6, 7, 12, 1, 1, 0, 1, 1, True),            # 1x1 (pointwise path)
    (2, 16, 7, 8, 8, 1, 2, 0, 1, 1, False),            # 1x1 stride 2
    (1, 10, 13, 12, 6, 7, 2, 3, 1, 1, True),           # 7x7 stride 2, im2col
    (2, 9, 8, 8, 5, 3, 3, "valid", 2, 1, True),        # stride 3, dilation 2, 'valid'
    (2, 3, 5, 5, 4, 5, 1, 0, 1, 1, True),              # kernel == input: 1x1 output
]


def make(shape, dtype=torch.float64, seed=0):
    N, C, H, W, K, k, stride, padding, dilation, groups, bias = shape
    g = torch.Generator().manual_seed(seed)
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(N, C, H, W, generator=g, dtype=dtype)
    w = torch.randn(K, C // groups, kh, kw, generator=g, dtype=dtype)
    b = torch.randn(K, generator=g, dtype=dtype) if bias else None
    return x, w, b, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])) + f"-s{s[6]}-p{s[7]}-d{s[8]}-g{s[9]}")
def test_matches_torch_float64(backend, shape):
    x, w, b, kw = make(shape)
    for act in (None, "relu") if shape[9] > 1 else (None,):
        xs, ws, bs = leaves(x, w, b)
        xr, wr, br = leaves(x, w, b)
        out = conv2d(xs, ws, bs, **kw, activation=act, backend=backend)
        ref = torch_conv(xr, wr, br, **kw, activation=act)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        g = torch.randn_like(ref)
        assert_close_all(grads(out, [xs, ws, bs], g), grads(ref, [xr, wr, br], g), atol=1e-10, rtol=1e-10)


# Depthwise (one input channel per group): the row-reusing tiles (4 rows x 4 vectors when the
# output is wider than 2 vectors, 8 x 2 when wider than 1, else 8 x 1; 16 floats / 8 doubles a
# vector), row counts that leave a tail, widths off the vector size, stride 2, dilation, channel
# multipliers 2 and 3, batch 1.
DEPTHWISE_SHAPES = [
    (1, 3, 37, 37, 3, 7, 1, 3, 1, 3, True),               # 37 wide, 37 rows: a 1-row tail
    (2, 4, 21, 23, 4, 7, 2, 3, 1, 4, True),               # stride 2: 12 x 11 output
    (2, 5, 19, 29, 10, 5, 1, 2, 2, 5, False),             # multiplier 2, dilation 2: 15 x 25
    (1, 4, 30, 70, 12, 7, (1, 2), (3, 2), 1, 4, True),    # multiplier 3, stride (1, 2): 30 x 34
    (2, 2, 9, 16, 2, 3, 1, 1, 1, 2, True),                # exactly one float vector wide
    (1, 2, 6, 40, 2, (3, 7), 2, (1, 3), 1, 2, True),      # rectangular kernel, stride 2, 3 rows
]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", DEPTHWISE_SHAPES, ids=lambda s: "x".join(map(str, s[:6])) + f"-s{s[6]}")
def test_depthwise_tiles(dtype, shape):
    x, w, b, kw = make(shape, seed=4)
    ref = torch_conv(x, w, b, **kw, activation="relu")
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for xin in (x, x.contiguous(memory_format=torch.channels_last)):
        xs, ws, bs = leaves(xin.to(dtype), w.to(dtype), b.to(dtype) if b is not None else None)
        out = conv2d(xs, ws, bs, **kw, activation="relu", backend="cpu")
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    g = torch.randn_like(ref)
    xr, wr, br = leaves(x, w, b)
    assert_close_all([t.double() for t in grads(out, [xs, ws, bs], g.to(dtype))],
                     grads(torch_conv(xr, wr, br, **kw, activation="relu"), [xr, wr, br], g), atol=tol * 10, rtol=tol)


# float32 depthwise with stride 1 or 2, no dilation and a 3x3/5x5/7x7 kernel, more than 16
# columns out, runs fixed-size tiles (4 rows x 4 vectors when wider than 32 columns, else 4 x 2) on
# AVX-512 CPUs: widths just over 16 and 32 and off the vector, rows below 4 (1-row tiles) and
# off 4 (the last tile overlaps the one before it), padding that differs per side (none, or more
# than the kernel's half), channel multiplier 2, no bias, batch 1, gelu with the saved
# pre-activation; grad-input of the stride-1 convs runs the same tiles (the flipped kernel).
# Stride 2 (MobileNet's downsampling; the rows split by column phase): odd and even sizes,
# padding 0, 1, 2 and lopsided, multiplier 2, 5x5 and 7x7, 1-row tiles.
# (N, C, H, W, K, kernel, groups, bias, padding (top, bottom, left, right), stride)
DEPTHWISE_FIXED_SHAPES = [
    (2, 3, 12, 17, 3, 3, 3, True, (1, 1, 1, 1), 1),      # 17 wide: 4 x 2 tiles, 12 rows
    (1, 2, 3, 40, 2, 3, 2, True, (1, 1, 0, 2), 1),       # 3 rows: 1-row tiles; 40 wide: 4 x 4
    (2, 4, 9, 33, 8, 5, 4, False, (2, 1, 3, 0), 1),      # multiplier 2, 6 rows (overlap), 32 wide
    (1, 3, 23, 61, 3, 7, 3, True, (3, 3, 3, 3), 1),      # 7x7, 61 wide (4 vectors), 23 rows
    (2, 2, 14, 29, 2, 7, 2, True, (3, 3, 0, 6), 1),      # 7x7, lopsided columns: 29 wide
    (1, 2, 5, 21, 2, 5, 2, True, (0, 0, 0, 0), 1),       # no padding: 1 row, 17 wide
    (2, 3, 56, 56, 3, 3, 3, True, (1, 1, 1, 1), 2),      # MobileNet's: 28 x 28 (4 x 2 tiles)
    (1, 5, 23, 37, 5, 3, 5, False, (1, 1, 1, 1), 2),     # odd sizes: 12 x 19, 5 channels
    (2, 2, 21, 70, 4, 3, 2, True, (0, 0, 0, 0), 2),      # multiplier 2, no padding: 10 x 34 (4 x 4)
    (1, 3, 19, 75, 3, 5, 3, True, (2, 2, 2, 2), 2),      # 5x5 pad 2: 10 x 38, 2 rows overlap
    (1, 2, 25, 41, 2, 7, 2, True, (3, 2, 0, 5), 2),      # 7x7, lopsided: 11 x 20
    (2, 2, 5, 40, 2, 3, 2, True, (1, 0, 2, 1), 2),       # 2 rows: 1-row tiles, 20 wide
]


@needs_native
@pytest.mark.parametrize("shape", DEPTHWISE_FIXED_SHAPES,
                         ids=lambda s: "x".join(map(str, s[:6])) + f"-p{s[8]}-s{s[9]}")
def test_depthwise_fixed_tiles(shape):
    N, C, H, W, K, k, groups, bias, pad, stride = shape
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    w = torch.randn(K, 1, k, k, generator=gen, dtype=torch.float64)
    b = torch.randn(K, generator=gen, dtype=torch.float64) if bias else None
    xpad = F.pad(x, (pad[2], pad[3], pad[0], pad[1]))
    for act, code in ((None, 0), ("gelu", 2)):
        ref = torch_conv(xpad, w, b, stride=stride, groups=groups, activation=act)
        assert ref.shape[-1] > 16
        out, pre = torch.ops.fastattn.conv2d_fwd(x.float(), w.float(), b.float() if bias else None, [stride] * 2,
                                                 list(pad), [1, 1], groups, code, act == "gelu")
        assert out.shape == ref.shape
        torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
        if act == "gelu":
            torch.testing.assert_close(pre.double(), F.conv2d(xpad, w, b, stride, groups=groups), atol=1e-4, rtol=1e-4)
    # Gradients through the op (symmetric padding only there); grad-input runs the same tiles.
    if pad[0] == pad[1] == pad[2] == pad[3]:
        xs, ws, bs = leaves(x.float(), w.float(), b.float() if bias else None)
        xr, wr, br = leaves(x, w, b)
        out = conv2d(xs, ws, bs, stride=stride, padding=pad[0], groups=groups, activation="relu", backend="cpu")
        ref = torch_conv(xr, wr, br, stride=stride, padding=pad[0], groups=groups, activation="relu")
        torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
        g = torch.randn_like(ref)
        assert_close_all([t.double() for t in grads(out, [xs, ws, bs], g.float())],
                         grads(ref, [xr, wr, br], g), atol=1e-3, rtol=1e-4)


# float32 depthwise 3x3 grad-weight with stride 1 or 2 on AVX-512 CPUs: 9 vector sums per plane,
# 4-row blocks (fewer or off-4 rows: 1-row blocks), masked loads for a row's last vector (16, 17,
# 1 and 28 columns), images in the outer loop over blocks of 64 channels (70 channels: two blocks).
# Padding per side (0, 2, lopsided), odd sizes, multiplier 2, batch 1; an inf in an input column
# no output reads (the masked loads must not touch it).
# (N, C, H, W, K, groups, padding (top, bottom, left, right), stride)
DW_GRAD_WEIGHT_SHAPES = [
    (2, 3, 56, 56, 3, 3, (1, 1, 1, 1), 2),       # MobileNet's: 28 x 28
    (1, 5, 23, 37, 5, 5, (1, 1, 1, 1), 2),       # odd sizes: 12 x 19, batch 1
    (2, 2, 21, 70, 4, 2, (0, 0, 0, 0), 2),       # multiplier 2, no padding: 10 x 34
    (3, 2, 9, 33, 2, 2, (2, 2, 2, 2), 2),        # padding 2: 6 x 18
    (2, 3, 8, 35, 3, 3, (1, 0, 2, 1), 2),        # lopsided: 3 rows x 18
    (1, 2, 11, 36, 2, 2, (2, 1, 3, 0), 2),       # left padding 3 (odd input columns first): 6 x 18
    (2, 2, 3, 3, 2, 2, (0, 0, 0, 0), 2),         # 1 x 1
    (2, 3, 12, 17, 3, 3, (1, 1, 1, 1), 1),       # 12 x 17: a 1-lane last vector
    (1, 4, 7, 16, 8, 4, (1, 1, 1, 1), 1),        # 7 x 16, multiplier 2
    (2, 3, 5, 21, 3, 3, (0, 2, 2, 0), 1),        # lopsided: 5 x 19
    (2, 70, 6, 6, 70, 70, (1, 1, 1, 1), 1),      # 70 channels: two channel blocks
    (2, 2, 56, 56, 2, 2, (1, 1, 1, 1), 1),       # 56 x 56
    (2, 2, 9, 20, 16, 2, (1, 1, 1, 1), 2),       # multiplier 8: not the tile (GEMM over the pixels)
]


@needs_native
@pytest.mark.parametrize("shape", DW_GRAD_WEIGHT_SHAPES,
                         ids=lambda s: "x".join(map(str, s[:5])) + f"-p{s[6]}-s{s[7]}")
def test_depthwise_3x3_grad_weight(shape):
    N, C, H, W, K, groups, pad, stride = shape
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    w = torch.randn(K, 1, 3, 3, generator=gen, dtype=torch.float64)
    xpad = F.pad(x, (pad[2], pad[3], pad[0], pad[1]))
    P, Q = (xpad.shape[2] - 3) // stride + 1, (xpad.shape[3] - 3) // stride + 1
    g = torch.randn(N, K, P, Q, generator=gen, dtype=torch.float64)
    xr = xpad.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    dw_ref, = torch.autograd.grad(F.conv2d(xr, wr, None, stride, groups=groups), [wr], g)
    xf = x.float()
    unread = (Q - 1) * stride + 3  # first padded column no output reads
    if unread < xpad.shape[3] - pad[3]:
        xf[..., unread - pad[2]] = float("inf")
    _, dw, _ = torch.ops.fastattn.conv2d_bwd(g.float(), xf, w.float(), None, [stride] * 2, list(pad), [1, 1],
                                             groups, 0, [False, True, False])
    torch.testing.assert_close(dw.double(), dw_ref, atol=1e-3, rtol=1e-4)
    _, dw2, _ = torch.ops.fastattn.conv2d_bwd(g.float(), xf, w.float(), None, [stride] * 2, list(pad), [1, 1],
                                              groups, 0, [False, True, False])
    assert torch.equal(dw, dw2)


# Outputs of 16 MiB or more: the fixed depthwise tiles write them with non-temporal stores
# (57 wide: runs off the 64-byte line, whose head and tail go through plain stores), relu applied
# on the way out; the few-channel direct tiles (plain stores) at the same size for comparison.
@needs_native
@pytest.mark.parametrize("shape", [
    (33, 3, 66, 61, 32, 3, 1, 1, 1, 1, True),     # the seed layer's kind, 61 wide: 17 MB out
    (26, 48, 60, 57, 48, 7, 1, 3, 1, 48, True),   # depthwise 7x7, 57 wide: 17 MB out
], ids=["direct", "depthwise"])
def test_streamed_big_output(shape):
    x, w, b, kw = make(shape, dtype=torch.float32, seed=7)
    out = conv2d(x, w, b, **kw, activation="relu", backend="cpu")
    assert out.numel() * 4 >= 16 << 20
    ref = torch_conv(x.double(), w.double(), b.double(), **kw, activation="relu")
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


# Depthwise stride-2 grad-input with dx of 16 MiB or more: planes streamed out of a local buffer.
@needs_native
def test_depthwise_s2_grad_input_streamed():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 32, 256, 257, generator=gen)
    w = torch.randn(32, 1, 3, 3, generator=gen)
    assert x.numel() * 4 >= 16 << 20
    g = torch.randn(2, 32, 128, 129, generator=gen)
    dx, _, _ = torch.ops.fastattn.conv2d_bwd(g, x, w, None, [2, 2], [1, 1, 1, 1], [1, 1], 32, 0,
                                             [True, False, False])
    xr = x.double().requires_grad_(True)
    ref = F.conv2d(xr, w.double(), None, 2, 1, 1, 32)
    assert ref.shape == g.shape
    dx_ref, = torch.autograd.grad(ref, [xr], g.double())
    torch.testing.assert_close(dx.double(), dx_ref, atol=1e-4, rtol=1e-4)


# grad-input with stride > 1 and no dilation runs by phase: sh*sw stride-1 convs of dY with the
# kernel's taps of one phase, flipped, on the forward kernels (wide, depthwise, few-channel and
# 1x1 GEMM tiles), interleaved into dX. Strides 2 and 3 and mixed, odd sizes (phases of unequal
# length, input rows no output reads), asymmetric padding, groups, depthwise, a phase with one
# tap (1x1 sub-kernel), and the fallbacks: kernel smaller than the stride (a phase without taps),
# padding >= kernel (negative phase padding), dilation.
# (N, C, H, W, K, kernel, stride, padding (top, bottom, left, right), dilation, groups)
STRIDED_GRAD_INPUT = [
    (2, 4, 11, 9, 6, 3, 2, (1, 1, 1, 1), 1, 1),           # few channels, odd sizes
    (1, 40, 13, 10, 64, 3, 2, (1, 0, 1, 2), 1, 1),        # wide (32+ channels), asymmetric padding
    (2, 6, 14, 17, 6, 5, 3, (2, 2, 1, 3), 1, 6),          # depthwise 5x5 stride 3
    (2, 8, 12, 11, 12, (3, 4), (2, 3), (0, 1, 2, 0), 1, 2),  # groups 2, rectangular kernel, mixed stride
    (1, 5, 10, 10, 3, 2, 2, (0, 0, 0, 0), 1, 1),          # 2x2 stride 2: every phase a 1x1 GEMM
    (2, 3, 9, 9, 4, 7, 2, (3, 3, 3, 3), 1, 1),            # 7x7 stride 2 (the stem kind)
    (1, 4, 9, 8, 4, 1, 2, (0, 0, 0, 0), 1, 1),            # 1x1 stride 2: phases without taps (fallback)
    (1, 4, 9, 8, 4, 3, 2, (3, 0, 0, 3), 1, 1),            # padding 3 >= kernel 3 (fallback)
    (2, 4, 12, 11, 6, 3, 2, (2, 2, 2, 2), 2, 1),          # dilation 2 (fallback)
]
# Depthwise (one input channel per group) with stride 2 and no dilation has its own grad-input
# kernel (both column phases of a dx row as vector loops over gz, interleaved): odd and even
# sizes, padding 0/1/2 and lopsided, padding >= the kernel, channel multiplier 2, channel counts
# off the vector width, even and rectangular kernels, a 1x1 kernel (odd rows and columns get
# nothing), batch 1.
DEPTHWISE_S2_GRAD_INPUT = [
    (1, 5, 23, 37, 5, 3, 2, (1, 1, 1, 1), 1, 5),          # MobileNet's kind, odd sizes
    (2, 4, 20, 19, 8, 3, 2, (0, 0, 0, 0), 1, 4),          # multiplier 2, no padding
    (1, 3, 18, 21, 3, 5, 2, (2, 2, 2, 2), 1, 3),          # 5x5, padding 2
    (2, 2, 11, 12, 2, (4, 2), 2, (3, 0, 1, 2), 1, 2),     # even, rectangular kernel; padding 3 >= 2
    (1, 3, 9, 10, 6, 1, 2, (0, 0, 0, 0), 1, 3),           # 1x1, multiplier 2
    (1, 17, 7, 9, 17, 7, 2, (3, 3, 3, 3), 1, 17),         # 7x7, 17 channels, map smaller than the kernel
]


@needs_native
@pytest.mark.parametrize("shape", STRIDED_GRAD_INPUT + DEPTHWISE_S2_GRAD_INPUT, ids=lambda s: "x".join(map(str, s[:6])) + f"-s{s[6]}-p{s[7]}")
def test_strided_grad_input(shape):
    N, C, H, W, K, k, stride, pad, dilation, groups = shape
    kh, kw = (k, k) if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    w = torch.randn(K, C // groups, kh, kw, generator=gen, dtype=torch.float64)
    xr, wr = leaves(x, w)
    ref = F.conv2d(F.pad(xr, (pad[2], pad[3], pad[0], pad[1])), wr, None, stride, 0, dilation, groups)
    g = torch.randn_like(ref)
    dx_ref, dw_ref = torch.autograd.grad(ref, [xr, wr], g)
    st = [stride] * 2 if isinstance(stride, int) else list(stride)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        dx, dw, _ = torch.ops.fastattn.conv2d_bwd(g.to(dtype), x.to(dtype), w.to(dtype), None, st, list(pad),
                                                  [dilation] * 2, groups, 0, [True, True, False])
        torch.testing.assert_close(dx.double(), dx_ref, atol=tol, rtol=tol)
        torch.testing.assert_close(dw.double(), dw_ref, atol=tol * 10, rtol=tol)


# Wide layers (>= 8 input channels and >= 32 float / 16 double output channels per group): the
# channel-vector tiles of 14 pixels x 2 vectors of channels. Widths below, at and off 14 (the
# last tile overlaps), channel counts off the vector (padded), stride 2, 1x1 stride 2 (not the
# GEMM path), groups, dilation, batch 1; grad-input of a stride-1 conv with >= 32 input channels
# runs the same tiles (a conv of dY with the flipped weight); 3x3 grad-weight with Kg a multiple of
# 32 float / 16 double runs its own tiles (9 taps x 2 vectors of channels, bands of rows).
WIDE_SHAPES = [
    (2, 8, 9, 17, 56, 3, 1, 1, 1, 1, True),                 # 17 wide: 14 + an overlapping tile; 56 = 64 - 8
    (1, 16, 7, 10, 32, 3, 2, 1, 1, 1, True),                # stride 2: 4 x 5 output (< 14 wide)
    (2, 20, 8, 30, 64, (3, 5), 1, (1, 2), (1, 2), 2, False),  # groups 2, dilation, 26 wide
    (1, 9, 12, 40, 28, 3, (2, 1), 1, 1, 1, True),           # 28 channels: float pads to 32
    (2, 16, 9, 31, 32, 1, 2, 0, 1, 1, True),                # 1x1 stride 2
    (2, 32, 6, 15, 8, 3, 1, 1, 1, 1, True),                 # grad-input runs wide (32 -> 8 flipped)
    (2, 16, 11, 13, 64, 3, 1, 1, 2, 2, True),               # groups 2, dilation 2 (3x3 grad-weight tiles)
    (1, 8, 13, 60, 64, 3, 1, 1, 1, 1, True),                # grad-weight in bands of 3 rows (+ 1)
]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", WIDE_SHAPES, ids=lambda s: "x".join(map(str, s[:6])) + f"-s{s[6]}")
def test_wide_tiles(dtype, shape):
    x, w, b, kw = make(shape, seed=5)
    ref = torch_conv(x, w, b, **kw, activation="relu")
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for xin in (x, x.contiguous(memory_format=torch.channels_last)):
        xs, ws, bs = leaves(xin.to(dtype), w.to(dtype), b.to(dtype) if b is not None else None)
        out = conv2d(xs, ws, bs, **kw, activation="relu", backend="cpu")
        torch.testing.assert_close(out.double(), ref, atol=tol * 10, rtol=tol)
    g = torch.randn_like(ref)
    xr, wr, br = leaves(x, w, b)
    assert_close_all([t.double() for t in grads(out, [xs, ws, bs], g.to(dtype))],
                     grads(torch_conv(xr, wr, br, **kw, activation="relu"), [xr, wr, br], g), atol=tol * 100, rtol=tol)
    pooled = conv2d_relu_maxpool2d(x.to(dtype), w.to(dtype), b.to(dtype) if b is not None else None, **kw,
                                   backend="cpu")
    torch.testing.assert_close(pooled.double(), F.max_pool2d(ref, 2), atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", [None, "relu", "gelu", "silu"])
def test_activations(backend, activation):
    for shape in (SHAPES[0], SHAPES[7]):  # direct and im2col paths
        x, w, b, kw = make(shape, seed=1)
        xs, ws, bs = leaves(x, w, b)
        xr, wr, br = leaves(x, w, b)
        out = conv2d(xs, ws, bs, **kw, activation=activation, backend=backend)
        ref = torch_conv(xr, wr, br, **kw, activation=activation)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        g = torch.randn_like(ref)
        assert_close_all(grads(out, [xs, ws, bs], g), grads(ref, [xr, wr, br], g), atol=1e-10, rtol=1e-10)


@needs_native
@pytest.mark.parametrize("activation", [None, "relu", "gelu", "silu"])
def test_float32_activations(activation):
    """float32 uses vectorized erf/exp approximations in the epilogue and its gradient."""
    for shape in (SHAPES[0], SHAPES[7], SHAPES[4]):
        x, w, b, kw = make(shape, dtype=torch.float32, seed=2)
        xs, ws, bs = leaves(x, w, b)
        out = conv2d(xs, ws, bs, **kw, activation=activation, backend="cpu")
        xr, wr, br = leaves(x.double(), w.double(), b.double())
        ref = torch_conv(xr, wr, br, **kw, activation=activation)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
        g = torch.randn_like(ref)
        assert_close_all([t.double() for t in grads(out, [xs, ws, bs], g.float())],
                         grads(ref, [xr, wr, br], g), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unbatched_and_channels_last(backend):
    x, w, b, kw = make(SHAPES[7])
    out = conv2d(x[0], w, b, **kw, backend=backend)
    torch.testing.assert_close(out, F.conv2d(x[0], w, b, **kw), atol=1e-10, rtol=1e-10)
    assert out.dim() == 3
    for shape in (SHAPES[0], SHAPES[5], SHAPES[7]):
        x, w, b, kw = make(shape)
        xc = x.contiguous(memory_format=torch.channels_last)
        xs, ws, bs = leaves(xc, w, b)
        out = conv2d(xs, ws, bs, **kw, activation="relu", backend=backend)
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        xr, wr, br = leaves(x, w, b)
        ref = torch_conv(xr, wr, br, **kw, activation="relu")
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        g = torch.randn_like(ref)
        assert_close_all(grads(out, [xs, ws, bs], g), grads(ref, [xr, wr, br], g), atol=1e-10, rtol=1e-10)


def test_reference_is_plain_math():
    x, w, b, kw = make(SHAPES[3])
    pad = [1, 2, 0, 1]  # (top, bottom, left, right)
    ref = F.conv2d(F.pad(x, (pad[2], pad[3], pad[0], pad[1])), w, b, dilation=2)
    out = conv2d_reference(x, w, b, [1, 1], pad, [2, 2], 1, 0)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    """Error vs an fp64 reference at most 2x that of torch computing in the same dtype (+ slack)."""
    for shape in (SHAPES[0], SHAPES[4], SHAPES[7], SHAPES[8]):
        x, w, b, kw = make(shape, dtype=torch.float64, seed=3)
        ref = torch_conv(x, w, b, **kw, activation="gelu")
        xl, wl, bl = (t.to(dtype) for t in (x, w, b))
        out = conv2d(xl, wl, bl, **kw, activation="gelu", backend="cpu")
        assert out.dtype == dtype
        base = torch_conv(xl.float(), wl.float(), bl.float(), **kw, activation="gelu").to(dtype)
        err, base_err = (out.double() - ref).abs().max().item(), (base.double() - ref).abs().max().item()
        assert err <= 2 * base_err + 1e-2, (err, base_err)
        xs, ws, bs = leaves(xl, wl, bl)
        out = conv2d(xs, ws, bs, **kw, activation="relu", backend="cpu")
        g = torch.randn(out.shape, dtype=dtype)
        xr, wr, br = leaves(xl.float(), wl.float(), bl.float())
        ref = torch_conv(xr, wr, br, **kw, activation="relu")
        for u, v in zip(grads(out, [xs, ws, bs], g), grads(ref, [xr, wr, br], g.float())):
            assert u.dtype == dtype
            scale = v.abs().max().item() + 1
            assert (u.float() - v).abs().max().item() <= 3e-2 * scale


# ---------------------------------------------------------------------------------------------
# The fused conv -> relu -> max-pool.
# ---------------------------------------------------------------------------------------------
POOL_CASES = [  # (shape, pool_kernel, pool_stride)
    (SHAPES[0], 2, None),
    ((2, 3, 13, 11, 5, 3, 1, 1, 1, 1, True), 2, None),   # odd conv output: floor mode drops a row/col
    ((1, 4, 12, 12, 6, 3, 1, 1, 1, 2, True), 3, 2),      # overlapping windows, groups
    ((2, 12, 10, 9, 16, 3, 1, 1, 1, 1, True), 2, None),  # im2col path
    ((2, 6, 11, 10, 6, 3, 2, 1, 1, 6, False), (2, 3), (1, 2)),  # depthwise, rectangular pool
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", range(len(POOL_CASES)))
def test_fused_pool_matches_torch(backend, case):
    shape, pk, ps = POOL_CASES[case]
    x, w, b, kw = make(shape, seed=case)
    xs, ws, bs = leaves(x, w, b)
    xr, wr, br = leaves(x, w, b)
    out = conv2d_relu_maxpool2d(xs, ws, bs, **kw, pool_kernel=pk, pool_stride=ps, backend=backend)
    ref = F.max_pool2d(F.relu(F.conv2d(xr, wr, br, **kw)), pk, ps)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(ref)
    assert_close_all(grads(out, [xs, ws, bs], g), grads(ref, [xr, wr, br], g), atol=1e-10, rtol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(conv2d_relu_maxpool2d(x, w, b, **kw, pool_kernel=pk, pool_stride=ps,
                                                         backend=backend), ref.detach(), atol=1e-10, rtol=1e-10)


@needs_native
def test_fused_pool_inference_keeps_no_indices():
    x, w, b, kw = make(SHAPES[0], dtype=torch.float32)
    out, idx = torch.ops.fastattn.conv2d_relu_maxpool2d_fwd(x, w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1, [2, 2], [2, 2],
                                                            False)
    assert idx.numel() == 0
    out2, idx2 = torch.ops.fastattn.conv2d_relu_maxpool2d_fwd(x, w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1, [2, 2],
                                                              [2, 2], True)
    assert torch.equal(out, out2) and idx2.shape == out.shape and idx2.dtype == torch.int64
    _, ref_idx = F.max_pool2d(F.relu(F.conv2d(x, w, b, padding=1)), 2, return_indices=True)
    pos = out > 0  # where relu is active the argmax is unique (almost surely) and must match torch's
    assert torch.equal(idx2[pos], ref_idx[pos])


def test_fused_pool_module_channels_last_unbatched():
    torch.manual_seed(0)
    m = Conv2dReLUMaxPool2d(3, 8, 3, padding=1, dtype=torch.float64)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, dtype=torch.float64), torch.nn.ReLU(),
                              torch.nn.MaxPool2d(2))
    ref[0].load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    xc = x.contiguous(memory_format=torch.channels_last)
    out = m(xc)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref(x), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(m(x[0]), ref(x[0]), atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# opcheck, gradcheck, determinism.
# ---------------------------------------------------------------------------------------------
@needs_native
def test_opcheck():
    x, w, b, _ = make((2, 3, 6, 7, 4, 3, 1, 1, 1, 1, True), dtype=torch.float32)
    xg, wg, bg = leaves(x, w, b)
    for act, save in ((1, False), (2, True)):
        torch.library.opcheck(torch.ops.fastattn.conv2d_fwd.default,
                              (xg, wg, bg, [1, 1], [1, 0, 1, 1], [1, 1], 1, act, save))
    out, pre = torch.ops.fastattn.conv2d_fwd(x, w, b, [1, 1], [1, 0, 1, 1], [1, 1], 1, 2, True)
    gout = torch.randn_like(out)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        torch.library.opcheck(torch.ops.fastattn.conv2d_bwd.default,
                              (gout, x, w, pre, [1, 1], [1, 0, 1, 1], [1, 1], 1, 2, mask))
    x2, w2, b2, _ = make((2, 12, 7, 6, 8, 3, 1, 1, 1, 2, True), dtype=torch.float32)
    torch.library.opcheck(torch.ops.fastattn.conv2d_fwd.default,
                          (*leaves(x2, w2, b2), [2, 1], [1, 1, 0, 2], [1, 1], 2, 1, False))
    for args, save in (((x, w, b), False), ((xg, wg, bg), True)):  # inference keeps no indices
        torch.library.opcheck(torch.ops.fastattn.conv2d_relu_maxpool2d_fwd.default,
                              (*args, [1, 1], [1, 1, 1, 1], [1, 1], 1, [2, 2], [2, 2], save))
    pout, idx = torch.ops.fastattn.conv2d_relu_maxpool2d_fwd(x, w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1, [2, 2],
                                                             [2, 2], True)
    torch.library.opcheck(torch.ops.fastattn.conv2d_relu_maxpool2d_bwd.default,
                          (torch.randn_like(pout), x, w, pout, idx, [1, 1], [1, 1, 1, 1], [1, 1], 1,
                           [True, True, True]))


@needs_native
def test_gradcheck():
    torch.manual_seed(0)
    cases = [((1, 2, 4, 5, 3, 3, 1, 1, 1, 1, True), act) for act in (None, "relu", "gelu", "silu")]
    cases += [((1, 4, 5, 4, 4, 3, 2, (1, 0), 1, 2, True), "silu"),  # im2col path, stride, groups
              ((2, 2, 4, 4, 4, 2, 1, "same", 2, 2, True), "gelu"),  # even kernel 'same', dilation
              ((2, 3, 7, 6, 6, 3, 2, 1, 1, 3, True), "relu")]  # depthwise stride 2, multiplier 2
    for shape, act in cases:
        x, w, b, kw = make(shape)
        fn = lambda x, w, b: conv2d(x, w, b, **kw, activation=act, backend="cpu")  # noqa: E731
        assert torch.autograd.gradcheck(fn, leaves(x, w, b), eps=1e-6, atol=1e-5)
    x, w, b, kw = make((1, 3, 6, 6, 3, 3, 1, 1, 1, 1, True))
    fn = lambda x, w, b: conv2d_relu_maxpool2d(x, w, b, **kw, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves(x, w, b), eps=1e-6, atol=1e-5)


@needs_native
def test_grad_weight_deterministic():
    x, w, b, kw = make((16, 12, 9, 9, 8, 3, 1, 1, 1, 1, True), dtype=torch.float32)
    g = torch.randn(16, 8, 9, 9)
    runs = [torch.ops.fastattn.conv2d_bwd(g, x, w, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, 0, [True, True, True])
            for _ in range(2)]
    for u, v in zip(*runs):
        assert torch.equal(u, v)


# ---------------------------------------------------------------------------------------------
# Bad inputs.
# ---------------------------------------------------------------------------------------------
def test_bad_inputs():
    x = torch.randn(2, 4, 8, 8)
    w = torch.randn(6, 2, 3, 3)
    with pytest.raises(ValueError, match="input has 4 channels but weight"):
        conv2d(x, torch.randn(6, 3, 3, 3))
    with pytest.raises(ValueError, match="divisible by groups"):
        conv2d(x, torch.randn(5, 2, 3, 3), groups=2)
    with pytest.raises(ValueError, match="input must be 3-D .* or 4-D"):
        conv2d(torch.randn(8, 8), w)
    with pytest.raises(ValueError, match="weight must be 4-D"):
        conv2d(x, torch.randn(6, 4, 3))
    with pytest.raises(TypeError, match="one dtype"):
        conv2d(x, w.double(), groups=2)
    with pytest.raises(TypeError, match="bias must have input's dtype"):
        conv2d(x, w, torch.randn(6, dtype=torch.float64), groups=2)
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        conv2d(x, w, torch.randn(5), groups=2)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        conv2d(x.int(), w.int(), groups=2)
    with pytest.raises(ValueError, match="not supported for strided"):
        conv2d(x, w, padding="same", stride=2, groups=2)
    with pytest.raises(ValueError, match="padding must be 'valid', 'same'"):
        conv2d(x, w, padding="full", groups=2)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        conv2d(x, w, stride=0, groups=2)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        conv2d(x, w, padding=-1, groups=2)
    with pytest.raises(ValueError, match="larger than the padded input"):
        conv2d(torch.randn(1, 4, 2, 2), w, groups=2)
    with pytest.raises(ValueError, match="activation must be one of"):
        conv2d(x, w, groups=2, activation="tanh")
    with pytest.raises(ValueError, match="groups must be a positive int"):
        conv2d(x, w, groups=0)
    with pytest.raises(ValueError, match="smaller than pool_kernel"):
        conv2d_relu_maxpool2d(torch.randn(1, 4, 3, 3), w, groups=2, pool_kernel=2)
    with pytest.raises(ValueError, match="backend must be one of"):
        conv2d(x, w, groups=2, backend="mkldnn")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="one device"):
            conv2d(x, w.cuda(), groups=2)
    else:
        with pytest.raises(NotImplementedError, match="cuda backend takes CUDA tensors"):
            conv2d(x, w, groups=2, backend="cuda")


@needs_native
def test_native_checks():
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(RuntimeError, match="weight expects"):
        torch.ops.fastattn.conv2d_fwd(x, torch.randn(6, 3, 3, 3), None, [1, 1], [0, 0, 0, 0], [1, 1], 1, 0, False)
    with pytest.raises(RuntimeError, match="saved output"):
        torch.ops.fastattn.conv2d_bwd(torch.randn(2, 6, 6, 6), x, torch.randn(6, 4, 3, 3), None, [1, 1],
                                      [0, 0, 0, 0], [1, 1], 1, 1, [True, True, False])


# ---------------------------------------------------------------------------------------------
# The module.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_module_matches_torch_and_state_dict_round_trip(padding_mode):
    kwargs = dict(in_channels=4, out_channels=6, kernel_size=3, stride=(1, 2), padding=(1, 2), dilation=1,
                  groups=2, bias=True, padding_mode=padding_mode, dtype=torch.float64)
    torch.manual_seed(1)
    ours = Conv2d(**kwargs)
    torch.manual_seed(1)
    theirs = torch.nn.Conv2d(**kwargs)
    # same init (reset_parameters like torch) and the same parameter names
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64)
    # torch -> ours
    theirs2 = torch.nn.Conv2d(**kwargs)
    ours.load_state_dict(theirs2.state_dict())
    torch.testing.assert_close(ours(x), theirs2(x), atol=1e-10, rtol=1e-10)
    # ours -> torch
    ours2 = Conv2d(**kwargs)
    theirs.load_state_dict(ours2.state_dict())
    xo, xt = leaves(x, x)
    yo, yt = ours2(xo), theirs(xt)
    torch.testing.assert_close(yo, yt, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(yt)
    assert_close_all(grads(yo, [xo, ours2.weight, ours2.bias], g), grads(yt, [xt, theirs.weight, theirs.bias], g),
                     atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ours2(x[0]), theirs(x[0]), atol=1e-10, rtol=1e-10)  # unbatched


def test_module_same_padding_activation_and_repr():
    m = Conv2d(3, 5, 4, padding="same", bias=False, dtype=torch.float64, activation="silu")
    assert m.bias is None and "activation='silu'" in repr(m)
    ref = torch.nn.Conv2d(3, 5, 4, padding="same", bias=False, dtype=torch.float64)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(1, 3, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(m(x), F.silu(ref(x)), atol=1e-10, rtol=1e-10)
    assert isinstance(m, torch.nn.Conv2d)
    with pytest.raises(ValueError, match="activation must be one of"):
        Conv2d(3, 5, 3, activation="elu")


# ---------------------------------------------------------------------------------------------
# Triton (under TRITON_INTERPRET=1 without a GPU; small shapes).
# ---------------------------------------------------------------------------------------------
TRITON_SHAPES = [
    ((2, 3, 7, 6, 5, 3, 1, 1, 1, 1, True), "relu"),
    ((1, 4, 6, 7, 8, 3, 2, "valid", 1, 4, True), "gelu"),    # depthwise x2, stride 2
    ((2, 6, 5, 6, 4, 2, 1, "same", 2, 2, False), "silu"),    # even kernel 'same', dilation, groups
    ((1, 8, 5, 5, 4, 1, 1, 0, 1, 1, True), None),            # 1x1
]


@pytest.mark.triton
@pytest.mark.parametrize("case", range(len(TRITON_SHAPES)))
def test_triton_matches_torch(case, triton_device):
    pytest.importorskip("triton")
    if triton_device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1")
    shape, act = TRITON_SHAPES[case]
    x, w, b, kw = make(shape, dtype=torch.float32, seed=case)
    x, w = x.to(triton_device), w.to(triton_device)
    b = b.to(triton_device) if b is not None else None
    if case == 0:
        x = x.contiguous(memory_format=torch.channels_last)
    xs, ws, bs = leaves(x, w, b)
    out = conv2d(xs, ws, bs, **kw, activation=act, backend="triton")
    xr, wr, br = leaves(x.double(), w.double(), b.double() if b is not None else None)
    ref = torch_conv(xr, wr, br, **kw, activation=act)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(ref)
    assert_close_all([t.double() for t in grads(out, [xs, ws, bs], g.float())], grads(ref, [xr, wr, br], g),
                     atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# GPU (skipped without one; written to run on one).
# ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_gpu_matches_torch(backend, dtype, case):
    if backend == "cuda" and not (HAS_NATIVE and _ext.has_kernel("conv2d_fwd", "CUDA")):
        pytest.skip("built without CUDA kernels")
    x, w, b, kw = make(SHAPES[case], dtype=torch.float64, seed=case)
    for act in (None, "relu", "gelu", "silu"):
        xd, wd = x.cuda().to(dtype), w.cuda().to(dtype)
        bd = b.cuda().to(dtype) if b is not None else None
        xs, ws, bs = leaves(xd.contiguous(memory_format=torch.channels_last), wd, bd)
        out = conv2d(xs, ws, bs, **kw, activation=act, backend=backend)
        xr, wr, br = leaves(xd.double(), wd.double(), bd.double() if bd is not None else None)
        ref = torch_conv(xr, wr, br, **kw, activation=act)
        base = torch_conv(xd.float(), wd.float(), bd.float() if bd is not None else None, **kw,
                          activation=act).to(dtype)
        tol = 1e-4 if dtype == torch.float32 else 2 * (base.double() - ref).abs().max().item() + 1e-2
        assert (out.double() - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item() / 10)
        g = torch.randn_like(ref)
        for u, v in zip(grads(out, [xs, ws, bs], g.to(dtype)), grads(ref, [xr, wr, br], g)):
            scale = v.abs().max().item() + 1
            assert (u.double() - v).abs().max().item() <= (1e-4 if dtype == torch.float32 else 3e-2) * scale


@pytest.mark.cuda
def test_gpu_opcheck_and_fused_pool():
    if not (HAS_NATIVE and _ext.has_kernel("conv2d_fwd", "CUDA")):
        pytest.skip("built without CUDA kernels")
    x, w, b, kw = make(SHAPES[0], dtype=torch.float32)
    x, w, b = x.cuda(), w.cuda(), b.cuda()
    torch.library.opcheck(torch.ops.fastattn.conv2d_fwd.default,
                          (*leaves(x, w, b), [1, 1], [1, 1, 1, 1], [1, 1], 1, 2, True))
    out, pre = torch.ops.fastattn.conv2d_fwd(x, w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1, 3, True)
    torch.library.opcheck(torch.ops.fastattn.conv2d_bwd.default,
                          (torch.randn_like(out), x, w, pre, [1, 1], [1, 1, 1, 1], [1, 1], 1, 3, [True, True, True]))
    ref = F.max_pool2d(F.relu(F.conv2d(x, w, b, padding=1)), 2)
    torch.testing.assert_close(conv2d_relu_maxpool2d(x, w, b, padding=1, backend="cuda"), ref, atol=1e-4, rtol=1e-4)


def _has_cuda_fused_pool():
    return HAS_NATIVE and _ext.has_kernel("conv2d_relu_maxpool2d_fwd", "CUDA")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(POOL_CASES)))
def test_gpu_fused_pool_kernel(dtype, case):
    """The CUDA fused conv+bias+relu+max-pool forward and its backward vs torch in float64."""
    if not _has_cuda_fused_pool():
        pytest.skip("built without CUDA kernels")
    shape, pk, ps = POOL_CASES[case]
    x, w, b, kw = make(shape, seed=case)
    xd, wd = x.cuda().to(dtype), w.cuda().to(dtype)
    bd = b.cuda().to(dtype) if b is not None else None
    xr, wr, br = leaves(xd.double(), wd.double(), bd.double() if bd is not None else None)
    ref = F.max_pool2d(F.relu(F.conv2d(xr, wr, br, **kw)), pk, ps)
    base = F.max_pool2d(F.relu(F.conv2d(xd.float(), wd.float(), bd.float() if bd is not None else None, **kw)),
                        pk, ps).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 2 * (base.double() - ref).abs().max().item() + 1e-2
    g = torch.randn_like(ref)
    ref_grads = grads(ref, [xr, wr, br], g)
    for xin in (xd, xd.contiguous(memory_format=torch.channels_last)):
        xs, ws, bs = leaves(xin, wd, bd)
        out = conv2d_relu_maxpool2d(xs, ws, bs, **kw, pool_kernel=pk, pool_stride=ps, backend="cuda")
        assert out.dtype == dtype and out.shape == ref.shape
        assert (out.double() - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item() / 10)
        for u, v in zip(grads(out, [xs, ws, bs], g.to(dtype)), ref_grads):
            scale = v.abs().max().item() + 1
            assert (u.double() - v).abs().max().item() <= (1e-4 if dtype == torch.float32 else 3e-2) * scale


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fused_pool_indices_and_opcheck():
    """Indices match torch's argmax where relu is active; no indices without save_indices; opcheck."""
    if not _has_cuda_fused_pool():
        pytest.skip("built without CUDA kernels")
    x, w, b, kw = make((3, 3, 17, 19, 10, 3, 1, 1, 1, 1, True), dtype=torch.float32, seed=7)
    x, w, b = x.cuda(), w.cuda(), b.cuda()
    args = ([1, 1], [1, 1, 1, 1], [1, 1], 1, [2, 2], [2, 2])
    out, idx = torch.ops.fastattn.conv2d_relu_maxpool2d_fwd(x, w, b, *args, True)
    out2, idx2 = torch.ops.fastattn.conv2d_relu_maxpool2d_fwd(x, w, b, *args, False)
    assert idx2.numel() == 0 and torch.equal(out, out2)
    ref, ref_idx = F.max_pool2d(F.relu(F.conv2d(x, w, b, padding=1)), 2, return_indices=True)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    pos = out > 0
    assert idx.dtype == torch.int64 and torch.equal(idx[pos], ref_idx[pos])
    # the CPU op on the same input gives the same indices
    _, idx_cpu = torch.ops.fastattn.conv2d_relu_maxpool2d_fwd(x.cpu(), w.cpu(), b.cpu(), *args, True)
    assert torch.equal(idx.cpu()[pos.cpu()], idx_cpu[pos.cpu()])
    for save in (False, True):
        torch.library.opcheck(torch.ops.fastattn.conv2d_relu_maxpool2d_fwd.default,
                              (*leaves(x, w, b), *args, save))
    torch.library.opcheck(torch.ops.fastattn.conv2d_relu_maxpool2d_bwd.default,
                          (torch.randn_like(out), x, w, out, idx, *args[:4], [True, True, True]))
    # overlapping windows (pool stride < kernel): a pixel may be the max of several windows
    xs, ws, bs = leaves(x, w, b)
    o3 = conv2d_relu_maxpool2d(xs, ws, bs, padding=1, pool_kernel=3, pool_stride=2, backend="cuda")
    xr, wr, br = leaves(x.double(), w.double(), b.double())
    r3 = F.max_pool2d(F.relu(F.conv2d(xr, wr, br, padding=1)), 3, 2)
    torch.testing.assert_close(o3.double(), r3, atol=1e-4, rtol=1e-4)
    g3 = torch.randn_like(r3)
    assert_close_all([t.double() for t in grads(o3, [xs, ws, bs], g3.float())], grads(r3, [xr, wr, br], g3),
                     atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("fused_pool", [False, True])
def test_double_backward_is_refused_not_wrong(fused_pool):
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)

    def run():
        if fused_pool:
            return conv2d_relu_maxpool2d(x, w, None, backend="cpu")
        return conv2d(x, w, activation="silu", backend="cpu")

    (gx,) = torch.autograd.grad(run().square().sum(), x)  # first order works
    assert gx.shape == x.shape
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(run().square().sum(), x, create_graph=True)
