"""2-D convolution: the functional API, input checks, backend choice, autograd.

Native contract (every backend; the tests hold them all to one oracle):

    conv2d_fwd(input, weight, bias?, stride[2], padding[4], dilation[2], groups, activation,
               save_preact) -> (out, preact)
    conv2d_bwd(grad_out, input, weight, saved?, stride, padding, dilation, groups, activation,
               output_mask[3]) -> (grad_input, grad_weight, grad_bias)
    conv2d_relu_maxpool2d_fwd(input, weight, bias?, stride, padding, dilation, groups,
                              pool_kernel[2], pool_stride[2], save_indices) -> (out, indices)
    conv2d_relu_maxpool2d_bwd(grad_out, input, weight, out, indices, stride, padding, dilation,
                              groups, output_mask[3]) -> (grad_input, grad_weight, grad_bias)

* input ``(N, C, H, W)`` (any strides; computed as NCHW), weight ``(K, C/groups, R, S)``, bias
  ``(K,)``; one floating dtype (16-bit types accumulate in float32).
* padding is ``(top, bottom, left, right)``: torch's ``'same'`` with an even kernel pads one more
  at the bottom/right; ``P = (H + top + bottom - dilation*(R-1) - 1) // stride + 1``.
* ``activation``: 0 none, 1 relu, 2 gelu (exact, erf), 3 silu, applied to ``conv + bias``.
  ``preact`` (``conv + bias``) is returned only when ``save_preact``, else it is empty; backward
  takes ``saved`` = the output for relu, the pre-activation for gelu/silu, None for none.
* outputs are contiguous NCHW; the Python op puts them back in a channels_last input's layout.
* grads: an output whose ``output_mask`` entry is False is an empty tensor.
* the fused pool is ``max_pool2d(relu(conv2d(...)), pool_kernel, pool_stride)`` (no pool padding,
  floor mode); ``indices`` (int64, flat ``h*Q + w`` into the conv output plane, the first maximum
  in scan order) only when ``save_indices``, else empty; the pre-pool map is never written.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn import _ext, backend as _backend
from fastattn.ops._activation import ACTIVATIONS, apply_activation, check_epilogue, check_operands
from fastattn.ops._autograd import refuse_double_backward

__all__ = ["conv2d", "conv2d_relu_maxpool2d", "conv2d_reference", "ACTIVATIONS"]

IntPair = Union[int, Sequence[int]]


# --------------------------------------------------------------------------------------------
# The oracle: plain PyTorch math (pad, unfold, matmul), also the `reference` backend.
# --------------------------------------------------------------------------------------------
def conv2d_reference(x: Tensor, w: Tensor, b: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int], groups: int, activation: int = 0) -> Tensor:
    """The native contract on a 4-D input in plain math (differentiable by autograd)."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    N, C, H, W = x.shape
    K, Cg, R, S = w.shape
    top, bottom, left, right = padding
    xp = F.pad(x.to(cdt), (left, right, top, bottom))
    P = (H + top + bottom - dilation[0] * (R - 1) - 1) // stride[0] + 1
    Q = (W + left + right - dilation[1] * (S - 1) - 1) // stride[1] + 1
    cols = F.unfold(xp, (R, S), dilation=tuple(dilation), stride=tuple(stride))  # (N, C*R*S, P*Q)
    cols = cols.view(N, groups, Cg * R * S, P * Q)
    wg = w.to(cdt).reshape(groups, K // groups, Cg * R * S)
    out = torch.einsum("gkc,ngcm->ngkm", wg, cols).reshape(N, K, P, Q)
    if b is not None:
        out = out + b.to(cdt).view(1, K, 1, 1)
    return apply_activation(out, activation).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Native ops: fake kernels and autograd.
# --------------------------------------------------------------------------------------------
def _out_hw(x: Tensor, w: Tensor, stride, padding, dilation) -> Tuple[int, int]:
    P = (x.shape[2] + padding[0] + padding[1] - dilation[0] * (w.shape[2] - 1) - 1) // stride[0] + 1
    Q = (x.shape[3] + padding[2] + padding[3] - dilation[1] * (w.shape[3] - 1) - 1) // stride[1] + 1
    return P, Q


def _fwd_fake(x, w, b, stride, padding, dilation, groups, activation, save_preact):
    P, Q = _out_hw(x, w, stride, padding, dilation)
    out = x.new_empty((x.shape[0], w.shape[0], P, Q))
    pre = x.new_empty((x.shape[0], w.shape[0], P, Q) if save_preact else (0,))
    return out, pre


def _grads_fake(x, w, output_mask):
    return (x.new_empty(tuple(x.shape) if output_mask[0] else (0,)),
            w.new_empty(tuple(w.shape) if output_mask[1] else (0,)),
            w.new_empty((w.shape[0],) if output_mask[2] else (0,)))


def _bwd_fake(grad_out, x, w, saved, stride, padding, dilation, groups, activation, output_mask):
    return _grads_fake(x, w, output_mask)


def _pool_fwd_fake(x, w, b, stride, padding, dilation, groups, pool_kernel, pool_stride, save_indices):
    P, Q = _out_hw(x, w, stride, padding, dilation)
    PH = (P - pool_kernel[0]) // pool_stride[0] + 1
    PW = (Q - pool_kernel[1]) // pool_stride[1] + 1
    shape = (x.shape[0], w.shape[0], PH, PW)
    return x.new_empty(shape), x.new_empty(shape if save_indices else (0,), dtype=torch.int64)


def _pool_bwd_fake(grad_out, x, w, out, indices, stride, padding, dilation, groups, output_mask):
    return _grads_fake(x, w, output_mask)


def _masked(grads, mask):
    return tuple(g if m else None for g, m in zip(grads, mask))


def make_conv2d_autograd(bwd_op, what: str):
    """(setup_context, backward) for a conv2d forward op whose backward op is ``bwd_op``."""

    def setup_context(ctx, inputs, output):
        x, w, b, stride, padding, dilation, groups, activation, save_preact = inputs
        out, pre = output
        saved = out if activation == 1 else pre if activation in (2, 3) else None
        ctx.save_for_backward(x, w, saved)
        ctx.params = (stride, padding, dilation, groups, activation)
        ctx.has_bias = b is not None

    def backward(ctx, grad_out, grad_pre):
        x, w, saved = ctx.saved_tensors
        refuse_double_backward(what, grad_out, x, w)
        stride, padding, dilation, groups, activation = ctx.params
        if activation in (2, 3) and saved.numel() == 0:
            raise RuntimeError(f"fastattn.{what}: backward through gelu/silu needs the forward run with save_preact=True")
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grads = bwd_op(grad_out.contiguous(), x, w, saved, stride, padding, dilation, groups, activation, mask)
        return _masked(grads, mask) + (None,) * 6

    return setup_context, backward


def _pool_setup(ctx, inputs, output):
    x, w, b, stride, padding, dilation, groups, pool_kernel, pool_stride, save_indices = inputs
    out, indices = output
    ctx.save_for_backward(x, w, out, indices)
    ctx.params = (stride, padding, dilation, groups)
    ctx.has_bias = b is not None


def _pool_backward(ctx, grad_out, grad_indices):
    x, w, out, indices = ctx.saved_tensors
    refuse_double_backward("conv2d_relu_maxpool2d", grad_out, x, w)
    if indices.numel() == 0 and out.numel() != 0:
        raise RuntimeError("fastattn.conv2d_relu_maxpool2d: backward needs the forward run with save_indices=True")
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    grads = torch.ops.fastattn.conv2d_relu_maxpool2d_bwd(grad_out.contiguous(), x, w, out, indices, *ctx.params, mask)
    return _masked(grads, mask) + (None,) * 7


_native = _ext.available() and hasattr(torch.ops.fastattn, "conv2d_fwd")
if _native:
    torch.library.register_fake("fastattn::conv2d_fwd")(_fwd_fake)
    torch.library.register_fake("fastattn::conv2d_bwd")(_bwd_fake)
    torch.library.register_fake("fastattn::conv2d_relu_maxpool2d_fwd")(_pool_fwd_fake)
    torch.library.register_fake("fastattn::conv2d_relu_maxpool2d_bwd")(_pool_bwd_fake)
    _fwd_setup, _fwd_backward = make_conv2d_autograd(torch.ops.fastattn.conv2d_bwd, "conv2d")
    torch.library.register_autograd("fastattn::conv2d_fwd", _fwd_backward, setup_context=_fwd_setup)
    torch.library.register_autograd("fastattn::conv2d_relu_maxpool2d_fwd", _pool_backward, setup_context=_pool_setup)


def _triton_op():
    """The Triton forward (differentiable; registered in its module). Imported on first use."""
    from fastattn.triton.conv2d import triton_conv2d_fwd
    return triton_conv2d_fwd


# --------------------------------------------------------------------------------------------
# Argument normalisation and checks: clear errors naming the argument.
# --------------------------------------------------------------------------------------------
def _pair(name: str, v: IntPair, minimum: int) -> List[int]:
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        v = (v, v)
    try:
        v = [int(a) for a in v]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    if len(v) == 1:
        v = v * 2
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(v) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(v)}")
    return v


