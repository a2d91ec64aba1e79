"""Triton 2-D convolution: implicit-GEMM forward with a fused bias + activation epilogue, and the
backward (data and weight), registered as ``fastattn::triton_conv2d_fwd`` / ``triton_conv2d_bwd``.

The native contract of :mod:`fastattn.ops.conv2d` holds here too. Each kernel is one GEMM whose
operand tiles are gathered from the tensors on the fly (no im2col buffer):

    forward       out[(n,p,q), k]  = sum_{(c,r,s)} x[n, c, p*sh-pt+r*dh, q*sw-pl+s*dw] * w[k, (c,r,s)]
    grad input    dx[(n,h,w), c]   = sum_{(k,r,s)} dz[n, k, (h+pt-r*dh)/sh, (w+pl-s*dw)/sw] * w[k, c, r, s]
                                     (only where the divisions are exact and land inside the output)
    grad weight   dw[k, (c,r,s)]   = sum_{(n,p,q)} dz[n, k, p, q] * x[n, c, p*sh-pt+r*dh, q*sw-pl+s*dw]

One program computes a BM x BN tile of one group (grid axis 2) and walks the reduction in BK
steps; out-of-range taps are masked loads of 0. fp32 operands use IEEE dots (no TF32) so the
results match the CPU kernel; 16-bit operands use tensor cores with fp32 accumulation. The input
may have any strides (channels_last included); outputs are contiguous NCHW.
"""
import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastattn.ops.conv2d import make_conv2d_autograd

from fastattn.triton._compat import gpu_target, triton_op, wrap_triton

