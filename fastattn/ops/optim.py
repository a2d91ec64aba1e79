"""Fused multi-tensor optimizer steps (SGD, Adam, AdamW): functional API, checks, backend choice.

Native contract (the same for every backend, so the tests can hold them all to one oracle):

    sgd_step_(params, grads, momentum_buffers, new_buffers, lr, momentum, dampening, weight_decay,
              nesterov, maximize, lr_tensor=None, grad_scale=None, found_inf=None,
              master_params=None) -> ()
    adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2,
               eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, lr_tensor=None,
               grad_scale=None, found_inf=None, master_params=None) -> ()

* Lists of tensors, updated in place in one pass: ``params[i]``, ``grads[i]`` and the state tensors
  ``[i]`` share dtype (float32, float64, float16 or bfloat16; the math runs in float32, float64 for
  float64), shape and device, and are contiguous (this module copies the others).
* The math is torch's ``_single_tensor_sgd`` / ``_single_tensor_adam`` step for step (see
  :func:`sgd_step_reference` / :func:`adam_step_reference`). On the CPU the float32 result of SGD
  is bit-identical to ``torch.optim.SGD(foreach=False)``; Adam's too with env
  ``FASTATTN_OPTIM_SQRT=torch`` (torch's CPU sqrt is MKL's, not the correctly rounded one; calling
  it costs ~2x), by default Adam uses the IEEE sqrt and differs from torch by an ulp here and there
  (as torch's own ``fused=True`` does).
* SGD momentum: ``momentum_buffers``/``new_buffers`` are empty when ``momentum == 0``; a buffer
  with ``new_buffers[i]`` true is initialised from the gradient (torch's first step).
* Adam: ``state_steps[i]`` is a 1-element float32 (or float64) tensor on the parameter's device (CPU
  tensors on the CPU); it is incremented, then drives the bias corrections. ``max_exp_avg_sqs`` is
  empty unless ``amsgrad``. ``decoupled_weight_decay`` selects AdamW.
* ``lr_tensor`` (1 element) replaces ``lr``; ``grad_scale``: gradients are divided by it and written
  back unscaled (as torch's fused optimizers do); ``found_inf != 0``: nothing changes at all (the
  GPU kernels read both on the device: no host synchronisation).
* ``master_params`` (fp32 master weights, apex / AMP style): one float32 tensor per float16/bfloat16
  param. The step then reads the master instead of the param, keeps the state (momentum buffers,
  exp_avgs, ...) in float32, updates the master in float32 and writes its rounded value to the param
  in the same pass; grads stay in the params' dtype (unscaled in place as above). Without master
  weights a bf16 param absorbs only updates larger than half its ulp (2^-9 relative): small Adam
  steps are lost every step; with them the fp16/bf16 param is always the fp32 trajectory, rounded.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from fastattn import _ext, backend as _backend

__all__ = ["sgd_step_", "adam_step_", "sgd_step_reference", "adam_step_reference"]

_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# The oracle: torch's single-tensor math in plain tensor ops, also the `reference` backend.
# --------------------------------------------------------------------------------------------
def _skip(found_inf: Optional[Tensor]) -> bool:
    return found_inf is not None and bool(found_inf.item() != 0)


def _with_master(step, params, grads, master_params, grad_scale, *args):
    """The reference step on the float32 masters and float32 copies of the grads, then rounded back."""
    grads32 = [g.float() for g in grads]
    step(master_params, grads32, *args)
    for g, g32 in zip(grads, grads32):
        if grad_scale is not None:
            g.copy_(g32)
    for p, m in zip(params, master_params):
        p.copy_(m)


def sgd_step_reference(params, grads, momentum_buffers, new_buffers, lr, momentum, dampening, weight_decay,
                       nesterov, maximize, lr_tensor=None, grad_scale=None, found_inf=None,
                       master_params=None) -> None:
    if _skip(found_inf):
        return
    if master_params is not None:
        return _with_master(lambda p, g, *_: sgd_step_reference(
            p, g, momentum_buffers, new_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize,
            lr_tensor, grad_scale), params, grads, master_params, grad_scale)
    if lr_tensor is not None:
        lr = lr_tensor.item()
    for i, param in enumerate(params):
        grad = grads[i]
        if grad_scale is not None:
            grad.copy_(grad / grad_scale.to(grad.device, grad.dtype))
        grad = -grad if maximize else grad
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if new_buffers[i]:
                buf.copy_(grad)
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        param.add_(grad, alpha=-lr)


def adam_step_reference(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2,
                        eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, lr_tensor=None,
                        grad_scale=None, found_inf=None, master_params=None) -> None:
    if _skip(found_inf):
        return
    if master_params is not None:
        return _with_master(lambda p, g, *_: adam_step_reference(
            p, g, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps, weight_decay,
            amsgrad, maximize, decoupled_weight_decay, lr_tensor, grad_scale), params, grads, master_params,
            grad_scale)
    for i, param in enumerate(params):
        grad = grads[i]
        if grad_scale is not None:
            grad.copy_(grad / grad_scale.to(grad.device, grad.dtype))
        grad = -grad if maximize else grad
        exp_avg, exp_avg_sq = exp_avgs[i], exp_avg_sqs[i]
        state_steps[i] += 1
        step = state_steps[i].item()
        if lr_tensor is not None:  # torch keeps a tensor lr as a float32 tensor in this math
            lr_t = lr_tensor.detach().to("cpu", torch.float32).reshape(())
        if weight_decay != 0:
            if decoupled_weight_decay:
                param.mul_(1 - (lr_t * weight_decay if lr_tensor is not None else lr * weight_decay))
            else:
                grad = grad.add(param, alpha=weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = (lr_t / bias_correction1).item() if lr_tensor is not None else lr / bias_correction1
        bias_correction2_sqrt = bias_correction2 ** 0.5
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], exp_avg_sq, out=max_exp_avg_sqs[i])
            denom = (max_exp_avg_sqs[i].sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)


# --------------------------------------------------------------------------------------------
# Fake kernels (the ops return nothing: they only mutate their inputs).
# --------------------------------------------------------------------------------------------
def _register_fakes():
    @torch.library.register_fake("fastattn::sgd_step_")
    def _sgd_fake(params, grads, momentum_buffers, new_buffers, lr, momentum, dampening, weight_decay,
                  nesterov, maximize, lr_tensor=None, grad_scale=None, found_inf=None, master_params=None):
        return None

    @torch.library.register_fake("fastattn::adam_step_")
    def _adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
                   weight_decay, amsgrad, maximize, decoupled_weight_decay, lr_tensor=None, grad_scale=None,
                   found_inf=None, master_params=None):
        return None


if _ext.available() and hasattr(torch.ops.fastattn, "adam_step_"):
    _register_fakes()


def _triton():
    """The Triton steps (imported on first use: importing triton is slow)."""
    from fastattn.triton import optim as triton_optim
    return triton_optim


# --------------------------------------------------------------------------------------------
# Input checks.
# --------------------------------------------------------------------------------------------
def _check_list(name: str, ts, params: Sequence[Tensor], dtype: Optional[torch.dtype] = None) -> None:
    """ts[i] matches params[i] in shape, device and dtype (or `dtype`: float32 state with master weights)."""
    if not isinstance(ts, (list, tuple)):
        raise TypeError(f"{name} must be a list of Tensors, got {type(ts).__name__}")
    if len(ts) != len(params):
        raise ValueError(f"{name} has {len(ts)} tensors, params has {len(params)}")
    for i, (t, p) in enumerate(zip(ts, params)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a Tensor, got {type(t).__name__}")
        if t.is_sparse:
            raise RuntimeError(f"{name}[{i}] is sparse: the fused optimizer steps take dense tensors only")
        if t.shape != p.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, params[{i}] {tuple(p.shape)}")
        if dtype is not None and t.dtype != dtype:
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}, expected {dtype} (master weights keep float32 "
                            f"state)")
        if dtype is None and t.dtype != p.dtype:
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}, params[{i}] {p.dtype}: they must match")
        if t.device != p.device:
            raise ValueError(f"{name}[{i}] is on {t.device}, params[{i}] on {p.device}")


def _check_params(params) -> torch.device:
    if not isinstance(params, (list, tuple)):
        raise TypeError(f"params must be a list of Tensors, got {type(params).__name__}")
    device = None
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}] must be a Tensor, got {type(p).__name__}")
        if p.dtype not in _FLOAT_TYPES:
            raise TypeError(f"params[{i}] must be float16, bfloat16, float32 or float64, got {p.dtype}")
        if device is None:
            device = p.device
        elif p.device != device:
            raise ValueError(f"params must be on one device, got {device} and {p.device} (params[{i}])")
    return device if device is not None else torch.device("cpu")


def _check_master(master_params, params) -> Optional[torch.dtype]:
    """The dtype the state lists must have: float32 with master weights, else the params' own."""
    if master_params is None:
        return None
    _check_list("master_params", master_params, params, torch.float32)
    for i, p in enumerate(params):
        if p.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"params[{i}] must be float16 or bfloat16 when master_params are given, got {p.dtype}")
    return torch.float32


