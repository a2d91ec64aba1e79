"""What conv2d and linear share: the fused epilogue's activations (names, native codes, plain math) and the
argument checks common to both ops (input/weight types and dtypes, the bias, the activation name)."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# The native ops' ``activation`` argument: 0 none, 1 relu, 2 gelu (exact, erf), 3 silu.
ACTIVATIONS = {None: 0, "relu": 1, "gelu": 2, "silu": 3}


def apply_activation(z: Tensor, activation: int) -> Tensor:
    """``z`` through the activation with native code ``activation`` (plain torch math: the oracle)."""
    if activation == 1:
        return torch.relu(z)
    if activation == 2:
        return F.gelu(z)
    if activation == 3:
        return F.silu(z)
    return z


_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_operands(input: Tensor, weight: Tensor) -> None:
    """Clear errors unless input and weight are floating tensors of one dtype on one device."""
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_TYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if input.dtype != weight.dtype:
        raise TypeError(f"input and weight must have one dtype, got {input.dtype} and {weight.dtype}")
    if input.device != weight.device:
        raise ValueError(f"input and weight must be on one device, got {input.device} and {weight.device}")


def check_epilogue(input: Tensor, bias: Optional[Tensor], n: int, what: str, activation) -> None:
    """Clear errors for the epilogue's arguments: ``bias`` None or ``(n,)`` (``what`` names n) with
    input's dtype and device, ``activation`` a known name."""
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a Tensor or None, got {type(bias).__name__}")
        if bias.dim() != 1 or bias.shape[0] != n:
            raise ValueError(f"bias must have shape ({n},) ({what}), got {tuple(bias.shape)}")
        if bias.dtype != input.dtype:
            raise TypeError(f"bias must have input's dtype {input.dtype}, got {bias.dtype}")
        if bias.device != input.device:
            raise ValueError(f"bias must be on input's device {input.device}, got {bias.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of None, 'relu', 'gelu', 'silu', got {activation!r}")
