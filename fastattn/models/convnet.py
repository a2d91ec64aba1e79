"""The seed CNN: Conv 3→32 3×3 → ReLU → MaxPool 2×2 → Flatten → Linear→64 → ReLU → Linear→classes.

``channels=(32,)`` gives one conv block per entry; the default input is 3×64×64. With
``impl="fastattn"`` each conv → ReLU → pool block runs as fastattn's fused
``conv2d_relu_maxpool2d`` when this build has it (else fastattn's Conv2d, then ReLU and pool).
"""
from __future__ import annotations

import inspect
from typing import Optional, Sequence

import torch
from torch import nn

from fastattn.models._impl import modules


class ConvNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 64,
                 channels: Sequence[int] = (32,), kernel_size: int = 3, padding: int = 0, pool: int = 2,
                 hidden: int = 64, impl: str = "fastattn", backend: Optional[str] = None):
        super().__init__()
        M = modules(impl, backend)
        self.impl, self.backend, self.pool = impl, backend, pool
        self.convs = nn.ModuleList()
        size, c_in = image_size, in_channels
        for c_out in channels:
            self.convs.append(M.Conv2d(c_in, c_out, kernel_size, padding=padding))
            size = (size + 2 * padding - kernel_size + 1) // pool
            if size < 1:
                raise ValueError(f"image_size {image_size} is too small for {len(channels)} conv blocks")
            c_in = c_out
        self.fc1 = M.Linear(c_in * size * size, hidden)
        self.fc2 = M.Linear(hidden, num_classes)
        self._fused = M.conv_relu_pool()

    def block(self, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self._fused is not None:
            return _call_fused(self._fused, conv, x, self.pool, self.backend)
        return nn.functional.max_pool2d(torch.relu(conv(x)), self.pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = self.block(conv, x)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def _call_fused(fn, conv: nn.Module, x: torch.Tensor, pool: int, backend: Optional[str]) -> torch.Tensor:
    """fastattn.conv2d_relu_maxpool2d(input, weight, bias, stride, padding, dilation, groups, pool_kernel=, backend=)."""
    params = inspect.signature(fn).parameters
    kw = {}
    for name in ("pool_kernel", "pool_kernel_size", "pool_size"):
        if name in params:
            kw[name] = pool
            break
    else:
        if pool != 2:
            raise ValueError("fastattn.conv2d_relu_maxpool2d takes no pool size argument: use pool=2")
    if "backend" in params:
        kw["backend"] = backend
    return fn(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups, **kw)