def _padding4(padding, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> List[int]:
    """int / pair / 'valid' / 'same' -> (top, bottom, left, right), as torch pads."""
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0, 0, 0]
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError("padding='same' is not supported for strided convolutions (stride must be 1)")
            out = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                out += [total // 2, total - total // 2]  # an odd total pads one more at the end
            return out
        raise ValueError(f"padding must be 'valid', 'same', an int or a pair of ints, got {padding!r}")
    ph, pw = _pair("padding", padding, 0)
    return [ph, ph, pw, pw]


def _check_inputs(input: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int, activation) -> None:
    check_operands(input, weight)
    if input.dim() not in (3, 4):
        raise ValueError(f"input must be 3-D (C, H, W) or 4-D (N, C, H, W), got a {input.dim()}-D tensor")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (out_channels, in_channels/groups, kH, kW), got a {weight.dim()}-D tensor")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    C = input.shape[-3]
    K = weight.shape[0]
    if weight.shape[1] * groups != C:
        raise ValueError(f"input has {C} channels but weight {tuple(weight.shape)} with groups={groups} expects "
                         f"{weight.shape[1] * groups} (in_channels = weight.shape[1] * groups)")
    if K % groups != 0:
        raise ValueError(f"out_channels (weight.shape[0] = {K}) must be divisible by groups = {groups}")
    check_epilogue(input, bias, K, "out_channels", activation)


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _prepare(input, weight, bias, stride, padding, dilation, groups, activation):
    _check_inputs(input, weight, bias, groups, activation)
    stride = _pair("stride", stride, 1)
    dilation = _pair("dilation", dilation, 1)
    pad4 = _padding4(padding, weight.shape[2:], stride, dilation)
    x = input.unsqueeze(0) if input.dim() == 3 else input
    H, W = x.shape[2] + pad4[0] + pad4[1], x.shape[3] + pad4[2] + pad4[3]
    kh, kw = dilation[0] * (weight.shape[2] - 1) + 1, dilation[1] * (weight.shape[3] - 1) + 1
    if H < kh or W < kw:
        raise ValueError(f"the (dilated) kernel {kh}x{kw} is larger than the padded input {H}x{W}")
    return x, stride, pad4, dilation


def _finish(out: Tensor, input: Tensor) -> Tensor:
    if input.dim() == 3:
        return out.squeeze(0)
    if _is_channels_last(input):
        return out.contiguous(memory_format=torch.channels_last)
    return out


def _reasons(x: Tensor):
    def cpu() -> List[str]:
        return []

    def cuda() -> List[str]:
        return ["float64 input (the CUDA kernels take float16, bfloat16, float32)"] if x.dtype == torch.float64 else []

    def triton() -> List[str]:
        return ["float64 input (the Triton kernels take float16, bfloat16, float32)"] if x.dtype == torch.float64 else []

    return {"cpu": cpu, "cuda": cuda, "triton": triton, "reference": lambda: []}


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _run(name: str, x, weight, bias, stride, pad4, dilation, groups, act: int) -> Tensor:
    if name == "reference":
        return conv2d_reference(x, weight, bias, stride, pad4, dilation, groups, act)
    op = _triton_op() if name == "triton" else torch.ops.fastattn.conv2d_fwd
    save_preact = act in (2, 3) and _needs_grad(x, weight, bias)
    return op(x, weight, bias, stride, pad4, dilation, groups, act, save_preact)[0]


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------
def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntPair = 1,
           padding: Union[str, IntPair] = 0, dilation: IntPair = 1, groups: int = 1, *,
           activation: Optional[str] = None, backend: Optional[str] = None) -> Tensor:
    """Drop-in for ``torch.nn.functional.conv2d``, plus ``activation`` (None, 'relu', 'gelu',
    'silu') applied with the bias in the kernel's epilogue before the output is written.

    Takes a 3-D (unbatched) or 4-D input, NCHW or channels_last (the output keeps the layout).
    """
    x, stride, pad4, dilation = _prepare(input, weight, bias, stride, padding, dilation, groups, activation)
    name = _backend.select("conv2d", backend, x.device, _reasons(x), native_op="conv2d_fwd")
    out = _run(name, x, weight, bias, stride, pad4, dilation, groups, ACTIVATIONS[activation])
    return _finish(out, input)


