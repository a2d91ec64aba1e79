"""``fastattn.info()`` / ``python -m fastattn info``: what was built, what runs, and which backend each op uses."""
from __future__ import annotations

import os
import platform
from typing import Dict

import torch

from fastattn import _ext, backend as _backend

# public op name -> the registered native op (fastattn::<name>) its cpu/cuda backends call
OPS = {
    "attention": "attention_fwd",
    "attention_varlen": "attention_varlen_fwd",
    "conv2d": "conv2d_fwd",
    "conv2d_relu_maxpool2d": "conv2d_relu_maxpool2d_fwd",
    "linear": "linear_fwd",
    "lstm_cell": "lstm_cell_fwd",
    "lstm": "lstm_layer_fwd",
    "sgd_step_": "sgd_step_",
    "adam_step_": "adam_step_",
}


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def _auto_backend(op: str, native: str, device_type: str) -> str:
    """Which backend `auto` picks for ordinary inputs of `op` on `device_type` (before per-input checks)."""
    device = torch.device(device_type)
    for name in _backend.AUTO_ORDER[device_type]:
        if not _backend.device_reasons(name, device, native):
            return name
    return "none"


def info() -> Dict[str, object]:
    import fastattn
    C = _ext._C
    gpu = torch.cuda.is_available()
    d = {
        "fastattn": fastattn.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "triton_interpret": _backend.triton_interpret(),
        "extension_loaded": C is not None,
        "extension_error": None if C is not None else str(_ext.LOAD_ERROR),
        "built_against_torch": C.torch_version() if C else None,
        "compiler": C.compiler() if C else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_isa": C.cpu_isa() if C else None,
        "cpu_gemm": C.gemm_kernel() if C and hasattr(C, "gemm_kernel") else None,
        "openmp": C.openmp() if C else None,
        "threads": torch.get_num_threads(),
        "cuda_kernels_compiled": C.compiled_with_cuda() if C else False,
        "cuda_archs": (C.cuda_archs() or None) if C else None,
        "gpu_present": gpu,
        "gpu": torch.cuda.get_device_name(0) if gpu else None,
        "default_backend": _backend.get_backend(),
        "backend_env": os.environ.get("FASTATTN_BACKEND"),
        "ops": {},
    }
    for op, native in OPS.items():
        d["ops"][op] = {
            "native_op": f"fastattn::{native}",
            "cpu_kernel": _ext.has_kernel(native, "CPU"),
            "cuda_kernel": _ext.has_kernel(native, "CUDA"),
            "auto_backend_cpu_tensors": _auto_backend(op, native, "cpu"),
            "auto_backend_cuda_tensors": _auto_backend(op, native, "cuda"),
        }
    return d


def format_info(d: Dict[str, object]) -> str:
    lines = []
    for k, v in d.items():
        if k == "ops":
            lines.append("ops:")
            for op, row in v.items():
                lines.append(f"  {op:<22} " + ", ".join(f"{a}={b}" for a, b in row.items()))
        else:
            lines.append(f"{k:<24} {v}")
    return "\n".join(lines)
