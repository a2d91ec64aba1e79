"""fp32 master weights for float16/bfloat16 parameters (``master_weights=True``), shared by SGD and Adam.

The optimizer keeps, per float16/bfloat16 parameter, ``state["master_param"]``: a float32 copy made
on its first step. Its other state tensors (``momentum_buffer``, ``exp_avg``, ...) are float32 too.
The fused step updates the master and writes the rounded value to the parameter in the same pass.
float32/float64 parameters have no master: ``master_weights`` changes nothing for them.

The master is the truth: change a parameter in place after its first step (e.g. load new weights
into the model) and the next step overwrites it from the master; load the optimizer's state too, or
drop ``state[p]["master_param"]``.

``state_dict()`` carries the masters; ``load_state_dict`` keeps them (and the state) in float32
where torch's would cast every state tensor to the parameter's dtype.
"""
from __future__ import annotations

from itertools import chain
from typing import List, Tuple

import torch
from torch import Tensor

MASTER_KEY = "master_param"
_LOW = (torch.float16, torch.bfloat16)


def has_master(master_weights: bool, p: Tensor) -> bool:
    return master_weights and p.dtype in _LOW


def ensure_master(state: dict, p: Tensor, state_keys: Tuple[str, ...]) -> None:
    """Creates the master (a float32 copy of p) if missing; state tensors of state_keys become float32."""
    if MASTER_KEY not in state:
        state[MASTER_KEY] = p.detach().to(torch.float32, copy=True)
    for key in state_keys:
        t = state.get(key)
        if isinstance(t, Tensor) and t.dtype != torch.float32:
            state[key] = t.to(torch.float32)


def split(params: List[Tensor], master_weights: bool) -> Tuple[List[int], List[int]]:
    """Indices of params without and with a master (one fused call each)."""
    plain, master = [], []
    for i, p in enumerate(params):
        (master if has_master(master_weights, p) else plain).append(i)
    return plain, master


def restore_float32_state(opt, state_dict: dict) -> None:
    """After torch's load_state_dict: put back the float32 state of parameters saved with a master."""
    if not getattr(opt, "master_weights", False):
        return
    saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = chain.from_iterable(g["params"] for g in opt.param_groups)
    by_id = dict(zip(saved_ids, params))
    for pid, saved in state_dict["state"].items():
        p = by_id.get(pid)
        if p is None or MASTER_KEY not in saved or p.dtype not in _LOW:
            continue
        state = opt.state[p]
        for key, value in saved.items():
            if key != "step" and isinstance(value, Tensor) and value.dtype == torch.float32:
                state[key] = value.to(device=p.device, copy=True)
