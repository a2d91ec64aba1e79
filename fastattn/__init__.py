"""fastattn: hand-written CUDA, Triton and C++ CPU kernels behind drop-in PyTorch modules.

    import fastattn
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)

Every functional op takes ``backend="auto" | "cpu" | "cuda" | "triton" | "reference"``;
``fastattn.set_backend()`` / env ``FASTATTN_BACKEND`` set the process-wide default.
"""
from fastattn import _ext  # noqa: F401  (loads the native ops)
from fastattn.backend import BACKENDS, get_backend, set_backend
from fastattn.info import info
from fastattn.ops.attention import attention, attention_varlen, scaled_dot_product_attention
from fastattn.ops.conv2d import conv2d, conv2d_relu_maxpool2d
from fastattn.ops.linear import linear
from fastattn.ops.lstm import lstm, lstm_cell
from fastattn.ops.optim import adam_step_, sgd_step_
from fastattn import nn, optim  # noqa: E402  (drop-in modules and optimizers)
from fastattn.patch import patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "get_backend", "set_backend", "info",
    "attention", "attention_varlen", "scaled_dot_product_attention",
    "conv2d", "conv2d_relu_maxpool2d",
    "linear",
    "lstm", "lstm_cell",
    "sgd_step_", "adam_step_",
    "nn", "optim", "patch", "unpatch",
]
