"""Drop-in fully connected layer.

``Linear`` is ``torch.nn.Linear`` (same constructor, parameter names, init and ``state_dict``; it
subclasses it, so ``isinstance`` checks and checkpoints carry over) whose forward runs
``fastattn.linear`` (through :func:`dense`, see there for CUDA); keyword-only extras: ``activation`` (None, 'relu', 'gelu', 'silu', fused into
the GEMM's epilogue; None is a plain Linear) and ``backend``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn import backend as _backend
from fastattn.ops._activation import ACTIVATIONS, apply_activation
from fastattn.ops.linear import linear

__all__ = ["Linear", "dense"]


def dense(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None,
          backend: Optional[str] = None) -> Tensor:
    """The GEMMs of fastattn's modules (this Linear, MultiheadAttention's projections, the Transformer
    layers' feed-forward block): ``fastattn.linear`` with the module's ``backend``.

    One exception: CUDA tensors under ``auto`` run torch's cuBLAS GEMM (``F.linear``, then the
    activation), since our hand-written CUDA GEMM has not been measured against cuBLAS on a GPU yet;
    name ``backend='cuda'`` or ``'triton'`` to run ours there.
    """
    if input.device.type == "cuda" and (backend or _backend.get_backend()) == "auto":
        return apply_activation(F.linear(input, weight, bias), ACTIVATIONS[activation])
    return linear(input, weight, bias, activation=activation, backend=backend)


class Linear(torch.nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 activation: Optional[str] = None, backend: Optional[str] = None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of None, 'relu', 'gelu', 'silu', got {activation!r}")
        super().__init__(in_features, out_features, bias, device, dtype)
        self.activation = activation
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        return dense(input, self.weight, self.bias, self.activation, self.backend)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", activation={self.activation!r}" if self.activation else "")
