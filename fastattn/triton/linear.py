"""Triton fused linear: ``act(x @ w^T + b)`` forward with the bias + activation in the GEMM's epilogue, and
its backward, registered as ``fastattn::triton_linear_fwd`` / ``fastattn::triton_linear_bwd``.

The native contract of the ``linear`` op (fastattn/ops/linear.py, LINEAR_CONTRACT) holds here too. One GEMM
kernel, ``C = act(A @ B + bias)``, takes A (rows x red) and B (red x cols) as a pointer plus a (row, column)
stride each, so the three products of the op are the same kernel with different strides:

    forward       out (M, N)    = act(x @ w^T + b)     A = x           B = w^T  (w's strides swapped)
    grad input    dx  (M, K)    = gz @ w               A = gz          B = w
    grad weight   dw  (N, K)    = gz^T @ x             A = gz^T        B = x    (gz's strides swapped)

with gz = grad_out * act'(saved) computed as the A tile is loaded (saved: the output for relu, the
pre-activation for gelu/silu), so gz is never written to memory. grad_bias = gz.sum(0) is a column sum
(:func:`_linear_colsum_kernel`), split over row chunks when M is large, the partials summed by the same kernel.

Blocking: one program computes a BM x BN tile of C and walks the reduction in BK steps (fp32 accumulator).
Programs are ordered in groups of GROUP_M row tiles (Triton's matmul tutorial): consecutive programs share
their B column tiles and a few A row tiles, which then stay in L2. fp32 operands use IEEE dots (no TF32) so
the results match the CPU kernel; fp16/bf16 operands use tensor cores with fp32 accumulation, results
rounded once to the input dtype. On a GPU BM/BN/BK/warps/stages are autotuned (one list for 16-bit, a
smaller one for fp32, whose exact dots need more registers and shared memory); under ``TRITON_INTERPRET=1``
(CPU tensors, the tests) one small fixed config is used and every tile is computed in fp32.
"""
import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastattn.ops.linear import make_linear_autograd
from fastattn.triton._compat import NEEDS_FAKE, gpu_target, triton_op, tune_configs, wrap_triton
from fastattn.triton.conv2d import _dot, _store_epilogue

