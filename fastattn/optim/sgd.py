"""``fastattn.optim.SGD``: torch.optim.SGD's interface over the fused ``sgd_step_`` op."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from fastattn import backend as _backend
from fastattn.ops.optim import _check_hyper, _sgd_run
from fastattn.optim import master as _master

__all__ = ["SGD"]


# ---- helpers shared with adam.py ------------------------------------------------------------
def check_unsupported(name: str, differentiable: bool, foreach, fused) -> None:
    """torch's foreach/fused switches pick an implementation; ours is always the fused one."""
    if differentiable:
        raise RuntimeError(f"fastattn.optim.{name} does not support differentiable=True "
                           f"(use torch.optim.{name}(differentiable=True))")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def check_backend(backend: Optional[str]) -> Optional[str]:
    return None if backend is None else _backend._check_name(backend)


def as_real(t: Optional[Tensor]) -> Optional[Tensor]:
    """Complex tensors are updated through their real view (elementwise math, as torch does)."""
    return torch.view_as_real(t) if t is not None and torch.is_complex(t) else t


def real_lists(params: List[Tensor], *lists: List[Tensor]):
    """The lists with complex tensors as real views (untouched when no param is complex)."""
    if not any(p.is_complex() for p in params):
        return (params,) + lists
    return tuple([as_real(t) for t in ts] for ts in (params,) + lists)


def lr_args(lr) -> Tuple[float, Optional[Tensor]]:
    if isinstance(lr, Tensor):
        return 0.0, lr
    return float(lr), None


def amp_args(opt: Optimizer, device: torch.device) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """GradScaler sets `grad_scale` / `found_inf` on optimizers with `_step_supports_amp_scaling`."""
    scale = getattr(opt, "grad_scale", None)
    found = getattr(opt, "found_inf", None)
    if isinstance(scale, Tensor):
        scale = scale.to(device, non_blocking=True)
    elif scale is not None:
        scale = torch.tensor(float(scale), device=device)
    if found is not None:
        found = found.to(device, non_blocking=True)
    return scale, found


def by_device(indices_params: List[Tuple[int, Tensor]]) -> Dict[torch.device, List[int]]:
    groups: Dict[torch.device, List[int]] = {}
    for i, p in indices_params:
        groups.setdefault(p.device, []).append(i)
    return groups


class SGD(Optimizer):
    """Stochastic gradient descent (optionally with momentum), one fused step per group.

    Same arguments, defaults, errors, ``param_groups`` and ``state`` (``momentum_buffer``) as
    ``torch.optim.SGD``; ``foreach``/``fused`` are accepted and ignored (the step is always fused);
    ``backend=`` picks the kernel. Sparse gradients take torch's plain math.
    ``master_weights=True``: float16/bfloat16 params get an fp32 master copy (``state["master_param"]``)
    and an fp32 momentum buffer, see :mod:`fastattn.optim.master`.
    """

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, backend=None, master_weights=False):
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        check_unsupported("SGD", differentiable, foreach, fused)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused)
        super().__init__(params, defaults)
        self.backend = check_backend(backend)
        self.master_weights = bool(master_weights)
        self._step_supports_amp_scaling = True

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        _master.restore_float32_state(self, state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group) -> None:
        momentum = group["momentum"]
        lr, lr_tensor = lr_args(group["lr"])
        _check_hyper(lr, momentum=momentum, weight_decay=group["weight_decay"])
        hyper = dict(lr=lr, momentum=momentum, dampening=group["dampening"], weight_decay=group["weight_decay"],
                     nesterov=group["nesterov"], maximize=group["maximize"], lr_tensor=lr_tensor)
        dense, sparse = [], []
        for p in group["params"]:
            if p.grad is not None:
                (sparse if p.grad.is_sparse else dense).append(p)
        master_weights = getattr(self, "master_weights", False)
        for ps in by_device([(i, p) for i, p in enumerate(dense)]).values():
            on_device = [dense[i] for i in ps]
            for part in _master.split(on_device, master_weights):
                if part:
                    self._step_params([on_device[i] for i in part], hyper, momentum, lr_tensor, master_weights)
        for p in sparse:  # torch's single-tensor math (plain tensor ops) handles sparse gradients
            self._sparse_step(p, group, lr_tensor.item() if lr_tensor is not None else lr)

    def _step_params(self, params, hyper, momentum, lr_tensor, master_weights) -> None:
        """One fused call: params on one device, all with a master or all without."""
        masters = None
        if _master.has_master(master_weights, params[0]):
            for p in params:
                _master.ensure_master(self.state[p], p, ("momentum_buffer",))
            masters = [self.state[p][_master.MASTER_KEY] for p in params]
        grads = [p.grad for p in params]
        bufs, new = [], []
        if momentum != 0:
            for p in params:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                new.append(buf is None)
                if buf is None:
                    buf = state["momentum_buffer"] = torch.empty_like(p.grad, dtype=torch.float32 if masters
                                                                      else p.grad.dtype)
                bufs.append(buf)
        scale, found = amp_args(self, params[0].device)
        params, grads, bufs = real_lists(params, grads, bufs)
        _sgd_run(params, grads, bufs, new, hyper["lr"], momentum, hyper["dampening"], hyper["weight_decay"],
                 hyper["nesterov"], hyper["maximize"], lr_tensor, scale, found, self.backend, params[0].device,
                 masters)

    def _sparse_step(self, p: Tensor, group, lr: float) -> None:
        scale, found = amp_args(self, p.device)
        if found is not None and found.item() != 0:
            return
        grad = p.grad if scale is None else p.grad / scale
        grad = -grad if group["maximize"] else grad
        if group["weight_decay"] != 0:
            grad = grad.add(p, alpha=group["weight_decay"])
        momentum = group["momentum"]
        if momentum != 0:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.detach().clone()
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
            grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        p.add_(grad, alpha=-lr)
