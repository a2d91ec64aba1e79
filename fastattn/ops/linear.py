"""Fully connected layer with a fused bias + activation: the functional API, checks, backend choice, autograd.

Native contract (every backend; the tests hold them all to one oracle):

    linear_fwd(input, weight, bias?, activation, save_preact) -> (out, preact)
    linear_bwd(grad_out, input, weight, saved?, activation, output_mask[3])
        -> (grad_input, grad_weight, grad_bias)

* input ``(M, K)`` (2-D: the Python op flattens leading dims; it may be non-contiguous, kernels
  take its strides or make it contiguous), weight ``(N, K)``, bias ``(N,)`` or None; one floating
  dtype for all three (float16, bfloat16, float32; float64 on cpu/reference). 16-bit inputs
  accumulate in float32 and every result (grads too) is rounded once to the input dtype.
* ``activation``: 0 none, 1 relu, 2 gelu (exact, erf), 3 silu (conv2d's codes), applied to
  ``input @ weight^T + bias`` before the output is written. ``out`` is ``(M, N)``, contiguous.
* ``preact`` (``input @ weight^T + bias``) is returned only when ``save_preact`` and activation is
  2 or 3, else it is an empty tensor. Backward takes ``saved`` = the output for relu, the
  pre-activation for gelu/silu, None for none.
* backward: ``gz = grad_out * act'(saved)``; ``grad_input = gz @ weight`` ``(M, K)``;
  ``grad_weight = gz^T @ input`` ``(N, K)``; ``grad_bias = gz.sum(0)`` ``(N,)``. An output whose
  ``output_mask`` entry is False is an empty tensor.
* M, N or K may be 0 (K == 0: ``out = act(bias)`` broadcast, or zeros).
* Triton: ``fastattn::triton_linear_fwd`` / ``triton_linear_bwd`` (fastattn/triton/linear.py), the
  same signatures and semantics.
"""
from __future__ import annotations

import importlib.util
import math
from typing import List, Optional

import torch
from torch import Tensor

from fastattn import _ext, backend as _backend
from fastattn.ops._activation import ACTIVATIONS, apply_activation, check_epilogue, check_operands
from fastattn.ops._autograd import refuse_double_backward

__all__ = ["linear", "linear_reference", "ACTIVATIONS"]


