"""``fastattn.nn.MultiheadAttention``: a drop-in for ``torch.nn.MultiheadAttention`` over our kernels.

Same constructor, forward signature, parameter names, shapes and initialisation as torch's module,
so a ``state_dict`` moves between the two both ways and the outputs agree. What differs:

* the attention itself runs in ``fastattn.attention`` (our kernels, picked by ``backend``), never in
  torch's SDPA; dropout in training is our kernel's dropout; the projections run in
  ``fastattn.linear`` (see :func:`fastattn.nn.linear.dense`);
* ``need_weights=True`` still computes the output with our kernel and returns the weights from
  plain softmax math next to it, with the very dropout mask the kernel used (same seed, same hash);
* a query row with nothing to attend to gives output 0 and weights 0 (torch gives NaN on some paths);
* no NestedTensor fast path.

The data path, batch-first inside (``B`` batch, ``L`` queries, ``S`` keys, ``H`` heads, ``D`` head size)::

    query (B, L, E) --in-proj--> q (B, L, E) --split heads--> (B, H, L, D) --+
    key   (B, S, kdim) --------> k (B, S, E) [+ bias_k] [+ zero] -> (B, H, S', D)  +--> fastattn.attention
    value (B, S, vdim) --------> v (B, S, E) [+ bias_v] [+ zero] -> (B, H, S', D) --+        |
    out (B, L, E) <--out_proj-- merge heads <-- (B, H, L, D) <---------------------------------+

Masks follow torch's conventions (bool True = *do not attend*, float = added to the scores) and
become one additive bias ``(B|1, H|1, L|1, S')`` handed to the kernel as a float ``attn_mask``.
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module, Parameter
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from fastattn import backend as _backend
from fastattn.backend import BACKENDS
from fastattn.nn.linear import dense
from fastattn.ops import attention as _attn_ops
from fastattn.ops.attention import attention, dropout_keep_mask

__all__ = ["MultiheadAttention"]


# torch raises AssertionError / RuntimeError for these; ours are ValueErrors that are also those,
# so code written against torch's module keeps catching them.
class MultiheadAttentionShapeError(ValueError, AssertionError):
    """A bad input shape or configuration (also an ``AssertionError``, as torch raises)."""


class MultiheadAttentionMaskError(ValueError, RuntimeError):
    """An ``attn_mask`` of the wrong size (also a ``RuntimeError``, as torch raises)."""


def _canonical_mask(mask: Optional[Tensor], name: str, dtype: torch.dtype,
                    other: Optional[Tensor] = None, other_name: str = "") -> Optional[Tensor]:
    """bool (True = masked out) or float mask -> float additive mask; None stays None (torch's rules)."""
    if mask is None:
        return None
    _check_mask_type(mask, name, other, other_name)
    if mask.dtype == torch.bool:
        return _bool_to_bias(mask, dtype)
    return mask


def _check_mask_type(mask: Tensor, name: str, other: Optional[Tensor] = None, other_name: str = "") -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise MultiheadAttentionShapeError(f"only bool and floating types of {name} are supported, got {mask.dtype}")
    if other is not None and other.dtype != mask.dtype:
        warnings.warn(f"Support for mismatched {name} and {other_name} is deprecated. "
                      "Use same type for both instead.", stacklevel=4)


# The last few bool masks turned into additive float masks. A model hands the same mask object to
# every layer of a stack (and often the same one step after step), so each is converted once. An
# entry holds the mask weakly and is reused only while the mask is alive and unmodified (same
# in-place version counter), for the same dtype.
_BIAS_CACHE: list = []
_BIAS_CACHE_SIZE = 4


def _bool_to_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """bool (True = masked out) -> float mask with -inf where True, 0 elsewhere (cached, see above)."""
    version = mask._version
    for ref, ver, dt, bias in _BIAS_CACHE:
        if ref() is mask and ver == version and dt == dtype:
            return bias
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not torch.compiler.is_compiling():
        _BIAS_CACHE.insert(0, (weakref.ref(mask), version, dtype, bias))
        del _BIAS_CACHE[_BIAS_CACHE_SIZE:]
    return bias


# Which attention backend runs a configuration. `fastattn.backend.select` walks the rules (explicit
# backend, auto order, warnings) once per key; the key holds everything its answer depends on.
_SELECTED: dict = {}


def _select_backend(backend: Optional[str], q: Tensor, v: Tensor, bias: Optional[Tensor]) -> str:
    requested = backend if backend is not None else _backend.get_backend()
    bias_grad = bias is not None and bias.requires_grad
    key = (requested, q.device, q.dtype, q.shape[-1], v.shape[-1], bias_grad, _backend.triton_interpret())
    name = _SELECTED.get(key)
    if name is None:
        big_head = max(q.shape[-1], v.shape[-1]) > 256
        name = _backend.select("attention", requested, q.device, _attn_ops._reasons(q.dtype, big_head, bias_grad),
                               native_op="attention_fwd")
        _SELECTED[key] = name
    return name


def _attend(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], dropout_p: float, causal: bool, seed: int,
            backend: Optional[str]) -> Tensor:
    """Attention of (B, H, L, D) views (last dim contiguous, other strides free) with an additive bias
    broadcastable to (B, H, L, S) in q's dtype; returns (B, H, L, D) contiguous.

    The cpu/cuda backends call the native op directly (its autograd is in C++; the module has
    checked its inputs already; the bias never needs a gradient there, see ``_select_backend``);
    the others go through ``fastattn.attention``.
    """
    name = _select_backend(backend, q, v, bias)
    if name in ("cpu", "cuda") and _attn_ops._native_fwd is not None:
        if bias is not None:
            bias = bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        scale = 1.0 / math.sqrt(q.shape[-1])
        out, _ = _attn_ops._native_fwd(q, k, v, bias, dropout_p, scale, -1, 0 if causal else -1, 0, 0.0, seed)
        return out
    return attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, causal=causal, seed=seed, backend=name)


