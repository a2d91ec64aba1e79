"""Drop-in convolution modules.

``Conv2d`` is ``torch.nn.Conv2d`` (same constructor, parameter names, init and ``state_dict``;
it subclasses it, so ``isinstance`` checks and checkpoints carry over) whose forward runs
``fastattn.conv2d``; keyword-only extras: ``activation`` (fused into the epilogue) and ``backend``.

``Conv2dReLUMaxPool2d`` is ``Sequential(Conv2d, ReLU, MaxPool2d)`` in one module and one kernel
(the seed CNN's first block); its ``weight``/``bias`` are a ``Conv2d``'s.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastattn.ops.conv2d import ACTIVATIONS, conv2d, conv2d_relu_maxpool2d

__all__ = ["Conv2d", "Conv2dReLUMaxPool2d"]


class Conv2d(torch.nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, *, activation: Optional[str] = None,
                 backend: Optional[str] = None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of None, 'relu', 'gelu', 'silu', got {activation!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.activation = activation
        self.backend = backend

    def _padded(self, input: Tensor):
        """(input, padding) for the kernel: non-zero padding modes pad first, then a valid conv."""
        if self.padding_mode != "zeros":
            return F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
        return input, self.padding

    def forward(self, input: Tensor) -> Tensor:
        x, padding = self._padded(input)
        return conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                      activation=self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", activation={self.activation!r}" if self.activation else "")


class Conv2dReLUMaxPool2d(Conv2d):
    """``MaxPool2d(pool_kernel, pool_stride)(ReLU()(Conv2d(...)(x)))`` computed in one pass."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, *, pool_kernel=2, pool_stride=None,
                 backend: Optional[str] = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype, backend=backend)
        self.pool_kernel = pool_kernel
        self.pool_stride = pool_stride

    def forward(self, input: Tensor) -> Tensor:
        x, padding = self._padded(input)
        return conv2d_relu_maxpool2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                                     self.pool_kernel, self.pool_stride, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pool_kernel={self.pool_kernel}, pool_stride={self.pool_stride}"