def _check_scalar_tensor(name: str, t: Optional[Tensor]) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
    if t.numel() != 1:
        raise ValueError(f"{name} must have exactly one element, got {t.numel()}")


def _check_hyper(lr: float, **nonneg) -> None:
    if not (lr >= 0.0):
        raise ValueError(f"Invalid learning rate: {lr}")
    for name, value in nonneg.items():
        if not (value >= 0.0):
            raise ValueError(f"Invalid {name} value: {value}")


# --------------------------------------------------------------------------------------------
# Backend choice and contiguity.
# --------------------------------------------------------------------------------------------
def _reasons(params: Sequence[Tensor], steps: Sequence[Tensor] = ()):
    def cpu() -> List[str]:
        why = []
        if any(s.device.type != "cpu" or s.dtype not in (torch.float32, torch.float64) for s in steps):
            why.append("state_steps must be float32/float64 CPU tensors")
        return why

    def cuda() -> List[str]:
        why = []
        if any(p.dtype == torch.float64 for p in params):
            why.append("float64 params (the CUDA kernel takes float16, bfloat16, float32)")
        if any(s.device != p.device or s.dtype != torch.float32 for s, p in zip(steps, params)):
            why.append("state_steps must be float32 tensors on the params' device")
        return why

    def triton() -> List[str]:
        why = []
        if any(p.dtype == torch.float64 for p in params):
            why.append("float64 params (the Triton kernel takes float16, bfloat16, float32)")
        if any(s.device != p.device or s.dtype != torch.float32 for s, p in zip(steps, params)):
            why.append("state_steps must be float32 tensors on the params' device")
        return why

    return {"cpu": cpu, "cuda": cuda, "triton": triton, "reference": lambda: []}


