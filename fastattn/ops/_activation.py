"""The fused epilogue activations shared by conv2d and linear: names, the native ops' codes, plain math."""
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
