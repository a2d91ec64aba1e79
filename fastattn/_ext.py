"""Loads the compiled extension (``fastattn._C``), which registers the native ops with torch."""
import functools

import torch  # noqa: F401  (libtorch must be loaded before the extension)

try:
    from fastattn import _C  # noqa: F401
    LOAD_ERROR = None
except ImportError as e:  # a source checkout without a build, or an ABI mismatch
    _C = None
    LOAD_ERROR = e


def available() -> bool:
    return _C is not None


@functools.lru_cache(maxsize=None)  # the registry is fixed once the extension has loaded; asked on every op call
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``fastattn::<op>`` has a kernel for ``dispatch_key`` ('CPU' or 'CUDA')."""
    if _C is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn::{op}", dispatch_key)
    except RuntimeError:
        return False