def _contiguous_lists(*lists):
    """Contiguous versions of every tensor list, and the (original, copy) pairs to write back."""
    out, write_back = [], []
    for ts in lists:
        if all(t.is_contiguous() for t in ts):
            out.append(ts)
            continue
        row = []
        for t in ts:
            c = t if t.is_contiguous() else t.contiguous()
            if c is not t:
                write_back.append((t, c))
            row.append(c)
        out.append(row)
    return out, write_back


def _scalar_on(t: Optional[Tensor], device: torch.device, backend: str) -> Optional[Tensor]:
    """grad_scale / found_inf / lr_tensor where the kernel reads them (float32 on the params' device)."""
    if t is None:
        return None
    t = t.detach().reshape(())
    if backend in ("cuda", "triton"):
        return t.to(device=device, dtype=torch.float32)
    return t


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------
def sgd_step_(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor],
              new_buffers: List[bool], *, lr: float, momentum: float = 0.0, dampening: float = 0.0,
              weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False,
              lr_tensor: Optional[Tensor] = None, grad_scale: Optional[Tensor] = None,
              found_inf: Optional[Tensor] = None, master_params: Optional[List[Tensor]] = None,
              backend: Optional[str] = None) -> None:
    """One fused SGD step over lists of tensors, in place (see the module docstring)."""
    device = _check_params(params)
    _check_list("grads", grads, params)
    state_dtype = _check_master(master_params, params)
    if momentum != 0:
        _check_list("momentum_buffers", momentum_buffers, params, state_dtype)
        if len(new_buffers) != len(params):
            raise ValueError(f"new_buffers has {len(new_buffers)} entries, params has {len(params)}")
    else:
        momentum_buffers, new_buffers = [], []
    _check_hyper(float(lr), momentum=momentum, weight_decay=weight_decay)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    for name, t in (("lr_tensor", lr_tensor), ("grad_scale", grad_scale), ("found_inf", found_inf)):
        _check_scalar_tensor(name, t)
    if not params:
        return
    _sgd_run(params, grads, momentum_buffers, new_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize,
             lr_tensor, grad_scale, found_inf, backend, device, master_params)


