"""The torch / Triton version differences every Triton op meets, in one place.

* torch >= 2.6 has ``torch.library.triton_op`` + ``wrap_triton`` (torch.compile traces into the kernels, and the
  op's body doubles as its fake kernel). Older torch gets a plain ``custom_op`` that launches the kernels itself;
  such an op needs its fake kernel registered by hand (``NEEDS_FAKE``).
* ``fastattn.triton.aot`` compiles every kernel for a GPU target on a machine without one: while it runs,
  ``launcher(kernel)`` hands back a compiler instead of the kernel (``gpu_target()`` is then set).
* ``wrap_triton`` accepts only ``JITFunction`` / ``Autotuner`` objects. Under ``TRITON_INTERPRET=1`` Triton < 3.8
  gives ``InterpretedFunction`` objects instead (seen with torch 2.11 + Triton 3.6), so those are launched as they
  are: the interpreter is for eager tests on the CPU, never traced.
* ``FASTATTN_TRITON_TUNE=first`` makes every autotuned kernel keep only its first config
  (``tune_configs``): correctness runs on a GPU (``make gpu-check``'s test step) then compile one config
  per kernel variant instead of sweeping them all.
"""
from __future__ import annotations

import os

import torch

try:
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    _TRACEABLE: tuple = (JITFunction, Autotuner)
except ImportError:  # pragma: no cover - a Triton without these modules
    _TRACEABLE = ()

def tune_configs(configs: list) -> list:
    """An autotuner's config list, or only its first config under ``FASTATTN_TRITON_TUNE=first``."""
    return configs[:1] if os.environ.get("FASTATTN_TRITON_TUNE") == "first" else configs


HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
NEEDS_FAKE = not HAS_TRITON_OP


def triton_op(name: str, mutates_args=()):
    """Decorator registering ``fn`` as the op ``name`` (see the module docstring)."""
    if HAS_TRITON_OP:
        return torch.library.triton_op(name, mutates_args=mutates_args)
    return torch.library.custom_op(name, mutates_args=mutates_args)


# (arch, compile function) while fastattn.triton.aot compiles for a GPU target; None otherwise.
_AOT = None


def gpu_target():
    """The GPU arch (e.g. 90) the kernels are being compiled for without a GPU, or None."""
    return _AOT[0] if _AOT else None


def launcher(kernel):
    """What ``kernel[grid](...)`` is called on: the kernel, or the AOT compiler's stand-in."""
    if _AOT is not None:
        return _AOT[1](kernel)
    return kernel


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)`` where torch has it and takes the kernel; else the kernel itself."""
    if _AOT is not None:
        return launcher(kernel)
    if HAS_TRITON_OP and isinstance(kernel, _TRACEABLE):
        return torch.library.wrap_triton(kernel)
    return kernel
