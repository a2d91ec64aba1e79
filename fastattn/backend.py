"""Backend choice shared by every op: ``backend=`` argument, ``set_backend()``, env ``FASTATTN_BACKEND``.

Each op describes, per backend, why that backend cannot run a given input (an empty list means
it can). ``select`` then applies the policy of ARCHITECTURE.md:

* an explicit backend that cannot run the input raises ``NotImplementedError`` listing the reasons;
* ``auto`` walks CPU tensors through ``cpu → reference`` and CUDA tensors through
  ``cuda → triton → reference``, warning once (per op and reason) when it skips one.
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Callable, Dict, List, Optional

import torch

from fastattn import _ext

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

_state = threading.local()
_warned: set = set()


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Process-wide default backend for every fastattn op (overridden by an op's ``backend=``)."""
    global _default
    _default = _check_name(name)


def get_backend() -> str:
    return _default


_default = _check_name(os.environ.get("FASTATTN_BACKEND", "auto"))


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def device_reasons(backend: str, device: torch.device, op: str) -> List[str]:
    """Reasons shared by all ops: where each backend can run at all."""
    if backend == "cpu":
        if device.type != "cpu":
            return [f"the cpu backend takes CPU tensors, got {device.type}"]
        if not _ext.available():
            return [f"the compiled extension is not loaded ({_ext.LOAD_ERROR})"]
        if not _ext.has_kernel(op, "CPU"):
            return [f"fastattn::{op} has no CPU kernel"]
        return []
    if backend == "cuda":
        if device.type != "cuda":
            return [f"the cuda backend takes CUDA tensors, got {device.type}"]
        if not _ext.available():
            return [f"the compiled extension is not loaded ({_ext.LOAD_ERROR})"]
        if not _ext.has_kernel(op, "CUDA"):
            return ["fastattn was built without CUDA kernels"]
        return []
    if backend == "triton":
        if not triton_available():
            return ["triton is not installed"]
        if device.type == "cpu" and not triton_interpret():
            return ["triton runs CPU tensors only under TRITON_INTERPRET=1"]
        if device.type not in ("cpu", "cuda"):
            return [f"triton does not take {device.type} tensors"]
        return []
    return []  # reference runs anywhere


def select(op: str, backend: Optional[str], device: torch.device,
           reasons: Dict[str, Callable[[], List[str]]], native_op: Optional[str] = None) -> str:
    """Pick the backend for one call of ``op``.

    ``reasons[name]()`` returns why backend ``name`` cannot run this input (op-specific, on top of
    :func:`device_reasons`); a backend missing from ``reasons`` is not implemented for ``op``.
    ``native_op`` names the registered C++ op whose CPU/CUDA kernels the cpu/cuda backends call.
    """
    requested = _check_name(backend) if backend is not None else _default

    def why_not(name: str) -> List[str]:
        if name not in reasons:
            return [f"fastattn.{op} has no {name} backend"]
        shared = device_reasons(name, device, native_op or op)
        return shared if shared else reasons[name]()

    if requested != "auto":
        why = why_not(requested)
        if why:
            raise NotImplementedError(
                f"fastattn.{op}: backend={requested!r} cannot run this input:\n  - " + "\n  - ".join(why))
        return requested

    order = AUTO_ORDER.get(device.type, ("reference",))
    skipped = []
    for name in order:
        why = why_not(name)
        if not why:
            if skipped:
                key = (op, tuple((n, tuple(w)) for n, w in skipped))
                if key not in _warned:
                    _warned.add(key)
                    text = "; ".join(f"{n}: {', '.join(w)}" for n, w in skipped)
                    warnings.warn(f"fastattn.{op}: falling back to the {name!r} backend ({text})", stacklevel=3)
            return name
        skipped.append((name, why))
    raise NotImplementedError(f"fastattn.{op}: no backend can run this input: {skipped}")