def _sgd_run(params, grads, momentum_buffers, new_buffers, lr, momentum, dampening, weight_decay, nesterov,
             maximize, lr_tensor, grad_scale, found_inf, backend, device, master_params=None) -> None:
    """sgd_step_ after its checks (fastattn.optim calls this: its lists are consistent by construction)."""
    name = _backend.select("sgd_step_", backend, device, _reasons(params), native_op="sgd_step_")
    if momentum == 0:
        momentum_buffers, new_buffers = [], []
    scalars = [_scalar_on(t, device, name) for t in (lr_tensor, grad_scale, found_inf)]
    new_buffers = [bool(b) for b in new_buffers]
    hyper = (float(lr), float(momentum), float(dampening), float(weight_decay), bool(nesterov), bool(maximize))
    if name == "reference":
        return sgd_step_reference(params, grads, momentum_buffers, new_buffers, *hyper, *scalars, master_params)
    (p, g, b, w), write_back = _contiguous_lists(params, grads, momentum_buffers, master_params or [])
    w = w if master_params is not None else None
    if name == "triton":
        _triton().sgd_step_triton(p, g, b, new_buffers, *hyper, *scalars, w or [])
    else:
        torch.ops.fastattn.sgd_step_(p, g, b, new_buffers, *hyper, *scalars, w)
    for orig, copy in write_back:
        orig.copy_(copy)


def adam_step_(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
               max_exp_avg_sqs: List[Tensor], state_steps: List[Tensor], *, lr: float, beta1: float = 0.9,
               beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False,
               maximize: bool = False, decoupled_weight_decay: bool = False, lr_tensor: Optional[Tensor] = None,
               grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
               master_params: Optional[List[Tensor]] = None, backend: Optional[str] = None) -> None:
    """One fused Adam (or AdamW: ``decoupled_weight_decay=True``) step over lists of tensors, in place."""
    device = _check_params(params)
    _check_list("grads", grads, params)
    state_dtype = _check_master(master_params, params)
    _check_list("exp_avgs", exp_avgs, params, state_dtype)
    _check_list("exp_avg_sqs", exp_avg_sqs, params, state_dtype)
    if amsgrad:
        _check_list("max_exp_avg_sqs", max_exp_avg_sqs, params, state_dtype)
    else:
        max_exp_avg_sqs = []
    if len(state_steps) != len(params):
        raise ValueError(f"state_steps has {len(state_steps)} tensors, params has {len(params)}")
    for i, s in enumerate(state_steps):
        if not isinstance(s, Tensor) or s.numel() != 1 or not s.is_floating_point():
            raise TypeError(f"state_steps[{i}] must be a 1-element floating-point Tensor")
    _check_hyper(float(lr), epsilon=eps, weight_decay=weight_decay)
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
    for name, t in (("lr_tensor", lr_tensor), ("grad_scale", grad_scale), ("found_inf", found_inf)):
        _check_scalar_tensor(name, t)
    if not params:
        return
    _adam_run(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps, weight_decay,
              amsgrad, maximize, decoupled_weight_decay, lr_tensor, grad_scale, found_inf, backend, device,
              master_params)


def _adam_run(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
              weight_decay, amsgrad, maximize, decoupled_weight_decay, lr_tensor, grad_scale, found_inf, backend,
              device, master_params=None) -> None:
    """adam_step_ after its checks (fastattn.optim calls this: its lists are consistent by construction)."""
    name = _backend.select("adam_step_", backend, device, _reasons(params, state_steps), native_op="adam_step_")
    max_exp_avg_sqs = max_exp_avg_sqs if amsgrad else []
    scalars = [_scalar_on(t, device, name) for t in (lr_tensor, grad_scale, found_inf)]
    hyper = (float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), bool(amsgrad),
             bool(maximize), bool(decoupled_weight_decay))
    if name == "reference":
        return adam_step_reference(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *hyper,
                                   *scalars, master_params)
    (p, g, m, v, vmax, w), write_back = _contiguous_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                                          master_params or [])
    w = w if master_params is not None else None
    if name == "triton":
        _triton().adam_step_triton(p, g, m, v, vmax, list(state_steps), *hyper, *scalars, w or [])
    else:
        torch.ops.fastattn.adam_step_(p, g, m, v, vmax, list(state_steps), *hyper, *scalars, w)
    for orig, copy in write_back:
        orig.copy_(copy)
