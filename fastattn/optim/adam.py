"""``fastattn.optim.Adam`` / ``AdamW``: torch.optim.Adam/AdamW's interface over the fused ``adam_step_`` op."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer

from fastattn.ops.optim import _adam_run
from fastattn.optim import master as _master
from fastattn.optim.sgd import amp_args, by_device, check_backend, check_unsupported, lr_args, real_lists

__all__ = ["Adam", "AdamW"]


def _beta(b) -> float:
    return float(b.item()) if isinstance(b, Tensor) else float(b)


class Adam(Optimizer):
    """Adam (AdamW with ``decoupled_weight_decay=True``), one fused step per parameter group.

    Same arguments, defaults, errors, ``param_groups`` and ``state`` (``step`` as a float32 tensor,
    ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) as ``torch.optim.Adam``. ``step`` lives on the
    parameter's device (as with torch's ``fused``/``capturable``); a state loaded from torch with
    ``step`` elsewhere is moved on the next step. ``foreach``/``fused``/``capturable`` are accepted
    and ignored (the step is always fused and never synchronises with the host on a GPU).
    ``master_weights=True``: float16/bfloat16 params get an fp32 master copy (``state["master_param"]``)
    and fp32 state, see :mod:`fastattn.optim.master`.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, backend=None, master_weights=False):
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not ((isinstance(betas[0], float) and isinstance(betas[1], float))
                or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))):
            raise ValueError("betas must be either both floats or both Tensors")
        for i, b in enumerate(betas):
            if isinstance(b, Tensor) and b.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
        check_unsupported(type(self).__name__, differentiable, foreach, fused)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable,
                        fused=fused, decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)
        self.backend = check_backend(backend)
        self.master_weights = bool(master_weights)
        self._step_supports_amp_scaling = True

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("decoupled_weight_decay", False)
            group.setdefault("fused", None)

    def _state_for(self, p: Tensor, amsgrad: bool):
        state = self.state[p]
        if len(state) == 0:  # lazy init, torch's keys and order
            dtype = torch.float32 if p.device.type != "cpu" else torch.get_default_dtype()
            if dtype not in (torch.float32, torch.float64):
                dtype = torch.float32
            state["step"] = torch.zeros((), dtype=dtype, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        step = state["step"]
        if not torch.is_tensor(step):
            step = state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
        if step.device != p.device or (p.device.type != "cpu" and step.dtype != torch.float32):
            state["step"] = step.to(device=p.device, dtype=torch.float32)  # e.g. loaded from torch's CPU step
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if _master.has_master(getattr(self, "master_weights", False), p):
            _master.ensure_master(state, p, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))
        return state

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
        amsgrad = group["amsgrad"]
        params = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")
            params.append(p)
        beta1, beta2 = (_beta(b) for b in group["betas"])
        lr, lr_tensor = lr_args(group["lr"])
        for idx in by_device(list(enumerate(params))).values():
            ps_all = [params[i] for i in idx]
            for part in _master.split(ps_all, getattr(self, "master_weights", False)):
                if not part:
                    continue
                ps = [ps_all[i] for i in part]
                states = [self._state_for(p, amsgrad) for p in ps]
                with_master = _master.has_master(getattr(self, "master_weights", False), ps[0])
                masters = [s[_master.MASTER_KEY] for s in states] if with_master else None
                scale, found = amp_args(self, ps[0].device)
                lists = real_lists(ps, [p.grad for p in ps], [s["exp_avg"] for s in states],
                                   [s["exp_avg_sq"] for s in states],
                                   [s["max_exp_avg_sq"] for s in states] if amsgrad else [])
                _adam_run(*lists, [s["step"] for s in states], lr, beta1, beta2, group["eps"],
                          group["weight_decay"], amsgrad, group["maximize"], group["decoupled_weight_decay"],
                          lr_tensor, scale, found, self.backend, ps[0].device, masters)


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay (torch.optim.AdamW's arguments and defaults)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None, backend=None,
                 master_weights=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, backend=backend, master_weights=master_weights)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