__all__ = ["triton_linear_fwd", "triton_linear_bwd"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_ACTIVATIONS = {0: "none", 1: "relu", 2: "gelu", 3: "silu"}


@triton.jit
def _activation_grad(z, ACT: tl.constexpr):
    """act'(z) for the backward: z is the output for relu (out > 0 iff preact > 0), the pre-activation for
    gelu/silu (the same formulas as conv2d's backward)."""
    if ACT == 1:
        d = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 2:
        d = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    else:
        s = 1.0 / (1.0 + tl.exp(-z))
        d = s * (1.0 + z * (1.0 - s))
    return d


@triton.jit
def _linear_gemm_kernel(a_ptr, saved_ptr, b_ptr, c_ptr, bias_ptr, pre_ptr,
                        M, N, K, M_BUCKET,
                        s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
                        HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SAVE_PRE: tl.constexpr,
                        GRAD_ACT: tl.constexpr, FP32: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """C[M, N] = act(A[M, K] @ B[K, N] + bias), A and B given by strides.

    GRAD_ACT != 0: A is grad_out, and A * act'(saved) (saved at the same offsets) is what is multiplied.
    SAVE_PRE: the pre-activation is stored to pre_ptr too. M_BUCKET only keys the autotuning."""
    # Grouped ordering: GROUP_M row tiles per group, the group's programs walk down its rows first.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # 64-bit row/column offsets (big tensors); the reduction steps are added to the pointers.
    a_off = offs_m[:, None].to(tl.int64) * s_am + offs_k[None, :] * s_ak
    a_ptrs = a_ptr + a_off
    s_ptrs = saved_ptr + a_off
    b_ptrs = b_ptr + offs_k[:, None] * s_bk + offs_n[None, :].to(tl.int64) * s_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = offs_k < K - k0
        a_mask = m_ok[:, None] & k_ok[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if GRAD_ACT != 0:
            z = tl.load(s_ptrs, mask=a_mask, other=0.0).to(tl.float32)
            gz = a.to(tl.float32) * _activation_grad(z, GRAD_ACT)
            a = gz if FP32 else gz.to(a_ptr.dtype.element_ty)  # 16-bit: tensor-core operand
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, FP32)
        a_ptrs += BK * s_ak
        s_ptrs += BK * s_ak
        b_ptrs += BK * s_bk

    # Epilogue: bias, (pre-activation), activation, one rounding to the output dtype.
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_off = offs_m[:, None].to(tl.int64) * s_cm + offs_n[None, :] * s_cn
    _store_epilogue(acc, c_ptr, pre_ptr, c_off, m_ok[:, None] & n_ok[None, :], SAVE_PRE, ACT)


@triton.jit
def _linear_colsum_kernel(g_ptr, saved_ptr, out_ptr, M, N, ROWS_PER_SPLIT,
                          ACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """out[split, n] = sum over rows [split * ROWS_PER_SPLIT, +ROWS_PER_SPLIT) of g[m, n] * act'(saved[m, n])
    (g, saved contiguous (M, N); ACT 0: g itself). A program owns BN columns of one split and adds BM x BN
    tiles in a fixed order, summing the tile's rows at the end: deterministic."""
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    split = tl.program_id(1)
    n_ok = offs_n < N
    row0 = split * ROWS_PER_SPLIT
    row_end = tl.minimum(M, row0 + ROWS_PER_SPLIT)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for m0 in range(row0, row_end, BM):
        rows = m0 + tl.arange(0, BM)
        mask = (rows < row_end)[:, None] & n_ok[None, :]
        off = rows[:, None].to(tl.int64) * N + offs_n[None, :]
        g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if ACT != 0:
            g = g * _activation_grad(tl.load(saved_ptr + off, mask=mask, other=0.0).to(tl.float32), ACT)
        acc += g
    total = tl.sum(acc, axis=0)
    tl.store(out_ptr + split.to(tl.int64) * N + offs_n, total.to(out_ptr.dtype.element_ty), mask=n_ok)


# --------------------------------------------------------------------------------------------
# Launch configs: autotuned on a GPU, one small fixed config in the interpreter.
# --------------------------------------------------------------------------------------------
# (BM, BN, BK, GROUP_M, num_warps, num_stages). 16-bit: tensor-core tiles as Triton's matmul tutorial;
# fp32 (exact "ieee" dots, no TF32): smaller tiles, fewer stages (checked to fit sm_80's shared memory by
# `python -m fastattn.triton.aot --ops linear --arch 80`; the autotuner skips a config that does not fit).
_SHAPES_16 = [(128, 128, 32, 8, 4, 4), (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3), (128, 64, 64, 8, 4, 4),
              (64, 128, 64, 8, 4, 4), (128, 128, 64, 8, 8, 3), (64, 64, 64, 8, 4, 4), (64, 32, 32, 8, 4, 5)]
_SHAPES_32 = [(64, 64, 32, 8, 4, 3), (128, 64, 32, 8, 8, 3), (64, 128, 32, 8, 8, 3), (128, 128, 32, 8, 8, 2),
              (64, 64, 16, 8, 4, 4), (32, 64, 32, 8, 4, 3)]
_KEY = ["M_BUCKET", "N", "K", "HAS_BIAS", "ACT", "SAVE_PRE", "GRAD_ACT"]
_COLSUM_BLOCKS = (16, 16) if _INTERPRET else (32, 128)  # (BM, BN) of the column sum


def _configs(shapes):
    return tune_configs([triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": g}, num_warps=w, num_stages=s)
                         for bm, bn, bk, g, w, s in shapes])


if _INTERPRET:
    _FIXED = {"BM": 16, "BN": 16, "BK": 16, "GROUP_M": 2}  # the interpreter runs numpy per program

    def _gemm_kernel(fp32: bool):
        return _linear_gemm_kernel
else:
    _FIXED = {}
    _TUNED = {True: triton.autotune(_configs(_SHAPES_32), key=_KEY)(_linear_gemm_kernel),
              False: triton.autotune(_configs(_SHAPES_16), key=_KEY)(_linear_gemm_kernel)}

    def _gemm_kernel(fp32: bool):
        return _TUNED[fp32]


def _grid(M: int, N: int):
    if _FIXED:
        return (triton.cdiv(M, _FIXED["BM"]) * triton.cdiv(N, _FIXED["BN"]),)
    return lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)


def _gemm(a: Tensor, a_strides, b: Tensor, b_strides, c: Tensor, M: int, N: int, K: int, *,
          bias: Optional[Tensor] = None, act: int = 0, pre: Optional[Tensor] = None,
          saved: Optional[Tensor] = None, grad_act: int = 0) -> None:
    """c (M, N, contiguous) = act(A @ B + bias); A[i, k] = a[i * a_strides[0] + k * a_strides[1]], B likewise.
    grad_act != 0: A is multiplied elementwise by act'(saved) (saved laid out as a) as it is loaded."""
    fp32 = _INTERPRET or a.dtype == torch.float32
    wrap_triton(_gemm_kernel(fp32))[_grid(M, N)](
        a, saved if saved is not None else a, b, c, bias if bias is not None else c, pre if pre is not None else c,
        M, N, K, triton.next_power_of_2(max(M, 1)),
        a_strides[0], a_strides[1], b_strides[0], b_strides[1], c.stride(0), c.stride(1),
        HAS_BIAS=bias is not None, ACT=act, SAVE_PRE=pre is not None, GRAD_ACT=grad_act, FP32=fp32, **_FIXED)


def _colsum(g: Tensor, saved: Optional[Tensor], act: int, out: Tensor) -> None:
    """out (N,) = (g * act'(saved)).sum(0) for contiguous (M, N) g, saved; fp32 partials over row chunks when
    M is large (more programs than N / BN), summed by a second pass of the same kernel."""
    M, N = g.shape
    BM, BN = _COLSUM_BLOCKS
    splits = 1 if (_INTERPRET or M <= 4096) else min(64, triton.cdiv(M, 2048))
    rows = max(BM, triton.cdiv(triton.cdiv(M, splits), BM) * BM)
    splits = triton.cdiv(M, rows)
    sv = saved if saved is not None else g
    if splits == 1:
        wrap_triton(_linear_colsum_kernel)[(triton.cdiv(N, BN), 1)](g, sv, out, M, N, rows, ACT=act, BM=BM, BN=BN)
        return
    partial = torch.empty((splits, N), dtype=torch.float32, device=g.device)
    wrap_triton(_linear_colsum_kernel)[(triton.cdiv(N, BN), splits)](g, sv, partial, M, N, rows, ACT=act,
                                                                     BM=BM, BN=BN)
    wrap_triton(_linear_colsum_kernel)[(triton.cdiv(N, BN), 1)](partial, partial, out, splits, N, splits,
                                                                ACT=0, BM=BM, BN=BN)


# --------------------------------------------------------------------------------------------
# Checks (the Python op fastattn.linear checks first; these guard direct calls of the ops).
# --------------------------------------------------------------------------------------------
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_common(where: str, x: Tensor, w: Tensor, activation: int) -> None:
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"{where}: input must be 2-D (M, K) and weight 2-D (N, K), got input {tuple(x.shape)}, "
                         f"weight {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"{where}: input (M, K) = {tuple(x.shape)} and weight (N, K) = {tuple(w.shape)} "
                         "disagree on K")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{where}: input must be float16, bfloat16 or float32, got {x.dtype}")
    if w.dtype != x.dtype:
        raise TypeError(f"{where}: weight dtype {w.dtype} differs from input dtype {x.dtype}")
    if w.device != x.device:
        raise ValueError(f"{where}: input and weight are on different devices ({x.device}, {w.device})")
    if x.device.type != "cuda" and not _INTERPRET and gpu_target() is None:
        raise ValueError(f"{where}: Triton needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{where}: activation must be 0 (none), 1 (relu), 2 (gelu) or 3 (silu), got {activation}")


def _check_fwd(x: Tensor, w: Tensor, b: Optional[Tensor], activation: int) -> None:
    _check_common("triton_linear_fwd", x, w, activation)
    if b is not None and (b.dim() != 1 or b.shape[0] != w.shape[0] or b.dtype != x.dtype or b.device != x.device):
        raise ValueError(f"triton_linear_fwd: bias must be ({w.shape[0]},) of input's dtype {x.dtype} on "
                         f"{x.device}, got {tuple(b.shape)} {b.dtype} on {b.device}")


def _check_bwd(grad_out: Tensor, x: Tensor, w: Tensor, saved: Optional[Tensor], activation: int,
               output_mask: List[bool]) -> None:
    _check_common("triton_linear_bwd", x, w, activation)
    M, N = x.shape[0], w.shape[0]
    if tuple(grad_out.shape) != (M, N) or grad_out.dtype != x.dtype or grad_out.device != x.device:
        raise ValueError(f"triton_linear_bwd: grad_out must be (M, N) = {(M, N)} of dtype {x.dtype}, got "
                         f"{tuple(grad_out.shape)} {grad_out.dtype}")
    if activation != 0 and (saved is None or tuple(saved.shape) != (M, N) or saved.dtype != x.dtype):
        what = "the forward output" if activation == 1 else "the pre-activation (forward with save_preact=True)"
        raise ValueError(f"triton_linear_bwd: activation {_ACTIVATIONS[activation]} needs saved = {what}, "
                         f"shaped (M, N) = {(M, N)} of dtype {x.dtype}; got "
                         f"{None if saved is None else (tuple(saved.shape), saved.dtype)}")
    if len(output_mask) != 3:
        raise ValueError(f"triton_linear_bwd: output_mask takes 3 values, got {len(output_mask)}")


# --------------------------------------------------------------------------------------------
# The ops.
# --------------------------------------------------------------------------------------------
@triton_op("fastattn::triton_linear_fwd", mutates_args=())
def triton_linear_fwd(x: Tensor, w: Tensor, b: Optional[Tensor], activation: int,
                      save_preact: bool) -> Tuple[Tensor, Tensor]:
    """(out, preact): out = act(x @ w^T + b) (M, N); preact (M, N) when save_preact and activation is gelu or
    silu, else empty."""
    _check_fwd(x, w, b, activation)
    M, K = x.shape
    N = w.shape[0]
    keep_pre = save_preact and activation in (2, 3)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    pre = torch.empty((M, N) if keep_pre else (0,), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out, pre
    # B = w^T: B[k, n] = w[n, k]. K == 0 runs no reduction step: out = act(bias) or act(0).
    _gemm(x, x.stride(), w, (w.stride(1), w.stride(0)), out, M, N, K, bias=b, act=activation,
          pre=pre if keep_pre else None)
    return out, pre


@triton_op("fastattn::triton_linear_bwd", mutates_args=())
def triton_linear_bwd(grad_out: Tensor, x: Tensor, w: Tensor, saved: Optional[Tensor], activation: int,
                      output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_input (M, K), grad_weight (N, K), grad_bias (N,)) from gz = grad_out * act'(saved); an output whose
    output_mask entry is False is empty."""
    _check_bwd(grad_out, x, w, saved, activation, output_mask)
    M, K = x.shape
    N = w.shape[0]
    g = grad_out.contiguous()
    sv = saved.contiguous() if activation != 0 else None
    empty = torch.empty((0,), dtype=x.dtype, device=x.device)
    dx, dw, db = empty, empty.clone(), empty.clone()
    if output_mask[0]:
        dx = torch.empty((M, K), dtype=x.dtype, device=x.device)
        if M > 0 and K > 0:  # dx = gz @ w (reduction over N; N == 0 gives zeros)
            _gemm(g, (N, 1), w, w.stride(), dx, M, K, N, saved=sv, grad_act=activation)
    if output_mask[1]:
        dw = torch.empty((N, K), dtype=x.dtype, device=x.device)
        if N > 0 and K > 0:  # dw = gz^T @ x (reduction over M; M == 0 gives zeros)
            _gemm(g, (1, N), x, x.stride(), dw, N, K, M, saved=sv, grad_act=activation)
    if output_mask[2]:
        db = torch.empty((N,), dtype=x.dtype, device=x.device)
        if N > 0:
            _colsum(g, sv, activation, db)
    return dx, dw, db


if NEEDS_FAKE:  # older torch: a custom_op, whose fake kernel is registered by hand
    @triton_linear_fwd.register_fake
    def _fwd_fake(x, w, b, activation, save_preact):
        keep = save_preact and activation in (2, 3)
        M, N = x.shape[0], w.shape[0]
        return x.new_empty((M, N)), x.new_empty((M, N) if keep else (0,))

    @triton_linear_bwd.register_fake
    def _bwd_fake(grad_out, x, w, saved, activation, output_mask):
        M, K = x.shape
        N = w.shape[0]
        return (x.new_empty((M, K) if output_mask[0] else (0,)), x.new_empty((N, K) if output_mask[1] else (0,)),
                x.new_empty((N,) if output_mask[2] else (0,)))


# --------------------------------------------------------------------------------------------
# Autograd on the forward op: saves x, w and what act' needs (the output for relu, the pre-activation for
# gelu/silu), backward through triton_linear_bwd; no double backward.
# --------------------------------------------------------------------------------------------
_setup_context, _backward = make_linear_autograd(triton_linear_bwd, "linear (triton)")
triton_linear_fwd.register_autograd(_backward, setup_context=_setup_context)