# --------------------------------------------------------------------------------------------
# The oracle: plain PyTorch math, also the `reference` backend.
# --------------------------------------------------------------------------------------------
def linear_reference(x: Tensor, w: Tensor, b: Optional[Tensor], activation: int = 0) -> Tensor:
    """The native contract on a 2-D input in plain math (differentiable by autograd): float64 for
    float64 input, else float32 accumulation, rounded once to the input dtype."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = x.to(cdt) @ w.to(cdt).t()
    if b is not None:
        z = z + b.to(cdt)
    return apply_activation(z, activation).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Native ops: fake kernels and autograd.
# --------------------------------------------------------------------------------------------
def _fwd_fake(x, w, b, activation, save_preact):
    M, N = x.shape[0], w.shape[0]
    keep = save_preact and activation in (2, 3)
    return x.new_empty((M, N)), x.new_empty((M, N) if keep else (0,))


def _bwd_fake(grad_out, x, w, saved, activation, output_mask):
    M, K = x.shape
    N = w.shape[0]
    return (x.new_empty((M, K) if output_mask[0] else (0,)),
            x.new_empty((N, K) if output_mask[1] else (0,)),
            x.new_empty((N,) if output_mask[2] else (0,)))


def make_linear_autograd(bwd_op, what: str):
    """(setup_context, backward) for a linear forward op whose backward op is ``bwd_op``.

    Saves the input, the weight and what act' needs: the output for relu, the pre-activation for
    gelu/silu (the forward must have run with save_preact=True), nothing for no activation.
    """

    def setup_context(ctx, inputs, output):
        x, w, b, activation, save_preact = inputs
        out, pre = output
        saved = out if activation == 1 else pre if activation in (2, 3) else None
        ctx.save_for_backward(x, w, saved)
        ctx.activation = activation
        ctx.has_bias = b is not None

    def backward(ctx, grad_out, grad_pre):
        x, w, saved = ctx.saved_tensors
        refuse_double_backward(what, grad_out, x, w)
        if ctx.activation in (2, 3) and tuple(saved.shape) != tuple(grad_out.shape):
            raise RuntimeError(f"fastattn.{what}: backward through gelu/silu needs the forward run with save_preact=True")
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grads = bwd_op(grad_out.contiguous(), x, w, saved, ctx.activation, mask)
        return tuple(g if m else None for g, m in zip(grads, mask)) + (None, None)

    return setup_context, backward


_native = _ext.available() and hasattr(torch.ops.fastattn, "linear_fwd")
if _native:
    torch.library.register_fake("fastattn::linear_fwd")(_fwd_fake)
    torch.library.register_fake("fastattn::linear_bwd")(_bwd_fake)
    # linear_fwd's autograd is in C++ in this build (csrc/cpu/linear.cpp: the Python autograd kernel
    # cost ~10-20 µs per call); the Python one serves the Triton op (fastattn/triton/linear.py).
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastattn::linear_fwd", "Autograd"):
        _fwd_setup, _fwd_backward = make_linear_autograd(torch.ops.fastattn.linear_bwd, "linear")
        torch.library.register_autograd("fastattn::linear_fwd", _fwd_backward, setup_context=_fwd_setup)


def _triton_op():
    """The Triton forward (differentiable; registered in its module). Imported on first use."""
    import fastattn.triton.linear  # noqa: F401  (registers fastattn::triton_linear_fwd/_bwd)
    return torch.ops.fastattn.triton_linear_fwd


# --------------------------------------------------------------------------------------------
# Checks: clear errors naming the argument.
# --------------------------------------------------------------------------------------------
def _check_inputs(input: Tensor, weight: Tensor, bias: Optional[Tensor], activation) -> None:
    check_operands(input, weight)
    if input.dim() < 1:
        raise ValueError("input must have at least 1 dimension (*, in_features), got a 0-D tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got a {weight.dim()}-D tensor")
    N, K = weight.shape
    if input.shape[-1] != K:
        raise ValueError(f"input has {input.shape[-1]} features (its last dimension) but weight {tuple(weight.shape)} "
                         f"expects in_features = {K}")
    check_epilogue(input, bias, N, "out_features", activation)


def _reasons(dtype: torch.dtype):
    def cpu() -> List[str]:
        return []

    def cuda() -> List[str]:
        return ["float64 input (the CUDA kernels take float16, bfloat16, float32)"] if dtype == torch.float64 else []

    def triton() -> List[str]:
        if importlib.util.find_spec("fastattn.triton.linear") is None:
            return ["this install has no fastattn/triton/linear.py"]
        return ["float64 input (the Triton kernels take float16, bfloat16, float32)"] if dtype == torch.float64 else []

    return {"cpu": cpu, "cuda": cuda, "triton": triton, "reference": lambda: []}


# Which backend runs a configuration: `fastattn.backend.select` walks its rules (explicit backend, auto
# order, warnings) once per key, as the modules call this for every projection; errors are never cached.
_SELECTED: dict = {}


@torch.compiler.assume_constant_result
def _select(backend: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """The backend for one call, from Python constants only: torch.compile runs this while tracing and
    bakes the answer into the graph (the registry look-ups inside are not traceable; a later
    ``fastattn.set_backend`` does not reach graphs already compiled)."""
    requested = backend if backend is not None else _backend.get_backend()
    key = (requested, device, dtype, _backend.triton_interpret())
    name = _SELECTED.get(key)
    if name is None:
        name = _backend.select("linear", requested, device, _reasons(dtype), native_op="linear_fwd")
        _SELECTED[key] = name
    return name


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _run(name: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], act: int) -> Tensor:
    if name == "reference":
        return linear_reference(x, weight, bias, act)
    op = _triton_op() if name == "triton" else torch.ops.fastattn.linear_fwd
    save_preact = act in (2, 3) and _needs_grad(x, weight, bias)
    return op(x, weight, bias, act, save_preact)[0]


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------
def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, activation: Optional[str] = None,
           backend: Optional[str] = None) -> Tensor:
    """Drop-in for ``torch.nn.functional.linear``: ``input @ weight.T + bias``, plus ``activation``
    (None, 'relu', 'gelu' (exact), 'silu') applied with the bias in the GEMM's epilogue before the
    output is written.

    input ``(*, in_features)`` (any number of leading dims, including none), weight
    ``(out_features, in_features)``, bias ``(out_features,)`` or None; returns ``(*, out_features)``.
    """
    _check_inputs(input, weight, bias, activation)
    lead = input.shape[:-1]
    N, K = weight.shape
    x = input if input.dim() == 2 else input.reshape(math.prod(lead), K)
    name = _select(backend, input.device, input.dtype)
    out = _run(name, x, weight, bias, ACTIVATIONS[activation])
    return out if input.dim() == 2 else out.reshape(*lead, N)
