"""``impl="fastattn" | "torch"``: where a model takes its kernel-backed modules and optimizers from.

    M = modules("fastattn")          # or "torch"
    conv = M.Conv2d(3, 32, 3)        # fastattn.nn.Conv2d(..., backend=M.backend) or torch.nn.Conv2d

Both namespaces hand out classes with torch's constructor signature and parameter names, so a
model built either way has the same ``state_dict`` keys and weights move across with
``load_state_dict``. A fastattn class that this build lacks raises a clear error when a model
asks for it (not at import), so the torch half keeps working.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

IMPLS = ("fastattn", "torch")

# Names the models may ask for, and where fastattn keeps them.
NN_CLASSES = ("MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder",
              "TransformerDecoder", "Transformer", "Conv2d", "LSTM", "LSTMCell", "Linear")
OPTIM_CLASSES = ("SGD", "Adam", "AdamW")


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def fastattn_missing(*names: str):
    """The names in ``names`` that ``fastattn.nn`` / ``fastattn.optim`` do not provide (yet)."""
    import fastattn.nn
    import fastattn.optim
    missing = []
    for n in names:
        where = fastattn.optim if n in OPTIM_CLASSES else fastattn.nn
        if not hasattr(where, n):
            missing.append(f"fastattn.{where.__name__.split('.')[-1]}.{n}")
    return missing


class Modules:
    """Attribute access gives the class for ``impl`` (fastattn ones with ``backend`` bound)."""

    def __init__(self, impl: str, backend: Optional[str] = None):
        self.impl = check_impl(impl)
        self.backend = backend

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if name in OPTIM_CLASSES:
            return self._get("optim", name)
        if name in NN_CLASSES:
            return self._get("nn", name)
        raise AttributeError(f"modules({self.impl!r}) has no {name!r}; known: {NN_CLASSES + OPTIM_CLASSES}")

    def _get(self, pkg: str, name: str):
        if self.impl == "torch":
            return getattr(torch.optim if pkg == "optim" else torch.nn, name)
        import importlib
        mod = importlib.import_module(f"fastattn.{pkg}")
        cls = getattr(mod, name, None)
        if cls is None:
            raise RuntimeError(f"impl='fastattn' needs fastattn.{pkg}.{name}, which this build of fastattn does not "
                               f"provide yet; use impl='torch' for this model")
        if self.backend is None:
            return cls
        return functools.partial(cls, backend=self.backend)

    @property
    def attention(self):
        """The functional attention used by the LM's KV-cache decode (see ``cached_attention``)."""
        return cached_attention_fastattn if self.impl == "fastattn" else cached_attention_torch

    def conv_relu_pool(self):
        """fastattn's fused conv2d → ReLU → max-pool op, or None (torch, or not in this build)."""
        if self.impl != "fastattn":
            return None
        import fastattn
        return getattr(fastattn, "conv2d_relu_maxpool2d", None)


def modules(impl: str, backend: Optional[str] = None) -> Modules:
    return Modules(impl, backend)


# Attention of L new query rows against a cache of S >= L keys, the new rows being the cache's last L
# (bottom-right causal alignment: new row i sees keys j <= i + S - L). q (B, H, L, E), k/v (B, H, S, E).
def cached_attention_fastattn(q, k, v, backend=None):
    import fastattn
    return fastattn.attention(q, k, v, causal=True, causal_align="bottom_right", backend=backend)


def cached_attention_torch(q, k, v, backend=None):
    L, S = q.shape[-2], k.shape[-2]
    if L == S:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    visible = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(diagonal=S - L)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible)
