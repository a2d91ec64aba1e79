"""Drop-in fully connected layer.

``Linear`` is ``torch.nn.Linear`` (same constructor, parameter names, init and ``state_dict``; it
subclasses it, so ``isinstance`` checks and checkpoints carry over) whose forward runs
``fastattn.linear``; keyword-only extras: ``activation`` (None, 'relu', 'gelu', 'silu', fused into
the GEMM's epilogue; None is a plain Linear) and ``backend``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastattn.ops.linear import ACTIVATIONS, linear

__all__ = ["Linear"]


class Linear(torch.nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 activation: Optional[str] = None, backend: Optional[str] = None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of None, 'relu', 'gelu', 'silu', got {activation!r}")
        super().__init__(in_features, out_features, bias, device, dtype)
        self.activation = activation
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        return linear(input, self.weight, self.bias, activation=self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", activation={self.activation!r}" if self.activation else "")
