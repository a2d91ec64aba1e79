"""Fused SGD and Adam/AdamW steps in Triton: one launch per tensor, BLOCK elements per program.

The native contract is that of :mod:`fastattn.ops.optim`. Each program loads its slice of the
parameter, gradient and state once (any float dtype, math in float32), updates it and stores it.
``found_inf`` and ``grad_scale`` are read inside the kernel (no host synchronisation); a set
``found_inf`` masks every load and store, so the step changes nothing. Adam's bias corrections are
computed in the kernel in float64 from the tensor's step (so ``step`` can live on the GPU), and the
steps are incremented after the launches (the programs of one tensor all read the old value).

Registered with ``torch.library.triton_op`` so ``torch.compile`` sees through it.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

BLOCK = 1024


@triton.jit
def _keep_mask(offs, n, found_ptr, HAS_FOUND: tl.constexpr):
    if HAS_FOUND:  # a found inf/NaN empties the range: nothing is loaded or stored
        n = tl.where(tl.load(found_ptr) == 0, n, 0)
    return offs < n


@triton.jit
def _sgd_kernel(p_ptr, g_ptr, buf_ptr, lr_ptr, scale_ptr, found_ptr, n, lr, momentum, one_minus_dampening,
                weight_decay, HAS_MOMENTUM: tl.constexpr, NEW_BUFFER: tl.constexpr, NESTEROV: tl.constexpr,
                MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, HAS_LR_PTR: tl.constexpr, HAS_SCALE: tl.constexpr,
                HAS_FOUND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = _keep_mask(offs, n, found_ptr, HAS_FOUND)
    if HAS_LR_PTR:
        lr = tl.load(lr_ptr).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g / tl.load(scale_ptr).to(tl.float32)
        tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
    if MAXIMIZE:
        g = -g
    if HAS_WD:
        g = g + weight_decay * p
    if HAS_MOMENTUM:
        if NEW_BUFFER:
            b = g
        else:
            b = tl.load(buf_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            b = b * momentum + one_minus_dampening * g
        tl.store(buf_ptr + offs, b.to(buf_ptr.dtype.element_ty), mask=mask)
        if NESTEROV:
            g = g + momentum * b
        else:
            g = b
    p = p - lr * g
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, step_ptr, hyper_ptr, lr_ptr, scale_ptr, found_ptr, n,
                 AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, L2_DECAY: tl.constexpr,
                 DECOUPLED_DECAY: tl.constexpr, HAS_LR_PTR: tl.constexpr, HAS_SCALE: tl.constexpr,
                 HAS_FOUND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = _keep_mask(offs, n, found_ptr, HAS_FOUND)
    # float64 scalars: [lr, beta1, beta2, eps, weight_decay, log(beta1), log(beta2)]
    lr = tl.load(hyper_ptr + 0)
    if HAS_LR_PTR:
        lr = tl.load(lr_ptr).to(tl.float64)
    beta1 = tl.load(hyper_ptr + 1)
    beta2 = tl.load(hyper_ptr + 2)
    eps = tl.load(hyper_ptr + 3).to(tl.float32)
    weight_decay = tl.load(hyper_ptr + 4)
    step = tl.load(step_ptr).to(tl.float64) + 1.0
    bias_correction1 = 1.0 - tl.exp(step * tl.load(hyper_ptr + 5))  # 1 - beta1 ** step
    bias_correction2 = 1.0 - tl.exp(step * tl.load(hyper_ptr + 6))
    step_size = (lr / bias_correction1).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)
    decay = (1.0 - lr * weight_decay).to(tl.float32)

    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g / tl.load(scale_ptr).to(tl.float32)
        tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
    if MAXIMIZE:
        g = -g
    if L2_DECAY:
        g = g + weight_decay.to(tl.float32) * p
    m = m + (1.0 - beta1).to(tl.float32) * (g - m)
    v = v * beta2.to(tl.float32) + (1.0 - beta2).to(tl.float32) * g * g
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    if AMSGRAD:
        vmax = tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        vmax = tl.maximum(vmax, v)
        tl.store(vmax_ptr + offs, vmax.to(vmax_ptr.dtype.element_ty), mask=mask)
        denom = tl.sqrt(vmax) / bias_correction2_sqrt + eps
    else:
        denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    if DECOUPLED_DECAY:
        p = p * decay
    p = p - step_size * m / denom
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


def _grid(n: int):
    return (triton.cdiv(n, BLOCK),)


@triton_op("fastattn::sgd_step_triton",
           mutates_args={"params", "grads", "momentum_buffers"})
def sgd_step_triton(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor],
                    new_buffers: List[bool], lr: float, momentum: float, dampening: float, weight_decay: float,
                    nesterov: bool, maximize: bool, lr_tensor: Optional[Tensor] = None,
                    grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    has_momentum = momentum != 0
    dummy = params[0] if params else None
    for i, (p, g) in enumerate(zip(params, grads)):
        n = p.numel()
        if n == 0:
            continue
        wrap_triton(_sgd_kernel)[_grid(n)](
            p, g, momentum_buffers[i] if has_momentum else p,
            lr_tensor if lr_tensor is not None else dummy,
            grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy,
            n, lr, momentum, 1.0 - dampening, weight_decay,
            HAS_MOMENTUM=has_momentum, NEW_BUFFER=bool(has_momentum and new_buffers[i]), NESTEROV=nesterov,
            MAXIMIZE=maximize, HAS_WD=weight_decay != 0, HAS_LR_PTR=lr_tensor is not None,
            HAS_SCALE=grad_scale is not None, HAS_FOUND=found_inf is not None, BLOCK=BLOCK)


def _log(x: float) -> float:
    return math.log(x) if x > 0 else float("-inf")


@triton_op("fastattn::adam_step_triton",
           mutates_args={"params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"})
def adam_step_triton(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                     max_exp_avg_sqs: List[Tensor], state_steps: List[Tensor], lr: float, beta1: float,
                     beta2: float, eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
                     decoupled_weight_decay: bool, lr_tensor: Optional[Tensor] = None,
                     grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    if not params:
        return
    device = params[0].device
    hyper = torch.tensor([lr, beta1, beta2, eps, weight_decay, _log(beta1), _log(beta2)], dtype=torch.float64,
                         device=device)
    dummy = params[0]
    for i, p in enumerate(params):
        n = p.numel()
        if n == 0:
            continue
        wrap_triton(_adam_kernel)[_grid(n)](
            p, grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else p, state_steps[i], hyper,
            lr_tensor if lr_tensor is not None else dummy,
            grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy, n,
            AMSGRAD=amsgrad, MAXIMIZE=maximize, L2_DECAY=weight_decay != 0 and not decoupled_weight_decay,
            DECOUPLED_DECAY=weight_decay != 0 and decoupled_weight_decay, HAS_LR_PTR=lr_tensor is not None,
            HAS_SCALE=grad_scale is not None, HAS_FOUND=found_inf is not None, BLOCK=BLOCK)
    # Every program above read the old step; now count this step (unless found_inf skipped it).
    increment = 1.0 if found_inf is None else (found_inf == 0).to(torch.float32)
    for s in state_steps:
        s.add_(increment)
