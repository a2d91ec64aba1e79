"""Fused SGD and Adam/AdamW steps in Triton: one launch per list of tensors (multi-tensor apply).

The native contract is that of :mod:`fastattn.ops.optim`.

Multi-tensor launch: the host cuts every tensor into chunks of CHUNK elements and writes one int64
table to the device (one copy, cached while the addresses stay the same):

    [ list 0 addresses (T) | list 1 addresses (T) | ... | numels (T) | chunk -> tensor (C) | chunk start (C) ]

Program c reads its chunk's tensor index and start, then the addresses of that tensor's
param / grad / state, casts each int64 address to a typed pointer
(``tl.load(...).to(tl.pointer_type(tl.float32))``, which works under ``TRITON_INTERPRET=1`` too) and
walks the chunk BLOCK elements at a time. Tensors of one launch share dtypes (the host groups a list
by dtype, SGD also by "momentum buffer is new", so those stay compile-time branches).

Each element is loaded once (any float dtype, math in float32), updated and stored once.
``found_inf`` and ``grad_scale`` are read inside the kernel (no host synchronisation); a set
``found_inf`` empties every chunk, so the step changes nothing. Adam's bias corrections are
computed per tensor in the kernel in float64 from its step (so ``step`` can live on the GPU); a
second tiny launch increments all steps once every program has read them.

Master weights (``master_params``, empty = none): the programs read the float32 master instead of the
float16/bfloat16 param, keep float32 state, write the master and its rounded value to the param.

Rounding to bfloat16 is done by hand (round to nearest even on the bits): Triton's interpreter
truncates float32 -> bfloat16 casts, the GPU rounds to nearest; by hand both give the CPU kernel's
result.

The ops are ``torch.library.custom_op`` (opaque to torch.compile, with fake kernels), not
``triton_op``: the address table needs real data pointers, which traced (fake) tensors don't have.
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastattn.triton._compat import launcher

CHUNK = 16384  # elements per program (100M params: ~6k programs, a small last wave); tests lower it
BLOCK = 1024   # elements per inner iteration


@triton.jit
def _round(x, TY: tl.constexpr):
    """x (float32) rounded to TY, nearest even (a bfloat16 value is rounded on its bits)."""
    if TY == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(TY)


@triton.jit
def _address(table_ptr, n_tensors, list_index, t, TY: tl.constexpr):
    return tl.load(table_ptr + list_index * n_tensors + t).to(tl.pointer_type(TY))


# List order of the SGD table: params, grads, momentum buffers, masters.
@triton.jit
def _sgd_kernel(table_ptr, n_tensors, lr_ptr, scale_ptr, found_ptr, lr, momentum, one_minus_dampening,
                weight_decay, P_TY: tl.constexpr, S_TY: tl.constexpr, HAS_MASTER: tl.constexpr,
                HAS_MOMENTUM: tl.constexpr, NEW_BUFFER: tl.constexpr, NESTEROV: tl.constexpr,
                MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, HAS_LR_PTR: tl.constexpr, HAS_SCALE: tl.constexpr,
                HAS_FOUND: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    n_chunks = tl.num_programs(0)
    t = tl.load(table_ptr + 5 * n_tensors + c)
    start = tl.load(table_ptr + 5 * n_tensors + n_chunks + c)
    end = tl.minimum(tl.load(table_ptr + 4 * n_tensors + t), start + CHUNK)
    if HAS_FOUND:  # a found inf/NaN empties the chunk: nothing is loaded or stored
        end = tl.where(tl.load(found_ptr) == 0, end, start)
    p_ptr = _address(table_ptr, n_tensors, 0, t, P_TY)
    g_ptr = _address(table_ptr, n_tensors, 1, t, P_TY)
    b_ptr = _address(table_ptr, n_tensors, 2, t, S_TY)
    w_ptr = _address(table_ptr, n_tensors, 3, t, tl.float32)
    if HAS_LR_PTR:
        lr = tl.load(lr_ptr).to(tl.float32)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        if HAS_MASTER:
            p = tl.load(w_ptr + offs, mask=mask, other=0.0)
        else:
            p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = g / tl.load(scale_ptr).to(tl.float32)
            tl.store(g_ptr + offs, _round(g, P_TY), mask=mask)
        if MAXIMIZE:
            g = -g
        if HAS_WD:
            g = g + weight_decay * p
        if HAS_MOMENTUM:
            if NEW_BUFFER:
                b = g
            else:
                b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                b = b * momentum + one_minus_dampening * g
            tl.store(b_ptr + offs, _round(b, S_TY), mask=mask)
            if NESTEROV:
                g = g + momentum * b
            else:
                g = b
        p = p - lr * g
        if HAS_MASTER:
            tl.store(w_ptr + offs, p, mask=mask)
        tl.store(p_ptr + offs, _round(p, P_TY), mask=mask)


# List order of the Adam table: params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps.
@triton.jit
def _adam_kernel(table_ptr, n_tensors, hyper_ptr, lr_ptr, scale_ptr, found_ptr,
                 P_TY: tl.constexpr, S_TY: tl.constexpr, HAS_MASTER: tl.constexpr, AMSGRAD: tl.constexpr,
                 MAXIMIZE: tl.constexpr, L2_DECAY: tl.constexpr, DECOUPLED_DECAY: tl.constexpr,
                 HAS_LR_PTR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr,
                 CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    n_chunks = tl.num_programs(0)
    t = tl.load(table_ptr + 8 * n_tensors + c)
    start = tl.load(table_ptr + 8 * n_tensors + n_chunks + c)
    end = tl.minimum(tl.load(table_ptr + 7 * n_tensors + t), start + CHUNK)
    if HAS_FOUND:
        end = tl.where(tl.load(found_ptr) == 0, end, start)
    p_ptr = _address(table_ptr, n_tensors, 0, t, P_TY)
    g_ptr = _address(table_ptr, n_tensors, 1, t, P_TY)
    m_ptr = _address(table_ptr, n_tensors, 2, t, S_TY)
    v_ptr = _address(table_ptr, n_tensors, 3, t, S_TY)
    vmax_ptr = _address(table_ptr, n_tensors, 4, t, S_TY)
    w_ptr = _address(table_ptr, n_tensors, 5, t, tl.float32)
    step_ptr = _address(table_ptr, n_tensors, 6, t, tl.float32)

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
    one_minus_beta1 = (1.0 - beta1).to(tl.float32)
    beta2_f = beta2.to(tl.float32)
    one_minus_beta2 = (1.0 - beta2).to(tl.float32)
    weight_decay_f = weight_decay.to(tl.float32)

    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        if HAS_MASTER:
            p = tl.load(w_ptr + offs, mask=mask, other=0.0)
        else:
            p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = g / tl.load(scale_ptr).to(tl.float32)
            tl.store(g_ptr + offs, _round(g, P_TY), mask=mask)
        if MAXIMIZE:
            g = -g
        if L2_DECAY:
            g = g + weight_decay_f * p
        m = m + one_minus_beta1 * (g - m)
        v = v * beta2_f + one_minus_beta2 * g * g
        tl.store(m_ptr + offs, _round(m, S_TY), mask=mask)
        tl.store(v_ptr + offs, _round(v, S_TY), mask=mask)
        if AMSGRAD:
            vmax = tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            vmax = tl.maximum(vmax, v)
            tl.store(vmax_ptr + offs, _round(vmax, S_TY), mask=mask)
            denom = tl.sqrt(vmax) / bias_correction2_sqrt + eps
        else:
            denom = tl.sqrt(v) / bias_correction2_sqrt + eps
        if DECOUPLED_DECAY:
            p = p * decay
        p = p - step_size * m / denom
        if HAS_MASTER:
            tl.store(w_ptr + offs, p, mask=mask)
        tl.store(p_ptr + offs, _round(p, P_TY), mask=mask)


@triton.jit
def _increment_steps_kernel(table_ptr, n_steps, found_ptr, HAS_FOUND: tl.constexpr, BLOCK: tl.constexpr):
    """steps[i] += 1 for every step address in the table (unless found_inf is set)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if HAS_FOUND:
        n_steps = tl.where(tl.load(found_ptr) == 0, n_steps, 0)
    mask = i < n_steps
    step_ptrs = tl.load(table_ptr + i, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    tl.store(step_ptrs, tl.load(step_ptrs, mask=mask, other=0.0) + 1.0, mask=mask)


# --------------------------------------------------------------------------------------------
# Host: address and chunk tables.
# --------------------------------------------------------------------------------------------
_TL_TYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_TABLES: Dict[tuple, Tuple[Tensor, int]] = {}  # (addresses, numels, chunk, device) -> (device table, chunks)
_MAX_CACHED = 32


def _address_of(t: Optional[Tensor]) -> int:
    return t.data_ptr() if t is not None else 0


def _table(lists: List[List[Optional[Tensor]]], numels: List[int], device: torch.device) -> Tuple[Tensor, int]:
    """The int64 table of the module docstring on `device`, and the number of chunks (= programs)."""
    addresses = [_address_of(t) for ts in lists for t in ts]
    key = (tuple(addresses), tuple(numels), CHUNK, device)
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    counts = torch.tensor([(n + CHUNK - 1) // CHUNK for n in numels], dtype=torch.int64)
    chunk_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first_chunk = counts.cumsum(0) - counts
    chunk_start = (torch.arange(len(chunk_tensor), dtype=torch.int64) - first_chunk[chunk_tensor]) * CHUNK
    table = torch.cat([torch.tensor(addresses + list(numels), dtype=torch.int64), chunk_tensor, chunk_start])
    entry = (table.to(device), int(chunk_tensor.numel()))
    if len(_TABLES) >= _MAX_CACHED:
        _TABLES.pop(next(iter(_TABLES)))
    _TABLES[key] = entry
    return entry


def _groups(params: List[Tensor], extra_key=None) -> Dict[tuple, List[int]]:
    """Indices of the non-empty params, grouped by dtype (and extra_key(i)): one launch per group."""
    groups: Dict[tuple, List[int]] = {}
    for i, p in enumerate(params):
        if p.numel() > 0:
            groups.setdefault((p.dtype, extra_key(i) if extra_key else None), []).append(i)
    return groups


def _pick(ts: List[Tensor], idx: List[int]) -> List[Optional[Tensor]]:
    return [ts[i] for i in idx] if ts else [None] * len(idx)


# --------------------------------------------------------------------------------------------
# The ops.
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastattn::sgd_step_triton",
                         mutates_args={"params", "grads", "momentum_buffers", "master_params"})
def sgd_step_triton(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor],
                    new_buffers: List[bool], lr: float, momentum: float, dampening: float, weight_decay: float,
                    nesterov: bool, maximize: bool, lr_tensor: Optional[Tensor],
                    grad_scale: Optional[Tensor], found_inf: Optional[Tensor], master_params: List[Tensor]) -> None:
    if not params:
        return
    has_momentum = momentum != 0
    has_master = len(master_params) > 0
    dummy = params[0]
    for (dtype, new), idx in _groups(params, lambda i: bool(has_momentum and new_buffers[i])).items():
        table, chunks = _table([_pick(params, idx), _pick(grads, idx), _pick(momentum_buffers, idx),
                                _pick(master_params, idx)], [params[i].numel() for i in idx], dummy.device)
        launcher(_sgd_kernel)[(chunks,)](
            table, len(idx), lr_tensor if lr_tensor is not None else dummy,
            grad_scale if grad_scale is not None else dummy, found_inf if found_inf is not None else dummy,
            lr, momentum, 1.0 - dampening, weight_decay,
            P_TY=_TL_TYPES[dtype], S_TY=tl.float32 if has_master else _TL_TYPES[dtype], HAS_MASTER=has_master,
            HAS_MOMENTUM=has_momentum, NEW_BUFFER=new, NESTEROV=nesterov, MAXIMIZE=maximize,
            HAS_WD=weight_decay != 0, HAS_LR_PTR=lr_tensor is not None, HAS_SCALE=grad_scale is not None,
            HAS_FOUND=found_inf is not None, CHUNK=CHUNK, BLOCK=BLOCK)


@sgd_step_triton.register_fake
def _(params, grads, momentum_buffers, new_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize,
      lr_tensor, grad_scale, found_inf, master_params) -> None:
    return None


def _log(x: float) -> float:
    return math.log(x) if x > 0 else float("-inf")


@torch.library.custom_op("fastattn::adam_step_triton",
                         mutates_args={"params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
                                       "state_steps", "master_params"})
def adam_step_triton(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                     max_exp_avg_sqs: List[Tensor], state_steps: List[Tensor], lr: float, beta1: float,
                     beta2: float, eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
                     decoupled_weight_decay: bool, lr_tensor: Optional[Tensor],
                     grad_scale: Optional[Tensor], found_inf: Optional[Tensor], master_params: List[Tensor]) -> None:
    if not params:
        return
    device = params[0].device
    has_master = len(master_params) > 0
    hyper = torch.tensor([lr, beta1, beta2, eps, weight_decay, _log(beta1), _log(beta2)], dtype=torch.float64,
                         device=device)
    dummy = params[0]
    for (dtype, _), idx in _groups(params).items():
        table, chunks = _table([_pick(params, idx), _pick(grads, idx), _pick(exp_avgs, idx), _pick(exp_avg_sqs, idx),
                                _pick(max_exp_avg_sqs if amsgrad else [], idx), _pick(master_params, idx),
                                _pick(state_steps, idx)], [params[i].numel() for i in idx], device)
        launcher(_adam_kernel)[(chunks,)](
            table, len(idx), hyper, lr_tensor if lr_tensor is not None else dummy,
            grad_scale if grad_scale is not None else dummy, found_inf if found_inf is not None else dummy,
            P_TY=_TL_TYPES[dtype], S_TY=tl.float32 if has_master else _TL_TYPES[dtype], HAS_MASTER=has_master,
            AMSGRAD=amsgrad, MAXIMIZE=maximize, L2_DECAY=weight_decay != 0 and not decoupled_weight_decay,
            DECOUPLED_DECAY=weight_decay != 0 and decoupled_weight_decay, HAS_LR_PTR=lr_tensor is not None,
            HAS_SCALE=grad_scale is not None, HAS_FOUND=found_inf is not None, CHUNK=CHUNK, BLOCK=BLOCK)
    # Every program above read the old step; now count this step (unless found_inf skipped it).
    steps, _ = _table([list(state_steps)], [], device)  # just the step addresses (cached like the others)
    launcher(_increment_steps_kernel)[(triton.cdiv(len(state_steps), 1024),)](
        steps, len(state_steps), found_inf if found_inf is not None else dummy, HAS_FOUND=found_inf is not None,
        BLOCK=1024)


@adam_step_triton.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps, weight_decay,
      amsgrad, maximize, decoupled_weight_decay, lr_tensor, grad_scale, found_inf, master_params) -> None:
    return None