__all__ = ["triton_conv2d_fwd", "triton_conv2d_bwd"]


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _activation(z, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        z = z / (1.0 + tl.exp(-z))
    return z


@triton.jit
def _store_epilogue(acc, out_ptr, pre_ptr, off, mask, SAVE_PRE: tl.constexpr, ACT: tl.constexpr):
    """Store acc (fp32, bias added) as the pre-activation when SAVE_PRE and act(acc) as the output, each
    rounded once to its tensor's dtype (shared with fastattn/triton/linear.py)."""
    if SAVE_PRE:
        tl.store(pre_ptr + off, acc.to(pre_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + off, _activation(acc, ACT).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot(a, b, acc, FP32: tl.constexpr):
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _conv2d_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, pre_ptr,
                       N, H, W, K, P, Q, Cg, Kg, R, S,
                       sxn, sxc, sxh, sxw,
                       STR_H, STR_W, PAD_T, PAD_L, DIL_H, DIL_W,
                       HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SAVE_PRE: tl.constexpr, FP32: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    g = tl.program_id(2)
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)  # output pixel (n, p, q)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)  # output channel within the group
    PQ = P * Q
    n = offs_m // PQ
    pq = offs_m % PQ
    ih0 = (pq // Q) * STR_H - PAD_T
    iw0 = (pq % Q) * STR_W - PAD_L
    m_ok = offs_m < N * PQ
    n_ok = offs_n < Kg
    RS = R * S
    CRS = Cg * RS
    x_base = x_ptr + n * sxn + g * Cg * sxc
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, CRS, BK):
        offs_k = k0 + tl.arange(0, BK)  # reduction index (c, r, s)
        k_ok = offs_k < CRS
        c = offs_k // RS
        r = (offs_k % RS) // S
        s = offs_k % S
        ih = ih0[:, None] + (r * DIL_H)[None, :]
        iw = iw0[:, None] + (s * DIL_W)[None, :]
        a_mask = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_base[:, None] + (c * sxc)[None, :] + ih * sxh + iw * sxw, mask=a_mask, other=0.0)
        b = tl.load(w_ptr + (g * Kg + offs_n)[None, :] * CRS + offs_k[:, None],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, FP32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + g * Kg + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    o_off = (n * K * PQ + pq)[:, None] + ((g * Kg + offs_n) * PQ)[None, :]
    _store_epilogue(acc, out_ptr, pre_ptr, o_off, m_ok[:, None] & n_ok[None, :], SAVE_PRE, ACT)


@triton.jit
def _conv2d_bwd_data_kernel(dz_ptr, w_ptr, dx_ptr,
                            N, H, W, K, P, Q, Cg, Kg, R, S,
                            STR_H, STR_W, PAD_T, PAD_L, DIL_H, DIL_W,
                            FP32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    g = tl.program_id(2)
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)  # input pixel (n, h, w)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)  # input channel within the group
    HW = H * W
    n = offs_m // HW
    hw = offs_m % HW
    h = hw // W
    w = hw % W
    m_ok = offs_m < N * HW
    n_ok = offs_n < Cg
    RS = R * S
    CRS = Cg * RS
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, Kg * RS, BK):
        offs_k = k0 + tl.arange(0, BK)  # reduction index (k, r, s)
        k_ok = offs_k < Kg * RS
        k = offs_k // RS
        r = (offs_k % RS) // S
        s = offs_k % S
        ph = h[:, None] + PAD_T - (r * DIL_H)[None, :]  # = p * STR_H when this tap reaches (h, w)
        pw = w[:, None] + PAD_L - (s * DIL_W)[None, :]
        ph_ok = (ph >= 0) & (ph % STR_H == 0)
        pw_ok = (pw >= 0) & (pw % STR_W == 0)
        p = tl.where(ph_ok, ph, 0) // STR_H
        q = tl.where(pw_ok, pw, 0) // STR_W
        a_mask = m_ok[:, None] & k_ok[None, :] & ph_ok & pw_ok & (p < P) & (q < Q)
        a = tl.load(dz_ptr + ((n[:, None] * K + (g * Kg + k)[None, :]) * P + p) * Q + q, mask=a_mask, other=0.0)
        b = tl.load(w_ptr + (g * Kg + k)[:, None] * CRS + offs_n[None, :] * RS + (r * S + s)[:, None],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, FP32)
    C = Cg * tl.num_programs(2)
    o_off = (n * C * HW + hw)[:, None] + ((g * Cg + offs_n) * HW)[None, :]
    tl.store(dx_ptr + o_off, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv2d_bwd_weight_kernel(dz_ptr, x_ptr, dw_ptr,
                              N, H, W, K, P, Q, Cg, Kg, R, S,
                              sxn, sxc, sxh, sxw,
                              STR_H, STR_W, PAD_T, PAD_L, DIL_H, DIL_W,
                              FP32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    g = tl.program_id(2)
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)  # output channel within the group
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)  # weight tap (c, r, s)
    RS = R * S
    CRS = Cg * RS
    m_ok = offs_m < Kg
    n_ok = offs_n < CRS
    c = offs_n // RS
    r = (offs_n % RS) // S
    s = offs_n % S
    PQ = P * Q
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, N * PQ, BK):
        offs_k = k0 + tl.arange(0, BK)  # reduction index: output pixel (n, p, q)
        k_ok = offs_k < N * PQ
        n = offs_k // PQ
        pq = offs_k % PQ
        a = tl.load(dz_ptr + (n[None, :] * K + (g * Kg + offs_m)[:, None]) * PQ + pq[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        ih = ((pq // Q) * STR_H - PAD_T)[:, None] + (r * DIL_H)[None, :]
        iw = ((pq % Q) * STR_W - PAD_L)[:, None] + (s * DIL_W)[None, :]
        b_mask = k_ok[:, None] & n_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = tl.load(x_ptr + n[:, None] * sxn + (g * Cg + c)[None, :] * sxc + ih * sxh + iw * sxw,
                    mask=b_mask, other=0.0)
        acc = _dot(a, b, acc, FP32)
    tl.store(dw_ptr + (g * Kg + offs_m)[:, None] * CRS + offs_n[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _blocks(device: torch.device) -> Tuple[int, int, int]:
    if _interpret() or (device.type != "cuda" and gpu_target() is None):
        return 32, 16, 16  # the interpreter runs numpy per program: few, small programs
    return 128, 64, 32


def _out_hw(x: Tensor, w: Tensor, stride, padding, dilation) -> Tuple[int, int]:
    P = (x.shape[2] + padding[0] + padding[1] - dilation[0] * (w.shape[2] - 1) - 1) // stride[0] + 1
    Q = (x.shape[3] + padding[2] + padding[3] - dilation[1] * (w.shape[3] - 1) - 1) // stride[1] + 1
    return P, Q


@triton_op("fastattn::triton_conv2d_fwd", mutates_args=())
def triton_conv2d_fwd(x: Tensor, w: Tensor, b: Optional[Tensor], stride: List[int], padding: List[int],
                      dilation: List[int], groups: int, activation: int, save_preact: bool) -> Tuple[Tensor, Tensor]:
    N, C, H, W = x.shape
    K, Cg, R, S = w.shape
    P, Q = _out_hw(x, w, stride, padding, dilation)
    Kg = K // groups
    out = torch.empty((N, K, P, Q), dtype=x.dtype, device=x.device)
    pre = torch.empty((N, K, P, Q) if save_preact else (0,), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out, pre
    wc = w.contiguous()
    BM, BN, BK = _blocks(x.device)
    grid = (triton.cdiv(N * P * Q, BM), triton.cdiv(Kg, BN), groups)
    fp32 = _interpret() or x.dtype == torch.float32
    wrap_triton(_conv2d_fwd_kernel)[grid](
        x, wc, b if b is not None else wc, out, pre if save_preact else out,
        N, H, W, K, P, Q, Cg, Kg, R, S, *x.stride(),
        stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
        HAS_BIAS=b is not None, ACT=activation, SAVE_PRE=save_preact, FP32=fp32, BM=BM, BN=BN, BK=BK)
    return out, pre


def _grad_z(grad_out: Tensor, saved: Optional[Tensor], activation: int) -> Tensor:
    """The gradient at the pre-activation, in float32."""
    g = grad_out.float()
    if activation == 0:
        return g.contiguous()
    z = saved.float()
    if activation == 1:
        return (g * (z > 0)).contiguous()
    if activation == 2:
        cdf = 0.5 * (1.0 + torch.erf(z * 0.7071067811865476))
        return (g * (cdf + z * 0.3989422804014327 * torch.exp(-0.5 * z * z))).contiguous()
    sig = torch.sigmoid(z)
    return (g * sig * (1.0 + z * (1.0 - sig))).contiguous()


@triton_op("fastattn::triton_conv2d_bwd", mutates_args=())
def triton_conv2d_bwd(grad_out: Tensor, x: Tensor, w: Tensor, saved: Optional[Tensor], stride: List[int],
                      padding: List[int], dilation: List[int], groups: int, activation: int,
                      output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    N, C, H, W = x.shape
    K, Cg, R, S = w.shape
    P, Q = grad_out.shape[2], grad_out.shape[3]
    Kg = K // groups
    gz = _grad_z(grad_out, saved, activation)
    BM, BN, BK = _blocks(x.device)
    args = (stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1])
    dx = torch.empty((0,), dtype=x.dtype, device=x.device)
    dw = torch.empty((0,), dtype=w.dtype, device=w.device)
    db = torch.empty((0,), dtype=w.dtype, device=w.device)
    if output_mask[0]:
        dx32 = torch.zeros((N, C, H, W), dtype=torch.float32, device=x.device)
        if gz.numel() > 0:
            wc = w.float().contiguous()
            grid = (triton.cdiv(N * H * W, BM), triton.cdiv(Cg, BN), groups)
            wrap_triton(_conv2d_bwd_data_kernel)[grid](gz, wc, dx32, N, H, W, K, P, Q, Cg, Kg, R, S, *args,
                                                       FP32=True, BM=BM, BN=BN, BK=BK)
        dx = dx32.to(x.dtype)
    if output_mask[1]:
        dw32 = torch.zeros((K, Cg, R, S), dtype=torch.float32, device=w.device)
        if gz.numel() > 0:
            xf = x.float()
            grid = (triton.cdiv(Kg, BM), triton.cdiv(Cg * R * S, BN), groups)
            wrap_triton(_conv2d_bwd_weight_kernel)[grid](gz, xf, dw32, N, H, W, K, P, Q, Cg, Kg, R, S,
                                                         *xf.stride(), *args, FP32=True, BM=BM, BN=BN, BK=BK)
        dw = dw32.to(w.dtype)
    if output_mask[2]:
        db = gz.sum(dim=(0, 2, 3)).to(w.dtype)
    return dx, dw, db


# The same autograd as the native op (and the same refusal of double backward).
_setup, _backward = make_conv2d_autograd(triton_conv2d_bwd, "conv2d (triton)")
triton_conv2d_fwd.register_autograd(_backward, setup_context=_setup)