class MultiheadAttention(Module):
    r"""Drop-in for :class:`torch.nn.MultiheadAttention`; the attention runs in ``fastattn.attention``.

    Arguments are torch's; ``backend`` (keyword-only) is passed to the functional op
    (``None``: the process-wide default, see :func:`fastattn.set_backend`).
    """

    __constants__ = ["batch_first"]
    bias_k: Optional[Tensor]
    bias_v: Optional[Tensor]

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *,
                 backend: Optional[str] = None) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be greater than 0, "
                             f"got embed_dim={embed_dim} and num_heads={num_heads} instead")
        if embed_dim % num_heads != 0:
            raise MultiheadAttentionShapeError(
                f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim} and num_heads={num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.backend = backend

        # Registered in torch's order, so the same seed gives the same initial weights.
        if not self._qkv_same_embed_dim:
            self.q_proj_weight = Parameter(torch.empty((embed_dim, embed_dim), **factory_kwargs))
            self.k_proj_weight = Parameter(torch.empty((embed_dim, self.kdim), **factory_kwargs))
            self.v_proj_weight = Parameter(torch.empty((embed_dim, self.vdim), **factory_kwargs))
            self.register_parameter("in_proj_weight", None)
        else:
            self.in_proj_weight = Parameter(torch.empty((3 * embed_dim, embed_dim), **factory_kwargs))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = Parameter(torch.empty(3 * embed_dim, **factory_kwargs))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory_kwargs)
        if add_bias_kv:
            self.bias_k = Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
            self.bias_v = Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        if self._qkv_same_embed_dim:
            xavier_uniform_(self.in_proj_weight)
        else:
            xavier_uniform_(self.q_proj_weight)
            xavier_uniform_(self.k_proj_weight)
            xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            constant_(self.in_proj_bias, 0.0)
            constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            xavier_normal_(self.bias_v)

    def __setstate__(self, state):
        # Old (torch 1.1) checkpoints lack this flag, as in torch's module.
        state.setdefault("_qkv_same_embed_dim", True)
        state.setdefault("backend", None)
        super().__setstate__(state)

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if not self._qkv_same_embed_dim:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        if self.batch_first:
            s += ", batch_first=True"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s

    @classmethod
    def from_torch(cls, module: torch.nn.MultiheadAttention, *, backend: Optional[str] = None) -> "MultiheadAttention":
        """Ours, sharing ``module``'s parameters (the same ``Parameter`` objects: optimizers keep working)."""
        if not isinstance(module, torch.nn.MultiheadAttention):
            raise TypeError(f"expected a torch.nn.MultiheadAttention, got {type(module).__name__}")
        new = cls(module.embed_dim, module.num_heads, dropout=module.dropout,
                  bias=module.in_proj_bias is not None, add_bias_kv=module.bias_k is not None,
                  add_zero_attn=module.add_zero_attn, kdim=module.kdim, vdim=module.vdim,
                  batch_first=module.batch_first, device="meta", backend=backend)
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                     "bias_k", "bias_v"):
            setattr(new, name, getattr(module, name))
        new.out_proj = module.out_proj
        new.train(module.training)
        return new

    # ----------------------------------------------------------------------------------------
    def _check_shapes(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """torch's shape rules with clearer messages; returns whether the input is batched."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
            if t.is_nested:
                raise NotImplementedError("fastattn.nn.MultiheadAttention does not take NestedTensor inputs")
        if query.dim() not in (2, 3):
            raise MultiheadAttentionShapeError(
                f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query tensor")
        batched = query.dim() == 3
        kind = "batched (3-D)" if batched else "unbatched (2-D)"
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise MultiheadAttentionShapeError(
                f"For {kind} `query`, expected `key` and `value` to be {query.dim()}-D but found "
                f"{key.dim()}-D and {value.dim()}-D tensors respectively")
        if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
            raise MultiheadAttentionShapeError(
                f"For {kind} `query`, expected `key_padding_mask` to be `None` or {query.dim() - 1}-D but found "
                f"{key_padding_mask.dim()}-D tensor instead")
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise MultiheadAttentionShapeError(
                f"For {kind} `query`, expected `attn_mask` to be `None`, 2-D or 3-D but found "
                f"{attn_mask.dim()}-D tensor instead")
        if not batched and attn_mask is not None and attn_mask.dim() == 3:
            expected = (self.num_heads, query.shape[0], key.shape[0])
            if attn_mask.shape != expected:
                raise MultiheadAttentionShapeError(
                    f"Expected `attn_mask` shape to be {expected} (num_heads, L, S) but got {tuple(attn_mask.shape)}")
        if query.shape[-1] != self.embed_dim:
            raise MultiheadAttentionShapeError(
                f"was expecting embedding dimension of {self.embed_dim} in query, but got {query.shape[-1]}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise MultiheadAttentionShapeError(
                f"expected key and value of feature sizes kdim={self.kdim} and vdim={self.vdim}, "
                f"got {key.shape[-1]} and {value.shape[-1]}")
        if key.shape[:-1] != value.shape[:-1]:
            raise MultiheadAttentionShapeError(
                f"key's sequence and batch dims {tuple(key.shape[:-1])} do not match value's {tuple(value.shape[:-1])}")
        if batched:
            b_axis = 0 if self.batch_first else 1
            if query.shape[b_axis] != key.shape[b_axis]:
                raise MultiheadAttentionShapeError(
                    f"query and key must have the same batch size, got {query.shape[b_axis]} and {key.shape[b_axis]}")
        return batched

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """torch's forward: returns ``(attn_output, attn_output_weights or None)``."""
        batched = self._check_shapes(query, key, value, key_padding_mask, attn_mask)
        if key_padding_mask is not None:
            _check_mask_type(key_padding_mask, "key_padding_mask", attn_mask, "attn_mask")
        if attn_mask is not None:
            _check_mask_type(attn_mask, "attn_mask")
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        # torch's rule: the hint replaces the mask only when nothing else needs the mask.
        causal = bool(is_causal) and key_padding_mask is None and not need_weights
        if causal:
            attn_mask = None
        if key_padding_mask is not None and key_padding_mask.dtype == torch.bool:
            key_padding_mask = _bool_to_bias(key_padding_mask, query.dtype)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = _bool_to_bias(attn_mask, query.dtype)

        if (batched and not need_weights and key is value and self.in_proj_weight is not None
                and self.bias_k is None and self.bias_v is None and not self.add_zero_attn):
            return self._fast_forward(query, key, key_padding_mask, attn_mask, causal), None

        # Batch-first views: (B, L, E), (B, S, kdim), (B, S, vdim).
        self_attn, kv_same = query is key and key is value, key is value
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, L, E = query.shape
        S = key.shape[1]
        H, D = self.num_heads, self.head_dim

        q, k, v = self._in_projection(query, key, value, self_attn, kv_same)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(B, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.expand(B, 1, E)], dim=1)
        elif self.bias_k is not None or self.bias_v is not None:
            raise MultiheadAttentionShapeError("bias_k and bias_v must both be set or both be None")
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(B, 1, E)], dim=1)
            v = torch.cat([v, v.new_zeros(B, 1, E)], dim=1)
        extra = k.shape[1] - S  # key columns appended above: every query may attend to them

        bias = self._merged_bias(attn_mask, key_padding_mask, B, L, S, extra)
        q, k, v = (t.unflatten(-1, (H, D)).transpose(1, 2) for t in (q, k, v))  # (B, H, ·, D) views

        dropout_p = self.dropout if self.training else 0.0
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout_p > 0 else 0
        out = _attend(q, k, v, bias, dropout_p, causal, seed, self.backend)  # (B, H, L, D)

        if batched and not self.batch_first:
            out = out.permute(2, 0, 1, 3).reshape(L, B, E)
        else:
            out = out.transpose(1, 2).reshape(B, L, E)
        out = self._linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0)
        if not need_weights:
            return out, None

        weights = self._weights(q, k, bias, dropout_p, seed)  # (B, H, L, S')
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            weights = weights.squeeze(0)
        return out, weights

    # ----------------------------------------------------------------------------------------
    def _linear(self, x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        """The projections: fastattn's GEMM (see :func:`fastattn.nn.linear.dense`), this module's backend."""
        return dense(x, w, b, None, self.backend)

    def _fast_forward(self, query: Tensor, kv: Tensor, key_padding_mask: Optional[Tensor],
                      attn_mask: Optional[Tensor], causal: bool) -> Tensor:
        """The common case: batched, packed ``in_proj_weight``, key is value, no weights returned.

        Masks are float already. One GEMM for q, k, v (two for cross-attention), the heads split as
        strided views that the kernel reads in place, one copy to merge the heads, the out-projection.
        """
        E, H, D = self.embed_dim, self.num_heads, self.head_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        # The projections come out (B, n, 3|2|1, H, D) when batch_first, else (n, B, ·, H, D); q, k, v
        # are unbound along the 3|2|1 axis first and only then viewed as (B, H, n, D). So in backward
        # their gradients are stacked straight into the projection's layout (one copy), not stacked
        # on a new leading axis and copied again into place.
        to_bhnd = (lambda t: t.transpose(1, 2)) if self.batch_first else (lambda t: t.permute(1, 2, 0, 3))
        if query is kv:
            q, k, v = (to_bhnd(t) for t in self._linear(query, w, b).unflatten(-1, (3, H, D)).unbind(2))
        else:
            # split (not slicing twice): its backward is one cat into the weight's gradient.
            w_q, w_kv = w.split([E, 2 * E])
            b_q, b_kv = (None, None) if b is None else b.split([E, 2 * E])
            q = to_bhnd(self._linear(query, w_q, b_q).unflatten(-1, (H, D)))
            k, v = (to_bhnd(t) for t in self._linear(kv, w_kv, b_kv).unflatten(-1, (2, H, D)).unbind(2))
        B, L, S = q.shape[0], q.shape[2], k.shape[2]
        bias = self._merged_bias(attn_mask, key_padding_mask, B, L, S, 0)
        dropout_p = self.dropout if self.training else 0.0
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout_p > 0 else 0
        out = _attend(q, k, v, bias, dropout_p, causal, seed, self.backend)  # (B, H, L, D)
        out = out.transpose(1, 2) if self.batch_first else out.permute(2, 0, 1, 3)
        return self._linear(out.reshape(out.shape[0], out.shape[1], E), self.out_proj.weight, self.out_proj.bias)

    # ----------------------------------------------------------------------------------------
    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor, self_attn: bool, kv_same: bool):
        """The q/k/v input projections, each (B, ·, E); one GEMM for self-attention, two for shared k/v."""
        E = self.embed_dim
        b = self.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        if not self._qkv_same_embed_dim:
            return (self._linear(query, self.q_proj_weight, b_q), self._linear(key, self.k_proj_weight, b_k),
                    self._linear(value, self.v_proj_weight, b_v))
        w = self.in_proj_weight
        if self_attn:
            return self._linear(query, w, b).chunk(3, dim=-1)
        w_q, w_kv = w.split([E, 2 * E])
        if kv_same:
            k, v = self._linear(key, w_kv, None if b is None else b[E:]).chunk(2, dim=-1)
            return self._linear(query, w_q, b_q), k, v
        w_k, w_v = w_kv.chunk(2)
        return self._linear(query, w_q, b_q), self._linear(key, w_k, b_k), self._linear(value, w_v, b_v)

    def _merged_bias(self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                     B: int, L: int, S: int, extra: int) -> Optional[Tensor]:
        """Float masks -> one additive bias broadcastable to (B, H, L, S + extra); None without masks."""
        H = self.num_heads
        bias = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (L, S):
                    raise MultiheadAttentionMaskError(
                        f"The shape of the 2D attn_mask is {tuple(attn_mask.shape)}, but should be {(L, S)}.")
                bias = (F.pad(attn_mask, (0, extra)) if extra else attn_mask).reshape(1, 1, L, S + extra)
            else:
                if attn_mask.shape != (B * H, L, S):
                    raise MultiheadAttentionMaskError(
                        f"The shape of the 3D attn_mask is {tuple(attn_mask.shape)}, but should be {(B * H, L, S)} "
                        f"(batch * num_heads, L, S).")
                bias = (F.pad(attn_mask, (0, extra)) if extra else attn_mask).reshape(B, H, L, S + extra)
        if key_padding_mask is not None:
            if key_padding_mask.shape != (B, S):
                raise MultiheadAttentionShapeError(
                    f"key_padding_mask must have shape (batch, S) = {(B, S)} "
                    f"(or (S,) = {(S,)} for unbatched input), got {tuple(key_padding_mask.shape)}")
            kpm = (F.pad(key_padding_mask, (0, extra)) if extra else key_padding_mask).reshape(B, 1, 1, S + extra)
            bias = kpm if bias is None else bias + kpm
        return bias

    def _weights(self, q: Tensor, k: Tensor, bias: Optional[Tensor], dropout_p: float, seed: int) -> Tensor:
        """Attention weights (B, H, L, S) in plain math, with the kernel's dropout mask (same seed, same hash).

        Never given the causal hint: torch only uses the hint when weights are not needed.
        """
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        scores = torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2)) * (self.head_dim ** -0.5)
        if bias is None:
            w = torch.softmax(scores, dim=-1)
        else:  # a row with every key masked out gets weights 0 (softmax alone would give NaN)
            scores = scores + bias.to(cdt)
            dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
            w = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
        if dropout_p > 0:
            B, H, L, S = w.shape
            keep = dropout_keep_mask(seed, B, H, L, S, dropout_p, device=w.device)
            w = w * keep.to(cdt) / (1.0 - dropout_p)
        return w.to(q.dtype)