def conv2d_relu_maxpool2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntPair = 1,
                          padding: Union[str, IntPair] = 0, dilation: IntPair = 1, groups: int = 1,
                          pool_kernel: IntPair = 2, pool_stride: Optional[IntPair] = None, *,
                          backend: Optional[str] = None) -> Tensor:
    """``max_pool2d(relu(conv2d(input, weight, bias, ...)), pool_kernel, pool_stride)`` in one pass.

    On the CPU the conv output is computed a few rows at a time into a cache-resident buffer and
    pooled there (only the argmax indices are kept, and only when a gradient is needed). The cuda
    backend computes each pool window's conv values in registers and writes only the pooled
    output (and indices); the triton backend runs the conv with a fused relu epilogue and then
    torch's max_pool2d.
    """
    x, stride, pad4, dilation = _prepare(input, weight, bias, stride, padding, dilation, groups, None)
    pk = _pair("pool_kernel", pool_kernel, 1)
    ps = pk if pool_stride is None else _pair("pool_stride", pool_stride, 1)
    P, Q = _out_hw(x, weight, stride, pad4, dilation)
    if P < pk[0] or Q < pk[1]:
        raise ValueError(f"the conv output {P}x{Q} is smaller than pool_kernel {tuple(pk)}")
    name = _backend.select("conv2d_relu_maxpool2d", backend, x.device, _reasons(x),
                           native_op="conv2d_relu_maxpool2d_fwd")
    if name in ("cpu", "cuda"):
        save = _needs_grad(x, weight, bias)
        out, _ = torch.ops.fastattn.conv2d_relu_maxpool2d_fwd(x, weight, bias, stride, pad4, dilation, groups,
                                                              pk, ps, save)
    else:
        z = _run(name, x, weight, bias, stride, pad4, dilation, groups, ACTIVATIONS["relu"])
        out = F.max_pool2d(z, tuple(pk), tuple(ps))
    return _finish(out, input)
