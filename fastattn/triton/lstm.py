"""LSTM in Triton: fused gate kernels (forward and backward); the GEMMs stay with torch (cuBLAS).

One step is ``gates = x W_ih^T + b_ih + h W_hh^T + b_hh`` (two GEMMs) followed by one fused pointwise
kernel that activates the 4 gates, updates the cell and writes ``h``, saving the activated gates
(fp32) for backward; the backward kernel turns ``(dh, dc)`` into the gates' gradient and ``dc_prev``
in one pass. The layer runs the steps in a Python loop (the GPU's own launch queue hides it for
large hidden sizes; the CUDA backend's persistent kernel is the small-hidden answer).

Ops (registered with ``torch.library.triton_op`` so torch.compile sees through them):
    fastattn::lstm_gates_fwd_triton(gates (B, 4H), c (B, H)) -> (h, c_new, act (B, 4H) fp32)
    fastattn::lstm_gates_bwd_triton(grad_h, grad_c_new, act, c_new, c) -> (grad_gates, grad_c)
Each program handles one batch row and BLOCK hidden units; math in fp32 (loads are cast up, stores
cast back), so bf16/fp16 inputs also run under TRITON_INTERPRET=1.
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastattn.triton._compat import triton_op, wrap_triton

__all__ = ["lstm_cell", "lstm_layer", "lstm_gates_fwd", "lstm_gates_bwd"]


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _gates_fwd_kernel(gates_ptr, c_ptr, h_out_ptr, c_out_ptr, act_ptr, H, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    g_row = gates_ptr + row * 4 * H
    gi = tl.load(g_row + cols, mask=mask, other=0.0).to(tl.float32)
    gf = tl.load(g_row + H + cols, mask=mask, other=0.0).to(tl.float32)
    gg = tl.load(g_row + 2 * H + cols, mask=mask, other=0.0).to(tl.float32)
    go = tl.load(g_row + 3 * H + cols, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    i = _sigmoid(gi)
    f = _sigmoid(gf)
    g = _tanh(gg)
    o = _sigmoid(go)
    c_new = f * c + i * g
    h = o * _tanh(c_new)
    a_row = act_ptr + row * 4 * H
    tl.store(a_row + cols, i, mask=mask)
    tl.store(a_row + H + cols, f, mask=mask)
    tl.store(a_row + 2 * H + cols, g, mask=mask)
    tl.store(a_row + 3 * H + cols, o, mask=mask)
    tl.store(c_out_ptr + row * H + cols, c_new.to(c_out_ptr.dtype.element_ty), mask=mask)
    tl.store(h_out_ptr + row * H + cols, h.to(h_out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gates_bwd_kernel(dh_ptr, dc_ptr, act_ptr, c_new_ptr, c_ptr, dgates_ptr, dc_prev_ptr, H,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    a_row = act_ptr + row * 4 * H
    i = tl.load(a_row + cols, mask=mask, other=0.0)
    f = tl.load(a_row + H + cols, mask=mask, other=0.0)
    g = tl.load(a_row + 2 * H + cols, mask=mask, other=0.0)
    o = tl.load(a_row + 3 * H + cols, mask=mask, other=0.0)
    dh = tl.load(dh_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    dc = tl.load(dc_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    c_new = tl.load(c_new_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    tc = _tanh(c_new)
    dcn = dc + dh * o * (1.0 - tc * tc)
    d_row = dgates_ptr + row * 4 * H
    ty = dgates_ptr.dtype.element_ty
    tl.store(d_row + cols, (dcn * g * i * (1.0 - i)).to(ty), mask=mask)
    tl.store(d_row + H + cols, (dcn * c * f * (1.0 - f)).to(ty), mask=mask)
    tl.store(d_row + 2 * H + cols, (dcn * i * (1.0 - g * g)).to(ty), mask=mask)
    tl.store(d_row + 3 * H + cols, (dh * tc * o * (1.0 - o)).to(ty), mask=mask)
    tl.store(dc_prev_ptr + row * H + cols, (dcn * f).to(dc_prev_ptr.dtype.element_ty), mask=mask)


def _block(H: int) -> int:
    return min(1024, triton.next_power_of_2(max(H, 16)))


def _launch(kernel, B: int, H: int, *args):
    block = _block(H)
    grid = (B, triton.cdiv(H, block))
    wrap_triton(kernel)[grid](*args, H, BLOCK=block)


@triton_op("fastattn::lstm_gates_fwd_triton", mutates_args=())
def lstm_gates_fwd(gates: Tensor, c: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    B, H = c.shape
    gates, c = gates.contiguous(), c.contiguous()
    h_out = torch.empty_like(c)
    c_out = torch.empty_like(c)
    act = torch.empty((B, 4 * H), device=c.device, dtype=torch.float32)
    if B > 0 and H > 0:
        _launch(_gates_fwd_kernel, B, H, gates, c, h_out, c_out, act)
    return h_out, c_out, act


@triton_op("fastattn::lstm_gates_bwd_triton", mutates_args=())
def lstm_gates_bwd(grad_h: Tensor, grad_c: Tensor, act: Tensor, c_new: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
    B, H = c.shape
    dgates = torch.empty((B, 4 * H), device=c.device, dtype=c.dtype)
    dc_prev = torch.empty_like(c, memory_format=torch.contiguous_format)
    if B > 0 and H > 0:
        _launch(_gates_bwd_kernel, B, H, grad_h.contiguous(), grad_c.contiguous(), act.contiguous(),
                c_new.contiguous(), c.contiguous(), dgates, dc_prev)
    return dgates, dc_prev


def _fwd_setup(ctx, inputs, output):
    _, c = inputs
    _, c_new, act = output
    ctx.mark_non_differentiable(act)
    ctx.save_for_backward(act, c_new, c)


def _fwd_backward(ctx, grad_h, grad_c, _grad_act):
    act, c_new, c = ctx.saved_tensors
    grad_h = torch.zeros_like(c_new) if grad_h is None else grad_h
    grad_c = torch.zeros_like(c_new) if grad_c is None else grad_c
    dgates, dc_prev = lstm_gates_bwd(grad_h, grad_c, act, c_new, c)
    return dgates, dc_prev


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fastattn LSTM (triton): double backward is not supported; use backend='reference'")


lstm_gates_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)
lstm_gates_bwd.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# --------------------------------------------------------------------------------------------
# Cell and layer on top of the fused gates (autograd runs through torch's GEMMs and our op).
# --------------------------------------------------------------------------------------------
def _gates(x_proj: Tensor, h: Tensor, w_hh: Tensor) -> Tensor:
    return torch.addmm(x_proj, h, w_hh.t())


def _in_proj(x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> Tensor:
    xp = x @ w_ih.t()
    if b_ih is not None:
        xp = xp + b_ih
    if b_hh is not None:
        xp = xp + b_hh
    return xp


def lstm_cell(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
              b_hh: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    gates = _gates(_in_proj(x, w_ih, b_ih, b_hh), h, w_hh)
    h_new, c_new, _ = lstm_gates_fwd(gates, c)
    return h_new, c_new


def lstm_layer(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
               b_hh: Optional[Tensor], w_hr: Optional[Tensor], reverse: bool,
               lengths: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """The layer contract of fastattn.ops.lstm (lengths: rows with ``t >= lengths[b]`` keep their state)."""
    T, B = x.shape[0], x.shape[1]
    xp = _in_proj(x, w_ih, b_ih, b_hh)
    h, c = h0, c0
    active = None
    if lengths is not None:
        steps = torch.arange(T).view(T, 1, 1)
        active = (steps < lengths.view(1, B, 1)).to(x.device)
    outs: List[Optional[Tensor]] = [None] * T
    for s in range(T):
        t = T - 1 - s if reverse else s
        r, c_new, _ = lstm_gates_fwd(_gates(xp[t], h, w_hh), c)
        h_new = r @ w_hr.t() if w_hr is not None else r
        if active is not None:
            a = active[t]
            h, c = torch.where(a, h_new, h), torch.where(a, c_new, c)
            outs[t] = torch.where(a, h_new, torch.zeros_like(h_new))
        else:
            h, c = h_new, c_new
            outs[t] = h_new
    return torch.stack(outs), h, c
